//! SGDR: "SGDR: Stochastic Gradient Descent with Warm Restarts" (Loshchilov & Hutter, ICLR
//! 2017), arXiv:1608.03983. Original code: https://github.com/loshchil/SGDR; reference port:
//! https://github.com/hysts/pytorch_image_classification (scheduler/sgdr.py).

mod ffi;
pub mod sgdr;

imgclf_plugin_api::register!(scheduler: sgdr::SgdrFactory);
