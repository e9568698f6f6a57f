// The eager entry of conv2d_act: one C++ op, ganengine_C::conv2d_act, with its own
// autograd, so that a call costs one dispatcher call and no Python custom-op layer (the pattern of
// norm_act_autograd.cpp; the custom op's Python layers cost 50-70 us per call more than eager's
// F.conv2d + F.leaky_relu, at every size). It calls the same kernels as the custom op's cpu
// backend, conv_act_fwd / conv_act_bwd, through the dispatcher, so the numbers are the same bit
// for bit. The dispatcher op also serves CUDA tensors where the build has those kernels' CUDA
// implementations (csrc/cuda/conv_act_launcher.cpp: the cuda backend), with every tensor on x's
// device; ops/conv_act.py calls it on CUDA tensors only where the cuda backend is the one chosen
// (_dispatch.cuda_entry). The Python fast entry (conv_py.cpp) serves CPU tensors, and CUDA tensors
// where its caller asks (the same check and body, without the dispatcher op's layer).
//
// A call this op does not serve is refused before any work with NotImplementedError
// (TORCH_CHECK_NOT_IMPLEMENTED) and a message starting "conv2d_act: not served by the C++ entry":
// bad shapes, dtypes or devices (the Python route raises the public errors), a negative slope
// (the Python route runs the torch composition), autocast on (the Python route casts), empty
// tensors. The wrapper catches only that refusal; any other error propagates. torch.compile stays
// on the Python custom op; the C++ ops still trace (opcheck's aot_dispatch tests, static and
// dynamic shapes: their checks and saved sizes are SymInts). The checks and body are also plain
// functions (conv_lean.h), which the Python fast entry ganengine._C.conv2d_act_entry (conv_py.cpp)
// calls for plain eager calls.
//
// Backward: conv_act_bwd's two halves, its overloads .act (the activation's and the bias's gradient:
// it needs only the sign of the saved output, valid for slope >= 0) and .conv (the convolution's), with
// the saved output and the incoming grad dropped between them (see save_all below), except under
// create_graph=True (grad mode on inside backward): then it differentiates the
// torch composition leaky_relu(conv2d(x, w, b)), so second derivatives (WGAN-GP, R1) are exact,
// as the Python route does (the bookkeeping shared with the other lean entries: lean_autograd.h).
//
// ganengine_C::conv2d_in_act (the eager entry of conv2d_instance_norm_act, same design, CUDA
// tensors too where conv_in_act_fwd / _bwd have CUDA kernels): runs
// conv_in_act_fwd / conv_in_act_bwd, saves what the custom op saves (x, weight, gamma, beta and the
// conv output c, mean, rstd), and under create_graph=True differentiates the torch composition
// conv2d -> var_mean -> normalise -> affine -> leaky_relu (reference_conv2d_in_act in
// ops/conv_act.py). Its five tensor arguments (x, weight, bias?, gamma?, beta?) do not fit
// lean_autograd.h's x/weight?/bias? shape, so its backward is written out below; the conv bias
// cancels exactly in the normalisation and gets an exact zero gradient, as the Python route gives.
#include <ATen/ATen.h>
#include <ATen/SavedTensorHooks.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <utility>
#include <vector>

#include "conv_lean.h"
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

const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("ganengine_C::conv_act_fwd", "").typed<FwdSig>();
  return op;
}

// the backward's two halves (conv_act.cpp): the activation's gradient (and the bias's), then the convolution's
using ActBwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double, bool);
using ConvBwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      at::IntArrayRef, at::IntArrayRef, c10::List<bool>);

const c10::TypedOperatorHandle<ActBwdSig>& act_bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("ganengine_C::conv_act_bwd", "act").typed<ActBwdSig>();
  return op;
}

const c10::TypedOperatorHandle<ConvBwdSig>& conv_bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("ganengine_C::conv_act_bwd", "conv").typed<ConvBwdSig>();
  return op;
}

bool float_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}


// whether this build registered CUDA kernels for each entry's ops (csrc/cuda/conv_act_launcher.cpp):
// then the dispatcher entry calling them also serves CUDA tensors
bool act_cuda() {
  // (by name and overload: lean::cuda_kernels reads default overloads only)
  static const bool cuda = [] {
    auto& d = c10::Dispatcher::singleton();
    const std::pair<const char*, const char*> ops[] = {
        {"ganengine_C::conv_act_fwd", ""}, {"ganengine_C::conv_act_bwd", "act"}, {"ganengine_C::conv_act_bwd", "conv"}};
    for (const auto& [name, overload] : ops)
      if (!d.findSchemaOrThrow(name, overload).hasKernelForDispatchKey(c10::DispatchKey::CUDA)) return false;
    return true;
  }();
  return cuda;
}
bool in_cuda() {
  static const bool cuda = lean::cuda_kernels({"ganengine_C::conv_in_act_fwd", "ganengine_C::conv_in_act_bwd"});
  return cuda;
}

// x on a device this call may serve (CPU; CUDA where allowed: the entries, with their CUDA kernels
// built), strided; t strided on x's device
bool served_x(const at::Tensor& x, bool cuda_ok) {
  return x.layout() == at::kStrided && (x.is_cpu() || (cuda_ok && x.is_cuda()));
}
bool beside(const at::Tensor& t, const at::Tensor& x) { return t.layout() == at::kStrided && t.device() == x.device(); }

#define REFUSE_UNLESS(cond, what) \
  if (!(cond)) return what

// the kernel fits in the padded input (else an empty output map, which the Python route decides);
// x and w 4-d; SymInt sizes, as the checks below
bool fits(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef padding) {
  return x.sym_size(2) + 2 * padding[0] >= w.sym_size(2) && x.sym_size(3) + 2 * padding[1] >= w.sym_size(3);
}

// What the Python route sends to the cpu backend's kernels, with nothing to check or convert
// first; anything else is refused (the Python route then raises its public error or handles the
// case). Only reads metadata: no work is done before a refusal. Returns what is not served, or
// nullptr. It also runs under a tracer (torch.compile's AOT dispatch with dynamic shapes: FakeTensors
// with symbolic sizes), so it reads sym_size / sym_numel (plain int compares on concrete tensors).
const char* refusal_impl(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
                         at::IntArrayRef padding, double slope, bool cuda_ok) {
  REFUSE_UNLESS(x.defined() && served_x(x, cuda_ok) && x.dim() == 4 && x.sym_numel() > 0 &&
                    float_dtype(x.scalar_type()),
                "x");
  REFUSE_UNLESS(w.defined() && beside(w, x) && w.dim() == 4 && w.sym_numel() > 0 &&
                    w.sym_size(1) == x.sym_size(1) && w.scalar_type() == x.scalar_type(),
                "weight");
  if (present(b)) {
    const at::Tensor& t = *b;
    REFUSE_UNLESS(beside(t, x) && t.dim() == 1 && t.sym_size(0) == w.sym_size(0) &&
                      t.scalar_type() == x.scalar_type(),
                  "bias");
  }
  REFUSE_UNLESS(stride.size() == 2 && padding.size() == 2 && stride[0] >= 1 && stride[1] >= 1 && padding[0] >= 0 &&
                    padding[1] >= 0,
                "stride, padding");
  // an empty output map: the Python route decides (a kernel larger than the padded input)
  REFUSE_UNLESS(fits(x, w, padding), "output size");
  REFUSE_UNLESS(slope >= 0, "negative_slope");  // (a NaN slope too)
  REFUSE_UNLESS(!at::autocast::is_autocast_enabled(x.device().type()), "autocast");
  return nullptr;
}

// the Python route's _dense: NCHW- or NHWC-dense memory, anything else copied once (conv_lean.h dense_copy)
at::Tensor dense(const at::Tensor& t) {
  if (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t;
  return conv_common::dense_copy(t);
}

// The saved output y. Not a SavedVariable: save_for_backward would hold it until the node is done, through
// the convolution's backward, whereas eager's graph frees LeakyReLU's saved output after its own backward
// node (at 16x64x32x32 the extra live 4 MB made oneDNN's buffers fault in fresh pages on every call:
// with a next layer's dense gradient, forward + backward ran 1.11x eager's; 0.95x now). So it lives in saved_data as its tensor_data (storage
// and version counter shared, no autograd metadata: no reference cycle through its grad_fn, as
// SavedVariable saves an output), and the backward takes it out where the graph is not kept. The version
// check SavedVariable would make is made here. Under saved-tensor hooks (checkpointing, offloading) y is
// saved as before, with x, weight and bias: the hooks own what is saved.
constexpr const char* kY = "y";
constexpr const char* kYVersion = "y_version";

void save_all(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const OptT& b, const at::Tensor& y) {
  if (at::SavedTensorDefaultHooks::get_hooks().has_value()) {
    lean::save_xwb(ctx, x, w, b, {y});
    return;
  }
  lean::save_xwb(ctx, x, w, b, {});
  ctx->saved_data[kY] = y.tensor_data();
  ctx->saved_data[kYVersion] = static_cast<int64_t>(y._version());
}

// y for this backward (`s`: the unpacked saved tensors), and out of the node unless the graph is kept
// (retain_graph / create_graph)
at::Tensor take_output(AutogradContext* ctx, const variable_list& s) {
  if (s.size() == 4) return s[3];  // (saved under hooks)
  auto it = ctx->saved_data.find(kY);
  TORCH_CHECK(it != ctx->saved_data.end(), "conv2d_act: the saved output was already freed (backward through the "
              "graph a second time: use retain_graph=True the first time)");
  at::Tensor y = it->second.toTensor();
  const int64_t saved = ctx->saved_data[kYVersion].toInt();
  TORCH_CHECK(y._version() == saved,
              "one of the variables needed for gradient computation has been modified by an inplace operation: [",
              y.toString(), " ", y.sizes(), "], which is output 0 of ConvActFnBackward (conv2d_act), is at version ",
              y._version(), "; expected version ", saved, " instead.");
  if (!torch::autograd::get_current_graph_task_keep_graph()) ctx->saved_data.erase(it);
  return y;
}

struct ConvActFn : public torch::autograd::Function<ConvActFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const OptT& b,
                            at::IntArrayRef stride, at::IntArrayRef padding, double slope) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      y = fwd_op().call(dense(x), w, b, stride, padding, slope);
    }
    // the output, not the conv result: the fused backward needs only its sign (save_all)
    save_all(ctx, x, w, b, y);
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["slope"] = slope;
    return y;
  }

  // grads by reference (CppNode passes its own list): the incoming grad is dropped as soon as the
  // activation's gradient is made, as eager's LeakyReLU node drops it
  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    auto s = ctx->get_saved_variables();  // x, weight, bias[, y] (raises on a freed graph first)
    at::Tensor y = take_output(ctx, s);
    s.resize(3);
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    const double slope = ctx->saved_data["slope"].toDouble();
    if (at::GradMode::is_enabled() || !grads[0].defined()) {
      y.reset();
      return lean::backward_xwb(
          ctx, grads, s, 6,
          [&](const variable_list& t) {  // create_graph=True: the torch composition, differentiated
            return at::leaky_relu(at::conv2d(t[0], t[1], lean::as_opt(t[2]), stride, padding), slope);
          },
          // (not reached: grad mode is on, or there is no grad; the fused backward is below)
          [](const at::Tensor&, const variable_list&) { return std::tuple<at::Tensor, at::Tensor, at::Tensor>(); },
          [](const at::Tensor& g, const at::Tensor&) { return g; });
    }
    // edges: x 0, weight 1, bias 2 when present (the weight is always present here)
    variable_list out(6);
    const bool nx = ctx->needs_input_grad(0), nw = ctx->needs_input_grad(1);
    const bool nb = s[2].defined() && ctx->needs_input_grad(2);
    if (!nx && !nw && !nb) return out;
    // below autograd, as the forward: else the weight's Autograd key sends the calls through the boxed
    // autograd-not-implemented fallback first
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor gz, db;
    std::tie(gz, db) = act_bwd_op().call(grads[0], y, slope, nb);
    grads[0].reset();  // (what eager's graph has freed by now: the incoming grad and the saved output)
    y.reset();
    if (nb) out[2] = db;
    if (nx || nw) {
      at::Tensor dx, dw;
      std::tie(dx, dw) = conv_bwd_op().call(gz, dense(s[0]), s[1], stride, padding, c10::List<bool>({nx, nw}));
      if (nx) out[0] = dx;
      if (nw) out[1] = dw;
    }
    return out;
  }
};

// after the checks: records the autograd Function where the call records a graph
at::Tensor run_impl(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
                    at::IntArrayRef padding, double slope) {
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || w.requires_grad() || (present(b) && b->requires_grad()));
  if (!grad) {
    at::AutoDispatchBelowADInplaceOrView below;
    return fwd_op().call(dense(x), w, b, stride, padding, slope);
  }
  return ConvActFn::apply(x, w, b, stride, padding, slope);
}

void check(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride, at::IntArrayRef padding,
           double slope) {
  const char* why = refusal_impl(x, w, b, stride, padding, slope, /*cuda_ok=*/act_cuda());
  TORCH_CHECK_NOT_IMPLEMENTED(why == nullptr, "conv2d_act: not served by the C++ entry (", why, ")");
}

at::Tensor conv2d_act_autograd(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
                               at::IntArrayRef padding, double slope) {
  check(x, w, b, stride, padding, slope);
  return run_impl(x, w, b, stride, padding, slope);
}

// backend keys without autograd (inference mode)
at::Tensor conv2d_act_plain(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
                            at::IntArrayRef padding, double slope) {
  check(x, w, b, stride, padding, slope);
  return fwd_op().call(dense(x), w, b, stride, padding, slope);
}


// ----------------------------------------------------------------------------- conv2d_in_act
using InFwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptT&, const OptT&, at::IntArrayRef, at::IntArrayRef, double, double);
using InBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const OptT&, const OptT&, at::IntArrayRef, at::IntArrayRef, double, c10::List<bool>);

const c10::TypedOperatorHandle<InFwdSig>& in_fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("ganengine_C::conv_in_act_fwd", "").typed<InFwdSig>();
  return op;
}

const c10::TypedOperatorHandle<InBwdSig>& in_bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("ganengine_C::conv_in_act_bwd", "").typed<InBwdSig>();
  return op;
}

#define REFUSE_IN_UNLESS(cond, what) \
  TORCH_CHECK_NOT_IMPLEMENTED(cond, "conv2d_instance_norm_act: not served by the C++ entry (", what, ")")

// As check() above, for conv2d_instance_norm_act's arguments; metadata only, SymInt sizes (as
// refusal_impl: a tracer's FakeTensors). A gamma or beta of another float dtype than x is served
// (the kernels read them in their working dtype and the gradients are cast back, as the Python
// route does).
void check_in(const at::Tensor& x, const at::Tensor& w, const OptT& b, const OptT& gamma, const OptT& beta,
              at::IntArrayRef stride, at::IntArrayRef padding, double slope) {
  REFUSE_IN_UNLESS(x.defined() && served_x(x, in_cuda()) && x.dim() == 4 && x.sym_numel() > 0 &&
                       float_dtype(x.scalar_type()),
                   "x");
  REFUSE_IN_UNLESS(w.defined() && beside(w, x) && w.dim() == 4 && w.sym_numel() > 0 &&
                       w.sym_size(1) == x.sym_size(1) && w.scalar_type() == x.scalar_type(),
                   "weight");
  const char* names[3] = {"bias", "norm_weight", "norm_bias"};
  const OptT* opts[3] = {&b, &gamma, &beta};
  for (int i = 0; i < 3; ++i) {
    if (!present(*opts[i])) continue;
    const at::Tensor& t = **opts[i];
    // (the conv bias is not used; its dtype must still be x's, as conv2d would require)
    REFUSE_IN_UNLESS(beside(t, x) && t.dim() == 1 && t.sym_size(0) == w.sym_size(0) && float_dtype(t.scalar_type()) &&
                         (i > 0 || t.scalar_type() == x.scalar_type()),
                     names[i]);
  }
  REFUSE_IN_UNLESS(stride.size() == 2 && padding.size() == 2 && stride[0] >= 1 && stride[1] >= 1 &&
                       padding[0] >= 0 && padding[1] >= 0,
                   "stride, padding");
  // an empty output map: the Python route runs the torch composition
  REFUSE_IN_UNLESS(fits(x, w, padding), "output size");
  REFUSE_IN_UNLESS(slope >= 0, "negative_slope");  // (a NaN slope too)
  REFUSE_IN_UNLESS(!at::autocast::is_autocast_enabled(x.device().type()), "autocast");
}

// reference_conv2d_in_act (ops/conv_act.py) in ATen ops, without the bias (it cancels): the
// differentiable composition for create_graph=True
at::Tensor in_act_reference(const at::Tensor& x, const at::Tensor& w, const at::Tensor& gamma, const at::Tensor& beta,
                            at::IntArrayRef stride, at::IntArrayRef padding, double eps, double slope) {
  const at::Tensor c = at::conv2d(x, w, {}, stride, padding);
  const auto acc = c.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor cf = c.to(acc);
  auto vm = at::var_mean(cf, at::IntArrayRef{2, 3}, /*unbiased=*/false, /*keepdim=*/true);
  const at::Tensor& var = std::get<0>(vm);
  at::Tensor rstd = at::rsqrt(var + eps);
  if (eps == 0) rstd = at::where(var == 0, at::zeros_like(rstd), rstd);  // ops/norm_act.py inv_std
  at::Tensor z = (cf - std::get<1>(vm)) * rstd;
  if (gamma.defined()) z = z * gamma.to(acc).view({1, -1, 1, 1});
  if (beta.defined()) z = z + beta.to(acc).view({1, -1, 1, 1});
  return at::leaky_relu(z, slope).to(c.scalar_type());
}

struct ConvInActFn : public torch::autograd::Function<ConvInActFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const OptT& b,
                            const OptT& gamma, const OptT& beta, at::IntArrayRef stride, at::IntArrayRef padding,
                            double eps, double slope) {
    at::Tensor y, c, mean, rstd;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(y, c, mean, rstd) = in_fwd_op().call(dense(x), w, gamma, beta, stride, padding, eps, slope);
    }
    ctx->save_for_backward({x, w, present(gamma) ? *gamma : at::Tensor(), present(beta) ? *beta : at::Tensor(), c,
                            mean, rstd});
    // autograd edges: one per present tensor argument, in order (custom_function.h's
    // ExtractVariables skips an absent optional): x 0, weight 1, then bias?, gamma?, beta?
    const bool hb = present(b), hg = present(gamma), ht = present(beta);
    ctx->saved_data["edges"] = std::vector<int64_t>{hb ? 2 : -1, hg ? 2 + hb : -1, ht ? 2 + hb + hg : -1};
    if (hb) {
      ctx->saved_data["bias_size"] = b->sym_sizes();  // (a traced bias's may be symbolic)
      ctx->saved_data["bias_dtype"] = static_cast<int64_t>(b->scalar_type());
    }
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["slope"] = slope;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(9);  // one slot per forward argument: x, weight, bias, gamma, beta, 4 non-tensors
    const at::Tensor& gy = grads[0];
    if (!gy.defined()) return out;
    const auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &w = s[1], &gamma = s[2], &beta = s[3];
    const std::vector<int64_t> e = ctx->saved_data["edges"].toIntVector();
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    const double eps = ctx->saved_data["eps"].toDouble(), slope = ctx->saved_data["slope"].toDouble();
    const bool nx = ctx->needs_input_grad(0), nw = ctx->needs_input_grad(1);
    const bool nb = e[0] >= 0 && ctx->needs_input_grad(e[0]);
    const bool ng = e[1] >= 0 && ctx->needs_input_grad(e[1]);
    const bool nt = e[2] >= 0 && ctx->needs_input_grad(e[2]);
    if (nb) {  // exactly zero: the normalisation removes the bias (on x's device)
      out[2] = at::zeros_symint(ctx->saved_data["bias_size"].toSymIntVector(),
                                x.options().dtype(static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt())));
    }
    if (at::GradMode::is_enabled()) {  // create_graph=True: the torch composition, differentiated
      std::vector<at::Tensor> inputs;
      std::vector<int> slot;
      if (nx) inputs.push_back(x), slot.push_back(0);
      if (nw) inputs.push_back(w), slot.push_back(1);
      if (ng) inputs.push_back(gamma), slot.push_back(3);
      if (nt) inputs.push_back(beta), slot.push_back(4);
      if (inputs.empty()) return out;
      const at::Tensor y = in_act_reference(x, w, gamma, beta, stride, padding, eps, slope);
      auto g = torch::autograd::grad({y}, inputs, {gy.to(y.scalar_type())}, /*retain_graph=*/true,
                                     /*create_graph=*/true, /*allow_unused=*/true);
      for (size_t i = 0; i < slot.size(); ++i) out[slot[i]] = g[i];
      return out;
    }
    if (!nx && !nw && !ng && !nt) return out;
    auto r = in_bwd_op().call(gy, dense(x), w, s[4], s[5], s[6], lean::as_opt(gamma), lean::as_opt(beta), stride,
                              padding, slope, c10::List<bool>({nx, nw}));
    if (nx) out[0] = std::get<0>(r);
    if (nw) out[1] = std::get<1>(r);
    if (ng) out[3] = std::get<2>(r).to(gamma.scalar_type());
    if (nt) out[4] = std::get<3>(r).to(beta.scalar_type());
    return out;
  }
};

at::Tensor conv2d_in_act_autograd(const at::Tensor& x, const at::Tensor& w, const OptT& b, const OptT& gamma,
                                  const OptT& beta, at::IntArrayRef stride, at::IntArrayRef padding, double eps,
                                  double slope) {
  check_in(x, w, b, gamma, beta, stride, padding, slope);
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || w.requires_grad() || (present(b) && b->requires_grad()) ||
                     (present(gamma) && gamma->requires_grad()) || (present(beta) && beta->requires_grad()));
  if (!grad) {
    at::AutoDispatchBelowADInplaceOrView below;
    return std::get<0>(in_fwd_op().call(dense(x), w, gamma, beta, stride, padding, eps, slope));
  }
  return ConvInActFn::apply(x, w, b, gamma, beta, stride, padding, eps, slope);
}

at::Tensor conv2d_in_act_plain(const at::Tensor& x, const at::Tensor& w, const OptT& b, const OptT& gamma,
                               const OptT& beta, at::IntArrayRef stride, at::IntArrayRef padding, double eps,
                               double slope) {
  check_in(x, w, b, gamma, beta, stride, padding, slope);
  return std::get<0>(in_fwd_op().call(dense(x), w, gamma, beta, stride, padding, eps, slope));
}

}  // namespace

// conv_lean.h: shared with the Python fast entry (conv_py.cpp)
const char* refusal(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
                    at::IntArrayRef padding, double slope, bool cuda) {
  return refusal_impl(x, w, b, stride, padding, slope, /*cuda_ok=*/cuda && act_cuda());
}
at::Tensor run(const at::Tensor& x, const at::Tensor& w, const OptT& b, at::IntArrayRef stride,
               at::IntArrayRef padding, double slope) {
  return run_impl(x, w, b, stride, padding, slope);
}
}  // namespace conv_act_lean
}  // namespace ganengine

TORCH_LIBRARY_FRAGMENT(ganengine_C, m) {
  m.def("conv2d_act(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, float slope) -> Tensor");
  m.def("conv2d_in_act(Tensor x, Tensor weight, Tensor? bias, Tensor? gamma, Tensor? beta, int[2] stride, "
        "int[2] padding, float eps, float slope) -> Tensor");
}

TORCH_LIBRARY_IMPL(ganengine_C, Autograd, m) {
  m.impl("conv2d_act", &ganengine::conv_act_lean::conv2d_act_autograd);
  m.impl("conv2d_in_act", &ganengine::conv_act_lean::conv2d_in_act_autograd);
}

TORCH_LIBRARY_IMPL(ganengine_C, CompositeExplicitAutograd, m) {
  m.impl("conv2d_act", &ganengine::conv_act_lean::conv2d_act_plain);
  m.impl("conv2d_in_act", &ganengine::conv_act_lean::conv2d_in_act_plain);
}
