// Fused instance norm + activation, CUDA kernels. No torch headers: compiles in seconds.
//
// NCHW (planes contiguous): one 256-thread block per plane, or per (plane, chunk) when there are
//   too few planes to fill the GPU (split). Loads are 16-byte vectors (8 bf16/fp16, 4 fp32,
//   2 fp64) after a scalar head that reaches 16-byte alignment; each thread reads kUnroll
//   vectors per step (coalesced: consecutive lanes, consecutive vectors), takes their exact
//   mean and M2 and merges that group into its running statistics with Chan's formula: one
//   division per group of kUnroll * V elements, none per element. Threads merge by warp
//   shuffles, warps in a fixed order (deterministic).
//   split == 1: one launch computes the statistics and applies (the second pass over a plane
//   of at most a few hundred KiB comes from L2). split > 1: a statistics kernel writes
//   per-chunk (mean, M2); the apply kernel merges them per plane in a fixed order (every chunk
//   the same bits; chunk 0 writes mean/rstd) and applies: two launches.
// NHWC (channels contiguous): a block owns a tile of channels of one image and a chunk of
//   pixels; lanes run along channels (16 bytes each, 8 lanes = 128 contiguous bytes per
//   pixel: coalesced) and rows of lanes along pixels. Per-lane Welford with a uniform count
//   (one reciprocal per pixel row, shared by the lane's V channels), rows merged in shared
//   memory in a fixed tree. Statistics kernel + apply kernel (which merges the chunks).
// Backward: the same layouts with sums of ga and ga * x_hat instead of Welford.
// eps = 0 and a constant plane: rstd = 0 (ATen's rule: the output is the bias).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "acc_convert.cuh"
#include "act.cuh"
#include "norm_act.cuh"

namespace ganengine {
namespace cuda {
namespace {

constexpr int kThreads = kNormActThreads;
// (no __launch_bounds__(256): with it, ptxas aims at 8 resident blocks, 32 registers, and spills)
constexpr int kUnroll = 2;  // 16-byte vectors per thread per step (and per Welford group)

template <typename T, int V> struct alignas(sizeof(T) * V) Pack { T v[V]; };

template <typename A> struct Stat { A n, mean, m2; };

// 1 / v for counts and positive sums, without a division or its slow-path subroutine (whose call
// costs a stack frame): MUFU.RCP (<= 2 ulp in fp32; Chan/Welford weights need no more), and for
// fp64 two Newton steps from the fp32 estimate (2^-22 -> 2^-44 -> full precision)
__device__ __forceinline__ float recip(float v) { return __fdividef(1.0f, v); }
__device__ __forceinline__ double recip(double v) {
  double r = static_cast<double>(__fdividef(1.0f, static_cast<float>(v)));
  r = r * (2.0 - v * r);
  return r * (2.0 - v * r);
}

// Chan's merge of (nb, mb, m2b) into a
template <typename A> __device__ __forceinline__ void merge(Stat<A>& a, A nb, A mb, A m2b) {
  const A n = a.n + nb;
  if (n == A(0)) return;
  const A w = nb * recip(n);
  const A d = mb - a.mean;
  a.mean += d * w;
  a.m2 += m2b + d * d * a.n * w;
  a.n = n;
}

// exact mean and M2 of G values (G a power of two: 1/G is exact), then one merge
template <typename A, int G> __device__ __forceinline__ void merge_group(Stat<A>& st, const A (&v)[G]) {
  A s = 0;
#pragma unroll
  for (int i = 0; i < G; ++i) s += v[i];
  const A m = s * (A(1) / A(G));
  A q = 0;
#pragma unroll
  for (int i = 0; i < G; ++i) {
    const A d = v[i] - m;
    q += d * d;
  }
  merge(st, A(G), m, q);
}

template <typename A> __device__ __forceinline__ A inv_std(A var_eps) {
  return var_eps == A(0) ? A(0) : rsqrt(var_eps);
}

template <typename A> __device__ __forceinline__ A activate(A z, bool act, A slope) {
  return act ? act_fwd(z, slope) : z;  // (act.cuh: NaN stays NaN, relu 0 at -inf)
}

// block-wide merge; the result is valid in thread 0
template <typename A> __device__ Stat<A> block_welford(Stat<A> w) {
  __shared__ A sh[3][kThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    merge(w, __shfl_down_sync(0xffffffffu, w.n, off), __shfl_down_sync(0xffffffffu, w.mean, off),
          __shfl_down_sync(0xffffffffu, w.m2, off));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sh[0][warp] = w.n;
    sh[1][warp] = w.mean;
    sh[2][warp] = w.m2;
  }
  __syncthreads();
  Stat<A> r{0, 0, 0};
  if (threadIdx.x == 0)
    for (int i = 0; i < kThreads / 32; ++i) merge(r, sh[0][i], sh[1][i], sh[2][i]);  // fixed order
  __syncthreads();
  return r;
}

// block-wide sum; valid in thread 0
template <typename A> __device__ A block_sum(A v) {
  __shared__ A sh[kThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  A r = 0;
  if (threadIdx.x == 0)
    for (int i = 0; i < kThreads / 32; ++i) r += sh[i];
  __syncthreads();
  return r;
}

// ------------------------------------------------------------------ NCHW: contiguous planes
// [start, end) of a plane = scalar head (to 16-byte alignment), nvec vectors, scalar tail. Every
// array of the call shares the offsets and (checked by the launcher) the base alignment.
struct Span {
  int64_t a, nvec;
};

template <typename T, int V> __device__ __forceinline__ Span span_of(const T* p, int64_t start, int64_t end) {
  int64_t a = start;
  if (V > 1) {
    const int64_t mis = static_cast<int64_t>((reinterpret_cast<uintptr_t>(p + start) / sizeof(T)) % V);
    a = min(end, start + (mis ? V - mis : 0));
  }
  return {a, (end - a) / V};
}

// the scalar head and tail elements, spread over the threads
__device__ __forceinline__ int64_t scalar_index(int64_t j, int64_t start, const Span& sp, int vw) {
  const int64_t nhead = sp.a - start;
  return j < nhead ? start + j : sp.a + sp.nvec * vw + (j - nhead);
}

template <typename T, typename A, int V>
__device__ Stat<A> plane_stats(const T* __restrict__ p, int64_t start, int64_t end) {
  Stat<A> st{0, 0, 0};
  const Span sp = span_of<T, V>(p, start, end);
  const Pack<T, V>* pv = reinterpret_cast<const Pack<T, V>*>(p + sp.a);
  int64_t i = threadIdx.x;
  for (; i + (kUnroll - 1) * kThreads < sp.nvec; i += int64_t(kThreads) * kUnroll) {
    A v[kUnroll * V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const Pack<T, V> pk = pv[i + u * kThreads];
#pragma unroll
      for (int k = 0; k < V; ++k) v[u * V + k] = to_acc(pk.v[k]);
    }
    merge_group<A, kUnroll * V>(st, v);
  }
  for (; i < sp.nvec; i += kThreads) {  // at most kUnroll - 1 vectors left per thread
    A v[V];
    const Pack<T, V> pk = pv[i];
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = to_acc(pk.v[k]);
    merge_group<A, V>(st, v);
  }
  const int64_t nscalar = (end - start) - sp.nvec * V;
  for (int64_t j = threadIdx.x; j < nscalar; j += kThreads) merge(st, A(1), to_acc(p[scalar_index(j, start, sp, V)]), A(0));
  return st;
}

template <typename T, typename A, int V>
__device__ void plane_apply(const T* __restrict__ p, T* __restrict__ q, int64_t start, int64_t end, A m, A scale,
                            A shift, bool act, A slope) {
  const Span sp = span_of<T, V>(p, start, end);
  const Pack<T, V>* pv = reinterpret_cast<const Pack<T, V>*>(p + sp.a);
  Pack<T, V>* qv = reinterpret_cast<Pack<T, V>*>(q + sp.a);
#pragma unroll 2
  for (int64_t i = threadIdx.x; i < sp.nvec; i += kThreads) {
    const Pack<T, V> in = pv[i];
    Pack<T, V> out;
#pragma unroll
    for (int k = 0; k < V; ++k) out.v[k] = from_acc<T, A>(activate((to_acc(in.v[k]) - m) * scale + shift, act, slope));
    qv[i] = out;
  }
  const int64_t nscalar = (end - start) - sp.nvec * V;
  for (int64_t j = threadIdx.x; j < nscalar; j += kThreads) {
    const int64_t e = scalar_index(j, start, sp, V);
    q[e] = from_acc<T, A>(activate((to_acc(p[e]) - m) * scale + shift, act, slope));
  }
}

template <typename T, typename A, int V>
__global__ void fwd_plane_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                             const A* __restrict__ w, const A* __restrict__ b,
                                                             A* __restrict__ mean, A* __restrict__ rstd,
                                                             NormActShape s, A eps, bool act, A slope) {
  __shared__ A sh[2];
  const int64_t plane = blockIdx.x, n = blockIdx.x / static_cast<unsigned>(s.C), c = blockIdx.x % static_cast<unsigned>(s.C);
  const int64_t base = n * s.sN + c * s.sC;
  const Stat<A> st = block_welford(plane_stats<T, A, V>(x + base, 0, s.HW));
  if (threadIdx.x == 0) {
    const A r = inv_std(st.m2 / static_cast<A>(s.HW) + eps);
    mean[plane] = st.mean;
    rstd[plane] = r;
    sh[0] = st.mean;
    sh[1] = r;
  }
  __syncthreads();
  plane_apply<T, A, V>(x + base, y + base, 0, s.HW, sh[0], sh[1] * (w ? w[c] : A(1)), b ? b[c] : A(0), act, slope);
}

template <typename T, typename A, int V>
__global__ void stats_chunk_kernel(const T* __restrict__ x, A* __restrict__ pmean,
                                                               A* __restrict__ pm2, NormActShape s) {
  const int64_t plane = blockIdx.x, n = blockIdx.x / static_cast<unsigned>(s.C), c = blockIdx.x % static_cast<unsigned>(s.C);
  const int64_t start = blockIdx.y * s.chunk, end = min(start + s.chunk, s.HW);
  const Stat<A> st = block_welford(plane_stats<T, A, V>(x + n * s.sN + c * s.sC, start, end));
  if (threadIdx.x == 0) {
    pmean[plane * s.split + blockIdx.y] = st.mean;
    pm2[plane * s.split + blockIdx.y] = st.m2;
  }
}

// merge a plane's chunk statistics in chunk order (the same bits in every chunk's block)
template <typename A>
__device__ __forceinline__ Stat<A> merge_chunks(const A* pmean, const A* pm2, int64_t plane, const NormActShape& s) {
  Stat<A> r{0, 0, 0};
  for (int k = 0; k < s.split; ++k)
    merge(r, static_cast<A>(min(s.chunk, s.HW - k * s.chunk)), pmean[plane * s.split + k], pm2[plane * s.split + k]);
  return r;
}

template <typename T, typename A, int V>
__global__ void apply_chunk_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                               const A* __restrict__ w, const A* __restrict__ b,
                                                               const A* __restrict__ pmean, const A* __restrict__ pm2,
                                                               A* __restrict__ mean, A* __restrict__ rstd,
                                                               NormActShape s, A eps, bool act, A slope) {
  __shared__ A sh[2];
  const int64_t plane = blockIdx.x, n = blockIdx.x / static_cast<unsigned>(s.C), c = blockIdx.x % static_cast<unsigned>(s.C);
  if (threadIdx.x == 0) {
    const Stat<A> st = merge_chunks(pmean, pm2, plane, s);
    const A r = inv_std(st.m2 / static_cast<A>(s.HW) + eps);
    if (blockIdx.y == 0) {
      mean[plane] = st.mean;
      rstd[plane] = r;
    }
    sh[0] = st.mean;
    sh[1] = r;
  }
  __syncthreads();
  const int64_t base = n * s.sN + c * s.sC;
  const int64_t start = blockIdx.y * s.chunk, end = min(start + s.chunk, s.HW);
  plane_apply<T, A, V>(x + base, y + base, start, end, sh[0], sh[1] * (w ? w[c] : A(1)), b ? b[c] : A(0), act, slope);
}

// backward, NCHW
template <typename T, typename A>
__device__ __forceinline__ void grad_terms(A xv, A gv, A m, A r, A wc, A bc, bool act, A slope, A& xh, A& ga) {
  xh = (xv - m) * r;
  ga = gv;
  if (act) ga = act_bwd(ga, xh * wc + bc, slope);
}

template <typename T, typename A, int V>
__device__ void plane_grad_sums(const T* __restrict__ xp, const T* __restrict__ gp, int64_t start, int64_t end, A m,
                                A r, A wc, A bc, bool act, A slope, A& sg, A& sgx) {
  const Span sp = span_of<T, V>(xp, start, end);
  const Pack<T, V>* xv = reinterpret_cast<const Pack<T, V>*>(xp + sp.a);
  const Pack<T, V>* gv = reinterpret_cast<const Pack<T, V>*>(gp + sp.a);
  A xh, ga;
#pragma unroll 2
  for (int64_t i = threadIdx.x; i < sp.nvec; i += kThreads) {
    const Pack<T, V> xk = xv[i], gk = gv[i];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      grad_terms<T, A>(to_acc(xk.v[k]), to_acc(gk.v[k]), m, r, wc, bc, act, slope, xh, ga);
      sg += ga;
      sgx += ga * xh;
    }
  }
  const int64_t nscalar = (end - start) - sp.nvec * V;
  for (int64_t j = threadIdx.x; j < nscalar; j += kThreads) {
    const int64_t e = scalar_index(j, start, sp, V);
    grad_terms<T, A>(to_acc(xp[e]), to_acc(gp[e]), m, r, wc, bc, act, slope, xh, ga);
    sg += ga;
    sgx += ga * xh;
  }
}

template <typename T, typename A, int V>
__device__ void plane_grad_apply(const T* __restrict__ xp, const T* __restrict__ gp, T* __restrict__ dp, int64_t start,
                                 int64_t end, A m, A r, A wc, A bc, A mg, A mgx, bool act, A slope) {
  const Span sp = span_of<T, V>(xp, start, end);
  const Pack<T, V>* xv = reinterpret_cast<const Pack<T, V>*>(xp + sp.a);
  const Pack<T, V>* gv = reinterpret_cast<const Pack<T, V>*>(gp + sp.a);
  Pack<T, V>* dv = reinterpret_cast<Pack<T, V>*>(dp + sp.a);
  const A k = r * wc;
  A xh, ga;
#pragma unroll 2
  for (int64_t i = threadIdx.x; i < sp.nvec; i += kThreads) {
    const Pack<T, V> xk = xv[i], gk = gv[i];
    Pack<T, V> out;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      grad_terms<T, A>(to_acc(xk.v[j]), to_acc(gk.v[j]), m, r, wc, bc, act, slope, xh, ga);
      out.v[j] = from_acc<T, A>(k * (ga - mg - xh * mgx));
    }
    dv[i] = out;
  }
  const int64_t nscalar = (end - start) - sp.nvec * V;
  for (int64_t j = threadIdx.x; j < nscalar; j += kThreads) {
    const int64_t e = scalar_index(j, start, sp, V);
    grad_terms<T, A>(to_acc(xp[e]), to_acc(gp[e]), m, r, wc, bc, act, slope, xh, ga);
    dp[e] = from_acc<T, A>(k * (ga - mg - xh * mgx));
  }
}

template <typename T, typename A, int V>
__global__ void bwd_plane_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                                             T* __restrict__ dx, const A* __restrict__ w,
                                                             const A* __restrict__ b, const A* __restrict__ mean,
                                                             const A* __restrict__ rstd, A* __restrict__ dw,
                                                             A* __restrict__ db, NormActShape s, bool act, A slope) {
  __shared__ A sh[2];
  const int64_t plane = blockIdx.x, n = blockIdx.x / static_cast<unsigned>(s.C), c = blockIdx.x % static_cast<unsigned>(s.C);
  const int64_t base = n * s.sN + c * s.sC;
  const A m = mean[plane], r = rstd[plane], wc = w ? w[c] : A(1), bc = b ? b[c] : A(0);
  A sg = 0, sgx = 0;
  plane_grad_sums<T, A, V>(x + base, g + base, 0, s.HW, m, r, wc, bc, act, slope, sg, sgx);
  sg = block_sum(sg);
  sgx = block_sum(sgx);
  if (threadIdx.x == 0) {
    db[plane] = sg;
    dw[plane] = sgx;
    sh[0] = sg;
    sh[1] = sgx;
  }
  __syncthreads();
  const A inv_hw = A(1) / static_cast<A>(s.HW);
  plane_grad_apply<T, A, V>(x + base, g + base, dx + base, 0, s.HW, m, r, wc, bc, sh[0] * inv_hw, sh[1] * inv_hw, act,
                            slope);
}

template <typename T, typename A, int V>
__global__ void bwd_sums_chunk_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                                                  const A* __restrict__ w, const A* __restrict__ b,
                                                                  const A* __restrict__ mean,
                                                                  const A* __restrict__ rstd, A* __restrict__ psg,
                                                                  A* __restrict__ psgx, NormActShape s, bool act,
                                                                  A slope) {
  const int64_t plane = blockIdx.x, n = blockIdx.x / static_cast<unsigned>(s.C), c = blockIdx.x % static_cast<unsigned>(s.C);
  const int64_t base = n * s.sN + c * s.sC;
  const int64_t start = blockIdx.y * s.chunk, end = min(start + s.chunk, s.HW);
  A sg = 0, sgx = 0;
  plane_grad_sums<T, A, V>(x + base, g + base, start, end, mean[plane], rstd[plane], w ? w[c] : A(1),
                           b ? b[c] : A(0), act, slope, sg, sgx);
  sg = block_sum(sg);
  sgx = block_sum(sgx);
  if (threadIdx.x == 0) {
    psg[plane * s.split + blockIdx.y] = sg;
    psgx[plane * s.split + blockIdx.y] = sgx;
  }
}

template <typename T, typename A, int V>
__global__ void bwd_apply_chunk_kernel(
    const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ dx, const A* __restrict__ w,
    const A* __restrict__ b, const A* __restrict__ mean, const A* __restrict__ rstd, const A* __restrict__ psg,
    const A* __restrict__ psgx, A* __restrict__ dw, A* __restrict__ db, NormActShape s, bool act, A slope) {
  __shared__ A sh[2];
  const int64_t plane = blockIdx.x, n = blockIdx.x / static_cast<unsigned>(s.C), c = blockIdx.x % static_cast<unsigned>(s.C);
  if (threadIdx.x == 0) {
    A sg = 0, sgx = 0;
    for (int k = 0; k < s.split; ++k) {  // fixed order
      sg += psg[plane * s.split + k];
      sgx += psgx[plane * s.split + k];
    }
    if (blockIdx.y == 0) {
      db[plane] = sg;
      dw[plane] = sgx;
    }
    sh[0] = sg;
    sh[1] = sgx;
  }
  __syncthreads();
  const int64_t base = n * s.sN + c * s.sC;
  const int64_t start = blockIdx.y * s.chunk, end = min(start + s.chunk, s.HW);
  const A inv_hw = A(1) / static_cast<A>(s.HW);
  plane_grad_apply<T, A, V>(x + base, g + base, dx + base, start, end, mean[plane], rstd[plane], w ? w[c] : A(1),
                            b ? b[c] : A(0), sh[0] * inv_hw, sh[1] * inv_hw, act, slope);
}

// ------------------------------------------------------------------ NHWC: channel tiles
template <int V> struct Nhwc {
  static constexpr int TX = V > 1 ? 8 : 32;  // lanes along channels (V channels each)
  static constexpr int RY = kThreads / TX;   // rows of lanes along pixels
  static constexpr int CT = TX * V;          // channels per block
};

// this thread's (image, first channel, pixel row, channels valid) in a channel-tile grid
template <int V> struct NhwcThread {
  int64_t n, c;
  int tx, ty;
  bool ok;
  __device__ explicit NhwcThread(const NormActShape& s) {
    // 32-bit divisions (grid and channel counts fit): 64-bit ones are subroutine calls
    const unsigned tiles = static_cast<unsigned>((s.C + Nhwc<V>::CT - 1) / Nhwc<V>::CT);
    tx = threadIdx.x % Nhwc<V>::TX;
    ty = threadIdx.x / Nhwc<V>::TX;
    n = blockIdx.x / tiles;
    c = static_cast<int64_t>(blockIdx.x % tiles) * Nhwc<V>::CT + tx * V;
    ok = c < s.C;  // the launcher uses V > 1 only when C % V == 0
  }
};

template <typename T, typename A, int V>
__global__ void nhwc_stats_kernel(const T* __restrict__ x, A* __restrict__ pmean,
                                                              A* __restrict__ pm2, NormActShape s) {
  using L = Nhwc<V>;
  __shared__ A sh_mean[L::RY][L::CT];
  __shared__ A sh_m2[L::RY][L::CT];
  __shared__ A sh_n[L::RY][L::TX];
  const NhwcThread<V> t(s);
  const int64_t start = blockIdx.y * s.chunk, end = min(start + s.chunk, s.HW);
  A mean[V], m2[V], cnt = 0;
#pragma unroll
  for (int k = 0; k < V; ++k) mean[k] = m2[k] = A(0);
  if (t.ok) {
    const T* xb = x + t.n * s.sN + t.c;
    for (int64_t p = start + t.ty; p < end; p += L::RY) {
      cnt += A(1);
      const A inv = recip(cnt);  // the lane's count is uniform across its V channels
      const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(xb + p * s.sHW);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A v = to_acc(pk.v[k]);
        const A d = v - mean[k];
        mean[k] += d * inv;
        m2[k] += d * (v - mean[k]);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    sh_mean[t.ty][t.tx * V + k] = mean[k];
    sh_m2[t.ty][t.tx * V + k] = m2[k];
  }
  sh_n[t.ty][t.tx] = cnt;
  __syncthreads();
  for (int stride = L::RY / 2; stride > 0; stride >>= 1) {  // fixed tree over the rows
    if (t.ty < stride) {
      const A na = sh_n[t.ty][t.tx], nb = sh_n[t.ty + stride][t.tx];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        Stat<A> a{na, sh_mean[t.ty][t.tx * V + k], sh_m2[t.ty][t.tx * V + k]};
        merge(a, nb, sh_mean[t.ty + stride][t.tx * V + k], sh_m2[t.ty + stride][t.tx * V + k]);
        sh_mean[t.ty][t.tx * V + k] = a.mean;
        sh_m2[t.ty][t.tx * V + k] = a.m2;
      }
      sh_n[t.ty][t.tx] = na + nb;
    }
    __syncthreads();
  }
  if (t.ty == 0 && t.ok) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t out = (t.n * s.C + t.c + k) * s.split + blockIdx.y;
      pmean[out] = sh_mean[0][t.tx * V + k];
      pm2[out] = sh_m2[0][t.tx * V + k];
    }
  }
}

template <typename T, typename A, int V>
__global__ void nhwc_apply_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                              const A* __restrict__ w, const A* __restrict__ b,
                                                              const A* __restrict__ pmean, const A* __restrict__ pm2,
                                                              A* __restrict__ mean, A* __restrict__ rstd,
                                                              NormActShape s, A eps, bool act, A slope) {
  using L = Nhwc<V>;
  const NhwcThread<V> t(s);
  if (!t.ok) return;  // no block-wide synchronisation below
  A m[V], scale[V], shift[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int64_t plane = t.n * s.C + t.c + k;
    const Stat<A> st = merge_chunks(pmean, pm2, plane, s);
    const A r = inv_std(st.m2 / static_cast<A>(s.HW) + eps);
    if (blockIdx.y == 0 && t.ty == 0) {
      mean[plane] = st.mean;
      rstd[plane] = r;
    }
    m[k] = st.mean;
    scale[k] = r * (w ? w[t.c + k] : A(1));
    shift[k] = b ? b[t.c + k] : A(0);
  }
  const int64_t start = blockIdx.y * s.chunk, end = min(start + s.chunk, s.HW);
  const int64_t off = t.n * s.sN + t.c;
  for (int64_t p = start + t.ty; p < end; p += L::RY) {
    const Pack<T, V> in = *reinterpret_cast<const Pack<T, V>*>(x + off + p * s.sHW);
    Pack<T, V> out;
#pragma unroll
    for (int k = 0; k < V; ++k) out.v[k] = from_acc<T, A>(activate((to_acc(in.v[k]) - m[k]) * scale[k] + shift[k], act, slope));
    *reinterpret_cast<Pack<T, V>*>(y + off + p * s.sHW) = out;
  }
}

template <typename T, typename A, int V>
__global__ void nhwc_bwd_sums_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                                                 const A* __restrict__ w, const A* __restrict__ b,
                                                                 const A* __restrict__ mean,
                                                                 const A* __restrict__ rstd, A* __restrict__ psg,
                                                                 A* __restrict__ psgx, NormActShape s, bool act,
                                                                 A slope) {
  using L = Nhwc<V>;
  __shared__ A sh_g[L::RY][L::CT];
  __shared__ A sh_gx[L::RY][L::CT];
  const NhwcThread<V> t(s);
  const int64_t start = blockIdx.y * s.chunk, end = min(start + s.chunk, s.HW);
  A sg[V], sgx[V];
#pragma unroll
  for (int k = 0; k < V; ++k) sg[k] = sgx[k] = A(0);
  if (t.ok) {
    A m[V], r[V], wc[V], bc[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      m[k] = mean[t.n * s.C + t.c + k];
      r[k] = rstd[t.n * s.C + t.c + k];
      wc[k] = w ? w[t.c + k] : A(1);
      bc[k] = b ? b[t.c + k] : A(0);
    }
    const int64_t off = t.n * s.sN + t.c;
    for (int64_t p = start + t.ty; p < end; p += L::RY) {
      const Pack<T, V> xk = *reinterpret_cast<const Pack<T, V>*>(x + off + p * s.sHW);
      const Pack<T, V> gk = *reinterpret_cast<const Pack<T, V>*>(g + off + p * s.sHW);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        A xh, ga;
        grad_terms<T, A>(to_acc(xk.v[k]), to_acc(gk.v[k]), m[k], r[k], wc[k], bc[k], act, slope, xh, ga);
        sg[k] += ga;
        sgx[k] += ga * xh;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    sh_g[t.ty][t.tx * V + k] = sg[k];
    sh_gx[t.ty][t.tx * V + k] = sgx[k];
  }
  __syncthreads();
  for (int stride = L::RY / 2; stride > 0; stride >>= 1) {  // fixed tree over the rows
    if (t.ty < stride) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        sh_g[t.ty][t.tx * V + k] += sh_g[t.ty + stride][t.tx * V + k];
        sh_gx[t.ty][t.tx * V + k] += sh_gx[t.ty + stride][t.tx * V + k];
      }
    }
    __syncthreads();
  }
  if (t.ty == 0 && t.ok) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t out = (t.n * s.C + t.c + k) * s.split + blockIdx.y;
      psg[out] = sh_g[0][t.tx * V + k];
      psgx[out] = sh_gx[0][t.tx * V + k];
    }
  }
}

template <typename T, typename A, int V>
__global__ void nhwc_bwd_apply_kernel(
    const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ dx, const A* __restrict__ w,
    const A* __restrict__ b, const A* __restrict__ mean, const A* __restrict__ rstd, const A* __restrict__ psg,
    const A* __restrict__ psgx, A* __restrict__ dw, A* __restrict__ db, NormActShape s, bool act, A slope) {
  using L = Nhwc<V>;
  const NhwcThread<V> t(s);
  if (!t.ok) return;
  A m[V], r[V], wc[V], bc[V], mg[V], mgx[V];
  const A inv_hw = A(1) / static_cast<A>(s.HW);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int64_t plane = t.n * s.C + t.c + k;
    A sg = 0, sgx = 0;
    for (int j = 0; j < s.split; ++j) {  // fixed order
      sg += psg[plane * s.split + j];
      sgx += psgx[plane * s.split + j];
    }
    if (blockIdx.y == 0 && t.ty == 0) {
      db[plane] = sg;
      dw[plane] = sgx;
    }
    m[k] = mean[plane];
    r[k] = rstd[plane];
    wc[k] = w ? w[t.c + k] : A(1);
    bc[k] = b ? b[t.c + k] : A(0);
    mg[k] = sg * inv_hw;
    mgx[k] = sgx * inv_hw;
  }
  const int64_t start = blockIdx.y * s.chunk, end = min(start + s.chunk, s.HW);
  const int64_t off = t.n * s.sN + t.c;
  for (int64_t p = start + t.ty; p < end; p += L::RY) {
    const Pack<T, V> xk = *reinterpret_cast<const Pack<T, V>*>(x + off + p * s.sHW);
    const Pack<T, V> gk = *reinterpret_cast<const Pack<T, V>*>(g + off + p * s.sHW);
    Pack<T, V> out;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      A xh, ga;
      grad_terms<T, A>(to_acc(xk.v[k]), to_acc(gk.v[k]), m[k], r[k], wc[k], bc[k], act, slope, xh, ga);
      out.v[k] = from_acc<T, A>(r[k] * wc[k] * (ga - mg[k] - xh * mgx[k]));
    }
    *reinterpret_cast<Pack<T, V>*>(dx + off + p * s.sHW) = out;
  }
}

// ------------------------------------------------------------------ dispatch
template <typename T, typename A, int V>
cudaError_t forward_v(const T* x, T* y, const A* w, const A* b, A* mean, A* rstd, A* part, const NormActShape& s,
                      A eps, bool act, A slope, cudaStream_t st) {
  const int64_t P = s.N * s.C;
  A* pmean = part;
  A* pm2 = part + P * s.split;
  if (s.nhwc) {
    const dim3 grid(static_cast<unsigned>(s.N * ((s.C + Nhwc<V>::CT - 1) / Nhwc<V>::CT)), s.split);
    nhwc_stats_kernel<T, A, V><<<grid, kThreads, 0, st>>>(x, pmean, pm2, s);
    nhwc_apply_kernel<T, A, V><<<grid, kThreads, 0, st>>>(x, y, w, b, pmean, pm2, mean, rstd, s, eps, act, slope);
  } else if (s.split == 1) {
    fwd_plane_kernel<T, A, V><<<static_cast<unsigned>(P), kThreads, 0, st>>>(x, y, w, b, mean, rstd, s, eps, act, slope);
  } else {
    const dim3 grid(static_cast<unsigned>(P), s.split);
    stats_chunk_kernel<T, A, V><<<grid, kThreads, 0, st>>>(x, pmean, pm2, s);
    apply_chunk_kernel<T, A, V><<<grid, kThreads, 0, st>>>(x, y, w, b, pmean, pm2, mean, rstd, s, eps, act, slope);
  }
  return cudaGetLastError();
}

template <typename T, typename A, int V>
cudaError_t backward_v(const T* g, const T* x, T* dx, const A* w, const A* b, const A* mean, const A* rstd, A* dw,
                       A* db, A* part, const NormActShape& s, bool act, A slope, cudaStream_t st) {
  const int64_t P = s.N * s.C;
  A* psg = part;
  A* psgx = part + P * s.split;
  if (s.nhwc) {
    const dim3 grid(static_cast<unsigned>(s.N * ((s.C + Nhwc<V>::CT - 1) / Nhwc<V>::CT)), s.split);
    nhwc_bwd_sums_kernel<T, A, V><<<grid, kThreads, 0, st>>>(g, x, w, b, mean, rstd, psg, psgx, s, act, slope);
    nhwc_bwd_apply_kernel<T, A, V><<<grid, kThreads, 0, st>>>(g, x, dx, w, b, mean, rstd, psg, psgx, dw, db, s, act,
                                                              slope);
  } else if (s.split == 1) {
    bwd_plane_kernel<T, A, V><<<static_cast<unsigned>(P), kThreads, 0, st>>>(g, x, dx, w, b, mean, rstd, dw, db, s,
                                                                            act, slope);
  } else {
    const dim3 grid(static_cast<unsigned>(P), s.split);
    bwd_sums_chunk_kernel<T, A, V><<<grid, kThreads, 0, st>>>(g, x, w, b, mean, rstd, psg, psgx, s, act, slope);
    bwd_apply_chunk_kernel<T, A, V><<<grid, kThreads, 0, st>>>(g, x, dx, w, b, mean, rstd, psg, psgx, dw, db, s, act,
                                                               slope);
  }
  return cudaGetLastError();
}

template <typename T, typename A>
cudaError_t forward_impl(const void* x, void* y, const void* w, const void* b, void* mean, void* rstd, void* part,
                         const NormActShape& s, double eps, bool act, double slope, cudaStream_t st) {
  auto args = [&](auto v) {
    constexpr int V = decltype(v)::value;
    return forward_v<T, A, V>(static_cast<const T*>(x), static_cast<T*>(y), static_cast<const A*>(w),
                              static_cast<const A*>(b), static_cast<A*>(mean), static_cast<A*>(rstd),
                              static_cast<A*>(part), s, static_cast<A>(eps), act, static_cast<A>(slope), st);
  };
  return s.vec ? args(std::integral_constant<int, 16 / sizeof(T)>{}) : args(std::integral_constant<int, 1>{});
}

template <typename T, typename A>
cudaError_t backward_impl(const void* g, const void* x, void* dx, const void* w, const void* b, const void* mean,
                          const void* rstd, void* dw, void* db, void* part, const NormActShape& s, bool act,
                          double slope, cudaStream_t st) {
  auto args = [&](auto v) {
    constexpr int V = decltype(v)::value;
    return backward_v<T, A, V>(static_cast<const T*>(g), static_cast<const T*>(x), static_cast<T*>(dx),
                               static_cast<const A*>(w), static_cast<const A*>(b), static_cast<const A*>(mean),
                               static_cast<const A*>(rstd), static_cast<A*>(dw), static_cast<A*>(db),
                               static_cast<A*>(part), s, act, static_cast<A>(slope), st);
  };
  return s.vec ? args(std::integral_constant<int, 16 / sizeof(T)>{}) : args(std::integral_constant<int, 1>{});
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
