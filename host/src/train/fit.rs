//! The training loop: epochs of steps over the parts `run` assembled, with validation,
//! checkpoints, resume and interruption. Each part keeps its own concerns (see the module
//! docs of `precision`, `collective`, `sinks`, `checkpoint`); the loop only orders them.

use super::checkpoint::{self, Position};
use super::collective::Collective;
use super::ema::Ema;
use super::metrics::{Meter, MetricsFile};
use super::pipeline::Pipeline;
use super::precision::Precision;
use super::schedule::LrSchedule;
use super::sinks::{EpochReport, Sinks, Split, StepReport};
use super::step::{self, StepParts, StepSettings};
use super::{data, eval::evaluate_shard, interrupt_requested, Interrupted, MODEL_STREAM};
use crate::datasets::loader::Loader;
use anyhow::{Context, Result};
use imgclf_plugin_api::ffi::{HostModel, HostOptimizer, HostStep};
use imgclf_plugin_api::rng::mix_seed;
use imgclf_plugin_api::NamedTensor;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Tensor};

/// The checkpoint prefix of the step hook's state.
const HOOK_PREFIX: &str = "step.";

/// How long and how often: the loop's fixed settings.
pub struct Plan {
    pub epochs: u64,
    pub steps_per_epoch: u64,
    pub batch_size: usize,
    /// Validate every `val_period` epochs (0: never).
    pub val_period: u64,
    pub val_first: bool,
    pub val_batch_size: usize,
    pub log_period: u64,
    pub checkpoint_period: u64,
    pub seed: u64,
}

/// Everything a run trains with.
pub struct Trainer {
    pub device: Device,
    pub model: HostModel,
    pub tensors: Vec<NamedTensor>,
    pub optimizer: HostOptimizer,
    pub schedule: LrSchedule,
    pub pipeline: Pipeline,
    pub precision: Box<dyn Precision>,
    pub collective: Box<dyn Collective>,
    pub sinks: Sinks,
    pub settings: StepSettings,
    /// `train.step`: the training-step hook (None: the plain step).
    pub hook: Option<HostStep>,
    /// `train.ema.*`: the weights' moving average.
    pub ema: Option<Ema>,
    /// The training set on the device, batched there instead of by the host loader.
    pub resident: Option<super::resident::ResidentSet>,
    /// The run's output directory.
    pub out: PathBuf,
    pub start: Instant,
}

impl Trainer {
    /// Saves a checkpoint of the model, the optimizer and the parts' state (writer only).
    fn checkpoint(&self, pos: &Position) -> Result<Option<PathBuf>> {
        if !self.collective.is_writer() {
            return Ok(None);
        }
        let opt_state = self.optimizer.state()?;
        let mut extra: Vec<(String, Tensor)> = self
            .precision
            .state()?
            .into_iter()
            .map(|(n, t)| (format!("precision.{n}"), t))
            .collect();
        if let Some(hook) = &self.hook {
            extra.extend(
                hook.state()?
                    .into_iter()
                    .map(|t| (format!("{HOOK_PREFIX}{}", t.name), t.tensor)),
            );
        }
        if let Some(ema) = &self.ema {
            extra.extend(ema.state());
        }
        checkpoint::save(&self.out, pos, &self.tensors, &opt_state, &extra).map(Some)
    }

    /// Restores the newest complete checkpoint of `resume` (or the initial weights of
    /// `train.checkpoint`), returning where training continues.
    pub fn restore(
        &mut self,
        resume: Option<&Path>,
        initial_weights: &str,
        start: Position,
    ) -> Result<Position> {
        let metrics = MetricsFile::new(&self.out);
        let writer = self.collective.is_writer();
        let newest = match resume {
            Some(dir) => checkpoint::newest(dir)?,
            None => None,
        };
        let mut ema_state = Vec::new();
        let pos = if let Some((path, p)) = &newest {
            let loaded = checkpoint::load(path)?;
            checkpoint::copy_into_model(&self.tensors, &loaded.model, path)?;
            self.optimizer.load_state(loaded.optimizer)?;
            let precision_state: Vec<(String, Tensor)> = loaded
                .extra
                .iter()
                .filter_map(|(n, t)| {
                    n.strip_prefix("precision.")
                        .map(|n| (n.to_string(), t.shallow_clone()))
                })
                .collect();
            self.precision.load_state(&precision_state)?;
            if let Some(hook) = &mut self.hook {
                hook.load_state(
                    loaded
                        .extra
                        .iter()
                        .filter_map(|(n, t)| {
                            n.strip_prefix(HOOK_PREFIX).map(|n| NamedTensor {
                                name: n.to_string(),
                                tensor: t.shallow_clone(),
                                trainable: false,
                            })
                        })
                        .collect(),
                )?;
            }
            ema_state = loaded.extra;
            if writer {
                metrics.truncate_after(p.global_step)?;
            }
            tracing::info!(
                "resumed from {} (epoch {}, step {})",
                path.display(),
                p.epoch,
                p.global_step
            );
            *p
        } else {
            if let Some(dir) = resume {
                tracing::warn!(
                    "no complete checkpoint in {}: starting from the beginning",
                    dir.display()
                );
                if writer {
                    metrics.truncate_after(0)?;
                }
            }
            if !initial_weights.is_empty() {
                let path = Path::new(initial_weights);
                let loaded = checkpoint::load(path)
                    .with_context(|| format!("train.checkpoint = '{initial_weights}'"))?;
                checkpoint::copy_into_model(&self.tensors, &loaded.model, path)?;
                tracing::info!("initial weights from {initial_weights}");
            }
            start
        };
        self.collective.broadcast(&self.tensors)?;
        if let Some(ema) = &mut self.ema {
            // The average starts from the weights training starts from, or continues.
            if !ema.load_state(&ema_state)? {
                if newest.is_some() {
                    tracing::warn!(
                        "the checkpoint has no EMA weights (trained without train.ema.enabled): \
                         the average starts from its weights"
                    );
                }
                ema.reset(&self.tensors)?;
            }
        }
        Ok(pos)
    }

    /// Writes `model_final.safetensors` (writer only): the EMA weights with
    /// `train.ema.enabled`, the raw ones then going to `model_final_raw.safetensors`.
    pub fn save_final(&self) -> Result<()> {
        if !self.collective.is_writer() {
            return Ok(());
        }
        let raw: Vec<(String, Tensor)> = self
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.tensor.shallow_clone()))
            .collect();
        let path = self.out.join("model_final.safetensors");
        match &self.ema {
            None => crate::io::save_safetensors(&path, &raw, Default::default())?,
            Some(ema) => {
                crate::io::save_safetensors(&path, &ema.tensors(), Default::default())?;
                let raw_path = self.out.join("model_final_raw.safetensors");
                crate::io::save_safetensors(&raw_path, &raw, Default::default())?;
                tracing::info!(
                    "{} holds the EMA weights (train.ema.decay {}); the raw weights are in {}",
                    path.display(),
                    ema.decay(),
                    raw_path.display()
                );
            }
        }
        tracing::info!(
            "saved {} (a PyTorch state dict: load_state_dict(safetensors.torch.load_file(...)))",
            path.display()
        );
        Ok(())
    }

    fn validate(&mut self, val: &Loader, plan: &Plan, pos: &Position, lr: f64) -> Result<()> {
        let t0 = Instant::now();
        // Each rank evaluates its shard; the sums add up to one pass over the whole set.
        let mut evaluated = None;
        let mut evaluate = || {
            self.precision.evaluate(&mut || {
                evaluated = Some(evaluate_shard(
                    &mut self.model,
                    val,
                    plan.val_batch_size,
                    &self.pipeline.norm,
                    self.device,
                    (self.collective.rank(), self.collective.world_size()),
                )?);
                Ok(())
            })
        };
        match self.ema.as_ref().filter(|e| e.eval) {
            Some(ema) => ema.with_average(&self.tensors, evaluate)?,
            None => evaluate()?,
        }
        let m = evaluated.expect("the precision policy ran the evaluation");
        let seconds = t0.elapsed().as_secs_f64();
        let mut sums = m.sums();
        self.collective.reduce_sums(&mut sums)?;
        let m = Meter::from_sums(sums);
        let first: Vec<usize> = (0..val.len().min(plan.val_batch_size)).collect();
        if !first.is_empty() {
            let (images, _) = val.batch(&first)?.tensors();
            let images = self.pipeline.norm.apply(&images.to_device(self.device));
            self.sinks.images(Split::Val, pos.epoch, &images)?;
        }
        self.sinks.epoch(&EpochReport {
            split: Split::Val,
            epoch: pos.epoch,
            global_step: pos.global_step,
            meter: &m,
            lr,
            next_lr: lr,
            images: m.n as usize,
            seconds,
            elapsed_s: self.start.elapsed().as_secs_f64(),
        })?;
        self.sinks.parameters(pos.epoch, &self.tensors)
    }

    fn interrupted(&self, pos: &Position) -> Result<Interrupted> {
        let path = self.checkpoint(pos)?;
        Ok(Interrupted {
            checkpoint: path.map(|p| p.display().to_string()).unwrap_or_default(),
            dir: self.out.display().to_string(),
        })
    }

    /// Trains from `pos` to the end of the plan.
    pub fn fit(
        &mut self,
        train_set: Loader,
        val_set: &Loader,
        plan: &Plan,
        mut pos: Position,
    ) -> Result<()> {
        if plan.val_period > 0 && pos.global_step == 0 && plan.val_first {
            let lr = self.schedule.lr(0)?;
            self.validate(val_set, plan, &pos, lr)?;
        }
        while pos.epoch < plan.epochs {
            let epoch = pos.epoch; // 0-based index of the epoch being trained
            let (rank, world) = (self.collective.rank(), self.collective.world_size());
            // The global batch of every step is the same set of images whatever the world
            // size; this rank takes its slice of it.
            let order = data::rank_order(
                &data::epoch_order(train_set.len(), plan.seed, epoch),
                plan.batch_size,
                world,
                rank,
            );
            // Per-rank random streams (augmentations, the model's own randomness); a world of
            // one keeps the single-process streams.
            let seed = data::rank_seed(plan.seed, rank, world);
            let (steps, first) = (plan.steps_per_epoch as usize, pos.step_in_epoch as usize);
            let batches: Box<dyn Iterator<Item = Result<(usize, Tensor, Tensor)>>> =
                match &self.resident {
                    Some(r) => Box::new(r.epoch(&order, plan.batch_size, steps, first)?),
                    None => {
                        let (loader, device) = (&train_set, self.device);
                        let rx = data::spawn_epoch(
                            loader,
                            order,
                            plan.batch_size,
                            steps,
                            first,
                            seed,
                            epoch,
                        );
                        Box::new(rx.map(move |raw| {
                            let raw = raw?;
                            let (images, labels) = data::to_device(&raw, loader, device)?;
                            Ok((raw.index, images, labels))
                        }))
                    }
                };
            self.sinks.epoch_start(
                epoch + 1,
                plan.epochs,
                plan.steps_per_epoch,
                pos.step_in_epoch,
            );
            let t0 = Instant::now();
            let mut meter = Meter::default();
            let mut lr = 0.0;
            for batch in batches {
                let (index, images, labels) = batch?;
                let step = index as u64;
                let p = self.pipeline.prepare(images, labels, seed, epoch, step)?;
                let n = p.labels.size()[0] as usize;
                if step == 0 {
                    self.sinks.images(Split::Train, epoch + 1, &p.images)?;
                }
                tch::manual_seed(mix_seed(&[seed, MODEL_STREAM, epoch, step]) as i64 & i64::MAX);
                lr = self.schedule.lr(pos.global_step)?;
                let parts = StepParts {
                    model: &mut self.model,
                    tensors: &self.tensors,
                    optimizer: &mut self.optimizer,
                    pipeline: &self.pipeline,
                    precision: self.precision.as_mut(),
                    collective: self.collective.as_mut(),
                    hook: self.hook.as_mut(),
                    settings: &self.settings,
                };
                let out = step::step(parts, p, lr, pos.global_step)
                    .with_context(|| format!("epoch {} step {}", epoch + 1, step + 1))?;
                if let Some(ema) = &mut self.ema {
                    ema.update(&self.tensors)?;
                }
                meter.update(n, out.loss, out.acc1, out.acc5);
                pos.global_step += 1;
                pos.step_in_epoch = step + 1;
                let last = pos.step_in_epoch == plan.steps_per_epoch;
                let extra: Vec<(String, f64)> = self
                    .precision
                    .loss_scale()
                    .map(|s| vec![("loss_scale".to_string(), s)])
                    .unwrap_or_default();
                self.sinks.step(&StepReport {
                    epoch: epoch + 1,
                    epochs: plan.epochs,
                    step_in_epoch: pos.step_in_epoch,
                    steps_per_epoch: plan.steps_per_epoch,
                    global_step: pos.global_step,
                    lr,
                    loss: out.loss,
                    acc1: out.acc1,
                    acc5: out.acc5,
                    running: &meter,
                    images_per_sec: meter.n / t0.elapsed().as_secs_f64().max(1e-9),
                    elapsed_s: self.start.elapsed().as_secs_f64(),
                    log: pos.step_in_epoch.is_multiple_of(plan.log_period) || last,
                    extra: &extra,
                })?;
                if self.agreed_interrupt()? && !last {
                    self.sinks.finish();
                    return Err(self.interrupted(&pos)?.into());
                }
            }
            pos.epoch += 1;
            pos.step_in_epoch = 0;
            let mut sums = meter.sums();
            self.collective.reduce_sums(&mut sums)?;
            let meter = Meter::from_sums(sums);
            // Reporting only: a schedule that ends with the last step keeps its last rate.
            let next_lr = self.schedule.lr(pos.global_step).unwrap_or(lr);
            self.sinks.epoch(&EpochReport {
                split: Split::Train,
                epoch: pos.epoch,
                global_step: pos.global_step,
                meter: &meter,
                lr,
                next_lr,
                images: meter.n as usize,
                seconds: t0.elapsed().as_secs_f64(),
                elapsed_s: self.start.elapsed().as_secs_f64(),
            })?;
            if plan.val_period > 0 && pos.epoch.is_multiple_of(plan.val_period) {
                self.validate(val_set, plan, &pos, lr)?;
            }
            if self.agreed_interrupt()? {
                return Err(self.interrupted(&pos)?.into());
            }
            if pos.epoch.is_multiple_of(plan.checkpoint_period) || pos.epoch == plan.epochs {
                if let Some(path) = self.checkpoint(&pos)? {
                    tracing::info!("saved {}", path.display());
                }
            }
        }
        self.sinks.finish();
        self.collective.verify_identical(&self.tensors)?;
        // Nobody leaves while another rank still needs it (rank 0 may serve the store).
        self.collective.barrier()?;
        Ok(())
    }

    /// Whether any rank was asked to stop (Ctrl-C, SIGTERM from a launcher), agreed by every
    /// rank at the same step so that all stop together.
    fn agreed_interrupt(&mut self) -> Result<bool> {
        let mine = interrupt_requested();
        if self.collective.world_size() == 1 {
            return Ok(mine);
        }
        let mut v = [f64::from(u8::from(mine))];
        self.collective.reduce_sums(&mut v)?;
        Ok(v[0] > 0.0)
    }
}
