//! The pre-activation ResNet with a squeeze-and-excitation gate on every block's residual
//! branch (global average pool, FC-ReLU-FC-sigmoid, channel-wise scaling) before the shortcut
//! is added; the options of `resnet_preact` plus `se_reduction`, and the reference's
//! state-dict names. As in the reference, weights are always initialised Kaiming fan-out
//! (its SE network ignores `model.init_mode`).

use imgclf_plugin_api::nn::{
    self, BatchNorm2d, Conv2d, ConvConfig, InitMode, Linear, ParamStore, Scope,
};
use imgclf_plugin_api::{
    plugin_bail, ComponentInfo, ConfigView, KeyDecl, Kind, Model, ModelContext, ModelFactory,
    NamedTensor, Result,
};
use tch::Tensor;

const SECTION: &str = "model.se_resnet_preact";
const INIT: InitMode = InitMode::KaimingFanOut;

/// `model.se_resnet_preact.*` (the reference's CIFAR config: SE-ResNet-preact-110 with
/// `remove_first_relu`, `add_last_bn` and `preact_stage [True, False, False]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub depth: i64,
    pub bottleneck: bool,
    pub initial_channels: i64,
    pub se_reduction: i64,
    pub remove_first_relu: bool,
    pub add_last_bn: bool,
    pub preact_stage: [bool; 3],
}

imgclf_plugin_api::config_section! {
    /// `model.se_resnet_preact.*`, each key declared once (read back typed by `Keys::from_view`).
    pub struct Keys in "model.se_resnet_preact" {
        /// network depth: 6n+2 (basic) or 9n+2 (bottleneck)
        depth: i64 = 110, at_least(1);
        /// channels of the first stage
        initial_channels: i64 = 16, at_least(1);
        /// r: the excitation's hidden layer has C / r units
        se_reduction: i64 = 16, at_least(1);
        /// residual block
        block_type: String = "basic", choices(&["basic", "bottleneck"]);
        /// drop the ReLU after the first BN of each block
        remove_first_relu: bool = false;
        /// add a BN after the last conv of each block
        add_last_bn: bool = false;
        /// per stage: first block pre-activates the shortcut too
        preact_stage: Vec<bool> = vec![true, true, true];
    }
}

impl Config {
    pub fn keys() -> Vec<KeyDecl> {
        Keys::keys()
    }

    pub fn from_view(c: &ConfigView) -> Result<Self> {
        let k = Keys::from_view(c)?;
        let bottleneck = nn::is_bottleneck(c, SECTION)?;
        let stages = k.preact_stage;
        let Ok(preact_stage) = <[bool; 3]>::try_from(stages.as_slice()) else {
            plugin_bail!("{SECTION}.preact_stage needs 3 values (one per stage), got {stages:?}");
        };
        let cfg = Config {
            depth: k.depth,
            bottleneck,
            initial_channels: k.initial_channels,
            se_reduction: k.se_reduction,
            remove_first_relu: k.remove_first_relu,
            add_last_bn: k.add_last_bn,
            preact_stage,
        };
        if cfg.se_reduction < 1 || cfg.initial_channels < cfg.se_reduction {
            plugin_bail!(
                "{SECTION}.se_reduction {} must be between 1 and initial_channels ({}), so the \
                 excitation keeps at least one unit",
                cfg.se_reduction,
                cfg.initial_channels
            );
        }
        Ok(cfg)
    }
}

/// Squeeze (global average pool) and excitation (FC-ReLU-FC-sigmoid) as channel weights.
struct SeLayer {
    fc1: Linear,
    fc2: Linear,
}

impl SeLayer {
    fn new(s: &Scope, c: i64, reduction: i64) -> Self {
        SeLayer {
            fc1: Linear::new(&s.sub("fc1"), c, c / reduction, INIT),
            fc2: Linear::new(&s.sub("fc2"), c / reduction, c, INIT),
        }
    }

    /// # Shapes
    /// N x C x H x W -> same
    fn forward(&self, x: &Tensor) -> Tensor {
        let (n, c) = (x.size()[0], x.size()[1]);
        let squeezed = x.adaptive_avg_pool2d([1, 1]).view([n, c]);
        let gate = self
            .fc2
            .forward(&self.fc1.forward(&squeezed).relu_())
            .sigmoid_();
        x * gate.view([n, c, 1, 1])
    }
}

/// A pre-activation block (basic 3x3-3x3 or bottleneck 1x1-3x3-1x1 with 4x expansion) whose
/// residual branch is gated by an SE layer before the shortcut is added.
struct Block {
    bns: Vec<BatchNorm2d>,
    convs: Vec<Conv2d>,
    last_bn: Option<BatchNorm2d>,
    se: SeLayer,
    shortcut: Option<Conv2d>,
    remove_first_relu: bool,
    preact: bool,
}

impl Block {
    fn new(s: &Scope, c_in: i64, c_out: i64, stride: i64, cfg: &Config, preact: bool) -> Block {
        let conv = |name: &str, i, o, k, stride| {
            let cc = ConvConfig {
                stride,
                padding: k / 2,
                ..Default::default()
            };
            Conv2d::new(&s.sub(name), i, o, k, cc, INIT)
        };
        let bn = |name: &str, c| BatchNorm2d::new(&s.sub(name), c);
        let (mut bns, mut convs) = (Vec::new(), Vec::new());
        let last = if cfg.bottleneck {
            let mid = c_out / 4;
            bns.push(bn("bn1", c_in));
            convs.push(conv("conv1", c_in, mid, 1, 1));
            bns.push(bn("bn2", mid));
            convs.push(conv("conv2", mid, mid, 3, stride));
            bns.push(bn("bn3", mid));
            convs.push(conv("conv3", mid, c_out, 1, 1));
            "bn4"
        } else {
            bns.push(bn("bn1", c_in));
            convs.push(conv("conv1", c_in, c_out, 3, stride));
            bns.push(bn("bn2", c_out));
            convs.push(conv("conv2", c_out, c_out, 3, 1));
            "bn3"
        };
        let last_bn = cfg.add_last_bn.then(|| bn(last, c_out));
        let se = SeLayer::new(&s.sub("se"), c_out, cfg.se_reduction);
        let shortcut = (c_in != c_out).then(|| conv("shortcut.conv", c_in, c_out, 1, stride));
        Block {
            bns,
            convs,
            last_bn,
            se,
            shortcut,
            remove_first_relu: cfg.remove_first_relu,
            preact,
        }
    }

    /// # Shapes
    /// N x C_in x H x W -> N x C_out x H/stride x W/stride
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        // A pre-activating block feeds the activated input to the shortcut too.
        let (x, mut y) = if self.preact {
            let x = self.bns[0].forward_relu(x, train);
            let y = self.convs[0].forward(&x);
            (x, y)
        } else if self.remove_first_relu {
            (
                x.shallow_clone(),
                self.convs[0].forward(&self.bns[0].forward(x, train)),
            )
        } else {
            (
                x.shallow_clone(),
                self.convs[0].forward(&self.bns[0].forward_relu(x, train)),
            )
        };
        for (bn, conv) in self.bns[1..].iter().zip(&self.convs[1..]) {
            y = conv.forward(&bn.forward_relu(&y, train));
        }
        if let Some(bn) = &self.last_bn {
            y = bn.forward(&y, train);
        }
        let y = self.se.forward(&y);
        match &self.shortcut {
            Some(conv) => y + conv.forward(&x),
            None => y + x,
        }
    }
}

pub struct SeResNetPreact {
    store: ParamStore,
    conv: Conv2d,
    stages: Vec<Vec<Block>>,
    bn: BatchNorm2d,
    fc: Linear,
    description: String,
}

impl SeResNetPreact {
    pub fn new(cfg: &Config, ctx: &ModelContext) -> Result<Self> {
        let n = nn::residual_blocks_per_stage(SECTION, cfg.depth, cfg.bottleneck)?;
        let e = if cfg.bottleneck { 4 } else { 1 };
        let c0 = cfg.initial_channels;
        let widths = [c0, 2 * c0 * e, 4 * c0 * e];
        let store = ParamStore::new(ctx.device);
        let root = store.root();
        let cc = ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let conv = Conv2d::new(&root.sub("conv"), ctx.n_channels, c0, 3, cc, INIT);
        let stages = nn::stages(&root, c0, &widths, &[1, 2, 2], n, |s, at| {
            let preact = at.is_first() && cfg.preact_stage[at.stage];
            Block::new(s, at.c_in, at.c_out, at.stride, cfg, preact)
        });
        let bn = BatchNorm2d::new(&root.sub("bn"), widths[2]);
        let fc = Linear::new(&root.sub("fc"), widths[2], ctx.n_classes, INIT);
        let description =
            format!(
            "SE-ResNet-preact-{} ({} blocks, {n} per stage, widths {widths:?}, SE reduction {}, \
             remove_first_relu {}, add_last_bn {}, preact_stage {:?})",
            cfg.depth,
            if cfg.bottleneck { "bottleneck" } else { "basic" },
            cfg.se_reduction,
            cfg.remove_first_relu,
            cfg.add_last_bn,
            cfg.preact_stage
        );
        Ok(SeResNetPreact {
            store,
            conv,
            stages,
            bn,
            fc,
            description,
        })
    }
}

impl Model for SeResNetPreact {
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

pub struct SeResNetPreactFactory;

impl ModelFactory for SeResNetPreactFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Model,
            "se_resnet_preact",
            "Pre-activation ResNet with squeeze-and-excitation gates, for CIFAR-sized images",
        )
        .papers(&["1709.01507"])
        .keys(Config::keys())
        .small(&[
            ("model.se_resnet_preact.depth", "8"),
            ("model.se_resnet_preact.se_reduction", "4"),
        ])
    }

    fn build(&self, config: &ConfigView, ctx: &ModelContext) -> Result<Box<dyn Model>> {
        nn::ModelType::require_cifar(config, "se_resnet_preact")?;
        let model = Box::new(SeResNetPreact::new(&Config::from_view(config)?, ctx)?);
        nn::probed_like_the_reference(model, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind as K};

    fn cfg(bottleneck: bool) -> Config {
        Config {
            depth: if bottleneck { 11 } else { 8 },
            bottleneck,
            initial_channels: 16,
            se_reduction: 4,
            remove_first_relu: true,
            add_last_bn: true,
            preact_stage: [true, false, false],
        }
    }

    fn ctx() -> ModelContext {
        ModelContext {
            n_channels: 3,
            image_size: 32,
            n_classes: 10,
            device: Device::Cpu,
        }
    }

    #[test]
    fn se_layers_sit_between_the_last_bn_and_the_shortcut() {
        let m = SeResNetPreact::new(&cfg(false), &ctx()).unwrap();
        let names: Vec<String> = m.tensors().into_iter().map(|t| t.name).collect();
        let block: Vec<&str> = names
            .iter()
            .filter(|n| n.starts_with("stage2.block1.") && n.ends_with("weight"))
            .map(|n| n.as_str())
            .collect();
        assert_eq!(
            block,
            [
                "stage2.block1.bn1.weight",
                "stage2.block1.conv1.weight",
                "stage2.block1.bn2.weight",
                "stage2.block1.conv2.weight",
                "stage2.block1.bn3.weight",
                "stage2.block1.se.fc1.weight",
                "stage2.block1.se.fc2.weight",
                "stage2.block1.shortcut.conv.weight",
            ]
        );
        let shape = |n: &str| {
            let t = m.tensors().into_iter().find(|t| t.name == n).unwrap();
            t.tensor.size()
        };
        assert_eq!(shape("stage3.block1.se.fc1.weight"), vec![16, 64]);
        assert_eq!(shape("stage3.block1.se.fc2.bias"), vec![64]);
    }

    #[test]
    fn the_gate_scales_channels_by_a_sigmoid() {
        let se = SeLayer::new(&ParamStore::new(Device::Cpu).root(), 8, 2);
        tch::no_grad(|| {
            let _ = se.fc2.weight.shallow_clone().zero_();
            let _ = se.fc2.bias.shallow_clone().fill_(2.0);
        });
        let x = Tensor::randn([2, 8, 4, 4], (K::Float, Device::Cpu));
        let expected = &x * (1.0 / (1.0 + (-2.0f64).exp()));
        assert!(se.forward(&x).allclose(&expected, 1e-6, 1e-6, false));
    }

    #[test]
    fn forward_shapes_and_bad_reduction() {
        for bottleneck in [false, true] {
            let mut m = SeResNetPreact::new(&cfg(bottleneck), &ctx()).unwrap();
            let x = Tensor::randn([2, 3, 32, 32], (K::Float, Device::Cpu));
            assert_eq!(m.forward(&x, true).unwrap().size(), vec![2, 10]);
        }
        let json = |r: i64| {
            format!(
                r#"{{"model": {{"se_resnet_preact": {{"depth": 20, "initial_channels": 16,
                "se_reduction": {r}, "block_type": "basic", "remove_first_relu": false,
                "add_last_bn": false, "preact_stage": [true, true, true]}}}}}}"#
            )
        };
        let ok = ConfigView::from_json(&json(16)).unwrap();
        assert_eq!(Config::from_view(&ok).unwrap().se_reduction, 16);
        let bad = ConfigView::from_json(&json(32)).unwrap();
        let e = Config::from_view(&bad).err().unwrap().0;
        assert!(e.contains("se_reduction 32"), "{e}");
    }
}
