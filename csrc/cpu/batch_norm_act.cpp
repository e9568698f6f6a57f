// Fused (conditional) batch norm + activation, CPU kernels.
//
// x is read as (N, C, S), S = the product of the spatial sizes, in one of two dense layouts:
//   NCHW: element (n, c, s) at (n*C + c)*S + s   (contiguous tensors, (N, C, L))
//   NHWC: element (n, s, c) at (n*S + s)*C + c   (channels_last, channels_last_3d, (N, C))
// anything else is copied to NCHW once.
//
// The per-channel reductions run over fixed "units" that do not depend on the thread count: a
// unit is a run of whole images [n0, n1) or a slice [s0, s1) of one image, about kUnit elements
// per channel (NCHW) or kUnit elements of all channels (NHWC). Unit results are combined per
// channel in unit order, so the result bits are the same for any number of threads.
//
// Forward, training: per (unit, channel) the exact mean and M2 of d = x - K_c, where K_c is the
// channel's first element (a shift: a constant channel gives mean == K exactly and M2 == 0
// exactly), in two passes over the unit while it sits in L1; merged per channel with Chan's
// formula. Then y = act((x - mean) * scale + shift), scale = rstd * w, shift = b (per sample:
// gain[n, c], bias[n, c]). Eval: the same apply with mean 0, scale = w * rstd(running_var) and
// shift = b - running_mean * scale (the formula eager uses). With many channels (NCHW) one task
// does a channel's statistics and then its apply, so the second read comes from L1/L2.
//
// Backward: ga = grad * act'(z) with z recomputed exactly as the forward computed it; per
// (unit, channel) sums of ga and ga * xhat; then, training,
//   dx = rstd * (ga * g_nc - A_c - xhat * B_c),  A_c = sum_n g_nc * Sg_nc / M,  B_c = sum_n g_nc * Sgx_nc / M
// (g_nc = w_c for batch norm, gain[n, c] for the conditional form), and in eval dx = ga * scale,
// done in the same pass as the sums. dweight / dgain = Sgx, dbias = Sg (per channel, or per
// (n, c) for the conditional form). Statistics and sums in fp32 (fp64 for fp64 inputs).
#include "batch_norm_act.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "stats_fp64.h"
#include "vec_utils.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace ganengine {
namespace bn {
namespace {

using at::vec::Vectorized;
using cpu::AccOf;
using cpu::hsum;

constexpr int64_t kUnit = 4096;         // elements per unit and channel (NCHW) / per unit (NHWC)
constexpr int64_t kParallelMin = 32768;  // below this many elements one thread does it all
constexpr int64_t kRow = 256;            // NCHW: a channel block's run in one image has >= kRow elements
// NHWC: rows per unit at least. Each unit leaves C partial sums that the merge reads back: with one
// row per unit (an (N, C) input with C >= 4096: BatchNorm1d(4096) in an MLP generator) those were
// as many values as x itself, merged channel by channel with two divisions each (4x eager's forward
// at (64, 4096), 1 thread). 16 rows keep the partials at 1/16 of x and several units to share.
constexpr int64_t kMinRows = 16;

enum class Act { None, Relu, Leaky };

struct Geo {
  int64_t N, C, S;
  bool nhwc;
};

struct Unit {
  int64_t n0, n1, s0, s1;
  int64_t count() const { return (n1 - n0) * (s1 - s0); }
};

// fixed units; `single_image` keeps every unit inside one image (per-sample sums need that)
std::vector<Unit> make_units(const Geo& g, bool single_image) {
  const int64_t target = g.nhwc ? std::max<int64_t>(kMinRows, kUnit / std::max<int64_t>(g.C, 1)) : kUnit;
  std::vector<Unit> units;
  if (g.S >= target || single_image) {
    const int64_t k = std::max<int64_t>(1, (g.S + target - 1) / target);
    const int64_t len = (g.S + k - 1) / k;
    units.reserve(g.N * k);
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t s0 = 0; s0 < g.S; s0 += len) units.push_back({n, n + 1, s0, std::min(g.S, s0 + len)});
  } else {
    const int64_t grp = std::max<int64_t>(1, target / g.S);
    for (int64_t n0 = 0; n0 < g.N; n0 += grp) units.push_back({n0, std::min(g.N, n0 + grp), 0, g.S});
  }
  return units;
}

// NCHW channels per block: small images are walked image by image across a block of channels, so
// the memory is read in order (a channel alone would be one short run per image, a cache miss each)
inline int64_t channel_block(const Geo& g) {
  return g.S >= kRow ? 1 : std::min<int64_t>(g.C, (kRow + g.S - 1) / g.S);
}

// grain for parallel_for over `tasks` of `elems` elements each: small calls stay on one thread
inline int64_t grain_for(int64_t elems_per_task) {
  return std::max<int64_t>(1, kParallelMin / std::max<int64_t>(elems_per_task, 1));
}

// ------------------------------------------------------------------ elementwise pieces
template <typename A>
inline Vectorized<A> act_fwd(const Vectorized<A>& z, const Vectorized<A>& slope, Act act) {
  using Vec = Vectorized<A>;
  if (act == Act::Relu) return at::vec::maximum(z, Vec(0));  // NaN propagates, -inf -> 0
  if (act == Act::Leaky) return Vec::blendv(z * slope, z, z > Vec(0));
  return z;
}

template <typename A>
inline A act_fwd(A z, A slope, Act act) {
  if (act == Act::Relu) return (z > A(0) || z != z) ? z : A(0);
  if (act == Act::Leaky) return z > A(0) ? z : z * slope;
  return z;
}

template <typename A>
inline Vectorized<A> act_bwd(const Vectorized<A>& g, const Vectorized<A>& z, const Vectorized<A>& slope, Act act) {
  using Vec = Vectorized<A>;
  // relu: eager's threshold_backward on the output passes g where z is NaN
  if (act == Act::Relu) return Vec::blendv(Vec(0), g, (z > Vec(0)) | (z != z));
  if (act == Act::Leaky) return Vec::blendv(g * slope, g, z > Vec(0));
  return g;
}

template <typename A>
inline A act_bwd(A g, A z, A slope, Act act) {
  if (act == Act::Relu) return (z > A(0) || z != z) ? g : A(0);
  if (act == Act::Leaky) return z > A(0) ? g : g * slope;
  return g;
}

// acc (one vector) += sum of (x - K) over n contiguous values; the tail goes to `tail`
template <typename A>
inline void seg_sum(const A* x, int64_t n, A K, A* acc, A& tail) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  const Vec vk(K);
  Vec s0(0), s1(0);
  int64_t i = 0;
  for (; i + 2 * V <= n; i += 2 * V) {
    s0 += Vec::loadu(x + i) - vk;
    s1 += Vec::loadu(x + i + V) - vk;
  }
  for (; i + V <= n; i += V) s0 += Vec::loadu(x + i) - vk;
  (Vec::loadu(acc) + (s0 + s1)).store(acc);
  for (; i < n; ++i) tail += x[i] - K;
}

// acc += sum of ((x - K) - md)^2 over n contiguous values
template <typename A>
inline void seg_sq(const A* x, int64_t n, A K, A md, A* acc, A& tail) {
  using Vec = Vectorized<A>;
  constexpr int64_t V = Vec::size();
  const Vec vk(K), vm(md);
  Vec q0(0), q1(0);
  int64_t i = 0;
  for (; i + 2 * V <= n; i += 2 * V) {
    const Vec d0 = (Vec::loadu(x + i) - vk) - vm, d1 = (Vec::loadu(x + i + V) - vk) - vm;
    q0 = at::vec::fmadd(d0, d0, q0);
    q1 = at::vec::fmadd(d1, d1, q1);
  }
  for (; i + V <= n; i += V) {
    const Vec d0 = (Vec::loadu(x + i) - vk) - vm;
    q0 = at::vec::fmadd(d0, d0, q0);
  }
  (Vec::loadu(acc) + (q0 + q1)).store(acc);
  for (; i < n; ++i) {
    const A d = (x[i] - K) - md;
    tail += d * d;
  }
}

// y = act((x - m) * sc + sh) over n contiguous values
template <typename A>
inline void apply_run(const A* x, A* y, int64_t n, A m, A sc, A sh, Act act, A slope) {
  using Vec = Vectorized<A>;
  const Vec vm(m), vs(sc), vb(sh), vsl(slope);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size())
    act_fwd(at::vec::fmadd(Vec::loadu(x + i) - vm, vs, vb), vsl, act).store(y + i);
  for (; i < n; ++i) y[i] = act_fwd<A>(std::fma(x[i] - m, sc, sh), slope, act);
}

// Backward coefficients of one (n, c): z = (x - mz) * sc + sh exactly as forward; xhat = (x - mx) * rstd
template <typename A>
struct BwdRun {
  A mz, sc, sh, mx, rstd;
};

// accumulate sum(ga) and sum(ga * xhat) over n contiguous values into vector + scalar accumulators
template <typename A>
inline void sums_run(const A* x, const A* g, int64_t n, const BwdRun<A>& k, Act act, A slope, Vectorized<A>& vsg,
                     Vectorized<A>& vsgx, A& ssg, A& ssgx) {
  using Vec = Vectorized<A>;
  const Vec vmz(k.mz), vsc(k.sc), vsh(k.sh), vmx(k.mx), vr(k.rstd), vsl(slope);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec xv = Vec::loadu(x + i);
    const Vec ga = act_bwd(Vec::loadu(g + i), at::vec::fmadd(xv - vmz, vsc, vsh), vsl, act);
    vsg += ga;
    vsgx = at::vec::fmadd(ga, (xv - vmx) * vr, vsgx);
  }
  for (; i < n; ++i) {
    const A ga = act_bwd<A>(g[i], std::fma(x[i] - k.mz, k.sc, k.sh), slope, act);
    ssg += ga;
    ssgx += ga * ((x[i] - k.mx) * k.rstd);
  }
}

// dx = ga * sc - (xhat * P + Q) over n contiguous values (training: P = rstd * B, Q = rstd * A)
template <typename A>
inline void dx_run(const A* x, const A* g, A* dx, int64_t n, const BwdRun<A>& k, A P, A Q, Act act, A slope) {
  using Vec = Vectorized<A>;
  const Vec vmz(k.mz), vsc(k.sc), vsh(k.sh), vmx(k.mx), vr(k.rstd), vsl(slope), vp(P), vq(Q);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec xv = Vec::loadu(x + i);
    const Vec ga = act_bwd(Vec::loadu(g + i), at::vec::fmadd(xv - vmz, vsc, vsh), vsl, act);
    (ga * vsc - at::vec::fmadd((xv - vmx) * vr, vp, vq)).store(dx + i);
  }
  for (; i < n; ++i) {
    const A ga = act_bwd<A>(g[i], std::fma(x[i] - k.mz, k.sc, k.sh), slope, act);
    dx[i] = ga * k.sc - std::fma((x[i] - k.mx) * k.rstd, P, Q);
  }
}

// eval: dx = ga * sc, and the sums, in one pass
template <typename A>
inline void eval_bwd_run(const A* x, const A* g, A* dx, int64_t n, const BwdRun<A>& k, Act act, A slope,
                         Vectorized<A>& vsg, Vectorized<A>& vsgx, A& ssg, A& ssgx) {
  using Vec = Vectorized<A>;
  const Vec vmz(k.mz), vsc(k.sc), vsh(k.sh), vmx(k.mx), vr(k.rstd), vsl(slope);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec xv = Vec::loadu(x + i);
    const Vec ga = act_bwd(Vec::loadu(g + i), at::vec::fmadd(xv - vmz, vsc, vsh), vsl, act);
    (ga * vsc).store(dx + i);
    vsg += ga;
    vsgx = at::vec::fmadd(ga, (xv - vmx) * vr, vsgx);
  }
  for (; i < n; ++i) {
    const A ga = act_bwd<A>(g[i], std::fma(x[i] - k.mz, k.sc, k.sh), slope, act);
    dx[i] = ga * k.sc;
    ssg += ga;
    ssgx += ga * ((x[i] - k.mx) * k.rstd);
  }
}

// ------------------------------------------------------------------ per-call coefficients
// A read-only acc_t view of a parameter: the tensor's own data when it already is dense acc_t.
template <typename A>
struct Param {
  const A* p = nullptr;
  std::vector<A> buf;
  at::Tensor keep;
  void init(const c10::optional<at::Tensor>& t, int64_t count, A fill) {
    if (t.has_value() && t->defined()) {
      const at::Tensor& v = *t;
      if (v.scalar_type() == c10::CppTypeToScalarType<A>::value && v.is_contiguous()) {
        p = v.template data_ptr<A>();  // no copy, no dispatcher call
        return;
      }
      keep = v.to(c10::CppTypeToScalarType<A>::value).contiguous();
      p = keep.template data_ptr<A>();
    } else {
      buf.assign(count, fill);
      p = buf.data();
    }
  }
};

template <typename A>
struct Coefs {
  Geo g;
  bool per_sample, training;
  int64_t sn;            // C if per-sample else 0: coefficient (n, c) at n * sn + c
  Param<A> gw, gb;       // weight/gain and bias, (C) or (N, C)
  const A* mean;         // (C): batch mean (training) or running mean (eval)
  const A* rstd;         // (C)
  std::vector<A> mz, scale, shift;  // mz (C); scale, shift (N_eff * C)

  void init(const Geo& geo, const c10::optional<at::Tensor>& w, const c10::optional<at::Tensor>& b, bool ps,
            bool train) {
    g = geo;
    per_sample = ps;
    training = train;
    sn = ps ? g.C : 0;
    const int64_t cnt = (ps ? g.N : 1) * g.C;
    gw.init(w, cnt, A(1));
    gb.init(b, cnt, A(0));
    mz.assign(g.C, A(0));
    scale.assign(cnt, A(0));
    shift.assign(cnt, A(0));
  }
  // scale/shift of channel c (after mean[c], rstd[c] are known): identical in forward and backward
  void channel(int64_t c) {
    const int64_t ne = per_sample ? g.N : 1;
    mz[c] = training ? mean[c] : A(0);
    for (int64_t n = 0; n < ne; ++n) {
      const int64_t i = n * sn + c;
      scale[i] = rstd[c] * gw.p[i];
      shift[i] = training ? gb.p[i] : gb.p[i] - mean[c] * scale[i];
    }
  }
  // channel()'s coefficients of every channel, samples outer and channels inner (contiguous; the
  // per-sample (N, C) arrays walked channel by channel were strided, 3x eager's time on (64, 512, 1, 1)).
  // The same operations per element as channel(): training takes scale = rstd * w and shift = b, so
  // the bits agree with channel()'s; eval (mul, then sub) comes only from here, forward and backward.
  void all_channels() {
    using Vec = Vectorized<A>;
    const int64_t ne = per_sample ? g.N : 1, C = g.C;
    for (int64_t c = 0; c < C; ++c) mz[c] = training ? mean[c] : A(0);
    for (int64_t n = 0; n < ne; ++n) {
      const A* w = gw.p + n * sn;
      const A* b = gb.p + n * sn;
      A* sc = scale.data() + n * sn;
      A* sh = shift.data() + n * sn;
      int64_t c = 0;
      for (; c + Vec::size() <= C; c += Vec::size()) {
        const Vec s = Vec::loadu(rstd + c) * Vec::loadu(w + c);
        s.store(sc + c);
        (training ? Vec::loadu(b + c) : Vec::loadu(b + c) - Vec::loadu(mean + c) * s).store(sh + c);
      }
      for (; c < C; ++c) {
        const A s = rstd[c] * w[c];
        sc[c] = s;
        sh[c] = training ? b[c] : static_cast<A>(b[c] - static_cast<A>(mean[c] * s));
      }
    }
  }
  BwdRun<A> run(int64_t n, int64_t c) const {
    const int64_t i = n * sn + c;
    return {mz[c], scale[i], shift[i], mean[c], rstd[c]};
  }
};

// ------------------------------------------------------------------ forward
template <typename scalar_t, typename A>
struct Forward {
  const scalar_t* x;
  scalar_t* y;
  Geo g;
  std::vector<Unit> units;
  Coefs<A>& k;
  Act act;
  A slope;
  double eps;
  A* mean;
  A* rstd;
  A* var_unbiased;
  std::vector<A> K, pm, pq;  // shift per channel; per (unit, channel) mean of d and M2

  int64_t U() const { return static_cast<int64_t>(units.size()); }
  int64_t pidx(int64_t u, int64_t c) const { return g.nhwc ? u * g.C + c : c * U() + u; }

  // --- NCHW, one (channel block, unit): images outer, the block's channels inner (memory order)
  int64_t CB = 1;
  int64_t NB() const { return (g.C + CB - 1) / CB; }

  template <typename F>
  void for_segments(int64_t blk, const Unit& t, std::vector<A>& buf, F&& f) const {
    const int64_t c0 = blk * CB, c1 = std::min(g.C, c0 + CB), L = t.s1 - t.s0;
    for (int64_t n = t.n0; n < t.n1; ++n)
      for (int64_t c = c0; c < c1; ++c) {
        const scalar_t* xs = x + (n * g.C + c) * g.S + t.s0;
        if constexpr (std::is_same_v<scalar_t, A>) {
          f(n, c, xs, L);
        } else {
          buf.resize(L);
          at::vec::convert(xs, buf.data(), L);
          f(n, c, static_cast<const A*>(buf.data()), L);
        }
      }
  }

  void nchw_stats(int64_t blk, int64_t u, std::vector<A>& buf, std::vector<A>& acc) {
    constexpr int64_t V = Vectorized<A>::size();
    const Unit& t = units[u];
    const int64_t c0 = blk * CB, nc = std::min(g.C, c0 + CB) - c0;
    const A cnt = static_cast<A>(t.count());
    acc.assign(nc * (V + 1), A(0));  // per channel: V lanes + a scalar tail
    for_segments(blk, t, buf, [&](int64_t, int64_t c, const A* xs, int64_t L) {
      seg_sum<A>(xs, L, K[c], acc.data() + (c - c0) * (V + 1), acc[(c - c0) * (V + 1) + V]);
    });
    for (int64_t j = 0; j < nc; ++j) {
      A* a = acc.data() + j * (V + 1);
      pm[pidx(u, c0 + j)] = (hsum<A>(Vectorized<A>::loadu(a)) + a[V]) / cnt;
    }
    acc.assign(nc * (V + 1), A(0));
    for_segments(blk, t, buf, [&](int64_t, int64_t c, const A* xs, int64_t L) {
      seg_sq<A>(xs, L, K[c], pm[pidx(u, c)], acc.data() + (c - c0) * (V + 1), acc[(c - c0) * (V + 1) + V]);
    });
    for (int64_t j = 0; j < nc; ++j) {
      A* a = acc.data() + j * (V + 1);
      pq[pidx(u, c0 + j)] = hsum<A>(Vectorized<A>::loadu(a)) + a[V];
    }
  }
  void nchw_apply(int64_t blk, int64_t u, std::vector<A>& xb, std::vector<A>& yb) {
    const Unit& t = units[u];
    const int64_t c0 = blk * CB, c1 = std::min(g.C, c0 + CB), L = t.s1 - t.s0;
    for (int64_t n = t.n0; n < t.n1; ++n)
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t off = (n * g.C + c) * g.S + t.s0, i = n * k.sn + c;
        if constexpr (std::is_same_v<scalar_t, A>) {
          apply_run<A>(x + off, y + off, L, k.mz[c], k.scale[i], k.shift[i], act, slope);
        } else {
          xb.resize(L);
          yb.resize(L);
          at::vec::convert(x + off, xb.data(), L);
          apply_run<A>(xb.data(), yb.data(), L, k.mz[c], k.scale[i], k.shift[i], act, slope);
          at::vec::convert(yb.data(), y + off, L);
        }
      }
  }

  // --- NHWC: rows [r0, r1) of C channels
  static int64_t row0(const Unit& t, int64_t S) { return t.n0 * S + t.s0; }
  static int64_t row1(const Unit& t, int64_t S) { return (t.n1 - 1) * S + t.s1; }

  void nhwc_stats(int64_t u, std::vector<A>& buf) {
    using Vec = Vectorized<A>;
    const Unit& t = units[u];
    const int64_t r0 = row0(t, g.S), rows = row1(t, g.S) - r0, C = g.C;
    const A* xp;
    if constexpr (std::is_same_v<scalar_t, A>) {
      xp = x + r0 * C;
    } else {
      buf.resize(rows * C);
      at::vec::convert(x + r0 * C, buf.data(), rows * C);
      xp = buf.data();
    }
    A* sm = pm.data() + u * C;
    A* sq = pq.data() + u * C;
    std::fill(sm, sm + C, A(0));
    std::fill(sq, sq + C, A(0));
    const A* kp = K.data();
    for (int64_t r = 0; r < rows; ++r) {
      const A* xr = xp + r * C;
      int64_t c = 0;
      for (; c + Vec::size() <= C; c += Vec::size())
        (Vec::loadu(sm + c) + (Vec::loadu(xr + c) - Vec::loadu(kp + c))).store(sm + c);
      for (; c < C; ++c) sm[c] += xr[c] - kp[c];
    }
    const A inv = A(1) / static_cast<A>(rows);
    for (int64_t c = 0; c < C; ++c) sm[c] = sm[c] * inv;
    for (int64_t r = 0; r < rows; ++r) {
      const A* xr = xp + r * C;
      int64_t c = 0;
      for (; c + Vec::size() <= C; c += Vec::size()) {
        const Vec d = (Vec::loadu(xr + c) - Vec::loadu(kp + c)) - Vec::loadu(sm + c);
        at::vec::fmadd(d, d, Vec::loadu(sq + c)).store(sq + c);
      }
      for (; c < C; ++c) {
        const A d = (xr[c] - kp[c]) - sm[c];
        sq[c] += d * d;
      }
    }
  }
  void nhwc_apply(int64_t u, std::vector<A>& xb, std::vector<A>& yb) {
    using Vec = Vectorized<A>;
    const Unit& t = units[u];
    const int64_t r0 = row0(t, g.S), r1 = row1(t, g.S), C = g.C;
    const A* xp;
    A* yp;
    if constexpr (std::is_same_v<scalar_t, A>) {
      xp = x + r0 * C;
      yp = y + r0 * C;
    } else {
      xb.resize((r1 - r0) * C);
      yb.resize((r1 - r0) * C);
      at::vec::convert(x + r0 * C, xb.data(), (r1 - r0) * C);
      xp = xb.data();
      yp = yb.data();
    }
    const Vec vsl(slope);
    const A* mz = k.mz.data();
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / g.S;
      const A* sc = k.scale.data() + n * k.sn;
      const A* sh = k.shift.data() + n * k.sn;
      const A* xr = xp + (r - r0) * C;
      A* yr = yp + (r - r0) * C;
      int64_t c = 0;
      for (; c + Vec::size() <= C; c += Vec::size())
        act_fwd(at::vec::fmadd(Vec::loadu(xr + c) - Vec::loadu(mz + c), Vec::loadu(sc + c), Vec::loadu(sh + c)), vsl,
                act)
            .store(yr + c);
      for (; c < C; ++c) yr[c] = act_fwd<A>(std::fma(xr[c] - mz[c], sc[c], sh[c]), slope, act);
    }
    if constexpr (!std::is_same_v<scalar_t, A>) at::vec::convert(yp, y + r0 * C, (r1 - r0) * C);
  }

  // Chan's merge of channel c's units, in unit order; then the channel's coefficients
  void finalize(int64_t c) {
    A count = 0, md = 0, m2 = 0;
    for (int64_t u = 0; u < U(); ++u) {
      const A cnt = static_cast<A>(units[u].count());
      const A tm = pm[pidx(u, c)], tq = pq[pidx(u, c)];
      const A tot = count + cnt, delta = tm - md;
      md += delta * (cnt / tot);
      m2 += tq + delta * delta * (count * cnt / tot);
      count = tot;
    }
    finish(c, md, m2);
  }

  // NHWC: the same merge for every channel at once, vectorised across channels (a unit's partials
  // are contiguous in c; the weights cnt / tot are the same for every channel): the same operations
  // per channel, in the same unit order, as finalize's loop
  void finalize_nhwc() {
    using Vec = Vectorized<A>;
    const int64_t C = g.C;
    std::vector<A> md(C, A(0)), m2(C, A(0));
    A count = 0;
    for (int64_t u = 0; u < U(); ++u) {
      const A cnt = static_cast<A>(units[u].count());
      const A tot = count + cnt, a = cnt / tot, b = count * cnt / tot;
      const A* tm = pm.data() + u * C;
      const A* tq = pq.data() + u * C;
      const Vec va(a), vb(b);
      int64_t c = 0;
      for (; c + Vec::size() <= C; c += Vec::size()) {
        const Vec m = Vec::loadu(md.data() + c), delta = Vec::loadu(tm + c) - m;
        (m + delta * va).store(md.data() + c);
        (Vec::loadu(m2.data() + c) + (Vec::loadu(tq + c) + delta * delta * vb)).store(m2.data() + c);
      }
      for (; c < C; ++c) {
        const A delta = tm[c] - md[c];
        md[c] += delta * a;
        m2[c] += tq[c] + delta * delta * b;
      }
      count = tot;
    }
    for (int64_t c = 0; c < C; ++c) finish(c, md[c], m2[c], false);
    k.all_channels();
  }

  // channel c's mean, rstd and unbiased variance from its merged statistics; then its coefficients
  void finish(int64_t c, A md, A m2, bool coefs = true) {
    const A M = static_cast<A>(g.N * g.S);
    mean[c] = K[c] + md;
    if (cpu::stats_overflowed(mean[c], m2)) {
      // overflowed in fp32 (|x - K| > ~1e19, or a sum near fp32 max): channel c in double, its
      // M2 rounded to fp32 as ATen stores it (stats_fp64.h); one branch per channel otherwise
      double mdd, qd;
      if (g.nhwc)
        cpu::stats_double(x + c, 1, 0, g.N * g.S, g.C, mdd, qd);
      else
        cpu::stats_double(x + c * g.S, g.N, g.C * g.S, g.S, 1, mdd, qd);
      mean[c] = static_cast<A>(mdd);
      m2 = static_cast<A>(qd);
    }
    rstd[c] = cpu::inv_std<A>(m2 / M, eps);
    var_unbiased[c] = m2 / (M - A(1));
    if (coefs) k.channel(c);
  }

  void shifts() {
    K.resize(g.C);
    for (int64_t c = 0; c < g.C; ++c) {
      const scalar_t v = g.nhwc ? x[c] : x[c * g.S];
      K[c] = static_cast<A>(v);
    }
  }

  void run_training() {
    shifts();
    pm.assign(U() * g.C, A(0));
    pq.assign(U() * g.C, A(0));
    const int64_t per_channel = g.N * g.S;
    CB = g.nhwc ? 1 : channel_block(g);
    if (!g.nhwc && NB() >= 2 * at::get_num_threads()) {
      // one task per channel block: statistics, then apply while the block is in cache
      at::parallel_for(0, NB(), grain_for(per_channel * CB), [&](int64_t b, int64_t e) {
        std::vector<A> b0, b1;
        for (int64_t blk = b; blk < e; ++blk) {
          for (int64_t u = 0; u < U(); ++u) nchw_stats(blk, u, b0, b1);
          for (int64_t c = blk * CB; c < std::min(g.C, (blk + 1) * CB); ++c) finalize(c);
          for (int64_t u = 0; u < U(); ++u) nchw_apply(blk, u, b0, b1);
        }
      });
      return;
    }
    if (g.nhwc) {
      const int64_t per_unit = std::max<int64_t>(1, g.N * g.S * g.C / U());
      at::parallel_for(0, U(), grain_for(per_unit), [&](int64_t b, int64_t e) {
        std::vector<A> buf;
        for (int64_t u = b; u < e; ++u) nhwc_stats(u, buf);
      });
      finalize_nhwc();
      at::parallel_for(0, U(), grain_for(per_unit), [&](int64_t b, int64_t e) {
        std::vector<A> b0, b1;
        for (int64_t u = b; u < e; ++u) nhwc_apply(u, b0, b1);
      });
      return;
    }
    const int64_t per_unit = std::max<int64_t>(1, per_channel * CB / U());
    at::parallel_for(0, NB() * U(), grain_for(per_unit), [&](int64_t b, int64_t e) {
      std::vector<A> b0, b1;
      for (int64_t t = b; t < e; ++t) nchw_stats(t / U(), t % U(), b0, b1);
    });
    for (int64_t c = 0; c < g.C; ++c) finalize(c);
    at::parallel_for(0, NB() * U(), grain_for(per_unit), [&](int64_t b, int64_t e) {
      std::vector<A> b0, b1;
      for (int64_t t = b; t < e; ++t) nchw_apply(t / U(), t % U(), b0, b1);
    });
  }

  void run_eval() {
    k.all_channels();
    if (g.nhwc) {
      const int64_t per_unit = std::max<int64_t>(1, g.N * g.S * g.C / U());
      at::parallel_for(0, U(), grain_for(per_unit), [&](int64_t b, int64_t e) {
        std::vector<A> b0, b1;
        for (int64_t u = b; u < e; ++u) nhwc_apply(u, b0, b1);
      });
      return;
    }
    CB = channel_block(g);
    const int64_t per_unit = std::max<int64_t>(1, g.N * g.S * CB / U());
    at::parallel_for(0, NB() * U(), grain_for(per_unit), [&](int64_t b, int64_t e) {
      std::vector<A> b0, b1;
      for (int64_t t = b; t < e; ++t) nchw_apply(t / U(), t % U(), b0, b1);
    });
  }
};

// ------------------------------------------------------------------ backward
template <typename scalar_t, typename A>
struct Backward {
  const scalar_t* gy;
  const scalar_t* x;
  scalar_t* dx;
  Geo g;
  std::vector<Unit> units;
  const Coefs<A>& k;
  Act act;
  A slope;
  std::vector<A> psg, psgx;  // per (unit, channel)
  std::vector<A> P, Q;       // per channel (training)

  int64_t U() const { return static_cast<int64_t>(units.size()); }
  int64_t pidx(int64_t u, int64_t c) const { return g.nhwc ? u * g.C + c : c * U() + u; }

  template <typename F>
  static void with_acc(const scalar_t* src, int64_t n, std::vector<A>& buf, F&& f) {
    if constexpr (std::is_same_v<scalar_t, A>) {
      f(src);
    } else {
      buf.resize(n);
      at::vec::convert(src, buf.data(), n);
      f(static_cast<const A*>(buf.data()));
    }
  }

  // --- NCHW, one (channel block, unit): images outer, the block's channels inner (memory order).
  // Per channel one vector + one scalar accumulator for each of sum(ga), sum(ga * xhat).
  int64_t CB = 1;
  int64_t NB() const { return (g.C + CB - 1) / CB; }

  void nchw_unit(int64_t blk, int64_t u, int pass, std::vector<A>& bx, std::vector<A>& bg, std::vector<A>& bd,
                 std::vector<A>& acc) {
    using Vec = Vectorized<A>;
    constexpr int64_t V = Vec::size(), W = 2 * V + 2;
    const Unit& t = units[u];
    const int64_t c0 = blk * CB, c1 = std::min(g.C, c0 + CB), L = t.s1 - t.s0;
    if (pass != 1) acc.assign((c1 - c0) * W, A(0));
    for (int64_t n = t.n0; n < t.n1; ++n)
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t off = (n * g.C + c) * g.S + t.s0;
        const BwdRun<A> r = k.run(n, c);
        A* a = pass != 1 ? acc.data() + (c - c0) * W : nullptr;
        with_acc(x + off, L, bx, [&](const A* xa) {
          with_acc(gy + off, L, bg, [&](const A* ga) {
            if (pass == 0) {
              Vec vsg = Vec::loadu(a), vsgx = Vec::loadu(a + V);
              sums_run<A>(xa, ga, L, r, act, slope, vsg, vsgx, a[2 * V], a[2 * V + 1]);
              vsg.store(a);
              vsgx.store(a + V);
              return;
            }
            A* out = nullptr;
            if constexpr (std::is_same_v<scalar_t, A>) {
              out = dx + off;
            } else {
              bd.resize(L);
              out = bd.data();
            }
            if (pass == 1) {
              dx_run<A>(xa, ga, out, L, r, P[c], Q[c], act, slope);
            } else {
              Vec vsg = Vec::loadu(a), vsgx = Vec::loadu(a + V);
              eval_bwd_run<A>(xa, ga, out, L, r, act, slope, vsg, vsgx, a[2 * V], a[2 * V + 1]);
              vsg.store(a);
              vsgx.store(a + V);
            }
            if constexpr (!std::is_same_v<scalar_t, A>) at::vec::convert(static_cast<const A*>(out), dx + off, L);
          });
        });
      }
    if (pass != 1) {
      for (int64_t c = c0; c < c1; ++c) {
        const A* a = acc.data() + (c - c0) * W;
        psg[pidx(u, c)] = hsum<A>(Vec::loadu(a)) + a[2 * V];
        psgx[pidx(u, c)] = hsum<A>(Vec::loadu(a + V)) + a[2 * V + 1];
      }
    }
  }

  // --- NHWC, one unit (all channels)
  void nhwc_unit(int64_t u, int pass, std::vector<A>& bx, std::vector<A>& bg, std::vector<A>& bd) {
    using Vec = Vectorized<A>;
    const Unit& t = units[u];
    const int64_t C = g.C, r0 = t.n0 * g.S + t.s0, r1 = (t.n1 - 1) * g.S + t.s1, cnt = (r1 - r0) * C;
    A* sg = psg.data() + u * C;
    A* sgx = psgx.data() + u * C;
    if (pass != 1) {
      std::fill(sg, sg + C, A(0));
      std::fill(sgx, sgx + C, A(0));
    }
    const Vec vsl(slope);
    with_acc(x + r0 * C, cnt, bx, [&](const A* xa) {
      with_acc(gy + r0 * C, cnt, bg, [&](const A* ga0) {
        A* out = nullptr;
        if (pass != 0) {
          if constexpr (std::is_same_v<scalar_t, A>) {
            out = dx + r0 * C;
          } else {
            bd.resize(cnt);
            out = bd.data();
          }
        }
        const A* mz = k.mz.data();
        const A* mx = k.mean;
        const A* rs = k.rstd;
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t n = r / g.S;
          const A* sc = k.scale.data() + n * k.sn;
          const A* sh = k.shift.data() + n * k.sn;
          const A* xr = xa + (r - r0) * C;
          const A* gr = ga0 + (r - r0) * C;
          A* dr = out ? out + (r - r0) * C : nullptr;
          int64_t c = 0;
          for (; c + Vec::size() <= C; c += Vec::size()) {
            const Vec xv = Vec::loadu(xr + c), vsc = Vec::loadu(sc + c);
            const Vec ga = act_bwd(Vec::loadu(gr + c),
                                   at::vec::fmadd(xv - Vec::loadu(mz + c), vsc, Vec::loadu(sh + c)), vsl, act);
            const Vec xh = (xv - Vec::loadu(mx + c)) * Vec::loadu(rs + c);
            if (pass == 1) {
              (ga * vsc - at::vec::fmadd(xh, Vec::loadu(P.data() + c), Vec::loadu(Q.data() + c))).store(dr + c);
            } else {
              if (pass == 2) (ga * vsc).store(dr + c);
              (Vec::loadu(sg + c) + ga).store(sg + c);
              at::vec::fmadd(ga, xh, Vec::loadu(sgx + c)).store(sgx + c);
            }
          }
          for (; c < C; ++c) {
            const A ga = act_bwd<A>(gr[c], std::fma(xr[c] - mz[c], sc[c], sh[c]), slope, act);
            const A xh = (xr[c] - mx[c]) * rs[c];
            if (pass == 1) {
              dr[c] = ga * sc[c] - std::fma(xh, P[c], Q[c]);
            } else {
              if (pass == 2) dr[c] = ga * sc[c];
              sg[c] += ga;
              sgx[c] += ga * xh;
            }
          }
        }
        if constexpr (!std::is_same_v<scalar_t, A>) {
          if (out) at::vec::convert(static_cast<const A*>(out), dx + r0 * C, cnt);
        }
      });
    });
  }

  // sums of channel c: per-sample (N, C) or per channel (C); training: P[c], Q[c]
  void combine(int64_t c, A* dgw, A* dgb) {
    const A M = static_cast<A>(g.N * g.S);
    A a = 0, b = 0;
    if (k.per_sample) {
      int64_t u = 0;
      for (int64_t n = 0; n < g.N; ++n) {
        A s = 0, sx = 0;
        for (; u < U() && units[u].n0 == n; ++u) {
          s += psg[pidx(u, c)];
          sx += psgx[pidx(u, c)];
        }
        dgb[n * g.C + c] = s;
        dgw[n * g.C + c] = sx;
        a += k.gw.p[n * g.C + c] * s;
        b += k.gw.p[n * g.C + c] * sx;
      }
    } else {
      A s = 0, sx = 0;
      for (int64_t u = 0; u < U(); ++u) {
        s += psg[pidx(u, c)];
        sx += psgx[pidx(u, c)];
      }
      dgb[c] = s;
      dgw[c] = sx;
      a = k.gw.p[c] * s;
      b = k.gw.p[c] * sx;
    }
    if (k.training) {
      P[c] = k.rstd[c] * (b / M);
      Q[c] = k.rstd[c] * (a / M);
    }
  }

  // NHWC, sums per channel (not per sample): combine's sums over units for every channel at once,
  // vectorised across channels, in the same unit order; then combine's per-channel tail
  void combine_nhwc(A* dgw, A* dgb) {
    using Vec = Vectorized<A>;
    const int64_t C = g.C;
    std::vector<A> s(C, A(0)), sx(C, A(0));
    for (int64_t u = 0; u < U(); ++u) {
      const A* a = psg.data() + u * C;
      const A* b = psgx.data() + u * C;
      int64_t c = 0;
      for (; c + Vec::size() <= C; c += Vec::size()) {
        (Vec::loadu(s.data() + c) + Vec::loadu(a + c)).store(s.data() + c);
        (Vec::loadu(sx.data() + c) + Vec::loadu(b + c)).store(sx.data() + c);
      }
      for (; c < C; ++c) {
        s[c] += a[c];
        sx[c] += b[c];
      }
    }
    const A M = static_cast<A>(g.N * g.S);
    for (int64_t c = 0; c < C; ++c) {
      dgb[c] = s[c];
      dgw[c] = sx[c];
      if (k.training) {
        P[c] = k.rstd[c] * ((k.gw.p[c] * sx[c]) / M);
        Q[c] = k.rstd[c] * ((k.gw.p[c] * s[c]) / M);
      }
    }
  }

  // NHWC, per-sample sums (dgain, dbias (N, C)): combine()'s loops with samples outer and channels
  // inner, vectorised across channels (combine() per channel walked the (N, C) arrays with stride C)
  void combine_nhwc_per_sample(A* dgw, A* dgb) {
    using Vec = Vectorized<A>;
    const int64_t C = g.C;
    std::vector<A> a(C, A(0)), b(C, A(0));
    int64_t u = 0;
    for (int64_t n = 0; n < g.N; ++n) {
      A* s = dgb + n * C;
      A* sx = dgw + n * C;
      std::fill(s, s + C, A(0));
      std::fill(sx, sx + C, A(0));
      for (; u < U() && units[u].n0 == n; ++u) {
        const A* ps = psg.data() + u * C;
        const A* psx = psgx.data() + u * C;
        int64_t c = 0;
        for (; c + Vec::size() <= C; c += Vec::size()) {
          (Vec::loadu(s + c) + Vec::loadu(ps + c)).store(s + c);
          (Vec::loadu(sx + c) + Vec::loadu(psx + c)).store(sx + c);
        }
        for (; c < C; ++c) {
          s[c] += ps[c];
          sx[c] += psx[c];
        }
      }
      const A* w = k.gw.p + n * C;
      int64_t c = 0;
      for (; c + Vec::size() <= C; c += Vec::size()) {
        const Vec wv = Vec::loadu(w + c);
        (Vec::loadu(a.data() + c) + wv * Vec::loadu(s + c)).store(a.data() + c);
        (Vec::loadu(b.data() + c) + wv * Vec::loadu(sx + c)).store(b.data() + c);
      }
      for (; c < C; ++c) {
        a[c] += w[c] * s[c];
        b[c] += w[c] * sx[c];
      }
    }
    if (!k.training) return;
    const A M = static_cast<A>(g.N * g.S);
    for (int64_t c = 0; c < C; ++c) {
      P[c] = k.rstd[c] * (b[c] / M);
      Q[c] = k.rstd[c] * (a[c] / M);
    }
  }

  void run(A* dgw, A* dgb) {
    psg.assign(U() * g.C, A(0));
    psgx.assign(U() * g.C, A(0));
    P.assign(g.C, A(0));
    Q.assign(g.C, A(0));
    const int first = k.training ? 0 : 2;  // eval: dx and sums in one pass
    if (g.nhwc) {
      const int64_t per_unit = std::max<int64_t>(1, g.N * g.S * g.C / U());
      at::parallel_for(0, U(), grain_for(per_unit), [&](int64_t b, int64_t e) {
        std::vector<A> bx, bg, bd;
        for (int64_t u = b; u < e; ++u) nhwc_unit(u, first, bx, bg, bd);
      });
      if (k.per_sample) {
        combine_nhwc_per_sample(dgw, dgb);
      } else {
        combine_nhwc(dgw, dgb);
      }
      if (!k.training) return;
      at::parallel_for(0, U(), grain_for(per_unit), [&](int64_t b, int64_t e) {
        std::vector<A> bx, bg, bd;
        for (int64_t u = b; u < e; ++u) nhwc_unit(u, 1, bx, bg, bd);
      });
      return;
    }
    const int64_t per_channel = g.N * g.S;
    CB = channel_block(g);
    if (NB() >= 2 * at::get_num_threads()) {
      at::parallel_for(0, NB(), grain_for(per_channel * CB), [&](int64_t b, int64_t e) {
        std::vector<A> bx, bg, bd, acc;
        for (int64_t blk = b; blk < e; ++blk) {
          for (int64_t u = 0; u < U(); ++u) nchw_unit(blk, u, first, bx, bg, bd, acc);
          for (int64_t c = blk * CB; c < std::min(g.C, (blk + 1) * CB); ++c) combine(c, dgw, dgb);
          if (k.training)
            for (int64_t u = 0; u < U(); ++u) nchw_unit(blk, u, 1, bx, bg, bd, acc);
        }
      });
      return;
    }
    const int64_t per_unit = std::max<int64_t>(1, per_channel * CB / U());
    at::parallel_for(0, NB() * U(), grain_for(per_unit), [&](int64_t b, int64_t e) {
      std::vector<A> bx, bg, bd, acc;
      for (int64_t t = b; t < e; ++t) nchw_unit(t / U(), t % U(), first, bx, bg, bd, acc);
    });
    for (int64_t c = 0; c < g.C; ++c) combine(c, dgw, dgb);
    if (!k.training) return;
    at::parallel_for(0, NB() * U(), grain_for(per_unit), [&](int64_t b, int64_t e) {
      std::vector<A> bx, bg, bd, acc;
      for (int64_t t = b; t < e; ++t) nchw_unit(t / U(), t % U(), 1, bx, bg, bd, acc);
    });
  }
};

// ------------------------------------------------------------------ running statistics
template <typename A>
void update_running(const at::Tensor& rm, const at::Tensor& rv, const A* mean, const A* var_unbiased, int64_t C,
                    double f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rm.scalar_type(), "batch_norm_act_running", [&] {
    scalar_t* pm = rm.data_ptr<scalar_t>();
    const int64_t sm = rm.stride(0);
    for (int64_t c = 0; c < C; ++c)
      pm[c * sm] = static_cast<scalar_t>(f * static_cast<double>(mean[c]) + (1.0 - f) * static_cast<double>(pm[c * sm]));
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rv.scalar_type(), "batch_norm_act_running", [&] {
    scalar_t* pv = rv.data_ptr<scalar_t>();
    const int64_t sv = rv.stride(0);
    for (int64_t c = 0; c < C; ++c)
      pv[c * sv] =
          static_cast<scalar_t>(f * static_cast<double>(var_unbiased[c]) + (1.0 - f) * static_cast<double>(pv[c * sv]));
  });
}

Act act_of(bool apply_act, double slope) {
  if (!apply_act) return Act::None;
  return slope == 0.0 ? Act::Relu : Act::Leaky;
}

Geo geometry(const at::Tensor& x, bool nhwc) {
  const int64_t N = x.size(0), C = x.size(1);
  return {N, C, N * C != 0 ? x.numel() / (N * C) : 0, nhwc};
}

// ------------------------------------------------------------------ entry points
// flags: kTraining | kApplyAct | kPerSample (see batch_norm_act.h). stats (3, C) in the accumulation
// dtype: [mean, rstd, unbiased variance] of the batch (training) or of the running statistics (eval).
std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
                                           const c10::optional<at::Tensor>& bias,
                                           const c10::optional<at::Tensor>& running_mean,
                                           const c10::optional<at::Tensor>& running_var, double momentum, double eps,
                                           double slope, int64_t flags) {
  const bool training = flags & kTraining, apply_act = flags & kApplyAct, per_sample = flags & kPerSample;
  check_forward_args(x_in, weight, bias, running_mean, running_var, training, eps, per_sample, c10::DeviceType::CPU);
  bool nhwc = false;
  const at::Tensor x = dense_input(x_in, nhwc);
  const Geo g = geometry(x, nhwc);
  const auto acc = acc_type(x.scalar_type());
  at::Tensor y = at::empty_like(x);
  at::Tensor stats = at::empty({3, g.C}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act_fwd_cpu", [&] {
    using A = typename AccOf<scalar_t>::type;
    A* pmean = stats.data_ptr<A>();
    A* prstd = pmean + g.C;
    A* pvar = prstd + g.C;
    const bool empty = g.N * g.C * g.S == 0;
    if (!training) {
      // running statistics: mean = running_mean, rstd = 1 / sqrt(running_var + eps)
      Param<A> rm, rv;
      rm.init(running_mean, g.C, A(0));
      rv.init(running_var, g.C, A(1));
      for (int64_t c = 0; c < g.C; ++c) {
        pmean[c] = rm.p[c];
        prstd[c] = A(1) / std::sqrt(rv.p[c] + static_cast<A>(eps));
        pvar[c] = rv.p[c];
      }
    } else if (empty) {
      std::fill(pmean, pmean + 3 * g.C, std::numeric_limits<A>::quiet_NaN());
    }
    if (empty) return;
    Coefs<A> k;
    k.init(g, weight, bias, per_sample, training);
    k.mean = pmean;
    k.rstd = prstd;
    Forward<scalar_t, A> f{x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), g, make_units(g, false), k,
                           act_of(apply_act, slope), static_cast<A>(slope), eps, pmean, prstd, pvar};
    if (!training) {
      f.run_eval();
      return;
    }
    f.run_training();
    if (running_mean.has_value() && running_mean->defined())
      update_running<A>(*running_mean, *running_var, pmean, pvar, g.C, momentum);
  });
  return {y, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x_in,
                                                       const c10::optional<at::Tensor>& weight,
                                                       const c10::optional<at::Tensor>& bias, const at::Tensor& stats,
                                                       double slope, int64_t flags) {
  const bool training = flags & kTraining, apply_act = flags & kApplyAct, per_sample = flags & kPerSample;
  check_backward_args(grad_y, x_in, stats, c10::DeviceType::CPU);
  bool nhwc = false;
  const at::Tensor x = dense_input(x_in, nhwc);
  const at::Tensor g = like_layout(grad_y, x);
  const Geo geo = geometry(x, nhwc);
  const auto acc = acc_type(x.scalar_type());
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = per_sample ? at::empty({geo.N, geo.C}, x.options().dtype(acc)) : at::empty({geo.C}, x.options().dtype(acc));
  at::Tensor db = at::empty_like(dw);
  if (geo.N * geo.C * geo.S == 0) return {dx, dw.zero_(), db.zero_()};
  const at::Tensor st = stats.scalar_type() == acc && stats.is_contiguous() ? stats : stats.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act_bwd_cpu", [&] {
    using A = typename AccOf<scalar_t>::type;
    Coefs<A> k;
    k.init(geo, weight, bias, per_sample, training);
    k.mean = st.data_ptr<A>();
    k.rstd = k.mean + geo.C;
    k.all_channels();
    Backward<scalar_t, A> b{g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), geo,
                            make_units(geo, per_sample), k, act_of(apply_act, slope), static_cast<A>(slope)};
    b.run(dw.data_ptr<A>(), db.data_ptr<A>());
  });
  return {dx, dw, db};
}

}  // namespace
}  // namespace bn
}  // namespace ganengine

TORCH_LIBRARY_FRAGMENT(ganengine_C, m) {
  // flags: 1 training, 2 apply the activation, 4 per-sample (conditional) gain and bias
  m.def("batch_norm_act_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, float momentum, float eps, float slope, int flags) -> (Tensor, Tensor)");
  m.def("batch_norm_act_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor stats, float slope, "
        "int flags) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ganengine_C, CPU, m) {
  m.impl("batch_norm_act_fwd", &ganengine::bn::fwd_cpu);
  m.impl("batch_norm_act_bwd", &ganengine::bn::bwd_cpu);
}
