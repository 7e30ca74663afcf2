//! SENet: "Squeeze-and-Excitation Networks" (Hu, Shen, Albanie, Sun, Wu, 2017), arXiv:1709.01507,
//! applied to the pre-activation ResNet. Original code: https://github.com/hujie-frank/SENet;
//! reference port: https://github.com/hysts/pytorch_image_classification
//! (models/cifar/se_resnet_preact.py).

mod ffi;
pub mod model;

imgclf_plugin_api::register!(model: model::SeResNetPreactFactory);
