// conv_act family, CPU: PatchGAN convolutions with fused epilogues.
//
// oneDNN's convolution (at::convolution) is far faster on this kind of CPU than anything
// hand-written here (it runs the 4x4 convs near the FMA peak), so the convolution stays
// theirs and we fuse everything around it:
//   conv_act_fwd      conv (bias fused by oneDNN) -> LeakyReLU in place, one pass
//   conv_act_bwd      one pass: g * (y > 0 ? 1 : slope) + per-channel bias gradient, then
//                     at::convolution_backward for dx / dw. Needs only the output's sign,
//                     so the output is what autograd saves (valid for slope >= 0). Its two
//                     halves are its overloads conv_act_bwd.act / .conv: the C++ entry's
//                     autograd drops the output between them, as eager's graph does.
//   conv_in_act_fwd   conv (no bias: instance norm cancels it exactly) -> per-(n, c)
//                     mean / rstd (two-pass, in cache) -> normalise + affine + act, one write
//   conv_in_act_bwd   per-(n, c) sums of dz and dz * xhat, then one pass writing dc, then
//                     at::convolution_backward
// Tensors are NCHW- or NHWC-dense (the Python layer guarantees it); the loops pick the order
// that walks memory contiguously for each layout.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "conv_gemm.h"
#include "conv_lean.h"
#include "act.h"
#include "vec_utils.h"

#include <algorithm>
#include <vector>

namespace {

// (N, C, HW) view of a dense 4-d tensor: element (n, c, p) is at n*sn + c*sc + p*sp.
struct Plane {
  int64_t N, C, HW, sn, sc, sp;
  bool nhwc() const { return sc == 1 && C > 1; }
};

Plane plane_of(const at::Tensor& t) {
  Plane p{t.size(0), t.size(1), t.size(2) * t.size(3), t.stride(0), t.stride(1), t.stride(3)};
  TORCH_CHECK(t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast),
              "ganengine conv_act: expected an NCHW- or NHWC-dense tensor");
  if (t.is_contiguous()) {
    p.sp = 1;
  } else {
    p.sc = 1;
    p.sp = p.C;
  }
  return p;
}

at::MemoryFormat format_of(const at::Tensor& t) {
  return ganengine::conv_common::out_format(t);  // (conv_lean.h: the conv families' one layout rule)
}

void check_conv_args(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                     at::IntArrayRef padding) {
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4, "ganengine conv_act: x and weight must be 4-d, got ",
              x.sizes(), " and ", w.sizes());
  TORCH_CHECK(w.size(1) == x.size(1), "ganengine conv_act: weight has ", w.size(1),
              " input channels, x has ", x.size(1));
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2,
              "ganengine conv_act: stride and padding must have 2 entries");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "ganengine conv_act: x is ", x.scalar_type(),
              " but weight is ", w.scalar_type());
}

at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                at::IntArrayRef stride, at::IntArrayRef padding) {
  std::vector<int64_t> outpad{0, 0};
  // (small output maps run as one GEMM, see conv_gemm.cpp)
  at::Tensor y = ganengine::conv_gemm::convolution(x, w, b, stride, padding, false, outpad);
  // oneDNN picks its layout from x and weight; keep the op's contract (x's layout)
  return y.contiguous(format_of(x));
}

// The loops below are written with at::vec::Vectorized: a data-dependent select in plain C++
// compiles (GCC, AVX2 without -ffast-math) to a scalar compare-and-branch, and with random
// signs that measured ~100x slower than the vector blend here (17 ms vs 0.17 ms for 1M floats).
// They run on float or double; fp16/bf16 tensors are widened to float around them (CPU fp16/bf16
// is a correctness path, not a speed target).
using at::vec::Vectorized;

using ganengine::cpu::hsum;

// the activation (leaky relu by its slope; slope 0: relu) and its gradient: act.h
using ganengine::cpu::slope_act;
using ganengine::cpu::slope_act_grad;

bool is_reduced(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

template <typename T>
void leaky_inplace(at::Tensor& y, double slope) {
  using Vec = Vectorized<T>;
  T* p = y.data_ptr<T>();
  const int64_t n = y.numel();
  const T s = static_cast<T>(slope);
  // (by value: read through captured references, p and s were reloaded after every store)
  at::parallel_for(0, n, 32768, [p, s](int64_t b, int64_t e) {
    const Vec vs(s);
    int64_t i = b;
    for (; i + Vec::size() <= e; i += Vec::size()) slope_act(Vec::loadu(p + i), vs).store(p + i);
    for (; i < e; ++i) p[i] = slope_act(p[i], s);
  });
}

// ----------------------------------------------------------------------------------- conv_act
at::Tensor conv_act_fwd(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                        at::IntArrayRef stride, at::IntArrayRef padding, double slope) {
  check_conv_args(x, w, stride, padding);
  at::Tensor y = conv(x, w, b, stride, padding);  // oneDNN adds the bias in its own epilogue
  if (is_reduced(y)) return at::leaky_relu_(y, slope);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "conv_act_fwd", [&] { leaky_inplace<scalar_t>(y, slope); });
  return y;
}

// The upstream gradient as act_grad reads it: either dense in y's layout (same strides), or
// Uniform, one value for every element (the stride-0 grad of `.sum()`), read in place: making it
// dense cost a full-size copy, and with gz a second full-size buffer per call, which glibc then
// returned to the kernel and faulted back in on every call (perf, DCGAN D's 16x64x32x32 output,
// 1 thread: half the op's time was page faults and unmapping).
template <typename T, bool Uniform>
struct GradIn {
  const T* p;
  at::vec::Vectorized<T> v;
  explicit GradIn(const T* data) : p(data), v(Uniform ? data[0] : T(0)) {}
  at::vec::Vectorized<T> vec(int64_t i) const { return Uniform ? v : at::vec::Vectorized<T>::loadu(p + i); }
  T at(int64_t i) const { return Uniform ? p[0] : p[i]; }
};

// gz = g * (y > 0 ? 1 : slope); db[c] = sum of gz over (n, p), in fixed-order partial sums.
// (The loops copy their pointers into locals: read through the lambda's captured references they
// were reloaded after every store.)
template <typename T, bool Uniform>
void act_grad(const T* g_data, const at::Tensor& y, at::Tensor& gz, at::Tensor& db, double slope) {
  using Vec = Vectorized<T>;
  const Plane P = plane_of(y);
  const GradIn<T, Uniform> gin(g_data);
  const T* yp = y.data_ptr<T>();
  T* op = gz.data_ptr<T>();
  const T s = static_cast<T>(slope);
  T* dbp = db.data_ptr<T>();
  if (!P.nhwc()) {
    // NCHW: per-(n, c) planes are contiguous; per-plane sums, reduced over n in order
    std::vector<T> part(P.N * P.C, T(0));
    T* partp = part.data();
    at::parallel_for(0, P.N * P.C, 1, [=](int64_t b, int64_t e) {
      const Vec vs(s);
      for (int64_t nc = b; nc < e; ++nc) {
        const int64_t base = (nc / P.C) * P.sn + (nc % P.C) * P.sc;
        const T* yq = yp + base;
        T* oq = op + base;
        Vec acc(T(0));
        int64_t i = 0;
        for (; i + Vec::size() <= P.HW; i += Vec::size()) {
          Vec v = slope_act_grad(gin.vec(base + i), Vec::loadu(yq + i), vs);
          v.store(oq + i);
          acc = acc + v;
        }
        T tail = 0;
        for (; i < P.HW; ++i) {
          const T v = slope_act_grad(gin.at(base + i), yq[i], s);
          oq[i] = v;
          tail += v;
        }
        partp[nc] = hsum(acc) + tail;
      }
    });
    for (int64_t c = 0; c < P.C; ++c) {
      T acc = 0;
      for (int64_t n = 0; n < P.N; ++n) acc += part[n * P.C + c];
      dbp[c] = acc;
    }
    return;
  }
  // NHWC: rows of C channels; fixed row chunks (independent of the thread count) keep the
  // bias-gradient sum deterministic.
  const int64_t rows = P.N * P.HW, C = P.C;
  const int64_t chunk = 256, nchunks = (rows + chunk - 1) / chunk;
  std::vector<T> part(nchunks * C, T(0));
  T* partp = part.data();
  at::parallel_for(0, nchunks, 1, [=](int64_t b, int64_t e) {
    const Vec vs(s);
    for (int64_t k = b; k < e; ++k) {
      T* acc = partp + k * C;
      const int64_t r1 = std::min(rows, (k + 1) * chunk);
      for (int64_t r = k * chunk; r < r1; ++r) {
        const int64_t base = r * C;
        const T* yq = yp + base;
        T* oq = op + base;
        int64_t c = 0;
        for (; c + Vec::size() <= C; c += Vec::size()) {
          Vec v = slope_act_grad(gin.vec(base + c), Vec::loadu(yq + c), vs);
          v.store(oq + c);
          (Vec::loadu(acc + c) + v).store(acc + c);
        }
        for (; c < C; ++c) {
          const T v = slope_act_grad(gin.at(base + c), yq[c], s);
          oq[c] = v;
          acc[c] += v;
        }
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) dbp[c] = 0;
  for (int64_t k = 0; k < nchunks; ++k)
    for (int64_t c = 0; c < C; ++c) dbp[c] += part[k * C + c];
}

// every element the same one (each dim of more than one element has stride 0: an expanded scalar)
bool uniform_grad(const at::Tensor& g) {
  if (g.numel() == 0) return false;
  for (int64_t d = 0; d < g.dim(); ++d)
    if (g.size(d) > 1 && g.stride(d) != 0) return false;
  return true;
}

// A grad as the backward kernels read it, in the working dtype `work`: a stride-0 one (from .sum())
// as its one value (GradIn's Uniform form: `uniform` says which), else dense in `fmt`
at::Tensor grad_in(const at::Tensor& grad, at::ScalarType work, at::MemoryFormat fmt, bool uniform) {
  if (!uniform) return grad.to(work).contiguous(fmt);
  return grad.scalar_type() == work ? grad : grad.as_strided({1}, {1}).to(work);
}

// conv_act_bwd's two halves, also its overloads conv_act_bwd.act / .conv, for the C++
// entry's autograd (conv_act_autograd.cpp), which drops the saved output and the incoming grad
// between them, before the convolution's backward runs, as eager's graph frees LeakyReLU's.
//
// The activation's half: gz = grad * (y > 0 ? 1 : slope) in y's layout and dtype, and with `bias`
// the bias gradient db (sum of gz per channel, y's dtype; else an empty (0,) tensor).
std::tuple<at::Tensor, at::Tensor> act_half(const at::Tensor& grad, const at::Tensor& y, double slope, bool bias) {
  const auto fmt = format_of(y);
  const bool reduced = is_reduced(y);
  const auto work = reduced ? at::kFloat : y.scalar_type();
  const bool uniform = uniform_grad(grad);
  at::Tensor g = grad_in(grad, work, fmt, uniform);
  at::Tensor yd = y.to(work).contiguous(fmt);
  at::Tensor gz = at::empty_like(yd, yd.options(), fmt);
  at::Tensor db = at::empty({y.size(1)}, yd.options());
  AT_DISPATCH_FLOATING_TYPES(work, "conv_act_bwd", [&] {
    if (uniform)
      act_grad<scalar_t, true>(g.data_ptr<scalar_t>(), yd, gz, db, slope);
    else
      act_grad<scalar_t, false>(g.data_ptr<scalar_t>(), yd, gz, db, slope);
  });
  if (reduced) gz = gz.to(y.scalar_type());
  return {gz, bias ? db.to(y.scalar_type()) : at::empty({0}, y.options())};
}

// The convolution's half: dx, dw from gz (empty (0,) tensors where not asked), in x's / w's layout.
std::tuple<at::Tensor, at::Tensor> conv_half(const at::Tensor& gz, const at::Tensor& x, const at::Tensor& w,
                                             at::IntArrayRef stride, at::IntArrayRef padding, bool m0, bool m1) {
  std::vector<int64_t> outpad{0, 0};
  at::Tensor dx, dw;
  if (m0 || m1) {
    auto r = ganengine::conv_gemm::convolution_backward(gz, x, w, stride, padding, false, outpad, {m0, m1, false});
    dx = std::get<0>(r);
    dw = std::get<1>(r);
  }
  dx = dx.defined() ? dx.contiguous(format_of(x)) : at::empty({0}, x.options());
  dw = dw.defined() ? dw.contiguous(format_of(w)) : at::empty({0}, w.options());
  return {dx, dw};
}

void check_act_grad_args(const at::Tensor& grad, const at::Tensor& y, const char* fn) {
  TORCH_CHECK(y.dim() == 4, "ganengine ", fn, ": the output y must be 4-d, got ", y.sizes());
  TORCH_CHECK(grad.sizes() == y.sizes(), "ganengine ", fn, ": grad has shape ", grad.sizes(),
              " but the output has ", y.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_act_bwd(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, const at::Tensor& y,
    at::IntArrayRef stride, at::IntArrayRef padding, double slope, c10::List<bool> mask) {
  check_conv_args(x, w, stride, padding);
  TORCH_CHECK(mask.size() == 3, "ganengine conv_act_bwd: output mask must have 3 entries");
  check_act_grad_args(grad, y, "conv_act_bwd");
  auto [gz, db] = act_half(grad, y, slope, mask[2]);
  auto [dx, dw] = conv_half(gz, x, w, stride, padding, mask[0], mask[1]);
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor> conv_act_bwd_act(const at::Tensor& grad, const at::Tensor& y, double slope,
                                                    bool bias) {
  check_act_grad_args(grad, y, "conv_act_bwd.act");
  return act_half(grad, y, slope, bias);
}

std::tuple<at::Tensor, at::Tensor> conv_act_bwd_conv(const at::Tensor& gz, const at::Tensor& x, const at::Tensor& w,
                                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                                     c10::List<bool> mask) {
  check_conv_args(x, w, stride, padding);
  TORCH_CHECK(mask.size() == 2, "ganengine conv_act_bwd.conv: output mask must have 2 entries (dx, dw)");
  TORCH_CHECK(gz.dim() == 4 && gz.size(0) == x.size(0) && gz.size(1) == w.size(0),
              "ganengine conv_act_bwd.conv: gz has shape ", gz.sizes(), ", not the output's of x ", x.sizes(),
              " and weight ", w.sizes());
  return conv_half(gz, x, w, stride, padding, mask[0], mask[1]);
}

// ------------------------------------------------------------------------ conv + instance norm
// Per (n, c): mean, then M2 around it (two passes over data still in cache), then
// y = act(c * a + k) with a = rstd * gamma, k = beta - mean * a. gamma/beta may be undefined.
template <typename T>
std::vector<T> channel_param(const at::Tensor& t, int64_t C, T fill) {
  std::vector<T> out(C, fill);
  if (t.defined()) {
    auto tf = t.to(c10::CppTypeToScalarType<T>::value).contiguous();
    std::copy(tf.template data_ptr<T>(), tf.template data_ptr<T>() + C, out.begin());
  }
  return out;
}

template <typename T>
void in_act_forward(const at::Tensor& c, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd,
                    const at::Tensor& gamma, const at::Tensor& beta, double eps, double slope) {
  using Vec = Vectorized<T>;
  const Plane P = plane_of(c);
  const T* cp = c.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  T* mp = mean.data_ptr<T>();
  T* rp = rstd.data_ptr<T>();
  const std::vector<T> g = channel_param<T>(gamma, P.C, T(1)), bt = channel_param<T>(beta, P.C, T(0));
  const T s = static_cast<T>(slope), inv = T(1) / static_cast<T>(P.HW);
  const Vec vs(s);
  if (!P.nhwc()) {
    at::parallel_for(0, P.N * P.C, 1, [&](int64_t b, int64_t e) {
      for (int64_t nc = b; nc < e; ++nc) {
        const int64_t ch = nc % P.C;
        const T* src = cp + (nc / P.C) * P.sn + ch * P.sc;
        T* dst = yp + (nc / P.C) * P.sn + ch * P.sc;
        Vec acc(T(0));
        int64_t i = 0;
        for (; i + Vec::size() <= P.HW; i += Vec::size()) acc = acc + Vec::loadu(src + i);
        T sum = hsum(acc);
        for (; i < P.HW; ++i) sum += src[i];
        const T m = sum * inv;
        Vec q(T(0));
        i = 0;
        for (; i + Vec::size() <= P.HW; i += Vec::size()) {
          const Vec d = Vec::loadu(src + i) - Vec(m);
          q = at::vec::fmadd(d, d, q);
        }
        T m2 = hsum(q);
        for (; i < P.HW; ++i) m2 += (src[i] - m) * (src[i] - m);
        const T r = ganengine::cpu::inv_std<T>(m2 * inv, eps);
        mp[nc] = m;
        rp[nc] = r;
        // the centred form, as the backward recomputes it (its activation mask then agrees with
        // this sign bitwise): x * a + (b - m * a) cancels for a large mean / std (one pixel: noise
        // scaled by 1 / sqrt(eps) where (x - m) is exactly 0)
        const T gm = g[ch], bb = bt[ch];
        i = 0;
        for (; i + Vec::size() <= P.HW; i += Vec::size()) {
          const Vec xh = (Vec::loadu(src + i) - Vec(m)) * Vec(r);
          slope_act(at::vec::fmadd(xh, Vec(gm), Vec(bb)), vs).store(dst + i);
        }
        for (; i < P.HW; ++i) dst[i] = slope_act((src[i] - m) * r * gm + bb, s);
      }
    });
    return;
  }
  // NHWC: one task per (n, block of channels), walking the rows of that image
  const int64_t CB = 64, nb = (P.C + CB - 1) / CB;
  at::parallel_for(0, P.N * nb, 1, [&](int64_t b, int64_t e) {
    alignas(64) T sum[CB], m2[CB], r[CB], gm[CB], bb[CB];
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / nb, c0 = (t % nb) * CB, cn = std::min(CB, P.C - c0);
      const int64_t cv = cn - cn % Vec::size();  // vectorised part of the block
      const T* src = cp + n * P.sn + c0;
      T* dst = yp + n * P.sn + c0;
      for (int64_t j = 0; j < cn; ++j) sum[j] = m2[j] = 0;
      for (int64_t i = 0; i < P.HW; ++i) {
        const T* row = src + i * P.C;
        for (int64_t j = 0; j < cv; j += Vec::size()) (Vec::loadu(sum + j) + Vec::loadu(row + j)).store(sum + j);
        for (int64_t j = cv; j < cn; ++j) sum[j] += row[j];
      }
      for (int64_t j = 0; j < cn; ++j) sum[j] *= inv;  // now the mean
      for (int64_t i = 0; i < P.HW; ++i) {
        const T* row = src + i * P.C;
        for (int64_t j = 0; j < cv; j += Vec::size()) {
          const Vec d = Vec::loadu(row + j) - Vec::loadu(sum + j);
          at::vec::fmadd(d, d, Vec::loadu(m2 + j)).store(m2 + j);
        }
        for (int64_t j = cv; j < cn; ++j) m2[j] += (row[j] - sum[j]) * (row[j] - sum[j]);
      }
      for (int64_t j = 0; j < cn; ++j) {
        r[j] = ganengine::cpu::inv_std<T>(m2[j] * inv, eps);
        mp[n * P.C + c0 + j] = sum[j];
        rp[n * P.C + c0 + j] = r[j];
        gm[j] = g[c0 + j];
        bb[j] = bt[c0 + j];
      }
      for (int64_t i = 0; i < P.HW; ++i) {  // (the centred form, as the NCHW branch above)
        const T* row = src + i * P.C;
        T* out = dst + i * P.C;
        for (int64_t j = 0; j < cv; j += Vec::size()) {
          const Vec xh = (Vec::loadu(row + j) - Vec::loadu(sum + j)) * Vec::loadu(r + j);
          slope_act(at::vec::fmadd(xh, Vec::loadu(gm + j), Vec::loadu(bb + j)), vs).store(out + j);
        }
        for (int64_t j = cv; j < cn; ++j) out[j] = slope_act((row[j] - sum[j]) * r[j] * gm[j] + bb[j], s);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_in_act_fwd(
    const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& gamma,
    const c10::optional<at::Tensor>& beta, at::IntArrayRef stride, at::IntArrayRef padding, double eps,
    double slope) {
  check_conv_args(x, w, stride, padding);
  at::Tensor c = conv(x, w, c10::nullopt, stride, padding);
  const auto fmt = format_of(c);
  const bool reduced = is_reduced(c);
  at::Tensor cw = reduced ? c.to(at::kFloat).contiguous(fmt) : c;
  at::Tensor y = at::empty_like(cw, cw.options(), fmt);
  at::Tensor mean = at::empty({c.size(0), c.size(1)}, cw.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor rstd = at::empty_like(mean);
  const at::Tensor g = gamma.has_value() ? *gamma : at::Tensor();
  const at::Tensor bt = beta.has_value() ? *beta : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(cw.scalar_type(), "conv_in_act_fwd", [&] {
    in_act_forward<scalar_t>(cw, y, mean, rstd, g, bt, eps, slope);
  });
  if (reduced) y = y.to(c.scalar_type()).contiguous(fmt);
  return {y, c, mean, rstd};
}

// dz = g * (z > 0 ? 1 : slope), z = xhat * gamma + beta; per (n, c): A = sum dz, B = sum dz*xhat;
// dc = rstd * gamma * (dz - A / HW - xhat * B / HW). Writes dc and A, B as (N, C). The grad is read
// through GradIn (a stride-0 grad in place, as conv_act's backward reads it).
template <typename T, bool Uniform>
void in_act_backward(const T* g_data, const at::Tensor& c, const at::Tensor& mean,
                     const at::Tensor& rstd, const at::Tensor& gamma, const at::Tensor& beta,
                     at::Tensor& dc, at::Tensor& A, at::Tensor& B, double slope) {
  using Vec = Vectorized<T>;
  const Plane P = plane_of(c);
  const GradIn<T, Uniform> gin(g_data);
  const T* cp = c.data_ptr<T>();
  T* dp = dc.data_ptr<T>();
  const T* mp = mean.data_ptr<T>();
  const T* rp = rstd.data_ptr<T>();
  T* Ap = A.data_ptr<T>();
  T* Bp = B.data_ptr<T>();
  const std::vector<T> g = channel_param<T>(gamma, P.C, T(1)), bt = channel_param<T>(beta, P.C, T(0));
  const T s = static_cast<T>(slope), inv = T(1) / static_cast<T>(P.HW);
  const Vec vs(s);
  if (!P.nhwc()) {
    at::parallel_for(0, P.N * P.C, 1, [&, gin](int64_t b, int64_t e) {  // (gin by value: kept in registers)
      for (int64_t nc = b; nc < e; ++nc) {
        const int64_t ch = nc % P.C, base = (nc / P.C) * P.sn + ch * P.sc;
        const T m = mp[nc], r = rp[nc], gm = g[ch], bb = bt[ch];
        const T* cs = cp + base;
        Vec va(T(0)), vb(T(0));
        T sa = 0, sb = 0;
        int64_t i = 0;
        for (; i + Vec::size() <= P.HW; i += Vec::size()) {
          const Vec xh = (Vec::loadu(cs + i) - Vec(m)) * Vec(r);
          const Vec d = slope_act_grad(gin.vec(base + i), at::vec::fmadd(xh, Vec(gm), Vec(bb)), vs);
          va = va + d;
          vb = at::vec::fmadd(d, xh, vb);
        }
        for (; i < P.HW; ++i) {
          const T xh = (cs[i] - m) * r;
          const T d = slope_act_grad(gin.at(base + i), xh * gm + bb, s);
          sa += d;
          sb += d * xh;
        }
        sa += hsum(va);
        sb += hsum(vb);
        Ap[nc] = sa;
        Bp[nc] = sb;
        const T k = r * gm, ma = sa * inv, mb = sb * inv;
        i = 0;
        for (; i + Vec::size() <= P.HW; i += Vec::size()) {
          const Vec xh = (Vec::loadu(cs + i) - Vec(m)) * Vec(r);
          const Vec d = slope_act_grad(gin.vec(base + i), at::vec::fmadd(xh, Vec(gm), Vec(bb)), vs);
          (Vec(k) * (d - Vec(ma) - xh * Vec(mb))).store(dp + base + i);
        }
        for (; i < P.HW; ++i) {
          const T xh = (cs[i] - m) * r;
          const T d = slope_act_grad(gin.at(base + i), xh * gm + bb, s);
          dp[base + i] = k * (d - ma - xh * mb);
        }
      }
    });
    return;
  }
  const int64_t CB = 64, nb = (P.C + CB - 1) / CB;
  at::parallel_for(0, P.N * nb, 1, [&, gin](int64_t b, int64_t e) {
    alignas(64) T sa[CB], sb[CB], m[CB], r[CB], gm[CB], bb[CB], k[CB];
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / nb, c0 = (t % nb) * CB, cn = std::min(CB, P.C - c0);
      const int64_t cv = cn - cn % Vec::size();
      const int64_t off = n * P.sn + c0;
      for (int64_t j = 0; j < cn; ++j) {
        sa[j] = sb[j] = 0;
        m[j] = mp[n * P.C + c0 + j];
        r[j] = rp[n * P.C + c0 + j];
        gm[j] = g[c0 + j];
        bb[j] = bt[c0 + j];
      }
      for (int64_t i = 0; i < P.HW; ++i) {
        const T* cs = cp + off + i * P.C;
        const int64_t gi = off + i * P.C;  // (the grad's index of this row)
        for (int64_t j = 0; j < cv; j += Vec::size()) {
          const Vec xh = (Vec::loadu(cs + j) - Vec::loadu(m + j)) * Vec::loadu(r + j);
          const Vec d = slope_act_grad(gin.vec(gi + j), at::vec::fmadd(xh, Vec::loadu(gm + j), Vec::loadu(bb + j)), vs);
          (Vec::loadu(sa + j) + d).store(sa + j);
          at::vec::fmadd(d, xh, Vec::loadu(sb + j)).store(sb + j);
        }
        for (int64_t j = cv; j < cn; ++j) {
          const T xh = (cs[j] - m[j]) * r[j];
          const T d = slope_act_grad(gin.at(gi + j), xh * gm[j] + bb[j], s);
          sa[j] += d;
          sb[j] += d * xh;
        }
      }
      for (int64_t j = 0; j < cn; ++j) {
        Ap[n * P.C + c0 + j] = sa[j];
        Bp[n * P.C + c0 + j] = sb[j];
        k[j] = r[j] * gm[j];
        sa[j] *= inv;  // now the means of dz and dz * xhat
        sb[j] *= inv;
      }
      for (int64_t i = 0; i < P.HW; ++i) {
        const T* cs = cp + off + i * P.C;
        const int64_t gi = off + i * P.C;
        T* ds = dp + off + i * P.C;
        for (int64_t j = 0; j < cv; j += Vec::size()) {
          const Vec xh = (Vec::loadu(cs + j) - Vec::loadu(m + j)) * Vec::loadu(r + j);
          const Vec d = slope_act_grad(gin.vec(gi + j), at::vec::fmadd(xh, Vec::loadu(gm + j), Vec::loadu(bb + j)), vs);
          (Vec::loadu(k + j) * (d - Vec::loadu(sa + j) - xh * Vec::loadu(sb + j))).store(ds + j);
        }
        for (int64_t j = cv; j < cn; ++j) {
          const T xh = (cs[j] - m[j]) * r[j];
          const T d = slope_act_grad(gin.at(gi + j), xh * gm[j] + bb[j], s);
          ds[j] = k[j] * (d - sa[j] - xh * sb[j]);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_in_act_bwd(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, const at::Tensor& c,
    const at::Tensor& mean, const at::Tensor& rstd, const c10::optional<at::Tensor>& gamma,
    const c10::optional<at::Tensor>& beta, at::IntArrayRef stride, at::IntArrayRef padding,
    double slope, c10::List<bool> mask) {
  check_conv_args(x, w, stride, padding);
  TORCH_CHECK(mask.size() == 2, "ganengine conv_in_act_bwd: output mask must have 2 entries");
  const bool m0 = mask[0], m1 = mask[1];
  TORCH_CHECK(grad.sizes() == c.sizes(), "ganengine conv_in_act_bwd: grad has shape ", grad.sizes(),
              " but the output has ", c.sizes());
  const auto fmt = format_of(c);
  const bool reduced = is_reduced(c);
  const auto work = reduced ? at::kFloat : c.scalar_type();
  const bool uniform = uniform_grad(grad);  // (read in place: GradIn)
  at::Tensor g = grad_in(grad, work, fmt, uniform);
  at::Tensor cd = c.to(work).contiguous(fmt);
  at::Tensor mw = mean.to(work).contiguous(), rw = rstd.to(work).contiguous();
  at::Tensor dc = at::empty_like(cd, cd.options(), fmt);
  at::Tensor A = at::empty_like(mw), B = at::empty_like(mw);
  const at::Tensor gm = gamma.has_value() ? *gamma : at::Tensor();
  const at::Tensor bt = beta.has_value() ? *beta : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(work, "conv_in_act_bwd", [&] {
    if (uniform)
      in_act_backward<scalar_t, true>(g.data_ptr<scalar_t>(), cd, mw, rw, gm, bt, dc, A, B, slope);
    else
      in_act_backward<scalar_t, false>(g.data_ptr<scalar_t>(), cd, mw, rw, gm, bt, dc, A, B, slope);
  });
  if (reduced) dc = dc.to(c.scalar_type()).contiguous(fmt);
  std::vector<int64_t> outpad{0, 0};
  at::Tensor dx, dw;
  if (m0 || m1) {
    auto r = ganengine::conv_gemm::convolution_backward(dc, x, w, stride, padding, false, outpad, {m0, m1, false});
    dx = std::get<0>(r);
    dw = std::get<1>(r);
  }
  dx = dx.defined() ? dx.contiguous(format_of(x)) : at::empty({0}, x.options());
  dw = dw.defined() ? dw.contiguous(format_of(w)) : at::empty({0}, w.options());
  // per-channel affine gradients: dgamma = sum_n B, dbeta = sum_n A (fixed order); an absent
  // gamma's / beta's is an empty tensor (0,), as an unwanted dx / dw
  const auto affine_grad = [&](const at::Tensor& partial, bool present) {
    return present ? partial.sum(0).to(mean.scalar_type()) : at::empty({0}, mean.options());
  };
  return {dx, dw, affine_grad(B, gm.defined()), affine_grad(A, bt.defined())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ganengine_C, m) {
  m.def("conv_act_fwd(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, float slope) -> Tensor");
  m.def("conv_act_bwd(Tensor grad, Tensor x, Tensor weight, Tensor y, int[] stride, int[] padding, "
        "float slope, bool[] mask) -> (Tensor, Tensor, Tensor)");
  m.def("conv_act_bwd.act(Tensor grad, Tensor y, float slope, bool bias) -> (Tensor, Tensor)");
  m.def("conv_act_bwd.conv(Tensor gz, Tensor x, Tensor weight, int[] stride, int[] padding, bool[] mask) "
        "-> (Tensor, Tensor)");
  m.def("conv_in_act_fwd(Tensor x, Tensor weight, Tensor? gamma, Tensor? beta, int[] stride, "
        "int[] padding, float eps, float slope) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("conv_in_act_bwd(Tensor grad, Tensor x, Tensor weight, Tensor c, Tensor mean, Tensor rstd, "
        "Tensor? gamma, Tensor? beta, int[] stride, int[] padding, float slope, bool[] mask) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ganengine_C, CPU, m) {
  m.impl("conv_act_fwd", &conv_act_fwd);
  m.impl("conv_act_bwd", &conv_act_bwd);
  m.impl("conv_act_bwd.act", &conv_act_bwd_act);
  m.impl("conv_act_bwd.conv", &conv_act_bwd_conv);
  m.impl("conv_in_act_fwd", &conv_in_act_fwd);
  m.impl("conv_in_act_bwd", &conv_in_act_bwd);
}
