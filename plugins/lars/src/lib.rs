//! LARS: "Large Batch Training of Convolutional Networks" (You, Gitman & Ginsburg, 2017),
//! arXiv:1708.03888, as used in "ImageNet Training in Minutes" (You et al., 2018),
//! arXiv:1801.03137. Reference code: https://github.com/hysts/pytorch_image_classification
//! (optim/lars.py), which uses no LARS coefficient (trust ratio `||w|| / (||g|| + wd ||w||)`
//! directly), so `train.base_lr` absorbs it.

mod ffi;
pub mod lars;

imgclf_plugin_api::register!(optimizer: lars::LarsFactory);
