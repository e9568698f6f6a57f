// Fused (conditional) batch norm + activation, CUDA kernels. No torch headers: compiles in seconds.
//
// A block owns one channel and one chunk of that channel's (n, s) plane; grid (C, chunks)
// (chunks <= 1024 on axis y, channels on axis x). One chunk per channel: statistics and apply
// (forward), sums and dx (backward) in one launch. Otherwise two launches: partials per
// (channel, chunk), then a kernel whose every block combines its channel's partials in a fixed
// order (so all blocks agree bit for bit) and applies to its chunk; the chunk-0 block writes the
// statistics, the running statistics and the parameter gradients.
//
// Statistics: Welford over d = x - K, K the channel's first element, per thread; merged across
// the block in a fixed order (Chan). The shift makes a constant channel's mean exact and its M2 0.
// Addressing is (n, c, s) with strides: NCHW and channels-last are both served (channels-last is
// correct here but not coalesced; the Triton backend tiles channels for that layout).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "acc_convert.cuh"
#include "act.cuh"
#include "batch_norm_act.cuh"

namespace ganengine {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// running statistics of any float dtype
__device__ double load_any(const void* p, int code, int64_t i) {
  switch (code) {
    case 1: return __half2float(static_cast<const __half*>(p)[i]);
    case 2: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case 3: return static_cast<const double*>(p)[i];
    default: return static_cast<const float*>(p)[i];
  }
}
__device__ void store_any(void* p, int code, int64_t i, double v) {
  switch (code) {
    case 1: static_cast<__half*>(p)[i] = __float2half_rn(static_cast<float>(v)); break;
    case 2: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(v)); break;
    case 3: static_cast<double*>(p)[i] = v; break;
    default: static_cast<float*>(p)[i] = static_cast<float>(v);
  }
}

template <typename A> struct Welford {
  A n, mean, m2;
  __device__ void add(A x) {
    n += A(1);
    const A d = x - mean;
    mean += d / n;
    m2 += d * (x - mean);
  }
  __device__ void merge(A n2, A mean2, A m22) {
    const A tot = n + n2;
    if (tot == A(0)) return;
    const A d = mean2 - mean;
    mean += d * (n2 / tot);
    m2 += m22 + d * d * (n * n2 / tot);
    n = tot;
  }
};

// block-wide merge in a fixed order; the result is returned to every thread
template <typename A> __device__ Welford<A> block_welford(Welford<A> w) {
  __shared__ A sh[3][kWarps];
  __shared__ A out[3];
  for (int off = 16; off > 0; off >>= 1)
    w.merge(__shfl_down_sync(0xffffffff, w.n, off), __shfl_down_sync(0xffffffff, w.mean, off),
            __shfl_down_sync(0xffffffff, w.m2, off));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sh[0][warp] = w.n;
    sh[1][warp] = w.mean;
    sh[2][warp] = w.m2;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    Welford<A> r{0, 0, 0};
    for (int i = 0; i < kWarps; ++i) r.merge(sh[0][i], sh[1][i], sh[2][i]);
    out[0] = r.n;
    out[1] = r.mean;
    out[2] = r.m2;
  }
  __syncthreads();
  Welford<A> r{out[0], out[1], out[2]};
  __syncthreads();
  return r;
}

// block-wide sums of two values, fixed order, returned to every thread
template <typename A> __device__ void block_sum2(A& a, A& b) {
  __shared__ A sh[2][kWarps];
  __shared__ A out[2];
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_down_sync(0xffffffff, a, off);
    b += __shfl_down_sync(0xffffffff, b, off);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sh[0][warp] = a;
    sh[1][warp] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    A ra = 0, rb = 0;
    for (int i = 0; i < kWarps; ++i) {
      ra += sh[0][i];
      rb += sh[1][i];
    }
    out[0] = ra;
    out[1] = rb;
  }
  __syncthreads();
  a = out[0];
  b = out[1];
  __syncthreads();
}

struct Chunk {
  int64_t n_lo, n_hi, s_lo, s_hi;
  __device__ int64_t slen() const { return s_hi - s_lo; }
  __device__ int64_t count() const { return (n_hi - n_lo) * (s_hi - s_lo); }
};

__device__ __forceinline__ Chunk chunk_of(const BnShape& s, int64_t k) {
  const int64_t kn = k / s.sch, ks = k % s.sch;
  Chunk r;
  r.n_lo = kn * s.nper;
  r.n_hi = min(r.n_lo + s.nper, s.N);
  r.s_lo = ks * s.sper;
  r.s_hi = min(r.s_lo + s.sper, s.S);
  return r;
}

// offset and image of the i-th element of the chunk (images outer, positions inner)
__device__ __forceinline__ int64_t elem(const BnShape& s, const Chunk& ch, int64_t c, int64_t i, int64_t& n) {
  const int64_t L = ch.slen();
  n = ch.n_lo + i / L;
  return n * s.sN + c * s.sC + (ch.s_lo + i % L) * s.sS;
}

template <typename T, typename A>
__device__ Welford<A> chunk_welford(const T* x, const BnShape& s, const Chunk& ch, int64_t c, A K) {
  Welford<A> w{0, 0, 0};
  const int64_t cnt = ch.count();
  for (int64_t i = threadIdx.x; i < cnt; i += blockDim.x) {
    int64_t n;
    w.add(to_acc(x[elem(s, ch, c, i, n)]) - K);
  }
  return block_welford(w);
}

__device__ __forceinline__ int64_t chunk_count(const BnShape& s, int64_t k) {
  const int64_t kn = k / s.sch, ks = k % s.sch;
  return min(s.nper, s.N - kn * s.nper) * min(s.sper, s.S - ks * s.sper);
}

template <typename T, typename A>
__global__ void fwd_partial_kernel(const T* __restrict__ x, A* __restrict__ pm, A* __restrict__ pq, BnShape s) {
  const int64_t c = blockIdx.x, k = blockIdx.y, chunks = s.nch * s.sch;
  const A K = to_acc(x[c * s.sC]);
  const Welford<A> w = chunk_welford<T, A>(x, s, chunk_of(s, k), c, K);
  if (threadIdx.x == 0) {
    pm[c * chunks + k] = w.mean;
    pq[c * chunks + k] = w.m2;
  }
}

template <typename T, typename A>
__global__ void fwd_apply_kernel(const T* __restrict__ x, T* __restrict__ y, const A* __restrict__ w,
                                 const A* __restrict__ b, void* rm, int rm_dtype, int64_t rm_stride, void* rv,
                                 int rv_dtype, int64_t rv_stride, A* __restrict__ stats, const A* __restrict__ pm,
                                 const A* __restrict__ pq, BnShape s, double factor, double eps, A slope, int flags) {
  const int64_t c = blockIdx.x, k = blockIdx.y, chunks = s.nch * s.sch;
  const Chunk ch = chunk_of(s, k);
  const bool training = flags & 1, act = flags & 2;
  A mean, rstd;
  if (!training) {
    mean = static_cast<A>(load_any(rm, rm_dtype, c * rm_stride));
    const A var = static_cast<A>(load_any(rv, rv_dtype, c * rv_stride));
    rstd = A(1) / sqrt(var + static_cast<A>(eps));
    if (k == 0 && threadIdx.x == 0) {
      stats[c] = mean;
      stats[s.C + c] = rstd;
      stats[2 * s.C + c] = var;
    }
  } else {
    const A K = to_acc(x[c * s.sC]);
    const A M = static_cast<A>(s.N * s.S);
    A md, m2;
    if (chunks == 1) {
      const Welford<A> r = chunk_welford<T, A>(x, s, ch, c, K);
      md = r.mean;
      m2 = r.m2;
    } else {
      __shared__ A comb[2];
      if (threadIdx.x == 0) {  // fixed order: every block of the channel gets the same bits
        Welford<A> r{0, 0, 0};
        for (int64_t j = 0; j < chunks; ++j)
          r.merge(static_cast<A>(chunk_count(s, j)), pm[c * chunks + j], pq[c * chunks + j]);
        comb[0] = r.mean;
        comb[1] = r.m2;
      }
      __syncthreads();
      md = comb[0];
      m2 = comb[1];
    }
    mean = K + md;
    rstd = A(1) / sqrt(m2 / M + static_cast<A>(eps));
    if (k == 0 && threadIdx.x == 0) {
      const A unbiased = m2 / (M - A(1));
      stats[c] = mean;
      stats[s.C + c] = rstd;
      stats[2 * s.C + c] = unbiased;
      if (rm != nullptr) {
        store_any(rm, rm_dtype, c * rm_stride,
                  factor * double(mean) + (1.0 - factor) * load_any(rm, rm_dtype, c * rm_stride));
        store_any(rv, rv_dtype, c * rv_stride,
                  factor * double(unbiased) + (1.0 - factor) * load_any(rv, rv_dtype, c * rv_stride));
      }
    }
  }
  const A mz = training ? mean : A(0);
  const int64_t cnt = ch.count();
  for (int64_t i = threadIdx.x; i < cnt; i += blockDim.x) {
    int64_t n;
    const int64_t off = elem(s, ch, c, i, n);
    const A g = w ? w[n * s.wsN + c] : A(1), bb = b ? b[n * s.wsN + c] : A(0);
    const A scale = rstd * g, shift = training ? bb : bb - mean * scale;
    A z = (to_acc(x[off]) - mz) * scale + shift;
    if (act) z = act_fwd(z, slope);
    y[off] = from_acc<T, A>(z);
  }
}

// ga = grad * act'(z) (z exactly as the forward computed it) and xhat of one element
template <typename T, typename A>
__device__ __forceinline__ void grad_terms(const T* x, const T* g, int64_t off, A mean, A rstd, A gc, A bc,
                                           bool training, bool act, A slope, A& ga, A& xh, A& scale) {
  const A xv = to_acc(x[off]);
  scale = rstd * gc;
  const A shift = training ? bc : bc - mean * scale;
  const A z = (xv - (training ? mean : A(0))) * scale + shift;
  ga = to_acc(g[off]);
  if (act) ga = act_bwd(ga, z, slope);
  xh = (xv - mean) * rstd;
}

// per-(n, c) or per-channel sums of ga and ga * xhat over a chunk. Per-sample: one pair per image,
// written to (dst_g, dst_gx)[n * n_stride + off]; else one pair for the chunk, returned.
template <typename T, typename A>
__device__ void chunk_sums(const T* x, const T* g, const A* w, const A* b, const BnShape& s, const Chunk& ch,
                           int64_t c, A mean, A rstd, bool training, bool act, A slope, bool per_sample, A* dst_g,
                           A* dst_gx, int64_t n_stride, int64_t off0, A& a, A& bsum, A& tot_g, A& tot_gx) {
  if (per_sample) {
    const int64_t L = ch.slen();
    for (int64_t n = ch.n_lo; n < ch.n_hi; ++n) {
      const A gc = w ? w[n * s.wsN + c] : A(1), bc = b ? b[n * s.wsN + c] : A(0);
      A sg = 0, sgx = 0;
      for (int64_t i = threadIdx.x; i < L; i += blockDim.x) {
        A ga, xh, scale;
        grad_terms<T, A>(x, g, n * s.sN + c * s.sC + (ch.s_lo + i) * s.sS, mean, rstd, gc, bc, training, act, slope,
                         ga, xh, scale);
        sg += ga;
        sgx += ga * xh;
      }
      block_sum2(sg, sgx);
      if (threadIdx.x == 0) {
        dst_g[n * n_stride + off0] = sg;
        dst_gx[n * n_stride + off0] = sgx;
      }
      a += gc * sg;
      bsum += gc * sgx;
    }
    return;
  }
  const A gc = w ? w[c] : A(1), bc = b ? b[c] : A(0);
  A sg = 0, sgx = 0;
  const int64_t cnt = ch.count();
  for (int64_t i = threadIdx.x; i < cnt; i += blockDim.x) {
    int64_t n;
    A ga, xh, scale;
    grad_terms<T, A>(x, g, elem(s, ch, c, i, n), mean, rstd, gc, bc, training, act, slope, ga, xh, scale);
    sg += ga;
    sgx += ga * xh;
  }
  block_sum2(sg, sgx);
  tot_g = sg;
  tot_gx = sgx;
  a = gc * sg;
  bsum = gc * sgx;
}

template <typename T, typename A>
__global__ void bwd_partial_kernel(const T* __restrict__ g, const T* __restrict__ x, const A* __restrict__ w,
                                   const A* __restrict__ b, const A* __restrict__ stats, A* __restrict__ p1,
                                   A* __restrict__ p2, BnShape s, A slope, int flags) {
  const int64_t c = blockIdx.x, k = blockIdx.y, chunks = s.nch * s.sch;
  const bool training = flags & 1, act = flags & 2, per_sample = flags & 4;
  const A mean = stats[c], rstd = stats[s.C + c];
  A a = 0, bs = 0, tg = 0, tgx = 0;
  // per-sample partials at ((c * N) + n) * sch + ks; per channel at c * chunks + k
  chunk_sums<T, A>(x, g, w, b, s, chunk_of(s, k), c, mean, rstd, training, act, slope, per_sample, p1, p2, s.sch,
                   c * s.N * s.sch + k % s.sch, a, bs, tg, tgx);
  if (!per_sample && threadIdx.x == 0) {
    p1[c * chunks + k] = tg;
    p2[c * chunks + k] = tgx;
  }
}

template <typename T, typename A>
__global__ void bwd_apply_kernel(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ dx,
                                 const A* __restrict__ w, const A* __restrict__ b, const A* __restrict__ stats,
                                 A* __restrict__ dw, A* __restrict__ db, const A* __restrict__ p1,
                                 const A* __restrict__ p2, BnShape s, A slope, int flags) {
  const int64_t c = blockIdx.x, k = blockIdx.y, chunks = s.nch * s.sch;
  const bool training = flags & 1, act = flags & 2, per_sample = flags & 4;
  const A mean = stats[c], rstd = stats[s.C + c];
  const Chunk ch = chunk_of(s, k);
  A a = 0, bs = 0;
  if (chunks == 1) {
    A tg = 0, tgx = 0;
    chunk_sums<T, A>(x, g, w, b, s, ch, c, mean, rstd, training, act, slope, per_sample, db, dw, s.C, c, a, bs, tg,
                     tgx);
    if (!per_sample && threadIdx.x == 0) {
      db[c] = tg;
      dw[c] = tgx;
    }
  } else {
    __shared__ A comb[2];
    if (threadIdx.x == 0) {  // fixed order over the partials
      if (per_sample) {
        for (int64_t n = 0; n < s.N; ++n) {
          A sg = 0, sgx = 0;
          for (int64_t ks = 0; ks < s.sch; ++ks) {
            sg += p1[(c * s.N + n) * s.sch + ks];
            sgx += p2[(c * s.N + n) * s.sch + ks];
          }
          const A gc = w ? w[n * s.wsN + c] : A(1);
          a += gc * sg;
          bs += gc * sgx;
          if (k == 0) {
            db[n * s.C + c] = sg;
            dw[n * s.C + c] = sgx;
          }
        }
      } else {
        A sg = 0, sgx = 0;
        for (int64_t j = 0; j < chunks; ++j) {
          sg += p1[c * chunks + j];
          sgx += p2[c * chunks + j];
        }
        const A gc = w ? w[c] : A(1);
        a = gc * sg;
        bs = gc * sgx;
        if (k == 0) {
          db[c] = sg;
          dw[c] = sgx;
        }
      }
      comb[0] = a;
      comb[1] = bs;
    }
    __syncthreads();
    a = comb[0];
    bs = comb[1];
  }
  const A M = static_cast<A>(s.N * s.S);
  const A P = training ? rstd * (bs / M) : A(0), Q = training ? rstd * (a / M) : A(0);
  const int64_t cnt = ch.count();
  for (int64_t i = threadIdx.x; i < cnt; i += blockDim.x) {
    int64_t n;
    const int64_t off = elem(s, ch, c, i, n);
    const A gc = w ? w[n * s.wsN + c] : A(1), bc = b ? b[n * s.wsN + c] : A(0);
    A ga, xh, scale;
    grad_terms<T, A>(x, g, off, mean, rstd, gc, bc, training, act, slope, ga, xh, scale);
    dx[off] = from_acc<T, A>(ga * scale - (xh * P + Q));
  }
}

template <typename T, typename A>
cudaError_t forward_impl(const void* x, void* y, const void* w, const void* b, void* rm, int rm_dtype,
                         int64_t rm_stride, void* rv, int rv_dtype, int64_t rv_stride, void* stats, void* part,
                         const BnShape& s, double factor, double eps, double slope, int flags, cudaStream_t st) {
  const int64_t chunks = s.nch * s.sch;
  const dim3 grid(static_cast<unsigned>(s.C), static_cast<unsigned>(chunks));
  A* pm = static_cast<A*>(part);
  A* pq = pm ? pm + s.C * chunks : nullptr;
  if ((flags & 1) && chunks > 1)
    fwd_partial_kernel<T, A><<<grid, kThreads, 0, st>>>(static_cast<const T*>(x), pm, pq, s);
  fwd_apply_kernel<T, A><<<grid, kThreads, 0, st>>>(
      static_cast<const T*>(x), static_cast<T*>(y), static_cast<const A*>(w), static_cast<const A*>(b), rm, rm_dtype,
      rm_stride, rv, rv_dtype, rv_stride,
      static_cast<A*>(stats), pm, pq, s, factor, eps, static_cast<A>(slope), flags);
  return cudaGetLastError();
}

template <typename T, typename A>
cudaError_t backward_impl(const void* g, const void* x, void* dx, const void* w, const void* b, const void* stats,
                          void* dw, void* db, void* part, const BnShape& s, double slope, int flags, cudaStream_t st) {
  const int64_t chunks = s.nch * s.sch;
  const dim3 grid(static_cast<unsigned>(s.C), static_cast<unsigned>(chunks));
  A* p1 = static_cast<A*>(part);
  A* p2 = p1 ? p1 + ((flags & 4) ? s.C * s.N * s.sch : s.C * chunks) : nullptr;
  if (chunks > 1)
    bwd_partial_kernel<T, A><<<grid, kThreads, 0, st>>>(static_cast<const T*>(g), static_cast<const T*>(x),
                                                        static_cast<const A*>(w), static_cast<const A*>(b),
                                                        static_cast<const A*>(stats), p1, p2, s, static_cast<A>(slope),
                                                        flags);
  bwd_apply_kernel<T, A><<<grid, kThreads, 0, st>>>(
      static_cast<const T*>(g), static_cast<const T*>(x), static_cast<T*>(dx), static_cast<const A*>(w),
      static_cast<const A*>(b), static_cast<const A*>(stats), static_cast<A*>(dw), static_cast<A*>(db), p1, p2, s,
      static_cast<A>(slope), flags);
  return cudaGetLastError();
}

}  // namespace

cudaError_t batch_norm_act_forward(int dtype, const void* x, void* y, const void* w, const void* b, void* rm,
                                   int rm_dtype, int64_t rm_stride, void* rv, int rv_dtype, int64_t rv_stride,
                                   void* stats, void* part, const BnShape& s, double factor, double eps, double slope,
                                   int flags, cudaStream_t stream) {
  switch (dtype) {
    case 0:
      return forward_impl<float, float>(x, y, w, b, rm, rm_dtype, rm_stride, rv, rv_dtype, rv_stride, stats, part, s,
                                        factor, eps, slope, flags, stream);
    case 1:
      return forward_impl<__half, float>(x, y, w, b, rm, rm_dtype, rm_stride, rv, rv_dtype, rv_stride, stats, part, s,
                                         factor, eps, slope, flags, stream);
    case 2:
      return forward_impl<__nv_bfloat16, float>(x, y, w, b, rm, rm_dtype, rm_stride, rv, rv_dtype, rv_stride, stats,
                                                 part, s, factor, eps, slope, flags, stream);
    case 3:
      return forward_impl<double, double>(x, y, w, b, rm, rm_dtype, rm_stride, rv, rv_dtype, rv_stride, stats, part,
                                          s, factor, eps, slope, flags, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t batch_norm_act_backward(int dtype, const void* g, const void* x, void* dx, const void* w, const void* b,
                                    const void* stats, void* dw, void* db, void* part, const BnShape& s, double slope,
                                    int flags, cudaStream_t stream) {
  switch (dtype) {
    case 0: return backward_impl<float, float>(g, x, dx, w, b, stats, dw, db, part, s, slope, flags, stream);
    case 1: return backward_impl<__half, float>(g, x, dx, w, b, stats, dw, db, part, s, slope, flags, stream);
    case 2: return backward_impl<__nv_bfloat16, float>(g, x, dx, w, b, stats, dw, db, part, s, slope, flags, stream);
    case 3: return backward_impl<double, double>(g, x, dx, w, b, stats, dw, db, part, s, slope, flags, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace ganengine
