// Argument checks and layout helpers shared by the batch_norm_act CPU kernels, the CUDA
// launchers and the C++ autograd op (all of which include torch; the .cu files do not).
#pragma once
#include <ATen/ATen.h>

#include <string>

namespace ganengine {
namespace bn {

// the `flags` argument of the ops
constexpr int64_t kTraining = 1, kApplyAct = 2, kPerSample = 4;

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline const char* op_name(bool per_sample) { return per_sample ? "conditional_batch_norm_act" : "batch_norm_act"; }

// dense with the channel dim innermost: strides (S*C, 1, ..., C) up to size-1 dims
inline bool channels_last_dense(const at::Tensor& x) {
  const int64_t d = x.dim(), C = x.size(1);
  int64_t expected = C;
  for (int64_t i = d - 1; i >= 2; --i) {
    if (x.size(i) != 1 && x.stride(i) != expected) return false;
    expected *= x.size(i);
  }
  if (C != 1 && x.stride(1) != 1) return false;
  return x.size(0) == 1 || x.stride(0) == expected;
}

// x as the kernels read it: NCHW-dense (nhwc = false) or NHWC-dense (nhwc = true); a copy only
// when x is neither. With one spatial element (N, C) the two coincide: read as rows of C.
inline at::Tensor dense_input(const at::Tensor& x, bool& nhwc) {
  const int64_t nc = x.size(0) * x.size(1);
  const bool single = nc == 0 || x.numel() == nc;
  if (x.is_contiguous()) {
    nhwc = single;
    return x;
  }
  if (channels_last_dense(x)) {
    nhwc = true;
    return x;
  }
  if (x.dim() == 4 && x.suggest_memory_format() == at::MemoryFormat::ChannelsLast) {
    nhwc = true;  // (a slice of a channels_last map: copied in the layout its strides suggest, as eager's output)
    return x.contiguous(at::MemoryFormat::ChannelsLast);
  }
  nhwc = single;
  return x.contiguous();
}

// t (same shape as x) in x's dtype and exact strides: a copy unless it already is
inline at::Tensor like_layout(const at::Tensor& t, const at::Tensor& x) {
  if (t.scalar_type() == x.scalar_type() && t.strides() == x.strides()) return t;
  at::Tensor out = at::empty_like(x);
  out.copy_(t);
  return out;
}

// The argument checks below also run in the C++ autograd entry, where a tracer (torch.compile's
// AOT dispatch with dynamic shapes) hands FakeTensors with symbolic sizes: they read sym_size /
// sym_numel (a plain int compare on concrete tensors), never size() / numel() / sizes().
inline void check_param(const c10::optional<at::Tensor>& t, const char* what, const at::Tensor& x, bool per_sample) {
  if (!t.has_value() || !t->defined()) return;
  const char* op = op_name(per_sample);
  const c10::SymInt N = x.sym_size(0), C = x.sym_size(1);
  TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), op, ": ", what, " must be floating point, got ",
                   t->scalar_type());
  TORCH_CHECK_VALUE(t->device() == x.device(), op, ": ", what, " is on ", t->device(), " but x is on ", x.device());
  if (!per_sample) {  // F.batch_norm's rule: x's dtype, or float32 for a half / bfloat16 x (mixed)
    const auto xs = x.scalar_type(), ps = t->scalar_type();
    const bool reduced = xs == at::kHalf || xs == at::kBFloat16;
    TORCH_CHECK_TYPE(ps == xs || (reduced && ps == at::kFloat), op, ": ", what, " must have x's dtype (", xs, ")",
                     reduced ? " or Float" : "", ", got ", ps);
  }
  if (per_sample) {
    bool ok = t->dim() >= 2 && t->sym_size(0) == N && t->sym_size(1) == C && t->sym_numel() == N * C;
    TORCH_CHECK_VALUE(ok, op, ": ", what, " must have shape (N, C) = (", N, ", ", C, ") for x of shape ",
                      x.sym_sizes(), ", got ", t->sym_sizes());
  } else {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->sym_size(0) == C, op, ": ", what, " must have shape (", C, ",) for ", C,
                      " channels, got ", t->sym_sizes());
  }
}

inline void check_forward_args(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
                               const c10::optional<at::Tensor>& running_var, bool training, double eps,
                               bool per_sample, c10::DeviceType device) {
  const char* op = op_name(per_sample);
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": x must be (N, C) or (N, C, *spatial), got shape ", x.sym_sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": x must be fp16, bf16, fp32 or fp64, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.device().type() == device, op, ": x is on ", x.device(), ", this kernel serves ",
                    c10::DeviceTypeName(device), " tensors");
  check_param(weight, per_sample ? "gain" : "weight", x, per_sample);
  check_param(bias, "bias", x, per_sample);
  const bool has_m = running_mean.has_value() && running_mean->defined();
  const bool has_v = running_var.has_value() && running_var->defined();
  TORCH_CHECK_VALUE(has_m == has_v, op, ": running_mean and running_var must be given together");
  if (has_m) {
    check_param(running_mean, "running_mean", x, false);
    check_param(running_var, "running_var", x, false);
  }
  if (training) {
    TORCH_CHECK_VALUE(x.sym_numel() != x.sym_size(1) || x.sym_numel() == 0,
                      "Expected more than 1 value per channel when training, got input size ", x.sym_sizes());
    TORCH_CHECK_VALUE(eps > 0.0, "batch_norm eps must be positive during training, but got ", eps);
  } else {
    TORCH_CHECK(has_m, op, ": running_mean must be defined in evaluation mode (training=False)");
    TORCH_CHECK_VALUE(eps >= 0.0, "batch_norm eps must be non-negative, but got ", eps);
  }
}

// (run by the kernels only, on concrete tensors: the backward's tracer sees the fake impl)
inline void check_backward_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& stats,
                                c10::DeviceType device) {
  TORCH_CHECK_VALUE(x.dim() >= 2 && x.device().type() == device, "batch_norm_act backward: x must be a ",
                    c10::DeviceTypeName(device), " tensor of at least 2 dims, got ", x.sizes(), " on ", x.device());
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), "batch_norm_act backward: grad_y shape ", grad_y.sizes(),
                    " does not match x shape ", x.sizes());
  TORCH_CHECK_VALUE(grad_y.device() == x.device(), "batch_norm_act backward: grad_y is on ", grad_y.device(),
                    " but x is on ", x.device());
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) >= 2 && stats.size(1) == x.size(1),
                    "batch_norm_act backward: stats must be (3, C) with C = ", x.size(1), ", got ", stats.sizes());
}

}  // namespace bn
}  // namespace ganengine
