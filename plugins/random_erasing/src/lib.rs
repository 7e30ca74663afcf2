//! Random Erasing: Zhong, Zheng, Kang, Li & Yang, "Random Erasing Data Augmentation",
//! arXiv:1708.04896. Original code: https://github.com/zhunzhong07/Random-Erasing; reference
//! implementation followed here: https://github.com/hysts/pytorch_image_classification
//! (transforms/random_erasing.py).

mod ffi;
pub mod random_erasing;

imgclf_plugin_api::register!(augmentation: random_erasing::RandomErasingFactory);
