//! Multi-tensor optimizer kernels for plugins: ATen's fused SGD and Adam (`_fused_sgd_`,
//! `_fused_adam_`), the `_foreach_*` list ops, and releasing gradients, through the C++ shim
//! (`cpp/optim.cpp`; `tch` generates no bindings for any of them).
//!
//! Each function is one ATen op over a whole list of tensors, so an optimizer step costs a
//! handful of kernels however many parameters the model has (on CUDA, multi-tensor-apply
//! launches; on the CPU, one vectorised loop per op). All of them run with autograd off. The
//! lists must have equal lengths; ATen checks dtypes, devices and shapes and its message comes
//! back as an [`Error`].

use std::ffi::{c_char, c_void};

use tch::Tensor;

use crate::shim::check;
use crate::{Error, Result};

type Ptr = *const c_void;

extern "C" {
    fn imgclf_fused_sgd_(
        params: *const Ptr,
        grads: *const Ptr,
        momentum_buffers: *const Ptr,
        n: usize,
        weight_decay: f64,
        momentum: f64,
        lr: f64,
        dampening: f64,
        nesterov: bool,
        maximize: bool,
        is_first_step: bool,
        grad_scale: Ptr,
        found_inf: Ptr,
    ) -> *mut c_char;
    fn imgclf_fused_adam_(
        params: *const Ptr,
        grads: *const Ptr,
        exp_avgs: *const Ptr,
        exp_avg_sqs: *const Ptr,
        max_exp_avg_sqs: *const Ptr,
        steps: *const Ptr,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        amsgrad: bool,
        maximize: bool,
        grad_scale: Ptr,
        found_inf: Ptr,
    ) -> *mut c_char;
    fn imgclf_foreach_add_list_(
        this: *const Ptr,
        other: *const Ptr,
        n: usize,
        alpha: f64,
    ) -> *mut c_char;
    fn imgclf_foreach_add_list(
        this: *const Ptr,
        other: *const Ptr,
        n: usize,
        alpha: f64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn imgclf_foreach_sub_list_(this: *const Ptr, other: *const Ptr, n: usize) -> *mut c_char;
    fn imgclf_foreach_mul_list_(this: *const Ptr, other: *const Ptr, n: usize) -> *mut c_char;
    fn imgclf_foreach_mul_scalar_(this: *const Ptr, n: usize, scalar: f64) -> *mut c_char;
    fn imgclf_foreach_mul_scalar(
        this: *const Ptr,
        n: usize,
        scalar: f64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn imgclf_foreach_add_scalar_(this: *const Ptr, n: usize, scalar: f64) -> *mut c_char;
    fn imgclf_foreach_addcmul_(
        this: *const Ptr,
        tensor1: *const Ptr,
        tensor2: *const Ptr,
        n: usize,
        value: f64,
    ) -> *mut c_char;
    fn imgclf_foreach_sqrt(this: *const Ptr, n: usize, out: *mut *mut c_void) -> *mut c_char;
    fn imgclf_foreach_reciprocal_(this: *const Ptr, n: usize) -> *mut c_char;
    fn imgclf_foreach_clamp_(this: *const Ptr, n: usize, lower: f64, upper: f64) -> *mut c_char;
    fn imgclf_foreach_norm(this: *const Ptr, n: usize, out: *mut *mut c_void) -> *mut c_char;
    fn imgclf_release_grads(this: *const Ptr, n: usize) -> *mut c_char;
}

/// The `at::Tensor*` behind each tensor. In-place ops change the tensors' data, never the
/// handles, so shared references suffice.
fn ptrs(tensors: &[Tensor]) -> Vec<Ptr> {
    tensors.iter().map(|t| t.as_ptr() as Ptr).collect()
}

fn same_len(what: &str, n: usize, lists: &[(&str, usize)]) -> Result<()> {
    for (name, len) in lists {
        if *len != n {
            return Err(Error(format!(
                "{what}: {n} parameters but {len} {name}: the lists must have equal lengths"
            )));
        }
    }
    Ok(())
}

fn optional(t: Option<&Tensor>) -> Ptr {
    t.map_or(std::ptr::null(), |t| t.as_ptr() as Ptr)
}

/// Runs a shim op that creates `n` tensors and takes ownership of them.
fn new_tensors(
    n: usize,
    f: impl FnOnce(*mut *mut c_void) -> *mut c_char,
    what: &str,
) -> Result<Vec<Tensor>> {
    let mut out: Vec<*mut c_void> = vec![std::ptr::null_mut(); n];
    check(f(out.as_mut_ptr()), what)?;
    Ok(out
        .into_iter()
        .map(|p| {
            // SAFETY: on success the shim stored one `new at::Tensor` per slot, which nothing
            // else owns; tch frees it with delete.
            unsafe { Tensor::from_ptr(p as *mut _) }
        })
        .collect())
}

/// Hyper-parameters of one [`fused_sgd_`] call (`torch.optim.SGD`'s names).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdStep {
    pub lr: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    pub maximize: bool,
    /// The momentum buffers are new: `buf = d` instead of `buf = momentum buf + (1 - dampening) d`.
    pub is_first_step: bool,
}

/// `torch.optim.SGD(fused=True)`'s step over every parameter at once: `d = g + wd p`,
/// `buf = momentum buf + (1 - dampening) d` (or `d` on the first step), `d = d + momentum buf`
/// with Nesterov (else `buf`), `p -= lr d`. `momentum_buffers` is ignored (may be empty) when
/// `momentum` is 0. `grad_scale` (divide the gradients by it first) and `found_inf` (skip the
/// step when it is non-zero) are GradScaler's tensors, both on the parameters' device.
pub fn fused_sgd_(
    params: &[Tensor],
    grads: &[Tensor],
    momentum_buffers: &[Tensor],
    h: SgdStep,
    grad_scale: Option<&Tensor>,
    found_inf: Option<&Tensor>,
) -> Result<()> {
    let n = params.len();
    let mut lists = vec![("gradients", grads.len())];
    if h.momentum != 0.0 {
        lists.push(("momentum buffers", momentum_buffers.len()));
    }
    same_len("fused SGD", n, &lists)?;
    if n == 0 {
        return Ok(());
    }
    let (p, g, b) = (ptrs(params), ptrs(grads), ptrs(momentum_buffers));
    // SAFETY: every pointer is a live at::Tensor borrowed for the call; lengths checked above.
    check(
        unsafe {
            imgclf_fused_sgd_(
                p.as_ptr(),
                g.as_ptr(),
                b.as_ptr(),
                n,
                h.weight_decay,
                h.momentum,
                h.lr,
                h.dampening,
                h.nesterov,
                h.maximize,
                h.is_first_step,
                optional(grad_scale),
                optional(found_inf),
            )
        },
        "fused SGD step",
    )
}

/// Hyper-parameters of one [`fused_adam_`] call (`torch.optim.Adam`'s names).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
    pub amsgrad: bool,
    pub maximize: bool,
}

/// `torch.optim.Adam(fused=True)`'s step (L2 weight decay added to the gradient) over every
/// parameter at once. `steps` holds each parameter's step count as a float32 scalar tensor on
/// the parameters' device, already incremented for this step (as `torch.optim.Adam` does
/// before calling the kernel). `max_exp_avg_sqs` is used (and must match) only with AMSGrad.
#[allow(clippy::too_many_arguments)]
pub fn fused_adam_(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    max_exp_avg_sqs: &[Tensor],
    steps: &[Tensor],
    h: AdamStep,
    grad_scale: Option<&Tensor>,
    found_inf: Option<&Tensor>,
) -> Result<()> {
    let n = params.len();
    let mut lists = vec![
        ("gradients", grads.len()),
        ("first moments", exp_avgs.len()),
        ("second moments", exp_avg_sqs.len()),
        ("step counts", steps.len()),
    ];
    if h.amsgrad {
        lists.push(("maximal second moments", max_exp_avg_sqs.len()));
    }
    same_len("fused Adam", n, &lists)?;
    if n == 0 {
        return Ok(());
    }
    let (p, g, m, v, vmax, s) = (
        ptrs(params),
        ptrs(grads),
        ptrs(exp_avgs),
        ptrs(exp_avg_sqs),
        ptrs(max_exp_avg_sqs),
        ptrs(steps),
    );
    // SAFETY: every pointer is a live at::Tensor borrowed for the call; lengths checked above
    // (the maxima are read only with amsgrad).
    check(
        unsafe {
            imgclf_fused_adam_(
                p.as_ptr(),
                g.as_ptr(),
                m.as_ptr(),
                v.as_ptr(),
                vmax.as_ptr(),
                s.as_ptr(),
                n,
                h.lr,
                h.beta1,
                h.beta2,
                h.weight_decay,
                h.eps,
                h.amsgrad,
                h.maximize,
                optional(grad_scale),
                optional(found_inf),
            )
        },
        "fused Adam step",
    )
}

/// `_foreach_*` list ops: element `i` of the result combines element `i` of each list.
pub mod foreach {
    use super::*;

    /// `this[i] += alpha * other[i]`
    pub fn add_list_(this: &[Tensor], other: &[Tensor], alpha: f64) -> Result<()> {
        same_len("_foreach_add_", this.len(), &[("others", other.len())])?;
        let (a, b) = (ptrs(this), ptrs(other));
        // SAFETY: live tensors borrowed for the call, equal lengths.
        check(
            unsafe { imgclf_foreach_add_list_(a.as_ptr(), b.as_ptr(), a.len(), alpha) },
            "_foreach_add_",
        )
    }

    /// `this[i] + alpha * other[i]`, new tensors.
    pub fn add_list(this: &[Tensor], other: &[Tensor], alpha: f64) -> Result<Vec<Tensor>> {
        same_len("_foreach_add", this.len(), &[("others", other.len())])?;
        let (a, b) = (ptrs(this), ptrs(other));
        // SAFETY: live tensors borrowed for the call, equal lengths, `out` has a slot each.
        new_tensors(
            a.len(),
            |out| unsafe { imgclf_foreach_add_list(a.as_ptr(), b.as_ptr(), a.len(), alpha, out) },
            "_foreach_add",
        )
    }

    /// `this[i] -= other[i]`
    pub fn sub_list_(this: &[Tensor], other: &[Tensor]) -> Result<()> {
        same_len("_foreach_sub_", this.len(), &[("others", other.len())])?;
        let (a, b) = (ptrs(this), ptrs(other));
        // SAFETY: live tensors borrowed for the call, equal lengths.
        check(
            unsafe { imgclf_foreach_sub_list_(a.as_ptr(), b.as_ptr(), a.len()) },
            "_foreach_sub_",
        )
    }

    /// `this[i] *= other[i]`
    pub fn mul_list_(this: &[Tensor], other: &[Tensor]) -> Result<()> {
        same_len("_foreach_mul_", this.len(), &[("others", other.len())])?;
        let (a, b) = (ptrs(this), ptrs(other));
        // SAFETY: live tensors borrowed for the call, equal lengths.
        check(
            unsafe { imgclf_foreach_mul_list_(a.as_ptr(), b.as_ptr(), a.len()) },
            "_foreach_mul_",
        )
    }

    /// `this[i] *= scalar`
    pub fn mul_scalar_(this: &[Tensor], scalar: f64) -> Result<()> {
        let a = ptrs(this);
        // SAFETY: live tensors borrowed for the call.
        check(
            unsafe { imgclf_foreach_mul_scalar_(a.as_ptr(), a.len(), scalar) },
            "_foreach_mul_",
        )
    }

    /// `this[i] * scalar`, new tensors.
    pub fn mul_scalar(this: &[Tensor], scalar: f64) -> Result<Vec<Tensor>> {
        let a = ptrs(this);
        // SAFETY: live tensors borrowed for the call, `out` has a slot each.
        new_tensors(
            a.len(),
            |out| unsafe { imgclf_foreach_mul_scalar(a.as_ptr(), a.len(), scalar, out) },
            "_foreach_mul",
        )
    }

    /// `this[i] += scalar`
    pub fn add_scalar_(this: &[Tensor], scalar: f64) -> Result<()> {
        let a = ptrs(this);
        // SAFETY: live tensors borrowed for the call.
        check(
            unsafe { imgclf_foreach_add_scalar_(a.as_ptr(), a.len(), scalar) },
            "_foreach_add_",
        )
    }

    /// `this[i] += value * tensor1[i] * tensor2[i]`
    pub fn addcmul_(
        this: &[Tensor],
        tensor1: &[Tensor],
        tensor2: &[Tensor],
        value: f64,
    ) -> Result<()> {
        same_len(
            "_foreach_addcmul_",
            this.len(),
            &[
                ("first factors", tensor1.len()),
                ("second factors", tensor2.len()),
            ],
        )?;
        let (a, b, c) = (ptrs(this), ptrs(tensor1), ptrs(tensor2));
        // SAFETY: live tensors borrowed for the call, equal lengths.
        check(
            unsafe { imgclf_foreach_addcmul_(a.as_ptr(), b.as_ptr(), c.as_ptr(), a.len(), value) },
            "_foreach_addcmul_",
        )
    }

    /// `sqrt(this[i])`, new tensors.
    pub fn sqrt(this: &[Tensor]) -> Result<Vec<Tensor>> {
        let a = ptrs(this);
        // SAFETY: live tensors borrowed for the call, `out` has a slot each.
        new_tensors(
            a.len(),
            |out| unsafe { imgclf_foreach_sqrt(a.as_ptr(), a.len(), out) },
            "_foreach_sqrt",
        )
    }

    /// `this[i] = 1 / this[i]`
    pub fn reciprocal_(this: &[Tensor]) -> Result<()> {
        let a = ptrs(this);
        // SAFETY: live tensors borrowed for the call.
        check(
            unsafe { imgclf_foreach_reciprocal_(a.as_ptr(), a.len()) },
            "_foreach_reciprocal_",
        )
    }

    /// `this[i] = clamp(this[i], lower, upper)`
    pub fn clamp_(this: &[Tensor], lower: f64, upper: f64) -> Result<()> {
        let a = ptrs(this);
        // SAFETY: live tensors borrowed for the call.
        check(
            unsafe { imgclf_foreach_clamp_(a.as_ptr(), a.len(), lower, upper) },
            "_foreach_clamp_min_/_foreach_clamp_max_",
        )
    }

    /// The 2-norm of each tensor, as 0-dim tensors.
    pub fn norm(this: &[Tensor]) -> Result<Vec<Tensor>> {
        let a = ptrs(this);
        // SAFETY: live tensors borrowed for the call, `out` has a slot each.
        new_tensors(
            a.len(),
            |out| unsafe { imgclf_foreach_norm(a.as_ptr(), a.len(), out) },
            "_foreach_norm",
        )
    }
}

/// Releases every tensor's gradient (`p.grad = None`, PyTorch's `zero_grad(set_to_none=True)`):
/// the next backward allocates fresh gradients instead of accumulating into zero-filled ones.
pub fn release_grads(tensors: &[Tensor]) -> Result<()> {
    let a = ptrs(tensors);
    // SAFETY: live tensors borrowed for the call; only their autograd metadata changes.
    check(
        unsafe { imgclf_release_grads(a.as_ptr(), a.len()) },
        "releasing gradients",
    )
}

/// The gradients of `params` that exist, with their positions.
pub fn defined_grads(params: &[Tensor]) -> (Vec<usize>, Vec<Tensor>) {
    params
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let g = p.grad();
            g.defined().then_some((i, g))
        })
        .unzip()
}

/// Positions grouped by key, groups in order of first appearance: the sets of parameters one
/// kernel call can update together (same weight decay, same step count, ...).
pub fn group_by<K: PartialEq>(keys: impl IntoIterator<Item = K>) -> Vec<(K, Vec<usize>)> {
    let mut groups: Vec<(K, Vec<usize>)> = Vec::new();
    for (i, k) in keys.into_iter().enumerate() {
        match groups.iter_mut().find(|g| g.0 == k) {
            Some(g) => g.1.push(i),
            None => groups.push((k, vec![i])),
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn leaf(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).set_requires_grad(true)
    }

    fn vals(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(&t.detach().flatten(0, -1)).unwrap()
    }

    #[test]
    fn fused_sgd_matches_the_formula_and_skips_on_found_inf() {
        let p = leaf(&[1.0, -2.0]);
        (&p * Tensor::from_slice(&[0.5f32, 0.25]))
            .sum(Kind::Float)
            .backward();
        let buf = p.zeros_like();
        let h = SgdStep {
            lr: 0.1,
            weight_decay: 0.1,
            momentum: 0.9,
            dampening: 0.0,
            nesterov: true,
            maximize: false,
            is_first_step: true,
        };
        let (params, grads, bufs) = ([p.shallow_clone()], [p.grad()], [buf.shallow_clone()]);
        let inf = Tensor::ones([1], (Kind::Float, Device::Cpu));
        fused_sgd_(&params, &grads, &bufs, h, None, Some(&inf)).unwrap();
        assert_eq!(vals(&p), [1.0, -2.0], "found_inf skips the step");
        fused_sgd_(&params, &grads, &bufs, h, None, None).unwrap();
        // d = g + 0.1 p = [0.6, 0.05]; buf = d; nesterov: d + 0.9 buf = 1.9 d.
        let exp = [1.0 - 0.1 * 1.9 * 0.6, -2.0 - 0.1 * 1.9 * 0.05];
        for (g, e) in vals(&p).iter().zip(exp) {
            assert!((g - e).abs() < 1e-6, "{g} vs {e}");
        }
        assert!((vals(&buf)[0] - 0.6).abs() < 1e-6);
        assert!(fused_sgd_(&params, &[], &bufs, h, None, None).is_err());
    }

    #[test]
    fn fused_adam_first_step_moves_by_lr() {
        let p = leaf(&[1.0, -1.0]);
        (&p * Tensor::from_slice(&[0.3f32, -4.0]))
            .sum(Kind::Float)
            .backward();
        let (m, v, vmax) = (p.zeros_like(), p.zeros_like(), p.zeros_like());
        let step = Tensor::ones([], (Kind::Float, Device::Cpu));
        let h = AdamStep {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            weight_decay: 0.0,
            eps: 1e-8,
            amsgrad: true,
            maximize: false,
        };
        fused_adam_(
            &[p.shallow_clone()],
            &[p.grad()],
            &[m],
            &[v],
            &[vmax],
            &[step],
            h,
            None,
            None,
        )
        .unwrap();
        let got = vals(&p);
        assert!(
            (got[0] - 0.99).abs() < 1e-6 && (got[1] + 0.99).abs() < 1e-6,
            "{got:?}"
        );
    }

    #[test]
    fn foreach_ops_compute_elementwise_and_norms() {
        let a = [
            Tensor::from_slice(&[1.0f32, 2.0]),
            Tensor::from_slice(&[3.0f32]),
        ];
        let b = [
            Tensor::from_slice(&[0.5f32, 0.5]),
            Tensor::from_slice(&[2.0f32]),
        ];
        foreach::add_list_(&a, &b, 2.0).unwrap();
        assert_eq!((vals(&a[0]), vals(&a[1])), (vec![2.0, 3.0], vec![7.0]));
        let s = foreach::add_list(&a, &b, -1.0).unwrap();
        assert_eq!(vals(&s[1]), [5.0]);
        foreach::mul_list_(&s, &b).unwrap();
        assert_eq!(vals(&s[1]), [10.0]);
        foreach::sub_list_(&s, &b).unwrap();
        assert_eq!(vals(&s[1]), [8.0]);
        foreach::mul_scalar_(&s, 0.5).unwrap();
        foreach::add_scalar_(&s, 1.0).unwrap();
        assert_eq!(vals(&s[1]), [5.0]);
        let r = foreach::sqrt(&[Tensor::from_slice(&[4.0f32, 9.0])]).unwrap();
        foreach::reciprocal_(&r).unwrap();
        foreach::clamp_(&r, 0.3, 0.4).unwrap();
        assert_eq!(vals(&r[0]), [0.4, 1.0 / 3.0]);
        foreach::addcmul_(
            &r,
            &[Tensor::from_slice(&[1.0f32, 1.0])],
            &[Tensor::from_slice(&[2.0f32, 3.0])],
            0.5,
        )
        .unwrap();
        assert_eq!(vals(&r[0]), [1.4, 1.0 / 3.0 + 1.5]);
        let n = foreach::norm(&[Tensor::from_slice(&[3.0f32, 4.0])]).unwrap();
        assert_eq!(n[0].size(), Vec::<i64>::new());
        assert_eq!(n[0].double_value(&[]), 5.0);
        assert_eq!(vals(&foreach::mul_scalar(&n, 2.0).unwrap()[0]), [10.0]);
        assert!(foreach::add_list_(&a, &b[..1], 1.0).is_err());
        // A shape mismatch is ATen's error, not a crash.
        let e = foreach::add_list_(&a[..1], &[Tensor::from_slice(&[1.0f32, 2.0, 3.0])], 1.0)
            .unwrap_err();
        assert!(e.0.contains("_foreach_add_"), "{e}");
    }

    #[test]
    fn released_gradients_are_undefined_and_reallocated_by_backward() {
        let p = leaf(&[1.0, 2.0]);
        (&p * 3.0).sum(Kind::Float).backward();
        let first = p.grad();
        assert!(first.defined());
        release_grads(&[p.shallow_clone()]).unwrap();
        assert!(!p.grad().defined());
        (&p * 2.0).sum(Kind::Float).backward();
        assert_eq!(
            vals(&p.grad()),
            [2.0, 2.0],
            "no accumulation into the old gradient"
        );
        assert_eq!(vals(&first), [3.0, 3.0], "the released tensor is untouched");
        let (idx, grads) = defined_grads(&[p.shallow_clone(), leaf(&[0.0])]);
        assert_eq!((idx, grads.len()), (vec![0], 1));
    }

    #[test]
    fn group_by_keeps_first_appearance_order() {
        let g = group_by([3, 1, 3, 2, 1]);
        assert_eq!(g, vec![(3, vec![0, 2]), (1, vec![1, 4]), (2, vec![3])]);
    }
}
