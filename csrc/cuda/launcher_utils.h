// Host-side helpers shared by the CUDA launchers (csrc/cuda/*_launcher.cpp).
#pragma once
#include <ATen/ATen.h>

namespace ganengine {
namespace cuda_launch {

// the dtype code the CUDA kernels take: 0 fp32, 1 fp16, 2 bf16, 3 fp64
inline int dtype_code(at::ScalarType t, const char* who = "ganengine CUDA kernels") {
  switch (t) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    case at::kDouble: return 3;
    default: TORCH_CHECK_TYPE(false, who, ": unsupported dtype ", t, " (float, half, bfloat16, double)");
  }
  return -1;
}

}  // namespace cuda_launch
}  // namespace ganengine
