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
// ops/_conv_common.py out_format: channels_last when x is NHWC-dense and not NCHW-contiguous; a
// tensor that is both (a 1x1 map, one channel) as PyTorch's convolution reads it (suggest_memory_format)
inline at::MemoryFormat out_format(const at::Tensor& t) {
  if (t.is_contiguous())
    return (t.dim() == 4 && t.stride(1) == 1 && t.suggest_memory_format() == at::MemoryFormat::ChannelsLast)
               ? at::MemoryFormat::ChannelsLast
               : at::MemoryFormat::Contiguous;
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  // (neither layout dense, a slice: by its strides' order, as PyTorch's convolution)
  return (t.dim() == 4 && t.suggest_memory_format() == at::MemoryFormat::ChannelsLast) ? at::MemoryFormat::ChannelsLast
                                                                                        : at::MemoryFormat::Contiguous;
}

// y in format fmt, with that format's standard strides on its size-1 dims too: a tensor that is both
// layouts at once (a 1x1 map, one channel) is read by its strides (suggest_memory_format: the next
// conv's layout), and the GEMM forms' views can leave the other format's strides there. A copy only
// then (such tensors are small); the allocation's strides are ATen's for fmt.
inline at::Tensor to_format(const at::Tensor& y, at::MemoryFormat fmt) {
  at::Tensor out = y.contiguous(fmt);
  if (out.dim() == 4 && out.is_contiguous() && out.is_contiguous(at::MemoryFormat::ChannelsLast) &&
      out.suggest_memory_format() != fmt) {
    at::Tensor fixed = at::empty(out.sizes(), out.options().memory_format(fmt));
    fixed.copy_(out);
    return fixed;
  }
  return out;
}

// ops/_conv_common.py dense_copy: a tensor that is neither NCHW- nor NHWC-dense, copied once in the
// layout its strides suggest (as PyTorch's ops allocate their outputs for it)
inline at::Tensor dense_copy(const at::Tensor& t) {
  return t.contiguous(t.dim() == 4 ? t.suggest_memory_format() : at::MemoryFormat::Contiguous);
}

// at::conv2d / at::conv_transpose2d for 4-d inputs, groups 1, dilation 1, as their own bodies call
// it: at::convolution (same kernels, same ConvolutionBackward0 node, same numbers), without their
// CompositeImplicitAutograd dispatcher layer (part of what a tiny call is compared with eager on)
inline at::Tensor aten_conv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                            bool transposed) {
  return at::convolution(x, w, b, stride, padding, {1, 1}, transposed, output_padding, 1);
}

// the geometry checks of the Python routes (ops/conv3x3.py, ops/conv.py: what they raise for),
// shared by the lean and vendor refusals; metadata only; x and w 4-d: what is not served, or nullptr
inline const char* geometry3_refusal(const at::Tensor& x, int64_t pad, bool reflect) {
  if (pad < 0) return "padding";
  if (reflect && (pad >= x.size(2) || pad >= x.size(3))) return "reflect padding";
  if (x.size(2) + 2 * pad < 3 || x.size(3) + 2 * pad < 3) return "output size";
  return nullptr;
}

inline const char* geometry_refusal(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef output_padding, bool transposed) {
  if (!(stride.size() == 2 && padding.size() == 2 && output_padding.size() == 2 && stride[0] >= 1 &&
        stride[1] >= 1 && padding[0] >= 0 && padding[1] >= 0 && output_padding[0] >= 0 && output_padding[1] >= 0))
    return "stride, padding, output_padding";
  if (transposed) {
    if (output_padding[0] >= stride[0] || output_padding[1] >= stride[1]) return "output_padding";
    if ((x.size(2) - 1) * stride[0] - 2 * padding[0] + w.size(2) + output_padding[0] <= 0 ||
        (x.size(3) - 1) * stride[1] - 2 * padding[1] + w.size(3) + output_padding[1] <= 0)
      return "output size";
  } else {
    if (output_padding[0] != 0 || output_padding[1] != 0) return "output_padding";
    if (x.size(2) + 2 * padding[0] < w.size(2) || x.size(3) + 2 * padding[1] < w.size(3)) return "output size";
  }
  return nullptr;
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
// ``cuda``: CUDA tensors may be served too (where this build has the CUDA kernels), for the fast
// entry's CUDA calls; else CPU tensors only
const char* refusal(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
                    at::IntArrayRef padding, double slope, bool cuda = false);
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
