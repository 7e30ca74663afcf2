// The kernel table of the fused BatchNorm + ReLU: one per instruction set (bn_relu_avx2.cpp,
// bn_relu_base.cpp), chosen at run time by bn_relu.cpp. Plain pointers, no libtorch types.
#pragma once

#include <cstdint>
#include <cstring>

namespace imgclf_bn {

template <typename T>
struct Kernels {
  void (*stats)(const T *x, int64_t r0, int64_t r1, int64_t c, float *sum, float *m2);
  void (*apply)(const T *x, T *y, int64_t r0, int64_t r1, int64_t c, const float *mean,
                const float *scale, const float *bias);
  void (*grad_stats)(const T *g, const T *x, int64_t r0, int64_t r1, int64_t c,
                     const float *scale, const float *bias, const float *mean, float *sdy,
                     float *sdyx);
  void (*grad_apply)(const T *g, const T *x, T *dx, int64_t r0, int64_t r1, int64_t c,
                     const float *scale, const float *bias, const float *mean,
                     const float *gain, const float *c0, const float *c1);
};

struct KernelSet {
  Kernels<float> f32;
  Kernels<uint16_t> bf16;  // bfloat16 bits
};

KernelSet avx2_kernels();
KernelSet base_kernels();

}  // namespace imgclf_bn

#define IMGCLF_BN_KERNEL_SET(fn)                                                       \
  imgclf_bn::KernelSet imgclf_bn::fn() {                                               \
    using namespace imgclf_bn::IMGCLF_BN_NS;                                           \
    return KernelSet{                                                                  \
        {&stats<float>, &apply<float>, &grad_stats<float>, &grad_apply<float>},        \
        {&stats<uint16_t>, &apply<uint16_t>, &grad_stats<uint16_t>, &grad_apply<uint16_t>}}; \
  }
