//! The reference's `LARSOptimizer`, step for step.
//!
//! Per parameter `w` with gradient `g`, weight decay `wd` and scheduled rate `lr`:
//! `local = ||w|| / (eps + ||g|| + wd ||w||)`, or 1 when `||w|| < threshold`;
//! `buf = momentum · buf + lr · local · (g + wd w)`; `w -= buf`. The rate is inside the
//! momentum buffer (unlike SGD's), and there is no LARS coefficient η: `train.base_lr` plays
//! its part.
//!
//! A step is a fixed handful of kernels however many parameters there are: both norms of every
//! parameter with `_foreach_norm`, the layer-wise rates as one vector, and the momentum buffers
//! in one flat tensor (each parameter's segment in the parameter's own memory order, so the
//! views have its strides, channels_last included), updated in one pass; `_foreach_sub_` then
//! applies them.

use imgclf_plugin_api::optim::{defined_grads, foreach};
use imgclf_plugin_api::{
    plugin_bail, ComponentInfo, ConfigView, KeyDecl, Kind, NamedTensor, Optimizer,
    OptimizerFactory, ParamGroup, Result,
};
use tch::Tensor;

struct Slot {
    name: String,
    param: Tensor,
    weight_decay: f64,
    /// The parameter's dimensions from largest to smallest stride: its elements in memory order.
    order: Vec<i64>,
    offset: i64,
    numel: i64,
    /// Whether the momentum buffer exists (PyTorch creates it, zero, at the parameter's first
    /// step with a gradient); only those are saved.
    has_buffer: bool,
}

/// Every momentum buffer in one tensor, and what the vectorised rate needs, on the device.
struct Flat {
    buffers: Tensor,
    weight_decay: Tensor,
    numels: Tensor,
}

pub struct Lars {
    momentum: f64,
    eps: f64,
    threshold: f64,
    slots: Vec<Slot>,
    flat: Flat,
}

/// Dimensions sorted by decreasing stride (a permutation making the tensor contiguous when
/// it is dense, as parameters and their gradients are).
fn memory_order(t: &Tensor) -> Vec<i64> {
    let stride = t.stride();
    let mut order: Vec<i64> = (0..stride.len() as i64).collect();
    order.sort_by_key(|&d| std::cmp::Reverse(stride[d as usize]));
    order
}

fn inverse(order: &[i64]) -> Vec<i64> {
    let mut inv = vec![0; order.len()];
    for (i, &d) in order.iter().enumerate() {
        inv[d as usize] = i as i64;
    }
    inv
}

impl Lars {
    pub fn new(groups: Vec<ParamGroup>, momentum: f64, eps: f64, threshold: f64) -> Result<Self> {
        if momentum < 0.0 {
            plugin_bail!("train.momentum must be >= 0 for LARS, got {momentum}");
        }
        if eps < 0.0 || threshold < 0.0 {
            plugin_bail!(
                "optim.lars.eps ({eps}) and optim.lars.threshold ({threshold}) must be >= 0"
            );
        }
        let mut slots = Vec::new();
        let mut offset = 0;
        for g in groups {
            if g.weight_decay < 0.0 {
                plugin_bail!(
                    "train.weight_decay must be >= 0 for LARS, got {}",
                    g.weight_decay
                );
            }
            for p in g.params {
                let numel = p.tensor.numel() as i64;
                slots.push(Slot {
                    name: p.name,
                    order: memory_order(&p.tensor),
                    param: p.tensor,
                    weight_decay: g.weight_decay,
                    offset,
                    numel,
                    has_buffer: false,
                });
                offset += numel;
            }
        }
        let (kind, device) = slots
            .first()
            .map(|s| (s.param.kind(), s.param.device()))
            .unwrap_or((tch::Kind::Float, tch::Device::Cpu));
        if let Some(s) = slots
            .iter()
            .find(|s| s.param.kind() != kind || s.param.device() != device)
        {
            plugin_bail!(
                "parameter `{}` is {:?} on {:?}, the others {kind:?} on {device:?}: LARS needs one dtype and device",
                s.name,
                s.param.kind(),
                s.param.device()
            );
        }
        let decays: Vec<f64> = slots.iter().map(|s| s.weight_decay).collect();
        let numels: Vec<i64> = slots.iter().map(|s| s.numel).collect();
        let flat = Flat {
            buffers: Tensor::zeros([offset], (kind, device)),
            weight_decay: Tensor::from_slice(&decays).to_kind(kind).to_device(device),
            numels: Tensor::from_slice(&numels).to_device(device),
        };
        Ok(Lars {
            momentum,
            eps,
            threshold,
            slots,
            flat,
        })
    }

    /// Slot `s`'s momentum buffer: its segment of the flat buffer with the parameter's shape
    /// and strides.
    fn buffer(&self, s: &Slot) -> Tensor {
        let permuted: Vec<i64> = s
            .order
            .iter()
            .map(|&d| s.param.size()[d as usize])
            .collect();
        self.flat
            .buffers
            .narrow(0, s.offset, s.numel)
            .view(permuted.as_slice())
            .permute(inverse(&s.order))
    }

    /// Every parameter has a gradient: the whole step on lists and flat tensors.
    fn step_all(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        let params: Vec<Tensor> = self.slots.iter().map(|s| s.param.shallow_clone()).collect();
        let w_norm = Tensor::f_stack(&foreach::norm(&params)?, 0)?;
        let g_norm = Tensor::f_stack(&foreach::norm(grads)?, 0)?;
        let local = w_norm.f_div(
            &g_norm
                .f_add_scalar(self.eps)?
                .f_add(&w_norm.f_mul(&self.flat.weight_decay)?)?,
        )?;
        let local = local
            .f_ones_like()?
            .f_where_self(&w_norm.f_lt(self.threshold)?, &local)?;
        let rate = local.f_mul_scalar(lr)?.f_repeat_interleave_self_tensor(
            &self.flat.numels,
            0,
            self.flat.buffers.size()[0],
        )?;
        // d = g + wd p, one list op per weight decay.
        let mut d: Vec<Tensor> = grads.iter().map(Tensor::shallow_clone).collect();
        for (wd, members) in
            imgclf_plugin_api::optim::group_by(self.slots.iter().map(|s| s.weight_decay.to_bits()))
        {
            let wd = f64::from_bits(wd);
            if wd == 0.0 {
                continue;
            }
            let g: Vec<Tensor> = members.iter().map(|&i| grads[i].shallow_clone()).collect();
            let p: Vec<Tensor> = members.iter().map(|&i| params[i].shallow_clone()).collect();
            for (i, t) in members.into_iter().zip(foreach::add_list(&g, &p, wd)?) {
                d[i] = t;
            }
        }
        let d_flat: Vec<Tensor> = d
            .iter()
            .zip(&self.slots)
            .map(|(t, s)| t.f_permute(s.order.as_slice())?.f_reshape([-1]))
            .collect::<std::result::Result<_, _>>()?;
        let scaled = rate.f_mul(&Tensor::f_cat(&d_flat, 0)?)?;
        let _ = self
            .flat
            .buffers
            .f_mul_scalar_(self.momentum)?
            .f_add_(&scaled)?;
        let buffers: Vec<Tensor> = self.slots.iter().map(|s| self.buffer(s)).collect();
        foreach::sub_list_(&params, &buffers)?;
        self.slots.iter_mut().for_each(|s| s.has_buffer = true);
        Ok(())
    }

    /// The same per parameter, skipping parameters without a gradient as the reference does.
    fn step_each(&mut self, lr: f64) -> Result<()> {
        for i in 0..self.slots.len() {
            let s = &self.slots[i];
            let mut d = s.param.grad();
            if !d.defined() {
                continue;
            }
            let wd = s.weight_decay;
            let w_norm = s.param.f_norm()?;
            let g_norm = d.f_norm()?;
            let local = w_norm.f_div(
                &g_norm
                    .f_add_scalar(self.eps)?
                    .f_add(&w_norm.f_mul_scalar(wd)?)?,
            )?;
            let local = local
                .f_ones_like()?
                .f_where_self(&w_norm.f_lt(self.threshold)?, &local)?;
            if wd != 0.0 {
                d = d.f_add(&s.param.f_mul_scalar(wd)?)?;
            }
            let scaled = local.f_mul_scalar(lr)?.f_mul(&d)?;
            let mut buf = self.buffer(s);
            let _ = buf.f_mul_scalar_(self.momentum)?.f_add_(&scaled)?;
            let _ = s.param.shallow_clone().f_sub_(&buf)?;
            self.slots[i].has_buffer = true;
        }
        Ok(())
    }
}

impl Optimizer for Lars {
    fn step(&mut self, lr: f64) -> Result<()> {
        tch::no_grad(|| {
            let params: Vec<Tensor> = self.slots.iter().map(|s| s.param.shallow_clone()).collect();
            let (index, grads) = defined_grads(&params);
            if index.is_empty() {
                Ok(())
            } else if index.len() == self.slots.len() {
                self.step_all(&grads, lr)
            } else {
                self.step_each(lr)
            }
        })
    }

    fn state(&self) -> Vec<NamedTensor> {
        self.slots
            .iter()
            .filter(|s| s.has_buffer)
            .map(|s| NamedTensor {
                name: format!("{}.momentum_buffer", s.name),
                tensor: self.buffer(s),
                trainable: false,
            })
            .collect()
    }

    fn load_state(&mut self, state: Vec<NamedTensor>) -> Result<()> {
        let mut by_name: std::collections::HashMap<String, Tensor> =
            state.into_iter().map(|t| (t.name, t.tensor)).collect();
        for i in 0..self.slots.len() {
            let s = &self.slots[i];
            let key = format!("{}.momentum_buffer", s.name);
            if let Some(t) = by_name.remove(&key) {
                if t.size() != s.param.size() {
                    plugin_bail!(
                        "optimizer state `{key}` has shape {:?}, the parameter {:?}",
                        t.size(),
                        s.param.size()
                    );
                }
                tch::no_grad(|| self.buffer(s).f_copy_(&t))?;
                self.slots[i].has_buffer = true;
            }
        }
        if let Some(extra) = by_name.keys().next() {
            plugin_bail!("optimizer state has an entry `{extra}` for no parameter of this model (was it written by another optimizer?)");
        }
        Ok(())
    }
}

pub struct LarsFactory;

impl OptimizerFactory for LarsFactory {
    fn info(&self) -> ComponentInfo {
        ComponentInfo::new(
            Kind::Optimizer,
            "lars",
            "LARS: per-tensor rate norm(w) / (norm(g) + wd norm(w)), momentum train.momentum, no LARS coefficient",
        )
        .papers(&["1708.03888", "1801.03137"])
        .keys(vec![
            KeyDecl::float(
                "optim.lars.eps",
                1e-9,
                "Added to the denominator of the layer-wise rate",
            ),
            KeyDecl::float(
                "optim.lars.threshold",
                1e-2,
                "Layers whose weight norm is below this use a layer-wise rate of 1",
            ),
        ])
    }

    fn build(&self, config: &ConfigView, groups: Vec<ParamGroup>) -> Result<Box<dyn Optimizer>> {
        Ok(Box::new(Lars::new(
            groups,
            config.float("train.momentum")?,
            config.float("optim.lars.eps")?,
            config.float("optim.lars.threshold")?,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind as K;

    fn setup(groups: &[(&[f32], f64)], momentum: f64) -> (Vec<Tensor>, Lars) {
        let mut ws = Vec::new();
        let mut pgs = Vec::new();
        for (i, (values, wd)) in groups.iter().enumerate() {
            let w = Tensor::from_slice(values).set_requires_grad(true);
            pgs.push(ParamGroup {
                weight_decay: *wd,
                params: vec![NamedTensor {
                    name: format!("w{i}"),
                    tensor: w.shallow_clone(),
                    trainable: true,
                }],
            });
            ws.push(w);
        }
        (ws, Lars::new(pgs, momentum, 1e-9, 1e-2).unwrap())
    }

    fn backward(ws: &[Tensor], grads: &[&[f32]]) {
        let mut loss = Tensor::zeros([], (K::Float, tch::Device::Cpu));
        for (w, g) in ws.iter().zip(grads) {
            if w.grad().defined() {
                let _ = w.grad().zero_();
            }
            loss += (w * Tensor::from_slice(g)).sum(K::Float);
        }
        loss.backward();
    }

    fn values(w: &Tensor) -> Vec<f64> {
        Vec::<f32>::try_from(&w.detach())
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    }

    #[test]
    fn two_steps_match_hand_computation_and_small_weights_use_rate_one() {
        // w0 = [3, 4] (norm 5), g = [0.6, 0.8] (norm 1), wd 0.1:
        // local = 5 / (1e-9 + 1 + 0.5) = 10/3; d = g + 0.1 w = [0.9, 1.2];
        // buf = 0.1 * 10/3 * d = [0.3, 0.4]; w = [2.7, 3.6].
        // w1 = [0.001, 0] has norm 1e-3 < threshold: local = 1, no decay: buf = lr g.
        let (ws, mut opt) = setup(&[(&[3.0, 4.0], 0.1), (&[0.001, 0.0], 0.0)], 0.9);
        backward(&ws, &[&[0.6, 0.8], &[2.0, -1.0]]);
        opt.step(0.1).unwrap();
        let w0 = values(&ws[0]);
        let w1 = values(&ws[1]);
        for (g, e) in w0.iter().zip([2.7, 3.6]) {
            assert!((g - e).abs() < 1e-6, "{w0:?}");
        }
        for (g, e) in w1.iter().zip([0.001 - 0.2, 0.1]) {
            assert!((g - e).abs() < 1e-6, "{w1:?}");
        }
        // Step 2, same gradients: w0 = [2.7, 3.6] (norm 4.5), local = 4.5 / (1 + 0.45);
        // d = [0.6 + 0.27, 0.8 + 0.36]; buf = 0.9 [0.3, 0.4] + 0.1 local d.
        backward(&ws, &[&[0.6, 0.8], &[2.0, -1.0]]);
        opt.step(0.1).unwrap();
        let local = 4.5 / (1e-9 + 1.0 + 0.45);
        let exp: Vec<f64> = [(2.7, 0.3, 0.87), (3.6, 0.4, 1.16)]
            .iter()
            .map(|(w, b, d)| w - (0.9 * b + 0.1 * local * d))
            .collect();
        let w0 = values(&ws[0]);
        for (g, e) in w0.iter().zip(&exp) {
            assert!((g - e).abs() < 1e-6, "{w0:?} vs {exp:?}");
        }
        // w1 now has norm ~0.22 > threshold: the layer-wise rate applies.
        let w1_prev = [0.001 - 0.2, 0.1];
        let n: f64 = w1_prev.iter().map(|v| v * v).sum::<f64>().sqrt();
        let local1 = n / (1e-9 + 5f64.sqrt());
        let exp1: Vec<f64> = w1_prev
            .iter()
            .zip([(0.2, 2.0), (-0.1, -1.0)])
            .map(|(w, (b, g))| w - (0.9 * b + 0.1 * local1 * g))
            .collect();
        let w1 = values(&ws[1]);
        for (g, e) in w1.iter().zip(&exp1) {
            assert!((g - e).abs() < 1e-6, "{w1:?} vs {exp1:?}");
        }
    }

    #[test]
    fn state_round_trip_resumes_exactly() {
        let grads: [&[f32]; 3] = [&[0.3, -0.2], &[0.1, 0.4], &[-0.7, 0.05]];
        let (ws, mut opt) = setup(&[(&[1.0, 2.0], 0.01)], 0.9);
        for g in grads {
            backward(&ws, &[g]);
            opt.step(0.05).unwrap();
        }
        let straight = Vec::<f32>::try_from(&ws[0].detach()).unwrap();

        let (ws, mut opt) = setup(&[(&[1.0, 2.0], 0.01)], 0.9);
        for g in &grads[..2] {
            backward(&ws, &[g]);
            opt.step(0.05).unwrap();
        }
        let state: Vec<NamedTensor> = opt
            .state()
            .into_iter()
            .map(|t| NamedTensor {
                tensor: t.tensor.copy(),
                ..t
            })
            .collect();
        assert_eq!(state.len(), 1);
        assert_eq!(state[0].name, "w0.momentum_buffer");
        let now = Vec::<f32>::try_from(&ws[0].detach()).unwrap();
        let (ws2, mut opt2) = setup(&[(&now, 0.01)], 0.9);
        opt2.load_state(state).unwrap();
        backward(&ws2, &[grads[2]]);
        opt2.step(0.05).unwrap();
        assert_eq!(Vec::<f32>::try_from(&ws2[0].detach()).unwrap(), straight);
    }

    #[test]
    fn channels_last_parameters_and_missing_gradients_follow_the_same_formula() {
        // The same two steps on a 4-d weight stored NCHW and stored channels_last (its buffer
        // segment takes the parameter's strides); then a step where the bias has no gradient
        // (the per-parameter path): the bias and its buffer stay untouched.
        let run = |nhwc: bool| {
            let w = Tensor::arange(2 * 3 * 2 * 2, (K::Float, tch::Device::Cpu))
                .view([2, 3, 2, 2])
                .f_div_scalar(10.0)
                .unwrap();
            let w = if nhwc {
                w.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
            } else {
                w
            };
            let w = w.set_requires_grad(true);
            let b = Tensor::from_slice(&[0.5f32, -0.5]).set_requires_grad(true);
            let named = |n: &str, t: &Tensor| NamedTensor {
                name: n.into(),
                tensor: t.shallow_clone(),
                trainable: true,
            };
            let groups = vec![ParamGroup {
                weight_decay: 0.01,
                params: vec![named("w", &w), named("b", &b)],
            }];
            let mut opt = Lars::new(groups, 0.9, 1e-9, 1e-2).unwrap();
            for k in 0..2 {
                for t in [&w, &b] {
                    if t.grad().defined() {
                        let _ = t.grad().zero_();
                    }
                }
                let loss = (&w * &w).sum(K::Float) * (k as f64 + 1.0)
                    + (&b * Tensor::from_slice(&[1.0f32, 2.0])).sum(K::Float);
                loss.backward();
                opt.step(0.1).unwrap();
            }
            let b_before = b.detach().copy();
            imgclf_plugin_api::optim::release_grads(&[w.shallow_clone(), b.shallow_clone()])
                .unwrap();
            (&w * &w).sum(K::Float).backward();
            opt.step(0.1).unwrap();
            assert!(b.detach().equal(&b_before), "no gradient, no update");
            assert_eq!(opt.state().len(), 2);
            (w.detach().contiguous(), opt.state()[0].tensor.contiguous())
        };
        let (w1, buf1) = run(false);
        let (w2, buf2) = run(true);
        assert!(w1.allclose(&w2, 1e-6, 1e-6, false), "{w1} vs {w2}");
        assert!(buf1.allclose(&buf2, 1e-6, 1e-6, false));
    }
}
