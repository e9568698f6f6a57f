"""The lean C++ entries of the conv family on CPU tensors: ganengine_C::conv3x3 (GF.conv3x3) and
ganengine_C::conv (GF.conv2d / GF.conv_transpose2d), csrc/cpu/conv_autograd.cpp.

The entry asks the family's router once per call (csrc/cpu/conv_route.cpp). Where it says oneDNN
the entry runs the torch composition (ATen's autograd), as the Python route did for those calls;
where it says GEMM or Winograd it runs the custom op's kernels with C++ autograd. Either way its
numbers must equal the Python route's bit for bit: forward, each gradient for every subset of
inputs requiring grad, and the double backward (both differentiate the torch composition), on
every route (forced with the policy overrides). A call it refuses goes to the Python route and
gets the public errors, without a kernel having run; an error inside a call it serves propagates,
raised once."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ganengine
import ganengine.functional as GF
from ganengine import _ext
from ganengine.ops import _conv_common as cc
from ganengine.ops import _dispatch
from ganengine.ops import conv as cv
from ganengine.ops import conv3x3 as cm
from tests._backends import on_backend
from tests._train_utils import one_thread  # noqa: F401 (fixture)

_HAS_ENTRY = (_ext.loaded() and _ext.has_kernel("conv3x3", "CompositeImplicitAutograd")
              and _ext.has_kernel("conv", "CompositeImplicitAutograd"))
pytestmark = pytest.mark.skipif(not _HAS_ENTRY, reason="ganengine._C without the conv entries")

# what a route runs, as a TorchDispatchMode sees it: the lean entry calls the kernels through the
# dispatcher (ganengine_C::...), the Python route the custom op (ganengine::..., which the mode
# sees instead of the kernel inside it), and both routes' oneDNN calls aten::convolution
_KERNELS = {"conv3x3": ("ganengine_C::conv3x3_fwd", "ganengine::conv3x3_fwd"),
            "conv": ("ganengine_C::conv_fwd", "ganengine::conv_fwd"),
            "conv3x3_bwd": ("ganengine_C::conv3x3_bwd", "ganengine::conv3x3_bwd"),
            "conv_bwd": ("ganengine_C::conv_bwd", "ganengine::conv_bwd")}
_ONEDNN = ("aten::convolution",)


class _Calls(TorchDispatchMode):
    """Counts calls of the ops ``names``, and raises ``error`` from them when given."""

    def __init__(self, names, error: Exception | None = None):
        super().__init__()
        self.names, self.error, self.calls = tuple(names), error, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.names:
            self.calls += 1
            if self.error is not None:
                raise self.error
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _python_route():
    """The public functions with the lean entries off: the Python route they took before (lean_op
    finds no conv entry, which also turns the fast entries' lean route off: _dispatch.conv_routes)."""
    real = _dispatch.lean_op
    _dispatch.lean_op = lambda name, kernels=(): None if name in ("conv3x3", "conv") else real(name, kernels)
    try:
        yield
    finally:
        _dispatch.lean_op = real


@pytest.fixture
def route3(monkeypatch):
    """route3(name) forces conv3x3's route: "onednn", "wino2" (F(2x2, 3x3)) or "wino4"."""
    def force(name):
        if name == "onednn":
            monkeypatch.setattr(cm, "MIN_CHANNELS", 1 << 30)
        else:
            monkeypatch.setattr(cm, "MIN_CHANNELS", 0)
            monkeypatch.setattr(cm, "MIN_TILES", 0)
            monkeypatch.setenv("GANENGINE_WINOGRAD_TILE", name[-1])
    return force


def _route(name):
    """Forces conv's route: "onednn", "gemm" or "winograd"."""
    stack = contextlib.ExitStack()
    stack.enter_context(cv.gemm_policy("always" if name == "gemm" else "never"))
    stack.enter_context(cv.winograd_policy("always" if name == "winograd" else "never"))
    return stack


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a non-dense view
        return torch.cat([t, t], dim=3)[..., ::2]
    return t


# which of (x, weight, bias) require grad; "-b": no bias
_GRAD_SETS = [("x", "w", "b"), ("x",), ("w",), ("b",), ("x", "b"), ("w", "b"), ("x", "w", "-b"), ("w", "-b")]


def _leaves(grad_set, x0, w0, b0, layout):
    x = _layout(x0.detach().clone(), layout).requires_grad_("x" in grad_set)  # (strided: the view is the leaf)
    w = w0.detach().clone().requires_grad_("w" in grad_set)
    b = None if "-b" in grad_set else b0.detach().clone().requires_grad_("b" in grad_set)
    return x, w, b


def _run(lean, fn, grad_set, x0, w0, b0, gy, layout, create_graph=False, expect_node=None, strict=True):
    """(y, y's layout, first-order grads[, second-order grads]) by the lean entry or the Python route."""
    x, w, b = _leaves(grad_set, x0, w0, b0, layout)
    with (on_backend("cpu") if strict else ganengine.use_backend("cpu")), \
            (contextlib.nullcontext() if lean else _python_route()):
        y = fn(x, w, b)
        if lean and expect_node is not None:
            assert type(y.grad_fn).__name__ == expect_node
        leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
        g1 = torch.autograd.grad(y, leaves, gy, create_graph=create_graph)
        out = [y, y.is_contiguous(), y.is_contiguous(memory_format=torch.channels_last), *g1]
        if create_graph:
            loss = sum((g * g).sum() for g in g1 if g.requires_grad)
            if isinstance(loss, torch.Tensor):  # (bias alone: its gradient does not depend on any leaf)
                out += [torch.zeros(()) if g is None else g
                        for g in torch.autograd.grad(loss, leaves, allow_unused=True)]
    return out


def _assert_identical(got, ref):
    assert len(got) == len(ref)
    for a, r in zip(got, ref):
        if isinstance(a, bool):
            assert a == r
        else:
            assert a.dtype == r.dtype and a.shape == r.shape and a.stride() == r.stride()
            assert torch.equal(a, r)


def _tensors(xs, ws, bias_len, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(xs, generator=g, dtype=torch.float64).to(dtype)
    w0 = (torch.randn(ws, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    b0 = torch.randn(bias_len, generator=g, dtype=torch.float64).to(dtype)
    return x0, w0, b0


def _gy(fn, x0, w0, b0, seed=0):
    with torch.no_grad(), _python_route():
        shape = fn(x0, w0, b0).shape
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64).to(x0.dtype)


# ----------------------------------------------------------------------------- conv3x3
# (x shape, K, padding, mode): odd sizes, a single pixel, reflect padding 2
_CASES3 = [((2, 5, 9, 11), 7, 1, "zeros"), ((1, 3, 6, 5), 4, 1, "reflect"), ((1, 4, 1, 1), 3, 1, "zeros"),
           ((2, 3, 7, 8), 2, 2, "reflect")]


def _fn3(padding, mode):
    return lambda x, w, b: GF.conv3x3(x, w, b, padding, mode)


def _inputs3(case, dtype=torch.float32, seed=0):
    xs, k, padding, mode = case
    x0, w0, b0 = _tensors(xs, (k, xs[1], 3, 3), k, dtype, seed)
    fn = _fn3(padding, mode)
    return fn, x0, w0, b0, _gy(fn, x0, w0, b0, seed)


# each case in one layout (every layout meets every route)
_LAYOUTS = ["contiguous", "channels_last", "strided", "channels_last", "strided", "contiguous"]


@pytest.mark.parametrize("route", ["onednn", "wino2", "wino4"])
@pytest.mark.parametrize("i", range(len(_CASES3)), ids=lambda i: "x".join(map(str, _CASES3[i][0])) + f"-{_LAYOUTS[i]}")
def test_conv3x3_lean_matches_python_route_bitwise(route, i, route3):
    case, layout = _CASES3[i], _LAYOUTS[i]
    route3(route)
    fn, x0, w0, b0, gy = _inputs3(case)
    assert (cm._use_winograd(x0, w0, case[2]) is None) == (route == "onednn")
    node = "ConvolutionBackward0" if route == "onednn" else "CppFunction"
    for grad_set in (_GRAD_SETS[0], _GRAD_SETS[6]):  # with and without bias
        _assert_identical(_run(True, fn, grad_set, x0, w0, b0, gy, layout, expect_node=node),
                          _run(False, fn, grad_set, x0, w0, b0, gy, layout))


@pytest.mark.parametrize("route", ["onednn", "wino2"])
def test_conv3x3_gradients_per_input_and_double_backward(route, route3):
    """needs_input_grad subsets (edge 2 = bias), and create_graph=True: both routes differentiate
    the torch composition, so the same bits."""
    route3(route)
    fn, x0, w0, b0, gy = _inputs3(_CASES3[1], seed=1)
    for grad_set in _GRAD_SETS:
        _assert_identical(_run(True, fn, grad_set, x0, w0, b0, gy, "channels_last"),
                          _run(False, fn, grad_set, x0, w0, b0, gy, "channels_last"))
    for grad_set in (_GRAD_SETS[0], _GRAD_SETS[1], _GRAD_SETS[5], _GRAD_SETS[6]):
        _assert_identical(_run(True, fn, grad_set, x0, w0, b0, gy, "contiguous", create_graph=True),
                          _run(False, fn, grad_set, x0, w0, b0, gy, "contiguous", create_graph=True))


# ----------------------------------------------------------------------------- conv2d / conv_transpose2d
# (transposed, x shape, weight shape, stride, padding, output_padding): 4x4 at stride 2 and 1
# (every route legal), a 3x3 with unequal strides (no Winograd), a single input pixel
_CASES = [(False, (2, 3, 9, 7), (5, 3, 4, 4), 2, 1, 0), (False, (1, 4, 6, 5), (3, 4, 4, 4), 1, (1, 2), 0),
          (True, (2, 4, 5, 3), (4, 3, 4, 4), 2, 1, 1), (True, (1, 3, 4, 4), (3, 2, 4, 4), 1, 2, 0),
          (False, (3, 2, 5, 6), (4, 2, 3, 3), (1, 2), (1, 0), 0), (True, (2, 5, 1, 1), (5, 3, 4, 4), 2, 1, 0)]


def _fn(tr, stride, padding, output_padding):
    if tr:
        return lambda x, w, b: GF.conv_transpose2d(x, w, b, stride, padding, output_padding)
    return lambda x, w, b: GF.conv2d(x, w, b, stride, padding)


def _inputs(case, dtype=torch.float32, seed=0):
    tr, xs, ws, stride, padding, op = case
    x0, w0, b0 = _tensors(xs, ws, ws[1] if tr else ws[0], dtype, seed)
    fn = _fn(tr, stride, padding, op)
    return fn, x0, w0, b0, _gy(fn, x0, w0, b0, seed)


def _routes(case):
    legal_winograd = case[2][2:] == (4, 4) and case[3] in (1, 2)
    return ["onednn", "gemm"] + (["winograd"] if legal_winograd else [])


@pytest.mark.parametrize("i", range(len(_CASES)),
                         ids=lambda i: ("T" if _CASES[i][0] else "") + "x".join(map(str, _CASES[i][1])) + f"-{_LAYOUTS[i]}")
def test_conv_lean_matches_python_route_bitwise(i):
    case, layout = _CASES[i], _LAYOUTS[i]
    fn, x0, w0, b0, gy = _inputs(case)
    tr, _, _, stride, padding, op = case
    s, p, o = (cc.pair("", v, 0) for v in (stride, padding, op))
    for route in _routes(case):
        with _route(route):
            assert cv.uses_gemm(x0, w0, s, p, tr) == (route == "gemm")
            assert cv.uses_winograd(x0, w0, s, p, tr, o) == (route == "winograd")
            node = "ConvolutionBackward0" if route == "onednn" else "CppFunction"
            for grad_set in (_GRAD_SETS[0], _GRAD_SETS[6]):
                _assert_identical(_run(True, fn, grad_set, x0, w0, b0, gy, layout, expect_node=node),
                                  _run(False, fn, grad_set, x0, w0, b0, gy, layout))


@pytest.mark.parametrize("route", ["onednn", "gemm", "winograd"])
def test_conv_gradients_per_input_and_double_backward(route):
    for case in [_CASES[2] if route == "winograd" else _CASES[0]]:  # (a transposed case on Winograd)
        fn, x0, w0, b0, gy = _inputs(case, seed=2)
        with _route(route):
            for grad_set in _GRAD_SETS:
                _assert_identical(_run(True, fn, grad_set, x0, w0, b0, gy, "contiguous"),
                                  _run(False, fn, grad_set, x0, w0, b0, gy, "contiguous"))
            for grad_set in (_GRAD_SETS[0], _GRAD_SETS[2], _GRAD_SETS[6]):
                _assert_identical(_run(True, fn, grad_set, x0, w0, b0, gy, "channels_last", create_graph=True),
                                  _run(False, fn, grad_set, x0, w0, b0, gy, "channels_last", create_graph=True))


def test_auto_routes_match_python_route():
    """The 'auto' policies (no override): a GEMM-sized, a Winograd-sized and a oneDNN-sized call."""
    cases = [(False, (1, 256, 4, 4), (256, 256, 4, 4), 2, 1, 0),   # 4 output columns: GEMM
             (False, (3, 64, 32, 32), (64, 64, 4, 4), 2, 1, 0),    # 3 x 36 F(3, 2) tiles: Winograd
             (False, (2, 16, 16, 16), (16, 16, 4, 4), 2, 1, 0)]    # small weight, 2^19 MACs: oneDNN
    for case, route in zip(cases, ("gemm", "winograd", "onednn")):
        fn, x0, w0, b0, gy = _inputs(case, seed=3)
        assert cv.uses_gemm(x0, w0, (2, 2), (1, 1)) == (route == "gemm")
        assert cv.uses_winograd(x0, w0, (2, 2), (1, 1)) == (route == "winograd")
        _assert_identical(_run(True, fn, _GRAD_SETS[0], x0, w0, b0, gy, "contiguous"),
                          _run(False, fn, _GRAD_SETS[0], x0, w0, b0, gy, "contiguous"))


# ----------------------------------------------------------------------------- both entries
def _all_fns():
    """(name, fn, x0, w0, b0, gy, route-forcing context) for one call of each entry per custom route."""
    out = []
    fn, x0, w0, b0, gy = _inputs3(_CASES3[0], seed=4)
    out.append(("conv3x3", fn, x0, w0, b0, gy))
    for case in (_CASES[0], _CASES[2]):
        fn, x0, w0, b0, gy = _inputs(case, seed=4)
        out.append(("conv", fn, x0, w0, b0, gy))
    return out


@pytest.fixture
def custom_routes(monkeypatch):
    """conv3x3 on Winograd F(2x2, 3x3), conv on the GEMM form."""
    monkeypatch.setattr(cm, "MIN_CHANNELS", 0)
    monkeypatch.setattr(cm, "MIN_TILES", 0)
    monkeypatch.setenv("GANENGINE_WINOGRAD_TILE", "2")
    with cv.gemm_policy("always"):
        yield




@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
def test_gradcheck_and_gradgradcheck(custom_routes, one_thread):
    """fp32 (the custom routes are fp32 only): the functions are bilinear in (x, w) and linear in
    b, so central differences are exact up to rounding: |error| <= ~u |y| / eps per entry, u = 6e-8,
    |y| <= 10 here, eps = 1e-2: 1e-4; atol 2e-3 leaves 20x for the Winograd transforms' rounding."""
    tol = dict(eps=1e-2, atol=2e-3, rtol=1e-3, fast_mode=True)
    small = [(_fn3(1, "reflect"), (1, 2, 4, 3), (2, 2, 3, 3), 2), (_fn(False, 2, 1, 0), (1, 2, 5, 4), (2, 2, 4, 4), 2),
             (_fn(True, 2, 1, 1), (1, 2, 3, 2), (2, 3, 4, 4), 3)]
    for fn, xs, ws, nb in small:
        args = [t.requires_grad_() for t in _tensors(xs, ws, nb, seed=6)]
        with on_backend("cpu"):
            assert type(fn(*args).grad_fn).__name__ == "CppFunction"
            assert torch.autograd.gradcheck(fn, args, **tol)
            assert torch.autograd.gradgradcheck(fn, args, **tol)


def test_stride0_grad_without_grad_and_inference_mode(custom_routes):
    for _, fn, x0, w0, b0, _ in _all_fns():
        def run(lean):
            x, w, b = (t.detach().clone().requires_grad_() for t in (x0, w0, b0))
            with on_backend("cpu"), (contextlib.nullcontext() if lean else _python_route()):
                y = fn(x, w, b)
                y.sum().backward()  # a stride-0 gradient
            return y, x.grad, w.grad, b.grad

        _assert_identical(run(True), run(False))
        with on_backend("cpu"):
            ref = fn(x0, w0, b0)
            with torch.no_grad():
                a = fn(x0.detach().requires_grad_(), w0, b0)
            with torch.inference_mode():
                c = fn(x0, w0, b0)
        assert a.grad_fn is None and not a.requires_grad and torch.equal(a, ref)
        assert c.is_inference() and torch.equal(c, ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_non_fp32_takes_the_python_route(dtype):
    """The custom routes are fp32 only: the entry refuses other dtypes, and the Python route sends
    them to the torch backend as before."""
    fn, x0, w0, b0, gy = _inputs(_CASES[0], dtype, seed=5)
    got = _run(True, fn, _GRAD_SETS[0], x0, w0, b0, gy, "contiguous", strict=False)
    assert _dispatch.last_used["conv"] == "torch" and got[0].dtype == dtype
    _assert_identical(got, _run(False, fn, _GRAD_SETS[0], x0, w0, b0, gy, "contiguous", strict=False))


# ----------------------------------------------------------------------------- refusals and errors
@pytest.mark.parametrize("error", [RuntimeError("kernel failed"), NotImplementedError("kernel failed")])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("custom", [True, False], ids=["custom-route", "onednn-route"])
def test_error_in_served_call_propagates_once(error, requires_grad, custom, monkeypatch):
    if custom:
        monkeypatch.setattr(cm, "MIN_CHANNELS", 0)
        monkeypatch.setattr(cm, "MIN_TILES", 0)
    x = torch.randn(2, 3, 8, 8, requires_grad=requires_grad)
    calls = [(lambda: GF.conv3x3(x, torch.randn(4, 3, 3, 3), torch.randn(4), 1, "reflect"), "conv3x3"),
             (lambda: GF.conv2d(x, torch.randn(4, 3, 4, 4), torch.randn(4), 2, 1), "conv"),
             (lambda: GF.conv_transpose2d(x, torch.randn(3, 4, 4, 4), None, 2, 1), "conv")]
    for call, name in calls:
        with _route("gemm" if custom else "onednn"), on_backend("cpu"), \
                _Calls(_KERNELS[name] if custom else _ONEDNN, error) as mode:
            with pytest.raises(type(error), match="kernel failed"):
                call()
        assert mode.calls == 1, name  # the Python route did not run the kernel a second time


def test_error_in_served_backward_propagates_once(custom_routes):
    for name, fn, x0, w0, b0, _ in _all_fns():
        x = x0.detach().requires_grad_()
        with on_backend("cpu"):
            y = fn(x, w0, b0)
            with _Calls(_KERNELS[name + "_bwd"], RuntimeError("bwd failed")) as mode, \
                    pytest.raises(RuntimeError, match="bwd failed"):
                y.sum().backward()
        assert mode.calls == 1


def _refused_calls():
    x, w3, w4, b = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(4, 3, 4, 4), torch.randn(4)
    wt = torch.randn(3, 4, 4, 4)
    conv3 = [
        (torch.randn(3, 6, 6), w3, b, 1, False), (torch.randn(0, 3, 6, 6), w3, b, 1, False),
        (x.double(), w3.double(), b.double(), 1, False), (x.bfloat16(), w3.bfloat16(), b.bfloat16(), 1, False),
        (x, torch.randn(4, 3, 4, 4), b, 1, False), (x, torch.randn(4, 2, 3, 3), b, 1, False),
        (x, torch.randn(0, 3, 3, 3), None, 1, False), (x, w3.double(), b, 1, False), (x, w3.to("meta"), b, 1, False),
        (x, w3, torch.randn(5), 1, False), (x, w3, b.double(), 1, False), (x, w3, torch.randn(4, 1), 1, False),
        (x, w3, b, -1, False), (x, w3, b, 6, True), (torch.randn(1, 3, 1, 1), w3, b, 0, False),
    ]
    conv = [
        (torch.randn(3, 6, 6), w4, b, [2, 2], [1, 1], [0, 0], False), (x.double(), w4.double(), None, [2, 2], [1, 1],
                                                                         [0, 0], False),
        (x, torch.randn(4, 2, 4, 4), b, [2, 2], [1, 1], [0, 0], False), (x, w4, torch.randn(3), [2, 2], [1, 1],
                                                                          [0, 0], False),
        (x, w4, b, [0, 1], [1, 1], [0, 0], False), (x, w4, b, [2, 2], [-1, 1], [0, 0], False),
        (x, w4, b, [2, 2], [1, 1], [1, 0], False), (x, torch.randn(4, 3, 9, 9), b, [1, 1], [1, 1], [0, 0], False),
        (x, wt, None, [2, 2], [1, 1], [2, 0], True), (x, wt, None, [1, 1], [5, 5], [0, 0], True),
        (x, w4, b, [2, 2, 2], [1, 1], [0, 0], False), (x, wt, torch.randn(3), [2, 2], [1, 1], [0, 0], True),
    ]
    return [("conv3x3", "conv3x3: not served by the C++ entry", a) for a in conv3] + \
           [("conv", "conv: not served by the C++ entry", a) for a in conv]


def test_refusal_comes_before_any_work(custom_routes):
    names = _KERNELS["conv3x3"] + _KERNELS["conv"] + _ONEDNN + ("aten::reflection_pad2d",)
    for name, prefix, args in _refused_calls():
        op = _dispatch.lean_op(name, ())
        with _Calls(names) as mode, pytest.raises(NotImplementedError) as info:
            op(*args)
        assert _dispatch.refused(info.value, prefix, args[2], required=(args[1],)), str(info.value)
        assert mode.calls == 0
    x = torch.randn(1, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16), _Calls(names) as mode:
        with pytest.raises(NotImplementedError, match="autocast"):
            _dispatch.lean_op("conv3x3", ())(x, torch.randn(4, 3, 3, 3), None, 1, False)
        with pytest.raises(NotImplementedError, match="autocast"):
            _dispatch.lean_op("conv", ())(x, torch.randn(4, 3, 4, 4), None, [2, 2], [1, 1], [0, 0], False)
    assert mode.calls == 0


@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_refused_calls_give_the_public_errors(backend):
    x, w3, w4, wt = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(4, 3, 4, 4), torch.randn(3, 4, 4, 4)
    cases = [
        (ValueError, r"x must be \(N, C, H, W\)", lambda: GF.conv3x3(torch.randn(3, 6, 6), w3)),
        (ValueError, r"weight must be \(K, C, 3, 3\)", lambda: GF.conv3x3(x, w4)),
        (ValueError, "expects 2 input channels", lambda: GF.conv3x3(x, torch.randn(4, 2, 3, 3))),
        (TypeError, "they must match", lambda: GF.conv3x3(x, w3.double())),
        (ValueError, r"bias must be None or a \(4,\) tensor", lambda: GF.conv3x3(x, w3, [0.0] * 4)),
        (TypeError, "x and weight must be Tensors", lambda: GF.conv3x3(x, w3.tolist())),
        (ValueError, "padding_mode must be", lambda: GF.conv3x3(x, w3, None, 1, "circular")),
        (ValueError, "must be smaller than the input", lambda: GF.conv3x3(x, w3, None, 6, "reflect")),
        (ValueError, "padding must be >= 0", lambda: GF.conv3x3(x, w3, None, -1)),
        (ValueError, "smaller than the 3x3 kernel", lambda: GF.conv3x3(torch.randn(1, 3, 1, 1), w3, None, 0)),
        (ValueError, "weight is on meta", lambda: GF.conv2d(x, w4.to("meta"))),
        (ValueError, "0 output channels", lambda: GF.conv2d(x, torch.randn(0, 3, 4, 4))),
        (ValueError, r"bias must be None or a \(4,\) tensor", lambda: GF.conv2d(x, w4, torch.randn(3))),
        (TypeError, "stride must be an int or a pair of ints", lambda: GF.conv2d(x, w4, None, True)),
        (ValueError, "stride must be >= 1", lambda: GF.conv2d(x, w4, None, 0)),
        (ValueError, "smaller than the", lambda: GF.conv2d(x, torch.randn(4, 3, 9, 9))),
        (ValueError, "output_padding .* must be smaller than the stride", lambda: GF.conv_transpose2d(x, wt, None, 2, 1, 2)),
        (ValueError, "gives an empty output", lambda: GF.conv_transpose2d(x, wt, None, 1, 5)),
        (ValueError, r"expects 4 input channels", lambda: GF.conv_transpose2d(x, torch.randn(4, 3, 4, 4))),
    ]
    names = _KERNELS["conv3x3"] + _KERNELS["conv"] + _ONEDNN
    with ganengine.use_backend(backend) if backend != "auto" else contextlib.nullcontext():
        for error, match, call in cases:
            with _Calls(names) as mode, pytest.raises(error, match=match):
                call()
            assert mode.calls == 0, match


def test_refused_calls_served_by_the_python_route(custom_routes):
    """A padding given as a pair, and autocast (the conv in bf16 on the torch backend), go
    through the Python route: the eager route's node (the custom op's body, ops/_eager.py), the
    custom op's under a dispatch mode, or ATen's."""
    x, w, b = torch.randn(1, 3, 6, 6, requires_grad=True), torch.randn(4, 3, 3, 3), torch.randn(4)
    with on_backend("cpu"):
        y = GF.conv3x3(x, w, b, (1, 1))
        assert type(y.grad_fn).__name__ == "ganengine::conv3x3_fwdBackward"
        with _Calls(_KERNELS["conv3x3"]) as mode:
            y = GF.conv3x3(x, w, b, (1, 1))
    assert mode.calls == 1 and "conv3x3_fwd" in type(y.grad_fn).__name__
    with ganengine.use_backend("cpu"), torch.autocast("cpu", dtype=torch.bfloat16):
        y = GF.conv2d(x, torch.randn(4, 3, 4, 4), None, 2, 1)
    assert y.dtype == torch.bfloat16 and type(y.grad_fn).__name__ != "CppFunction"


def test_other_backends_do_not_take_the_lean_entry(custom_routes, monkeypatch):
    for value, served in (("torch", False), ("triton", False), ("cpu", True), ("auto", True), ("", True)):
        monkeypatch.setenv("GANENGINE_BACKEND", value)
        assert (_dispatch.lean_op("conv", ()) is not None) == served, value
    monkeypatch.delenv("GANENGINE_BACKEND")
    x = torch.randn(1, 3, 6, 6, requires_grad=True)
    with on_backend("torch"):
        y = GF.conv2d(x, torch.randn(4, 3, 4, 4), None, 2, 1)
        y3 = GF.conv3x3(x, torch.randn(4, 3, 3, 3))
    # the Python route (its eager twins), not the lean entries
    assert _dispatch.last_used["conv"] == "torch" and _dispatch.last_used["conv3x3"] == "torch"
    assert type(y.grad_fn).__name__ == "ganengine::conv_fwdBackward"
    assert type(y3.grad_fn).__name__ == "ganengine::conv3x3_fwdBackward"


@pytest.mark.parametrize("custom", [True, False], ids=["custom-route", "onednn-route"])
def test_fake_tensor_mode(custom, monkeypatch):
    """Under a FakeTensorMode the entries give the Python route's shapes and layouts, forward and
    backward (the custom routes' C++ autograd calls the kernels, which have fakes)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if custom:
        monkeypatch.setattr(cm, "MIN_CHANNELS", 0)
        monkeypatch.setattr(cm, "MIN_TILES", 0)
    with FakeTensorMode(), on_backend("cpu"), _route("gemm" if custom else "onednn"):
        x = torch.randn(2, 3, 9, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
        w3, w4 = torch.randn(5, 3, 3, 3, requires_grad=True), torch.randn(5, 3, 4, 4, requires_grad=True)
        wt, b = torch.randn(3, 5, 4, 4, requires_grad=True), torch.randn(5, requires_grad=True)
        outs = [GF.conv3x3(x, w3, b, 1, "reflect"), GF.conv2d(x, w4, b, 2, 1), GF.conv_transpose2d(x, wt, b, 2, 1, 1)]
        grads = [torch.autograd.grad(y, (x, w, b), torch.ones_like(y)) for y, w in zip(outs, (w3, w4, wt))]
        nodes = [type(y.grad_fn).__name__ for y in outs]
    assert [tuple(y.shape) for y in outs] == [(2, 5, 9, 7), (2, 5, 4, 3), (2, 5, 19, 15)]
    assert all(y.is_contiguous(memory_format=torch.channels_last) for y in outs)
    assert all(n == "CppFunction" for n in nodes) if custom else "CppFunction" not in nodes
    for (dx, dw, db), w in zip(grads, (w3, w4, wt)):
        assert dx.shape == x.shape and dw.shape == w.shape and db.shape == b.shape
        # (the oneDNN route's backward is ATen's autograd, its layouts ATen's meta functions')
        assert dx.is_contiguous(memory_format=torch.channels_last) or not custom


# ----------------------------------------------------------------------------- the Python fast entries
# (ganengine._C.conv3x3_entry / conv_entry / conv2d_act_entry, csrc/cpu/conv_py.cpp): a plain eager
# call reaches the same checks and bodies as the dispatcher ops without their own layer. They must
# give the dispatcher ops' numbers bit for bit on every route, decline (None) what the ops refuse
# before any work, and hand tensor subclasses and torch function modes to the dispatcher ops.
from ganengine.ops import conv_act as ca  # noqa: E402

_HAS_FAST = all(hasattr(_ext._C, n) for n in ("conv3x3_entry", "conv_entry", "conv2d_act_entry"))
needs_fast = pytest.mark.skipif(not _HAS_FAST, reason="ganengine._C built without the fast entries")


class _Spy:
    """Counts the calls of a dispatcher entry (stands in for its raw op in _dispatch._LEAN)."""

    def __init__(self, op):
        self.op, self.calls = op, 0

    def __call__(self, *args):
        self.calls += 1
        return self.op(*args)


@contextlib.contextmanager
def _dispatcher_only():
    """The lean route through the dispatcher ops only (the fast entries hand every call over)."""
    saved = cm._entry, cv._entry, ca._act_entry
    cm._entry = cv._entry = ca._act_entry = cc._to_dispatcher
    try:
        yield
    finally:
        cm._entry, cv._entry, ca._act_entry = saved


@contextlib.contextmanager
def _spies():
    """{name: _Spy} in place of the dispatcher entries, for the calls made inside."""
    names = ("conv3x3", "conv", "conv2d_act")
    ops = {n: _dispatch.lean_op(n, ()) for n in names}
    spies = {n: _Spy(op) for n, op in ops.items()}
    _dispatch._LEAN.update(spies)
    try:
        yield spies
    finally:
        _dispatch._LEAN.update(ops)


def _fn_act(x, w, b):
    return GF.conv2d_act(x, w, b, 2, 1, 0.2)


def _fast_vs_dispatcher(fn, x0, w0, b0, gy, layout, grad_sets, create_graph=False):
    for grad_set in grad_sets:
        with _spies() as spies:
            got = _run(True, fn, grad_set, x0, w0, b0, gy, layout, create_graph=create_graph)
        assert all(s.calls == 0 for s in spies.values())  # served by the fast entry
        with _dispatcher_only():
            ref = _run(True, fn, grad_set, x0, w0, b0, gy, layout, create_graph=create_graph)
        _assert_identical(got, ref)


@needs_fast
@pytest.mark.parametrize("route", ["onednn", "custom"])
def test_fast_entries_match_the_dispatcher_ops_bitwise(route, route3, one_thread):
    """Every entry on each kind of route (oneDNN: ATen's autograd; custom: the C++ autograd
    Function over Winograd 3x3 / the GEMM form / Winograd 4x4 / conv_act's kernels), forward,
    gradients for subsets of the inputs (the bias alone; the weight alone without a bias), and the
    double backward (create_graph=True: all three)."""
    route3("onednn" if route == "onednn" else "wino2")
    calls = [(*_inputs3(_CASES3[1], seed=8), "channels_last", None)]
    for case, conv_route in ((_CASES[0], "gemm"), (_CASES[2], "winograd")):
        calls.append((*_inputs(case, seed=8), "strided", conv_route if route == "custom" else "onednn"))
    x0, w0, b0 = _tensors((1, 3, 9, 8), (4, 3, 4, 4), 4, seed=8)
    calls.append((_fn_act, x0, w0, b0, _gy(_fn_act, x0, w0, b0, 8), "contiguous", None))
    for fn, x0, w0, b0, gy, layout, conv_route in calls:
        with _route(conv_route) if conv_route else contextlib.nullcontext():
            _fast_vs_dispatcher(fn, x0, w0, b0, gy, layout, (_GRAD_SETS[3], _GRAD_SETS[7]))
            _fast_vs_dispatcher(fn, x0, w0, b0, gy, "contiguous", (_GRAD_SETS[0],), create_graph=True)


@needs_fast
def test_fast_entries_decline_before_any_work(custom_routes):
    """What the dispatcher ops refuse, and arguments of other types than the Python route takes as
    they are (a bool or a float for an int, a pair given as 3 values, a tensor padding): None, and no
    kernel ran; the public function then raises its error or serves the call."""
    names = _KERNELS["conv3x3"] + _KERNELS["conv"] + _ONEDNN + ("aten::reflection_pad2d",)
    entries = {"conv3x3": _ext._C.conv3x3_entry, "conv": _ext._C.conv_entry}
    x, w3, w4, b = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(4, 3, 4, 4), torch.randn(4)
    calls = [("conv3x3", (*a[:4], "reflect" if a[4] else "zeros")) for n, _, a in _refused_calls() if n == "conv3x3"]
    calls += [(n, a) for n, _, a in _refused_calls() if n == "conv"]
    calls += [("conv3x3", (x, w3, b, True, "zeros")), ("conv3x3", (x, w3, b, 1.0, "zeros")),
              ("conv3x3", (x, w3, b, 1, "circular")), ("conv3x3", (x, w3, b, 1, None)),
              ("conv3x3", (x, w3, b, 1, "zeros\udc80")), ("conv3x3", (x, w3, b, 1, "zero")),
              ("conv3x3", (x, w3.tolist(), b, 1, "zeros")), ("conv3x3", (x, w3, [0.0] * 4, 1, "zeros")),
              ("conv3x3", (x.numpy(), w3, b, 1, "zeros")), ("conv3x3", (x, w3, b, 1 << 70, "zeros")),
              ("conv", (x, w4, b, True, 1, 0, False)), ("conv", (x, w4, b, (2, 2, 2), 1, 0, False)),
              ("conv", (x, w4, b, 2, torch.tensor(1), 0, False)), ("conv", (x, w4, b, 2, [1, 1.0], 0, False)),
              ("conv", (x, w4, b, 2, 1, 0, 1)), ("conv", (x, w4, b, 2, 1, 0, None))]
    act = _ext._C.conv2d_act_entry
    act_calls = [(x, w4, b, 2, 1, -0.2), (x, w4, b, 2, 1, "0.2"), (x, w4, b, 2, 1, True), (x, w4, b, 2, 1, 1 << 1100),
                 (x.half(), w4, b, 2, 1, 0.2), (x, w4, b, (2,), 1, 0.2), (x[:, :2], w4, b, 2, 1, 0.2)]
    for name, args in calls:
        with _Calls(names) as mode:
            assert entries[name](*args) is None, (name, args[3:])
        assert mode.calls == 0
    for args in act_calls:
        with _Calls(("ganengine_C::conv_act_fwd",) + _ONEDNN) as mode:
            assert act(*args) is None, args[3:]
        assert mode.calls == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert entries["conv3x3"](x, w3, b, 1, "zeros") is None and act(x, w4, b, 2, 1, 0.2) is None
    with pytest.raises(TypeError, match="takes 5 or 6 arguments"):
        entries["conv3x3"](x, w3, b, 1)
    # served where the dispatcher op serves: an int slope, a list pair
    assert torch.equal(act(x, w4, b, [2, 2], (1, 1), 0), _dispatch.lean_op("conv2d_act", ())(x, w4, b, 2, 1, 0.0))


class _Tagged(torch.Tensor):
    """A tensor subclass whose __torch_function__ records the functions it sees."""
    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


@needs_fast
def test_subclasses_and_torch_function_modes_go_to_the_dispatcher_op():
    """A Tensor subclass (it may override __torch_function__) or a torch function mode: the fast
    entry hands the call over (NotImplemented) and the dispatcher op serves it, as before; a
    Parameter is served by the fast entry."""
    from torch.overrides import TorchFunctionMode

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    x, w3, w4, b = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(4, 3, 4, 4), torch.randn(4)
    assert _ext._C.conv3x3_entry(x.as_subclass(_Tagged), w3, b, 1, "zeros") is NotImplemented
    assert _ext._C.conv_entry(x, w4, b.as_subclass(_Tagged), 2, 1, 0, False) is NotImplemented
    calls = [(lambda a, c: GF.conv3x3(a, w3, c, 1, "reflect"), "conv3x3"),
             (lambda a, c: GF.conv2d(a, w4, c, 2, 1), "conv"),
             (lambda a, c: GF.conv_transpose2d(a, w4.transpose(0, 1).contiguous(), c, 2, 1), "conv"),
             (lambda a, c: GF.conv2d_act(a, w4, c, 2, 1, 0.2), "conv2d_act")]
    with on_backend("cpu"):
        for call, name in calls:
            ref = call(x, b)
            with _spies() as spies:
                y = call(x.as_subclass(_Tagged), b)
                assert spies[name].calls == 1 and torch.equal(y.as_subclass(torch.Tensor), ref)
                with Mode():
                    y = call(x, b)
                assert spies[name].calls == 2 and torch.equal(y, ref)
                y = call(x, torch.nn.Parameter(b))
                assert spies[name].calls == 2 and torch.equal(y, ref)
