// CUDA launchers for the fused instance norm + activation (checks, allocation, dispatch).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launcher_utils.h"

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <vector>

#include "norm_act.cuh"

namespace ganengine {
namespace {

int dtype_code(at::ScalarType t) { return cuda_launch::dtype_code(t, "ganengine norm_act (cuda)"); }

// (sN, sC, sHW) of a dense NCHW or NHWC tensor
void flat_strides(const at::Tensor& t, int64_t& sn, int64_t& sc, int64_t& shw) {
  sn = t.stride(0);
  sc = t.stride(1);
  shw = t.size(3) == 1 ? t.stride(2) : t.stride(3);
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Launch plan: layout, 16-byte vectors when every array allows them, and the plane split that
// gives at least 4 blocks per SM.
cuda::NormActShape make_shape(const at::Tensor& x, std::initializer_list<const at::Tensor*> arrays) {
  cuda::NormActShape s{};
  s.N = x.size(0);
  s.C = x.size(1);
  s.HW = x.size(2) * x.size(3);
  flat_strides(x, s.sN, s.sC, s.sHW);
  s.gN = s.sN;
  s.gC = s.sC;
  s.gHW = s.sHW;
  s.nhwc = s.sC == 1 && s.C > 1;
  const int es = static_cast<int>(x.element_size());
  const int v = 16 / es;
  bool vec = true;
  for (const at::Tensor* t : arrays) vec = vec && aligned16(*t);
  if (s.nhwc) vec = vec && s.C % v == 0 && s.sHW % v == 0 && s.sN % v == 0;  // every pixel's channels aligned
  else vec = vec && s.sHW == 1;  // planes contiguous (heads are handled per plane)
  s.vec = vec;
  const int64_t target = 4L * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t blocks, min_chunk;
  if (s.nhwc) {
    const int64_t ct = cuda::norm_act_channel_tile(es, vec);
    blocks = s.N * ((s.C + ct - 1) / ct);
    min_chunk = 16 * (cuda::kNormActThreads / cuda::norm_act_nhwc_threads_x(vec));  // 16 pixels per lane row
  } else {
    blocks = s.N * s.C;
    min_chunk = 2048;
  }
  int64_t split = 1;
  if (blocks < target) split = std::min<int64_t>((target + blocks - 1) / blocks, std::max<int64_t>(1, s.HW / min_chunk));
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
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({x.size(0), x.size(1)}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({x.size(0), x.size(1)}, x.options().dtype(acc));
  if (x.numel() == 0) {  // empty planes: undefined statistics (NaN, as torch.var_mean)
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    rstd.fill_(std::numeric_limits<double>::quiet_NaN());
    return {y, mean, rstd};
  }
  const auto s = make_shape(x, {&x, &y});
  at::Tensor part = at::empty({(s.nhwc || s.split > 1) ? 2 * s.N * s.C * s.split : 1}, x.options().dtype(acc));
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
  // the kernels read grad_y with x's strides (one copy for an expanded or differently laid out grad)
  if (g.strides() != x.strides()) {
    at::Tensor t = at::empty_strided(x.sizes(), x.strides(), g.options());
    t.copy_(g);
    g = t;
  }
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dx = at::empty_like(x);
  // every kernel path writes each plane's sums (no accumulation): no zero-fill kernels, except for
  // empty planes, which no kernel visits
  const auto pshape = std::vector<int64_t>{x.size(0), x.size(1)};
  if (x.numel() == 0) {
    return {dx, at::zeros(pshape, x.options().dtype(acc)), at::zeros(pshape, x.options().dtype(acc))};
  }
  at::Tensor dw = at::empty(pshape, x.options().dtype(acc));
  at::Tensor db = at::empty(pshape, x.options().dtype(acc));
  const auto s = make_shape(x, {&x, &g, &dx});
  at::Tensor part = at::empty({(s.nhwc || s.split > 1) ? 2 * s.N * s.C * s.split : 1}, x.options().dtype(acc));
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
