// conv family, CPU: the one router and policy. Every cpu convolution of the family (conv2d,
// conv_transpose2d, conv3x3, and conv2d_act's convolution) asks `decide` / `decide3x3` once per
// call which strategy runs it:
//
//   OneDNN       ATen's convolution (oneDNN's direct convolution: near the FMA peak on large maps)
//   Gemm         one GEMM over im2col columns, small output maps with big weights (conv_gemm.h)
//   Winograd4x4  F(2, 4) at stride 1, F(3, 2) over the polyphase form at stride 2 (conv_winograd.h)
//   Winograd3x3  F(2x2, 3x3) or F(4x4, 3x3), conv3x3 only (conv_winograd3x3.h)
//
// The strategies do not include each other; the thresholds and the overrides (gemm_policy /
// GANENGINE_CONV_GEMM, winograd_policy / GANENGINE_CONV_WINOGRAD / _S1_TILE / _S2_TILE,
// ganengine.ops.conv3x3's MIN_CHANNELS / MIN_TILES / GANENGINE_WINOGRAD_MIN_CHANNELS /
// GANENGINE_WINOGRAD_TILE) all live in conv_route.cpp.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace ganengine {
namespace conv_route {

enum class Route : int64_t { OneDNN = 0, Gemm = 1, Winograd4x4 = 2, Winograd3x3 = 3 };

struct Decision {
  Route route;
  int64_t tile;  // the Winograd output tile (0 for the other routes)
};

// policy: 0 = auto (by the measured threshold), 1 = always where legal, 2 = never
int64_t policy_from_env(const char* var);
int64_t gemm_policy();
void set_gemm_policy(int64_t policy);

// Winograd 4x4: policy, and the output tile m at stride 1 (F(m, 4): 2 or 3) and 2 (F(m, 2): 2-4)
struct Winograd4x4Config {
  int64_t policy, s1_tile, s2_tile;
};
Winograd4x4Config winograd4x4_config();
void set_winograd4x4_config(const Winograd4x4Config& c);

// Winograd 3x3 under auto: the fewest input and output channels and output tiles per call
struct Winograd3x3Config {
  int64_t min_channels, min_tiles;
};
Winograd3x3Config winograd3x3_config();
void set_winograd3x3_config(const Winograd3x3Config& c);
// the 3x3 output tile: GANENGINE_WINOGRAD_TILE (2 or 4; read per call, as the Python setting was)
int64_t winograd3x3_tile();

// conv2d / conv_transpose2d (groups 1, dilation 1, zero padding): OneDNN, Gemm or Winograd4x4
Decision decide(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                bool transposed, at::IntArrayRef output_padding);
// whether Winograd F(tile, 3) pays for an fp32 conv3x3 on an (n, c, h, w) input with k output
// channels (the auto thresholds)
bool winograd3x3_pays(int64_t n, int64_t c, int64_t h, int64_t w, int64_t k, int64_t padding, int64_t tile);
// conv3x3 (stride 1, zero or reflect padding): OneDNN or Winograd3x3 (tile 0: the setting's)
Decision decide3x3(const at::Tensor& x, const at::Tensor& w, int64_t padding, int64_t tile = 0);

// run a decision of `decide` (an OneDNN decision: at::convolution / at::convolution_backward)
at::Tensor convolution(const Decision& d, const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                       at::IntArrayRef stride, at::IntArrayRef padding, bool transposed,
                       at::IntArrayRef output_padding);
std::tuple<at::Tensor, at::Tensor, at::Tensor> convolution_backward(
    const Decision& d, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
    at::IntArrayRef padding, bool transposed, at::IntArrayRef output_padding, std::array<bool, 3> mask);

}  // namespace conv_route
}  // namespace ganengine
