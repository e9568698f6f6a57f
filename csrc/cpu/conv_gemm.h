// conv family, CPU, GEMM strategy: convolutions whose output map is small (the U-Net's
// bottleneck, StarGAN's and StackGAN's last discriminator blocks) as one GEMM over im2col
// columns, forward and backward. Which calls run here is decided by the family's router
// (conv_route.h); this file only says what is legal and how many GEMM columns a call has.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace ganengine {
namespace conv_gemm {

// whether the GEMM form can run this call (fp32 CPU, 4-d, channels match, non-empty input)
bool legal(const at::Tensor& x, const at::Tensor& w, bool transposed);

// the GEMM's narrow side: output pixels times batch (conv), input pixels times batch (transposed)
int64_t columns(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                bool transposed);

// whether the call runs the NHWC form: x channels_last (NHWC-dense, not NCHW-contiguous)
bool nhwc_form(const at::Tensor& x);

// the call as the GEMM form (callers check `legal` first; groups 1, dilation 1); outputs
// NCHW-contiguous, channels_last for a channels_last x (the NHWC form)
at::Tensor run(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
               at::IntArrayRef stride, at::IntArrayRef padding, bool transposed, at::IntArrayRef output_padding);
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& w, at::IntArrayRef stride,
                                                            at::IntArrayRef padding, bool transposed,
                                                            std::array<bool, 3> mask);

// The routed family convolution (oneDNN, this GEMM form or Winograd, as conv_route::decide says),
// under the name conv_act.cpp calls it by; defined in conv_route.cpp (new callers: conv_route.h).
at::Tensor convolution(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                       at::IntArrayRef stride, at::IntArrayRef padding, bool transposed,
                       at::IntArrayRef output_padding);
std::tuple<at::Tensor, at::Tensor, at::Tensor> convolution_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
    at::IntArrayRef padding, bool transposed, at::IntArrayRef output_padding, std::array<bool, 3> mask);

}  // namespace conv_gemm
}  // namespace ganengine
