//! CutMix: Yun, Han, Oh, Chun, Choe & Yoo, "CutMix: Regularization Strategy to Train Strong
//! Classifiers with Localizable Features", arXiv:1905.04899. Original code:
//! https://github.com/clovaai/CutMix-PyTorch; reference implementation followed here:
//! https://github.com/hysts/pytorch_image_classification (collators/cutmix.py, losses/cutmix.py).

pub mod cutmix;
mod ffi;

imgclf_plugin_api::register!(augmentation: cutmix::CutMixFactory);
