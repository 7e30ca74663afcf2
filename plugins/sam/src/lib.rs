//! SAM: "Sharpness-Aware Minimization for Efficiently Improving Generalization" (Foret,
//! Kleiner, Mobahi & Neyshabur, 2020), arXiv:2010.01412, with ASAM: "ASAM: Adaptive
//! Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks" (Kwon,
//! Kim, Park & Choi, 2021), arXiv:2102.11600. Step semantics of the widely used PyTorch
//! implementation: https://github.com/davda54/sam (`sam.py`).

mod ffi;
pub mod sam;

imgclf_plugin_api::register!(step: sam::SamFactory);
