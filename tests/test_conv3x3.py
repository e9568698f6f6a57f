"""conv3x3 (Winograd F(2x2, 3x3) / F(4x4, 3x3) on the cpu backend) vs the torch composition in fp64,
forward and backward; the fuse rules; bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ganengine
import ganengine.functional as GF
from ganengine import _ext
from ganengine.nn import Conv3x3
from ganengine.ops import _dispatch
from ganengine.ops import conv3x3 as cm

from tests._backends import backend_params, on_backend, out_round, assert_same_bits, route_results
from tests._conv_bounds import amplification, conv_scales
from tests._model_bounds import Census, assert_normwise, census
from tests._tolerance import assert_below, assert_within_bound, gamma, unit_roundoff

needs_ext = pytest.mark.skipif(not _ext.has_kernel("conv3x3_fwd", "CPU"), reason="ganengine._C not built")


@pytest.fixture
def always_winograd(monkeypatch):
    """Run Winograd whatever the size (the profitability threshold would skip small shapes)."""
    monkeypatch.setattr(cm, "MIN_CHANNELS", 0)
    monkeypatch.setattr(cm, "MIN_TILES", 0)


def _ref64(x, w, b, padding, mode):
    x, w = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b = None if b is None else b.detach().double().requires_grad_()
    xp = F.pad(x, (padding,) * 4, mode="reflect") if mode == "reflect" and padding else x
    y = F.conv2d(xp, w, b, 1, 0 if mode == "reflect" else padding)
    return y, (x, w, b)


SHAPES = [  # N, C, K, H, W, padding, mode
    (2, 5, 7, 9, 11, 1, "zeros"), (1, 8, 8, 1, 1, 1, "zeros"), (1, 3, 9, 6, 5, 2, "zeros"),
    (2, 16, 12, 7, 8, 1, "reflect"), (1, 4, 4, 3, 3, 0, "zeros"), (1, 9, 17, 5, 13, 2, "reflect"),
    (3, 12, 10, 2, 2, 1, "reflect"), (1, 11, 6, 19, 3, 1, "zeros"), (1, 6, 6, 33, 35, 1, "reflect"),
]


@needs_ext
@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + f"-p{s[5]}-{s[6]}")
def test_winograd_matches_fp64_reference(shape, tile, always_winograd, monkeypatch):
    monkeypatch.setenv("GANENGINE_WINOGRAD_TILE", str(tile))
    n, c, k, h, w, p, mode = shape
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w, requires_grad=True)
    wt = torch.randn(k, c, 3, 3, requires_grad=True)
    b = torch.randn(k, requires_grad=True)
    with on_backend("cpu"):
        y = ganengine.functional.conv3x3(x, wt, b, p, mode)
        assert _dispatch.last_used["conv3x3"] == "cpu"
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, wt, b), g)
    y64, leaves = _ref64(x, wt, b, p, mode)
    grads64 = torch.autograd.grad(y64, leaves, g.double())
    # gamma_n(fp32) x the F(tile, 3) pipeline on absolute values (tests/_conv_bounds.py; c = 1)
    sc = conv_scales(x, wt, g, b, 1, p, winograd=(tile, 3), reflect=mode == "reflect")
    for (name, scale, n), got, want in zip(sc.items(), (y,) + grads, (y64,) + grads64):
        assert got.shape == want.shape
        assert_within_bound(got, want, scale, n=n, acc_dtype=torch.float32, name=name)


@needs_ext
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts(layout, always_winograd):
    torch.manual_seed(1)
    x = torch.randn(2, 6, 10, 12)
    x = x.to(memory_format=torch.channels_last) if layout == "channels_last" else torch.randn(2, 6, 10, 24)[..., ::2]
    x.requires_grad_()
    w = torch.randn(5, 6, 3, 3, requires_grad=True)
    with on_backend("cpu"):
        y = ganengine.functional.conv3x3(x, w, None, 1, "reflect")
        dx, dw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last) and dx.is_contiguous(memory_format=torch.channels_last)
    y64, (x64, w64, _) = _ref64(x, w, None, 1, "reflect")
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), torch.ones_like(y64))
    sc = conv_scales(x, w, torch.ones_like(y64), None, 1, 1, winograd=(cm.winograd_tile(), 3), reflect=True)
    for (name, scale, n), got, want in zip(sc.items(), (y, dx, dw), (y64, dx64, dw64)):
        assert_within_bound(got, want, scale, n=n, acc_dtype=torch.float32, name=name)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_backend_and_dtype_matches_torch(backend, dtype, always_winograd):
    torch.manual_seed(2)
    x = torch.randn(2, 4, 7, 6, dtype=dtype, requires_grad=True)
    w = (torch.randn(3, 4, 3, 3) * 0.3).to(dtype).requires_grad_()
    b = torch.randn(3, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 3, 7, 6, dtype=dtype)
    outs = {}
    for name in ("torch", backend):
        # the Winograd kernel is fp32 only: other dtypes on "cpu" run the torch composition
        ctx = on_backend(name) if (name != "cpu" or dtype == torch.float32) else ganengine.use_backend(name)
        with ctx:
            y = ganengine.functional.conv3x3(x, w, b, 1, "reflect")
            outs[name] = (y,) + torch.autograd.grad(y, (x, w, b), g)
    # each side within its bound of the exact value: fp32 accumulation, the Winograd F(2, 3)
    # pipeline's on the cpu backend (fp32), the direct form's elsewhere; fp16/bf16 results
    # (and the composition's bias add) rounded to the format: 2 u |.| per side
    ref_leaves = [t.detach().double() for t in (x, w, b)]
    y64 = F.conv2d(F.pad(ref_leaves[0], (1,) * 4, mode="reflect"), ref_leaves[1], ref_leaves[2])
    allowed = [0, 0, 0, 0]
    for route in (None, (cm.winograd_tile(), 3) if backend == "cpu" and dtype == torch.float32 else None):
        sc = conv_scales(x, w, g, b, 1, 1, winograd=route, reflect=True)
        allowed = [a + gamma(n, torch.float32) * s_ for a, (_, s_, n) in zip(allowed, sc.items())]
    for name, a, r, e in zip(("y", "dx", "dw", "db"), outs[backend], outs["torch"], allowed):
        low = 0 if dtype == torch.float32 else 4 * unit_roundoff(dtype) * r.double().abs()
        assert_below(a, r, e + low, name=name, out_round=out_round(backend, dtype))


def test_profitability_threshold_sends_small_convs_to_onednn():
    small = cm.winograd_profitable((1, 32, 64, 64), (32, 32, 3, 3), 1)
    big = cm.winograd_profitable((1, 256, 64, 64), (256, 256, 3, 3), 1)
    assert big and not small


@needs_ext
def test_opcheck(always_winograd):
    x = torch.randn(1, 4, 6, 5, requires_grad=True)
    w = torch.randn(3, 4, 3, 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    with ganengine.use_backend("cpu"):
        torch.library.opcheck(cm.conv3x3_fwd, (x, w, b, 1, True))
        torch.library.opcheck(cm.conv3x3_fwd, (x, w, None, 0, False))
        torch.library.opcheck(cm.conv3x3_bwd, (torch.randn(1, 3, 6, 5), x.detach(), w.detach(), 1, True,
                                               [True, True, True]))
        torch.library.opcheck(cm.conv3x3_bwd, (torch.randn(1, 3, 6, 5), x.detach(), w.detach(), 1, False,
                                               [False, True, False]))


def test_gradcheck_and_double_backward(always_winograd):
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: ganengine.functional.conv3x3(x, w, b, 1, "reflect")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@needs_ext
def test_double_backward_fp32_matches_reference(always_winograd):
    """R1 / WGAN-GP style: grad of a function of the input gradient."""
    torch.manual_seed(3)
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    res = []
    for f in (lambda x, w: ganengine.functional.conv3x3(x, w, None, 1, "zeros"),
              lambda x, w: F.conv2d(x, w, None, 1, 1)):
        with ganengine.use_backend("cpu"):
            (gx,) = torch.autograd.grad(f(x, w).square().sum(), x, create_graph=True)
            res.append(torch.autograd.grad(gx.square().sum(), w)[0])
    # normwise (tests/_model_bounds.py): 4 conv passes (y, dx, and their derivatives), n the
    # longest (the dw sums over 36 pixels, the forward/dx over 4*9 taps), c = 2 x 4 stages, and
    # the F(2, 3) route's amplification (alpha, from the transform matrices) for its passes
    cen = Census.of(n_fwd=4 * 9, n=36, depth=4)
    assert_normwise(res[0], res[1], cen, backward=True, extra_depth=4 * (amplification(2, 3) - 1))


def _resnet_block(dim):
    return nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=True), nn.InstanceNorm2d(dim), nn.ReLU(True),
                         nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=True), nn.InstanceNorm2d(dim))


def test_fuse_rules_keep_keys_and_outputs(always_winograd):
    torch.manual_seed(4)
    ref = nn.Sequential(_resnet_block(8), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular"))
    import ganengine.ops.conv as cv

    with cv.gemm_policy("always"):  # fuse rewrites a conv only where the op has a faster route for it
        fused, report = ganengine.fuse(ref, return_report=True)
    assert list(fused.state_dict()) == list(ref.state_dict())
    block = fused[0]
    assert isinstance(block[0], nn.Identity) and isinstance(block[1], Conv3x3)
    assert block[1].padding_mode == "reflect" and block[1].padding == (1, 1)
    assert isinstance(fused[1], Conv3x3)
    # the stride-2 conv is left to the plain conv rule; groups / circular padding stay torch's
    assert type(fused[2]) is ganengine.nn.Conv2d and type(fused[3]) is nn.Conv2d and type(fused[4]) is nn.Conv2d
    assert report["conv3x3"] == 3 and report["reflection_pad+conv3x3"] == 2 and report["conv2d"] == 1
    x = torch.randn(2, 8, 9, 10)
    with census(ref) as cen:
        want = ref(x)
    n_wino = sum(isinstance(m, Conv3x3) for m in fused.modules())
    with ganengine.use_backend("cpu"):
        # normwise network bound (tests/_model_bounds.py), the Winograd convs' stages alpha times
        assert_normwise(fused(x), want, cen, extra_depth=n_wino * (amplification(cm.winograd_tile(), 3) - 1))


def test_bad_input_names_the_argument():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match="weight must be"):
        ganengine.functional.conv3x3(x, torch.randn(4, 4, 4, 4))
    with pytest.raises(ValueError, match="padding_mode"):
        ganengine.functional.conv3x3(x, torch.randn(4, 4, 3, 3), padding_mode="circular")
    with pytest.raises(ValueError, match="reflect padding"):
        ganengine.functional.conv3x3(x, torch.randn(4, 4, 3, 3), padding=5, padding_mode="reflect")
    with pytest.raises(ValueError, match="input channels"):
        ganengine.functional.conv3x3(x, torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match="smaller than the 3x3 kernel"):
        ganengine.functional.conv3x3(torch.randn(1, 4, 1, 1), torch.randn(4, 4, 3, 3), padding=0)
    with pytest.raises(ValueError, match="padding_mode"):
        Conv3x3(4, 4, padding_mode="replicate")


@needs_ext
def test_resnet_generator_on_winograd_matches_torch_backend(always_winograd):
    """CycleGAN's generator with every 3x3 conv on Winograd: outputs and weight gradients."""
    from ganengine.models.networks_cyclegan import ResnetGenerator

    torch.manual_seed(5)
    net = ResnetGenerator(3, 3, ngf=8, n_blocks=2)
    assert sum(isinstance(m, Conv3x3) for m in net.modules()) == 4
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    res = {}
    for name in ("torch", "cpu"):
        net.zero_grad()
        with on_backend(name), census(net) as cen:
            y = net(x)
            y.square().mean().backward()
        res[name] = (y.detach(), [p.grad.clone() for p in net.parameters()])
    # normwise network bound (tests/_model_bounds.py), the 4 Winograd convs alpha stages each
    extra = 4 * (amplification(cm.winograd_tile(), 3) - 1)
    assert_normwise(res["cpu"][0], res["torch"][0], cen, extra_depth=extra, name="y")
    scale = max(g.abs().max().item() for g in res["torch"][1])  # the network's largest gradient
    for a, b in zip(res["cpu"][1], res["torch"][1]):
        assert_normwise(a, b, cen, scale=scale, backward=True, extra_depth=extra)



@pytest.mark.parametrize("c, padding_mode", [(8, "zeros"), (128, "reflect")])  # oneDNN's route, Winograd's
def test_compile_fullgraph_and_export(c, padding_mode):
    """torch.compile(fullgraph=True) and torch.export trace conv3x3 on CPU tensors: the route
    query (a dispatcher-state read) must not run under dynamo. It did, and raised
    "torch.* op returned non-Tensor"."""
    torch.manual_seed(0)
    x = torch.randn(1, c, 9, 7)
    w = torch.randn(c, c, 3, 3)
    f = torch.compile(lambda x, w: GF.conv3x3(x, w, None, 1, padding_mode), fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x, w), GF.conv3x3(x, w, None, 1, padding_mode), rtol=0, atol=0)

    class M(torch.nn.Module):
        def forward(self, x, w):
            return GF.conv3x3(x, w, None, 1, padding_mode)

    ep = torch.export.export(M(), (x, w))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("ganengine.conv3x3_fwd") for t in targets), targets
    torch.testing.assert_close(ep.module()(x, w), GF.conv3x3(x, w, None, 1, padding_mode), rtol=0, atol=0)


# ----------------------------------------------------------------------------- the eager route (twin)
# (x shape, C_out, padding, mode, channels_last): a single pixel, odd maps in both padding modes
_TWIN_CASES = [((1, 4, 1, 1), 3, 1, "zeros", False), ((2, 3, 7, 5), 4, 1, "reflect", False),
               ((2, 5, 6, 9), 3, 1, "zeros", True)]


@pytest.mark.parametrize("route", ["torch", pytest.param("winograd", marks=needs_ext)])
@pytest.mark.parametrize("case", _TWIN_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-{c[3]}" + ("-cl" if c[4] else ""))
def test_twin_matches_custom_op(monkeypatch, route, case, always_winograd):
    """The eager route (ops/_eager.py: the custom op's body and backward in an autograd.Function,
    what a plain eager call runs where the C++ entry declines and the call is not the vendor
    convolution: the torch backend, the cpu backend's Winograd route) against the custom op itself:
    the same bits, forward, backward and double backward. (The GPU backends call cuDNN directly.)"""
    monkeypatch.setattr(_dispatch, "lean_op", lambda *a, **k: None)  # no C++ lean entry in front
    xs, co, p, mode, cl = case
    dtype = torch.float64 if route == "torch" else torch.float32
    backend = "torch" if route == "torch" else "cpu"
    torch.manual_seed(0)
    x0 = torch.randn(xs, dtype=dtype)
    if cl:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    w0, b0 = torch.randn(co, xs[1], 3, 3, dtype=dtype) * 0.3, torch.randn(co, dtype=dtype)
    if route == "winograd":
        assert cm._use_winograd(x0, w0, p) is not None

    def run(twin):
        x, w, b = (t.detach().clone().requires_grad_() for t in (x0, w0, b0))
        with on_backend(backend):
            if twin:
                y = GF.conv3x3(x, w, b, p, mode)
                assert type(y.grad_fn).__name__ == "ganengine::conv3x3_fwdBackward"  # the twin served it
            else:
                y = cm.conv3x3_fwd(x, w, b, p, mode == "reflect")
                assert type(y.grad_fn).__name__ != "ganengine::conv3x3_fwdBackward"
            assert _dispatch.last_used["conv3x3"] == backend
            return route_results(y, (x, w, b), dtype)

    assert_same_bits(run(True), run(False))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_backward_inside_cpu_autocast(backend):
    """forward and backward both inside torch.autocast('cpu', bf16), as a training loop writes it:
    the backward re-pads the saved bf16 input, which CPU autocast would run in fp32 (reflection_pad2d
    is on its fp32 list) beside the bf16 weight; the backward runs with autocast off, as eager's.
    The gradients equal those of the same call backpropagated outside autocast (same graph, same
    saved bf16 tensors: the same kernels)."""
    torch.manual_seed(0)
    x = torch.randn(2, 128, 6, 5, requires_grad=True)
    w = (torch.randn(128, 128, 3, 3) * 0.03).requires_grad_()
    b = torch.randn(128, requires_grad=True)
    grads = []
    for inside in (True, False):
        with ganengine.use_backend(backend):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = GF.conv3x3(x, w, b, 1, "reflect")
                loss = y.float().square().mean()
                if inside:
                    grads.append(torch.autograd.grad(loss, (x, w, b)))
            if not inside:
                grads.append(torch.autograd.grad(loss, (x, w, b)))
    assert y.dtype == torch.bfloat16
    for a, r in zip(*grads):
        assert torch.equal(a, r)


def test_winograd_profitable_asks_the_router_once_per_shape_and_follows_its_thresholds(monkeypatch):
    """fuse()'s 3x3 convs ask winograd_profitable every forward: the router's builtin costs 5-13 us
    a call through the dispatcher, so the answer is kept per shape; a threshold change (the only
    thing besides the shapes it depends on) drops the kept answers."""
    asked = []
    real = cm._winograd_pays
    monkeypatch.setattr(cm, "_winograd_pays", lambda *a: asked.append(a) or real(*a))
    cm._PAYS_CACHE.clear()
    x, w = torch.Size((1, 64, 40, 40)), torch.Size((64, 64, 3, 3))
    answers = [cm.winograd_profitable(x, w, 1) for _ in range(3)]
    assert cm.winograd_profitable([1, 64, 40, 40], [64, 64, 3, 3], 1) == answers[0]  # (lists: the same key)
    assert len(asked) == 1 and answers == [answers[0]] * 3
    monkeypatch.setattr(cm, "MIN_CHANNELS", 0)
    monkeypatch.setattr(cm, "MIN_TILES", 0)
    assert cm.winograd_profitable(x, w, 1) is True and len(asked) == 2
    monkeypatch.setattr(cm, "MIN_CHANNELS", 10 ** 6)
    assert cm.winograd_profitable(x, w, 1) is False and len(asked) == 3
