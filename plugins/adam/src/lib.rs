//! Adam: "Adam: A Method for Stochastic Optimization" (Kingma & Ba, 2014), arXiv:1412.6980, and
//! its AMSGrad variant: "On the Convergence of Adam and Beyond" (Reddi, Kale & Kumar, 2018),
//! arXiv:1904.09237. The reference uses `torch.optim.Adam` (with `amsgrad=True` for `amsgrad`):
//! https://github.com/hysts/pytorch_image_classification (optim/__init__.py).

pub mod adam;
mod ffi;

imgclf_plugin_api::register!(optimizer: adam::AdamFactory);
imgclf_plugin_api::register!(optimizer: adam::AmsgradFactory);
