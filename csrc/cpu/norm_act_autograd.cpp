// The eager entry of instance_norm_act on CPU tensors: one C++ op, ganengine_C::instance_norm_act,
// with its own autograd, so that a call costs one dispatcher call and no Python custom-op layer
// (the pattern of batch_norm_act_autograd.cpp; a Python custom op costs more host time per call
// than eager's F.instance_norm + F.leaky_relu at small shapes). It calls norm_act_fwd / _bwd
// through the dispatcher. The Python wrapper sends here only calls without running statistics;
// any input this op refuses (it throws before doing anything) goes back to the Python route,
// which raises the public error messages. torch.compile stays on the Python custom op (a C++
// Autograd op fails opcheck's test_aot_dispatch_dynamic).
//
// Backward: norm_act_bwd, except under create_graph=True (grad mode on inside backward): then it
// differentiates the reference composition (var_mean + affine + leaky_relu) so second
// derivatives are exact, as the Python route does.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <vector>

namespace ganengine {
namespace ina {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptT = c10::optional<at::Tensor>;
using Tri = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using FwdSig = Tri(const at::Tensor&, const OptT&, const OptT&, double, bool, double);
using BwdSig = Tri(const at::Tensor&, const at::Tensor&, const OptT&, const OptT&, const at::Tensor&,
                   const at::Tensor&, bool, double);

const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("ganengine_C::norm_act_fwd", "").typed<FwdSig>();
  return op;
}

const c10::TypedOperatorHandle<BwdSig>& bwd_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("ganengine_C::norm_act_bwd", "").typed<BwdSig>();
  return op;
}

inline bool present(const OptT& t) { return t.has_value() && t->defined(); }

bool float_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

// what the Python route accepts for its kernels; anything else is refused (the wrapper then takes
// the Python route, which raises its own messages or handles the case: 3-D, empty, ...)
void check(const at::Tensor& x, const OptT& w, const OptT& b) {
  TORCH_CHECK(x.defined() && x.is_cpu() && x.dim() == 4 && x.numel() > 0 && float_dtype(x.scalar_type()),
              "instance_norm_act: not served by the C++ entry");
  for (const OptT* t : {&w, &b}) {
    if (!present(*t)) continue;
    const at::Tensor& p = **t;
    TORCH_CHECK(p.is_cpu() && p.dim() == 1 && p.size(0) == x.size(1) && p.is_floating_point(),
                "instance_norm_act: parameter not served by the C++ entry");
  }
}

// the Python route's _dense_4d: NCHW- or NHWC-dense memory, anything else copied to NCHW once
at::Tensor dense(const at::Tensor& t) {
  if (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t;
  return t.contiguous();
}

// the torch backend's forward (ops/norm_act.py _torch_fwd) with differentiable ATen ops
at::Tensor reference(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps, bool apply,
                     double slope) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xf = x.to(acc);
  auto vm = at::var_mean(xf, {2, 3}, /*unbiased=*/false);
  const at::Tensor& var = std::get<0>(vm);
  const at::Tensor& mean = std::get<1>(vm);
  at::Tensor rstd = at::rsqrt(var + eps);
  if (eps == 0) rstd = at::where(var == 0, at::zeros_like(rstd), rstd);
  at::Tensor z = (xf - mean.unsqueeze(-1).unsqueeze(-1)) * rstd.unsqueeze(-1).unsqueeze(-1);
  if (w.defined()) z = z * w.to(acc).view({1, -1, 1, 1});
  if (b.defined()) z = z + b.to(acc).view({1, -1, 1, 1});
  if (apply) z = slope != 0.0 ? at::leaky_relu(z, slope) : at::relu(z);
  at::Tensor y = at::empty_like(x);
  y.copy_(z);
  return y;
}

struct InstanceNormActFn : public torch::autograd::Function<InstanceNormActFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const OptT& w, const OptT& b, double eps,
                            bool apply, double slope) {
    at::Tensor y, mean, rstd;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(y, mean, rstd) = fwd_op().call(dense(x), w, b, eps, apply, slope);
    }
    ctx->save_for_backward({x, present(w) ? *w : at::Tensor(), present(b) ? *b : at::Tensor(), mean, rstd});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["apply"] = apply;
    ctx->saved_data["slope"] = slope;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &b = saved[2], &mean = saved[3], &rstd = saved[4];
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool apply = ctx->saved_data["apply"].toBool();
    const double slope = ctx->saved_data["slope"].toDouble();
    variable_list out(6);
    const at::Tensor& gy = grads[0];
    if (!gy.defined()) return out;
    // edges exist for the tensors that were present: x, then weight, then bias
    const size_t ew = 1, eb = w.defined() ? 2 : 1;
    const bool nx = ctx->needs_input_grad(0);
    const bool nw = w.defined() && ctx->needs_input_grad(ew);
    const bool nb = b.defined() && ctx->needs_input_grad(eb);
    if (at::GradMode::is_enabled()) {
      std::vector<at::Tensor> inputs;
      std::vector<int> slot;
      if (nx) inputs.push_back(x), slot.push_back(0);
      if (nw) inputs.push_back(w), slot.push_back(1);
      if (nb) inputs.push_back(b), slot.push_back(2);
      if (inputs.empty()) return out;
      const at::Tensor y = reference(x, w, b, eps, apply, slope);
      auto g = torch::autograd::grad({y}, inputs, {gy}, /*retain_graph=*/true, /*create_graph=*/true,
                                     /*allow_unused=*/true);
      for (size_t i = 0; i < slot.size(); ++i) out[slot[i]] = g[i];
      return out;
    }
    auto r = bwd_op().call(gy, dense(x), w.defined() ? OptT(w) : OptT(), b.defined() ? OptT(b) : OptT(), mean,
                           rstd, apply, slope);
    if (nx) out[0] = std::get<0>(r);
    if (nw) out[1] = std::get<1>(r).sum(0).to(w.scalar_type());
    if (nb) out[2] = std::get<2>(r).sum(0).to(b.scalar_type());
    return out;
  }
};

at::Tensor instance_norm_act_autograd(const at::Tensor& x, const OptT& w, const OptT& b, double eps, bool apply,
                                      double slope) {
  check(x, w, b);
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || (present(w) && w->requires_grad()) || (present(b) && b->requires_grad()));
  if (!grad) {
    at::AutoDispatchBelowADInplaceOrView below;
    return std::get<0>(fwd_op().call(dense(x), w, b, eps, apply, slope));
  }
  return InstanceNormActFn::apply(x, w, b, eps, apply, slope);
}

// backend keys without autograd (inference mode)
at::Tensor instance_norm_act_plain(const at::Tensor& x, const OptT& w, const OptT& b, double eps, bool apply,
                                   double slope) {
  check(x, w, b);
  return std::get<0>(fwd_op().call(dense(x), w, b, eps, apply, slope));
}

}  // namespace
}  // namespace ina
}  // namespace ganengine

TORCH_LIBRARY_FRAGMENT(ganengine_C, m) {
  m.def("instance_norm_act(Tensor x, Tensor? weight, Tensor? bias, float eps, bool apply_act, float slope) -> Tensor");
}

TORCH_LIBRARY_IMPL(ganengine_C, Autograd, m) {
  m.impl("instance_norm_act", &ganengine::ina::instance_norm_act_autograd);
}

TORCH_LIBRARY_IMPL(ganengine_C, CompositeExplicitAutograd, m) {
  m.impl("instance_norm_act", &ganengine::ina::instance_norm_act_plain);
}
