// The C++ autograd shared by the lean entries (ganengine_C::instance_norm_act, ::batch_norm_act,
// ::conv2d_act):
// ops whose first three arguments are x, weight?, bias?, with a fused backward kernel and, under
// create_graph=True (grad mode on inside backward), the gradient of a reference composition of
// differentiable ATen ops, so second derivatives (WGAN-GP, R1) are exact.
//
// Saved tensors: x, weight, bias (undefined where absent), then the op's own (statistics).
// Autograd edges exist only for the tensors that were present (ExtractVariables in
// custom_function.h skips an absent optional): x is edge 0, weight edge 1, bias edge 1 or 2.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <initializer_list>
#include <vector>

namespace ganengine {
namespace lean {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptT = c10::optional<at::Tensor>;

inline bool present(const OptT& t) { return t.has_value() && t->defined(); }

// whether every op named ("ganengine_C::...") has a CUDA kernel in this build (the CUDA launchers
// were built in): an entry calling them through the dispatcher then serves CUDA tensors as well
// (callers keep the answer in a function-local static: it is fixed once the extension is loaded)
inline bool cuda_kernels(std::initializer_list<const char*> ops) {
  auto& d = c10::Dispatcher::singleton();
  for (const char* op : ops)
    if (!d.findSchemaOrThrow(op, "").hasKernelForDispatchKey(c10::DispatchKey::CUDA)) return false;
  return true;
}

// a saved optional tensor back as the kernels take it
inline OptT as_opt(const at::Tensor& t) { return t.defined() ? OptT(t) : OptT(); }

// whether this call records a graph: the entry then goes through the autograd Function
inline bool records_grad(const at::Tensor& x, const OptT& w, const OptT& b) {
  return at::GradMode::is_enabled() &&
         (x.requires_grad() || (present(w) && w->requires_grad()) || (present(b) && b->requires_grad()));
}

inline void save_xwb(AutogradContext* ctx, const at::Tensor& x, const OptT& w, const OptT& b,
                     std::initializer_list<at::Tensor> extra) {
  variable_list saved;
  saved.reserve(3 + extra.size());
  saved.push_back(x);
  saved.push_back(present(w) ? *w : at::Tensor());
  saved.push_back(present(b) ? *b : at::Tensor());
  saved.insert(saved.end(), extra.begin(), extra.end());
  ctx->save_for_backward(std::move(saved));
}

// The backward of an op with `num_args` arguments (x, weight?, bias?, ...): gradients in slots
// 0..2, undefined where not needed or absent. Called with the unpacked saved tensors `s`:
//   reference(s) -> y               y as a differentiable function of s[0..2] (create_graph=True)
//   kernel(gy, s) -> (dx, dw, db)   the fused backward
//   param_grad(g, p) -> grad        a kernel's parameter gradient in p's shape and dtype
template <class Reference, class Kernel, class ParamGrad>
variable_list backward_xwb(AutogradContext* ctx, const variable_list& grads, const variable_list& s, size_t num_args,
                           const Reference& reference, const Kernel& kernel, const ParamGrad& param_grad) {
  variable_list out(num_args);
  const at::Tensor& gy = grads[0];
  if (!gy.defined()) return out;
  const at::Tensor &x = s[0], &w = s[1], &b = s[2];
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
    const at::Tensor y = reference(s);
    auto g = torch::autograd::grad({y}, inputs, {gy.to(y.scalar_type())}, /*retain_graph=*/true,
                                   /*create_graph=*/true, /*allow_unused=*/true);
    for (size_t i = 0; i < slot.size(); ++i) out[slot[i]] = g[i];
    return out;
  }
  if (!nx && !nw && !nb) return out;
  auto r = kernel(gy, s);
  if (nx) out[0] = std::get<0>(r);
  if (nw) out[1] = param_grad(std::get<1>(r), w);
  if (nb) out[2] = param_grad(std::get<2>(r), b);
  return out;
}

}  // namespace lean
}  // namespace ganengine
