// conv3x3 family, CPU: Winograd F(m x m, 3 x 3) convolution, forward and backward.
//
// A 3x3 stride-1 convolution does 9 multiply-adds per output and input channel; the
// Winograd form F(m, 3) computes an m x m output tile from an a x a input tile (a = m + 2)
// with a*a multiplies per channel pair instead of 9*m*m: 16 vs 36 for F(2, 3) (2.25x fewer),
// 36 vs 144 for F(4, 3) (4x). oneDNN's direct convolution already runs at the FMA peak on
// this CPU class, so fewer multiplies is the only way to be faster. Layout of the work:
//
//   V[xi, c, t]  = (B^T d_t B)[xi]    input transform   (per (n, c) plane, 8 tiles per vector)
//   Ut[xi, k, c] = (G w G^T)[xi]      weight transform  (tiny)
//   M[xi]        = Ut[xi] @ V[xi]     a*a GEMMs (MKL, near peak)
//   y_t          = A^T M_t A + bias   output transform
//
// Backward is the adjoint of each step: dM = A dy A^T; dV = Ut^T @ dM and dx = B dV B^T
// accumulated over overlapping tiles; dUt = dM @ V^T and dw = G^T dU G. No step needs more
// than the GEMMs and memory-bound transforms, so forward and backward both gain the GEMM ratio.
//
// Accuracy: F(2, 3) uses the points 0, +-1 (coefficients 0, +-1, 1/2): its fp32 error is within
// 2x of the direct convolution's. F(4, 3) (points 0, +-1, +-2) is ~30x less accurate in fp32
// (8e-6 of the output's max at 256 channels) and is opt-in (tile=4).
//
// Padding: zeros (any p) or reflect (p < H, W), applied while a plane is copied into the
// transform's phase layout, so ReflectionPad2d + Conv2d runs without writing the padded tensor.
// Layout: NCHW in and out (what the models use; no layout conversions), one (n, c) plane per
// task, vectors along 8 neighbouring tiles of a tile row. Transformed tensors are (a*a, C, T)
// with T = N * tiles; the a*a GEMMs are split across threads whole (single-threaded MKL each:
// measured faster than one threaded at::bmm on 2 cores, see GANENGINE_WINOGRAD_GEMM).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();

// The transform matrices, rows x cols, row-major (Lavin & Gray 2016).
template <int M> struct Wino;
template <> struct Wino<2> {
  static constexpr int A = 4;
  static constexpr float BT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr float G[4][3] = {{1, 0, 0}, {0.5f, 0.5f, 0.5f}, {0.5f, -0.5f, 0.5f}, {0, 0, 1}};
  static constexpr float AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};
template <> struct Wino<4> {
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

struct Geometry {
  int64_t N, C, H, W, pad, Ho, Wo, TY, TX;
  bool reflect;
  int64_t tiles() const { return N * TY * TX; }
};

Geometry geometry(int64_t N, int64_t C, int64_t H, int64_t W, int64_t pad, bool reflect, int64_t m) {
  TORCH_CHECK(pad >= 0, "ganengine winograd: padding must be >= 0, got ", pad);
  Geometry g{N, C, H, W, pad, H + 2 * pad - 2, W + 2 * pad - 2, 0, 0, reflect};
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, "ganengine winograd: a ", H, "x", W, " input with padding ", pad,
              " is smaller than the 3x3 kernel");
  if (reflect) {
    TORCH_CHECK(pad < H && pad < W, "ganengine winograd: reflect padding ", pad,
                " must be smaller than the input's H and W, got ", H, "x", W);
  }
  g.TY = (g.Ho + m - 1) / m;
  g.TX = (g.Wo + m - 1) / m;
  return g;
}

// source index of padded coordinate r - pad along an axis of length L, or -1 for a zero
inline int64_t source_index(int64_t r, int64_t L, int64_t pad, bool reflect) {
  r -= pad;
  if (r >= 0 && r < L) return r;
  if (!reflect || r < -pad || r >= L + pad) return -1;  // zero pad, or beyond the padded extent
  return r < 0 ? -r : 2 * (L - 1) - r;
}

// source_index for every padded coordinate 0..n-1 along an axis of length L
std::vector<int64_t> source_map(int64_t n, int64_t L, const Geometry& g) {
  std::vector<int64_t> map(n);
  for (int64_t i = 0; i < n; ++i) map[i] = source_index(i, L, g.pad, g.reflect);
  return map;
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

Planes planes_of(const at::Tensor& t, int64_t a2, int64_t rows, int64_t T, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 3 && t.size(0) == a2 && t.size(1) == rows &&
                  t.size(2) == T && t.stride(2) == 1,
              "ganengine winograd: ", what, " must be an fp32 (", a2, ", ", rows, ", ", T,
              ") tensor with unit stride along its last dim, got ", t.sizes(), " ", t.strides(), " ",
              t.scalar_type());
  Planes p;
  for (int64_t i = 0; i < a2; ++i) p.ptr[i] = const_cast<float*>(t.const_data_ptr<float>()) + i * t.stride(0);
  p.ld = t.stride(1);
  return p;
}

// One (n, c) plane at a time (planes are independent: no races, everything stays in L1/L2),
// vectors run along the 8 neighbouring tiles of a tile row. A tile's column j sits at padded
// column m * tx + j, so the plane is first copied into "phase" layout buf[row][j % m][q]
// (= padded column m * q + j % m), padding applied once; then every tile vector is one
// contiguous load of buf[row][j % m][tx0 + j / m ...].
template <int M>
struct PhasePlane {
  int64_t q;  // entries per phase row (with a vector of slack)
  std::vector<float> buf;
  PhasePlane(int64_t rows, int64_t tx) : q(tx + 1 + kVec), buf(rows * M * q) {}
  float* at(int64_t r, int64_t ph) { return buf.data() + (r * M + ph) * q; }
};

// x (N, C, H, W) NCHW-dense -> V (a*a, C, T), T = N * TY * TX
template <int M>
at::Tensor input_transform(const at::Tensor& x, const Geometry& g, at::Tensor V) {
  RECORD_FUNCTION("ganengine::winograd_input_transform", c10::ArrayRef<c10::IValue>{});
  constexpr int A = Wino<M>::A;
  const int64_t T = g.tiles(), tpn = g.TY * g.TX, Hp = g.TY * M + 2;
  const Planes vp = planes_of(V, A * A, g.C, T, "V");
  const float* xp = x.const_data_ptr<float>();
  const std::vector<int64_t> rowmap = source_map(Hp, g.H, g), colmap = source_map((g.TX + 1) * M, g.W, g);
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t p0, int64_t p1) {
    PhasePlane<M> pl(Hp, g.TX);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = p / g.C, c = p % g.C;
      const float* src = xp + p * g.H * g.W;
      for (int64_t r = 0; r < Hp; ++r)
        for (int ph = 0; ph < M; ++ph) {
          float* dst = pl.at(r, ph);
          for (int64_t q = 0; q <= g.TX; ++q) {
            const int64_t sc = colmap[q * M + ph];
            dst[q] = (rowmap[r] < 0 || sc < 0) ? 0.f : src[rowmap[r] * g.W + sc];
          }
        }
      for (int64_t ty = 0; ty < g.TY; ++ty)
        for (int64_t tx0 = 0; tx0 < g.TX; tx0 += kVec) {
          const int64_t nt = std::min<int64_t>(kVec, g.TX - tx0);
          Vec d[A][A], tmp[A][A], v[A][A];
          for (int i = 0; i < A; ++i)
            for (int j = 0; j < A; ++j) d[i][j] = Vec::loadu(pl.at(ty * M + i, j % M) + tx0 + j / M);
          left<A, A, A, false>(Wino<M>::BT, d, tmp);   // B^T d
          right<A, A, A, false>(tmp, Wino<M>::BT, v);  // (B^T d) B
          const int64_t t = n * tpn + ty * g.TX + tx0;
          for (int i = 0; i < A; ++i)
            for (int j = 0; j < A; ++j) store(v[i][j], vp.ptr[i * A + j] + c * vp.ld + t, nt);
        }
    }
  });
  return V;
}

// M (a*a, K, T) -> y (N, K, Ho, Wo) NCHW, plus bias
template <int M>
at::Tensor output_transform(const Planes& mp, const float* bp, const Geometry& g, int64_t K,
                            const at::TensorOptions& opt) {
  RECORD_FUNCTION("ganengine::winograd_output_transform", c10::ArrayRef<c10::IValue>{});
  constexpr int A = Wino<M>::A;
  auto y = at::empty({g.N, K, g.Ho, g.Wo}, opt);
  float* yp = y.data_ptr<float>();
  const int64_t tpn = g.TY * g.TX;
  at::parallel_for(0, g.N * K, 1, [&](int64_t p0, int64_t p1) {
    alignas(64) float row[M][kVec * M];
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
          left<M, A, A, false>(Wino<M>::AT, m, tmp);     // A^T m
          right<M, A, M, false>(tmp, Wino<M>::AT, out);  // (A^T m) A
          alignas(64) float lanes[kVec];
          for (int i = 0; i < mh; ++i)
            for (int j = 0; j < M; ++j) {
              (out[i][j] + bv).store(lanes);
              for (int l = 0; l < kVec; ++l) row[i][l * M + j] = lanes[l];
            }
          const int64_t x0 = tx0 * M, w = std::min<int64_t>(nt * M, g.Wo - x0);
          for (int i = 0; i < mh; ++i) std::memcpy(dst + (ty * M + i) * g.Wo + x0, row[i], w * sizeof(float));
        }
      }
    }
  });
  return y;
}

// dy (N, K, Ho, Wo) NCHW-dense -> dM (a*a, K, T) = A dy A^T (outside the output: zero)
template <int M>
at::Tensor output_transform_adjoint(const at::Tensor& dy, const Geometry& g, at::Tensor dM) {
  RECORD_FUNCTION("ganengine::winograd_output_transform_adjoint", c10::ArrayRef<c10::IValue>{});
  constexpr int A = Wino<M>::A;
  const int64_t K = dy.size(1), T = g.tiles(), tpn = g.TY * g.TX;
  const Planes mp = planes_of(dM, A * A, K, T, "dM");
  const float* gp = dy.const_data_ptr<float>();
  at::parallel_for(0, g.N * K, 1, [&](int64_t p0, int64_t p1) {
    PhasePlane<M> pl(g.TY * M, g.TX);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = p / K, k = p % K;
      const float* src = gp + p * g.Ho * g.Wo;
      for (int64_t r = 0; r < g.TY * M; ++r)
        for (int ph = 0; ph < M; ++ph) {
          float* dst = pl.at(r, ph);
          for (int64_t q = 0; q < g.TX; ++q) {
            const int64_t col = q * M + ph;
            dst[q] = (r < g.Ho && col < g.Wo) ? src[r * g.Wo + col] : 0.f;
          }
        }
      for (int64_t ty = 0; ty < g.TY; ++ty)
        for (int64_t tx0 = 0; tx0 < g.TX; tx0 += kVec) {
          const int64_t nt = std::min<int64_t>(kVec, g.TX - tx0);
          Vec d[M][M], tmp[A][M], out[A][A];
          for (int i = 0; i < M; ++i)
            for (int j = 0; j < M; ++j) d[i][j] = Vec::loadu(pl.at(ty * M + i, j) + tx0);
          left<A, M, M, true>(Wino<M>::AT, d, tmp);     // A dy     (A = AT^T)
          right<A, M, A, true>(tmp, Wino<M>::AT, out);  // (A dy) A^T
          const int64_t t = n * tpn + ty * g.TX + tx0;
          for (int i = 0; i < A; ++i)
            for (int j = 0; j < A; ++j) store(out[i][j], mp.ptr[i * A + j] + k * mp.ld + t, nt);
        }
    }
  });
  return dM;
}

// dV (a*a, C, T) -> dx (N, C, H, W) NCHW: B dV B^T per tile, summed over overlapping tiles in a
// phase-layout accumulator, then the padding's gradient folded back (reflect) or dropped (zeros)
template <int M>
at::Tensor input_transform_adjoint(const Planes& vp, const Geometry& g, const at::TensorOptions& opt) {
  RECORD_FUNCTION("ganengine::winograd_input_transform_adjoint", c10::ArrayRef<c10::IValue>{});
  constexpr int A = Wino<M>::A;
  const int64_t Hp = g.TY * M + 2, tpn = g.TY * g.TX;
  auto dx = at::empty({g.N, g.C, g.H, g.W}, opt);
  float* xp = dx.data_ptr<float>();
  const std::vector<int64_t> rowmap = source_map(Hp, g.H, g), colmap = source_map((g.TX + 1) * M, g.W, g);
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t p0, int64_t p1) {
    PhasePlane<M> pl(Hp, g.TX);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = p / g.C, c = p % g.C;
      std::fill(pl.buf.begin(), pl.buf.end(), 0.f);
      for (int64_t ty = 0; ty < g.TY; ++ty)
        for (int64_t tx0 = 0; tx0 < g.TX; tx0 += kVec) {
          const int64_t nt = std::min<int64_t>(kVec, g.TX - tx0);
          const int64_t t = n * tpn + ty * g.TX + tx0;
          Vec v[A][A], tmp[A][A], out[A][A];
          for (int i = 0; i < A; ++i)  // lanes past the row's last tile load as zero
            for (int j = 0; j < A; ++j) v[i][j] = load(vp.ptr[i * A + j] + c * vp.ld + t, nt);
          left<A, A, A, true>(Wino<M>::BT, v, tmp);     // B dV
          right<A, A, A, true>(tmp, Wino<M>::BT, out);  // (B dV) B^T
          for (int i = 0; i < A; ++i)
            for (int j = 0; j < A; ++j) {
              float* q = pl.at(ty * M + i, j % M) + tx0 + j / M;
              (Vec::loadu(q) + out[i][j]).store(q);
            }
        }
      float* dst = xp + p * g.H * g.W;
      std::fill(dst, dst + g.H * g.W, 0.f);
      for (int64_t r = 0; r < Hp; ++r) {
        if (rowmap[r] < 0) continue;
        for (int ph = 0; ph < M; ++ph) {
          const float* s = pl.at(r, ph);
          for (int64_t q = 0; q <= g.TX; ++q) {
            const int64_t sc = colmap[q * M + ph];
            if (sc >= 0) dst[rowmap[r] * g.W + sc] += s[q];
          }
        }
      }
    }
  });
  return dx;
}

void check_tile(int64_t tile) {
  TORCH_CHECK(tile == 2 || tile == 4, "ganengine winograd: tile must be 2 or 4, got ", tile);
}

// ---- workspaces ----
// The transformed tensors are 2.25x (F(2,3)) the size of the activations and live only inside
// one call. Fresh multi-MB allocations come back from glibc as new pages each time and pay a
// page fault per 4 KiB (measured: 3 ms of 7 ms for a 16 MiB transform), so each thread keeps
// its buffers (V, M, dM, dV) and reuses them.
at::Tensor workspace(int slot, int64_t a2, int64_t rows, int64_t T) {
  static thread_local std::array<at::Tensor, 4> ws;
  const int64_t stride = rows * T + 16;  // the xi stride padded off a power of two (cache sets)
  if (!ws[slot].defined() || ws[slot].numel() < a2 * stride) ws[slot] = at::empty({a2 * stride}, at::kFloat);
  return ws[slot].as_strided({a2, rows, T}, {stride, T, 1});
}
enum Slot { kV = 0, kM = 1, kDM = 2, kDV = 3 };

// w (K, C, 3, 3) -> Ut (a*a, K, C) = G w G^T per (k, c)
template <int M>
at::Tensor weight_transform(const at::Tensor& w) {
  constexpr int A = Wino<M>::A;
  const auto wc = w.contiguous();
  const int64_t K = wc.size(0), C = wc.size(1), KC = K * C;
  auto ut = at::empty({A * A, K, C}, wc.options());
  const float* wp = wc.const_data_ptr<float>();
  float* up = ut.data_ptr<float>();
  at::parallel_for(0, KC, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* g = wp + i * 9;
      float t[A][3];
      for (int a = 0; a < A; ++a)
        for (int j = 0; j < 3; ++j)
          t[a][j] = Wino<M>::G[a][0] * g[j] + Wino<M>::G[a][1] * g[3 + j] + Wino<M>::G[a][2] * g[6 + j];
      for (int a = 0; a < A; ++a)
        for (int b = 0; b < A; ++b)
          up[(a * A + b) * KC + i] = t[a][0] * Wino<M>::G[b][0] + t[a][1] * Wino<M>::G[b][1] + t[a][2] * Wino<M>::G[b][2];
    }
  });
  return ut;
}

// dUt (a*a, K, C) -> dw (K, C, 3, 3) = G^T dU G per (k, c)
template <int M>
at::Tensor weight_transform_adjoint(const at::Tensor& dut, int64_t K, int64_t C) {
  constexpr int A = Wino<M>::A;
  const int64_t KC = K * C;
  const auto d = dut.contiguous();
  auto dw = at::empty({K, C, 3, 3}, d.options());
  const float* dp = d.const_data_ptr<float>();
  float* wp = dw.data_ptr<float>();
  at::parallel_for(0, KC, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float t[3][A];  // G^T dU
      for (int j = 0; j < 3; ++j)
        for (int b = 0; b < A; ++b) {
          float s = 0.f;
          for (int a = 0; a < A; ++a) s += Wino<M>::G[a][j] * dp[(a * A + b) * KC + i];
          t[j][b] = s;
        }
      for (int j = 0; j < 3; ++j)
        for (int l = 0; l < 3; ++l) {
          float s = 0.f;
          for (int b = 0; b < A; ++b) s += t[j][b] * Wino<M>::G[b][l];
          wp[i * 9 + j * 3 + l] = s;
        }
    }
  });
  return dw;
}

// out[xi] = a[xi] @ b[xi] for every transform point. GANENGINE_WINOGRAD_GEMM=split (default)
// gives each thread whole GEMMs (single-threaded MKL inside at::parallel_for), "bmm" one
// threaded at::bmm.
void batched_gemm(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  static const bool split = [] {
    const char* e = std::getenv("GANENGINE_WINOGRAD_GEMM");
    return !(e && std::string(e) == "bmm");
  }();
  if (!split) {
    at::bmm_out(out, a, b);
    return;
  }
  at::parallel_for(0, a.size(0), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      auto o = out.select(0, i);
      at::mm_out(o, a.select(0, i), b.select(0, i));
    }
  });
}

void check_args(const at::Tensor& x, const at::Tensor& w, int64_t tile) {
  check_tile(tile);
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3 && w.size(1) == x.size(1),
              "ganengine conv3x3: expected x (N, C, H, W) and weight (K, C, 3, 3), got ", x.sizes(), " and ",
              w.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
              "ganengine conv3x3: the Winograd kernel is fp32 only, got ", x.scalar_type(), " and ",
              w.scalar_type());
}

template <int M>
at::Tensor fwd(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, int64_t pad,
               bool reflect) {
  constexpr int A2 = Wino<M>::A * Wino<M>::A;
  const auto xc = x.contiguous();
  const Geometry g = geometry(xc.size(0), xc.size(1), xc.size(2), xc.size(3), pad, reflect, M);
  const int64_t K = w.size(0);
  auto V = input_transform<M>(xc, g, workspace(kV, A2, g.C, g.tiles()));
  auto Mt = workspace(kM, A2, K, g.tiles());
  batched_gemm(Mt, weight_transform<M>(w), V);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  return output_transform<M>(planes_of(Mt, A2, K, g.tiles(), "M"), b.defined() ? b.const_data_ptr<float>() : nullptr,
                             g, K, xc.options());
}

template <int M>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& grad, const at::Tensor& x,
                                                   const at::Tensor& w, int64_t pad, bool reflect,
                                                   at::IntArrayRef mask) {
  constexpr int A2 = Wino<M>::A * Wino<M>::A;
  const auto xc = x.contiguous();
  const auto gc = grad.contiguous();
  const Geometry g = geometry(xc.size(0), xc.size(1), xc.size(2), xc.size(3), pad, reflect, M);
  const int64_t K = w.size(0), T = g.tiles();
  TORCH_CHECK(gc.dim() == 4 && gc.size(0) == g.N && gc.size(1) == K && gc.size(2) == g.Ho && gc.size(3) == g.Wo,
              "ganengine conv3x3: grad has shape ", gc.sizes(), ", expected ", at::IntArrayRef({g.N, K, g.Ho, g.Wo}));
  auto dM = output_transform_adjoint<M>(gc, g, workspace(kDM, A2, K, T));
  at::Tensor dx = x.new_empty({0}), dw = w.new_empty({0}), db = w.new_empty({0});
  if (mask[0]) {
    auto dV = workspace(kDV, A2, g.C, T);
    batched_gemm(dV, weight_transform<M>(w).transpose(1, 2), dM);
    dx = input_transform_adjoint<M>(planes_of(dV, A2, g.C, T, "dV"), g, xc.options());
  }
  if (mask[1]) {
    auto V = input_transform<M>(xc, g, workspace(kV, A2, g.C, T));
    auto dUt = at::empty({A2, K, g.C}, xc.options());
    batched_gemm(dUt, dM, V.transpose(1, 2));
    dw = weight_transform_adjoint<M>(dUt, K, g.C);
  }
  if (mask[2]) db = gc.sum({0, 2, 3});
  return {dx, dw, db};
}

at::Tensor conv3x3_fwd(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       int64_t pad, bool reflect, int64_t tile) {
  check_args(x, w, tile);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == w.size(0),
                "ganengine conv3x3: bias must be (", w.size(0), ") fp32, got ", bias->sizes());
  }
  return tile == 2 ? fwd<2>(x, w, bias, pad, reflect) : fwd<4>(x, w, bias, pad, reflect);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv3x3_bwd(const at::Tensor& grad, const at::Tensor& x,
                                                           const at::Tensor& w, int64_t pad, bool reflect,
                                                           int64_t tile, at::IntArrayRef mask) {
  check_args(x, w, tile);
  TORCH_CHECK(mask.size() == 3, "ganengine conv3x3: mask must have 3 entries, got ", mask.size());
  TORCH_CHECK(grad.scalar_type() == at::kFloat, "ganengine conv3x3: grad must be fp32, got ", grad.scalar_type());
  return tile == 2 ? bwd<2>(grad, x, w, pad, reflect, mask) : bwd<4>(grad, x, w, pad, reflect, mask);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ganengine_C, m) {
  m.def("conv3x3_fwd(Tensor x, Tensor weight, Tensor? bias, int padding, bool reflect, int tile) -> Tensor");
  m.def("conv3x3_bwd(Tensor grad, Tensor x, Tensor weight, int padding, bool reflect, int tile, int[] mask) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ganengine_C, CPU, m) {
  m.impl("conv3x3_fwd", &conv3x3_fwd);
  m.impl("conv3x3_bwd", &conv3x3_bwd);
}
