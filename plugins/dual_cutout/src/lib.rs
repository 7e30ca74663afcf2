//! Dual-Cutout: DeVries & Taylor's Cutout applied twice with a consistency loss, after
//! "Improved Regularization of Convolutional Neural Networks with Cutout" and its dual-view
//! extension, arXiv:1802.07426. Reference implementation followed here:
//! https://github.com/hysts/pytorch_image_classification (transforms/cutout.py `DualCutout`,
//! losses/dual_cutout.py).

/// Cutout's square sampling, compiled from the cutout plugin's own file (no copy, and no
/// dependency on that crate, whose registrations would otherwise be linked in here too).
#[path = "../../cutout/src/boxes.rs"]
pub mod boxes;
pub mod dual_cutout;
mod ffi;

imgclf_plugin_api::register!(augmentation: dual_cutout::DualCutoutFactory);
