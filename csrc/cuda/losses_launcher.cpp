// CUDA launchers for the fused GAN loss reductions: checks, allocation, and the calls into
// csrc/cuda/losses.cu on the current stream. Schemas are defined in csrc/cpu/losses.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "launcher_utils.h"

#include <vector>

int64_t ganengine_losses_chunk();
int ganengine_losses_adv_fwd(int dtype, int k, const void* const* x, void* const* g, const int64_t* n,
                             const int64_t* mode, const double* target, const double* scale,
                             const double* final_scale, int nblk, void* part, void* total, cudaStream_t stream);
int ganengine_losses_l1_fwd(int dtype, int k, const void* const* p, const void* const* q, void* const* g,
                            const int64_t* n, const double* scale, int nblk, void* part, void* total, void* terms,
                            cudaStream_t stream);
int ganengine_losses_l1_bwd(int dtype, int k, const void* const* p, const void* const* q, void* const* g,
                            const int64_t* n, const void* coef, int nblk, cudaStream_t stream);

namespace ganengine {
namespace losses_cuda {
namespace {

constexpr int64_t kMaxTerms = 4;
constexpr int64_t kLinear = 4;

using cuda_launch::dtype_code;

// checked, contiguous views of the inputs (a copy only for non-contiguous ones)
std::vector<at::Tensor> prepare(at::TensorList ts, const char* fn, const char* what, const at::Tensor& first) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) {
    TORCH_CHECK(t.is_cuda() && t.device() == first.device(), fn, ": ", what, " must be CUDA tensors on ",
                first.device(), ", got ", t.device());
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), fn, ": all ", what, " must have dtype ",
                first.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK(t.numel() > 0, fn, ": ", what, " must not be empty (the mean of an empty tensor is undefined)");
    out.push_back(t.contiguous());
  }
  return out;
}

int blocks_for(const std::vector<int64_t>& n) {
  const int64_t chunk = ganengine_losses_chunk();
  int64_t m = 0;
  for (auto v : n) m = std::max(m, v);
  const int64_t nblk = (m + chunk - 1) / chunk;
  TORCH_CHECK(nblk <= 65535LL * 1024, "ganengine losses: tensor too large for the CUDA kernel grid");
  return static_cast<int>(nblk);
}

void check_launch(int err, const char* fn) {
  TORCH_CHECK(err == 0, fn, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, std::vector<at::Tensor>> adv_fwd(at::TensorList xs_in, at::IntArrayRef modes,
                                                        at::ArrayRef<double> targets, at::ArrayRef<double> scales,
                                                        bool want_grad) {
  const char* fn = "ganengine_C::losses_adv_fwd (CUDA)";
  const int64_t k = static_cast<int64_t>(xs_in.size());
  TORCH_CHECK(k >= 1 && k <= kMaxTerms, fn, ": takes 1 to ", kMaxTerms, " inputs, got ", k);
  TORCH_CHECK(static_cast<int64_t>(modes.size()) == k && static_cast<int64_t>(targets.size()) == k &&
                  static_cast<int64_t>(scales.size()) == k,
              fn, ": modes, targets and scales need one entry per input");
  const auto xs = prepare(xs_in, fn, "inputs", xs_in[0]);
  const c10::cuda::CUDAGuard guard(xs[0].device());
  const int dt = dtype_code(xs[0].scalar_type(), fn);
  std::vector<const void*> xp;
  std::vector<void*> gp;
  std::vector<int64_t> n;
  std::vector<double> final_scale;
  std::vector<at::Tensor> grads;
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(modes[i] >= 0 && modes[i] <= kLinear, fn, ": unknown mode code ", modes[i]);
    const bool g = want_grad && modes[i] != kLinear;
    grads.push_back(g ? at::empty(xs[i].sizes(), xs[i].options()) : at::empty({0}, xs[i].options()));
    xp.push_back(xs[i].data_ptr());
    gp.push_back(g ? grads.back().data_ptr() : nullptr);
    n.push_back(xs[i].numel());
    final_scale.push_back(modes[i] == kLinear ? scales[i] * targets[i] : scales[i]);
  }
  const int nblk = blocks_for(n);
  const auto acc = xs[0].options().dtype(acc_type_of(xs[0].scalar_type()));
  at::Tensor part = at::empty({k, nblk}, acc);
  at::Tensor total = at::empty({}, acc);
  check_launch(ganengine_losses_adv_fwd(dt, static_cast<int>(k), xp.data(), gp.data(), n.data(), modes.data(),
                                        targets.data(), scales.data(), final_scale.data(), nblk, part.data_ptr(),
                                        total.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
               fn);
  return {total, grads};
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> l1_fwd(at::TensorList preds_in,
                                                                     at::TensorList targets_in,
                                                                     at::ArrayRef<double> scales, bool want_grad) {
  const char* fn = "ganengine_C::losses_l1_fwd (CUDA)";
  const int64_t k = static_cast<int64_t>(preds_in.size());
  TORCH_CHECK(k >= 1 && k <= kMaxTerms, fn, ": takes 1 to ", kMaxTerms, " pairs, got ", k);
  TORCH_CHECK(static_cast<int64_t>(targets_in.size()) == k && static_cast<int64_t>(scales.size()) == k, fn,
              ": needs one target and one scale per pred");
  const auto preds = prepare(preds_in, fn, "preds", preds_in[0]);
  const auto targets = prepare(targets_in, fn, "targets", preds_in[0]);
  const c10::cuda::CUDAGuard guard(preds[0].device());
  std::vector<const void*> pp, qp;
  std::vector<void*> gp;
  std::vector<int64_t> n;
  std::vector<at::Tensor> grads;
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(preds[i].sizes() == targets[i].sizes(), fn, ": pred ", i, " has shape ", preds[i].sizes(),
                " but its target has shape ", targets[i].sizes());
    grads.push_back(want_grad ? at::empty(preds[i].sizes(), preds[i].options()) : at::empty({0}, preds[i].options()));
    pp.push_back(preds[i].data_ptr());
    qp.push_back(targets[i].data_ptr());
    gp.push_back(want_grad ? grads.back().data_ptr() : nullptr);
    n.push_back(preds[i].numel());
  }
  const int nblk = blocks_for(n);
  const auto acc = preds[0].options().dtype(acc_type_of(preds[0].scalar_type()));
  at::Tensor part = at::empty({k, nblk}, acc);
  at::Tensor total = at::empty({}, acc), terms = at::empty({k}, acc);
  check_launch(ganengine_losses_l1_fwd(dtype_code(preds[0].scalar_type(), fn), static_cast<int>(k), pp.data(),
                                       qp.data(), gp.data(), n.data(), scales.data(), nblk, part.data_ptr(),
                                       total.data_ptr(), terms.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
               fn);
  return {total, terms, grads};
}

std::vector<at::Tensor> l1_bwd(at::TensorList preds_in, at::TensorList targets_in, const at::Tensor& coef_in) {
  const char* fn = "ganengine_C::losses_l1_bwd (CUDA)";
  const int64_t k = static_cast<int64_t>(preds_in.size());
  TORCH_CHECK(k >= 1 && k <= kMaxTerms, fn, ": takes 1 to ", kMaxTerms, " pairs, got ", k);
  TORCH_CHECK(static_cast<int64_t>(targets_in.size()) == k && coef_in.numel() == k, fn,
              ": needs one target and one coef per pred");
  const auto preds = prepare(preds_in, fn, "preds", preds_in[0]);
  const auto targets = prepare(targets_in, fn, "targets", preds_in[0]);
  const c10::cuda::CUDAGuard guard(preds[0].device());
  const at::Tensor coef = coef_in.to(preds[0].device(), acc_type_of(preds[0].scalar_type())).contiguous();
  std::vector<const void*> pp, qp;
  std::vector<void*> gp;
  std::vector<int64_t> n;
  std::vector<at::Tensor> grads;
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(preds[i].sizes() == targets[i].sizes(), fn, ": pred ", i, " and its target differ in shape");
    grads.push_back(at::empty(preds[i].sizes(), preds[i].options()));
    pp.push_back(preds[i].data_ptr());
    qp.push_back(targets[i].data_ptr());
    gp.push_back(grads.back().data_ptr());
    n.push_back(preds[i].numel());
  }
  check_launch(ganengine_losses_l1_bwd(dtype_code(preds[0].scalar_type(), fn), static_cast<int>(k), pp.data(),
                                       qp.data(), gp.data(), n.data(), coef.data_ptr(), blocks_for(n),
                                       c10::cuda::getCurrentCUDAStream().stream()),
               fn);
  return grads;
}

}  // namespace
}  // namespace losses_cuda
}  // namespace ganengine

TORCH_LIBRARY_IMPL(ganengine_C, CUDA, m) {
  m.impl("losses_adv_fwd", &ganengine::losses_cuda::adv_fwd);
  m.impl("losses_l1_fwd", &ganengine::losses_cuda::l1_fwd);
  m.impl("losses_l1_bwd", &ganengine::losses_cuda::l1_bwd);
}
