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
//
// It also traces (torch.library.opcheck's aot_dispatch tests, static and dynamic shapes): the entry
// and its backward read sizes as SymInts, and a tracer's tensors (FakeTensor, FunctionalTensor) are
// never written through a pointer. The one value a trace cannot read, momentum=None's factor
// 1 / num_batches_tracked, makes the traced call update the running statistics with ATen ops.
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

// a tracer's tensor (FakeTensor, FunctionalTensor: Python subclasses; functionalization's C++
// wrapper): no memory behind it, and its writes must reach the tracer as ops
bool traced(const at::Tensor& t) {
  return t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
}

// nn.BatchNorm's exponential_average_factor; counts this batch in num_batches_tracked. nullopt: the
// factor is 1 / a traced count (momentum=None under a tracer), which run_fwd applies with ATen ops.
std::optional<double> resolve_factor(const OptT& running_mean, const OptT& nbt, bool training,
                                     std::optional<double> momentum, bool per_sample) {
  const bool update = training && present(running_mean);
  if (update && present(nbt)) {
    const at::Tensor& t = *nbt;
    TORCH_CHECK_VALUE(t.sym_numel() == 1, op_name(per_sample),
                      ": num_batches_tracked must hold one count, got shape ", t.sym_sizes());
    // (running_mean's device is x's: checked with the other tensors)
    TORCH_CHECK_VALUE(t.device() == running_mean->device(), op_name(per_sample), ": num_batches_tracked is on ",
                      t.device(), " but x is on ", running_mean->device());
    if (t.is_cpu() && t.scalar_type() == at::kLong && !traced(t)) {
      int64_t* p = t.data_ptr<int64_t>();
      const double count = static_cast<double>(++*p);
      torch::autograd::impl::bump_version(t);
      return momentum.has_value() ? *momentum : 1.0 / count;
    }
    t.add_(1);
    if (momentum.has_value()) return *momentum;
    if (traced(t)) return std::nullopt;
    return 1.0 / t.item<double>();
  }
  if (!momentum.has_value()) {
    TORCH_CHECK_VALUE(!update, op_name(per_sample),
                      ": momentum=None (a cumulative average) needs num_batches_tracked, the batch count "
                      "nn.BatchNorm keeps; pass it, or a float momentum");
    return 0.0;
  }
  return *momentum;
}

// running = f * batch + (1 - f) * running in fp64, as the forward kernel updates it (update_running)
void running_update_aten(const at::Tensor& running, const at::Tensor& batch, const at::Tensor& f) {
  running.copy_(batch.to(at::kDouble) * f + running.to(at::kDouble) * (1 - f));
}

// (y, stats) of the forward kernel, which updates the running statistics by `factor`; with
// `traced_count` given (resolve_factor's nullopt) the factor is 1 / traced_count and ATen ops
// update them after the kernel instead
std::tuple<at::Tensor, at::Tensor> run_fwd(const at::Tensor& x, const OptT& w, const OptT& b, const OptT& rm,
                                           const OptT& rv, const OptT& traced_count, double factor, double eps,
                                           double slope, int64_t flags) {
  if (!present(traced_count)) return fwd_op().call(x, w, b, rm, rv, factor, eps, slope, flags);
  auto out = fwd_op().call(x, w, b, {}, {}, 0.0, eps, slope, flags);  // (training: rm, rv are not read)
  const at::Tensor& stats = std::get<1>(out);
  const at::Tensor f = traced_count->reshape({}).to(at::kDouble).reciprocal();
  running_update_aten(*rm, stats[0], f);
  running_update_aten(*rv, stats[2], f);
  return out;
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
  c10::SymDimVector cshape(x.dim(), 1), pshape(x.dim(), 1);
  cshape[1] = pshape[1] = x.sym_size(1);
  if (per_sample) pshape[0] = x.sym_size(0);
  at::Tensor z = training ? at::batch_norm(xf, {}, {}, {}, {}, true, 0.0, eps, false)
                          : (xf - stats[0].to(acc).view_symint(cshape)) * stats[1].to(acc).view_symint(cshape);
  if (w.defined()) z = z * w.to(acc).reshape_symint(pshape);
  if (b.defined()) z = z + b.to(acc).reshape_symint(pshape);
  if (apply_act) z = at::leaky_relu(z, slope);
  return z;
}

struct BatchNormActFn : public torch::autograd::Function<BatchNormActFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const OptT& w, const OptT& b, const OptT& rm,
                            const OptT& rv, const OptT& traced_count, double factor, double eps, double slope,
                            int64_t flags) {
    auto out = run_fwd(x, w, b, rm, rv, traced_count, factor, eps, slope, flags);
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
        ctx, grads, s, /*num_args=*/10,
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
          return out.sym_sizes() == p.sym_sizes() ? out : out.reshape_symint(p.sym_sizes());
        });
  }
};

at::Tensor batch_norm_act_autograd(const at::Tensor& x, const OptT& w, const OptT& b, const OptT& rm, const OptT& rv,
                                   const OptT& nbt, std::optional<double> momentum, double eps, double slope,
                                   int64_t flags) {
  const bool training = flags & kTraining;
  check_forward_args(x, w, b, rm, rv, training, eps, flags & kPerSample, x.device().type());
  const std::optional<double> f = resolve_factor(rm, nbt, training, momentum, flags & kPerSample);
  const OptT traced_count = f.has_value() ? OptT() : nbt;
  if (!lean::records_grad(x, w, b)) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      y = std::get<0>(run_fwd(x, w, b, rm, rv, traced_count, f.value_or(0.0), eps, slope, flags));
    }
    bump_running(rm, rv, training);
    return y;
  }
  return BatchNormActFn::apply(x, w, b, rm, rv, traced_count, f.value_or(0.0), eps, slope, flags);
}

// backend keys without autograd (inference mode)
at::Tensor batch_norm_act_plain(const at::Tensor& x, const OptT& w, const OptT& b, const OptT& rm, const OptT& rv,
                                const OptT& nbt, std::optional<double> momentum, double eps, double slope,
                                int64_t flags) {
  const bool training = flags & kTraining;
  check_forward_args(x, w, b, rm, rv, training, eps, flags & kPerSample, x.device().type());
  const std::optional<double> f = resolve_factor(rm, nbt, training, momentum, flags & kPerSample);
  return std::get<0>(run_fwd(x, w, b, rm, rv, f.has_value() ? OptT() : nbt, f.value_or(0.0), eps, slope, flags));
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
