//! The kinds of components a plugin provides, as plain Rust traits.
//!
//! A component is a *factory* (a unit struct registered with [`crate::register!`]) that
//! describes itself ([`ComponentInfo`]) and builds a live object from the frozen config:
//! a [`Model`], an [`Augmentation`] (or, for augmentations of [`Stage::Image`], an
//! [`ImageStage`]), an [`Optimizer`], a [`Scheduler`] or (ABI 0.1.2) a [`TrainingStep`].
//! The host never sees
//! these traits directly; [`crate::ffi`] adapts them to the stable ABI and catches panics.

use crate::config::{ConfigView, KeyDecl};
use crate::error::Result;
use tch::{Device, Tensor};

/// What a component is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Model,
    Augmentation,
    Optimizer,
    Scheduler,
    /// A training-step hook (ABI 0.1.2), selected by `train.step`.
    Step,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Model,
        Kind::Augmentation,
        Kind::Optimizer,
        Kind::Scheduler,
        Kind::Step,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Model => "model",
            Kind::Augmentation => "augmentation",
            Kind::Optimizer => "optimizer",
            Kind::Scheduler => "scheduler",
            Kind::Step => "step",
        }
    }
}

/// Where an augmentation runs in the training input pipeline, in the reference's order:
/// crop/flip on raw pixels, then the host normalises, then erasing (cutout, random erasing),
/// then batch mixing (mixup, cutmix, ricap), then target transforms (label smoothing).
/// [`Stage::Image`] (ABI 0.1.2) runs before all of them, on each decoded image in the data
/// loader's worker threads, before batching (RandAugment, TrivialAugment).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// Before normalisation: pixel values in [0, 255] as float.
    Geometric = 0,
    /// After normalisation, per sample.
    Erase = 1,
    /// After normalisation, across the batch (soft targets).
    Mix = 2,
    /// Targets only.
    Target = 3,
    /// ABI 0.1.2: one uint8 image at a time, on the CPU in the loader's worker threads, before
    /// batching and before every other stage (an [`ImageStage`], built by an
    /// [`ImageStageFactory`]). Hosts before 0.1.2 refuse plugins declaring it.
    Image = 4,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Geometric,
        Stage::Erase,
        Stage::Mix,
        Stage::Target,
        Stage::Image,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Geometric => "geometric",
            Stage::Erase => "erase",
            Stage::Mix => "mix",
            Stage::Target => "target",
            Stage::Image => "image",
        }
    }
    pub fn from_index(i: u32) -> Option<Stage> {
        Stage::ALL.get(i as usize).copied()
    }
}

/// Self-description shown by `imgclf plugins inspect` and used to validate the config.
#[derive(Clone, Debug)]
pub struct ComponentInfo {
    /// Registry name: `resnet_preact` (model.name), `sgd` (train.optimizer), `cosine`
    /// (scheduler.type), `cutout` (augmentation.use_cutout).
    pub name: String,
    pub kind: Kind,
    /// One line.
    pub description: String,
    /// arXiv ids of the papers, e.g. `1603.05027`.
    pub papers: Vec<String>,
    /// The config keys this component owns, all under one section.
    pub keys: Vec<KeyDecl>,
    /// Augmentations only: the boolean key that switches it on (`augmentation.use_cutout`),
    /// and its pipeline stage.
    pub switch: Option<String>,
    pub stage: Option<Stage>,
    /// Overrides (`key`, Python-literal value) that make a small, fast instance of this
    /// component, e.g. a shallow and narrow network: the conformance suite trains it on every
    /// dataset. Empty: the defaults are small enough.
    pub small: Vec<(String, String)>,
}

impl ComponentInfo {
    pub fn new(kind: Kind, name: &str, description: &str) -> Self {
        ComponentInfo {
            name: name.into(),
            kind,
            description: description.into(),
            papers: Vec::new(),
            keys: Vec::new(),
            switch: None,
            stage: None,
            small: Vec::new(),
        }
    }
    pub fn papers(mut self, papers: &[&str]) -> Self {
        self.papers = papers.iter().map(|s| s.to_string()).collect();
        self
    }
    pub fn keys(mut self, keys: Vec<KeyDecl>) -> Self {
        self.keys = keys;
        self
    }
    /// See [`ComponentInfo::small`].
    pub fn small(mut self, overrides: &[(&str, &str)]) -> Self {
        self.small = overrides
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self
    }
    pub fn switched_by(mut self, key: &str, stage: Stage) -> Self {
        self.switch = Some(key.into());
        self.stage = Some(stage);
        self
    }
}

/// A tensor owned by a model or optimizer, under the name PyTorch gives it in a state dict.
#[derive(Debug)]
pub struct NamedTensor {
    pub name: String,
    pub tensor: Tensor,
    /// `true` for parameters the optimizer updates, `false` for buffers (BN running stats).
    pub trainable: bool,
}

impl Clone for NamedTensor {
    fn clone(&self) -> Self {
        NamedTensor {
            name: self.name.clone(),
            tensor: self.tensor.shallow_clone(),
            trainable: self.trainable,
        }
    }
}

// ---------------------------------------------------------------- models

/// What a model is built for: the dataset's geometry and the device.
#[derive(Clone, Copy, Debug)]
pub struct ModelContext {
    pub n_channels: i64,
    pub image_size: i64,
    pub n_classes: i64,
    pub device: Device,
}

pub trait ModelFactory: Sync + 'static {
    fn info(&self) -> ComponentInfo;
    fn build(&self, config: &ConfigView, ctx: &ModelContext) -> Result<Box<dyn Model>>;
}

/// A network. Its tensors are shared with the host, which updates them in place.
pub trait Model: Send {
    /// # Shapes
    /// `images`: N x C x H x W float; returns logits N x n_classes.
    fn forward(&mut self, images: &Tensor, train: bool) -> Result<Tensor>;
    /// Parameters and buffers, in the reference's state-dict order and names.
    fn tensors(&self) -> Vec<NamedTensor>;
    /// A few lines for `--dry-run` (architecture, blocks per stage, ...).
    fn summary(&self) -> String {
        String::new()
    }
}

// ---------------------------------------------------------------- augmentations

/// The dataset's geometry and statistics, for augmentations.
#[derive(Clone, Debug)]
pub struct DataContext {
    pub n_channels: i64,
    pub image_size: i64,
    pub n_classes: i64,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    pub device: Device,
}

/// A training batch on the training device.
#[derive(Debug)]
pub struct Batch {
    /// `views * N` x C x H x W float (several views of the same N samples are stacked along
    /// the batch dimension, view-major, as Dual-Cutout needs).
    pub images: Tensor,
    /// N x n_classes soft targets (one-hot before any mixing), float.
    pub targets: Tensor,
    pub views: u32,
}

pub trait AugmentationFactory: Sync + 'static {
    fn info(&self) -> ComponentInfo;
    fn build(&self, config: &ConfigView, ctx: &DataContext) -> Result<Box<dyn Augmentation>>;
}

pub trait Augmentation: Send {
    /// Transforms a batch. All randomness comes from `seed` (see [`crate::rng::step_rng`]).
    fn apply(&mut self, batch: Batch, seed: u64) -> Result<Batch>;
    /// A training loss replacing soft-target cross-entropy (Dual-Cutout's consistency term).
    /// `logits`: `views * N` x classes.
    fn loss(&self, _logits: &Tensor, _targets: &Tensor, _views: u32) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

// ---------------------------------------------------------------- per-image stages

/// One decoded training image, uint8, `channels x height x width` row-major (planar: the
/// loader's sample layout, CIFAR's and torchvision's tensor layout), 1 or 3 channels.
#[derive(Debug)]
pub struct ImageMut<'a> {
    pub data: &'a mut [u8],
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl ImageMut<'_> {
    /// Pixels per channel.
    pub fn plane(&self) -> usize {
        self.height * self.width
    }
}

/// Builds a per-image stage ([`Stage::Image`]); registered with
/// `register!(image_stage: ...)`. Its [`ComponentInfo`] is an augmentation switched by a key
/// in [`Stage::Image`].
pub trait ImageStageFactory: Sync + 'static {
    fn info(&self) -> ComponentInfo;
    fn build(&self, config: &ConfigView, ctx: &DataContext) -> Result<Box<dyn ImageStage>>;
}

/// A per-image CPU transform run by the data loader's worker threads (several at once, hence
/// `Sync` and `&self`), on each training image before batching, in place (the image keeps its
/// size). It must not call into libtorch (the workers never do: a second OpenMP team would
/// compete with the training thread's). All randomness comes from `seed`, which the host
/// derives from (train.seed, epoch, sample index, stage), so runs and resumed runs are
/// reproducible for any `num_workers`.
pub trait ImageStage: Send + Sync {
    fn apply(&self, image: ImageMut<'_>, seed: u64) -> Result<()>;
}

// ---------------------------------------------------------------- optimizers

/// Parameters sharing hyper-parameters (PyTorch's param groups).
#[derive(Debug)]
pub struct ParamGroup {
    pub weight_decay: f64,
    pub params: Vec<NamedTensor>,
}

pub trait OptimizerFactory: Sync + 'static {
    fn info(&self) -> ComponentInfo;
    fn build(&self, config: &ConfigView, groups: Vec<ParamGroup>) -> Result<Box<dyn Optimizer>>;
}

/// A live optimizer.
///
/// # The parameter contract (between models and optimizers)
/// The tensors in the [`ParamGroup`]s are shallow clones of the model's own parameters: the
/// same tensor objects, so every update an optimizer makes in place reaches the model.
///
/// - An optimizer may move a parameter's storage elsewhere (`Tensor::set_data`) **only while it
///   is built** ([`OptimizerFactory::build`]), keeping every value exactly; baseline's `sgd`
///   does, moving all parameters into one flat buffer so that a step is a few kernels over one
///   tensor. After `build`, steps update the storage in place and never replace it.
/// - Re-homing keeps the parameter *objects* valid, but not tensors derived from a parameter
///   before the optimizer was built: a view, `narrow`, `reshape` or `detach` a model keeps in a
///   field still points at the old storage and stops training (under `sgd` only, which makes the
///   bug easy to miss). So a model keeps its parameters themselves (or shallow clones) and
///   derives views inside `forward`, or after the optimizer is built.
///
/// `tests/plugin_abi.rs` checks every optimizer against this: values kept across `build`, a
/// view taken after `build` follows every step, storage unchanged by steps, and a view taken
/// before `build` going stale exactly when `build` re-homed the parameter.
pub trait Optimizer: Send {
    /// Updates every parameter in place from its `.grad()`, with learning rate `lr`.
    fn step(&mut self, lr: f64) -> Result<()>;
    /// Everything needed to resume exactly (momentum buffers, step counts), as named tensors.
    fn state(&self) -> Vec<NamedTensor>;
    fn load_state(&mut self, state: Vec<NamedTensor>) -> Result<()>;
}

// ---------------------------------------------------------------- schedulers

#[derive(Clone, Copy, Debug)]
pub struct ScheduleContext {
    pub steps_per_epoch: u64,
    /// Epochs this schedule covers (the main phase, after any warmup).
    pub epochs: u64,
}

pub trait SchedulerFactory: Sync + 'static {
    fn info(&self) -> ComponentInfo;
    fn build(&self, config: &ConfigView, ctx: &ScheduleContext) -> Result<Box<dyn Scheduler>>;
}

/// The learning-rate factor (multiplied by `train.base_lr`) as a pure function of the step.
pub trait Scheduler: Send {
    /// `step` counts iterations from 0 within this schedule.
    fn factor(&self, step: u64) -> f64;
}

// ---------------------------------------------------------------- training steps

/// What a training step is built for.
#[derive(Clone, Copy, Debug)]
pub struct StepBuildContext {
    pub device: Device,
}

pub trait StepFactory: Sync + 'static {
    fn info(&self) -> ComponentInfo;
    fn build(&self, config: &ConfigView, ctx: &StepBuildContext) -> Result<Box<dyn TrainingStep>>;
}

/// Where the current step stands, as the host tells a [`TrainingStep`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepContext {
    /// The learning rate the optimizer will step with.
    pub lr: f64,
    /// Optimizer steps done before this one.
    pub global_step: u64,
    /// What a pass's gradients are multiplied by, relative to the gradient of the batch's mean
    /// loss: the loss scale (float16 `train.precision` O1/O2, else 1) times
    /// `train.subdivision` (chunk gradients are summed; exact for equal chunks). A positive
    /// constant within a step, so methods that only need a gradient's direction may ignore it.
    pub gradient_scale: f64,
    /// Data-parallel ranks. A pass's gradients are this rank's own; the host averages them
    /// across ranks once, after the hook returns.
    pub world_size: u64,
}

/// The host's side of one training step, lent to a [`TrainingStep`] for the duration of
/// [`TrainingStep::step`].
pub trait StepHost {
    /// Runs forward, loss and backward on the current batch (every view and
    /// `train.subdivision` chunk, under the precision policy), at the parameters' current
    /// values. The gradients it leaves in each trainable tensor's `.grad()` *replace* those of
    /// any earlier pass (see [`StepContext::gradient_scale`] for their scale). With
    /// `keep_buffers` the model's buffers (BatchNorm running statistics) are restored after
    /// the pass, so it does not count as a second update of them. Returns the pass's mean loss.
    fn forward_backward(&mut self, keep_buffers: bool) -> Result<f64>;
    /// The model's tensors (parameters with `trainable`, buffers without), shared with the
    /// host: in-place changes reach the model.
    fn tensors(&self) -> Result<Vec<NamedTensor>>;
    fn context(&self) -> StepContext;
}

/// A training-step hook: how one optimisation step obtains its gradients, for methods that
/// need more than one forward/backward per step (SAM). The plain step is the host's:
/// one [`StepHost::forward_backward`].
///
/// # The contract
/// [`step`](TrainingStep::step) calls [`StepHost::forward_backward`] at least once and returns
/// with every parameter holding the value it had on entry and each `.grad()` holding the
/// gradient the optimizer should step with. The host then reduces the gradients across ranks,
/// unscales and checks them, clips them and runs the optimizer (once per step, whatever the
/// hook did); the hook never steps the optimizer itself. The metrics of the step (loss,
/// accuracy) are those of the first pass.
pub trait TrainingStep: Send {
    fn step(&mut self, host: &mut dyn StepHost) -> Result<()>;
    /// Everything needed to resume exactly, saved in checkpoints (none for SAM).
    fn state(&self) -> Vec<NamedTensor> {
        Vec::new()
    }
    fn load_state(&mut self, _state: Vec<NamedTensor>) -> Result<()> {
        Ok(())
    }
}

/// One registered factory; plugins submit these with [`crate::register!`].
pub enum Registration {
    Model(&'static dyn ModelFactory),
    Augmentation(&'static dyn AugmentationFactory),
    Optimizer(&'static dyn OptimizerFactory),
    Scheduler(&'static dyn SchedulerFactory),
    /// ABI 0.1.2.
    Step(&'static dyn StepFactory),
    /// An augmentation of [`Stage::Image`] (ABI 0.1.2).
    ImageStage(&'static dyn ImageStageFactory),
}

impl Registration {
    pub fn info(&self) -> ComponentInfo {
        match self {
            Registration::Model(f) => f.info(),
            Registration::Augmentation(f) => f.info(),
            Registration::Optimizer(f) => f.info(),
            Registration::Scheduler(f) => f.info(),
            Registration::Step(f) => f.info(),
            Registration::ImageStage(f) => f.info(),
        }
    }
}

inventory::collect!(Registration);

/// All factories registered in this binary (the plugin's own; each cdylib has its own list),
/// sorted by kind and name.
pub fn registrations() -> Vec<&'static Registration> {
    let mut all: Vec<&'static Registration> = inventory::iter::<Registration>.into_iter().collect();
    all.sort_by_key(|r| {
        let i = r.info();
        (i.kind, i.name)
    });
    all
}

/// Registers a factory (a unit struct value implementing one of the factory traits).
///
/// ```text
/// imgclf_plugin_api::register!(model: model::ResNetPreact);
/// imgclf_plugin_api::register!(optimizer: sgd::Sgd);
/// imgclf_plugin_api::register!(step: sam::SamFactory);
/// imgclf_plugin_api::register!(image_stage: randaugment::RandAugmentFactory);
/// ```
#[macro_export]
macro_rules! register {
    (model: $f:expr) => {
        $crate::inventory::submit! { $crate::Registration::Model(&$f) }
    };
    (augmentation: $f:expr) => {
        $crate::inventory::submit! { $crate::Registration::Augmentation(&$f) }
    };
    (optimizer: $f:expr) => {
        $crate::inventory::submit! { $crate::Registration::Optimizer(&$f) }
    };
    (scheduler: $f:expr) => {
        $crate::inventory::submit! { $crate::Registration::Scheduler(&$f) }
    };
    (step: $f:expr) => {
        $crate::inventory::submit! { $crate::Registration::Step(&$f) }
    };
    (image_stage: $f:expr) => {
        $crate::inventory::submit! { $crate::Registration::ImageStage(&$f) }
    };
}
