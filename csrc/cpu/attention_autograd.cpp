// The eager entries of the attention family on CPU tensors, with their autograd in C++, so that a
// call costs one dispatcher call and no Python custom-op layer (the pattern of
// norm_act_autograd.cpp; at SAGAN's small shapes the Python custom op, its register_autograd and
// dispatch cost about as much host time as the whole eager block):
//
//   ganengine_C::attention(q, k, v, x, gamma)        the core, Autograd + CompositeExplicitAutograd
//   ganengine_C::self_attention2d(x, qw, qb, kw, kb, vw, vb, gamma)
//                                                   the block: the 1x1 convs (ATen, autograd as
//                                                   eager) + the core; CompositeImplicitAutograd
//
// Both reproduce the Python cpu route of ops/attention.py step by step (same dtype conversions,
// same layouts, the same kernels ganengine_C::attention_fwd / _bwd called through the dispatcher,
// the same tensors saved, the block's three 1x1 convs stacked into one as ops/attention.py
// stacked_conv1x1 does), so their numbers are bitwise those of that route. Whatever they do
// not serve they refuse BEFORE any work with TORCH_CHECK_NOT_IMPLEMENTED (Python's
// NotImplementedError): the Python wrapper then takes its full route, which raises the public
// errors. torch.compile stays on the Python custom op; the C++ ops still trace (opcheck's
// aot_dispatch tests, static and dynamic shapes): what a tracer reaches reads SymInt sizes.
//
// Backward: attention_bwd, except under create_graph=True (grad mode on inside backward): then
// the gradients are formed with differentiable ATen ops (ops/attention.py _grads_differentiable,
// op for op), so second derivatives (WGAN-GP, R1) are exact, as on the Python route.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace ganengine {
namespace attn_lean {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;
using OptT = c10::optional<Tensor>;
using Tri = std::tuple<Tensor, Tensor, Tensor>;
using FwdSig = Tri(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&);
using BwdSig = Tri(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                   const Tensor&, const Tensor&);
using CoreSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&);

const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("ganengine_C::attention_fwd", "").typed<FwdSig>();
  return op;
}

const c10::TypedOperatorHandle<BwdSig>& bwd_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("ganengine_C::attention_bwd", "").typed<BwdSig>();
  return op;
}

const c10::TypedOperatorHandle<CoreSig>& core_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("ganengine_C::attention", "").typed<CoreSig>();
  return op;
}

bool float_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

// the accumulation dtype of ops/attention.py (acc_dtype / _cpu_dtype): fp64 for fp64, else fp32
at::ScalarType acc(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

constexpr int64_t kInt32Limit = int64_t(1) << 31;  // the kernels' BLAS calls take int sizes

// every size fits the kernels' int
bool below_int32(std::initializer_list<c10::SymInt> sizes) {
  return std::all_of(sizes.begin(), sizes.end(), [](const c10::SymInt& n) { return n < kInt32Limit; });
}

bool plain_cpu(const Tensor& t) { return t.defined() && t.is_cpu() && t.layout() == at::kStrided; }

// what ops/attention.py's check_core accepts and the cpu kernels serve; anything else is refused.
// A tracer (torch.compile's AOT dispatch with dynamic shapes) reaches it with symbolic sizes: it
// reads SymInts (size() would specialize them, numel() throws), plain int compares on concrete tensors.
void check_core(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& x, const Tensor& gamma) {
  for (const Tensor* t : {&q, &k, &v, &x}) {
    TORCH_CHECK_NOT_IMPLEMENTED(plain_cpu(*t) && t->dim() == 3 && float_dtype(t->scalar_type()),
                                "attention: not served by the C++ entry (q, k, v, x)");
  }
  TORCH_CHECK_NOT_IMPLEMENTED(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                              "attention: not served by the C++ entry (dtypes)");
  const c10::SymInt B = q.sym_size(0), d = q.sym_size(1), N = q.sym_size(2), M = k.sym_size(2), C = v.sym_size(1);
  TORCH_CHECK_NOT_IMPLEMENTED(k.sym_size(0) == B && k.sym_size(1) == d && v.sym_size(0) == B && v.sym_size(2) == M &&
                                  x.sym_size(0) == B && x.sym_size(1) == C && x.sym_size(2) == N,
                              "attention: not served by the C++ entry (shapes)");
  TORCH_CHECK_NOT_IMPLEMENTED(B > 0 && d > 0 && N > 0 && M > 0 && C > 0 && below_int32({N, M, C, d}),
                              "attention: not served by the C++ entry (sizes)");
  TORCH_CHECK_NOT_IMPLEMENTED(plain_cpu(gamma) && gamma.sym_numel() == 1 && gamma.is_floating_point(),
                              "attention: not served by the C++ entry (gamma)");
}

// ``t.to(dtype)`` without the dispatcher call when the dtype already matches (to() returns ``t``
// itself then; calling it below autograd would also trip SchemaCheckMode's no-input-returned rule)
inline Tensor cast(const Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// ops/attention.py _like: ``value`` with ``template``'s strides in ``dtype``
Tensor like(const Tensor& tmpl, at::ScalarType dtype, const Tensor& value) {
  Tensor out = at::empty_like(tmpl, tmpl.options().dtype(dtype));
  if (out.sym_strides() == value.sym_strides() && value.scalar_type() == dtype) return value;
  out.copy_(value);
  return out;
}

// attention_fwd's cpu branch: (out like x, o like x in v's dtype, lse); o and lse only when asked
Tri run_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& x, const Tensor& gamma, bool saved) {
  const auto ct = acc(q.scalar_type());
  auto r = fwd_op().call(cast(q, ct).contiguous(), cast(k, ct).contiguous(), cast(v, ct).contiguous(),
                         cast(x, ct).contiguous(), cast(gamma, ct).reshape({1}));
  Tensor out = like(x, x.scalar_type(), cast(std::get<0>(r), x.scalar_type()));
  if (!saved) return {out, Tensor(), Tensor()};
  Tensor o = like(x, v.scalar_type(), cast(std::get<1>(r), v.scalar_type()));
  return {out, o, std::get<2>(r)};
}

// _grads_differentiable of ops/attention.py, op for op (double backward; builds P)
std::tuple<Tensor, Tensor, Tensor, Tensor> grads_differentiable(const Tensor& g, const Tensor& q, const Tensor& k,
                                                                const Tensor& v, const Tensor& gamma) {
  const auto ct = acc(q.scalar_type());
  const Tensor qf = cast(q, ct), kf = cast(k, ct), vf = cast(v, ct), gf = cast(g, ct);
  const Tensor gam = cast(gamma, ct).reshape({});
  const Tensor p = at::softmax(at::bmm(qf.transpose(1, 2), kf), -1);
  const Tensor o = at::bmm(vf, p.transpose(1, 2));
  Tensor dgamma = (gf * o).sum();
  const Tensor d_o = gam * gf;
  const Tensor dv = at::bmm(d_o, p);
  const Tensor dp = at::bmm(d_o.transpose(1, 2), vf);
  const Tensor ds = p * (dp - (p * dp).sum({-1}, /*keepdim=*/true));
  const Tensor dq = at::bmm(kf, ds.transpose(1, 2));
  const Tensor dk = at::bmm(qf, ds);
  return {cast(dq, q.scalar_type()), cast(dk, k.scalar_type()), cast(dv, v.scalar_type()), dgamma};
}

struct AttentionFn : public torch::autograd::Function<AttentionFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& x,
                        const Tensor& gamma) {
    Tensor out, o, lse;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, o, lse) = run_fwd(q, k, v, x, gamma, /*saved=*/true);
    }
    ctx->save_for_backward({q, k, v, gamma, o, lse});  // the Python route's saved tensors
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &q = saved[0], &k = saved[1], &v = saved[2], &gamma = saved[3], &o = saved[4], &lse = saved[5];
    variable_list out(5);
    const Tensor& gy = grads[0];
    if (!gy.defined()) return out;
    const bool nq = ctx->needs_input_grad(0), nk = ctx->needs_input_grad(1), nv = ctx->needs_input_grad(2);
    const bool ng = ctx->needs_input_grad(4);
    Tensor dq, dk, dv, dgamma;
    if (at::GradMode::is_enabled()) {
      if (nq || nk || nv || ng) std::tie(dq, dk, dv, dgamma) = grads_differentiable(gy, q, k, v, gamma);
    } else {
      const auto ct = lse.scalar_type();
      const Tensor rowdot = (cast(gy, ct) * cast(o, ct)).sum({1});  // (B, N)
      if (ng) dgamma = rowdot.sum();
      if (nq || nk || nv) {
        const Tensor delta = rowdot * cast(gamma, ct).reshape({});
        auto r = bwd_op().call(cast(gy, ct).contiguous(), cast(q, ct).contiguous(), cast(k, ct).contiguous(),
                               cast(v, ct).contiguous(), cast(o, ct).contiguous(), cast(lse, ct).contiguous(),
                               cast(delta, ct).contiguous(), cast(gamma, ct).reshape({1}));
        if (nq) dq = like(q, q.scalar_type(), cast(std::get<0>(r), q.scalar_type()));
        if (nk) dk = like(k, k.scalar_type(), cast(std::get<1>(r), k.scalar_type()));
        if (nv) dv = like(v, v.scalar_type(), cast(std::get<2>(r), v.scalar_type()));
      }
    }
    if (nq) out[0] = dq;
    if (nk) out[1] = dk;
    if (nv) out[2] = dv;
    if (ctx->needs_input_grad(3)) out[3] = gy;  // dx = grad_out (the residual)
    if (ng) out[4] = cast(dgamma, gamma.scalar_type()).reshape_symint(gamma.sym_sizes());
    return out;
  }
};

Tensor attention_autograd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& x, const Tensor& gamma) {
  check_core(q, k, v, x, gamma);
  const bool grad = at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad() ||
                                                   x.requires_grad() || gamma.requires_grad());
  if (!grad) {
    at::AutoDispatchBelowADInplaceOrView below;
    return std::get<0>(run_fwd(q, k, v, x, gamma, /*saved=*/false));
  }
  return AttentionFn::apply(q, k, v, x, gamma);
}

// backend keys without autograd (inference mode)
Tensor attention_plain(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& x, const Tensor& gamma) {
  check_core(q, k, v, x, gamma);
  return std::get<0>(run_fwd(q, k, v, x, gamma, /*saved=*/false));
}

// ---------------------------------------------------------------------------------------- the block
inline bool present(const OptT& t) { return t.has_value() && t->defined(); }

// (the block's checks also run under a tracer, torch.compile's AOT dispatch with dynamic shapes,
// whose FakeTensors have symbolic sizes: they read sym_size / sym_numel, plain int compares on
// concrete tensors, never size() / numel())
void check_weight(const Tensor& x, const Tensor& w, const c10::SymInt& out_ch, const OptT& b) {
  TORCH_CHECK_NOT_IMPLEMENTED(plain_cpu(w) && w.dim() == 4 && w.sym_size(0) == out_ch &&
                                  w.sym_size(1) == x.sym_size(1) && w.sym_size(2) == 1 && w.sym_size(3) == 1 &&
                                  w.scalar_type() == x.scalar_type(),
                              "self_attention2d: weight not served by the C++ entry");
  if (!present(b)) return;
  TORCH_CHECK_NOT_IMPLEMENTED(plain_cpu(*b) && b->dim() == 1 && b->sym_size(0) == out_ch &&
                                  b->scalar_type() == x.scalar_type(),
                              "self_attention2d: bias not served by the C++ entry");
}

// ops/attention.py self_attention2d (return_attention=False) with 4-D weights: the convs as its
// Python route runs them (stacked where the biases are all present or all absent), then the core
// through the dispatcher (its Autograd kernel above)
Tensor self_attention2d(const Tensor& x, const Tensor& qw, const OptT& qb, const Tensor& kw, const OptT& kb,
                        const Tensor& vw, const OptT& vb, const Tensor& gamma) {
  TORCH_CHECK_NOT_IMPLEMENTED(plain_cpu(x) && x.dim() == 4 && float_dtype(x.scalar_type()) && x.sym_numel() > 0,
                              "self_attention2d: x not served by the C++ entry");
  TORCH_CHECK_NOT_IMPLEMENTED(plain_cpu(qw) && qw.dim() == 4 && qw.sym_size(0) > 0,
                              "self_attention2d: query_weight not served by the C++ entry");
  const c10::SymInt B = x.sym_size(0), C = x.sym_size(1), H = x.sym_size(2), W = x.sym_size(3), d = qw.sym_size(0);
  check_weight(x, qw, d, qb);
  check_weight(x, kw, d, kb);
  check_weight(x, vw, C, vb);
  TORCH_CHECK_NOT_IMPLEMENTED(below_int32({H * W, C, d}),
                              "self_attention2d: sizes not served by the C++ entry");
  TORCH_CHECK_NOT_IMPLEMENTED(plain_cpu(gamma) && gamma.sym_numel() == 1 && gamma.is_floating_point(),
                              "self_attention2d: gamma not served by the C++ entry");
  Tensor q, k, v;
  const bool all_biases = present(qb) && present(kb) && present(vb);
  if (all_biases || (!present(qb) && !present(kb) && !present(vb))) {
    // ops/attention.py stacked_conv1x1: one conv with the weights (and biases) stacked, split as
    // the Python route splits it (split_with_sizes: its backward is one cat)
    const OptT bias = all_biases ? OptT(at::cat({*qb, *kb, *vb})) : OptT();
    const auto qkv = at::conv2d(x, at::cat({qw, kw, vw}), bias).flatten(2).split_with_sizes_symint({d, d, C}, 1);
    q = qkv[0], k = qkv[1], v = qkv[2];
  } else {  // mixed biases: the three convs
    q = at::conv2d(x, qw, qb).flatten(2);
    k = at::conv2d(x, kw, kb).flatten(2);
    v = at::conv2d(x, vw, vb).flatten(2);
  }
  return core_op().call(q, k, v, x.flatten(2), gamma).view_symint({B, C, H, W});
}

}  // namespace
}  // namespace attn_lean
}  // namespace ganengine

TORCH_LIBRARY_FRAGMENT(ganengine_C, m) {
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor x, Tensor gamma) -> Tensor");
  m.def("self_attention2d(Tensor x, Tensor query_weight, Tensor? query_bias, Tensor key_weight, "
        "Tensor? key_bias, Tensor value_weight, Tensor? value_bias, Tensor gamma) -> Tensor");
}

TORCH_LIBRARY_IMPL(ganengine_C, Autograd, m) {
  m.impl("attention", &ganengine::attn_lean::attention_autograd);
}

TORCH_LIBRARY_IMPL(ganengine_C, CompositeExplicitAutograd, m) {
  m.impl("attention", &ganengine::attn_lean::attention_plain);
}

TORCH_LIBRARY_IMPL(ganengine_C, CompositeImplicitAutograd, m) {
  m.impl("self_attention2d", &ganengine::attn_lean::self_attention2d);
}
