"""The (leaky) ReLU of the fused kernels' epilogues and its gradient, with eager's non-finite values.

``z > 0 ? z : slope * z`` alone is not eager's relu (slope 0): ``-inf * 0`` is NaN where
``F.relu(-inf)`` is 0, and ``g * 0`` is NaN for an inf / NaN upstream gradient where relu's
``threshold_backward`` gives 0. Both forms keep NaN inputs NaN, as eager does. (A call with
``activation="leaky_relu", negative_slope=0`` cannot be told apart from relu here: it gets
relu's values at -inf, where eager's leaky_relu gives NaN; docs/nonfinite.md.)

(Module name starts with "_": the AOT report does not look for kernels here.)
"""
import triton
import triton.language as tl


@triton.jit
def leaky_relu(z, slope):
    """z > 0 ? z : slope * z; with slope 0 (relu) 0 for every z <= 0, -inf included."""
    return tl.where(z > 0, z, tl.where((slope == 0) & (z == z), 0.0, z * slope))


@triton.jit
def leaky_relu_grad(g, z, slope):
    """The upstream gradient g through the activation at z (its input, or its output: same sign
    for slope >= 0): z > 0 ? g : g * slope (leaky_relu_backward); with slope 0 relu's
    threshold_backward: 0 where z <= 0 whatever g is, g where z is NaN."""
    return tl.where(z > 0, g, tl.where(slope == 0, tl.where(z == z, 0.0, g), g * slope))
