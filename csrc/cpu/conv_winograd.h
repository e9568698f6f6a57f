// conv family, CPU, Winograd 4x4 strategy: 4x4 convolutions and transposed convolutions
// (PatchGAN's and the U-Net's layers) as Winograd convolutions, stride 1 as F(m, 4), stride 2 as
// F(m, 2) over the polyphase form (winograd_engine.h). Which calls run here, and with which tile,
// is decided by the family's router (conv_route.h); this file says what is legal and how many
// output tiles a call has.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace ganengine {
namespace conv_winograd {

// whether this call can run here: fp32 CPU, 4x4 kernel, stride 1 or 2 (equal), zero padding,
// groups 1, dilation 1, a non-empty output
bool legal(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding, bool transposed,
           at::IntArrayRef output_padding);

// output tiles (N * TY * TX) of the engine's convolution for this call with output tile `tile`
// (for a transposed call: of the convolution whose data gradient it is); callers check `legal`
int64_t tiles(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
              bool transposed, at::IntArrayRef output_padding, int64_t tile);

// the call as a Winograd convolution with output tile `tile` (stride 1: 2 or 3; stride 2: 2, 3
// or 4); callers check `legal` first; outputs NCHW-contiguous
at::Tensor run(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b, at::IntArrayRef stride,
               at::IntArrayRef padding, bool transposed, at::IntArrayRef output_padding, int64_t tile);
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& w, at::IntArrayRef stride,
                                                            at::IntArrayRef padding, bool transposed,
                                                            at::IntArrayRef output_padding, std::array<bool, 3> mask,
                                                            int64_t tile);

}  // namespace conv_winograd
}  // namespace ganengine
