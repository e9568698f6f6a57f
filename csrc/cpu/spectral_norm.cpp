// Spectral normalisation, CPU kernels: the power iteration, sigma and W / sigma of a LIST of
// weights in one call (one layer, or every spectral-normed layer of a model).
//
// spectral_norm_fwd(weights, us, vs, first, steps, eps, write_state)
//     -> (w_sn[], u_out[], v_out[], sigma[L] (fp32; fp64 for fp64))
//   Each weight is the matrix M = weight.view(H, -1) (dim 0, contiguous). A power iteration is a
//   sequence of `steps` half steps starting with `first` (0: U, 1: V), alternating:
//     U: u = normalize(M v)      V: v = normalize(M^T u)     normalize(x) = x / max(||x||, eps)
//   starting from the state vectors us/vs (PyTorch's parametrization: first U, steps 2n; the
//   state v derived from u: first V, steps 2n + 1). sigma = u . M v, from the last half step
//   without another pass (last V: v = s / m with s = M^T u, so u . M v = ||s||^2 / m; same for
//   U), or directly when steps == 0 (eval). u_out / v_out are the vectors sigma was computed
//   with; with write_state they are also copied into us / vs (the in-place buffer update).
// spectral_norm_fwd_functional(weights, us, vs, first, steps, eps, write_state)
//   The same outputs without the state write (us / vs are only read; write_state only says
//   whether v is checked as a state vector). spectral_norm_fwd's Functionalize kernel runs it
//   and hands u_out / v_out to functionalization as the new us / vs: AOTAutograd (torch.compile,
//   opcheck's aot_dispatch tests) cannot functionalize a mutating op that returns lists by
//   itself, and eager calls never reach that kernel (their cost is unchanged).
// spectral_norm_bwd(grads, gsig, weights, u_out, v_out, sigma) -> dW[]
//   dW = g / sigma + (gsig - <g, W> / sigma^2) u v^T  (u, v constants: PyTorch's graph).
//
// Every reduction has a fixed order that does not depend on the thread count: a row dot product
// is one vectorised loop, a column sum runs over the rows in order for a fixed chunk of
// columns, norms are sequential, <g, W> sums fixed chunks of kChunk elements in order. So one
// layer gives the same bits alone or in a group. fp32 and fp64 (accumulated in their own type).
#include <ATen/ATen.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "vec_utils.h"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace ganengine {
namespace spectral_norm_cpu {
namespace {

using at::vec::Vectorized;
using cpu::hsum;

constexpr int64_t kWork = 32768;   // elements per parallel task at least (smaller: run inline)
constexpr int64_t kChunk = 32768;  // elements per partial sum of <g, W>

// sum_i a[i] * x[i]
template <typename T>
inline T dot(const T* a, const T* x, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  Vec s0(T(0)), s1(T(0));
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    s0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(x + i), s0);
    s1 = at::vec::fmadd(Vec::loadu(a + i + L), Vec::loadu(x + i + L), s1);
  }
  for (; i + L <= n; i += L) s0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(x + i), s0);
  T s = hsum<T>(s0 + s1);
  for (; i < n; ++i) s += a[i] * x[i];
  return s;
}

template <typename T>
inline T sumsq(const T* x, int64_t n) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
  return s;
}

// t[r..r+3] = the dot products of four rows with x, each in dot()'s order (two vector
// accumulators, lanes summed, then the scalar tail); four rows per sweep keep eight accumulators
// and four memory streams in flight (one row at a time is latency-bound).
template <typename T>
inline void dot4(const T* a, int64_t ld, const T* x, int64_t n, T* t) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const T* a1 = a + ld;
  const T* a2 = a1 + ld;
  const T* a3 = a2 + ld;
  Vec p0(T(0)), q0(T(0)), p1(T(0)), q1(T(0)), p2(T(0)), q2(T(0)), p3(T(0)), q3(T(0));
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    const Vec x0 = Vec::loadu(x + i), x1 = Vec::loadu(x + i + L);
    p0 = at::vec::fmadd(Vec::loadu(a + i), x0, p0);
    q0 = at::vec::fmadd(Vec::loadu(a + i + L), x1, q0);
    p1 = at::vec::fmadd(Vec::loadu(a1 + i), x0, p1);
    q1 = at::vec::fmadd(Vec::loadu(a1 + i + L), x1, q1);
    p2 = at::vec::fmadd(Vec::loadu(a2 + i), x0, p2);
    q2 = at::vec::fmadd(Vec::loadu(a2 + i + L), x1, q2);
    p3 = at::vec::fmadd(Vec::loadu(a3 + i), x0, p3);
    q3 = at::vec::fmadd(Vec::loadu(a3 + i + L), x1, q3);
  }
  if (i + L <= n) {
    const Vec x0 = Vec::loadu(x + i);
    p0 = at::vec::fmadd(Vec::loadu(a + i), x0, p0);
    p1 = at::vec::fmadd(Vec::loadu(a1 + i), x0, p1);
    p2 = at::vec::fmadd(Vec::loadu(a2 + i), x0, p2);
    p3 = at::vec::fmadd(Vec::loadu(a3 + i), x0, p3);
    i += L;
  }
  T s0 = hsum<T>(p0 + q0), s1 = hsum<T>(p1 + q1), s2 = hsum<T>(p2 + q2), s3 = hsum<T>(p3 + q3);
  for (; i < n; ++i) {
    s0 += a[i] * x[i];
    s1 += a1[i] * x[i];
    s2 += a2[i] * x[i];
    s3 += a3[i] * x[i];
  }
  t[0] = s0;
  t[1] = s1;
  t[2] = s2;
  t[3] = s3;
}

// acc[0..n) += y0 * a0 + y1 * a1 + y2 * a2 + y3 * a3, one fma per row in row order
template <typename T>
inline void axpy4(const T* a0, int64_t ld, const T* y, int64_t n, T* acc) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const T* a1 = a0 + ld;
  const T* a2 = a1 + ld;
  const T* a3 = a2 + ld;
  const Vec y0(y[0]), y1(y[1]), y2(y[2]), y3(y[3]);
  const int64_t nv = n - n % L;
  for (int64_t j = 0; j < nv; j += L) {
    Vec s = Vec::loadu(acc + j);
    s = at::vec::fmadd(Vec::loadu(a0 + j), y0, s);
    s = at::vec::fmadd(Vec::loadu(a1 + j), y1, s);
    s = at::vec::fmadd(Vec::loadu(a2 + j), y2, s);
    s = at::vec::fmadd(Vec::loadu(a3 + j), y3, s);
    s.store(acc + j);
  }
  for (int64_t j = nv; j < n; ++j) {
    T s = acc[j];
    s = std::fma(a0[j], y[0], s);
    s = std::fma(a1[j], y[1], s);
    s = std::fma(a2[j], y[2], s);
    s = std::fma(a3[j], y[3], s);
    acc[j] = s;
  }
}

// acc[0..n) += y0 * a0 (the single-row tail of axpy4)
template <typename T>
inline void axpy1(const T* a0, T y0, int64_t n, T* acc) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const Vec yv(y0);
  const int64_t nv = n - n % L;
  for (int64_t j = 0; j < nv; j += L) at::vec::fmadd(Vec::loadu(a0 + j), yv, Vec::loadu(acc + j)).store(acc + j);
  for (int64_t j = nv; j < n; ++j) acc[j] = std::fma(a0[j], y0, acc[j]);
}

// t = M x (H rows of length Wd, row stride ld)
template <typename T>
void matvec(const T* M, int64_t H, int64_t Wd, int64_t ld, const T* x, T* t) {
  const int64_t nq = (H + 3) / 4;  // four rows per step
  at::parallel_for(0, nq, std::max<int64_t>(1, kWork / std::max<int64_t>(4 * Wd, 1)), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t r = 4 * q;
      if (r + 4 <= H) dot4(M + r * ld, ld, x, Wd, t + r);
      else
        for (int64_t i = r; i < H; ++i) t[i] = dot(M + i * ld, x, Wd);
    }
  });
}

// t = M x and S = M^T t in ONE pass over M (a U half step, then the V half step's product before
// t's normalisation; the caller divides S by t's norm): each row's dot product is followed by its
// axpy into S while the row is still in cache, so the pair reads M from memory once where two
// half steps read it twice (the forward's cost at BigGAN's 85 MB weights is its passes over M).
// Rows go in fixed blocks of kRowBlock, each summed into its own partial S, the partials added
// in block order: the bits depend on the shape only, not on the thread count.
constexpr int64_t kRowBlock = 128;

template <typename T>
void matvec_then_t(const T* M, int64_t H, int64_t Wd, int64_t ld, const T* x, T* t, T* S) {
  const int64_t nb = (H + kRowBlock - 1) / kRowBlock;
  std::vector<T> part(nb > 1 ? nb * Wd : 0);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      T* acc = nb > 1 ? part.data() + b * Wd : S;
      std::fill_n(acc, Wd, T(0));
      const int64_t r1 = std::min(H, (b + 1) * kRowBlock);
      int64_t r = b * kRowBlock;
      for (; r + 4 <= r1; r += 4) {
        dot4(M + r * ld, ld, x, Wd, t + r);
        axpy4(M + r * ld, ld, t + r, Wd, acc);
      }
      for (; r < r1; ++r) {
        t[r] = dot(M + r * ld, x, Wd);
        axpy1(M + r * ld, t[r], Wd, acc);
      }
    }
  });
  if (nb > 1) {
    at::parallel_for(0, Wd, kWork / nb + 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        T v = part[j];
        for (int64_t b = 1; b < nb; ++b) v += part[b * Wd + j];
        S[j] = v;
      }
    });
  }
}

// s = M^T y: each task owns a chunk of kColBlock columns and runs over the rows in order, four rows
// per sweep of its accumulators (the chunk's part of s, in L1). Each row segment read is kColBlock
// contiguous elements, so the pass streams M as the row dot products do; a narrow block (one
// register tile, 128 B per row) reads M at a 4*Wd-byte stride, which the hardware prefetchers
// do not follow, and ran about 2x slower than BLAS's gemv at BigGAN's 1536 x 13824 weights. Each
// column still sums its rows in order with one fma per row, so the bits do not depend on the
// block width or the thread count.
template <typename T>
void matvec_t(const T* M, int64_t H, int64_t Wd, int64_t ld, const T* y, T* s) {
  constexpr int64_t kColBlock = 4096 / sizeof(T);
  const int64_t nblk = (Wd + kColBlock - 1) / kColBlock;
  at::parallel_for(0, nblk, std::max<int64_t>(1, kWork / std::max<int64_t>(H * kColBlock, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kColBlock;
      const int64_t n = std::min(kColBlock, Wd - c0);
      T* acc = s + c0;
      std::fill_n(acc, n, T(0));
      int64_t r = 0;
      for (; r + 4 <= H; r += 4) axpy4(M + r * ld + c0, ld, y + r, n, acc);
      for (; r < H; ++r) axpy1(M + r * ld + c0, y[r], n, acc);
    }
  });
}

// out[i] = in[i] / den (F.normalize's division)
template <typename T>
inline void scale_into(const T* in, T den, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = in[i] / den;
}

template <typename T>
T layer_forward(const at::Tensor& weight, at::Tensor& u_state, at::Tensor& v_state, at::Tensor& w_sn,
                at::Tensor& u_out, at::Tensor& v_out, int64_t first, int64_t steps, double eps_d,
                bool write_state) {
  const int64_t H = weight.size(0);
  const int64_t Wd = weight.numel() / H;
  const T* M = weight.data_ptr<T>();
  const T eps = static_cast<T>(eps_d);
  T* uo = u_out.data_ptr<T>();
  T* vo = v_out.data_ptr<T>();
  std::vector<T> t(H), s(Wd);
  T sigma;
  if (steps == 0) {  // eval: sigma = u . M v from the state, nothing written back
    std::copy_n(u_state.data_ptr<T>(), H, uo);
    std::copy_n(v_state.data_ptr<T>(), Wd, vo);
    matvec(M, H, Wd, Wd, vo, t.data());
    sigma = 0;
    for (int64_t r = 0; r < H; ++r) sigma += uo[r] * t[r];
  } else {
    int64_t side = first;
    T den = 1;
    for (int64_t k = 0; k < steps;) {
      if (side == 0) {  // U: x = state v or normalize(s); t = M x
        if (k == 0) std::copy_n(v_state.data_ptr<T>(), Wd, vo);
        else scale_into(s.data(), den, vo, Wd);
        if (k + 1 < steps) {  // U then V from one pass: s = M^T t / ||t|| = M^T u
          matvec_then_t(M, H, Wd, Wd, vo, t.data(), s.data());
          const T den_t = std::max(std::sqrt(sumsq(t.data(), H)), eps);
          scale_into(t.data(), den_t, uo, H);
          scale_into(s.data(), den_t, s.data(), Wd);
          den = std::max(std::sqrt(sumsq(s.data(), Wd)), eps);
          k += 2;  // side stays U: the next half step (if any) is a U
          continue;
        }
        matvec(M, H, Wd, Wd, vo, t.data());
        den = std::max(std::sqrt(sumsq(t.data(), H)), eps);
      } else {          // V: y = state u or normalize(t); s = M^T y
        if (k == 0) std::copy_n(u_state.data_ptr<T>(), H, uo);
        else scale_into(t.data(), den, uo, H);
        matvec_t(M, H, Wd, Wd, uo, s.data());
        den = std::max(std::sqrt(sumsq(s.data(), Wd)), eps);
      }
      side ^= 1;
      ++k;
    }
    // the last step's result, normalised; sigma = ||.||^2 / den
    if ((side ^ 1) == 0) {
      scale_into(t.data(), den, uo, H);
      sigma = sumsq(t.data(), H) / den;
    } else {
      scale_into(s.data(), den, vo, Wd);
      sigma = sumsq(s.data(), Wd) / den;
    }
    if (write_state) {
      std::copy_n(uo, H, u_state.data_ptr<T>());
      std::copy_n(vo, Wd, v_state.data_ptr<T>());
    }
  }
  // W / sigma
  T* out = w_sn.data_ptr<T>();
  const int64_t n = H * Wd;
  at::parallel_for(0, n, kWork, [&](int64_t e0, int64_t e1) {
    using Vec = Vectorized<T>;
    const Vec sv(sigma);
    int64_t e = e0;
    for (; e + Vec::size() <= e1; e += Vec::size()) (Vec::loadu(M + e) / sv).store(out + e);
    for (; e < e1; ++e) out[e] = M[e] / sigma;
  });
  return sigma;
}

// v is read only when the plan starts with U or does not iterate; otherwise (v derived from u)
// the caller may pass any placeholder, and v_out is allocated here.
void check_layer(const at::Tensor& w, const at::Tensor& u, const at::Tensor& v, int64_t i, bool v_used = true) {
  TORCH_CHECK(w.dim() >= 2, "spectral_norm_fwd: weights[", i, "] must have at least 2 dims, got ", w.sizes());
  TORCH_CHECK(w.is_contiguous(), "spectral_norm_fwd: weights[", i, "] must be contiguous");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble,
              "spectral_norm_fwd: weights[", i, "] must be fp32 or fp64, got ", w.scalar_type());
  const int64_t H = w.size(0);
  TORCH_CHECK(H > 0 && w.numel() > 0, "spectral_norm_fwd: weights[", i, "] is empty");
  TORCH_CHECK(u.device() == w.device() && (!v_used || v.device() == w.device()),
              "spectral_norm_fwd: us[", i, "] and vs[", i, "] must be on the weight's device");
  TORCH_CHECK(u.dim() == 1 && u.size(0) == H && u.is_contiguous() && u.scalar_type() == w.scalar_type(),
              "spectral_norm_fwd: us[", i, "] must be a contiguous (", H, ",) vector of the weight's dtype");
  TORCH_CHECK(!v_used || (v.dim() == 1 && v.size(0) == w.numel() / H && v.is_contiguous() && v.scalar_type() == w.scalar_type()),
              "spectral_norm_fwd: vs[", i, "] must be a contiguous (", w.numel() / H,
              ",) vector of the weight's dtype");
}

using FwdOut = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>;

// write_back: copy u_out / v_out into us / vs where write_state asks for it (spectral_norm_fwd);
// false: us / vs are only read (spectral_norm_fwd_functional)
FwdOut sn_forward(at::TensorList weights, at::TensorList us, at::TensorList vs, int64_t first, int64_t steps,
                  double eps, bool write_state, bool write_back) {
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(L > 0 && static_cast<int64_t>(us.size()) == L && static_cast<int64_t>(vs.size()) == L,
              "spectral_norm_fwd: weights, us and vs must be non-empty lists of one length");
  TORCH_CHECK(first == 0 || first == 1, "spectral_norm_fwd: first must be 0 (U) or 1 (V)");
  TORCH_CHECK(steps >= 0, "spectral_norm_fwd: steps must be >= 0");
  const auto dtype = weights[0].scalar_type();
  std::vector<at::Tensor> w_sn, u_out, v_out;
  at::Tensor sigma = at::empty({L}, weights[0].options());
  for (int64_t i = 0; i < L; ++i) {
    const bool v_used = steps == 0 || first == 0 || write_state;
    check_layer(weights[i], us[i], vs[i], i, v_used);
    TORCH_CHECK(weights[i].scalar_type() == dtype, "spectral_norm_fwd: all weights must share one dtype");
    w_sn.push_back(at::empty_like(weights[i], at::MemoryFormat::Contiguous));
    u_out.push_back(at::empty_like(us[i]));
    v_out.push_back(at::empty({weights[i].numel() / weights[i].size(0)}, weights[i].options()));
    at::Tensor u = us[i], v = vs[i];
    AT_DISPATCH_FLOATING_TYPES(dtype, "spectral_norm_fwd", [&] {
      sigma.data_ptr<scalar_t>()[i] =
          layer_forward<scalar_t>(weights[i], u, v, w_sn[i], u_out[i], v_out[i], first, steps, eps,
                                  write_state && write_back);
    });
  }
  return {w_sn, u_out, v_out, sigma};
}

FwdOut sn_fwd(at::TensorList weights, at::TensorList us, at::TensorList vs, int64_t first, int64_t steps, double eps,
              bool write_state) {
  return sn_forward(weights, us, vs, first, steps, eps, write_state, /*write_back=*/true);
}

FwdOut sn_fwd_functional(at::TensorList weights, at::TensorList us, at::TensorList vs, int64_t first, int64_t steps,
                         double eps, bool write_state) {
  return sn_forward(weights, us, vs, first, steps, eps, write_state, /*write_back=*/false);
}

using FwdSig = FwdOut(at::TensorList, at::TensorList, at::TensorList, int64_t, int64_t, double, bool);

// ---------------------------------------------------------------------------- functionalization
// The boilerplate of ATen's generated Functionalize kernels for an in-place op: unwrap the
// arguments, run the out-of-place variant below functionalization, then replace the mutated
// arguments' values with the new ones and commit them (AOTAutograd copies them back into the
// real state buffers after the graph).
namespace fn = at::functionalization::impl;

std::vector<at::Tensor> unwrap(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) {
    if (fn::isFunctionalTensor(t)) {
      fn::sync(t);
      out.push_back(fn::from_functional_tensor(t));
    } else {
      out.push_back(t);
    }
  }
  return out;
}

bool all_functional(at::TensorList ts) {
  return std::all_of(ts.begin(), ts.end(), [](const at::Tensor& t) { return fn::isFunctionalTensor(t); });
}

bool any_functional(at::TensorList ts) {
  return std::any_of(ts.begin(), ts.end(), [](const at::Tensor& t) { return fn::isFunctionalTensor(t); });
}

void write_state_into(at::TensorList state, const std::vector<at::Tensor>& values) {
  for (size_t i = 0; i < state.size(); ++i) {
    fn::replace_(state[i], values[i]);
    fn::commit_update(state[i]);
    fn::sync(state[i]);
  }
}

FwdOut sn_fwd_functionalize(at::TensorList weights, at::TensorList us, at::TensorList vs, int64_t first,
                            int64_t steps, double eps, bool write_state) {
  const bool writes = write_state && steps > 0;  // (eval, steps 0, writes nothing)
  if (writes && !(all_functional(us) && all_functional(vs))) {
    // state outside functionalization: only with no functional argument at all (the generated
    // kernels' rule), then the in-place op itself runs
    TORCH_CHECK(!any_functional(weights) && !any_functional(us) && !any_functional(vs),
                "spectral_norm_fwd: under functionalization the state vectors it writes (us, vs) must be "
                "functional tensors when any other argument is");
    at::AutoDispatchSkipFunctionalize guard;
    return sn_fwd(weights, us, vs, first, steps, eps, write_state);
  }
  static const auto functional =
      c10::Dispatcher::singleton().findSchemaOrThrow("ganengine_C::spectral_norm_fwd_functional", "").typed<FwdSig>();
  const std::vector<at::Tensor> w_ = unwrap(weights), u_ = unwrap(us), v_ = unwrap(vs);
  FwdOut r;
  {
    at::AutoDispatchSkipFunctionalize guard;
    r = functional.call(w_, u_, v_, first, steps, eps, write_state);
  }
  auto& [w_sn, u_out, v_out, sigma] = r;
  if (writes) {
    write_state_into(us, u_out);
    write_state_into(vs, v_out);
  }
  return {fn::to_functional_tensor(w_sn), fn::to_functional_tensor(u_out), fn::to_functional_tensor(v_out),
          fn::to_functional_tensor(sigma)};
}

template <typename T>
void layer_backward(const at::Tensor& g_in, const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                    T sigma, T gsig, at::Tensor& dw) {
  const at::Tensor g = g_in.contiguous();  // a stride-0 (expanded) grad becomes dense once
  const int64_t H = weight.size(0);
  const int64_t Wd = weight.numel() / H;
  const int64_t n = H * Wd;
  const T* G = g.data_ptr<T>();
  const T* M = weight.data_ptr<T>();
  const int64_t nchunk = (n + kChunk - 1) / kChunk;
  std::vector<T> part(nchunk);
  at::parallel_for(0, nchunk, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t e0 = c * kChunk;
      part[c] = dot(G + e0, M + e0, std::min(kChunk, n - e0));
    }
  });
  T gw = 0;
  for (int64_t c = 0; c < nchunk; ++c) gw += part[c];
  const T coef = gsig - gw / (sigma * sigma);
  const T* up = u.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* out = dw.data_ptr<T>();
  at::parallel_for(0, H, std::max<int64_t>(1, kWork / std::max<int64_t>(Wd, 1)), [&](int64_t r0, int64_t r1) {
    using Vec = Vectorized<T>;
    const Vec sv(sigma);
    for (int64_t r = r0; r < r1; ++r) {
      const T cu = coef * up[r];
      const Vec cuv(cu);
      const T* gr = G + r * Wd;
      T* orow = out + r * Wd;
      int64_t j = 0;
      for (; j + Vec::size() <= Wd; j += Vec::size())
        at::vec::fmadd(cuv, Vec::loadu(vp + j), Vec::loadu(gr + j) / sv).store(orow + j);
      for (; j < Wd; ++j) orow[j] = gr[j] / sigma + cu * vp[j];
    }
  });
}

std::vector<at::Tensor> sn_bwd(at::TensorList grads, const at::Tensor& gsig, at::TensorList weights,
                               at::TensorList u_out, at::TensorList v_out, const at::Tensor& sigma) {
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == L && static_cast<int64_t>(u_out.size()) == L &&
                  static_cast<int64_t>(v_out.size()) == L && sigma.numel() == L && gsig.numel() == L,
              "spectral_norm_bwd: one grad, u, v, sigma and gsig per weight");
  std::vector<at::Tensor> out;
  const at::Tensor sig = sigma.contiguous(), gs = gsig.to(sigma.scalar_type()).contiguous();
  for (int64_t i = 0; i < L; ++i) {
    TORCH_CHECK(grads[i].sizes() == weights[i].sizes() && grads[i].scalar_type() == weights[i].scalar_type(),
                "spectral_norm_bwd: grads[", i, "] must match the weight's shape and dtype");
    check_layer(weights[i], u_out[i], v_out[i], i);
    out.push_back(at::empty_like(weights[i], at::MemoryFormat::Contiguous));
    AT_DISPATCH_FLOATING_TYPES(weights[i].scalar_type(), "spectral_norm_bwd", [&] {
      layer_backward<scalar_t>(grads[i], weights[i], u_out[i], v_out[i], sig.data_ptr<scalar_t>()[i],
                               gs.data_ptr<scalar_t>()[i], out[i]);
    });
  }
  return out;
}

}  // namespace
}  // namespace spectral_norm_cpu
}  // namespace ganengine

TORCH_LIBRARY_FRAGMENT(ganengine_C, m) {
  m.def("spectral_norm_fwd(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, int first, int steps, float eps, "
        "bool write_state) -> (Tensor[], Tensor[], Tensor[], Tensor)");
  m.def("spectral_norm_fwd_functional(Tensor[] weights, Tensor[] us, Tensor[] vs, int first, int steps, float eps, "
        "bool write_state) -> (Tensor[], Tensor[], Tensor[], Tensor)");
  m.def("spectral_norm_bwd(Tensor[] grads, Tensor gsig, Tensor[] weights, Tensor[] u_out, Tensor[] v_out, "
        "Tensor sigma) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(ganengine_C, CPU, m) {
  m.impl("spectral_norm_fwd", &ganengine::spectral_norm_cpu::sn_fwd);
  m.impl("spectral_norm_fwd_functional", &ganengine::spectral_norm_cpu::sn_fwd_functional);
  m.impl("spectral_norm_bwd", &ganengine::spectral_norm_cpu::sn_bwd);
}

TORCH_LIBRARY_IMPL(ganengine_C, Functionalize, m) {
  m.impl("spectral_norm_fwd", &ganengine::spectral_norm_cpu::sn_fwd_functionalize);
}
