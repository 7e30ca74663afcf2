//! `imgclf train`: the reference's training loop (hysts/pytorch_image_classification
//! `train.py`) on plugin components, with exact resume. `run` assembles the parts, each
//! behind a small interface in its own module, and hands them to the loop in [`fit`]:
//! [`precision`] (autocast and loss scaling), [`collective`] (ranks and gradient reduction),
//! [`sinks`] (log, progress bar, metrics files), [`checkpoint`] (what is saved and restored),
//! [`pipeline`] (augmentations), [`schedule`] (learning rate) and [`step`] (one update).

pub mod checkpoint;
pub mod collective;
pub mod data;
pub mod ema;
pub mod eval;
pub mod fit;
pub mod image_stage;
pub mod memory_format;
pub mod metrics;
pub mod pipeline;
pub mod precision;
pub mod resident;
pub mod schedule;
pub mod sinks;
pub mod step;
pub mod tensorboard_sink;
pub mod torchvision;

pub use eval::evaluate_set;
pub use pipeline::{build_pipeline, Normalizer, Pipeline, Prepared};
pub use schedule::{build_schedule, LrSchedule};

use crate::config::Config;
use crate::datasets::loader::{Loader, Samples};
use crate::datasets::{ImageSet, Split};
use crate::registry::Registry;
use crate::setup::{setup, Purpose, Request, Setup};
use anyhow::{bail, Context, Result};
use imgclf_plugin_api::ffi::{HostModel, HostStep};
use imgclf_plugin_api::{ModelContext, NamedTensor, ParamGroup};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tch::Device;

/// Salts that separate the random streams derived from `train.seed`.
const MODEL_STREAM: u64 = 0x4d4f_4445_4c00;
const SPLIT_STREAM: u64 = 0x5350_4c49_5400;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Asks a running training to stop at the next step, save a checkpoint and return
/// [`Interrupted`] (Ctrl-C). Returns whether a stop had already been requested.
pub fn request_interrupt() -> bool {
    INTERRUPTED.swap(true, Ordering::SeqCst)
}

fn interrupt_requested() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Training stopped on request after saving a checkpoint; `--resume` continues it.
#[derive(Debug, thiserror::Error)]
#[error("interrupted: saved {checkpoint}; continue with `imgclf train --resume {dir}`")]
pub struct Interrupted {
    pub checkpoint: String,
    pub dir: String,
}

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

/// Builds the `train.step` hook from its plugin (None: the plain step).
pub fn build_step_hook(registry: &Registry, s: &Setup, device: Device) -> Result<Option<HostStep>> {
    let Some(entry) = &s.step else {
        return Ok(None);
    };
    let ctx = imgclf_plugin_api::StepBuildContext { device };
    Ok(Some(registry.plugin(entry).create_step(
        &entry.info.name,
        &s.config.section_json(""),
        &ctx,
    )?))
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
    if let Some(st) = &s.step {
        lines.push(format!("step: {}", name(st)));
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

/// Train and validation splits with their loaders (`train.dataloader`,
/// `validation.dataloader`): image folders stream `train/` and `val/` as the reference's
/// ImageNet does; in-memory datasets split as [`load_sets`] does.
fn load_data(s: &Setup) -> Result<(Loader, Loader)> {
    let c = &s.config;
    let (train, val): (Arc<dyn Samples>, Arc<dyn Samples>) = if s.dataset.image_folder {
        (
            s.dataset.open(&s.dataset_dir, Split::Train, c)?,
            s.dataset.open(&s.dataset_dir, Split::Test, c)?,
        )
    } else {
        let (train, val) = load_sets(s)?;
        (Arc::new(train), Arc::new(val))
    };
    Ok((
        Loader::configured(train, c, "train.dataloader"),
        Loader::configured(val, c, "validation.dataloader"),
    ))
}

/// Train and validation sets of an in-memory dataset as the reference splits them.
fn load_sets(s: &Setup) -> Result<(ImageSet, ImageSet)> {
    let c = &s.config;
    crate::datasets::download::ensure(s.dataset, &s.dataset_dir, &[Split::Train, Split::Test])?;
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

/// What `--dry-run` prints: the effective config, the components, the model, where data and
/// outputs would be.
fn print_dry_run(s: &Setup, registry: &Registry, model: &HostModel, out: &Path, resume: bool) {
    let tensors = model.tensors().unwrap_or_default();
    println!("# effective config\n{}", s.config.to_yaml());
    println!("{}", describe_components(s, registry));
    println!("  {}", model.summary());
    println!("parameters: {}", parameter_count(&tensors));
    if let Ok(device) = device_of(&s.config) {
        println!("device: {device:?}");
    }
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
        if out.exists() && !resume {
            " (exists: training would refuse it)"
        } else {
            ""
        }
    );
}

/// Creates a new run's output directory with its `config.yaml` and `env.yaml`; a resumed run
/// keeps its own. Either way `log.txt` receives the log from here on.
fn prepare_output(out: &Path, config: &Config, resume: bool, registry: &Registry) -> Result<()> {
    if !resume {
        if out.exists() {
            bail!(
                "output directory {} already exists; choose another train.output_dir or continue it with --resume {}",
                out.display(),
                out.display()
            );
        }
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        crate::io::write_atomic(&out.join("config.yaml"), config.to_yaml().as_bytes())?;
        let mut env = crate::envinfo::collect();
        env["plugins"] = crate::provenance::record(registry)?;
        crate::io::write_atomic(
            &out.join("env.yaml"),
            crate::envinfo::to_yaml(&env).as_bytes(),
        )?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join("log.txt"))?;
    crate::logging::log_to_file(log);
    Ok(())
}

/// Ctrl-C once: stop at the next step with a checkpoint; twice: the default action (the
/// process ends at once).
fn install_interrupt_handler() {
    INTERRUPTED.store(false, Ordering::SeqCst);
    let _ = ctrlc::set_handler(|| {
        request_interrupt();
        // SAFETY: restoring the default disposition of SIGINT has no preconditions.
        unsafe {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
        }
    });
}

pub fn run(registry: &Registry, request: &Request, args: &TrainArgs) -> Result<()> {
    let mut request = request.clone();
    if let Some(dir) = &args.resume {
        request.resume_config = Some(dir.join("config.yaml"));
    }
    let s = setup(registry, &request, Purpose::Train)?;
    let c = &s.config;
    if let Some(dir) = collective::restarted_run(c, args.resume.is_some() || args.dry_run) {
        // torchrun restarted the ranks after a failure: continue from the newest complete
        // checkpoint of the run's own directory.
        let resumed = TrainArgs {
            resume: Some(dir),
            ..args.clone()
        };
        return run(registry, &request, &resumed);
    }
    let device = collective::device_for_rank(c, device_of(c)?)?;
    tch::manual_seed(c.int("train.seed"));
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(c.bool("cudnn.benchmark"));
    }
    let model = build_model(registry, &s, device)?;
    let tensors = model.tensors()?;
    // The layout first: the precision policy's casts and the optimizer's state follow it.
    let channels_last = memory_format::wanted(c, device)?;
    if channels_last {
        memory_format::convert_model(&tensors)?;
    }
    let out = args
        .resume
        .clone()
        .unwrap_or_else(|| PathBuf::from(c.str("train.output_dir")));
    // Building the optimizer, the schedule and the training parts runs their config checks
    // (betas, Nesterov without momentum, SGDR cycles that must fill the schedule) before
    // anything is loaded or written.
    // The precision policy checks that the device can run it (before anything is written)
    // and casts the model (O3) before the optimizer sees its tensors.
    let mut precision = precision::from_config(c, device)?;
    precision.prepare(&tensors)?;
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
    let collective = if args.dry_run {
        collective::dry_run(c)?
    } else {
        collective::from_config(c)?
    };
    if args.dry_run {
        // Building the augmentations and the step hook runs their config checks.
        build_pipeline(registry, &s, device)?;
        build_step_hook(registry, &s, device)?;
        ema::Ema::from_config(c, &tensors)?;
        print_dry_run(&s, registry, &model, &out, args.resume.is_some());
        for change in &s.resume_changes {
            println!("resume would change {change}");
        }
        return Ok(());
    }

    let writer = collective.is_writer();
    if writer {
        prepare_output(&out, c, args.resume.is_some(), registry)?;
        if args.resume.is_some() {
            crate::resume::record(&out, c, &s.resume_changes)?;
        }
    }
    tracing::info!(
        "imgclf {} training in {}",
        env!("CARGO_PKG_VERSION"),
        out.display()
    );
    tracing::info!("{}", describe_components(&s, registry).replace('\n', "; "));
    tracing::info!(
        "{}; parameters: {}; device {device:?}; precision {}; rank {} of {}",
        model.summary(),
        parameter_count(&tensors),
        precision.name(),
        collective.rank(),
        collective.world_size()
    );

    // Data.
    let (mut train_set, val_set) = load_data(&s)?;
    let batch_size = c.int("train.batch_size") as usize;
    if batch_size == 0 {
        bail!("train.batch_size must be >= 1");
    }
    let steps_per_epoch = data::global_steps_per_epoch(
        train_set.len(),
        batch_size,
        collective.world_size(),
        c.bool("train.dataloader.drop_last"),
    ) as u64;
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
    let image_stages = image_stage::build_image_stages(registry, &s)?;
    let resident = resident::place(&s, &mut train_set, image_stages, device)?;

    // Parts.
    let plan = fit::Plan {
        epochs: c.int("scheduler.epochs") as u64,
        steps_per_epoch,
        batch_size,
        val_period: c.int("train.val_period").max(0) as u64,
        val_first: c.bool("train.val_first"),
        val_batch_size: c.int("validation.batch_size").max(1) as usize,
        log_period: c.int("train.log_period").max(1) as u64,
        checkpoint_period: c.int("train.checkpoint_period").max(1) as u64,
        seed: c.int("train.seed") as u64,
    };
    let mut trainer = fit::Trainer {
        device,
        schedule: build_schedule(registry, &s, steps_per_epoch)?,
        pipeline: build_pipeline(registry, &s, device)?,
        hook: build_step_hook(registry, &s, device)?,
        ema: ema::Ema::from_config(c, &tensors)?,
        model,
        tensors,
        optimizer,
        precision,
        collective,
        sinks: sinks::Sinks::for_run(&out, writer),
        settings: step::StepSettings {
            subdivision: c.int("train.subdivision").max(1),
            gradient_clip: c.float("train.gradient_clip"),
            channels_last,
        },
        resident,
        out: out.clone(),
        start: std::time::Instant::now(),
    };
    let start_epoch = c.int("train.start_epoch") as u64;
    let start = checkpoint::Position {
        epoch: start_epoch,
        step_in_epoch: 0,
        global_step: start_epoch * steps_per_epoch,
    };
    let pos = trainer.restore(args.resume.as_deref(), c.str("train.checkpoint"), start)?;
    if args.resume.is_some() && pos.epoch >= plan.epochs {
        tracing::warn!(
            "the run has trained {} epochs, scheduler.epochs is {}: nothing left to train (extend it with `imgclf train --resume {} scheduler.epochs N`)",
            pos.epoch,
            plan.epochs,
            out.display()
        );
    }
    if writer && c.bool("train.use_tensorboard") {
        trainer
            .sinks
            .push(Box::new(tensorboard_sink::TensorBoardSink::create(
                &out,
                &pos,
                tensorboard_sink::Extras::from_config(c),
            )?));
    }

    install_interrupt_handler();
    trainer.fit(train_set, &val_set, &plan, pos)?;
    trainer.save_final()
}
