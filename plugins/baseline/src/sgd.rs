//! `torch.optim.SGD` with momentum, dampening 0, optional Nesterov and per-group weight decay,
//! step for step as PyTorch computes it.

use imgclf_plugin_api::{
    ComponentInfo, ConfigView, Error, Kind, NamedTensor, Optimizer, OptimizerFactory, ParamGroup,
    Result,
};
use tch::Tensor;

pub struct Sgd {
    momentum: f64,
    nesterov: bool,
    /// (name, parameter, weight decay, momentum buffer once the first step made it).
    params: Vec<(String, Tensor, f64, Option<Tensor>)>,
}

impl Sgd {
    pub fn new(groups: Vec<ParamGroup>, momentum: f64, nesterov: bool) -> Result<Self> {
        if nesterov && momentum <= 0.0 {
            return Err(Error::msg(
                "train.nesterov needs train.momentum > 0 (as torch.optim.SGD requires)",
            ));
        }
        let params = groups
            .into_iter()
            .flat_map(|g| {
                g.params
                    .into_iter()
                    .map(move |p| (p.name, p.tensor, g.weight_decay, None))
            })
            .collect();
        Ok(Sgd {
            momentum,
            nesterov,
            params,
        })
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, lr: f64) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for (_, p, wd, buf) in &mut self.params {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut d_p = if *wd != 0.0 {
                    g.f_add(&(&*p * *wd))?
                } else {
                    g
                };
                if self.momentum != 0.0 {
                    let b = match buf {
                        Some(b) => {
                            let _ = b.f_mul_scalar_(self.momentum)?.f_add_(&d_p)?;
                            b.shallow_clone()
                        }
                        None => {
                            let b = d_p.detach().copy();
                            *buf = Some(b.shallow_clone());
                            b
                        }
                    };
                    d_p = if self.nesterov {
                        d_p.f_add(&(&b * self.momentum))?
                    } else {
                        b
                    };
                }
                let _ = p.f_sub_(&(d_p * lr))?;
            }
            Ok(())
        })
    }

    fn state(&self) -> Vec<NamedTensor> {
        self.params
            .iter()
            .filter_map(|(name, _, _, buf)| {
                buf.as_ref().map(|b| NamedTensor {
                    name: format!("{name}.momentum_buffer"),
                    tensor: b.shallow_clone(),
                    trainable: false,
                })
            })
            .collect()
    }

    fn load_state(&mut self, state: Vec<NamedTensor>) -> Result<()> {
        let mut by_name: std::collections::HashMap<String, Tensor> =
            state.into_iter().map(|t| (t.name, t.tensor)).collect();
        for (name, p, _, buf) in &mut self.params {
            if let Some(t) = by_name.remove(&format!("{name}.momentum_buffer")) {
                if t.size() != p.size() {
                    return Err(Error(format!(
                        "momentum buffer of `{name}` has shape {:?}, the parameter {:?}",
                        t.size(),
                        p.size()
                    )));
                }
                *buf = Some(t.to_device(p.device()).to_kind(p.kind()));
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
    fn nesterov_without_momentum_is_refused() {
        assert!(Sgd::new(vec![], 0.0, true).is_err());
    }
}
