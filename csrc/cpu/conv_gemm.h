// Convolutions whose output map is small (the U-Net's bottleneck, StarGAN's and StackGAN's last
// discriminator blocks) as one GEMM over im2col columns, forward and backward; everything else
// goes to ATen's convolution (oneDNN). See conv_gemm.cpp for why and where the line is.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace ganengine {
namespace conv_gemm {

// policy: 0 = auto (by the measured threshold), 1 = always the GEMM form where legal, 2 = never
void set_policy(int64_t policy);
// a policy from environment variable `var` ("auto" | "always" | "never"; unset: auto)
int64_t policy_from_env(const char* var);
int64_t policy();

// true when this call runs as the GEMM form (fp32 CPU, groups 1, dilation 1, small output map)
bool use_gemm(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
              bool transposed);

// at::convolution / at::convolution_backward (groups 1, dilation 1), or the GEMM form where
// use_gemm says so. Outputs are NCHW-contiguous when the GEMM form ran.
at::Tensor convolution(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                       at::IntArrayRef stride, at::IntArrayRef padding, bool transposed,
                       at::IntArrayRef output_padding);
std::tuple<at::Tensor, at::Tensor, at::Tensor> convolution_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
    at::IntArrayRef padding, bool transposed, at::IntArrayRef output_padding, std::array<bool, 3> mask);

}  // namespace conv_gemm
}  // namespace ganengine
