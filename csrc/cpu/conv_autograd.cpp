// The eager entries of the conv family on CPU tensors, so that a call costs one dispatcher call
// and no Python custom-op layer (the pattern of conv_act_autograd.cpp):
//
//   ganengine_C::conv3x3(x, w, b?, padding, reflect)                          (GF.conv3x3)
//   ganengine_C::conv(x, w, b?, stride, padding, output_padding, transposed)  (GF.conv2d /
//                                                                              GF.conv_transpose2d)
//
// Both are CompositeImplicitAutograd: the route is decided once per call by the family's router
// (conv_route.h). Where it says oneDNN, the entry runs the torch composition itself (reflection
// pad + at::conv2d, at::conv2d, at::conv_transpose2d), so autograd is ATen's and the numbers are
// those of the composition the Python route ran for these calls. Where it says GEMM or Winograd,
// the entry runs a C++ autograd Function (lean_autograd.h) over the family's kernel ops
// (ganengine_C::conv3x3_fwd / _bwd, ::conv_fwd / _bwd, called through the dispatcher with the
// decided route, so FakeTensorMode sees their fakes), saving the decision for the backward; the
// layouts and masks are the Python custom op's, so the numbers are bitwise its. Under
// create_graph=True the backward differentiates the torch composition (second derivatives
// exact, as on the Python route).
//
// A call this entry does not serve is refused before any work with NotImplementedError
// (TORCH_CHECK_NOT_IMPLEMENTED) and a message starting "conv3x3: not served by the C++ entry" or
// "conv: not served by the C++ entry": shapes, dtypes, devices or paddings the Python route
// rejects (it raises the public errors), non-fp32 tensors (the Python route sends them to the
// torch backend, as the cpu backend's verdict says), autocast on (the Python route casts), empty
// tensors. torch.compile stays on the Python custom ops.
//
// The checks and bodies are also plain functions (conv_lean.h: refusal3 / run3, refusal / run),
// which the Python fast entries (conv_py.cpp) call for plain eager calls without entering these
// dispatcher ops (their entry and the nested redispatch cost ~1 us a call); the ops remain for
// tensor subclasses, torch function modes and torch.ops callers.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <vector>

#include "conv_lean.h"
#include "conv_route.h"
#include "lean_autograd.h"

namespace ganengine {
namespace conv_lean {
namespace {

using conv_route::Decision;
using conv_route::Route;
using lean::OptT;
using lean::present;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tri = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

using Fwd3Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&, int64_t, bool, int64_t);
using Bwd3Sig = Tri(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool, int64_t, at::IntArrayRef);
using FwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&, at::IntArrayRef, at::IntArrayRef,
                          at::IntArrayRef, bool, int64_t, int64_t);
using BwdSig = Tri(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                   at::IntArrayRef, bool, at::IntArrayRef, int64_t, int64_t);

const c10::TypedOperatorHandle<Fwd3Sig>& fwd3_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("ganengine_C::conv3x3_fwd", "").typed<Fwd3Sig>();
  return op;
}
const c10::TypedOperatorHandle<Bwd3Sig>& bwd3_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("ganengine_C::conv3x3_bwd", "").typed<Bwd3Sig>();
  return op;
}
const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("ganengine_C::conv_fwd", "").typed<FwdSig>();
  return op;
}
const c10::TypedOperatorHandle<BwdSig>& bwd_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("ganengine_C::conv_bwd", "").typed<BwdSig>();
  return op;
}

bool plain_cpu(const at::Tensor& t) { return t.is_cpu() && t.layout() == at::kStrided; }

using conv_common::out_format;
// (oneDNN on CPU tensors: conv_common::aten_conv)
const auto& onednn = conv_common::aten_conv;

// ---------------------------------------------------------------------------------- conv3x3
// What the Python route's cpu backend serves, with nothing to check or convert first; metadata
// only, so no work is done before a refusal. Returns what is not served, or nullptr.
#define REFUSE3_UNLESS(cond, what) \
  if (!(cond)) return what

const char* refusal3_impl(const at::Tensor& x, const at::Tensor& w, const OptT& b, int64_t pad, bool reflect) {
  REFUSE3_UNLESS(x.defined() && plain_cpu(x) && x.dim() == 4 && x.numel() > 0 && x.scalar_type() == at::kFloat, "x");
  REFUSE3_UNLESS(w.defined() && plain_cpu(w) && w.dim() == 4 && w.size(0) > 0 && w.size(1) == x.size(1) &&
                     w.size(2) == 3 && w.size(3) == 3 && w.scalar_type() == at::kFloat,
                 "weight");
  if (present(b)) {
    const at::Tensor& t = *b;
    REFUSE3_UNLESS(plain_cpu(t) && t.dim() == 1 && t.size(0) == w.size(0) && t.scalar_type() == at::kFloat, "bias");
  }
  if (const char* why = conv_common::geometry3_refusal(x, pad, reflect)) return why;
  REFUSE3_UNLESS(!at::autocast::is_autocast_enabled(at::kCPU), "autocast");
  return nullptr;
}

// ops/conv3x3.py reference_conv3x3: the torch composition
at::Tensor reference3(const at::Tensor& x, const at::Tensor& w, const OptT& b, int64_t pad, bool reflect) {
  const std::vector<int64_t> one{1, 1};
  if (reflect) return at::conv2d(at::reflection_pad2d(x, {pad, pad, pad, pad}), w, b, one, std::vector<int64_t>{0, 0});
  return at::conv2d(x, w, b, one, std::vector<int64_t>{pad, pad});
}

struct Conv3x3Fn : public torch::autograd::Function<Conv3x3Fn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const OptT& b, int64_t pad,
                            bool reflect, int64_t tile) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      y = fwd3_op().call(x, w, b, pad, reflect, tile).contiguous(out_format(x));
    }
    lean::save_xwb(ctx, x, w, b, {});
    ctx->saved_data["pad"] = pad;
    ctx->saved_data["reflect"] = reflect;
    ctx->saved_data["tile"] = tile;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const int64_t pad = ctx->saved_data["pad"].toInt(), tile = ctx->saved_data["tile"].toInt();
    const bool reflect = ctx->saved_data["reflect"].toBool();
    const bool nx = ctx->needs_input_grad(0), nw = ctx->needs_input_grad(1);
    const bool nb = s[2].defined() && ctx->needs_input_grad(2);
    return lean::backward_xwb(
        ctx, grads, s, 6,
        [&](const variable_list& t) { return reference3(t[0], t[1], lean::as_opt(t[2]), pad, reflect); },
        [&](const at::Tensor& gy, const variable_list& t) {
          at::AutoDispatchBelowADInplaceOrView below;
          Tri r = bwd3_op().call(gy, t[0], t[1], pad, reflect, tile, {int64_t(nx), int64_t(nw), int64_t(nb)});
          if (nx) std::get<0>(r) = std::get<0>(r).contiguous(out_format(t[0]));
          return r;
        },
        [](const at::Tensor& g, const at::Tensor&) { return g; });
  }
};

at::Tensor run3_impl(const at::Tensor& x, const at::Tensor& w, const OptT& b, int64_t padding, bool reflect) {
  reflect = reflect && padding > 0;
  const Decision d = conv_route::decide3x3(x, w, padding);
  if (d.route != Route::Winograd3x3) {  // reference3, with at::conv2d's own body (see onednn())
    const std::vector<int64_t> p0{0, 0}, pp{padding, padding};
    const at::Tensor y = reflect ? onednn(at::reflection_pad2d(x, {padding, padding, padding, padding}), w, b, {1, 1},
                                          p0, p0, false)
                                 : onednn(x, w, b, {1, 1}, pp, p0, false);
    return y.contiguous(out_format(x));
  }
  if (!lean::records_grad(x, w, b)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return fwd3_op().call(x, w, b, padding, reflect, d.tile).contiguous(out_format(x));
  }
  return Conv3x3Fn::apply(x, w, b, padding, reflect, d.tile);
}

// ---------------------------------------------------------------------------------- conv
#define REFUSE_UNLESS(cond, what) \
  if (!(cond)) return what

const char* refusal_impl(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride, at::IntArrayRef padding,
           at::IntArrayRef output_padding, bool transposed) {
  REFUSE_UNLESS(x.defined() && plain_cpu(x) && x.dim() == 4 && x.numel() > 0 && x.scalar_type() == at::kFloat, "x");
  REFUSE_UNLESS(w.defined() && plain_cpu(w) && w.dim() == 4 && w.numel() > 0 &&
                    w.size(transposed ? 0 : 1) == x.size(1) && w.scalar_type() == at::kFloat,
                "weight");
  const int64_t c_out = w.size(transposed ? 1 : 0);
  if (present(b)) {
    const at::Tensor& t = *b;
    REFUSE_UNLESS(plain_cpu(t) && t.dim() == 1 && t.size(0) == c_out && t.scalar_type() == at::kFloat, "bias");
  }
  if (const char* why = conv_common::geometry_refusal(x, w, stride, padding, output_padding, transposed)) return why;
  REFUSE_UNLESS(!at::autocast::is_autocast_enabled(at::kCPU), "autocast");
  return nullptr;
}

// ops/conv.py reference_conv: the torch composition
at::Tensor reference(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef output_padding, bool transposed) {
  if (transposed) return at::conv_transpose2d(x, w, b, stride, padding, output_padding);
  return at::conv2d(x, w, b, stride, padding);
}

struct ConvFn : public torch::autograd::Function<ConvFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const OptT& b,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                            bool transposed, int64_t route, int64_t tile) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      y = fwd_op().call(x, w, b, stride, padding, output_padding, transposed, route, tile).contiguous(out_format(x));
    }
    lean::save_xwb(ctx, x, w, b, {});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["output_padding"] = output_padding.vec();
    ctx->saved_data["transposed"] = transposed;
    ctx->saved_data["route"] = route;
    ctx->saved_data["tile"] = tile;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    const std::vector<int64_t> output_padding = ctx->saved_data["output_padding"].toIntVector();
    const bool transposed = ctx->saved_data["transposed"].toBool();
    const int64_t route = ctx->saved_data["route"].toInt(), tile = ctx->saved_data["tile"].toInt();
    const bool nx = ctx->needs_input_grad(0), nw = ctx->needs_input_grad(1);
    const bool nb = s[2].defined() && ctx->needs_input_grad(2);
    return lean::backward_xwb(
        ctx, grads, s, 9,
        [&](const variable_list& t) {
          return reference(t[0], t[1], lean::as_opt(t[2]), stride, padding, output_padding, transposed);
        },
        [&](const at::Tensor& gy, const variable_list& t) {
          at::AutoDispatchBelowADInplaceOrView below;
          Tri r = bwd_op().call(gy, t[0], t[1], stride, padding, output_padding, transposed,
                                {int64_t(nx), int64_t(nw), int64_t(nb)}, route, tile);
          if (nx) std::get<0>(r) = std::get<0>(r).contiguous(out_format(t[0]));
          if (nw) std::get<1>(r) = std::get<1>(r).contiguous();
          return r;
        },
        [](const at::Tensor& g, const at::Tensor&) { return g; });
  }
};

at::Tensor run_impl(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef output_padding, bool transposed) {
  const Decision d = conv_route::decide(x, w, stride, padding, transposed, output_padding);
  if (d.route == Route::OneDNN)
    return onednn(x, w, b, stride, padding, output_padding, transposed).contiguous(out_format(x));
  const int64_t route = static_cast<int64_t>(d.route);
  if (!lean::records_grad(x, w, b)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return fwd_op().call(x, w, b, stride, padding, output_padding, transposed, route, d.tile).contiguous(out_format(x));
  }
  return ConvFn::apply(x, w, b, stride, padding, output_padding, transposed, route, d.tile);
}

}  // namespace

// conv_lean.h: the checks and bodies, shared with the Python fast entries (conv_py.cpp)
const char* refusal3(const at::Tensor& x, const at::Tensor& w, const OptT& b, int64_t padding, bool reflect) {
  return refusal3_impl(x, w, b, padding, reflect);
}
at::Tensor run3(const at::Tensor& x, const at::Tensor& w, const OptT& b, int64_t padding, bool reflect) {
  return run3_impl(x, w, b, padding, reflect);
}
const char* refusal(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef output_padding, bool transposed) {
  return refusal_impl(x, w, b, stride, padding, output_padding, transposed);
}
at::Tensor run(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
               at::IntArrayRef padding, at::IntArrayRef output_padding, bool transposed) {
  return run_impl(x, w, b, stride, padding, output_padding, transposed);
}

namespace {
// the dispatcher ops (torch.ops.ganengine_C.conv3x3 / .conv): a refusal is a NotImplementedError
at::Tensor conv3x3(const at::Tensor& x, const at::Tensor& w, const OptT& b, int64_t padding, bool reflect) {
  const char* why = refusal3_impl(x, w, b, padding, reflect);
  TORCH_CHECK_NOT_IMPLEMENTED(why == nullptr, "conv3x3: not served by the C++ entry (", why, ")");
  return run3_impl(x, w, b, padding, reflect);
}

at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef output_padding, bool transposed) {
  const char* why = refusal_impl(x, w, b, stride, padding, output_padding, transposed);
  TORCH_CHECK_NOT_IMPLEMENTED(why == nullptr, "conv: not served by the C++ entry (", why, ")");
  return run_impl(x, w, b, stride, padding, output_padding, transposed);
}
}  // namespace
}  // namespace conv_lean
}  // namespace ganengine

TORCH_LIBRARY_FRAGMENT(ganengine_C, m) {
  m.def("conv3x3(Tensor x, Tensor weight, Tensor? bias, int padding, bool reflect) -> Tensor");
  m.def("conv(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] output_padding, "
        "bool transposed) -> Tensor");
}

TORCH_LIBRARY_IMPL(ganengine_C, CompositeImplicitAutograd, m) {
  m.impl("conv3x3", &ganengine::conv_lean::conv3x3);
  m.impl("conv", &ganengine::conv_lean::conv);
}
