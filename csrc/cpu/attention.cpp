// attention family, CPU: the SAGAN attention core without the N x M map.
//
//   attention_fwd(q (B,d,N), k (B,d,M), v (B,C,M), x (B,C,N), gamma (1)) -> (out, o, lse)
//       out = gamma * o + x, o = v softmax(q^T k)^T (no 1/sqrt(d) scale), lse (B,N) per row
//   attention_bwd(grad (B,C,N), q, k, v, o, lse, delta (B,N), gamma) -> (dq, dk, dv)
//       delta = gamma * rowsum(grad * o); P is recomputed from lse.
//
// Saturated softmax (a row's P is one-hot, |scores| >> 1): dS = P * (dP - delta) subtracts two
// dot products of about the same size computed in different orders (dP_ij = dO_i . v_j by a
// GEMM, delta_i = dO_i . o_i from the forward's o), so their rounding difference, eps * |dO||v|,
// survives where the true dS is ~0 (eager's softmax backward forms sum(P * dP) from the same
// dP and cancels exactly). At most one key per row has P > 1/2: for that key dS is taken as
// P * gamma * sum_c grad_c (v_jc - o_ic), exact 0 when o_i == v_j (O(C) per query row).
// A non-finite gamma is folded into grad first (not passed as the GEMMs' alpha, which BLAS may
// skip over), so its NaN/inf reaches dv as in eager.
//
// All inputs are contiguous channel-major (the Python layer guarantees it), fp32 or fp64.
// Forward: at::parallel_for over (batch, query block); per block an online softmax over key
// blocks (scores BM x BN in a per-thread buffer, never N x M), accumulating o^T (C x BM).
// Backward: at::parallel_for over (batch, key block); per task a loop over query blocks that
// recomputes P^T, accumulates dv and dk for its keys in place (tasks own disjoint key slices),
// and dq into a per-thread (B, d, N) buffer summed at the end (deterministic for a fixed
// thread count). The tile products are GEMMs: the BLAS that libtorch_cpu exports (MKL's
// sgemm_/dgemm_) when present, otherwise a plain loop (also forced by
// GANENGINE_ATTENTION_NO_BLAS=1, which the tests use to cover it). exp is at::vec's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

extern "C" {
// Fortran BLAS from the libraries torch links (weak: absent -> nullptr -> loop fallback)
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
}

namespace {

constexpr int64_t kFwdBlockM = 64;    // queries per forward task
constexpr int64_t kFwdBlockN = 256;   // keys per score tile
constexpr int64_t kBwdBlockN = 64;    // keys per backward task
constexpr int64_t kBwdBlockM = 128;   // queries per backward score tile

// Tasks per thread chunk so that a chunk is worth waking a thread for (~4 MFLOP): tiny
// problems then run on one thread instead of paying the pool's wake-up and barrier.
int64_t grain_for(double task_flops) {
  return std::max<int64_t>(1, static_cast<int64_t>(4.0e6 / std::max(task_flops, 1.0)));
}

bool use_blas() {
  static const bool off = [] {
    const char* e = std::getenv("GANENGINE_ATTENTION_NO_BLAS");
    return e != nullptr && e[0] != '\0' && e[0] != '0';
  }();
  return !off;
}

template <typename T>
void blas_call(char ta, char tb, int m, int n, int k, T alpha, const T* a, int lda,
               const T* b, int ldb, T beta, T* c, int ldc);

template <>
void blas_call<float>(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                      const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

template <>
void blas_call<double>(char ta, char tb, int m, int n, int k, double alpha, const double* a,
                       int lda, const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

template <typename T>
bool have_blas();
template <>
bool have_blas<float>() { return sgemm_ != nullptr && use_blas(); }
template <>
bool have_blas<double>() { return dgemm_ != nullptr && use_blas(); }

// Row-major C (m x n, ldc) = alpha * op(A) (m x k) * op(B) (k x n) + beta * C; op = transpose
// when ta / tb. beta == 0 never reads C.
template <typename T>
void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda,
             const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (have_blas<T>()) {
    // row-major C = op(A) op(B)  <=>  column-major C^T = op(B)^T op(A)^T on the same memory
    blas_call<T>(tb ? 'T' : 'N', ta ? 'T' : 'N', static_cast<int>(n), static_cast<int>(m),
                 static_cast<int>(k), alpha, B, static_cast<int>(ldb), A, static_cast<int>(lda),
                 beta, C, static_cast<int>(ldc));
    return;
  }
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      T acc = 0;
      for (int64_t p = 0; p < k; ++p) {
        const T a = ta ? A[p * lda + i] : A[i * lda + p];
        const T b = tb ? B[j * ldb + p] : B[p * ldb + j];
        acc += a * b;
      }
      T& c = C[i * ldc + j];
      c = beta == T(0) ? alpha * acc : alpha * acc + beta * c;
    }
  }
}

template <typename T>
using Vec = at::vec::Vectorized<T>;

// exp_u20 clamps its argument with min/max, which drop a NaN (exp(inf - inf) came out inf where
// eager's softmax gives NaN): NaN lanes are put back (a compare and a blend per vector)
inline Vec<float> vexp(const Vec<float>& v) { return Vec<float>::blendv(v.exp_u20(), v, v.isnan()); }
inline Vec<double> vexp(const Vec<double>& v) { return v.exp(); }

template <typename T>
T row_max(const T* p, int64_t n) {
  int64_t j = 0;
  T mx = -std::numeric_limits<T>::infinity();
  if (n >= Vec<T>::size()) {
    Vec<T> vm(mx);
    for (; j + Vec<T>::size() <= n; j += Vec<T>::size()) vm = at::vec::maximum(vm, Vec<T>::loadu(p + j));
    T buf[Vec<T>::size()];
    vm.store(buf);
    for (int64_t t = 0; t < Vec<T>::size(); ++t) mx = std::max(mx, buf[t]);
  }
  for (; j < n; ++j) mx = std::max(mx, p[j]);
  return mx;
}

// p[j] = exp(p[j] - shift); returns the sum
template <typename T>
T exp_shift_sum(T* p, int64_t n, T shift) {
  int64_t j = 0;
  T sum = 0;
  if (n >= Vec<T>::size()) {
    Vec<T> vs(shift), acc(T(0));
    for (; j + Vec<T>::size() <= n; j += Vec<T>::size()) {
      Vec<T> e = vexp(Vec<T>::loadu(p + j) - vs);
      e.store(p + j);
      acc = acc + e;
    }
    T buf[Vec<T>::size()];
    acc.store(buf);
    for (int64_t t = 0; t < Vec<T>::size(); ++t) sum += buf[t];
  }
  for (; j < n; ++j) {
    p[j] = std::exp(p[j] - shift);
    sum += p[j];
  }
  return sum;
}

// p[j] = exp(p[j] - shift[j])
template <typename T>
void exp_sub_vec(T* p, const T* shift, int64_t n) {
  int64_t j = 0;
  for (; j + Vec<T>::size() <= n; j += Vec<T>::size())
    vexp(Vec<T>::loadu(p + j) - Vec<T>::loadu(shift + j)).store(p + j);
  for (; j < n; ++j) p[j] = std::exp(p[j] - shift[j]);
}

// ds[j] = p[j] * (ds[j] - delta[j])
template <typename T>
void softmax_grad(T* ds, const T* p, const T* delta, int64_t n) {
  int64_t j = 0;
  for (; j + Vec<T>::size() <= n; j += Vec<T>::size())
    (Vec<T>::loadu(p + j) * (Vec<T>::loadu(ds + j) - Vec<T>::loadu(delta + j))).store(ds + j);
  for (; j < n; ++j) ds[j] = p[j] * (ds[j] - delta[j]);
}

// dS for the dominant key (P > 1/2) of query i, key j: P * gamma * sum_c g[c, i] * (v[c, j] - o[c, i])
template <typename T>
void fix_dominant(T* ds, const T* p, int64_t bm, const T* g, const T* v, const T* o, int64_t N, int64_t M,
                  int64_t C, int64_t i0, int64_t j, T gamma) {
  for (int64_t i = 0; i < bm; ++i) {
    if (!(p[i] > T(0.5))) continue;
    T acc = 0;
    for (int64_t c = 0; c < C; ++c) acc += g[c * N + i0 + i] * (v[c * M + j] - o[c * N + i0 + i]);
    ds[i] = p[i] * (gamma * acc);
  }
}

template <typename T>
void scale_vec(T* p, const T* s, int64_t n) {
  int64_t j = 0;
  for (; j + Vec<T>::size() <= n; j += Vec<T>::size())
    (Vec<T>::loadu(p + j) * Vec<T>::loadu(s + j)).store(p + j);
  for (; j < n; ++j) p[j] *= s[j];
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& x, const at::Tensor& gamma, const char* op) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && x.dim() == 3,
              op, ": q, k, v, x must be 3-D (B, channels, positions)");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              op, ": expected float32 or float64 tensors, got ", q.scalar_type());
  for (const at::Tensor* t : {&k, &v, &x, &gamma}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": all tensors must share q's dtype ",
                q.scalar_type(), ", got ", t->scalar_type());
  }
  for (const at::Tensor* t : {&q, &k, &v, &x}) {
    TORCH_CHECK(t->is_contiguous(), op, ": expected contiguous (B, channels, positions) tensors");
    TORCH_CHECK(t->device().is_cpu(), op, ": expected CPU tensors");
  }
  TORCH_CHECK(gamma.numel() == 1, op, ": gamma must have one element, got ", gamma.numel());
  const int64_t B = q.size(0), d = q.size(1), N = q.size(2), M = k.size(2), C = v.size(1);
  TORCH_CHECK(k.size(0) == B && k.size(1) == d, op, ": k must be (", B, ", ", d, ", M), got ", k.sizes());
  TORCH_CHECK(v.size(0) == B && v.size(2) == M, op, ": v must be (", B, ", C, ", M, "), got ", v.sizes());
  TORCH_CHECK(x.size(0) == B && x.size(1) == C && x.size(2) == N,
              op, ": x must be (", B, ", ", C, ", ", N, "), got ", x.sizes());
  TORCH_CHECK(N > 0 && M > 0 && d > 0 && C > 0, op, ": empty input");
  TORCH_CHECK(std::max({N, M, C, d}) < (int64_t(1) << 31), op, ": dimensions must fit in int32 (BLAS)");
}

template <typename T>
void fwd_kernel(const T* q, const T* k, const T* v, const T* x, T gamma, T* out, T* o, T* lse,
                int64_t B, int64_t d, int64_t N, int64_t M, int64_t C) {
  const int64_t nqb = (N + kFwdBlockM - 1) / kFwdBlockM;
  const int64_t BN = std::min(kFwdBlockN, M);
  const double task_flops = 2.0 * kFwdBlockM * M * (d + C);
  at::parallel_for(0, B * nqb, grain_for(task_flops), [&](int64_t begin, int64_t end) {
    std::vector<T> S(kFwdBlockM * BN), OT(C * kFwdBlockM);
    std::vector<T> m_i(kFwdBlockM), l_i(kFwdBlockM), alpha(kFwdBlockM);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nqb, i0 = (task % nqb) * kFwdBlockM;
      const int64_t bm = std::min(kFwdBlockM, N - i0);
      const T* qb = q + b * d * N;
      const T* kb = k + b * d * M;
      const T* vb = v + b * C * M;
      std::fill(m_i.begin(), m_i.end(), -std::numeric_limits<T>::infinity());
      std::fill(l_i.begin(), l_i.end(), T(0));
      for (int64_t j0 = 0; j0 < M; j0 += BN) {
        const int64_t bn = std::min(BN, M - j0);
        // S (bm x bn) = q_blk^T k_blk
        gemm_rm<T>(true, false, bm, bn, d, T(1), qb + i0, N, kb + j0, M, T(0), S.data(), bn);
        for (int64_t i = 0; i < bm; ++i) {
          T* row = S.data() + i * bn;
          const T m_new = std::max(m_i[i], row_max(row, bn));
          alpha[i] = std::exp(m_i[i] - m_new);  // 0 on the first tile (m_i = -inf)
          l_i[i] = l_i[i] * alpha[i] + exp_shift_sum(row, bn, m_new);
          m_i[i] = m_new;
        }
        // o^T (C x bm) = o^T * alpha + v_blk (C x bn) P^T
        const bool first = j0 == 0;
        if (!first) {
          for (int64_t c = 0; c < C; ++c) scale_vec(OT.data() + c * bm, alpha.data(), bm);
        }
        gemm_rm<T>(false, true, C, bm, bn, T(1), vb + j0, M, S.data(), bn, first ? T(0) : T(1),
                   OT.data(), bm);
      }
      for (int64_t i = 0; i < bm; ++i) {
        lse[b * N + i0 + i] = m_i[i] + std::log(l_i[i]);
        alpha[i] = T(1) / l_i[i];
      }
      const Vec<T> vg(gamma);
      for (int64_t c = 0; c < C; ++c) {
        const T* src = OT.data() + c * bm;
        const int64_t off = (b * C + c) * N + i0;
        int64_t i = 0;
        for (; i + Vec<T>::size() <= bm; i += Vec<T>::size()) {
          const Vec<T> ov = Vec<T>::loadu(src + i) * Vec<T>::loadu(alpha.data() + i);
          ov.store(o + off + i);
          at::vec::fmadd(vg, ov, Vec<T>::loadu(x + off + i)).store(out + off + i);
        }
        for (; i < bm; ++i) {
          const T ov = src[i] * alpha[i];
          o[off + i] = ov;
          out[off + i] = gamma * ov + x[off + i];
        }
      }
    }
  });
}

template <typename T>
void bwd_kernel(const T* g, const T* q, const T* k, const T* v, const T* o, const T* lse, const T* delta,
                T gamma, T* dq_parts, int64_t n_parts, T* dk, T* dv, int64_t B, int64_t d, int64_t N, int64_t M,
                int64_t C) {
  const int64_t nkb = (M + kBwdBlockN - 1) / kBwdBlockN;
  const int64_t BM = std::min(kBwdBlockM, N);
  const double task_flops = 4.0 * kBwdBlockN * N * (d + C);
  at::parallel_for(0, B * nkb, grain_for(task_flops), [&](int64_t begin, int64_t end) {
    std::vector<T> PT(kBwdBlockN * BM), DS(kBwdBlockN * BM);
    const int64_t tid = at::get_thread_num();
    TORCH_CHECK(tid >= 0 && tid < n_parts, "ganengine_C::attention_bwd: thread id ", tid,
                " outside the ", n_parts, " dq buffers");
    T* dq = dq_parts + tid * B * d * N;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nkb, j0 = (task % nkb) * kBwdBlockN;
      const int64_t bn = std::min(kBwdBlockN, M - j0);
      const T* qb = q + b * d * N;
      const T* kb = k + b * d * M;
      const T* vb = v + b * C * M;
      const T* gb = g + b * C * N;
      const T* ob = o + b * C * N;
      T* dkb = dk + b * d * M + j0;
      T* dvb = dv + b * C * M + j0;
      T* dqb = dq + b * d * N;
      for (int64_t i0 = 0; i0 < N; i0 += BM) {
        const int64_t bm = std::min(BM, N - i0);
        // P^T (bn x bm) = exp(k_blk^T q_blk - lse)
        gemm_rm<T>(true, false, bn, bm, d, T(1), kb + j0, M, qb + i0, N, T(0), PT.data(), bm);
        for (int64_t j = 0; j < bn; ++j) exp_sub_vec(PT.data() + j * bm, lse + b * N + i0, bm);
        // dv_blk (C x bn) += gamma * grad_blk (C x bm) P (bm x bn)
        gemm_rm<T>(false, true, C, bn, bm, gamma, gb + i0, N, PT.data(), bm, T(1), dvb, M);
        // dP^T (bn x bm) = gamma * v_blk^T grad_blk; dS^T = P^T * (dP^T - delta)
        gemm_rm<T>(true, false, bn, bm, C, gamma, vb + j0, M, gb + i0, N, T(0), DS.data(), bm);
        for (int64_t j = 0; j < bn; ++j) {
          softmax_grad(DS.data() + j * bm, PT.data() + j * bm, delta + b * N + i0, bm);
          fix_dominant(DS.data() + j * bm, PT.data() + j * bm, bm, gb, vb, ob, N, M, C, i0, j0 + j, gamma);
        }
        // dk_blk (d x bn) += q_blk (d x bm) dS (bm x bn);  dq_blk (d x bm) += k_blk (d x bn) dS^T
        gemm_rm<T>(false, true, d, bn, bm, T(1), qb + i0, N, DS.data(), bm, T(1), dkb, M);
        gemm_rm<T>(false, false, d, bm, bn, T(1), kb + j0, M, DS.data(), bm, T(1), dqb + i0, N);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& x,
    const at::Tensor& gamma) {
  check_inputs(q, k, v, x, gamma, "ganengine_C::attention_fwd");
  const int64_t B = q.size(0), d = q.size(1), N = q.size(2), M = k.size(2), C = v.size(1);
  auto out = at::empty_like(x);
  auto o = at::empty_like(x);
  auto lse = at::empty({B, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_fwd", [&] {
    fwd_kernel<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                         x.data_ptr<scalar_t>(), gamma.item<scalar_t>(), out.data_ptr<scalar_t>(),
                         o.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), B, d, N, M, C);
  });
  return {out, o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
    const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& gamma_in) {
  check_inputs(q, k, v, grad_in, gamma_in, "ganengine_C::attention_bwd");
  TORCH_CHECK(o.sizes() == grad_in.sizes() && o.is_contiguous() && o.scalar_type() == q.scalar_type(),
              "ganengine_C::attention_bwd: o must be a contiguous ", grad_in.sizes(), " tensor of dtype ",
              q.scalar_type());
  at::Tensor grad = grad_in, gamma = gamma_in;
  if (!std::isfinite(gamma.item<double>())) {  // fold it into grad (see the top of the file)
    grad = grad_in * gamma_in.reshape({});
    gamma = at::ones_like(gamma_in);
  }
  const int64_t B = q.size(0), d = q.size(1), N = q.size(2), M = k.size(2), C = v.size(1);
  for (const at::Tensor* t : {&lse, &delta}) {
    TORCH_CHECK(t->is_contiguous() && t->dim() == 2 && t->size(0) == B && t->size(1) == N &&
                    t->scalar_type() == q.scalar_type(),
                "ganengine_C::attention_bwd: lse and delta must be contiguous (", B, ", ", N,
                ") tensors of dtype ", q.scalar_type());
  }
  auto dk = at::zeros_like(k);
  auto dv = at::zeros_like(v);
  auto dq_parts = at::zeros({at::get_num_threads(), B, d, N}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_bwd", [&] {
    bwd_kernel<scalar_t>(grad.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                         v.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                         delta.data_ptr<scalar_t>(),
                         gamma.item<scalar_t>(), dq_parts.data_ptr<scalar_t>(), dq_parts.size(0),
                         dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), B, d, N, M, C);
  });
  auto dq = dq_parts.size(0) == 1 ? dq_parts[0] : dq_parts.sum(0);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ganengine_C, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor x, Tensor gamma) -> (Tensor, Tensor, Tensor)");
  m.def("attention_bwd(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor delta, "
        "Tensor gamma) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ganengine_C, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}
