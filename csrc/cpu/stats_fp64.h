// Norm statistics redone in double when the fp32 pass overflowed: eager's rule, exactly.
//
// The norm kernels accumulate fp32 (and fp16/bf16) data in fp32. ATen's CPU batch / instance
// norm accumulates in double but stores the variance sum M2 = sum (x - mean)^2 in an fp32
// tensor: where M2 exceeds fp32 max (n var > 3.4e38, e.g. |x| ~ 1e20) it is inf, invstd is 0
// and the output is act(bias) (measured, torch 2.14: 16 values +-4.5e18 normalise, +-4.7e18
// give 0). An fp32 M2 overflows at about the same place, but not exactly, and an fp32 *sum*
// also overflows for values near fp32 max (a plane of 1e38s: mean inf, NaN output, where eager
// gives act(bias)). So: check the fp32 result (one branch per plane or channel) and redo only
// such a plane in double, then round M2 to fp32 as ATen does. A plane with an inf or NaN also
// takes this path and gets eager's statistics (inf / NaN as eager).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

namespace ganengine {
namespace cpu {

// true when fp32 statistics (mean, M2) must be redone in double
template <typename acc_t>
inline bool stats_overflowed(acc_t mean, acc_t m2) {
  if constexpr (sizeof(acc_t) >= sizeof(double)) {
    return false;  // already double: an overflow here is eager's too
  } else {
    return !(std::isfinite(mean) && std::isfinite(m2));
  }
}

template <typename T>
inline double to_double(T v) {
  return static_cast<double>(static_cast<float>(v));
}
inline double to_double(double v) { return v; }

// Two-pass mean and M2 in double of the values x[o * so + i * si], o < outer, i < inner.
template <typename T>
void stats_double(const T* x, int64_t outer, int64_t so, int64_t inner, int64_t si, double& mean, double& m2) {
  double s = 0;
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t i = 0; i < inner; ++i) s += to_double(x[o * so + i * si]);
  mean = s / static_cast<double>(outer * inner);
  double q = 0;
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t i = 0; i < inner; ++i) {
      const double d = to_double(x[o * so + i * si]) - mean;
      q += d * d;
    }
  m2 = q;
}

}  // namespace cpu
}  // namespace ganengine
