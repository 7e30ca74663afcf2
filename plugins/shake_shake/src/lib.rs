//! Shake-Shake: "Shake-Shake regularization" (Gastaldi, 2017), arXiv:1705.07485.
//! Original code: https://github.com/xgastaldi/shake-shake; reference port:
//! https://github.com/hysts/pytorch_image_classification (models/cifar/shake_shake.py).

mod ffi;
pub mod model;

imgclf_plugin_api::register!(model: model::ShakeShakeFactory);
