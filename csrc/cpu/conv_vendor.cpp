// The vendor route of the conv family's Python fast entries (conv_py.cpp): ATen's convolution with
// ATen's autograd, what the Python route's GPU backends run for a bare convolution (ops/conv3x3.py,
// ops/conv.py: cuDNN already picks Winograd / FFT / implicit GEMM per shape, there is nothing for a
// kernel of ours to add), as one C++ call in place of the Python route's checks, backend choice and
// casts. On a GPU at GAN batch sizes the host time is the step: the Python route cost 1.2-1.7x
// eager's forward on the project's CPU proxy of the CUDA path (benchmarks/bench_cuda_path_host.py).
//
// Device-generic ATen code, no CUDA of its own: on CUDA tensors ATen runs cuDNN; on CPU tensors
// (served only where the caller asks, the proxy and the tests) oneDNN.
//
// refusal3 / refusal: metadata only; nullptr exactly where the Python route would run the call with
// nothing to raise, else a short name of what is not served (the caller then takes the Python
// route, which serves the call or raises its public error). run3 / run: the Python route's numbers
// bit for bit (the same ATen ops on the same operands, the same output layout).
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include <tuple>
#include <vector>

#include "conv_lean.h"

namespace ganengine {
namespace conv_vendor {
namespace {

bool float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// a tensor the route takes beside x: strided, on x's device
bool beside(const at::Tensor& t, const at::Tensor& x) {
  return t.defined() && t.layout() == at::kStrided && t.device() == x.device();
}

// ops/_conv_common.autocast_args: under autocast for x's device every floating tensor runs in the
// autocast dtype (fp64 ones too, where ATen's own autocast keeps them: refused, so both agree);
// outside it the weight (and here the bias, which ATen would reject) must be x's dtype
const char* dtypes(const at::Tensor& x, const at::Tensor& w, const OptT& b) {
  if (!float_type(x.scalar_type())) return "x dtype";
  const bool has_b = b.has_value() && b->defined();
  if (at::autocast::is_autocast_enabled(x.device().type())) {
    if (x.scalar_type() == at::kDouble || w.scalar_type() == at::kDouble) return "fp64 under autocast";
    if (!w.is_floating_point()) return "weight dtype";
    if (has_b && (!b->is_floating_point() || b->scalar_type() == at::kDouble)) return "bias dtype";
    return nullptr;
  }
  if (w.scalar_type() != x.scalar_type()) return "weight dtype";
  if (has_b && b->scalar_type() != x.scalar_type()) return "bias dtype";
  return nullptr;
}

// x and weight 4-d beside each other, the bias (c_out,) beside them, the dtypes as above
const char* operands(const at::Tensor& x, const at::Tensor& w, const OptT& b, int64_t c_in, int64_t c_out) {
  if (!(x.defined() && x.layout() == at::kStrided && x.dim() == 4 && x.numel() > 0)) return "x";
  if (!(beside(w, x) && w.dim() == 4 && c_out > 0 && c_in == x.size(1))) return "weight";
  if (b.has_value() && b->defined() && !(beside(*b, x) && b->dim() == 1 && b->size(0) == c_out)) return "bias";
  return dtypes(x, w, b);
}

bool autocast_on(const at::Tensor& x) { return at::autocast::is_autocast_enabled(x.device().type()); }

// ops/_conv_common.autocast_args under autocast: every operand .to() the autocast dtype (a plain
// cast, as the Python route's, not ATen's autocast cache). Reached only where the public
// functions' autocast shortcut does not apply (_conv_common.eager_autocast: fp64 operands, the
// torch backend named; elsewhere ATen's own conv runs first, eager's casts, cache included)
std::tuple<at::Tensor, at::Tensor, OptT> autocast_args(const at::Tensor& x, const at::Tensor& w, const OptT& b) {
  const at::ScalarType dt = at::autocast::get_autocast_dtype(x.device().type());
  OptT bc = b;
  if (b.has_value() && b->defined()) bc = b->to(dt);
  return {x.to(dt), w.to(dt), bc};
}

using conv_common::out_format;
// (cuDNN on CUDA tensors)
const auto& convolution = conv_common::aten_conv;

}  // namespace

// GF.conv3x3's Python route (ops/conv3x3.py, the checks before its vendor branch)
const char* refusal3(const at::Tensor& x, const at::Tensor& w, const OptT& b, int64_t pad, bool reflect) {
  if (const char* why = operands(x, w, b, w.defined() && w.dim() == 4 ? w.size(1) : -1,
                                 w.defined() && w.dim() == 4 ? w.size(0) : 0))
    return why;
  if (w.size(2) != 3 || w.size(3) != 3) return "weight";
  return conv_common::geometry3_refusal(x, pad, reflect);
}

at::Tensor run3(const at::Tensor& x, const at::Tensor& w, const OptT& b, int64_t pad, bool reflect) {
  const std::vector<int64_t> one{1, 1}, p0{0, 0}, pp{pad, pad};
  reflect = reflect && pad > 0;
  if (autocast_on(x)) {
    // the Python route's ops in its order, each as autocast treats it on this device: the operands
    // cast first (autocast_args), the padding under the device's own autocast lists (CPU's takes
    // it in fp32), at::conv2d (which casts a padded fp32 tensor back)
    const auto [xc, wc, bc] = autocast_args(x, w, b);
    const at::Tensor y = reflect ? at::conv2d(at::reflection_pad2d(xc, {pad, pad, pad, pad}), wc, bc, one, p0)
                                 : at::conv2d(xc, wc, bc, one, pp);
    return y.contiguous(out_format(xc));
  }
  const at::Tensor y = reflect ? convolution(at::reflection_pad2d(x, {pad, pad, pad, pad}), w, b, one, p0, p0, false)
                               : convolution(x, w, b, one, pp, p0, false);
  return y.contiguous(out_format(x));
}

// GF.conv2d's / GF.conv_transpose2d's Python route (ops/conv.py)
const char* refusal(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef output_padding, bool transposed) {
  const bool w4 = w.defined() && w.dim() == 4;
  if (const char* why = operands(x, w, b, w4 ? w.size(transposed ? 0 : 1) : -1, w4 ? w.size(transposed ? 1 : 0) : 0))
    return why;
  return conv_common::geometry_refusal(x, w, stride, padding, output_padding, transposed);
}

at::Tensor run(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
               at::IntArrayRef padding, at::IntArrayRef output_padding, bool transposed) {
  if (autocast_on(x)) {  // (as run3: the Python route's casts, then the autocast-wrapped op it calls)
    const auto [xc, wc, bc] = autocast_args(x, w, b);
    const at::Tensor y = transposed ? at::conv_transpose2d(xc, wc, bc, stride, padding, output_padding)
                                    : at::conv2d(xc, wc, bc, stride, padding);
    return y.contiguous(out_format(xc));
  }
  return convolution(x, w, b, stride, padding, output_padding, transposed).contiguous(out_format(x));
}

}  // namespace conv_vendor
}  // namespace ganengine
