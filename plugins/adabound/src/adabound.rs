//! AdaBound and AdaBoundW exactly as the reference's `optim/adabound.py` computes them.
//!
//! Per parameter, at step `t` with learning rate `lr` (the scheduled rate):
//! `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g²`, `η = lr √(1 - b2ᵗ) / (1 - b1ᵗ)`,
//! `final = final_lr · lr / base_lr` (the bounds follow the schedule),
//! `lower = final (1 - 1/(γ t + 1))`, `upper = final (1 + 1/(γ t))`,
//! `p -= clamp(η / (√v + ε), lower, upper) · m`.
//! `adabound` adds `weight_decay · p` to the gradient (L2); `adaboundw` instead subtracts
//! `weight_decay · p` (taken before the update, not scaled by the rate) after the update.
//!
//! A step is a dozen `_foreach_*` list ops per set of parameters sharing a weight decay and a
//! step count (usually one set): no per-parameter kernels.

use imgclf_plugin_api::optim::{defined_grads, foreach, group_by};
use imgclf_plugin_api::{
    plugin_bail, ComponentInfo, ConfigView, Error, KeyDecl, Kind, NamedTensor, Optimizer,
    OptimizerFactory, ParamGroup, Result,
};
use tch::Tensor;

/// The reference's (and the original code's) default, not configurable there.
pub const EPS: f64 = 1e-8;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hyper {
    pub beta1: f64,
    pub beta2: f64,
    pub final_lr: f64,
    pub gamma: f64,
    pub eps: f64,
    /// `train.base_lr`: the rate the bounds' `final_lr` belongs to.
    pub base_lr: f64,
    /// Decoupled weight decay (AdaBoundW) instead of L2.
    pub decoupled: bool,
}

struct Slot {
    name: String,
    param: Tensor,
    weight_decay: f64,
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

pub struct AdaBound {
    h: Hyper,
    slots: Vec<Slot>,
}

impl AdaBound {
    pub fn new(groups: Vec<ParamGroup>, h: Hyper) -> Result<Self> {
        for (i, b) in [h.beta1, h.beta2].into_iter().enumerate() {
            if !(0.0..1.0).contains(&b) {
                plugin_bail!("optim.adabound.betas[{i}] must be in [0, 1), got {b}");
            }
        }
        if h.final_lr < 0.0 {
            plugin_bail!("optim.adabound.final_lr must be >= 0, got {}", h.final_lr);
        }
        if !(0.0..1.0).contains(&h.gamma) {
            plugin_bail!("optim.adabound.gamma must be in [0, 1), got {}", h.gamma);
        }
        if h.base_lr <= 0.0 {
            plugin_bail!(
                "AdaBound scales optim.adabound.final_lr by lr / train.base_lr: train.base_lr must be > 0, got {}",
                h.base_lr
            );
        }
        let slots = groups
            .into_iter()
            .flat_map(|g| {
                let wd = g.weight_decay;
                g.params.into_iter().map(move |p| Slot {
                    exp_avg: p.tensor.zeros_like(),
                    exp_avg_sq: p.tensor.zeros_like(),
                    name: p.name,
                    param: p.tensor,
                    weight_decay: wd,
                    step: 0,
                })
            })
            .collect();
        Ok(AdaBound { h, slots })
    }
}

const FIELDS: [&str; 2] = ["exp_avg", "exp_avg_sq"];

impl Optimizer for AdaBound {
    fn step(&mut self, lr: f64) -> Result<()> {
        let h = self.h;
        tch::no_grad(|| -> Result<()> {
            let params: Vec<Tensor> = self.slots.iter().map(|s| s.param.shallow_clone()).collect();
            let (index, grads) = defined_grads(&params);
            for &i in &index {
                self.slots[i].step += 1;
            }
            let sets = group_by(index.iter().map(|&i| {
                let s = &self.slots[i];
                (s.weight_decay.to_bits(), s.step)
            }));
            for ((wd, step), members) in sets {
                let wd = f64::from_bits(wd);
                let pick = |f: &dyn Fn(&Slot) -> &Tensor| -> Vec<Tensor> {
                    members
                        .iter()
                        .map(|&k| f(&self.slots[index[k]]).shallow_clone())
                        .collect()
                };
                let (p, m, v) = (
                    pick(&|s| &s.param),
                    pick(&|s| &s.exp_avg),
                    pick(&|s| &s.exp_avg_sq),
                );
                let mut g: Vec<Tensor> =
                    members.iter().map(|&k| grads[k].shallow_clone()).collect();
                if wd != 0.0 && !h.decoupled {
                    g = foreach::add_list(&g, &p, wd)?;
                }
                foreach::mul_scalar_(&m, h.beta1)?;
                foreach::add_list_(&m, &g, 1.0 - h.beta1)?;
                foreach::mul_scalar_(&v, h.beta2)?;
                foreach::addcmul_(&v, &g, &g, 1.0 - h.beta2)?;
                let t = step as f64;
                let step_size = lr * (1.0 - h.beta2.powf(t)).sqrt() / (1.0 - h.beta1.powf(t));
                let final_lr = h.final_lr * lr / h.base_lr;
                let lower = final_lr * (1.0 - 1.0 / (h.gamma * t + 1.0));
                let upper = final_lr * (1.0 + 1.0 / (h.gamma * t));
                // update = clamp(step_size / (sqrt(v) + eps), lower, upper) * m
                let update = foreach::sqrt(&v)?;
                foreach::add_scalar_(&update, h.eps)?;
                foreach::reciprocal_(&update)?;
                foreach::mul_scalar_(&update, step_size)?;
                foreach::clamp_(&update, lower, upper)?;
                foreach::mul_list_(&update, &m)?;
                if wd != 0.0 && h.decoupled {
                    let decayed = foreach::mul_scalar(&p, wd)?;
                    foreach::sub_list_(&p, &update)?;
                    foreach::sub_list_(&p, &decayed)?;
                } else {
                    foreach::sub_list_(&p, &update)?;
                }
            }
            Ok(())
        })
    }

    fn state(&self) -> Vec<NamedTensor> {
        let mut out = Vec::new();
        for s in self.slots.iter().filter(|s| s.step > 0) {
            out.push(NamedTensor {
                name: format!("{}.step", s.name),
                tensor: Tensor::from(s.step as f32),
                trainable: false,
            });
            for (field, t) in FIELDS.iter().zip([&s.exp_avg, &s.exp_avg_sq]) {
                out.push(NamedTensor {
                    name: format!("{}.{field}", s.name),
                    tensor: t.shallow_clone(),
                    trainable: false,
                });
            }
        }
        out
    }

    fn load_state(&mut self, state: Vec<NamedTensor>) -> Result<()> {
        let mut by_name: std::collections::HashMap<String, Tensor> =
            state.into_iter().map(|t| (t.name, t.tensor)).collect();
        for s in &mut self.slots {
            let Some(t) = by_name.remove(&format!("{}.step", s.name)) else {
                continue; // no gradient yet when the checkpoint was written
            };
            let v = t.f_double_value(&[])?;
            if v < 1.0 || v.fract() != 0.0 {
                plugin_bail!(
                    "optimizer state `{}.step` is {v}, not a positive step count",
                    s.name
                );
            }
            s.step = v as u64;
            for (field, dst) in FIELDS.iter().zip([&mut s.exp_avg, &mut s.exp_avg_sq]) {
                let key = format!("{}.{field}", s.name);
                let src = by_name.remove(&key).ok_or_else(|| {
                    Error(format!(
                        "optimizer state has `{}.step` but no `{key}`: the checkpoint is incomplete",
                        s.name
                    ))
                })?;
                if src.size() != s.param.size() {
                    plugin_bail!(
                        "optimizer state `{key}` has shape {:?}, the parameter {:?}",
                        src.size(),
                        s.param.size()
                    );
                }
                tch::no_grad(|| dst.f_copy_(&src))?;
            }
        }
        if let Some(extra) = by_name.keys().next() {
            plugin_bail!("optimizer state has an entry `{extra}` for no parameter of this model (was it written by another optimizer?)");
        }
        Ok(())
    }
}

fn keys() -> Vec<KeyDecl> {
    vec![
        KeyDecl::float_list(
            "optim.adabound.betas",
            &[0.9, 0.999],
            "AdaBound running-average coefficients [beta1, beta2]",
        ),
        KeyDecl::float(
            "optim.adabound.final_lr",
            0.1,
            "SGD rate the bounds converge to (scaled by the schedule: lr / train.base_lr)",
        ),
        KeyDecl::float(
            "optim.adabound.gamma",
            1e-3,
            "Convergence speed of the bounds",
        ),
    ]
}

fn hyper(config: &ConfigView, decoupled: bool) -> Result<Hyper> {
    let b = config.float_list("optim.adabound.betas")?;
    if b.len() != 2 {
        plugin_bail!("optim.adabound.betas must be two numbers [beta1, beta2], got {b:?}");
    }
    Ok(Hyper {
        beta1: b[0],
        beta2: b[1],
        final_lr: config.float("optim.adabound.final_lr")?,
        gamma: config.float("optim.adabound.gamma")?,
        eps: EPS,
        base_lr: config.float("train.base_lr")?,
        decoupled,
    })
}

pub struct AdaBoundFactory;

impl OptimizerFactory for AdaBoundFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Optimizer,
            "adabound",
            "AdaBound: Adam with rate bounds converging to SGD's, L2 weight decay",
        )
        .papers(&["1902.09843"])
        .keys(keys())
    }

    fn build(&self, config: &ConfigView, groups: Vec<ParamGroup>) -> Result<Box<dyn Optimizer>> {
        Ok(Box::new(AdaBound::new(groups, hyper(config, false)?)?))
    }
}

pub struct AdaBoundWFactory;

impl OptimizerFactory for AdaBoundWFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Optimizer,
            "adaboundw",
            "AdaBoundW: AdaBound with decoupled weight decay (p -= weight_decay * p per step)",
        )
        .papers(&["1902.09843", "1711.05101"])
        .keys(keys())
    }

    fn build(&self, config: &ConfigView, groups: Vec<ParamGroup>) -> Result<Box<dyn Optimizer>> {
        Ok(Box::new(AdaBound::new(groups, hyper(config, true)?)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind as K;

    fn hyper(decoupled: bool) -> Hyper {
        Hyper {
            beta1: 0.9,
            beta2: 0.999,
            final_lr: 0.1,
            gamma: 1e-3,
            eps: EPS,
            base_lr: 0.01,
            decoupled,
        }
    }

    fn setup(values: &[f32], wd: f64, h: Hyper) -> (Tensor, AdaBound) {
        let w = Tensor::from_slice(values).set_requires_grad(true);
        let groups = vec![ParamGroup {
            weight_decay: wd,
            params: vec![NamedTensor {
                name: "w".into(),
                tensor: w.shallow_clone(),
                trainable: true,
            }],
        }];
        (w, AdaBound::new(groups, h).unwrap())
    }

    fn step(w: &Tensor, opt: &mut AdaBound, g: &[f64], lr: f64) -> Vec<f64> {
        if w.grad().defined() {
            let _ = w.grad().zero_();
        }
        let g32: Vec<f32> = g.iter().map(|&v| v as f32).collect();
        (w * Tensor::from_slice(&g32)).sum(K::Float).backward();
        opt.step(lr).unwrap();
        Vec::<f32>::try_from(&w.detach())
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    }

    /// The reference's update in plain f64.
    fn expected(w: &mut [f64], grads: &[Vec<f64>], lrs: &[f64], wd: f64, h: Hyper) {
        let n = w.len();
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        for (k, (g, &lr)) in grads.iter().zip(lrs).enumerate() {
            let t = (k + 1) as f64;
            let eta = lr * (1.0 - h.beta2.powf(t)).sqrt() / (1.0 - h.beta1.powf(t));
            let fin = h.final_lr * lr / h.base_lr;
            let (lo, hi) = (
                fin * (1.0 - 1.0 / (h.gamma * t + 1.0)),
                fin * (1.0 + 1.0 / (h.gamma * t)),
            );
            for i in 0..n {
                let gi = if h.decoupled { g[i] } else { g[i] + wd * w[i] };
                m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * gi;
                v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * gi * gi;
                let rate = (eta / (v[i].sqrt() + h.eps)).clamp(lo, hi);
                let decayed = if h.decoupled { wd * w[i] } else { 0.0 };
                w[i] -= rate * m[i] + decayed;
            }
        }
    }

    #[test]
    fn first_step_lower_bound_clamps_small_adam_rates() {
        // Step 1: eta / (|g| + eps) = lr * sqrt(0.001) / 0.1 / |g|; the lower bound
        // 0.1 * (1 - 1/1.001) ~ 1e-4 binds for |g| > 1e3, the upper one never does here.
        let h = hyper(false);
        let (w, mut opt) = setup(&[1.0, 1.0], 0.0, h);
        let got = step(&w, &mut opt, &[1e4, 0.01], 0.01);
        let m = [1e3, 0.001]; // (1 - b1) g
        let eta = 0.01 * 0.001f64.sqrt() / 0.1;
        let lower = 0.1 * (1.0 - 1.0 / 1.001);
        // sqrt(v_hat) = |g|: v = (1 - b2) g^2, and eta carries sqrt(1 - b2).
        let r0 = (eta / (1e4 * 0.001f64.sqrt() + EPS)).max(lower);
        assert_eq!(r0, lower, "the lower bound binds for g = 1e4");
        let r1 = (eta / (0.01 * 0.001f64.sqrt() + EPS)).clamp(lower, 0.1 * 1001.0);
        let exp = [1.0 - r0 * m[0], 1.0 - r1 * m[1]];
        for (g, e) in got.iter().zip(exp) {
            assert!((g - e).abs() < 1e-6, "{got:?} vs {exp:?}");
        }
    }

    #[test]
    fn three_steps_with_schedule_and_both_weight_decays_match_the_reference() {
        let grads = vec![
            vec![0.5, -2.0, 1e-4],
            vec![0.4, 1.0, -1e-4],
            vec![-0.3, 0.2, 0.0],
        ];
        let lrs = [0.01, 0.005, 0.001];
        for decoupled in [false, true] {
            let h = hyper(decoupled);
            let (w, mut opt) = setup(&[1.0, -0.5, 0.25], 0.05, h);
            let mut got = vec![];
            for (g, &lr) in grads.iter().zip(&lrs) {
                got = step(&w, &mut opt, g, lr);
            }
            let mut exp = vec![1.0, -0.5, 0.25];
            expected(&mut exp, &grads, &lrs, 0.05, h);
            for (g, e) in got.iter().zip(&exp) {
                assert!(
                    (g - e).abs() < 1e-6 * e.abs().max(1.0),
                    "decoupled {decoupled}: {got:?} vs {exp:?}"
                );
            }
        }
    }

    #[test]
    fn state_round_trip_resumes_exactly() {
        let grads = [vec![0.3, -0.2], vec![0.1, 0.4], vec![-0.7, 0.05]];
        let h = hyper(true);
        let (w, mut opt) = setup(&[1.0, 2.0], 0.01, h);
        for g in &grads {
            step(&w, &mut opt, g, 0.01);
        }
        let straight = Vec::<f32>::try_from(&w.detach()).unwrap();

        let (w, mut opt) = setup(&[1.0, 2.0], 0.01, h);
        for g in &grads[..2] {
            step(&w, &mut opt, g, 0.01);
        }
        let state: Vec<NamedTensor> = opt
            .state()
            .into_iter()
            .map(|t| NamedTensor {
                tensor: t.tensor.copy(),
                ..t
            })
            .collect();
        let names: Vec<&str> = state.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["w.step", "w.exp_avg", "w.exp_avg_sq"]);
        let values = Vec::<f32>::try_from(&w.detach()).unwrap();
        let (w2, mut opt2) = setup(&values, 0.01, h);
        opt2.load_state(state).unwrap();
        step(&w2, &mut opt2, &grads[2], 0.01);
        assert_eq!(Vec::<f32>::try_from(&w2.detach()).unwrap(), straight);
    }
}
