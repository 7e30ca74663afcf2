//! `torch.optim.Adam`, optionally AMSGrad, with L2 weight decay per parameter group, step for
//! step as PyTorch computes it: one call of ATen's fused Adam kernel (`torch.optim.Adam(fused=
//! True)`) per weight decay, over every parameter with a gradient.

use imgclf_plugin_api::optim::{defined_grads, foreach, fused_adam_, group_by, AdamStep};
use imgclf_plugin_api::{
    plugin_bail, ComponentInfo, ConfigView, Error, KeyDecl, Kind, NamedTensor, Optimizer,
    OptimizerFactory, ParamGroup, Result,
};
use tch::Tensor;

/// `torch.optim.Adam`'s default, which the reference does not change.
pub const EPS: f64 = 1e-8;

/// One parameter and its state (created at its first step with a gradient, as PyTorch does).
struct Slot {
    name: String,
    param: Tensor,
    weight_decay: f64,
    step: u64,
    /// `step` as the float32 scalar on the parameter's device the fused kernel reads.
    step_t: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor,
}

pub struct Adam {
    beta1: f64,
    beta2: f64,
    eps: f64,
    amsgrad: bool,
    slots: Vec<Slot>,
}

impl Adam {
    pub fn new(
        groups: Vec<ParamGroup>,
        betas: (f64, f64),
        eps: f64,
        amsgrad: bool,
    ) -> Result<Self> {
        check_betas(betas, "optim.adam.betas")?;
        let mut slots = Vec::new();
        for g in groups {
            for p in g.params {
                slots.push(Slot {
                    exp_avg: p.tensor.zeros_like(),
                    exp_avg_sq: p.tensor.zeros_like(),
                    max_exp_avg_sq: if amsgrad {
                        p.tensor.zeros_like()
                    } else {
                        Tensor::new()
                    },
                    step_t: Tensor::zeros([], (tch::Kind::Float, p.tensor.device())),
                    name: p.name,
                    param: p.tensor,
                    weight_decay: g.weight_decay,
                    step: 0,
                });
            }
        }
        Ok(Adam {
            beta1: betas.0,
            beta2: betas.1,
            eps,
            amsgrad,
            slots,
        })
    }

    fn state_names(&self) -> &'static [&'static str] {
        if self.amsgrad {
            &["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
        } else {
            &["exp_avg", "exp_avg_sq"]
        }
    }
}

/// `betas` from a config list of two numbers in [0, 1).
pub fn read_betas(config: &ConfigView, key: &str) -> Result<(f64, f64)> {
    let b = config.float_list(key)?;
    if b.len() != 2 {
        plugin_bail!("{key} must be two numbers [beta1, beta2], got {b:?}");
    }
    let betas = (b[0], b[1]);
    check_betas(betas, key)?;
    Ok(betas)
}

fn check_betas(betas: (f64, f64), key: &str) -> Result<()> {
    for (i, b) in [betas.0, betas.1].into_iter().enumerate() {
        if !(0.0..1.0).contains(&b) {
            plugin_bail!("{key}[{i}] must be in [0, 1), got {b}");
        }
    }
    Ok(())
}

impl Optimizer for Adam {
    fn step(&mut self, lr: f64) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            let params: Vec<Tensor> = self.slots.iter().map(|s| s.param.shallow_clone()).collect();
            let (index, grads) = defined_grads(&params);
            if index.is_empty() {
                return Ok(());
            }
            let steps: Vec<Tensor> = index
                .iter()
                .map(|&i| self.slots[i].step_t.shallow_clone())
                .collect();
            foreach::add_scalar_(&steps, 1.0)?;
            for &i in &index {
                self.slots[i].step += 1;
            }
            // One kernel call per weight decay (parameter group).
            let sets = group_by(index.iter().map(|&i| self.slots[i].weight_decay.to_bits()));
            for (wd, members) in sets {
                let pick = |f: &dyn Fn(&Slot) -> &Tensor| -> Vec<Tensor> {
                    members
                        .iter()
                        .map(|&k| f(&self.slots[index[k]]).shallow_clone())
                        .collect()
                };
                let set_grads: Vec<Tensor> =
                    members.iter().map(|&k| grads[k].shallow_clone()).collect();
                let maxes = if self.amsgrad {
                    pick(&|s| &s.max_exp_avg_sq)
                } else {
                    Vec::new()
                };
                let h = AdamStep {
                    lr,
                    beta1: self.beta1,
                    beta2: self.beta2,
                    weight_decay: f64::from_bits(wd),
                    eps: self.eps,
                    amsgrad: self.amsgrad,
                    maximize: false,
                };
                fused_adam_(
                    &pick(&|s| &s.param),
                    &set_grads,
                    &pick(&|s| &s.exp_avg),
                    &pick(&|s| &s.exp_avg_sq),
                    &maxes,
                    &pick(&|s| &s.step_t),
                    h,
                    None,
                    None,
                )?;
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
            for (field, t) in
                self.state_names()
                    .iter()
                    .zip([&s.exp_avg, &s.exp_avg_sq, &s.max_exp_avg_sq])
            {
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
        let names = self.state_names();
        load_slots(
            state,
            self.slots.iter_mut().map(|s| {
                let tensors = [&mut s.exp_avg, &mut s.exp_avg_sq, &mut s.max_exp_avg_sq];
                (&s.name, &s.param, &mut s.step, tensors)
            }),
            names,
        )?;
        for s in &mut self.slots {
            let _ = tch::no_grad(|| s.step_t.f_fill_(s.step as f64))?;
        }
        Ok(())
    }
}

/// Restores `<param>.step` and `<param>.<field>` entries; a parameter without a `step` entry
/// keeps a fresh state (it had no gradient yet when the checkpoint was written).
fn load_slots<'a>(
    state: Vec<NamedTensor>,
    slots: impl Iterator<Item = (&'a String, &'a Tensor, &'a mut u64, [&'a mut Tensor; 3])>,
    fields: &[&str],
) -> Result<()> {
    let mut by_name: std::collections::HashMap<String, Tensor> =
        state.into_iter().map(|t| (t.name, t.tensor)).collect();
    for (name, param, step, tensors) in slots {
        let Some(t) = by_name.remove(&format!("{name}.step")) else {
            continue;
        };
        let v = t.f_double_value(&[])?;
        if v < 1.0 || v.fract() != 0.0 {
            plugin_bail!("optimizer state `{name}.step` is {v}, not a positive step count");
        }
        *step = v as u64;
        for (field, dst) in fields.iter().zip(tensors) {
            let key = format!("{name}.{field}");
            let src = by_name.remove(&key).ok_or_else(|| {
                Error(format!(
                    "optimizer state has `{name}.step` but no `{key}`: the checkpoint is incomplete"
                ))
            })?;
            if src.size() != param.size() {
                plugin_bail!(
                    "optimizer state `{key}` has shape {:?}, the parameter {:?}",
                    src.size(),
                    param.size()
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

fn betas_key() -> KeyDecl {
    KeyDecl::float_list(
        "optim.adam.betas",
        &[0.9, 0.999],
        "Adam/AMSGrad running-average coefficients [beta1, beta2]",
    )
}

pub struct AdamFactory;

impl OptimizerFactory for AdamFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Optimizer,
            "adam",
            "Adam (torch.optim.Adam) with L2 weight decay train.weight_decay",
        )
        .papers(&["1412.6980"])
        .keys(vec![betas_key()])
    }

    fn build(&self, config: &ConfigView, groups: Vec<ParamGroup>) -> Result<Box<dyn Optimizer>> {
        let betas = read_betas(config, "optim.adam.betas")?;
        Ok(Box::new(Adam::new(groups, betas, EPS, false)?))
    }
}

pub struct AmsgradFactory;

impl OptimizerFactory for AmsgradFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Optimizer,
            "amsgrad",
            "AMSGrad (torch.optim.Adam with amsgrad=True), optim.adam.betas",
        )
        .papers(&["1904.09237"])
        .keys(vec![betas_key()])
    }

    fn build(&self, config: &ConfigView, groups: Vec<ParamGroup>) -> Result<Box<dyn Optimizer>> {
        let betas = read_betas(config, "optim.adam.betas")?;
        Ok(Box::new(Adam::new(groups, betas, EPS, true)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind as K;

    fn group(values: &[f32], weight_decay: f64) -> (Tensor, Vec<ParamGroup>) {
        let w = Tensor::from_slice(values).set_requires_grad(true);
        let groups = vec![ParamGroup {
            weight_decay,
            params: vec![NamedTensor {
                name: "w".into(),
                tensor: w.shallow_clone(),
                trainable: true,
            }],
        }];
        (w, groups)
    }

    /// Sets the gradient of `w` to `g` (loss = sum(g * w)).
    fn backward_with(w: &Tensor, g: &[f32]) {
        if w.grad().defined() {
            let _ = w.grad().zero_();
        }
        (w * Tensor::from_slice(g)).sum(K::Float).backward();
    }

    fn values(w: &Tensor) -> Vec<f64> {
        Vec::<f32>::try_from(&w.detach())
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    }

    /// Plain-f64 Adam for comparison (the paper's Algorithm 1 in PyTorch's form).
    fn reference(w: &mut [f64], grads: &[Vec<f64>], lr: f64, wd: f64, amsgrad: bool) {
        let (b1, b2) = (0.9, 0.999);
        let n = w.len();
        let (mut m, mut v, mut vmax) = (vec![0.0; n], vec![0.0; n], vec![0.0f64; n]);
        for (t, g) in grads.iter().enumerate() {
            let t = (t + 1) as f64;
            for i in 0..n {
                let g = g[i] + wd * w[i];
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                vmax[i] = vmax[i].max(v[i]);
                let second = if amsgrad { vmax[i] } else { v[i] };
                let denom = second.sqrt() / (1.0 - b2.powf(t)).sqrt() + EPS;
                w[i] -= lr / (1.0 - b1.powf(t)) * m[i] / denom;
            }
        }
    }

    #[test]
    fn first_step_moves_every_weight_by_lr_against_the_gradient_sign() {
        // Bias correction makes the first Adam step lr * g / (|g| + eps') = ±lr.
        let (w, groups) = group(&[1.0, -2.0, 0.5], 0.0);
        let mut opt = Adam::new(groups, (0.9, 0.999), EPS, false).unwrap();
        backward_with(&w, &[0.3, -4.0, 1e-3]);
        opt.step(0.01).unwrap();
        let got = values(&w);
        let exp = [1.0 - 0.01, -2.0 + 0.01, 0.5 - 0.01 * 1e-3 / (1e-3 + 1e-8)];
        for (g, e) in got.iter().zip(exp) {
            assert!((g - e).abs() < 1e-6, "{got:?} vs {exp:?}");
        }
    }

    #[test]
    fn three_steps_with_weight_decay_match_hand_computation_and_amsgrad_differs() {
        let grads = vec![vec![10.0, -0.5], vec![-0.1, -0.5], vec![0.02, 3.0]];
        for amsgrad in [false, true] {
            let (w, groups) = group(&[0.5, -1.0], 0.1);
            let mut opt = Adam::new(groups, (0.9, 0.999), EPS, amsgrad).unwrap();
            for g in &grads {
                let g32: Vec<f32> = g.iter().map(|&v| v as f32).collect();
                backward_with(&w, &g32);
                opt.step(0.1).unwrap();
            }
            let mut exp = vec![0.5, -1.0];
            reference(&mut exp, &grads, 0.1, 0.1, amsgrad);
            let got = values(&w);
            for (g, e) in got.iter().zip(&exp) {
                assert!(
                    (g - e).abs() < 2e-6,
                    "amsgrad {amsgrad}: {got:?} vs {exp:?}"
                );
            }
        }
        // The second moment of weight 0 shrinks after its large first gradient, so AMSGrad's max matters.
        let mut plain = vec![0.5, -1.0];
        let mut ams = plain.clone();
        reference(&mut plain, &grads, 0.1, 0.1, false);
        reference(&mut ams, &grads, 0.1, 0.1, true);
        assert!((plain[0] - ams[0]).abs() > 5e-5, "{plain:?} {ams:?}");
    }

    #[test]
    fn state_round_trip_resumes_exactly() {
        let grads = [[0.3f32, -0.2], [0.1, 0.4], [-0.7, 0.05]];
        let run = |split: bool| {
            let (w, groups) = group(&[1.0, 2.0], 0.01);
            let mut opt = Adam::new(groups, (0.8, 0.99), EPS, true).unwrap();
            for (i, g) in grads.iter().enumerate() {
                if split && i == 2 {
                    // Continue in a fresh optimizer from the saved state.
                    let state: Vec<NamedTensor> = opt
                        .state()
                        .into_iter()
                        .map(|t| NamedTensor {
                            tensor: t.tensor.copy(),
                            ..t
                        })
                        .collect();
                    let names: Vec<&str> = state.iter().map(|t| t.name.as_str()).collect();
                    assert_eq!(
                        names,
                        ["w.step", "w.exp_avg", "w.exp_avg_sq", "w.max_exp_avg_sq"]
                    );
                    let (w2, groups2) = group(&[0.0, 0.0], 0.01);
                    w2.detach().copy_(&w.detach());
                    opt = Adam::new(groups2, (0.8, 0.99), EPS, true).unwrap();
                    opt.load_state(state).unwrap();
                    backward_with(&w2, g);
                    opt.step(0.05).unwrap();
                    return values(&w2);
                }
                backward_with(&w, g);
                opt.step(0.05).unwrap();
            }
            values(&w)
        };
        assert_eq!(run(false), run(true));
    }

    #[test]
    fn bad_state_and_bad_betas_are_errors() {
        let (_, groups) = group(&[1.0], 0.0);
        let mut opt = Adam::new(groups, (0.9, 0.999), EPS, false).unwrap();
        let e = opt
            .load_state(vec![NamedTensor {
                name: "w.momentum_buffer".into(),
                tensor: Tensor::zeros([1], (K::Float, tch::Device::Cpu)),
                trainable: false,
            }])
            .unwrap_err();
        assert!(e.0.contains("w.momentum_buffer"), "{e}");
        let (_, groups) = group(&[1.0], 0.0);
        assert!(Adam::new(groups, (0.9, 1.0), EPS, false).is_err());
    }
}
