"""On the GPU backends (triton, cuda) the plain convolutions (conv3x3, conv2d, conv_transpose2d)
are cuDNN's either way, so the public functions call the torch composition directly instead of
going through their custom ops: the same kernels without the custom op's host cost. Checked on
CPU tensors through the triton backend (the Triton interpreter serves CPU tensors): same numbers
and layouts as the custom op's torch path, and no ganengine op dispatched."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ganengine.functional as GF
from ganengine.ops import conv as conv_ops, conv3x3 as conv3x3_ops
from tests._backends import on_backend


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


CASES = {
    "conv3x3 reflect": (lambda x, w, b: conv3x3_ops.conv3x3(x, w, b, 1, "reflect"), (2, 3, 7, 9), (4, 3, 3, 3)),
    "conv3x3 zeros": (lambda x, w, b: conv3x3_ops.conv3x3(x, w, b, 1, "zeros"), (2, 3, 7, 9), (4, 3, 3, 3)),
    "conv2d": (lambda x, w, b: conv_ops.conv2d(x, w, b, 2, 1), (2, 3, 9, 8), (5, 3, 4, 4)),
    "conv_transpose2d": (lambda x, w, b: conv_ops.conv_transpose2d(x, w, b, 2, 1), (2, 3, 5, 6), (3, 4, 4, 4)),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_backends_call_the_vendor_conv_directly(case, channels_last):
    fn, xs, ws = CASES[case]
    torch.manual_seed(0)
    x = torch.randn(xs)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(ws) * 0.2
    b = torch.randn(ws[1] if case == "conv_transpose2d" else ws[0])
    outs = {}
    for backend in ("torch", "triton"):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        mode = _Ops()
        with on_backend(backend), mode:
            y = fn(*leaves)
            y.backward(torch.ones_like(y))
        outs[backend] = (y.detach(), [t.grad for t in leaves], mode.names, y.is_contiguous(
            memory_format=torch.channels_last) and not y.is_contiguous(), type(y.grad_fn).__name__)
    (y_t, g_t, names_t, cl_t, node_t), (y_g, g_g, names_g, cl_g, node_g) = outs["torch"], outs["triton"]
    assert node_t.startswith("ganengine::")  # the torch backend: the op (its eager twin: a mode that watches sees it)
    assert not node_g.startswith("ganengine::") and not any(n.startswith("ganengine.") for n in names_g), names_g
    # triton: the plain composition
    assert torch.equal(y_t, y_g) and cl_t == cl_g == channels_last
    for a, r in zip(g_g, g_t):
        torch.testing.assert_close(a, r, rtol=0, atol=0)
