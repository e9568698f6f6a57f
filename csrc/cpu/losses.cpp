// Fused GAN loss reductions, CPU kernels.
//
// losses_adv_fwd: k logit maps, each with its own elementwise loss l (mode codes of
//   ganengine/ops/losses.py: 0 BCE-with-logits to t, 1 squared error to t, 2 relu(1 - x),
//   3 relu(1 + x), 4 linear t * x). Returns (total, grads): the 0-d total
//   sum_i scale_i * sum_j l(x_ij) and, for the nonlinear modes when asked, the elementwise
//   gradient scale_i * dl/dx written in the same pass (undefined tensors, None in Python, otherwise).
// losses_l1_fwd: k (pred, target) pairs; returns (total, terms, grads), terms_i =
//   scale_i * sum |p - t|, and when asked grads_i = scale_i * sign(p - t) from the same pass.
// losses_l1_bwd: grad_i = coef_i * sign(p - t) (sign(0) = 0, as torch's l1_loss backward).
//
// Deterministic two-stage reduction: every term is cut into fixed chunks of kChunk elements,
// the chunks (of all terms together, one parallel_for) each write one partial sum, then the
// partials are summed sequentially in chunk order. Chunk boundaries do not depend on the thread
// count, so neither do the result bits. Within a chunk, blocks of kSub elements are summed in
// fp32 (fp64 for fp64 inputs) vector lanes, at most kSub / vector width elements a lane, and the
// block sums in fp64, as are the chunk partials: a lane running through a whole chunk (about 1000
// fp32 additions) had left the sum ~50x less accurate than torch's cascade sum (relative 1e-5 on
// 32K-element maps). fp16/bf16 are converted to fp32 in the same blocks, on the stack.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "vec_utils.h"

#include <cmath>
#include <vector>

namespace ganengine {
namespace losses_cpu {
namespace {

using at::vec::Vectorized;

constexpr int64_t kChunk = 32768;  // elements per partial sum (fixed: thread-count independent)
constexpr int64_t kSub = 256;      // summation (and fp16/bf16 conversion) block: a multiple of every vector width
constexpr int64_t kGrain = 4;      // chunks per thread at least: waking a thread for less costs more than it saves

enum Mode : int64_t { BCE = 0, MSE = 1, HINGE_REAL = 2, HINGE_FAKE = 3, LINEAR = 4 };

using cpu::AccOf;
using cpu::hsum;

// ---------------------------------------------------------------- elementwise loss and gradient
template <int MODE, typename T>
inline T loss_scalar(T x, T t, T& g) {
  if constexpr (MODE == BCE) {
    // (1 - t) x - log_sigmoid(x), log_sigmoid(x) = min(x, 0) - log1p(exp(-|x|)): ATen's form,
    // so an infinite logit gives eager's inf / NaN (max(x, 0) - x t gave NaN for x = +inf, t = 0);
    // dl/dx = sigmoid(x) - t, from the same exp
    const T e = std::exp(-std::abs(x));
    const T inv = T(1) / (T(1) + e);
    g = (x >= T(0) ? inv : e * inv) - t;
    return (T(1) - t) * x - std::min(x, T(0)) + std::log1p(e);
  } else if constexpr (MODE == MSE) {
    const T d = x - t;
    g = T(2) * d;
    return d * d;
  } else if constexpr (MODE == HINGE_REAL) {
    // relu'(0) = 0 and a NaN passes the gradient, as torch's threshold_backward (!(1 - x <= 0))
    g = x >= T(1) ? T(0) : T(-1);
    return std::max(T(1) - x, T(0));
  } else if constexpr (MODE == HINGE_FAKE) {
    g = x <= T(-1) ? T(0) : T(1);
    return std::max(T(1) + x, T(0));
  } else {
    g = t;
    return x;
  }
}

// log1p(e) for e in [0, 1] (e = exp(-|x|) of the BCE term), fp32: e * q(e) with q a degree-9
// polynomial fitted to log1p(e) / e on [0, 1] (relative error 4.8e-9 in exact arithmetic, under
// 2 ulp evaluated in fp32 by Horner with FMA). Sleef's general log1pf8_u10 cost two thirds of a
// fused BCE pass (about 1.5 ns an element on one core against 0.1 ns for exp); this is ten FMAs.
// A NaN e gives NaN; e = 0 gives 0. Only valid on [0, 1]: callers pass exp(-|x|).
inline Vectorized<float> log1p_unit(const Vectorized<float>& e) {
  using Vec = Vectorized<float>;
  Vec q(-0.0032512086909264326f);
  q = at::vec::fmadd(q, e, Vec(0.019887857139110565f));
  q = at::vec::fmadd(q, e, Vec(-0.05703653395175934f));
  q = at::vec::fmadd(q, e, Vec(0.10612481832504272f));
  q = at::vec::fmadd(q, e, Vec(-0.153115376830101f));
  q = at::vec::fmadd(q, e, Vec(0.19678322970867157f));
  q = at::vec::fmadd(q, e, Vec(-0.2495468258857727f));
  q = at::vec::fmadd(q, e, Vec(0.33330029249191284f));
  q = at::vec::fmadd(q, e, Vec(-0.4999990463256836f));
  q = at::vec::fmadd(q, e, Vec(1.0f));
  return q * e;
}
template <typename T>
inline Vectorized<T> log1p_of_exp_neg_abs(const Vectorized<T>& e) {
  if constexpr (std::is_same_v<T, float>) {
    return log1p_unit(e);
  } else {
    return e.log1p();
  }
}

template <int MODE, typename T>
inline Vectorized<T> loss_vec(const Vectorized<T>& x, const Vectorized<T>& t, Vectorized<T>& g) {
  using Vec = Vectorized<T>;
  const Vec zero(0), one(1);
  if constexpr (MODE == BCE) {
    const Vec e = (zero - x.abs()).exp();
    const Vec inv = one / (one + e);
    g = Vec::blendv(e * inv, inv, x >= zero) - t;
    return (one - t) * x - at::vec::minimum(x, zero) + log1p_of_exp_neg_abs<T>(e);
  } else if constexpr (MODE == MSE) {
    const Vec d = x - t;
    g = d + d;
    return d * d;
  } else if constexpr (MODE == HINGE_REAL) {
    g = Vec::blendv(Vec(-1), zero, x >= one);
    return at::vec::maximum(one - x, zero);
  } else if constexpr (MODE == HINGE_FAKE) {
    g = Vec::blendv(one, zero, x <= Vec(-1));
    return at::vec::maximum(one + x, zero);
  } else {
    g = t;
    return x;
  }
}

// Four vector accumulators (lane sums of four interleaved streams, added in a fixed order at the
// end): one accumulator made the cheap modes wait on the add latency (4 cycles a vector), which
// left -x.mean() (wgangp) at 1.1x eager's time on a 16x30x30 map.
template <typename acc_t>
struct Acc4 {
  Vectorized<acc_t> a0{acc_t(0)}, a1{acc_t(0)}, a2{acc_t(0)}, a3{acc_t(0)};
  acc_t sum() const { return hsum<acc_t>((a0 + a1) + (a2 + a3)); }
};

// sum of the loss over n contiguous acc_t values; writes scale * dl/dx to g when GRAD
template <int MODE, bool GRAD, typename acc_t>
inline acc_t block_sum(const acc_t* x, acc_t* g, int64_t n, acc_t t, acc_t scale, Acc4<acc_t>& acc) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t L = Vec::size();
  const Vec vt(t), vs(scale);
  int64_t i = 0;
  Vec g0, g1, g2, g3;
  for (; i + 4 * L <= n; i += 4 * L) {
    acc.a0 = acc.a0 + loss_vec<MODE, acc_t>(Vec::loadu(x + i), vt, g0);
    acc.a1 = acc.a1 + loss_vec<MODE, acc_t>(Vec::loadu(x + i + L), vt, g1);
    acc.a2 = acc.a2 + loss_vec<MODE, acc_t>(Vec::loadu(x + i + 2 * L), vt, g2);
    acc.a3 = acc.a3 + loss_vec<MODE, acc_t>(Vec::loadu(x + i + 3 * L), vt, g3);
    if constexpr (GRAD) {
      (g0 * vs).store(g + i);
      (g1 * vs).store(g + i + L);
      (g2 * vs).store(g + i + 2 * L);
      (g3 * vs).store(g + i + 3 * L);
    }
  }
  for (; i + L <= n; i += L) {
    acc.a0 = acc.a0 + loss_vec<MODE, acc_t>(Vec::loadu(x + i), vt, g0);
    if constexpr (GRAD) (g0 * vs).store(g + i);
  }
  acc_t tail = 0;
  for (; i < n; ++i) {
    acc_t gs;
    tail += loss_scalar<MODE, acc_t>(x[i], t, gs);
    if constexpr (GRAD) g[i] = gs * scale;
  }
  return tail;
}

// one chunk [begin, end) of one term, in blocks of kSub (converted for fp16/bf16), each block's
// sum added in fp64
template <int MODE, bool GRAD, typename scalar_t, typename acc_t>
double adv_chunk(const scalar_t* x, scalar_t* g, int64_t begin, int64_t end, acc_t t, acc_t scale) {
  double sum = 0;
  alignas(64) acc_t xb[std::is_same_v<scalar_t, acc_t> ? 1 : kSub];
  alignas(64) acc_t gb[std::is_same_v<scalar_t, acc_t> ? 1 : kSub];
  for (int64_t s = begin; s < end; s += kSub) {
    const int64_t len = std::min(kSub, end - s);
    Acc4<acc_t> acc;
    acc_t tail;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      tail = block_sum<MODE, GRAD, acc_t>(x + s, GRAD ? g + s : nullptr, len, t, scale, acc);
    } else {
      at::vec::convert(x + s, xb, len);
      tail = block_sum<MODE, GRAD, acc_t>(xb, gb, len, t, scale, acc);
      if constexpr (GRAD) at::vec::convert(gb, g + s, len);
    }
    sum += static_cast<double>(acc.sum()) + static_cast<double>(tail);
  }
  return sum;
}

template <typename scalar_t, typename acc_t>
double adv_chunk_dispatch(int64_t mode, bool grad, const scalar_t* x, scalar_t* g, int64_t b, int64_t e, acc_t t,
                         acc_t s) {
#define GANENGINE_ADV_CASE(M)                                                        \
  case M:                                                                            \
    return grad ? adv_chunk<M, true, scalar_t, acc_t>(x, g, b, e, t, s)              \
                : adv_chunk<M, false, scalar_t, acc_t>(x, g, b, e, t, s);
  switch (mode) {
    GANENGINE_ADV_CASE(BCE)
    GANENGINE_ADV_CASE(MSE)
    GANENGINE_ADV_CASE(HINGE_REAL)
    GANENGINE_ADV_CASE(HINGE_FAKE)
    default:
      return adv_chunk<LINEAR, false, scalar_t, acc_t>(x, g, b, e, t, s);
  }
#undef GANENGINE_ADV_CASE
}

// ---------------------------------------------------------------- L1
// sum |p - q| over n contiguous values; with GRAD also g = c * sign(p - q) (sign(0) = 0)
template <bool GRAD, typename acc_t>
inline acc_t l1_block(const acc_t* p, const acc_t* q, acc_t* g, int64_t n, acc_t c, Vectorized<acc_t>& acc) {
  using Vec = Vectorized<acc_t>;
  const Vec zero(0), vc(c), vnc(-c);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec d = Vec::loadu(p + i) - Vec::loadu(q + i);
    acc = acc + d.abs();
    if constexpr (GRAD) Vec::blendv(Vec::blendv(zero, vc, d > zero), vnc, d < zero).store(g + i);
  }
  acc_t tail = 0;
  for (; i < n; ++i) {
    const acc_t d = p[i] - q[i];
    tail += std::abs(d);
    if constexpr (GRAD) g[i] = d > 0 ? c : (d < 0 ? -c : acc_t(0));
  }
  return tail;
}

template <bool GRAD, typename scalar_t, typename acc_t>
double l1_chunk(const scalar_t* p, const scalar_t* q, scalar_t* g, int64_t begin, int64_t end, acc_t c) {
  double sum = 0;
  alignas(64) acc_t pb[std::is_same_v<scalar_t, acc_t> ? 1 : kSub];
  alignas(64) acc_t qb[std::is_same_v<scalar_t, acc_t> ? 1 : kSub];
  for (int64_t s = begin; s < end; s += kSub) {  // (block sums in fp64: see the top of the file)
    const int64_t len = std::min(kSub, end - s);
    Vectorized<acc_t> acc(0);
    acc_t tail;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      tail = l1_block<GRAD, acc_t>(p + s, q + s, GRAD ? g + s : nullptr, len, c, acc);
    } else {
      at::vec::convert(p + s, pb, len);
      at::vec::convert(q + s, qb, len);
      tail = l1_block<GRAD, acc_t>(pb, qb, pb, len, c, acc);  // g overwrites p's block after use
      if constexpr (GRAD) at::vec::convert(pb, g + s, len);
    }
    sum += static_cast<double>(hsum<acc_t>(acc)) + static_cast<double>(tail);
  }
  return sum;
}

// Two preds against one shared target (CycleGAN: real_a serves cycle_a and idt_b, real_b
// serves cycle_b and idt_a): the target is read once for both. Each term keeps its own
// accumulators in the same order as l1_block, so the bits equal two separate passes.
template <bool GRAD, typename acc_t>
inline void l1_block2(const acc_t* p1, const acc_t* p2, const acc_t* q, acc_t* g1, acc_t* g2, int64_t n, acc_t c1,
                      acc_t c2, Vectorized<acc_t>& acc1, Vectorized<acc_t>& acc2, acc_t& tail1, acc_t& tail2) {
  using Vec = Vectorized<acc_t>;
  const Vec zero(0), vc1(c1), vnc1(-c1), vc2(c2), vnc2(-c2);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec vq = Vec::loadu(q + i);
    const Vec d1 = Vec::loadu(p1 + i) - vq, d2 = Vec::loadu(p2 + i) - vq;
    acc1 = acc1 + d1.abs();
    acc2 = acc2 + d2.abs();
    if constexpr (GRAD) {
      Vec::blendv(Vec::blendv(zero, vc1, d1 > zero), vnc1, d1 < zero).store(g1 + i);
      Vec::blendv(Vec::blendv(zero, vc2, d2 > zero), vnc2, d2 < zero).store(g2 + i);
    }
  }
  acc_t t1 = 0, t2 = 0;
  for (; i < n; ++i) {
    const acc_t d1 = p1[i] - q[i], d2 = p2[i] - q[i];
    t1 += std::abs(d1);
    t2 += std::abs(d2);
    if constexpr (GRAD) {
      g1[i] = d1 > 0 ? c1 : (d1 < 0 ? -c1 : acc_t(0));
      g2[i] = d2 > 0 ? c2 : (d2 < 0 ? -c2 : acc_t(0));
    }
  }
  tail1 += t1;
  tail2 += t2;
}

template <bool GRAD, typename scalar_t, typename acc_t>
void l1_chunk2(const scalar_t* p1, const scalar_t* p2, const scalar_t* q, scalar_t* g1, scalar_t* g2, int64_t begin,
               int64_t end, acc_t c1, acc_t c2, double& out1, double& out2) {
  constexpr bool same = std::is_same_v<scalar_t, acc_t>;
  alignas(64) acc_t pb1[same ? 1 : kSub];
  alignas(64) acc_t pb2[same ? 1 : kSub];
  alignas(64) acc_t qb[same ? 1 : kSub];
  double sum1 = 0, sum2 = 0;
  for (int64_t s = begin; s < end; s += kSub) {  // (block sums in fp64, each as l1_chunk's)
    const int64_t len = std::min(kSub, end - s);
    Vectorized<acc_t> acc1(0), acc2(0);
    acc_t tail1 = 0, tail2 = 0;
    if constexpr (same) {
      l1_block2<GRAD, acc_t>(p1 + s, p2 + s, q + s, GRAD ? g1 + s : nullptr, GRAD ? g2 + s : nullptr, len, c1, c2,
                             acc1, acc2, tail1, tail2);
    } else {
      at::vec::convert(p1 + s, pb1, len);
      at::vec::convert(p2 + s, pb2, len);
      at::vec::convert(q + s, qb, len);
      l1_block2<GRAD, acc_t>(pb1, pb2, qb, pb1, pb2, len, c1, c2, acc1, acc2, tail1, tail2);
      if constexpr (GRAD) {
        at::vec::convert(pb1, g1 + s, len);
        at::vec::convert(pb2, g2 + s, len);
      }
    }
    sum1 += static_cast<double>(hsum<acc_t>(acc1)) + static_cast<double>(tail1);
    sum2 += static_cast<double>(hsum<acc_t>(acc2)) + static_cast<double>(tail2);
  }
  out1 = sum1;
  out2 = sum2;
}

template <typename acc_t>
inline void sign_block(const acc_t* p, const acc_t* q, acc_t* g, int64_t n, acc_t c) {
  using Vec = Vectorized<acc_t>;
  const Vec zero(0), vc(c), vnc(-c);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec d = Vec::loadu(p + i) - Vec::loadu(q + i);
    Vec::blendv(Vec::blendv(zero, vc, d > zero), vnc, d < zero).store(g + i);
  }
  for (; i < n; ++i) {
    const acc_t d = p[i] - q[i];
    g[i] = d > 0 ? c : (d < 0 ? -c : acc_t(0));
  }
}

template <typename scalar_t, typename acc_t>
void sign_chunk(const scalar_t* p, const scalar_t* q, scalar_t* g, int64_t begin, int64_t end, acc_t c) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    sign_block<acc_t>(p + begin, q + begin, g + begin, end - begin, c);
  } else {
    alignas(64) acc_t pb[kSub];
    alignas(64) acc_t qb[kSub];
    for (int64_t s = begin; s < end; s += kSub) {
      const int64_t len = std::min(kSub, end - s);
      at::vec::convert(p + s, pb, len);
      at::vec::convert(q + s, qb, len);
      sign_block<acc_t>(pb, qb, pb, len, c);
      at::vec::convert(pb, g + s, len);
    }
  }
}

// ---------------------------------------------------------------- chunk bookkeeping
struct Chunks {
  std::vector<int64_t> first;  // first chunk index of each term; first[k] = total chunks
  explicit Chunks(const std::vector<int64_t>& numels) : first(numels.size() + 1, 0) {
    for (size_t i = 0; i < numels.size(); ++i) first[i + 1] = first[i] + (numels[i] + kChunk - 1) / kChunk;
  }
  int64_t total() const { return first.back(); }
  // term of a global chunk index (k is at most a handful: linear scan)
  int64_t term_of(int64_t c) const {
    int64_t i = 0;
    while (first[i + 1] <= c) ++i;
    return i;
  }
};

// checked, contiguous views of the inputs (a copy only for non-contiguous ones)
std::vector<at::Tensor> prepare(at::TensorList ts, const char* fn, const char* what, at::ScalarType dtype,
                                int64_t k) {
  TORCH_CHECK(static_cast<int64_t>(ts.size()) == k, fn, ": expected ", k, " ", what, ", got ", ts.size());
  std::vector<at::Tensor> out;
  out.reserve(k);
  for (const auto& t : ts) {
    TORCH_CHECK(t.device().is_cpu(), fn, ": ", what, " must be CPU tensors, got ", t.device());
    TORCH_CHECK(t.scalar_type() == dtype, fn, ": all ", what, " must have dtype ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.numel() > 0, fn, ": ", what, " must not be empty (the mean of an empty tensor is undefined)");
    out.push_back(t.contiguous());
  }
  return out;
}

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// terms[i] = scale[i] * (sum of term i's chunk partials), total = sum of terms; fixed order, in
// fp64, each rounded once to acc_t at the end
template <typename acc_t>
void finish(const std::vector<double>& partial, const Chunks& ch, const std::vector<acc_t>& scale, acc_t* total,
            acc_t* terms) {
  const int64_t k = static_cast<int64_t>(scale.size());
  double sum = 0;
  for (int64_t i = 0; i < k; ++i) {
    double s = 0;
    for (int64_t c = ch.first[i]; c < ch.first[i + 1]; ++c) s += partial[c];
    s *= static_cast<double>(scale[i]);
    if (terms != nullptr) terms[i] = static_cast<acc_t>(s);
    sum += s;
  }
  *total = static_cast<acc_t>(sum);
}

// ---------------------------------------------------------------- ops
std::tuple<at::Tensor, std::vector<at::Tensor>> adv_fwd(at::TensorList xs_in, at::IntArrayRef modes,
                                                        at::ArrayRef<double> targets, at::ArrayRef<double> scales,
                                                        bool want_grad) {
  const char* fn = "ganengine_C::losses_adv_fwd";
  const int64_t k = static_cast<int64_t>(xs_in.size());
  TORCH_CHECK(k >= 1, fn, ": needs at least one input");
  TORCH_CHECK(static_cast<int64_t>(modes.size()) == k && static_cast<int64_t>(targets.size()) == k &&
                  static_cast<int64_t>(scales.size()) == k,
              fn, ": modes, targets and scales need one entry per input");
  const auto dtype = xs_in[0].scalar_type();
  const auto xs = prepare(xs_in, fn, "inputs", dtype, k);
  std::vector<int64_t> numels;
  std::vector<at::Tensor> grads;
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(modes[i] >= BCE && modes[i] <= LINEAR, fn, ": unknown mode code ", modes[i]);
    numels.push_back(xs[i].numel());
    const bool g = want_grad && modes[i] != LINEAR;
    // a gradient not written is an empty tensor, as the CUDA op and the fake give it (the callers
    // take it as absent: numel() != x's). Not an undefined tensor: a Tensor[] output holding one
    // cannot cross into Python under a dispatch mode (FlopCounterMode raised on every call)
    grads.push_back(g ? at::empty(xs[i].sizes(), xs[i].options()) : at::empty({0}, xs[i].options()));
  }
  at::Tensor total = at::empty({}, xs[0].options().dtype(acc_type_of(dtype)));
  const Chunks ch(numels);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "losses_adv_fwd_cpu", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    std::vector<double> partial(ch.total());
    std::vector<acc_t> scale(k);
    for (int64_t i = 0; i < k; ++i)
      scale[i] = static_cast<acc_t>(modes[i] == LINEAR ? scales[i] * targets[i] : scales[i]);
    at::parallel_for(0, ch.total(), kGrain, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t i = ch.term_of(c);
        const int64_t b = (c - ch.first[i]) * kChunk, e = std::min(b + kChunk, numels[i]);
        const bool g = want_grad && modes[i] != LINEAR;  // (its gradient was allocated above)
        partial[c] = adv_chunk_dispatch<scalar_t, acc_t>(
            modes[i], g, xs[i].data_ptr<scalar_t>(), g ? grads[i].data_ptr<scalar_t>() : nullptr, b, e,
            static_cast<acc_t>(targets[i]), static_cast<acc_t>(scales[i]));
      }
    });
    finish<acc_t>(partial, ch, scale, total.data_ptr<acc_t>(), nullptr);
  });
  return {total, grads};
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> l1_fwd(at::TensorList preds_in, at::TensorList targets_in,
                                                                     at::ArrayRef<double> scales, bool want_grad) {
  const char* fn = "ganengine_C::losses_l1_fwd";
  const int64_t k = static_cast<int64_t>(preds_in.size());
  TORCH_CHECK(k >= 1 && static_cast<int64_t>(scales.size()) == k, fn, ": needs one scale per pair");
  const auto dtype = preds_in[0].scalar_type();
  const auto preds = prepare(preds_in, fn, "preds", dtype, k);
  const auto targets = prepare(targets_in, fn, "targets", dtype, k);
  std::vector<int64_t> numels;
  std::vector<at::Tensor> grads;
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(preds[i].sizes() == targets[i].sizes(), fn, ": pred ", i, " has shape ", preds[i].sizes(),
                " but its target has shape ", targets[i].sizes());
    numels.push_back(preds[i].numel());
    grads.push_back(want_grad ? at::empty(preds[i].sizes(), preds[i].options()) : at::empty({0}, preds[i].options()));
  }
  const auto acc = preds[0].options().dtype(acc_type_of(dtype));
  at::Tensor total = at::empty({}, acc), terms = at::empty({k}, acc);
  // work units: a term alone, or two terms sharing their target tensor (read once for both)
  std::vector<std::pair<int64_t, int64_t>> units;
  std::vector<int64_t> unit_numels;
  for (int64_t i = 0; i < k; ++i) {
    bool paired = false;
    for (auto& u : units) {
      if (u.second < 0 && targets[u.first].data_ptr() == targets[i].data_ptr() && numels[u.first] == numels[i]) {
        u.second = i;
        paired = true;
        break;
      }
    }
    if (!paired) {
      units.emplace_back(i, -1);
      unit_numels.push_back(numels[i]);
    }
  }
  const Chunks ch(numels);         // partial-sum layout per term (what finish() reads)
  const Chunks uch(unit_numels);   // the parallel work: chunks of units
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "losses_l1_fwd_cpu", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    std::vector<double> partial(ch.total());
    std::vector<acc_t> scale(scales.begin(), scales.end());
    auto gptr = [&](int64_t i) { return want_grad ? grads[i].data_ptr<scalar_t>() : nullptr; };
    at::parallel_for(0, uch.total(), kGrain, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t u = uch.term_of(c), lc = c - uch.first[u];
        const int64_t i = units[u].first, j = units[u].second;
        const int64_t b = lc * kChunk, e = std::min(b + kChunk, numels[i]);
        const scalar_t* q = targets[i].data_ptr<scalar_t>();
        if (j < 0) {
          const scalar_t* p = preds[i].data_ptr<scalar_t>();
          partial[ch.first[i] + lc] = want_grad ? l1_chunk<true, scalar_t, acc_t>(p, q, gptr(i), b, e, scale[i])
                                                : l1_chunk<false, scalar_t, acc_t>(p, q, nullptr, b, e, scale[i]);
        } else {
          const scalar_t* p1 = preds[i].data_ptr<scalar_t>();
          const scalar_t* p2 = preds[j].data_ptr<scalar_t>();
          double& o1 = partial[ch.first[i] + lc];
          double& o2 = partial[ch.first[j] + lc];
          if (want_grad) {
            l1_chunk2<true, scalar_t, acc_t>(p1, p2, q, gptr(i), gptr(j), b, e, scale[i], scale[j], o1, o2);
          } else {
            l1_chunk2<false, scalar_t, acc_t>(p1, p2, q, nullptr, nullptr, b, e, scale[i], scale[j], o1, o2);
          }
        }
      }
    });
    finish<acc_t>(partial, ch, scale, total.data_ptr<acc_t>(), terms.data_ptr<acc_t>());
  });
  return {total, terms, grads};
}

std::vector<at::Tensor> l1_bwd(at::TensorList preds_in, at::TensorList targets_in, const at::Tensor& coef_in) {
  const char* fn = "ganengine_C::losses_l1_bwd";
  const int64_t k = static_cast<int64_t>(preds_in.size());
  TORCH_CHECK(k >= 1 && coef_in.numel() == k, fn, ": coef needs one entry per pair");
  const auto dtype = preds_in[0].scalar_type();
  const auto preds = prepare(preds_in, fn, "preds", dtype, k);
  const auto targets = prepare(targets_in, fn, "targets", dtype, k);
  std::vector<int64_t> numels;
  std::vector<at::Tensor> grads;
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(preds[i].sizes() == targets[i].sizes(), fn, ": pred ", i, " and its target differ in shape");
    numels.push_back(preds[i].numel());
    grads.push_back(at::empty(preds[i].sizes(), preds[i].options()));
  }
  const Chunks ch(numels);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "losses_l1_bwd_cpu", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    at::Tensor coef = coef_in.to(at::kCPU, c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* cp = coef.data_ptr<acc_t>();
    at::parallel_for(0, ch.total(), kGrain, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t i = ch.term_of(c);
        const int64_t b = (c - ch.first[i]) * kChunk, e = std::min(b + kChunk, numels[i]);
        sign_chunk<scalar_t, acc_t>(preds[i].data_ptr<scalar_t>(), targets[i].data_ptr<scalar_t>(),
                                    grads[i].data_ptr<scalar_t>(), b, e, cp[i]);
      }
    });
  });
  return grads;
}

}  // namespace
}  // namespace losses_cpu
}  // namespace ganengine

TORCH_LIBRARY_FRAGMENT(ganengine_C, m) {
  m.def("losses_adv_fwd(Tensor[] xs, int[] modes, float[] targets, float[] scales, bool want_grad)"
        " -> (Tensor, Tensor[])");
  m.def("losses_l1_fwd(Tensor[] preds, Tensor[] targets, float[] scales, bool want_grad)"
        " -> (Tensor, Tensor, Tensor[])");
  m.def("losses_l1_bwd(Tensor[] preds, Tensor[] targets, Tensor coef) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(ganengine_C, CPU, m) {
  m.impl("losses_adv_fwd", &ganengine::losses_cpu::adv_fwd);
  m.impl("losses_l1_fwd", &ganengine::losses_cpu::l1_fwd);
  m.impl("losses_l1_bwd", &ganengine::losses_cpu::l1_bwd);
}
