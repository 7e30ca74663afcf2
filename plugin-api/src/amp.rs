//! Mixed precision through libtorch's device-generic autocast and the ATen ops behind
//! `torch.amp.GradScaler` (`_amp_foreach_non_finite_check_and_unscale_`, `_amp_update_scale_`),
//! which `tch` does not bind (its `tch::autocast` is CUDA float16 only).
//!
//! Autocast state is thread-local in libtorch and lives in the one libtorch every plugin shares
//! with the host, so an [`Autocast`] guard entered by the host holds inside every plugin call
//! made on the same thread, without the plugin knowing.

use std::ffi::{c_char, c_void};

use tch::{Device, Kind, Tensor};

use crate::shim::check;
use crate::{Error, Result};

extern "C" {
    fn imgclf_autocast_is_available(device: i32, out: *mut bool) -> *mut c_char;
    fn imgclf_autocast_is_enabled(device: i32, out: *mut bool) -> *mut c_char;
    fn imgclf_autocast_set_enabled(device: i32, enabled: bool) -> *mut c_char;
    fn imgclf_autocast_get_dtype(device: i32, out: *mut i32) -> *mut c_char;
    fn imgclf_autocast_set_dtype(device: i32, dtype: i32) -> *mut c_char;
    fn imgclf_autocast_increment_nesting(out: *mut i32) -> *mut c_char;
    fn imgclf_autocast_decrement_nesting(out: *mut i32) -> *mut c_char;
    fn imgclf_autocast_clear_cache() -> *mut c_char;
    fn imgclf_autocast_is_cache_enabled(out: *mut bool) -> *mut c_char;
    fn imgclf_autocast_set_cache_enabled(enabled: bool) -> *mut c_char;
    fn imgclf_amp_foreach_non_finite_check_and_unscale_(
        grads: *const *mut c_void,
        n: usize,
        found_inf: *mut c_void,
        inv_scale: *const c_void,
    ) -> *mut c_char;
    fn imgclf_amp_update_scale_(
        scale: *mut c_void,
        growth_tracker: *mut c_void,
        found_inf: *const c_void,
        growth: f64,
        backoff: f64,
        growth_interval: i64,
    ) -> *mut c_char;
    fn imgclf_tensor_set_grad(tensor: *mut c_void, grad: *const c_void) -> *mut c_char;
}

/// c10's `DeviceType` code for a device (autocast state is per device type, not per index).
fn device_code(device: Device) -> Result<i32> {
    Ok(match device {
        Device::Cpu => 0,
        Device::Cuda(_) => 1,
        Device::Vulkan => 10,
        Device::Mps => 13,
    })
}

/// c10's `ScalarType` code of a floating-point kind autocast may compute in.
fn kind_code(kind: Kind) -> Result<i32> {
    Ok(match kind {
        Kind::Half => 5,
        Kind::Float => 6,
        Kind::Double => 7,
        Kind::BFloat16 => 15,
        other => {
            return Err(Error(format!(
                "autocast computes in a floating-point type (float16, bfloat16, float32), not {other:?}"
            )))
        }
    })
}

fn kind_from_code(code: i32) -> Result<Kind> {
    Ok(match code {
        5 => Kind::Half,
        6 => Kind::Float,
        7 => Kind::Double,
        15 => Kind::BFloat16,
        other => return Err(Error(format!("autocast reported scalar type code {other}"))),
    })
}

/// Whether libtorch has an autocast implementation for this device type.
pub fn is_available(device: Device) -> Result<bool> {
    let mut out = false;
    check(
        unsafe { imgclf_autocast_is_available(device_code(device)?, &mut out) },
        "autocast availability",
    )?;
    Ok(out)
}

/// Whether autocast is on for this device type on the calling thread.
pub fn is_enabled(device: Device) -> Result<bool> {
    let mut out = false;
    check(
        unsafe { imgclf_autocast_is_enabled(device_code(device)?, &mut out) },
        "reading the autocast state",
    )?;
    Ok(out)
}

/// Turns autocast on or off for this device type on the calling thread. Prefer [`Autocast`],
/// which restores the previous state.
pub fn set_enabled(device: Device, enabled: bool) -> Result<()> {
    check(
        unsafe { imgclf_autocast_set_enabled(device_code(device)?, enabled) },
        "setting the autocast state",
    )
}

/// The reduced type autocast computes in for this device type (CPU: bfloat16 by default; CUDA:
/// float16).
pub fn dtype(device: Device) -> Result<Kind> {
    let mut out = 0;
    check(
        unsafe { imgclf_autocast_get_dtype(device_code(device)?, &mut out) },
        "reading the autocast dtype",
    )?;
    kind_from_code(out)
}

/// Sets the reduced type autocast computes in for this device type on the calling thread.
pub fn set_dtype(device: Device, kind: Kind) -> Result<()> {
    check(
        unsafe { imgclf_autocast_set_dtype(device_code(device)?, kind_code(kind)?) },
        "setting the autocast dtype",
    )
}

/// Enters one level of autocast nesting; returns the new depth.
pub fn increment_nesting() -> Result<i32> {
    let mut out = 0;
    check(
        unsafe { imgclf_autocast_increment_nesting(&mut out) },
        "entering autocast",
    )?;
    Ok(out)
}

/// Leaves one level of autocast nesting; returns the new depth (0: outermost region left).
pub fn decrement_nesting() -> Result<i32> {
    let mut out = 0;
    check(
        unsafe { imgclf_autocast_decrement_nesting(&mut out) },
        "leaving autocast",
    )?;
    Ok(out)
}

/// Drops the casts of leaf tensors (weights) autocast cached in the current region.
pub fn clear_cache() -> Result<()> {
    check(
        unsafe { imgclf_autocast_clear_cache() },
        "clearing the autocast cache",
    )
}

/// Whether autocast caches the reduced-precision casts of weights within a region.
pub fn is_cache_enabled() -> Result<bool> {
    let mut out = false;
    check(
        unsafe { imgclf_autocast_is_cache_enabled(&mut out) },
        "reading the autocast cache state",
    )?;
    Ok(out)
}

/// Turns the autocast weight-cast cache on or off on the calling thread.
pub fn set_cache_enabled(enabled: bool) -> Result<()> {
    check(
        unsafe { imgclf_autocast_set_cache_enabled(enabled) },
        "setting the autocast cache state",
    )
}

/// An autocast region for one device type on the calling thread, like `torch.autocast(...)`
/// as a context manager: entering saves the previous state and sets the new one, dropping the
/// guard restores it and, when the outermost region closes, clears the cast cache.
#[must_use = "autocast holds only while the guard lives"]
pub struct Autocast {
    device: Device,
    previous_enabled: bool,
    previous_dtype: Kind,
}

impl Autocast {
    /// Autocast on `device`'s type computing in `kind` (float16 or bfloat16), or explicitly off
    /// (`enabled` false) for a float32 region inside an autocast one.
    pub fn enter(device: Device, kind: Kind, enabled: bool) -> Result<Self> {
        if enabled && !is_available(device)? {
            return Err(Error(format!("libtorch has no autocast for {device:?}")));
        }
        let previous_enabled = is_enabled(device)?;
        let previous_dtype = dtype(device)?;
        set_dtype(device, kind)?;
        set_enabled(device, enabled)?;
        increment_nesting()?;
        Ok(Autocast {
            device,
            previous_enabled,
            previous_dtype,
        })
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        // These calls only fail for a device type libtorch does not know, which `enter` already
        // accepted; nothing useful can be done with an error in drop.
        if decrement_nesting().unwrap_or(0) == 0 {
            let _ = clear_cache();
        }
        let _ = set_enabled(self.device, self.previous_enabled);
        let _ = set_dtype(self.device, self.previous_dtype);
    }
}

/// Runs `f` with autocast on for `device`'s type computing in `kind`, then restores the
/// previous state (also when `f` panics).
pub fn autocast<T>(device: Device, kind: Kind, f: impl FnOnce() -> T) -> Result<T> {
    let _guard = Autocast::enter(device, kind, true)?;
    Ok(f())
}

/// Multiplies every gradient by `inv_scale` in place and sets `found_inf` to 1.0 if any holds
/// an inf or a NaN (left unchanged otherwise). `found_inf` and `inv_scale` are one-element
/// float32 tensors on the gradients' device. `torch.amp.GradScaler.unscale_`'s kernel.
pub fn non_finite_check_and_unscale(
    grads: &mut [Tensor],
    found_inf: &mut Tensor,
    inv_scale: &Tensor,
) -> Result<()> {
    let ptrs: Vec<*mut c_void> = grads
        .iter_mut()
        .map(|g| g.as_mut_ptr() as *mut c_void)
        .collect();
    check(
        unsafe {
            imgclf_amp_foreach_non_finite_check_and_unscale_(
                ptrs.as_ptr(),
                ptrs.len(),
                found_inf.as_mut_ptr() as *mut c_void,
                inv_scale.as_ptr() as *const c_void,
            )
        },
        "unscaling gradients",
    )
}

/// `torch.amp.GradScaler.update`'s kernel, in place: when `found_inf` is nonzero, `scale` is
/// multiplied by `backoff` and `growth_tracker` reset to 0; otherwise the tracker counts the
/// clean step and, on reaching `growth_interval`, `scale` is multiplied by `growth` and the
/// tracker reset. `scale` and `found_inf` are one-element float32 tensors, `growth_tracker` a
/// one-element int32 tensor, all on one device.
pub fn update_scale(
    scale: &mut Tensor,
    growth_tracker: &mut Tensor,
    found_inf: &Tensor,
    growth: f64,
    backoff: f64,
    growth_interval: i64,
) -> Result<()> {
    check(
        unsafe {
            imgclf_amp_update_scale_(
                scale.as_mut_ptr() as *mut c_void,
                growth_tracker.as_mut_ptr() as *mut c_void,
                found_inf.as_ptr() as *const c_void,
                growth,
                backoff,
                growth_interval,
            )
        },
        "updating the loss scale",
    )
}

/// Replaces `tensor`'s gradient with `grad` (`None`: no gradient), whatever its dtype, as
/// assigning `p.grad` in Python does (without Python's dtype check).
pub fn set_grad(tensor: &Tensor, grad: Option<&Tensor>) -> Result<()> {
    let mut handle = tensor.shallow_clone();
    check(
        unsafe {
            imgclf_tensor_set_grad(
                handle.as_mut_ptr() as *mut c_void,
                grad.map_or(std::ptr::null(), |g| g.as_ptr() as *const c_void),
            )
        },
        "setting a gradient",
    )
}

/// `torch.amp.GradScaler`'s settings; [`Default`] is PyTorch's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradScalerOptions {
    /// The first loss scale (PyTorch: 2^16).
    pub init_scale: f64,
    /// Factor the scale grows by after `growth_interval` clean steps in a row (2.0).
    pub growth_factor: f64,
    /// Factor the scale shrinks by on a step with inf/NaN gradients (0.5).
    pub backoff_factor: f64,
    /// Clean steps in a row before the scale grows (2000).
    pub growth_interval: i64,
}

impl Default for GradScalerOptions {
    fn default() -> Self {
        GradScalerOptions {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// Dynamic loss scaling, step for step as `torch.amp.GradScaler`: [`scale`](Self::scale) the
/// loss before backward, [`unscale`](Self::unscale) the gradients (in place, by the float32
/// reciprocal of the scale computed in float64) which says whether they are all finite (skip
/// the optimizer step when not), then [`update`](Self::update) the scale with ATen's
/// `_amp_update_scale_`. The scale and growth tracker are tensors on the gradients' device, as
/// in PyTorch, so [`state`](Self::state) / [`load_state`](Self::load_state) round-trip exactly.
pub struct GradScaler {
    options: GradScalerOptions,
    scale: Tensor,
    growth_tracker: Tensor,
    /// Set by `unscale`, consumed by `update`.
    found_inf: Option<Tensor>,
}

impl GradScaler {
    pub fn new(device: Device, options: GradScalerOptions) -> Result<Self> {
        if options.growth_factor.is_nan() || options.growth_factor <= 1.0 {
            return Err(Error(format!(
                "loss scale growth factor {} must be above 1",
                options.growth_factor
            )));
        }
        if options.backoff_factor.is_nan()
            || options.backoff_factor <= 0.0
            || options.backoff_factor >= 1.0
        {
            return Err(Error(format!(
                "loss scale backoff factor {} must be in (0, 1)",
                options.backoff_factor
            )));
        }
        if options.growth_interval < 1 {
            return Err(Error(format!(
                "loss scale growth interval {} must be at least 1",
                options.growth_interval
            )));
        }
        Ok(GradScaler {
            options,
            scale: Tensor::f_full([1], options.init_scale, (Kind::Float, device))?,
            growth_tracker: Tensor::f_zeros([1], (Kind::Int, device))?,
            found_inf: None,
        })
    }

    pub fn options(&self) -> GradScalerOptions {
        self.options
    }

    /// The current loss scale.
    pub fn scale_value(&self) -> Result<f64> {
        Ok(self.scale.f_double_value(&[0])?)
    }

    /// Clean steps counted towards the next growth.
    pub fn growth_tracker_value(&self) -> Result<i64> {
        Ok(self.growth_tracker.f_int64_value(&[0])?)
    }

    /// `loss * scale` (the scale moved to the loss's device), to call backward on.
    pub fn scale(&self, loss: &Tensor) -> Result<Tensor> {
        Ok(loss.f_mul(&self.scale.f_to_device(loss.device())?)?)
    }

    /// Divides every gradient by the scale in place and records whether any is inf or NaN;
    /// returns `true` when all are finite (the optimizer may step). Float16 gradients are
    /// refused, as PyTorch refuses them: keep float32 (master) gradients.
    pub fn unscale(&mut self, grads: &mut [Tensor]) -> Result<bool> {
        if let Some(g) = grads.iter().find(|g| g.kind() == Kind::Half) {
            return Err(Error(format!(
                "cannot unscale float16 gradients (shape {:?}): the optimizer must step float32 \
                 (master) weights under loss scaling",
                g.size()
            )));
        }
        let device = self.scale.device();
        let inv_scale = self
            .scale
            .f_to_kind(Kind::Double)?
            .f_reciprocal()?
            .f_to_kind(Kind::Float)?;
        let mut found_inf = Tensor::f_zeros([1], (Kind::Float, device))?;
        if !grads.is_empty() {
            non_finite_check_and_unscale(grads, &mut found_inf, &inv_scale)?;
        }
        let finite = found_inf.f_double_value(&[0])? == 0.0;
        self.found_inf = Some(found_inf);
        Ok(finite)
    }

    /// Updates the scale from the last [`unscale`](Self::unscale): backoff on inf/NaN, growth
    /// after `growth_interval` clean steps.
    pub fn update(&mut self) -> Result<()> {
        let found_inf = self.found_inf.take().ok_or_else(|| {
            Error("GradScaler::update without unscale in the same step".to_string())
        })?;
        update_scale(
            &mut self.scale,
            &mut self.growth_tracker,
            &found_inf,
            self.options.growth_factor,
            self.options.backoff_factor,
            self.options.growth_interval,
        )
    }

    /// The state to checkpoint: `("scale", float32 [1])`, `("growth_tracker", int32 [1])`.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        vec![
            ("scale".to_string(), self.scale.shallow_clone()),
            (
                "growth_tracker".to_string(),
                self.growth_tracker.shallow_clone(),
            ),
        ]
    }

    /// Restores [`state`](Self::state) (copied into this scaler's tensors on its device).
    pub fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        for (name, target) in [
            ("scale", &mut self.scale),
            ("growth_tracker", &mut self.growth_tracker),
        ] {
            let (_, t) = state
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| Error(format!("loss scaler state has no `{name}`")))?;
            if t.numel() != 1 {
                return Err(Error(format!(
                    "loss scaler `{name}` has shape {:?}, expected one element",
                    t.size()
                )));
            }
            let value = t
                .f_to_kind(target.kind())?
                .f_to_device(target.device())?
                .f_reshape([1])?;
            tch::no_grad(|| target.f_copy_(&value))?;
        }
        self.found_inf = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_autocast_guard_sets_and_restores_the_thread_state() {
        assert!(!is_enabled(Device::Cpu).unwrap());
        let before = dtype(Device::Cpu).unwrap();
        let x = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        let w = Tensor::ones([4, 3], (Kind::Float, Device::Cpu));
        let y = autocast(Device::Cpu, Kind::BFloat16, || {
            assert!(is_enabled(Device::Cpu).unwrap());
            // Inner explicit float32 region.
            let inner = Autocast::enter(Device::Cpu, Kind::BFloat16, false).unwrap();
            assert_eq!(x.linear(&w, None::<Tensor>).kind(), Kind::Float);
            drop(inner);
            x.linear(&w, None::<Tensor>)
        })
        .unwrap();
        assert_eq!(y.kind(), Kind::BFloat16);
        assert!(!is_enabled(Device::Cpu).unwrap());
        assert_eq!(dtype(Device::Cpu).unwrap(), before);
        assert_eq!(x.linear(&w, None::<Tensor>).kind(), Kind::Float);
        // Another thread does not see this thread's autocast.
        let _g = Autocast::enter(Device::Cpu, Kind::BFloat16, true).unwrap();
        let other = std::thread::spawn(|| is_enabled(Device::Cpu).unwrap())
            .join()
            .unwrap();
        assert!(!other);
    }

    #[test]
    fn shim_errors_come_back_as_errors() {
        // Mismatched devices/dtypes: the kernel throws, the shim returns the message.
        let mut grads = vec![Tensor::ones([2], (Kind::Float, Device::Cpu))];
        let mut found_inf = Tensor::zeros([2, 2], (Kind::Float, Device::Cpu));
        let inv = Tensor::ones([1], (Kind::Float, Device::Cpu));
        let err = non_finite_check_and_unscale(&mut grads, &mut found_inf, &inv).unwrap_err();
        assert!(err.0.starts_with("unscaling gradients: "), "{err}");
        assert!(!err.0.contains("Exception raised from"), "{err}");
    }

    #[test]
    fn scaler_backs_off_skips_and_grows() {
        let options = GradScalerOptions {
            growth_interval: 2,
            ..Default::default()
        };
        let mut s = GradScaler::new(Device::Cpu, options).unwrap();
        let mut grads = vec![Tensor::from_slice(&[65536.0f32, -131072.0])];
        assert!(s.unscale(&mut grads).unwrap());
        assert_eq!(Vec::<f32>::try_from(&grads[0]).unwrap(), vec![1.0, -2.0]);
        s.update().unwrap();
        assert_eq!(s.scale_value().unwrap(), 65536.0);
        let mut grads = vec![Tensor::from_slice(&[f32::NAN, 1.0])];
        assert!(!s.unscale(&mut grads).unwrap());
        s.update().unwrap();
        assert_eq!(s.scale_value().unwrap(), 32768.0);
        assert_eq!(s.growth_tracker_value().unwrap(), 0);
        for _ in 0..2 {
            assert!(s.unscale(&mut []).unwrap());
            s.update().unwrap();
        }
        assert_eq!(s.scale_value().unwrap(), 65536.0);
        let state = s.state();
        let mut t = GradScaler::new(Device::Cpu, options).unwrap();
        t.load_state(&state).unwrap();
        assert_eq!(t.scale_value().unwrap(), 65536.0);
        assert!(t.update().is_err());
    }
}
