// conv family, CPU: convolutions with a small output map as one GEMM over im2col columns.
//
// Where the output map is small (pix2pix's U-Net bottleneck: 512-1024 channels at 1x1..8x8;
// StarGAN's and StackGAN's last discriminator blocks), a convolution is a weight-bandwidth-bound
// matrix product: every multiply reads one weight once and there are only a few output columns
// to share it. oneDNN reorders the weights into its blocked layout on every call (a fresh buffer
// of the weight's size, 16-34 MB here, paid in page faults: our reading) and runs these shapes
// far below its large-map throughput (~3 GFLOP/s for the 512-channel 2x2 -> 1x1 conv)
// on this project's 2-core CPU. The GEMM form reads the weight in place:
//
//   conv        Y2 (Co, N*P)     = W2 (Co, C*k*k) @ cols (C*k*k, N*P)      cols = im2col(x)
//               dW2              = dY2 @ cols^T,     dcols^T = dY2^T @ W2 -> col2im -> dx
//   transposed  cols^T (N*P, Co*k*k) = X2^T (N*P, Ci) @ W2 (Ci, Co*k*k)     y = col2im(cols)
//               dcols = im2col(dy): dW2 = X2 @ dcols^T,  dX2 = W2 @ dcols
//
// with P the output pixels (conv) or input pixels (transposed), all small here, so im2col and
// col2im are cheap. Each GEMM's rows are split across threads, a single-threaded MKL GEMM per
// block (measured faster and steadier than one threaded call on these skinny shapes).
// Where the output map is large, oneDNN's direct convolution runs near the FMA peak and keeps
// the call (the threshold is the router's, conv_route.cpp, from benchmarks/bench_conv.py).
// Channels_last inputs run the NHWC form below (the same products with pixels as rows).
#include "conv_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace ganengine {
namespace conv_gemm {

namespace {

// out (M, N) = a (M, K) @ b (K, N) (+ bias (M) per row): rows split across threads.
// For the weight-sized operand MKL is fast when it is a row-major A or B; as a transposed A with
// a narrow B (4 columns) it made the whole op several times slower, so the products are arranged
// to avoid that.
void mm_rows(at::Tensor out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias = {}) {
  const int64_t M = out.size(0);
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(16, (M + nt - 1) / nt);
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // (per thread: the guard is thread-local)
    auto o = out.narrow(0, r0, r1 - r0);
    auto ar = a.narrow(0, r0, r1 - r0);
    if (bias.defined()) {
      at::addmm_out(o, bias.narrow(0, r0, r1 - r0).unsqueeze(1).expand({r1 - r0, out.size(1)}), ar, b);
    } else {
      at::mm_out(o, ar, b);
    }
  });
}

// out (M, N) = a (M, K) @ b (K, N) with b's columns split across threads (b the weight, M small)
void mm_cols(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  const int64_t N = out.size(1);
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(64, (N + nt - 1) / nt);
  at::parallel_for(0, N, grain, [&](int64_t c0, int64_t c1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto o = out.narrow(1, c0, c1 - c0);
    at::mm_out(o, a, b.narrow(1, c0, c1 - c0));
  });
}

// (N, R, P) -> (R, N * P) (a view when N == 1)
at::Tensor batch_to_columns(const at::Tensor& t) {
  const int64_t N = t.size(0), R = t.size(1), P = t.size(2);
  if (N == 1) return t.view({R, P});
  return t.permute({1, 0, 2}).reshape({R, N * P});
}

// (R, N * P) -> (N, R, P) contiguous
at::Tensor columns_to_batch(const at::Tensor& t, int64_t N) {
  const int64_t R = t.size(0), P = t.size(1) / N;
  if (N == 1) return t.view({1, R, P});
  return t.view({R, N, P}).permute({1, 0, 2}).contiguous();
}

std::vector<int64_t> kernel_of(const at::Tensor& w) { return {w.size(2), w.size(3)}; }
const std::vector<int64_t> kDil{1, 1};

at::Tensor col2im_nhwc(const at::Tensor& cols, int64_t N, int64_t Hg, int64_t Wg, int64_t C, int64_t Ht, int64_t Wt,
                       int64_t KH, int64_t KW, int64_t sh, int64_t sw, int64_t ph, int64_t pw);  // (below)

at::Tensor conv_fwd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, at::IntArrayRef stride,
                    at::IntArrayRef padding) {
  const auto xc = x.contiguous();
  const int64_t N = xc.size(0), Co = w.size(0);
  const int64_t Ho = (xc.size(2) + 2 * padding[0] - w.size(2)) / stride[0] + 1;
  const int64_t Wo = (xc.size(3) + 2 * padding[1] - w.size(3)) / stride[1] + 1;
  const auto c2 = batch_to_columns(at::im2col(xc, kernel_of(w), kDil, padding, stride));
  const auto w2 = w.contiguous().view({Co, -1});
  auto y2 = at::empty({Co, c2.size(1)}, xc.options());
  mm_rows(y2, w2, c2, b.defined() ? b.contiguous() : b);
  return columns_to_batch(y2, N).view({N, Co, Ho, Wo});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bwd(const at::Tensor& grad, const at::Tensor& x,
                                                        const at::Tensor& w, at::IntArrayRef stride,
                                                        at::IntArrayRef padding, std::array<bool, 3> mask) {
  const auto dy = grad.contiguous();
  const int64_t N = x.size(0), Co = w.size(0);
  const auto dy2 = batch_to_columns(dy.view({N, Co, -1}));
  const auto w2 = w.contiguous().view({Co, -1});
  at::Tensor dx, dw, db;
  if (mask[1]) {
    const auto c2 = batch_to_columns(at::im2col(x.contiguous(), kernel_of(w), kDil, padding, stride));
    auto dw2 = at::empty({Co, w2.size(1)}, w.options());
    mm_rows(dw2, dy2, c2.t());
    dw = dw2.view(w.sizes());
  }
  if (mask[0]) {
    // dcols^T (N*P, K) = dY2^T @ W2: the weight as a row-major B
    auto dct = at::empty({dy2.size(1), w2.size(1)}, x.options());
    mm_cols(dct, dy2.t(), w2);
    {  // (the GEMM form is fp32 only: conv_gemm::legal)
      // dct's rows are the NHWC form's column layout: scatter them straight into an NHWC dx, then
      // NCHW (dx has 1/(k*k) of dct's entries). The transposed copy at::col2im needs cost more than
      // its scatter (1x64x8x8 -> 128, 4x4: 54 + 62 us per call against ~35 us this way).
      const int64_t Ho = (x.size(2) + 2 * padding[0] - w.size(2)) / stride[0] + 1;
      const int64_t Wo = (x.size(3) + 2 * padding[1] - w.size(3)) / stride[1] + 1;
      dx = col2im_nhwc(dct, N, Ho, Wo, x.size(1), x.size(2), x.size(3), w.size(2), w.size(3), stride[0], stride[1],
                       padding[0], padding[1])
               .permute({0, 3, 1, 2})
               .contiguous();
    }
  }
  if (mask[2]) db = dy.sum({0, 2, 3});
  return {dx, dw, db};
}

at::Tensor convT_fwd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef output_padding) {
  const auto xc = x.contiguous();
  const int64_t N = xc.size(0), Ci = w.size(0), Co = w.size(1);
  const int64_t Ho = (xc.size(2) - 1) * stride[0] - 2 * padding[0] + w.size(2) + output_padding[0];
  const int64_t Wo = (xc.size(3) - 1) * stride[1] - 2 * padding[1] + w.size(3) + output_padding[1];
  const auto x2 = batch_to_columns(xc.view({N, Ci, -1}));
  const auto w2 = w.contiguous().view({Ci, -1});
  // cols^T (N*P, Co*k*k) = X2^T @ W2: the weight as a row-major B
  auto colst = at::empty({x2.size(1), w2.size(1)}, xc.options());
  mm_cols(colst, x2.t(), w2);
  // colst's rows are the NHWC form's column layout: scattered straight into an NHWC y, then NCHW
  // (y has about 1/4 of colst's entries at 4x4 stride 2; see conv_bwd)
  auto y = col2im_nhwc(colst, N, xc.size(2), xc.size(3), Co, Ho, Wo, w.size(2), w.size(3), stride[0], stride[1],
                       padding[0], padding[1])
               .permute({0, 3, 1, 2})
               .contiguous();
  if (b.defined()) y.add_(b.view({1, Co, 1, 1}));
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> convT_bwd(const at::Tensor& grad, const at::Tensor& x,
                                                         const at::Tensor& w, at::IntArrayRef stride,
                                                         at::IntArrayRef padding, std::array<bool, 3> mask) {
  const auto dy = grad.contiguous();
  const int64_t N = x.size(0), Ci = w.size(0);
  const auto d2 = batch_to_columns(at::im2col(dy, kernel_of(w), kDil, padding, stride));
  const auto w2 = w.contiguous().view({Ci, -1});
  at::Tensor dx, dw, db;
  if (mask[1]) {
    const auto x2 = batch_to_columns(x.contiguous().view({N, Ci, -1}));
    auto dw2 = at::empty({Ci, w2.size(1)}, w.options());
    mm_rows(dw2, x2, d2.t());
    dw = dw2.view(w.sizes());
  }
  if (mask[0]) {
    auto dx2 = at::empty({Ci, d2.size(1)}, x.options());
    mm_rows(dx2, w2, d2);
    dx = columns_to_batch(dx2, N).view(x.sizes());
  }
  if (mask[2]) db = dy.sum({0, 2, 3});
  return {dx, dw, db};
}

// ---------------------------------------------------------------------------------- the NHWC form
// Channels_last inputs (DCGAN's networks, issue 19) run as the same GEMMs with the pixels as rows:
//
//   conv        y (N*P, Co)   = cols (N*P, C*k*k) @ W2^T       cols = im2col_nhwc(x)
//               dW2           = dy^T @ cols,   dcols = dy @ W2 -> col2im_nhwc -> dx
//   transposed  cols (N*P, Co*k*k) = X (N*P, Ci) @ W2            y = col2im_nhwc(cols)
//               dcols = im2col_nhwc(dy): dW2 = X^T @ dcols,  dX = dcols @ W2^T
//
// A row of cols is one pixel's patch in (c, kh, kw) order, the order of a contiguous weight's rows,
// so no GEMM needs a transposed copy of the weight; x, y, dy and dx are NHWC-dense (free views of
// channels_last tensors: no layout copies, where the NCHW form above pays two per call).

// (N, Hs, Ws, C) contiguous -> (N * Hg * Wg, C * KH * KW): row (n, i, j) holds src[n, i*sh + a - ph,
// j*sw + b - pw, c] at c * KH*KW + a * KW + b (zero outside the map). Read as KH*KW sequential runs
// of C, written sequentially.
at::Tensor im2col_nhwc(const at::Tensor& src, int64_t Hg, int64_t Wg, int64_t KH, int64_t KW, int64_t sh,
                       int64_t sw, int64_t ph, int64_t pw) {
  const int64_t N = src.size(0), Hs = src.size(1), Ws = src.size(2), C = src.size(3), KK = KH * KW;
  auto cols = at::empty({N * Hg * Wg, C * KK}, src.options());
  const std::vector<float> zeros(C, 0.f);
  const float* s = src.data_ptr<float>();
  float* d = cols.data_ptr<float>();
  at::parallel_for(0, N * Hg * Wg, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, C)), [&](int64_t r0, int64_t r1) {
    std::vector<const float*> p(KK);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / (Hg * Wg), i = (r / Wg) % Hg, j = r % Wg;
      for (int64_t a = 0; a < KH; ++a) {
        const int64_t y = i * sh + a - ph;
        for (int64_t b = 0; b < KW; ++b) {
          const int64_t x = j * sw + b - pw;
          p[a * KW + b] = (y < 0 || y >= Hs || x < 0 || x >= Ws) ? zeros.data() : s + ((n * Hs + y) * Ws + x) * C;
        }
      }
      float* o = d + r * C * KK;
      for (int64_t c = 0; c < C; ++c, o += KK)
        for (int64_t k = 0; k < KK; ++k) o[k] = p[k][c];
    }
  });
  return cols;
}

// the adjoint of im2col_nhwc: (N * Hg * Wg, C * KH * KW) -> (N, Ht, Wt, C), overlapping entries
// summed in (grid pixel, kh, kw) order. Parallel over (image, 64-channel block): no two tasks
// write the same entry.
at::Tensor col2im_nhwc(const at::Tensor& cols, int64_t N, int64_t Hg, int64_t Wg, int64_t C, int64_t Ht, int64_t Wt,
                       int64_t KH, int64_t KW, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  const int64_t KK = KH * KW, CB = 64, nblk = (C + CB - 1) / CB;
  auto out = at::zeros({N, Ht, Wt, C}, cols.options());
  const float* s = cols.data_ptr<float>();
  float* d = out.data_ptr<float>();
  at::parallel_for(0, N * nblk, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> sink(CB);
    std::vector<float*> p(KK);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / nblk, c0 = (t % nblk) * CB, c1 = std::min(C, c0 + CB);
      for (int64_t i = 0; i < Hg; ++i)
        for (int64_t j = 0; j < Wg; ++j) {
          for (int64_t a = 0; a < KH; ++a) {
            const int64_t y = i * sh + a - ph;
            for (int64_t b = 0; b < KW; ++b) {
              const int64_t x = j * sw + b - pw;
              // (outside the map: a scratch row, offset so that index c lands in it)
              p[a * KW + b] = (y < 0 || y >= Ht || x < 0 || x >= Wt) ? sink.data() - c0 : d + ((n * Ht + y) * Wt + x) * C;
            }
          }
          const float* row = s + ((n * Hg + i) * Wg + j) * C * KK;
          for (int64_t c = c0; c < c1; ++c)
            for (int64_t k = 0; k < KK; ++k) p[k][c] += row[c * KK + k];
        }
    }
  });
  return out;
}

at::Tensor nhwc(const at::Tensor& t) { return t.permute({0, 2, 3, 1}).contiguous(); }  // (free for channels_last)
at::Tensor from_nhwc(const at::Tensor& t) { return t.permute({0, 3, 1, 2}); }         // a channels_last view

at::Tensor conv_fwd_nhwc(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, at::IntArrayRef stride,
                         at::IntArrayRef padding) {
  const int64_t N = x.size(0), Co = w.size(0), KH = w.size(2), KW = w.size(3);
  const int64_t Ho = (x.size(2) + 2 * padding[0] - KH) / stride[0] + 1;
  const int64_t Wo = (x.size(3) + 2 * padding[1] - KW) / stride[1] + 1;
  const auto cols = im2col_nhwc(nhwc(x), Ho, Wo, KH, KW, stride[0], stride[1], padding[0], padding[1]);
  const auto w2 = w.contiguous().view({Co, -1});
  const auto y = b.defined() ? at::addmm(b, cols, w2.t()) : at::mm(cols, w2.t());
  return from_nhwc(y.view({N, Ho, Wo, Co}));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bwd_nhwc(const at::Tensor& grad, const at::Tensor& x,
                                                             const at::Tensor& w, at::IntArrayRef stride,
                                                             at::IntArrayRef padding, std::array<bool, 3> mask) {
  const int64_t N = x.size(0), C = x.size(1), Co = w.size(0), KH = w.size(2), KW = w.size(3);
  const int64_t Ho = grad.size(2), Wo = grad.size(3);
  const auto g = nhwc(grad).view({-1, Co});
  const auto w2 = w.contiguous().view({Co, -1});
  at::Tensor dx, dw, db;
  if (mask[1]) {
    const auto cols = im2col_nhwc(nhwc(x), Ho, Wo, KH, KW, stride[0], stride[1], padding[0], padding[1]);
    dw = at::mm(g.t(), cols).view(w.sizes());
  }
  if (mask[0])
    dx = from_nhwc(col2im_nhwc(at::mm(g, w2), N, Ho, Wo, C, x.size(2), x.size(3), KH, KW, stride[0], stride[1],
                               padding[0], padding[1]));
  if (mask[2]) db = g.sum(0);
  return {dx, dw, db};
}

at::Tensor convT_fwd_nhwc(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef output_padding) {
  const int64_t N = x.size(0), Hi = x.size(2), Wi = x.size(3), Ci = w.size(0), Co = w.size(1);
  const int64_t KH = w.size(2), KW = w.size(3);
  const int64_t Ho = (Hi - 1) * stride[0] - 2 * padding[0] + KH + output_padding[0];
  const int64_t Wo = (Wi - 1) * stride[1] - 2 * padding[1] + KW + output_padding[1];
  const auto cols = at::mm(nhwc(x).view({-1, Ci}), w.contiguous().view({Ci, -1}));
  auto y = col2im_nhwc(cols, N, Hi, Wi, Co, Ho, Wo, KH, KW, stride[0], stride[1], padding[0], padding[1]);
  if (b.defined()) y.add_(b);
  return from_nhwc(y);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> convT_bwd_nhwc(const at::Tensor& grad, const at::Tensor& x,
                                                              const at::Tensor& w, at::IntArrayRef stride,
                                                              at::IntArrayRef padding, std::array<bool, 3> mask) {
  const int64_t Hi = x.size(2), Wi = x.size(3), Ci = w.size(0), KH = w.size(2), KW = w.size(3);
  const auto gh = nhwc(grad);
  const auto cols = im2col_nhwc(gh, Hi, Wi, KH, KW, stride[0], stride[1], padding[0], padding[1]);
  const auto w2 = w.contiguous().view({Ci, -1});
  at::Tensor dx, dw, db;
  if (mask[1]) dw = at::mm(nhwc(x).view({-1, Ci}).t(), cols).view(w.sizes());
  if (mask[0]) dx = from_nhwc(at::mm(cols, w2.t()).view({x.size(0), Hi, Wi, Ci}));
  if (mask[2]) db = gh.view({-1, gh.size(3)}).sum(0);
  return {dx, dw, db};
}

}  // namespace

bool nhwc_form(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

bool legal(const at::Tensor& x, const at::Tensor& w, bool transposed) {
  return x.device().is_cpu() && x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.dim() == 4 &&
         w.dim() == 4 && w.size(transposed ? 0 : 1) == x.size(1) && x.numel() > 0;
}

int64_t columns(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                bool transposed) {
  if (transposed) return x.size(0) * x.size(2) * x.size(3);
  return x.size(0) * ((x.size(2) + 2 * padding[0] - w.size(2)) / stride[0] + 1) *
         ((x.size(3) + 2 * padding[1] - w.size(3)) / stride[1] + 1);
}

at::Tensor run(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
               at::IntArrayRef stride, at::IntArrayRef padding, bool transposed, at::IntArrayRef output_padding) {
  // kernels run below autograd (the callers have their own backward); without this the out=
  // GEMMs refuse inputs that require grad
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor bias = b.has_value() ? *b : at::Tensor();
  if (nhwc_form(x))
    return transposed ? convT_fwd_nhwc(x, w, bias, stride, padding, output_padding)
                      : conv_fwd_nhwc(x, w, bias, stride, padding);
  return transposed ? convT_fwd(x, w, bias, stride, padding, output_padding) : conv_fwd(x, w, bias, stride, padding);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& w, at::IntArrayRef stride,
                                                            at::IntArrayRef padding, bool transposed,
                                                            std::array<bool, 3> mask) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (nhwc_form(x))
    return transposed ? convT_bwd_nhwc(grad, x, w, stride, padding, mask)
                      : conv_bwd_nhwc(grad, x, w, stride, padding, mask);
  return transposed ? convT_bwd(grad, x, w, stride, padding, mask) : conv_bwd(grad, x, w, stride, padding, mask);
}

}  // namespace conv_gemm
}  // namespace ganengine
