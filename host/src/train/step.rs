//! One optimisation step: the forward passes of every view and Ghost-BN chunk
//! (`train.subdivision`), the loss (cross-entropy, soft cross-entropy for mixed targets, or an
//! augmentation's own loss), backward under the precision policy, gradient reduction across
//! ranks, clipping, and the optimizer step at the scheduled learning rate.

use super::collective::Collective;
use super::metrics::{topk_accuracy, topk_accuracy_labels};
use super::pipeline::{Pipeline, Prepared};
use super::precision::Precision;
use anyhow::{bail, Result};
use imgclf_plugin_api::ffi::{HostModel, HostOptimizer};
use imgclf_plugin_api::NamedTensor;
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

/// One optimisation step on a prepared batch at learning rate `lr`. Gradients are released
/// first (the model's tensors end the step holding this step's gradients).
#[allow(clippy::too_many_arguments)]
pub fn step(
    model: &mut HostModel,
    tensors: &[NamedTensor],
    optimizer: &mut HostOptimizer,
    pipeline: &Pipeline,
    precision: &mut dyn Precision,
    collective: &mut dyn Collective,
    settings: &StepSettings,
    p: Prepared,
    lr: f64,
) -> Result<StepOutcome> {
    // Release the gradients (PyTorch's zero_grad(set_to_none=True)): backward allocates fresh
    // ones instead of accumulating into zero-filled buffers, and a parameter without a gradient
    // this step is skipped by the optimizer, as in PyTorch.
    let trainable: Vec<Tensor> = tensors
        .iter()
        .filter(|t| t.trainable)
        .map(|t| t.tensor.shallow_clone())
        .collect();
    imgclf_plugin_api::optim::release_grads(&trainable)?;
    let subdivision = settings.subdivision.max(1);
    let views = p.views.max(1) as i64;
    let n = p.labels.size()[0];
    let images = if settings.channels_last {
        super::memory_format::channels_last(&p.images)?
    } else {
        p.images.shallow_clone()
    };
    let image_chunks = images.chunk(views, 0);
    let mut view_logits: Vec<Vec<Tensor>> = (0..views).map(|_| Vec::new()).collect();
    let mut losses = Vec::new();
    let size = (n + subdivision - 1) / subdivision;
    let row_chunks = (0..subdivision)
        .map(|i| (i * size, ((i + 1) * size).min(n) - i * size))
        .filter(|(_, l)| *l > 0);
    for (start, len) in row_chunks {
        let mut out = None;
        precision.forward(&mut || {
            out = Some(chunk_loss(model, pipeline, &p, &image_chunks, start, len)?);
            Ok(())
        })?;
        let (loss, logits_v) = out.expect("the precision policy ran the forward pass");
        precision.backward(&loss)?;
        losses.push(loss.detach());
        for (v, l) in logits_v.into_iter().enumerate() {
            view_logits[v].push(l.detach());
        }
    }
    let grads = precision.gradients(tensors)?;
    collective.reduce_gradients(&grads)?;
    let stepped = precision.unscale(&grads)?;
    if stepped {
        if settings.gradient_clip > 0.0 || subdivision > 1 {
            clip_and_average(&grads, settings.gradient_clip, subdivision)?;
        }
        optimizer.step(lr)?;
    }
    precision.update(stepped)?;
    // Metrics on the views' mean logits.
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
