//! ResNet: "Deep Residual Learning for Image Recognition" (He, Zhang, Ren, Sun, 2015),
//! arXiv:1512.03385. Original code: https://github.com/KaimingHe/deep-residual-networks;
//! reference port: https://github.com/hysts/pytorch_image_classification (models/cifar/resnet.py,
//! models/imagenet/resnet.py).

mod ffi;
pub mod imagenet;
pub mod model;

imgclf_plugin_api::register!(model: model::ResNetFactory);
