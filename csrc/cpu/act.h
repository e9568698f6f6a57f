// The activation of the fused CPU kernels given by a slope: leaky relu (z > 0 ? z : z * slope),
// slope 0 relu as F.relu (0 where z <= 0: z * 0 would be NaN at -inf; a NaN kept), and its
// gradient: leaky relu's, relu's threshold_backward (0 where z <= 0, also for an inf upstream
// gradient; the gradient itself where z is NaN). As kernels/_act.py and csrc/cuda/act.cuh
// (batch_norm_act.cpp names the activation instead: Act). docs/nonfinite.md.
#pragma once

#include <ATen/cpu/vec/vec.h>

namespace ganengine {
namespace cpu {

template <typename T>
inline at::vec::Vectorized<T> slope_act(const at::vec::Vectorized<T>& z, const at::vec::Vectorized<T>& slope) {
  using Vec = at::vec::Vectorized<T>;
  const Vec zero(T(0));
  const Vec neg = Vec::blendv(z * slope, zero, slope == zero);
  return Vec::blendv(neg, z, (z > zero) | (z != z));
}

template <typename T>
inline T slope_act(T z, T slope) {
  if (z > T(0)) return z;
  return slope == T(0) ? (z <= T(0) ? T(0) : z) : z * slope;
}

// the gradient g of the activation's output, at the pre-activation (or relu's output) z
template <typename T>
inline at::vec::Vectorized<T> slope_act_grad(const at::vec::Vectorized<T>& g, const at::vec::Vectorized<T>& z,
                                             const at::vec::Vectorized<T>& slope) {
  using Vec = at::vec::Vectorized<T>;
  const Vec zero(T(0));
  const Vec leaky = Vec::blendv(g * slope, g, z > zero);
  const Vec relu = Vec::blendv(g, zero, z <= zero);
  return Vec::blendv(leaky, relu, slope == zero);
}

template <typename T>
inline T slope_act_grad(T g, T z, T slope) {
  if (slope == T(0)) return z <= T(0) ? T(0) : g;
  return z > T(0) ? g : g * slope;
}

}  // namespace cpu
}  // namespace ganengine
