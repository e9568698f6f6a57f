// Conversions between a kernel's storage dtype and its accumulation dtype (fp32 for fp32 / fp16 /
// bf16 data, fp64 for fp64), rounding to nearest on the way back; shared by the CUDA kernels.
// Device code only, no torch headers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ganengine {
namespace cuda {

template <typename T> __device__ __forceinline__ float to_acc(T v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T, typename A> __device__ __forceinline__ T from_acc(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

}  // namespace cuda
}  // namespace ganengine
