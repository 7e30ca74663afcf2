//! `torch.optim.SGD` with momentum, dampening 0, optional Nesterov and per-group weight decay,
//! step for step as PyTorch computes it.

use imgclf_plugin_api::optim::{defined_grads, fused_sgd_, group_by, SgdStep};
use imgclf_plugin_api::{
    ComponentInfo, ConfigView, Error, Kind, NamedTensor, Optimizer, OptimizerFactory, ParamGroup,
    Result,
};
use tch::Tensor;

/// One parameter, its weight decay, and its momentum buffer (PyTorch creates it at the first
/// step that has a gradient).
struct Param {
    name: String,
    tensor: Tensor,
    weight_decay: f64,
    buffer: Option<Tensor>,
}

/// A step is one `_fused_sgd_` call per set of parameters sharing a weight decay and a buffer
/// state (usually one or two calls in all), over the gradients autograd produced: no
/// per-parameter kernels, no copy of the gradients into a flat buffer, and the parameters keep
/// their memory format (channels_last included).
pub struct Sgd {
    momentum: f64,
    nesterov: bool,
    params: Vec<Param>,
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
                let wd = g.weight_decay;
                g.params.into_iter().map(move |p| Param {
                    name: p.name,
                    tensor: p.tensor,
                    weight_decay: wd,
                    buffer: None,
                })
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
    /// PyTorch's SGD step; parameters without a gradient are skipped, as PyTorch does.
    fn step(&mut self, lr: f64) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            let all: Vec<Tensor> = self
                .params
                .iter()
                .map(|p| p.tensor.shallow_clone())
                .collect();
            let (index, grads) = defined_grads(&all);
            // Sets of parameters one kernel call can update: same weight decay, and either all
            // with a momentum buffer or all without one yet (`is_first_step`).
            let sets = group_by(index.iter().map(|&i| {
                let p = &self.params[i];
                (p.weight_decay.to_bits(), p.buffer.is_none())
            }));
            for ((wd, first), members) in sets {
                let first = first && self.momentum != 0.0;
                let mut params = Vec::with_capacity(members.len());
                let mut set_grads = Vec::with_capacity(members.len());
                let mut buffers = Vec::new();
                for &k in &members {
                    let p = &mut self.params[index[k]];
                    params.push(p.tensor.shallow_clone());
                    set_grads.push(grads[k].shallow_clone());
                    if self.momentum != 0.0 {
                        let b = p.buffer.get_or_insert_with(|| grads[k].zeros_like());
                        buffers.push(b.shallow_clone());
                    }
                }
                let h = SgdStep {
                    lr,
                    weight_decay: f64::from_bits(wd),
                    momentum: self.momentum,
                    dampening: 0.0,
                    nesterov: self.nesterov,
                    maximize: false,
                    is_first_step: first,
                };
                fused_sgd_(&params, &set_grads, &buffers, h, None, None)?;
            }
            Ok(())
        })
    }

    fn state(&self) -> Vec<NamedTensor> {
        self.params
            .iter()
            .filter_map(|p| {
                p.buffer.as_ref().map(|b| NamedTensor {
                    name: format!("{}.momentum_buffer", p.name),
                    tensor: b.shallow_clone(),
                    trainable: false,
                })
            })
            .collect()
    }

    fn load_state(&mut self, state: Vec<NamedTensor>) -> Result<()> {
        let mut by_name: std::collections::HashMap<String, Tensor> =
            state.into_iter().map(|t| (t.name, t.tensor)).collect();
        for p in &mut self.params {
            let key = format!("{}.momentum_buffer", p.name);
            if let Some(t) = by_name.remove(&key) {
                if t.size() != p.tensor.size() {
                    return Err(Error(format!(
                        "momentum buffer of `{}` has shape {:?}, the parameter {:?}",
                        p.name,
                        t.size(),
                        p.tensor.size()
                    )));
                }
                // Same dtype, device and memory format as the parameter (and its gradients).
                let buf = p.tensor.zeros_like();
                tch::no_grad(|| buf.shallow_clone().f_copy_(&t))?;
                p.buffer = Some(buf);
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
        imgclf_plugin_api::optim::release_grads(&[w.shallow_clone()]).unwrap();
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
    fn groups_and_parameters_without_grad_follow_pytorch() {
        // a and b share a weight decay, c has its own; `unused` never gets a gradient; `late`
        // gets its first gradient at the third step (a new buffer among existing ones).
        let a = Tensor::from_slice(&[0.5f32, -1.5, 2.0])
            .view([3, 1])
            .set_requires_grad(true);
        let b = Tensor::from_slice(&[3.0f32]).set_requires_grad(true);
        let c = Tensor::from_slice(&[-1.0f32, 1.0]).set_requires_grad(true);
        let unused = Tensor::from_slice(&[7.0f32]).set_requires_grad(true);
        let late = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let named = |n: &str, t: &Tensor| NamedTensor {
            name: n.into(),
            tensor: t.shallow_clone(),
            trainable: true,
        };
        let groups = vec![
            ParamGroup {
                weight_decay: 0.01,
                params: vec![named("a", &a), named("b", &b), named("late", &late)],
            },
            ParamGroup {
                weight_decay: 0.0,
                params: vec![named("c", &c), named("unused", &unused)],
            },
        ];
        let mut opt = Sgd::new(groups, 0.9, true).unwrap();
        // The same in plain f64, element by element (PyTorch's single-tensor formula).
        let mut w: Vec<Vec<f64>> =
            vec![vec![0.5, -1.5, 2.0], vec![3.0], vec![-1.0, 1.0], vec![1.0]];
        let wd = [0.01, 0.01, 0.0, 0.01];
        let mut buf: Vec<Option<Vec<f64>>> = vec![None; 4];
        for step in 0..4 {
            for t in [&a, &b, &c, &late] {
                imgclf_plugin_api::optim::release_grads(&[t.shallow_clone()]).unwrap();
            }
            let mut loss = (&a * &a).sum(K::Float) * &b + (&c * 2.0).sum(K::Float);
            if step >= 2 {
                loss += (&late * &late).sum(K::Float);
            }
            loss.backward();
            // Gradients of the f64 copy: d(a^2 b)/da = 2ab, /db = sum a^2, dc = 2, dlate = 2 late.
            let bsum: f64 = w[0].iter().map(|v| v * v).sum();
            let g: Vec<Option<Vec<f64>>> = vec![
                Some(w[0].iter().map(|v| 2.0 * v * w[1][0]).collect()),
                Some(vec![bsum]),
                Some(vec![2.0, 2.0]),
                (step >= 2).then(|| vec![2.0 * w[3][0]]),
            ];
            opt.step(0.1).unwrap();
            for i in 0..4 {
                let Some(g) = &g[i] else { continue };
                let d: Vec<f64> = g.iter().zip(&w[i]).map(|(g, p)| g + wd[i] * p).collect();
                let bf = match buf[i].take() {
                    None => d.clone(),
                    Some(b) => b.iter().zip(&d).map(|(b, d)| 0.9 * b + d).collect(),
                };
                for (k, p) in w[i].iter_mut().enumerate() {
                    *p -= 0.1 * (d[k] + 0.9 * bf[k]);
                }
                buf[i] = Some(bf);
            }
        }
        for (t, e) in [&a, &b, &c, &late].iter().zip(&w) {
            let got = Vec::<f32>::try_from(&t.detach().flatten(0, -1)).unwrap();
            for (g, e) in got.iter().zip(e) {
                assert!(
                    (*g as f64 - e).abs() < 1e-5 * e.abs().max(1.0),
                    "{got:?} vs {e:?}"
                );
            }
        }
        assert_eq!(
            unused.double_value(&[0]),
            7.0,
            "no gradient, no update (as PyTorch)"
        );
        let names: Vec<String> = opt.state().into_iter().map(|t| t.name).collect();
        assert_eq!(
            names,
            [
                "a.momentum_buffer",
                "b.momentum_buffer",
                "late.momentum_buffer",
                "c.momentum_buffer"
            ],
            "no momentum buffer for a parameter that never had a gradient"
        );
    }

    #[test]
    fn nesterov_without_momentum_is_refused() {
        assert!(Sgd::new(vec![], 0.0, true).is_err());
    }
}
