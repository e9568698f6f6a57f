"""Fused instance norm + activation: every backend against an fp64 F.instance_norm reference."""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ganengine
import ganengine.functional as GF
import ganengine.nn as gnn
from ganengine.ops import _dispatch
from ganengine.ops import norm_act as ops
from tests._backends import (CudaEntryResolver, assert_same_bits, autograd_node_names, backend_params, on_backend,
                             out_round, route_results)
from tests._chain_bounds import ChainBounds
from tests._model_bounds import assert_normwise, census
from tests._norm_bounds import instance_norm_act_bounds, instance_stat_bounds
from tests._tolerance import assert_below, assert_within_bound, unit_roundoff

BACKENDS = backend_params()


def reference(x, weight, bias, activation="leaky_relu", slope=0.2, eps=1e-5):
    """fp64 F.instance_norm + activation; act(bias) for single-pixel planes."""
    xd = x.double()
    wd = None if weight is None else weight.double()
    bd = None if bias is None else bias.double()
    if x.shape[2] * x.shape[3] == 1:
        z = xd * 0  # x_hat is 0: the gradients with respect to x and weight are exactly 0
        if wd is not None:
            z = z + wd[None, :, None, None] * 0
        if bd is not None:
            z = z + bd[None, :, None, None]
    else:
        z = F.instance_norm(xd, weight=wd, bias=bd, eps=eps)
    if activation == "leaky_relu":
        z = F.leaky_relu(z, slope)
    elif activation == "relu":
        z = F.relu(z)
    return z


def make(shape, dtype=torch.float32, channels_last=False, affine=True, offset=3.0):
    x = torch.randn(shape) * 2 + offset
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w = torch.randn(c) if affine else None
    b = torch.randn(c) if affine else None
    return x, w, b


def grads_of(fn, x, w, b, grad):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(*leaves)
    y.backward(grad)
    return y.detach(), [None if t is None else t.grad for t in leaves]


def acc_of(dtype):
    """The accumulation dtype of every backend: fp32, fp64 for fp64 input."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_norm_bounds(x, w, b, g, got, want, activation="leaky_relu", slope=0.2, names=("y", "dx", "dw", "db"),
                       backend="torch"):
    """y and each gradient within tests/_norm_bounds.py's bound (n = the plane or N*plane, acc
    fp32 or fp64, scale and c = 2 derived there), plus the output format's rounding."""
    bnd = instance_norm_act_bounds(x, w, b, g, activation, slope, acc_dtype=acc_of(x.dtype))
    allowed = {"y": bnd.y, "dx": bnd.dx, "dw": bnd.dw, "db": bnd.db}
    for name, a, r in zip(names, got, want):
        if r is None:
            assert a is None, name
            continue
        assert_below(a, r, allowed[name], name=name, out_round=out_round(backend, a.dtype, a.device))


SHAPES = [
    (2, 3, 5, 7),       # odd plane
    (1, 1, 1, 1),       # a single pixel
    (3, 4, 1, 1),       # single pixels, several planes
    (2, 5, 1, 9),       # one row
    (1, 2, 45, 46),     # plane just over the 2048-element register tile (loops over tiles)
    (1, 37, 3, 5),      # channels not a multiple of the channel block
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_forward_backward_fp32(backend, shape, channels_last):
    x, w, b = make(shape, channels_last=channels_last)
    g = torch.randn(shape)
    y_ref, (dx_ref, dw_ref, db_ref) = grads_of(lambda *a: reference(*a), x.double(), w.double(), b.double(), g.double())
    with on_backend(backend):
        y, (dx, dw, db) = grads_of(GF.instance_norm_act, x, w, b, g)
    assert _dispatch.last_used["instance_norm_act"] == backend
    assert y.dtype == x.dtype
    if channels_last and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_norm_bounds(x, w, b, g, (y, dx, dw, db), (y_ref, dx_ref, dw_ref, db_ref))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_dtypes(backend, dtype, channels_last):
    shape = (2, 6, 7, 9)
    x, w, b = make(shape, dtype=dtype, channels_last=channels_last)
    if dtype == torch.float64:  # fp64 end to end; fp16/bf16 keep fp32 parameters (the AMP case)
        w, b = w.double(), b.double()
    g = torch.randn(shape).to(dtype)
    # reference on the same (rounded) inputs, in fp64
    y_ref, (dx_ref, dw_ref, db_ref) = grads_of(lambda *a: reference(*a), x.double(), w.double(), b.double(), g.double())
    with on_backend(backend):
        y, (dx, dw, db) = grads_of(GF.instance_norm_act, x, w, b, g)
    assert y.dtype == dtype and dx.dtype == dtype
    # fp32 accumulation (fp64 for fp64) and the output format's rounding, u(dtype) |ref|
    assert_norm_bounds(x, w, b, g, (y, dx, dw, db), (y_ref, dx_ref, dw_ref, db_ref), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation,slope", [("leaky_relu", 0.2), ("leaky_relu", -0.3), ("leaky_relu", 1.5),
                                              ("relu", 0.0), ("none", 0.0)])
@pytest.mark.parametrize("affine", [True, False])
def test_activations_and_affine(backend, activation, slope, affine):
    x, w, b = make((2, 3, 6, 5), affine=affine)
    g = torch.randn(2, 3, 6, 5)
    ref = lambda x_, w_, b_: reference(x_, w_, b_, activation, slope)  # noqa: E731
    y_ref, dref = grads_of(ref, x.double(), *(None if t is None else t.double() for t in (w, b)), g.double())
    with on_backend(backend):
        fn = lambda x_, w_, b_: GF.instance_norm_act(x_, w_, b_, activation=activation, negative_slope=slope)  # noqa
        y, d = grads_of(fn, x, w, b, g)
    assert_norm_bounds(x, w, b, g, (y,) + tuple(d), (y_ref,) + tuple(dref), activation, slope)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_backward_stride0_grad_and_noncontiguous_input(backend):
    base = torch.randn(2, 3, 10, 14)
    x = base[:, :, :, ::2]  # non-contiguous, H and W not flattenable
    w, b = torch.randn(3), torch.randn(3)
    _, dref = grads_of(lambda *a: reference(*a).sum(), x.double(), w.double(), b.double(), torch.tensor(1.0).double())
    with on_backend(backend):
        y, d = grads_of(lambda *a: GF.instance_norm_act(*a).sum(), x, w, b, torch.tensor(1.0))
    assert_norm_bounds(x, w, b, torch.ones(x.shape), d, dref, names=("dx", "dw", "db"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_variance_planes_are_finite(backend):
    x = torch.full((2, 3, 4, 4), 7.0)
    w, b = torch.randn(3), torch.randn(3)
    with on_backend(backend):
        y, (dx, dw, db) = grads_of(GF.instance_norm_act, x, w, b, torch.randn(2, 3, 4, 4))
    assert torch.isfinite(y).all() and torch.isfinite(dx).all() and torch.isfinite(dw).all()
    torch.testing.assert_close(y, F.leaky_relu(b, 0.2)[None, :, None, None].expand_as(y))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "triton"])
def test_large_number_of_planes(backend):
    # N*C = 65536 planes of 4 pixels
    x, w, b = make((64, 1024, 2, 2))
    with on_backend(backend):
        y = GF.instance_norm_act(x, w, b)
    assert_norm_bounds(x, w, b, None, (y,), (reference(x, w, b),), names=("y",))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_large_plane(backend, channels_last):
    # a 48x48 plane: two register tiles (NCHW), several row chunks (NHWC)
    x, w, b = make((1, 2, 48, 48), channels_last=channels_last, offset=50.0)
    g = torch.randn(1, 2, 48, 48)
    y_ref, dref = grads_of(lambda *a: reference(*a), x.double(), w.double(), b.double(), g.double())
    with on_backend(backend):
        y, d = grads_of(GF.instance_norm_act, x, w, b, g)
    # mean 50, spread 2: the bound's conditioning term mean|x| rstd ~ 25 is exercised here
    assert_norm_bounds(x, w, b, g, (y,) + tuple(d), (y_ref,) + tuple(dref))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_512x512(backend):
    x, w, b = make((1, 3, 512, 512))
    with on_backend(backend):
        y = GF.instance_norm_act(x, w, b)
    assert_norm_bounds(x, w, b, None, (y,), (reference(x, w, b),), names=("y",))


@pytest.mark.parametrize("split", [2, 3, 7])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_triton_split_plane_scheme(split, channels_last):
    pytest.importorskip("triton")
    from ganengine import backends

    if not backends.serves("triton", torch.device("cpu")):
        pytest.skip("triton cannot serve CPU tensors here (TRITON_INTERPRET not set)")
    from ganengine.kernels import norm_act as tk

    x, w, b = make((1, 3, 33, 70), channels_last=channels_last, offset=20.0)
    g = torch.randn(1, 3, 33, 70)
    y, mean, rstd = tk.forward(x, w, b, 1e-5, True, 0.2, split=split)
    assert_norm_bounds(x, w, b, None, (y,), (reference(x, w, b),), names=("y",))
    dx, dw, db = tk.backward(g, x, w, b, mean, rstd, True, 0.2, split=split)
    dx1, dw1, db1 = tk.backward(g, x, w, b, mean, rstd, True, 0.2, split=1)
    # split vs unsplit: each within its bound of the exact value, so apart by at most twice it
    # (dw, db come per instance, (N, C); N = 1 here)
    bnd = instance_norm_act_bounds(x, w, b, g)
    for name, a, r, e in (("dx", dx, dx1, bnd.dx), ("dw", dw, dw1, bnd.dw), ("db", db, db1, bnd.db)):
        assert_below(a, r, 2 * e.view(r.shape), name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_gradgradcheck(backend):
    x = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    fn = lambda x_, w_, b_: GF.instance_norm_act(x_, w_, b_, negative_slope=0.1)  # noqa: E731
    with on_backend(backend):
        assert torch.autograd.gradcheck(fn, (x, w, b))
        assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_through_norm(backend):
    """R1-style penalty: d/dtheta ||d D(x)/dx||^2 equals the reference composition's."""
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)

    def penalty(norm_fn):
        out = norm_fn(conv(x), w, b).pow(2).sum()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), [w, b, conv.weight])

    want = penalty(lambda h, w_, b_: reference(h, w_, b_))
    with on_backend(backend):
        got = penalty(GF.instance_norm_act)
    # fp64 both: normwise, the longest reduction (a plane of 25 through the 27-term conv, then
    # the conv's weight gradient over 2*25 pixels, n = 2*25*27), scale the largest gradient, and
    # c = 64 for the double backward's chain (conv, norm forward, norm backward twice, conv
    # backward: 8 stages) times the norm's conditioning, up to 8 (1/rstd of these planes ~1)
    scale = max(e.abs().max().item() for e in want)
    for a, e in zip(got, want):
        assert_within_bound(a, e, scale, n=2 * 25 * 27, acc_dtype=torch.float64, c=64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_module_matches_instancenorm2d_with_running_stats(backend, momentum, affine):
    ref_norm = nn.InstanceNorm2d(5, affine=affine, track_running_stats=True, momentum=momentum)
    if affine:
        with torch.no_grad():
            ref_norm.weight.normal_()
            ref_norm.bias.normal_()
    fused = gnn.InstanceNormAct2d(5, affine=affine, track_running_stats=True, momentum=momentum,
                                  activation="leaky_relu", negative_slope=0.2)
    fused.load_state_dict(ref_norm.state_dict())
    assert list(fused.state_dict().keys()) == list(ref_norm.state_dict().keys())
    w = ref_norm.weight if affine else None
    b = ref_norm.bias if affine else None
    e_rm, e_rv = 0.0, 0.0
    with on_backend(backend):
        for _ in range(3):
            x = torch.randn(3, 5, 6, 7) * 3 + 1
            # both fp32 within tests/_norm_bounds.py's bound of the exact value: twice it
            assert_below(fused(x), F.leaky_relu(ref_norm(x), 0.2), 2 * instance_norm_act_bounds(x, w, b).y)
            # each step adds (at most) its batch statistics' bounds to the running ones, plus
            # the update's own rounding (a few ulps of the statistic, in e_* via assert_below)
            em, ev = instance_stat_bounds(x)
            e_rm, e_rv = e_rm + em, e_rv + ev
        for key, value in ref_norm.state_dict().items():
            if not value.is_floating_point():  # num_batches_tracked
                assert torch.equal(fused.state_dict()[key], value), key
                continue
            e = {"running_mean": e_rm, "running_var": e_rv}.get(key, 0.0)
            u = unit_roundoff(torch.float32)
            assert_below(fused.state_dict()[key], value, 2 * e + 4 * 3 * u * value.double().abs(), name=key)
        fused.eval()
        ref_norm.eval()
        x = torch.randn(2, 5, 4, 4)
        # eval: an elementwise affine map of the running statistics, whose errors it carries
        # (tests/_chain_bounds.py), both sides
        cb = ChainBounds([ref_norm, nn.LeakyReLU(0.2)], x, running_stat_err={0: (2 * e_rm, 2 * e_rv)})
        assert_below(fused(x), F.leaky_relu(ref_norm(x), 0.2), 2 * cb.e_y)


def test_unbatched_input_and_errors():
    m = gnn.InstanceNormAct2d(3, affine=True)
    x = torch.randn(3, 4, 5)
    bound = 2 * instance_norm_act_bounds(x[None], m.weight, m.bias).y[0]  # both fp32 sides
    assert_below(m(x), F.leaky_relu(nn.InstanceNorm2d(3, affine=True)(x), 0.2), bound)
    with pytest.raises(ValueError, match="expected 3 channels"):
        m(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="weight must have shape"):
        GF.instance_norm_act(torch.randn(1, 3, 4, 4), torch.ones(4))
    with pytest.raises(ValueError, match="activation must be one of"):
        GF.instance_norm_act(torch.randn(1, 3, 4, 4), activation="gelu")
    with pytest.raises(TypeError, match="fp16, bf16, fp32 or fp64"):
        GF.instance_norm_act(torch.ones(1, 3, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        GF.instance_norm_act(torch.randn(3, 4))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        GF.instance_norm_act(torch.randn(2, 3, 1, 1), running_mean=torch.zeros(3), running_var=torch.ones(3))
    with pytest.raises(ValueError, match="unknown|must be one of"):
        ganengine.use_backend("tpu")


def test_autocast_keeps_input_dtype():
    x, w, b = make((2, 3, 5, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y32 = GF.instance_norm_act(x, w, b)
        y16 = GF.instance_norm_act(x.bfloat16(), w, b)
    assert y32.dtype == torch.float32 and y16.dtype == torch.bfloat16
    assert_norm_bounds(x, w, b, None, (y32,), (reference(x, w, b),), names=("y",))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, w, b = make((2, 3, 4, 5))
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    with on_backend(backend):
        torch.library.opcheck(ops.instance_norm_act_fwd, (x, w, b, 1e-5, "leaky_relu", 0.2))
        torch.library.opcheck(ops.instance_norm_act_fwd, (x.detach().contiguous(memory_format=torch.channels_last),
                                                          None, None, 1e-5, "relu", 0.0))
        y, mean, rstd = ops.instance_norm_act_fwd(x.detach(), w.detach(), b.detach(), 1e-5, "leaky_relu", 0.2)
        torch.library.opcheck(ops.instance_norm_act_bwd,
                              (torch.randn_like(y), x.detach(), w.detach(), b.detach(), mean, rstd, "leaky_relu", 0.2))
        # a strided slice of a channels_last tensor (neither layout dense): copied once on every
        # backend, outputs NCHW-contiguous, as the fakes say
        xs = torch.randn(2, 3, 8, 5).contiguous(memory_format=torch.channels_last)[:, :, ::2]
        torch.library.opcheck(ops.instance_norm_act_fwd, (xs, w.detach(), b.detach(), 1e-5, "leaky_relu", 0.2))
        y, mean, rstd = ops.instance_norm_act_fwd(xs, w.detach(), b.detach(), 1e-5, "leaky_relu", 0.2)
        torch.library.opcheck(ops.instance_norm_act_bwd,
                              (torch.randn_like(y), xs, w.detach(), b.detach(), mean, rstd, "leaky_relu", 0.2))


class _SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = gnn.InstanceNormAct2d(8, affine=True)
        self.out = nn.Conv2d(8, 1, 1)

    def forward(self, x):
        return self.out(self.norm(self.conv(x)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_no_graph_breaks(backend):
    torch._dynamo.reset()
    net = _SmallNet()
    x = torch.randn(2, 3, 8, 8)
    with on_backend(backend), census(net) as cen:
        want = net(x)
        compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
        got = compiled(x)
        got.sum().backward()
    assert_normwise(got, want, cen)  # normwise network bound (tests/_model_bounds.py)
    assert net.norm.weight.grad is not None
    explained = torch._dynamo.explain(net)(x)
    assert explained.graph_break_count == 0


@pytest.mark.slow
def test_torch_compile_inductor():
    torch._dynamo.reset()
    net = _SmallNet()
    x = torch.randn(2, 3, 8, 8)
    with census(net) as cen:
        want = net(x)
    assert_normwise(torch.compile(net, fullgraph=True)(x), want, cen)  # (tests/_model_bounds.py)


# ------------------------------------------------------------------ ganengine.fuse
class ResnetBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim))

    def forward(self, x):
        return x + self.conv_block(x)


def cyclegan_style_generator(ngf=8, n_blocks=2):
    """The CycleGAN reference ResnetGenerator's layer pattern, written out for the test."""
    layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(True)]
    for i in range(2):
        mult = 2 ** i
        layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1),
                   nn.InstanceNorm2d(ngf * mult * 2), nn.ReLU(True)]
    layers += [ResnetBlock(ngf * 4) for _ in range(n_blocks)]
    for i in range(2):
        mult = 2 ** (2 - i)
        layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1),
                   nn.InstanceNorm2d(ngf * mult // 2), nn.ReLU(True)]
    layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh()]
    return nn.Sequential(*layers)


# fuse is backend-independent; the kernels are tested above (the interpreter is slow on a generator)
@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "triton"])
def test_fuse_cyclegan_generator(backend):
    net = cyclegan_style_generator()
    fused, report = ganengine.fuse(net, return_report=True)
    # 5 in the trunk, 1 per resnet block (with their conv where the conv op has a route for it)
    assert report.get("instance_norm+act", 0) + report.get("conv2d+instance_norm+act", 0) == 5 + 2
    assert list(fused.state_dict().keys()) == list(net.state_dict().keys())
    assert sum((isinstance(m, gnn.InstanceNormAct2d) and m.activation != "none")
               or isinstance(m, gnn.Conv2dInstanceNormAct) for m in fused.modules()) == 7
    x = torch.randn(2, 3, 16, 16)
    with census(net) as cen:
        want = net(x)
    with on_backend(backend):
        assert_normwise(fused(x), want, cen)  # normwise network bound (tests/_model_bounds.py)
        # same training behaviour: same gradients
        fused(x).square().mean().backward()
    net(x).square().mean().backward()
    scale = max(p.grad.abs().max().item() for p in net.parameters())  # the network's largest gradient
    for (name, p), (_, q) in zip(net.named_parameters(), fused.named_parameters()):
        assert_normwise(q.grad, p.grad, cen, scale=scale, backward=True, name=name)


def test_fuse_keeps_affine_running_stats_and_inplace_option():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
                        nn.LeakyReLU(0.2, inplace=True))
    original = copy.deepcopy(net)
    fused = ganengine.fuse(net)
    assert isinstance(fused[1], gnn.InstanceNormAct2d) and isinstance(fused[2], nn.Identity)
    assert isinstance(net[1], nn.InstanceNorm2d), "fuse(inplace=False) must not touch the original"
    x = torch.randn(2, 3, 8, 8)
    # the block's elementwise bound (tests/_chain_bounds.py: conv, norm, activation), both sides
    assert_below(fused(x), original(x), 2 * ChainBounds(list(original), x).e_y)
    torch.testing.assert_close(fused[1].running_mean, original[1].running_mean)
    fused.load_state_dict(original.state_dict())  # keys interchangeable
    same = ganengine.fuse(net, inplace=True)
    assert same is net and isinstance(net[1], gnn.InstanceNormAct2d)


# ------------------------------------------------------------------ CUDA tensors (need a GPU)
GPU_SHAPES = [(2, 3, 5, 7), (1, 1, 1, 1), (1, 64, 256, 256), (4, 128, 64, 64), (64, 1024, 2, 2), (1, 3, 512, 512)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gpu_backends(backend, shape, dtype, channels_last):
    x, w, b = make(shape, dtype=dtype, channels_last=channels_last)
    x, w, b = x.cuda(), w.cuda(), b.cuda()
    g = torch.randn(shape, device="cuda").to(dtype)
    y_ref, dref = grads_of(lambda *a: reference(*a), x.double(), w.double(), b.double(), g.double())
    with on_backend(backend):
        y, d = grads_of(GF.instance_norm_act, x, w, b, g)
    # the bounds of tests/_norm_bounds.py (c = 2 covers the GPU's few-ulp rsqrt)
    assert_norm_bounds(x, w, b, g, (y,) + tuple(d), (y_ref,) + tuple(dref), backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_opcheck_and_compile(backend):
    x = torch.randn(2, 3, 9, 9, device="cuda", requires_grad=True)
    w = torch.randn(3, device="cuda", requires_grad=True)
    b = torch.randn(3, device="cuda", requires_grad=True)
    with on_backend(backend):
        torch.library.opcheck(ops.instance_norm_act_fwd, (x, w, b, 1e-5, "leaky_relu", 0.2))
        net = _SmallNet().cuda()
        with census(net) as cen:
            want = net(x)
        # normwise network bound (tests/_model_bounds.py); TF32 convs: u = 2^-11 for the products
        assert_normwise(torch.compile(net, fullgraph=True)(x), want, cen, extra_depth=2 ** 13 * cen.depth)


# ----------------------------------------------------------------------------- lean cpu entry
_HAS_ENTRY = ops._ext.loaded() and ops._ext.has_kernel("instance_norm_act", "CompositeExplicitAutograd")


@pytest.mark.skipif(not _HAS_ENTRY, reason="ganengine._C without the instance_norm_act entry")
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("affine", [True, False])
def test_lean_cpu_entry_matches_custom_op_route(layout, affine):
    """The C++-autograd entry (auto on CPU, no running stats) gives the custom op's numbers bit for
    bit: forward, backward (kernels) and double backward (reference composition)."""
    torch.manual_seed(0)
    base = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    if layout == "channels_last":
        base = base.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        base = torch.randn(2, 3, 5, 14, dtype=torch.float64)[..., ::2]
    wb = (torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)) if affine else (None, None)
    gy = torch.randn(2, 3, 5, 7, dtype=torch.float64)

    def run(lean):
        x = base.detach().clone().requires_grad_(True) if layout != "strided" else base.detach().requires_grad_(True)
        w, b = (t.detach().clone().requires_grad_(True) if t is not None else None for t in wb)
        if lean:
            with on_backend("cpu"):
                y = GF.instance_norm_act(x, w, b, activation="leaky_relu", negative_slope=0.2)
            assert _dispatch.last_used["instance_norm_act"] == "cpu"
        else:
            y = ops.instance_norm_act_fwd(x, w, b, 1e-5, "leaky_relu", 0.2)[0]
        leaves = [t for t in (x, w, b) if t is not None]
        g1 = torch.autograd.grad(y, leaves, gy, create_graph=True)
        g2 = torch.autograd.grad(sum((g * g).sum() for g in g1), leaves)
        return (y, y.is_contiguous(), *g1, *g2)

    with on_backend("cpu"):
        ref = run(False)
    got = run(True)
    for a, b in zip(got, ref):
        assert (a == b) if isinstance(a, bool) else torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("affine", [True, False])
def test_lean_cpu_entry_with_running_stats_matches_python_route(monkeypatch, dtype, layout, affine):
    """instance_norm_act_rs (the C++ entry with the running-statistics update, StarGAN's
    InstanceNorm2d(track_running_stats=True) in training) gives the Python route's bits: output,
    gradients and both running statistics, over two steps, with and without autograd."""
    if _dispatch.lean_op("instance_norm_act_rs", ops._IN_RS_KERNELS) is None:
        pytest.skip("the built extension has no instance_norm_act_rs")
    torch.manual_seed(0)
    base = torch.randn(3, 4, 5, 7, dtype=dtype) * 3 + 1
    if layout == "channels_last":
        base = base.contiguous(memory_format=torch.channels_last)
    wb = (torch.randn(4, dtype=dtype), torch.randn(4, dtype=dtype)) if affine else (None, None)
    gy = torch.randn(3, 4, 5, 7, dtype=dtype)
    rm0, rv0 = torch.randn(4, dtype=dtype), torch.rand(4, dtype=dtype) + 0.5

    def run():
        rm, rv = rm0.clone(), rv0.clone()
        outs = []
        for step in range(2):
            x = (base + step).detach().requires_grad_(True)
            w, b = (t.detach().clone().requires_grad_(True) if t is not None else None for t in wb)
            with on_backend("cpu"):
                y = GF.instance_norm_act(x, w, b, rm, rv, momentum=0.3, activation="leaky_relu", negative_slope=0.2)
            leaves = [t for t in (x, w, b) if t is not None]
            outs += [y, *torch.autograd.grad(y, leaves, gy), rm.clone(), rv.clone()]
        with torch.no_grad(), on_backend("cpu"):
            outs.append(GF.instance_norm_act(base, *wb, rm, rv, momentum=0.1, activation="relu"))
        return outs + [rm, rv]

    got = run()
    assert _dispatch.last_used["instance_norm_act"] == "cpu"
    monkeypatch.setitem(_dispatch._LEAN, "instance_norm_act_rs", None)  # the Python route: custom op + ATen update
    ref = run()
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_lean_cpu_entry_with_running_stats_refusals_give_public_errors():
    """What the running-statistics entry declines reaches the Python route's own errors."""
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        GF.instance_norm_act(torch.randn(2, 3, 1, 1), running_mean=torch.zeros(3), running_var=torch.ones(3))
    with pytest.raises(ValueError, match="given together"):
        GF.instance_norm_act(x, running_mean=torch.zeros(3))
    with pytest.raises(ValueError, match="given together"):
        GF.instance_norm_act(x, running_var=torch.ones(3))
    with pytest.raises(TypeError, match="momentum must be a float"):
        GF.instance_norm_act(x, running_mean=torch.zeros(3), running_var=torch.ones(3), momentum=None)
    with pytest.raises(ValueError, match="running_mean must have shape"):
        GF.instance_norm_act(x, running_mean=torch.zeros(4), running_var=torch.ones(3))
    with pytest.raises(TypeError, match="running_var must be a Tensor"):
        GF.instance_norm_act(x, running_mean=torch.zeros(3), running_var=[1.0, 1.0, 1.0])


# ------------------------------------------------------------------ the C++ entry on CUDA tensors
def test_cuda_entry_is_taken_where_the_cuda_backend_is_chosen(monkeypatch):
    """_dispatch.cuda_entry gives the C++ entry for a CUDA call exactly where the requested backend
    would run the CUDA C++ kernels: 'cuda', or 'auto' on NCHW planes (cuda first in the auto order),
    not on channels_last ones (Triton first), not for 'triton'/'cpu'/'torch', and never without the
    CUDA kernels or where the cuda backend does not serve CUDA tensors."""
    if not _HAS_ENTRY:
        pytest.skip("ganengine._C without the instance_norm_act entry")
    resolver = CudaEntryResolver(monkeypatch)
    serving = resolver.serving
    entry = ops._ext.op("instance_norm_act").default._op

    def resolve(backend, variant=None, name="instance_norm_act", kernels=ops._IN_KERNELS):
        return resolver(backend, name, "instance_norm_act", kernels, variant)

    assert resolve("auto") is entry
    assert resolve("auto", "channels_last") is None
    assert resolve("auto", "channels_last_small") is entry  # small NHWC planes: cuda first
    assert resolve("cuda") is entry and resolve("cuda", "channels_last") is entry
    assert all(resolve(b) is None for b in ("triton", "cpu", "torch"))
    rs = ops._ext.op("instance_norm_act_rs").default._op
    assert resolve("auto", name="instance_norm_act_rs", kernels=ops._IN_RS_KERNELS) is rs
    serving["triton"] = False  # auto on channels_last: Triton cannot serve, cuda is next
    assert resolve("auto", "channels_last") is entry
    serving["cuda"] = False
    assert resolve("auto") is None and resolve("cuda") is None
    serving["cuda"], resolver.cuda_kernels = True, False  # a build without the CUDA kernels
    assert resolve("auto") is None and resolve("cuda") is None


def test_cuda_layout_variant():
    x = torch.randn(2, 3, 4, 5)
    assert ops._layout(x) is None  # CPU tensors: no variant
    # NHWC planes by size: at most SMALL_PLANE elements (the CUDA C++ kernels ahead) or larger
    assert ops.SMALL_PLANE == 4096
    assert ops.nhwc_variant(64 * 64) == "channels_last_small"
    assert ops.nhwc_variant(65 * 64) == "channels_last"
    if torch.cuda.is_available():
        xc = x.cuda()
        assert ops._layout(xc) is None
        assert ops._layout(xc.contiguous(memory_format=torch.channels_last)) == "channels_last_small"
        big = torch.randn(1, 2, 128, 128, device="cuda").contiguous(memory_format=torch.channels_last)
        assert ops._layout(big) == "channels_last"
        assert ops._layout(xc[..., ::2]) is None  # copied to NCHW by the kernels' callers


@pytest.mark.skipif(not _HAS_ENTRY, reason="ganengine._C without the instance_norm_act entry")
def test_entry_refuses_a_device_without_kernels():
    """Tensors on a device the build has no kernels for (meta here; CUDA in a CPU-only build) are
    declined before any work, with the refusal the wrapper takes as such."""
    x = torch.empty(2, 3, 4, 4, device="meta")
    with pytest.raises(NotImplementedError, match=re.escape(ops._REFUSAL + " (x)")):
        torch.ops.ganengine_C.instance_norm_act(x, None, None, 1e-5, True, 0.2)
    w = torch.ones(3, device="meta")  # a parameter on another device than x
    with pytest.raises(NotImplementedError, match=re.escape(ops._REFUSAL + " (weight)")):
        torch.ops.ganengine_C.instance_norm_act(torch.randn(2, 3, 4, 4), w, None, 1e-5, True, 0.2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("running", [False, True], ids=["plain", "running_stats"])
def test_cuda_entry_matches_the_python_cuda_route(monkeypatch, dtype, running):
    """On NCHW CUDA tensors 'auto' runs the C++ entry (C++ autograd over the CUDA kernels): the
    Python route's bits on the same kernels (forward, gradients, double backward, running
    statistics); channels_last stays on Triton."""
    if not (_HAS_ENTRY and ops._ext.has_kernel("norm_act_fwd", "CUDA")):
        pytest.skip("ganengine._C without the CUDA kernels")
    torch.manual_seed(0)
    base = torch.randn(2, 3, 5, 7, device="cuda").to(dtype)
    wb = [torch.randn(3, device="cuda") for _ in range(2)]
    stats = (torch.zeros(3, device="cuda"), torch.ones(3, device="cuda"))

    def run():
        x = base.detach().requires_grad_(True)
        w, b = (t.detach().clone().requires_grad_(True) for t in wb)
        rm, rv = (t.clone() for t in stats)
        y = GF.instance_norm_act(x, w, b, *((rm, rv) if running else ()))
        return [*route_results(y, [x, w, b], dtype)] + ([rm, rv] if running else []), y

    got, y = run()
    assert _dispatch.last_used["instance_norm_act"] == "cuda"
    assert not any(n.startswith("ganengine::") for n in autograd_node_names(y))  # not the Python twin
    monkeypatch.setattr(_dispatch, "cuda_entry", lambda *a, **k: None)
    with on_backend("cuda"):
        want, _ = run()
    assert_same_bits(got, want)
    monkeypatch.undo()
    xl = base.contiguous(memory_format=torch.channels_last)  # a small NHWC plane: the entry too
    GF.instance_norm_act(xl)
    assert _dispatch.last_used["instance_norm_act"] == "cuda"
    big = torch.randn(1, 3, 65, 64, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    GF.instance_norm_act(big)  # a larger NHWC plane: Triton
    assert _dispatch.last_used["instance_norm_act"] == "triton"
