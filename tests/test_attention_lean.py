"""The lean cpu entries of the attention family (csrc/cpu/attention_autograd.cpp): the C++ ops
ganengine_C::attention / ganengine_C::self_attention2d with autograd in C++, called at the top of
ops/attention.py's public functions. They must give the custom-op route's numbers bit for bit
(forward, every gradient, double backward), refuse what they do not serve so that the public
errors are raised, and let a real error propagate once."""
from __future__ import annotations

import pytest
import torch

import ganengine
import ganengine.functional as GF
from ganengine import _ext
from ganengine.ops import _dispatch
from ganengine.ops import attention as A
from tests._backends import on_backend, autograd_node_names

_HAS_LEAN = (_ext.loaded() and _ext.has_kernel("attention", "CompositeExplicitAutograd")
             and _ext.has_kernel("self_attention2d", "CompositeImplicitAutograd"))
pytestmark = pytest.mark.skipif(not _HAS_LEAN, reason="ganengine._C without the lean attention entries")


@pytest.fixture
def custom_op_route(monkeypatch):
    """Switches the lean entries off: the public functions take the Python route (the custom op's
    body; a plain eager call runs it through its eager twin, ops/_eager.py: the same bits). Both
    run the block's projections the same way: one stacked conv where the biases are all present
    or all absent, three convs otherwise."""

    def use(off: bool):
        monkeypatch.setattr(_dispatch, "_LEAN", {"attention": None, "self_attention2d": None} if off else {})
    return use



def _lean_node(t: torch.Tensor) -> bool:
    return any("AttentionFn" in n for n in autograd_node_names(t, name=lambda fn: fn.name()))


def _assert_same(got, want, what=""):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if a is None or b is None:
            assert a is None and b is None, f"{what}[{i}]: {a is None} vs {b is None}"
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}[{i}]: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert a.stride() == b.stride(), f"{what}[{i}]: strides {a.stride()} vs {b.stride()}"
        assert torch.equal(a, b), f"{what}[{i}]: max diff {(a.double() - b.double()).abs().max().item()}"


# ----------------------------------------------------------------------------- the core
def _core_inputs(b, d, n, m, c, dtype, layout, x_dtype=None):
    g = torch.Generator().manual_seed(1000 * n + m)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dt)

    if layout == "contiguous":
        q, k, v, x = rnd(b, d, n), rnd(b, d, m), rnd(b, c, m), rnd(b, c, n, dt=x_dtype or dtype)
    else:  # channels-last views (positions-major) and a strided slice, as the convs of NHWC x give
        q = rnd(b, n, d).transpose(1, 2)
        k = rnd(b, d, 2 * m)[:, :, ::2]
        v = rnd(b, m, c).transpose(1, 2)
        x = rnd(b, n, c, dt=x_dtype or dtype).transpose(1, 2)
    gamma = torch.tensor([0.7], dtype=dtype)
    return [q, k, v, x, gamma]


CORE_SHAPES = [(2, 3, 7, 5, 6), (1, 1, 1, 1, 1), (3, 2, 17, 33, 5)]
NEEDS = {"all": (0, 1, 2, 3, 4), "x": (3,), "gamma": (4,), "q": (0,), "kv": (1, 2), "none": ()}


def _core_run(inputs, needs, grad_kind, create_graph=False):
    """out and the gradients wrt the inputs in ``needs`` (then, with create_graph, the gradients
    of their squared norm: double backward)."""
    leaves = [t.detach().requires_grad_(i in needs) for i, t in enumerate(inputs)]  # layouts kept
    out = A.attention(*leaves)
    if not needs:
        return (out,), out
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out.dtype)
    if grad_kind == "sum":  # stride-0 incoming gradient, as out.sum().backward() gives
        gy = torch.ones((), dtype=out.dtype).expand(out.shape)
    wrt = [leaves[i] for i in needs]
    grads = torch.autograd.grad(out, wrt, gy, create_graph=create_graph)
    if create_graph:
        loss = sum((gr.double() ** 2).sum() for gr in grads)
        grads = (*grads, *torch.autograd.grad(loss, wrt, allow_unused=True))
    return (out, *grads), out


@pytest.mark.parametrize("shape", CORE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("needs", list(NEEDS), ids=str)
def test_core_matches_custom_op_route(custom_op_route, shape, dtype, layout, needs):
    inputs = _core_inputs(*shape, dtype, layout)
    with on_backend("cpu"):
        custom_op_route(True)
        want, ref_out = _core_run(inputs, NEEDS[needs], "randn")
        custom_op_route(False)
        got, out = _core_run(inputs, NEEDS[needs], "randn")
    assert _dispatch.last_used["attention"] == "cpu"
    if needs != "none":
        assert _lean_node(out) and not _lean_node(ref_out)
    _assert_same(got, want, "core")


@pytest.mark.parametrize("qkv_dtype,x_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)],
                         ids=["fp16-x32", "bf16"])
@pytest.mark.parametrize("grad_kind", ["randn", "sum"])
def test_core_half_and_mixed_dtypes(custom_op_route, qkv_dtype, x_dtype, grad_kind):
    """Half inputs are widened to fp32 for the kernels and rounded back, o saved in v's dtype."""
    inputs = _core_inputs(2, 2, 9, 6, 5, qkv_dtype, "strided", x_dtype=x_dtype)
    with on_backend("cpu"):
        custom_op_route(True)
        want, _ = _core_run(inputs, NEEDS["all"], grad_kind)
        custom_op_route(False)
        got, out = _core_run(inputs, NEEDS["all"], grad_kind)
    assert _lean_node(out)
    _assert_same(got, want, "core")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("needs", ["all", "q", "kv"], ids=str)
def test_core_double_backward_matches(custom_op_route, dtype, needs):
    """create_graph=True: the gradients come from the differentiable composition on both routes."""
    inputs = _core_inputs(2, 3, 7, 5, 6, dtype, "strided")
    with on_backend("cpu"):
        custom_op_route(True)
        want, _ = _core_run(inputs, NEEDS[needs], "randn", create_graph=True)
        custom_op_route(False)
        got, out = _core_run(inputs, NEEDS[needs], "randn", create_graph=True)
    assert _lean_node(out)
    _assert_same(got, want, "double backward")


def test_core_gradcheck_and_gradgradcheck():
    ts = [t.requires_grad_() for t in _core_inputs(1, 2, 3, 2, 3, torch.float64, "contiguous")]
    with on_backend("cpu"):
        assert _lean_node(A.attention(*ts))
        assert torch.autograd.gradcheck(A.attention, ts)
        assert torch.autograd.gradgradcheck(A.attention, ts)


def test_core_no_grad_and_inference_mode(custom_op_route):
    inputs = [t.requires_grad_() for t in _core_inputs(2, 3, 7, 5, 6, torch.float32, "strided")]
    with on_backend("cpu"):
        custom_op_route(True)
        with torch.no_grad():
            want = A.attention(*inputs)
        custom_op_route(False)
        with torch.no_grad():
            got = A.attention(*inputs)
        with torch.inference_mode():
            got_inf = A.attention(*inputs)
    _assert_same([got, got_inf], [want, want])
    assert not got.requires_grad


# ----------------------------------------------------------------------------- the block
def _block_inputs(b, c, h, w, d, dtype, bias, channels_last):
    g = torch.Generator().manual_seed(b * 100 + c * 10 + h + w)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)

    x = rnd(b, c, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # bias: "mixed" leaves the key's out (the projections then run as three convs, not stacked)
    p = [rnd(d, c, 1, 1, s=c ** -0.5), rnd(d, s=0.1) if bias else None, rnd(d, c, 1, 1, s=c ** -0.5),
         rnd(d, s=0.1) if bias is True else None, rnd(c, c, 1, 1, s=c ** -0.5), rnd(c, s=0.1) if bias else None,
         torch.tensor([0.6], dtype=dtype)]
    return [x] + p


def _block_run(inputs, needs, create_graph=False):
    leaves = [None if t is None else t.detach().requires_grad_(i in needs) for i, t in enumerate(inputs)]
    out = GF.self_attention2d(*leaves)
    wrt = [leaves[i] for i in needs if leaves[i] is not None]
    if not wrt:
        return (out,), out
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, wrt, gy, create_graph=create_graph)
    if create_graph:
        loss = sum((gr ** 2).sum() for gr in grads)
        grads = (*grads, *torch.autograd.grad(loss, wrt, allow_unused=True))
    return (out, *grads), out


BLOCK_NEEDS = {"all": tuple(range(8)), "x": (0,), "weights": (1, 3, 5), "gamma": (7,), "none": ()}


@pytest.mark.parametrize("shape", [(2, 16, 3, 5, 2), (1, 8, 1, 1, 1), (2, 9, 4, 7, 3)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("bias", [True, False, "mixed"], ids=["bias", "nobias", "mixed"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("needs", list(BLOCK_NEEDS), ids=str)
def test_block_matches_custom_op_route(custom_op_route, shape, dtype, bias, channels_last, needs):
    inputs = _block_inputs(*shape, dtype, bias, channels_last)
    with on_backend("cpu"):
        custom_op_route(True)
        want, ref_out = _block_run(inputs, BLOCK_NEEDS[needs])
        custom_op_route(False)
        got, out = _block_run(inputs, BLOCK_NEEDS[needs])
    assert _dispatch.last_used["attention"] == "cpu"
    if needs != "none":
        assert _lean_node(out) and not _lean_node(ref_out)
    _assert_same(got, want, "block")


def test_block_double_backward_and_gradcheck(custom_op_route):
    inputs = _block_inputs(2, 8, 3, 3, 1, torch.float64, True, False)
    with on_backend("cpu"):
        custom_op_route(True)
        want, _ = _block_run(inputs, BLOCK_NEEDS["all"], create_graph=True)
        custom_op_route(False)
        got, out = _block_run(inputs, BLOCK_NEEDS["all"], create_graph=True)
        assert _lean_node(out)
        _assert_same(got, want, "block double backward")
        small = [t.detach().requires_grad_() for t in _block_inputs(1, 8, 2, 2, 1, torch.float64, True, False)]
        assert torch.autograd.gradcheck(GF.self_attention2d, small, fast_mode=True)


def test_block_forms_the_entry_leaves_to_the_full_route(custom_op_route):
    """2-D weights, a float gamma and return_attention take the full route, with the same numbers."""
    x, qw, qb, kw, kb, vw, vb, gamma = _block_inputs(2, 16, 3, 5, 2, torch.float32, True, False)
    with on_backend("cpu"):
        want = GF.self_attention2d(x, qw, qb, kw, kb, vw, vb, gamma)
        _assert_same([GF.self_attention2d(x, qw[:, :, 0, 0], qb, kw[:, :, 0, 0], kb, vw[:, :, 0, 0], vb, gamma)],
                     [want])
        out, attn = GF.self_attention2d(x, qw, qb, kw, kb, vw, vb, gamma, return_attention=True)
        _assert_same([out], [want])
        assert attn.shape == (2, 15, 15)
        _assert_same([GF.self_attention2d(x, qw, qb, kw, kb, vw, vb, 0.6)],
                     [GF.self_attention2d(x, qw, qb, kw, kb, vw, vb, torch.tensor([0.6]))])


# ----------------------------------------------------------------------------- routing and errors
def test_other_backends_skip_the_entry():
    ts = [t.requires_grad_() for t in _core_inputs(1, 2, 5, 4, 3, torch.float32, "contiguous")]
    with on_backend("torch"):
        out = A.attention(*ts)
    assert _dispatch.last_used["attention"] == "torch" and not _lean_node(out)
    with ganengine.use_backend("auto"):
        assert _lean_node(A.attention(*ts))


def _core_ok():
    return _core_inputs(2, 3, 7, 5, 6, torch.float32, "contiguous")


CORE_BAD = [
    ("q 2-D", lambda q, k, v, x, g: (q[0], k, v, x, g), ValueError, "q must be a 3-D"),
    ("int x", lambda q, k, v, x, g: (q, k, v, x.long(), g), TypeError, "x must be a floating"),
    ("k shape", lambda q, k, v, x, g: (q, k[:, :2], v, x, g), ValueError, "k must be"),
    ("v shape", lambda q, k, v, x, g: (q, k, v[:, :, :3], x, g), ValueError, "v must be"),
    ("x shape", lambda q, k, v, x, g: (q, k, v, x[:, :, :4], g), ValueError, "x must be"),
    ("dtypes", lambda q, k, v, x, g: (q, k.double(), v, x, g), TypeError, "share a dtype"),
    ("gamma numel", lambda q, k, v, x, g: (q, k, v, x, torch.ones(2)), ValueError, "gamma must be"),
    ("empty", lambda q, k, v, x, g: (q[:, :, :0], k, v, x[:, :, :0], g), ValueError, "empty input"),
]


@pytest.mark.parametrize("case", CORE_BAD, ids=lambda c: c[0])
def test_core_refusals_give_the_public_errors(case):
    _, bad, exc, msg = case
    args = bad(*_core_ok())
    with pytest.raises(NotImplementedError):  # the entry refuses, it does not fail
        _dispatch.lean_op("attention", A._CORE_KERNELS)(*args)
    with pytest.raises(exc, match=msg):
        A.attention(*args)


def test_block_refusals_give_the_public_errors():
    x, qw, qb, kw, kb, vw, vb, gamma = _block_inputs(1, 16, 3, 3, 2, torch.float32, True, False)
    cases = [
        ((x[0], qw, qb, kw, kb, vw, vb, gamma), ValueError, "x must be a 4-D"),
        ((x, qw, qb, kw, kb, torch.randn(8, 16, 1, 1), vb, gamma), ValueError, "value_weight"),
        ((x, qw, qb, kw, torch.randn(3), vw, vb, gamma), ValueError, "key_bias"),
        ((x, qw, qb, kw, kb, vw, vb, torch.ones(2)), ValueError, "gamma"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(NotImplementedError):
            _dispatch.lean_op("self_attention2d", A._BLOCK_KERNELS)(*args)
        with pytest.raises(exc, match=msg):
            GF.self_attention2d(*args)
    with pytest.raises(ValueError, match="query_bias"):  # not a tensor: never handed to the C++ op
        GF.self_attention2d(x, qw, [0.0, 0.0], kw, kb, vw, vb, gamma)


def test_errors_propagate_once(monkeypatch):
    """A failure inside the entry (anything but its refusal) is raised as is, and the full route is
    not run a second time; a refusal runs the full route exactly once."""
    calls = {"entry": 0, "route": 0}
    real_check = A.check_core

    def counting_check(*args):
        calls["route"] += 1
        return real_check(*args)

    def entry(exc):
        def op(*args):
            calls["entry"] += 1
            raise exc("boom")
        return op

    monkeypatch.setattr(A, "check_core", counting_check)
    args = _core_ok()
    with on_backend("cpu"):
        monkeypatch.setattr(_dispatch, "_LEAN", {"attention": entry(RuntimeError)})
        with pytest.raises(RuntimeError, match="boom"):
            A.attention(*args)
        assert calls == {"entry": 1, "route": 0}
        monkeypatch.setattr(_dispatch, "_LEAN", {"attention": entry(NotImplementedError)})
        A.attention(*args)
        assert calls == {"entry": 2, "route": 1}


def test_block_under_cpu_autocast_matches(custom_op_route):
    """Under autocast the convs inside the C++ block entry are cast as F.conv2d's are (bf16 q, k, v)
    while x keeps fp32: the same numbers as the custom-op route."""
    inputs = _block_inputs(2, 16, 3, 5, 2, torch.float32, True, False)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _block_run(inputs, BLOCK_NEEDS["all"])

    with on_backend("cpu"):
        custom_op_route(True)
        want, _ = run()
        custom_op_route(False)
        got, out = run()
    assert _lean_node(out) and out.dtype == torch.float32
    _assert_same(got, want, "autocast")


_ALL_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
                "test_aot_dispatch_dynamic")


def test_opcheck_core():
    """The C++ core op passes every opcheck test: it returns fresh tensors as its schema says,
    carries its autograd, and traces (AOT dispatch, static and dynamic shapes: its checks read
    SymInt sizes)."""
    q, k, v, x, gamma = _core_inputs(2, 3, 7, 5, 6, torch.float32, "strided")
    torch.library.opcheck(torch.ops.ganengine_C.attention.default,
                          (q.requires_grad_(), k, v.requires_grad_(), x, gamma.requires_grad_()),
                          test_utils=_ALL_OPCHECK)
    torch.library.opcheck(torch.ops.ganengine_C.attention.default,
                          _core_inputs(1, 2, 4, 3, 5, torch.float16, "contiguous", x_dtype=torch.float32),
                          test_utils=_ALL_OPCHECK)


# (layout, projection biases: all, none or mixed, dtype, every input requiring grad)
_BLOCK_OPCHECK = [(False, True, torch.float32, True), (True, True, torch.float32, True),
                  (False, False, torch.float32, True), (True, "mixed", torch.float32, True),
                  (True, True, torch.bfloat16, True), (False, True, torch.float32, False)]


@pytest.mark.parametrize("channels_last,bias,dtype,grad", _BLOCK_OPCHECK,
                         ids=["nchw", "channels_last", "nobias", "mixed", "bf16", "nograd"])
def test_opcheck_block(channels_last, bias, dtype, grad):
    """The C++ block op (CompositeImplicitAutograd: ATen convs + the core) passes every opcheck
    test, AOT dispatch with dynamic (symbolic) shapes included: its checks read SymInt sizes and
    its split / view take them."""
    blk = _block_inputs(2, 8, 3, 3, 1, dtype, bias, channels_last)
    if grad:
        blk = [t if t is None else t.requires_grad_() for t in blk]
    torch.library.opcheck(torch.ops.ganengine_C.self_attention2d.default, tuple(blk), test_utils=_ALL_OPCHECK)


def _traced_input_sizes(op, args):
    """The sizes of the tensor inputs of ``op``'s forward graph as AOT autograd traces it with
    dynamic shapes."""
    from functorch.compile import aot_function

    seen = []

    def compiler(gm, _):
        seen.append([tuple(n.meta["val"].shape) for n in gm.graph.nodes if n.op == "placeholder"])
        return gm

    aot_function(op, compiler, dynamic=True)(*args)
    return seen[0]


def test_dynamic_trace_keeps_sizes_symbolic():
    """Traced with dynamic shapes, the C++ ops do not specialize the sizes of q, k, v, x (the
    core) nor of x (the block): their checks read SymInts, where size() would guard each size to
    its value and the compiled graph would serve that one shape only."""
    q, k, v, x, gamma = _core_inputs(2, 3, 7, 5, 6, torch.float32, "strided")
    core = _traced_input_sizes(torch.ops.ganengine_C.attention.default,
                               (q.requires_grad_(), k, v.requires_grad_(), x, gamma.requires_grad_()))
    blk = [t if t is None else t.requires_grad_() for t in _block_inputs(2, 8, 3, 3, 1, torch.float32, True, True)]
    block = _traced_input_sizes(torch.ops.ganengine_C.self_attention2d.default, tuple(blk))
    for shape in core[:4] + block[:1]:
        assert all(isinstance(n, torch.SymInt) for n in shape), shape
