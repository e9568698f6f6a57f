// CUDA launchers for the fused instance norm + activation (checks, allocation, dispatch).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "norm_act.cuh"

namespace ganengine {
namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    case at::kDouble: return 3;
    default: TORCH_CHECK(false, "ganengine norm_act (cuda): unsupported dtype ", t);
  }
  return -1;
}

// (sN, sC, sHW) of a dense NCHW or NHWC tensor
void flat_strides(const at::Tensor& t, int64_t& sn, int64_t& sc, int64_t& shw) {
  sn = t.stride(0);
  sc = t.stride(1);
  shw = t.size(3) == 1 ? t.stride(2) : t.stride(3);
}

cuda::NormActShape make_shape(const at::Tensor& x) {
  cuda::NormActShape s{};
  s.N = x.size(0);
  s.C = x.size(1);
  s.HW = x.size(2) * x.size(3);
  flat_strides(x, s.sN, s.sC, s.sHW);
  // enough blocks to fill the GPU: split planes when there are few of them
  const int64_t P = s.N * s.C, target = 4L * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t split = 1;
  if (P < target) split = std::min<int64_t>((target + P - 1) / P, std::max<int64_t>(1, s.HW / 2048));
  s.chunk = std::max<int64_t>(1, (s.HW + split - 1) / split);
  s.split = static_cast<int>((s.HW + s.chunk - 1) / s.chunk);
  return s;
}

at::Tensor dense(const at::Tensor& t) {
  if (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t;
  return t.contiguous();
}

at::Tensor param(const c10::optional<at::Tensor>& t, at::ScalarType acc) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return t->to(acc).contiguous();
}

void check(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "ganengine norm_act (cuda): ", name, " must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "ganengine norm_act: ", name, " must be 4-D (N, C, H, W), got ", x.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
                                                        const c10::optional<at::Tensor>& bias, double eps, bool act,
                                                        double slope) {
  check(x_in, "x");
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = dense(x_in);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto s = make_shape(x);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({s.N, s.C}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({s.N, s.C}, x.options().dtype(acc));
  if (s.N * s.C == 0 || s.HW == 0) return {y, mean, rstd};
  at::Tensor part = at::empty({2 * s.N * s.C * s.split}, x.options().dtype(acc));
  at::Tensor w = param(weight, acc), b = param(bias, acc);
  auto err = cuda::norm_act_forward(dtype_code(x.scalar_type()), x.data_ptr(), y.data_ptr(),
                                    w.defined() ? w.data_ptr() : nullptr, b.defined() ? b.data_ptr() : nullptr,
                                    mean.data_ptr(), rstd.data_ptr(), part.data_ptr(), s, eps, act, slope,
                                    c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "ganengine norm_act forward launch failed: ", cudaGetErrorString(err));
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x_in,
                                                        const c10::optional<at::Tensor>& weight,
                                                        const c10::optional<at::Tensor>& bias, const at::Tensor& mean,
                                                        const at::Tensor& rstd, bool act, double slope) {
  check(x_in, "x");
  check(grad_y, "grad_y");
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = dense(x_in);
  at::Tensor g = grad_y.to(x.scalar_type());
  if (!(g.is_contiguous() || g.is_contiguous(at::MemoryFormat::ChannelsLast))) g = g.contiguous(x.suggest_memory_format());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto s = make_shape(x);
  flat_strides(g, s.gN, s.gC, s.gHW);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = at::zeros({s.N, s.C}, x.options().dtype(acc));
  at::Tensor db = at::zeros({s.N, s.C}, x.options().dtype(acc));
  if (s.N * s.C == 0 || s.HW == 0) return {dx, dw, db};
  at::Tensor part = at::empty({2 * s.N * s.C * s.split}, x.options().dtype(acc));
  at::Tensor w = param(weight, acc), b = param(bias, acc);
  at::Tensor m = mean.to(acc).contiguous(), r = rstd.to(acc).contiguous();
  auto err = cuda::norm_act_backward(dtype_code(x.scalar_type()), g.data_ptr(), x.data_ptr(), dx.data_ptr(),
                                     w.defined() ? w.data_ptr() : nullptr, b.defined() ? b.data_ptr() : nullptr,
                                     m.data_ptr(), r.data_ptr(), dw.data_ptr(), db.data_ptr(), part.data_ptr(), s,
                                     act, slope, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "ganengine norm_act backward launch failed: ", cudaGetErrorString(err));
  return {dx, dw, db};
}

}  // namespace
}  // namespace ganengine

TORCH_LIBRARY_IMPL(ganengine_C, CUDA, m) {
  m.impl("norm_act_fwd", &ganengine::fwd_cuda);
  m.impl("norm_act_bwd", &ganengine::bwd_cuda);
}
