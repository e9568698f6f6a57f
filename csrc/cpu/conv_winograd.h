// 4x4 convolutions and transposed convolutions (PatchGAN's and the U-Net's layers) as Winograd
// convolutions on the CPU: stride 1 as F(m, 4), stride 2 as F(m, 2) over the polyphase form
// (winograd_engine.h). conv_gemm.cpp routes calls here when `use` says so; everything else
// stays with the GEMM form or oneDNN.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace ganengine {
namespace conv_winograd {

// policy: 0 = auto (by the measured threshold), 1 = always where legal, 2 = never.
// Tiles: the output tile m for stride 1 (F(m, 4): 2 or 3) and stride 2 (F(m, 2): 2, 3 or 4).
struct Config {
  int64_t policy, s1_tile, s2_tile;
};
Config config();
void set_config(const Config& c);

// true when this call runs as a Winograd convolution (fp32 CPU, 4x4 kernel, stride 1 or 2,
// zero padding, groups 1, dilation 1, and, under auto, a shape where it measured faster)
bool use(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding, bool transposed,
         at::IntArrayRef output_padding);

// the call as a Winograd convolution (callers check `use` first); outputs NCHW-contiguous
at::Tensor convolution(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                       at::IntArrayRef stride, at::IntArrayRef padding, bool transposed,
                       at::IntArrayRef output_padding);
std::tuple<at::Tensor, at::Tensor, at::Tensor> convolution_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
    at::IntArrayRef padding, bool transposed, at::IntArrayRef output_padding, std::array<bool, 3> mask);

}  // namespace conv_winograd
}  // namespace ganengine
