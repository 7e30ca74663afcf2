//! RICAP: Takahashi, Matsubara & Uehara, "Data Augmentation using Random Image Cropping and
//! Patching for Deep CNNs", arXiv:1811.09030. Original code:
//! https://github.com/jackryo/ricap; reference implementation followed here:
//! https://github.com/hysts/pytorch_image_classification (collators/ricap.py, losses/ricap.py).

mod ffi;
pub mod ricap;

imgclf_plugin_api::register!(augmentation: ricap::RicapFactory);
