//! DenseNet: "Densely Connected Convolutional Networks" (Huang, Liu, van der Maaten, Weinberger,
//! 2016), arXiv:1608.06993, and its journal version "Convolutional Networks with Dense
//! Connectivity", arXiv:2001.02394. Original code: https://github.com/liuzhuang13/DenseNet;
//! reference port: https://github.com/hysts/pytorch_image_classification (models/cifar/densenet.py,
//! models/imagenet/densenet.py).

mod ffi;
pub mod imagenet;
pub mod model;

imgclf_plugin_api::register!(model: model::DenseNetFactory);
