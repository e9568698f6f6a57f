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
    const auto dcols = dct.view({N, -1, w2.size(1)}).permute({0, 2, 1}).contiguous();
    dx = at::col2im(dcols, {x.size(2), x.size(3)}, kernel_of(w), kDil, padding, stride);
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
  const auto cols = colst.view({N, -1, w2.size(1)}).permute({0, 2, 1}).contiguous();
  auto y = at::col2im(cols, {Ho, Wo}, kernel_of(w), kDil, padding, stride);
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

}  // namespace

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
  return transposed ? convT_fwd(x, w, bias, stride, padding, output_padding) : conv_fwd(x, w, bias, stride, padding);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& w, at::IntArrayRef stride,
                                                            at::IntArrayRef padding, bool transposed,
                                                            std::array<bool, 3> mask) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return transposed ? convT_bwd(grad, x, w, stride, padding, mask) : conv_bwd(grad, x, w, stride, padding, mask);
}

}  // namespace conv_gemm
}  // namespace ganengine
