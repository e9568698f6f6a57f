// The eager entries of gan_loss and discriminator_loss on CPU tensors: one C++ op each,
// ganengine_C::gan_loss / ganengine_C::discriminator_loss, with the autograd in C++, so that a
// call costs one dispatcher call and no Python autograd.Function (at a 30x30 logit map the Python
// layers cost more host time than eager's whole F.binary_cross_entropy_with_logits).
//
// They run the same kernel as the Python route (losses_adv_fwd, through the dispatcher) with the
// same per-term modes, targets and scales, and the same backward as ops/losses.py's adv_backward:
// the gradient written in the forward pass is handed out as it is when grad_output is 1 (scaled in
// place otherwise, once; a second backward recomputes), a linear term's gradient is an expanded
// scalar, and under create_graph=True (grad mode on inside backward) the gradient is the
// differentiable reference formula (torch_adv_grad), so second derivatives are exact. The result
// is in the input dtype, except under autocast, where it stays fp32 (ops/losses.py's _finish).
//
// They serve CUDA tensors too where the CUDA kernel is built (the same losses_adv_fwd through the
// dispatcher; grad_output then never read on the host): ops/losses.py calls them on CUDA tensors
// only where the cuda backend is the one chosen (_dispatch.cuda_entry).
//
// A call these ops do not serve (an unknown or non-lowercase mode, an empty list, an empty map,
// mixed dtypes or devices, a device without a kernel, more maps than the CUDA kernel takes, a
// dtype without a kernel) is refused before any
// work with NotImplementedError and a message starting "<op>: not served by the C++ entry"; the
// wrapper (ops/losses.py) then takes the Python route, which serves the call or raises the public
// error. torch.compile stays on the Python custom op (ganengine::adv_loss).
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <c10/util/SmallVector.h>

#include <string>
#include <vector>

#include "lean_autograd.h"

namespace ganengine {
namespace losses_lean {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// elementwise loss codes of ops/losses.py and csrc/cpu/losses.cpp
enum Mode : int64_t { BCE = 0, MSE = 1, HINGE_REAL = 2, HINGE_FAKE = 3, LINEAR = 4 };

using FwdSig = std::tuple<at::Tensor, std::vector<at::Tensor>>(at::TensorList, at::IntArrayRef,
                                                               at::ArrayRef<double>, at::ArrayRef<double>, bool);

const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("ganengine_C::losses_adv_fwd", "").typed<FwdSig>();
  return op;
}

bool served_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

// the CUDA kernel takes up to this many maps per launch (csrc/cuda/losses_launcher.cpp, kMaxTerms)
constexpr size_t kMaxCudaTerms = 4;

// a device whose kernel this build has: CPU always, CUDA when the CUDA launchers were built in
bool served_device(const at::Tensor& x, size_t k) {
  if (x.is_cpu()) return true;
  static const bool cuda = lean::cuda_kernels({"ganengine_C::losses_adv_fwd"});
  return cuda && x.is_cuda() && k <= kMaxCudaTerms;
}

// every map a non-empty tensor of one served dtype on one served device: else refused before any work
void check(at::TensorList xs, const char* prefix) {
  TORCH_CHECK_NOT_IMPLEMENTED(!xs.empty(), prefix, " (no logits)");
  const auto dtype = xs[0].defined() ? xs[0].scalar_type() : at::kFloat;
  TORCH_CHECK_NOT_IMPLEMENTED(xs[0].defined() && served_device(xs[0], xs.size()), prefix, " (logits)");
  const auto device = xs[0].device();
  for (const at::Tensor& x : xs) {
    TORCH_CHECK_NOT_IMPLEMENTED(x.defined() && x.device() == device && x.scalar_type() == dtype &&
                                    served_dtype(dtype) && x.numel() > 0,
                                prefix, " (logits)");
  }
}

// (code, target) of one term: ops/losses.py's _term_code for a lowercase mode name; -1 if unknown
std::pair<int64_t, double> term_code(c10::string_view mode, bool is_real, bool for_discriminator, double real_label,
                                     double fake_label) {
  if (mode == "vanilla") return {BCE, is_real ? real_label : fake_label};
  if (mode == "lsgan") return {MSE, is_real ? real_label : fake_label};
  if (mode == "hinge" && for_discriminator) return {is_real ? HINGE_REAL : HINGE_FAKE, 0.0};
  if (mode == "hinge" || mode == "wgangp") return {LINEAR, is_real ? -1.0 : 1.0};
  return {-1, 0.0};
}

// ops/losses.py's torch_adv_grad: d(elementwise loss)/dx in the accumulation dtype, differentiable
at::Tensor reference_grad(const at::Tensor& x, int64_t mode, double target) {
  const at::Tensor xf = x.to(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  switch (mode) {
    case BCE:
      return at::sigmoid(xf) - target;
    case MSE:
      return (xf - target) * 2.0;
    case HINGE_REAL:  // relu's own backward applied to 1 - x (a NaN logit passes the gradient)
      return at::threshold_backward(at::full_like(xf, -1.0), at::rsub(xf, 1.0), 0.0);
    case HINGE_FAKE:
      return at::threshold_backward(at::ones_like(xf), xf + 1.0, 0.0);
    default:
      return at::full_like(xf, target);
  }
}

// Per-call bookkeeping is kept small (this is what a call costs at a 30x30 map): one saved_data
// entry for the configuration (mode, target, scale per term, as doubles), one for the gradient
// buffers only when a term writes one, grad_output read only when a buffer may be final, and no
// dtype conversion call where the dtype already matches.
// (g * c).to(x.dtype).expand(x.shape) with the product taken as a C++ scalar in g's dtype: the same
// IEEE product as the tensor multiply (fp32 * fp32(c), or fp64), without its wrapped-scalar tensor
// whether t's value can be read on the host for free: a CPU tensor (on a GPU item() would synchronise
// with the device), and not a fake or other Python-subclass tensor (FakeTensorMode runs this autograd
// code too, where item() has no value to give)
bool concrete(const at::Tensor& t) { return t.is_cpu() && !t.key_set().has(c10::DispatchKey::Python); }

at::Tensor linear_grad(const at::Tensor& g, double c, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor r;
  if (!concrete(g)) {
    r = (g * c).to(opts.dtype().toScalarType());
  } else if (g.scalar_type() == at::kFloat) {
    r = at::scalar_tensor(g.item<float>() * static_cast<float>(c), opts);
  } else if (g.scalar_type() == at::kDouble) {
    r = at::scalar_tensor(g.item<double>() * c, opts);
  } else {
    r = (g * c).to(opts.dtype().toScalarType());
  }
  return r.expand(sizes);
}

// The node of a call whose terms are all linear (wgangp, hinge for the generator: +-mean(x)), the
// common generator step. Its gradient is constant, so it needs no saved tensor and no buffer: a
// plain autograd Node, as ATen's own MeanBackward0, rather than the Function above, whose context
// (saved variables, saved_data) cost more host time than eager's mean(+neg) (acceptance F4). The
// gradients are AdvLossFn's, bit for bit: linear_grad, or the reference formula under create_graph.
struct AdvLossFnLinearBackward : public torch::autograd::Node {
  struct Term {
    c10::SmallVector<int64_t, 5> sizes;
    at::TensorOptions opts;
    double target, scale;
  };
  c10::SmallVector<Term, 2> terms;

  std::string name() const override { return "ganengine::AdvLossFnLinearBackward"; }

  variable_list apply(variable_list&& grads) override {
    const size_t k = terms.size();
    variable_list out(k);
    const at::Tensor& g = grads[0];
    if (!g.defined()) return out;
    const bool grad_mode = at::GradMode::is_enabled();
    for (size_t i = 0; i < k; ++i) {
      if (!task_should_compute_output(i)) continue;
      const Term& t = terms[i];
      if (grad_mode) {  // create_graph=True: AdvLossFn's reference formula (torch_adv_grad's full_like)
        const auto dtype = t.opts.dtype().toScalarType();
        const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
        at::Tensor r = at::full(t.sizes, t.target, t.opts.dtype(acc)) * (g * t.scale);
        out[i] = r.scalar_type() == dtype ? r : r.to(dtype);
      } else {
        out[i] = linear_grad(g, t.scale * t.target, t.sizes, t.opts);
      }
    }
    return out;
  }
};

struct AdvLossFn : public torch::autograd::Function<AdvLossFn> {
  static at::Tensor forward(AutogradContext* ctx, at::TensorList xs, const std::vector<int64_t>& modes,
                            const std::vector<double>& targets, const std::vector<double>& scales) {
    const size_t k = xs.size();
    bool any_buf = false;
    std::vector<double> cfg(3 * k);
    for (size_t i = 0; i < k; ++i) {
      any_buf = any_buf || modes[i] != LINEAR;
      cfg[3 * i] = static_cast<double>(modes[i]);
      cfg[3 * i + 1] = targets[i];
      cfg[3 * i + 2] = scales[i];
    }
    at::Tensor total;
    std::vector<at::Tensor> bufs;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      // (a linear term writes no buffer: without a nonlinear one the kernel is asked for none)
      std::tie(total, bufs) = fwd_op().call(xs, modes, targets, scales, /*want_grad=*/any_buf);
    }
    ctx->save_for_backward(xs.vec());
    ctx->saved_data["cfg"] = std::move(cfg);
    if (any_buf) ctx->saved_data["bufs"] = std::move(bufs);
    return total;
  }

  // ops/losses.py adv_backward(owned=True)
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto xs = ctx->get_saved_variables();
    const size_t k = xs.size();
    variable_list out(k + 3);
    const at::Tensor& g = grads[0];
    // the buffers are handed out (or scaled in place) once: a second backward recomputes
    std::vector<at::Tensor> bufs;
    auto found = ctx->saved_data.find("bufs");
    if (found != ctx->saved_data.end()) {
      if (found->second.isTensorList()) bufs = found->second.toTensorVector();
      found->second = c10::IValue();
    }
    if (!g.defined()) return out;
    const c10::List<double> cfg = ctx->saved_data["cfg"].toDoubleList();
    const bool grad_mode = at::GradMode::is_enabled();
    int one = -1;  // grad_output == 1, read once when needed, on the CPU only (concrete: no device sync)
    for (size_t i = 0; i < k; ++i) {
      if (!ctx->needs_input_grad(i)) continue;
      const at::Tensor& x = xs[i];
      const auto dtype = x.scalar_type();
      const int64_t m = static_cast<int64_t>(cfg.get(3 * i));
      const double t = cfg.get(3 * i + 1), s = cfg.get(3 * i + 2);
      const bool has_buf = i < bufs.size() && bufs[i].defined() && bufs[i].numel() == x.numel();
      if (grad_mode) {  // create_graph=True: the differentiable reference formula
        at::Tensor r = reference_grad(x, m, t) * (g * s);
        out[i] = r.scalar_type() == dtype ? r : r.to(dtype);
      } else if (m == LINEAR) {  // constant gradient: an expanded scalar, nothing written
        out[i] = linear_grad(g, s * t, x.sizes(), x.options());
      } else {
        if (one < 0) one = concrete(g) && g.item<double>() == 1.0;
        if (!has_buf) {  // a second backward (retain_graph): the forward's kernel again, for the same bits
          if (bufs.size() < k) bufs.resize(k);
          at::AutoDispatchBelowADInplaceOrView below;
          const int64_t mode = m;
          bufs[i] = std::get<1>(fwd_op().call(at::TensorList(x), at::IntArrayRef(mode), at::ArrayRef<double>(t),
                                              at::ArrayRef<double>(s), /*want_grad=*/true))[0];
        }
        at::Tensor& b = bufs[i];
        out[i] = one ? b : b.mul_(g.scalar_type() == b.scalar_type() ? g : g.to(b.scalar_type()));
      }
    }
    return out;
  }
};

// the 0-d total of sum_i scale_i * sum(l_i(x_i)), differentiable, in the result dtype of _finish
at::Tensor run(at::TensorList xs, const std::vector<int64_t>& modes, const std::vector<double>& targets,
               const std::vector<double>& scales) {
  bool grad = false;
  if (at::GradMode::is_enabled()) {
    for (const at::Tensor& x : xs) grad = grad || x.requires_grad();
  }
  bool linear = true;
  for (const int64_t m : modes) linear = linear && m == LINEAR;
  at::Tensor total;
  if (grad && linear) {  // the kernel below autograd, then one lean node (AdvLossFnLinearBackward)
    {
      at::AutoDispatchBelowADInplaceOrView below;
      total = std::get<0>(fwd_op().call(xs, modes, targets, scales, /*want_grad=*/false));
    }
    auto node = c10::make_intrusive<AdvLossFnLinearBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(xs));
    for (size_t i = 0; i < xs.size(); ++i) {
      const at::Tensor& x = xs[i];
      node->terms.push_back({c10::SmallVector<int64_t, 5>(x.sizes().begin(), x.sizes().end()), x.options(),
                             targets[i], scales[i]});
    }
    torch::autograd::set_history(total, c10::intrusive_ptr<torch::autograd::Node>(std::move(node)));
  } else if (grad) {
    total = AdvLossFn::apply(xs, modes, targets, scales);
  } else {
    at::AutoDispatchBelowADInplaceOrView below;
    total = std::get<0>(fwd_op().call(xs, modes, targets, scales, /*want_grad=*/false));
  }
  const auto dtype = xs[0].scalar_type();
  if ((dtype == at::kHalf || dtype == at::kBFloat16) && !at::autocast::is_autocast_enabled(xs[0].device().type())) {
    return total.to(dtype);
  }
  return total;
}

constexpr const char* kGanPrefix = "gan_loss: not served by the C++ entry";
constexpr const char* kDiscPrefix = "discriminator_loss: not served by the C++ entry";

at::Tensor gan_loss(at::TensorList logits, c10::string_view mode, bool target_is_real, bool for_discriminator,
                    double real_label, double fake_label) {
  check(logits, kGanPrefix);
  const auto code = term_code(mode, target_is_real, for_discriminator, real_label, fake_label);
  TORCH_CHECK_NOT_IMPLEMENTED(code.first >= 0, kGanPrefix, " (mode)");
  const size_t k = logits.size();
  std::vector<double> scales(k);
  for (size_t i = 0; i < k; ++i) scales[i] = 1.0 / static_cast<double>(logits[i].numel());
  return run(logits, std::vector<int64_t>(k, code.first), std::vector<double>(k, code.second), scales);
}

at::Tensor discriminator_loss(const at::Tensor& real_logits, const at::Tensor& fake_logits, c10::string_view mode,
                              double real_label, double fake_label) {
  const at::Tensor both[2] = {real_logits, fake_logits};
  check(both, kDiscPrefix);
  const auto real = term_code(mode, true, true, real_label, fake_label);
  const auto fake = term_code(mode, false, true, real_label, fake_label);
  TORCH_CHECK_NOT_IMPLEMENTED(real.first >= 0, kDiscPrefix, " (mode)");
  return run(both, {real.first, fake.first}, {real.second, fake.second},
             {0.5 / static_cast<double>(real_logits.numel()), 0.5 / static_cast<double>(fake_logits.numel())});
}

}  // namespace
}  // namespace losses_lean
}  // namespace ganengine

TORCH_LIBRARY_FRAGMENT(ganengine_C, m) {
  m.def("gan_loss(Tensor[] logits, str mode, bool target_is_real, bool for_discriminator, float real_label, "
        "float fake_label) -> Tensor");
  m.def("discriminator_loss(Tensor real_logits, Tensor fake_logits, str mode, float real_label, float fake_label)"
        " -> Tensor");
}

// One kernel for every key: it decides itself whether to record a graph (the Function), and with
// autograd excluded (inference mode) GradMode is off, so it runs the forward kernel alone.
TORCH_LIBRARY_IMPL(ganengine_C, Autograd, m) {
  m.impl("gan_loss", &ganengine::losses_lean::gan_loss);
  m.impl("discriminator_loss", &ganengine::losses_lean::discriminator_loss);
}

TORCH_LIBRARY_IMPL(ganengine_C, CompositeExplicitAutograd, m) {
  m.impl("gan_loss", &ganengine::losses_lean::gan_loss);
  m.impl("discriminator_loss", &ganengine::losses_lean::discriminator_loss);
}
