//! VGG: "Very Deep Convolutional Networks for Large-Scale Image Recognition" (Simonyan,
//! Zisserman, 2014), arXiv:1409.1556, here with optional batch normalisation (arXiv:1502.03167).
//! Reference port: https://github.com/hysts/pytorch_image_classification (models/cifar/vgg.py,
//! models/imagenet/vgg.py).

mod ffi;
pub mod imagenet;
pub mod model;

imgclf_plugin_api::register!(model: model::VggFactory);
