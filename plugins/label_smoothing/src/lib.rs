//! Label smoothing: Szegedy, Vanhoucke, Ioffe, Shlens & Wojna, "Rethinking the Inception
//! Architecture for Computer Vision", arXiv:1512.00567 (section 7). Reference implementation
//! followed here: https://github.com/hysts/pytorch_image_classification
//! (losses/label_smoothing.py).

mod ffi;
pub mod label_smoothing;

imgclf_plugin_api::register!(augmentation: label_smoothing::LabelSmoothingFactory);
