//! AdaBound: "Adaptive Gradient Methods with Dynamic Bound of Learning Rate" (Luo, Xiong, Liu &
//! Sun, ICLR 2019), arXiv:1902.09843. Original code: https://github.com/Luolc/AdaBound; reference
//! port: https://github.com/hysts/pytorch_image_classification (optim/adabound.py), whose
//! semantics (L2 decay for `adabound`, decoupled decay not scaled by the rate for `adaboundw`,
//! the final rate following the schedule) this plugin reproduces.

pub mod adabound;
mod ffi;

imgclf_plugin_api::register!(optimizer: adabound::AdaBoundFactory);
imgclf_plugin_api::register!(optimizer: adabound::AdaBoundWFactory);
