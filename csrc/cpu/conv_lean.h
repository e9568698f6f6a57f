// The lean entries of the conv family (conv3x3, conv2d / conv_transpose2d, conv2d_act) as plain C++
// functions, shared by their dispatcher ops (conv_autograd.cpp, conv_act_autograd.cpp: what
// torch.ops.ganengine_C.* and FakeTensorMode use) and their Python fast entries (conv_py.cpp: what a
// plain eager call uses, without the dispatcher op's own entry and redispatch).
//
// refusal*: what the entry does not serve (a short name for the message), or nullptr; metadata only.
// run*: the call itself, once served: it routes once and records the autograd it needs.
#pragma once

#include <ATen/ATen.h>

namespace ganengine {
// what the lean and vendor routes share
namespace conv_common {
// ops/_conv_common.py out_format: channels_last when x is NHWC-dense and not NCHW-contiguous
inline at::MemoryFormat out_format(const at::Tensor& t) {
  return (!t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) ? at::MemoryFormat::ChannelsLast
                                                                                  : at::MemoryFormat::Contiguous;
}

// at::conv2d / at::conv_transpose2d for 4-d inputs, groups 1, dilation 1, as their own bodies call
// it: at::convolution (same kernels, same ConvolutionBackward0 node, same numbers), without their
// CompositeImplicitAutograd dispatcher layer (part of what a tiny call is compared with eager on)
inline at::Tensor aten_conv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                            bool transposed) {
  return at::convolution(x, w, b, stride, padding, {1, 1}, transposed, output_padding, 1);
}
}  // namespace conv_common

namespace conv_lean {
using OptT = c10::optional<at::Tensor>;
const char* refusal3(const at::Tensor& x, const at::Tensor& w, const OptT& b, int64_t padding, bool reflect);
at::Tensor run3(const at::Tensor& x, const at::Tensor& w, const OptT& b, int64_t padding, bool reflect);
const char* refusal(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef output_padding, bool transposed);
at::Tensor run(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
               at::IntArrayRef padding, at::IntArrayRef output_padding, bool transposed);
}  // namespace conv_lean

namespace conv_act_lean {
using OptT = c10::optional<at::Tensor>;
const char* refusal(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
                    at::IntArrayRef padding, double slope);
at::Tensor run(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
               at::IntArrayRef padding, double slope);
}  // namespace conv_act_lean

// the vendor route (conv_vendor.cpp): ATen's convolution on tensors of any one device, what the
// Python route's GPU backends run, for the fast entries' CUDA calls
namespace conv_vendor {
using OptT = c10::optional<at::Tensor>;
const char* refusal3(const at::Tensor& x, const at::Tensor& w, const OptT& b, int64_t padding, bool reflect);
at::Tensor run3(const at::Tensor& x, const at::Tensor& w, const OptT& b, int64_t padding, bool reflect);
const char* refusal(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef output_padding, bool transposed);
at::Tensor run(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
               at::IntArrayRef padding, at::IntArrayRef output_padding, bool transposed);
}  // namespace conv_vendor
}  // namespace ganengine
