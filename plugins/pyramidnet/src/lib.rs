//! PyramidNet: "Deep Pyramidal Residual Networks" (Han, Kim, Kim, 2016), arXiv:1610.02915.
//! Original code: https://github.com/jhkim89/PyramidNet; reference port:
//! https://github.com/hysts/pytorch_image_classification (models/cifar/pyramidnet.py,
//! models/imagenet/pyramidnet.py).

mod ffi;
pub mod imagenet;
pub mod model;

imgclf_plugin_api::register!(model: model::PyramidNetFactory);
