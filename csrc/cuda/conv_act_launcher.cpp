// conv2d_act's cuda backend: the CUDA implementations of ganengine_C::conv_act_fwd / conv_act_bwd and
// conv_act_bwd's two halves, its overloads .act / .conv (schemas in csrc/cpu/conv_act.cpp), the Triton
// backend's "vendor" route written in C++: ATen's
// convolution (cuDNN) without its bias, then one epilogue kernel adding the bias and applying the
// activation in place (csrc/cuda/conv_act.cu); backward, one kernel for the activation's gradient
// from the sign of the saved output, then ATen's convolution_backward, whose bias output is the
// bias gradient (eager's own computation). The launches ATen's convolution makes are cuDNN's, as
// eager's; what this adds is one elementwise kernel each way, where eager runs a bias add and
// leaky_relu (forward) and leaky_relu_backward (backward). The C++ entry ganengine_C::conv2d_act
// (csrc/cpu/conv_act_autograd.cpp) calls these through the dispatcher on CUDA tensors, so the
// call costs one dispatcher call with C++ autograd (ops/conv_act.py, _dispatch.cuda_entry).
// Output layouts follow x (NHWC-dense and not NCHW-contiguous: channels_last), dx and dw their
// operands, as on the other backends.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "conv_act.cuh"
#include "launcher_utils.h"

namespace ganengine {
namespace conv_act_cuda {
namespace {

at::MemoryFormat format_of(const at::Tensor& t) {
  return (!t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) ? at::MemoryFormat::ChannelsLast
                                                                                  : at::MemoryFormat::Contiguous;
}

int dtype_code(at::ScalarType t) { return cuda_launch::dtype_code(t, "ganengine conv_act (CUDA)"); }

void check_args(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b, at::IntArrayRef stride,
                at::IntArrayRef padding) {
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4, "ganengine conv_act (CUDA): x and weight must be 4-d, got ", x.sizes(),
              " and ", w.sizes());
  TORCH_CHECK(x.is_cuda() && w.device() == x.device(), "ganengine conv_act (CUDA): x and weight must be on one CUDA "
              "device, got ", x.device(), " and ", w.device());
  TORCH_CHECK(w.size(1) == x.size(1), "ganengine conv_act (CUDA): weight has ", w.size(1), " input channels, x has ",
              x.size(1));
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "ganengine conv_act (CUDA): x is ", x.scalar_type(),
              " but weight is ", w.scalar_type());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2, "ganengine conv_act (CUDA): stride and padding must have 2 "
              "entries");
  if (b.has_value() && b->defined())
    TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0) && b->device() == x.device() &&
                    b->scalar_type() == x.scalar_type(),
                "ganengine conv_act (CUDA): bias must be a (", w.size(0), ",) tensor of x's dtype on x's device");
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "ganengine conv_act (CUDA): ", what, " launch failed: ", cudaGetErrorString(err));
}

at::Tensor conv_act_fwd(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                        at::IntArrayRef stride, at::IntArrayRef padding, double slope) {
  check_args(x, w, b, stride, padding);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat fmt = format_of(x);
  at::Tensor y = at::convolution(x, w, c10::nullopt, stride, padding, {1, 1}, false, {0, 0}, 1).contiguous(fmt);
  const bool has_bias = b.has_value() && b->defined();
  if (!has_bias && slope == 1.0) return y;  // no epilogue to apply
  const at::Tensor bias = has_bias ? b->contiguous() : at::Tensor();
  const int64_t C = y.size(1);
  const int64_t inner = fmt == at::MemoryFormat::ChannelsLast ? 1 : y.size(2) * y.size(3);
  check_launch(cuda::conv_bias_act(dtype_code(y.scalar_type()), y.data_ptr(), has_bias ? bias.data_ptr() : nullptr,
                                   y.numel(), C, inner, slope, c10::cuda::getCurrentCUDAStream()),
               "bias + activation");
  return y;
}

// gz = grad * (y > 0 ? 1 : slope), in y's layout: one kernel (slope 1, the identity: grad made dense)
at::Tensor act_grad(const at::Tensor& grad, const at::Tensor& y, double slope) {
  const at::MemoryFormat fmt = format_of(y);
  if (slope == 1.0) return grad.contiguous(fmt);  // the identity's gradient (a stride-0 grad becomes dense once)
  const at::Tensor yd = y.contiguous(fmt);
  const at::Tensor g = grad.contiguous(fmt);
  at::Tensor gz = at::empty_like(yd, yd.options(), fmt);
  check_launch(cuda::conv_act_grad(dtype_code(y.scalar_type()), g.data_ptr(), yd.data_ptr(), gz.data_ptr(),
                                   gz.numel(), slope, c10::cuda::getCurrentCUDAStream()),
               "activation gradient");
  return gz;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_act_bwd(const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& w, const at::Tensor& y,
                                                            at::IntArrayRef stride, at::IntArrayRef padding,
                                                            double slope, c10::List<bool> mask) {
  check_args(x, w, c10::nullopt, stride, padding);
  TORCH_CHECK(mask.size() == 3, "ganengine conv_act_bwd (CUDA): output mask must have 3 entries");
  TORCH_CHECK(grad.sizes() == y.sizes() && grad.scalar_type() == y.scalar_type() && grad.device() == x.device() &&
                  y.device() == x.device(),
              "ganengine conv_act_bwd (CUDA): grad has shape ", grad.sizes(), " and dtype ", grad.scalar_type(),
              " but the output has ", y.sizes(), " and ", y.scalar_type(), " (both on x's device)");
  const bool m0 = mask[0], m1 = mask[1], m2 = mask[2];
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor gz = act_grad(grad, y, slope);
  at::Tensor dx, dw, db;
  if (m0 || m1 || m2) {
    const std::vector<int64_t> bias_sizes{y.size(1)};
    const at::OptionalIntArrayRef bias = m2 ? at::OptionalIntArrayRef(bias_sizes) : at::OptionalIntArrayRef();
    std::tie(dx, dw, db) =
        at::convolution_backward(gz, x, w, bias, stride, padding, {1, 1}, false, {0, 0}, 1, {m0, m1, m2});
  }
  dx = m0 ? dx.contiguous(format_of(x)) : at::empty({0}, x.options());
  dw = m1 ? dw.contiguous(format_of(w)) : at::empty({0}, w.options());
  db = m2 ? db.to(y.scalar_type()) : at::empty({0}, y.options());
  return {dx, dw, db};
}

// conv_act_bwd's two halves (its overloads .act / .conv: the C++ entry's autograd drops the saved output
// and the incoming grad between them, as eager's graph does). The activation's: gz, and with `bias` the
// bias gradient as ATen's convolution_backward makes it on cuDNN's route (gz.sum over N, H, W: the same
// call on the same tensor, so the same bits and the same kernels as conv_act_bwd's, in another order).
std::tuple<at::Tensor, at::Tensor> conv_act_bwd_act(const at::Tensor& grad, const at::Tensor& y, double slope,
                                                    bool bias) {
  TORCH_CHECK(y.is_cuda() && y.dim() == 4 && grad.sizes() == y.sizes() && grad.scalar_type() == y.scalar_type() &&
                  grad.device() == y.device(),
              "ganengine conv_act_bwd.act (CUDA): grad has shape ", grad.sizes(), ", dtype ", grad.scalar_type(),
              " and device ", grad.device(), " but the output y has ", y.sizes(), ", ", y.scalar_type(), " and ",
              y.device(), " (a 4-d CUDA tensor)");
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor gz = act_grad(grad, y, slope);
  at::Tensor db = bias ? gz.sum(at::IntArrayRef{0, 2, 3}) : at::empty({0}, y.options());
  return {gz, db};
}

// The convolution's half: dx, dw (empty (0,) tensors where the mask says no), in x's / weight's layout.
std::tuple<at::Tensor, at::Tensor> conv_act_bwd_conv(const at::Tensor& gz, const at::Tensor& x, const at::Tensor& w,
                                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                                     c10::List<bool> mask) {
  check_args(x, w, c10::nullopt, stride, padding);
  TORCH_CHECK(mask.size() == 2, "ganengine conv_act_bwd.conv (CUDA): output mask must have 2 entries (dx, dw)");
  TORCH_CHECK(gz.dim() == 4 && gz.size(0) == x.size(0) && gz.size(1) == w.size(0) && gz.device() == x.device(),
              "ganengine conv_act_bwd.conv (CUDA): gz has shape ", gz.sizes(), " on ", gz.device(),
              ", not the output's of x ", x.sizes(), " and weight ", w.sizes(), " on x's device");
  const bool m0 = mask[0], m1 = mask[1];
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx, dw;
  if (m0 || m1) {
    std::tie(dx, dw, std::ignore) = at::convolution_backward(gz, x, w, at::OptionalIntArrayRef(), stride, padding,
                                                             {1, 1}, false, {0, 0}, 1, {m0, m1, false});
  }
  dx = m0 ? dx.contiguous(format_of(x)) : at::empty({0}, x.options());
  dw = m1 ? dw.contiguous(format_of(w)) : at::empty({0}, w.options());
  return {dx, dw};
}

// ----------------------------------------------------------------------------- conv + instance norm
// conv2d_instance_norm_act's cuda backend: ATen's convolution without the bias (the normalisation
// removes it exactly), then the instance norm's CUDA kernels (ganengine_C::norm_act_fwd / _bwd,
// csrc/cuda/norm_act_launcher.cpp, through the dispatcher) on the conv output c: the Triton
// vendor route's composition with the CUDA C++ norm kernels in place of the Triton ones.
using OptT = c10::optional<at::Tensor>;
using NormFwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const OptT&, const OptT&, double,
                                                                  bool, double);
using NormBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptT&,
                                                                  const OptT&, const at::Tensor&, const at::Tensor&,
                                                                  bool, double);

const c10::TypedOperatorHandle<NormFwdSig>& norm_fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("ganengine_C::norm_act_fwd", "").typed<NormFwdSig>();
  return op;
}

const c10::TypedOperatorHandle<NormBwdSig>& norm_bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("ganengine_C::norm_act_bwd", "").typed<NormBwdSig>();
  return op;
}

// -> (y, c, mean, rstd): mean and rstd (N, C) in the accumulation dtype, as the other backends
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_in_act_fwd(const at::Tensor& x, const at::Tensor& w,
                                                                           const OptT& gamma, const OptT& beta,
                                                                           at::IntArrayRef stride,
                                                                           at::IntArrayRef padding, double eps,
                                                                           double slope) {
  check_args(x, w, c10::nullopt, stride, padding);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor c =
      at::convolution(x, w, c10::nullopt, stride, padding, {1, 1}, false, {0, 0}, 1).contiguous(format_of(x));
  // (slope 1 is "none": the kernels' leaky ReLU with slope 1 is the identity)
  auto [y, mean, rstd] = norm_fwd_op().call(c, gamma, beta, eps, /*apply_act=*/true, slope);
  return {y, c, mean, rstd};
}

// -> (dx, dw, dgamma, dbeta): dgamma / dbeta (C) summed over the batch where gamma / beta exist
// (else an empty (0,) tensor, as every backend's: no kernel), in the accumulation dtype
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_in_act_bwd(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, const at::Tensor& c, const at::Tensor& mean,
    const at::Tensor& rstd, const OptT& gamma, const OptT& beta, at::IntArrayRef stride, at::IntArrayRef padding,
    double slope, c10::List<bool> mask) {
  check_args(x, w, c10::nullopt, stride, padding);
  TORCH_CHECK(mask.size() == 2, "ganengine conv_in_act_bwd (CUDA): output mask must have 2 entries");
  TORCH_CHECK(grad.sizes() == c.sizes() && grad.device() == x.device() && c.device() == x.device(),
              "ganengine conv_in_act_bwd (CUDA): grad has shape ", grad.sizes(), " but the conv output has ",
              c.sizes(), " (both on x's device)");
  const bool m0 = mask[0], m1 = mask[1];
  const c10::cuda::CUDAGuard guard(x.device());
  // dc, and per instance sum(dz * xhat) (gamma's gradient) and sum(dz) (beta's)
  auto [dc, gsum, bsum] = norm_bwd_op().call(grad, c, gamma, beta, mean, rstd, /*apply_act=*/true, slope);
  at::Tensor dx, dw;
  if (m0 || m1) {
    std::tie(dx, dw, std::ignore) = at::convolution_backward(dc, x, w, at::OptionalIntArrayRef(), stride, padding,
                                                             {1, 1}, false, {0, 0}, 1, {m0, m1, false});
  }
  dx = m0 ? dx.contiguous(format_of(x)) : at::empty({0}, x.options());
  dw = m1 ? dw.contiguous(format_of(w)) : at::empty({0}, w.options());
  const bool hg = gamma.has_value() && gamma->defined(), hb = beta.has_value() && beta->defined();
  return {dx, dw, hg ? gsum.sum(0) : at::empty({0}, mean.options()), hb ? bsum.sum(0) : at::empty({0}, mean.options())};
}

}  // namespace
}  // namespace conv_act_cuda
}  // namespace ganengine

TORCH_LIBRARY_IMPL(ganengine_C, CUDA, m) {
  m.impl("conv_act_fwd", &ganengine::conv_act_cuda::conv_act_fwd);
  m.impl("conv_act_bwd", &ganengine::conv_act_cuda::conv_act_bwd);
  m.impl("conv_act_bwd.act", &ganengine::conv_act_cuda::conv_act_bwd_act);
  m.impl("conv_act_bwd.conv", &ganengine::conv_act_cuda::conv_act_bwd_conv);
  m.impl("conv_in_act_fwd", &ganengine::conv_act_cuda::conv_in_act_fwd);
  m.impl("conv_in_act_bwd", &ganengine::conv_act_cuda::conv_in_act_bwd);
}
