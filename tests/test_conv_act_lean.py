"""The lean C++ entry of conv2d_act on CPU tensors (ganengine_C::conv2d_act, autograd in C++).

It runs the custom op's cpu kernels (conv_act_fwd / conv_act_bwd), so its numbers must equal the
custom-op route's bit for bit: forward, each gradient for every subset of inputs requiring grad,
and the double backward (both differentiate the torch composition). A call it refuses goes to
the Python route and gets the public errors, without the kernel having run; an error inside a
call it serves propagates, raised once."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import ganengine
import ganengine.functional as GF
from ganengine.ops import _dispatch
from ganengine.ops import conv_act as ops
from tests._backends import CudaEntryResolver, on_backend
from tests._train_utils import one_thread  # noqa: F401 (fixture)

_HAS_ENTRY = ops._ext.loaded() and ops._ext.has_kernel("conv2d_act", "CompositeExplicitAutograd")
pytestmark = pytest.mark.skipif(not _HAS_ENTRY, reason="ganengine._C without the conv2d_act entry")


class _KernelCalls(TorchDispatchMode):
    """Counts calls of the fused kernel ``name`` ("fwd" / "bwd"), reached by either route: the lean
    op calls ganengine_C::conv_act_<name> through the dispatcher, the Python route the custom op
    ganengine::conv2d_act_<name> (which the mode sees instead of the kernel inside it), and raises
    ``error`` from it when given."""

    def __init__(self, name: str, error: Exception | None = None):
        super().__init__()
        self.names = (f"ganengine_C::conv_act_{name}", f"ganengine::conv2d_act_{name}")
        self.error, self.calls = error, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.names:
            self.calls += 1
            if self.error is not None:
                raise self.error
        return func(*args, **(kwargs or {}))


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a non-dense view
        return torch.cat([t, t], dim=3)[..., ::2]
    return t


# (x shape, weight shape, stride, padding): odd sizes, a single output pixel, 1x1, unequal stride
_CASES = [
    ((2, 3, 9, 7), (5, 3, 4, 4), 2, 1),
    ((1, 4, 4, 4), (3, 4, 4, 4), (1, 1), (0, 0)),  # one output pixel
    ((3, 2, 5, 6), (4, 2, 3, 3), (1, 2), (1, 0)),
    ((2, 5, 1, 1), (3, 5, 1, 1), 1, 0),  # a single input pixel, 1x1 kernel
]

# which of (x, weight, bias) require grad; "-b": no bias
_GRAD_SETS = [("x", "w", "b"), ("x",), ("w",), ("b",), ("x", "b"), ("w", "b"), ("x", "w", "-b"), ("w", "-b")]


def _leaves(grad_set, x0, w0, b0, layout):
    x = _layout(x0.detach().clone(), layout).requires_grad_("x" in grad_set)  # (strided: the view is the leaf)
    w = w0.detach().clone().requires_grad_("w" in grad_set)
    b = None if "-b" in grad_set else b0.detach().clone().requires_grad_("b" in grad_set)
    return x, w, b


def _run(lean, grad_set, x0, w0, b0, gy, stride, padding, layout, slope=0.2, create_graph=False):
    """(y, y's layout, first-order grads[, second-order grads]) by the lean entry or the custom op."""
    x, w, b = _leaves(grad_set, x0, w0, b0, layout)
    with on_backend("cpu"):
        if lean:
            _dispatch.last_used.pop("conv2d_act", None)
            y = GF.conv2d_act(x, w, b, stride, padding, slope)
            assert _dispatch.last_used["conv2d_act"] == "cpu"
            assert type(y.grad_fn).__name__ == "CppFunction"  # not the custom op's node
        else:
            y = ops.conv2d_act_fwd(x, w, b, ops._pair("s", stride, 1), ops._pair("p", padding, 0), slope)
        leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
        g1 = torch.autograd.grad(y, leaves, gy, create_graph=create_graph)
        out = [y, y.is_contiguous(), y.is_contiguous(memory_format=torch.channels_last), *g1]
        if create_graph:
            loss = sum((g * g).sum() for g in g1)
            if loss.requires_grad:  # (bias alone: its gradient does not depend on any leaf)
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


def _inputs(case, dtype, seed=0):
    xs, ws, stride, padding = case
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(xs, generator=g, dtype=torch.float64).to(dtype)
    w0 = (torch.randn(ws, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    b0 = torch.randn(ws[0], generator=g, dtype=torch.float64).to(dtype)
    y_shape = ops._out_shape(x0, w0, ops._pair("s", stride, 1), ops._pair("p", padding, 0))
    gy = torch.randn(y_shape, generator=g, dtype=torch.float64).to(dtype)
    return x0, w0, b0, gy, stride, padding


@pytest.mark.parametrize("case", _CASES, ids=lambda c: "x".join(map(str, c[0])))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_lean_matches_custom_op_bitwise(case, layout, dtype):
    x0, w0, b0, gy, stride, padding = _inputs(case, dtype)
    for grad_set in (_GRAD_SETS[0], _GRAD_SETS[6]):  # with and without bias
        _assert_identical(_run(True, grad_set, x0, w0, b0, gy, stride, padding, layout),
                          _run(False, grad_set, x0, w0, b0, gy, stride, padding, layout))


@pytest.mark.parametrize("grad_set", _GRAD_SETS, ids=lambda s: "+".join(s))
def test_lean_gradients_per_input_match_custom_op(grad_set):
    """needs_input_grad subsets: each present input gets exactly its gradient (edge 2 = bias)."""
    x0, w0, b0, gy, stride, padding = _inputs(_CASES[0], torch.float32, seed=1)
    for layout in ("contiguous", "channels_last"):
        _assert_identical(_run(True, grad_set, x0, w0, b0, gy, stride, padding, layout),
                          _run(False, grad_set, x0, w0, b0, gy, stride, padding, layout))


@pytest.mark.parametrize("grad_set", [("x", "w", "b"), ("x",), ("w", "b"), ("x", "w", "-b")],
                         ids=lambda s: "+".join(s))
def test_lean_double_backward_matches_custom_op(grad_set):
    """create_graph=True: both differentiate leaky_relu(conv2d(...)), so the same bits."""
    x0, w0, b0, gy, stride, padding = _inputs(_CASES[2], torch.float64, seed=2)
    for layout in ("contiguous", "channels_last"):
        _assert_identical(_run(True, grad_set, x0, w0, b0, gy, stride, padding, layout, create_graph=True),
                          _run(False, grad_set, x0, w0, b0, gy, stride, padding, layout, create_graph=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_lean_reduced_precision_matches_custom_op(dtype):
    x0, w0, b0, gy, stride, padding = _inputs(_CASES[0], dtype, seed=3)
    _assert_identical(_run(True, _GRAD_SETS[0], x0, w0, b0, gy, stride, padding, "channels_last"),
                      _run(False, _GRAD_SETS[0], x0, w0, b0, gy, stride, padding, "channels_last"))


@pytest.mark.parametrize("slope", [0.0, 1.0, 0.2], ids=["relu", "identity", "leaky"])
def test_lean_stride0_grad_and_slopes(slope):
    """.sum().backward() hands a stride-0 gradient to the fused backward; slope 0 and 1 too."""
    x0, w0, b0, _, stride, padding = _inputs(_CASES[0], torch.float32, seed=4)

    def run(lean):
        x, w, b = _leaves(("x", "w", "b"), x0, w0, b0, "contiguous")
        with on_backend("cpu"):
            y = (GF.conv2d_act(x, w, b, stride, padding, slope) if lean
                 else ops.conv2d_act_fwd(x, w, b, [2, 2], [1, 1], slope))
            y.sum().backward()
        return y, x.grad, w.grad, b.grad

    _assert_identical(run(True), run(False))


def test_lean_without_grad_and_inference_mode():
    x0, w0, b0, _, stride, padding = _inputs(_CASES[0], torch.float32, seed=5)
    with on_backend("cpu"):
        ref = ops.conv2d_act_fwd(x0, w0, b0, [2, 2], [1, 1], 0.2)
        with torch.no_grad():
            a = GF.conv2d_act(x0.requires_grad_(), w0, b0, stride, padding)
        with torch.inference_mode():
            c = GF.conv2d_act(x0.detach(), w0, b0, stride, padding)
    assert a.grad_fn is None and not a.requires_grad and torch.equal(a, ref)
    assert c.is_inference() and torch.equal(c, ref)




def test_lean_gradcheck_and_gradgradcheck(one_thread):
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(3, 2, 3, 3, dtype=torch.float64) * 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with on_backend("cpu"):
        for f, args in ((lambda x, w, b: GF.conv2d_act(x, w, b, 2, 1), (x, w, b)),
                        (lambda x, w: GF.conv2d_act(x.contiguous(memory_format=torch.channels_last), w, None, 1, 0),
                         (x, w))):
            y = f(*args)
            assert type(y.grad_fn).__name__ == "CppFunction"
            assert torch.autograd.gradcheck(f, args)
            assert torch.autograd.gradgradcheck(f, args)


# ----------------------------------------------------------------------------- refusals and errors
@pytest.mark.parametrize("error", [RuntimeError("kernel failed"), NotImplementedError("kernel failed")])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_error_in_served_call_propagates_once(error, requires_grad):
    x = torch.randn(2, 3, 8, 8, requires_grad=requires_grad)
    with on_backend("cpu"), _KernelCalls("fwd", error) as mode:
        with pytest.raises(type(error), match="kernel failed"):
            GF.conv2d_act(x, torch.randn(4, 3, 4, 4), torch.randn(4), 2, 1)
    assert mode.calls == 1  # the Python route did not run the kernel a second time


def test_error_in_served_backward_propagates_once():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with on_backend("cpu"):
        y = GF.conv2d_act(x, torch.randn(4, 3, 4, 4), None, 2, 1)
        with _KernelCalls("bwd", RuntimeError("bwd failed")) as mode, pytest.raises(RuntimeError,
                                                                                          match="bwd failed"):
            y.sum().backward()
    assert mode.calls == 1


def test_refusal_comes_before_any_work():
    op = _dispatch.lean_op("conv2d_act", ops._ACT_KERNELS)
    assert op is not None
    x, w, b = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 4, 4), torch.randn(4)
    refused = [
        (torch.randn(3, 6, 6), w, b, 2, 1, 0.2), (torch.randn(0, 3, 6, 6), w, b, 2, 1, 0.2),
        (torch.ones(1, 3, 6, 6, dtype=torch.int64), w.long(), b.long(), 2, 1, 0.2),
        (x, torch.randn(4, 3, 4), b, 2, 1, 0.2), (x, torch.randn(4, 2, 4, 4), b, 2, 1, 0.2),
        (x, torch.randn(0, 3, 4, 4), None, 2, 1, 0.2), (x, w.double(), b, 2, 1, 0.2),
        (x, w.to("meta"), b, 2, 1, 0.2), (x, w, torch.randn(5), 2, 1, 0.2), (x, w, b.double(), 2, 1, 0.2),
        (x, w, torch.randn(4, 1), 2, 1, 0.2), (x, w, b.to("meta"), 2, 1, 0.2),
        (x, w, b, 0, 1, 0.2), (x, w, b, 2, -1, 0.2), (x, w, b, [2, 2, 2], 1, 0.2), (x, w, b, [2], 1, 0.2),
        (x, torch.randn(4, 3, 9, 9), b, 1, 1, 0.2),  # kernel larger than the padded input
        (x, w, b, 2, 1, -0.1), (x, w, b, 2, 1, float("nan")),
    ]
    for args in refused:
        with _KernelCalls("fwd") as mode, pytest.raises(NotImplementedError) as info:
            op(*args)
        assert _dispatch.refused(info.value, ops._REFUSAL, args[2], required=(args[1],)), str(info.value)
        assert mode.calls == 0
    with torch.autocast("cpu", dtype=torch.bfloat16), _KernelCalls("fwd") as mode:
        with pytest.raises(NotImplementedError, match="autocast"):
            op(x, w, b, 2, 1, 0.2)
    assert mode.calls == 0


@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_refused_calls_give_the_public_errors(backend):
    x, w = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 4, 4)
    cases = [
        (ValueError, r"x must be \(N, C, H, W\)", dict(x=torch.randn(3, 6, 6), weight=w)),
        (ValueError, "weight must be", dict(x=x, weight=torch.randn(4, 3, 4))),
        (ValueError, "0 output channels", dict(x=x, weight=torch.randn(0, 3, 4, 4))),
        (ValueError, "expects 2 input channels", dict(x=x, weight=torch.randn(4, 2, 4, 4))),
        (TypeError, "fp16, bf16, fp32 or fp64", dict(x=x.long(), weight=w.long())),
        (TypeError, "they must match", dict(x=x, weight=w.double())),
        (ValueError, "weight is on meta", dict(x=x, weight=w.to("meta"))),
        (ValueError, r"bias must be None or a \(4,\) tensor", dict(x=x, weight=w, bias=torch.randn(5))),
        (ValueError, r"bias must be None or a \(4,\) tensor", dict(x=x, weight=w, bias=[0.0] * 4)),
        (TypeError, "x and weight must be Tensors", dict(x=x, weight=w.tolist())),
        (TypeError, "stride must be an int or a pair of ints", dict(x=x, weight=w, stride=True)),
        (TypeError, "stride must be an int or a pair of ints", dict(x=x, weight=w, stride=(True, 1))),
        (TypeError, "stride must be an int or a pair of ints", dict(x=x, weight=w, stride=1.5)),
        (TypeError, "padding must be an int or a pair of ints", dict(x=x, weight=w, padding=(1, 1, 1))),
        (ValueError, "stride must be >= 1", dict(x=x, weight=w, stride=0)),
        (ValueError, "padding must be >= 0", dict(x=x, weight=w, padding=(0, -1))),
        (ValueError, "could not convert", dict(x=x, weight=w, negative_slope="0.2x")),
        (ValueError, "only one element tensors", dict(x=x, weight=w, negative_slope=torch.ones(2))),
    ]
    with on_backend(backend) if backend != "auto" else contextlib.nullcontext():
        for error, match, kwargs in cases:
            with _KernelCalls("fwd") as mode, pytest.raises(error, match=match):
                GF.conv2d_act(**kwargs)
            assert mode.calls == 0, match


def test_refused_calls_served_by_the_python_route():
    """A negative slope runs the torch composition; autocast the conv in bf16 (the custom op);
    a slope given as a bool or a 0-d tensor goes through float() as before: a plain eager call
    through the eager route (the custom op's body, ops/_eager.py), under a dispatch mode the
    custom op."""
    x, w, b = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 4, 4), torch.randn(4)
    with on_backend("cpu"):
        for slope in (True, torch.tensor(0.5)):
            y = GF.conv2d_act(x.detach().requires_grad_(), w, b, 2, 1, slope)
            assert type(y.grad_fn).__name__ == "ganengine::conv2d_act_fwdBackward"  # the eager route's node
            with _KernelCalls("fwd") as mode:
                y = GF.conv2d_act(x.detach().requires_grad_(), w, b, 2, 1, slope)
            assert mode.calls == 1 and "conv2d_act_fwd" in type(y.grad_fn).__name__  # the custom op's node
            assert torch.equal(y, ops.conv2d_act_fwd(x, w, b, [2, 2], [1, 1], float(slope)))
        with _KernelCalls("fwd") as mode:
            y = GF.conv2d_act(x.requires_grad_(), w, b, 2, 1, -0.1)
        assert mode.calls == 0 and type(y.grad_fn).__name__ == "LeakyReluBackward0"
        assert torch.equal(y, F.leaky_relu(F.conv2d(x, w, b, 2, 1), -0.1))
        with torch.autocast("cpu", dtype=torch.bfloat16), _KernelCalls("fwd") as mode:
            y = GF.conv2d_act(x, w, b, 2, 1)
        assert mode.calls == 1 and y.dtype == torch.bfloat16
        assert torch.equal(y, ops.conv2d_act_fwd(x.bfloat16(), w.bfloat16(), b.bfloat16(), [2, 2], [1, 1], 0.2))


def test_cuda_entry_is_taken_where_the_cuda_backend_is_chosen(monkeypatch):
    """On CUDA tensors conv2d_act's dispatcher entry is taken exactly where the requested backend
    would run the cuda backend's kernels: 'cuda', or 'auto' (cuda first for conv2d_act); not for
    'triton'/'cpu'/'torch', and never without the CUDA kernels or where cuda does not serve."""
    resolver = CudaEntryResolver(monkeypatch)
    entry = ops._ext.op("conv2d_act").default._op

    def resolve(backend):
        return resolver(backend, "conv2d_act", "conv2d_act", ops._ACT_KERNELS)

    assert resolve("auto") is entry and resolve("cuda") is entry
    assert all(resolve(b) is None for b in ("triton", "cpu", "torch"))
    resolver.serving["cuda"] = False  # auto: Triton next
    assert resolve("auto") is None and resolve("cuda") is None
    resolver.serving["cuda"], resolver.cuda_kernels = True, False  # a build without the CUDA kernels
    assert resolve("auto") is None and resolve("cuda") is None


def test_in_cuda_entry_and_variant(monkeypatch):
    """conv2d_instance_norm_act on CUDA: its entry is taken where the cuda backend is chosen, with
    the instance norm's order on the conv output's planes: NCHW and NHWC planes of at most 4096
    elements cuda first, larger NHWC planes Triton first."""
    v = ops._in_variant
    w4 = torch.empty(8, 3, 4, 4)
    assert v(torch.empty(1, 3, 130, 130), w4, 2, 1) is None  # NCHW
    nhwc = dict(memory_format=torch.channels_last)
    assert v(torch.empty(1, 3, 128, 128).contiguous(**nhwc), w4, 2, 1) == "channels_last_small"  # 64x64 out
    assert v(torch.empty(1, 3, 130, 130).contiguous(**nhwc), w4, 2, 1) == "channels_last"  # 65x65 out
    assert v(torch.empty(1, 3, 34, 34).contiguous(**nhwc), w4, (1, 1), [1, 1]) == "channels_last_small"
    assert v(torch.empty(1, 3, 34, 34).contiguous(**nhwc), None, 1, 1) is None  # bad input: the route's errors
    assert v(torch.empty(1, 3, 34, 34).contiguous(**nhwc), w4, 0, 1) is None
    resolver = CudaEntryResolver(monkeypatch)
    entry = ops._ext.op("conv2d_in_act").default._op

    def resolve(backend, variant=None):
        return resolver(backend, "conv2d_in_act", "conv2d_instance_norm_act", ops._IN_KERNELS, variant)

    assert resolve("auto") is entry and resolve("auto", "channels_last_small") is entry
    assert resolve("auto", "channels_last") is None and resolve("cuda", "channels_last") is entry
    assert all(resolve(b) is None for b in ("triton", "cpu", "torch"))
    meta = torch.empty(1, 3, 8, 8, device="meta")
    with pytest.raises(NotImplementedError, match=r"conv2d_instance_norm_act: not served by the C\+\+ entry \(x\)"):
        entry(meta, torch.empty(4, 3, 4, 4, device="meta"), None, None, None, [2, 2], [1, 1], 1e-5, 0.2)


def test_devices_the_entries_serve():
    """The dispatcher entry serves CPU tensors, and CUDA ones only with the CUDA kernels built, every
    tensor on x's device; the Python fast entry serves CPU tensors (``routes`` bit 1, the default)
    and CUDA ones (bit 8) as its caller allows. Anything else is refused before any work (here: a
    meta x, which no backend's kernels run)."""
    op = _dispatch.lean_op("conv2d_act", ops._ACT_KERNELS)
    xm, wm, bm = torch.randn(1, 3, 6, 6, device="meta"), torch.randn(4, 3, 4, 4, device="meta"), None
    with _KernelCalls("fwd") as mode, pytest.raises(NotImplementedError, match=r"not served by the C\+\+ entry \(x\)"):
        op(xm, wm, bm, 2, 1, 0.2)
    assert mode.calls == 0
    assert ops._act_entry(xm, wm, bm, 2, 1, 0.2) is None  # the fast entry declines (None: the route decides)
    assert ops._act_dispatcher_entry(xm, wm, bm, 2, 1, 0.2) is None  # neither CPU nor CUDA: no entry asked
    cpu, cuda = ops.ACT_ROUTE_CPU, ops.ACT_ROUTE_CUDA
    assert all(ops._act_entry(xm, wm, bm, 2, 1, 0.2, r) is None for r in (cpu, cuda, cpu | cuda))
    x, w = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 4, 4)
    want = op(x, w, None, 2, 1, 0.2)
    assert ops._act_entry(x, w, None, 2, 1, 0.2, cuda) is None  # CPU tensors need bit 1
    assert ops._act_entry(x, w, None, 2, 1, 0.2, 0) is None
    for r in (cpu, cpu | cuda):
        assert torch.equal(ops._act_entry(x, w, None, 2, 1, 0.2, r), want)
    with pytest.raises(TypeError, match="routes must be an int"):
        ops._act_entry(x, w, None, 2, 1, 0.2, "cpu")
    with pytest.raises(TypeError, match="takes 6 or 7 arguments, got 8"):
        ops._act_entry(x, w, None, 2, 1, 0.2, cpu, cpu)
    if torch.cuda.is_available() and ops._ext.has_kernel("conv_act_fwd", "CUDA"):
        xc, wc = x.cuda(), w.cuda()
        assert ops._act_entry(xc, wc, None, 2, 1, 0.2) is None  # the default: CPU tensors only
        assert ops._act_entry(xc, wc.cpu(), None, 2, 1, 0.2, cuda) is None  # every tensor on x's device
        with pytest.raises(NotImplementedError, match="weight"):
            op(xc, wc.cpu(), None, 2, 1, 0.2)
        y = op(xc, wc, None, 2, 1, 0.2)
        assert y.is_cuda and torch.equal(ops._act_entry(xc, wc, None, 2, 1, 0.2, cuda), y)


def test_cuda_calls_take_the_fast_entry(monkeypatch):
    """On CUDA tensors, where the cuda backend is chosen, GF.conv2d_act runs the fast entry with its
    CUDA bit (one C++ call), and the dispatcher op only for what the fast entry hands over (a
    tensor subclass, a torch function mode) or declines. (Played on CPU tensors: the CUDA bit
    stands in by the CPU one, and the call is routed as a CUDA call.)"""
    entry = ops._ext.op("conv2d_act").default._op
    monkeypatch.setattr(ops, "ACT_ROUTE_CUDA", ops.ACT_ROUTE_CPU)
    monkeypatch.setattr(_dispatch, "cuda_entry", lambda name, op, kernels=(), variant=None: entry)
    calls = []
    fast, disp = ops._act_entry, ops._act_dispatcher_entry
    monkeypatch.setattr(ops, "_act_entry", lambda *a: calls.append(("fast", a[6:])) or fast(*a))
    monkeypatch.setattr(ops, "_act_dispatcher_entry", lambda *a: calls.append(("dispatcher",)) or disp(*a))
    x, w = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 4, 4)
    assert torch.equal(ops._act_cuda_entry(x, w, None, 2, 1, 0.2), entry(x, w, None, [2, 2], [1, 1], 0.2))
    assert calls == [("fast", (ops.ACT_ROUTE_CPU,))]
    calls.clear()
    monkeypatch.setattr(ops, "_act_entry", lambda *a: calls.append(("fast",)) or NotImplemented)
    assert torch.equal(ops._act_cuda_entry(x, w, None, 2, 1, 0.2), entry(x, w, None, [2, 2], [1, 1], 0.2))
    assert calls == [("fast",), ("dispatcher",)]
    monkeypatch.setattr(_dispatch, "cuda_entry", lambda *a, **k: None)  # another backend chosen
    calls.clear()
    assert ops._act_cuda_entry(x, w, None, 2, 1, 0.2) is None and calls == []

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_other_backends_do_not_take_the_lean_entry(backend):
    if not ganengine.backends.available()[backend]:
        pytest.skip(f"backend {backend} unavailable")
    x, w = torch.randn(1, 3, 6, 6, requires_grad=True), torch.randn(4, 3, 4, 4)
    with on_backend(backend):
        y = GF.conv2d_act(x, w, None, 2, 1)
    # the Python route ran (its eager twin, and in it the chosen backend), not the lean op
    assert _dispatch.last_used["conv2d_act"] == backend
    assert type(y.grad_fn).__name__ == "ganengine::conv2d_act_fwdBackward"


def test_fake_tensor_mode():
    """Under a FakeTensorMode the lean entry (its C++ autograd calls the raw kernels) gives the
    custom op's shapes and layouts, forward and backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), on_backend("cpu"):
        x = torch.randn(2, 3, 9, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
        w, b = torch.randn(5, 3, 4, 4, requires_grad=True), torch.randn(5, requires_grad=True)
        y = GF.conv2d_act(x, w, b, 2, 1)
        assert type(y.grad_fn).__name__ == "CppFunction"
        dx, dw, db = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
        with torch.inference_mode():
            yi = GF.conv2d_act(x.detach(), w.detach(), None, 2, 1)
    assert y.shape == yi.shape == (2, 5, 4, 3) and y.is_contiguous(memory_format=torch.channels_last)
    assert dx.shape == x.shape and dx.is_contiguous(memory_format=torch.channels_last)
    assert dw.shape == w.shape and db.shape == b.shape


# ============================================================================= conv2d_instance_norm_act
# ganengine_C::conv2d_in_act: the same checks for the instance-norm family (kernels conv_in_act_fwd /
# conv_in_act_bwd; five tensor arguments x, weight, bias?, norm_weight?, norm_bias?).
_HAS_IN_ENTRY = _HAS_ENTRY and ops._ext.has_kernel("conv2d_in_act", "CompositeExplicitAutograd")
_needs_in = pytest.mark.skipif(not _HAS_IN_ENTRY, reason="ganengine._C without the conv2d_in_act entry")


class _InKernelCalls(_KernelCalls):
    def __init__(self, name: str, error: Exception | None = None):
        super().__init__(name, error)
        self.names = (f"ganengine_C::conv_in_act_{name}", f"ganengine::conv2d_in_act_{name}")


# which of (x, weight, bias, norm_weight, norm_bias) require grad; "-b" / "-g" / "-t": that one absent
_IN_GRAD_SETS = [("x", "w", "b", "g", "t"), ("x",), ("w",), ("b",), ("g",), ("t",), ("g", "t"), ("x", "g"),
                 ("x", "w", "-b", "-g", "-t"), ("x", "w", "g", "-t"), ("w", "t", "-g"), ("b", "-g", "-t")]


def _in_inputs(case, dtype, seed=0):
    x0, w0, b0, gy, stride, padding = _inputs(case, dtype, seed)
    g = torch.Generator().manual_seed(seed + 100)
    g0 = (1 + 0.5 * torch.randn(w0.shape[0], generator=g, dtype=torch.float64)).to(dtype)
    t0 = (0.5 * torch.randn(w0.shape[0], generator=g, dtype=torch.float64)).to(dtype)
    return x0, w0, b0, g0, t0, gy, stride, padding


def _in_leaves(grad_set, x0, w0, b0, g0, t0, layout):
    x, w, b = _leaves(tuple(s for s in grad_set if s not in ("g", "t", "-g", "-t")), x0, w0, b0, layout)
    g = None if "-g" in grad_set else g0.detach().clone().requires_grad_("g" in grad_set)
    t = None if "-t" in grad_set else t0.detach().clone().requires_grad_("t" in grad_set)
    return x, w, b, g, t


def _in_run(lean, grad_set, inputs, layout, slope=0.2, eps=1e-5, create_graph=False, activation="leaky_relu"):
    x0, w0, b0, g0, t0, gy, stride, padding = inputs
    x, w, b, g, t = _in_leaves(grad_set, x0, w0, b0, g0, t0, layout)
    with on_backend("cpu"):
        if lean:
            _dispatch.last_used.pop("conv2d_instance_norm_act", None)
            y = GF.conv2d_instance_norm_act(x, w, b, stride, padding, g, t, eps, activation, slope)
            assert _dispatch.last_used["conv2d_instance_norm_act"] == "cpu"
            assert type(y.grad_fn).__name__ == "CppFunction"  # not the custom op's node
        else:
            y = ops.conv2d_in_act_fwd(x, w, b, g, t, ops._pair("s", stride, 1), ops._pair("p", padding, 0),
                                      eps, slope)[0]
        leaves = [v for v in (x, w, b, g, t) if v is not None and v.requires_grad]
        g1 = torch.autograd.grad(y, leaves, gy, create_graph=create_graph)
        out = [y, y.is_contiguous(), y.is_contiguous(memory_format=torch.channels_last), *g1]
        if create_graph:
            loss = sum((d * d).sum() for d in g1 if d.requires_grad)
            if isinstance(loss, torch.Tensor):
                out += [torch.zeros(()) if d is None else d
                        for d in torch.autograd.grad(loss, leaves, allow_unused=True)]
    return out


@_needs_in
@pytest.mark.parametrize("case", _CASES[:3], ids=lambda c: "x".join(map(str, c[0])))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_in_lean_matches_custom_op_bitwise(case, layout, dtype):
    inputs = _in_inputs(case, dtype)
    for grad_set in (_IN_GRAD_SETS[0], _IN_GRAD_SETS[8]):  # with all of bias, gamma, beta and none
        _assert_identical(_in_run(True, grad_set, inputs, layout), _in_run(False, grad_set, inputs, layout))


@_needs_in
@pytest.mark.parametrize("grad_set", _IN_GRAD_SETS, ids=lambda s: "+".join(s))
def test_in_lean_gradients_per_input_match_custom_op(grad_set):
    """needs_input_grad subsets: each present input gets exactly its gradient (edges shift with
    the absent optionals); the conv bias's gradient is exactly zero on both routes."""
    inputs = _in_inputs(_CASES[0], torch.float32, seed=1)
    for layout in ("contiguous", "channels_last"):
        _assert_identical(_in_run(True, grad_set, inputs, layout), _in_run(False, grad_set, inputs, layout))


@_needs_in
@pytest.mark.parametrize("grad_set", [("x", "w", "b", "g", "t"), ("x",), ("w", "g"), ("x", "w", "-b", "-g", "-t")],
                         ids=lambda s: "+".join(s))
def test_in_lean_double_backward_matches_custom_op(grad_set):
    """create_graph=True: both differentiate reference_conv2d_in_act's composition (the C++ one
    written with the same ATen ops in the same order), so the same bits."""
    for dtype in (torch.float64, torch.float32):
        inputs = _in_inputs(_CASES[2], dtype, seed=2)
        for layout in ("contiguous", "channels_last"):
            _assert_identical(_in_run(True, grad_set, inputs, layout, create_graph=True),
                              _in_run(False, grad_set, inputs, layout, create_graph=True))


@_needs_in
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_in_lean_reduced_precision_matches_custom_op(dtype):
    inputs = _in_inputs(_CASES[0], dtype, seed=3)
    _assert_identical(_in_run(True, _IN_GRAD_SETS[0], inputs, "channels_last"),
                      _in_run(False, _IN_GRAD_SETS[0], inputs, "channels_last"))


@_needs_in
@pytest.mark.parametrize("activation,slope", [("relu", 0.2), ("none", 0.2), ("leaky_relu", 0.0), ("leaky_relu", 3)],
                         ids=["relu", "none", "slope0", "slope-int"])
def test_in_lean_stride0_grad_activations_and_eps0(activation, slope):
    """.sum().backward() hands a stride-0 gradient to the fused backward; every activation; eps 0
    with a constant plane (ATen's zero-variance rule)."""
    x0, w0, b0, g0, t0, _, stride, padding = _in_inputs(_CASES[0], torch.float32, seed=4)
    x0 = x0.clone()
    x0[0] = 0.0  # sample 0's conv output is all zeros: zero variance with eps = 0
    kernel_slope = {"relu": 0.0, "none": 1.0}.get(activation, float(slope))

    def run(lean):
        x, w, b, g, t = _in_leaves(("x", "w", "b", "g", "t"), x0, w0, b0, g0, t0, "contiguous")
        with on_backend("cpu"):
            y = (GF.conv2d_instance_norm_act(x, w, b, stride, padding, g, t, 0.0, activation, slope) if lean
                 else ops.conv2d_in_act_fwd(x, w, b, g, t, [2, 2], [1, 1], 0.0, kernel_slope)[0])
            y.sum().backward()
        return y, x.grad, w.grad, b.grad, g.grad, t.grad

    _assert_identical(run(True), run(False))


@_needs_in
def test_in_lean_without_grad_and_inference_mode():
    x0, w0, b0, g0, t0, _, stride, padding = _in_inputs(_CASES[0], torch.float32, seed=5)
    with on_backend("cpu"):
        ref = ops.conv2d_in_act_fwd(x0, w0, b0, g0, t0, [2, 2], [1, 1], 1e-5, 0.2)[0]
        with torch.no_grad():
            a = GF.conv2d_instance_norm_act(x0.requires_grad_(), w0, b0, stride, padding, g0, t0)
        with torch.inference_mode():
            c = GF.conv2d_instance_norm_act(x0.detach(), w0, b0, stride, padding, g0, t0)
    assert a.grad_fn is None and not a.requires_grad and torch.equal(a, ref)
    assert c.is_inference() and torch.equal(c, ref)


@_needs_in
def test_in_lean_gradcheck_and_gradgradcheck(one_thread):
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(3, 2, 3, 3, dtype=torch.float64) * 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    g = (1 + 0.3 * torch.randn(3, dtype=torch.float64)).requires_grad_()
    t = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with on_backend("cpu"):
        for f, args in ((lambda x, w, b, g, t: GF.conv2d_instance_norm_act(x, w, b, 1, 1, g, t), (x, w, b, g, t)),
                        (lambda x, w: GF.conv2d_instance_norm_act(
                            x.contiguous(memory_format=torch.channels_last), w, None, 1, 0, activation="relu"),
                         (x, w))):
            y = f(*args)
            assert type(y.grad_fn).__name__ == "CppFunction"
            assert torch.autograd.gradcheck(f, args)
            assert torch.autograd.gradgradcheck(f, args)


@_needs_in
@pytest.mark.parametrize("error", [RuntimeError("kernel failed"), NotImplementedError("kernel failed")])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_in_error_in_served_call_propagates_once(error, requires_grad):
    x = torch.randn(2, 3, 8, 8, requires_grad=requires_grad)
    with on_backend("cpu"), _InKernelCalls("fwd", error) as mode:
        with pytest.raises(type(error), match="kernel failed"):
            GF.conv2d_instance_norm_act(x, torch.randn(4, 3, 4, 4), torch.randn(4), 2, 1, torch.randn(4))
    assert mode.calls == 1  # the Python route did not run the kernel a second time


@_needs_in
def test_in_error_in_served_backward_propagates_once():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with on_backend("cpu"):
        y = GF.conv2d_instance_norm_act(x, torch.randn(4, 3, 4, 4), None, 2, 1)
        with _InKernelCalls("bwd", RuntimeError("bwd failed")) as mode, pytest.raises(RuntimeError,
                                                                                            match="bwd failed"):
            y.sum().backward()
    assert mode.calls == 1


@_needs_in
def test_in_refusal_comes_before_any_work():
    op = _dispatch.lean_op("conv2d_in_act", ops._IN_KERNELS)
    assert op is not None
    x, w, b, g = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 4, 4), torch.randn(4), torch.randn(4)

    def a(x=x, w=w, b=b, g=g, t=g, stride=2, padding=1, slope=0.2):
        return (x, w, b, g, t, stride, padding, 1e-5, slope)

    refused = [
        a(x=torch.randn(3, 6, 6)), a(x=torch.randn(0, 3, 6, 6)),
        a(x=torch.ones(1, 3, 6, 6, dtype=torch.int64), w=w.long(), b=None, g=None, t=None),
        a(w=torch.randn(4, 3, 4)), a(w=torch.randn(4, 2, 4, 4)), a(w=torch.randn(0, 3, 4, 4), b=None, g=None, t=None),
        a(w=w.double()), a(w=w.to("meta")), a(b=torch.randn(5)), a(b=b.double()), a(b=torch.randn(4, 1)),
        a(b=b.to("meta")), a(g=torch.randn(5)), a(t=torch.randn(4, 1)), a(g=g.to("meta")),
        a(t=torch.ones(4, dtype=torch.int64)),
        a(stride=0), a(padding=-1), a(stride=[2, 2, 2]), a(stride=[2]),
        a(w=torch.randn(4, 3, 9, 9)),  # kernel larger than the padded input: an empty output map
        a(slope=-0.1), a(slope=float("nan")),
    ]
    for args in refused:
        with _InKernelCalls("fwd") as mode, pytest.raises(NotImplementedError) as info:
            op(*args)
        assert _dispatch.refused(info.value, ops._IN_REFUSAL, *args[2:5], required=(args[1],)), str(info.value)
        assert mode.calls == 0
    with torch.autocast("cpu", dtype=torch.bfloat16), _InKernelCalls("fwd") as mode:
        with pytest.raises(NotImplementedError, match="autocast"):
            op(*a())
    assert mode.calls == 0


@_needs_in
@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_in_refused_calls_give_the_public_errors(backend):
    x, w = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 4, 4)
    cases = [
        (ValueError, r"x must be \(N, C, H, W\)", dict(x=torch.randn(3, 6, 6), weight=w)),
        (ValueError, "weight must be", dict(x=x, weight=torch.randn(4, 3, 4))),
        (ValueError, "0 output channels", dict(x=x, weight=torch.randn(0, 3, 4, 4))),
        (ValueError, "expects 2 input channels", dict(x=x, weight=torch.randn(4, 2, 4, 4))),
        (TypeError, "fp16, bf16, fp32 or fp64", dict(x=x.long(), weight=w.long())),
        (TypeError, "they must match", dict(x=x, weight=w.double())),
        (ValueError, "weight is on meta", dict(x=x, weight=w.to("meta"))),
        (ValueError, r"bias must be None or a \(4,\) tensor", dict(x=x, weight=w, bias=torch.randn(5))),
        (ValueError, r"bias must be None or a \(4,\) tensor", dict(x=x, weight=w, bias=[0.0] * 4)),
        (ValueError, r"norm_weight must be None or a \(4,\) tensor", dict(x=x, weight=w, norm_weight=torch.randn(5))),
        (ValueError, r"norm_bias must be None or a \(4,\) tensor", dict(x=x, weight=w, norm_bias=[0.0] * 4)),
        (TypeError, "x and weight must be Tensors", dict(x=x, weight=w.tolist())),
        (TypeError, "stride must be an int or a pair of ints", dict(x=x, weight=w, stride=True)),
        (TypeError, "padding must be an int or a pair of ints", dict(x=x, weight=w, padding=(1, 1, 1))),
        (ValueError, "stride must be >= 1", dict(x=x, weight=w, stride=0)),
        (ValueError, "padding must be >= 0", dict(x=x, weight=w, padding=(0, -1))),
        (ValueError, "activation must be one of", dict(x=x, weight=w, activation="gelu")),
        (ValueError, "could not convert", dict(x=x, weight=w, negative_slope="0.2x")),
    ]
    with on_backend(backend) if backend != "auto" else contextlib.nullcontext():
        for error, match, kwargs in cases:
            with _InKernelCalls("fwd") as mode, pytest.raises(error, match=match):
                GF.conv2d_instance_norm_act(**kwargs)
            assert mode.calls == 0, match


@_needs_in
def test_in_refused_calls_served_by_the_python_route():
    """A negative slope and an empty output map run the torch composition; autocast the conv in
    bf16 (the custom op); a slope given as a 0-d tensor goes through float() as before."""
    x, w, b, g = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 4, 4), torch.randn(4), torch.randn(4)
    with on_backend("cpu"):
        y = GF.conv2d_instance_norm_act(x.detach().requires_grad_(), w, b, 2, 1, g, g, 1e-5, "leaky_relu",
                                        torch.tensor(0.5))
        assert type(y.grad_fn).__name__ == "ganengine::conv2d_in_act_fwdBackward"  # a plain eager call: the eager route's node
        with _InKernelCalls("fwd") as mode:
            y = GF.conv2d_instance_norm_act(x.detach().requires_grad_(), w, b, 2, 1, g, g, 1e-5, "leaky_relu",
                                            torch.tensor(0.5))
        assert mode.calls == 1 and "conv2d_in_act_fwd" in type(y.grad_fn).__name__  # the custom op's node
        assert torch.equal(y, ops.conv2d_in_act_fwd(x, w, b, g, g, [2, 2], [1, 1], 1e-5, 0.5)[0])
        with _InKernelCalls("fwd") as mode:
            y = GF.conv2d_instance_norm_act(x.requires_grad_(), w, b, 2, 1, g, g, 1e-5, "leaky_relu", -0.1)
        assert mode.calls == 0 and type(y.grad_fn).__name__ != "CppFunction"
        assert torch.equal(y, ops.reference_conv2d_in_act(x, w, b, [2, 2], [1, 1], g, g, 1e-5, -0.1))
        with torch.autocast("cpu", dtype=torch.bfloat16), _InKernelCalls("fwd") as mode:
            y = GF.conv2d_instance_norm_act(x, w, b, 2, 1, g, g)
        assert mode.calls == 1 and y.dtype == torch.bfloat16
        assert torch.equal(y, ops.conv2d_in_act_fwd(x.bfloat16(), w.bfloat16(), b, g, g, [2, 2], [1, 1], 1e-5,
                                                    0.2)[0])


@_needs_in
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_in_other_backends_do_not_take_the_lean_entry(backend):
    if not ganengine.backends.available()[backend]:
        pytest.skip(f"backend {backend} unavailable")
    x, w = torch.randn(1, 3, 6, 6, requires_grad=True), torch.randn(4, 3, 4, 4)
    with on_backend(backend):
        y = GF.conv2d_instance_norm_act(x, w, None, 2, 1)
    assert _dispatch.last_used["conv2d_instance_norm_act"] == backend
    assert type(y.grad_fn).__name__ == "ganengine::conv2d_in_act_fwdBackward"


@_needs_in
def test_in_fake_tensor_mode():
    """Under a FakeTensorMode the lean entry gives the custom op's shapes and layouts."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), on_backend("cpu"):
        x = torch.randn(2, 3, 9, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
        w, b = torch.randn(5, 3, 4, 4, requires_grad=True), torch.randn(5, requires_grad=True)
        g, t = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
        y = GF.conv2d_instance_norm_act(x, w, b, 2, 1, g, t)
        assert type(y.grad_fn).__name__ == "CppFunction"
        dx, dw, db, dg, dt = torch.autograd.grad(y, (x, w, b, g, t), torch.ones_like(y))
        with torch.inference_mode():
            yi = GF.conv2d_instance_norm_act(x.detach(), w.detach(), None, 2, 1)
    assert y.shape == yi.shape == (2, 5, 4, 3) and y.is_contiguous(memory_format=torch.channels_last)
    assert dx.shape == x.shape and dx.is_contiguous(memory_format=torch.channels_last)
    assert dw.shape == w.shape and db.shape == b.shape and dg.shape == g.shape and dt.shape == t.shape
