//! The VGG network for CIFAR-sized inputs: five stages of 3x3 convolutions (with bias,
//! optionally followed by BN), each ending in a 2x2 max-pool, then one linear layer on the
//! flattened features; state-dict names as the reference's (`stage1.conv0`, `stage1.bn0`).

use imgclf_plugin_api::nn::{
    self, BatchNorm2d, Conv2d, ConvConfig, InitMode, Linear, ModelType, ParamStore, Scope,
};
use imgclf_plugin_api::{
    plugin_bail, ComponentInfo, ConfigView, KeyDecl, Kind, Model, ModelContext, ModelFactory,
    NamedTensor, Result,
};
use tch::Tensor;

const SECTION: &str = "model.vgg";
const STAGES: usize = 5;

/// `model.vgg.*` (the default is the BN variant of the paper's configuration D, VGG-16).
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub n_channels: [i64; STAGES],
    pub n_layers: [i64; STAGES],
    pub use_bn: bool,
    pub init_mode: InitMode,
}

imgclf_plugin_api::config_section! {
    /// `model.vgg.*`, each key declared once (read back typed by `Keys::from_view`).
    pub struct Keys in "model.vgg" {
        /// output channels of each of the five stages
        n_channels: Vec<i64> = vec![64, 128, 256, 512, 512], at_least(1);
        /// 3x3 convolutions in each of the five stages
        n_layers: Vec<i64> = vec![2, 2, 3, 3, 3], at_least(1);
        /// batch normalisation after every convolution
        use_bn: bool = true;
    }
}

impl Config {
    pub fn keys() -> Vec<KeyDecl> {
        Keys::keys()
    }

    pub fn from_view(c: &ConfigView) -> Result<Self> {
        let k = Keys::from_view(c)?;
        let five = |key: &str, v: &[i64]| -> Result<[i64; STAGES]> {
            match <[i64; STAGES]>::try_from(v) {
                Ok(a) if a.iter().all(|&x| x >= 1) => Ok(a),
                _ => plugin_bail!(
                    "{SECTION}.{key} needs 5 positive values (one per stage), got {v:?}"
                ),
            }
        };
        Ok(Config {
            n_channels: five("n_channels", &k.n_channels)?,
            n_layers: five("n_layers", &k.n_layers)?,
            use_bn: k.use_bn,
            init_mode: InitMode::parse(&c.str("model.init_mode")?)?,
        })
    }
}

/// One stage: `n` conv(-BN)-ReLU layers, then a 2x2 max-pool.
pub(crate) struct Stage {
    layers: Vec<(Conv2d, Option<BatchNorm2d>)>,
}

impl Stage {
    /// # Shapes
    /// N x C_in x H x W -> N x C_out x H/2 x W/2
    pub(crate) fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = x.shallow_clone();
        for (conv, bn) in &self.layers {
            y = conv.f_forward_checked(&y)?;
            y = match bn {
                Some(bn) => bn.forward_relu(&y, train),
                None => y.relu_(),
            };
        }
        Ok(y.f_max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)?)
    }
}

pub struct Vgg {
    store: ParamStore,
    stages: Vec<Stage>,
    fc: Linear,
    description: String,
}

/// The side of the last feature map: each stage halves it (floor), as the reference's dummy
/// forward finds out; an error when it reaches 0.
pub(crate) fn final_side(image_size: i64) -> Result<i64> {
    let side = (0..STAGES).fold(image_size, |s, _| s / 2);
    if side < 1 {
        plugin_bail!(
            "vgg halves the image five times (2x2 max-pools), so it needs images of at least \
             32x32; dataset.image_size is {image_size} (pad or resize the images, or pick a \
             model with global average pooling such as resnet_preact)"
        );
    }
    Ok(side)
}

/// The five stages (`stage1` ... `stage5`) and the channels they end with.
pub(crate) fn stages(root: &Scope, cfg: &Config, ctx: &ModelContext) -> (Vec<Stage>, i64) {
    let mut stages = Vec::new();
    let mut c_in = ctx.n_channels;
    for (i, (&c_out, &n)) in cfg.n_channels.iter().zip(&cfg.n_layers).enumerate() {
        let s = root.sub(format!("stage{}", i + 1));
        let layers = (0..n)
            .map(|j| {
                let cc = ConvConfig {
                    padding: 1,
                    bias: true,
                    ..Default::default()
                };
                let ci = if j == 0 { c_in } else { c_out };
                let conv = Conv2d::new(&s.sub(format!("conv{j}")), ci, c_out, 3, cc, cfg.init_mode);
                let bn = cfg
                    .use_bn
                    .then(|| BatchNorm2d::new(&s.sub(format!("bn{j}")), c_out));
                (conv, bn)
            })
            .collect();
        stages.push(Stage { layers });
        c_in = c_out;
    }
    (stages, c_in)
}

impl Vgg {
    pub fn new(cfg: &Config, ctx: &ModelContext) -> Result<Self> {
        let side = final_side(ctx.image_size)?;
        let store = ParamStore::new(ctx.device);
        let root = store.root();
        let (stages, c_in) = stages(&root, cfg, ctx);
        let features = c_in * side * side;
        let fc = Linear::new(&root.sub("fc"), features, ctx.n_classes, cfg.init_mode);
        let convs = cfg.n_layers.iter().sum::<i64>();
        let description = format!(
            "VGG{} ({convs} convolutions in stages of {:?}, channels {:?}, {features} features)",
            if cfg.use_bn { " with BN" } else { "" },
            cfg.n_layers,
            cfg.n_channels
        );
        Ok(Vgg {
            store,
            stages,
            fc,
            description,
        })
    }
}

impl Model for Vgg {
    /// # Shapes
    /// N x C x H x W -> N x n_classes
    fn forward(&mut self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = x.shallow_clone();
        for stage in &self.stages {
            y = stage.forward(&y, train)?;
        }
        self.fc.f_forward(&y.flatten(1, -1))
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        self.store.tensors()
    }

    fn summary(&self) -> String {
        self.description.clone()
    }
}

pub struct VggFactory;

impl ModelFactory for VggFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Model,
            "vgg",
            "VGG (five conv stages, optional BN; model.type cifar: one linear layer, imagenet: three)",
        )
        .papers(&["1409.1556"])
        .keys(Config::keys())
        .small(&[
            ("model.vgg.n_channels", "[8, 8, 16, 16, 16]"),
            ("model.vgg.n_layers", "[1, 1, 1, 1, 1]"),
        ])
    }

    fn build(&self, config: &ConfigView, ctx: &ModelContext) -> Result<Box<dyn Model>> {
        let cfg = Config::from_view(config)?;
        let model: Box<dyn Model> = match ModelType::of(config)? {
            ModelType::Cifar => Box::new(Vgg::new(&cfg, ctx)?),
            ModelType::ImageNet => Box::new(crate::imagenet::Vgg::new(&cfg, ctx)?),
        };
        nn::probed_like_the_reference(model, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind as K};

    fn ctx(n_channels: i64, image_size: i64) -> ModelContext {
        ModelContext {
            n_channels,
            image_size,
            n_classes: 10,
            device: Device::Cpu,
        }
    }

    fn small(use_bn: bool) -> Config {
        Config {
            n_channels: [4, 8, 8, 16, 16],
            n_layers: [1, 1, 2, 1, 1],
            use_bn,
            init_mode: InitMode::KaimingFanOut,
        }
    }

    #[test]
    fn layers_and_names_follow_the_configuration() {
        let m = Vgg::new(&small(false), &ctx(3, 32)).unwrap();
        let names: Vec<String> = m.tensors().into_iter().map(|t| t.name).collect();
        assert_eq!(
            names[..4],
            [
                "stage1.conv0.weight",
                "stage1.conv0.bias",
                "stage2.conv0.weight",
                "stage2.conv0.bias"
            ]
        );
        assert!(names.contains(&"stage3.conv1.bias".to_string()));
        assert!(!names.iter().any(|n| n.contains("bn")));
        let with_bn = Vgg::new(&small(true), &ctx(3, 32)).unwrap();
        assert!(with_bn
            .tensors()
            .iter()
            .any(|t| t.name == "stage5.bn0.num_batches_tracked"));
        // 64x64 images leave a 2x2 map: the linear layer reads 16 * 2 * 2 features.
        let mut big = Vgg::new(&small(true), &ctx(3, 64)).unwrap();
        let fc = big
            .tensors()
            .into_iter()
            .find(|t| t.name == "fc.weight")
            .unwrap();
        assert_eq!(fc.tensor.size(), vec![10, 64]);
        let y = big
            .forward(
                &Tensor::randn([2, 3, 64, 64], (K::Float, Device::Cpu)),
                true,
            )
            .unwrap();
        assert_eq!(y.size(), vec![2, 10]);
    }

    #[test]
    fn images_smaller_than_32_are_refused_with_the_reason() {
        let e = Vgg::new(&small(true), &ctx(1, 28)).err().unwrap().0;
        assert!(
            e.contains("dataset.image_size is 28") && e.contains("32x32"),
            "{e}"
        );
    }
}
