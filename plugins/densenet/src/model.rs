//! DenseNet for CIFAR-sized inputs: three dense stages whose layers each append `growth_rate`
//! channels (basic BN-ReLU-conv3x3, or bottleneck BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3), joined by
//! transitions (BN-ReLU-conv1x1 compressing by `compression_rate`, 2x2 average pool); optional
//! dropout after every convolution; state-dict names as the reference's.

use imgclf_plugin_api::nn::{
    self, BatchNorm2d, Conv2d, ConvConfig, InitMode, Linear, ModelType, ParamStore, Scope,
};
use imgclf_plugin_api::{
    plugin_bail, ComponentInfo, ConfigView, KeyDecl, Kind, Model, ModelContext, ModelFactory,
    NamedTensor, Result,
};
use tch::Tensor;

pub(crate) const SECTION: &str = "model.densenet";

/// `model.densenet.*`: the reference's CIFAR config is DenseNet-BC-100 (k=12): bottleneck
/// layers and compression 0.5; basic layers with compression 1 give the original DenseNet.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub depth: i64,
    pub bottleneck: bool,
    pub growth_rate: i64,
    pub drop_rate: f64,
    pub compression_rate: f64,
    pub init_mode: InitMode,
}

imgclf_plugin_api::config_section! {
    /// `model.densenet.*`, each key declared once (read back typed by `Keys::from_view`).
    pub struct Keys in "model.densenet" {
        /// network depth: 3n+4 (basic) or 6n+4 (bottleneck)
        depth: i64 = 100, at_least(1);
        /// layers in each of the four dense blocks (model.type imagenet only)
        n_blocks: Vec<i64> = vec![6, 12, 24, 16], at_least(1);
        /// dense layer
        block_type: String = "bottleneck", choices(&["basic", "bottleneck"]);
        /// k: channels each dense layer adds
        growth_rate: i64 = 12, at_least(1);
        /// dropout after every convolution (training only)
        drop_rate: f64 = 0.0;
        /// theta: a transition keeps floor(theta * C) channels
        compression_rate: f64 = 0.5;
        /// model.type imagenet, not in the reference: ReLU after bn_last, as torchvision's DenseNet (set True with torchvision weights)
        relu_before_pool: bool = false;
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
            bottleneck,
            growth_rate: k.growth_rate,
            drop_rate: k.drop_rate,
            compression_rate: k.compression_rate,
            init_mode: InitMode::parse(&c.str("model.init_mode")?)?,
        };
        if !(0.0..1.0).contains(&cfg.drop_rate) {
            plugin_bail!("{SECTION}.drop_rate {} must be in [0, 1)", cfg.drop_rate);
        }
        if !(cfg.compression_rate > 0.0 && cfg.compression_rate <= 1.0) {
            plugin_bail!(
                "{SECTION}.compression_rate {} must be in (0, 1]",
                cfg.compression_rate
            );
        }
        if cfg.growth_rate < 1 {
            plugin_bail!("{SECTION}.growth_rate must be at least 1");
        }
        Ok(cfg)
    }

    /// Dense layers per stage, checking the depth.
    fn layers_per_stage(&self) -> Result<i64> {
        if self.bottleneck {
            nn::blocks_per_stage(SECTION, self.depth, 6, 4, "bottleneck")
        } else {
            nn::blocks_per_stage(SECTION, self.depth, 3, 4, "basic")
        }
    }

    /// Channels after a transition: `int(c * compression_rate)` as the reference computes it.
    pub(crate) fn compress(&self, c: i64) -> i64 {
        (c as f64 * self.compression_rate) as i64
    }
}

/// BN-ReLU-conv pairs applied in sequence, each conv followed by dropout when enabled.
pub(crate) struct Composite {
    layers: Vec<(BatchNorm2d, Conv2d)>,
    drop_rate: f64,
}

impl Composite {
    /// `specs` are (bn/conv name suffix, input channels, output channels, kernel size).
    pub(crate) fn new(s: &Scope, specs: &[(&str, i64, i64, i64)], cfg: &Config) -> Composite {
        let layers = specs
            .iter()
            .map(|&(suffix, ci, co, k)| {
                let bn = BatchNorm2d::new(&s.sub(format!("bn{suffix}")), ci);
                let cc = ConvConfig {
                    padding: k / 2,
                    ..Default::default()
                };
                let conv = Conv2d::new(
                    &s.sub(format!("conv{suffix}")),
                    ci,
                    co,
                    k,
                    cc,
                    cfg.init_mode,
                );
                (bn, conv)
            })
            .collect();
        Composite {
            layers,
            drop_rate: cfg.drop_rate,
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = x.shallow_clone();
        for (bn, conv) in &self.layers {
            y = conv.forward(&bn.forward_relu(&y, train));
            if self.drop_rate > 0.0 {
                y = y.dropout(self.drop_rate, train);
            }
        }
        y
    }
}

/// The dense stages `stage1`, `stage2`, ... with `n_layers[i]` layers each (growth rate k,
/// bottleneck or basic composites), a transition (compression) after every stage but the last;
/// `c` goes from the stem's channels to the last stage's.
pub(crate) fn dense_stages(
    root: &Scope,
    c: &mut i64,
    n_layers: &[i64],
    cfg: &Config,
) -> Vec<Stage> {
    let k = cfg.growth_rate;
    let last = n_layers.len() - 1;
    let mut stages = Vec::new();
    for (i, &n) in n_layers.iter().enumerate() {
        let s = root.sub(format!("stage{}", i + 1));
        let layers = (0..n)
            .map(|j| {
                let ci = *c + j * k;
                let b = s.sub(format!("block{}", j + 1));
                if cfg.bottleneck {
                    Composite::new(&b, &[("1", ci, 4 * k, 1), ("2", 4 * k, k, 3)], cfg)
                } else {
                    Composite::new(&b, &[("", ci, k, 3)], cfg)
                }
            })
            .collect();
        *c += n * k;
        let transition = (i < last).then(|| {
            let out = cfg.compress(*c);
            let t = Composite::new(&s.sub("transition"), &[("", *c, out, 1)], cfg);
            *c = out;
            t
        });
        stages.push(Stage { layers, transition });
    }
    stages
}

pub(crate) struct Stage {
    /// Each layer's output is concatenated to its input.
    pub(crate) layers: Vec<Composite>,
    pub(crate) transition: Option<Composite>,
}

impl Stage {
    /// # Shapes
    /// N x C x H x W -> N x (C + n k) x H x W, then with a transition
    /// N x floor(theta (C + n k)) x H/2 x W/2
    pub(crate) fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = x.shallow_clone();
        for layer in &self.layers {
            let new = layer.forward(&y, train);
            y = Tensor::cat(&[y, new], 1);
        }
        match &self.transition {
            Some(t) => {
                t.forward(&y, train)
                    .avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>)
            }
            None => y,
        }
    }
}

pub struct DenseNet {
    store: ParamStore,
    conv: Conv2d,
    stages: Vec<Stage>,
    bn: BatchNorm2d,
    fc: Linear,
    description: String,
}

impl DenseNet {
    pub fn new(cfg: &Config, ctx: &ModelContext) -> Result<Self> {
        let n = cfg.layers_per_stage()?;
        let k = cfg.growth_rate;
        let store = ParamStore::new(ctx.device);
        let root = store.root();
        let cc = ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let mut c = 2 * k;
        let conv = Conv2d::new(&root.sub("conv"), ctx.n_channels, c, 3, cc, cfg.init_mode);
        let stages = dense_stages(&root, &mut c, &[n; 3], cfg);
        let bn = BatchNorm2d::new(&root.sub("bn"), c);
        let fc = Linear::new(&root.sub("fc"), c, ctx.n_classes, cfg.init_mode);
        let description =
            format!(
            "DenseNet{}-{} (k={k}, {n} {} layers per stage, compression {}, {c} final channels)",
            if cfg.bottleneck && cfg.compression_rate < 1.0 { "-BC" } else { "" },
            cfg.depth,
            if cfg.bottleneck { "bottleneck" } else { "basic" },
            cfg.compression_rate
        );
        Ok(DenseNet {
            store,
            conv,
            stages,
            bn,
            fc,
            description,
        })
    }
}

impl Model for DenseNet {
    /// # Shapes
    /// N x C x H x W -> N x n_classes
    fn forward(&mut self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = self.conv.f_forward_checked(x)?;
        for stage in &self.stages {
            y = stage.forward(&y, train);
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

pub struct DenseNetFactory;

impl ModelFactory for DenseNetFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Model,
            "densenet",
            "DenseNet / DenseNet-BC; model.type cifar or imagenet (DenseNet-121)",
        )
        .papers(&["1608.06993", "2001.02394"])
        .keys(Config::keys())
        .small(&[
            ("model.densenet.depth", "10"),
            ("model.densenet.growth_rate", "4"),
            ("model.densenet.drop_rate", "0.2"),
        ])
    }

    fn build(&self, config: &ConfigView, ctx: &ModelContext) -> Result<Box<dyn Model>> {
        let cfg = Config::from_view(config)?;
        let model: Box<dyn Model> = match ModelType::of(config)? {
            ModelType::Cifar => Box::new(DenseNet::new(&cfg, ctx)?),
            ModelType::ImageNet => Box::new(crate::imagenet::DenseNet::new(
                &cfg,
                nn::four_stage_blocks(config, SECTION)?,
                crate::imagenet::relu_before_pool(config)?,
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

    fn build(depth: i64, bottleneck: bool, compression_rate: f64) -> Result<DenseNet> {
        let cfg = Config {
            depth,
            bottleneck,
            growth_rate: 4,
            drop_rate: 0.0,
            compression_rate,
            init_mode: InitMode::KaimingFanOut,
        };
        let ctx = ModelContext {
            n_channels: 1,
            image_size: 28,
            n_classes: 10,
            device: Device::Cpu,
        };
        DenseNet::new(&cfg, &ctx)
    }

    fn shape(m: &DenseNet, name: &str) -> Vec<i64> {
        let t = m.tensors().into_iter().find(|t| t.name == name);
        t.unwrap_or_else(|| panic!("{name} missing")).tensor.size()
    }

    #[test]
    fn channels_grow_by_k_and_transitions_compress() {
        // BC, k=4, 2 layers per stage: 8 -> 16 -> int(16*0.5)=8 -> 16 -> 8 -> 16.
        let m = build(16, true, 0.5).unwrap();
        assert_eq!(shape(&m, "stage1.block2.conv1.weight"), vec![16, 12, 1, 1]);
        assert_eq!(shape(&m, "stage1.block2.conv2.weight"), vec![4, 16, 3, 3]);
        assert_eq!(
            shape(&m, "stage1.transition.conv.weight"),
            vec![8, 16, 1, 1]
        );
        assert_eq!(shape(&m, "bn.weight"), vec![16]);
        // Basic layers (3 per stage at depth 13), compression 0.7, channels truncated as
        // Python's int() does: 8 -> 20 -> int(14.0) = 14 -> 26 -> int(18.2) = 18 -> 30.
        let m = build(13, false, 0.7).unwrap();
        assert_eq!(shape(&m, "stage1.block3.conv.weight"), vec![4, 16, 3, 3]);
        assert_eq!(
            shape(&m, "stage2.transition.conv.weight"),
            vec![18, 26, 1, 1]
        );
        assert_eq!(shape(&m, "fc.weight"), vec![10, 30]);
        assert!(!m
            .tensors()
            .iter()
            .any(|t| t.name.starts_with("stage3.transition")));
    }

    #[test]
    fn forward_on_28x28_and_invalid_depth() {
        let mut m = build(10, true, 0.5).unwrap();
        let x = Tensor::randn([2, 1, 28, 28], (K::Float, Device::Cpu));
        assert_eq!(m.forward(&x, true).unwrap().size(), vec![2, 10]);
        let e = build(12, true, 0.5).err().unwrap().0;
        assert!(
            e.contains("model.densenet.depth 12") && e.contains("6n+4"),
            "{e}"
        );
    }
}
