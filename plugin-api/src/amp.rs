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
