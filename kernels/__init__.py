"""Triton kernels and their thin launchers (installed as ``ganengine.kernels``).

Only ``@triton.jit`` kernels and functions that take tensors and launch them: no autograd, no
module state. Import triton lazily through these modules so `import ganengine` works without it.
"""
