//! ResNeXt: "Aggregated Residual Transformations for Deep Neural Networks" (Xie, Girshick,
//! Dollár, Tu, He, 2016), arXiv:1611.05431. Original code: https://github.com/facebookresearch/ResNeXt;
//! reference port: https://github.com/hysts/pytorch_image_classification (models/cifar/resnext.py,
//! models/imagenet/resnext.py).

mod ffi;
pub mod imagenet;
pub mod model;

imgclf_plugin_api::register!(model: model::ResNextFactory);
