// Fused instance norm + activation, CPU kernels (forward and backward).
//
// NCHW-dense input: one task per (n, c) plane. The plane is read from memory once: the mean
// pass brings it into cache, the centred M2 pass (corrected two-pass variance, no E[x^2]-E[x]^2)
// and the apply pass re-read it from cache. fp16/bf16 planes are converted once into a
// thread-local fp32 buffer; planes shorter than two vectors go a run of planes per task, V planes
// at a time in the lanes of a vector (fwd_nchw_tiny). NHWC-dense input: per image, rows of C channels are processed in
// chunks of about 32 KB (per-chunk exact mean/M2, merged per image with Chan's formula in a
// fixed order, so results do not depend on the thread count), vectorised along C.
//
// Activation: z = (x - mean) * rstd * w + b; y = z > 0 ? z : slope * z (relu: slope 0).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "stats_fp64.h"
#include "act.h"
#include "vec_utils.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace ganengine {
namespace {

using at::vec::Vectorized;

using cpu::AccOf;
using cpu::hsum;
using cpu::inv_std;

// the activation (leaky relu by its slope; slope 0: relu) and its gradient: act.h
template <typename acc_t>
inline Vectorized<acc_t> activate(const Vectorized<acc_t>& z, const Vectorized<acc_t>& slope, bool act) {
  return act ? cpu::slope_act(z, slope) : z;
}

template <typename acc_t>
inline acc_t activate(acc_t z, acc_t slope, bool act) {
  return act ? cpu::slope_act(z, slope) : z;
}

using cpu::slope_act_grad;

// Gives an acc_t view of n elements: the data itself for fp32/fp64, else a converted copy.
template <typename scalar_t, typename acc_t>
inline const acc_t* as_acc(const scalar_t* src, int64_t n, std::vector<acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    buf.resize(n);
    at::vec::convert(src, buf.data(), n);
    return buf.data();
  }
}

template <typename scalar_t, typename acc_t>
inline void store_from_acc(const acc_t* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

// mean and M2 of n contiguous values (two passes over data in cache), corrected two-pass: the
// second pass also sums d = x - mean, which moves the mean onto the data's own (a large mean with
// a small spread: the plain sum's rounding would otherwise shift every normalised value) and
// takes (sum d)^2 / n off M2. A constant plane gets its value back exactly (d = x - mean is
// exact there) and M2 = 0.
template <typename acc_t>
void contiguous_stats(const acc_t* x, int64_t n, acc_t& mean, acc_t& m2) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec s0(0), s1(0);
  int64_t i = 0;
  for (; i + 2 * V <= n; i += 2 * V) {
    s0 += Vec::loadu(x + i);
    s1 += Vec::loadu(x + i + V);
  }
  acc_t s = hsum<acc_t>(s0 + s1);
  for (; i < n; ++i) s += x[i];
  mean = s / static_cast<acc_t>(n);
  const Vec vm(mean);
  Vec q0(0), q1(0), e0(0), e1(0);
  i = 0;
  for (; i + 2 * V <= n; i += 2 * V) {
    Vec d0 = Vec::loadu(x + i) - vm, d1 = Vec::loadu(x + i + V) - vm;
    q0 = at::vec::fmadd(d0, d0, q0);
    q1 = at::vec::fmadd(d1, d1, q1);
    e0 += d0;
    e1 += d1;
  }
  acc_t q = hsum<acc_t>(q0 + q1), e = hsum<acc_t>(e0 + e1);
  for (; i < n; ++i) {
    const acc_t d = x[i] - mean;
    q += d * d;
    e += d;
  }
  const acc_t shift = e / static_cast<acc_t>(n);
  mean += shift;
  m2 = std::max(q - e * shift, acc_t(0));
  if (!(q == q) || !(e == e)) m2 = q + e;  // keep a NaN / inf (max() above would not)
}

// y = act((x - mean) * scale + shift) over n contiguous values
template <typename acc_t>
inline void apply_contiguous(const acc_t* x, acc_t* y, int64_t n, acc_t mean, acc_t scale, acc_t shift,
                             bool act, acc_t slope) {
  using Vec = Vectorized<acc_t>;
  const Vec vm(mean), vs(scale), vb(shift), vsl(slope);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec z = at::vec::fmadd(Vec::loadu(x + i) - vm, vs, vb);
    activate(z, vsl, act).store(y + i);
  }
  for (; i < n; ++i) y[i] = activate<acc_t>((x[i] - mean) * scale + shift, slope, act);
}

struct Params {
  int64_t N, C, HW;
  bool act;
  double slope, eps;
};

template <typename acc_t>
std::vector<acc_t> param_vector(const c10::optional<at::Tensor>& t, int64_t C, acc_t fill) {
  std::vector<acc_t> v(C, fill);
  if (t.has_value() && t->defined()) {
    auto tc = t->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    std::copy(tc.template data_ptr<acc_t>(), tc.template data_ptr<acc_t>() + C, v.begin());
  }
  return v;
}

// ------------------------------------------------------------------ forward, NCHW
template <typename scalar_t, typename acc_t>
void fwd_nchw(const scalar_t* x, scalar_t* y, const acc_t* w, const acc_t* b, acc_t* mean_out,
              acc_t* rstd_out, const Params& p) {
  at::parallel_for(0, p.N * p.C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf, ybuf;
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % p.C;
      const acc_t* xp = as_acc<scalar_t, acc_t>(x + plane * p.HW, p.HW, xbuf);
      acc_t mean, m2;
      contiguous_stats(xp, p.HW, mean, m2);
      if (cpu::stats_overflowed(mean, m2)) {  // redo in double, M2 rounded to fp32 (eager's rule)
        double md, qd;
        cpu::stats_double(xp, 1, 0, p.HW, 1, md, qd);
        mean = static_cast<acc_t>(md);
        m2 = static_cast<acc_t>(qd);
      }
      const acc_t rstd = inv_std<acc_t>(m2 / p.HW, p.eps);
      mean_out[plane] = mean;
      rstd_out[plane] = rstd;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        apply_contiguous(xp, y + plane * p.HW, p.HW, mean, rstd * w[c], b[c], p.act, acc_t(p.slope));
      } else {
        ybuf.resize(p.HW);
        apply_contiguous(xp, ybuf.data(), p.HW, mean, rstd * w[c], b[c], p.act, acc_t(p.slope));
        store_from_acc(ybuf.data(), y + plane * p.HW, p.HW);
      }
    }
  });
}

// ------------------------------------------------------------------ tiny NCHW planes
// Planes shorter than two vectors (2x2, 3x3 maps: a U-Net's innermost levels) leave the vector
// loops above empty, and a task per plane paid hsum()s of zero vectors, a buffer and the loop
// set-up for a handful of elements (~2.5x eager's time on many 2x2 planes; plain scalar loops per
// plane were still ~2x: every plane's chain of adds, divisions and the sqrt waits on the last).
// Here a task takes a run of planes, and each group of V planes (V = Vec::size()) is transposed
// into HW vectors of V lanes, one plane per lane, so every step runs once for V planes: the same
// corrected two-pass statistics as contiguous_stats (sum of x, then of d = x - mean and d^2, mean
// shifted by mean(d)), in acc_t. Lanes past the run's end hold zeros and are not stored.
template <typename acc_t>
inline bool tiny_planes(int64_t HW) {
  return HW < 2 * Vectorized<acc_t>::size();
}

// planes per task: about 16K elements, so small calls stay on one thread
inline int64_t tiny_grain(int64_t HW) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(HW, 1)); }

// planes per conversion block (fp16/bf16): a few KB of acc_t
inline int64_t tiny_block(int64_t HW) { return std::max<int64_t>(1, 1024 / std::max<int64_t>(HW, 1)); }

template <typename scalar_t, typename acc_t, typename F>
inline void for_tiny_blocks(int64_t begin, int64_t end, int64_t HW, F&& f) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    f(begin, end);
  } else {
    const int64_t B = tiny_block(HW);
    for (int64_t p0 = begin; p0 < end; p0 += B) f(p0, std::min(end, p0 + B));
  }
}

// nv (<= V) planes of HW values at src -> dst[i * V + lane] (zeros past nv), and back
template <typename acc_t>
inline void to_lanes(const acc_t* src, int64_t nv, int64_t HW, acc_t* dst) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  if (nv < V) std::fill(dst, dst + HW * V, acc_t(0));
  for (int64_t j = 0; j < nv; ++j)
    for (int64_t i = 0; i < HW; ++i) dst[i * V + j] = src[j * HW + i];
}

template <typename acc_t>
inline void from_lanes(const acc_t* src, int64_t nv, int64_t HW, acc_t* dst) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  for (int64_t j = 0; j < nv; ++j)
    for (int64_t i = 0; i < HW; ++i) dst[j * HW + i] = src[i * V + j];
}

// the (per-lane) weight and bias of planes p0 .. p0 + nv
template <typename acc_t>
inline void lane_params(const acc_t* w, const acc_t* b, int64_t p0, int64_t nv, int64_t C, acc_t* wl, acc_t* bl) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  int64_t c = p0 % C;
  for (int64_t j = 0; j < V; ++j) {
    wl[j] = j < nv ? w[c] : acc_t(0);
    bl[j] = j < nv ? b[c] : acc_t(0);
    if (++c == C) c = 0;
  }
}

template <typename scalar_t, typename acc_t>
void fwd_nchw_tiny(const scalar_t* x, scalar_t* y, const acc_t* w, const acc_t* b, acc_t* mean_out,
                   acc_t* rstd_out, const Params& p) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t HW = p.HW;
  const Vec L(static_cast<acc_t>(HW)), zero(acc_t(0)), one(acc_t(1)), veps(static_cast<acc_t>(p.eps));
  const Vec vsl(static_cast<acc_t>(p.slope));
  at::parallel_for(0, p.N * p.C, tiny_grain(HW), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf, ybuf;
    alignas(64) acc_t xt[2 * V * V], yt[2 * V * V], wl[V], bl[V], ml[V], ql[V], rl[V];
    for_tiny_blocks<scalar_t, acc_t>(begin, end, HW, [&](int64_t p0, int64_t p1) {
      const acc_t* xs = as_acc<scalar_t, acc_t>(x + p0 * HW, (p1 - p0) * HW, xbuf);
      acc_t* ys;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        ys = y + p0 * HW;
      } else {
        ybuf.resize((p1 - p0) * HW);
        ys = ybuf.data();
      }
      for (int64_t q0 = p0; q0 < p1; q0 += V) {
        const int64_t nv = std::min<int64_t>(V, p1 - q0);
        const acc_t* xp = xs + (q0 - p0) * HW;
        const bool direct = HW == 1 && nv == V;  // single pixels: memory already holds a plane per lane
        if (!direct) to_lanes(xp, nv, HW, xt);
        const acc_t* xl = direct ? xp : xt;
        acc_t* yl = direct ? ys + (q0 - p0) * HW : yt;
        Vec s(0);
        for (int64_t i = 0; i < HW; ++i) s += Vec::loadu(xl + i * V);
        Vec mean = s / L, q(0), e(0);
        for (int64_t i = 0; i < HW; ++i) {
          const Vec d = Vec::loadu(xl + i * V) - mean;
          q = at::vec::fmadd(d, d, q);
          e += d;
        }
        const Vec shift = e / L;
        mean += shift;
        // max(q - e * shift, 0), and q + e where q or e is NaN (keeps a NaN / inf, as contiguous_stats)
        const Vec m2 = Vec::blendv(at::vec::maximum(q - e * shift, zero), q + e, (q != q) | (e != e));
        mean.store(ml);
        m2.store(ql);
        for (int64_t j = 0; j < nv; ++j) {
          if (cpu::stats_overflowed(ml[j], ql[j])) {  // redo in double, M2 rounded to fp32 (eager's rule)
            double md, qd;
            cpu::stats_double(xp + j * HW, 1, 0, HW, 1, md, qd);
            ml[j] = static_cast<acc_t>(md);
            ql[j] = static_cast<acc_t>(qd);
          }
        }
        const Vec var = Vec::loadu(ql) / L, vm = Vec::loadu(ml);
        Vec rstd = one / (var + veps).sqrt();
        if (p.eps == 0.0) rstd = Vec::blendv(rstd, zero, var == zero);  // inv_std's rule
        rstd.store(rl);
        for (int64_t j = 0; j < nv; ++j) {
          mean_out[q0 + j] = ml[j];
          rstd_out[q0 + j] = rl[j];
        }
        lane_params(w, b, q0, nv, p.C, wl, bl);
        const Vec sc = rstd * Vec::loadu(wl), bc = Vec::loadu(bl);
        for (int64_t i = 0; i < HW; ++i)
          activate(at::vec::fmadd(Vec::loadu(xl + i * V) - vm, sc, bc), vsl, p.act).store(yl + i * V);
        if (!direct) from_lanes(yt, nv, HW, ys + (q0 - p0) * HW);
      }
      if constexpr (!std::is_same_v<scalar_t, acc_t>) store_from_acc(ys, y + p0 * HW, (p1 - p0) * HW);
    });
  });
}

// ------------------------------------------------------------------ NHWC helpers
// rows per chunk so that a chunk of C channels is about 32 KB of fp32
inline int64_t rows_per_chunk(int64_t C) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(C, 1)); }

// per-channel mean/M2 of `rows` rows of C contiguous channels (corrected two-pass, as
// contiguous_stats; `dsum` is scratch of C values)
template <typename acc_t>
void rows_stats(const acc_t* x, int64_t rows, int64_t C, acc_t* mean, acc_t* m2, acc_t* dsum) {
  using Vec = Vectorized<acc_t>;
  std::fill(mean, mean + C, acc_t(0));
  std::fill(m2, m2 + C, acc_t(0));
  std::fill(dsum, dsum + C, acc_t(0));
  for (int64_t r = 0; r < rows; ++r) at::vec::map2<acc_t>([](Vec a, Vec b) { return a + b; }, mean, mean, x + r * C, C);
  for (int64_t c = 0; c < C; ++c) mean[c] /= static_cast<acc_t>(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* xr = x + r * C;
    int64_t c = 0;
    for (; c + Vec::size() <= C; c += Vec::size()) {
      Vec d = Vec::loadu(xr + c) - Vec::loadu(mean + c);
      at::vec::fmadd(d, d, Vec::loadu(m2 + c)).store(m2 + c);
      (Vec::loadu(dsum + c) + d).store(dsum + c);
    }
    for (; c < C; ++c) {
      const acc_t d = xr[c] - mean[c];
      m2[c] += d * d;
      dsum[c] += d;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    const acc_t e = dsum[c], shift = e / static_cast<acc_t>(rows), q = m2[c];
    mean[c] += shift;
    m2[c] = (q == q && e == e) ? std::max(q - e * shift, acc_t(0)) : q + e;
  }
}

template <typename scalar_t, typename acc_t>
void fwd_nhwc(const scalar_t* x, scalar_t* y, const acc_t* w, const acc_t* b, acc_t* mean_out,
              acc_t* rstd_out, const Params& p) {
  const int64_t C = p.C, R = rows_per_chunk(C), chunks = (p.HW + R - 1) / R;
  std::vector<acc_t> pmean(p.N * chunks * C), pm2(p.N * chunks * C);
  at::parallel_for(0, p.N * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf, dsum(C);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / chunks, k = t % chunks, r0 = k * R, rows = std::min(R, p.HW - r0);
      const acc_t* xc = as_acc<scalar_t, acc_t>(x + (n * p.HW + r0) * C, rows * C, buf);
      rows_stats(xc, rows, C, pmean.data() + t * C, pm2.data() + t * C, dsum.data());
    }
  });
  // Chan's merge over chunks, in chunk order
  at::parallel_for(0, p.N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        acc_t mean = 0, m2 = 0, count = 0;
        for (int64_t k = 0; k < chunks; ++k) {
          const acc_t cnt = static_cast<acc_t>(std::min(R, p.HW - k * R));
          const acc_t tm = pmean[(n * chunks + k) * C + c], tq = pm2[(n * chunks + k) * C + c];
          const acc_t tot = count + cnt, delta = tm - mean;
          mean += delta * (cnt / tot);
          m2 += tq + delta * delta * (count * cnt / tot);
          count = tot;
        }
        if (cpu::stats_overflowed(mean, m2)) {  // this (n, c) in double, M2 rounded to fp32 (eager's rule)
          double md, qd;
          cpu::stats_double(x + n * p.HW * C + c, 1, 0, p.HW, C, md, qd);
          mean = static_cast<acc_t>(md);
          m2 = static_cast<acc_t>(qd);
        }
        mean_out[n * C + c] = mean;
        rstd_out[n * C + c] = inv_std<acc_t>(m2 / p.HW, p.eps);
      }
    }
  });
  at::parallel_for(0, p.N * chunks, 1, [&](int64_t begin, int64_t end) {
    using Vec = Vectorized<acc_t>;
    std::vector<acc_t> xbuf, ybuf(R * C), scale(C);
    const Vec vsl(static_cast<acc_t>(p.slope));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / chunks, k = t % chunks, r0 = k * R, rows = std::min(R, p.HW - r0);
      const acc_t* mean = mean_out + n * C;
      for (int64_t c = 0; c < C; ++c) scale[c] = rstd_out[n * C + c] * w[c];
      const acc_t* xc = as_acc<scalar_t, acc_t>(x + (n * p.HW + r0) * C, rows * C, xbuf);
      acc_t* yc = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(y + (n * p.HW + r0) * C) : ybuf.data();
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t* xr = xc + r * C;
        acc_t* yr = yc + r * C;
        int64_t c = 0;
        for (; c + Vec::size() <= C; c += Vec::size()) {
          Vec z = at::vec::fmadd(Vec::loadu(xr + c) - Vec::loadu(mean + c), Vec::loadu(scale.data() + c), Vec::loadu(b + c));
          activate(z, vsl, p.act).store(yr + c);
        }
        for (; c < C; ++c) yr[c] = activate<acc_t>((xr[c] - mean[c]) * scale[c] + b[c], acc_t(p.slope), p.act);
      }
      if constexpr (!std::is_same_v<scalar_t, acc_t>) store_from_acc(ybuf.data(), y + (n * p.HW + r0) * C, rows * C);
    }
  });
}

// ------------------------------------------------------------------ backward
// ga = g * act'(z); sums over the data of ga and ga * xhat
template <typename acc_t>
inline void grad_sums(const acc_t* x, const acc_t* g, int64_t n, acc_t mean, acc_t rstd, acc_t w, acc_t b,
                      bool act, acc_t slope, acc_t& sum_g, acc_t& sum_gx) {
  using Vec = Vectorized<acc_t>;
  const Vec vm(mean), vr(rstd), vw(w), vb(b), vsl(slope);
  Vec sg(0), sgx(0);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec xh = (Vec::loadu(x + i) - vm) * vr;
    Vec ga = Vec::loadu(g + i);
    if (act) ga = slope_act_grad(ga, at::vec::fmadd(xh, vw, vb), vsl);
    sg += ga;
    sgx = at::vec::fmadd(ga, xh, sgx);
  }
  acc_t s = hsum<acc_t>(sg), sx = hsum<acc_t>(sgx);
  for (; i < n; ++i) {
    const acc_t xh = (x[i] - mean) * rstd;
    acc_t ga = g[i];
    if (act) ga = slope_act_grad<acc_t>(ga, xh * w + b, slope);
    s += ga;
    sx += ga * xh;
  }
  sum_g = s;
  sum_gx = sx;
}

// dx = k * (ga - mg - xhat * mgx)
template <typename acc_t>
inline void grad_apply(const acc_t* x, const acc_t* g, acc_t* dx, int64_t n, acc_t mean, acc_t rstd, acc_t w,
                       acc_t b, bool act, acc_t slope, acc_t mg, acc_t mgx) {
  using Vec = Vectorized<acc_t>;
  const acc_t k = rstd * w;
  const Vec vm(mean), vr(rstd), vw(w), vb(b), vsl(slope), vk(k), vmg(mg), vmgx(mgx);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec xh = (Vec::loadu(x + i) - vm) * vr;
    Vec ga = Vec::loadu(g + i);
    if (act) ga = slope_act_grad(ga, at::vec::fmadd(xh, vw, vb), vsl);
    (vk * (ga - vmg - xh * vmgx)).store(dx + i);
  }
  for (; i < n; ++i) {
    const acc_t xh = (x[i] - mean) * rstd;
    acc_t ga = g[i];
    if (act) ga = slope_act_grad<acc_t>(ga, xh * w + b, slope);
    dx[i] = k * (ga - mg - xh * mgx);
  }
}

// tiny planes (see fwd_nchw_tiny): V planes at a time, one per lane; grad_sums / grad_apply's formulas
template <typename scalar_t, typename acc_t>
void bwd_nchw_tiny(const scalar_t* g, const scalar_t* x, scalar_t* dx, const acc_t* w, const acc_t* b,
                   const acc_t* mean, const acc_t* rstd, acc_t* dw, acc_t* db, const Params& p) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t HW = p.HW;
  const Vec L(static_cast<acc_t>(HW)), vsl(static_cast<acc_t>(p.slope));
  at::parallel_for(0, p.N * p.C, tiny_grain(HW), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf, gbuf, dbuf;
    alignas(64) acc_t xt[2 * V * V], gt[2 * V * V], dt[2 * V * V], wl[V], bl[V], ml[V], rl[V], sl[V], sxl[V];
    for_tiny_blocks<scalar_t, acc_t>(begin, end, HW, [&](int64_t p0, int64_t p1) {
      const int64_t cnt = (p1 - p0) * HW;
      const acc_t* xs = as_acc<scalar_t, acc_t>(x + p0 * HW, cnt, xbuf);
      const acc_t* gs = as_acc<scalar_t, acc_t>(g + p0 * HW, cnt, gbuf);
      acc_t* ds;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        ds = dx + p0 * HW;
      } else {
        dbuf.resize(cnt);
        ds = dbuf.data();
      }
      for (int64_t q0 = p0; q0 < p1; q0 += V) {
        const int64_t nv = std::min<int64_t>(V, p1 - q0), o = (q0 - p0) * HW;
        const bool direct = HW == 1 && nv == V;  // single pixels: memory already holds a plane per lane
        if (!direct) {
          to_lanes(xs + o, nv, HW, xt);
          to_lanes(gs + o, nv, HW, gt);
        }
        const acc_t* xl = direct ? xs + o : xt;
        const acc_t* gl = direct ? gs + o : gt;
        acc_t* dl = direct ? ds + o : dt;
        lane_params(w, b, q0, nv, p.C, wl, bl);
        for (int64_t j = 0; j < V; ++j) {
          ml[j] = j < nv ? mean[q0 + j] : acc_t(0);
          rl[j] = j < nv ? rstd[q0 + j] : acc_t(0);
        }
        const Vec vm = Vec::loadu(ml), vr = Vec::loadu(rl), vw = Vec::loadu(wl), vb = Vec::loadu(bl);
        Vec sg(0), sgx(0);
        for (int64_t i = 0; i < HW; ++i) {
          const Vec xh = (Vec::loadu(xl + i * V) - vm) * vr;
          Vec ga = Vec::loadu(gl + i * V);
          if (p.act) ga = slope_act_grad(ga, at::vec::fmadd(xh, vw, vb), vsl);
          sg += ga;
          sgx = at::vec::fmadd(ga, xh, sgx);
        }
        sg.store(sl);
        sgx.store(sxl);
        for (int64_t j = 0; j < nv; ++j) {
          db[q0 + j] = sl[j];
          dw[q0 + j] = sxl[j];
        }
        const Vec k = vr * vw, mg = sg / L, mgx = sgx / L;
        for (int64_t i = 0; i < HW; ++i) {
          const Vec xh = (Vec::loadu(xl + i * V) - vm) * vr;
          Vec ga = Vec::loadu(gl + i * V);
          if (p.act) ga = slope_act_grad(ga, at::vec::fmadd(xh, vw, vb), vsl);
          (k * (ga - mg - xh * mgx)).store(dl + i * V);
        }
        if (!direct) from_lanes(dt, nv, HW, ds + o);
      }
      if constexpr (!std::is_same_v<scalar_t, acc_t>) store_from_acc(ds, dx + p0 * HW, cnt);
    });
  });
}

template <typename scalar_t, typename acc_t>
void bwd_nchw(const scalar_t* g, const scalar_t* x, scalar_t* dx, const acc_t* w, const acc_t* b,
              const acc_t* mean, const acc_t* rstd, acc_t* dw, acc_t* db, const Params& p) {
  at::parallel_for(0, p.N * p.C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf, gbuf, dbuf;
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % p.C;
      const acc_t* xp = as_acc<scalar_t, acc_t>(x + plane * p.HW, p.HW, xbuf);
      const acc_t* gp = as_acc<scalar_t, acc_t>(g + plane * p.HW, p.HW, gbuf);
      acc_t sg, sgx;
      grad_sums(xp, gp, p.HW, mean[plane], rstd[plane], w[c], b[c], p.act, acc_t(p.slope), sg, sgx);
      db[plane] = sg;
      dw[plane] = sgx;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        grad_apply(xp, gp, dx + plane * p.HW, p.HW, mean[plane], rstd[plane], w[c], b[c], p.act,
                   acc_t(p.slope), sg / p.HW, sgx / p.HW);
      } else {
        dbuf.resize(p.HW);
        grad_apply(xp, gp, dbuf.data(), p.HW, mean[plane], rstd[plane], w[c], b[c], p.act, acc_t(p.slope),
                   sg / p.HW, sgx / p.HW);
        store_from_acc(dbuf.data(), dx + plane * p.HW, p.HW);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void bwd_nhwc(const scalar_t* g, const scalar_t* x, scalar_t* dx, const acc_t* w, const acc_t* b,
              const acc_t* mean, const acc_t* rstd, acc_t* dw, acc_t* db, const Params& p) {
  using Vec = Vectorized<acc_t>;
  const int64_t C = p.C, R = rows_per_chunk(C), chunks = (p.HW + R - 1) / R;
  const acc_t slope = static_cast<acc_t>(p.slope);
  std::vector<acc_t> psg(p.N * chunks * C), psgx(p.N * chunks * C);
  // per-row, per-channel ga and xhat; `emit(r, c0, xh, ga)` consumes vectors of channels
  auto rows_loop = [&](int64_t t, std::vector<acc_t>& xbuf, std::vector<acc_t>& gbuf, auto&& emit_vec,
                       auto&& emit_scalar) {
    const int64_t n = t / chunks, k = t % chunks, r0 = k * R, rows = std::min(R, p.HW - r0);
    const acc_t* xc = as_acc<scalar_t, acc_t>(x + (n * p.HW + r0) * C, rows * C, xbuf);
    const acc_t* gc = as_acc<scalar_t, acc_t>(g + (n * p.HW + r0) * C, rows * C, gbuf);
    const acc_t* mn = mean + n * C;
    const acc_t* rs = rstd + n * C;
    for (int64_t r = 0; r < rows; ++r) {
      int64_t c = 0;
      for (; c + Vec::size() <= C; c += Vec::size()) {
        Vec xh = (Vec::loadu(xc + r * C + c) - Vec::loadu(mn + c)) * Vec::loadu(rs + c);
        Vec ga = Vec::loadu(gc + r * C + c);
        if (p.act) ga = slope_act_grad(ga, at::vec::fmadd(xh, Vec::loadu(w + c), Vec::loadu(b + c)), Vec(slope));
        emit_vec(r, c, xh, ga);
      }
      for (; c < C; ++c) {
        const acc_t xh = (xc[r * C + c] - mn[c]) * rs[c];
        acc_t ga = gc[r * C + c];
        if (p.act) ga = slope_act_grad<acc_t>(ga, xh * w[c] + b[c], slope);
        emit_scalar(r, c, xh, ga);
      }
    }
    return rows;
  };
  at::parallel_for(0, p.N * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf, gbuf;
    for (int64_t t = begin; t < end; ++t) {
      acc_t* sg = psg.data() + t * C;
      acc_t* sgx = psgx.data() + t * C;
      std::fill(sg, sg + C, acc_t(0));
      std::fill(sgx, sgx + C, acc_t(0));
      rows_loop(t, xbuf, gbuf,
                [&](int64_t, int64_t c, const Vec& xh, const Vec& ga) {
                  (Vec::loadu(sg + c) + ga).store(sg + c);
                  at::vec::fmadd(ga, xh, Vec::loadu(sgx + c)).store(sgx + c);
                },
                [&](int64_t, int64_t c, acc_t xh, acc_t ga) {
                  sg[c] += ga;
                  sgx[c] += ga * xh;
                });
    }
  });
  for (int64_t n = 0; n < p.N; ++n) {  // fixed-order sum over chunks
    for (int64_t c = 0; c < C; ++c) {
      acc_t s = 0, sx = 0;
      for (int64_t k = 0; k < chunks; ++k) {
        s += psg[(n * chunks + k) * C + c];
        sx += psgx[(n * chunks + k) * C + c];
      }
      db[n * C + c] = s;
      dw[n * C + c] = sx;
    }
  }
  at::parallel_for(0, p.N * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf, gbuf, dbuf(R * C), k(C), mg(C), mgx(C);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / chunks, r0 = (t % chunks) * R;
      for (int64_t c = 0; c < C; ++c) {
        k[c] = rstd[n * C + c] * w[c];
        mg[c] = db[n * C + c] / p.HW;
        mgx[c] = dw[n * C + c] / p.HW;
      }
      acc_t* out = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(dx + (n * p.HW + r0) * C) : dbuf.data();
      const int64_t rows = rows_loop(
          t, xbuf, gbuf,
          [&](int64_t r, int64_t c, const Vec& xh, const Vec& ga) {
            (Vec::loadu(k.data() + c) * (ga - Vec::loadu(mg.data() + c) - xh * Vec::loadu(mgx.data() + c)))
                .store(out + r * C + c);
          },
          [&](int64_t r, int64_t c, acc_t xh, acc_t ga) { out[r * C + c] = k[c] * (ga - mg[c] - xh * mgx[c]); });
      if constexpr (!std::is_same_v<scalar_t, acc_t>) store_from_acc(dbuf.data(), dx + (n * p.HW + r0) * C, rows * C);
    }
  });
}

// ------------------------------------------------------------------ entry points
void check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "ganengine norm_act (cpu): ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "ganengine norm_act: ", name, " must be 4-D (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "ganengine norm_act: ", name, " must be floating point, got ",
              x.scalar_type());
}

bool is_nchw(const at::Tensor& x) { return x.is_contiguous(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_act_fwd_cpu(const at::Tensor& x_in,
                                                                const c10::optional<at::Tensor>& weight,
                                                                const c10::optional<at::Tensor>& bias,
                                                                double eps, bool act, double slope) {
  check_input(x_in, "x");
  const bool nchw = is_nchw(x_in);
  at::Tensor x = nchw ? x_in : x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const Params p{x.size(0), x.size(1), x.size(2) * x.size(3), act, slope, eps};
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({p.N, p.C}, x.options().dtype(acc_type));
  at::Tensor rstd = at::empty({p.N, p.C}, x.options().dtype(acc_type));
  if (p.N * p.C == 0 || p.HW == 0) return {y, mean.fill_(0), rstd.fill_(0)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_act_fwd_cpu", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    auto w = param_vector<acc_t>(weight, p.C, acc_t(1));
    auto b = param_vector<acc_t>(bias, p.C, acc_t(0));
    if (nchw && tiny_planes<acc_t>(p.HW)) {
      fwd_nchw_tiny<scalar_t, acc_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), w.data(), b.data(),
                                     mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), p);
    } else if (nchw) {
      fwd_nchw<scalar_t, acc_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), w.data(), b.data(),
                                mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), p);
    } else {
      fwd_nhwc<scalar_t, acc_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), w.data(), b.data(),
                                mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), p);
    }
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_act_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x_in,
                                                                const c10::optional<at::Tensor>& weight,
                                                                const c10::optional<at::Tensor>& bias,
                                                                const at::Tensor& mean_in, const at::Tensor& rstd_in,
                                                                bool act, double slope) {
  check_input(x_in, "x");
  check_input(grad_y, "grad_y");
  TORCH_CHECK(grad_y.sizes() == x_in.sizes(), "ganengine norm_act: grad_y shape ", grad_y.sizes(),
              " does not match x shape ", x_in.sizes());
  const bool nchw = is_nchw(x_in);
  const auto fmt = nchw ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  at::Tensor x = x_in.contiguous(fmt);
  at::Tensor g = grad_y.to(x.scalar_type()).contiguous(fmt);
  const Params p{x.size(0), x.size(1), x.size(2) * x.size(3), act, slope, 0.0};
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(mean_in.numel() == p.N * p.C && rstd_in.numel() == p.N * p.C,
              "ganengine norm_act: mean/rstd must have N*C elements");
  at::Tensor mean = mean_in.to(acc_type).contiguous(), rstd = rstd_in.to(acc_type).contiguous();
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = at::zeros({p.N, p.C}, x.options().dtype(acc_type));
  at::Tensor db = at::zeros({p.N, p.C}, x.options().dtype(acc_type));
  if (p.N * p.C == 0 || p.HW == 0) return {dx, dw, db};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_act_bwd_cpu", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    auto w = param_vector<acc_t>(weight, p.C, acc_t(1));
    auto b = param_vector<acc_t>(bias, p.C, acc_t(0));
    if (nchw && tiny_planes<acc_t>(p.HW)) {
      bwd_nchw_tiny<scalar_t, acc_t>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), w.data(),
                                     b.data(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), dw.data_ptr<acc_t>(),
                                     db.data_ptr<acc_t>(), p);
    } else if (nchw) {
      bwd_nchw<scalar_t, acc_t>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), w.data(),
                                b.data(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), dw.data_ptr<acc_t>(),
                                db.data_ptr<acc_t>(), p);
    } else {
      bwd_nhwc<scalar_t, acc_t>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), w.data(),
                                b.data(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), dw.data_ptr<acc_t>(),
                                db.data_ptr<acc_t>(), p);
    }
  });
  return {dx, dw, db};
}

}  // namespace
}  // namespace ganengine

TORCH_LIBRARY_FRAGMENT(ganengine_C, m) {
  m.def("norm_act_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps, bool apply_act, float slope)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("norm_act_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd,"
        " bool apply_act, float slope) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ganengine_C, CPU, m) {
  m.impl("norm_act_fwd", &ganengine::norm_act_fwd_cpu);
  m.impl("norm_act_bwd", &ganengine::norm_act_bwd_cpu);
}
