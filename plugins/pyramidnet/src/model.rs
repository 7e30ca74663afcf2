//! PyramidNet for CIFAR-sized inputs: the width grows by `alpha / (3n)` channels in every block
//! (additive pyramid), blocks are BN-conv-BN-ReLU-conv-BN without a first ReLU, and the shortcut
//! is an average-pooled identity zero-padded to the wider channel count; state-dict names as
//! the reference's.

use imgclf_plugin_api::nn::{
    self, BatchNorm2d, Conv2d, ConvConfig, InitMode, Linear, ModelType, ParamStore, Scope,
};
use imgclf_plugin_api::{
    plugin_bail, ComponentInfo, ConfigView, KeyDecl, Kind, Model, ModelContext, ModelFactory,
    NamedTensor, Result,
};
use tch::Tensor;

pub(crate) const SECTION: &str = "model.pyramidnet";

/// `model.pyramidnet.*`: PyramidNet-`depth` (alpha=`alpha`); the reference's CIFAR config is the
/// paper's best, PyramidNet-272 (alpha=200) with bottleneck blocks.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub depth: i64,
    pub initial_channels: i64,
    pub bottleneck: bool,
    pub alpha: i64,
    pub init_mode: InitMode,
}

imgclf_plugin_api::config_section! {
    /// `model.pyramidnet.*`, each key declared once (read back typed by `Keys::from_view`).
    pub struct Keys in "model.pyramidnet" {
        /// network depth: 6n+2 (basic) or 9n+2 (bottleneck)
        depth: i64 = 272, at_least(1);
        /// blocks in each of the four stages (model.type imagenet only)
        n_blocks: Vec<i64> = vec![3, 24, 36, 3], at_least(1);
        /// channels of the first convolution
        initial_channels: i64 = 16, at_least(1);
        /// residual block
        block_type: String = "bottleneck", choices(&["basic", "bottleneck"]);
        /// total width increase over all blocks (before the bottleneck's 4x)
        alpha: i64 = 200, at_least(0);
    }
}

impl Config {
    pub fn keys() -> Vec<KeyDecl> {
        Keys::keys()
    }

    pub fn from_view(c: &ConfigView) -> Result<Self> {
        let k = Keys::from_view(c)?;
        let bottleneck = nn::is_bottleneck(c, SECTION)?;
        let cfg = Config {
            depth: k.depth,
            initial_channels: k.initial_channels,
            bottleneck,
            alpha: k.alpha,
            init_mode: InitMode::parse(&c.str("model.init_mode")?)?,
        };
        if cfg.alpha < 0 || cfg.initial_channels < 1 {
            plugin_bail!("{SECTION}.alpha must be >= 0 and initial_channels >= 1");
        }
        Ok(cfg)
    }

    fn expansion(&self) -> i64 {
        if self.bottleneck {
            4
        } else {
            1
        }
    }

    /// The reference's widths: block `i` (of 3n) outputs `round(initial + i * alpha / 3n)`
    /// channels (accumulated in f64, rounded half to even as NumPy does) times the expansion;
    /// entry 0 is the stem's width.
    pub fn widths(&self, n: i64) -> Vec<i64> {
        self.widths_of(3 * n)
    }

    /// [`Config::widths`] for `blocks` blocks in all (the ImageNet form: `sum(n_blocks)`).
    pub fn widths_of(&self, blocks: i64) -> Vec<i64> {
        let step = self.alpha as f64 / blocks as f64;
        let mut c = self.initial_channels as f64;
        let mut out = vec![self.initial_channels];
        for _ in 0..blocks {
            c += step;
            out.push(c.round_ties_even() as i64 * self.expansion());
        }
        out
    }
}

/// The residual path: basic BN-conv3x3-BN-ReLU-conv3x3-BN, or bottleneck
/// BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN (the stride sits on the first 3x3 conv).
pub(crate) struct Block {
    bns: Vec<BatchNorm2d>,
    convs: Vec<Conv2d>,
    stride: i64,
}

impl Block {
    pub(crate) fn new(s: &Scope, c_in: i64, c_out: i64, stride: i64, cfg: &Config) -> Block {
        let conv = |i: usize, ci: i64, co: i64, k: i64, stride: i64| {
            let cc = ConvConfig {
                stride,
                padding: k / 2,
                ..Default::default()
            };
            Conv2d::new(&s.sub(format!("conv{i}")), ci, co, k, cc, cfg.init_mode)
        };
        let bn = |i: usize, c: i64| BatchNorm2d::new(&s.sub(format!("bn{i}")), c);
        let (mut bns, mut convs) = (Vec::new(), Vec::new());
        if cfg.bottleneck {
            let mid = c_out / 4;
            bns.push(bn(1, c_in));
            convs.push(conv(1, c_in, mid, 1, 1));
            bns.push(bn(2, mid));
            convs.push(conv(2, mid, mid, 3, stride));
            bns.push(bn(3, mid));
            convs.push(conv(3, mid, c_out, 1, 1));
            bns.push(bn(4, c_out));
        } else {
            bns.push(bn(1, c_in));
            convs.push(conv(1, c_in, c_out, 3, stride));
            bns.push(bn(2, c_out));
            convs.push(conv(2, c_out, c_out, 3, 1));
            bns.push(bn(3, c_out));
        }
        Block { bns, convs, stride }
    }

    /// # Shapes
    /// N x C_in x H x W -> N x C_out x H/stride x W/stride
    pub(crate) fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = self.bns[0].forward(x, train);
        let last = self.convs.len() - 1;
        for (i, conv) in self.convs.iter().enumerate() {
            // Every BN but the block's last is followed by ReLU.
            let bn = &self.bns[i + 1];
            y = if i < last {
                bn.forward_relu(&conv.forward(&y), train)
            } else {
                bn.forward(&conv.forward(&y), train)
            };
        }
        let shortcut = if self.stride > 1 {
            x.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>)
        } else {
            x.shallow_clone()
        };
        let extra = y.size()[1] - x.size()[1];
        if extra > 0 {
            y + shortcut.constant_pad_nd([0, 0, 0, 0, 0, extra])
        } else {
            y + shortcut
        }
    }
}

pub struct PyramidNet {
    store: ParamStore,
    conv: Conv2d,
    bn1: BatchNorm2d,
    stages: Vec<Vec<Block>>,
    bn2: BatchNorm2d,
    fc: Linear,
    description: String,
}

impl PyramidNet {
    pub fn new(cfg: &Config, ctx: &ModelContext) -> Result<Self> {
        let n = nn::residual_blocks_per_stage(SECTION, cfg.depth, cfg.bottleneck)?;
        let widths = cfg.widths(n);
        let store = ParamStore::new(ctx.device);
        let root = store.root();
        let cc = ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let conv = Conv2d::new(
            &root.sub("conv"),
            ctx.n_channels,
            widths[0],
            3,
            cc,
            cfg.init_mode,
        );
        let bn1 = BatchNorm2d::new(&root.sub("bn1"), widths[0]);
        let mut stages = Vec::new();
        for (i, stride) in [1, 2, 2].into_iter().enumerate() {
            let s = root.sub(format!("stage{}", i + 1));
            stages.push(
                (0..n as usize)
                    .map(|b| {
                        let k = i * n as usize + b;
                        let st = if b == 0 { stride } else { 1 };
                        let name = s.sub(format!("block{}", b + 1));
                        Block::new(&name, widths[k], widths[k + 1], st, cfg)
                    })
                    .collect(),
            );
        }
        let last = *widths.last().unwrap();
        let bn2 = BatchNorm2d::new(&root.sub("bn2"), last);
        let fc = Linear::new(&root.sub("fc"), last, ctx.n_classes, cfg.init_mode);
        let description = format!(
            "PyramidNet-{} (alpha {}, {} blocks, {n} per stage, widths {} -> {last})",
            cfg.depth,
            cfg.alpha,
            if cfg.bottleneck {
                "bottleneck"
            } else {
                "basic"
            },
            widths[0]
        );
        Ok(PyramidNet {
            store,
            conv,
            bn1,
            stages,
            bn2,
            fc,
            description,
        })
    }
}

impl Model for PyramidNet {
    /// # Shapes
    /// N x C x H x W -> N x n_classes
    fn forward(&mut self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = self.bn1.forward(&self.conv.f_forward_checked(x)?, train);
        for stage in &self.stages {
            for block in stage {
                y = block.forward(&y, train);
            }
        }
        let y = self.bn2.forward_relu(&y, train);
        self.fc.forward_pooled(&y)
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        self.store.tensors()
    }

    fn summary(&self) -> String {
        self.description.clone()
    }
}

pub struct PyramidNetFactory;

impl ModelFactory for PyramidNetFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Model,
            "pyramidnet",
            "PyramidNet (additive width growth, zero-padded shortcuts); model.type cifar or imagenet",
        )
        .papers(&["1610.02915"])
        .keys(Config::keys())
        .small(&[
            ("model.pyramidnet.depth", "11"),
            ("model.pyramidnet.alpha", "12"),
        ])
    }

    fn build(&self, config: &ConfigView, ctx: &ModelContext) -> Result<Box<dyn Model>> {
        let cfg = Config::from_view(config)?;
        let model: Box<dyn Model> = match ModelType::of(config)? {
            ModelType::Cifar => Box::new(PyramidNet::new(&cfg, ctx)?),
            ModelType::ImageNet => Box::new(crate::imagenet::PyramidNet::new(
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

    fn cfg(depth: i64, bottleneck: bool, alpha: i64) -> Config {
        Config {
            depth,
            initial_channels: 16,
            bottleneck,
            alpha,
            init_mode: InitMode::KaimingFanOut,
        }
    }

    #[test]
    fn widths_grow_additively_and_round_half_to_even() {
        // alpha 48 over 3n = 6 blocks: +8 per block.
        assert_eq!(
            cfg(14, false, 48).widths(2),
            vec![16, 24, 32, 40, 48, 56, 64]
        );
        // alpha 3 over 6 blocks: 16.5 rounds to 16 and 17.5 to 18 (NumPy's rounding).
        assert_eq!(
            cfg(14, false, 3).widths(2),
            vec![16, 16, 17, 18, 18, 18, 19]
        );
        // Bottleneck widths are 4x, the stem keeps initial_channels.
        assert_eq!(cfg(11, true, 6).widths(1), vec![16, 72, 80, 88]);
    }

    #[test]
    fn the_shortcut_pads_channels_with_zeros_and_pools_when_strided() {
        let ctx = ModelContext {
            n_channels: 3,
            image_size: 32,
            n_classes: 10,
            device: Device::Cpu,
        };
        let mut m = PyramidNet::new(&cfg(8, false, 12), &ctx).unwrap();
        let x = Tensor::randn([2, 3, 32, 32], (K::Float, Device::Cpu));
        assert_eq!(m.forward(&x, true).unwrap().size(), vec![2, 10]);
        // With the residual path zeroed (last BN's scale and shift 0), a block returns its
        // input, average-pooled, in the first channels and zeros in the new ones.
        let block = &m.stages[1][0];
        tch::no_grad(|| {
            let _ = block.bns[2].weight.shallow_clone().zero_();
            let _ = block.bns[2].bias.shallow_clone().zero_();
        });
        let h = Tensor::randn([2, 20, 8, 8], (K::Float, Device::Cpu));
        let y = block.forward(&h, false);
        assert_eq!(y.size(), vec![2, 24, 4, 4]);
        let pooled = h.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>);
        assert!(y.narrow(1, 0, 20).allclose(&pooled, 1e-6, 1e-6, false));
        assert_eq!(
            y.narrow(1, 20, 4).abs().sum(K::Float).double_value(&[]),
            0.0
        );
    }
}
