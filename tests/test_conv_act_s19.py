"""conv_act's CPU backward (csrc/cpu/conv_act.cpp conv_act_bwd) with a stride-0 upstream gradient
(what ``.sum().backward()`` hands it, the D step's loss on a patch map): read in place as one
value, not made dense with a full-size copy (that copy, and the second full-size buffer it made
glibc give back and fault in again on every call, made Conv2dAct's forward + backward slower than
eager's conv + LeakyReLU). The results are bit for bit those of the same gradient made dense."""
import pytest
import torch

import ganengine
import ganengine.functional as GF
from ganengine import _ext

pytestmark = pytest.mark.skipif(not _ext.loaded(), reason="needs the compiled extension ganengine._C")

STRIDE, PADDING, SLOPE = [2, 2], [1, 1], 0.2


def _inputs(dtype, layout, n=2, cin=3, cout=5, hw=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, hw, hw, generator=g).to(dtype)
    w = (torch.randn(cout, cin, 4, 4, generator=g) * 0.3).to(dtype)
    b = (torch.randn(cout, generator=g) * 0.1).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, w, b


def _bwd(grad, x, w, y, mask):
    return torch.ops.ganengine_C.conv_act_bwd(grad, x, w, y, STRIDE, PADDING, SLOPE, mask)


def _identical(got, ref):
    for a, e in zip(got, ref):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert torch.equal(a, e), (a - e).abs().max()


def _ops_in(fn):
    """Names of the aten ops fn issues (the profiler's CPU events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()]


MASKS = [[True, True, True], [False, True, False], [True, False, True], [False, False, True]]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if v else "0" for v in m))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_uniform_grad_matches_dense_grad_bitwise(dtype, layout, mask):
    x, w, b = _inputs(dtype, layout)
    y = torch.ops.ganengine_C.conv_act_fwd(x, w, b, STRIDE, PADDING, SLOPE)
    uniform = torch.tensor(0.75, dtype=dtype).expand_as(y)
    dense = uniform.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    _identical(_bwd(uniform, x, w, y, mask), _bwd(dense, x, w, y, mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_grad_read_in_place(dtype):
    """No full-size copy of a stride-0 gradient: no more copies than with a dense one."""
    x, w, _ = _inputs(dtype, "contiguous", n=4, cout=8, hw=16)
    y = torch.ops.ganengine_C.conv_act_fwd(x, w, None, STRIDE, PADDING, SLOPE)
    uniform = torch.ones((), dtype=dtype).expand_as(y)
    dense = torch.ones_like(y)
    copies = lambda g: sum(n in ("aten::copy_", "aten::clone") for n in _ops_in(lambda: _bwd(g, x, w, y, [False, True, False])))  # noqa: E731
    assert copies(uniform) <= copies(dense), (copies(uniform), copies(dense))


def test_uniform_grad_with_storage_offset_and_other_dtype():
    """A stride-0 gradient viewing one element inside a larger storage, and one of another dtype
    than the output (a direct op call: autograd casts first): the value read is that element."""
    x, w, b = _inputs(torch.float32, "contiguous", seed=1)
    y = torch.ops.ganengine_C.conv_act_fwd(x, w, b, STRIDE, PADDING, SLOPE)
    mask = [True, True, True]
    storage = torch.tensor([9.0, -1.5, 3.0])
    offset = storage[1:2].view(()).expand_as(y)
    assert offset.storage_offset() == 1
    _identical(_bwd(offset, x, w, y, mask), _bwd(torch.full_like(y, -1.5), x, w, y, mask))
    other = torch.tensor(0.5, dtype=torch.float64).expand_as(y)
    _identical(_bwd(other, x, w, y, mask), _bwd(torch.full_like(y, 0.5), x, w, y, mask))


def test_partly_broadcast_grad_matches_dense():
    """Stride 0 in some dims only (a per-channel gradient expanded over batch and pixels) is not
    one value: made dense as before."""
    x, w, b = _inputs(torch.float32, "contiguous", seed=2)
    y = torch.ops.ganengine_C.conv_act_fwd(x, w, b, STRIDE, PADDING, SLOPE)
    per_channel = torch.linspace(-1, 1, y.shape[1]).view(1, -1, 1, 1).expand_as(y)
    _identical(_bwd(per_channel, x, w, y, [True, True, True]),
               _bwd(per_channel.contiguous(), x, w, y, [True, True, True]))


@pytest.mark.parametrize("slope", [0.0, 0.2])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_sum_backward_matches_explicit_ones(layout, bias, slope):
    """The public op through autograd: .sum().backward() (stride-0) gives bit for bit what
    backward(ones) (dense) gives, for every input, x needing a gradient or not."""
    x0, w0, b0 = _inputs(torch.float32, layout, seed=3)

    def run(sum_backward, x_grad):
        x = x0.detach().clone(memory_format=torch.preserve_format).requires_grad_(x_grad)
        w = w0.detach().clone().requires_grad_()
        b = b0.detach().clone().requires_grad_() if bias else None
        with ganengine.use_backend("cpu"):
            y = GF.conv2d_act(x, w, b, 2, 1, slope)
            if sum_backward:
                y.sum().backward()
            else:
                y.backward(torch.ones_like(y))
        return [t.grad for t in (x, w, b) if t is not None and t.requires_grad]

    for x_grad in (True, False):
        _identical(run(True, x_grad), run(False, x_grad))
