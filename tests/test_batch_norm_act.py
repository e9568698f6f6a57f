"""Fused (conditional) batch norm + activation: every backend against an fp64 F.batch_norm
reference, forward and backward, running statistics, eval, layouts, dtypes, opcheck, compile,
double backward, modules, fuse, DDP."""
from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import ganengine
import ganengine.functional as GF
import ganengine.nn as gnn
from ganengine import _ext
from ganengine.ops import _dispatch
from ganengine.ops import batch_norm_act as ops
from tests._backends import backend_params, on_backend, autograd_node_names
from tests._tolerance import bound, unit_roundoff

BACKENDS = backend_params()


# ------------------------------------------------------------------ reference and bounds
def _view(t, x, per_sample):
    shape = [1] * x.dim()
    shape[1] = x.shape[1]
    if per_sample:
        shape[0] = x.shape[0]
    return t.reshape(shape)


def reference(x, w, b, rm, rv, training, momentum, eps, act, slope, per_sample):
    """fp64 F.batch_norm + per-sample affine + activation (rm / rv: fp64 copies, updated in place)."""
    xd = x.double()
    if per_sample:
        z = F.batch_norm(xd, rm, rv, None, None, training, momentum, eps)
        z = z * _view(w.double(), x, True) if w is not None else z
        z = z + _view(b.double(), x, True) if b is not None else z
    else:
        z = F.batch_norm(xd, rm, rv, None if w is None else w.double(), None if b is None else b.double(),
                         training, momentum, eps)
    if act == "relu":
        z = F.relu(z)
    elif act == "leaky_relu":
        z = F.leaky_relu(z, slope)
    return z


def _run(fn, tensors, grad):
    """fn(*leaves) and the gradients of every tensor leaf."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], grad.to(y.dtype))
    it = iter(grads)
    return y.detach(), [next(it) if t is not None else None for t in leaves]


def _scales(x, w, g, training, rv, eps, per_sample):
    """Normwise-per-channel scales of the error bounds (fp64): |x| max per channel, rstd, |w|, |g|."""
    xd = x.double()
    dims = [0] + list(range(2, x.dim()))
    c_shape = [1] * x.dim()
    c_shape[1] = x.shape[1]
    if training:
        var = xd.var(dim=dims, unbiased=False)
    else:
        var = rv.double()
    rstd = torch.rsqrt(var + eps).reshape(c_shape)
    xmax = xd.abs().amax(dim=dims).reshape(c_shape)
    wabs = _view(w.double().abs(), x, per_sample) if w is not None else torch.ones(c_shape, dtype=torch.float64)
    if per_sample:
        wabs = wabs.amax(dim=0, keepdim=True)
    gmax = g.double().abs().amax(dim=dims).reshape(c_shape)
    return rstd, xmax, wabs, gmax


def check_all(x, w, b, out, ref, g, training, eps, per_sample, rv_for_eval=None, name=""):
    """y, dx, dw, db against the fp64 reference within bounds from the reduction length M:
    c * gamma_M(acc) * scale (statistics, sums) + 3 u(storage) * |terms| (roundings to x's dtype).
    The torch backend (eager F.batch_norm) keeps fp16/bf16 intermediates in the backward: its
    sums get the storage rounding of every term, 3 u(storage) * sum|terms| in x's dtype even where
    the parameters' gradients are fp32 (on CUDA the activation's gradient is rounded to x's dtype
    before the norm's backward reduces it), and that rounding of the incoming gradient passes
    through the norm's backward into dx: u(storage) * |w| rstd gmax (1 + xhat_max)^2."""
    (y, (dx, dw, db)), (yr, (dxr, dwr, dbr)) = out, ref
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    m = x.numel() // x.shape[1]
    rstd, xmax, wabs, gmax = _scales(x, w, g, training, rv_for_eval, eps, per_sample)
    xhat_max = (xmax * 2 * rstd)
    dims = [0] + list(range(2, x.dim()))

    eager_low = name.startswith("torch") and x.dtype in (torch.float16, torch.bfloat16)
    u_low = unit_roundoff(x.dtype) if eager_low else 0.0

    def ok(actual, want, stat_scale, terms, what, c=8, low_terms=0.0):
        allowed = bound(stat_scale, m, acc, c, actual.dtype, ref=3 * terms) + 3 * u_low * low_terms
        err = (actual.double() - want).abs()
        assert (err <= allowed).all(), f"{name} {what}: error/bound {(err / allowed).max().item():.3g}"

    bterm = _view(b.double().abs(), x, per_sample) if b is not None else 0.0
    ok(y, yr, wabs * rstd * xmax, yr.abs() + wabs * xhat_max + bterm, "y")
    ok(dx, dxr, wabs * rstd * gmax * (1 + xhat_max) ** 2, dxr.abs() + wabs * rstd * gmax * (1 + xhat_max), "dx",
       low_terms=wabs * rstd * gmax * (1 + xhat_max) ** 2)
    sdims = dims if not per_sample else list(range(2, x.dim()))
    gsum = g.double().abs().sum(dim=sdims) if sdims else g.double().abs()
    gx = (g.double().abs() * xhat_max).sum(dim=sdims) if sdims else g.double().abs() * xhat_max
    if dw is not None:
        ok(dw, dwr, gx.reshape(dwr.shape) * 2, dwr.abs(), "dweight", c=4, low_terms=gx.reshape(dwr.shape))
    if db is not None:
        ok(db, dbr, gsum.reshape(dbr.shape), dbr.abs(), "dbias", c=2, low_terms=gsum.reshape(dbr.shape))


def check_running(x, rm, rv, rmr, rvr, momentum):
    m = x.numel() // x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    xmax = x.double().abs().amax(dim=dims)
    for got, want, scale in ((rm, rmr, xmax + rmr.abs()), (rv, rvr, xmax ** 2 * 4 + rvr.abs())):
        allowed = bound(scale, m, torch.float32, 8, got.dtype, ref=2 * want)
        err = (got.double() - want).abs()
        assert (err <= allowed).all(), f"running statistics: error/bound {(err / allowed).max().item():.3g}"


def make(shape, dtype=torch.float32, layout="nchw", per_sample=False, pdtype=torch.float32, offset=3.0):
    x = (torch.randn(shape) * 2 + offset).to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(shape[:-1] + (shape[-1] * 2,)).to(dtype)[..., ::2]
    c = shape[1]
    pshape = (shape[0], c) if per_sample else (c,)
    w = (torch.randn(pshape) + (1.0 if per_sample else 0.0)).to(pdtype)
    b = torch.randn(pshape).to(pdtype)
    return x, w, b


def fused_fn(per_sample, rm, rv, training=True, momentum=0.1, act="leaky_relu", slope=0.2, nbt=None, eps=1e-5):
    if per_sample:
        return lambda x, w, b: GF.conditional_batch_norm_act(x, w, b, rm, rv, training, momentum, eps, act, slope,
                                                             num_batches_tracked=nbt)
    return lambda x, w, b: GF.batch_norm_act(x, rm, rv, w, b, training, momentum, eps, act, slope,
                                             num_batches_tracked=nbt)


SHAPES = [
    (2, 3, 5, 7),      # N*H*W odd
    (3, 4, 1, 1),      # one pixel, N > 1
    (1, 3, 5, 7),      # N = 1
    (2, 40, 3, 3),     # more channels than a channel block (32 in Triton's channels-last tiles)
    (5, 6),            # BatchNorm1d after a Linear
    (4, 3, 9),         # (N, C, L)
]


# ------------------------------------------------------------------ numbers
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["bn", "cond"])
def test_training_forward_backward(backend, shape, layout, per_sample):
    if layout == "nhwc" and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    x, w, b = make(shape, layout=layout, per_sample=per_sample)
    c = shape[1]
    rm, rv, nbt = torch.randn(c), torch.rand(c) + 0.5, torch.tensor(3)
    rmr, rvr = rm.double(), rv.double()
    g = torch.randn(shape)
    ref = _run(lambda *a: reference(*a, rmr, rvr, True, 0.1, 1e-5, "leaky_relu", 0.2, per_sample), (x, w, b), g)
    with on_backend(backend):
        out = _run(fused_fn(per_sample, rm, rv, nbt=nbt), (x, w, b), g)
    assert _dispatch.last_used["conditional_batch_norm_act" if per_sample else "batch_norm_act"] == backend
    assert out[0].dtype == x.dtype and out[0].shape == x.shape
    if layout == "nhwc" and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert out[0].is_contiguous(memory_format=torch.channels_last)
    check_all(x, w, b, out, ref, g, True, 1e-5, per_sample, name=backend)
    check_running(x, rm, rv, rmr, rvr, 0.1)
    assert nbt.item() == 4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["bn", "cond"])
def test_eval_mode(backend, layout, per_sample):
    shape = (3, 5, 4, 3)
    x, w, b = make(shape, layout=layout, per_sample=per_sample)
    rm, rv = torch.randn(5), torch.rand(5) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    g = torch.randn(shape)
    ref = _run(lambda *a: reference(*a, rm.double(), rv.double(), False, 0.1, 1e-5, "leaky_relu", 0.2, per_sample),
               (x, w, b), g)
    with on_backend(backend):
        out = _run(fused_fn(per_sample, rm, rv, training=False), (x, w, b), g)
    check_all(x, w, b, out, ref, g, False, 1e-5, per_sample, rv_for_eval=rv, name=backend)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_dtypes(backend, dtype, layout):
    """Low-precision x with fp32 weight and running statistics (what AMP gives); fp64 end to end."""
    shape = (3, 6, 5, 7)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    x, w, b = make(shape, dtype=dtype, layout=layout, pdtype=pdtype)
    rm, rv = torch.zeros(6, dtype=pdtype), torch.ones(6, dtype=pdtype)
    rmr, rvr = rm.double(), rv.double()
    g = torch.randn(shape).to(dtype)
    ref = _run(lambda *a: reference(*a, rmr, rvr, True, 0.1, 1e-5, "relu", 0.0, False), (x, w, b), g)
    with on_backend(backend):
        out = _run(fused_fn(False, rm, rv, act="relu"), (x, w, b), g)
    assert out[0].dtype == dtype and out[1][0].dtype == dtype and out[1][1].dtype == pdtype
    check_all(x, w, b, out, ref, g, True, 1e-5, False, name=f"{backend} {dtype}")
    check_running(x, rm, rv, rmr, rvr, 0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_parameters_and_running_stats(backend):
    """A model cast with .bfloat16(): parameters and running statistics in bf16 too."""
    x, w, b = make((4, 3, 3, 5), dtype=torch.bfloat16, pdtype=torch.bfloat16)
    rm, rv = torch.zeros(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16)
    rmr, rvr = rm.double(), rv.double()
    g = torch.randn(4, 3, 3, 5).bfloat16()
    ref = _run(lambda *a: reference(*a, rmr, rvr, True, 0.1, 1e-5, "relu", 0.0, False), (x, w, b), g)
    with on_backend(backend):
        out = _run(fused_fn(False, rm, rv, act="relu"), (x, w, b), g)
    assert rm.dtype == torch.bfloat16 and out[1][1].dtype == torch.bfloat16
    check_all(x, w, b, out, ref, g, True, 1e-5, False, name=backend)
    check_running(x, rm, rv, rmr, rvr, 0.1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act,slope", [("relu", 0.0), ("leaky_relu", 0.2), ("leaky_relu", -0.3), ("none", 0.0)])
@pytest.mark.parametrize("affine", [True, False])
def test_activations_and_affine(backend, act, slope, affine):
    x, w, b = make((4, 3, 2, 5))
    if not affine:
        w = b = None
    g = torch.randn(4, 3, 2, 5)
    ref = _run(lambda *a: reference(*a, None, None, True, 0.1, 1e-5, act, slope, False), (x, w, b), g)
    with on_backend(backend):
        out = _run(fused_fn(False, None, None, act=act, slope=slope), (x, w, b), g)
    check_all(x, w, b, out, ref, g, True, 1e-5, False, name=f"{backend} {act}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_stride0_grad_and_noncontiguous_input(backend):
    x, w, b = make((3, 4, 6, 5), layout="strided")
    assert not x.is_contiguous()
    g = torch.ones(3, 4, 6, 5)
    ref = _run(lambda *a: reference(*a, None, None, True, 0.1, 1e-5, "relu", 0.0, False), (x, w, b), g)
    with on_backend(backend):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        GF.batch_norm_act(leaves[0], None, None, leaves[1], leaves[2]).sum().backward()  # stride-0 grad
    out = (ref[0], [t.grad for t in leaves])
    check_all(x, w, b, (ref[0], out[1]), ref, g, True, 1e-5, False, name=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_constant_channels(backend, layout):
    """Zero variance: the normalised value is exactly 0, so y is act(bias), and the running
    variance moves exactly towards 0, as in eager; finite gradients."""
    x = torch.full((3, 4, 5, 3), 0.1)
    x[:, 1] = -7.25
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(4), torch.randn(4)
    rm, rv = torch.zeros(4), torch.ones(4)
    with on_backend(backend):
        y, (dx, dw, db) = _run(fused_fn(False, rm, rv, act="leaky_relu"), (x, w, b), torch.randn(3, 4, 5, 3))
    want = F.leaky_relu(b, 0.2)[None, :, None, None].expand_as(y)
    eager = F.leaky_relu(F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5), 0.2)
    if backend == "torch":
        torch.testing.assert_close(y, eager, rtol=0, atol=0)
    else:
        assert torch.equal(y, want)
        # eager computes x * scale + (b - mean * scale): its rounding is the distance to act(b)
        torch.testing.assert_close(eager, want, rtol=0, atol=4 * 316.3 * 7.25 * 2 ** -24 * w.abs().max().item())
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all() and torch.isfinite(db).all()
    assert torch.equal(rv, torch.full((4,), 0.9))
    torch.testing.assert_close(rm, torch.tensor([0.01, -0.725, 0.01, 0.01]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_rules_match_eager(backend):
    x = torch.full((2, 3, 2, 2), 1.5)
    with on_backend(backend):
        with pytest.raises(ValueError, match="eps must be positive during training"):
            GF.batch_norm_act(x, eps=0.0)
        # eval with eps=0 on a zero running variance: eager's x * scale + shift gives NaN/inf; so does the op
        rm, rv = torch.full((3,), 1.5), torch.zeros(3)
        got = GF.batch_norm_act(x, rm, rv, training=False, eps=0.0, activation="none")
    eager = F.batch_norm(x, rm, rv, None, None, False, 0.1, 0.0)
    torch.testing.assert_close(got, eager, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_none_is_nn_batchnorms_cumulative_average(backend):
    ref = nn.BatchNorm2d(3, momentum=None)
    fused = gnn.BatchNormAct2d(3, momentum=None, activation="none")
    with on_backend(backend):
        for _ in range(3):
            x = torch.randn(4, 3, 2, 3) * 2 + 1
            torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-5)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, atol=1e-6, rtol=1e-6)
    assert fused.num_batches_tracked.item() == 3
    with on_backend(backend), pytest.raises(ValueError, match="num_batches_tracked"):
        GF.batch_norm_act(torch.randn(4, 3, 2, 2), torch.zeros(3), torch.ones(3), momentum=None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_channel_count(backend):
    # (N, C) with many features (BatchNorm1d after a wide Linear); NCHW with many channels is in SHAPES
    x, w, b = make((3, 1030))
    g = torch.randn(3, 1030)
    ref = _run(lambda *a: reference(*a, None, None, True, 0.1, 1e-5, "relu", 0.0, False), (x, w, b), g)
    with on_backend(backend):
        out = _run(fused_fn(False, None, None, act="relu"), (x, w, b), g)
    check_all(x, w, b, out, ref, g, True, 1e-5, False, name=backend)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,layout", [((67, 1030), "nchw"), ((3, 520, 5, 7), "nhwc"), ((40, 4099), "nchw")],
                         ids=["N67xC1030", "nhwc-3x520x5x7", "N40xC4099"])
def test_many_channel_rows_merge_across_units(shape, layout, training):
    """The C++ kernels' channels-last / (N, C) path with many channels: rows split into several
    units of 16+ rows each, whose partial statistics and gradient sums are merged across channels
    at once (csrc/cpu/batch_norm_act.cpp, kMinRows, finalize_nhwc, combine_nhwc); C not a multiple
    of the vector width (the scalar tail). Against the fp64 reference, forward, backward, running
    statistics."""
    if not ganengine.backends.serves("cpu", torch.device("cpu")):
        pytest.skip("cpu backend not built")
    x, w, b = make(shape, layout=layout)
    c = shape[1]
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    rmr, rvr = rm.double(), rv.double()
    g = torch.randn(shape)
    ref = _run(lambda *a: reference(*a, rmr, rvr, training, 0.1, 1e-5, "leaky_relu", 0.2, False), (x, w, b), g)
    with on_backend("cpu"):
        out = _run(fused_fn(False, rm, rv, training=training), (x, w, b), g)
    assert _dispatch.last_used["batch_norm_act"] == "cpu"
    check_all(x, w, b, out, ref, g, training, 1e-5, False, rv_for_eval=None if training else rv, name="cpu")
    if training:
        check_running(x, rm, rv, rmr, rvr, 0.1)


def test_cpu_results_do_not_depend_on_the_thread_count():
    if not ganengine.backends.serves("cpu", torch.device("cpu")):
        pytest.skip("cpu backend not built")
    x = torch.randn(8, 16, 33, 33) + 2
    w, b = torch.randn(16), torch.randn(16)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with on_backend("cpu"):
                outs.append(_run(fused_fn(False, None, None), (x, w, b), torch.ones(8, 16, 33, 33)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0][0], outs[1][0])
    for a, e in zip(outs[0][1], outs[1][1]):
        assert torch.equal(a, e)


@pytest.mark.parametrize("split", [2, 5])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["bn", "cond"])
def test_triton_split_reduction(split, layout, per_sample):
    """The two-launch scheme (partials, then combine inside the apply kernel) equals the fused one."""
    if not ganengine.backends.serves("triton", torch.device("cpu")):
        pytest.skip("triton cannot serve CPU tensors here (TRITON_INTERPRET not set)")
    from ganengine.kernels import batch_norm_act as tk

    x, w, b = make((5, 3, 7, 9), layout=layout, per_sample=per_sample, offset=20.0)
    g = torch.randn(5, 3, 7, 9)
    flags = ops.TRAINING | ops.APPLY_ACT | (ops.PER_SAMPLE if per_sample else 0)
    rm1, rv1, rm2, rv2 = torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3)
    y1, st1 = tk.forward(x, w, b, rm1, rv1, 0.1, 1e-5, 0.2, flags, split=1)
    y2, st2 = tk.forward(x, w, b, rm2, rv2, 0.1, 1e-5, 0.2, flags, split=split)
    torch.testing.assert_close(y2, y1, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(st2, st1, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(rv2, rv1, atol=2e-6, rtol=2e-6)
    d1 = tk.backward(g, x, w, b, st1, 0.2, flags, split=1)
    d2 = tk.backward(g, x, w, b, st1, 0.2, flags, split=split)
    for a, e in zip(d2, d1):
        torch.testing.assert_close(a, e, atol=2e-5, rtol=2e-5)


def test_triton_grids_respect_cuda_limits():
    """Huge shapes (counted, not run): a 1-D grid, so axis 1 and 2 stay 1."""
    pytest.importorskip("triton")
    from ganengine.kernels import batch_norm_act as tk

    for shape in ((1, 65536 * 4, 2, 1), (4096, 3, 512, 512)):
        x = torch.empty(shape, device="meta")
        cfg, n_cblocks, nper, sper, nch, sch = tk._plan(x, None)
        assert n_cblocks * nch * sch < 2 ** 31 and nch * sch <= tk._MAX_CHUNKS


# ------------------------------------------------------------------ autograd, opcheck, compile
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_sample", [False, True], ids=["bn", "cond"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_and_gradgradcheck(backend, per_sample, training):
    x = torch.randn(3, 2, 2, 1, dtype=torch.float64, requires_grad=True)
    pshape = (3, 2) if per_sample else (2,)
    w = torch.randn(pshape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(pshape, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5
    fn = fused_fn(per_sample, None if training else rm, None if training else rv, training=training, slope=0.1)
    with on_backend(backend):
        assert torch.autograd.gradcheck(fn, (x, w, b))
        # the second derivative runs the reference composition on every backend: under the slow
        # interpreter check it once for triton
        if backend != "triton" or (training and per_sample):
            assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_wgan_gp_through_a_batch_norm_discriminator(backend):
    """d/dtheta of the gradient penalty (create_graph=True) equals the reference composition's."""
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64, requires_grad=True)

    def penalty(norm_fn):
        out = norm_fn(conv(x), w, b).pow(2).sum()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        return torch.autograd.grad((gx.flatten(1).norm(dim=1) - 1).pow(2).sum(), [w, b, conv.weight])

    want = penalty(lambda h, w_, b_: reference(h, w_, b_, None, None, True, 0.1, 1e-5, "leaky_relu", 0.2, False))
    with on_backend(backend):
        got = penalty(lambda h, w_, b_: GF.batch_norm_act(h, None, None, w_, b_, activation="leaky_relu"))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, w, b = make((3, 3, 4, 5))
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    flags = ops.TRAINING | ops.APPLY_ACT
    with on_backend(backend):
        torch.library.opcheck(ops.batch_norm_act_fwd, (x, w, b, None, None, 1e-5, 0.2, flags))
        torch.library.opcheck(ops.batch_norm_act_fwd, (x.detach().contiguous(memory_format=torch.channels_last),
                                                       None, None, torch.zeros(3), torch.ones(3), 1e-5, 0.0,
                                                       ops.APPLY_ACT))
        gain, bias = torch.randn(3, 3), torch.randn(3, 3)
        torch.library.opcheck(ops.batch_norm_act_fwd, (x, gain, bias, None, None, 1e-5, 0.2, flags | ops.PER_SAMPLE))
        y, stats = ops.batch_norm_act_fwd(x.detach(), w.detach(), b.detach(), None, None, 1e-5, 0.2, flags)
        torch.library.opcheck(ops.batch_norm_act_bwd,
                              (torch.randn_like(y), x.detach(), w.detach(), b.detach(), stats, 1e-5, 0.2, flags))
    # (the eager C++ op, ganengine_C::batch_norm_act: test_raw_op_opcheck)


_RAW_OP = pytest.mark.skipif(not (_ext.loaded() and _ext.has_kernel("batch_norm_act_fwd", "CPU")),
                             reason="the C++ extension (ganengine_C::batch_norm_act) is not built")
_ALL_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
                "test_aot_dispatch_dynamic")
# per mode of the C++ op: (training, running statistics given, num_batches_tracked given, momentum)
_RAW_MODES = {"train": (True, False, False, 0.1), "train_running": (True, True, True, 0.1),
              "train_cumulative": (True, True, True, None), "eval": (False, True, False, 0.1)}


def _raw_args(shape, layout, per_sample, mode):
    """Arguments of ganengine_C::batch_norm_act (x, w, b requiring grad) for one mode of _RAW_MODES."""
    training, running, count, momentum = _RAW_MODES[mode]
    x, w, b = make(shape, layout=layout, per_sample=per_sample)
    c = shape[1]
    rm, rv = (torch.randn(c), torch.rand(c) + 0.5) if running else (None, None)
    nbt = torch.tensor(3) if count else None
    flags = (ops.TRAINING if training else 0) | ops.APPLY_ACT | (ops.PER_SAMPLE if per_sample else 0)
    return (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), rm, rv, nbt, momentum, 1e-5, 0.2, flags)


@_RAW_OP
@pytest.mark.parametrize("shape,layout", [((3, 4, 5, 6), "nchw"), ((3, 4, 5, 6), "nhwc"), ((5, 4), "nchw")],
                         ids=["nchw", "channels_last", "nc"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["bn", "cond"])
@pytest.mark.parametrize("mode", list(_RAW_MODES))
def test_raw_op_opcheck(shape, layout, per_sample, mode):
    """The eager C++ op passes every opcheck test: schema (declared mutations), autograd
    registration, fake impl, and AOT dispatch with static and dynamic (symbolic) shapes, forward
    and backward: its checks and its C++ autograd read SymInt sizes, and a traced momentum=None
    update reads the batch count as a tensor."""
    torch.manual_seed(0)
    args = _raw_args(shape, layout, per_sample, mode)
    torch.library.opcheck(torch.ops.ganengine_C.batch_norm_act.default, args, test_utils=_ALL_OPCHECK)


@_RAW_OP
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_raw_op_traced_running_update(dynamic):
    """Traced by AOT autograd, the C++ op with momentum=None updates num_batches_tracked and the
    running statistics by the count it is given at run time (not one baked in at trace time), as
    the eager op does: y and the gradients bit for bit (the same kernels), the running statistics
    within the roundings of f * batch + (1 - f) * running in fp64 stored to fp32."""
    from functorch.compile import aot_function, nop

    op = torch.ops.ganengine_C.batch_norm_act.default
    torch.manual_seed(0)
    x, w, b, rm0, rv0, _, _, eps, slope, flags = _raw_args((3, 4, 5, 6), "nchw", True, "train_cumulative")
    gy = torch.randn(x.shape)
    xd, dims = x.detach().double(), [0, 2, 3]

    def step(x, w, b, rm, rv, nbt):
        return op(x, w, b, rm, rv, nbt, None, eps, slope, flags)

    compiled = aot_function(step, nop, dynamic=dynamic)
    for count in (3, 8):  # one trace, two counts: the factor 1 / (count + 1) is read at run time
        runs = []
        for fn in (step, compiled):
            state = (rm0.clone(), rv0.clone(), torch.tensor(count))
            y = fn(x, w, b, *state)
            runs.append(((y, *torch.autograd.grad(y, (x, w, b), gy)), state))
        (eager, (rm, rv, nbt)), (traced, (rm_t, rv_t, nbt_t)) = runs
        assert all(torch.equal(a, e) for a, e in zip(traced, eager))
        assert nbt_t.item() == nbt.item() == count + 1
        # both sides: f * batch + (1 - f) * running, a 2-term sum in fp64 (scale: |terms|), each
        # stored to fp32 (u(fp32) |want| per side)
        f = 1.0 / (count + 1)
        for got, want, run0, batch in ((rm_t, rm, rm0, xd.mean(dims)), (rv_t, rv, rv0, xd.var(dims))):
            scale = f * batch.abs() + (1 - f) * run0.double().abs()
            allowed = bound(scale, 2, torch.float64, c=2, out_dtype=torch.float32, ref=want.double(), out_round=2)
            assert ((got.double() - want.double()).abs() <= allowed).all()




# (torch: the composition on every route but torch.compile's, no custom op to compare with)
@pytest.mark.parametrize("backend", backend_params(["cpu", "triton"]))
@pytest.mark.parametrize("shape,layout", [((3, 4, 5, 7), "nchw"), ((2, 3, 1, 1), "nchw"), ((2, 5, 6, 3), "nhwc"),
                                          ((4, 3, 5), "strided")], ids=lambda v: str(v))
@pytest.mark.parametrize("per_sample", [False, True], ids=["bn", "cond"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_eager_route_matches_custom_op(monkeypatch, backend, shape, layout, per_sample, training):
    """The eager route (the C++ op with its C++ autograd on cpu / cuda, _TritonFn on triton: no
    custom-op layer) and the custom op (what torch.compile and any tracing sees) give the same bits:
    y, the fused backward, the create_graph backward and its double backward (WGAN-GP / R1), and on
    triton (where the public call itself takes the custom op when the call is not plain eager) the
    running statistics and the batch count."""
    monkeypatch.setattr(_dispatch, "lean_op", lambda *a, **k: None)  # the Python route (the CUDA path's)
    torch.manual_seed(0)
    x0, w0, b0 = make(shape, layout=layout, per_sample=per_sample)
    c = shape[1]
    rm0, rv0 = torch.randn(c), torch.rand(c) + 0.5
    gy = torch.randn(shape)
    flags = (ops.TRAINING if training else 0) | ops.APPLY_ACT | (ops.PER_SAMPLE if per_sample else 0)

    def run(route):
        x, w, b = (t.detach().clone().requires_grad_() for t in (x0, w0, b0))
        rm, rv, nbt = rm0.clone(), rv0.clone(), torch.tensor(3)
        with on_backend(backend), monkeypatch.context() as m:
            if route == "eager" or backend == "triton":
                if route == "custom_op":
                    m.setattr(ops, "_kernels_can_run", lambda *t: False)
                y = fused_fn(per_sample, rm, rv, training, None, nbt=nbt)(x, w, b)
                eager_node = "CppFunction" if backend == "cpu" else "_TritonFnBackward"
                assert (eager_node in autograd_node_names(y)) == (route == "eager")
                state = [rm, rv, nbt]
            else:  # cpu: the custom op itself (its running-statistics update rounds differently: not compared)
                y = ops.batch_norm_act_fwd(ops._dense(x), w, b, None if training else rm, None if training else rv,
                                           1e-5, 0.2, flags)[0]
                state = []
            grads = torch.autograd.grad(y, (x, w, b), gy, retain_graph=True)  # the fused backward
            again = torch.autograd.grad(y, (x, w, b), gy, create_graph=True)  # the reference composition's
            gg = torch.autograd.grad(sum((t * t).sum() for t in again), (x, w))
        return [y, *grads, *again, *gg], state

    (eager, se), (op, so) = run("eager"), run("custom_op")
    for a, b in zip(eager + se[:len(so)], op + so):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("backend", backend_params(["cpu", "triton"]))
@pytest.mark.parametrize("tracing_mode", ["real", "fake"])
def test_tracing_runs_a_traceable_op(monkeypatch, backend, tracing_mode):
    # triton under make_fx / FakeTensorMode / jit.trace used to run _TritonFn, whose kernels were
    # launched on tensors without storage: it now takes the custom op; cpu's C++ op traces as it is
    from torch.fx.experimental.proxy_tensor import make_fx

    monkeypatch.setattr(_dispatch, "lean_op", lambda *a, **k: None)
    x0, w0, b0 = make((2, 3, 4, 5))

    def step(x, w, b, rm, rv):
        y = GF.batch_norm_act(x, rm, rv, w, b, activation="leaky_relu")
        return (y, *torch.autograd.grad(y, (x, w, b), torch.ones_like(y)))

    def inputs():
        return [t.detach().clone().requires_grad_() for t in (x0, w0, b0)] + [torch.zeros(3), torch.ones(3)]

    op = "ganengine.batch_norm_act_fwd" if backend == "triton" else "ganengine_C.batch_norm_act"
    with on_backend(backend):
        ins = inputs()
        gm = make_fx(step, tracing_mode=tracing_mode)(*ins)
        assert op in str(gm.graph)
        if tracing_mode == "real":
            a, b = inputs(), inputs()
            for u, v in zip(list(gm(*a)) + a[3:], list(step(*b)) + b[3:]):  # outputs and running statistics
                assert torch.equal(u, v)
            traced = torch.jit.trace(lambda t: GF.batch_norm_act(t), (x0,), check_trace=False)
            assert op.replace(".", "::") in str(traced.graph)


class _Passthrough(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_modes_that_do_not_trace_keep_the_eager_route(monkeypatch):
    # a dispatch mode that only watches (the CUDA path's kernel counter ganengine.bench.traffic, a
    # FlopCounterMode) or a torch function mode sees the route a plain call takes: _TritonFn, with
    # the running statistics updated in its kernel, not the custom op's 6 torch ops
    if not ganengine.backends.serves("triton", torch.device("cpu")):
        pytest.skip("triton does not serve CPU tensors here")
    monkeypatch.setattr(_dispatch, "lean_op", lambda *a, **k: None)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    assert ops._kernels_can_run(x, None) and not ops._kernels_can_run(x.detach().as_subclass(_Sub))
    with on_backend("triton"):
        with _Passthrough() as mode:
            y = GF.batch_norm_act(x, torch.zeros(3), torch.ones(3))
        assert "_TritonFnBackward" in autograd_node_names(y)
        assert not [op for op in mode.ops if op.startswith("ganengine::") or op in ("aten::mul_", "aten::add_")]
        with torch.device("cpu"):
            assert "_TritonFnBackward" in autograd_node_names(GF.batch_norm_act(x))
        with FakeTensorMode() as fake:
            assert not ops._kernels_can_run(fake.from_tensor(x))


class _Sub(torch.Tensor):
    pass


class _SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = gnn.BatchNormAct2d(8, activation="leaky_relu")
        self.fc = nn.Linear(8, 6)
        self.norm1d = gnn.BatchNormAct1d(6)

    def forward(self, x):
        return self.norm1d(self.fc(self.norm(self.conv(x)).mean((2, 3))))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    net = _SmallNet()
    twin = copy.deepcopy(net)
    x = torch.randn(4, 3, 6, 6)
    with on_backend(backend):
        want = net(x)
        compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
        got = compiled(x)
        got.sum().backward()
        explained = torch._dynamo.explain(copy.deepcopy(net))(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert twin.norm.weight.grad is not None and twin.conv.weight.grad is not None
    # the compiled module updated its running statistics like the eager one (two calls vs one
    # each: the twin ran once under compile)
    torch.testing.assert_close(twin.norm.running_mean, net.norm.running_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(twin.norm.running_var, net.norm.running_var, atol=1e-6, rtol=1e-5)
    assert twin.norm.num_batches_tracked.item() == net.norm.num_batches_tracked.item() == 1
    assert explained.graph_break_count == 0


@pytest.mark.slow
def test_torch_compile_inductor():
    torch._dynamo.reset()
    net = _SmallNet()
    twin = copy.deepcopy(net)
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(torch.compile(twin, fullgraph=True)(x), net(x), atol=1e-5, rtol=1e-5)


def test_autocast_keeps_the_input_dtype():
    x, w, b = make((2, 3, 5, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y32 = GF.batch_norm_act(x, None, None, w, b)
        y16 = GF.batch_norm_act(x.bfloat16(), None, None, w, b)
    assert y32.dtype == torch.float32 and y16.dtype == torch.bfloat16


def test_errors_name_the_argument():
    x = torch.randn(2, 3, 4, 4)
    for backend in ("torch", "cpu"):
        if not ganengine.backends.serves(backend, x.device):
            continue
        with on_backend(backend):
            with pytest.raises(ValueError, match="weight must have shape"):
                GF.batch_norm_act(x, None, None, torch.ones(4))
            with pytest.raises(ValueError, match=r"gain must have shape \(N, C\)"):
                GF.conditional_batch_norm_act(x, torch.ones(3), torch.ones(2, 3))
            with pytest.raises(ValueError, match="activation must be one of"):
                GF.batch_norm_act(x, activation="gelu")
            with pytest.raises(TypeError, match="fp16, bf16, fp32 or fp64"):
                GF.batch_norm_act(torch.ones(2, 3, dtype=torch.int64))
            with pytest.raises(ValueError, match="more than 1 value per channel"):
                GF.batch_norm_act(torch.randn(1, 3, 1, 1))
            with pytest.raises(RuntimeError, match="running_mean must be defined"):
                GF.batch_norm_act(x, training=False)
            with pytest.raises(ValueError, match="given together"):
                GF.batch_norm_act(x, torch.zeros(3))
            with pytest.raises(ValueError, match=r"\(N, C\) or \(N, C, \*spatial\)"):
                GF.batch_norm_act(torch.randn(3))
            with pytest.raises(TypeError, match="running_mean must be a Tensor"):
                GF.batch_norm_act(x, [0.0] * 3, torch.ones(3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_batches_tracked_and_negative_slope_are_checked(backend):
    """num_batches_tracked: a one-count tensor on x's device, on every backend (a (2,) count was
    counted on some and refused on others; a meta count accepted silently); negative_slope named."""
    x, rm, rv = torch.randn(3, 4, 5, 5), torch.zeros(4), torch.ones(4)
    with on_backend(backend):
        with pytest.raises(TypeError, match="num_batches_tracked must be a Tensor"):
            GF.batch_norm_act(x, rm.clone(), rv.clone(), num_batches_tracked=0)
        with pytest.raises(ValueError, match="num_batches_tracked must hold one count"):
            GF.batch_norm_act(x, rm.clone(), rv.clone(), num_batches_tracked=torch.zeros(2, dtype=torch.long))
        with pytest.raises(ValueError, match="num_batches_tracked is on meta"):
            GF.batch_norm_act(x, rm.clone(), rv.clone(), num_batches_tracked=torch.zeros((), dtype=torch.long,
                                                                                             device="meta"))
        with pytest.raises(TypeError, match="negative_slope must be a number"):
            GF.batch_norm_act(x, rm.clone(), rv.clone(), activation="leaky_relu", negative_slope="a")
        nbt = torch.tensor(3)
        GF.batch_norm_act(x, rm, rv, num_batches_tracked=nbt)
        assert int(nbt) == 4
        # (read only to count a training batch: eval calls ignore it on every route, as the C++ op)
        GF.batch_norm_act(x, rm, rv, training=False, num_batches_tracked=torch.zeros(2, dtype=torch.long))


# ------------------------------------------------------------------ modules
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_module_matches_batchnorm2d(backend, momentum, affine, track):
    ref = nn.BatchNorm2d(5, momentum=momentum, affine=affine, track_running_stats=track)
    if affine:
        with torch.no_grad():
            ref.weight.normal_()
            ref.bias.normal_()
    fused = gnn.BatchNormAct2d(5, momentum=momentum, affine=affine, track_running_stats=track)
    fused.load_state_dict(ref.state_dict())
    assert list(fused.state_dict().keys()) == list(ref.state_dict().keys())
    with on_backend(backend):
        for _ in range(2):
            x = torch.randn(3, 5, 4, 3) * 3 + 1
            torch.testing.assert_close(fused(x), F.relu(ref(x)), atol=2e-5, rtol=2e-5)
        fused.eval()
        ref.eval()
        x = torch.randn(2, 5, 4, 4)
        torch.testing.assert_close(fused(x), F.relu(ref(x)), atol=2e-5, rtol=2e-5)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, atol=1e-6, rtol=1e-6)
    back = nn.BatchNorm2d(5, momentum=momentum, affine=affine, track_running_stats=track)
    back.load_state_dict(fused.state_dict())  # round trip


def test_eval_without_activation_is_eagers_batch_norm_under_auto():
    """An eval-mode fused batch norm without an activation is one ATen op with nothing to fuse: under
    backend 'auto' it runs F.batch_norm itself (eager's bits, eager's host cost: fuse() puts
    FusedBatchNorm2d where a lone nn.BatchNorm2d was); an explicit backend still runs its kernels, and
    dtypes eager's batch norm would not take as given (fp32 statistics beside bf16 x) the fused op."""
    from ganengine.nn.batch_norm_act import FusedBatchNorm1d, FusedBatchNorm2d
    from ganengine.ops import _dispatch

    for ref, shape in ((nn.BatchNorm2d(6), (2, 6, 5, 3)), (nn.BatchNorm1d(6), (4, 6)), (nn.BatchNorm1d(6), (3, 6, 7))):
        with torch.no_grad():
            ref.running_mean.normal_()
            ref.running_var.uniform_(0.5, 2.0)
            ref.weight.normal_()
            ref.bias.normal_()
        ref.eval()
        fused = (FusedBatchNorm2d if isinstance(ref, nn.BatchNorm2d) else FusedBatchNorm1d).from_modules(ref, None).eval()
        x = torch.randn(shape) * 3 + 1
        if len(shape) == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        _dispatch.last_used.pop("batch_norm_act", None)
        with on_backend("auto"), torch.autograd.profiler.profile() as prof:
            y = fused(x)
        assert torch.equal(y, ref(x)) and y.stride() == ref(x).stride()
        assert "batch_norm_act" not in _dispatch.last_used
        assert not any("ganengine" in e.name for e in prof.function_events)
        if _ext.loaded():
            with on_backend("cpu"):
                y = fused(x)
            assert _dispatch.last_used["batch_norm_act"] == "cpu"
            torch.testing.assert_close(y, ref(x), atol=2e-5, rtol=2e-5)
    # (training mode and the activations keep the fused op, as before)
    bf = FusedBatchNorm2d(4).eval()
    x = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)
    _dispatch.last_used.pop("batch_norm_act", None)
    with on_backend("auto"):
        y = bf(x)
    assert y.dtype == torch.bfloat16 and "batch_norm_act" in _dispatch.last_used


@pytest.mark.parametrize("shape", [(6, 4), (5, 4, 7)], ids=["NC", "NCL"])
def test_batchnormact1d_matches_batchnorm1d(shape):
    ref, fused = nn.BatchNorm1d(4), gnn.BatchNormAct1d(4, activation="leaky_relu", negative_slope=0.1)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(shape) + 1
    torch.testing.assert_close(fused(x), F.leaky_relu(ref(x), 0.1), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(fused.running_var, ref.running_var)
    with pytest.raises(ValueError, match="expected 2D or 3D"):
        fused(torch.randn(2, 4, 3, 3))


def test_conditional_module_with_biggan_buffer_names():
    """ccbn: F.batch_norm(x, stored_mean, stored_var, None, None, training, 0.1, eps) * gain + bias, ReLU."""
    m = gnn.ConditionalBatchNormAct2d(4, running_mean_name="stored_mean", running_var_name="stored_var",
                                      count_batches=False)
    assert sorted(m.state_dict().keys()) == ["stored_mean", "stored_var"]
    stored_mean, stored_var = torch.zeros(4), torch.ones(4)
    for training in (True, True, False):
        m.train(training)
        x, gain, bias = torch.randn(3, 4, 5, 5) + 1, 1 + torch.randn(3, 4), torch.randn(3, 4)
        want = F.relu(F.batch_norm(x, stored_mean, stored_var, None, None, training, 0.1, 1e-5)
                      * gain.view(3, 4, 1, 1) + bias.view(3, 4, 1, 1))
        torch.testing.assert_close(m(x, gain.view(3, 4, 1, 1), bias.view(3, 4, 1, 1)), want, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(m.stored_mean, stored_mean)
        torch.testing.assert_close(m.stored_var, stored_var)
    counted = gnn.ConditionalBatchNormAct2d(4, momentum=None)
    counted(torch.randn(2, 4, 3, 3), torch.ones(2, 4), torch.zeros(2, 4))
    assert counted.num_batches_tracked.item() == 1


# ------------------------------------------------------------------ ganengine.fuse
def _dcgan_like(nz=8, ngf=4):
    """pytorch/examples DCGAN generator's layer pattern, and pix2pix's D block pattern."""
    return nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
        nn.Conv2d(ngf * 2, ngf, 3, 1, 1, bias=False), nn.BatchNorm2d(ngf), nn.LeakyReLU(0.2, True),
        nn.Flatten(), nn.Linear(ngf * 64, 16), nn.BatchNorm1d(16), nn.ReLU())


def test_fuse_shares_parameters_and_trains_like_the_original():
    torch.manual_seed(0)
    net = _dcgan_like()
    twin = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)  # built before fuse()
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    ids = {id(p) for p in net.parameters()} | {id(b) for b in net.buffers()}
    fused, report = ganengine.fuse(net, inplace=True, return_report=True)
    assert fused is net
    assert report.get("batch_norm+act") == 3 and report.get("batch_norm1d+act") == 1
    assert {id(p) for p in fused.parameters()} | {id(b) for b in fused.buffers()} == ids
    assert list(fused.state_dict().keys()) == list(twin.state_dict().keys())
    assert sum(isinstance(m, (gnn.BatchNormAct2d, gnn.BatchNormAct1d)) for m in fused.modules()) == 4
    for _ in range(3):
        z = torch.randn(4, 8, 1, 1)
        for model, o in ((fused, opt), (twin, opt_twin)):
            o.zero_grad()
            model(z).square().mean().backward()
            o.step()
    for (name, p), (_, q) in zip(twin.state_dict().items(), fused.state_dict().items()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=name)
    fused.eval()
    twin.eval()
    z = torch.randn(2, 8, 1, 1)
    torch.testing.assert_close(fused(z), twin(z), atol=1e-5, rtol=1e-4)


def test_fuse_declines_what_it_cannot_represent():
    class MyBN(nn.BatchNorm2d):
        pass

    hooked = nn.BatchNorm2d(3)
    hooked.register_forward_hook(lambda m, i, o: None)
    act_hooked = nn.ReLU()
    act_hooked.register_forward_pre_hook(lambda m, i: None)
    param = nn.BatchNorm2d(3)
    torch.nn.utils.parametrize.register_parametrization(param, "weight", nn.Identity())
    net = nn.Sequential(MyBN(3), nn.ReLU(), hooked, nn.ReLU(), nn.BatchNorm2d(3), act_hooked, param, nn.ReLU(),
                        nn.SyncBatchNorm(3), nn.ReLU(), nn.BatchNorm2d(3), nn.Sigmoid())
    fused, report = ganengine.fuse(net, return_report=True)
    assert report.get("batch_norm+act", 0) == 0
    # no pair fused; lone plain norms may run as BatchNormAct2d(activation="none")
    assert not any(isinstance(m, gnn.BatchNormAct2d) and m.activation != "none" for m in fused.modules())
    assert type(fused[0]) is MyBN and type(fused[2]) is nn.BatchNorm2d and type(fused[8]) is nn.SyncBatchNorm


# ------------------------------------------------------------------ DDP (gloo, 2 processes on CPU)
def _ddp_worker(rank, world, init_file, out_dir, backend):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1))
    fused = ganengine.fuse(copy.deepcopy(plain))  # fuse() shares plain's Parameters: train a copy
    results = {}
    for name, model in (("plain", plain), ("fused", fused)):
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        torch.manual_seed(100 + rank)  # each process its own batch
        with ganengine.use_backend(backend):
            for _ in range(2):
                opt.zero_grad()
                ddp(torch.randn(4, 3, 5, 5) + rank).square().mean().backward()
                opt.step()
        results[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


# one backend: the C++ op when it is built (the eager route a DDP user takes), else the composition
@pytest.mark.parametrize("backend", ["cpu" if ganengine.backends.serves("cpu", torch.device("cpu")) else "torch"])
def test_ddp_gloo_statistics_per_process(backend):
    """Under DDP each process normalises with its own batch's statistics (no SyncBatchNorm);
    gradients are all-reduced and rank 0's buffers broadcast: the fused model ends where the
    nn.BatchNorm2d model ends, on both ranks."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), tmp, backend), nprocs=2, join=True)
        res = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for r in range(2):
        for key, value in res[r]["plain"].items():
            torch.testing.assert_close(res[r]["fused"][key], value, atol=1e-5, rtol=1e-4, msg=f"rank {r} {key}")
    torch.testing.assert_close(res[0]["fused"]["0.weight"], res[1]["fused"]["0.weight"])


def test_auto_order_variant_by_map_size():
    """On CUDA, auto takes the CUDA C++ kernels first for NCHW maps of at most SMALL_MAP elements
    per channel ("small"), Triton first otherwise: the variant read from the call's shape and layout."""
    v = ops._variant
    assert ops.SMALL_MAP == 4096
    assert v(torch.empty(1, 256, 64, 64)) == "small"  # 4096 per channel: the measured point
    assert v(torch.empty(1, 64, 64, 65)) is None  # 4160 per channel
    assert v(torch.empty(64, 512, 4, 4)) == "small"  # DCGAN's: 1024 per channel
    assert v(torch.empty(2, 3, 5)) == "small"  # (N, C, L)
    assert v(torch.empty(1, 64, 128, 128)) is None
    assert v(torch.empty(1, 8, 8, 8).to(memory_format=torch.channels_last)) is None
    assert v(torch.empty(8, 4, 6, 6)[:, :, ::2]) is None  # strided: copied to NCHW, Triton's
    assert v(torch.empty(256, 1024)) is None  # (N, C): not measured, Triton first


# ------------------------------------------------------------------ CUDA tensors (need a GPU)
GPU_SHAPES = [(2, 3, 5, 7), (3, 4, 1, 1), (64, 512, 4, 4), (16, 128, 32, 32), (1, 64, 128, 128), (256, 1024)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["bn", "cond"])
def test_gpu_backends(backend, shape, dtype, layout, per_sample):
    if layout == "nhwc" and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    x, w, b = (t.cuda() for t in make(shape, dtype=dtype, layout=layout, per_sample=per_sample))
    c = shape[1]
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    rmr, rvr = rm.double(), rv.double()
    g = torch.randn(shape, device="cuda").to(dtype)
    ref = _run(lambda *a: reference(*a, rmr, rvr, True, 0.1, 1e-5, "leaky_relu", 0.2, per_sample), (x, w, b), g)
    with on_backend(backend):
        out = _run(fused_fn(per_sample, rm, rv), (x, w, b), g)
    check_all(x.cpu(), w.cpu(), b.cpu(), (out[0].cpu(), [t.cpu() for t in out[1]]),
              (ref[0].cpu(), [t.cpu() for t in ref[1]]), g.cpu(), True, 1e-5, per_sample, name=backend)
    check_running(x.cpu(), rm.cpu(), rv.cpu(), rmr.cpu(), rvr.cpu(), 0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("per_sample", [False, True], ids=["bn", "cond"])
def test_gpu_auto_order_takes_the_cuda_op_on_small_maps(per_sample):
    """auto on CUDA: a small NCHW map runs the CUDA C++ op (the same bits as backend "cuda"), a
    large one and a channels-last one the Triton kernels (the same bits as backend "triton")."""
    from ganengine.ops import _dispatch

    op = "conditional_batch_norm_act" if per_sample else "batch_norm_act"
    for shape, layout, expected in (((4, 32, 8, 8), "nchw", "cuda"), ((2, 8, 64, 80), "nchw", "triton"),
                                    ((4, 32, 8, 8), "nhwc", "triton")):
        x, w, b = (t.cuda() for t in make(shape, layout=layout, per_sample=per_sample))
        g = torch.randn(shape, device="cuda")
        runs = {}
        for backend in ("auto", expected):
            rm, rv = torch.zeros(shape[1], device="cuda"), torch.ones(shape[1], device="cuda")
            with on_backend(backend):
                out = _run(fused_fn(per_sample, rm, rv), (x, w, b), g)
            if backend == "auto":
                assert _dispatch.last_used[op] == expected, (shape, layout)
            runs[backend] = (out[0], *out[1], rm, rv)
        for a, c in zip(runs["auto"], runs[expected]):
            assert torch.equal(a, c), (shape, layout)
