// conv family, CPU, Winograd 3x3 strategy: 3x3 stride-1 convolutions (zero or reflect padding)
// as Winograd F(m x m, 3 x 3) convolutions on the engine in winograd_engine.h. Which calls run
// here, and with which tile, is decided by the family's router (conv_route.h).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace ganengine {
namespace conv_winograd3x3 {

// output tiles (N * TY * TX) of a call on an (N, C, H, W) input with this padding and output tile
int64_t tiles(int64_t n, int64_t h, int64_t w, int64_t pad, int64_t tile);

// y = conv2d(pad(x, pad, reflect ? "reflect" : "zeros"), w, b) with output tile 2 or 4 (fp32;
// checks its arguments); NCHW-contiguous
at::Tensor run(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, int64_t pad,
               bool reflect, int64_t tile);
// (dx, dw, db), an empty tensor where mask says not wanted
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& w, int64_t pad, bool reflect,
                                                            int64_t tile, at::IntArrayRef mask);

}  // namespace conv_winograd3x3
}  // namespace ganengine
