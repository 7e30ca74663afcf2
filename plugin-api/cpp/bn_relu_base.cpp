// The fused BatchNorm + ReLU loops (bn_relu_kernels.h) for any x86-64 (or other) CPU.
#include "bn_relu_table.h"

#define IMGCLF_BN_NS base
#include "bn_relu_kernels.h"

IMGCLF_BN_KERNEL_SET(base_kernels)
