//! WRN: "Wide Residual Networks" (Zagoruyko, Komodakis, 2016), arXiv:1605.07146.
//! Original code: https://github.com/szagoruyko/wide-residual-networks; reference port:
//! https://github.com/hysts/pytorch_image_classification (models/cifar/wrn.py).

mod ffi;
pub mod model;

imgclf_plugin_api::register!(model: model::WrnFactory);
