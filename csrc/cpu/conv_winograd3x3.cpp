// conv family, CPU, Winograd 3x3 strategy: Winograd F(m x m, 3 x 3) convolution, forward and
// backward (ganengine.ops.conv3x3's cpu route; conv_route.cpp decides which calls), on the
// engine in winograd_engine.h (transforms, GEMMs, workspaces; the why and the accuracy are there).
// F(2, 3) (points 0, +-1) is the default: its fp32 error is within 2x of the direct
// convolution's. F(4, 3) (points 0, +-1, +-2) does 4x fewer multiplies than direct but is
// ~16-30x less accurate in fp32 (8e-6 of the output's max at 256 channels) and is opt-in (tile=4).
#include "conv_winograd3x3.h"

#include "winograd_engine.h"

namespace ganengine {
namespace conv_winograd3x3 {

namespace {

using namespace ganengine::winograd;

void check_tile(int64_t tile) {
  TORCH_CHECK(tile == 2 || tile == 4, "ganengine winograd: tile must be 2 or 4, got ", tile);
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

// x as the direct convolution reads it: reflect-padded, or as is (zero padding is the conv's own)
at::Tensor padded(const at::Tensor& x, int64_t pad, bool reflect) {
  return reflect && pad > 0 ? at::reflection_pad2d(x, {pad, pad, pad, pad}) : x;
}

Geometry geometry_of(const at::Tensor& x, int64_t pad, bool reflect, int64_t tile) {
  return geometry(x.size(0), x.size(1), x.size(2), x.size(3), 1, 3, pad, pad, reflect, tile);
}

}  // namespace

int64_t tiles(int64_t n, int64_t h, int64_t w, int64_t pad, int64_t tile) {
  auto ceil_div = [tile](int64_t a) { return a >= 0 ? (a + tile - 1) / tile : -((-a) / tile); };
  return n * ceil_div(h + 2 * pad - 2) * ceil_div(w + 2 * pad - 2);
}

at::Tensor run(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, int64_t pad,
               bool reflect, int64_t tile) {
  check_args(x, w, tile);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == w.size(0),
                "ganengine conv3x3: bias must be (", w.size(0), ") fp32, got ", bias->sizes());
    b = bias->contiguous();
  }
  const auto xc = x.contiguous();
  const Geometry g = geometry_of(xc, pad, reflect, tile);
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  bool nonfinite = false;
  at::Tensor y = tile == 2 ? forward<2, 3>(xc, w, bp, g, nonfinite) : forward<4, 3>(xc, w, bp, g, nonfinite);
  if (!nonfinite) return y;
  // an inf or NaN anywhere: redo on ATen (eager's non-finite values and positions; Winograd's
  // transforms spread one inf/NaN over its tiles and turn +inf into NaN)
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return at::convolution(padded(x, pad, reflect), w, b, {1, 1}, {reflect ? 0 : pad, reflect ? 0 : pad}, {1, 1}, false,
                         {0, 0}, 1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& w, int64_t pad, bool reflect,
                                                            int64_t tile, at::IntArrayRef mask) {
  check_args(x, w, tile);
  TORCH_CHECK(mask.size() == 3, "ganengine conv3x3: mask must have 3 entries, got ", mask.size());
  TORCH_CHECK(grad.scalar_type() == at::kFloat, "ganengine conv3x3: grad must be fp32, got ", grad.scalar_type());
  const auto xc = x.contiguous();
  const auto gc = grad.contiguous();
  const Geometry g = geometry_of(xc, pad, reflect, tile);
  const int64_t K = w.size(0);
  TORCH_CHECK(gc.dim() == 4 && gc.size(0) == g.N && gc.size(1) == K && gc.size(2) == g.Ho && gc.size(3) == g.Wo,
              "ganengine conv3x3: grad has shape ", gc.sizes(), ", expected ", at::IntArrayRef({g.N, K, g.Ho, g.Wo}));
  bool nonfinite = false;
  auto r = tile == 2 ? backward<2, 3>(gc, xc, w, g, mask[0], mask[1], nonfinite)
                     : backward<4, 3>(gc, xc, w, g, mask[0], mask[1], nonfinite);
  if (nonfinite) {  // as in the forward: ATen's values where an inf or NaN is involved
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto xp = padded(x, pad, reflect);
    const int64_t p = reflect ? 0 : pad;
    auto e = at::convolution_backward(gc, xp, w, std::vector<int64_t>{K}, {1, 1}, {p, p}, {1, 1}, false, {0, 0}, 1,
                                      {mask[0] != 0, mask[1] != 0, mask[2] != 0});
    at::Tensor dx = x.new_empty({0}), dw = w.new_empty({0}), db = w.new_empty({0});
    if (mask[0]) dx = reflect ? at::reflection_pad2d_backward(std::get<0>(e), x, {pad, pad, pad, pad}) : std::get<0>(e);
    if (mask[1]) dw = std::get<1>(e).contiguous();
    if (mask[2]) db = std::get<2>(e);
    return {dx, dw, db};
  }
  at::Tensor dx = mask[0] ? r.first : x.new_empty({0});
  at::Tensor dw = mask[1] ? r.second : w.new_empty({0});
  at::Tensor db = mask[2] ? gc.sum({0, 2, 3}) : w.new_empty({0});
  return {dx, dw, db};
}

}  // namespace conv_winograd3x3
}  // namespace ganengine
