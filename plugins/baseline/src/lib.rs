//! Baseline training recipe of the reference: SGD with momentum/Nesterov/weight decay
//! (Sutskever et al., "On the importance of initialization and momentum in deep learning",
//! ICML 2013), step and cosine learning-rate schedules (cosine: Loshchilov & Hutter, SGDR,
//! arXiv:1608.03983), and the standard CIFAR augmentation of pad-and-random-crop plus
//! horizontal flip (He et al., arXiv:1512.03385). Reference code:
//! https://github.com/hysts/pytorch_image_classification (optim/, scheduler/, transforms/).

mod ffi;
pub mod flip;
pub mod random_crop;
pub mod schedules;
pub mod sgd;

imgclf_plugin_api::register!(optimizer: sgd::SgdFactory);
imgclf_plugin_api::register!(scheduler: schedules::ConstantFactory);
imgclf_plugin_api::register!(scheduler: schedules::MultistepFactory);
imgclf_plugin_api::register!(scheduler: schedules::LinearFactory);
imgclf_plugin_api::register!(scheduler: schedules::CosineFactory);
imgclf_plugin_api::register!(augmentation: random_crop::RandomCropFactory);
imgclf_plugin_api::register!(augmentation: flip::FlipFactory);
