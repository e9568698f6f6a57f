// The eager entry of instance_norm_act: one C++ op, ganengine_C::instance_norm_act, with its own
// autograd, so that a call costs one dispatcher call and no Python layer (the pattern of
// batch_norm_act_autograd.cpp; the Python route costs more host time per call than eager's
// F.instance_norm + F.leaky_relu at small shapes). It calls norm_act_fwd / _bwd through the
// dispatcher, so it serves CPU tensors (the cpu backend's kernels) and CUDA tensors (the cuda
// backend's, csrc/cuda/norm_act_launcher.cpp) alike, with the same arguments the Python route
// passes them; ops/norm_act.py calls it on CUDA tensors only where the cuda backend is the one
// chosen (_dispatch.cuda_entry). ganengine_C::instance_norm_act_rs is the same call with the running-
// statistics update of nn.InstanceNorm2d(track_running_stats=True) in training (StarGAN's norms):
// the update is the Python route's ATen ops, in the same order, so the bits agree.
// A call this op does not serve (3-D, empty, a parameter of the wrong shape, ...) is refused
// before any work with NotImplementedError (TORCH_CHECK_NOT_IMPLEMENTED) and a message starting
// "instance_norm_act: not served by the C++ entry"; the wrapper (ops/norm_act.py, _refused) takes
// only that, or the dispatcher not taking a non-Tensor weight/bias, as a refusal and then takes
// the Python route, which serves the call or raises the public error. Any other error propagates.
// torch.compile stays on the Python custom op (a C++ Autograd op fails opcheck's
// test_aot_dispatch_dynamic).
//
// Backward (lean_autograd.h): norm_act_bwd, except under create_graph=True: then it
// differentiates the reference composition (var_mean + affine + leaky_relu) so second
// derivatives are exact, as the Python route does.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "lean_autograd.h"

namespace ganengine {
namespace ina {
namespace {

using lean::AutogradContext;
using lean::OptT;
using lean::present;
using lean::variable_list;
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

bool float_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

// a device whose kernels this build has: CPU always, CUDA when the CUDA launchers were built in
bool served_device(const at::Tensor& x) {
  if (x.is_cpu()) return true;
  static const bool cuda = lean::cuda_kernels({"ganengine_C::norm_act_fwd", "ganengine_C::norm_act_bwd"});
  return cuda && x.is_cuda();
}

// what the Python route accepts for its kernels; anything else is refused before any work, with
// NotImplementedError and this message prefix (the wrapper then takes the Python route, which
// raises its own messages or handles the case: 3-D, empty, ...)
void check(const at::Tensor& x, const OptT& w, const OptT& b) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      x.defined() && served_device(x) && x.dim() == 4 && x.numel() > 0 && float_dtype(x.scalar_type()),
      "instance_norm_act: not served by the C++ entry (x)");
  for (const OptT* t : {&w, &b}) {
    if (!present(*t)) continue;
    const at::Tensor& p = **t;
    // (dtype: x's, or float32 for a half / bfloat16 x, as F.instance_norm takes them)
    const auto xs = x.scalar_type(), ps = p.scalar_type();
    const bool dtype_ok = ps == xs || (ps == at::kFloat && (xs == at::kHalf || xs == at::kBFloat16));
    TORCH_CHECK_NOT_IMPLEMENTED(p.device() == x.device() && p.dim() == 1 && p.size(0) == x.size(1) && dtype_ok,
                                "instance_norm_act: not served by the C++ entry (", t == &w ? "weight" : "bias",
                                ")");
  }
}

// the Python route's _dense_4d: NCHW- or NHWC-dense memory, anything else copied to NCHW once
at::Tensor dense(const at::Tensor& t) {
  if (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t;
  return t.contiguous();  // (NCHW: eager's instance norm gives a slice of a channels_last map NCHW out)
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
  // outputs y, mean, rstd (the statistics for the running-statistics update, not differentiable)
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptT& w, const OptT& b, double eps,
                               bool apply, double slope) {
    at::Tensor y, mean, rstd;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(y, mean, rstd) = fwd_op().call(dense(x), w, b, eps, apply, slope);
    }
    lean::save_xwb(ctx, x, w, b, {mean, rstd});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["apply"] = apply;
    ctx->saved_data["slope"] = slope;
    ctx->mark_non_differentiable({mean, rstd});
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();  // x, w, b, mean, rstd
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool apply = ctx->saved_data["apply"].toBool();
    const double slope = ctx->saved_data["slope"].toDouble();
    return lean::backward_xwb(
        ctx, grads, s, /*num_args=*/6,
        [&](const variable_list& t) { return reference(t[0], t[1], t[2], eps, apply, slope); },
        [&](const at::Tensor& gy, const variable_list& t) {
          return bwd_op().call(gy, dense(t[0]), lean::as_opt(t[1]), lean::as_opt(t[2]), t[3], t[4], apply, slope);
        },
        // the kernel's parameter gradients are per instance (N, C) in the accumulation dtype
        [](const at::Tensor& g, const at::Tensor& p) { return g.sum(0).to(p.scalar_type()); });
  }
};

at::Tensor instance_norm_act_autograd(const at::Tensor& x, const OptT& w, const OptT& b, double eps, bool apply,
                                      double slope) {
  check(x, w, b);
  if (!lean::records_grad(x, w, b)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return std::get<0>(fwd_op().call(dense(x), w, b, eps, apply, slope));
  }
  return InstanceNormActFn::apply(x, w, b, eps, apply, slope)[0];
}

// backend keys without autograd (inference mode)
at::Tensor instance_norm_act_plain(const at::Tensor& x, const OptT& w, const OptT& b, double eps, bool apply,
                                   double slope) {
  check(x, w, b);
  return std::get<0>(fwd_op().call(dense(x), w, b, eps, apply, slope));
}

// ---------------------------------------------------------------- with running statistics
void check_running(const at::Tensor& x, const at::Tensor& rm, const at::Tensor& rv) {
  for (const at::Tensor* t : {&rm, &rv})
    TORCH_CHECK_NOT_IMPLEMENTED(t->defined() && t->device() == x.device() && t->dim() == 1 && t->size(0) == x.size(1) &&
                                    t->is_floating_point(),
                                "instance_norm_act: not served by the C++ entry (",
                                t == &rm ? "running_mean" : "running_var", ")");
  // one pixel: no unbiased variance (the Python route raises its error)
  TORCH_CHECK_NOT_IMPLEMENTED(x.size(2) * x.size(3) > 1, "instance_norm_act: not served by the C++ entry (1 pixel)");
}

// ops/norm_act.py's update, op for op: the biased variance back from rstd in double, unbiased,
// averaged over the batch (ATen's instance norm averages its per-instance running statistics).
// An op of its own (ganengine_C::instance_norm_running_update, a backend kernel) so that its ATen
// calls run below the Python dispatch key: a TorchDispatchMode (op counters, profilers of aten
// ops) sees one ganengine op, as for the statistics kernel, not a dozen ATen ops.
void running_update_kernel(at::Tensor& rm, at::Tensor& rv, const at::Tensor& mean, const at::Tensor& rstd,
                           double momentum, double eps, int64_t hw) {
  at::NoGradGuard no_grad;
  // a zero rstd: an infinite variance (a plane whose sum of squares overflowed), or with eps = 0
  // ATen's invstd for a zero variance
  at::Tensor var = rstd.to(at::kDouble).pow(-2) - eps;
  if (eps == 0) var = at::where(rstd == 0, 0.0, var);
  var = var.clamp_min(0) * (static_cast<double>(hw) / static_cast<double>(hw - 1));
  rm.mul_(1 - momentum).add_(mean.mean(0).to(rm.scalar_type()), momentum);
  rv.mul_(1 - momentum).add_(var.mean(0).to(rv.scalar_type()), momentum);
}

using UpdSig = void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, int64_t);

void update_running(at::Tensor& rm, at::Tensor& rv, const at::Tensor& mean, const at::Tensor& rstd, double momentum,
                    double eps, int64_t hw) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ganengine_C::instance_norm_running_update", "")
                             .typed<UpdSig>();
  at::AutoDispatchBelowADInplaceOrView below;
  op.call(rm, rv, mean, rstd, momentum, eps, hw);
}

at::Tensor instance_norm_act_rs_autograd(const at::Tensor& x, const OptT& w, const OptT& b, at::Tensor& running_mean,
                                         at::Tensor& running_var, double momentum, double eps, bool apply,
                                         double slope) {
  check(x, w, b);
  check_running(x, running_mean, running_var);
  at::Tensor y, mean, rstd;
  if (lean::records_grad(x, w, b)) {
    auto out = InstanceNormActFn::apply(x, w, b, eps, apply, slope);
    y = out[0], mean = out[1], rstd = out[2];
  } else {
    at::AutoDispatchBelowADInplaceOrView below;
    std::tie(y, mean, rstd) = fwd_op().call(dense(x), w, b, eps, apply, slope);
  }
  update_running(running_mean, running_var, mean, rstd, momentum, eps, x.size(2) * x.size(3));
  return y;
}

at::Tensor instance_norm_act_rs_plain(const at::Tensor& x, const OptT& w, const OptT& b, at::Tensor& running_mean,
                                      at::Tensor& running_var, double momentum, double eps, bool apply,
                                      double slope) {
  check(x, w, b);
  check_running(x, running_mean, running_var);
  auto out = fwd_op().call(dense(x), w, b, eps, apply, slope);
  update_running(running_mean, running_var, std::get<1>(out), std::get<2>(out), momentum, eps, x.size(2) * x.size(3));
  return std::get<0>(out);
}

}  // namespace
}  // namespace ina
}  // namespace ganengine

TORCH_LIBRARY_FRAGMENT(ganengine_C, m) {
  m.def("instance_norm_act(Tensor x, Tensor? weight, Tensor? bias, float eps, bool apply_act, float slope) -> Tensor");
  m.def("instance_norm_act_rs(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!) running_mean, "
        "Tensor(b!) running_var, float momentum, float eps, bool apply_act, float slope) -> Tensor");
  m.def("instance_norm_running_update(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor rstd, "
        "float momentum, float eps, int hw) -> ()");
}

TORCH_LIBRARY_IMPL(ganengine_C, Autograd, m) {
  m.impl("instance_norm_act", &ganengine::ina::instance_norm_act_autograd);
  m.impl("instance_norm_act_rs", &ganengine::ina::instance_norm_act_rs_autograd);
}

TORCH_LIBRARY_IMPL(ganengine_C, CompositeExplicitAutograd, m) {
  m.impl("instance_norm_act", &ganengine::ina::instance_norm_act_plain);
  m.impl("instance_norm_act_rs", &ganengine::ina::instance_norm_act_rs_plain);
  m.impl("instance_norm_running_update", &ganengine::ina::running_update_kernel);
}
