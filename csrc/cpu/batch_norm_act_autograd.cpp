// The eager entry of batch_norm_act: one C++ op, ganengine_C::batch_norm_act, with its own
// autograd, so that a call costs no Python beyond the public function (a Python custom op or
// autograd.Function costs more host time per call than eager's whole F.batch_norm + F.relu at
// small shapes; see docs/batch_norm_act.md). Device-generic: it calls batch_norm_act_fwd / _bwd
// through the dispatcher, which picks the CPU or CUDA kernel.
//
// Running statistics are updated inside the forward kernel (momentum already resolved here,
// nn.BatchNorm's rule: with num_batches_tracked given the count goes up by one, and
// momentum=None means the factor 1 / count). The backward calls batch_norm_act_bwd, except
// under create_graph=True (grad mode on inside backward): then it differentiates the reference
// composition (at::batch_norm + affine + leaky_relu) so second derivatives are exact (the
// backward shared with instance_norm_act's entry: lean_autograd.h).
//
// Unlike instance_norm_act's entry, this op serves every call the Python layer sends it and its
// argument checks (batch_norm_act.h) raise the public errors themselves.
#include "batch_norm_act.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "lean_autograd.h"

namespace ganengine {
namespace bn {
namespace {

using lean::AutogradContext;
using lean::OptT;
using lean::present;
using lean::variable_list;

using FwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const OptT&, const OptT&, const OptT&,
                                                  const OptT&, double, double, double, int64_t);
using BwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptT&,
                                                              const OptT&, const at::Tensor&, double, int64_t);

const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("ganengine_C::batch_norm_act_fwd", "").typed<FwdSig>();
  return op;
}

const c10::TypedOperatorHandle<BwdSig>& bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("ganengine_C::batch_norm_act_bwd", "").typed<BwdSig>();
  return op;
}

// nn.BatchNorm's exponential_average_factor; counts this batch in num_batches_tracked
double resolve_factor(const OptT& running_mean, const OptT& nbt, bool training, std::optional<double> momentum,
                      bool per_sample) {
  const bool update = training && present(running_mean);
  if (update && present(nbt)) {
    const at::Tensor& t = *nbt;
    TORCH_CHECK_VALUE(t.numel() == 1, op_name(per_sample), ": num_batches_tracked must hold one count, got shape ",
                      t.sizes());
    // (running_mean's device is x's: checked with the other tensors)
    TORCH_CHECK_VALUE(t.device() == running_mean->device(), op_name(per_sample), ": num_batches_tracked is on ",
                      t.device(), " but x is on ", running_mean->device());
    double count;
    if (t.is_cpu() && t.scalar_type() == at::kLong) {
      int64_t* p = t.data_ptr<int64_t>();
      count = static_cast<double>(++*p);
      torch::autograd::impl::bump_version(t);
    } else {
      t.add_(1);
      count = momentum.has_value() ? 0.0 : t.item<double>();
    }
    return momentum.has_value() ? *momentum : 1.0 / count;
  }
  if (!momentum.has_value()) {
    TORCH_CHECK_VALUE(!update, op_name(per_sample),
                      ": momentum=None (a cumulative average) needs num_batches_tracked, the batch count "
                      "nn.BatchNorm keeps; pass it, or a float momentum");
    return 0.0;
  }
  return *momentum;
}

void bump_running(const OptT& rm, const OptT& rv, bool training) {
  if (!training || !present(rm)) return;
  torch::autograd::impl::bump_version(*rm);
  torch::autograd::impl::bump_version(*rv);
}

// act(batch_norm(x) * g + b) with differentiable ATen ops (eval: the saved running statistics)
at::Tensor reference(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& stats,
                     bool training, double eps, bool apply_act, double slope, bool per_sample) {
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor xf = x.to(acc);
  std::vector<int64_t> cshape(x.dim(), 1), pshape(x.dim(), 1);
  cshape[1] = pshape[1] = x.size(1);
  if (per_sample) pshape[0] = x.size(0);
  at::Tensor z = training ? at::batch_norm(xf, {}, {}, {}, {}, true, 0.0, eps, false)
                          : (xf - stats[0].to(acc).view(cshape)) * stats[1].to(acc).view(cshape);
  if (w.defined()) z = z * w.to(acc).reshape(pshape);
  if (b.defined()) z = z + b.to(acc).reshape(pshape);
  if (apply_act) z = at::leaky_relu(z, slope);
  return z;
}

struct BatchNormActFn : public torch::autograd::Function<BatchNormActFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const OptT& w, const OptT& b, const OptT& rm,
                            const OptT& rv, double factor, double eps, double slope, int64_t flags) {
    auto out = fwd_op().call(x, w, b, rm, rv, factor, eps, slope, flags);
    bump_running(rm, rv, flags & kTraining);
    lean::save_xwb(ctx, x, w, b, {std::get<1>(out)});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["slope"] = slope;
    ctx->saved_data["flags"] = flags;
    return std::get<0>(out);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();  // x, w, b, stats
    const double eps = ctx->saved_data["eps"].toDouble();
    const double slope = ctx->saved_data["slope"].toDouble();
    const int64_t flags = ctx->saved_data["flags"].toInt();
    return lean::backward_xwb(
        ctx, grads, s, /*num_args=*/9,
        [&](const variable_list& t) {
          return reference(t[0], t[1], t[2], t[3], flags & kTraining, eps, flags & kApplyAct, slope,
                           flags & kPerSample);
        },
        [&](const at::Tensor& gy, const variable_list& t) {
          return bwd_op().call(gy, t[0], lean::as_opt(t[1]), lean::as_opt(t[2]), t[3], slope, flags);
        },
        // the kernels return parameter gradients in the accumulation dtype, shaped (C) or (N, C)
        [](const at::Tensor& g, const at::Tensor& p) {
          at::Tensor out = g.scalar_type() == p.scalar_type() ? g : g.to(p.scalar_type());
          return out.sizes() == p.sizes() ? out : out.reshape(p.sizes());
        });
  }
};

at::Tensor batch_norm_act_autograd(const at::Tensor& x, const OptT& w, const OptT& b, const OptT& rm, const OptT& rv,
                                   const OptT& nbt, std::optional<double> momentum, double eps, double slope,
                                   int64_t flags) {
  const bool training = flags & kTraining;
  check_forward_args(x, w, b, rm, rv, training, eps, flags & kPerSample, x.device().type());
  const double f = resolve_factor(rm, nbt, training, momentum, flags & kPerSample);
  if (!lean::records_grad(x, w, b)) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      y = std::get<0>(fwd_op().call(x, w, b, rm, rv, f, eps, slope, flags));
    }
    bump_running(rm, rv, training);
    return y;
  }
  return BatchNormActFn::apply(x, w, b, rm, rv, f, eps, slope, flags);
}

// backend keys without autograd (inference mode)
at::Tensor batch_norm_act_plain(const at::Tensor& x, const OptT& w, const OptT& b, const OptT& rm, const OptT& rv,
                                const OptT& nbt, std::optional<double> momentum, double eps, double slope,
                                int64_t flags) {
  const bool training = flags & kTraining;
  check_forward_args(x, w, b, rm, rv, training, eps, flags & kPerSample, x.device().type());
  const double f = resolve_factor(rm, nbt, training, momentum, flags & kPerSample);
  return std::get<0>(fwd_op().call(x, w, b, rm, rv, f, eps, slope, flags));
}

}  // namespace
}  // namespace bn
}  // namespace ganengine

TORCH_LIBRARY_FRAGMENT(ganengine_C, m) {
  // flags as batch_norm_act_fwd's: 1 training, 2 apply the activation, 4 per-sample gain and bias
  m.def("batch_norm_act(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "Tensor(c!)? num_batches_tracked, float? momentum, float eps, float slope, int flags) -> Tensor");
}

TORCH_LIBRARY_IMPL(ganengine_C, Autograd, m) { m.impl("batch_norm_act", &ganengine::bn::batch_norm_act_autograd); }

TORCH_LIBRARY_IMPL(ganengine_C, CompositeExplicitAutograd, m) {
  m.impl("batch_norm_act", &ganengine::bn::batch_norm_act_plain);
}
