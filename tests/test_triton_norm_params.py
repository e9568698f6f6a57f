"""Triton norm kernels (kernels/norm_act.py, kernels/batch_norm_act.py) with the parameters a user
may pass as views: weight / bias / gain strided (w[::2]), expanded (stride 0), BigGAN's
``gain, bias = emb.chunk(2, 1)`` (rows 2C apart), (N, C, 1, 1) views of them, and strided
running-statistics views; empty batch norm inputs (H*W = 0); fp64 instance norm planes larger
than one tile (the Welford loop's 1/count must be fp64).

The triton backend (under the interpreter on CPU) is compared with the torch backend on the
same inputs in fp64. Tolerances come from the error bounds of tests/_norm_bounds.py
(instance norm) and tests/test_batch_norm_act.check_all (batch norm, tests/_tolerance.bound):
where both backends are compared with each other, each is within the bound of the exact value,
so they differ by at most twice it (and both outputs' roundings: out_round=2).
"""
from __future__ import annotations

import pytest
import torch

import ganengine
import ganengine.functional as GF
from ganengine.ops import batch_norm_act as bn_ops
from tests._backends import on_backend
from tests._norm_bounds import batch_stat_bounds, instance_norm_act_bounds
from tests._tolerance import assert_below, unit_roundoff
from tests.test_batch_norm_act import check_all
from tests.test_batch_norm_act import reference as bn_reference

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not ganengine.backends.serves("triton", torch.device("cpu")),
                                reason="triton cannot serve CPU tensors here (TRITON_INTERPRET not set)")

F64 = torch.float64

# (name, view of a (2C,) base giving C values): what the launchers used to read as unit-strided
VIEWS = {
    "dense": lambda t, c: t[:c],
    "step2": lambda t, c: t[::2],
    "expand0": lambda t, c: t[:1].expand(c),
}


def _views_run(fn, leaves, views, grad):
    """y = fn(*views(leaves)) and the gradients of the views (autograd checks each has its view's
    shape) and of the base leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    args = [v(t) for v, t in zip(views, leaves)]
    y = fn(*args)
    grads = torch.autograd.grad(y, args + leaves, grad)
    k = len(args)
    for a, ga in zip(args, grads[:k]):
        assert ga.shape == a.shape
    return y.detach(), [a.detach() for a in args], list(grads[:k]), list(grads[k:])


def _base_bound(view, base, view_bound):
    """A bound of a base tensor's gradient from its view's: the view's backward (a scatter, or a
    sum for an expand) is linear with non-negative coefficients, so it maps bounds to bounds."""
    z = torch.zeros_like(base, dtype=F64, requires_grad=True)
    return torch.autograd.grad(view(z), z, view_bound.to(F64))[0]


# ----------------------------------------------------------------------------- instance norm
def _in_views(wname, bname, c):
    return (lambda t: t, lambda t: VIEWS[wname](t, c), lambda t: VIEWS[bname](t, c))


@pytest.mark.parametrize("wname,bname", [("step2", "step2"), ("expand0", "expand0"), ("step2", "dense"),
                                         ("dense", "expand0")])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_instance_norm_act_strided_params(wname, bname, layout):
    n, c, h, w_ = 2, 4, 5, 6
    x = torch.randn(n, c, h, w_, dtype=F64) * 2 + 3
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    W, B = torch.randn(2 * c, dtype=F64), torch.randn(2 * c, dtype=F64)
    g = torch.randn(n, c, h, w_, dtype=F64)
    views = _in_views(wname, bname, c)
    out = {}
    for backend in ("torch", "triton"):
        with on_backend(backend):
            out[backend] = _views_run(GF.instance_norm_act, (x, W, B), views, g)
    (yt, args, vg_t, bg_t), (yr, _, vg_r, bg_r) = out["triton"], out["torch"]
    bnd = instance_norm_act_bounds(args[0], args[1], args[2], g, acc_dtype=F64)
    assert_below(yt, yr, 2 * bnd.y, name="y", out_round=2)
    for name, a, r, e in zip(("dx", "dw", "db"), vg_t, vg_r, (bnd.dx, bnd.dw, bnd.db)):
        assert_below(a, r, 2 * e, name=name, out_round=2)
    for name, a, r, v, e in zip(("W", "B"), bg_t[1:], bg_r[1:], views[1:], (bnd.dw, bnd.db)):
        assert_below(a, r, 2 * _base_bound(v, a, e), name=f"base {name}", out_round=2)


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("wname", ["step2", "expand0"])
def test_instance_norm_launchers_read_strided_params(split, wname):
    """The fused, looping and split-plane kernels, forward and backward (launchers called directly)."""
    from ganengine.kernels import norm_act as tk

    c = 3
    x = torch.randn(1, c, 33, 70, dtype=F64) * 2 + 5
    W, B = torch.randn(2 * c, dtype=F64), torch.randn(2 * c, dtype=F64)
    w, b = VIEWS[wname](W, c), VIEWS[wname](B, c)
    g = torch.randn(x.shape, dtype=F64)
    y, mean, rstd = tk.forward(x, w, b, 1e-5, True, 0.2, split=split)
    dx, dw, db = tk.backward(g, x, w, b, mean, rstd, True, 0.2, split=split)
    with on_backend("torch"):
        yr, _, (dxr, dwr, dbr), _ = _views_run(GF.instance_norm_act, (x, w.contiguous(), b.contiguous()),
                                               (lambda t: t,) * 3, g)
    bnd = instance_norm_act_bounds(x, w, b, g, acc_dtype=F64)
    assert_below(y, yr, 2 * bnd.y, name="y", out_round=2)
    assert_below(dx, dxr, 2 * bnd.dx, name="dx", out_round=2)
    # (per instance (N, C); N = 1)
    assert_below(dw.sum(0), dwr, 2 * bnd.dw, name="dw", out_round=2)
    assert_below(db.sum(0), dbr, 2 * bnd.db, name="db", out_round=2)


@pytest.mark.parametrize("split", [None, 1], ids=["auto", "unsplit"])
def test_instance_norm_fp64_planes_larger_than_a_tile(split):
    """A 128x160 plane (> the 16384-element register tile) walks 5 loop tiles per lane: Welford's
    1/count (1/3, 1/5) must be fp64, as the accumulators (an fp32 one gave ~1e-8 errors)."""
    from ganengine.kernels import norm_act as tk

    x = torch.randn(1, 2, 128, 160, dtype=F64) * 2 + 3
    w, b = torch.randn(2, dtype=F64), torch.randn(2, dtype=F64)
    g = torch.randn(x.shape, dtype=F64)
    y, mean, rstd = tk.forward(x, w, b, 1e-5, True, 0.2, split=split)
    dx, _, _ = tk.backward(g, x, w, b, mean, rstd, True, 0.2, split=split)
    with on_backend("torch"):
        yr, _, (dxr, _, _), _ = _views_run(GF.instance_norm_act, (x, w, b), (lambda t: t,) * 3, g)
    bnd = instance_norm_act_bounds(x, w, b, g, acc_dtype=F64)
    assert_below(y, yr, 2 * bnd.y, name="y", out_round=2)
    assert_below(dx, dxr, 2 * bnd.dx, name="dx", out_round=2)
    with on_backend("triton"):  # the public op, auto plan
        yt = GF.instance_norm_act(x, w, b)
    assert_below(yt, yr, 2 * bnd.y, name="y (GF)", out_round=2)


# ----------------------------------------------------------------------------- batch norm
def _bn_case(per_sample, kind, n, c):
    """(bases, views): x, then weight / gain and bias views of the kind."""
    if not per_sample:
        W, B = torch.randn(2 * c, dtype=F64), torch.randn(2 * c, dtype=F64)
        return (W, B), (lambda t: VIEWS[kind](t, c), lambda t: VIEWS[kind](t, c))
    if kind == "chunk":  # BigGAN: gain, bias = emb.chunk(2, 1): (N, C) rows 2C apart
        E = torch.randn(n, 2 * c, dtype=F64) + torch.cat([torch.ones(c), torch.zeros(c)]).to(F64)
        return (E, E), (lambda t: t.chunk(2, 1)[0], lambda t: t.chunk(2, 1)[1])
    if kind == "chunk_view4d":  # the same as (N, C, 1, 1) views (layers_biggan's ccbn)
        E = torch.randn(n, 2 * c, dtype=F64) + 1
        return (E, E), (lambda t: t.chunk(2, 1)[0].view(n, c, 1, 1), lambda t: t.chunk(2, 1)[1].view(n, c, 1, 1))
    G, B = torch.randn(n, 2 * c, dtype=F64) + 1, torch.randn(n, 2 * c, dtype=F64)
    if kind == "step2":  # strided channels (a copy)
        return (G, B), (lambda t: t[:, ::2], lambda t: t[:, ::2])
    if kind == "expand0":  # stride-0 channels (gain) and stride-0 rows (bias)
        return (G, B[0]), (lambda t: t[:, :1].expand(n, c), lambda t: t[:c].expand(n, c))
    if kind == "mixed":  # gain a chunk (rows 2C apart), bias dense: different row strides
        return (G, B), (lambda t: t.chunk(2, 1)[0], lambda t: t[:, :c].contiguous())
    raise ValueError(kind)


BN_CASES = [(False, "step2"), (False, "expand0"), (True, "chunk"), (True, "chunk_view4d"), (True, "step2"),
            (True, "expand0"), (True, "mixed")]


@pytest.mark.parametrize("per_sample,kind", BN_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_act_strided_params(per_sample, kind, layout, training):
    n, c, h, w_ = 3, 4, 5, 6
    x = torch.randn(n, c, h, w_, dtype=F64) * 2 + 3
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(x.shape, dtype=F64)
    (P1, P2), (v1, v2) = _bn_case(per_sample, kind, n, c)
    if P1 is P2:  # one embedding: gain and bias are views of the same leaf
        bases, views = (x, P1), (lambda t: t, lambda t: t)
        fn_views = (v1, v2)
    else:
        bases, views, fn_views = (x, P1, P2), (lambda t: t, v1, v2), None
    rm0, rv0 = torch.randn(c, dtype=F64), torch.rand(c, dtype=F64) + 0.5
    eps, mom = 1e-5, 0.1

    def call(backend, rm, rv):
        def fn(x_, *ps):
            wv, bv = (fn_views[0](ps[0]), fn_views[1](ps[0])) if fn_views else ps
            if per_sample:
                return GF.conditional_batch_norm_act(x_, wv, bv, rm, rv, training, mom, eps, "leaky_relu", 0.2)
            return GF.batch_norm_act(x_, rm, rv, wv, bv, training, mom, eps, "leaky_relu", 0.2)
        with on_backend(backend):
            return _views_run(fn, bases, views, g)

    stats = {}
    results = {}
    for backend in ("torch", "triton"):
        rm, rv = rm0.clone(), rv0.clone()
        results[backend] = call(backend, rm, rv)
        stats[backend] = (rm, rv)
    with torch.no_grad():
        ps = [v(t) for v, t in zip(views[1:], bases[1:])]
        wv, bv = (fn_views[0](ps[0]), fn_views[1](ps[0])) if fn_views else ps
    # the fp64 reference with autograd on the parameter views
    wl, bl = wv.detach().clone().requires_grad_(), bv.detach().clone().requires_grad_()
    # (NCHW x for the reference: eager F.batch_norm's CPU backward (torch 2.14) with a channels_last
    # x and grad and a non-contiguous weight returns a wrong dx, which is also why the torch
    # backend, eager F.batch_norm, is only checked where that does not apply)
    xl = x.detach().contiguous().requires_grad_()
    rmr, rvr = rm0.clone(), rv0.clone()
    yr = bn_reference(xl, wl.reshape(n, c) if per_sample else wl, bl.reshape(n, c) if per_sample else bl,
                      rmr, rvr, training, mom, eps, "leaky_relu", 0.2, per_sample)
    dxr, dwr, dbr = torch.autograd.grad(yr, (xl, wl, bl), g)
    eager_bug = layout == "nhwc" and not per_sample and not wv.is_contiguous()
    for backend in ("triton",) if eager_bug else ("torch", "triton"):
        y, _, vgrads, bgrads = results[backend]
        if fn_views:  # the gradients of gain and bias: one leaf, two halves
            dw, db = bgrads[1].chunk(2, 1)
            dw, db = dw.reshape(wv.shape), db.reshape(bv.shape)
        else:
            dw, db = vgrads[1], vgrads[2]
            assert bgrads[1].shape == bases[1].shape and bgrads[2].shape == bases[2].shape
        check_all(x, wv.reshape(n, c) if per_sample else wv, bv.reshape(n, c) if per_sample else bv,
                  (y, (vgrads[0], dw.reshape(dwr.shape), db.reshape(dbr.shape))),
                  (yr.detach(), (dxr, dwr, dbr)), g, training, eps, per_sample,
                  rv_for_eval=None if training else rv0, name=backend)
    # running statistics (updated in training, untouched in eval): triton vs torch, each within
    # momentum * the batch statistics' bound (tests/_norm_bounds.batch_stat_bounds) plus the
    # update's three roundings of its terms, (1 - m) |r| + m |stat|
    e_mean, e_var = batch_stat_bounds(x, acc_dtype=F64)
    u = unit_roundoff(F64)
    for i, (e, r0) in enumerate(((e_mean, rm0), (e_var, rv0))):
        a, r = stats["triton"][i], (rmr, rvr)[i]
        if not training:
            assert torch.equal(a, r0) and torch.equal(r, r0)
            continue
        allowed = 2 * (mom * e + 3 * u * ((1 - mom) * r0.abs() + r.abs()))
        assert_below(a, r, allowed, name=("running_mean", "running_var")[i], out_round=2)


@pytest.mark.parametrize("per_sample", [False, True], ids=["bn", "cond"])
@pytest.mark.parametrize("split", [1, 3])
def test_batch_norm_launchers_strided_params_and_running_stat_views(per_sample, split):
    """The launchers (one- and two-launch schemes) with strided parameters and running statistics
    that are strided views of larger buffers: the views are updated, the gaps left alone."""
    from ganengine.kernels import batch_norm_act as tk

    n, c = 5, 3
    x = torch.randn(n, c, 7, 9, dtype=F64) * 2 + 20
    g = torch.randn(x.shape, dtype=F64)
    if per_sample:
        E = torch.randn(n, 2 * c, dtype=F64) + 1
        w, b = E.chunk(2, 1)
    else:
        W, B = torch.randn(2 * c, dtype=F64), torch.randn(2 * c, dtype=F64)
        w, b = W[::2], B[:1].expand(c)
    flags = bn_ops.TRAINING | bn_ops.APPLY_ACT | (bn_ops.PER_SAMPLE if per_sample else 0)
    RM, RV = torch.randn(2 * c, dtype=F64), torch.rand(2 * c, dtype=F64) + 0.5
    RM0, RV0 = RM.clone(), RV.clone()
    y, st = tk.forward(x, w, b, RM[::2], RV[::2], 0.1, 1e-5, 0.2, flags, split=split)
    dx, dw, db = tk.backward(g, x, w, b, st, 0.2, flags, split=split)
    assert dw.shape == ((n, c) if per_sample else (c,))
    assert torch.equal(RM[1::2], RM0[1::2]) and torch.equal(RV[1::2], RV0[1::2])
    wl, bl = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    xl = x.detach().clone().requires_grad_()
    rmr, rvr = RM0[::2].clone(), RV0[::2].clone()
    yr = bn_reference(xl, wl, bl, rmr, rvr, True, 0.1, 1e-5, "leaky_relu", 0.2, per_sample)
    ref = (yr.detach(), torch.autograd.grad(yr, (xl, wl, bl), g))
    check_all(x, w, b, (y, (dx, dw, db)), ref, g, True, 1e-5, per_sample, name="triton")
    e_mean, e_var = batch_stat_bounds(x, acc_dtype=F64)
    u = unit_roundoff(F64)
    for got, want, e, r0 in ((RM[::2], rmr, e_mean, RM0[::2]), (RV[::2], rvr, e_var, RV0[::2])):
        # momentum * the statistic's bound + three roundings of the update's terms (the reference
        # itself is fp64 too: twice that)
        assert_below(got, want, 2 * (0.1 * e + 3 * u * (0.9 * r0.abs() + want.abs())), out_round=2)


@pytest.mark.parametrize("shape", [(2, 3, 5, 0), (2, 3, 0, 4), (2, 3, 0), (0, 3, 4, 4)], ids=str)
@pytest.mark.parametrize("per_sample", [False, True], ids=["bn", "cond"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_act_empty_input(shape, per_sample, layout, training):
    """An empty x with N > 0 (H*W = 0): an empty output, zero parameter gradients, the running
    statistics as the torch backend leaves them (unchanged), no crash."""
    if layout == "nhwc" and len(shape) != 4:
        pytest.skip("channels_last needs 4-D")
    n, c = shape[0], shape[1]
    out = {}
    for backend in ("torch", "triton"):
        x = torch.randn(shape, dtype=F64)
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        pshape = (n, c) if per_sample else (c,)
        w = torch.randn(pshape, dtype=F64, requires_grad=True)
        b = torch.randn(pshape, dtype=F64, requires_grad=True)
        rm, rv = torch.zeros(c, dtype=F64), torch.ones(c, dtype=F64)
        with on_backend(backend):
            if per_sample:
                y = GF.conditional_batch_norm_act(x, w, b, rm, rv, training, 0.1)
            else:
                y = GF.batch_norm_act(x, rm, rv, w, b, training, 0.1)
            y.sum().backward()
        out[backend] = (y, x.grad, w.grad, b.grad, rm, rv)
    for a, r in zip(out["triton"], out["torch"]):
        assert a.shape == r.shape and a.dtype == r.dtype
        assert torch.equal(a, r)
    assert not out["triton"][2].any() and not out["triton"][3].any()
