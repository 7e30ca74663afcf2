//! The pre-activation ResNet for CIFAR-sized inputs, with the reference's options
//! (`remove_first_relu`, `add_last_bn`, `preact_stage`) and state-dict names.

use imgclf_plugin_api::nn::{
    self, BatchNorm2d, Conv2d, ConvConfig, InitMode, ModelType, ParamStore, Scope,
};
use imgclf_plugin_api::{
    ComponentInfo, ConfigView, KeyDecl, Kind, Model, ModelContext, ModelFactory, NamedTensor,
    Result,
};
use tch::Tensor;

pub(crate) const SECTION: &str = "model.resnet_preact";

/// `model.resnet_preact.*`.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub depth: i64,
    pub block_type: BlockType,
    pub initial_channels: i64,
    pub remove_first_relu: bool,
    pub add_last_bn: bool,
    /// One per stage: 3 (CIFAR) or 4 (ImageNet).
    pub preact_stage: Vec<bool>,
    pub init_mode: InitMode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockType {
    Basic,
    Bottleneck,
}

impl BlockType {
    pub(crate) fn expansion(self) -> i64 {
        match self {
            BlockType::Basic => 1,
            BlockType::Bottleneck => 4,
        }
    }
    /// Blocks per stage for a given depth, checking it is a valid depth.
    fn blocks_per_stage(self, depth: i64) -> Result<i64> {
        nn::residual_blocks_per_stage(SECTION, depth, self == BlockType::Bottleneck)
    }
}

imgclf_plugin_api::config_section! {
    /// `model.resnet_preact.*`, each key declared once (read back typed by `Keys::from_view`).
    pub struct Keys in "model.resnet_preact" {
        /// network depth: 6n+2 (basic) or 9n+2 (bottleneck)
        depth: i64 = 110, at_least(1);
        /// blocks in each of the four stages (model.type imagenet only)
        n_blocks: Vec<i64> = vec![2, 2, 2, 2], at_least(1);
        /// residual block
        block_type: String = "basic", choices(&["basic", "bottleneck"]);
        /// channels of the first stage
        initial_channels: i64 = 16, at_least(1);
        /// drop the ReLU after the first BN of each block
        remove_first_relu: bool = false;
        /// add a BN after the last conv of each block
        add_last_bn: bool = false;
        /// per stage (3 for cifar, 4 for imagenet): first block pre-activates the shortcut too
        preact_stage: Vec<bool> = vec![true, true, true];
    }
}

impl Config {
    pub fn keys() -> Vec<KeyDecl> {
        Keys::keys()
    }

    pub fn from_view(c: &ConfigView) -> Result<Self> {
        let k = Keys::from_view(c)?;
        let block_type = if nn::is_bottleneck(c, SECTION)? {
            BlockType::Bottleneck
        } else {
            BlockType::Basic
        };
        let preact_stage = k.preact_stage.clone();
        let n_stages = match ModelType::of(c)? {
            ModelType::Cifar => 3,
            ModelType::ImageNet => 4,
        };
        if preact_stage.len() != n_stages {
            return Err(imgclf_plugin_api::Error(format!(
                "{SECTION}.preact_stage needs {n_stages} values (one per stage of a model.type \
                 {} network), got {preact_stage:?}",
                c.str("model.type")?
            )));
        }
        Ok(Config {
            depth: k.depth,
            block_type,
            initial_channels: k.initial_channels,
            remove_first_relu: k.remove_first_relu,
            add_last_bn: k.add_last_bn,
            preact_stage,
            init_mode: InitMode::parse(&c.str("model.init_mode")?)?,
        })
    }
}

/// One residual block (basic: 3x3-3x3; bottleneck: 1x1-3x3-1x1 with 4x expansion).
pub(crate) struct Block {
    /// BN/conv pairs of the residual path, in order (`bn1`/`conv1`, `bn2`/`conv2`, ...).
    bns: Vec<BatchNorm2d>,
    convs: Vec<Conv2d>,
    last_bn: Option<BatchNorm2d>,
    shortcut: Option<Conv2d>,
    remove_first_relu: bool,
    preact: bool,
}

impl Block {
    pub(crate) fn new(
        s: &Scope,
        c_in: i64,
        c_out: i64,
        stride: i64,
        cfg: &Config,
        preact: bool,
    ) -> Block {
        let init = cfg.init_mode;
        let conv = |name: &str, i, o, k, stride| {
            Conv2d::new(
                &s.sub(name),
                i,
                o,
                k,
                ConvConfig {
                    stride,
                    padding: k / 2,
                    ..Default::default()
                },
                init,
            )
        };
        let (bns, convs, c_last) = match cfg.block_type {
            BlockType::Basic => {
                let bn1 = BatchNorm2d::new(&s.sub("bn1"), c_in);
                let conv1 = conv("conv1", c_in, c_out, 3, stride);
                let bn2 = BatchNorm2d::new(&s.sub("bn2"), c_out);
                let conv2 = conv("conv2", c_out, c_out, 3, 1);
                (vec![bn1, bn2], vec![conv1, conv2], "bn3")
            }
            BlockType::Bottleneck => {
                let mid = c_out / BlockType::Bottleneck.expansion();
                let bn1 = BatchNorm2d::new(&s.sub("bn1"), c_in);
                let conv1 = conv("conv1", c_in, mid, 1, 1);
                let bn2 = BatchNorm2d::new(&s.sub("bn2"), mid);
                let conv2 = conv("conv2", mid, mid, 3, stride);
                let bn3 = BatchNorm2d::new(&s.sub("bn3"), mid);
                let conv3 = conv("conv3", mid, c_out, 1, 1);
                (vec![bn1, bn2, bn3], vec![conv1, conv2, conv3], "bn4")
            }
        };
        let last_bn = cfg
            .add_last_bn
            .then(|| BatchNorm2d::new(&s.sub(c_last), c_out));
        let shortcut = (c_in != c_out).then(|| conv("shortcut.conv", c_in, c_out, 1, stride));
        Block {
            bns,
            convs,
            last_bn,
            shortcut,
            remove_first_relu: cfg.remove_first_relu,
            preact,
        }
    }

    /// # Shapes
    /// N x C_in x H x W -> N x C_out x H/stride x W/stride
    pub(crate) fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let (x, mut y) = if self.preact {
            // The shortcut also sees the pre-activated input.
            let x = self.bns[0].forward_relu(x, train);
            let y = self.convs[0].forward(&x);
            (x, y)
        } else {
            let y = if self.remove_first_relu {
                self.bns[0].forward(x, train)
            } else {
                self.bns[0].forward_relu(x, train)
            };
            (x.shallow_clone(), self.convs[0].forward(&y))
        };
        for (bn, conv) in self.bns[1..].iter().zip(&self.convs[1..]) {
            y = conv.forward(&bn.forward_relu(&y, train));
        }
        if let Some(bn) = &self.last_bn {
            y = bn.forward(&y, train);
        }
        match &self.shortcut {
            // In place, as the reference's `y += self.shortcut(x)`.
            Some(conv) => y.g_add_(&conv.forward(&x)),
            None => y.g_add_(&x),
        }
    }
}

pub struct ResNetPreact {
    store: ParamStore,
    conv: Conv2d,
    stages: Vec<Vec<Block>>,
    bn: BatchNorm2d,
    fc: imgclf_plugin_api::nn::Linear,
    description: String,
}

impl ResNetPreact {
    pub fn new(cfg: &Config, ctx: &ModelContext) -> Result<Self> {
        let n_blocks = cfg.block_type.blocks_per_stage(cfg.depth)?;
        let e = cfg.block_type.expansion();
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
        let stages = nn::stages(&root, ch[0], &ch, &[1, 2, 2], n_blocks, |s, at| {
            let preact = at.is_first() && cfg.preact_stage[at.stage];
            Block::new(s, at.c_in, at.c_out, at.stride, cfg, preact)
        });
        let bn = BatchNorm2d::new(&root.sub("bn"), ch[2]);
        let fc = imgclf_plugin_api::nn::Linear::new(
            &root.sub("fc"),
            ch[2],
            ctx.n_classes,
            cfg.init_mode,
        );
        let description = format!(
            "ResNet-preact-{} ({:?} blocks, {} per stage, channels {:?}, remove_first_relu {}, add_last_bn {}, preact_stage {:?})",
            cfg.depth, cfg.block_type, n_blocks, ch, cfg.remove_first_relu, cfg.add_last_bn, cfg.preact_stage
        );
        Ok(ResNetPreact {
            store,
            conv,
            stages,
            bn,
            fc,
            description,
        })
    }
}

impl Model for ResNetPreact {
    /// # Shapes
    /// N x C x H x W -> N x n_classes
    fn forward(&mut self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = self.conv.f_forward_checked(x)?;
        for stage in &self.stages {
            for block in stage {
                y = block.forward(&y, train);
            }
        }
        self.fc.forward_pooled(&self.bn.forward_relu(&y, train))
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        self.store.tensors()
    }

    fn summary(&self) -> String {
        self.description.clone()
    }
}

pub struct ResNetPreactFactory;

impl ModelFactory for ResNetPreactFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Model,
            "resnet_preact",
            "Pre-activation ResNet; model.type cifar or imagenet",
        )
        .papers(&["1603.05027"])
        .keys(Config::keys())
        .small(&[("model.resnet_preact.depth", "8")])
    }

    fn build(&self, config: &ConfigView, ctx: &ModelContext) -> Result<Box<dyn Model>> {
        let cfg = Config::from_view(config)?;
        let model: Box<dyn Model> = match ModelType::of(config)? {
            ModelType::Cifar => Box::new(ResNetPreact::new(&cfg, ctx)?),
            ModelType::ImageNet => Box::new(crate::imagenet::ResNetPreact::new(
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
    use tch::{Device, Kind};

    fn config(depth: i64, block_type: BlockType) -> Config {
        Config {
            depth,
            block_type,
            initial_channels: 16,
            remove_first_relu: false,
            add_last_bn: false,
            preact_stage: vec![true, true, true],
            init_mode: InitMode::KaimingFanOut,
        }
    }

    fn ctx(n_channels: i64, image_size: i64) -> ModelContext {
        ModelContext {
            n_channels,
            image_size,
            n_classes: 10,
            device: Device::Cpu,
        }
    }

    fn params(m: &ResNetPreact) -> i64 {
        m.tensors()
            .iter()
            .filter(|t| t.trainable)
            .map(|t| t.tensor.numel() as i64)
            .sum()
    }

    #[test]
    fn parameter_counts_match_the_reference() {
        assert_eq!(
            params(&ResNetPreact::new(&config(20, BlockType::Basic), &ctx(3, 32)).unwrap()),
            272_282
        );
        assert_eq!(
            params(&ResNetPreact::new(&config(20, BlockType::Basic), &ctx(1, 28)).unwrap()),
            271_994
        );
        assert_eq!(
            params(&ResNetPreact::new(&config(164, BlockType::Bottleneck), &ctx(3, 32)).unwrap()),
            1_619_290
        );
        let mut c = config(56, BlockType::Basic);
        (c.remove_first_relu, c.add_last_bn, c.preact_stage) =
            (true, true, vec![true, false, false]);
        assert_eq!(
            params(&ResNetPreact::new(&c, &ctx(3, 32)).unwrap()),
            857_594
        );
    }

    #[test]
    fn names_follow_the_reference_state_dict() {
        let m = ResNetPreact::new(&config(20, BlockType::Basic), &ctx(3, 32)).unwrap();
        let names: Vec<String> = m.tensors().into_iter().map(|t| t.name).collect();
        assert_eq!(names[0], "conv.weight");
        assert_eq!(
            names[1..7],
            [
                "stage1.block1.bn1.weight",
                "stage1.block1.bn1.bias",
                "stage1.block1.bn1.running_mean",
                "stage1.block1.bn1.running_var",
                "stage1.block1.bn1.num_batches_tracked",
                "stage1.block1.conv1.weight"
            ]
        );
        assert!(names.contains(&"stage2.block1.shortcut.conv.weight".to_string()));
        assert!(
            !names.contains(&"stage1.block1.shortcut.conv.weight".to_string()),
            "identity shortcut in stage 1"
        );
        assert_eq!(names[names.len() - 2..], ["fc.weight", "fc.bias"]);
    }

    #[test]
    fn forward_shapes_and_invalid_depths() {
        tch::manual_seed(0);
        let mut m = ResNetPreact::new(&config(8, BlockType::Basic), &ctx(1, 28)).unwrap();
        let y = m
            .forward(
                &Tensor::randn([3, 1, 28, 28], (Kind::Float, Device::Cpu)),
                false,
            )
            .unwrap();
        assert_eq!(y.size(), vec![3, 10]);
        let e = m
            .forward(
                &Tensor::randn([3, 3, 28, 28], (Kind::Float, Device::Cpu)),
                false,
            )
            .unwrap_err();
        assert!(e.0.contains("channels") || e.0.contains("expected"), "{e}");
        let e = ResNetPreact::new(&config(21, BlockType::Basic), &ctx(3, 32))
            .err()
            .unwrap();
        assert!(e.0.contains("depth 21 is invalid"), "{e}");
        assert!(
            ResNetPreact::new(&config(22, BlockType::Bottleneck), &ctx(3, 32)).is_err(),
            "bottleneck needs 9n+2"
        );
    }
}
