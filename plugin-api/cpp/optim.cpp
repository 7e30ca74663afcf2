// Multi-tensor optimizer kernels that tch does not bind: ATen's fused SGD and Adam, the
// `_foreach_*` ops the other optimizers are written with, and releasing gradients (PyTorch's
// `zero_grad(set_to_none=True)`). Each call is one ATen op over a whole list of tensors: on
// CUDA one multi-tensor-apply launch per chunk of tensors instead of one launch per parameter.
//
// Tensor lists cross as arrays of `at::Tensor*` (tch::Tensor::as_mut_ptr). Ops that create
// tensors write `new at::Tensor` pointers into `out`, which Rust takes over with
// tch::Tensor::from_ptr (tch frees them with delete). Every function runs with autograd off.
#include "shim.h"

#include <c10/core/GradMode.h>

#include <optional>

namespace {

using imgclf_shim::tensors;

std::optional<at::Tensor> optional_tensor(const at::Tensor *t) {
  if (t == nullptr || !t->defined()) return std::nullopt;
  return *t;
}

void hand_over(std::vector<at::Tensor> &&result, at::Tensor **out) {
  for (size_t i = 0; i < result.size(); ++i) out[i] = new at::Tensor(std::move(result[i]));
}

}  // namespace

extern "C" {

// torch.optim.SGD(fused=True)'s kernel: d = g + wd p; buf = momentum buf + (1 - dampening) d
// (buf = d when is_first_step); d = d + momentum buf (nesterov) or buf; p -= lr d.
char *imgclf_fused_sgd_(at::Tensor *const *params, at::Tensor *const *grads,
                        at::Tensor *const *momentum_buffers, size_t n, double weight_decay,
                        double momentum, double lr, double dampening, bool nesterov, bool maximize,
                        bool is_first_step, const at::Tensor *grad_scale,
                        const at::Tensor *found_inf) {
  SHIM_TRY {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> p = tensors(params, n), g = tensors(grads, n);
    std::vector<at::Tensor> b = momentum == 0.0 ? std::vector<at::Tensor>{}
                                                : tensors(momentum_buffers, n);
    at::_fused_sgd_(p, g, b, weight_decay, momentum, lr, dampening, nesterov, maximize,
                    is_first_step, optional_tensor(grad_scale), optional_tensor(found_inf));
  }
  SHIM_CATCH
}

// torch.optim.Adam(fused=True)'s kernel; `steps` are the per-parameter step counts (float32
// scalars on the parameters' device), already incremented for this step, as torch.optim does.
// `max_exp_avg_sqs` is read only with amsgrad.
char *imgclf_fused_adam_(at::Tensor *const *params, at::Tensor *const *grads,
                         at::Tensor *const *exp_avgs, at::Tensor *const *exp_avg_sqs,
                         at::Tensor *const *max_exp_avg_sqs, at::Tensor *const *steps, size_t n,
                         double lr, double beta1, double beta2, double weight_decay, double eps,
                         bool amsgrad, bool maximize, const at::Tensor *grad_scale,
                         const at::Tensor *found_inf) {
  SHIM_TRY {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> maxes =
        amsgrad ? tensors(max_exp_avg_sqs, n) : std::vector<at::Tensor>{};
    at::_fused_adam_(tensors(params, n), tensors(grads, n), tensors(exp_avgs, n),
                     tensors(exp_avg_sqs, n), maxes, tensors(steps, n), lr, beta1, beta2,
                     weight_decay, eps, amsgrad, maximize, optional_tensor(grad_scale),
                     optional_tensor(found_inf));
  }
  SHIM_CATCH
}

// self[i] += alpha * other[i]
char *imgclf_foreach_add_list_(at::Tensor *const *self, at::Tensor *const *other, size_t n,
                               double alpha) {
  SHIM_TRY {
    at::NoGradGuard no_grad;
    at::_foreach_add_(tensors(self, n), tensors(other, n), alpha);
  }
  SHIM_CATCH
}

// out[i] = self[i] + alpha * other[i] (new tensors)
char *imgclf_foreach_add_list(at::Tensor *const *self, at::Tensor *const *other, size_t n,
                              double alpha, at::Tensor **out) {
  SHIM_TRY {
    at::NoGradGuard no_grad;
    hand_over(at::_foreach_add(tensors(self, n), tensors(other, n), alpha), out);
  }
  SHIM_CATCH
}

// self[i] -= other[i]
char *imgclf_foreach_sub_list_(at::Tensor *const *self, at::Tensor *const *other, size_t n) {
  SHIM_TRY {
    at::NoGradGuard no_grad;
    at::_foreach_sub_(tensors(self, n), tensors(other, n));
  }
  SHIM_CATCH
}

// self[i] *= other[i]
char *imgclf_foreach_mul_list_(at::Tensor *const *self, at::Tensor *const *other, size_t n) {
  SHIM_TRY {
    at::NoGradGuard no_grad;
    at::_foreach_mul_(tensors(self, n), tensors(other, n));
  }
  SHIM_CATCH
}

// self[i] *= scalar
char *imgclf_foreach_mul_scalar_(at::Tensor *const *self, size_t n, double scalar) {
  SHIM_TRY {
    at::NoGradGuard no_grad;
    at::_foreach_mul_(tensors(self, n), scalar);
  }
  SHIM_CATCH
}

// out[i] = self[i] * scalar (new tensors)
char *imgclf_foreach_mul_scalar(at::Tensor *const *self, size_t n, double scalar,
                                at::Tensor **out) {
  SHIM_TRY {
    at::NoGradGuard no_grad;
    hand_over(at::_foreach_mul(tensors(self, n), scalar), out);
  }
  SHIM_CATCH
}

// self[i] += scalar
char *imgclf_foreach_add_scalar_(at::Tensor *const *self, size_t n, double scalar) {
  SHIM_TRY {
    at::NoGradGuard no_grad;
    at::_foreach_add_(tensors(self, n), scalar);
  }
  SHIM_CATCH
}

// self[i] += value * tensor1[i] * tensor2[i]
char *imgclf_foreach_addcmul_(at::Tensor *const *self, at::Tensor *const *tensor1,
                              at::Tensor *const *tensor2, size_t n, double value) {
  SHIM_TRY {
    at::NoGradGuard no_grad;
    at::_foreach_addcmul_(tensors(self, n), tensors(tensor1, n), tensors(tensor2, n), value);
  }
  SHIM_CATCH
}

// out[i] = sqrt(self[i]) (new tensors)
char *imgclf_foreach_sqrt(at::Tensor *const *self, size_t n, at::Tensor **out) {
  SHIM_TRY {
    at::NoGradGuard no_grad;
    hand_over(at::_foreach_sqrt(tensors(self, n)), out);
  }
  SHIM_CATCH
}

// self[i] = 1 / self[i]
char *imgclf_foreach_reciprocal_(at::Tensor *const *self, size_t n) {
  SHIM_TRY {
    at::NoGradGuard no_grad;
    at::_foreach_reciprocal_(tensors(self, n));
  }
  SHIM_CATCH
}

// self[i] = clamp(self[i], lower, upper)
char *imgclf_foreach_clamp_(at::Tensor *const *self, size_t n, double lower, double upper) {
  SHIM_TRY {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> list = tensors(self, n);
    at::_foreach_clamp_min_(list, lower);
    at::_foreach_clamp_max_(list, upper);
  }
  SHIM_CATCH
}

// out[i] = ||self[i]||_2 as 0-dim tensors (new tensors)
char *imgclf_foreach_norm(at::Tensor *const *self, size_t n, at::Tensor **out) {
  SHIM_TRY {
    at::NoGradGuard no_grad;
    hand_over(at::_foreach_norm(tensors(self, n), 2), out);
  }
  SHIM_CATCH
}

// Releases each tensor's gradient (Python's `p.grad = None`): the next backward allocates a
// fresh one instead of accumulating into a zero-filled buffer.
char *imgclf_release_grads(at::Tensor *const *self, size_t n) {
  SHIM_TRY {
    for (size_t i = 0; i < n; ++i) self[i]->mutable_grad() = at::Tensor();
  }
  SHIM_CATCH
}

}  // extern "C"
