//! The Shake-Shake ResNet for CIFAR-sized inputs: every block has two residual branches
//! (ReLU-conv-BN-ReLU-conv-BN) mixed with random weights, alpha in the forward pass and an
//! independent beta in the backward pass, per image or per batch; evaluation averages them.
//! Widening blocks use the two-path skip connection of the paper (one path shifted by a pixel).
//! State-dict names as the reference's.

use imgclf_plugin_api::nn::{
    self, BatchNorm2d, Conv2d, ConvConfig, InitMode, Linear, ParamStore, Scope,
};
use imgclf_plugin_api::{
    ComponentInfo, ConfigView, KeyDecl, Kind, Model, ModelContext, ModelFactory, NamedTensor,
    Result,
};
use tch::{Kind as K, Tensor};

const SECTION: &str = "model.shake_shake";
/// The stem's width is fixed in the reference, whatever `initial_channels` is.
const STEM: i64 = 16;

/// `model.shake_shake.*`: Shake-Shake-`depth` 2x`initial_channels`d ("Shake-Shake-Image" by
/// default: forward and backward weights drawn per image).
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub depth: i64,
    pub initial_channels: i64,
    pub shake: Shake,
    pub init_mode: InitMode,
}

/// Which random mixing weights are drawn (`shake_forward`, `shake_backward`, `shake_image`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shake {
    pub forward: bool,
    pub backward: bool,
    pub per_image: bool,
}

impl Shake {
    /// Evaluation mode: both branches weighted 0.5 in both passes.
    const EVEN: Shake = Shake {
        forward: false,
        backward: false,
        per_image: false,
    };

    /// The weights of branch 1 for a batch of `n` (branch 2 gets 1 - w): a uniform draw per
    /// image (N x 1 x 1 x 1) or per batch (a scalar), or 0.5 when not shaken.
    fn weights(shaken: bool, per_image: bool, n: i64, device: tch::Device) -> Tensor {
        match (shaken, per_image) {
            (true, true) => Tensor::rand([n, 1, 1, 1], (K::Float, device)),
            (true, false) => Tensor::rand([1], (K::Float, device)),
            (false, _) => Tensor::from(0.5f32).to_device(device),
        }
    }

    /// `alpha * x1 + (1 - alpha) * x2` in the forward pass, whose gradient flows as if the mix
    /// were `beta * x1 + (1 - beta) * x2` (the reference's ShakeFunction, without a custom
    /// autograd node: the difference between the two mixes is added as a constant).
    fn mix(self, x1: &Tensor, x2: &Tensor) -> Tensor {
        if self == Shake::EVEN {
            return (x1 + x2) * 0.5;
        }
        let (n, device) = (x1.size()[0], x1.device());
        let alpha = Shake::weights(self.forward, self.per_image, n, device);
        let beta = Shake::weights(self.backward, self.per_image, n, device);
        let diff = x1 - x2;
        let surrogate = x2 + &diff * &beta;
        surrogate + (diff.detach() * (alpha - beta))
    }
}

imgclf_plugin_api::config_section! {
    /// `model.shake_shake.*`, each key declared once (read back typed by `Keys::from_view`).
    pub struct Keys in "model.shake_shake" {
        /// network depth: 6n+2
        depth: i64 = 26, at_least(1);
        /// width of the first stage (the d of 2x96d); doubled per stage
        initial_channels: i64 = 96, at_least(1);
        /// random branch weights in the forward pass (else 0.5)
        shake_forward: bool = true;
        /// independent random branch weights for the gradient (else 0.5)
        shake_backward: bool = true;
        /// draw the weights per image (else one per batch)
        shake_image: bool = true;
    }
}

impl Config {
    pub fn keys() -> Vec<KeyDecl> {
        Keys::keys()
    }

    pub fn from_view(c: &ConfigView) -> Result<Self> {
        let k = Keys::from_view(c)?;
        Ok(Config {
            depth: k.depth,
            initial_channels: k.initial_channels,
            shake: Shake {
                forward: k.shake_forward,
                backward: k.shake_backward,
                per_image: k.shake_image,
            },
            init_mode: InitMode::parse(&c.str("model.init_mode")?)?,
        })
    }
}

fn conv(s: &Scope, name: &str, ci: i64, co: i64, k: i64, stride: i64, init: InitMode) -> Conv2d {
    let cc = ConvConfig {
        stride,
        padding: k / 2,
        ..Default::default()
    };
    Conv2d::new(&s.sub(name), ci, co, k, cc, init)
}

/// ReLU, conv3x3 (strided), BN, ReLU, conv3x3, BN.
struct ResidualPath {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
}

impl ResidualPath {
    fn new(s: &Scope, c_in: i64, c_out: i64, stride: i64, init: InitMode) -> Self {
        ResidualPath {
            conv1: conv(s, "conv1", c_in, c_out, 3, stride, init),
            bn1: BatchNorm2d::new(&s.sub("bn1"), c_out),
            conv2: conv(s, "conv2", c_out, c_out, 3, 1, init),
            bn2: BatchNorm2d::new(&s.sub("bn2"), c_out),
        }
    }

    /// `x` arrives ReLU-ed (shared by both paths and the skip connection).
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let y = self.bn1.forward_relu(&self.conv1.forward(x), train);
        self.bn2.forward(&self.conv2.forward(&y), train)
    }
}

/// The widening shortcut: ReLU, then two strided 1x1 convolutions of half the width each, the
/// second on the input shifted up-left by one pixel (zero-filled), concatenated, then BN.
struct Skip {
    conv1: Conv2d,
    conv2: Conv2d,
    bn: BatchNorm2d,
    stride: i64,
}

impl Skip {
    fn new(s: &Scope, c_in: i64, c_out: i64, stride: i64, init: InitMode) -> Self {
        Skip {
            conv1: conv(s, "conv1", c_in, c_out / 2, 1, 1, init),
            conv2: conv(s, "conv2", c_in, c_out / 2, 1, 1, init),
            bn: BatchNorm2d::new(&s.sub("bn"), c_out),
            stride,
        }
    }

    /// `x` arrives ReLU-ed.
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let (h, w) = (x.size()[2], x.size()[3]);
        // A 1x1 average pool with stride s is a strided subsampling.
        let sub = |t: &Tensor| t.slice(2, 0, h, self.stride).slice(3, 0, w, self.stride);
        let y1 = self.conv1.forward(&sub(x));
        let shifted = x
            .slice(2, 1, h, 1)
            .slice(3, 1, w, 1)
            .constant_pad_nd([0, 1, 0, 1]);
        let y2 = self.conv2.forward(&sub(&shifted));
        self.bn.forward(&Tensor::cat(&[y1, y2], 1), train)
    }
}

struct Block {
    path1: ResidualPath,
    path2: ResidualPath,
    skip: Option<Skip>,
    shake: Shake,
}

impl Block {
    fn new(s: &Scope, c_in: i64, c_out: i64, stride: i64, cfg: &Config) -> Self {
        let init = cfg.init_mode;
        Block {
            path1: ResidualPath::new(&s.sub("residual_path1"), c_in, c_out, stride, init),
            path2: ResidualPath::new(&s.sub("residual_path2"), c_in, c_out, stride, init),
            skip: (c_in != c_out)
                .then(|| Skip::new(&s.sub("shortcut.skip"), c_in, c_out, stride, init)),
            shake: cfg.shake,
        }
    }

    /// # Shapes
    /// N x C_in x H x W -> N x C_out x H/stride x W/stride
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let shake = if train { self.shake } else { Shake::EVEN };
        let act = x.relu();
        let y = shake.mix(
            &self.path1.forward(&act, train),
            &self.path2.forward(&act, train),
        );
        match &self.skip {
            Some(skip) => skip.forward(&act, train) + y,
            None => y + x,
        }
    }
}

pub struct ShakeShake {
    store: ParamStore,
    conv: Conv2d,
    bn: BatchNorm2d,
    stages: Vec<Vec<Block>>,
    fc: Linear,
    description: String,
}

impl ShakeShake {
    pub fn new(cfg: &Config, ctx: &ModelContext) -> Result<Self> {
        let n = nn::blocks_per_stage(SECTION, cfg.depth, 6, 2, "shake-shake")?;
        let c0 = cfg.initial_channels;
        let widths = [c0, 2 * c0, 4 * c0];
        let store = ParamStore::new(ctx.device);
        let root = store.root();
        let conv = conv(&root, "conv", ctx.n_channels, STEM, 3, 1, cfg.init_mode);
        let bn = BatchNorm2d::new(&root.sub("bn"), STEM);
        let stages = nn::stages(&root, STEM, &widths, &[1, 2, 2], n, |s, at| {
            Block::new(s, at.c_in, at.c_out, at.stride, cfg)
        });
        let fc = Linear::new(&root.sub("fc"), widths[2], ctx.n_classes, cfg.init_mode);
        let s = cfg.shake;
        let description = format!(
            "Shake-Shake-{} 2x{c0}d ({n} blocks per stage; shake forward {}, backward {}, per image {})",
            cfg.depth, s.forward, s.backward, s.per_image
        );
        Ok(ShakeShake {
            store,
            conv,
            bn,
            stages,
            fc,
            description,
        })
    }
}

impl Model for ShakeShake {
    /// # Shapes
    /// N x C x H x W -> N x n_classes
    fn forward(&mut self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = self.bn.forward(&self.conv.f_forward_checked(x)?, train);
        for stage in &self.stages {
            for block in stage {
                y = block.forward(&y, train);
            }
        }
        self.fc.forward_pooled(&y.relu_())
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        self.store.tensors()
    }

    fn summary(&self) -> String {
        self.description.clone()
    }
}

pub struct ShakeShakeFactory;

impl ModelFactory for ShakeShakeFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Model,
            "shake_shake",
            "Shake-Shake ResNet for CIFAR-sized images (two branches mixed at random)",
        )
        .papers(&["1705.07485"])
        .keys(Config::keys())
        .small(&[
            ("model.shake_shake.depth", "8"),
            ("model.shake_shake.initial_channels", "8"),
        ])
    }

    fn build(&self, config: &ConfigView, ctx: &ModelContext) -> Result<Box<dyn Model>> {
        nn::ModelType::require_cifar(config, "shake_shake")?;
        let model = Box::new(ShakeShake::new(&Config::from_view(config)?, ctx)?);
        nn::probed_like_the_reference(model, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn shake(forward: bool, backward: bool, per_image: bool) -> Shake {
        Shake {
            forward,
            backward,
            per_image,
        }
    }

    /// Forward value and gradients of `mix` for branches x1 = 1, x2 = 0 on `n` images, so the
    /// forward value is alpha and x1's gradient is beta.
    fn alpha_beta(s: Shake, n: i64) -> (Tensor, Tensor) {
        let x1 = Tensor::ones([n, 2, 3, 3], (K::Float, Device::Cpu)).set_requires_grad(true);
        let x2 = Tensor::zeros([n, 2, 3, 3], (K::Float, Device::Cpu)).set_requires_grad(true);
        let y = s.mix(&x1, &x2);
        y.sum(K::Float).backward();
        let g2 = x2.grad();
        // d/dx2 = 1 - beta.
        assert!((x1.grad() + g2).allclose(&x1.ones_like(), 1e-6, 1e-6, false));
        (y.detach(), x1.grad())
    }

    #[test]
    fn forward_and_backward_weights_are_independent_draws_per_image() {
        tch::manual_seed(0);
        let (alpha, beta) = alpha_beta(shake(true, true, true), 64);
        // Constant within an image, different across images, in [0, 1).
        let per_image = alpha.flatten(1, -1);
        assert!(per_image.std_dim(1, true, false).max().double_value(&[]) < 1e-6);
        assert!(per_image.select(1, 0).std(true).double_value(&[]) > 0.1);
        assert!(alpha.min().double_value(&[]) >= 0.0 && alpha.max().double_value(&[]) < 1.0);
        // The gradient uses another mix than the forward pass.
        let gap = (&alpha - &beta).abs().mean(K::Float).double_value(&[]);
        assert!(
            gap > 0.1,
            "forward and backward weights should differ: {gap}"
        );
    }

    #[test]
    fn batch_level_and_unshaken_passes() {
        tch::manual_seed(1);
        let (alpha, beta) = alpha_beta(shake(true, false, false), 8);
        let a = alpha.double_value(&[0, 0, 0, 0]);
        assert!(
            alpha.allclose(&alpha.full_like(a), 0.0, 0.0, false),
            "one alpha per batch"
        );
        assert!(
            beta.allclose(&beta.full_like(0.5), 0.0, 0.0, false),
            "beta = 0.5"
        );
        let (alpha, beta) = alpha_beta(Shake::EVEN, 4);
        assert!(alpha.allclose(&alpha.full_like(0.5), 0.0, 0.0, false));
        assert!(beta.allclose(&beta.full_like(0.5), 0.0, 0.0, false));
    }

    #[test]
    fn eval_mode_is_deterministic_and_shapes_hold() {
        let cfg = Config {
            depth: 8,
            initial_channels: 8,
            shake: shake(true, true, true),
            init_mode: InitMode::KaimingFanOut,
        };
        let ctx = ModelContext {
            n_channels: 1,
            image_size: 28,
            n_classes: 10,
            device: Device::Cpu,
        };
        let mut m = ShakeShake::new(&cfg, &ctx).unwrap();
        let x = Tensor::randn([3, 1, 28, 28], (K::Float, Device::Cpu));
        let t1 = m.forward(&x, true).unwrap();
        let t2 = m.forward(&x, true).unwrap();
        assert_eq!(t1.size(), vec![3, 10]);
        assert!(!t1.equal(&t2), "training draws new weights each pass");
        let e1 = m.forward(&x, false).unwrap();
        assert!(e1.equal(&m.forward(&x, false).unwrap()));
        let names: Vec<String> = m.tensors().into_iter().map(|t| t.name).collect();
        assert!(names.contains(&"stage1.block1.shortcut.skip.conv2.weight".to_string()));
        assert!(names.contains(&"stage3.block1.residual_path2.bn2.running_var".to_string()));
    }
}
