//! ResNeXt for CIFAR-sized inputs: post-activation bottleneck blocks whose 3x3 convolution is
//! split into `cardinality` groups of `base_channels * 2^stage` channels, with the reference's
//! state-dict names.

use imgclf_plugin_api::nn::{
    self, BatchNorm2d, Conv2d, ConvConfig, InitMode, Linear, ModelType, ParamStore, Scope,
};
use imgclf_plugin_api::{
    plugin_bail, ComponentInfo, ConfigView, KeyDecl, Kind, Model, ModelContext, ModelFactory,
    NamedTensor, Result,
};
use tch::Tensor;

pub(crate) const SECTION: &str = "model.resnext";
pub(crate) const EXPANSION: i64 = 4;

/// `model.resnext.*`: ResNeXt-`depth` (`cardinality` x `base_channels`d); the reference's
/// CIFAR config is ResNeXt-29 8x64d.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub depth: i64,
    pub initial_channels: i64,
    pub cardinality: i64,
    pub base_channels: i64,
    pub init_mode: InitMode,
}

imgclf_plugin_api::config_section! {
    /// `model.resnext.*`, each key declared once (read back typed by `Keys::from_view`).
    pub struct Keys in "model.resnext" {
        /// network depth: 9n+2
        depth: i64 = 29, at_least(1);
        /// blocks in each of the four stages (model.type imagenet only)
        n_blocks: Vec<i64> = vec![3, 4, 6, 3], at_least(1);
        /// channels of the first convolution (stage outputs are 4x, 8x, 16x this)
        initial_channels: i64 = 64, at_least(1);
        /// groups of the 3x3 convolution
        cardinality: i64 = 8, at_least(1);
        /// channels per group in the first stage (doubled each stage)
        base_channels: i64 = 4, at_least(1);
    }
}

impl Config {
    pub fn keys() -> Vec<KeyDecl> {
        Keys::keys()
    }

    pub fn from_view(c: &ConfigView) -> Result<Self> {
        let k = Keys::from_view(c)?;
        let cfg = Config {
            depth: k.depth,
            initial_channels: k.initial_channels,
            cardinality: k.cardinality,
            base_channels: k.base_channels,
            init_mode: InitMode::parse(&c.str("model.init_mode")?)?,
        };
        if cfg.cardinality < 1 || cfg.base_channels < 1 || cfg.initial_channels < 1 {
            plugin_bail!(
                "{SECTION}.cardinality, base_channels and initial_channels must be at least 1"
            );
        }
        Ok(cfg)
    }
}

/// conv1x1-BN-ReLU, grouped conv3x3 (strided)-BN-ReLU, conv1x1-BN, plus the (projected)
/// input, then ReLU.
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
        stage: u32,
        cfg: &Config,
    ) -> Block {
        let mid = cfg.cardinality * cfg.base_channels * 2i64.pow(stage);
        let conv_bn = |i: usize, ci: i64, co: i64, k: i64, cc: ConvConfig| {
            let conv = Conv2d::new(&s.sub(format!("conv{i}")), ci, co, k, cc, cfg.init_mode);
            (conv, BatchNorm2d::new(&s.sub(format!("bn{i}")), co))
        };
        let grouped = ConvConfig {
            stride,
            padding: 1,
            groups: cfg.cardinality,
            ..Default::default()
        };
        let convs = vec![
            conv_bn(1, c_in, mid, 1, ConvConfig::default()),
            conv_bn(2, mid, mid, 3, grouped),
            conv_bn(3, mid, c_out, 1, ConvConfig::default()),
        ];
        let shortcut = (c_in != c_out).then(|| {
            let cc = ConvConfig {
                stride,
                ..Default::default()
            };
            let conv = Conv2d::new(&s.sub("shortcut.conv"), c_in, c_out, 1, cc, cfg.init_mode);
            (conv, BatchNorm2d::new(&s.sub("shortcut.bn"), c_out))
        });
        Block { convs, shortcut }
    }

    /// # Shapes
    /// N x C_in x H x W -> N x C_out x H/stride x W/stride
    pub(crate) fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = x.shallow_clone();
        for (i, (conv, bn)) in self.convs.iter().enumerate() {
            y = if i + 1 < self.convs.len() {
                bn.forward_relu(&conv.forward(&y), train)
            } else {
                bn.forward(&conv.forward(&y), train)
            };
        }
        let mut y = match &self.shortcut {
            Some((conv, bn)) => y + bn.forward(&conv.forward(x), train),
            None => y + x,
        };
        y.relu_()
    }
}

pub struct ResNext {
    store: ParamStore,
    conv: Conv2d,
    bn: BatchNorm2d,
    stages: Vec<Vec<Block>>,
    fc: Linear,
    description: String,
}

impl ResNext {
    pub fn new(cfg: &Config, ctx: &ModelContext) -> Result<Self> {
        let n = nn::residual_blocks_per_stage(SECTION, cfg.depth, true)?;
        let c0 = cfg.initial_channels;
        let widths = [c0 * EXPANSION, 2 * c0 * EXPANSION, 4 * c0 * EXPANSION];
        let store = ParamStore::new(ctx.device);
        let root = store.root();
        let cc = ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let conv = Conv2d::new(&root.sub("conv"), ctx.n_channels, c0, 3, cc, cfg.init_mode);
        let bn = BatchNorm2d::new(&root.sub("bn"), c0);
        let stages = nn::stages(&root, c0, &widths, &[1, 2, 2], n, |s, at| {
            Block::new(s, at.c_in, at.c_out, at.stride, at.stage as u32, cfg)
        });
        let fc = Linear::new(&root.sub("fc"), widths[2], ctx.n_classes, cfg.init_mode);
        let description = format!(
            "ResNeXt-{} ({}x{}d, {n} blocks per stage, widths {widths:?})",
            cfg.depth, cfg.cardinality, cfg.base_channels
        );
        Ok(ResNext {
            store,
            conv,
            bn,
            stages,
            fc,
            description,
        })
    }
}

impl Model for ResNext {
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

pub struct ResNextFactory;

impl ModelFactory for ResNextFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Model,
            "resnext",
            "ResNeXt (grouped-convolution bottleneck blocks); model.type cifar or imagenet",
        )
        .papers(&["1611.05431"])
        .keys(Config::keys())
        .small(&[
            ("model.resnext.depth", "11"),
            ("model.resnext.initial_channels", "8"),
            ("model.resnext.cardinality", "2"),
            ("model.resnext.base_channels", "2"),
        ])
    }

    fn build(&self, config: &ConfigView, ctx: &ModelContext) -> Result<Box<dyn Model>> {
        let cfg = Config::from_view(config)?;
        let model: Box<dyn Model> = match ModelType::of(config)? {
            ModelType::Cifar => Box::new(ResNext::new(&cfg, ctx)?),
            ModelType::ImageNet => Box::new(crate::imagenet::ResNext::new(
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

    fn build(cardinality: i64, base_channels: i64) -> ResNext {
        let cfg = Config {
            depth: 11,
            initial_channels: 8,
            cardinality,
            base_channels,
            init_mode: InitMode::KaimingFanOut,
        };
        let ctx = ModelContext {
            n_channels: 3,
            image_size: 32,
            n_classes: 10,
            device: Device::Cpu,
        };
        ResNext::new(&cfg, &ctx).unwrap()
    }

    fn shape(m: &ResNext, name: &str) -> Vec<i64> {
        let t = m.tensors().into_iter().find(|t| t.name == name);
        t.unwrap_or_else(|| panic!("{name} missing")).tensor.size()
    }

    #[test]
    fn the_grouped_convolution_has_cardinality_groups_doubling_per_stage() {
        let m = build(4, 2);
        // stage 1: 4 groups of 2 channels; the weight sees 2 input channels per group.
        assert_eq!(shape(&m, "stage1.block1.conv2.weight"), vec![8, 2, 3, 3]);
        assert_eq!(shape(&m, "stage2.block1.conv2.weight"), vec![16, 4, 3, 3]);
        assert_eq!(shape(&m, "stage3.block1.conv2.weight"), vec![32, 8, 3, 3]);
        assert_eq!(shape(&m, "stage3.block1.conv3.weight"), vec![128, 32, 1, 1]);
        assert_eq!(shape(&m, "stage1.block1.shortcut.bn.weight"), vec![32]);
        assert_eq!(shape(&m, "fc.weight"), vec![10, 128]);
    }

    #[test]
    fn forward_shape() {
        let mut m = build(2, 4);
        let x = Tensor::randn([2, 3, 32, 32], (K::Float, Device::Cpu));
        assert_eq!(m.forward(&x, true).unwrap().size(), vec![2, 10]);
        assert_eq!(m.forward(&x, false).unwrap().size(), vec![2, 10]);
    }
}
