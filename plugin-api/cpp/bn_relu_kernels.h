// The loops of the fused training-mode BatchNorm + ReLU (bn_relu.cpp), written once and compiled
// once per instruction set: bn_relu_avx2.cpp (AVX2 + FMA) and bn_relu_base.cpp (the x86-64
// baseline), each in its own namespace, IMGCLF_BN_NS. bn_relu.cpp picks one at run time.
//
// No libtorch header may be included after the `#pragma GCC target` of bn_relu_avx2.cpp (its
// inline functions would be emitted with AVX2 instructions and could be chosen by the linker for
// every caller), so this file sees plain pointers and the standard headers its includer has
// already included: <cstdint>, <cstring>.
//
// Layout: `rows` x `c` values, channel innermost (channels_last NHWC: rows = N*H*W). A
// contiguous NCHW plane of one channel is the same with c = 1 and its channel's constants.
// Element types: float, and bfloat16 as uint16_t (the top half of a float; stored with
// round-to-nearest-even, as c10::BFloat16 does). Arithmetic is float throughout.
//
// Every reduction writes per-channel partial sums of a slice of rows that the caller fixes
// independently of the thread count, and the caller adds the slices in order: the result does
// not depend on how many threads ran.

#ifndef IMGCLF_BN_NS
#error "define IMGCLF_BN_NS before including bn_relu_kernels.h"
#endif

namespace imgclf_bn {
namespace IMGCLF_BN_NS {

inline float load(const float *p, int64_t i) { return p[i]; }
inline float load(const uint16_t *p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline void store(float *p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t *p, int64_t i, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  // A NaN stays a quiet NaN (branch-free, so the loops vectorise).
  p[i] = static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}
// The normalised, scaled and shifted value before ReLU: (x - mean) * (weight * invstd) + bias,
// subtracting the mean first as ATen does (folding it into the bias would cancel large terms
// where a channel's mean is large next to its spread). Forward and backward (ReLU's mask) call
// this same function, compiled without FMA contraction: the same value both times.
inline float pre(float x, float mean, float scale, float bias) {
  return (x - mean) * scale + bias;
}
// NaN stays NaN, as torch.relu keeps it.
inline float relu_of(float v) { return v < 0.f ? 0.f : v; }

constexpr int kLanes = 16;

// Over rows [r0, r1), per channel: sum[c] = the sum of x, m2[c] = the sum of squared
// deviations from this slice's own mean (two passes over a slice small enough to stay in cache:
// no cancellation however large the mean is next to the spread). Both start at zero.
template <typename T>
void stats(const T *__restrict__ x, int64_t r0, int64_t r1, int64_t c, float *__restrict__ sum,
           float *__restrict__ m2) {
  const float inv_n = 1.f / static_cast<float>(r1 - r0);
  if (c == 1) {
    float s[kLanes] = {0}, q[kLanes] = {0};
    int64_t r = r0;
    for (; r + kLanes <= r1; r += kLanes)
      for (int j = 0; j < kLanes; ++j) s[j] += load(x, r + j);
    float ts = 0.f;
    for (; r < r1; ++r) ts += load(x, r);
    for (int j = 0; j < kLanes; ++j) ts += s[j];
    const float mean = ts * inv_n;
    r = r0;
    for (; r + kLanes <= r1; r += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const float d = load(x, r + j) - mean;
        q[j] += d * d;
      }
    float tq = 0.f;
    for (; r < r1; ++r) {
      const float d = load(x, r) - mean;
      tq += d * d;
    }
    for (int j = 0; j < kLanes; ++j) tq += q[j];
    sum[0] = ts;
    m2[0] = tq;
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T *row = x + r * c;
    for (int64_t j = 0; j < c; ++j) sum[j] += load(row, j);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T *row = x + r * c;
    for (int64_t j = 0; j < c; ++j) {
      const float d = load(row, j) - sum[j] * inv_n;
      m2[j] += d * d;
    }
  }
}

// y = max(0, x * scale[c] + bias[c]) over rows [r0, r1).
template <typename T>
void apply(const T *__restrict__ x, T *__restrict__ y, int64_t r0, int64_t r1, int64_t c,
           const float *__restrict__ mean, const float *__restrict__ scale,
           const float *__restrict__ bias) {
  if (c == 1) {
    const float a = scale[0], b = bias[0], m = mean[0];
    for (int64_t r = r0; r < r1; ++r) store(y, r, relu_of(pre(load(x, r), m, a, b)));
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T *xr = x + r * c;
    T *yr = y + r * c;
    for (int64_t j = 0; j < c; ++j) store(yr, j, relu_of(pre(load(xr, j), mean[j], scale[j], bias[j])));
  }
}

// With gm = (x * scale + bias > 0) ? g : 0: sdy[c] += gm, sdyx[c] += gm * (x - mean[c]).
template <typename T>
void grad_stats(const T *__restrict__ g, const T *__restrict__ x, int64_t r0, int64_t r1, int64_t c, const float *__restrict__ scale,
                const float *__restrict__ bias, const float *__restrict__ mean, float *__restrict__ sdy, float *__restrict__ sdyx) {
  if (c == 1) {
    float s[kLanes] = {0}, q[kLanes] = {0};
    const float a = scale[0], b = bias[0], m = mean[0];
    int64_t r = r0;
    for (; r + kLanes <= r1; r += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        float xv = load(x, r + j);
        const float gv = load(g, r + j);
        float gm = pre(xv, m, a, b) > 0.f ? gv : 0.f;
        s[j] += gm;
        q[j] += gm * (xv - m);
      }
    float ts = 0.f, tq = 0.f;
    for (; r < r1; ++r) {
      float xv = load(x, r);
      const float gv = load(g, r);
      float gm = pre(xv, m, a, b) > 0.f ? gv : 0.f;
      ts += gm;
      tq += gm * (xv - m);
    }
    for (int j = 0; j < kLanes; ++j) {
      ts += s[j];
      tq += q[j];
    }
    sdy[0] += ts;
    sdyx[0] += tq;
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T *xr = x + r * c;
    const T *gr = g + r * c;
    for (int64_t j = 0; j < c; ++j) {
      float xv = load(xr, j);
      const float gv = load(gr, j);
      float gm = pre(xv, mean[j], scale[j], bias[j]) > 0.f ? gv : 0.f;
      sdy[j] += gm;
      sdyx[j] += gm * (xv - mean[j]);
    }
  }
}

// dx = gm * gain[c] - c0[c] - c1[c] * (x - mean[c]), gm as in grad_stats.
template <typename T>
void grad_apply(const T *__restrict__ g, const T *__restrict__ x, T *__restrict__ dx, int64_t r0, int64_t r1, int64_t c,
                const float *__restrict__ scale, const float *__restrict__ bias, const float *__restrict__ mean, const float *__restrict__ gain,
                const float *__restrict__ c0, const float *__restrict__ c1) {
  if (c == 1) {
    const float a = scale[0], b = bias[0], m = mean[0], k = gain[0], z0 = c0[0], z1 = c1[0];
    for (int64_t r = r0; r < r1; ++r) {
      float xv = load(x, r);
      const float gv = load(g, r);
      float gm = pre(xv, m, a, b) > 0.f ? gv : 0.f;
      store(dx, r, gm * k - z0 - z1 * (xv - m));
    }
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T *xr = x + r * c;
    const T *gr = g + r * c;
    T *dr = dx + r * c;
    for (int64_t j = 0; j < c; ++j) {
      float xv = load(xr, j);
      const float gv = load(gr, j);
      float gm = pre(xv, mean[j], scale[j], bias[j]) > 0.f ? gv : 0.f;
      store(dr, j, gm * gain[j] - c0[j] - c1[j] * (xv - mean[j]));
    }
  }
}

}  // namespace IMGCLF_BN_NS
}  // namespace imgclf_bn
