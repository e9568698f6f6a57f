// Launch functions of csrc/cuda/batch_norm_act.cu (no torch headers on either side of this line).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace ganengine {
namespace cuda {

// x as (n, c, s) with strides; the (n, s) plane of every channel cut into chunks of
// nper images x sper positions (nch x sch chunks; one chunk = the fused single-launch scheme)
struct BnShape {
  int64_t N, C, S;
  int64_t sN, sC, sS;  // strides of x, y, dx and grad_y (the launcher brings grad_y to x's layout)
  int64_t wsN;         // 0: weight/bias per channel; C: per-sample (N, C) gain/bias
  int64_t nper, sper;
  int64_t nch, sch;
};

// flags: 1 training, 2 activation (leaky with `slope`; relu is slope 0), 4 per-sample gain/bias.
// dtype codes: 0 fp32, 1 fp16, 2 bf16, 3 fp64 (x and, separately, each running statistic).
// w, b: accumulation dtype (fp32; fp64 for fp64 x) or null. stats: (3, C) accumulation dtype,
// written: mean, rstd, unbiased variance (eval: running mean, rstd, running var). Running
// statistics (may be null) are updated with `factor` in training. part: 2 * C * nch * sch
// accumulators when nch * sch > 1.
cudaError_t batch_norm_act_forward(int dtype, const void* x, void* y, const void* w, const void* b, void* rm,
                                   int rm_dtype, int64_t rm_stride, void* rv, int rv_dtype, int64_t rv_stride,
                                   void* stats, void* part, const BnShape& s, double factor, double eps, double slope,
                                   int flags, cudaStream_t stream);

// dw, db: (C) or per-sample (N, C), accumulation dtype. part: 2 * C * (per-sample ? N * sch : nch * sch).
cudaError_t batch_norm_act_backward(int dtype, const void* g, const void* x, void* dx, const void* w, const void* b,
                                    const void* stats, void* dw, void* db, void* part, const BnShape& s, double slope,
                                    int flags, cudaStream_t stream);

}  // namespace cuda
}  // namespace ganengine
