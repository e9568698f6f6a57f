// Fused GAN loss reductions, CUDA kernels (no torch headers: raw pointers, sizes, a stream).
//
// Two-stage deterministic reductions over up to 4 terms per launch:
//   stage 1, grid (blocks, terms): block (b, i) reduces kChunk contiguous elements of term i
//     (each thread kItems elements, strided by the block size so loads coalesce; warp-shuffle
//     then shared-memory block reduction) into part[i * nblk + b]; when asked, the forward
//     kernels also write the gradient scale_i * dl/dx (L1: scale_i * sign(p - q)) in the same
//     pass; the L1 backward writes coef_i * sign(p - q);
//   stage 2, one block: sums part[i, :] with a fixed thread assignment and reduction tree,
//     scales the terms and writes them (L1) and their total.
// No atomics: the bits do not depend on scheduling. Accumulation in float (double for double).
// Loss codes as ganengine/ops/losses.py: 0 BCE-with-logits to t, 1 (x - t)^2, 2 relu(1 - x),
// 3 relu(1 + x), 4 linear x.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace ganengine_losses {

constexpr int kThreads = 256;
constexpr int kItems = 16;
constexpr int64_t kChunk = static_cast<int64_t>(kThreads) * kItems;
constexpr int kMaxTerms = 4;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename A> __device__ __forceinline__ A load_as(const float* p) { return static_cast<A>(*p); }
template <typename A> __device__ __forceinline__ A load_as(const double* p) { return static_cast<A>(*p); }
template <typename A> __device__ __forceinline__ A load_as(const __half* p) { return static_cast<A>(__half2float(*p)); }
template <typename A> __device__ __forceinline__ A load_as(const __nv_bfloat16* p) {
  return static_cast<A>(__bfloat162float(*p));
}
template <typename T, typename A> __device__ __forceinline__ T store_as(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half store_as<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// sum over the block; the result is valid in thread 0. Fixed tree: deterministic.
template <typename A>
__device__ __forceinline__ A block_sum(A v) {
  __shared__ A warp_part[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_part[lane] : A(0);
  if (warp == 0) v = warp_sum(v);
  __syncthreads();  // warp_part may be reused by a following call
  return v;
}

template <typename A>
__device__ __forceinline__ A elem_loss(int mode, A x, A t, A& g) {
  switch (mode) {
    case 0: {  // max(x, 0) - x t + log1p(exp(-|x|)), dl/dx = sigmoid(x) - t from the same exp
      const A e = exp(-fabs(x));
      const A inv = A(1) / (A(1) + e);
      g = (x >= A(0) ? inv : e * inv) - t;
      // at x = +-inf, eager's (1 - t) x + m + log(exp(-m) + exp(-x - m)), m = max(-x, 0), gives
      // (1 - t) * inf at +inf (NaN for t = 1) and NaN at -inf; a NaN x stays NaN
      if (isinf(x)) return x > A(0) ? (A(1) - t) * x : A(NAN);
      return (x > A(0) ? x : A(0)) - x * t + log1p(e);
    }
    case 1: {
      const A d = x - t;
      g = A(2) * d;
      return d * d;
    }
    // hinge: torch's relu backward passes the gradient unless relu's output is <= 0 (relu'(0) =
    // 0; a NaN logit gets the gradient), and relu(NaN) is NaN: compare so that NaN takes the
    // "active" branch
    case 2:
      g = x >= A(1) ? A(0) : A(-1);
      return x >= A(1) ? A(0) : A(1) - x;
    case 3:
      g = x <= A(-1) ? A(0) : A(1);
      return x <= A(-1) ? A(0) : A(1) + x;
    default:
      g = t;
      return x;
  }
}

struct AdvArgs {
  const void* x[kMaxTerms];
  void* g[kMaxTerms];
  int64_t n[kMaxTerms];
  int mode[kMaxTerms];
  double target[kMaxTerms];
  double scale[kMaxTerms];
  double final_scale[kMaxTerms];
  int k;
  int nblk;
};

struct L1Args {
  const void* p[kMaxTerms];
  const void* q[kMaxTerms];
  void* g[kMaxTerms];
  int64_t n[kMaxTerms];
  double scale[kMaxTerms];
  int k;
  int nblk;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) adv_partial_kernel(AdvArgs a, typename Acc<T>::type* part) {
  using A = typename Acc<T>::type;
  const int term = blockIdx.y;
  const T* x = static_cast<const T*>(a.x[term]);
  T* g = static_cast<T*>(a.g[term]);
  const int64_t n = a.n[term];
  const int mode = a.mode[term];
  const A t = static_cast<A>(a.target[term]), s = static_cast<A>(a.scale[term]);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kChunk + threadIdx.x;
  A acc = 0;
#pragma unroll 4
  for (int it = 0; it < kItems; ++it) {
    const int64_t i = base + static_cast<int64_t>(it) * kThreads;
    if (i < n) {
      A d;
      acc += elem_loss<A>(mode, load_as<A>(x + i), t, d);
      if (g != nullptr) g[i] = store_as<T, A>(d * s);
    }
  }
  acc = block_sum<A>(acc);
  if (threadIdx.x == 0) part[term * a.nblk + blockIdx.x] = acc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) l1_partial_kernel(L1Args a, typename Acc<T>::type* part) {
  using A = typename Acc<T>::type;
  const int term = blockIdx.y;
  const T* p = static_cast<const T*>(a.p[term]);
  const T* q = static_cast<const T*>(a.q[term]);
  T* g = static_cast<T*>(a.g[term]);  // null unless the gradient is asked for in forward
  const A c = static_cast<A>(a.scale[term]);
  const int64_t n = a.n[term];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kChunk + threadIdx.x;
  A acc = 0;
#pragma unroll 4
  for (int it = 0; it < kItems; ++it) {
    const int64_t i = base + static_cast<int64_t>(it) * kThreads;
    if (i < n) {
      const A d = load_as<A>(p + i) - load_as<A>(q + i);
      acc += fabs(d);
      if (g != nullptr) g[i] = store_as<T, A>(d > A(0) ? c : (d < A(0) ? -c : A(0)));
    }
  }
  acc = block_sum<A>(acc);
  if (threadIdx.x == 0) part[term * a.nblk + blockIdx.x] = acc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) l1_bwd_kernel(L1Args a, const typename Acc<T>::type* coef) {
  using A = typename Acc<T>::type;
  const int term = blockIdx.y;
  const T* p = static_cast<const T*>(a.p[term]);
  const T* q = static_cast<const T*>(a.q[term]);
  T* g = static_cast<T*>(a.g[term]);
  const int64_t n = a.n[term];
  const A c = coef[term];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kChunk + threadIdx.x;
#pragma unroll 4
  for (int it = 0; it < kItems; ++it) {
    const int64_t i = base + static_cast<int64_t>(it) * kThreads;
    if (i < n) {
      const A d = load_as<A>(p + i) - load_as<A>(q + i);
      g[i] = store_as<T, A>(d > A(0) ? c : (d < A(0) ? -c : A(0)));  // sign(0) = 0, as torch
    }
  }
}

// terms[i] = final_scale[i] * sum_b part[i, b] (terms may be null); total = sum_i terms[i] in order
template <typename A>
__global__ void __launch_bounds__(kThreads) final_kernel(const A* part, int nblk, int k, double s0, double s1,
                                                         double s2, double s3, A* total_out, A* terms) {
  A total = 0;
  for (int i = 0; i < k; ++i) {
    A v = 0;
    for (int b = threadIdx.x; b < nblk; b += kThreads) v += part[i * nblk + b];
    v = block_sum<A>(v);
    if (threadIdx.x == 0) {
      const double sc = i == 0 ? s0 : (i == 1 ? s1 : (i == 2 ? s2 : s3));  // no local-memory array
      const A term = v * static_cast<A>(sc);
      if (terms != nullptr) terms[i] = term;
      total += term;
    }
  }
  if (threadIdx.x == 0) *total_out = total;
}

template <typename T>
int adv_fwd(const AdvArgs& a, void* part, void* total, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  adv_partial_kernel<T><<<dim3(a.nblk, a.k), kThreads, 0, stream>>>(a, static_cast<A*>(part));
  final_kernel<A><<<1, kThreads, 0, stream>>>(static_cast<const A*>(part), a.nblk, a.k, a.final_scale[0],
                                              a.final_scale[1], a.final_scale[2], a.final_scale[3],
                                              static_cast<A*>(total), nullptr);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int l1_fwd(const L1Args& a, void* part, void* total, void* terms, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  l1_partial_kernel<T><<<dim3(a.nblk, a.k), kThreads, 0, stream>>>(a, static_cast<A*>(part));
  final_kernel<A><<<1, kThreads, 0, stream>>>(static_cast<const A*>(part), a.nblk, a.k, a.scale[0], a.scale[1],
                                              a.scale[2], a.scale[3], static_cast<A*>(total), static_cast<A*>(terms));
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int l1_bwd(const L1Args& a, const void* coef, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  l1_bwd_kernel<T><<<dim3(a.nblk, a.k), kThreads, 0, stream>>>(a, static_cast<const A*>(coef));
  return static_cast<int>(cudaGetLastError());
}

int64_t blocks_for(const int64_t* n, int k) {
  int64_t m = 0;
  for (int i = 0; i < k; ++i) m = n[i] > m ? n[i] : m;
  return (m + kChunk - 1) / kChunk;
}

}  // namespace ganengine_losses

// ------------------------------------------------------------------ entry points (losses.cpp)
// dtype: 0 float, 1 half, 2 bfloat16, 3 double. part: k * nblk accumulators (float, or double
// for double), total: 1 accumulator, terms: k accumulators. Return a cudaError_t value (0 = success).
int64_t ganengine_losses_chunk() { return ganengine_losses::kChunk; }

int ganengine_losses_adv_fwd(int dtype, int k, const void* const* x, void* const* g, const int64_t* n,
                             const int64_t* mode, const double* target, const double* scale,
                             const double* final_scale, int nblk, void* part, void* total, cudaStream_t stream) {
  using namespace ganengine_losses;
  AdvArgs a{};
  for (int i = 0; i < kMaxTerms; ++i) {
    const int j = i < k ? i : 0;
    a.x[i] = x[j];
    a.g[i] = i < k ? g[i] : nullptr;
    a.n[i] = i < k ? n[i] : 0;
    a.mode[i] = static_cast<int>(mode[j]);
    a.target[i] = target[j];
    a.scale[i] = scale[j];
    a.final_scale[i] = i < k ? final_scale[i] : 0.0;
  }
  a.k = k;
  a.nblk = nblk;
  switch (dtype) {
    case 0: return adv_fwd<float>(a, part, total, stream);
    case 1: return adv_fwd<__half>(a, part, total, stream);
    case 2: return adv_fwd<__nv_bfloat16>(a, part, total, stream);
    default: return adv_fwd<double>(a, part, total, stream);
  }
}

static ganengine_losses::L1Args make_l1(int k, const void* const* p, const void* const* q, void* const* g,
                                        const int64_t* n, const double* scale, int nblk) {
  using namespace ganengine_losses;
  L1Args a{};
  for (int i = 0; i < kMaxTerms; ++i) {
    const int j = i < k ? i : 0;
    a.p[i] = p[j];
    a.q[i] = q[j];
    a.g[i] = (g != nullptr && i < k) ? g[i] : nullptr;
    a.n[i] = i < k ? n[i] : 0;
    a.scale[i] = (scale != nullptr && i < k) ? scale[i] : 0.0;
  }
  a.k = k;
  a.nblk = nblk;
  return a;
}

int ganengine_losses_l1_fwd(int dtype, int k, const void* const* p, const void* const* q, void* const* g,
                            const int64_t* n, const double* scale, int nblk, void* part, void* total, void* terms,
                            cudaStream_t stream) {
  using namespace ganengine_losses;
  const L1Args a = make_l1(k, p, q, g, n, scale, nblk);
  switch (dtype) {
    case 0: return l1_fwd<float>(a, part, total, terms, stream);
    case 1: return l1_fwd<__half>(a, part, total, terms, stream);
    case 2: return l1_fwd<__nv_bfloat16>(a, part, total, terms, stream);
    default: return l1_fwd<double>(a, part, total, terms, stream);
  }
}

int ganengine_losses_l1_bwd(int dtype, int k, const void* const* p, const void* const* q, void* const* g,
                            const int64_t* n, const void* coef, int nblk, cudaStream_t stream) {
  using namespace ganengine_losses;
  const L1Args a = make_l1(k, p, q, g, n, nullptr, nblk);
  switch (dtype) {
    case 0: return l1_bwd<float>(a, coef, stream);
    case 1: return l1_bwd<__half>(a, coef, stream);
    case 2: return l1_bwd<__nv_bfloat16>(a, coef, stream);
    default: return l1_bwd<double>(a, coef, stream);
  }
}
