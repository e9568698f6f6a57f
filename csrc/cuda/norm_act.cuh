// Launch functions of csrc/cuda/norm_act.cu (no torch headers on either side of this line).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace ganengine {
namespace cuda {

struct NormActShape {
  int64_t N, C, HW;
  int64_t sN, sC, sHW;  // strides of x (and y / dx), in elements
  int64_t gN, gC, gHW;  // strides of grad_y (backward): the launcher makes them equal to x's
  int64_t chunk;        // hw elements per (plane or channel tile, split) block
  int split;            // chunks per plane
  bool nhwc;            // channels contiguous (sC == 1): channel-tile kernels with coalesced loads
  bool vec;             // 16-byte vector loads (the launcher checked alignment and divisibility)
};

constexpr int kNormActThreads = 256;

// NHWC kernels: threads along channels per pixel row (each `vec` thread covers 16 bytes of
// channels: 8 threads = 128 contiguous bytes per pixel) and rows of pixels.
inline int norm_act_nhwc_threads_x(bool vec) { return vec ? 8 : 32; }
inline int norm_act_vec_width(int elem_size, bool vec) { return vec ? 16 / elem_size : 1; }
inline int norm_act_channel_tile(int elem_size, bool vec) {
  return norm_act_nhwc_threads_x(vec) * norm_act_vec_width(elem_size, vec);
}

// dtype: 0 fp32, 1 fp16, 2 bf16, 3 fp64. Statistics / weights / partials are fp32 (fp64 for fp64).
// Workspace `part` holds 2 * N * C * split accumulators (unused when split == 1 in NCHW).
cudaError_t norm_act_forward(int dtype, const void* x, void* y, const void* w, const void* b, void* mean,
                             void* rstd, void* part, const NormActShape& s, double eps, bool act, double slope,
                             cudaStream_t stream);

cudaError_t norm_act_backward(int dtype, const void* g, const void* x, void* dx, const void* w, const void* b,
                              const void* mean, const void* rstd, void* dw, void* db, void* part,
                              const NormActShape& s, bool act, double slope, cudaStream_t stream);

}  // namespace cuda
}  // namespace ganengine
