"""The conv family under autocast runs eager's own call (ops/_conv_common.eager_autocast).

Under torch.autocast every route of GF.conv2d / conv_transpose2d / conv3x3 / conv2d_act runs ATen's
convolution on operands cast to the autocast dtype (the GEMM / Winograd kernels are fp32 only), but
the Python route cast every operand with a plain .to() per call (ATen's autocast caches a weight's
cast for the region) behind ~50 us of checks: 1.3-1.5x eager's host time at DCGAN's and pix2pix's
layers. A plain call now runs ATen's op itself, as eager code calls it: these tests check its
numbers, gradients and layouts against eager bit for bit, that it issues eager's aten ops and no
others (no per-call weight cast, no Python route), for the public functions, the ganengine.nn
modules and ganengine.fuse's modules; and that bad input, other backends and what ATen's autocast
would treat otherwise (fp64) keep the route and its errors.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ganengine
import ganengine.functional as GF
import ganengine.nn as gnn
from ganengine.backends import strict
from ganengine.bench.traffic import EagerTraffic
from ganengine.ops import _dispatch
from ganengine.ops import conv as conv_ops
from ganengine.ops import conv3x3 as conv3x3_ops
from ganengine.ops import conv_act as conv_act_ops
from ganengine.ops._conv_common import out_format


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a slice: neither layout dense
        return torch.cat([t, t], dim=3)[..., ::2]
    return t


def _leaves(*ts):
    """Leaf copies requiring grad, strides kept (a weight requiring grad is what autocast caches)."""
    out = []
    for t in ts:
        if t is None:
            out.append(None)
            continue
        leaf = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t)
        out.append(nn.Parameter(leaf))
    return out


def _run(fn, x, w, b):
    """fn's output, its output layout, and the gradients of all inputs, under bf16 autocast."""
    x, w, b = _leaves(x, w, b)
    with _bf16():
        y = fn(x, w, b)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], gy)
    return y, out_format(y), grads


# (ganengine call, eager composition, x shape, weight shape, bias?)
CASES = {
    "conv2d k4 s2": (lambda x, w, b: GF.conv2d(x, w, b, 2, 1),
                     lambda x, w, b: F.conv2d(x, w, b, 2, 1), (1, 32, 16, 16), (64, 32, 4, 4), True),
    "conv2d pairs no bias": (lambda x, w, b: GF.conv2d(x, w, b, (2, 1), [1, 0]),
                             lambda x, w, b: F.conv2d(x, w, b, (2, 1), (1, 0)), (2, 3, 9, 8), (5, 3, 4, 4), False),
    "conv_transpose2d 1x1": (lambda x, w, b: GF.conv_transpose2d(x, w, b, 1, 0),
                             lambda x, w, b: F.conv_transpose2d(x, w, b, 1, 0), (1, 100, 1, 1), (100, 64, 4, 4),
                             False),
    "conv_transpose2d output_padding": (lambda x, w, b: GF.conv_transpose2d(x, w, b, 2, 1, 1),
                                        lambda x, w, b: F.conv_transpose2d(x, w, b, 2, 1, 1), (2, 3, 5, 6),
                                        (3, 4, 4, 4), True),
    "conv3x3 zeros": (lambda x, w, b: GF.conv3x3(x, w, b, 1, "zeros"),
                      lambda x, w, b: F.conv2d(x, w, b, 1, 1), (2, 8, 7, 9), (6, 8, 3, 3), True),
    "conv3x3 reflect no bias": (lambda x, w, b: GF.conv3x3(x, w, b, 1, "reflect"),
                                lambda x, w, b: F.conv2d(F.pad(x, (1,) * 4, mode="reflect"), w, b),
                                (2, 8, 7, 9), (6, 8, 3, 3), False),
    "conv2d_act leaky": (lambda x, w, b: GF.conv2d_act(x, w, b, 2, 1, 0.2),
                         lambda x, w, b: F.leaky_relu(F.conv2d(x, w, b, 2, 1), 0.2), (2, 16, 10, 10),
                         (32, 16, 4, 4), True),
    "conv2d_act relu no bias": (lambda x, w, b: GF.conv2d_act(x, w, b, 1, 1, 0),
                                lambda x, w, b: F.relu(F.conv2d(x, w, b, 1, 1)), (1, 16, 8, 8), (8, 16, 3, 3),
                                False),
    "conv2d_act negative slope": (lambda x, w, b: GF.conv2d_act(x, w, b, 2, 1, -0.5),
                                  lambda x, w, b: F.leaky_relu(F.conv2d(x, w, b, 2, 1), -0.5), (1, 16, 8, 8),
                                  (8, 16, 4, 4), True),
}


def _tensors(case, layout, seed=0):
    _, _, xs, ws, bias = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = _layout(torch.randn(xs, generator=g), layout)
    w = torch.randn(ws, generator=g) * 0.2
    b = torch.randn(ws[1] if "transpose" in case else ws[0], generator=g) if bias else None
    return x, w, b


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("case", list(CASES))
def test_public_functions_match_eager_bitwise_under_autocast(case, layout):
    """Output (dtype, values, ganengine's layout rule out_format(x)) and every gradient: eager's bits."""
    fn, ref, *_ = CASES[case]
    x, w, b = _tensors(case, layout)
    got, want = _run(fn, x, w, b), _run(ref, x, w, b)
    assert got[0].dtype == torch.bfloat16 and torch.equal(got[0], want[0])
    assert got[1] == out_format(x)
    assert len(got[2]) == len(want[2]) and all(a.dtype == r.dtype and torch.equal(a, r)
                                               for a, r in zip(got[2], want[2]))


def _aten_ops(fn, *args):
    """The aten ops of fn(*args) on its second call inside one autocast region (the first call
    caches the weight's cast, as eager's)."""
    with torch.no_grad(), _bf16():
        fn(*args)
        with EagerTraffic() as mode:
            fn(*args)
    # (an activation in place on the conv's fresh output, or not, as eager's module: the same op)
    return [r.op.replace("_.default", ".default") for r in mode.records]


@pytest.mark.parametrize("case", list(CASES))
def test_public_functions_issue_eagers_ops_only(case, monkeypatch):
    """eager's aten ops, nothing more: the input's cast, the convolution (and the activation); no
    per-call cast of the weight or bias (the route cast both every call, 3 casts against eager's 1)
    and no Python route (its checks never run)."""
    fn, ref, *_ = CASES[case]
    x, w, b = _tensors(case, "contiguous")
    w, b = _leaves(w, b)[0], _leaves(b)[0]
    want = _aten_ops(ref, x, w, b)

    def no_route(*a, **k):
        raise AssertionError("the Python route ran")

    for mod in (conv_ops, conv3x3_ops):
        monkeypatch.setattr(mod, "check_conv", no_route)
        monkeypatch.setattr(mod, "autocast_args", no_route)
    monkeypatch.setattr(conv_act_ops, "_check_conv", no_route)
    monkeypatch.setattr(conv_act_ops, "_autocast", no_route)
    got = _aten_ops(fn, x, w, b)
    assert got == want
    assert sum(op.startswith("aten._to_copy") for op in got) == 1


def _module_pairs():
    """(name, eager module, ganengine module sharing its parameters, input shape, forward kwargs)."""
    torch.manual_seed(1)
    ct = nn.ConvTranspose2d(8, 4, 4, 2, 1, bias=True)
    yield ("ConvTranspose2d output_size", ct, gnn.ConvTranspose2d.from_module(ct), (2, 8, 5, 5),
           {"output_size": (11, 11)})
    ct = nn.ConvTranspose2d(100, 64, 4, 1, 0, bias=False)
    yield "ConvTranspose2d 1x1", ct, gnn.ConvTranspose2d.from_module(ct), (1, 100, 1, 1), {}
    c = nn.Conv2d(32, 64, 4, 2, 1)
    yield "Conv2d", c, gnn.Conv2d.from_module(c), (1, 32, 16, 16), {}
    c = nn.Conv2d(8, 8, 3, 1, 1, padding_mode="reflect", bias=False)
    yield "Conv3x3 reflect", c, gnn.Conv3x3.from_conv(c), (2, 8, 9, 7), {}
    c, act = nn.Conv2d(16, 32, 4, 2, 1), nn.LeakyReLU(0.2)
    yield "Conv2dAct", nn.Sequential(c, act), gnn.Conv2dAct.from_modules(c, act), (2, 16, 10, 10), {}
    ref = nn.Sequential(nn.Conv2d(16, 32, 4, 2, 1), nn.LeakyReLU(0.2), nn.ConvTranspose2d(32, 8, 4, 2, 1),
                        nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1, padding_mode="reflect"))
    yield "fuse", ref, ganengine.fuse(copy.deepcopy(ref)), (2, 16, 12, 12), {}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("i", range(6))
def test_modules_match_eager_under_autocast(i, channels_last, monkeypatch):
    """ganengine.nn's modules and fuse()'s: eager's output bits and layout, gradients, and aten ops
    (the fused modules' mixins call the module's own forward arithmetic under autocast)."""
    name, ref, mod, shape, kwargs = list(_module_pairs())[i]
    if name == "fuse":
        assert any(type(m).__module__ != "torch.nn.modules.conv" for m in mod.modules()
                   if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)), "fuse replaced nothing"
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    if channels_last:
        ref, mod, x = (ref.to(memory_format=torch.channels_last), mod.to(memory_format=torch.channels_last),
                       x.contiguous(memory_format=torch.channels_last))
    outs = []
    for m in (ref, mod):
        m.zero_grad()
        xl = x.detach().clone().requires_grad_()
        with _bf16():
            y = m(xl, **kwargs)
        y.float().square().sum().backward()
        outs.append((y, y.is_contiguous(), xl.grad, [p.grad for p in m.parameters()]))
    (y0, c0, gx0, gp0), (y1, c1, gx1, gp1) = outs
    assert y1.dtype == torch.bfloat16 and torch.equal(y0, y1)
    assert torch.equal(gx0, gx1) and all(torch.equal(a, b) for a, b in zip(gp0, gp1, strict=True))
    # the layout: eager's (the drop-in modules run nn's own forward under autocast; fuse()'s keep
    # ganengine's rule, which reads a 1x1 map in a channels_last model as NCHW, as in fp32: the
    # DCGAN generator's first layer)
    with torch.no_grad():
        assert c1 == (c0 if name != "fuse" else mod(x, **kwargs).is_contiguous())
    if c0 == c1:
        assert _aten_ops(lambda t: mod(t, **kwargs), x) == _aten_ops(lambda t: ref(t, **kwargs), x)


def test_double_backward_matches_eager():
    """WGAN-GP's gradient penalty through the conv under autocast: eager's second derivatives."""
    res = []
    for fn in (GF.conv2d, F.conv2d):
        x, w, b = _leaves(*_tensors("conv2d k4 s2", "contiguous"))
        with _bf16():
            y = fn(x, w, b, 2, 1)
            (gx,) = torch.autograd.grad(y.float().sum(), x, create_graph=True)
        res.append([gx, *torch.autograd.grad(gx.square().sum(), (w, b), allow_unused=True)])
    for a, r in zip(*res):
        assert (a is None and r is None) or torch.equal(a, r)


def test_weight_updated_inside_the_region_reads_as_eagers():
    """An in-place update of the weight between two calls of one autocast region: what eager's
    module computes (autocast's cast cache is eager's semantics, kept for the region)."""
    ref = nn.Conv2d(3, 4, 4, 2, 1)
    mod = gnn.Conv2d.from_module(copy.deepcopy(ref))
    x = torch.randn(1, 3, 8, 8)
    outs = []
    for m in (ref, mod):
        with _bf16():
            first = m(x)
            with torch.no_grad():
                m.weight.mul_(2.0)
            outs.append((first, m(x)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_records_the_torch_backend():
    x, w, b = _tensors("conv2d k4 s2", "contiguous")
    _dispatch.last_used.pop("conv", None)
    with _bf16():
        GF.conv2d(x, w, b, 2, 1)
    assert _dispatch.last_used["conv"] == "torch"


# ----------------------------------------------------------------------------- what keeps the route
def test_bad_input_keeps_the_public_errors():
    """What ATen refuses (or would serve otherwise than the route: an unbatched x) raises the
    route's own error, naming the argument, as outside autocast."""
    x, w4, wt = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 4, 4), torch.randn(3, 4, 4, 4)
    cases = [
        (ValueError, "weight expects 2 input channels", lambda: GF.conv2d(x, torch.randn(4, 2, 4, 4))),
        (ValueError, r"x must be \(N, C, H, W\)", lambda: GF.conv2d(x[0], w4)),
        (ValueError, "stride must be >= 1", lambda: GF.conv2d(x, w4, None, 0, 1)),
        (ValueError, "padding must be >= 0", lambda: GF.conv2d(x, w4, None, 1, -1)),
        (TypeError, "stride must be an int or a pair", lambda: GF.conv2d(x, w4, None, True, 1)),
        (ValueError, "smaller than the", lambda: GF.conv2d(x[:, :, :2, :2], w4)),
        (ValueError, "bias must be None or a", lambda: GF.conv2d(x, w4, torch.randn(3))),
        (ValueError, "output_padding .* must be smaller than the stride",
         lambda: GF.conv_transpose2d(x, wt, None, 2, 1, 2)),
        (ValueError, "gives an empty output", lambda: GF.conv_transpose2d(x, wt, None, 1, 5)),
        (ValueError, "has 0 output channels", lambda: GF.conv_transpose2d(x, torch.randn(3, 0, 4, 4))),
        (ValueError, r"weight must be \(K, C, 3, 3\)", lambda: GF.conv3x3(x, w4)),
        (ValueError, "reflect padding 6 must be smaller", lambda: GF.conv3x3(x, torch.randn(4, 3, 3, 3), None,
                                                                             6, "reflect")),
        (ValueError, "padding_mode must be", lambda: GF.conv3x3(x, torch.randn(4, 3, 3, 3), None, 1, "circular")),
        (ValueError, "weight expects 2 input channels", lambda: GF.conv2d_act(x, torch.randn(4, 2, 4, 4))),
    ]
    with _bf16():
        for error, match, call in cases:
            with pytest.raises(error, match=match):
                call()


def test_fp64_under_autocast_keeps_the_routes_casts():
    """ATen's autocast keeps fp64 operands; the route casts them to the autocast dtype: the route."""
    x, w = torch.randn(1, 3, 6, 6, dtype=torch.float64), torch.randn(4, 3, 4, 4, dtype=torch.float64)
    with _bf16():
        y = GF.conv2d(x, w, None, 2, 1)
        ref = F.conv2d(x.bfloat16(), w.bfloat16(), None, 2, 1)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)


def test_a_named_backend_keeps_its_route():
    """'cpu' cannot serve bf16: its fallback (strict mode's error) as before; 'torch' runs the custom
    op's reference body (its node), as in fp32."""
    x, w = torch.randn(1, 3, 6, 6, requires_grad=True), torch.randn(4, 3, 4, 4)
    with ganengine.use_backend("cpu"), strict(), _bf16(), pytest.raises(_dispatch.BackendFallbackError):
        GF.conv2d(x, w, None, 2, 1)
    with ganengine.use_backend("torch"), _bf16():
        y = GF.conv_transpose2d(x, torch.randn(3, 4, 4, 4), None, 2, 1)
    assert y.dtype == torch.bfloat16 and type(y.grad_fn).__name__.startswith("ganengine::")


def test_fp32_calls_do_not_take_it():
    """Outside autocast the fast path is never asked (the lean routes serve fp32 as before)."""
    x, w = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 4, 4)
    y = GF.conv2d(x, w, None, 2, 1)
    assert y.dtype == torch.float32 and torch.equal(y, GF.conv2d(x, w, None, 2, 1))
    with _bf16():
        assert torch.equal(GF.conv2d(x, w, None, 2, 1), F.conv2d(x, w, None, 2, 1))


def test_drop_in_modules_run_nn_forward_under_autocast(monkeypatch):
    """Under autocast the drop-in modules call nn's own forward, not the public functions: even their
    autocast shortcut cost a tiny layer ~8 us over nn's call (1.06-1.14x eager's)."""
    import ganengine.nn.conv as nn_conv
    import ganengine.nn.conv3x3 as nn_conv3x3
    import ganengine.nn.conv_act as nn_conv_act

    def refuse(*a, **k):
        raise AssertionError("the public function ran")

    for mod, name in ((nn_conv, "conv2d"), (nn_conv, "conv_transpose2d"), (nn_conv3x3, "conv3x3"),
                      (nn_conv_act, "conv2d_act")):
        monkeypatch.setattr(mod, name, refuse)
    for pair in _module_pairs():
        name, ref, m, shape, kwargs = pair
        if name == "fuse":
            continue
        x = torch.randn(shape)
        with _bf16():
            assert torch.equal(m(x, **kwargs), ref(x, **kwargs)), name
        with pytest.raises(AssertionError, match="the public function ran"):
            m(x, **kwargs)   # (fp32: the fused route)
