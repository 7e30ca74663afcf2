//! `imgclf train`: the reference's training loop (hysts/pytorch_image_classification
//! `train.py`) on plugin components, with exact resume.

pub mod checkpoint;
pub mod data;
pub mod metrics;

use crate::config::Config;
use crate::datasets::{ImageSet, Split};
use crate::registry::Registry;
use crate::setup::{setup, Purpose, Request, Setup};
use anyhow::{bail, Context, Result};
use checkpoint::Position;
use imgclf_plugin_api::ffi::{HostAugmentation, HostModel, HostOptimizer, HostScheduler};
use imgclf_plugin_api::rng::mix_seed;
use imgclf_plugin_api::{
    Batch, DataContext, ModelContext, NamedTensor, ParamGroup, ScheduleContext, Stage,
};
use metrics::{topk_accuracy, topk_accuracy_labels, Meter, MetricsFile};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Salts that separate the random streams derived from `train.seed`.
const MODEL_STREAM: u64 = 0x4d4f_4445_4c00;
const SPLIT_STREAM: u64 = 0x5350_4c49_5400;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[derive(Clone, Debug, Default)]
pub struct TrainArgs {
    pub dry_run: bool,
    pub resume: Option<PathBuf>,
}

pub fn device_of(config: &Config) -> Result<Device> {
    Ok(match config.str("device") {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => bail!("device '{other}' is not one of 'cuda', 'cpu'"),
    })
}

/// Builds the configured model from its plugin.
pub fn build_model(registry: &Registry, s: &Setup, device: Device) -> Result<HostModel> {
    let ctx = ModelContext {
        n_channels: s.config.int("dataset.n_channels"),
        image_size: s.config.int("dataset.image_size"),
        n_classes: s.config.int("dataset.n_classes"),
        device,
    };
    Ok(registry.plugin(&s.model).create_model(
        &s.model.info.name,
        &s.config.section_json(""),
        &ctx,
    )?)
}

pub fn parameter_count(tensors: &[NamedTensor]) -> i64 {
    tensors
        .iter()
        .filter(|t| t.trainable)
        .map(|t| t.tensor.numel() as i64)
        .sum()
}

/// `(x / 255 - mean) / std` per channel, as one multiply-add.
pub struct Normalizer {
    scale: Tensor,
    shift: Tensor,
}

impl Normalizer {
    pub fn new(mean: &[f64], std: &[f64], device: Device) -> Self {
        let c = mean.len() as i64;
        let scale: Vec<f32> = std.iter().map(|s| (1.0 / (255.0 * s)) as f32).collect();
        let shift: Vec<f32> = mean.iter().zip(std).map(|(m, s)| (-m / s) as f32).collect();
        Normalizer {
            scale: Tensor::from_slice(&scale)
                .view([1, c, 1, 1])
                .to_device(device),
            shift: Tensor::from_slice(&shift)
                .view([1, c, 1, 1])
                .to_device(device),
        }
    }
    /// uint8 or float pixels in [0, 255] -> normalised float.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        x.to_kind(Kind::Float) * &self.scale + &self.shift
    }
}

/// Validation/test pass: mean cross-entropy, top-1 and top-5 accuracy.
pub fn evaluate_set(
    model: &mut HostModel,
    set: &ImageSet,
    batch_size: usize,
    norm: &Normalizer,
    device: Device,
) -> Result<Meter> {
    let mut meter = Meter::default();
    let indices: Vec<usize> = (0..set.len()).collect();
    tch::no_grad(|| -> Result<()> {
        for chunk in indices.chunks(batch_size.max(1)) {
            let (images, labels) = data::gather(set, chunk);
            let labels = labels.to_device(device);
            let logits = model.forward(&norm.apply(&images.to_device(device)), false)?;
            let loss = logits.cross_entropy_for_logits(&labels).double_value(&[]);
            let (a1, a5) = topk_accuracy_labels(&logits, &labels);
            meter.update(chunk.len(), loss, a1, a5);
        }
        Ok(())
    })?;
    Ok(meter)
}

/// The learning-rate factor of every iteration: optional warmup, then the main schedule, as
/// the reference's `CombinedScheduler` composes them (an iteration on a boundary belongs to
/// the earlier segment).
pub struct LrSchedule {
    pub base_lr: f64,
    warmup_steps: u64,
    warmup_kind: String,
    start_factor: f64,
    exponent: f64,
    main: HostScheduler,
}

impl LrSchedule {
    pub fn lr(&self, step: u64) -> Result<f64> {
        if self.warmup_steps > 0 && step <= self.warmup_steps {
            let t = step as f64 / self.warmup_steps as f64;
            let f = match self.warmup_kind.as_str() {
                "linear" => self.start_factor + (1.0 - self.start_factor) * t,
                // The reference multiplies by base_lr twice here; we use the intended factor.
                _ => self.start_factor + (1.0 - self.start_factor) * t.powf(self.exponent),
            };
            return Ok(self.base_lr * f);
        }
        Ok(self.base_lr * self.main.factor(step - self.warmup_steps)?)
    }
}

pub fn build_schedule(registry: &Registry, s: &Setup, steps_per_epoch: u64) -> Result<LrSchedule> {
    let c = &s.config;
    let epochs = c.int("scheduler.epochs");
    let kind = c.str("scheduler.warmup.type").to_string();
    let warmup_epochs = if kind == "none" {
        0
    } else {
        c.int("scheduler.warmup.epochs")
    };
    if epochs < 1 || warmup_epochs < 0 || warmup_epochs > epochs {
        bail!("scheduler.epochs ({epochs}) must be >= 1 and scheduler.warmup.epochs ({warmup_epochs}) within it");
    }
    let entry = s
        .scheduler
        .as_ref()
        .expect("training setup has a scheduler");
    let ctx = ScheduleContext {
        steps_per_epoch,
        epochs: (epochs - warmup_epochs) as u64,
    };
    let main =
        registry
            .plugin(entry)
            .create_scheduler(&entry.info.name, &c.section_json(""), &ctx)?;
    Ok(LrSchedule {
        base_lr: c.float("train.base_lr"),
        warmup_steps: warmup_epochs as u64 * steps_per_epoch,
        warmup_kind: kind,
        start_factor: c.float("scheduler.warmup.start_factor"),
        exponent: c.float("scheduler.warmup.exponent"),
        main,
    })
}

/// Parameter groups: all parameters with `train.weight_decay`, or, with
/// `train.no_weight_decay_on_bn`, BatchNorm's weight and bias (parameters whose module has a
/// `running_mean`) without weight decay.
pub fn param_groups(tensors: &[NamedTensor], config: &Config) -> Vec<ParamGroup> {
    let wd = config.float("train.weight_decay");
    let params: Vec<NamedTensor> = tensors.iter().filter(|t| t.trainable).cloned().collect();
    if !config.bool("train.no_weight_decay_on_bn") {
        return vec![ParamGroup {
            weight_decay: wd,
            params,
        }];
    }
    let norm_modules: std::collections::HashSet<&str> = tensors
        .iter()
        .filter_map(|t| t.name.strip_suffix(".running_mean"))
        .collect();
    let (bn, rest): (Vec<_>, Vec<_>) = params.into_iter().partition(|p| {
        p.name
            .rsplit_once('.')
            .is_some_and(|(m, _)| norm_modules.contains(m))
    });
    vec![
        ParamGroup {
            weight_decay: wd,
            params: rest,
        },
        ParamGroup {
            weight_decay: 0.0,
            params: bn,
        },
    ]
}

/// The training input pipeline: the enabled augmentations in stage order around the host's
/// normalisation (validation never goes through it).
pub struct Pipeline {
    augmentations: Vec<(Stage, HostAugmentation)>,
    pub norm: Normalizer,
    /// Whether any augmentation changes the targets (then the loss uses soft targets).
    soft_targets: bool,
    n_classes: i64,
}

/// Builds every enabled augmentation (this is where their config checks run).
pub fn build_pipeline(registry: &Registry, s: &Setup, device: Device) -> Result<Pipeline> {
    let c = &s.config;
    let data_ctx = DataContext {
        n_channels: c.int("dataset.n_channels"),
        image_size: c.int("dataset.image_size"),
        n_classes: c.int("dataset.n_classes"),
        mean: s.dataset.mean.to_vec(),
        std: s.dataset.std.to_vec(),
        device,
    };
    let mut augmentations = Vec::new();
    for e in &s.augmentations {
        let aug =
            registry
                .plugin(e)
                .create_augmentation(&e.info.name, &c.section_json(""), &data_ctx)?;
        augmentations.push((e.info.stage.unwrap_or(Stage::Erase), aug));
    }
    let soft_targets = augmentations
        .iter()
        .any(|(st, _)| matches!(st, Stage::Mix | Stage::Target));
    Ok(Pipeline {
        augmentations,
        norm: Normalizer::new(s.dataset.mean, s.dataset.std, device),
        soft_targets,
        n_classes: data_ctx.n_classes,
    })
}

/// One training batch after the pipeline.
pub struct Prepared {
    /// `views * N` normalised images, view-major.
    pub images: Tensor,
    pub labels: Tensor,
    /// Targets after mixing, for accuracy (`None` when no augmentation changes targets).
    pub mix_targets: Option<Tensor>,
    /// Targets after target transforms (one-hot when nothing changed them), for the loss.
    pub loss_targets: Tensor,
    pub views: u32,
}

impl Pipeline {
    /// Runs the pipeline on uint8 `images` and int64 `labels` on the training device, with the
    /// randomness of (`seed`, `epoch`, `step`).
    pub fn prepare(
        &mut self,
        images: Tensor,
        labels: Tensor,
        seed: u64,
        epoch: u64,
        step: u64,
    ) -> Result<Prepared> {
        let targets = labels.one_hot(self.n_classes).to_kind(Kind::Float);
        let mut batch = Batch {
            images: images.to_kind(Kind::Float),
            targets,
            views: 1,
        };
        let mut mix_targets = None;
        let mut normalised = false;
        for (i, (stage, aug)) in self.augmentations.iter_mut().enumerate() {
            if *stage != Stage::Geometric && !normalised {
                batch.images = self.norm.apply(&batch.images);
                normalised = true;
            }
            if *stage == Stage::Target && mix_targets.is_none() {
                mix_targets = Some(batch.targets.shallow_clone());
            }
            batch = aug.apply(batch, mix_seed(&[seed, epoch, step, i as u64 + 1]))?;
        }
        if !normalised {
            batch.images = self.norm.apply(&batch.images);
        }
        let mix_targets = mix_targets.unwrap_or_else(|| batch.targets.shallow_clone());
        Ok(Prepared {
            images: batch.images,
            labels,
            mix_targets: self.soft_targets.then_some(mix_targets),
            loss_targets: batch.targets,
            views: batch.views,
        })
    }
}

fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Tensor {
    -(logits.log_softmax(1, Kind::Float) * targets)
        .sum_dim_intlist(1, false, Kind::Float)
        .mean(Kind::Float)
}

struct Trainer<'a> {
    config: &'a Config,
    device: Device,
    model: HostModel,
    tensors: Vec<NamedTensor>,
    optimizer: HostOptimizer,
    schedule: LrSchedule,
    pipeline: Pipeline,
    seed: u64,
    out: PathBuf,
    metrics: MetricsFile,
    start: Instant,
}

impl Trainer<'_> {
    fn zero_grad(&mut self) {
        for t in self.tensors.iter_mut().filter(|t| t.trainable) {
            t.tensor.zero_grad();
        }
    }

    fn clip_and_scale_grads(&self, clip: f64, subdivision: i64) -> Result<()> {
        if clip <= 0.0 && subdivision <= 1 {
            return Ok(()); // the common case: nothing to do, skip collecting the gradients
        }
        tch::no_grad(|| -> Result<()> {
            let grads: Vec<Tensor> = self
                .tensors
                .iter()
                .filter(|t| t.trainable)
                .map(|t| t.tensor.grad())
                .filter(|g| g.defined())
                .collect();
            if clip > 0.0 && !grads.is_empty() {
                let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
                let total = Tensor::stack(&norms, 0).norm();
                let coef = (clip / (total + 1e-6)).clamp_max(1.0);
                for g in &grads {
                    let _ = g.shallow_clone().f_mul_(&coef)?;
                }
            }
            if subdivision > 1 {
                for g in &grads {
                    let _ = g.shallow_clone().f_div_scalar_(subdivision as f64)?;
                }
            }
            Ok(())
        })
    }

    /// One optimisation step; returns (loss, acc1, acc5, lr).
    fn step(
        &mut self,
        p: Prepared,
        epoch: u64,
        step: u64,
        global_step: u64,
    ) -> Result<(f64, f64, f64, f64)> {
        tch::manual_seed(mix_seed(&[self.seed, MODEL_STREAM, epoch, step]) as i64 & i64::MAX);
        self.zero_grad();
        let subdivision = self.config.int("train.subdivision").max(1);
        let views = p.views.max(1) as i64;
        let n = p.labels.size()[0];
        let image_chunks = p.images.chunk(views, 0);
        let mut view_logits: Vec<Vec<Tensor>> = (0..views).map(|_| Vec::new()).collect();
        let mut losses = Vec::new();
        let row_chunks: Vec<(i64, i64)> = {
            let size = (n + subdivision - 1) / subdivision;
            (0..subdivision)
                .map(|i| (i * size, ((i + 1) * size).min(n) - i * size))
                .filter(|(_, l)| *l > 0)
                .collect()
        };
        for &(start, len) in &row_chunks {
            let mut logits_v = Vec::new();
            for view in &image_chunks {
                logits_v.push(self.model.forward(&view.narrow(0, start, len), true)?);
            }
            let logits = Tensor::cat(&logits_v, 0);
            // An augmentation's own loss (Dual-Cutout) replaces cross-entropy; it always sees
            // the targets, one-hot when nothing changed them.
            let t = p.loss_targets.narrow(0, start, len);
            let mut custom = None;
            for (_, aug) in &self.pipeline.augmentations {
                if let Some(l) = aug.loss(&logits, &t, views as u32)? {
                    custom = Some(l);
                }
            }
            if custom.is_none() && self.pipeline.soft_targets {
                let per_view: Vec<Tensor> =
                    logits_v.iter().map(|l| soft_cross_entropy(l, &t)).collect();
                custom = Some(Tensor::stack(&per_view, 0).mean(Kind::Float));
            }
            let loss = match custom {
                Some(l) => l,
                None => {
                    let labels = p.labels.narrow(0, start, len);
                    let per_view: Vec<Tensor> = logits_v
                        .iter()
                        .map(|l| l.cross_entropy_for_logits(&labels))
                        .collect();
                    if per_view.len() == 1 {
                        per_view.into_iter().next().unwrap()
                    } else {
                        Tensor::stack(&per_view, 0).mean(Kind::Float)
                    }
                }
            };
            loss.backward();
            losses.push(loss.detach());
            for (v, l) in logits_v.into_iter().enumerate() {
                view_logits[v].push(l.detach());
            }
        }
        self.clip_and_scale_grads(self.config.float("train.gradient_clip"), subdivision)?;
        let lr = self.schedule.lr(global_step)?;
        self.optimizer.step(lr)?;
        // Metrics on the views' mean logits.
        let per_view: Vec<Tensor> = view_logits.iter().map(|v| Tensor::cat(v, 0)).collect();
        let logits = Tensor::stack(&per_view, 0).mean_dim(0, false, Kind::Float);
        let (a1, a5) = match &p.mix_targets {
            Some(t) => topk_accuracy(&logits, t),
            None => topk_accuracy_labels(&logits, &p.labels),
        };
        let loss = Tensor::stack(&losses, 0)
            .mean(Kind::Float)
            .double_value(&[]);
        if !loss.is_finite() {
            bail!("the training loss became {loss} at epoch {} step {} (lr {lr}); lower train.base_lr or check the data", epoch + 1, step + 1);
        }
        Ok((loss, a1, a5, lr))
    }

    fn checkpoint(&self, pos: &Position) -> Result<PathBuf> {
        let opt_state = self.optimizer.state()?;
        checkpoint::save(&self.out, pos, &self.tensors, &opt_state)
    }

    fn validate(&mut self, val: &ImageSet, epoch: u64, global_step: u64, lr: f64) -> Result<()> {
        let t0 = Instant::now();
        let bs = self.config.int("validation.batch_size") as usize;
        let m = evaluate_set(&mut self.model, val, bs, &self.pipeline.norm, self.device)?;
        let secs = t0.elapsed().as_secs_f64();
        tracing::info!(
            "Val {epoch}: loss {:.4} acc@1 {:.4} acc@5 {:.4} ({} images, {:.1}s)",
            m.loss(),
            m.acc1(),
            m.acc5(),
            val.len(),
            secs
        );
        self.metrics.record(
            epoch,
            global_step,
            "val",
            &m,
            lr,
            val.len() as f64 / secs.max(1e-9),
            self.start.elapsed().as_secs_f64(),
        )
    }
}

fn describe_components(s: &Setup, registry: &Registry) -> String {
    let name = |e: &crate::registry::Entry| {
        format!(
            "{} ({} {})",
            e.info.name,
            registry.plugin(e).name,
            registry.plugin(e).version
        )
    };
    let mut lines = vec![format!("model: {}", name(&s.model))];
    if let Some(o) = &s.optimizer {
        lines.push(format!("optimizer: {}", name(o)));
    }
    if let Some(sc) = &s.scheduler {
        lines.push(format!("scheduler: {}", name(sc)));
    }
    let augs: Vec<String> = s.augmentations.iter().map(name).collect();
    lines.push(format!(
        "augmentations: {}",
        if augs.is_empty() {
            "none".into()
        } else {
            augs.join(", ")
        }
    ));
    lines.join("\n")
}

/// Train and validation sets as the reference splits them.
fn load_data(s: &Setup) -> Result<(ImageSet, ImageSet)> {
    let c = &s.config;
    let train = s.dataset.load(&s.dataset_dir, Split::Train)?;
    if c.bool("train.use_test_as_val") {
        return Ok((train, s.dataset.load(&s.dataset_dir, Split::Test)?));
    }
    let ratio = c.float("train.val_ratio");
    if !(0.0..1.0).contains(&ratio) || ratio == 0.0 {
        bail!("train.use_test_as_val is False, so train.val_ratio must be in (0, 1) (e.g. 0.1), got {ratio}");
    }
    let val_n = (train.len() as f64 * ratio) as usize;
    let order = data::epoch_order(train.len(), c.int("train.seed") as u64, SPLIT_STREAM);
    let (val_idx, train_idx) = order.split_at(val_n);
    let pick = |idx: &[usize]| {
        let (images, labels) = data::gather(&train, idx);
        ImageSet {
            images: Vec::<u8>::try_from(&images.flatten(0, -1)).unwrap_or_default(),
            labels: Vec::<i64>::try_from(&labels).unwrap_or_default(),
            channels: train.channels,
            height: train.height,
            width: train.width,
        }
    };
    Ok((pick(train_idx), pick(val_idx)))
}

pub fn run(registry: &Registry, request: &Request, args: &TrainArgs) -> Result<()> {
    let mut request = request.clone();
    if let Some(dir) = &args.resume {
        request.resume_config = Some(dir.join("config.yaml"));
    }
    let s = setup(registry, &request, Purpose::Train)?;
    let c = &s.config;
    let device = device_of(c)?;
    tch::manual_seed(c.int("train.seed"));
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(c.bool("cudnn.benchmark"));
    }
    let model = build_model(registry, &s, device)?;
    let tensors = model.tensors()?;
    let out = args
        .resume
        .clone()
        .unwrap_or_else(|| PathBuf::from(c.str("train.output_dir")));
    // Building the optimizer and the schedule runs their config checks (betas, Nesterov without
    // momentum, SGDR cycles that must fill the schedule) before anything is loaded or written.
    let opt_entry = s
        .optimizer
        .as_ref()
        .expect("training setup has an optimizer");
    let optimizer = registry.plugin(opt_entry).create_optimizer(
        &opt_entry.info.name,
        &c.section_json(""),
        param_groups(&tensors, c),
    )?;
    build_schedule(registry, &s, 1)?;

    if args.dry_run {
        // Building the augmentations runs their config checks (impossible combinations).
        build_pipeline(registry, &s, device)?;
        println!("# effective config\n{}", c.to_yaml());
        println!("{}", describe_components(&s, registry));
        println!("  {}", model.summary());
        println!("parameters: {}", parameter_count(&tensors));
        println!("device: {device:?}");
        let found = |split| match s.dataset.locate(&s.dataset_dir, split) {
            Ok(files) => format!(
                "found ({})",
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Err(e) => format!("NOT FOUND: {e}"),
        };
        println!("dataset: {} at {}", s.dataset.name, s.dataset_dir.display());
        println!("  train: {}", found(Split::Train));
        println!("  test: {}", found(Split::Test));
        println!(
            "output: {}{}",
            out.display(),
            if out.exists() && args.resume.is_none() {
                " (exists: training would refuse it)"
            } else {
                ""
            }
        );
        return Ok(());
    }

    // Output directory.
    if args.resume.is_none() {
        if out.exists() {
            bail!(
                "output directory {} already exists; choose another train.output_dir or continue it with --resume {}",
                out.display(),
                out.display()
            );
        }
        std::fs::create_dir_all(&out)
            .with_context(|| format!("cannot create {}", out.display()))?;
        crate::io::write_atomic(&out.join("config.yaml"), c.to_yaml().as_bytes())?;
        crate::io::write_atomic(
            &out.join("env.yaml"),
            crate::envinfo::to_yaml(&crate::envinfo::collect()).as_bytes(),
        )?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join("log.txt"))?;
    crate::logging::log_to_file(log);
    tracing::info!(
        "imgclf {} training in {}",
        env!("CARGO_PKG_VERSION"),
        out.display()
    );
    tracing::info!("{}", describe_components(&s, registry).replace('\n', "; "));
    tracing::info!(
        "{}; parameters: {}; device {device:?}",
        model.summary(),
        parameter_count(&tensors)
    );

    // Data.
    let (train_set, val_set) = load_data(&s)?;
    let train_set = Arc::new(train_set);
    let batch_size = c.int("train.batch_size") as usize;
    if batch_size == 0 {
        bail!("train.batch_size must be >= 1");
    }
    let steps_per_epoch = data::batches_per_epoch(
        train_set.len(),
        batch_size,
        c.bool("train.dataloader.drop_last"),
    );
    if steps_per_epoch == 0 {
        bail!(
            "the training set has {} images, fewer than one batch of train.batch_size {batch_size} with drop_last; lower the batch size",
            train_set.len()
        );
    }
    tracing::info!(
        "train: {} images, {steps_per_epoch} steps/epoch; val: {} images",
        train_set.len(),
        val_set.len()
    );

    // Components.
    let schedule = build_schedule(registry, &s, steps_per_epoch as u64)?;
    let pipeline = build_pipeline(registry, &s, device)?;

    let metrics = MetricsFile::new(&out);
    let mut trainer = Trainer {
        config: c,
        device,
        model,
        tensors,
        optimizer,
        schedule,
        pipeline,
        seed: c.int("train.seed") as u64,
        out: out.clone(),
        metrics,
        start: Instant::now(),
    };

    // Initial weights or resume.
    let mut pos = Position {
        epoch: c.int("train.start_epoch") as u64,
        step_in_epoch: 0,
        global_step: 0,
    };
    pos.global_step = pos.epoch * steps_per_epoch as u64;
    let resumed = match &args.resume {
        Some(dir) => checkpoint::newest(dir)?,
        None => None,
    };
    if let Some((path, p)) = &resumed {
        let loaded = checkpoint::load(path)?;
        checkpoint::copy_into_model(&trainer.tensors, &loaded.model, path)?;
        trainer.optimizer.load_state(loaded.optimizer)?;
        pos = *p;
        trainer.metrics.truncate_after(pos.global_step)?;
        tracing::info!(
            "resumed from {} (epoch {}, step {})",
            path.display(),
            pos.epoch,
            pos.global_step
        );
    } else {
        if args.resume.is_some() {
            tracing::warn!(
                "no complete checkpoint in {}: starting from the beginning",
                out.display()
            );
            trainer.metrics.truncate_after(0)?;
        }
        let init = c.str("train.checkpoint");
        if !init.is_empty() {
            let path = Path::new(init);
            let loaded =
                checkpoint::load(path).with_context(|| format!("train.checkpoint = '{init}'"))?;
            checkpoint::copy_into_model(&trainer.tensors, &loaded.model, path)?;
            tracing::info!("initial weights from {init}");
        }
    }

    INTERRUPTED.store(false, Ordering::SeqCst);
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });

    let epochs = c.int("scheduler.epochs") as u64;
    let val_period = c.int("train.val_period");
    let log_period = c.int("train.log_period").max(1) as u64;
    let ckpt_period = c.int("train.checkpoint_period").max(1) as u64;
    let seed = trainer.seed;
    if val_period > 0 && pos.global_step == 0 && c.bool("train.val_first") {
        let lr = trainer.schedule.lr(0)?;
        trainer.validate(&val_set, 0, 0, lr)?;
    }
    while pos.epoch < epochs {
        let epoch = pos.epoch; // 0-based index of the epoch being trained
        let order = data::epoch_order(train_set.len(), seed, epoch);
        let rx = data::spawn_epoch(
            train_set.clone(),
            order,
            batch_size,
            steps_per_epoch,
            pos.step_in_epoch as usize,
        );
        let bar = indicatif::ProgressBar::new(steps_per_epoch as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("epoch {}/{epochs}", epoch + 1));
        bar.set_position(pos.step_in_epoch);
        crate::logging::set_progress_bar(Some(bar.clone()));
        tracing::info!("Train {} {}", epoch + 1, pos.global_step);
        let t0 = Instant::now();
        let mut meter = Meter::default();
        let mut lr = 0.0;
        for raw in rx {
            let step = raw.index as u64;
            let (images, labels) = raw.tensors();
            let (images, labels) = (images.to_device(device), labels.to_device(device));
            let p = trainer
                .pipeline
                .prepare(images, labels, seed, epoch, step)?;
            let n = p.labels.size()[0] as usize;
            let (loss, a1, a5, step_lr) = trainer.step(p, epoch, step, pos.global_step)?;
            lr = step_lr;
            meter.update(n, loss, a1, a5);
            pos.global_step += 1;
            pos.step_in_epoch = step + 1;
            bar.set_position(pos.step_in_epoch);
            bar.set_message(format!(
                "loss {:.4} acc@1 {:.4} lr {lr:.5}",
                meter.loss(),
                meter.acc1()
            ));
            let last = pos.step_in_epoch == steps_per_epoch as u64;
            if pos.step_in_epoch.is_multiple_of(log_period) || last {
                let secs = t0.elapsed().as_secs_f64();
                let ips = meter.n / secs.max(1e-9);
                tracing::info!(
                    "Epoch {} Step {}/{steps_per_epoch} lr {lr:.6} loss {loss:.4} ({:.4}) acc@1 {a1:.4} ({:.4}) acc@5 {a5:.4} ({:.4}) {ips:.0} img/s",
                    epoch + 1,
                    pos.step_in_epoch,
                    meter.loss(),
                    meter.acc1(),
                    meter.acc5()
                );
                trainer.metrics.record(
                    epoch + 1,
                    pos.global_step,
                    "train",
                    &meter,
                    lr,
                    ips,
                    trainer.start.elapsed().as_secs_f64(),
                )?;
            }
            if INTERRUPTED.load(Ordering::SeqCst) && !last {
                bar.finish_and_clear();
                crate::logging::set_progress_bar(None);
                let path = trainer.checkpoint(&pos)?;
                tracing::warn!(
                    "interrupted: saved {}; continue with `imgclf train --resume {}`",
                    path.display(),
                    out.display()
                );
                std::process::exit(130);
            }
        }
        bar.finish_and_clear();
        crate::logging::set_progress_bar(None);
        tracing::info!("Elapsed {:.2}s", t0.elapsed().as_secs_f64());
        pos.epoch += 1;
        pos.step_in_epoch = 0;
        if val_period > 0 && pos.epoch.is_multiple_of(val_period as u64) {
            trainer.validate(&val_set, pos.epoch, pos.global_step, lr)?;
        }
        if pos.epoch.is_multiple_of(ckpt_period)
            || pos.epoch == epochs
            || INTERRUPTED.load(Ordering::SeqCst)
        {
            let path = trainer.checkpoint(&pos)?;
            tracing::info!("saved {}", path.display());
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            tracing::warn!(
                "interrupted; continue with `imgclf train --resume {}`",
                out.display()
            );
            std::process::exit(130);
        }
    }
    let final_tensors: Vec<(String, Tensor)> = trainer
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.tensor.shallow_clone()))
        .collect();
    let path = out.join("model_final.safetensors");
    crate::io::save_safetensors(&path, &final_tensors, Default::default())?;
    tracing::info!(
        "saved {} (a PyTorch state dict: load_state_dict(safetensors.torch.load_file(...)))",
        path.display()
    );
    Ok(())
}
