// Mixed precision: libtorch's device-generic autocast state (thread-local) and the two ATen ops
// torch.amp.GradScaler is built on. Device types and scalar types cross as c10's integer codes.
#include "shim.h"

#include <ATen/autocast_mode.h>

#include <cstdint>

namespace {
c10::DeviceType device_type(int32_t code) { return static_cast<c10::DeviceType>(code); }
}  // namespace

extern "C" {

char *imgclf_autocast_is_available(int32_t device, bool *out) {
  SHIM_TRY { *out = at::autocast::is_autocast_available(device_type(device)); }
  SHIM_CATCH
}

char *imgclf_autocast_is_enabled(int32_t device, bool *out) {
  SHIM_TRY { *out = at::autocast::is_autocast_enabled(device_type(device)); }
  SHIM_CATCH
}

char *imgclf_autocast_set_enabled(int32_t device, bool enabled) {
  SHIM_TRY { at::autocast::set_autocast_enabled(device_type(device), enabled); }
  SHIM_CATCH
}

char *imgclf_autocast_get_dtype(int32_t device, int32_t *out) {
  SHIM_TRY { *out = static_cast<int32_t>(at::autocast::get_autocast_dtype(device_type(device))); }
  SHIM_CATCH
}

char *imgclf_autocast_set_dtype(int32_t device, int32_t dtype) {
  SHIM_TRY {
    at::autocast::set_autocast_dtype(device_type(device), static_cast<at::ScalarType>(dtype));
  }
  SHIM_CATCH
}

char *imgclf_autocast_increment_nesting(int32_t *out) {
  SHIM_TRY { *out = at::autocast::increment_nesting(); }
  SHIM_CATCH
}

char *imgclf_autocast_decrement_nesting(int32_t *out) {
  SHIM_TRY { *out = at::autocast::decrement_nesting(); }
  SHIM_CATCH
}

char *imgclf_autocast_clear_cache() {
  SHIM_TRY { at::autocast::clear_cache(); }
  SHIM_CATCH
}

char *imgclf_autocast_is_cache_enabled(bool *out) {
  SHIM_TRY { *out = at::autocast::is_autocast_cache_enabled(); }
  SHIM_CATCH
}

char *imgclf_autocast_set_cache_enabled(bool enabled) {
  SHIM_TRY { at::autocast::set_autocast_cache_enabled(enabled); }
  SHIM_CATCH
}

// Multiplies every gradient by inv_scale in place and sets found_inf (a one-element float32
// tensor on the gradients' device) to 1 if any of them holds an inf or a NaN.
char *imgclf_amp_foreach_non_finite_check_and_unscale_(at::Tensor *const *grads, size_t n,
                                                      at::Tensor *found_inf,
                                                      const at::Tensor *inv_scale) {
  SHIM_TRY {
    std::vector<at::Tensor> list = imgclf_shim::tensors(grads, n);
    at::_amp_foreach_non_finite_check_and_unscale_(list, *found_inf, *inv_scale);
  }
  SHIM_CATCH
}

// GradScaler's update: on found_inf, scale *= backoff and the tracker resets; otherwise the
// tracker counts clean steps and scale *= growth when it reaches growth_interval.
char *imgclf_amp_update_scale_(at::Tensor *scale, at::Tensor *growth_tracker,
                               const at::Tensor *found_inf, double growth, double backoff,
                               int64_t growth_interval) {
  SHIM_TRY {
    at::_amp_update_scale_(*scale, *growth_tracker, *found_inf, growth, backoff, growth_interval);
  }
  SHIM_CATCH
}

// Replaces a tensor's gradient (NULL: none), whatever its dtype: the O2 policy hands the
// optimizer float32 gradients of weights whose forward ran in reduced precision.
char *imgclf_tensor_set_grad(at::Tensor *tensor, const at::Tensor *grad) {
  SHIM_TRY { tensor->mutable_grad() = grad != nullptr ? *grad : at::Tensor(); }
  SHIM_CATCH
}

}  // extern "C"
