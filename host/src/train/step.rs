//! One optimisation step: the forward passes of every view and Ghost-BN chunk
//! (`train.subdivision`), the loss (cross-entropy, soft cross-entropy for mixed targets, or an
//! augmentation's own loss), backward under the precision policy, gradient reduction across
//! ranks, clipping, and the optimizer step at the scheduled learning rate. A training-step hook
//! (`train.step`, a plugin component of kind `step`, e.g. SAM) decides how many passes a step
//! runs and at which weights; reduction, unscaling, clipping and the optimizer step stay here,
//! once per step.

use super::collective::Collective;
use super::metrics::{topk_accuracy, topk_accuracy_labels};
use super::pipeline::{Pipeline, Prepared};
use super::precision::Precision;
use anyhow::{bail, Result};
use imgclf_plugin_api::ffi::{HostModel, HostOptimizer, HostStep};
use imgclf_plugin_api::{NamedTensor, StepContext, StepHost};
use tch::{Kind, Tensor};

/// What one step measured.
pub struct StepOutcome {
    pub loss: f64,
    pub acc1: f64,
    pub acc5: f64,
    /// Whether the optimizer stepped (a precision policy skips steps with non-finite
    /// gradients).
    pub stepped: bool,
}

/// The step's fixed settings.
pub struct StepSettings {
    /// `train.subdivision`: chunks of the batch, each its own forward/backward (Ghost BN).
    pub subdivision: i64,
    /// `train.gradient_clip`: the largest global gradient norm (0: no clipping).
    pub gradient_clip: f64,
    /// `train.channels_last`: the batches go to the model in the channels_last layout.
    pub channels_last: bool,
}

fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Tensor {
    -(logits.log_softmax(1, Kind::Float) * targets)
        .sum_dim_intlist(1, false, Kind::Float)
        .mean(Kind::Float)
}

/// The gradients of the trainable tensors that have one.
pub fn gradients(tensors: &[NamedTensor]) -> Vec<Tensor> {
    tensors
        .iter()
        .filter(|t| t.trainable)
        .map(|t| t.tensor.grad())
        .filter(|g| g.defined())
        .collect()
}

/// Clips the global norm to `clip` (when > 0), then divides by `subdivision` (the reference
/// clips the summed chunk gradients before averaging them).
fn clip_and_average(grads: &[Tensor], clip: f64, subdivision: i64) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        if clip > 0.0 && !grads.is_empty() {
            let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
            let total = Tensor::stack(&norms, 0).norm();
            let coef = (clip / (total + 1e-6)).clamp_max(1.0);
            for g in grads {
                let _ = g.shallow_clone().f_mul_(&coef)?;
            }
        }
        if subdivision > 1 {
            for g in grads {
                let _ = g.shallow_clone().f_div_scalar_(subdivision as f64)?;
            }
        }
        Ok(())
    })
}

/// The model's loss on one chunk of rows, for every view.
fn chunk_loss(
    model: &mut HostModel,
    pipeline: &Pipeline,
    p: &Prepared,
    views: &[Tensor],
    start: i64,
    len: i64,
) -> Result<(Tensor, Vec<Tensor>)> {
    let mut logits_v = Vec::with_capacity(views.len());
    for view in views {
        logits_v.push(model.forward(&view.narrow(0, start, len), true)?);
    }
    let logits = Tensor::cat(&logits_v, 0);
    // An augmentation's own loss (Dual-Cutout) replaces cross-entropy; it always sees the
    // targets, one-hot when nothing changed them.
    let t = p.loss_targets.narrow(0, start, len);
    let mut custom = None;
    for (_, aug) in &pipeline.augmentations {
        if let Some(l) = aug.loss(&logits, &t, views.len() as u32)? {
            custom = Some(l);
        }
    }
    if custom.is_none() && pipeline.soft_targets {
        let per_view: Vec<Tensor> = logits_v.iter().map(|l| soft_cross_entropy(l, &t)).collect();
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
    Ok((loss, logits_v))
}

/// The forward/backward passes of one step over its prepared batch: the plain step runs one,
/// a step hook (`train.step`) calls back for as many as its method needs
/// ([`imgclf_plugin_api::StepHost`]).
struct Passes<'a> {
    model: &'a mut HostModel,
    tensors: &'a [NamedTensor],
    pipeline: &'a Pipeline,
    precision: &'a mut dyn Precision,
    p: &'a Prepared,
    /// The batch split by view.
    image_chunks: Vec<Tensor>,
    subdivision: i64,
    context: StepContext,
    /// The first pass's chunk losses and per-view logits: the step's metrics.
    first: Option<(Vec<Tensor>, Vec<Vec<Tensor>>)>,
    /// The gradients the last pass left (after the precision policy's `gradients`).
    grads: Vec<Tensor>,
    count: usize,
}

impl Passes<'_> {
    /// One forward/backward over every view and Ghost-BN chunk; the gradients replace the
    /// previous pass's. With `keep_buffers` the model's buffers are restored afterwards.
    fn run(&mut self, keep_buffers: bool) -> Result<f64> {
        // Release the gradients (PyTorch's zero_grad(set_to_none=True)): backward allocates
        // fresh ones instead of accumulating into zero-filled buffers, and a parameter without
        // a gradient this step is skipped by the optimizer, as in PyTorch.
        let trainable: Vec<Tensor> = self
            .tensors
            .iter()
            .filter(|t| t.trainable)
            .map(|t| t.tensor.shallow_clone())
            .collect();
        imgclf_plugin_api::optim::release_grads(&trainable)?;
        let saved: Vec<(Tensor, Tensor)> = if keep_buffers {
            self.tensors
                .iter()
                .filter(|t| !t.trainable)
                .map(|t| (t.tensor.shallow_clone(), t.tensor.detach().copy()))
                .collect()
        } else {
            Vec::new()
        };
        let views = self.image_chunks.len();
        let n = self.p.labels.size()[0];
        let mut view_logits: Vec<Vec<Tensor>> = (0..views).map(|_| Vec::new()).collect();
        let mut losses = Vec::new();
        let size = (n + self.subdivision - 1) / self.subdivision;
        let row_chunks = (0..self.subdivision)
            .map(|i| (i * size, ((i + 1) * size).min(n) - i * size))
            .filter(|(_, l)| *l > 0);
        for (start, len) in row_chunks {
            let mut out = None;
            let (model, pipeline, p, chunks) =
                (&mut *self.model, self.pipeline, self.p, &self.image_chunks);
            self.precision.forward(&mut || {
                out = Some(chunk_loss(model, pipeline, p, chunks, start, len)?);
                Ok(())
            })?;
            let (loss, logits_v) = out.expect("the precision policy ran the forward pass");
            self.precision.backward(&loss)?;
            losses.push(loss.detach());
            for (v, l) in logits_v.into_iter().enumerate() {
                view_logits[v].push(l.detach());
            }
        }
        self.grads = self.precision.gradients(self.tensors)?;
        tch::no_grad(|| -> Result<()> {
            for (dst, src) in &saved {
                dst.shallow_clone().f_copy_(src)?;
            }
            Ok(())
        })?;
        let loss = Tensor::stack(&losses, 0)
            .mean(Kind::Float)
            .double_value(&[]);
        self.count += 1;
        if self.first.is_none() {
            self.first = Some((losses, view_logits));
        }
        Ok(loss)
    }
}

impl StepHost for Passes<'_> {
    fn forward_backward(&mut self, keep_buffers: bool) -> imgclf_plugin_api::Result<f64> {
        self.run(keep_buffers)
            .map_err(|e| imgclf_plugin_api::Error(format!("{e:#}")))
    }
    fn tensors(&self) -> imgclf_plugin_api::Result<Vec<NamedTensor>> {
        Ok(self.tensors.to_vec())
    }
    fn context(&self) -> StepContext {
        self.context
    }
}

/// The parts one step works with.
pub struct StepParts<'a> {
    pub model: &'a mut HostModel,
    pub tensors: &'a [NamedTensor],
    pub optimizer: &'a mut HostOptimizer,
    pub pipeline: &'a Pipeline,
    pub precision: &'a mut dyn Precision,
    pub collective: &'a mut dyn Collective,
    /// `train.step`: the hook that runs the passes (None: the plain step, one pass).
    pub hook: Option<&'a mut HostStep>,
    pub settings: &'a StepSettings,
}

/// One optimisation step on a prepared batch at learning rate `lr` (`global_step` steps done
/// before it). Gradients are released first (the model's tensors end the step holding this
/// step's gradients).
pub fn step(parts: StepParts<'_>, p: Prepared, lr: f64, global_step: u64) -> Result<StepOutcome> {
    let StepParts {
        model,
        tensors,
        optimizer,
        pipeline,
        precision,
        collective,
        hook,
        settings,
    } = parts;
    let subdivision = settings.subdivision.max(1);
    let views = p.views.max(1) as i64;
    let images = if settings.channels_last {
        super::memory_format::channels_last(&p.images)?
    } else {
        p.images.shallow_clone()
    };
    let context = StepContext {
        lr,
        global_step,
        gradient_scale: precision.loss_scale().unwrap_or(1.0) * subdivision as f64,
        world_size: collective.world_size() as u64,
    };
    let mut passes = Passes {
        model,
        tensors,
        pipeline,
        precision,
        p: &p,
        image_chunks: images.chunk(views, 0),
        subdivision,
        context,
        first: None,
        grads: Vec::new(),
        count: 0,
    };
    let grads = match hook {
        None => {
            passes.run(false)?;
            std::mem::take(&mut passes.grads)
        }
        Some(hook) => {
            hook.step(&mut passes)?;
            if passes.count == 0 {
                bail!(
                    "the step hook `{}` (plugin `{}`) returned without running a forward/backward pass",
                    hook.label().1,
                    hook.label().0
                );
            }
            gradients(tensors)
        }
    };
    let (losses, view_logits) = passes.first.take().expect("a pass ran");
    let precision = passes.precision;
    collective.reduce_gradients(&grads)?;
    let stepped = precision.unscale(&grads)?;
    if stepped {
        if settings.gradient_clip > 0.0 || subdivision > 1 {
            clip_and_average(&grads, settings.gradient_clip, subdivision)?;
        }
        optimizer.step(lr)?;
    }
    precision.update(stepped)?;
    // Metrics on the views' mean logits (of the first pass).
    let per_view: Vec<Tensor> = view_logits.iter().map(|v| Tensor::cat(v, 0)).collect();
    let logits = Tensor::stack(&per_view, 0).mean_dim(0, false, Kind::Float);
    let (acc1, acc5) = match &p.mix_targets {
        Some(t) => topk_accuracy(&logits, t),
        None => topk_accuracy_labels(&logits, &p.labels),
    };
    let loss = Tensor::stack(&losses, 0)
        .mean(Kind::Float)
        .double_value(&[]);
    if !loss.is_finite() && precision.loss_scale().is_none() {
        bail!("the training loss became {loss} (lr {lr}); lower train.base_lr or check the data");
    }
    Ok(StepOutcome {
        loss,
        acc1,
        acc5,
        stepped,
    })
}
