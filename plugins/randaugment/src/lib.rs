//! RandAugment: Cubuk, Zoph, Shlens & Le, "RandAugment: Practical automated data augmentation
//! with a reduced search space", arXiv:1909.13719. Original code:
//! https://github.com/tensorflow/tpu/tree/master/models/official/efficientnet (autoaugment.py);
//! semantics followed here: torchvision 0.26 `transforms.RandAugment`
//! (https://github.com/pytorch/vision, torchvision/transforms/autoaugment.py).

mod ffi;
pub mod randaugment;

imgclf_plugin_api::register!(image_stage: randaugment::RandAugmentFactory);
