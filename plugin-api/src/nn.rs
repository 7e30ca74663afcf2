//! Layers models are built from, with the parameter and buffer names PyTorch uses
//! (`weight`, `bias`, `running_mean`, `running_var`, `num_batches_tracked`), registered in
//! module order so a model's [`ParamStore::tensors`] is the reference's state dict.

use crate::component::NamedTensor;
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor};

/// The reference's initialisation modes (`model.init_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitMode {
    KaimingFanOut,
    KaimingFanIn,
}

impl InitMode {
    pub fn parse(s: &str) -> crate::Result<Self> {
        match s {
            "kaiming_fan_out" => Ok(InitMode::KaimingFanOut),
            "kaiming_fan_in" => Ok(InitMode::KaimingFanIn),
            other => Err(crate::Error(format!(
                "model.init_mode `{other}` is not one of 'kaiming_fan_out', 'kaiming_fan_in'"
            ))),
        }
    }

    /// `nn.init.kaiming_normal_(w, mode, nonlinearity='relu')`: N(0, sqrt(2 / fan)).
    pub fn kaiming_normal(self, shape: &[i64], device: Device) -> Tensor {
        let receptive: i64 = shape[2..].iter().product();
        let fan = match self {
            InitMode::KaimingFanOut => shape[0] * receptive,
            InitMode::KaimingFanIn => shape[1] * receptive,
        };
        let std = (2.0 / fan as f64).sqrt();
        Tensor::randn(shape, (Kind::Float, device)) * std
    }
}

/// Blocks per stage of a 3-stage CIFAR network of `depth` layers whose blocks have
/// `layers_per_block` weighted layers per stage-unit, plus `offset` layers outside the stages
/// (residual networks: basic 6n+2, bottleneck 9n+2; WRN 6n+4; DenseNet 3n+4 or 6n+4).
/// An invalid depth is an error naming `{section}.depth` and the valid form.
pub fn blocks_per_stage(
    section: &str,
    depth: i64,
    layers_per_block: i64,
    offset: i64,
    block: &str,
) -> crate::Result<i64> {
    let n = (depth - offset) / layers_per_block;
    if n < 1 || n * layers_per_block + offset != depth {
        return Err(crate::Error(format!(
            "{section}.depth {depth} is invalid for {block} blocks: it must be {layers_per_block}n+{offset} (e.g. {}, {})",
            layers_per_block + offset,
            layers_per_block * 18 + offset
        )));
    }
    Ok(n)
}

/// [`blocks_per_stage`] of the reference's residual networks: basic blocks 6n+2, bottleneck
/// blocks 9n+2.
pub fn residual_blocks_per_stage(
    section: &str,
    depth: i64,
    bottleneck: bool,
) -> crate::Result<i64> {
    if bottleneck {
        blocks_per_stage(section, depth, 9, 2, "bottleneck")
    } else {
        blocks_per_stage(section, depth, 6, 2, "basic")
    }
}

/// `{section}.block_type` of the reference's CIFAR networks: `false` for 'basic', `true` for
/// 'bottleneck'.
pub fn is_bottleneck(c: &crate::ConfigView, section: &str) -> crate::Result<bool> {
    match c.str(&format!("{section}.block_type"))?.as_str() {
        "basic" => Ok(false),
        "bottleneck" => Ok(true),
        other => Err(crate::Error(format!(
            "{section}.block_type `{other}` is not one of 'basic', 'bottleneck'"
        ))),
    }
}

/// Where a block sits in a network built by [`stages`], and its geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockAt {
    /// Stage index, from 0 (named `stage{stage+1}`).
    pub stage: usize,
    /// Block index within the stage, from 0 (named `block{index+1}`).
    pub index: i64,
    pub c_in: i64,
    pub c_out: i64,
    pub stride: i64,
}

impl BlockAt {
    /// The first block of a stage (it changes width and stride).
    pub fn is_first(&self) -> bool {
        self.index == 0
    }
}

/// The stage layout of the reference's CIFAR residual networks: stage `i` (scope `stage{i+1}`)
/// has `n` blocks (scopes `block{j+1}`); its first block goes from the previous width
/// (`c_in` for the first stage) to `widths[i]` with `strides[i]`, the others keep `widths[i]`
/// at stride 1. `block` builds one block in its scope.
pub fn stages<B>(
    root: &Scope,
    c_in: i64,
    widths: &[i64],
    strides: &[i64],
    n: i64,
    block: impl FnMut(&Scope, BlockAt) -> B,
) -> Vec<Vec<B>> {
    stages_of(root, c_in, widths, strides, &vec![n; widths.len()], block)
}

/// `model.type`: which of the reference's model families a network is built from
/// (`models/cifar/` or `models/imagenet/`, the same `model.name` in both).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelType {
    /// CIFAR-style: 3x3 stem at full resolution, three stages.
    Cifar,
    /// ImageNet-style: 7x7/2 stem and 3x3/2 max-pool ([`ImageNetStem`]), four stages.
    ImageNet,
}

impl ModelType {
    pub fn of(c: &crate::ConfigView) -> crate::Result<Self> {
        match c.str("model.type")?.as_str() {
            "cifar" => Ok(ModelType::Cifar),
            "imagenet" => Ok(ModelType::ImageNet),
            other => Err(crate::Error(format!(
                "model.type `{other}` is not one of 'cifar', 'imagenet'"
            ))),
        }
    }

    /// An error for a model the reference has only in `models/cifar/`.
    pub fn require_cifar(c: &crate::ConfigView, model: &str) -> crate::Result<()> {
        match Self::of(c)? {
            ModelType::Cifar => Ok(()),
            ModelType::ImageNet => Err(crate::Error(format!(
                "model.type imagenet: `{model}` exists only as a CIFAR network (the reference's \
                 models/imagenet/ has resnet, resnet_preact, densenet, pyramidnet, resnext and \
                 vgg); set model.type cifar or pick one of those"
            ))),
        }
    }
}

/// `{section}.n_blocks` of the reference's ImageNet networks: four stage lengths, each >= 1.
pub fn four_stage_blocks(c: &crate::ConfigView, section: &str) -> crate::Result<[i64; 4]> {
    let v = c.int_list(&format!("{section}.n_blocks"))?;
    match <[i64; 4]>::try_from(v.as_slice()) {
        Ok(a) if a.iter().all(|&n| n >= 1) => Ok(a),
        _ => Err(crate::Error(format!(
            "{section}.n_blocks needs 4 positive values (blocks in each of the four ImageNet \
             stages), got {v:?}"
        ))),
    }
}

/// The stem of the reference's ImageNet networks: a 7x7 stride-2 convolution without bias
/// (`conv`) and its BN (`bn`); forward is conv-BN-ReLU, then a 3x3 stride-2 max-pool with
/// padding 1 (a quarter of the side).
pub struct ImageNetStem {
    pub conv: Conv2d,
    pub bn: BatchNorm2d,
}

impl ImageNetStem {
    pub fn new(root: &Scope, c_in: i64, c_out: i64, init: InitMode) -> Self {
        let cc = ConvConfig {
            stride: 2,
            padding: 3,
            ..Default::default()
        };
        ImageNetStem {
            conv: Conv2d::new(&root.sub("conv"), c_in, c_out, 7, cc, init),
            bn: BatchNorm2d::new(&root.sub("bn"), c_out),
        }
    }

    /// # Shapes
    /// N x C x H x W -> N x C_out x ceil(ceil(H/2)/2) x ceil(ceil(W/2)/2)
    pub fn forward(&self, x: &Tensor, train: bool) -> crate::Result<Tensor> {
        let y = self
            .bn
            .forward_relu(&self.conv.f_forward_checked(x)?, train);
        Ok(y.f_max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)?)
    }
}

/// [`stages`] with its own number of blocks per stage (the ImageNet networks' `n_blocks`).
pub fn stages_of<B>(
    root: &Scope,
    c_in: i64,
    widths: &[i64],
    strides: &[i64],
    n_blocks: &[i64],
    mut block: impl FnMut(&Scope, BlockAt) -> B,
) -> Vec<Vec<B>> {
    let mut prev = c_in;
    let mut out = Vec::with_capacity(widths.len());
    for (stage, ((&c_out, &stride), &n)) in widths.iter().zip(strides).zip(n_blocks).enumerate() {
        let s = root.sub(format!("stage{}", stage + 1));
        let blocks = (0..n)
            .map(|index| {
                let at = BlockAt {
                    stage,
                    index,
                    c_in: if index == 0 { prev } else { c_out },
                    c_out,
                    stride: if index == 0 { stride } else { 1 },
                };
                block(&s.sub(format!("block{}", index + 1)), at)
            })
            .collect();
        out.push(blocks);
        prev = c_out;
    }
    out
}

/// What the reference's CIFAR networks do while they are built: one training-mode forward pass
/// of a single all-zero image (to measure the classifier's input size), which updates every
/// BatchNorm's running statistics once (`num_batches_tracked` 1; `running_var` 0.9 and
/// `running_mean` 0 where the normalised input is constant zero). Ports of those networks end
/// `build` with this, so a fresh model's state dict equals the reference's.
pub fn probed_like_the_reference(
    mut model: Box<dyn crate::Model>,
    ctx: &crate::ModelContext,
) -> crate::Result<Box<dyn crate::Model>> {
    let zeros = Tensor::zeros(
        [1, ctx.n_channels, ctx.image_size, ctx.image_size],
        (Kind::Float, ctx.device),
    );
    let _ = tch::no_grad(|| model.forward(&zeros, true))?;
    // A BN that met one value per channel (a 1x1 map of the single probe image) has a NaN
    // running variance; PyTorch refuses that batch ("Expected more than 1 value per channel
    // when training"), so the reference cannot build the network at this size either.
    let single = model
        .tensors()
        .into_iter()
        .find(|t| t.name.ends_with("running_var") && t.tensor.isnan().any().int64_value(&[]) != 0);
    if let Some(t) = single {
        return Err(crate::Error(format!(
            "dataset.image_size {} is too small for this network: `{}` normalises a 1x1 map \
             (one value per channel; PyTorch, and so the reference, refuses that: \"Expected \
             more than 1 value per channel when training\"); use larger images (the ImageNet \
             networks need more than 32 pixels: their last stage works at 1/32 of the side)",
            ctx.image_size, t.name
        )));
    }
    Ok(model)
}

/// Ordered registry of a model's tensors. Cheap to clone (shared).
#[derive(Clone)]
pub struct ParamStore {
    device: Device,
    entries: Arc<Mutex<Vec<NamedTensor>>>,
}

impl ParamStore {
    pub fn new(device: Device) -> Self {
        ParamStore {
            device,
            entries: Arc::new(Mutex::new(Vec::new())),
        }
    }

    pub fn root(&self) -> Scope {
        Scope {
            store: self.clone(),
            prefix: String::new(),
        }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Shallow clones of every tensor, in registration order.
    pub fn tensors(&self) -> Vec<NamedTensor> {
        self.entries
            .lock()
            .expect("param store poisoned")
            .iter()
            .cloned()
            .collect()
    }

    /// Number of trainable elements (`sum(p.numel() for p in model.parameters())`).
    pub fn parameter_count(&self) -> i64 {
        self.entries
            .lock()
            .expect("param store poisoned")
            .iter()
            .filter(|e| e.trainable)
            .map(|e| e.tensor.numel() as i64)
            .sum()
    }

    fn add(&self, name: String, tensor: Tensor, trainable: bool) -> Tensor {
        let tensor = tensor
            .to_device(self.device)
            .detach()
            .set_requires_grad(trainable);
        self.entries
            .lock()
            .expect("param store poisoned")
            .push(NamedTensor {
                name,
                tensor: tensor.shallow_clone(),
                trainable,
            });
        tensor
    }
}

/// A dotted name prefix inside a [`ParamStore`] (`stage1.block1.conv1`).
#[derive(Clone)]
pub struct Scope {
    store: ParamStore,
    prefix: String,
}

impl Scope {
    pub fn sub(&self, name: impl std::fmt::Display) -> Scope {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Scope {
            store: self.store.clone(),
            prefix,
        }
    }
    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }
    pub fn param(&self, name: &str, init: Tensor) -> Tensor {
        self.store.add(self.full(name), init, true)
    }
    pub fn buffer(&self, name: &str, init: Tensor) -> Tensor {
        self.store.add(self.full(name), init, false)
    }
    pub fn device(&self) -> Device {
        self.store.device
    }
}

/// `nn.Conv2d`.
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    stride: i64,
    padding: i64,
    groups: i64,
}

#[derive(Clone, Copy, Debug)]
pub struct ConvConfig {
    pub stride: i64,
    pub padding: i64,
    pub groups: i64,
    pub bias: bool,
}

impl Default for ConvConfig {
    fn default() -> Self {
        ConvConfig {
            stride: 1,
            padding: 0,
            groups: 1,
            bias: false,
        }
    }
}

impl Conv2d {
    pub fn new(s: &Scope, c_in: i64, c_out: i64, k: i64, cfg: ConvConfig, init: InitMode) -> Self {
        let weight = s.param(
            "weight",
            init.kaiming_normal(&[c_out, c_in / cfg.groups, k, k], s.device()),
        );
        // The reference's initializer leaves a convolution's bias alone, so it keeps PyTorch's
        // default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        let bound = 1.0 / ((c_in / cfg.groups * k * k) as f64).sqrt();
        let bias = cfg.bias.then(|| {
            s.param(
                "bias",
                Tensor::empty([c_out], (Kind::Float, s.device())).uniform_(-bound, bound),
            )
        });
        Conv2d {
            weight,
            bias,
            stride: cfg.stride,
            padding: cfg.padding,
            groups: cfg.groups,
        }
    }
    /// # Shapes
    /// N x C_in x H x W -> N x C_out x H' x W'
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(
            &self.weight,
            self.bias.as_ref(),
            [self.stride; 2],
            [self.padding; 2],
            [1, 1],
            self.groups,
        )
    }
}

impl Conv2d {
    /// [`Conv2d::forward`] that reports a shape mismatch (wrong channel count, too small an
    /// image) as an error instead of a panic: use it where user data first meets the model.
    pub fn f_forward_checked(&self, x: &Tensor) -> crate::Result<Tensor> {
        Ok(x.f_conv2d(
            &self.weight,
            self.bias.as_ref(),
            [self.stride; 2],
            [self.padding; 2],
            [1, 1],
            self.groups,
        )?)
    }
}

/// `nn.BatchNorm2d` (eps 1e-5, momentum 0.1, affine, tracking running stats).
pub struct BatchNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub num_batches_tracked: Tensor,
}

impl BatchNorm2d {
    pub fn new(s: &Scope, c: i64) -> Self {
        let d = s.device();
        BatchNorm2d {
            weight: s.param("weight", Tensor::ones([c], (Kind::Float, d))),
            bias: s.param("bias", Tensor::zeros([c], (Kind::Float, d))),
            running_mean: s.buffer("running_mean", Tensor::zeros([c], (Kind::Float, d))),
            running_var: s.buffer("running_var", Tensor::ones([c], (Kind::Float, d))),
            num_batches_tracked: s
                .buffer("num_batches_tracked", Tensor::zeros([], (Kind::Int64, d))),
        }
    }
    /// # Shapes
    /// N x C x H x W -> same
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        if train {
            self.count_batch();
        }
        self.aten(x, train)
    }

    /// `F.relu(bn(x))`: [`BatchNorm2d::forward`] then ReLU, with the same result up to float
    /// rounding. In training mode on the CPU (float32 or bfloat16, NCHW or channels_last) it
    /// runs as one fused autograd op, two passes over the activations forward and two backward
    /// instead of five and five (`plugin-api/cpp/bn_relu.cpp`); elsewhere, and with
    /// `IMGCLF_FUSED_BN_RELU=0` in the environment, ATen's batch_norm and relu.
    ///
    /// # Shapes
    /// N x C x H x W -> same
    pub fn forward_relu(&self, x: &Tensor, train: bool) -> Tensor {
        if train {
            self.count_batch();
            if crate::fused::bn_relu_enabled() {
                if let Some(y) = crate::fused::bn_relu_train(x, self, 0.1, 1e-5) {
                    return y;
                }
            }
        }
        self.aten(x, train).relu_()
    }

    fn count_batch(&self) {
        tch::no_grad(|| {
            let _ = self.num_batches_tracked.shallow_clone().g_add_scalar_(1);
        });
    }

    fn aten(&self, x: &Tensor, train: bool) -> Tensor {
        x.batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            0.1,
            1e-5,
            true,
        )
    }
}

/// `nn.Linear`, initialised as the reference's initializer does (Kaiming-normal weight, zero bias).
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    pub fn new(s: &Scope, c_in: i64, c_out: i64, init: InitMode) -> Self {
        let d = s.device();
        Linear {
            weight: s.param("weight", init.kaiming_normal(&[c_out, c_in], d)),
            bias: s.param("bias", Tensor::zeros([c_out], (Kind::Float, d))),
        }
    }
    /// # Shapes
    /// N x C_in -> N x C_out
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }
    /// [`Linear::forward`] that reports a feature-size mismatch as an error (a model whose
    /// flattened features depend on the image size meets a differently sized image).
    pub fn f_forward(&self, x: &Tensor) -> crate::Result<Tensor> {
        Ok(x.f_linear(&self.weight, Some(&self.bias))?)
    }
    /// The classifier head of every architecture here: global average pooling, flatten, then
    /// this layer (`F.adaptive_avg_pool2d(x, 1)`, `x.view(x.size(0), -1)`, `self.fc(x)`).
    ///
    /// # Shapes
    /// N x C_in x H x W -> N x C_out
    pub fn forward_pooled(&self, x: &Tensor) -> crate::Result<Tensor> {
        self.f_forward(&x.adaptive_avg_pool2d([1, 1]).flatten(1, -1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_scopes_in_order() {
        let store = ParamStore::new(Device::Cpu);
        let root = store.root();
        let _c = Conv2d::new(
            &root.sub("stage1").sub("block1").sub("conv1"),
            3,
            8,
            3,
            ConvConfig::default(),
            InitMode::KaimingFanOut,
        );
        let _b = BatchNorm2d::new(&root.sub("bn"), 8);
        let names: Vec<String> = store.tensors().into_iter().map(|t| t.name).collect();
        assert_eq!(
            names,
            [
                "stage1.block1.conv1.weight",
                "bn.weight",
                "bn.bias",
                "bn.running_mean",
                "bn.running_var",
                "bn.num_batches_tracked"
            ]
        );
        assert_eq!(store.parameter_count(), 8 * 3 * 9 + 16);
    }

    #[test]
    fn stages_chain_widths_and_stride_only_the_first_block() {
        let store = ParamStore::new(Device::Cpu);
        let mut seen = Vec::new();
        let st = stages(&store.root(), 16, &[16, 32, 64], &[1, 2, 2], 2, |s, at| {
            seen.push((
                s.sub("x")
                    .param("w", Tensor::zeros([1], (Kind::Float, Device::Cpu))),
                at,
            ));
            at.c_out
        });
        assert_eq!(st, vec![vec![16, 16], vec![32, 32], vec![64, 64]]);
        let names: Vec<String> = store.tensors().into_iter().map(|t| t.name).collect();
        assert_eq!(names[2], "stage2.block1.x.w");
        let geometry: Vec<(i64, i64, i64, bool)> = seen
            .iter()
            .map(|(_, a)| (a.c_in, a.c_out, a.stride, a.is_first()))
            .collect();
        assert_eq!(
            geometry,
            [
                (16, 16, 1, true),
                (16, 16, 1, false),
                (16, 32, 2, true),
                (32, 32, 1, false),
                (32, 64, 2, true),
                (64, 64, 1, false)
            ]
        );
    }

    #[test]
    fn conv_bias_keeps_pytorch_default_uniform_init() {
        tch::manual_seed(0);
        let store = ParamStore::new(Device::Cpu);
        let cfg = ConvConfig {
            bias: true,
            ..Default::default()
        };
        let c = Conv2d::new(&store.root(), 8, 512, 3, cfg, InitMode::KaimingFanOut);
        let b = c.bias.unwrap();
        let bound = 1.0 / (8.0f64 * 9.0).sqrt();
        let (lo, hi) = (b.min().double_value(&[]), b.max().double_value(&[]));
        assert!(lo >= -bound && hi <= bound, "[{lo}, {hi}] outside ±{bound}");
        // 512 draws of U(-b, b) reach close to both ends.
        assert!(
            lo < -0.9 * bound && hi > 0.9 * bound,
            "[{lo}, {hi}] vs ±{bound}"
        );
    }

    #[test]
    fn kaiming_std_matches_fan() {
        tch::manual_seed(0);
        let w = InitMode::KaimingFanOut.kaiming_normal(&[64, 32, 3, 3], Device::Cpu);
        let std = w.std(true).double_value(&[]);
        let expected = (2.0f64 / (64.0 * 9.0)).sqrt();
        assert!(
            (std - expected).abs() / expected < 0.05,
            "{std} vs {expected}"
        );
        let w = InitMode::KaimingFanIn.kaiming_normal(&[64, 32, 3, 3], Device::Cpu);
        let expected = (2.0f64 / (32.0 * 9.0)).sqrt();
        assert!((w.std(true).double_value(&[]) - expected).abs() / expected < 0.05);
    }

    #[test]
    fn batch_norm_updates_running_stats_and_counter_in_train_mode_only() {
        let store = ParamStore::new(Device::Cpu);
        let bn = BatchNorm2d::new(&store.root(), 2);
        let x = Tensor::randn([4, 2, 3, 3], (Kind::Float, Device::Cpu)) + 5.0;
        let _ = bn.forward(&x, false);
        assert_eq!(bn.num_batches_tracked.int64_value(&[]), 0);
        assert_eq!(bn.running_mean.double_value(&[0]), 0.0);
        let _ = bn.forward(&x, true);
        assert_eq!(bn.num_batches_tracked.int64_value(&[]), 1);
        assert!(bn.running_mean.double_value(&[0]) > 0.4);
        // The store sees the same storage.
        let t = store
            .tensors()
            .into_iter()
            .find(|t| t.name == "num_batches_tracked")
            .unwrap();
        assert_eq!(t.tensor.int64_value(&[]), 1);
    }
}
