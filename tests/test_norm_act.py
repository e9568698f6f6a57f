"""Fused instance norm + activation: every backend against an fp64 F.instance_norm reference."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ganengine
import ganengine.functional as GF
import ganengine.nn as gnn
from ganengine.ops import _dispatch
from ganengine.ops import norm_act as ops
from tests._backends import backend_params, on_backend, tol

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
    torch.testing.assert_close(y.double(), y_ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(dx.double(), dx_ref, atol=5e-5, rtol=5e-5)
    torch.testing.assert_close(dw.double(), dw_ref, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(db.double(), db_ref, atol=2e-4, rtol=1e-4)


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
    t = tol(dtype)
    torch.testing.assert_close(y.double(), y_ref, **t)
    torch.testing.assert_close(dx.double(), dx_ref, atol=t["atol"] * 2, rtol=t["rtol"] * 2)
    torch.testing.assert_close(dw.double(), dw_ref, atol=t["atol"] * 20, rtol=t["rtol"] * 5)
    torch.testing.assert_close(db.double(), db_ref, atol=t["atol"] * 20, rtol=t["rtol"] * 5)


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
    torch.testing.assert_close(y.double(), y_ref, atol=2e-5, rtol=2e-5)
    for got, want in zip(d, dref):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_backward_stride0_grad_and_noncontiguous_input(backend):
    base = torch.randn(2, 3, 10, 14)
    x = base[:, :, :, ::2]  # non-contiguous, H and W not flattenable
    w, b = torch.randn(3), torch.randn(3)
    _, dref = grads_of(lambda *a: reference(*a).sum(), x.double(), w.double(), b.double(), torch.tensor(1.0).double())
    with on_backend(backend):
        y, d = grads_of(lambda *a: GF.instance_norm_act(*a).sum(), x, w, b, torch.tensor(1.0))
    for got, want in zip(d, dref):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


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
    torch.testing.assert_close(y.double(), reference(x, w, b), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_large_plane(backend, channels_last):
    # a 48x48 plane: two register tiles (NCHW), several row chunks (NHWC)
    x, w, b = make((1, 2, 48, 48), channels_last=channels_last, offset=50.0)
    g = torch.randn(1, 2, 48, 48)
    y_ref, dref = grads_of(lambda *a: reference(*a), x.double(), w.double(), b.double(), g.double())
    with on_backend(backend):
        y, d = grads_of(GF.instance_norm_act, x, w, b, g)
    torch.testing.assert_close(y.double(), y_ref, atol=3e-5, rtol=3e-5)
    for got, want in zip(d, dref):
        torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_512x512(backend):
    x, w, b = make((1, 3, 512, 512))
    with on_backend(backend):
        y = GF.instance_norm_act(x, w, b)
    torch.testing.assert_close(y.double(), reference(x, w, b), atol=5e-5, rtol=5e-5)


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
    torch.testing.assert_close(y.double(), reference(x, w, b), atol=3e-5, rtol=3e-5)
    dx, dw, db = tk.backward(g, x, w, b, mean, rstd, True, 0.2, split=split)
    dx1, dw1, db1 = tk.backward(g, x, w, b, mean, rstd, True, 0.2, split=1)
    torch.testing.assert_close(dx, dx1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw, dw1, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(db, db1, atol=1e-4, rtol=1e-5)


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
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-8, rtol=1e-7)


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
    with on_backend(backend):
        for _ in range(3):
            x = torch.randn(3, 5, 6, 7) * 3 + 1
            torch.testing.assert_close(fused(x), F.leaky_relu(ref_norm(x), 0.2), atol=2e-5, rtol=2e-5)
        for key, value in ref_norm.state_dict().items():
            torch.testing.assert_close(fused.state_dict()[key], value, atol=1e-6, rtol=1e-6)
        fused.eval()
        ref_norm.eval()
        x = torch.randn(2, 5, 4, 4)
        torch.testing.assert_close(fused(x), F.leaky_relu(ref_norm(x), 0.2), atol=2e-5, rtol=2e-5)


def test_unbatched_input_and_errors():
    m = gnn.InstanceNormAct2d(3, affine=True)
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(m(x), F.leaky_relu(nn.InstanceNorm2d(3, affine=True)(x), 0.2), atol=2e-5, rtol=2e-5)
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
    torch.testing.assert_close(y32.double(), reference(x, w, b), atol=2e-5, rtol=2e-5)


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
    with on_backend(backend):
        want = net(x)
        compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
        got = compiled(x)
        got.sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert net.norm.weight.grad is not None
    explained = torch._dynamo.explain(net)(x)
    assert explained.graph_break_count == 0


@pytest.mark.slow
def test_torch_compile_inductor():
    torch._dynamo.reset()
    net = _SmallNet()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(torch.compile(net, fullgraph=True)(x), net(x), atol=1e-5, rtol=1e-5)


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
    with on_backend(backend):
        torch.testing.assert_close(fused(x), net(x), atol=1e-4, rtol=1e-4)
        # same training behaviour: same gradients
        fused(x).square().mean().backward()
    net(x).square().mean().backward()
    for (name, p), (_, q) in zip(net.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_fuse_keeps_affine_running_stats_and_inplace_option():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
                        nn.LeakyReLU(0.2, inplace=True))
    original = copy.deepcopy(net)
    fused = ganengine.fuse(net)
    assert isinstance(fused[1], gnn.InstanceNormAct2d) and isinstance(fused[2], nn.Identity)
    assert isinstance(net[1], nn.InstanceNorm2d), "fuse(inplace=False) must not touch the original"
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fused(x), original(x), atol=2e-5, rtol=2e-5)
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
    t = tol(dtype)
    torch.testing.assert_close(y.double(), y_ref, **t)
    torch.testing.assert_close(d[0].double(), dref[0], atol=t["atol"] * 4, rtol=t["rtol"] * 4)
    for got, want in zip(d[1:], dref[1:]):
        torch.testing.assert_close(got.double(), want, atol=t["atol"] * 50 + 1e-3, rtol=t["rtol"] * 10)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_opcheck_and_compile(backend):
    x = torch.randn(2, 3, 9, 9, device="cuda", requires_grad=True)
    w = torch.randn(3, device="cuda", requires_grad=True)
    b = torch.randn(3, device="cuda", requires_grad=True)
    with on_backend(backend):
        torch.library.opcheck(ops.instance_norm_act_fwd, (x, w, b, 1e-5, "leaky_relu", 0.2))
        net = _SmallNet().cuda()
        torch.testing.assert_close(torch.compile(net, fullgraph=True)(x), net(x), atol=1e-4, rtol=1e-4)
