// Small at::vec helpers shared by the CPU kernels.
#pragma once
#include <ATen/cpu/vec/vec.h>

#include <cmath>

namespace ganengine {
namespace cpu {

// accumulation type: fp32 for fp32/fp16/bf16 data, fp64 for fp64
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// horizontal sum of one vector, lanes added in a fixed order (deterministic)
template <typename acc_t>
inline acc_t hsum(const at::vec::Vectorized<acc_t>& v) {
  alignas(64) acc_t buf[at::vec::Vectorized<acc_t>::size()];
  v.store(buf);
  acc_t s = 0;
  for (int i = 0; i < at::vec::Vectorized<acc_t>::size(); ++i) s += buf[i];
  return s;
}

// 1 / sqrt(var + eps) with ATen's rule (batch_norm's InvStd): a zero variance with eps = 0 gives
// 0, not inf, so a constant plane normalises to 0 (output act(bias), as eager) instead of NaN
template <typename acc_t>
inline acc_t inv_std(acc_t var, double eps) {
  if (var == acc_t(0) && eps == 0.0) return acc_t(0);
  return acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
}

}  // namespace cpu
}  // namespace ganengine
