// Small at::vec helpers shared by the CPU kernels.
#pragma once
#include <ATen/cpu/vec/vec.h>

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

}  // namespace cpu
}  // namespace ganengine
