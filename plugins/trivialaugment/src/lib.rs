//! TrivialAugment: Müller & Hutter, "TrivialAugment: Tuning-free Yet State-of-the-Art Data
//! Augmentation", arXiv:2103.10158. Original code: https://github.com/automl/trivialaugment;
//! semantics followed here: torchvision 0.26 `transforms.TrivialAugmentWide`
//! (https://github.com/pytorch/vision, torchvision/transforms/autoaugment.py).

mod ffi;
pub mod trivialaugment;

imgclf_plugin_api::register!(image_stage: trivialaugment::TrivialAugmentFactory);
