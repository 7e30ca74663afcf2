//! ResNet-preact: "Identity Mappings in Deep Residual Networks" (He, Zhang, Ren, Sun, 2016),
//! arXiv:1603.05027. Original code: https://github.com/KaimingHe/resnet-1k-layers; reference
//! port: https://github.com/hysts/pytorch_image_classification (models/cifar/resnet_preact.py,
//! models/imagenet/resnet_preact.py).

mod ffi;
pub mod imagenet;
pub mod model;

imgclf_plugin_api::register!(model: model::ResNetPreactFactory);
