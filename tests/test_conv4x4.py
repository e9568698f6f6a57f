"""4x4 convolutions and transposed convolutions as Winograd convolutions on the cpu backend
(csrc/cpu/conv_winograd.cpp, winograd_engine.h): every tile vs an fp64 reference, forward and
backward, on odd shapes; layouts; the fused conv_act / conv_in_act ops and the PatchGAN on the
Winograd route; the policy context; bad input. (opcheck and double backward with a Winograd
first pass: tests/test_conv.py, parametrized over both cpu routes.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ganengine
import ganengine.functional as GF
from ganengine import _ext
from ganengine.nn import PatchDiscriminator
from ganengine.ops import _dispatch
from ganengine.ops import conv as cv

from tests._backends import on_backend
from tests._chain_bounds import ChainBounds
from tests._conv_bounds import conv_scales, cpu_winograd_route
from tests._model_bounds import assert_normwise, census
from tests._tolerance import assert_below, assert_within_bound

needs_ext = pytest.mark.skipif(not _ext.has_kernel("conv_fwd", "CPU") or not _ext.has_kernel(
    "conv_uses_winograd", "CPU"), reason="ganengine._C not built")

# transposed, N, C_in, C_out, H, W, stride, padding, output_padding: odd maps, a single pixel,
# maps smaller than a tile, non-square, padding 0..3, output_padding 1
SHAPES = [
    (False, 2, 5, 7, 9, 7, 2, 1, 0), (False, 1, 3, 4, 13, 6, 2, 0, 0), (False, 1, 6, 5, 33, 35, 2, 3, 0),
    (False, 2, 4, 3, 8, 8, 2, 1, 0), (False, 1, 3, 5, 7, 9, 1, 1, 0), (False, 1, 2, 3, 4, 4, 1, 0, 0),
    (False, 1, 2, 3, 1, 1, 1, 2, 0), (False, 1, 6, 5, 33, 35, 1, 2, 0), (False, 1, 4, 4, 19, 3, 1, 1, 0),
    (True, 1, 3, 5, 7, 9, 2, 1, 0), (True, 2, 4, 3, 8, 8, 2, 1, 1), (True, 1, 2, 3, 1, 1, 2, 1, 0),
    (True, 1, 4, 4, 6, 9, 2, 0, 1), (True, 1, 5, 2, 5, 3, 1, 1, 0), (True, 1, 3, 3, 11, 10, 1, 2, 0),
]
TILES = [(2, 3), (3, 2), (3, 4), (2, 2)]  # (stride-1 tile, stride-2 tile): every F(m, r) built


def _ids(s):
    return f"{'convT' if s[0] else 'conv'}-{s[1]}x{s[2]}->{s[3]}x{s[4]}x{s[5]}-s{s[6]}p{s[7]}op{s[8]}"


def _make(shape, seed=0):
    tr, n, ci, co, h, w, *_ = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ci, h, w, generator=g).requires_grad_()
    wt = (torch.randn(*((ci, co) if tr else (co, ci)), 4, 4, generator=g) * 0.3).requires_grad_()
    b = torch.randn(co, generator=g).requires_grad_()
    return x, wt, b


def _call(shape, x, w, b, fn=None):
    tr, *_, s, p, op = shape
    if tr:
        return (fn or GF.conv_transpose2d)(x, w, b, s, p, op)
    return (fn or GF.conv2d)(x, w, b, s, p)


def _ref(shape, x, w, b):
    return _call(shape, x, w, b, F.conv_transpose2d if shape[0] else F.conv2d)


def _route(shape, tiles=None):
    """(m, r) of the Winograd F(m, r) a 4x4 conv of this stride runs: F(m, 4) at stride 1,
    F(m, 2) on the 2x2 phase kernels at stride 2; ``tiles`` (s1, s2), else the current config."""
    s1, s2 = tiles if tiles is not None else tuple(_ext.op("conv_winograd_config")(-1, -1, -1))[1:]
    return (s1, 4) if shape[6] == 1 else (s2, 2)


def _assert_winograd_bounds(shape, x, w, b, g, got, want, tiles=None):
    """Each of y, dx, dw, db within gamma_n(fp32) x its Winograd absolute-value pipeline
    (tests/_conv_bounds.py: n = the GEMM's reduction + the transforms' steps, c = 1)."""
    tr, *_, s, p, op = shape
    sc = conv_scales(x, w, g, b, s, p, tr, winograd=_route(shape, tiles))
    for (name, scale, n), a, r in zip(sc.items(), got, want):
        if a is not None:
            assert_within_bound(a, r, scale, n=n, acc_dtype=torch.float32, name=name)


@needs_ext
@pytest.mark.parametrize("tiles", TILES, ids=lambda t: f"s1F{t[0]}-s2F{t[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_winograd_matches_fp64_reference(shape, tiles):
    x, w, b = _make(shape)
    with on_backend("cpu"), cv.gemm_policy("never"), cv.winograd_policy("always", *tiles):
        assert cv.uses_winograd(x, w, (shape[6],) * 2, (shape[7],) * 2, shape[0], (shape[8],) * 2)
        y = _call(shape, x, w, b)
        assert _dispatch.last_used["conv"] == "cpu"
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, w, b), g)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = _ref(shape, x64, w64, b64)
    grads64 = torch.autograd.grad(y64, (x64, w64, b64), g.double())
    assert y.shape == y64.shape and y.dtype == torch.float32
    _assert_winograd_bounds(shape, x, w, b, g, (y,) + grads, (y64,) + grads64, tiles)


@needs_ext
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4], SHAPES[10]], ids=_ids)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts(shape, layout):
    x, w, b = _make(shape)
    if layout == "channels_last":
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
        w = w.detach().to(memory_format=torch.channels_last).requires_grad_()
    else:  # every other column of a wider tensor
        tr, n, ci, co, h, wd, *_ = shape
        x = torch.randn(n, ci, h, 2 * wd)[..., ::2].requires_grad_()
    with on_backend("cpu"), cv.gemm_policy("never"), cv.winograd_policy("always"):
        y = _call(shape, x, w, b)
        g = torch.randn_like(y)
        dx, dw, db = torch.autograd.grad(y, (x, w, b), g)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert dx.is_contiguous(memory_format=torch.channels_last)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = _ref(shape, xr, wr, b.detach().double())
    rdx, rdw = torch.autograd.grad(ref, (xr, wr), g.double())
    _assert_winograd_bounds(shape, x, w, b, g, (y, dx, dw), (ref, rdx, rdw))


@needs_ext
def test_sum_backward_expanded_grad():
    """y.sum().backward() hands the op a stride-0 gradient."""
    shape = SHAPES[3]
    x, w, b = _make(shape)
    with on_backend("cpu"), cv.gemm_policy("never"), cv.winograd_policy("always"):
        _call(shape, x, w, b).sum().backward()
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = _ref(shape, xr, wr, br)
    y64.sum().backward()
    _assert_winograd_bounds(shape, x, w, b, torch.ones_like(y64), (None, x.grad, w.grad, b.grad),
                            (None, xr.grad, wr.grad, br.grad))


@needs_ext
@pytest.mark.parametrize("norm", ["in", "act"])
def test_fused_conv_ops_on_the_winograd_route(norm):
    """PatchGAN's fused blocks (conv + bias + LeakyReLU, conv + instance norm + LeakyReLU) run
    their convolution as Winograd and keep the torch backend's numbers."""
    torch.manual_seed(5)
    x = torch.randn(2, 8, 17, 15, requires_grad=True)
    w = (torch.randn(12, 8, 4, 4) * 0.2).requires_grad_()
    b = torch.randn(12, requires_grad=True)

    def run():
        if norm == "in":
            y = GF.conv2d_instance_norm_act(x, w, b, 2, 1)
        else:
            y = GF.conv2d_act(x, w, b, 1, 1, 0.2)
        return (y,) + torch.autograd.grad(y, (x, w), torch.linspace(-1, 1, y.numel()).view_as(y))

    # (gemm "never": a call this small is otherwise the GEMM form's, asked before Winograd)
    with on_backend("cpu"), cv.gemm_policy("never"), cv.winograd_policy("always"), \
            torch.autograd.profiler.profile() as prof:
        ours = run()
        # the block's elementwise bound (tests/_chain_bounds.py): the conv's own rounding the
        # larger of the direct form's and the Winograd route's, carried through the norm and
        # the activation; both sides within it of the exact value, so apart by twice it
        conv = torch.nn.Conv2d(8, 12, 4, 2 if norm == "in" else 1, 1)
        with torch.no_grad():
            conv.weight.copy_(w)
            conv.bias.copy_(b)
        layers = [conv] + ([torch.nn.InstanceNorm2d(12)] if norm == "in" else []) + [torch.nn.LeakyReLU(0.2)]
        y0 = ours[0]
        cb = ChainBounds(layers, x, torch.linspace(-1, 1, y0.numel()).view_as(y0), winograd=cpu_winograd_route)
    assert any(e.name.startswith("ganengine::winograd") for e in prof.function_events)
    with on_backend("torch"):
        ref = run()
    for name, a, r, e in zip(("y", "dx", "dw"), ours, ref, (cb.e_y, cb.e_dx, cb.param_errs[id(conv.weight)])):
        assert_below(a, r, 2 * e, name=name)


@needs_ext
@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
def test_patch_discriminator_on_winograd_matches_reference(norm):
    """The 70x70 PatchGAN at a size where the auto rule picks Winograd for its middle layers:
    outputs and parameter gradients as the reference module tree on the torch backend."""
    torch.manual_seed(7)
    d = PatchDiscriminator(3, ndf=32, n_layers=3, norm=norm).init_weights()
    x = torch.randn(1, 3, 128, 128)  # layer 2: 121 F(3, 2) tiles
    with on_backend("cpu"), torch.autograd.profiler.profile() as prof:
        out = d(x)
        out.square().mean().backward()
    assert any(e.name.startswith("ganengine::winograd") for e in prof.function_events)
    ours = [out.detach()] + [p.grad.clone() for p in d.parameters()]
    d.zero_grad()
    with ganengine.use_backend("torch"), census(d, winograd=True) as cen:
        ref_out = d.model(x)
        ref_out.square().mean().backward()
    ref = [ref_out.detach()] + [p.grad.clone() for p in d.parameters()]
    # normwise network bound (tests/_model_bounds.py), a 4x4 conv's stage counted alpha times
    # where the cpu backend runs it as Winograd (alpha from the transform matrices: 9 for F(3, 2))
    assert_normwise(ours[0], ref[0], cen, name="out")
    scale = max(r.abs().max().item() for r in ref[1:])  # the network's largest gradient
    for i, (a, r) in enumerate(zip(ours[1:], ref[1:])):
        assert_normwise(a, r, cen, scale=scale, backward=True, name=f"param {i}")


@needs_ext
def test_rule_declines_what_it_cannot_serve():
    x = torch.randn(1, 64, 32, 32)
    with on_backend("cpu"), cv.gemm_policy("never"), cv.winograd_policy("always"):
        assert cv.uses_winograd(x, torch.randn(64, 64, 4, 4), (2, 2), (1, 1))
        assert not cv.uses_winograd(x, torch.randn(64, 64, 3, 3), (1, 1), (1, 1))       # 3x3: conv3x3's
        assert not cv.uses_winograd(x, torch.randn(64, 64, 4, 4), (2, 1), (1, 1))       # unequal strides
        assert not cv.uses_winograd(x, torch.randn(64, 64, 4, 4), (3, 3), (1, 1))       # stride 3
    with ganengine.use_backend("cpu"), cv.winograd_policy("always"):  # (fp64 falls back to torch)
        assert not cv.uses_winograd(x.double(), torch.randn(64, 64, 4, 4).double(), (2, 2), (1, 1))
    with on_backend("cpu"), cv.winograd_policy("never"):
        assert not cv.uses_winograd(x, torch.randn(64, 64, 4, 4), (2, 2), (1, 1))
    with on_backend("torch"):
        assert not cv.uses_winograd(x, torch.randn(64, 64, 4, 4), (2, 2), (1, 1))


@needs_ext
def test_auto_rule_small_maps_at_stride_2():
    """The router's stride-2 small-map limit (conv_route.cpp, kWinogradS2*): P = per-image pixels of
    the smaller side; oneDNN below 256, Winograd from 1024, between them while N * P <= 1024.
    Stride 1 is not limited."""
    def conv(n, c, h, k, stride=2, padding=1):
        return cv.uses_winograd(torch.randn(n, c, h, h), torch.randn(k, c, 4, 4), (stride,) * 2, (padding,) * 2)

    def convt(n, c, h, k):
        return cv.uses_winograd(torch.randn(n, c, h, h), torch.randn(c, k, 4, 4), (2, 2), (1, 1), True, (0, 0))
    with on_backend("cpu"), cv.gemm_policy("never"), cv.winograd_policy("auto"):
        assert conv(4, 64, 32, 128)                                      # P = 256, N * P <= 1024
        assert not conv(8, 64, 32, 128) and not conv(32, 64, 32, 128)    # P = 256, N * P > 1024
        assert not conv(8, 128, 16, 256)                                 # P = 64
        assert conv(1, 128, 64, 256) and conv(4, 128, 64, 256)           # P = 1024: any batch
        assert conv(8, 256, 16, 512, stride=1, padding=0)                # stride 1: P = 169, still Winograd
        assert convt(4, 512, 16, 256) and not convt(8, 256, 8, 128)      # transposed: P = the input map


@needs_ext
def test_policy_context_restores_and_checks():
    config = _ext.op("conv_winograd_config")
    before = config(-1, -1, -1)
    assert list(before) == [0, 2, 3]  # auto, F(2, 4), F(3, 2) by default
    with cv.winograd_policy("never"):
        assert config(-1, -1, -1)[0] == 2
        with cv.winograd_policy("always", 3, 4):
            assert list(config(-1, -1, -1)) == [1, 3, 4]
        assert list(config(-1, -1, -1)) == [2, 2, 3]
    assert list(config(-1, -1, -1)) == list(before)
    with pytest.raises(ValueError, match="policy must be one of"):
        with cv.winograd_policy("sometimes"):
            pass
    with pytest.raises(ValueError, match="s1_tile must be 2 or 3"):
        with cv.winograd_policy("auto", s1_tile=4):
            pass
    with pytest.raises(ValueError, match="s2_tile must be 2, 3 or 4"):
        with cv.winograd_policy("auto", s2_tile=5):
            pass
    with pytest.raises(RuntimeError, match="stride-1 tile must be 2 or 3"):
        config(-1, 7, -1)
    assert list(config(-1, -1, -1)) == list(before)


def test_transform_matrices_are_exact():
    """Every Wino<m, r> struct in csrc/cpu/winograd_engine.h satisfies the Winograd identity in
    exact rational arithmetic, and the generated ones are what the Toom-Cook construction gives."""
    from ganengine.tools import winograd_matrices as wm

    found = wm.parse_header()
    assert set(found) == {(m, r) for m, r, _ in wm.CHOICES}
    for (m, r), (AT, G, BT) in found.items():
        assert wm.identity_holds(AT, G, BT, m, r), (m, r)
    for m, r, pts in wm.CHOICES:
        if r != 3:  # (F(m, 3) keep Lavin & Gray's published signs)
            assert found[(m, r)] == wm.toom_cook(m, r, pts), (m, r)
    AT, G, BT = found[(3, 2)]
    BT[0][0] += 1  # a typo must be caught
    assert not wm.identity_holds(AT, G, BT, 3, 2)


def test_route_queries_take_ints_as_the_conv_does():
    # docs/conv4x4.md's uses_winograd(x, w, stride, padding): ints, as F.conv2d takes them
    from ganengine.ops.conv import uses_gemm, uses_winograd

    x, w = torch.randn(1, 8, 16, 16), torch.randn(8, 8, 4, 4)
    assert uses_winograd(x, w, 1, 1) == uses_winograd(x, w, (1, 1), (1, 1))
    assert uses_gemm(x, w, 2, 1) == uses_gemm(x, w, (2, 2), (1, 1))
