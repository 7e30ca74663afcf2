//! The post-activation ResNet for CIFAR-sized inputs (conv-BN-ReLU blocks, ReLU after the
//! residual addition, projection shortcuts with BN), with the reference's state-dict names.

use imgclf_plugin_api::nn::{
    self, BatchNorm2d, Conv2d, ConvConfig, InitMode, Linear, ModelType, ParamStore, Scope,
};
use imgclf_plugin_api::{
    ComponentInfo, ConfigView, KeyDecl, Kind, Model, ModelContext, ModelFactory, NamedTensor,
    Result,
};
use tch::Tensor;

pub(crate) const SECTION: &str = "model.resnet";

/// `model.resnet.*`.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub depth: i64,
    pub bottleneck: bool,
    pub initial_channels: i64,
    pub init_mode: InitMode,
}

imgclf_plugin_api::config_section! {
    /// `model.resnet.*`, each key declared once (read back typed by `Keys::from_view`).
    pub struct Keys in "model.resnet" {
        /// network depth: 6n+2 (basic) or 9n+2 (bottleneck)
        depth: i64 = 110, at_least(1);
        /// blocks in each of the four stages (model.type imagenet only)
        n_blocks: Vec<i64> = vec![2, 2, 2, 2], at_least(1);
        /// residual block
        block_type: String = "basic", choices(&["basic", "bottleneck"]);
        /// channels of the first stage
        initial_channels: i64 = 16, at_least(1);
    }
}

impl Config {
    pub fn keys() -> Vec<KeyDecl> {
        Keys::keys()
    }

    pub fn from_view(c: &ConfigView) -> Result<Self> {
        let k = Keys::from_view(c)?;
        let bottleneck = nn::is_bottleneck(c, SECTION)?;
        Ok(Config {
            depth: k.depth,
            bottleneck,
            initial_channels: k.initial_channels,
            init_mode: InitMode::parse(&c.str("model.init_mode")?)?,
        })
    }

    /// Blocks per stage, checking the depth.
    fn blocks_per_stage(&self) -> Result<i64> {
        nn::residual_blocks_per_stage(SECTION, self.depth, self.bottleneck)
    }
}

/// conv-BN pairs of the residual path (`conv1`/`bn1`, ...) and the optional projection.
pub(crate) struct Block {
    convs: Vec<(Conv2d, BatchNorm2d)>,
    shortcut: Option<(Conv2d, BatchNorm2d)>,
}

impl Block {
    pub(crate) fn new(
        s: &Scope,
        c_in: i64,
        c_out: i64,
        stride: i64,
        bottleneck: bool,
        init: InitMode,
    ) -> Block {
        let conv_bn = |i: usize, ci: i64, co: i64, k: i64, stride: i64| {
            let conv = Conv2d::new(
                &s.sub(format!("conv{i}")),
                ci,
                co,
                k,
                ConvConfig {
                    stride,
                    padding: k / 2,
                    ..Default::default()
                },
                init,
            );
            (conv, BatchNorm2d::new(&s.sub(format!("bn{i}")), co))
        };
        let convs = if bottleneck {
            let mid = c_out / 4;
            vec![
                conv_bn(1, c_in, mid, 1, 1),
                conv_bn(2, mid, mid, 3, stride),
                conv_bn(3, mid, c_out, 1, 1),
            ]
        } else {
            vec![
                conv_bn(1, c_in, c_out, 3, stride),
                conv_bn(2, c_out, c_out, 3, 1),
            ]
        };
        let shortcut = (c_in != c_out).then(|| {
            let conv = Conv2d::new(
                &s.sub("shortcut.conv"),
                c_in,
                c_out,
                1,
                ConvConfig {
                    stride,
                    ..Default::default()
                },
                init,
            );
            (conv, BatchNorm2d::new(&s.sub("shortcut.bn"), c_out))
        });
        Block { convs, shortcut }
    }

    /// # Shapes
    /// N x C_in x H x W -> N x C_out x H/stride x W/stride
    pub(crate) fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let last = self.convs.len() - 1;
        let mut y = x.shallow_clone();
        for (i, (conv, bn)) in self.convs.iter().enumerate() {
            y = if i < last {
                bn.forward_relu(&conv.forward(&y), train)
            } else {
                bn.forward(&conv.forward(&y), train)
            };
        }
        let _ = match &self.shortcut {
            Some((conv, bn)) => y.g_add_(&bn.forward(&conv.forward(x), train)),
            None => y.g_add_(x),
        };
        y.relu_()
    }
}

pub struct ResNet {
    store: ParamStore,
    conv: Conv2d,
    bn: BatchNorm2d,
    stages: Vec<Vec<Block>>,
    fc: Linear,
    description: String,
}

impl ResNet {
    pub fn new(cfg: &Config, ctx: &ModelContext) -> Result<Self> {
        let n = cfg.blocks_per_stage()?;
        let e = if cfg.bottleneck { 4 } else { 1 };
        let ch = [
            cfg.initial_channels,
            cfg.initial_channels * 2 * e,
            cfg.initial_channels * 4 * e,
        ];
        let store = ParamStore::new(ctx.device);
        let root = store.root();
        let conv = Conv2d::new(
            &root.sub("conv"),
            ctx.n_channels,
            ch[0],
            3,
            ConvConfig {
                padding: 1,
                ..Default::default()
            },
            cfg.init_mode,
        );
        let bn = BatchNorm2d::new(&root.sub("bn"), cfg.initial_channels);
        let stages = nn::stages(&root, ch[0], &ch, &[1, 2, 2], n, |s, at| {
            Block::new(
                s,
                at.c_in,
                at.c_out,
                at.stride,
                cfg.bottleneck,
                cfg.init_mode,
            )
        });
        let fc = Linear::new(&root.sub("fc"), ch[2], ctx.n_classes, cfg.init_mode);
        let description = format!(
            "ResNet-{} ({} blocks, {n} per stage, channels {ch:?})",
            cfg.depth,
            if cfg.bottleneck {
                "bottleneck"
            } else {
                "basic"
            }
        );
        Ok(ResNet {
            store,
            conv,
            bn,
            stages,
            fc,
            description,
        })
    }
}

impl Model for ResNet {
    /// # Shapes
    /// N x C x H x W -> N x n_classes
    fn forward(&mut self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = self
            .bn
            .forward_relu(&self.conv.f_forward_checked(x)?, train);
        for stage in &self.stages {
            for block in stage {
                y = block.forward(&y, train);
            }
        }
        self.fc.forward_pooled(&y)
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        self.store.tensors()
    }

    fn summary(&self) -> String {
        self.description.clone()
    }
}

pub struct ResNetFactory;

impl ModelFactory for ResNetFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Model,
            "resnet",
            "ResNet (post-activation blocks); model.type cifar or imagenet (ResNet-18/34)",
        )
        .papers(&["1512.03385"])
        .keys(Config::keys())
        .small(&[("model.resnet.depth", "8")])
    }

    fn build(&self, config: &ConfigView, ctx: &ModelContext) -> Result<Box<dyn Model>> {
        let cfg = Config::from_view(config)?;
        let model: Box<dyn Model> = match ModelType::of(config)? {
            ModelType::Cifar => Box::new(ResNet::new(&cfg, ctx)?),
            ModelType::ImageNet => Box::new(crate::imagenet::ResNet::new(
                &cfg,
                nn::four_stage_blocks(config, SECTION)?,
                ctx,
            )?),
        };
        nn::probed_like_the_reference(model, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind as K};

    fn build(depth: i64, bottleneck: bool) -> Result<ResNet> {
        let cfg = Config {
            depth,
            bottleneck,
            initial_channels: 16,
            init_mode: InitMode::KaimingFanOut,
        };
        ResNet::new(
            &cfg,
            &ModelContext {
                n_channels: 3,
                image_size: 32,
                n_classes: 10,
                device: Device::Cpu,
            },
        )
    }

    #[test]
    fn parameter_counts_match_the_reference() {
        let count = |m: &ResNet| {
            m.tensors()
                .iter()
                .filter(|t| t.trainable)
                .map(|t| t.tensor.numel() as i64)
                .sum::<i64>()
        };
        assert_eq!(count(&build(110, false).unwrap()), 1_730_714);
        assert_eq!(count(&build(56, true).unwrap()), 557_914);
    }

    #[test]
    fn forward_shape_and_invalid_depth() {
        let mut m = build(8, false).unwrap();
        let y = m
            .forward(
                &Tensor::randn([2, 3, 32, 32], (K::Float, Device::Cpu)),
                true,
            )
            .unwrap();
        assert_eq!(y.size(), vec![2, 10]);
        assert!(build(21, false)
            .err()
            .unwrap()
            .0
            .contains("depth 21 is invalid"));
    }
}
