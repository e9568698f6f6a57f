"""The autocast family (ganengine/bench/cases_autocast.py): ganengine's ops under CPU autocast against
eager's under the same autocast.

SAGAN self-attention: under CPU autocast the eager block runs its two products as bf16 / fp16 GEMMs
(and a softmax of the low-precision scores); the fused routes widened q, k, v to fp32 (the C++ flash
kernels and the forward-only composition are fp32 / fp64 only) and ran 0.53-0.68x the eager block's
forward. With the backend left to "auto" a call under CPU autocast with more than 144 query
positions (or a half / bf16 x) now runs eager's ops (ops/attention.py ``autocast_eager``): these
tests check that the products run in the autocast dtype and no fp32 flash kernel runs, that
smaller fp32 calls (host-bound) keep the fused route, the numbers against an fp64 reference within
the bounds of bf16 products (tests/_attention_bounds.py), output and gradient dtypes against
eager's, and that a named backend keeps its route.

Dtype parity of the whole family: every autocast bench case's fused function gives eager's output
dtypes and gradient dtypes.

conv2d_instance_norm_act under autocast: eager's own calls (the shortcut conv2d_act and conv3x3
have), proposed in /tmp/amptfix/conv_in_act_autocast.diff; its test is expected to fail until the
diff is applied (strict xfail: it must pass once it is).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import ganengine
import ganengine.nn as gnn
from ganengine.ops import _dispatch
from ganengine.ops import attention as attn_ops
from ganengine.ops import conv_act as conv_act_ops
from tests._attention_bounds import self_attention_bounds
from tests._tolerance import assert_below, unit_roundoff
from tests.test_attention import _sagan_reference

AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def _autocast(dtype=torch.bfloat16):
    return torch.autocast("cpu", dtype=dtype)


def _block_args(c=16, b=2, h=12, w=13, seed=0):
    """fp32 leaves (an AMP model's parameters and data) of the SAGAN block, gamma 0.5."""
    g = torch.Generator().manual_seed(seed)
    d = max(1, c // 8)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()
    x = rnd(b, c, h, w)
    qw, kw, vw = rnd(d, c, 1, 1, scale=c ** -0.5), rnd(d, c, 1, 1, scale=c ** -0.5), rnd(c, c, 1, 1, scale=c ** -0.5)
    qb, kb, vb = rnd(d, scale=0.1), rnd(d, scale=0.1), rnd(c, scale=0.1)
    gamma = torch.full((1,), 0.5, requires_grad=True)
    return [x, qw, qb, kw, kb, vw, vb, gamma]


def _eager_block(x, qw, qb, kw, kb, vw, vb, gamma):
    """heykeetae Self_Attn.forward's output (the bench case's reference)."""
    return _sagan_reference(x, qw, qb, kw, kb, vw, vb, gamma)[0]


def _op_dtypes(fn):
    """(dtypes of the inputs of every aten::bmm, names of the ganengine_C attention kernels) that
    ``fn()`` ran."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    bmm = [tuple(e.input_dtypes[:2]) for e in prof.events() if e.name == "aten::bmm"]
    kernels = sorted({e.name for e in prof.events() if e.name.startswith("ganengine_C::attention")})
    return bmm, kernels


def _low(dtype) -> str:
    return {torch.bfloat16: "c10::BFloat16", torch.float16: "c10::Half"}[dtype]


# ----------------------------------------------------------------------------- SAGAN: the route
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("graph", [False, True], ids=["no_grad", "graph"])
@pytest.mark.parametrize("hw", [(12, 13), (16, 16)], ids=["n156", "n256"])  # (in the forward-only window)
def test_self_attention2d_runs_low_precision_products(dtype, graph, hw):
    args = _block_args(h=hw[0], w=hw[1])

    def call():
        with torch.set_grad_enabled(graph), _autocast(dtype):
            out = ganengine.functional.self_attention2d(*args)
        if graph:
            out.sum().backward()
    bmm, kernels = _op_dtypes(call)
    assert kernels == [], f"the fp32 flash kernels ran under autocast: {kernels}"
    assert bmm and all(t == (_low(dtype), _low(dtype)) for t in bmm), bmm
    assert _dispatch.last_used["attention"] == "torch"


@pytest.mark.parametrize("return_attention", [False, True])
def test_module_under_autocast_runs_low_precision_products(return_attention):
    torch.manual_seed(0)
    mod = gnn.SelfAttention2d(16, return_attention=return_attention)
    x = torch.randn(2, 16, 16, 16)
    bmm, kernels = _op_dtypes(lambda: _call_module(mod, x))
    assert kernels == [] and bmm and all(t == (_low(torch.bfloat16),) * 2 for t in bmm), (bmm, kernels)


def _call_module(mod, x):
    with _autocast():
        res = mod(x)
    out = res[0] if isinstance(res, tuple) else res
    out.sum().backward()
    return res


def test_module_with_hooks_and_biggan_run_low_precision_products():
    """The modules' other routes (convs run as modules: the core ``attention``; BigGAN's block)."""
    torch.manual_seed(0)
    sagan = gnn.SelfAttention2d(16)
    sagan.query_conv.register_forward_hook(lambda m, i, o: None)  # not a plain conv: the core op
    biggan = gnn.BigGANSelfAttention2d(16)
    with torch.no_grad():
        biggan.gamma.fill_(0.5)
    for mod in (sagan, biggan):
        for graph in (False, True):
            x = torch.randn(2, 16, 16, 16)   # (BigGAN forward-only: N = 256, the composition's window)

            def call():
                with torch.set_grad_enabled(graph):
                    _call_module(mod, x) if graph else mod(x)
            with _autocast():
                bmm, kernels = _op_dtypes(call)
            assert kernels == [] and bmm and all(t == (_low(torch.bfloat16),) * 2 for t in bmm), (type(mod), bmm)


def test_named_backend_keeps_its_route():
    args = _block_args()
    with ganengine.use_backend("cpu"):
        _, kernels = _op_dtypes(lambda: _call_block(args))
    assert kernels, "backend 'cpu' under autocast: the C++ kernels"
    with ganengine.use_backend("torch"), _autocast():
        out = ganengine.functional.self_attention2d(*args)
    assert _dispatch.last_used["attention"] == "torch" and out.dtype == torch.float32


def _call_block(args):
    with _autocast():
        out = ganengine.functional.self_attention2d(*args)
    out.sum().backward()
    return out


@pytest.mark.parametrize("graph", [False, True], ids=["no_grad", "graph"])
def test_few_positions_keep_the_fused_route(graph):
    """N <= AUTOCAST_EAGER_MIN_POSITIONS (host-bound: the C++ entry is cheaper than eager's ops) with
    an fp32 x: the fused route, fp32 out as eager's; a bf16 x (eager promotes its output to fp32,
    the fused route would keep bf16): eager's ops."""
    n = attn_ops.AUTOCAST_EAGER_MIN_POSITIONS
    args = _block_args(h=n // 12, w=12)

    def call(args):
        with torch.set_grad_enabled(graph), _autocast():
            out = ganengine.functional.self_attention2d(*args)
        if graph:
            out.sum().backward()
        return out
    _, kernels = _op_dtypes(lambda: call(args))
    assert kernels
    x16 = args[0].detach().bfloat16().requires_grad_()
    bmm, kernels = _op_dtypes(lambda: call([x16, *args[1:]]))
    assert kernels == [] and bmm and all(t == (_low(torch.bfloat16),) * 2 for t in bmm)
    assert call([x16, *args[1:]]).dtype == torch.float32


def test_outside_autocast_keeps_the_fused_route():
    args = _block_args()
    _, kernels = _op_dtypes(lambda: ganengine.functional.self_attention2d(*args).sum().backward())
    assert kernels, "fp32 calls keep the C++ flash kernels"


# ----------------------------------------------------------------------------- SAGAN: numbers and dtypes
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("return_attention", [False, True])
@pytest.mark.parametrize("hw", [(4, 6), (12, 13)], ids=["n24_fused", "n156_eager_ops"])
def test_self_attention2d_autocast_numbers_and_dtypes(dtype, return_attention, hw):
    """Within the bounds of the block with x and the weights rounded to the autocast dtype, q, k, v,
    the products' inputs and outputs in it, fp32 accumulation (tests/_attention_bounds.py:
    ``product_u`` the products' roundings, ``store_dtype`` the intermediates'), against the fp64
    block on the fp32 inputs; output, map and gradient dtypes equal to eager's."""
    args = _block_args(c=16, b=2, h=hw[0], w=hw[1], seed=1)
    go = torch.randn(2, 16, *hw, generator=torch.Generator().manual_seed(2))
    with _autocast(dtype):
        res = ganengine.functional.self_attention2d(*args, return_attention=return_attention)
        want = _eager_block(*args)
    out = res[0] if return_attention else res
    grads = torch.autograd.grad(out, args, go)
    want_grads = torch.autograd.grad(want, args, go)
    assert out.dtype == want.dtype == torch.float32
    assert [g.dtype for g in grads] == [g.dtype for g in want_grads]
    if return_attention:
        assert res[1].dtype == dtype and res[1].shape == (2, hw[0] * hw[1], hw[0] * hw[1])
    u = unit_roundoff(dtype)
    bounds = self_attention_bounds(*args, go, store_dtype=dtype, input_dtype=dtype, product_u=u)
    with torch.no_grad():
        ref = _eager_block(*(a.double() for a in args))
    dargs = [a.detach().double().requires_grad_() for a in args]
    ref_grads = torch.autograd.grad(_eager_block(*dargs), dargs, go.double())
    assert_below(out, ref, bounds[0], name="out")
    names = ["x", "query_weight", "query_bias", "key_weight", "key_bias", "value_weight", "value_bias", "gamma"]
    for name, g, r, e in zip(names, grads, ref_grads, bounds[1:]):
        assert_below(g, r, e, name=f"d{name}")


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_module_output_dtype_is_eagers(x_dtype):
    """x from an autocast layer (bf16) or fp32: the block's output and gradient dtypes are the
    reference Self_Attn's under autocast (gamma * o + x with the fp32 (1,) gamma: fp32)."""
    torch.manual_seed(0)
    mod = gnn.SelfAttention2d(16)
    with torch.no_grad():
        mod.gamma.fill_(0.5)
    x = torch.randn(2, 16, 4, 4).to(x_dtype).requires_grad_()
    p = [mod.query_conv.weight, mod.query_conv.bias, mod.key_conv.weight, mod.key_conv.bias,
         mod.value_conv.weight, mod.value_conv.bias, mod.gamma]
    with _autocast():
        got, want = mod(x), _eager_block(x, *p)
    assert got.dtype == want.dtype
    dtypes = [[g.dtype for g in torch.autograd.grad(y, [x, *p], torch.ones_like(y))] for y in (got, want)]
    assert dtypes[0] == dtypes[1]


# ----------------------------------------------------------------------------- the family: dtype parity
def _family_cases():
    from ganengine.bench import registry
    registry.load_builtin()
    return sorted((n, c) for n, c in registry.all_cases().items() if c.family == "autocast")


def _outs_and_grads(fn, args, grad_args):
    args = [a.detach().clone().requires_grad_(i in grad_args) if isinstance(a, torch.Tensor) and a.is_floating_point()
            else a for i, a in enumerate(args)]
    outs = fn(*args)
    outs = [o for o in (outs if isinstance(outs, (tuple, list)) else (outs,)) if isinstance(o, torch.Tensor)]
    diff = [o for o in outs if o.requires_grad]
    grads = torch.autograd.grad(diff, [args[i] for i in grad_args], [torch.ones_like(o) for o in diff],
                                allow_unused=True) if diff else ()
    return [o.dtype for o in outs], [None if g is None else g.dtype for g in grads]


@pytest.mark.parametrize("case_dtype", [torch.float32, torch.float16], ids=["bf16", "fp16"])
def test_family_dtype_parity_with_eager(case_dtype):
    """Every autocast bench case (conv family, norms, attention, losses): the fused function's output
    dtypes and gradient dtypes are eager's under the same autocast (case dtype float32: bf16)."""
    cases = _family_cases()
    assert {n for n, _ in cases} >= {"self_attention2d_autocast", "instance_norm_act_autocast",
                                     "batch_norm_act_autocast", "gan_loss_autocast", "conv_autocast"}
    for name, case in cases:
        for params in case.shape_list("tiny"):
            work = case.setup(params, torch.device("cpu"), case_dtype)
            want = _outs_and_grads(work.reference, work.args, work.grad_args)
            got = _outs_and_grads(work.fused, work.args, work.grad_args)
            assert got == want, f"{name} {params}: ganengine {got}, eager {want}"


def _bf16_activation_cases():
    """(name, eager fn, ganengine fn, args): bf16 activations (an autocast conv's output) with fp32
    parameters, the other ops of the family."""
    import ganengine.functional as GF
    g = torch.Generator().manual_seed(3)
    xb = torch.randn(2, 4, 8, 8, generator=g).bfloat16()
    w, b = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    logits = torch.randn(2, 1, 6, 6, generator=g).bfloat16()
    rm, rv = torch.zeros(4), torch.ones(4)
    return [
        ("instance_norm_act", lambda x, w, b: F.leaky_relu(F.instance_norm(x, weight=w, bias=b, eps=1e-5), 0.2),
         lambda x, w, b: GF.instance_norm_act(x, w, b, eps=1e-5, activation="leaky_relu", negative_slope=0.2),
         [xb, w, b]),
        ("batch_norm_act",
         lambda x, w, b: F.leaky_relu(F.batch_norm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5), 0.2),
         lambda x, w, b: GF.batch_norm_act(x, rm.clone(), rv.clone(), w, b, training=True, momentum=0.1, eps=1e-5,
                                           negative_slope=0.2), [xb, w, b]),
        ("gan_loss_vanilla", lambda t: F.binary_cross_entropy_with_logits(t, torch.ones_like(t)),
         lambda t: GF.gan_loss(t, True, mode="vanilla"), [logits]),
        ("gan_loss_lsgan", lambda t: F.mse_loss(t, torch.ones_like(t)), lambda t: GF.gan_loss(t, True, mode="lsgan"),
         [logits]),
        ("conv2d", lambda x, w: F.conv2d(x, w, None, 1, 1), lambda x, w: GF.conv2d(x, w, None, 1, 1),
         [xb, torch.randn(4, 4, 3, 3, generator=g)]),
        ("conv_transpose2d", lambda x, w: F.conv_transpose2d(x, w, None, 2, 1),
         lambda x, w: GF.conv_transpose2d(x, w, None, 2, 1), [xb, torch.randn(4, 4, 4, 4, generator=g)]),
    ]


def test_family_dtype_parity_with_bf16_activations():
    """As above with bf16 activations (an autocast layer's output) and fp32 parameters."""
    for name, eager, fused, args in _bf16_activation_cases():
        res = []
        for fn in (eager, fused):
            a = [t.detach().clone().requires_grad_() for t in args]
            with _autocast():
                y = fn(*a)
            res.append((y.dtype, [t.dtype for t in torch.autograd.grad(y, a, torch.ones_like(y))]))
        assert res[1] == res[0], f"{name}: ganengine {res[1]}, eager {res[0]}"


# ----------------------------------------------------------------------------- conv2d_instance_norm_act
_IN_SHORTCUT = hasattr(conv_act_ops, "_in_autocast_call")


@pytest.mark.xfail(not _IN_SHORTCUT, strict=True,
                   reason="conv2d_instance_norm_act's autocast shortcut: /tmp/amptfix/conv_in_act_autocast.diff")
@pytest.mark.parametrize("activation,slope", [("leaky_relu", 0.2), ("relu", 0.2), ("none", 0.2)])
def test_conv2d_instance_norm_act_autocast_is_eagers_call(activation, slope):
    """Under autocast (backend auto) the op is eager's own calls: eager's bits for the output and the
    gradients, and eager's aten ops (no per-call casts of the route, no fused kernels)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).requires_grad_()
    w = (torch.randn(6, 4, 4, 4, generator=g) * 0.125).requires_grad_()
    nw, nb = torch.rand(6, generator=g).add(0.5).requires_grad_(), torch.randn(6, generator=g).requires_grad_()
    act = {"leaky_relu": lambda t: F.leaky_relu(t, slope), "relu": torch.relu, "none": lambda t: t}[activation]

    def eager(x, w, nw, nb):
        return act(F.instance_norm(F.conv2d(x, w, None, 2, 1), weight=nw, bias=nb, eps=1e-5))

    def fused(x, w, nw, nb):
        return conv_act_ops.conv2d_instance_norm_act(x, w, None, stride=2, padding=1, norm_weight=nw,
                                                      norm_bias=nb, eps=1e-5, activation=activation,
                                                      negative_slope=slope)
    res = []
    for fn in (eager, fused):
        with profile(activities=[ProfilerActivity.CPU]) as prof, _autocast():
            y = fn(x, w, nw, nb)
        ops = sorted(e.name for e in prof.events() if e.name.startswith(("aten::", "ganengine")))
        res.append((y, torch.autograd.grad(y, (x, w, nw, nb), torch.ones_like(y)), ops))
    (y0, g0, ops0), (y1, g1, ops1) = res
    assert y1.dtype == y0.dtype and torch.equal(y1, y0)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(g1, g0))
    assert _dispatch.last_used["conv2d_instance_norm_act"] == "torch"
    assert not any(n.startswith("ganengine") for n in ops1), ops1


@pytest.mark.xfail(not _IN_SHORTCUT, strict=True,
                   reason="conv2d_instance_norm_act's autocast shortcut: /tmp/amptfix/conv_in_act_autocast.diff")
def test_conv2d_instance_norm_act_autocast_one_pixel_map_keeps_the_route():
    """A one-pixel output map: F.instance_norm refuses it; the route normalises it to exactly 0, so
    the output is act(norm_bias), under autocast too."""
    x = torch.randn(1, 3, 4, 4)
    w = torch.randn(5, 3, 4, 4)
    nb = torch.linspace(-1, 1, 5)
    with _autocast():
        y = conv_act_ops.conv2d_instance_norm_act(x, w, None, norm_bias=nb, negative_slope=0.2)
    assert y.shape == (1, 5, 1, 1)
    assert torch.equal(y.float().flatten(), F.leaky_relu(nb, 0.2).to(y.dtype).float())
    # and the shortcut declined it (the route ran)
    assert conv_act_ops._in_autocast_call(x, w, None, 1, 0, None, nb, 1e-5, 0.2) is None
