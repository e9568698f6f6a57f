// conv2d_act's cuda backend: the elementwise epilogues around ATen's convolution (cuDNN), as
// CUDA kernels (csrc/cuda/conv_act_launcher.cpp runs the convolutions and calls these). Both are
// memory-bound: a grid-stride loop, kPer independent elements per thread per step so that loads
// are in flight together, 32-bit index math wherever every index fits below 2^31 (the
// channel of an NCHW element needs a division per element; 64-bit division is several times
// dearer). No torch headers: compiles in seconds.
#include <climits>
#include <cstdint>

#include "acc_convert.cuh"
#include "act.cuh"
#include "conv_act.cuh"

namespace ganengine {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPer = 4;

template <typename A> __device__ __forceinline__ A leaky(A v, A slope) { return act_fwd(v, slope); }

// i = base + k * kThreads for k < kPer, base stepping by the grid stride: v[k] = load(i) for the
// four elements first (four independent loads in flight), then store(i, v[k]). The 32-bit index
// type I is chosen by the launcher only where base + stride fits (int32_indices).
template <typename A, typename I, typename Load, typename Store>
__device__ __forceinline__ void grid_stride(I n, Load load, Store store) {
  const I stride = static_cast<I>(gridDim.x) * kThreads * kPer;
  for (I base = static_cast<I>(blockIdx.x) * kThreads * kPer + threadIdx.x; base < n; base += stride) {
    A v[kPer];
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const I i = base + static_cast<I>(k) * kThreads;
      if (i < n) v[k] = load(i);
    }
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const I i = base + static_cast<I>(k) * kThreads;
      if (i < n) store(i, v[k]);
    }
  }
}

template <typename T, typename A, typename I>
__global__ void bias_act_kernel(T* __restrict__ y, const T* __restrict__ b, I n, I C, I inner, A slope) {
  grid_stride<A>(
      n, [&](I i) { return to_acc(y[i]) + (b != nullptr ? to_acc(b[(i / inner) % C]) : A(0)); },
      [&](I i, A v) { y[i] = from_acc<T, A>(leaky(v, slope)); });
}

template <typename T, typename A, typename I>
__global__ void act_grad_kernel(const T* __restrict__ g, const T* __restrict__ y, T* __restrict__ gz, I n, A slope) {
  grid_stride<A>(
      n, [&](I i) { return act_bwd(to_acc(g[i]), to_acc(y[i]), slope); },
      [&](I i, A v) { gz[i] = from_acc<T, A>(v); });
}

// enough blocks to fill any current GPU many times over; the grid-stride loop covers the rest
unsigned grid_for(int64_t n) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * kPer;
  const int64_t blocks = (n + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

// whether 32-bit indices serve n elements: every index a thread forms, up to its last step's
// base + one whole grid stride, must stay below 2^31 (a base past n - 1 is formed before the loop
// test ends the loop)
bool int32_indices(int64_t n) {
  const int64_t stride = static_cast<int64_t>(grid_for(n)) * kThreads * kPer;
  return n + stride <= INT32_MAX;
}

template <typename T, typename A>
cudaError_t bias_act_typed(void* y, const void* b, int64_t n, int64_t C, int64_t inner, double slope,
                           cudaStream_t stream) {
  T* yp = static_cast<T*>(y);
  const T* bp = static_cast<const T*>(b);
  if (int32_indices(n))
    bias_act_kernel<T, A, int32_t><<<grid_for(n), kThreads, 0, stream>>>(
        yp, bp, static_cast<int32_t>(n), static_cast<int32_t>(C), static_cast<int32_t>(inner), static_cast<A>(slope));
  else
    bias_act_kernel<T, A, int64_t><<<grid_for(n), kThreads, 0, stream>>>(yp, bp, n, C, inner, static_cast<A>(slope));
  return cudaGetLastError();
}

template <typename T, typename A>
cudaError_t act_grad_typed(const void* g, const void* y, void* gz, int64_t n, double slope, cudaStream_t stream) {
  const T* gp = static_cast<const T*>(g);
  const T* yp = static_cast<const T*>(y);
  T* zp = static_cast<T*>(gz);
  if (int32_indices(n))
    act_grad_kernel<T, A, int32_t><<<grid_for(n), kThreads, 0, stream>>>(gp, yp, zp, static_cast<int32_t>(n),
                                                                          static_cast<A>(slope));
  else
    act_grad_kernel<T, A, int64_t><<<grid_for(n), kThreads, 0, stream>>>(gp, yp, zp, n, static_cast<A>(slope));
  return cudaGetLastError();
}

}  // namespace

cudaError_t conv_bias_act(int dtype, void* y, const void* b, int64_t n, int64_t C, int64_t inner, double slope,
                          cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case 0: return bias_act_typed<float, float>(y, b, n, C, inner, slope, stream);
    case 1: return bias_act_typed<__half, float>(y, b, n, C, inner, slope, stream);
    case 2: return bias_act_typed<__nv_bfloat16, float>(y, b, n, C, inner, slope, stream);
    case 3: return bias_act_typed<double, double>(y, b, n, C, inner, slope, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t conv_act_grad(int dtype, const void* g, const void* y, void* gz, int64_t n, double slope,
                          cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case 0: return act_grad_typed<float, float>(g, y, gz, n, slope, stream);
    case 1: return act_grad_typed<__half, float>(g, y, gz, n, slope, stream);
    case 2: return act_grad_typed<__nv_bfloat16, float>(g, y, gz, n, slope, stream);
    case 3: return act_grad_typed<double, double>(g, y, gz, n, slope, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace ganengine
