//! The reference's keys in sections that plugins own (`model.<name>.*`,
//! `augmentation.<name>.*`, `optim.*`). When no loaded plugin declares one of them, it is still
//! accepted at its reference default, and refused as "not supported yet" otherwise, so every
//! reference config and command line parses whichever plugins are installed.

use super::schema::KeySpec;
use super::value::{Value, ValueType};

/// Owner shown for reference keys whose plugin is not loaded.
pub const NOT_INSTALLED: &str = "imgclf: no loaded plugin declares this key";

/// Reference keys of plugin-owned sections, with the reference's defaults.
pub fn reference_plugin_keys() -> Vec<KeySpec> {
    let table: Vec<(&str, ValueType, Value)> = vec![
        (
            "model.vgg.n_channels",
            ValueType::list_of(ValueType::Int),
            Value::List(vec![
                Value::Int(64),
                Value::Int(128),
                Value::Int(256),
                Value::Int(512),
                Value::Int(512),
            ]),
        ),
        (
            "model.vgg.n_layers",
            ValueType::list_of(ValueType::Int),
            Value::List(vec![
                Value::Int(2),
                Value::Int(2),
                Value::Int(3),
                Value::Int(3),
                Value::Int(3),
            ]),
        ),
        ("model.vgg.use_bn", ValueType::Bool, Value::Bool(true)),
        ("model.resnet.depth", ValueType::Int, Value::Int(110)),
        (
            "model.resnet.n_blocks",
            ValueType::list_of(ValueType::Int),
            Value::List(vec![
                Value::Int(2),
                Value::Int(2),
                Value::Int(2),
                Value::Int(2),
            ]),
        ),
        (
            "model.resnet.block_type",
            ValueType::Str,
            Value::Str("basic".to_string()),
        ),
        (
            "model.resnet.initial_channels",
            ValueType::Int,
            Value::Int(16),
        ),
        ("model.resnet_preact.depth", ValueType::Int, Value::Int(110)),
        (
            "model.resnet_preact.n_blocks",
            ValueType::list_of(ValueType::Int),
            Value::List(vec![
                Value::Int(2),
                Value::Int(2),
                Value::Int(2),
                Value::Int(2),
            ]),
        ),
        (
            "model.resnet_preact.block_type",
            ValueType::Str,
            Value::Str("basic".to_string()),
        ),
        (
            "model.resnet_preact.initial_channels",
            ValueType::Int,
            Value::Int(16),
        ),
        (
            "model.resnet_preact.remove_first_relu",
            ValueType::Bool,
            Value::Bool(false),
        ),
        (
            "model.resnet_preact.add_last_bn",
            ValueType::Bool,
            Value::Bool(false),
        ),
        (
            "model.resnet_preact.preact_stage",
            ValueType::list_of(ValueType::Bool),
            Value::List(vec![
                Value::Bool(true),
                Value::Bool(true),
                Value::Bool(true),
            ]),
        ),
        ("model.wrn.depth", ValueType::Int, Value::Int(28)),
        ("model.wrn.initial_channels", ValueType::Int, Value::Int(16)),
        ("model.wrn.widening_factor", ValueType::Int, Value::Int(10)),
        ("model.wrn.drop_rate", ValueType::Float, Value::Float(0.0)),
        ("model.densenet.depth", ValueType::Int, Value::Int(100)),
        (
            "model.densenet.n_blocks",
            ValueType::list_of(ValueType::Int),
            Value::List(vec![
                Value::Int(6),
                Value::Int(12),
                Value::Int(24),
                Value::Int(16),
            ]),
        ),
        (
            "model.densenet.block_type",
            ValueType::Str,
            Value::Str("bottleneck".to_string()),
        ),
        ("model.densenet.growth_rate", ValueType::Int, Value::Int(12)),
        (
            "model.densenet.drop_rate",
            ValueType::Float,
            Value::Float(0.0),
        ),
        (
            "model.densenet.compression_rate",
            ValueType::Float,
            Value::Float(0.5),
        ),
        ("model.pyramidnet.depth", ValueType::Int, Value::Int(272)),
        (
            "model.pyramidnet.n_blocks",
            ValueType::list_of(ValueType::Int),
            Value::List(vec![
                Value::Int(3),
                Value::Int(24),
                Value::Int(36),
                Value::Int(3),
            ]),
        ),
        (
            "model.pyramidnet.initial_channels",
            ValueType::Int,
            Value::Int(16),
        ),
        (
            "model.pyramidnet.block_type",
            ValueType::Str,
            Value::Str("bottleneck".to_string()),
        ),
        ("model.pyramidnet.alpha", ValueType::Int, Value::Int(200)),
        ("model.resnext.depth", ValueType::Int, Value::Int(29)),
        (
            "model.resnext.n_blocks",
            ValueType::list_of(ValueType::Int),
            Value::List(vec![
                Value::Int(3),
                Value::Int(4),
                Value::Int(6),
                Value::Int(3),
            ]),
        ),
        (
            "model.resnext.initial_channels",
            ValueType::Int,
            Value::Int(64),
        ),
        ("model.resnext.cardinality", ValueType::Int, Value::Int(8)),
        ("model.resnext.base_channels", ValueType::Int, Value::Int(4)),
        ("model.shake_shake.depth", ValueType::Int, Value::Int(26)),
        (
            "model.shake_shake.initial_channels",
            ValueType::Int,
            Value::Int(96),
        ),
        (
            "model.shake_shake.shake_forward",
            ValueType::Bool,
            Value::Bool(true),
        ),
        (
            "model.shake_shake.shake_backward",
            ValueType::Bool,
            Value::Bool(true),
        ),
        (
            "model.shake_shake.shake_image",
            ValueType::Bool,
            Value::Bool(true),
        ),
        (
            "model.se_resnet_preact.depth",
            ValueType::Int,
            Value::Int(110),
        ),
        (
            "model.se_resnet_preact.initial_channels",
            ValueType::Int,
            Value::Int(16),
        ),
        (
            "model.se_resnet_preact.se_reduction",
            ValueType::Int,
            Value::Int(16),
        ),
        (
            "model.se_resnet_preact.block_type",
            ValueType::Str,
            Value::Str("basic".to_string()),
        ),
        (
            "model.se_resnet_preact.remove_first_relu",
            ValueType::Bool,
            Value::Bool(false),
        ),
        (
            "model.se_resnet_preact.add_last_bn",
            ValueType::Bool,
            Value::Bool(false),
        ),
        (
            "model.se_resnet_preact.preact_stage",
            ValueType::list_of(ValueType::Bool),
            Value::List(vec![
                Value::Bool(true),
                Value::Bool(true),
                Value::Bool(true),
            ]),
        ),
        (
            "optim.adam.betas",
            ValueType::list_of(ValueType::Float),
            Value::List(vec![Value::Float(0.9), Value::Float(0.999)]),
        ),
        ("optim.lars.eps", ValueType::Float, Value::Float(1e-09)),
        ("optim.lars.threshold", ValueType::Float, Value::Float(0.01)),
        (
            "optim.adabound.betas",
            ValueType::list_of(ValueType::Float),
            Value::List(vec![Value::Float(0.9), Value::Float(0.999)]),
        ),
        (
            "optim.adabound.final_lr",
            ValueType::Float,
            Value::Float(0.1),
        ),
        (
            "optim.adabound.gamma",
            ValueType::Float,
            Value::Float(0.001),
        ),
        (
            "augmentation.random_crop.padding",
            ValueType::Int,
            Value::Int(4),
        ),
        (
            "augmentation.random_crop.fill",
            ValueType::Int,
            Value::Int(0),
        ),
        (
            "augmentation.random_crop.padding_mode",
            ValueType::Str,
            Value::Str("constant".to_string()),
        ),
        (
            "augmentation.random_horizontal_flip.prob",
            ValueType::Float,
            Value::Float(0.5),
        ),
        (
            "augmentation.cutout.prob",
            ValueType::Float,
            Value::Float(1.0),
        ),
        (
            "augmentation.cutout.mask_size",
            ValueType::Int,
            Value::Int(16),
        ),
        (
            "augmentation.cutout.cut_inside",
            ValueType::Bool,
            Value::Bool(false),
        ),
        (
            "augmentation.cutout.mask_color",
            ValueType::Int,
            Value::Int(0),
        ),
        (
            "augmentation.cutout.dual_cutout_alpha",
            ValueType::Float,
            Value::Float(0.1),
        ),
        (
            "augmentation.random_erasing.prob",
            ValueType::Float,
            Value::Float(0.5),
        ),
        (
            "augmentation.random_erasing.area_ratio_range",
            ValueType::list_of(ValueType::Float),
            Value::List(vec![Value::Float(0.02), Value::Float(0.4)]),
        ),
        (
            "augmentation.random_erasing.min_aspect_ratio",
            ValueType::Float,
            Value::Float(0.3),
        ),
        (
            "augmentation.random_erasing.max_attempt",
            ValueType::Int,
            Value::Int(20),
        ),
        (
            "augmentation.mixup.alpha",
            ValueType::Float,
            Value::Float(1.0),
        ),
        (
            "augmentation.ricap.beta",
            ValueType::Float,
            Value::Float(0.3),
        ),
        (
            "augmentation.cutmix.alpha",
            ValueType::Float,
            Value::Float(1.0),
        ),
        (
            "augmentation.label_smoothing.epsilon",
            ValueType::Float,
            Value::Float(0.1),
        ),
    ];
    table
        .into_iter()
        .map(|(key, ty, default)| {
            KeySpec::new(key, ty, default, "reference key; its plugin is not loaded")
                .owned_by(NOT_INSTALLED)
                .unsupported()
        })
        .collect()
}
