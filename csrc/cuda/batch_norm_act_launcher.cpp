// CUDA launchers for the fused (conditional) batch norm + activation: checks, allocation, chunk plan.
// The eager entry with its C++ autograd (csrc/cpu/batch_norm_act_autograd.cpp) is device-generic and
// reaches these kernels through the dispatcher.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launcher_utils.h"

#include "batch_norm_act.cuh"
#include "cpu/batch_norm_act.h"

#include <algorithm>

namespace ganengine {
namespace bn {
namespace {

using OptT = c10::optional<at::Tensor>;

int dtype_code(at::ScalarType t) { return cuda_launch::dtype_code(t, "batch_norm_act (cuda)"); }

// (sN, sC, sS) of a dense NCHW or channels-last tensor (dense_input guarantees one of the two)
cuda::BnShape make_shape(const at::Tensor& x, bool nhwc, bool per_sample) {
  cuda::BnShape s{};
  s.N = x.size(0);
  s.C = x.size(1);
  s.S = s.N * s.C != 0 ? x.numel() / (s.N * s.C) : 0;
  if (nhwc) {
    s.sN = s.S * s.C, s.sC = 1, s.sS = s.C;
  } else {
    s.sN = s.C * s.S, s.sC = s.S, s.sS = 1;
  }
  s.wsN = per_sample ? s.C : 0;
  // enough blocks for the GPU: split each channel's (n, s) plane when there are few channels,
  // with at least 2048 elements per chunk and at most 1024 chunks (grid axis y)
  const int64_t M = s.N * s.S;
  const int64_t target = 4L * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t split = 1;
  if (s.C < target) split = std::min<int64_t>({(target + s.C - 1) / s.C, std::max<int64_t>(1, M / 2048), 1024});
  const int64_t per = (M + split - 1) / split;
  if (s.S >= per) {
    s.nper = 1;
    s.sper = (s.S + ((s.S + per - 1) / per) - 1) / ((s.S + per - 1) / per);
  } else {
    s.nper = (per + s.S - 1) / std::max<int64_t>(s.S, 1);
    s.sper = s.S;
  }
  s.nper = std::max<int64_t>(s.nper, 1);
  s.sper = std::max<int64_t>(s.sper, 1);
  s.nch = (s.N + s.nper - 1) / s.nper;
  s.sch = (s.S + s.sper - 1) / s.sper;
  return s;
}

at::Tensor acc_param(const OptT& t, at::ScalarType acc) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return t->to(acc).contiguous();
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& x_in, const OptT& weight, const OptT& bias,
                                            const OptT& running_mean, const OptT& running_var, double momentum,
                                            double eps, double slope, int64_t flags) {
  const bool training = flags & kTraining, per_sample = flags & kPerSample;
  check_forward_args(x_in, weight, bias, running_mean, running_var, training, eps, per_sample, c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(x_in.device());
  bool nhwc = false;
  const at::Tensor x = dense_input(x_in, nhwc);
  const auto acc = acc_type(x.scalar_type());
  const cuda::BnShape s = make_shape(x, nhwc, per_sample);
  at::Tensor y = at::empty_like(x);
  at::Tensor stats = at::empty({3, s.C}, x.options().dtype(acc));
  if (s.N * s.C * s.S == 0) {
    if (training) return {y, stats.fill_(std::numeric_limits<double>::quiet_NaN())};
    stats[0].copy_(*running_mean);
    stats[1].copy_(at::rsqrt(running_var->to(acc) + eps));
    stats[2].copy_(*running_var);
    return {y, stats};
  }
  const int64_t chunks = s.nch * s.sch;
  at::Tensor part = (training && chunks > 1) ? at::empty({2 * s.C * chunks}, x.options().dtype(acc)) : at::Tensor();
  const at::Tensor w = acc_param(weight, acc), b = acc_param(bias, acc);
  const bool has_rs = running_mean.has_value() && running_mean->defined();
  void* rm = has_rs ? running_mean->data_ptr() : nullptr;
  void* rv = has_rs ? running_var->data_ptr() : nullptr;
  auto err = cuda::batch_norm_act_forward(
      dtype_code(x.scalar_type()), x.data_ptr(), y.data_ptr(), w.defined() ? w.data_ptr() : nullptr,
      b.defined() ? b.data_ptr() : nullptr, rm, has_rs ? dtype_code(running_mean->scalar_type()) : 0,
      has_rs ? running_mean->stride(0) : 0, rv, has_rs ? dtype_code(running_var->scalar_type()) : 0,
      has_rs ? running_var->stride(0) : 0, stats.data_ptr(), part.defined() ? part.data_ptr() : nullptr, s, momentum,
      eps, slope, static_cast<int>(flags), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "batch_norm_act forward launch failed: ", cudaGetErrorString(err));
  return {y, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x_in,
                                                        const OptT& weight, const OptT& bias, const at::Tensor& stats,
                                                        double slope, int64_t flags) {
  const bool per_sample = flags & kPerSample;
  check_backward_args(grad_y, x_in, stats, c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(x_in.device());
  bool nhwc = false;
  const at::Tensor x = dense_input(x_in, nhwc);
  const at::Tensor g = like_layout(grad_y, x);
  const auto acc = acc_type(x.scalar_type());
  const cuda::BnShape s = make_shape(x, nhwc, per_sample);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = per_sample ? at::empty({s.N, s.C}, x.options().dtype(acc)) : at::empty({s.C}, x.options().dtype(acc));
  at::Tensor db = at::empty_like(dw);
  if (s.N * s.C * s.S == 0) return {dx, dw.zero_(), db.zero_()};
  const int64_t chunks = s.nch * s.sch;
  at::Tensor part;
  if (chunks > 1) part = at::empty({2 * s.C * (per_sample ? s.N * s.sch : chunks)}, x.options().dtype(acc));
  const at::Tensor w = acc_param(weight, acc), b = acc_param(bias, acc);
  const at::Tensor st = stats.to(acc).contiguous();
  auto err = cuda::batch_norm_act_backward(dtype_code(x.scalar_type()), g.data_ptr(), x.data_ptr(), dx.data_ptr(),
                                           w.defined() ? w.data_ptr() : nullptr, b.defined() ? b.data_ptr() : nullptr,
                                           st.data_ptr(), dw.data_ptr(), db.data_ptr(),
                                           part.defined() ? part.data_ptr() : nullptr, s, slope,
                                           static_cast<int>(flags), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "batch_norm_act backward launch failed: ", cudaGetErrorString(err));
  return {dx, dw, db};
}

}  // namespace
}  // namespace bn
}  // namespace ganengine

TORCH_LIBRARY_IMPL(ganengine_C, CUDA, m) {
  m.impl("batch_norm_act_fwd", &ganengine::bn::fwd_cuda);
  m.impl("batch_norm_act_bwd", &ganengine::bn::bwd_cuda);
}
