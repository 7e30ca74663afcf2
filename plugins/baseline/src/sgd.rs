//! `torch.optim.SGD` with momentum, dampening 0, optional Nesterov and per-group weight decay,
//! step for step as PyTorch computes it.

use imgclf_plugin_api::{
    ComponentInfo, ConfigView, Error, Kind, NamedTensor, Optimizer, OptimizerFactory, ParamGroup,
    Result,
};
use tch::Tensor;

/// One parameter: its name, the parameter (a view into the flat buffer when flattened), its
/// weight decay, and whether its momentum buffer exists yet (PyTorch creates it at the first
/// step that has a gradient).
struct Param {
    name: String,
    tensor: Tensor,
    weight_decay: f64,
    offset: i64,
    numel: i64,
    has_buffer: bool,
}

/// All parameters in one contiguous buffer, so a step is a handful of kernels over one tensor
/// instead of several per parameter (PyTorch gets the same effect on CUDA from its
/// multi-tensor `foreach` kernels, which libtorch's C API does not expose).
struct Flat {
    params: Tensor,
    weight_decay: Tensor,
    momentum: Tensor,
}

pub struct Sgd {
    momentum: f64,
    nesterov: bool,
    params: Vec<Param>,
    flat: Flat,
}

impl Sgd {
    pub fn new(groups: Vec<ParamGroup>, momentum: f64, nesterov: bool) -> Result<Self> {
        if nesterov && momentum <= 0.0 {
            return Err(Error::msg(
                "train.nesterov needs train.momentum > 0 (as torch.optim.SGD requires)",
            ));
        }
        let mut params = Vec::new();
        let mut offset = 0;
        for g in groups {
            for p in g.params {
                let numel = p.tensor.numel() as i64;
                params.push(Param {
                    name: p.name,
                    tensor: p.tensor,
                    weight_decay: g.weight_decay,
                    offset,
                    numel,
                    has_buffer: false,
                });
                offset += numel;
            }
        }
        let (kind, device) = params
            .first()
            .map(|p| (p.tensor.kind(), p.tensor.device()))
            .unwrap_or((tch::Kind::Float, tch::Device::Cpu));
        if let Some(p) = params
            .iter()
            .find(|p| p.tensor.kind() != kind || p.tensor.device() != device)
        {
            return Err(Error(format!(
                "parameter `{}` is {:?} on {:?}, the others {kind:?} on {device:?}: SGD needs one dtype and device",
                p.name,
                p.tensor.kind(),
                p.tensor.device()
            )));
        }
        let flat_params = Tensor::zeros([offset], (kind, device));
        let decay: Vec<Tensor> = params
            .iter()
            .map(|p| Tensor::full([p.numel], p.weight_decay, (kind, device)))
            .collect();
        tch::no_grad(|| -> Result<()> {
            for p in &mut params {
                let view = flat_params
                    .narrow(0, p.offset, p.numel)
                    .view(p.tensor.size().as_slice());
                view.shallow_clone().f_copy_(&p.tensor)?;
                // Re-home the parameter's data into the flat buffer; the model holds the same
                // tensor object, so it trains the flat buffer from now on.
                p.tensor.f_set_data(&view)?;
            }
            Ok(())
        })?;
        let weight_decay = if decay.is_empty() {
            Tensor::zeros([0], (kind, device))
        } else {
            Tensor::cat(&decay, 0)
        };
        let flat = Flat {
            params: flat_params,
            weight_decay,
            momentum: Tensor::zeros([offset], (kind, device)),
        };
        Ok(Sgd {
            momentum,
            nesterov,
            params,
            flat,
        })
    }

    fn buffer(&self, p: &Param) -> Tensor {
        self.flat
            .momentum
            .narrow(0, p.offset, p.numel)
            .view(p.tensor.size().as_slice())
    }

    /// `d = g + wd * p`, momentum, Nesterov and the update on one tensor (every gradient defined).
    /// A buffer that does not exist yet is zero, so `m * 0 + d` equals PyTorch's `clone(d)`.
    fn step_flat(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        let flat_grads: Vec<Tensor> = grads.iter().map(|g| g.reshape([-1])).collect();
        let mut d = Tensor::f_cat(&flat_grads, 0)?;
        if self.params.iter().any(|p| p.weight_decay != 0.0) {
            d = d.f_addcmul(&self.flat.weight_decay, &self.flat.params)?;
        }
        if self.momentum != 0.0 {
            let _ = self
                .flat
                .momentum
                .f_mul_scalar_(self.momentum)?
                .f_add_(&d)?;
            d = if self.nesterov {
                d.f_add(&self.flat.momentum.f_mul_scalar(self.momentum)?)?
            } else {
                self.flat.momentum.shallow_clone()
            };
            self.params.iter_mut().for_each(|p| p.has_buffer = true);
        }
        let _ = self.flat.params.f_sub_(&d.f_mul_scalar(lr)?)?;
        Ok(())
    }

    /// The same per parameter, skipping parameters without a gradient as PyTorch does.
    fn step_each(&mut self, lr: f64) -> Result<()> {
        for i in 0..self.params.len() {
            let g = self.params[i].tensor.grad();
            if !g.defined() {
                continue;
            }
            let p = &self.params[i];
            let mut d = if p.weight_decay != 0.0 {
                g.f_add(&p.tensor.f_mul_scalar(p.weight_decay)?)?
            } else {
                g
            };
            if self.momentum != 0.0 {
                let mut buf = self.buffer(p);
                if p.has_buffer {
                    let _ = buf.f_mul_scalar_(self.momentum)?.f_add_(&d)?;
                } else {
                    buf.f_copy_(&d)?;
                }
                d = if self.nesterov {
                    d.f_add(&buf.f_mul_scalar(self.momentum)?)?
                } else {
                    buf
                };
                self.params[i].has_buffer = true;
            }
            let _ = self.params[i]
                .tensor
                .shallow_clone()
                .f_sub_(&d.f_mul_scalar(lr)?)?;
        }
        Ok(())
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, lr: f64) -> Result<()> {
        tch::no_grad(|| {
            let grads: Vec<Tensor> = self.params.iter().map(|p| p.tensor.grad()).collect();
            if grads.iter().all(Tensor::defined) {
                self.step_flat(&grads, lr)
            } else {
                self.step_each(lr)
            }
        })
    }

    fn state(&self) -> Vec<NamedTensor> {
        self.params
            .iter()
            .filter(|p| p.has_buffer)
            .map(|p| NamedTensor {
                name: format!("{}.momentum_buffer", p.name),
                tensor: self.buffer(p),
                trainable: false,
            })
            .collect()
    }

    fn load_state(&mut self, state: Vec<NamedTensor>) -> Result<()> {
        let mut by_name: std::collections::HashMap<String, Tensor> =
            state.into_iter().map(|t| (t.name, t.tensor)).collect();
        for i in 0..self.params.len() {
            let key = format!("{}.momentum_buffer", self.params[i].name);
            if let Some(t) = by_name.remove(&key) {
                let p = &self.params[i];
                if t.size() != p.tensor.size() {
                    return Err(Error(format!(
                        "momentum buffer of `{}` has shape {:?}, the parameter {:?}",
                        p.name,
                        t.size(),
                        p.tensor.size()
                    )));
                }
                tch::no_grad(|| self.buffer(p).f_copy_(&t))?;
                self.params[i].has_buffer = true;
            }
        }
        if let Some(extra) = by_name.keys().next() {
            return Err(Error(format!(
                "optimizer state has an entry `{extra}` for no parameter of this model"
            )));
        }
        Ok(())
    }
}

pub struct SgdFactory;

impl OptimizerFactory for SgdFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Optimizer,
            "sgd",
            "SGD with momentum (train.momentum), Nesterov (train.nesterov) and weight decay",
        )
    }

    fn build(&self, config: &ConfigView, groups: Vec<ParamGroup>) -> Result<Box<dyn Optimizer>> {
        Ok(Box::new(Sgd::new(
            groups,
            config.float("train.momentum")?,
            config.bool("train.nesterov")?,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind as K;

    fn param(values: &[f32]) -> NamedTensor {
        NamedTensor {
            name: "w".into(),
            tensor: Tensor::from_slice(values).set_requires_grad(true),
            trainable: true,
        }
    }

    #[test]
    fn nesterov_momentum_weight_decay_match_hand_computation() {
        let p = param(&[1.0, -2.0]);
        let w = p.tensor.shallow_clone();
        let mut opt = Sgd::new(
            vec![ParamGroup {
                weight_decay: 0.1,
                params: vec![p],
            }],
            0.9,
            true,
        )
        .unwrap();
        // Step 1: grad g1 = [0.5, 0.5]. d = g + wd*w = [0.6, 0.3]; buf = d; nesterov d' = d + 0.9*buf = 1.9 d.
        let loss = (&w * Tensor::from_slice(&[0.5f32, 0.5])).sum(K::Float);
        loss.backward();
        opt.step(0.1).unwrap();
        let got = Vec::<f32>::try_from(&w.detach()).unwrap();
        let exp = [1.0 - 0.1 * 1.9 * 0.6, -2.0 - 0.1 * 1.9 * 0.3];
        for (g, e) in got.iter().zip(exp) {
            assert!((g - e as f32).abs() < 1e-6, "{got:?} vs {exp:?}");
        }
        // Step 2 with the same gradient: buf2 = 0.9*buf1 + d2.
        let w1: Vec<f64> = got.iter().map(|&v| v as f64).collect();
        let d2: Vec<f64> = w1.iter().map(|v| 0.5 + 0.1 * v).collect();
        let buf1 = [0.6, 0.3];
        let buf2: Vec<f64> = buf1.iter().zip(&d2).map(|(b, d)| 0.9 * b + d).collect();
        let exp2: Vec<f64> = (0..2)
            .map(|i| w1[i] - 0.1 * (d2[i] + 0.9 * buf2[i]))
            .collect();
        let _ = w.grad().zero_();
        let loss = (&w * Tensor::from_slice(&[0.5f32, 0.5])).sum(K::Float);
        loss.backward();
        opt.step(0.1).unwrap();
        let got = Vec::<f32>::try_from(&w.detach()).unwrap();
        for (g, e) in got.iter().zip(&exp2) {
            assert!((*g as f64 - e).abs() < 1e-6, "{got:?} vs {exp2:?}");
        }
        // State round trip: a fresh optimizer with the saved buffer continues identically.
        let state = opt.state();
        assert_eq!(state.len(), 1);
        assert_eq!(state[0].name, "w.momentum_buffer");
        let p2 = param(&[0.0, 0.0]);
        let mut opt2 = Sgd::new(
            vec![ParamGroup {
                weight_decay: 0.1,
                params: vec![p2],
            }],
            0.9,
            true,
        )
        .unwrap();
        opt2.load_state(state).unwrap();
        assert_eq!(opt2.state()[0].tensor.size(), vec![2]);
    }

    #[test]
    fn plain_momentum_without_nesterov_uses_buffer() {
        let p = param(&[1.0]);
        let w = p.tensor.shallow_clone();
        let mut opt = Sgd::new(
            vec![ParamGroup {
                weight_decay: 0.0,
                params: vec![p],
            }],
            0.9,
            false,
        )
        .unwrap();
        for _ in 0..2 {
            if w.grad().defined() {
                let _ = w.grad().zero_();
            }
            (&w * 2.0).sum(K::Float).backward();
            opt.step(1.0).unwrap();
        }
        // buf1 = 2, w = -1; buf2 = 0.9*2 + 2 = 3.8, w = -4.8
        assert!((w.double_value(&[0]) + 4.8).abs() < 1e-6);
    }

    #[test]
    fn flat_and_per_parameter_steps_agree_and_params_without_grad_are_untouched() {
        let make = || {
            let a = Tensor::from_slice(&[0.5f32, -1.5, 2.0])
                .view([3, 1])
                .set_requires_grad(true);
            let b = Tensor::from_slice(&[3.0f32]).set_requires_grad(true);
            let unused = Tensor::from_slice(&[7.0f32]).set_requires_grad(true);
            let named = |n: &str, t: &Tensor| NamedTensor {
                name: n.into(),
                tensor: t.shallow_clone(),
                trainable: true,
            };
            let groups = vec![
                ParamGroup {
                    weight_decay: 0.01,
                    params: vec![named("a", &a), named("b", &b)],
                },
                ParamGroup {
                    weight_decay: 0.0,
                    params: vec![named("unused", &unused)],
                },
            ];
            (a, b, unused, Sgd::new(groups, 0.9, true).unwrap())
        };
        let loss = |a: &Tensor, b: &Tensor| (a * a).sum(K::Float) * b;
        // Flat path: every parameter gets a gradient (the unused one a zero gradient).
        let (a1, b1, u1, mut flat) = make();
        // Per-parameter path: `unused` has no gradient at all.
        let (a2, b2, u2, mut each) = make();
        for _ in 0..3 {
            for t in [&a1, &b1, &u1, &a2, &b2] {
                if t.grad().defined() {
                    let _ = t.grad().zero_();
                }
            }
            (loss(&a1, &b1) + &u1 * 0.0).sum(K::Float).backward();
            loss(&a2, &b2).backward();
            flat.step(0.1).unwrap();
            each.step(0.1).unwrap();
        }
        assert!(a1.allclose(&a2, 1e-6, 1e-6, false) && b1.allclose(&b2, 1e-6, 1e-6, false));
        assert_eq!(
            u2.double_value(&[0]),
            7.0,
            "no gradient, no update (as PyTorch)"
        );
        assert_eq!(
            each.state().len(),
            2,
            "no momentum buffer for a parameter that never had a gradient"
        );
        assert_eq!(flat.state().len(), 3);
    }

    #[test]
    fn nesterov_without_momentum_is_refused() {
        assert!(Sgd::new(vec![], 0.0, true).is_err());
    }
}
