// Winograd convolution engine, CPU, fp32, NCHW in and out. Used by the conv3x3 family
// (conv_winograd3x3.cpp: F(m, 3), stride 1) and by the 4x4 convolutions of PatchGAN and the U-Net
// (conv_winograd.cpp: F(m, 4) at stride 1; stride 2 through the polyphase form below).
//
// A stride-1 r x r convolution does r*r multiply-adds per output and channel pair; F(m x m, r x r)
// computes an m x m output tile from an a x a input tile (a = m + r - 1) with a*a multiplies:
// 16 vs 36 for F(2, 3), 25 vs 64 for F(2, 4), 16 vs 36 for F(3, 2). oneDNN's direct convolution
// already runs near the FMA peak on this CPU class, so fewer multiplies is the way to be faster.
//
// Stride s (polyphase): a (s*r) x (s*r) stride-s convolution is a sum over the s*s phases (a, b) of
// stride-1 r x r convolutions between the phase planes x_ab[u, v] = xpad[s*u + a, s*v + b] and
// the phase kernels w_ab[i, j] = w[s*i + a, s*j + b]: one stride-1 convolution over C*s*s
// "virtual" input channels. A 4x4 stride-2 conv is F(m, 2) over 4C channels.
//
//   V[xi, c', t]  = (B^T d_t B)[xi]    input transform   (per (n, c), its s*s phase planes)
//   Ut[xi, k, c'] = (G w' G^T)[xi]     weight transform  (tiny)
//   M[xi]         = Ut[xi] @ V[xi]     a*a GEMMs (MKL, near peak)
//   y_t           = A^T M_t A + bias   output transform
//
// Backward is the adjoint of each step: dM = A dy A^T; dV = Ut^T @ dM and dx = B dV B^T
// accumulated over overlapping tiles and scattered back through the phase maps; dUt = dM @ V^T
// and dw = G^T dU G. A transposed convolution is the data-gradient of the convolution with the
// same weight, so the same three steps serve it (conv_winograd.cpp).
//
// Padding: zeros (any p) or reflect (stride 1, p < H, W), applied while a plane is copied into
// the transform's layout, so ReflectionPad2d + Conv2d never writes the padded tensor.
// Layout: one (n, c) plane per task; vectors run along 8/16 neighbouring tiles of a tile row.
// Transformed tensors are (a*a, rows, T) with T = N * tiles; the a*a GEMMs are split across
// threads whole (single-threaded MKL each: measured faster than one threaded at::bmm on 2
// cores, see GANENGINE_WINOGRAD_GEMM).
//
// Transform matrices: Toom-Cook at the points listed with each (plus infinity), G carrying the
// 1/prod(p_j - p_l) factors; generated and checked exactly (rational arithmetic) by
// ganengine/tools/winograd_matrices.py, which also prints each choice's fp32 error.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace ganengine {
namespace winograd {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();

template <int M, int R> struct Wino;
// F(2, 3), points 0, 1, -1 (Lavin & Gray 2016): fp32 error ~1.1x the direct conv's
template <> struct Wino<2, 3> {
  static constexpr int A = 4;
  static constexpr float BT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr float G[4][3] = {{1, 0, 0}, {0.5f, 0.5f, 0.5f}, {0.5f, -0.5f, 0.5f}, {0, 0, 1}};
  static constexpr float AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};
// F(4, 3), points 0, +-1, +-2: 16-26x the direct conv's fp32 error (opt-in)
template <> struct Wino<4, 3> {
  static constexpr int A = 6;
  static constexpr float BT[6][6] = {{4, 0, -5, 0, 1, 0}, {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                                     {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
  static constexpr float G[6][3] = {{0.25f, 0, 0},
                                    {-1.f / 6, -1.f / 6, -1.f / 6},
                                    {-1.f / 6, 1.f / 6, -1.f / 6},
                                    {1.f / 24, 1.f / 12, 1.f / 6},
                                    {1.f / 24, -1.f / 12, 1.f / 6},
                                    {0, 0, 1}};
  static constexpr float AT[4][6] = {
      {1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};
};
// F(2, 2), points 0, 1: 2.3-2.4x the direct conv's error
template <> struct Wino<2, 2> {
  static constexpr int A = 3;
  static constexpr float BT[3][3] = {{-1, 1, 0}, {0, 1, 0}, {0, -1, 1}};
  static constexpr float G[3][2] = {{-1, 0}, {1, 1}, {0, 1}};
  static constexpr float AT[2][3] = {{1, 1, 0}, {0, 1, 1}};
};
// F(3, 2), points 0, 1, -1: 1.6-2.4x
template <> struct Wino<3, 2> {
  static constexpr int A = 4;
  static constexpr float BT[4][4] = {{-1, 0, 1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, -1, 0, 1}};
  static constexpr float G[4][2] = {{-1, 0}, {1.f / 2, 1.f / 2}, {1.f / 2, -1.f / 2}, {0, 1}};
  static constexpr float AT[3][4] = {{1, 1, 1, 0}, {0, 1, -1, 0}, {0, 1, 1, 1}};
};
// F(4, 2), points 0, 1, -1, 2: 13-17x
template <> struct Wino<4, 2> {
  static constexpr int A = 5;
  static constexpr float BT[5][5] = {
      {2, -1, -2, 1, 0}, {0, -2, -1, 1, 0}, {0, 2, -3, 1, 0}, {0, -1, 0, 1, 0}, {0, 2, -1, -2, 1}};
  static constexpr float G[5][2] = {{1.f / 2, 0}, {-1.f / 2, -1.f / 2}, {-1.f / 6, 1.f / 6}, {1.f / 6, 1.f / 3}, {0, 1}};
  static constexpr float AT[4][5] = {{1, 1, 1, 1, 0}, {0, 1, -1, 2, 0}, {0, 1, 1, 4, 0}, {0, 1, -1, 8, 1}};
};
// F(2, 4), points 0, 1, -1, -2: 3.5-4x
template <> struct Wino<2, 4> {
  static constexpr int A = 5;
  static constexpr float BT[5][5] = {
      {-2, -1, 2, 1, 0}, {0, 2, 3, 1, 0}, {0, -2, 1, 1, 0}, {0, -1, 0, 1, 0}, {0, -2, -1, 2, 1}};
  static constexpr float G[5][4] = {{-1.f / 2, 0, 0, 0},
                                    {1.f / 6, 1.f / 6, 1.f / 6, 1.f / 6},
                                    {1.f / 2, -1.f / 2, 1.f / 2, -1.f / 2},
                                    {-1.f / 6, 1.f / 3, -2.f / 3, 4.f / 3},
                                    {0, 0, 0, 1}};
  static constexpr float AT[2][5] = {{1, 1, 1, 1, 0}, {0, 1, -1, -2, 1}};
};
// F(3, 4), points 0, 1, -1, 1/2, -1/2: 8-12x
template <> struct Wino<3, 4> {
  static constexpr int A = 6;
  static constexpr float BT[6][6] = {{1.f / 4, 0, -5.f / 4, 0, 1, 0},  {0, -1.f / 4, -1.f / 4, 1, 1, 0},
                                     {0, 1.f / 4, -1.f / 4, -1, 1, 0}, {0, -1.f / 2, -1, 1.f / 2, 1, 0},
                                     {0, 1.f / 2, -1, -1.f / 2, 1, 0}, {0, 1.f / 4, 0, -5.f / 4, 0, 1}};
  static constexpr float G[6][4] = {{4, 0, 0, 0},
                                    {2.f / 3, 2.f / 3, 2.f / 3, 2.f / 3},
                                    {2.f / 3, -2.f / 3, 2.f / 3, -2.f / 3},
                                    {-8.f / 3, -4.f / 3, -2.f / 3, -1.f / 3},
                                    {-8.f / 3, 4.f / 3, -2.f / 3, 1.f / 3},
                                    {0, 0, 0, 1}};
  static constexpr float AT[3][6] = {
      {1, 1, 1, 1, 1, 0}, {0, 1, -1, 1.f / 2, -1.f / 2, 0}, {0, 1, 1, 1.f / 4, 1.f / 4, 1}};
};

// Non-finite detection for the final outputs of a pass (y, dx, dw): v - v is 0 for every finite
// v and NaN for +-inf and NaN, so a running sum of it stays 0 exactly while every value seen is
// finite. Two vector ops per output vector; a call that sees a non-finite value is redone by the
// caller on ATen's convolution, which keeps eager's non-finite values and positions (a Winograd
// transform spreads one inf/NaN over its whole tile and turns +inf into NaN through its
// differences).
inline Vec nonfinite_acc(const Vec& acc, const Vec& v) { return acc + (v - v); }
inline bool any_nonfinite(const Vec& acc) {
  alignas(64) float lanes[kVec];
  acc.store(lanes);
  bool bad = false;
  for (int64_t l = 0; l < kVec; ++l) bad |= lanes[l] != 0.f;  // NaN != 0 is true
  return bad;
}
inline bool any_nonfinite(const float* p, int64_t n) {
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) acc = nonfinite_acc(acc, Vec::loadu(p + i));
  if (i < n) acc = nonfinite_acc(acc, Vec::loadu(p + i, n - i));  // (the partial load zero-fills)
  return any_nonfinite(acc);
}

// acc += c * v for a compile-time constant c (after unrolling the branches fold away, so zero
// coefficients cost nothing and +-1 cost one add)
inline Vec madd(float c, const Vec& v, const Vec& acc) {
  if (c == 0.f) return acc;
  if (c == 1.f) return acc + v;
  if (c == -1.f) return acc - v;
  return at::vec::fmadd(Vec(c), v, acc);
}

// out[i][j] = sum_k L[i][k] in[k][j]  (L: R x K, in: K x C)
template <int R, int K, int C, bool TRANS>
inline void left(const float (&L)[TRANS ? K : R][TRANS ? R : K], const Vec (&in)[K][C], Vec (&out)[R][C]) {
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < C; ++j) {
      Vec acc(0.f);
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k) acc = madd(TRANS ? L[k][i] : L[i][k], in[k][j], acc);
      out[i][j] = acc;
    }
}

// out[i][j] = sum_k in[i][k] R[j][k]  (in: R0 x K, R: C x K; i.e. in @ R^T)
template <int R0, int K, int C, bool TRANS>
inline void right(const Vec (&in)[R0][K], const float (&Rm)[TRANS ? K : C][TRANS ? C : K], Vec (&out)[R0][C]) {
#pragma GCC unroll 8
  for (int i = 0; i < R0; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < C; ++j) {
      Vec acc(0.f);
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k) acc = madd(TRANS ? Rm[k][j] : Rm[j][k], in[i][k], acc);
      out[i][j] = acc;
    }
}

// The convolution as the engine sees it: input (N, C, H, W), kernel (S*R) x (S*R) at stride S
// (S*S phase planes of R x R taps each), output (N, K, Ho, Wo) in TY x TX tiles of M x M.
struct Geometry {
  int64_t N, C, H, W, S, R, pad_h, pad_w;
  bool reflect;
  int64_t Ho, Wo, M, TY, TX;
  int64_t phases() const { return S * S; }
  int64_t virtual_channels() const { return C * S * S; }  // the GEMMs' inner dimension (forward)
  int64_t tiles() const { return N * TY * TX; }
  int64_t plane_rows() const { return TY * M + R - 1; }   // phase-plane rows the tiles read
  int64_t plane_qs() const { return TX + (M + R - 2) / M; }  // entries per column phase (below)
};

inline Geometry geometry(int64_t N, int64_t C, int64_t H, int64_t W, int64_t S, int64_t R, int64_t pad_h,
                         int64_t pad_w, bool reflect, int64_t M) {
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0, "ganengine winograd: padding must be >= 0, got ", pad_h, ", ", pad_w);
  TORCH_CHECK(S >= 1 && R >= 1 && M >= 1, "ganengine winograd: bad stride/taps/tile ", S, "/", R, "/", M);
  const int64_t k = S * R;
  Geometry g{N, C, H, W, S, R, pad_h, pad_w, reflect, 0, 0, M, 0, 0};
  TORCH_CHECK(H + 2 * pad_h >= k && W + 2 * pad_w >= k, "ganengine winograd: a ", H, "x", W,
              " input with padding (", pad_h, ", ", pad_w, ") is smaller than the ", k, "x", k, " kernel");
  g.Ho = (H + 2 * pad_h - k) / S + 1;
  g.Wo = (W + 2 * pad_w - k) / S + 1;
  if (reflect) {
    TORCH_CHECK(S == 1, "ganengine winograd: reflect padding needs stride 1, got ", S);
    TORCH_CHECK(pad_h < H && pad_w < W, "ganengine winograd: reflect padding (", pad_h, ", ", pad_w,
                ") must be smaller than the input's H and W, got ", H, "x", W);
  }
  g.TY = (g.Ho + M - 1) / M;
  g.TX = (g.Wo + M - 1) / M;
  return g;
}

// source index of padded coordinate r along an axis of length L, or -1 for a zero
inline int64_t source_index(int64_t r, int64_t L, int64_t pad, bool reflect) {
  r -= pad;
  if (r >= 0 && r < L) return r;
  if (!reflect || r < -pad || r >= L + pad) return -1;  // zero pad, or beyond the padded extent
  return r < 0 ? -r : 2 * (L - 1) - r;
}

// For each phase a (0..S-1) along an axis: the source index of phase-plane coordinate u (padded
// coordinate S*u + a), for u in [0, n); -1 (a zero) past the last coordinate the output reads
// (out + R - 1), so the adjoint never scatters into input the convolution did not read.
inline std::vector<std::vector<int64_t>> phase_maps(int64_t n, int64_t L, int64_t pad, int64_t out,
                                                    const Geometry& g) {
  std::vector<std::vector<int64_t>> maps(g.S, std::vector<int64_t>(n));
  for (int64_t a = 0; a < g.S; ++a)
    for (int64_t u = 0; u < n; ++u)
      maps[a][u] = u < out + g.R - 1 ? source_index(g.S * u + a, L, pad, g.reflect) : -1;
  return maps;
}

// Entry q of a column-phase row (column phase ph of stride phase b) reads source column
// map[q * M + ph]; inside [lo, hi) that is off + step * q (no padding involved), so that part
// runs as a branch-free strided copy and only the padded ends look the map up.
struct ColumnRun {
  int64_t lo, hi, off, step;
};
inline ColumnRun column_run(const std::vector<int64_t>& map, int64_t Q, int64_t M, int64_t ph, int64_t S,
                            int64_t b, int64_t pad) {
  ColumnRun run{0, 0, S * ph + b - pad, S * M};
  auto fits = [&](int64_t q) { return map[q * M + ph] >= 0 && map[q * M + ph] == run.off + run.step * q; };
  while (run.lo < Q && !fits(run.lo)) ++run.lo;
  run.hi = run.lo;
  while (run.hi < Q && fits(run.hi)) ++run.hi;
  return run;
}
// runs[b][ph] for every stride phase b and column phase ph
inline std::vector<std::vector<ColumnRun>> column_runs(const std::vector<std::vector<int64_t>>& maps, int64_t Q,
                                                       int64_t M, const Geometry& g) {
  std::vector<std::vector<ColumnRun>> runs(g.S);
  for (int64_t b = 0; b < g.S; ++b)
    for (int64_t ph = 0; ph < M; ++ph) runs[b].push_back(column_run(maps[b], Q, M, ph, g.S, b, g.pad_w));
  return runs;
}

inline Vec load(const float* p, int64_t n) { return n == kVec ? Vec::loadu(p) : Vec::loadu(p, n); }
inline void store(const Vec& v, float* p, int64_t n) {
  if (n == kVec) v.store(p);
  else v.store(p, n);
}

// a*a matrices (rows, T) with unit stride along T: planes[xi] + row * ld + t
struct Planes {
  std::array<float*, 36> ptr{};
  int64_t ld = 0;
};

inline Planes planes_of(const at::Tensor& t, int64_t a2, int64_t rows, int64_t T, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 3 && t.size(0) == a2 && t.size(1) == rows &&
                  t.size(2) == T && t.stride(2) == 1 && a2 <= 36,
              "ganengine winograd: ", what, " must be an fp32 (", a2, ", ", rows, ", ", T,
              ") tensor with unit stride along its last dim, got ", t.sizes(), " ", t.strides(), " ",
              t.scalar_type());
  Planes p;
  for (int64_t i = 0; i < a2; ++i) p.ptr[i] = const_cast<float*>(t.const_data_ptr<float>()) + i * t.stride(0);
  p.ld = t.stride(1);
  return p;
}

// One phase plane at a time (planes are independent: no races, everything stays in L1/L2),
// vectors run along the neighbouring tiles of a tile row. A tile's column j sits at plane
// column M * tx + j, so the plane is first copied into "column phase" layout
// buf[row][j % M][q] (= plane column M * q + j % M), padding applied once; then every tile
// vector is one contiguous load of buf[row][j % M][tx0 + j / M ...].
template <int M>
struct PhasePlane {
  int64_t q;  // entries per column-phase row (with a vector of slack)
  std::vector<float> buf;
  PhasePlane(int64_t rows, int64_t qs) : q(qs + kVec), buf(rows * M * q) {}
  float* at(int64_t r, int64_t ph) { return buf.data() + (r * M + ph) * q; }
};

// x (N, C, H, W) NCHW-dense -> V (a*a, C*S*S, T), T = N * TY * TX; row c*S*S + a*S + b holds
// channel c's phase plane (a, b)
template <int M, int R>
void input_transform(const float* xp, const Geometry& g, const Planes& vp) {
  RECORD_FUNCTION("ganengine::winograd_input_transform", c10::ArrayRef<c10::IValue>{});
  constexpr int A = M + R - 1;
  const int64_t tpn = g.TY * g.TX, Hp = g.plane_rows(), Q = g.plane_qs(), P = g.phases();
  const auto rowmaps = phase_maps(Hp, g.H, g.pad_h, g.Ho, g), colmaps = phase_maps(Q * M, g.W, g.pad_w, g.Wo, g);
  const auto runs = column_runs(colmaps, Q, M, g);
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t p0, int64_t p1) {
    PhasePlane<M> pl(Hp, Q);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = p / g.C, c = p % g.C;
      const float* src = xp + p * g.H * g.W;
      for (int64_t s = 0; s < P; ++s) {
        const auto& rowmap = rowmaps[s / g.S];
        const auto& colmap = colmaps[s % g.S];
        for (int64_t r = 0; r < Hp; ++r)
          for (int ph = 0; ph < M; ++ph) {
            float* dst = pl.at(r, ph);
            if (rowmap[r] < 0) {
              std::fill(dst, dst + Q, 0.f);
              continue;
            }
            const float* srow = src + rowmap[r] * g.W;
            const ColumnRun& run = runs[s % g.S][ph];
            for (int64_t q = 0; q < run.lo; ++q) dst[q] = colmap[q * M + ph] < 0 ? 0.f : srow[colmap[q * M + ph]];
            const float* sp = srow + run.off;
            for (int64_t q = run.lo; q < run.hi; ++q) dst[q] = sp[run.step * q];
            for (int64_t q = run.hi; q < Q; ++q) dst[q] = colmap[q * M + ph] < 0 ? 0.f : srow[colmap[q * M + ph]];
          }
        const int64_t row = c * P + s;
        for (int64_t ty = 0; ty < g.TY; ++ty)
          for (int64_t tx0 = 0; tx0 < g.TX; tx0 += kVec) {
            const int64_t nt = std::min<int64_t>(kVec, g.TX - tx0);
            Vec d[A][A], tmp[A][A], v[A][A];
            for (int i = 0; i < A; ++i)
              for (int j = 0; j < A; ++j) d[i][j] = Vec::loadu(pl.at(ty * M + i, j % M) + tx0 + j / M);
            left<A, A, A, false>(Wino<M, R>::BT, d, tmp);   // B^T d
            right<A, A, A, false>(tmp, Wino<M, R>::BT, v);  // (B^T d) B
            const int64_t t = n * tpn + ty * g.TX + tx0;
            for (int i = 0; i < A; ++i)
              for (int j = 0; j < A; ++j) store(v[i][j], vp.ptr[i * A + j] + row * vp.ld + t, nt);
          }
      }
    }
  });
}

// M (a*a, K, T) -> y (N, K, Ho, Wo) NCHW-dense, plus bias (may be null)
// Returns whether any output written is non-finite.
template <int M, int R>
bool output_transform(const Planes& mp, const float* bp, const Geometry& g, int64_t K, float* yp) {
  RECORD_FUNCTION("ganengine::winograd_output_transform", c10::ArrayRef<c10::IValue>{});
  constexpr int A = M + R - 1;
  const int64_t tpn = g.TY * g.TX;
  std::atomic<bool> bad{false};
  at::parallel_for(0, g.N * K, 1, [&](int64_t p0, int64_t p1) {
    alignas(64) float row[M][kVec * M];
    Vec chk(0.f);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = p / K, k = p % K;
      float* dst = yp + p * g.Ho * g.Wo;
      const Vec bv(bp ? bp[k] : 0.f);
      for (int64_t ty = 0; ty < g.TY; ++ty) {
        const int64_t mh = std::min<int64_t>(M, g.Ho - ty * M);
        for (int64_t tx0 = 0; tx0 < g.TX; tx0 += kVec) {
          const int64_t nt = std::min<int64_t>(kVec, g.TX - tx0);
          const int64_t t = n * tpn + ty * g.TX + tx0;
          Vec m[A][A], tmp[M][A], out[M][M];
          for (int i = 0; i < A; ++i)
            for (int j = 0; j < A; ++j) m[i][j] = load(mp.ptr[i * A + j] + k * mp.ld + t, nt);
          left<M, A, A, false>(Wino<M, R>::AT, m, tmp);     // A^T m
          right<M, A, M, false>(tmp, Wino<M, R>::AT, out);  // (A^T m) A
          alignas(64) float lanes[kVec];
          for (int i = 0; i < mh; ++i)
            for (int j = 0; j < M; ++j) {
              const Vec o = out[i][j] + bv;  // lanes past the row's last tile come from zeros
              chk = nonfinite_acc(chk, o);
              o.store(lanes);
              for (int l = 0; l < kVec; ++l) row[i][l * M + j] = lanes[l];
            }
          const int64_t x0 = tx0 * M, w = std::min<int64_t>(nt * M, g.Wo - x0);
          for (int i = 0; i < mh; ++i) std::memcpy(dst + (ty * M + i) * g.Wo + x0, row[i], w * sizeof(float));
        }
      }
    }
    if (any_nonfinite(chk)) bad.store(true, std::memory_order_relaxed);
  });
  return bad.load();
}

// dy (N, K, Ho, Wo) NCHW-dense -> dM (a*a, K, T) = A dy A^T (outside the output: zero)
template <int M, int R>
void output_transform_adjoint(const float* gp, const Geometry& g, int64_t K, const Planes& mp) {
  RECORD_FUNCTION("ganengine::winograd_output_transform_adjoint", c10::ArrayRef<c10::IValue>{});
  constexpr int A = M + R - 1;
  const int64_t tpn = g.TY * g.TX;
  at::parallel_for(0, g.N * K, 1, [&](int64_t p0, int64_t p1) {
    PhasePlane<M> pl(g.TY * M, g.TX);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = p / K, k = p % K;
      const float* src = gp + p * g.Ho * g.Wo;
      for (int64_t r = 0; r < g.TY * M; ++r)
        for (int ph = 0; ph < M; ++ph) {
          float* dst = pl.at(r, ph);
          const int64_t inside = r < g.Ho ? (g.Wo - ph + M - 1) / M : 0;  // q with q * M + ph < Wo
          const float* srow = src + r * g.Wo + ph;
          for (int64_t q = 0; q < inside; ++q) dst[q] = srow[q * M];
          std::fill(dst + inside, dst + g.TX, 0.f);
        }
      for (int64_t ty = 0; ty < g.TY; ++ty)
        for (int64_t tx0 = 0; tx0 < g.TX; tx0 += kVec) {
          const int64_t nt = std::min<int64_t>(kVec, g.TX - tx0);
          Vec d[M][M], tmp[A][M], out[A][A];
          for (int i = 0; i < M; ++i)
            for (int j = 0; j < M; ++j) d[i][j] = Vec::loadu(pl.at(ty * M + i, j) + tx0);
          left<A, M, M, true>(Wino<M, R>::AT, d, tmp);     // A dy     (A = AT^T)
          right<A, M, A, true>(tmp, Wino<M, R>::AT, out);  // (A dy) A^T
          const int64_t t = n * tpn + ty * g.TX + tx0;
          for (int i = 0; i < A; ++i)
            for (int j = 0; j < A; ++j) store(out[i][j], mp.ptr[i * A + j] + k * mp.ld + t, nt);
        }
    }
  });
}

// dV (a*a, C*S*S, T) -> dx (N, C, H, W) NCHW-dense: B dV B^T per tile, summed over overlapping
// tiles in a column-phase accumulator per phase plane, then scattered through the phase maps
// (reflect padding's gradient folds back, zero padding's is dropped). dx starts at bias[c]
// when bias is given (a transposed convolution's bias).
// Returns whether any value of dx is non-finite.
template <int M, int R>
bool input_transform_adjoint(const Planes& vp, const Geometry& g, const float* bias, float* xp) {
  RECORD_FUNCTION("ganengine::winograd_input_transform_adjoint", c10::ArrayRef<c10::IValue>{});
  constexpr int A = M + R - 1;
  const int64_t Hp = g.plane_rows(), Q = g.plane_qs(), tpn = g.TY * g.TX, P = g.phases();
  const auto rowmaps = phase_maps(Hp, g.H, g.pad_h, g.Ho, g), colmaps = phase_maps(Q * M, g.W, g.pad_w, g.Wo, g);
  const auto runs = column_runs(colmaps, Q, M, g);
  std::atomic<bool> bad{false};
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t p0, int64_t p1) {
    PhasePlane<M> pl(Hp, Q);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = p / g.C, c = p % g.C;
      float* dst = xp + p * g.H * g.W;
      std::fill(dst, dst + g.H * g.W, bias ? bias[c] : 0.f);
      for (int64_t s = 0; s < P; ++s) {
        const auto& rowmap = rowmaps[s / g.S];
        const auto& colmap = colmaps[s % g.S];
        const int64_t row = c * P + s;
        std::fill(pl.buf.begin(), pl.buf.end(), 0.f);
        for (int64_t ty = 0; ty < g.TY; ++ty)
          for (int64_t tx0 = 0; tx0 < g.TX; tx0 += kVec) {
            const int64_t nt = std::min<int64_t>(kVec, g.TX - tx0);
            const int64_t t = n * tpn + ty * g.TX + tx0;
            Vec v[A][A], tmp[A][A], out[A][A];
            for (int i = 0; i < A; ++i)  // lanes past the row's last tile load as zero
              for (int j = 0; j < A; ++j) v[i][j] = load(vp.ptr[i * A + j] + row * vp.ld + t, nt);
            left<A, A, A, true>(Wino<M, R>::BT, v, tmp);     // B dV
            right<A, A, A, true>(tmp, Wino<M, R>::BT, out);  // (B dV) B^T
            for (int i = 0; i < A; ++i)
              for (int j = 0; j < A; ++j) {
                float* q = pl.at(ty * M + i, j % M) + tx0 + j / M;
                (Vec::loadu(q) + out[i][j]).store(q);
              }
          }
        for (int64_t r = 0; r < Hp; ++r) {
          if (rowmap[r] < 0) continue;
          float* drow = dst + rowmap[r] * g.W;
          for (int ph = 0; ph < M; ++ph) {
            const float* acc = pl.at(r, ph);
            const ColumnRun& run = runs[s % g.S][ph];
            for (int64_t q = 0; q < run.lo; ++q)
              if (colmap[q * M + ph] >= 0) drow[colmap[q * M + ph]] += acc[q];
            float* dp = drow + run.off;
            for (int64_t q = run.lo; q < run.hi; ++q) dp[run.step * q] += acc[q];
            for (int64_t q = run.hi; q < Q; ++q)
              if (colmap[q * M + ph] >= 0) drow[colmap[q * M + ph]] += acc[q];
          }
        }
      }
      // the finished plane is still in cache: one more read of it
      if (any_nonfinite(dst, g.H * g.W)) bad.store(true, std::memory_order_relaxed);
    }
  });
  return bad.load();
}

// ---- workspaces ----
// The transformed tensors are 2-3x the size of the activations (the transformed weights 1.5-2x
// the weight) and live only inside one call. Fresh multi-MB allocations come back from glibc as
// new pages each time and pay a page fault per 4 KiB (measured: 3 ms of 7 ms for a 16 MiB
// transform), so each thread keeps its buffers and reuses them.
enum Slot { kV = 0, kM = 1, kDM = 2, kDV = 3, kU = 4, kDU = 5, kSlots = 6 };
inline at::Tensor workspace(int slot, int64_t a2, int64_t rows, int64_t T) {
  static thread_local std::array<at::Tensor, kSlots> ws;
  const int64_t stride = rows * T + 16;  // the xi stride padded off a power of two (cache sets)
  if (!ws[slot].defined() || ws[slot].numel() < a2 * stride) ws[slot] = at::empty({a2 * stride}, at::kFloat);
  return ws[slot].as_strided({a2, rows, T}, {stride, T, 1});
}

// w (K, C, S*R, S*R) -> Ut (a*a, K, C*S*S) = G w_ab G^T per (k, c, phase ab). Vectorised along
// kVec consecutive (k, c, ab): their taps are gathered into vectors, the products run as in the
// data transforms, and every transform point is one contiguous store.
template <int M, int R>
at::Tensor weight_transform(const at::Tensor& w, const Geometry& g) {
  constexpr int A = M + R - 1;
  const auto wc = w.contiguous();
  const int64_t K = wc.size(0), P = g.phases(), KCP = K * g.C * P, k = g.S * R;
  auto ut = workspace(kU, A * A, K, g.C * P);
  const float* wp = wc.const_data_ptr<float>();
  float* up = ut.data_ptr<float>();
  const int64_t ld = ut.stride(0);
  at::parallel_for(0, (KCP + kVec - 1) / kVec, 16, [&](int64_t b0, int64_t b1) {
    alignas(64) float taps[R][R][kVec];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kVec, nl = std::min<int64_t>(kVec, KCP - i0);
      for (int64_t l = 0; l < kVec; ++l) {
        const int64_t i = i0 + std::min(l, nl - 1);  // lanes past the end repeat the last one
        const int64_t s = i % P, a = s / g.S, b = s % g.S;
        const float* src = wp + (i / P) * k * k + a * k + b;
        for (int u = 0; u < R; ++u)
          for (int v = 0; v < R; ++v) taps[u][v][l] = src[g.S * (u * k + v)];
      }
      Vec f[R][R], t[A][R], out[A][A];
      for (int u = 0; u < R; ++u)
        for (int v = 0; v < R; ++v) f[u][v] = Vec::loadu(taps[u][v]);
      left<A, R, R, false>(Wino<M, R>::G, f, t);     // G f
      right<A, R, A, false>(t, Wino<M, R>::G, out);  // (G f) G^T
      for (int x = 0; x < A; ++x)
        for (int y = 0; y < A; ++y) store(out[x][y], up + (x * A + y) * ld + i0, nl);
    }
  });
  return ut;
}

// dUt (a*a, K, C*S*S) -> dw (K, C, S*R, S*R) = G^T dU_ab G, each phase's taps in place
template <int M, int R>
at::Tensor weight_transform_adjoint(const at::Tensor& dut, const Geometry& g, int64_t K, bool& nonfinite) {
  constexpr int A = M + R - 1;
  const int64_t P = g.phases(), KCP = K * g.C * P, k = g.S * R;
  TORCH_CHECK(dut.stride(2) == 1 && dut.stride(1) == g.C * P, "ganengine winograd: dUt must be dense per point");
  auto dw = at::empty({K, g.C, k, k}, dut.options());
  const float* dp = dut.const_data_ptr<float>();
  const int64_t ld = dut.stride(0);
  float* wp = dw.data_ptr<float>();
  std::atomic<bool> bad{false};
  at::parallel_for(0, (KCP + kVec - 1) / kVec, 16, [&](int64_t b0, int64_t b1) {
    alignas(64) float taps[R][R][kVec];
    Vec chk(0.f);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kVec, nl = std::min<int64_t>(kVec, KCP - i0);
      Vec d[A][A], t[R][A], f[R][R];
      for (int x = 0; x < A; ++x)
        for (int y = 0; y < A; ++y) d[x][y] = load(dp + (x * A + y) * ld + i0, nl);
      left<R, A, A, true>(Wino<M, R>::G, d, t);     // G^T dU
      right<R, A, R, true>(t, Wino<M, R>::G, f);    // (G^T dU) G
      for (int u = 0; u < R; ++u)
        for (int v = 0; v < R; ++v) {
          chk = nonfinite_acc(chk, f[u][v]);  // (lanes past nl were loaded as zeros)
          f[u][v].store(taps[u][v]);
        }
      for (int64_t l = 0; l < nl; ++l) {
        const int64_t i = i0 + l, s = i % P, a = s / g.S, b = s % g.S;
        float* dst = wp + (i / P) * k * k + a * k + b;
        for (int u = 0; u < R; ++u)
          for (int v = 0; v < R; ++v) dst[g.S * (u * k + v)] = taps[u][v][l];
      }
    }
    if (any_nonfinite(chk)) bad.store(true, std::memory_order_relaxed);
  });
  nonfinite = nonfinite || bad.load();
  return dw;
}

// out[xi] = a[xi] @ b[xi] for every transform point. GANENGINE_WINOGRAD_GEMM=split (default)
// gives each thread whole GEMMs (single-threaded MKL inside at::parallel_for), "bmm" one
// threaded at::bmm.
inline void batched_gemm(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  static const bool split = [] {
    const char* e = std::getenv("GANENGINE_WINOGRAD_GEMM");
    return !(e && std::string(e) == "bmm");
  }();
  if (!split) {
    at::bmm_out(out, a, b);
    return;
  }
  at::parallel_for(0, a.size(0), 1, [&](int64_t i0, int64_t i1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // (thread-local: set inside the worker)
    for (int64_t i = i0; i < i1; ++i) {
      auto o = out.select(0, i);
      at::mm_out(o, a.select(0, i), b.select(0, i));
    }
  });
}

// ---- the three passes ----
// y (N, K, Ho, Wo) = conv(x, w) + bias; x NCHW-dense fp32, w (K, C, S*R, S*R) fp32.
// `nonfinite` is set when y holds an inf or NaN (the caller redoes the call on ATen).
template <int M, int R>
at::Tensor forward(const at::Tensor& x, const at::Tensor& w, const float* bias, const Geometry& g, bool& nonfinite) {
  constexpr int A2 = (M + R - 1) * (M + R - 1);
  const int64_t K = w.size(0), T = g.tiles(), Cv = g.virtual_channels();
  auto V = workspace(kV, A2, Cv, T);
  input_transform<M, R>(x.const_data_ptr<float>(), g, planes_of(V, A2, Cv, T, "V"));
  auto Mt = workspace(kM, A2, K, T);
  batched_gemm(Mt, weight_transform<M, R>(w, g), V);
  auto y = at::empty({g.N, K, g.Ho, g.Wo}, x.options().memory_format(at::MemoryFormat::Contiguous));
  nonfinite = output_transform<M, R>(planes_of(Mt, A2, K, T, "M"), bias, g, K, y.data_ptr<float>());
  return y;
}

// dx (N, C, H, W) and dw (K, C, S*R, S*R) of y = conv(x, w) from dy (N, K, Ho, Wo), NCHW-dense.
// x is read only for dw. dx starts at dx_bias[c] when given (a transposed convolution's bias).
// `nonfinite` is set when dx or dw holds an inf or NaN.
template <int M, int R>
std::pair<at::Tensor, at::Tensor> backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                           const Geometry& g, bool need_dx, bool need_dw, bool& nonfinite,
                                           const float* dx_bias = nullptr) {
  constexpr int A2 = (M + R - 1) * (M + R - 1);
  const int64_t K = w.size(0), T = g.tiles(), Cv = g.virtual_channels();
  auto dM = workspace(kDM, A2, K, T);
  output_transform_adjoint<M, R>(dy.const_data_ptr<float>(), g, K, planes_of(dM, A2, K, T, "dM"));
  at::Tensor dx, dw;
  if (need_dx) {
    auto dV = workspace(kDV, A2, Cv, T);
    batched_gemm(dV, weight_transform<M, R>(w, g).transpose(1, 2), dM);
    dx = at::empty({g.N, g.C, g.H, g.W}, dy.options().memory_format(at::MemoryFormat::Contiguous));
    nonfinite = input_transform_adjoint<M, R>(planes_of(dV, A2, Cv, T, "dV"), g, dx_bias, dx.data_ptr<float>()) ||
                nonfinite;
  }
  if (need_dw) {
    auto V = workspace(kV, A2, Cv, T);
    input_transform<M, R>(x.const_data_ptr<float>(), g, planes_of(V, A2, Cv, T, "V"));
    auto dUt = workspace(kDU, A2, K, Cv);
    batched_gemm(dUt, dM, V.transpose(1, 2));
    dw = weight_transform_adjoint<M, R>(dUt, g, K, nonfinite);
  }
  return {dx, dw};
}

}  // namespace winograd
}  // namespace ganengine
