// The fused BatchNorm + ReLU loops (bn_relu_kernels.h) compiled for AVX2 + FMA; bn_relu.cpp
// calls them only where the CPU has both. Nothing after the pragma includes a libtorch header.
#include "bn_relu_table.h"

#if defined(__x86_64__)
#pragma GCC target("avx2,fma")
#define IMGCLF_BN_NS avx2
#include "bn_relu_kernels.h"

IMGCLF_BN_KERNEL_SET(avx2_kernels)
#else
imgclf_bn::KernelSet imgclf_bn::avx2_kernels() { return base_kernels(); }
#endif
