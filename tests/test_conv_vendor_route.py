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


# ----------------------------------------------------------------------------- the fast entries' vendor route
# ganengine._C.conv3x3_entry / conv_entry serve CUDA tensors on the vendor route (csrc/cpu/conv_vendor.cpp:
# the public function's checks, then ATen's convolution with ATen's autograd, in one C++ call). Its
# numbers must be the Python route's vendor branch's bit for bit, and it must decline (None, before
# any work) every call that branch would not run as it is. Without a GPU the same route runs on CPU
# tensors with routes=ROUTE_VENDOR_CPU (oneDNN in place of cuDNN; the code path is the same).
from ganengine import _ext, backends  # noqa: E402
from ganengine.ops import _dispatch  # noqa: E402
from ganengine.ops._conv_common import out_format  # noqa: E402

_HAS_VENDOR = _ext.loaded() and hasattr(_ext._C, "conv3x3_entry") and hasattr(_ext._C, "conv_entry")
needs_vendor = pytest.mark.skipif(not _HAS_VENDOR, reason="ganengine._C without the conv fast entries")
_VENDOR_CPU = _dispatch.ROUTE_VENDOR_CPU


def _vendor_entry(case, routes=_VENDOR_CPU):
    """The fast entry's call for a CASES case, with ``routes``."""
    return {
        "conv3x3 reflect": lambda x, w, b: _ext._C.conv3x3_entry(x, w, b, 1, "reflect", routes),
        "conv3x3 zeros": lambda x, w, b: _ext._C.conv3x3_entry(x, w, b, 1, "zeros", routes),
        "conv2d": lambda x, w, b: _ext._C.conv_entry(x, w, b, 2, 1, 0, False, routes),
        "conv_transpose2d": lambda x, w, b: _ext._C.conv_entry(x, w, b, 2, 1, 0, True, routes),
    }[case]


def _composition(case):
    """The Python route's vendor branch, written out (ops/conv3x3.py, ops/conv.py)."""
    def autocast(*ts):  # _conv_common.autocast_args
        dev = ts[0].device.type
        if torch.is_autocast_enabled(dev):
            dt = torch.get_autocast_dtype(dev)
            return [t if t is None else t.to(dt) for t in ts]
        return list(ts)

    def run(x, w, b):
        x, w, b = autocast(x, w, b)
        if case == "conv3x3 reflect":
            y = torch.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"), w, b, 1, 0)
        elif case == "conv3x3 zeros":
            y = torch.conv2d(x, w, b, 1, 1)
        elif case == "conv2d":
            y = torch.conv2d(x, w, b, 2, 1)
        else:
            y = torch.nn.functional.conv_transpose2d(x, w, b, 2, 1, 0)
        return y.contiguous(memory_format=out_format(x))
    return run


def _case_tensors(case, dtype, layout, bias, seed=0):
    _, xs, ws = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(xs, generator=g).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.cat([x, x], dim=3)[..., ::2]
    elif layout == "strided_channels_last":  # channels-last ordered, not dense (a cast makes it dense NHWC)
        x = torch.cat([x, x], dim=3).contiguous(memory_format=torch.channels_last)[..., ::2]
    w = (torch.randn(ws, generator=g) * 0.2).to(dtype)
    b = torch.randn(ws[1] if case == "conv_transpose2d" else ws[0], generator=g).to(dtype) if bias else None
    return x, w, b


def _leaf(t):
    """A leaf copy of ``t`` with its strides as they are (clone() would make a non-dense one dense)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t).requires_grad_()


def _forward_backward(fn, x0, w0, b0):
    leaves = [t if t is None else _leaf(t) for t in (x0, w0, b0)]
    assert leaves[0].stride() == x0.stride()
    y = fn(*leaves)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(device=y.device, dtype=y.dtype)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], gy)
    return y, out_format(y) if y.dim() == 4 else None, type(y.grad_fn).__name__, grads


@needs_vendor
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "strided_channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_fast_entry_vendor_route_matches_the_python_vendor_branch_bitwise(case, dtype, layout, bias):
    x, w, b = _case_tensors(case, dtype, layout, bias)
    got = _forward_backward(_vendor_entry(case), x, w, b)
    ref = _forward_backward(_composition(case), x, w, b)
    assert torch.equal(got[0], ref[0]) and got[0].dtype == ref[0].dtype
    # layout; ATen's autograd (the convolution's node, or the layout copy's after it)
    assert got[1] == ref[1] and got[2] == ref[2] and got[2] in ("ConvolutionBackward0", "CloneBackward0")
    assert len(got[3]) == len(ref[3]) and all(torch.equal(a, r) for a, r in zip(got[3], ref[3]))


@needs_vendor
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided_channels_last"])
@pytest.mark.parametrize("case", list(CASES))
def test_fast_entry_vendor_route_under_autocast(case, layout):
    """Autocast for x's device: every operand runs in the autocast dtype, cast as autocast_args
    casts them, and the output takes the cast x's layout (a non-dense channels-last x becomes dense
    NHWC when cast)."""
    x, w, b = _case_tensors(case, torch.float32, layout, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _forward_backward(_vendor_entry(case), x, w, b)
        ref = _forward_backward(_composition(case), x, w, b)
    assert got[0].dtype == torch.bfloat16 and torch.equal(got[0], ref[0])
    assert got[0].stride() == ref[0].stride()
    assert all(a.dtype == torch.float32 and torch.equal(a, r) for a, r in zip(got[3], ref[3]))


@needs_vendor
@pytest.mark.parametrize("case", list(CASES))
def test_fast_entry_vendor_route_sees_a_weight_updated_inside_autocast(case):
    """A weight updated in place inside one autocast region (an optimizer step between two passes):
    the next call reads the new values, as the Python route's plain casts do (not a cast cached
    for the region)."""
    x, w, b = _case_tensors(case, torch.float32, "contiguous", True)
    w, b = w.requires_grad_(), b.requires_grad_()
    entry, ref = _vendor_entry(case), _composition(case)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = entry(x, w, b)
        with torch.no_grad():
            w.mul_(2.0)
            b.add_(1.0)
        again = entry(x, w, b)
        assert torch.equal(again, ref(x, w, b)) and not torch.equal(again, first)


@needs_vendor
def test_fast_entry_vendor_route_declines_before_any_work():
    """What the Python route raises for, or would run otherwise than as it is (fp64 under autocast,
    which autocast_args casts and ATen's autocast would not), and a device the routes do not allow:
    None, no op ran. The public functions then raise their errors (tested with the Python route)."""
    x, w3, b = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(4)
    w4, wt = torch.randn(4, 3, 4, 4), torch.randn(3, 4, 4, 4)
    e3, ec, v = _ext._C.conv3x3_entry, _ext._C.conv_entry, _VENDOR_CPU
    small, meta, sparse = x[:, :, :1, :1], w3.to("meta"), x.to_sparse()
    xd, w3d, bd, w4h, bh = x.double(), w3.double(), b.double(), w4.half(), b.half()
    xi, w3i, bi = x.int(), w3.int(), b.int()
    calls = [
        (e3, (x, w3, b, 1, "zeros", _dispatch.ROUTE_VENDOR_CUDA)),  # CPU tensors, CUDA's route only
        (e3, (x, w3, b, 1, "zeros", 0)),
        (e3, (x, w3d, b, 1, "zeros", v)),  # dtypes differ outside autocast
        (e3, (x, w3, bd, 1, "zeros", v)),
        (e3, (xi, w3i, bi, 1, "zeros", v)),  # not a float
        (e3, (x, w3, b[:3], 1, "zeros", v)),  # bias shape
        (e3, (x, w3, b[None], 1, "zeros", v)),
        (e3, (x, w3[:, :2], b, 1, "zeros", v)),  # channels
        (e3, (x, w4, b, 1, "zeros", v)),  # not 3x3
        (e3, (x[0], w3, b, 1, "zeros", v)),  # not 4-d
        (e3, (x[:0], w3, b, 1, "zeros", v)),  # empty
        (e3, (x, meta, b, 1, "zeros", v)),  # another device
        (e3, (x, w3, b, 6, "reflect", v)),  # reflect padding >= H
        (e3, (x, w3, b, -1, "zeros", v)),
        (e3, (small, w3, b, 0, "zeros", v)),  # smaller than the kernel
        (e3, (sparse, w3, b, 1, "zeros", v)),
        (ec, (x, w4, b, 2, 1, 0, False, _dispatch.ROUTE_VENDOR_CUDA)),
        (ec, (x, w4, b, 2, 1, 1, False, v)),  # output_padding on a conv
        (ec, (x, w4, b, 0, 1, 0, False, v)),  # stride 0
        (ec, (x, w4, b, 2, -1, 0, False, v)),
        (ec, (x[:, :, :2, :2], w4, b, 1, 0, 0, False, v)),  # smaller than the kernel
        (ec, (x, w4h, b, 2, 1, 0, False, v)),
        (ec, (x, wt, b[:3], 2, 1, 2, True, v)),  # output_padding >= stride
        (ec, (x, wt, b[:3], 2, 1, 1, True, v)),  # bias (C_out,) = (4,) for a (C_in, C_out) weight
        (ec, (small, wt, None, 1, 3, 0, True, v)),  # empty output
        (ec, (x, w4, bh, 2, 1, 0, False, v)),
    ]
    for i, (entry, args) in enumerate(calls):
        with _Ops() as mode:
            assert entry(*args) is None, i
        assert mode.names == [], (i, mode.names)
    with pytest.raises(TypeError, match="routes must be an int"):
        ec(x, w4, b, 2, 1, 0, False, 1 << 70)
    with torch.autocast("cpu", dtype=torch.bfloat16), _Ops() as mode:  # fp64 under autocast
        assert e3(xd, w3d, bd, 1, "zeros", v) is None
        assert ec(x, w4, bd, 2, 1, 0, False, v) is None
    assert mode.names == []
    # served: the smallest legal calls
    assert e3(x[:, :, :1, :1], w3, b, 1, "zeros", v).shape == (1, 4, 1, 1)
    assert ec(x, wt, torch.randn(4), 2, 1, 1, True, v).shape == (1, 4, 13, 13)


@pytest.fixture
def gpu_backends(monkeypatch):
    """backends.serves faked: the given backends serve CUDA tensors (no GPU needed to resolve)."""
    serving = {}
    real = backends.serves
    monkeypatch.setattr(backends, "serves", lambda name, device: serving[name] if device.type == "cuda"
                        and name in serving else real(name, device))
    monkeypatch.setattr(_dispatch, "_CONV_ROUTES", {})
    monkeypatch.setattr(_dispatch, "_SERVED", {})
    return serving


@needs_vendor
def test_conv_routes_follow_the_requested_backend(gpu_backends):
    """The vendor route for CUDA calls exactly where choose() would pick a GPU backend (both run the
    vendor convolution), the lean route on CPU tensors exactly where lean_op finds the entry."""
    names = ("conv3x3", ("conv3x3_fwd", "conv3x3_bwd"), "conv3x3_entry")
    lean = _dispatch.ROUTE_LEAN_CPU if _dispatch.lean_op("conv3x3", names[1]) is not None else 0
    cuda = _dispatch.ROUTE_VENDOR_CUDA
    gpu_backends.update(triton=True, cuda=True)
    expect = {"auto": (lean | cuda, "triton"), "triton": (cuda, "triton"), "cuda": (cuda, "cuda"),
              "torch": (0, None), "cpu": (lean, None)}
    for requested, want in expect.items():
        with backends.use_backend(requested):
            assert (_dispatch.conv_routes(*names), _dispatch.conv_gpu(*names)) == want, requested
    gpu_backends.update(triton=False)
    _dispatch._CONV_ROUTES.clear()
    _dispatch._SERVED.clear()
    with backends.use_backend("auto"):
        assert (_dispatch.conv_routes(*names), _dispatch.conv_gpu(*names)) == (lean | cuda, "cuda")
    with backends.use_backend("triton"):
        assert (_dispatch.conv_routes(*names), _dispatch.conv_gpu(*names)) == (0, None)
    gpu_backends.update(cuda=False)
    _dispatch._CONV_ROUTES.clear()
    _dispatch._SERVED.clear()
    with backends.use_backend("auto"):
        assert (_dispatch.conv_routes(*names), _dispatch.conv_gpu(*names)) == (lean, None)


@needs_vendor
def test_conv_routes_see_lean_op_turned_off(monkeypatch):
    monkeypatch.setattr(_dispatch, "lean_op", lambda *a, **k: None)
    assert not _dispatch.conv_routes("conv", ("conv_fwd", "conv_bwd"), "conv_entry") & _dispatch.ROUTE_LEAN_CPU


@needs_vendor
@pytest.mark.parametrize("case", list(CASES))
def test_public_functions_take_the_vendor_route_where_the_routes_allow(case, monkeypatch):
    """With the routes a CUDA call gets (here the CPU stand-in), the public function is served by the
    entry without entering its Python route (whose backend choice would raise), with the numbers of
    that route's vendor branch."""
    fn = CASES[case][0]
    x, w, b = _case_tensors(case, torch.float32, "channels_last", True, seed=3)
    ref = _forward_backward(_composition(case), x, w, b)

    def no_python_route(*a, **k):
        raise AssertionError("the Python route ran")

    monkeypatch.setattr(_dispatch, "conv_routes", lambda *a: _VENDOR_CPU)
    monkeypatch.setattr(conv3x3_ops, "_backend", no_python_route)
    monkeypatch.setattr(conv_ops, "_backend", no_python_route)
    got = _forward_backward(fn, x, w, b)
    assert torch.equal(got[0], ref[0]) and got[1] == ref[1] == torch.channels_last
    assert all(torch.equal(a, r) for a, r in zip(got[3], ref[3]))


# ----------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_calls_take_the_fast_entry_with_eagers_numbers(case, channels_last, dtype, monkeypatch):
    """On CUDA tensors under auto the public functions are served by the fast entry's vendor route
    (their Python route never runs), bitwise equal to that route's vendor branch (the eager ops) with
    cuDNN deterministic, forward and gradients (x's gradient through the reflection pad within the
    reordering of its atomic adds), and record the GPU backend auto picks; under autocast (fp16)
    too."""
    fn = CASES[case][0]
    x, w, b = (t.cuda() for t in _case_tensors(case, dtype, "channels_last" if channels_last else "contiguous",
                                                True, seed=5))
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    ref = _forward_backward(_composition(case), x, w, b)
    with torch.autocast("cuda", dtype=torch.float16):
        ref_amp = _forward_backward(_composition(case), x.float(), w.float(), b.float())

    def no_python_route(*a, **k):
        raise AssertionError("the Python route ran")

    monkeypatch.setattr(conv3x3_ops, "_backend", no_python_route)
    monkeypatch.setattr(conv_ops, "_backend", no_python_route)
    with backends.use_backend("auto"):
        got = _forward_backward(fn, x, w, b)
        with torch.autocast("cuda", dtype=torch.float16):
            got_amp = _forward_backward(fn, x.float(), w.float(), b.float())
        op = "conv3x3" if case.startswith("conv3x3") else "conv"
        assert _dispatch.last_used[op] == _dispatch.conv_gpu(op, (), f"{op}_entry") in ("triton", "cuda")
    for g, r in ((got, ref), (got_amp, ref_amp)):
        assert torch.equal(g[0], r[0]) and g[0].dtype == r[0].dtype and g[1] == r[1]
        dx, dx_ref = g[3][0], r[3][0]
        if case == "conv3x3 reflect":
            # reflection_pad2d's CUDA backward adds the border's contributions (up to 4 at a corner)
            # with atomics, in no fixed order: up to 3 roundings of a sum of at most 4 terms, each at
            # most max|dx| in size (the interior gradient is the padded one itself)
            eps = torch.finfo(dx.dtype).eps
            torch.testing.assert_close(dx, dx_ref, rtol=0, atol=3 * eps * 4 * dx_ref.abs().max().item())
        else:
            assert torch.equal(dx, dx_ref)
        assert all(torch.equal(a, c) for a, c in zip(g[3][1:], r[3][1:]))


@needs_vendor
def test_compile_before_any_eager_call(monkeypatch):
    """torch.compile(fullgraph=True) over the public functions with the routes not yet resolved in
    this process (compiling a model before its first eager call): the compile check comes first,
    so dynamo never traces the routes' resolution."""
    monkeypatch.setattr(_dispatch, "_CONV_ROUTES", {})
    x, w3, w4, b = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(4, 3, 4, 4), torch.randn(4)

    def fn(x):
        return conv3x3_ops.conv3x3(x, w3, b, 1, "reflect") + conv_ops.conv2d(x, w4, b, 1, (2, 2))[..., :6, :6]

    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="eager")(x)
    assert _dispatch._CONV_ROUTES == {}
    torch.testing.assert_close(got, fn(x))
