"""Fixes s17a.

1. ``InstanceNormAct2d(track_running_stats=True)`` in eval (``use_input_stats=False``) ran a Python
   composition (x.to, * scale, + shift, activation, .to): more full-size passes than eager
   ``nn.InstanceNorm2d`` + ``LeakyReLU(inplace=True)`` and 1.2-2x its host time at real sizes. It is
   ``F.batch_norm`` (eval) on x plus the activation in place now: eager's numbers in eager's passes.
2. ``ganengine.fuse`` of a PatchDiscriminator built with ``fused=False`` fused nothing and reported
   nothing (skipped as "already fused" while its forward ran the plain layers); it turns the
   instance's fused forward on now and lists the fused groups in the report.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import ganengine
import ganengine.nn as gnn
from ganengine.models import define_D
from ganengine.ops.norm_act import instance_norm_act
from tests._backends import backend_params, on_backend
from tests._model_bounds import assert_normwise, census
from tests._tolerance import assert_within_bound, unit_roundoff

BACKENDS = backend_params()


# ============================================================================= 1. eval with running statistics
class FullSizeOps(TorchDispatchMode):
    """The aten ops (views excluded) that write a tensor of ``numel`` elements: the full passes."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if any(isinstance(t, torch.Tensor) and t.numel() == self.numel for t in outs):
                self.ops.append(str(func))
        return out


def _stats_pair(c, affine, act, dtype=torch.float32):
    eager = nn.Sequential(nn.InstanceNorm2d(c, affine=affine, track_running_stats=True),
                          nn.LeakyReLU(0.2, True) if act == "leaky_relu" else nn.ReLU(True))
    ours = gnn.InstanceNormAct2d(c, affine=affine, track_running_stats=True, activation=act)
    with torch.no_grad():
        eager[0].running_mean.uniform_(-1, 1)
        eager[0].running_var.uniform_(0.5, 2)
        if affine:
            eager[0].weight.uniform_(0.5, 1.5)
            eager[0].bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(eager[0].state_dict())
    return eager.to(dtype).eval(), ours.to(dtype).eval()


def _full_passes(fn, x, backward):
    mode = FullSizeOps(x.numel())
    with mode:
        y = fn(x)
        if backward:
            y.backward(torch.ones_like(y))
    return mode.ops


@pytest.mark.parametrize("act", ["leaky_relu", "relu"])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_eval_running_stats_makes_no_more_full_passes_than_eager(backward, affine, act):
    """The cost rule, as the count that sets it at real sizes (timings: /tmp/acc/fix17a/bench_eval.py):
    no more full-size passes over the map than eager's norm + in-place activation (forward: the
    batch norm and the activation; backward: their two). The composition made 3 forward passes
    (x * scale, + shift, the activation) and, with affine parameters, 3 backward ones."""
    torch.manual_seed(0)
    eager, ours = _stats_pair(6, affine, act)
    x = torch.randn(2, 6, 8, 8)
    want = _full_passes(eager, x.clone().requires_grad_(backward), backward)
    got = _full_passes(ours, x.clone().requires_grad_(backward), backward)
    assert len(got) <= len(want), (got, want)


def _exact(x, w, b, rm, rv, eps, act):
    """The fp64 value of act((x - rm) / sqrt(rv + eps) * w + b), and |terms| for the bound."""
    alpha = torch.rsqrt(rv.double() + eps) * (w.double() if w is not None else 1.0)
    beta = (b.double() if b is not None else 0.0) - rm.double() * alpha
    z = x.double() * alpha[:, None, None] + beta[:, None, None]
    y = {"leaky_relu": lambda t: F.leaky_relu(t, 0.2), "relu": F.relu, "none": lambda t: t}[act](z)
    scale = (x.double() * alpha[:, None, None]).abs() + (rm.double() * alpha).abs()[:, None, None] \
        + ((b.double().abs() if b is not None else 0.0) + 0.0 * alpha)[:, None, None]
    return y, scale


CASES = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float16, torch.float32),
         (torch.bfloat16, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
         (torch.float32, torch.float64)]  # (the last: fp64 running statistics, F.batch_norm's mixed rule refuses)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("act", ["leaky_relu", "relu", "none"])
@pytest.mark.parametrize("dtype,pdtype", CASES, ids=[f"{a}-{b}".replace("torch.", "") for a, b in CASES])
def test_eval_running_stats_values_dtypes_layouts(dtype, pdtype, act, layout, backend):
    """Every dtype pair the op documents, every layout: the exact value within the map's
    roundings. The affine map alpha = w rsqrt(rv + eps), beta = b - rm alpha, x alpha + beta costs
    at most 6 roundings of the accumulation dtype (fp32; fp64 for fp64) over |x alpha| + |rm alpha|
    + |b| (c = 8 with rsqrt's own ulp); the output's rounding and, for a half / bfloat16 x, the
    activation's second one (eager's: it runs on the rounded norm output) give out_round = 2."""
    torch.manual_seed(0)
    c = 5
    x = (torch.randn(2, c, 6, 7) * 3 + 0.5).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x.transpose(2, 3)
    wdtype = dtype if pdtype == torch.float64 else pdtype  # (weight / bias: x's dtype or fp32 only)
    w, b = torch.rand(c).add(0.5).to(wdtype), torch.randn(c).to(wdtype)
    rm, rv = torch.randn(c).to(pdtype), torch.rand(c).add(0.3).to(pdtype)
    with on_backend(backend):
        y = instance_norm_act(x, w, b, rm, rv, False, 0.1, 1e-5, act, 0.2)
        y_none = instance_norm_act(x, None, None, rm, rv, False, 0.1, 1e-5, act, 0.2)
    assert y.dtype == dtype and y.shape == x.shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for got, (ww, bb) in ((y, (w, b)), (y_none, (None, None))):
        ref, scale = _exact(x, ww, bb, rm, rv, 1e-5, act)
        assert_within_bound(got, ref, scale, n=1, acc_dtype=acc, c=8, out_round=2.0, name=f"{dtype} {layout}")
    if pdtype == dtype or (pdtype == torch.float32 and dtype in (torch.float16, torch.bfloat16)):
        # (the mixes F.instance_norm takes: its numbers, bit for bit where x's layout is its own)
        e = F.instance_norm(x, rm, rv, w, b, False, 0.1, 1e-5)
        e = {"leaky_relu": lambda t: F.leaky_relu(t, 0.2), "relu": F.relu, "none": lambda t: t}[act](e)
        if layout == "contiguous":
            torch.testing.assert_close(y, e, rtol=0, atol=0)


def test_eval_running_stats_channels_last_layout_kept_by_default_and_contiguous_from_fuse():
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    m = gnn.InstanceNormAct2d(4, affine=True, track_running_stats=True).eval()
    assert m(x).is_contiguous(memory_format=torch.channels_last)
    fused = gnn.InstanceNormAct2d.from_modules(nn.InstanceNorm2d(4, affine=True, track_running_stats=True).eval(),
                                               nn.LeakyReLU(0.2))
    assert fused(x).is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act,slope", [("leaky_relu", 0.2), ("relu", 0.0), ("none", 1.0), ("leaky_relu", -0.3)])
def test_eval_running_stats_gradients(act, slope, dtype, backend):
    """x / weight / bias gradients against fp64 autograd of the exact map: dx = g act'(z) alpha
    (elementwise, c = 8 as the forward's alpha plus the product); dw = sum g act'(z) xhat and
    db = sum g act'(z) over N H W (length n = N H W). A negative slope runs the activation out of
    place (autograd cannot invert it from the output); double backward works."""
    torch.manual_seed(1)
    c = 4
    x = torch.randn(3, c, 5, 6, dtype=dtype)
    w, b = torch.rand(c, dtype=dtype).add(0.5), torch.randn(c, dtype=dtype)
    rm, rv = torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype).add(0.3)
    g = torch.randn(3, c, 5, 6, dtype=dtype)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    with on_backend(backend):
        y = instance_norm_act(xs, ws, bs, rm, rv, False, 0.1, 1e-5, act, slope)
        gx, gw, gb = torch.autograd.grad(y, (xs, ws, bs), g, create_graph=True)
        (gx.pow(2).sum() + gw.pow(2).sum()).backward()  # double backward
    assert ws.grad is not None and torch.isfinite(ws.grad).all()
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    alpha = torch.rsqrt(rv.double() + 1e-5) * w64
    z = x64 * alpha[:, None, None] + (b64 - rm.double() * alpha)[:, None, None]
    y64 = F.leaky_relu(z, slope) if act == "leaky_relu" else F.relu(z) if act == "relu" else z
    ex, ew, eb = torch.autograd.grad(y64, (x64, w64, b64), g.double())
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    xhat = (x.double() - rm.double()[:, None, None]) * torch.rsqrt(rv.double() + 1e-5)[:, None, None]
    d = (g.double().abs() * max(abs(slope), 1.0))
    assert_within_bound(gx, ex, d * alpha.detach().abs()[:, None, None], n=1, acc_dtype=acc, c=8, name="dx")
    n = 3 * 5 * 6
    assert_within_bound(gw, ew, (d * xhat.abs()).sum((0, 2, 3)), n=n, acc_dtype=acc, c=4, name="dw")
    assert_within_bound(gb, eb, d.sum((0, 2, 3)), n=n, acc_dtype=acc, c=2, name="db")


def test_eval_running_stats_edge_cases_keep_the_composition():
    """What F.batch_norm does not take goes on as before: running statistics that need a gradient
    (theirs flows), a tensor eps, an empty map, one pixel (served in eval, as torch)."""
    torch.manual_seed(2)
    x = torch.randn(2, 3, 4, 4)
    rm, rv = torch.randn(3, requires_grad=True), torch.rand(3).add(0.5).requires_grad_()
    y = instance_norm_act(x, None, None, rm, rv, False, activation="none")
    y.sum().backward()
    assert rm.grad is not None and rv.grad is not None
    ref, scale = _exact(x, None, None, rm.detach(), rv.detach(), 1e-5, "none")
    assert_within_bound(y, ref, scale, n=1, acc_dtype=torch.float32, c=8)
    y_t = instance_norm_act(x, None, None, rm.detach(), rv.detach(), False, eps=torch.tensor(1e-5), activation="none")
    assert_within_bound(y_t, ref, scale, n=1, acc_dtype=torch.float32, c=8)
    assert instance_norm_act(torch.randn(0, 3, 4, 4), None, None, rm.detach(), rv.detach(), False).shape == (0, 3, 4, 4)
    norm = nn.InstanceNorm2d(3, track_running_stats=True, affine=True).eval()
    with torch.no_grad():
        norm.running_var.fill_(2.0)
    one = torch.randn(2, 3, 1, 1)
    fused = gnn.InstanceNormAct2d.from_modules(norm, None)
    assert_within_bound(fused(one), norm(one), norm(one).abs() + 1, n=1, acc_dtype=torch.float32, c=8)
    with pytest.raises(ValueError, match="use_input_stats=False needs running_mean"):
        instance_norm_act(x, use_input_stats=False)


# ============================================================================= 2. fuse() of a fused=False PatchDiscriminator
def _ganengine_nodes(y):
    seen, todo, n = set(), [y.grad_fn], 0
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        n += "ganengine" in type(f).__name__.lower() or "ganengine" in f.name().lower()
        todo += [g for g, _ in f.next_functions]
    return n


EXPECTED = {
    "instance": [("model.0", "conv2d+leaky_relu"), ("model.2", "conv2d+instance_norm+act"),
                 ("model.5", "conv2d+instance_norm+act"), ("model.8", "conv2d+instance_norm+act"),
                 ("model.11", "conv2d")],
    "batch": [("model.0", "conv2d+leaky_relu"), ("model.2", "conv2d"), ("model.3", "batch_norm+act"),
              ("model.5", "conv2d"), ("model.6", "batch_norm+act"), ("model.8", "conv2d"), ("model.9", "batch_norm+act"),
              ("model.11", "conv2d")],
}


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_fuse_of_an_unfused_patch_discriminator_runs_the_fused_ops_and_reports_them(norm):
    torch.manual_seed(0)
    plain = define_D(3, 4, "basic", norm=norm, fused=False)
    built = define_D(3, 4, "basic", norm=norm, fused=True)
    fused, report = ganengine.fuse(plain, return_report=True)
    assert sorted(report.replaced) == sorted(EXPECTED[norm]), report.replaced
    assert not report.declined
    assert type(fused) is gnn.PatchDiscriminator and fused.fused and not plain.fused  # (a copy: plain is kept)
    assert built.fused_groups() == [(int(w.split(".")[1]), r) for w, r in EXPECTED[norm]]
    # the same keys and the same tensors (fuse()'s contract)
    assert list(fused.state_dict()) == list(plain.state_dict())
    for (k, a), b in zip(plain.state_dict().items(), fused.state_dict().values()):
        assert a is b or a.data_ptr() == b.data_ptr(), k
    x = torch.randn(2, 3, 24, 26)
    xp, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    with census(plain, winograd=True) as cen:
        want = plain(xp)
    g = torch.randn_like(want)
    (want * g).sum().backward()  # (first: the two share the batch norms' running statistics)
    got = fused(xf)
    (got * g).sum().backward()
    assert _ganengine_nodes(got) == _ganengine_nodes(built(x.clone().requires_grad_())) > 0
    assert _ganengine_nodes(want) == 0
    # both fp32, each within the normwise network bound of the exact value (tests/_model_bounds.py)
    assert_normwise(got, want, cen, name="y")
    assert_normwise(xf.grad, xp.grad, cen, backward=True, name="dx")


def test_fuse_of_an_unfused_patch_discriminator_in_a_wrapper_inplace_and_unbatched():
    torch.manual_seed(0)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.D = define_D(3, 4, "basic", norm="instance", fused=False)

        def forward(self, x):
            return self.D(x)

    w = Wrap()
    fused, report = ganengine.fuse(w, inplace=True, return_report=True)
    assert fused.D is w.D and w.D.fused  # in place: the caller's instance
    assert [where for where, _ in report.replaced] == ["D." + e for e, _ in EXPECTED["instance"]]
    x = torch.randn(3, 24, 24)  # unbatched, as nn.Conv2d takes it: the layers as modules
    plain = define_D(3, 4, "basic", norm="instance", fused=False)
    plain.load_state_dict(w.D.state_dict())
    torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected input"):
        fused(torch.randn(1, 4, 24, 24))


def test_fuse_keeps_fused_patch_discriminators_skipped_and_declines_a_hooked_model():
    d = define_D(3, 4, "basic", norm="instance", fused=True)
    fused, report = ganengine.fuse(d, return_report=True)
    assert not report.replaced and not report.declined and fused.fused
    assert [type(m) for m in fused.model] == [type(m) for m in d.model]  # children not rewritten
    hooked = define_D(3, 4, "basic", norm="instance", fused=False)
    seen = []
    hooked.model.register_forward_hook(lambda m, i, o: seen.append(1))
    fused, report = ganengine.fuse(hooked, return_report=True)
    assert not report.replaced and [d.rule for d in report.declined] == ["patch_discriminator"]
    assert not fused.fused
    fused(torch.randn(1, 3, 24, 24))
    assert seen == [1]  # the hook on `model` still sees its call
