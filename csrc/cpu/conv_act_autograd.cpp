// The eager entry of conv2d_act on CPU tensors: one C++ op, ganengine_C::conv2d_act, with its own
// autograd, so that a call costs one dispatcher call and no Python custom-op layer (the pattern of
// norm_act_autograd.cpp; the custom op's Python layers cost 50-70 us per call more than eager's
// F.conv2d + F.leaky_relu, at every size). It calls the same kernels as the custom op's cpu
// backend, conv_act_fwd / conv_act_bwd, through the dispatcher, so the numbers are the same bit
// for bit.
//
// A call this op does not serve is refused before any work with NotImplementedError
// (TORCH_CHECK_NOT_IMPLEMENTED) and a message starting "conv2d_act: not served by the C++ entry":
// bad shapes, dtypes or devices (the Python route raises the public errors), a negative slope
// (the Python route runs the torch composition), autocast on (the Python route casts), empty
// tensors. The wrapper catches only that refusal; any other error propagates. torch.compile stays
// on the Python custom op.
//
// Backward: conv_act_bwd (it needs only the sign of the saved output, valid for slope >= 0),
// except under create_graph=True (grad mode on inside backward): then it differentiates the
// torch composition leaky_relu(conv2d(x, w, b)), so second derivatives (WGAN-GP, R1) are exact,
// as the Python route does (the bookkeeping shared with the other lean entries: lean_autograd.h).
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <vector>

#include "lean_autograd.h"

namespace ganengine {
namespace conv_act_lean {
namespace {

using lean::OptT;
using lean::present;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using FwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&, at::IntArrayRef, at::IntArrayRef,
                          double);
using BwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                              const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                                              at::IntArrayRef, double, c10::List<bool>);

const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("ganengine_C::conv_act_fwd", "").typed<FwdSig>();
  return op;
}

const c10::TypedOperatorHandle<BwdSig>& bwd_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("ganengine_C::conv_act_bwd", "").typed<BwdSig>();
  return op;
}

bool float_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

bool plain_cpu(const at::Tensor& t) { return t.is_cpu() && t.layout() == at::kStrided; }

#define REFUSE_UNLESS(cond, what) \
  TORCH_CHECK_NOT_IMPLEMENTED(cond, "conv2d_act: not served by the C++ entry (", what, ")")

// What the Python route sends to the cpu backend's kernels, with nothing to check or convert
// first; anything else is refused (the Python route then raises its public error or handles the
// case). Only reads metadata: no work is done before a refusal.
void check(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
           at::IntArrayRef padding, double slope) {
  REFUSE_UNLESS(x.defined() && plain_cpu(x) && x.dim() == 4 && x.numel() > 0 && float_dtype(x.scalar_type()), "x");
  REFUSE_UNLESS(w.defined() && plain_cpu(w) && w.dim() == 4 && w.numel() > 0 && w.size(1) == x.size(1) &&
                    w.scalar_type() == x.scalar_type(),
                "weight");
  if (present(b)) {
    const at::Tensor& t = *b;
    REFUSE_UNLESS(plain_cpu(t) && t.dim() == 1 && t.size(0) == w.size(0) && t.scalar_type() == x.scalar_type(),
                  "bias");
  }
  REFUSE_UNLESS(stride.size() == 2 && padding.size() == 2 && stride[0] >= 1 && stride[1] >= 1 && padding[0] >= 0 &&
                    padding[1] >= 0,
                "stride, padding");
  // an empty output map: the Python route decides (a kernel larger than the padded input)
  REFUSE_UNLESS(x.size(2) + 2 * padding[0] >= w.size(2) && x.size(3) + 2 * padding[1] >= w.size(3), "output size");
  REFUSE_UNLESS(slope >= 0, "negative_slope");  // (a NaN slope too)
  REFUSE_UNLESS(!at::autocast::is_autocast_enabled(at::kCPU), "autocast");
}

// the Python route's _dense: NCHW- or NHWC-dense memory, anything else copied to NCHW once
at::Tensor dense(const at::Tensor& t) {
  if (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t;
  return t.contiguous();
}

struct ConvActFn : public torch::autograd::Function<ConvActFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const OptT& b,
                            at::IntArrayRef stride, at::IntArrayRef padding, double slope) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      y = fwd_op().call(dense(x), w, b, stride, padding, slope);
    }
    // the output, not the conv result: the fused backward needs only its sign
    lean::save_xwb(ctx, x, w, b, {y});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["slope"] = slope;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    const double slope = ctx->saved_data["slope"].toDouble();
    // edges: x 0, weight 1, bias 2 when present (the weight is always present here)
    const bool nx = ctx->needs_input_grad(0), nw = ctx->needs_input_grad(1);
    const bool nb = s[2].defined() && ctx->needs_input_grad(2);
    return lean::backward_xwb(
        ctx, grads, s, 6,
        [&](const variable_list& t) {  // create_graph=True: the torch composition, differentiated
          return at::leaky_relu(at::conv2d(t[0], t[1], lean::as_opt(t[2]), stride, padding), slope);
        },
        [&](const at::Tensor& gy, const variable_list& t) {
          return bwd_op().call(gy, dense(t[0]), t[1], t[3], stride, padding, slope, c10::List<bool>({nx, nw, nb}));
        },
        [](const at::Tensor& g, const at::Tensor&) { return g; });
  }
};

at::Tensor conv2d_act_autograd(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
                               at::IntArrayRef padding, double slope) {
  check(x, w, b, stride, padding, slope);
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || w.requires_grad() || (present(b) && b->requires_grad()));
  if (!grad) {
    at::AutoDispatchBelowADInplaceOrView below;
    return fwd_op().call(dense(x), w, b, stride, padding, slope);
  }
  return ConvActFn::apply(x, w, b, stride, padding, slope);
}

// backend keys without autograd (inference mode)
at::Tensor conv2d_act_plain(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
                            at::IntArrayRef padding, double slope) {
  check(x, w, b, stride, padding, slope);
  return fwd_op().call(dense(x), w, b, stride, padding, slope);
}

}  // namespace
}  // namespace conv_act_lean
}  // namespace ganengine

TORCH_LIBRARY_FRAGMENT(ganengine_C, m) {
  m.def("conv2d_act(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, float slope) -> Tensor");
}

TORCH_LIBRARY_IMPL(ganengine_C, Autograd, m) {
  m.impl("conv2d_act", &ganengine::conv_act_lean::conv2d_act_autograd);
}

TORCH_LIBRARY_IMPL(ganengine_C, CompositeExplicitAutograd, m) {
  m.impl("conv2d_act", &ganengine::conv_act_lean::conv2d_act_plain);
}
