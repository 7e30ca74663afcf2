// Training-mode BatchNorm2d followed by ReLU as one autograd op on the CPU:
// `relu(batch_norm(x, weight, bias, running_mean, running_var, training=True))`.
//
// ATen runs these as two ops and five passes over the activations forward (mean, variance,
// normalise, ReLU read + write) and again backward; here forward is two passes over memory
// (statistics, each slice read twice while it is in cache; normalise-and-clamp) and backward two
// (the two per-channel gradient sums; the input gradient, with ReLU's mask recomputed from the
// saved input, so the output may be changed in place after). The result equals ATen's up to
// float rounding (the unit tests of plugin-api/src/fused.rs compare values, gradients and
// running statistics; tests/architectures.rs every network's training step against PyTorch);
// running statistics are updated as nn.BatchNorm2d does (unbiased variance).
//
// Where it applies: a CPU tensor of 4 dimensions, float32 or bfloat16 (autocast's CPU type; BN
// runs in its input's type there, as ATen's does), contiguous in channels_last or NCHW layout,
// more than one value per channel, float32 affine parameters and running statistics. Anywhere
// else imgclf_bn_relu_train hands back no tensor and the caller runs ATen's two ops.
//
// Reductions are summed in slices fixed by the shape (never by the thread count) and the slices
// are added in order, in double: results are bit-identical for any number of threads.
#include "shim.h"
#include "bn_relu_table.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <utility>
#include <cmath>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const imgclf_bn::KernelSet &kernels() {
  static const imgclf_bn::KernelSet set = [] {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return imgclf_bn::avx2_kernels();
#endif
    return imgclf_bn::base_kernels();
  }();
  return set;
}

// Elements per slice of channels_last rows: a slice is rows x c values.
constexpr int64_t kSliceElements = 16384;

// How the activations are cut into slices: channels_last, `rows` x `c` cut every `rows_per`
// rows; NCHW, one slice per (n, channel) plane of `hw` values.
struct Geometry {
  bool nhwc;
  int64_t c, hw, rows, rows_per, slices;

  explicit Geometry(const at::Tensor &x) {
    const int64_t n = x.size(0);
    c = x.size(1);
    hw = x.size(2) * x.size(3);
    rows = n * hw;
    nhwc = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !(c == 1 && x.is_contiguous());
    if (nhwc) {
      rows_per = std::max<int64_t>(1, kSliceElements / c);
      slices = (rows + rows_per - 1) / rows_per;
    } else {
      rows_per = hw;
      slices = n * c;
    }
  }
  // Per-slice partial sums: c of them per channels_last slice, one per plane.
  int64_t width() const { return nhwc ? c : 1; }
  struct Slice {
    int64_t offset, r0, r1, c, channel;
  };
  Slice slice(int64_t s) const {
    if (nhwc) return {0, s * rows_per, std::min(rows, (s + 1) * rows_per), c, 0};
    return {s * hw, 0, hw, 1, s % c};
  }
};

// Runs `f(s)` for every slice index in parallel.
template <typename F>
void for_slices(const Geometry &g, F f) {
  at::parallel_for(0, g.slices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) f(s);
  });
}

template <typename F>
void each_slice(const Geometry &g, F f) {
  for_slices(g, [&](int64_t s) { f(g.slice(s)); });
}

// Runs `f(slice, partial_a, partial_b)` over every slice in parallel, each writing its own
// float partial sums (zeroed): `width()` of them per slice.
template <typename F>
std::pair<std::vector<float>, std::vector<float>> partials(const Geometry &g, F f) {
  const int64_t w = g.width();
  std::vector<float> pa(g.slices * w, 0.f), pb(g.slices * w, 0.f);
  for_slices(g, [&](int64_t s) { f(g.slice(s), &pa[s * w], &pb[s * w]); });
  return {std::move(pa), std::move(pb)};
}

// Per-channel totals of per-slice partial sums, added in slice order, in double.
std::vector<double> per_channel(const Geometry &g, const std::vector<float> &partial) {
  const int64_t w = g.width();
  std::vector<double> total(g.c, 0.0);
  for (int64_t s = 0; s < g.slices; ++s) {
    const int64_t first = g.slice(s).channel;
    for (int64_t j = 0; j < w; ++j) total[first + j] += partial[s * w + j];
  }
  return total;
}

// Per-channel totals of the partial sums of `partials`.
template <typename F>
void reduce(const Geometry &g, F f, std::vector<double> &a, std::vector<double> &b) {
  const auto [pa, pb] = partials(g, f);
  a = per_channel(g, pa);
  b = per_channel(g, pb);
}

// Per-channel mean and biased variance from each slice's (sum, squared deviations from the
// slice's mean), combined as Chan et al. do: M2 = sum of (m2_s + n_s (mean_s - mean)^2).
template <typename F>
void moments(const Geometry &g, F f, std::vector<double> &mean, std::vector<double> &var) {
  const auto [sum, m2] = partials(g, f);
  const int64_t w = g.width();
  const double m = static_cast<double>(g.rows);
  mean = per_channel(g, sum);
  for (double &v : mean) v /= m;
  var.assign(g.c, 0.0);
  for (int64_t s = 0; s < g.slices; ++s) {
    const Geometry::Slice sl = g.slice(s);
    const double n = static_cast<double>(sl.r1 - sl.r0);
    for (int64_t j = 0; j < w; ++j) {
      const double d = sum[s * w + j] / n - mean[sl.channel + j];
      var[sl.channel + j] += m2[s * w + j] + n * d * d;
    }
  }
  for (double &v : var) v /= m;
}

at::Tensor floats(const std::vector<float> &v) {
  return at::tensor(at::ArrayRef<float>(v), at::TensorOptions().dtype(at::kFloat));
}

// The affine map of the normalisation: y = relu((x - mean) * scale + bias), scale = weight *
// invstd (bn_relu_kernels.h's `pre`).
struct Affine {
  std::vector<float> mean, invstd, scale, bias;
};

Affine affine(const std::vector<double> &mean, const std::vector<double> &invstd,
            const at::Tensor &weight, const at::Tensor &bias) {
  const int64_t c = static_cast<int64_t>(mean.size());
  const float *w = weight.data_ptr<float>();
  const float *b = bias.data_ptr<float>();
  Affine f;
  f.mean.resize(c);
  f.invstd.resize(c);
  f.scale.resize(c);
  f.bias.resize(c);
  for (int64_t j = 0; j < c; ++j) {
    const double scale = static_cast<double>(w[j]) * invstd[j];
    f.mean[j] = static_cast<float>(mean[j]);
    f.invstd[j] = static_cast<float>(invstd[j]);
    f.scale[j] = static_cast<float>(scale);
    f.bias[j] = b[j];
  }
  return f;
}

std::vector<float> to_vector(const at::Tensor &t) {
  const at::Tensor c = t.to(at::kFloat).contiguous();
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

template <typename T>
const imgclf_bn::Kernels<T> &kernels_for();
template <>
const imgclf_bn::Kernels<float> &kernels_for<float>() {
  return kernels().f32;
}
template <>
const imgclf_bn::Kernels<uint16_t> &kernels_for<uint16_t>() {
  return kernels().bf16;
}

template <typename T>
T *data(const at::Tensor &t) {
  return reinterpret_cast<T *>(t.data_ptr());
}

template <typename T>
at::Tensor forward_typed(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &weight,
                         const at::Tensor &bias, at::Tensor &running_mean,
                         at::Tensor &running_var, double momentum, double eps) {
  const auto &k = kernels_for<T>();
  const Geometry g(x);
  const T *xp = data<T>(x);
  std::vector<double> mean, var;
  moments(
      g,
      [&](const Geometry::Slice &s, float *sum, float *m2) {
        k.stats(xp + s.offset, s.r0, s.r1, s.c, sum, m2);
      },
      mean, var);
  const double m = static_cast<double>(g.rows);
  std::vector<double> invstd(g.c);
  for (int64_t j = 0; j < g.c; ++j) invstd[j] = 1.0 / std::sqrt(var[j] + eps);
  const Affine f = affine(mean, invstd, weight, bias);
  {
    at::NoGradGuard no_grad;
    std::vector<float> unbiased(g.c);
    for (int64_t j = 0; j < g.c; ++j) unbiased[j] = static_cast<float>(var[j] * m / (m - 1.0));
    running_mean.mul_(1.0 - momentum).add_(floats(f.mean), momentum);
    running_var.mul_(1.0 - momentum).add_(floats(unbiased), momentum);
  }
  at::Tensor y = at::empty_like(x);
  T *yp = data<T>(y);
  each_slice(g, [&](const Geometry::Slice &s) {
    k.apply(xp + s.offset, yp + s.offset, s.r0, s.r1, s.c, &f.mean[s.channel],
            &f.scale[s.channel], &f.bias[s.channel]);
  });
  ctx->save_for_backward({x, weight});
  ctx->saved_data["mean"] = floats(f.mean);
  ctx->saved_data["invstd"] = floats(f.invstd);
  ctx->saved_data["scale"] = floats(f.scale);
  ctx->saved_data["bias"] = floats(f.bias);
  return y;
}

template <typename T>
variable_list backward_typed(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &weight,
                             at::Tensor grad) {
  const auto &k = kernels_for<T>();
  const Geometry g(x);
  grad = grad.to(x.scalar_type())
             .contiguous(g.nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const std::vector<float> mean = to_vector(ctx->saved_data["mean"].toTensor());
  const std::vector<float> invstd = to_vector(ctx->saved_data["invstd"].toTensor());
  const std::vector<float> scale = to_vector(ctx->saved_data["scale"].toTensor());
  const std::vector<float> bias = to_vector(ctx->saved_data["bias"].toTensor());
  const T *xp = data<T>(x);
  const T *gp = data<T>(grad);
  std::vector<double> sdy, sdyx;
  reduce(
      g,
      [&](const Geometry::Slice &s, float *a, float *b) {
        k.grad_stats(gp + s.offset, xp + s.offset, s.r0, s.r1, s.c, &scale[s.channel],
                     &bias[s.channel], &mean[s.channel], a, b);
      },
      sdy, sdyx);
  const double m = static_cast<double>(g.rows);
  const float *w = weight.data_ptr<float>();
  std::vector<float> gain(g.c), c0(g.c), c1(g.c), dweight(g.c), dbias(g.c);
  for (int64_t j = 0; j < g.c; ++j) {
    const double is = invstd[j];
    const double a = static_cast<double>(w[j]) * is;
    gain[j] = static_cast<float>(a);
    c0[j] = static_cast<float>(a * sdy[j] / m);
    c1[j] = static_cast<float>(a * is * is * sdyx[j] / m);
    dweight[j] = static_cast<float>(sdyx[j] * is);
    dbias[j] = static_cast<float>(sdy[j]);
  }
  at::Tensor dx = at::empty_like(x);
  T *dp = data<T>(dx);
  each_slice(g, [&](const Geometry::Slice &s) {
    k.grad_apply(gp + s.offset, xp + s.offset, dp + s.offset, s.r0, s.r1, s.c,
                 &scale[s.channel], &bias[s.channel], &mean[s.channel], &gain[s.channel],
                 &c0[s.channel], &c1[s.channel]);
  });
  return {dx, floats(dweight), floats(dbias), at::Tensor(), at::Tensor(), at::Tensor(),
          at::Tensor()};
}

struct BnRelu : public torch::autograd::Function<BnRelu> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &weight,
                            const at::Tensor &bias, at::Tensor running_mean,
                            at::Tensor running_var, double momentum, double eps) {
    if (x.scalar_type() == at::kBFloat16)
      return forward_typed<uint16_t>(ctx, x, weight, bias, running_mean, running_var, momentum,
                                     eps);
    return forward_typed<float>(ctx, x, weight, bias, running_mean, running_var, momentum, eps);
  }
  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    if (saved[0].scalar_type() == at::kBFloat16)
      return backward_typed<uint16_t>(ctx, saved[0], saved[1], grads[0]);
    return backward_typed<float>(ctx, saved[0], saved[1], grads[0]);
  }
};

bool is_channel_vector(const at::Tensor *t, int64_t c) {
  return t != nullptr && t->defined() && t->device().is_cpu() &&
         t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == c &&
         t->is_contiguous();
}

// An override of aten::batch_norm for autograd (imgclf's SyncBatchNorm, host/cpp/c10d.cpp,
// registers one for a distributed run with train.dist.use_sync_bn): BatchNorm must go through
// the dispatcher to reach it, so the fused op stands aside for the rest of the process.
bool batch_norm_overridden() {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("aten::batch_norm", "");
  return op.hasKernelForDispatchKey(c10::DispatchKey::AutogradCPU);
}

bool applies(const at::Tensor &x, const at::Tensor *weight, const at::Tensor *bias,
             const at::Tensor *running_mean, const at::Tensor *running_var) {
  if (batch_norm_overridden()) return false;
  if (!x.defined() || !x.device().is_cpu() || x.dim() != 4) return false;
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kBFloat16) return false;
  if (!x.is_contiguous() && !x.is_contiguous(at::MemoryFormat::ChannelsLast)) return false;
  const int64_t c = x.size(1);
  if (c == 0 || x.size(0) * x.size(2) * x.size(3) < 2) return false;
  return is_channel_vector(weight, c) && is_channel_vector(bias, c) &&
         is_channel_vector(running_mean, c) && is_channel_vector(running_var, c);
}

}  // namespace

extern "C" {

// relu(batch_norm(x, ..., training=True, momentum, eps)) as one autograd op, updating the
// running statistics in place. `*out` is a new tensor, or NULL where the fused op does not
// apply (see the top of this file): the caller then runs ATen's batch_norm and relu.
char *imgclf_bn_relu_train(const at::Tensor *x, const at::Tensor *weight, const at::Tensor *bias,
                           at::Tensor *running_mean, at::Tensor *running_var, double momentum,
                           double eps, at::Tensor **out) {
  *out = nullptr;
  SHIM_TRY {
    if (!applies(*x, weight, bias, running_mean, running_var)) return nullptr;
    at::Tensor y =
        BnRelu::apply(*x, *weight, *bias, *running_mean, *running_var, momentum, eps);
    *out = new at::Tensor(std::move(y));
  }
  SHIM_CATCH
}

}  // extern "C"
