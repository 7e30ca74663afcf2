//! The precision policy of a training step: under which autocast the forward pass and loss
//! run, which dtype the weights compute in, how the loss is scaled for backward, and how
//! gradients are unscaled and checked before the optimizer step. The loop calls these hooks in
//! order and never branches on the level: `prepare` once (before the optimizer is built), then
//! per step `forward` (per chunk), `backward` (per chunk), `gradients`, `unscale`, the
//! optimizer step when `unscale` said the gradients are finite, and `update`; validation runs
//! under `evaluate`.
//!
//! `train.precision` takes apex's opt levels, built on libtorch's native (device-generic)
//! autocast through `imgclf_plugin_api::amp`; `train.precision_dtype` picks the reduced type:
//!
//! | level | forward | weights the optimizer steps | loss scaling (float16) |
//! |---|---|---|---|
//! | O0 | float32 | float32 | none |
//! | O1 | autocast | float32 | dynamic |
//! | O2 | autocast, weights cast to the reduced type (BatchNorm kept float32) | float32 masters | dynamic |
//! | O3 | autocast, every tensor of the model in the reduced type | reduced | none (scale 1) |
//!
//! bfloat16 has float32's exponent range, so it never scales the loss. Autocast state is
//! thread-local in the one libtorch the host shares with its plugins: it holds inside every
//! plugin call made on the training thread, with no plugin change.

use anyhow::{anyhow, Context, Result};
use imgclf_plugin_api::amp::{self, Autocast, GradScaler, GradScalerOptions};
use imgclf_plugin_api::NamedTensor;
use std::collections::HashSet;
use tch::{Device, Kind, Tensor};

pub trait Precision {
    /// A short name for logs ("float32", ...).
    fn name(&self) -> String;
    /// Called once with the model's tensors before the optimizer is built (a reduced-precision
    /// level casts the model here).
    fn prepare(&mut self, _tensors: &[NamedTensor]) -> Result<()> {
        Ok(())
    }
    /// Runs a training forward pass and loss `f` under this policy's autocast (and, for O2,
    /// with the weights in the reduced type until [`gradients`](Self::gradients)).
    fn forward(&mut self, f: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        f()
    }
    /// Runs an evaluation forward pass `f` under this policy's autocast.
    fn evaluate(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        f()
    }
    /// Backward of one loss (scaled by the current loss scale, where there is one).
    fn backward(&mut self, loss: &Tensor) -> Result<()> {
        loss.f_backward()?;
        Ok(())
    }
    /// After every backward of the step: the gradients the optimizer will read (O2: the
    /// float32 weights are back in place, holding float32 copies of the reduced gradients).
    fn gradients(&mut self, tensors: &[NamedTensor]) -> Result<Vec<Tensor>> {
        Ok(super::step::gradients(tensors))
    }
    /// Before clipping and the optimizer: unscales the gradients in place. `false` when they
    /// are not finite (the optimizer step is skipped).
    fn unscale(&mut self, _grads: &[Tensor]) -> Result<bool> {
        Ok(true)
    }
    /// After the step, taken or skipped: adjusts the loss scale.
    fn update(&mut self, _stepped: bool) -> Result<()> {
        Ok(())
    }
    /// The loss scale, for metrics (`None` when gradients are not scaled); with `None` a
    /// non-finite loss ends training, with a scale it only skips the step.
    fn loss_scale(&self) -> Option<f64> {
        None
    }
    /// State saved in checkpoints (under `precision.`), restored with `load_state`.
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![])
    }
    fn load_state(&mut self, _state: &[(String, Tensor)]) -> Result<()> {
        Ok(())
    }
}

/// `train.precision O0`: everything in float32, gradients unscaled.
pub struct Float32;

impl Precision for Float32 {
    fn name(&self) -> String {
        "float32".into()
    }
}

/// Which dtype the model's tensors hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Weights {
    /// float32 throughout (O1: autocast casts per op).
    Float32,
    /// float32 masters the optimizer steps; each step's forward/backward runs on reduced
    /// copies of every weight outside BatchNorm (O2).
    ReducedWithMasters,
    /// Every floating tensor of the model in the reduced type, stepped as is (O3).
    Reduced,
}

/// The parts an opt level is made of.
struct Recipe {
    weights: Weights,
    /// Dynamic loss scaling when the reduced type is float16.
    scales_float16: bool,
    summary: &'static str,
}

fn recipe(level: &str) -> Option<Recipe> {
    Some(match level {
        "O1" => Recipe {
            weights: Weights::Float32,
            scales_float16: true,
            summary: "autocast, float32 weights",
        },
        "O2" => Recipe {
            weights: Weights::ReducedWithMasters,
            scales_float16: true,
            summary: "reduced weights with float32 masters, BatchNorm float32",
        },
        "O3" => Recipe {
            weights: Weights::Reduced,
            scales_float16: false,
            summary: "pure reduced precision",
        },
        _ => return None,
    })
}

/// O1-O3: autocast on the training device in `dtype`, weights as the level says, and
/// torch.amp.GradScaler's dynamic loss scaling where the level and dtype need it.
pub struct Mixed {
    level: String,
    device: Device,
    dtype: Kind,
    recipe: Recipe,
    scaler: Option<GradScaler>,
    /// The scale after the last update (read once per step, for metrics).
    scale: Option<f64>,
    /// O2: the weights computed in the reduced type (chosen in `prepare`).
    reduced: Vec<Tensor>,
    /// O2, between `forward` and `gradients`: each reduced weight's float32 master data.
    masters: Vec<Tensor>,
}

fn dtype_name(kind: Kind) -> String {
    match kind {
        Kind::Half => "float16".into(),
        Kind::BFloat16 => "bfloat16".into(),
        other => format!("{other:?}"),
    }
}

/// The tensors of BatchNorm layers (those beside a `running_mean` buffer), which O2 keeps in
/// float32 as apex's `keep_batchnorm_fp32` does.
fn batch_norm_tensors(tensors: &[NamedTensor]) -> HashSet<String> {
    let layers: HashSet<&str> = tensors
        .iter()
        .filter_map(|t| t.name.strip_suffix(".running_mean"))
        .collect();
    tensors
        .iter()
        .filter(|t| {
            t.name
                .rsplit_once('.')
                .is_some_and(|(layer, _)| layers.contains(layer))
        })
        .map(|t| t.name.clone())
        .collect()
}

impl Mixed {
    pub fn new(level: &str, dtype: Kind, device: Device) -> Result<Self> {
        let recipe = recipe(level)
            .ok_or_else(|| anyhow!("train.precision '{level}' is not O1, O2 or O3"))?;
        let scaler = if recipe.scales_float16 && dtype == Kind::Half {
            Some(GradScaler::new(device, GradScalerOptions::default())?)
        } else {
            None
        };
        let scale = match &scaler {
            Some(s) => Some(s.scale_value()?),
            None => None,
        };
        let policy = Mixed {
            level: level.to_string(),
            device,
            dtype,
            recipe,
            scaler,
            scale,
            reduced: vec![],
            masters: vec![],
        };
        policy.check_device().with_context(|| {
            format!(
                "train.precision {level} with train.precision_dtype {} cannot run on {}; choose \
                 another train.precision_dtype, train.precision O0, or another device",
                dtype_name(dtype),
                device_name(device)
            )
        })?;
        Ok(policy)
    }

    fn autocast(&self) -> Result<Autocast> {
        Ok(Autocast::enter(self.device, self.dtype, true)?)
    }

    /// A tiny convolution + BatchNorm + linear + cross-entropy forward and backward with this
    /// policy's dtypes (and a loss-scaler round), so a device that cannot run the request
    /// fails here, before anything is loaded or written, with the libtorch message.
    fn check_device(&self) -> Result<()> {
        let opts = |kind| (kind, self.device);
        let weights = match self.recipe.weights {
            Weights::Float32 => Kind::Float,
            _ => self.dtype,
        };
        let bn = match self.recipe.weights {
            Weights::Reduced => self.dtype,
            _ => Kind::Float,
        };
        let x = Tensor::f_linspace(-1.0, 1.0, 2 * 3 * 4 * 4, opts(Kind::Float))?
            .f_reshape([2, 3, 4, 4])?;
        let conv = Tensor::f_full([2, 3, 3, 3], 0.1, opts(weights))?.f_set_requires_grad(true)?;
        let fc = Tensor::f_full([5, 2], 0.1, opts(weights))?.f_set_requires_grad(true)?;
        let (gamma, beta) = (
            Tensor::f_ones([2], opts(bn))?,
            Tensor::f_zeros([2], opts(bn))?,
        );
        let (mean, var) = (
            Tensor::f_zeros([2], opts(bn))?,
            Tensor::f_ones([2], opts(bn))?,
        );
        let loss = {
            let _autocast = self.autocast()?;
            let y = x.f_conv2d(&conv, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1)?;
            let y = y
                .f_batch_norm(
                    Some(&gamma),
                    Some(&beta),
                    Some(&mean),
                    Some(&var),
                    true,
                    0.1,
                    1e-5,
                    true,
                )?
                .f_relu()?
                .f_mean_dim([2i64, 3].as_slice(), false, None)?;
            let logits = y.f_linear(&fc, None::<Tensor>)?;
            let labels = Tensor::from_slice(&[0i64, 4]).f_to_device(self.device)?;
            logits.f_log_softmax(-1, Kind::Float)?.f_nll_loss(
                &labels,
                None::<Tensor>,
                tch::Reduction::Mean,
                -100,
            )?
        };
        let mut probe = GradScaler::new(self.device, GradScalerOptions::default())?;
        probe.scale(&loss)?.f_backward()?;
        if self.scaler.is_some() {
            let mut grads = vec![
                conv.grad().f_to_kind(Kind::Float)?,
                fc.grad().f_to_kind(Kind::Float)?,
            ];
            probe.unscale(&mut grads)?;
            probe.update()?;
        }
        Ok(())
    }
}

fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "the CPU".into(),
        Device::Cuda(i) => format!("CUDA device {i}"),
        other => format!("{other:?}"),
    }
}

impl Precision for Mixed {
    fn name(&self) -> String {
        let scaling = if self.scaler.is_some() {
            "dynamic loss scaling"
        } else {
            "no loss scaling"
        };
        format!(
            "{} {} ({}, {scaling})",
            self.level,
            dtype_name(self.dtype),
            self.recipe.summary
        )
    }

    fn prepare(&mut self, tensors: &[NamedTensor]) -> Result<()> {
        let floating = |t: &&NamedTensor| t.tensor.is_floating_point();
        match self.recipe.weights {
            Weights::Float32 => {}
            Weights::ReducedWithMasters => {
                let bn = batch_norm_tensors(tensors);
                self.reduced = tensors
                    .iter()
                    .filter(floating)
                    .filter(|t| t.trainable && !bn.contains(&t.name))
                    .map(|t| t.tensor.shallow_clone())
                    .collect();
            }
            Weights::Reduced => tch::no_grad(|| -> Result<()> {
                for t in tensors.iter().filter(floating) {
                    let reduced = t.tensor.f_to_kind(self.dtype)?;
                    t.tensor.shallow_clone().f_set_data(&reduced)?;
                }
                Ok(())
            })?,
        }
        Ok(())
    }

    fn forward(&mut self, f: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        if self.masters.is_empty() && !self.reduced.is_empty() {
            // The same TensorImpl the model and the optimizer hold gets the reduced data; its
            // float32 data waits in `masters` until `gradients` puts it back.
            tch::no_grad(|| -> Result<()> {
                for w in &self.reduced {
                    let master = w.detach();
                    w.shallow_clone()
                        .f_set_data(&master.f_to_kind(self.dtype)?)?;
                    self.masters.push(master);
                }
                Ok(())
            })?;
        }
        let _autocast = self.autocast()?;
        f()
    }

    fn evaluate(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        let _autocast = self.autocast()?;
        f()
    }

    fn backward(&mut self, loss: &Tensor) -> Result<()> {
        match &self.scaler {
            Some(s) => s.scale(loss)?.f_backward()?,
            None => loss.f_backward()?,
        }
        Ok(())
    }

    fn gradients(&mut self, tensors: &[NamedTensor]) -> Result<Vec<Tensor>> {
        let masters = std::mem::take(&mut self.masters);
        tch::no_grad(|| -> Result<()> {
            for (w, master) in self.reduced.iter().zip(&masters) {
                let grad = w.grad();
                w.shallow_clone().f_set_data(master)?;
                if grad.defined() {
                    amp::set_grad(w, Some(&grad.f_to_kind(Kind::Float)?))?;
                }
            }
            Ok(())
        })?;
        Ok(super::step::gradients(tensors))
    }

    fn unscale(&mut self, grads: &[Tensor]) -> Result<bool> {
        match &mut self.scaler {
            Some(s) => {
                let mut handles: Vec<Tensor> = grads.iter().map(|g| g.shallow_clone()).collect();
                Ok(s.unscale(&mut handles)?)
            }
            None => Ok(true),
        }
    }

    fn update(&mut self, _stepped: bool) -> Result<()> {
        if let Some(s) = &mut self.scaler {
            s.update()?;
            self.scale = Some(s.scale_value()?);
        }
        Ok(())
    }

    fn loss_scale(&self) -> Option<f64> {
        self.scale
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .scaler
            .as_ref()
            .map(|s| {
                s.state()
                    .into_iter()
                    .map(|(n, t)| (format!("scaler.{n}"), t))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        if let Some(s) = &mut self.scaler {
            let own: Vec<(String, Tensor)> = state
                .iter()
                .filter_map(|(n, t)| {
                    n.strip_prefix("scaler.")
                        .map(|n| (n.to_string(), t.shallow_clone()))
                })
                .collect();
            if own.is_empty() {
                // A checkpoint of another precision (or from before loss scaling): start
                // from the initial scale, as a fresh GradScaler would.
                tracing::warn!(
                    "the checkpoint has no loss-scaler state: starting from the initial scale"
                );
            } else {
                s.load_state(&own).context("restoring the loss scaler")?;
            }
            self.scale = Some(s.scale_value()?);
        }
        Ok(())
    }
}

/// The reduced type `train.precision_dtype` names.
pub fn reduced_kind(name: &str) -> Result<Kind> {
    match name {
        "float16" => Ok(Kind::Half),
        "bfloat16" => Ok(Kind::BFloat16),
        other => Err(anyhow!(
            "train.precision_dtype '{other}' is not one of 'float16', 'bfloat16'"
        )),
    }
}

/// The policy `train.precision` and `train.precision_dtype` ask for on `device`.
pub fn from_config(config: &crate::config::Config, device: Device) -> Result<Box<dyn Precision>> {
    let level = config.str("train.precision");
    if level == "O0" {
        return Ok(Box::new(Float32));
    }
    let dtype = reduced_kind(config.str("train.precision_dtype"))?;
    Ok(Box::new(Mixed::new(level, dtype, device)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str, t: Tensor, trainable: bool) -> NamedTensor {
        NamedTensor {
            name: name.into(),
            tensor: t,
            trainable,
        }
    }

    fn model() -> Vec<NamedTensor> {
        let p =
            |shape: &[i64]| Tensor::ones(shape, (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = |shape: &[i64]| Tensor::ones(shape, (Kind::Float, Device::Cpu));
        vec![
            named("conv.weight", p(&[2, 1, 1, 1]), true),
            named("bn.weight", p(&[2]), true),
            named("bn.bias", p(&[2]), true),
            named("bn.running_mean", b(&[2]), false),
            named("bn.running_var", b(&[2]), false),
            named("fc.weight", p(&[3, 2]), true),
        ]
    }

    /// One forward/backward of a conv + BatchNorm + linear model; whether the logits came out
    /// in bfloat16, and the gradients the optimizer would read.
    fn run_step(policy: &mut dyn Precision, tensors: &[NamedTensor]) -> (bool, Vec<Tensor>) {
        let x = Tensor::ones([4, 1, 2, 2], (Kind::Float, Device::Cpu));
        let labels = Tensor::from_slice(&[0i64, 1, 2, 0]);
        let mut out = None;
        policy
            .forward(&mut || {
                let t = |i: usize| &tensors[i].tensor;
                let y = x.conv2d(t(0), None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
                let y = y.batch_norm(
                    Some(t(1)),
                    Some(t(2)),
                    Some(t(3)),
                    Some(t(4)),
                    true,
                    0.1,
                    1e-5,
                    false,
                );
                let logits = y
                    .mean_dim([2i64, 3].as_slice(), false, None)
                    .linear(t(5), None::<Tensor>);
                out = Some((
                    logits.kind() == Kind::BFloat16,
                    logits.cross_entropy_for_logits(&labels),
                ));
                Ok(())
            })
            .unwrap();
        let (bf16, loss) = out.unwrap();
        policy.backward(&loss).unwrap();
        (bf16, policy.gradients(tensors).unwrap())
    }

    #[test]
    fn levels_choose_their_dtypes() {
        for (level, logits_bf16, weight_kind, bn_kind) in [
            ("O1", true, Kind::Float, Kind::Float),
            ("O2", true, Kind::Float, Kind::Float),
            ("O3", true, Kind::BFloat16, Kind::BFloat16),
        ] {
            let tensors = model();
            let mut p = Mixed::new(level, Kind::BFloat16, Device::Cpu).unwrap();
            p.prepare(&tensors).unwrap();
            assert!(p.loss_scale().is_none(), "bfloat16 does not scale");
            let (bf16, grads) = run_step(&mut p, &tensors);
            assert_eq!(bf16, logits_bf16, "{level}");
            assert_eq!(tensors[0].tensor.kind(), weight_kind, "{level} conv weight");
            assert_eq!(tensors[1].tensor.kind(), bn_kind, "{level} bn weight");
            // The gradients the optimizer reads have the dtype of the weights it steps.
            assert_eq!(grads.len(), 4, "{level}");
            for (g, t) in grads.iter().zip(tensors.iter().filter(|t| t.trainable)) {
                assert_eq!(g.kind(), t.tensor.kind(), "{level} {}", t.name);
            }
        }
    }

    #[test]
    fn float16_o1_scales_and_checkpoints_the_scale() {
        let tensors = model();
        let mut p = Mixed::new("O1", Kind::Half, Device::Cpu).unwrap();
        p.prepare(&tensors).unwrap();
        assert_eq!(p.loss_scale(), Some(65536.0));
        let (_, grads) = run_step(&mut p, &tensors);
        let scaled = grads[3].abs().sum(Kind::Float).double_value(&[]);
        assert!(p.unscale(&grads).unwrap());
        let unscaled = grads[3].abs().sum(Kind::Float).double_value(&[]);
        assert!(
            (scaled / unscaled - 65536.0).abs() < 1.0,
            "{scaled} {unscaled}"
        );
        let _ = grads[0].shallow_clone().fill_(f64::INFINITY);
        assert!(!p.unscale(&grads).unwrap());
        p.update(false).unwrap();
        assert_eq!(p.loss_scale(), Some(32768.0));
        let state = p.state().unwrap();
        let mut q = Mixed::new("O1", Kind::Half, Device::Cpu).unwrap();
        q.load_state(&state).unwrap();
        assert_eq!(q.loss_scale(), Some(32768.0));
    }

    #[test]
    fn batch_norm_tensors_are_those_beside_running_stats() {
        let bn = batch_norm_tensors(&model());
        let mut names: Vec<&str> = bn.iter().map(String::as_str).collect();
        names.sort();
        assert_eq!(
            names,
            ["bn.bias", "bn.running_mean", "bn.running_var", "bn.weight"]
        );
    }

    #[test]
    fn a_dtype_the_device_cannot_run_is_a_clear_error() {
        // No kernel computes a convolution in 8-bit integers: the request fails up front.
        let err = Mixed::new("O3", Kind::Int8, Device::Cpu).err().unwrap();
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with("train.precision O3 with train.precision_dtype")
                && msg.contains("cannot run on the CPU"),
            "{msg}"
        );
    }
}
