//! Cutout: DeVries & Taylor, "Improved Regularization of Convolutional Neural Networks with
//! Cutout", arXiv:1708.04552. Original code: https://github.com/uoguelph-mlrg/Cutout; reference
//! implementation followed here: https://github.com/hysts/pytorch_image_classification
//! (transforms/cutout.py).

pub mod boxes;
pub mod cutout;
mod ffi;

imgclf_plugin_api::register!(augmentation: cutout::CutoutFactory);
