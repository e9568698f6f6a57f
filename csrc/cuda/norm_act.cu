// Fused instance norm + activation, CUDA kernels. No torch headers: compiles in seconds.
//
// Grid (N*C planes, split chunks) for all three stages of each direction:
//   forward:  per-chunk Welford (count, mean, M2) -> per-plane Chan merge in chunk order
//             (deterministic) -> apply act((x - mean) * rstd * w + b)
//   backward: per-chunk sums of ga and ga*xhat -> per-plane fixed-order sum -> dx
// Each thread runs Welford over a strided set of elements; warps merge with shuffles.
// Addressing is (n, c, hw) with strides, so NCHW and NHWC tensors are served without copies
// (NHWC is correct but not coalesced here; the Triton backend tiles channels for that case).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "norm_act.cuh"

namespace ganengine {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T> __device__ __forceinline__ float to_acc(T v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T, typename A> __device__ __forceinline__ T from_acc(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename A> struct Welford {
  A n, mean, m2;
  __device__ void add(A x) {
    n += A(1);
    A d = x - mean;
    mean += d / n;
    m2 += d * (x - mean);
  }
  __device__ void merge(A n2, A mean2, A m22) {
    A tot = n + n2;
    if (tot == A(0)) return;
    A d = mean2 - mean;
    mean += d * (n2 / tot);
    m2 += m22 + d * d * (n * n2 / tot);
    n = tot;
  }
};

template <typename A> __device__ Welford<A> block_welford(Welford<A> w) {
  __shared__ A sh[3][kThreads / 32];
  for (int off = 16; off > 0; off >>= 1)
    w.merge(__shfl_down_sync(0xffffffff, w.n, off), __shfl_down_sync(0xffffffff, w.mean, off),
            __shfl_down_sync(0xffffffff, w.m2, off));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) { sh[0][warp] = w.n; sh[1][warp] = w.mean; sh[2][warp] = w.m2; }
  __syncthreads();
  Welford<A> r{0, 0, 0};
  if (threadIdx.x == 0)
    for (int i = 0; i < kThreads / 32; ++i) r.merge(sh[0][i], sh[1][i], sh[2][i]);  // fixed order
  return r;
}

template <typename A> __device__ A block_sum(A v, A* sh) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffff, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  A r = 0;
  if (threadIdx.x == 0)
    for (int i = 0; i < kThreads / 32; ++i) r += sh[i];
  __syncthreads();
  return r;
}

template <typename T, typename A>
__global__ void stats_kernel(const T* __restrict__ x, A* __restrict__ pmean, A* __restrict__ pm2, NormActShape s) {
  const int64_t plane = blockIdx.x, n = plane / s.C, c = plane % s.C;
  const int64_t start = blockIdx.y * s.chunk, end = min(start + s.chunk, s.HW);
  const T* xp = x + n * s.sN + c * s.sC;
  Welford<A> w{0, 0, 0};
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) w.add(to_acc(xp[i * s.sHW]));
  w = block_welford(w);
  if (threadIdx.x == 0) {
    pmean[plane * s.split + blockIdx.y] = w.mean;
    pm2[plane * s.split + blockIdx.y] = w.m2;
  }
}

template <typename A>
__global__ void finalize_stats_kernel(const A* pmean, const A* pm2, A* mean, A* rstd, NormActShape s, double eps) {
  const int64_t plane = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (plane >= s.N * s.C) return;
  Welford<A> w{0, 0, 0};
  for (int k = 0; k < s.split; ++k) {
    const A cnt = static_cast<A>(min(s.chunk, s.HW - k * s.chunk));
    w.merge(cnt, pmean[plane * s.split + k], pm2[plane * s.split + k]);
  }
  mean[plane] = w.mean;
  rstd[plane] = A(1) / sqrt(w.m2 / static_cast<A>(s.HW) + static_cast<A>(eps));
}

template <typename T, typename A>
__global__ void apply_kernel(const T* __restrict__ x, T* __restrict__ y, const A* __restrict__ w,
                             const A* __restrict__ b, const A* __restrict__ mean, const A* __restrict__ rstd,
                             NormActShape s, bool act, A slope) {
  const int64_t plane = blockIdx.x, n = plane / s.C, c = plane % s.C;
  const int64_t start = blockIdx.y * s.chunk, end = min(start + s.chunk, s.HW);
  const A m = mean[plane], scale = rstd[plane] * (w ? w[c] : A(1)), shift = b ? b[c] : A(0);
  const int64_t base = n * s.sN + c * s.sC;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    A z = (to_acc(x[base + i * s.sHW]) - m) * scale + shift;
    if (act && !(z > A(0))) z *= slope;
    y[base + i * s.sHW] = from_acc<T, A>(z);
  }
}

template <typename T, typename A>
__device__ __forceinline__ void grad_terms(const T* x, const T* g, int64_t xi, int64_t gi, A m, A r, A wc, A bc,
                                           bool act, A slope, A& xh, A& ga) {
  xh = (to_acc(x[xi]) - m) * r;
  ga = to_acc(g[gi]);
  if (act && !(xh * wc + bc > A(0))) ga *= slope;
}

template <typename T, typename A>
__global__ void bwd_sums_kernel(const T* __restrict__ g, const T* __restrict__ x, const A* __restrict__ w,
                                const A* __restrict__ b, const A* __restrict__ mean, const A* __restrict__ rstd,
                                A* __restrict__ psg, A* __restrict__ psgx, NormActShape s, bool act, A slope) {
  __shared__ A sh[kThreads / 32];
  const int64_t plane = blockIdx.x, n = plane / s.C, c = plane % s.C;
  const int64_t start = blockIdx.y * s.chunk, end = min(start + s.chunk, s.HW);
  const A m = mean[plane], r = rstd[plane], wc = w ? w[c] : A(1), bc = b ? b[c] : A(0);
  const int64_t xb = n * s.sN + c * s.sC, gb = n * s.gN + c * s.gC;
  A sg = 0, sgx = 0;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    A xh, ga;
    grad_terms<T, A>(x, g, xb + i * s.sHW, gb + i * s.gHW, m, r, wc, bc, act, slope, xh, ga);
    sg += ga;
    sgx += ga * xh;
  }
  sg = block_sum(sg, sh);
  sgx = block_sum(sgx, sh);
  if (threadIdx.x == 0) {
    psg[plane * s.split + blockIdx.y] = sg;
    psgx[plane * s.split + blockIdx.y] = sgx;
  }
}

template <typename A>
__global__ void finalize_sums_kernel(const A* psg, const A* psgx, A* db, A* dw, NormActShape s) {
  const int64_t plane = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (plane >= s.N * s.C) return;
  A sg = 0, sgx = 0;
  for (int k = 0; k < s.split; ++k) {
    sg += psg[plane * s.split + k];
    sgx += psgx[plane * s.split + k];
  }
  db[plane] = sg;
  dw[plane] = sgx;
}

template <typename T, typename A>
__global__ void bwd_apply_kernel(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ dx,
                                 const A* __restrict__ w, const A* __restrict__ b, const A* __restrict__ mean,
                                 const A* __restrict__ rstd, const A* __restrict__ db, const A* __restrict__ dw,
                                 NormActShape s, bool act, A slope) {
  const int64_t plane = blockIdx.x, n = plane / s.C, c = plane % s.C;
  const int64_t start = blockIdx.y * s.chunk, end = min(start + s.chunk, s.HW);
  const A m = mean[plane], r = rstd[plane], wc = w ? w[c] : A(1), bc = b ? b[c] : A(0);
  const A k = r * wc, mg = db[plane] / static_cast<A>(s.HW), mgx = dw[plane] / static_cast<A>(s.HW);
  const int64_t xb = n * s.sN + c * s.sC, gb = n * s.gN + c * s.gC;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    A xh, ga;
    grad_terms<T, A>(x, g, xb + i * s.sHW, gb + i * s.gHW, m, r, wc, bc, act, slope, xh, ga);
    dx[xb + i * s.sHW] = from_acc<T, A>(k * (ga - mg - xh * mgx));
  }
}

template <typename T, typename A>
cudaError_t forward_impl(const void* x, void* y, const void* w, const void* b, void* mean, void* rstd, void* part,
                         const NormActShape& s, double eps, bool act, double slope, cudaStream_t st) {
  const int64_t P = s.N * s.C;
  A* pmean = static_cast<A*>(part);
  A* pm2 = pmean + P * s.split;
  dim3 grid(P, s.split);
  stats_kernel<T, A><<<grid, kThreads, 0, st>>>(static_cast<const T*>(x), pmean, pm2, s);
  finalize_stats_kernel<A><<<(P + 255) / 256, 256, 0, st>>>(pmean, pm2, static_cast<A*>(mean),
                                                           static_cast<A*>(rstd), s, eps);
  apply_kernel<T, A><<<grid, kThreads, 0, st>>>(static_cast<const T*>(x), static_cast<T*>(y),
                                                static_cast<const A*>(w), static_cast<const A*>(b),
                                                static_cast<const A*>(mean), static_cast<const A*>(rstd), s, act,
                                                static_cast<A>(slope));
  return cudaGetLastError();
}

template <typename T, typename A>
cudaError_t backward_impl(const void* g, const void* x, void* dx, const void* w, const void* b, const void* mean,
                          const void* rstd, void* dw, void* db, void* part, const NormActShape& s, bool act,
                          double slope, cudaStream_t st) {
  const int64_t P = s.N * s.C;
  A* psg = static_cast<A*>(part);
  A* psgx = psg + P * s.split;
  dim3 grid(P, s.split);
  bwd_sums_kernel<T, A><<<grid, kThreads, 0, st>>>(static_cast<const T*>(g), static_cast<const T*>(x),
                                                   static_cast<const A*>(w), static_cast<const A*>(b),
                                                   static_cast<const A*>(mean), static_cast<const A*>(rstd), psg,
                                                   psgx, s, act, static_cast<A>(slope));
  finalize_sums_kernel<A><<<(P + 255) / 256, 256, 0, st>>>(psg, psgx, static_cast<A*>(db), static_cast<A*>(dw), s);
  bwd_apply_kernel<T, A><<<grid, kThreads, 0, st>>>(static_cast<const T*>(g), static_cast<const T*>(x),
                                                    static_cast<T*>(dx), static_cast<const A*>(w),
                                                    static_cast<const A*>(b), static_cast<const A*>(mean),
                                                    static_cast<const A*>(rstd), static_cast<const A*>(db),
                                                    static_cast<const A*>(dw), s, act, static_cast<A>(slope));
  return cudaGetLastError();
}

}  // namespace

cudaError_t norm_act_forward(int dtype, const void* x, void* y, const void* w, const void* b, void* mean,
                             void* rstd, void* part, const NormActShape& s, double eps, bool act, double slope,
                             cudaStream_t stream) {
  switch (dtype) {
    case 0: return forward_impl<float, float>(x, y, w, b, mean, rstd, part, s, eps, act, slope, stream);
    case 1: return forward_impl<__half, float>(x, y, w, b, mean, rstd, part, s, eps, act, slope, stream);
    case 2: return forward_impl<__nv_bfloat16, float>(x, y, w, b, mean, rstd, part, s, eps, act, slope, stream);
    case 3: return forward_impl<double, double>(x, y, w, b, mean, rstd, part, s, eps, act, slope, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t norm_act_backward(int dtype, const void* g, const void* x, void* dx, const void* w, const void* b,
                              const void* mean, const void* rstd, void* dw, void* db, void* part,
                              const NormActShape& s, bool act, double slope, cudaStream_t stream) {
  switch (dtype) {
    case 0: return backward_impl<float, float>(g, x, dx, w, b, mean, rstd, dw, db, part, s, act, slope, stream);
    case 1: return backward_impl<__half, float>(g, x, dx, w, b, mean, rstd, dw, db, part, s, act, slope, stream);
    case 2:
      return backward_impl<__nv_bfloat16, float>(g, x, dx, w, b, mean, rstd, dw, db, part, s, act, slope, stream);
    case 3: return backward_impl<double, double>(g, x, dx, w, b, mean, rstd, dw, db, part, s, act, slope, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace ganengine
