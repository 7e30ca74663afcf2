//! The wide residual network for CIFAR-sized inputs (pre-activation basic blocks widened by
//! `widening_factor`, optional dropout between the two convolutions), with the reference's
//! state-dict names.

use imgclf_plugin_api::nn::{
    self, BatchNorm2d, Conv2d, ConvConfig, InitMode, Linear, ParamStore, Scope,
};
use imgclf_plugin_api::{
    plugin_bail, ComponentInfo, ConfigView, KeyDecl, Kind, Model, ModelContext, ModelFactory,
    NamedTensor, Result,
};
use tch::Tensor;

const SECTION: &str = "model.wrn";

/// `model.wrn.*`: WRN-`depth`-`widening_factor` (the paper's WRN-28-10 is the default).
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub depth: i64,
    pub initial_channels: i64,
    pub widening_factor: i64,
    pub drop_rate: f64,
    pub init_mode: InitMode,
}

imgclf_plugin_api::config_section! {
    /// `model.wrn.*`, each key declared once (read back typed by `Keys::from_view`).
    pub struct Keys in "model.wrn" {
        /// network depth: 6n+4
        depth: i64 = 28, at_least(1);
        /// channels of the first convolution
        initial_channels: i64 = 16, at_least(1);
        /// k: stage widths are 16k, 32k, 64k
        widening_factor: i64 = 10, at_least(1);
        /// dropout between the two convolutions of a block (training only)
        drop_rate: f64 = 0.0;
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
            widening_factor: k.widening_factor,
            drop_rate: k.drop_rate,
            init_mode: InitMode::parse(&c.str("model.init_mode")?)?,
        };
        if !(0.0..1.0).contains(&cfg.drop_rate) {
            plugin_bail!("{SECTION}.drop_rate {} must be in [0, 1)", cfg.drop_rate);
        }
        if cfg.widening_factor < 1 || cfg.initial_channels < 1 {
            plugin_bail!("{SECTION}.widening_factor and initial_channels must be at least 1");
        }
        Ok(cfg)
    }

    fn blocks_per_stage(&self) -> Result<i64> {
        nn::blocks_per_stage(SECTION, self.depth, 6, 4, "WRN basic")
    }
}

/// BN-ReLU-conv3x3 (strided), dropout, BN-ReLU-conv3x3, plus the (projected) input. When the
/// width changes, the shortcut projection also reads the pre-activated input.
struct Block {
    bn1: BatchNorm2d,
    conv1: Conv2d,
    bn2: BatchNorm2d,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
    drop_rate: f64,
}

impl Block {
    fn new(s: &Scope, c_in: i64, c_out: i64, stride: i64, cfg: &Config) -> Block {
        let conv3 = |name: &str, ci: i64, stride: i64| {
            let cc = ConvConfig {
                stride,
                padding: 1,
                ..Default::default()
            };
            Conv2d::new(&s.sub(name), ci, c_out, 3, cc, cfg.init_mode)
        };
        let bn1 = BatchNorm2d::new(&s.sub("bn1"), c_in);
        let conv1 = conv3("conv1", c_in, stride);
        let bn2 = BatchNorm2d::new(&s.sub("bn2"), c_out);
        let conv2 = conv3("conv2", c_out, 1);
        let shortcut = (c_in != c_out).then(|| {
            let cc = ConvConfig {
                stride,
                ..Default::default()
            };
            Conv2d::new(&s.sub("shortcut.conv"), c_in, c_out, 1, cc, cfg.init_mode)
        });
        Block {
            bn1,
            conv1,
            bn2,
            conv2,
            shortcut,
            drop_rate: cfg.drop_rate,
        }
    }

    /// # Shapes
    /// N x C_in x H x W -> N x C_out x H/stride x W/stride
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let act = self.bn1.forward_relu(x, train);
        let mut y = self.conv1.forward(&act);
        if self.drop_rate > 0.0 {
            y = y.dropout(self.drop_rate, train);
        }
        let y = self.conv2.forward(&self.bn2.forward_relu(&y, train));
        match &self.shortcut {
            Some(conv) => y + conv.forward(&act),
            None => y + x,
        }
    }
}

pub struct Wrn {
    store: ParamStore,
    conv: Conv2d,
    stages: Vec<Vec<Block>>,
    bn: BatchNorm2d,
    fc: Linear,
    description: String,
}

impl Wrn {
    pub fn new(cfg: &Config, ctx: &ModelContext) -> Result<Self> {
        let n = cfg.blocks_per_stage()?;
        let (c0, k) = (cfg.initial_channels, cfg.widening_factor);
        let widths = [c0 * k, 2 * c0 * k, 4 * c0 * k];
        let store = ParamStore::new(ctx.device);
        let root = store.root();
        let cc = ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let conv = Conv2d::new(&root.sub("conv"), ctx.n_channels, c0, 3, cc, cfg.init_mode);
        let stages = nn::stages(&root, c0, &widths, &[1, 2, 2], n, |s, at| {
            Block::new(s, at.c_in, at.c_out, at.stride, cfg)
        });
        let bn = BatchNorm2d::new(&root.sub("bn"), widths[2]);
        let fc = Linear::new(&root.sub("fc"), widths[2], ctx.n_classes, cfg.init_mode);
        let description = format!(
            "WRN-{}-{k} ({n} blocks per stage, widths {widths:?}, dropout {})",
            cfg.depth, cfg.drop_rate
        );
        Ok(Wrn {
            store,
            conv,
            stages,
            bn,
            fc,
            description,
        })
    }
}

impl Model for Wrn {
    /// # Shapes
    /// N x C x H x W -> N x n_classes
    fn forward(&mut self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = self.conv.f_forward_checked(x)?;
        for stage in &self.stages {
            for block in stage {
                y = block.forward(&y, train);
            }
        }
        let y = self.bn.forward_relu(&y, train);
        self.fc.forward_pooled(&y)
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        self.store.tensors()
    }

    fn summary(&self) -> String {
        self.description.clone()
    }
}

pub struct WrnFactory;

impl ModelFactory for WrnFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Model,
            "wrn",
            "Wide ResNet for CIFAR-sized images (WRN-depth-k, optional dropout)",
        )
        .papers(&["1605.07146"])
        .keys(Config::keys())
        .small(&[
            ("model.wrn.depth", "10"),
            ("model.wrn.widening_factor", "1"),
            ("model.wrn.drop_rate", "0.3"),
        ])
    }

    fn build(&self, config: &ConfigView, ctx: &ModelContext) -> Result<Box<dyn Model>> {
        nn::ModelType::require_cifar(config, "wrn")?;
        let model = Box::new(Wrn::new(&Config::from_view(config)?, ctx)?);
        nn::probed_like_the_reference(model, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind as K};

    fn build(depth: i64, k: i64, drop_rate: f64) -> Result<Wrn> {
        let cfg = Config {
            depth,
            initial_channels: 16,
            widening_factor: k,
            drop_rate,
            init_mode: InitMode::KaimingFanOut,
        };
        let ctx = ModelContext {
            n_channels: 3,
            image_size: 32,
            n_classes: 10,
            device: Device::Cpu,
        };
        Wrn::new(&cfg, &ctx)
    }

    fn params(m: &Wrn) -> i64 {
        m.tensors()
            .iter()
            .filter(|t| t.trainable)
            .map(|t| t.tensor.numel() as i64)
            .sum()
    }

    #[test]
    fn wrn_16_4_has_the_papers_size_and_shapes() {
        // WRN-16-4 has 2.7M parameters in the paper (Table 1); the exact count follows from
        // the layer list (conv 432, three stages, final BN and FC).
        let m = build(16, 4, 0.0).unwrap();
        let p = params(&m);
        assert!((2_700_000..2_800_000).contains(&p), "{p}");
        let mut m = m;
        let y = m
            .forward(
                &Tensor::randn([2, 3, 32, 32], (K::Float, Device::Cpu)),
                true,
            )
            .unwrap();
        assert_eq!(y.size(), vec![2, 10]);
    }

    #[test]
    fn dropout_acts_in_training_only() {
        tch::manual_seed(1);
        let mut m = build(10, 1, 0.5).unwrap();
        let x = Tensor::randn([4, 3, 32, 32], (K::Float, Device::Cpu));
        let e1 = m.forward(&x, false).unwrap();
        let e2 = m.forward(&x, false).unwrap();
        assert!(e1.equal(&e2), "eval mode must be deterministic");
        let t1 = m.forward(&x, true).unwrap();
        let t2 = m.forward(&x, true).unwrap();
        assert!(!t1.equal(&t2), "dropout must change training outputs");
    }

    #[test]
    fn invalid_depth_is_a_clear_error() {
        let e = build(27, 10, 0.0).err().unwrap().0;
        assert!(
            e.contains("model.wrn.depth 27") && e.contains("6n+4"),
            "{e}"
        );
    }
}
