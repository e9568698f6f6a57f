// The activations of the fused CUDA kernels, as the Triton (kernels/_act.py) and CPU ones:
// leaky relu z > 0 ? z : z * slope; slope 0 is relu as F.relu (0 where z <= 0: z * 0 would be
// NaN at -inf; a NaN kept), and its gradient relu's threshold_backward (0 where z <= 0, also
// for an inf upstream gradient; the gradient itself where z is NaN). docs/nonfinite.md.
#pragma once

template <typename A> __device__ __forceinline__ A act_fwd(A z, A slope) {
  if (z > A(0)) return z;
  if (slope == A(0)) return z <= A(0) ? A(0) : z;
  return z * slope;
}

template <typename A> __device__ __forceinline__ A act_bwd(A g, A z, A slope) {
  if (slope == A(0)) return z <= A(0) ? A(0) : g;
  return z > A(0) ? g : g * slope;
}
