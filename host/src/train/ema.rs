//! Weight EMA (`train.ema.*`), as timm's `--model-ema` (`ModelEmaV2`): after every optimizer
//! step, `ema = decay * ema + (1 - decay) * w` for every floating parameter and buffer
//! (integer buffers such as `num_batches_tracked` are copied, as timm's `ModelEmaV3` does).
//! The average starts from the weights training starts from, is saved in checkpoints (under
//! `ema.`) so that resume is exact, can stand in for the weights during validation
//! (`train.ema.eval`), and is what `model_final.safetensors` holds.

use crate::config::Config;
use anyhow::{bail, Context, Result};
use imgclf_plugin_api::NamedTensor;
use tch::Tensor;

/// The checkpoint prefix of the average's tensors.
pub const PREFIX: &str = "ema.";

pub struct Ema {
    decay: f64,
    /// Validate with the average instead of the raw weights.
    pub eval: bool,
    /// The average of each model tensor, in the model's order.
    shadow: Vec<(String, Tensor)>,
}

fn copy_of(t: &Tensor) -> Tensor {
    // `copy` keeps the memory format (channels_last models stay so).
    t.detach().copy()
}

impl Ema {
    /// The average `train.ema.enabled` asks for, starting at `tensors`; None when disabled.
    pub fn from_config(c: &Config, tensors: &[NamedTensor]) -> Result<Option<Ema>> {
        if !c.bool("train.ema.enabled") {
            return Ok(None);
        }
        let decay = c.float("train.ema.decay");
        if !(0.0..1.0).contains(&decay) {
            bail!("train.ema.decay must be in [0, 1) (timm's default: 0.9998), got {decay}");
        }
        Ok(Some(Ema::new(decay, c.bool("train.ema.eval"), tensors)))
    }

    pub fn new(decay: f64, eval: bool, tensors: &[NamedTensor]) -> Ema {
        Ema {
            decay,
            eval,
            shadow: tensors
                .iter()
                .map(|t| (t.name.clone(), copy_of(&t.tensor)))
                .collect(),
        }
    }

    pub fn decay(&self) -> f64 {
        self.decay
    }

    /// Restarts the average at `tensors` (the weights training starts from).
    pub fn reset(&mut self, tensors: &[NamedTensor]) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for ((_, e), t) in self.shadow.iter_mut().zip(tensors) {
                e.f_copy_(&t.tensor)?;
            }
            Ok(())
        })
    }

    /// One update after an optimizer step, with timm's arithmetic:
    /// `decay * ema + (1. - decay) * w` (float32 scalars times the tensors, then the sum).
    pub fn update(&mut self, tensors: &[NamedTensor]) -> Result<()> {
        let keep = 1.0 - self.decay;
        tch::no_grad(|| -> Result<()> {
            for ((_, e), t) in self.shadow.iter_mut().zip(tensors) {
                let w = t.tensor.detach();
                if e.is_floating_point() {
                    let v = e.f_mul_scalar(self.decay)?.f_add(&w.f_mul_scalar(keep)?)?;
                    e.f_copy_(&v)?;
                } else {
                    e.f_copy_(&w)?;
                }
            }
            Ok(())
        })
    }

    /// The average under the model's tensor names.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.shadow
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()
    }

    /// What a checkpoint saves (names under [`PREFIX`]).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.shadow
            .iter()
            .map(|(n, t)| (format!("{PREFIX}{n}"), t.shallow_clone()))
            .collect()
    }

    /// Restores the average from a checkpoint's tensors; `false` when it has none (a run
    /// trained without EMA), leaving the average as it was.
    pub fn load_state(&mut self, extra: &[(String, Tensor)]) -> Result<bool> {
        let saved: std::collections::HashMap<&str, &Tensor> = extra
            .iter()
            .filter_map(|(n, t)| n.strip_prefix(PREFIX).map(|n| (n, t)))
            .collect();
        if saved.is_empty() {
            return Ok(false);
        }
        tch::no_grad(|| -> Result<()> {
            for (name, e) in &mut self.shadow {
                let s = saved
                    .get(name.as_str())
                    .with_context(|| format!("the checkpoint's EMA lacks {name}"))?;
                e.f_copy_(&s.to_device(e.device()).to_kind(e.kind()))?;
            }
            Ok(())
        })?;
        Ok(true)
    }

    /// Runs `f` with the average in the model's tensors, then puts the raw weights back
    /// exactly (validation with `train.ema.eval`).
    pub fn with_average<T>(
        &self,
        tensors: &[NamedTensor],
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let raw: Vec<Tensor> = tensors.iter().map(|t| copy_of(&t.tensor)).collect();
        let put = |src: &mut dyn Iterator<Item = &Tensor>| {
            tch::no_grad(|| -> Result<()> {
                for (t, s) in tensors.iter().zip(src) {
                    t.tensor.shallow_clone().f_copy_(s)?;
                }
                Ok(())
            })
        };
        put(&mut self.shadow.iter().map(|(_, t)| t))?;
        let out = f();
        put(&mut raw.iter())?;
        out
    }
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

    #[test]
    fn updates_follow_timms_formula_and_copy_integer_buffers() {
        let w = Tensor::from_slice(&[1.0f32, -2.0]);
        let n = Tensor::from_slice(&[3i64]);
        let model = vec![
            named("w", w.shallow_clone(), true),
            named("n", n.shallow_clone(), false),
        ];
        let mut ema = Ema::new(0.9, true, &model);
        let _ = w.shallow_clone().fill_(5.0);
        let _ = n.shallow_clone().fill_(4);
        ema.update(&model).unwrap();
        let t = ema.tensors();
        let expect = |x: f32| 0.9f32 * x + (1.0f64 - 0.9) as f32 * 5.0;
        assert_eq!(
            Vec::<f32>::try_from(&t[0].1).unwrap(),
            [expect(1.0), expect(-2.0)]
        );
        assert_eq!(Vec::<i64>::try_from(&t[1].1).unwrap(), [4]);
        // The average stands in during `with_average` and the raw weights come back.
        let seen = ema
            .with_average(&model, || Ok(Vec::<f32>::try_from(&w).unwrap()))
            .unwrap();
        assert_eq!(seen, [expect(1.0), expect(-2.0)]);
        assert_eq!(Vec::<f32>::try_from(&w).unwrap(), [5.0, 5.0]);
        // A checkpoint round trip.
        let mut other = Ema::new(0.9, true, &model);
        assert!(other.load_state(&ema.state()).unwrap());
        assert!(other.tensors()[0].1.equal(&t[0].1));
        assert!(!other.load_state(&[]).unwrap());
    }
}
