"""conv3x3 under CPU autocast, both padding modes, from C (session 20).

CycleGAN's ReflectionPad2d(1) -> Conv2d(3x3) (GF.conv3x3(x, w, b, 1, "reflect")) under CPU autocast took
the Python shortcut ops/conv3x3._autocast_call (its checks, then F.pad and eager's conv: 1.15x eager's
host time at a tiny layer); the zero-padded conv3x3 took conv_entry_default's autocast call. Both now
go through ganengine._C.conv3x3_autocast_entry (csrc/cpu/conv_py.cpp), which asks every condition in
C and runs eager's own ops: ATen's reflection pad, then at::conv2d with autocast's casts and autograd.
These tests check eager's bits, dtypes and layouts forward and backward (second order too), what the
entry declines (nothing ran, nothing recorded) and the public errors the route then raises, and the
_dispatch.last_used record.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ganengine.functional as GF
from ganengine import _ext
from ganengine.backends import use_backend
from ganengine.ops import _dispatch
from ganengine.ops import conv as conv_ops
from ganengine.ops import conv3x3 as c3_ops
from ganengine.ops._conv_common import out_format

pytestmark = pytest.mark.skipif(not _ext.loaded() or not _ext.has_kernel("conv3x3_fwd", "CPU"),
                                reason="needs the C++ extension")


def _autocast_dtypes():
    dtypes = [torch.bfloat16]
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            if F.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 3)).dtype == torch.float16:
                dtypes.append(torch.float16)
    except (RuntimeError, ValueError):  # (a torch whose CPU autocast refuses fp16)
        pass
    return dtypes


DTYPES = _autocast_dtypes()
LAYOUTS = ("contiguous", "channels_last", "strided", "permuted")
# (x shape, weight shape, padding, bias): batch 1, odd sizes, a 2x2 map (reflect 1 is legal on it),
# H != W, padding 2, one channel
SHAPES = (((1, 4, 4, 4), (4, 4, 3, 3), 1, True),
          ((2, 3, 7, 5), (5, 3, 3, 3), 1, False),
          ((1, 8, 2, 2), (3, 8, 3, 3), 1, True),
          ((3, 2, 6, 9), (4, 2, 3, 3), 2, True),
          ((1, 1, 5, 3), (1, 1, 3, 3), 1, False))


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a slice: neither layout dense
        return torch.cat([t, t], dim=3)[..., ::2]
    if layout == "permuted":  # H and W swapped in memory
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t


def _eager(x, w, b, padding, mode):
    """What the reference ResnetBlock runs: nn.ReflectionPad2d(p) -> nn.Conv2d(3x3), or Conv2d(padding=p)."""
    if mode == "reflect":
        return F.conv2d(F.pad(x, (padding,) * 4, mode="reflect"), w, b)
    return F.conv2d(x, w, b, 1, padding)


def _inputs(shape, layout, seed=0):
    xs, ws, padding, bias = shape
    g = torch.Generator().manual_seed(seed)
    x = _layout(torch.randn(xs, generator=g), layout)
    w = torch.randn(ws, generator=g) * 0.3
    b = torch.randn(ws[0], generator=g) if bias else None
    return x, w, b, padding


def _leaves(*ts):
    """Leaf copies requiring grad with the same strides (a weight requiring grad: autocast caches its cast)."""
    return [None if t is None else torch.empty_strided(t.shape, t.stride()).copy_(t).requires_grad_() for t in ts]


def _no_python_shortcuts(m):
    """Neither Python autocast shortcut (conv3x3's nor conv2d's C entry through autocast_conv_entry) may
    serve the call: only conv3x3's own C entry."""
    def unused(*args, **kwargs):
        raise AssertionError("a Python autocast shortcut ran")

    m.setattr(c3_ops, "_autocast_call", unused)
    m.setattr(conv_ops, "autocast_conv_entry", unused)
    m.setattr(conv_ops, "_default_entry", unused)


def _run(fn, x, w, b, dtype, gy_seed=3):
    """fn's output and the gradients of every input (a random output gradient and a sum's expanded
    one), under autocast to dtype."""
    x, w, b = _leaves(x, w, b)
    with torch.autocast("cpu", dtype=dtype):
        y = fn(x, w, b)
    leaves = [t for t in (x, w, b) if t is not None]
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(gy_seed)).to(y.dtype)
    grads = torch.autograd.grad(y, leaves, gy, retain_graph=True)
    grads_sum = torch.autograd.grad(y.float().sum(), leaves)  # (a stride-0 output gradient)
    return y, grads, grads_sum


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", range(len(SHAPES)))
@pytest.mark.parametrize("mode", ["reflect", "zeros"])
def test_conv3x3_under_autocast_is_eagers_call_from_c(mode, shape, layout, dtype, monkeypatch):
    """Output bits, dtype and layout (ganengine's rule out_format(x)), every gradient's bits and dtype:
    eager's; served by the C entry (neither Python shortcut runs) and recorded as "torch"."""
    x, w, b, padding = _inputs(SHAPES[shape], layout)
    want = _run(lambda x, w, b: _eager(x, w, b, padding, mode), x, w, b, dtype)
    with monkeypatch.context() as m:
        _no_python_shortcuts(m)
        _dispatch.last_used.clear()
        got = _run(lambda x, w, b: GF.conv3x3(x, w, b, padding, mode), x, w, b, dtype)
        assert _dispatch.last_used == {"conv3x3": "torch"}
    assert got[0].dtype == want[0].dtype == dtype and torch.equal(got[0], want[0])
    assert out_format(got[0]) == out_format(x) and got[0].is_contiguous(memory_format=out_format(x))
    for g_got, g_want in zip(got[1:], want[1:]):
        assert len(g_got) == len(g_want)
        assert all(a.dtype == r.dtype and torch.equal(a, r) for a, r in zip(g_got, g_want))


def test_second_order_gradients_are_eagers(monkeypatch):
    """The autograd graph is eager's (reflection pad, cast, convolution): its double backward too
    (WGAN-GP / R1 differentiate the gradient)."""
    x, w, b, padding = _inputs(SHAPES[1], "contiguous", seed=5)

    def penalty(fn):
        xl, wl = _leaves(x, w)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(xl, wl)
        (gx,) = torch.autograd.grad(y.float().square().sum(), xl, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), wl)[0]

    want = penalty(lambda x, w: _eager(x, w, b, padding, "reflect"))
    with monkeypatch.context() as m:
        _no_python_shortcuts(m)
        got = penalty(lambda x, w: GF.conv3x3(x, w, b, padding, "reflect"))
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_first_call_binds_the_entrys_state(monkeypatch):
    """Before conv_entry_default's state is bound (a process's first call under autocast), conv3x3
    binds it and its C entry serves that very call."""
    x, w, b, padding = _inputs(SHAPES[0], "contiguous")
    try:
        conv_ops._default_bound = False
        _ext._C.conv_default_bind({}, {}, "", (), {}, 0)  # (unbound: the entry declines every call)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert c3_ops._autocast_entry(x, w, b, padding, "reflect") is None
            with monkeypatch.context() as m:
                _no_python_shortcuts(m)
                y = GF.conv3x3(x, w, b, padding, "reflect")
            assert conv_ops._default_bound
            assert torch.equal(y, _eager(x, w, b, padding, "reflect"))
    finally:  # (bound again whatever happened: the other tests' default state)
        conv_ops._default_bound = False
        conv_ops._bind_default()


class _Tagged(torch.Tensor):
    pass


def test_entry_declines_what_it_does_not_serve():
    """None (nothing ran, nothing recorded) for every call the Python route must serve or refuse:
    autocast off, another backend, operands autocast keeps (fp64), tensor subclasses, arguments of
    another type or value, a kernel other than 3x3, and what ATen refuses (a reflect padding not
    smaller than the map). Wrong arity is a TypeError."""
    entry = _ext._C.conv3x3_autocast_entry
    x, w, b, padding = _inputs(SHAPES[0], "contiguous")
    GF.conv2d(x, w, b, 1, 1)  # (binds the default state)
    assert entry(x, w, b, 1, "reflect") is None  # autocast off
    one = torch.randn(1, 4, 1, 1)
    row = torch.randn(1, 4, 1, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _dispatch.last_used.clear()
        assert entry(x, w, b, 1, "reflect") is not None and _dispatch.last_used == {"conv3x3": "torch"}
        _dispatch.last_used.clear()
        declined = [
            (x.double(), w.double(), None, 1, "reflect"),
            (x, w.double(), b, 1, "reflect"),
            (x.as_subclass(_Tagged), w, b, 1, "reflect"),
            (x, w, b, (1, 1), "reflect"),
            (x, w, b, True, "reflect"),
            (x, w, b, -1, "zeros"),
            (x, w, b, 1, "replicate"),
            (x, w, b, 1, b"reflect"),
            (x, torch.randn(4, 4, 5, 5), b, 2, "reflect"),
            (x, torch.randn(4, 3, 3, 3), b, 1, "zeros"),  # (channels: ATen refuses)
            (x[0], w, b, 1, "reflect"),  # (3-d: the route refuses what ATen would take)
            (one, w, b, 1, "reflect"),
            (row, w, b, 1, "reflect"),
            (x, w, b, 4, "reflect"),
            ("x", w, b, 1, "reflect"),
        ]
        for args in declined:
            assert entry(*args) is None, args
        with use_backend("torch"):
            assert entry(x, w, b, 1, "reflect") is None
        with use_backend("cpu"):
            assert entry(x, w, b, 1, "reflect") is None
        assert _dispatch.last_used == {}
    with pytest.raises(TypeError, match="conv3x3_autocast_entry takes 5 arguments"):
        entry(x, w, b, 1)


@pytest.mark.parametrize("hw", [(1, 1), (1, 6), (6, 1), (3, 2)])
def test_invalid_reflect_padding_raises_the_public_error(hw):
    """A map no larger than the reflect padding (eager: ReflectionPad2d's RuntimeError): the entry
    declines and the route raises its public error, as in fp32, and nothing is recorded."""
    h, w_ = hw
    x, w, b = torch.randn(1, 4, h, w_), torch.randn(4, 4, 3, 3), torch.randn(4)
    padding = 2 if hw == (3, 2) else 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError):
            _eager(x, w, b, padding, "reflect")
        _dispatch.last_used.clear()
        with pytest.raises(ValueError, match="reflect padding .* must be smaller than the input's H and W"):
            GF.conv3x3(x, w, b, padding, "reflect")
        assert "conv3x3" not in _dispatch.last_used
    with pytest.raises(ValueError, match="reflect padding .* must be smaller than the input's H and W"):
        GF.conv3x3(x, w, b, padding, "reflect")


def test_named_backend_keeps_its_route_under_autocast():
    """A backend named explicitly is not the default state: the C entry declines and the route's
    record stands (as in fp32)."""
    x, w, b, padding = _inputs(SHAPES[1], "contiguous")
    with use_backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        _dispatch.last_used.clear()
        y = GF.conv3x3(x, w, b, padding, "reflect")
        assert _dispatch.last_used.get("conv3x3") == "torch"
        assert y.dtype == torch.bfloat16
