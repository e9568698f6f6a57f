// 4x4 convolutions (PatchGAN, the U-Net's encoder, StarGAN's discriminator) and 4x4 transposed
// convolutions (the U-Net's decoder, StarGAN's generator) as Winograd convolutions on the CPU.
//
//   stride 1   F(2, 4): 25 multiplies per 2x2 outputs instead of 64 (2.56x fewer)
//   stride 2   polyphase: four 2x2 stride-1 convs over 4C channels, F(3, 2): 16 multiplies per
//              3x3 outputs of the 2x2 conv instead of 36 (2.25x fewer)
//   transposed the data gradient of the convolution with the same weight (y = conv^T(x)), so
//              forward = the engine's backward-data pass, backward = its forward and weight passes
//
// Accuracy (fp32 error against an fp64 reference, as a multiple of the direct convolution's own;
// ganengine/tools/winograd_matrices.py): F(3, 2) 1.6-2.4x, F(2, 4) 3.5-4x; the opt-in larger tiles
// F(4, 2) 13-17x, F(3, 4) 8-12x. All well inside what fp32 training tolerates; bf16 rounding is ~1000x larger.
#include "conv_winograd.h"

#include "winograd_engine.h"

namespace ganengine {
namespace conv_winograd {

namespace {

using namespace ganengine::winograd;

template <int M_, int R_>
struct Tile {
  static constexpr int M = M_, R = R_;
};

// f(Tile<m, r>{}) for output tile m at this stride
template <class F>
auto with_tile(int64_t stride, int64_t tile, F&& f) {
  if (stride == 2) {
    TORCH_CHECK(tile >= 2 && tile <= 4, "ganengine conv winograd: the stride-2 tile must be 2, 3 or 4, got ", tile);
    if (tile == 2) return f(Tile<2, 2>{});
    if (tile == 4) return f(Tile<4, 2>{});
    return f(Tile<3, 2>{});
  }
  TORCH_CHECK(tile == 2 || tile == 3, "ganengine conv winograd: the stride-1 tile must be 2 or 3, got ", tile);
  if (tile == 3) return f(Tile<3, 4>{});
  return f(Tile<2, 4>{});
}

}  // namespace

bool legal(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
           bool transposed, at::IntArrayRef output_padding) {
  if (!(x.device().is_cpu() && x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.dim() == 4 &&
        w.dim() == 4 && w.size(2) == 4 && w.size(3) == 4 && x.numel() > 0 && w.numel() > 0))
    return false;
  if (stride.size() != 2 || padding.size() != 2 || stride[0] != stride[1] || (stride[0] != 1 && stride[0] != 2))
    return false;
  if (padding[0] < 0 || padding[1] < 0 || w.size(transposed ? 0 : 1) != x.size(1)) return false;
  if (transposed) {
    return output_padding.size() == 2 && output_padding[0] >= 0 && output_padding[1] >= 0 &&
           output_padding[0] < stride[0] && output_padding[1] < stride[1] &&
           (x.size(2) - 1) * stride[0] - 2 * padding[0] + 4 + output_padding[0] > 0 &&
           (x.size(3) - 1) * stride[1] - 2 * padding[1] + 4 + output_padding[1] > 0;
  }
  return x.size(2) + 2 * padding[0] >= 4 && x.size(3) + 2 * padding[1] >= 4;
}

namespace {

// The convolution the engine runs: for a transposed call, the convolution whose data gradient
// it is (input = the transposed call's output, (N, Co, Ho, Wo); output = its input).
Geometry geometry_of(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                     bool transposed, at::IntArrayRef output_padding, int64_t tile) {
  const int64_t S = stride[0], R = 4 / S;
  if (!transposed)
    return geometry(x.size(0), x.size(1), x.size(2), x.size(3), S, R, padding[0], padding[1], false, tile);
  const int64_t Ho = (x.size(2) - 1) * S - 2 * padding[0] + 4 + output_padding[0];
  const int64_t Wo = (x.size(3) - 1) * S - 2 * padding[1] + 4 + output_padding[1];
  Geometry g = geometry(x.size(0), w.size(1), Ho, Wo, S, R, padding[0], padding[1], false, tile);
  TORCH_CHECK(g.Ho == x.size(2) && g.Wo == x.size(3), "ganengine conv winograd: transposed geometry mismatch");
  return g;
}

}  // namespace

int64_t tiles(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
              bool transposed, at::IntArrayRef output_padding, int64_t tile) {
  return geometry_of(x, w, stride, padding, transposed, output_padding, tile).tiles();
}

at::Tensor run(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b, at::IntArrayRef stride,
               at::IntArrayRef padding, bool transposed, at::IntArrayRef output_padding, int64_t tile) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto xc = x.contiguous();
  const auto wc = w.contiguous();
  at::Tensor bias;
  if (b.has_value() && b->defined()) bias = b->contiguous();
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  bool nonfinite = false;
  at::Tensor y = with_tile(stride[0], tile, [&](auto t) {
    using T = decltype(t);
    const Geometry g = geometry_of(xc, wc, stride, padding, transposed, output_padding, T::M);
    if (!transposed) return forward<T::M, T::R>(xc, wc, bp, g, nonfinite);
    return backward<T::M, T::R>(xc, at::Tensor(), wc, g, true, false, nonfinite, bp).first;
  });
  // an inf or NaN anywhere: redo on ATen, which keeps eager's non-finite values and positions
  if (nonfinite) return at::convolution(x, w, b, stride, padding, {1, 1}, transposed, output_padding, 1);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& w, at::IntArrayRef stride,
                                                            at::IntArrayRef padding, bool transposed,
                                                            at::IntArrayRef output_padding, std::array<bool, 3> mask,
                                                            int64_t tile) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto xc = x.contiguous();
  const auto wc = w.contiguous();
  const auto gc = grad.contiguous();
  TORCH_CHECK(gc.scalar_type() == at::kFloat, "ganengine conv winograd: grad must be fp32, got ", gc.scalar_type());
  at::Tensor dx, dw, db;
  bool nonfinite = false;
  with_tile(stride[0], tile, [&](auto t) {
    using T = decltype(t);
    const Geometry g = geometry_of(xc, wc, stride, padding, transposed, output_padding, T::M);
    // the engine's convolution: input (N, C, H, W), output (N, K, Ho, Wo)
    const at::Tensor& conv_in = transposed ? gc : xc;
    const at::Tensor& conv_out_grad = transposed ? xc : gc;
    TORCH_CHECK(conv_in.size(0) == g.N && conv_in.size(1) == g.C && conv_in.size(2) == g.H && conv_in.size(3) == g.W &&
                    conv_out_grad.size(1) == wc.size(0) && conv_out_grad.size(2) == g.Ho &&
                    conv_out_grad.size(3) == g.Wo,
                "ganengine conv winograd: grad has shape ", gc.sizes(), ", which does not fit x ", xc.sizes(),
                " and weight ", wc.sizes());
    if (!transposed) {
      auto r = backward<T::M, T::R>(gc, xc, wc, g, mask[0], mask[1], nonfinite);
      dx = r.first;
      dw = r.second;
    } else {
      if (mask[0]) dx = forward<T::M, T::R>(gc, wc, nullptr, g, nonfinite);  // dx = conv(dy, w)
      if (mask[1]) dw = backward<T::M, T::R>(xc, gc, wc, g, false, true, nonfinite).second;
    }
    return 0;
  });
  if (nonfinite) {  // as in `convolution`: eager's values where an inf or NaN is involved
    const std::vector<int64_t> bias_sizes{transposed ? w.size(1) : w.size(0)};
    return at::convolution_backward(grad, x, w, bias_sizes, stride, padding, {1, 1}, transposed, output_padding, 1,
                                    mask);
  }
  if (mask[2]) db = gc.sum({0, 2, 3});
  return {dx, dw, db};
}

}  // namespace conv_winograd
}  // namespace ganengine
