//! Mixup: Zhang, Cisse, Dauphin & Lopez-Paz, "mixup: Beyond Empirical Risk Minimization",
//! arXiv:1710.09412. Original code: https://github.com/facebookresearch/mixup-cifar10; reference
//! implementation followed here: https://github.com/hysts/pytorch_image_classification
//! (collators/mixup.py, losses/mixup.py).

mod ffi;
pub mod mixup;

imgclf_plugin_api::register!(augmentation: mixup::MixupFactory);
