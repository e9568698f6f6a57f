// Launch functions of csrc/cuda/conv_act.cu (no torch headers on either side of this line).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace ganengine {
namespace cuda {

// The epilogues of conv2d_act's cuda backend around ATen's (cuDNN's) convolution, over n elements
// of a dense (N, C, H, W) map, NCHW or NHWC; the channel of element i is (i / inner) % C (inner:
// H * W for NCHW, 1 for NHWC). dtype codes: 0 fp32, 1 fp16, 2 bf16, 3 fp64; the bias has y's dtype.
// Arithmetic in fp32 (fp64 for fp64), one rounding to y's dtype.

// y = leaky_relu(y + b[c], slope) in place (b may be null; slope 1 is the identity, 0 ReLU)
cudaError_t conv_bias_act(int dtype, void* y, const void* b, int64_t n, int64_t C, int64_t inner, double slope,
                          cudaStream_t stream);

// gz = g * (y > 0 ? 1 : slope): leaky_relu's gradient from the sign of its output (slope >= 0);
// g, y and gz dense in one layout
cudaError_t conv_act_grad(int dtype, const void* g, const void* y, void* gz, int64_t n, double slope,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace ganengine
