"""conv2d / conv_transpose2d (the GEMM form for small output maps on the cpu backend) vs fp64
references and the torch backend, forward and backward; the threshold; the fuse rules; bad input."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ganengine
import ganengine.functional as GF
from ganengine import _ext
from ganengine.ops import _dispatch
from ganengine.ops import conv as cv

from tests._backends import backend_params, on_backend, out_round, assert_same_bits, route_results
from tests._chain_bounds import ChainBounds
from tests._conv_bounds import conv_scales, winograd_amplification
from tests._model_bounds import Census, assert_normwise, census
from tests._tolerance import assert_below, assert_within_bound, gamma, unit_roundoff

needs_ext = pytest.mark.skipif(not _ext.has_kernel("conv_fwd", "CPU"), reason="ganengine._C not built")

# transposed, N, C_in, C_out, H, W, kernel, stride, padding, output_padding
SHAPES = [
    (False, 2, 5, 7, 9, 7, 4, 2, 1, 0), (False, 1, 3, 4, 1, 1, 3, 1, 1, 0), (False, 3, 6, 5, 2, 2, 4, 2, 1, 0),
    (False, 1, 8, 16, 6, 6, 1, 1, 0, 0), (False, 2, 4, 3, 11, 5, 3, 2, 2, 0), (False, 1, 7, 9, 4, 4, 4, 1, 0, 0),
    (True, 2, 5, 7, 3, 5, 4, 2, 1, 0), (True, 3, 4, 6, 2, 3, 3, 2, 1, 1), (True, 1, 9, 4, 1, 1, 4, 2, 1, 0),
    (True, 1, 6, 6, 5, 4, 3, 1, 1, 0), (True, 2, 3, 8, 4, 7, 4, 2, 0, 0),
]


def _ids(s):
    return f"{'convT' if s[0] else 'conv'}-{s[1]}x{s[2]}x{s[4]}x{s[5]}-k{s[6]}s{s[7]}p{s[8]}op{s[9]}"


def _make(shape, dtype=torch.float32, seed=0):
    tr, n, ci, co, h, w, k, s, p, op = shape
    torch.manual_seed(seed)
    x = torch.randn(n, ci, h, w).to(dtype).requires_grad_()
    wt = (torch.randn(*((ci, co) if tr else (co, ci)), k, k) * 0.3).to(dtype).requires_grad_()
    b = torch.randn(co).to(dtype).requires_grad_()
    return x, wt, b


def _call(shape, x, w, b):
    tr, *_, s, p, op = shape
    return GF.conv_transpose2d(x, w, b, s, p, op) if tr else GF.conv2d(x, w, b, s, p)


def cv_tiles():
    """(stride-1, stride-2) Winograd tiles configured now."""
    return tuple(_ext.op("conv_winograd_config")(-1, -1, -1))[1:]


def _ref(shape, x, w, b):
    tr, *_, s, p, op = shape
    return F.conv_transpose2d(x, w, b, s, p, op) if tr else F.conv2d(x, w, b, s, p)


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_gemm_form_matches_fp64_reference(shape):
    x, w, b = _make(shape)
    with on_backend("cpu"), cv.gemm_policy("always"):
        y = _call(shape, x, w, b)
        assert _dispatch.last_used["conv"] == "cpu"
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, w, b), g)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y64 = _ref(shape, *leaves)
    grads64 = torch.autograd.grad(y64, leaves, g.double())
    # gamma_n(fp32) x sum|terms| of each product, n its terms per element (tests/_conv_bounds.py)
    sc = conv_scales(x, w, g, b, shape[7], shape[8], shape[0])
    for (name, scale, n), got, want in zip(sc.items(), (y,) + grads, (y64,) + grads64):
        assert got.shape == want.shape and got.dtype == torch.float32
        assert_within_bound(got, want, scale, n=n, acc_dtype=torch.float32, name=name)


@needs_ext
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[6]], ids=_ids)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts(shape, layout):
    x, w, b = _make(shape, seed=1)
    if layout == "channels_last":
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    else:
        x = torch.cat([x.detach(), x.detach()], dim=3)[..., ::2].requires_grad_()
        assert not x.is_contiguous()
    with on_backend("cpu"), cv.gemm_policy("always"):
        y = _call(shape, x, w, b)
        dx, dw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last) and dx.is_contiguous(memory_format=torch.channels_last)
    leaves = [t.detach().double().requires_grad_() for t in (x, w)]
    y64 = _ref(shape, leaves[0], leaves[1], b.detach().double())
    dx64, dw64 = torch.autograd.grad(y64, leaves, torch.ones_like(y64))
    sc = conv_scales(x, w, torch.ones_like(y64), b, shape[7], shape[8], shape[0])
    for (name, scale, n), got, want in zip(sc.items(), (y, dx, dw), (y64, dx64, dw64)):
        assert_within_bound(got, want, scale, n=n, acc_dtype=torch.float32, name=name)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[7]], ids=_ids)
def test_every_backend_and_dtype_matches_torch(shape, backend, dtype):
    x, w, b = _make(shape, dtype, seed=2)
    outs = {}
    for name in ("torch", backend):
        # the GEMM form is fp32 only: other dtypes on "cpu" run the torch composition
        ctx = on_backend(name) if (name != "cpu" or dtype == torch.float32) else ganengine.use_backend(name)
        with ctx, cv.gemm_policy("always"):
            y = _call(shape, x, w, b)
            outs[name] = (y,) + torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    # each side within gamma_n(fp32) x sum|terms| of the exact value (fp32 accumulation for
    # fp16/bf16 too); fp16/bf16 results (and the bias add) rounded to the format: 2 u |.| a side
    sc = conv_scales(x, w, torch.ones(outs["torch"][0].shape), b, shape[7], shape[8], shape[0])
    for (name, scale, n), a, r in zip(sc.items(), outs[backend], outs["torch"]):
        assert a.dtype == dtype
        low = 0 if dtype == torch.float32 else 4 * unit_roundoff(dtype) * r.double().abs()
        assert_below(a, r, 2 * gamma(n, torch.float32) * scale + low, name=name, out_round=out_round(backend, dtype))


@needs_ext
def test_threshold_picks_gemm_only_for_small_maps():
    """The 'auto' policies: the C++ thresholds (use_gemm in conv_gemm.cpp, use in
    conv_winograd.cpp) agree with the documented rules, the profiler sees the route they name,
    and every route gives the reference's numbers."""
    policy = _ext.op("conv_gemm_policy")
    assert policy(-1) == 0  # auto by default
    assert _ext.op("conv_winograd_config")(-1, -1, -1)[0] == 0
    cases = [  # (transposed, x shape, w shape, expected route)
        (False, (1, 512, 4, 4), (512, 512, 4, 4), "gemm"),        # 2x2 output
        (False, (1, 64, 64, 64), (128, 64, 4, 4), "winograd"),    # 32x32 output: 121 F(3, 2) tiles
        (False, (1, 256, 32, 32), (512, 256, 4, 4), "oneDNN"),    # 16x16 output: 36 tiles
        (True, (1, 1024, 4, 4), (1024, 512, 4, 4), "gemm"),       # 16 input pixels
        (True, (1, 1024, 16, 16), (1024, 256, 4, 4), "oneDNN"),   # 256 input pixels: 36 tiles
        (True, (1, 128, 32, 32), (128, 64, 4, 4), "winograd"),    # 1024 input pixels
        (False, (16, 512, 8, 8), (1024, 512, 4, 4), "gemm"),      # 256 columns, 8M weight
        (False, (1, 3, 4, 4), (8, 3, 4, 4), "gemm"),              # a tiny call (1536 MACs): oneDNN's fixed cost
        (False, (1, 16, 16, 16), (16, 16, 4, 4), "gemm"),         # 2^18 MACs: still tiny
        (False, (2, 16, 16, 16), (16, 16, 4, 4), "oneDNN"),       # 2^19 MACs, small weight
        (False, (1, 3, 64, 64), (64, 3, 4, 4), "oneDNN"),         # 3 input channels
    ]
    for tr, xs, ws, route in cases:
        x, w = torch.randn(xs), torch.randn(ws) * 0.02
        with on_backend("cpu"), torch.autograd.profiler.profile() as prof:
            assert cv.uses_gemm(x, w, (2, 2), (1, 1), tr) == (route == "gemm"), (xs, ws)
            assert cv.uses_winograd(x, w, (2, 2), (1, 1), tr) == (route == "winograd"), (xs, ws)
            y = GF.conv_transpose2d(x, w, None, 2, 1) if tr else GF.conv2d(x, w, None, 2, 1)
        names = {e.name for e in prof.function_events}
        used = {"oneDNN": any("convolution" in n and "ganengine" not in n for n in names),
                "winograd": any(n.startswith("ganengine::winograd") for n in names)}
        assert used["oneDNN"] == (route == "oneDNN"), (xs, ws, sorted(names))
        assert used["winograd"] == (route == "winograd"), (xs, ws, sorted(names))
        ref = F.conv_transpose2d(x, w, None, 2, 1) if tr else F.conv2d(x, w, None, 2, 1)
        # both fp32 within gamma_n x sum|terms| of the exact value; the Winograd route's
        # pipeline for its case (tests/_conv_bounds.py); apart by the sum of the two bounds
        g0 = torch.zeros(ref.shape)
        own = lambda route: (lambda sc: gamma(sc.n_y, torch.float32) * sc.y)(  # noqa: E731
            conv_scales(x, w, g0, None, 2, 1, tr, winograd=route))
        ours_bound = own((cv_tiles()[1], 2) if route == "winograd" else None)
        assert_below(y, ref, ours_bound + own(None), name=str((xs, ws)))


@needs_ext
def test_small_kernels_stay_on_onednn_where_its_fixed_cost_is_low():
    """The GEMM form's small-call rules were measured on 4x4+ kernels, where oneDNN's fixed cost per
    call is high; for 1x1, 2x2 and 3x3 kernels it is low and the GEMM form lost at every small size
    (csrc/cpu/conv_route.cpp, kMinTaps): those calls run oneDNN, NCHW and channels_last (a 3x3 with a
    2^19+ element weight on at most 64 columns too: it lost in forward at every size measured, session
    20). 4x4, 5x5 and 7x7 tiny calls keep it."""
    cl = torch.channels_last
    cases = [  # (transposed, x shape, w shape, stride, padding, channels_last, expected GEMM)
        (False, (1, 8, 8, 8), (8, 8, 1, 1), 1, 0, False, False),
        (False, (1, 256, 8, 8), (256, 256, 1, 1), 1, 0, False, False),    # 64 columns, 64 K weight
        (False, (1, 8, 8, 8), (8, 8, 3, 3), 1, 1, False, False),
        (False, (1, 128, 8, 8), (128, 128, 3, 3), 1, 1, False, False),    # 147 K weight
        (True, (1, 16, 8, 8), (16, 16, 3, 3), 1, 1, False, False),
        (False, (1, 16, 8, 8), (16, 16, 2, 2), 2, 0, False, False),
        (False, (4, 64, 8, 8), (64, 64, 3, 3), 1, 1, True, False),        # channels_last: no NHWC rule either
        (False, (1, 16, 8, 8), (16, 16, 1, 1), 1, 0, True, False),
        (False, (4, 256, 4, 4), (512, 256, 3, 3), 1, 1, False, False),    # 64 columns, 1.2 M weight: 1.31x eager on GEMM
        (False, (4, 1024, 8, 8), (256, 1024, 2, 2), 2, 0, False, False),  # 2x2, 64 columns, 1 M weight: oneDNN
        (False, (1, 8, 8, 8), (8, 8, 4, 4), 2, 1, False, True),           # 4x4: tiny, GEMM form
        (False, (1, 8, 8, 8), (8, 8, 5, 5), 1, 2, False, True),
        (False, (1, 3, 8, 8), (8, 3, 7, 7), 1, 3, False, True),
        (False, (1, 8, 8, 8), (8, 8, 4, 4), 2, 1, True, True),
    ]
    for tr, xs, ws, s, p, last, gemm in cases:
        x, w = torch.randn(xs), torch.randn(ws) * 0.05
        if last:
            x = x.contiguous(memory_format=cl)
        with on_backend("cpu"), cv.gemm_policy("auto"), cv.winograd_policy("never"):
            assert cv.uses_gemm(x, w, s, p, tr) == gemm, (tr, xs, ws, last)
            # the route named is the one run: ATen's convolution appears exactly where oneDNN runs
            with torch.autograd.profiler.profile() as prof:
                y = GF.conv_transpose2d(x, w, None, s, p) if tr else GF.conv2d(x, w, None, s, p)
        onednn = any("convolution" in e.name and "ganengine" not in e.name for e in prof.function_events)
        assert onednn == (not gemm), (tr, xs, ws, last, sorted({e.name for e in prof.function_events}))
        ref = F.conv_transpose2d(x.double(), w.double(), None, s, p) if tr else F.conv2d(x.double(), w.double(), None, s, p)
        g0 = torch.zeros(ref.shape)
        sc = conv_scales(x, w, g0, None, s, p, tr)
        assert_below(y, ref, gamma(sc.n_y, torch.float32) * sc.y, name=str((xs, ws)))


@needs_ext
def test_policy_context_restores_and_checks():
    policy = _ext.op("conv_gemm_policy")
    with cv.gemm_policy("never"):
        assert policy(-1) == 2
        with cv.gemm_policy("always"):
            assert policy(-1) == 1
        assert policy(-1) == 2
    assert policy(-1) == 0
    with pytest.raises(ValueError, match="policy must be one of"):
        with cv.gemm_policy("sometimes"):
            pass


def _route(route: str):
    """The policies that force one cpu conv route: the GEMM form or the 4x4 Winograd one."""
    if route == "gemm":
        return cv.gemm_policy("always"), cv.winograd_policy("never")
    return cv.gemm_policy("never"), cv.winograd_policy("always")


@needs_ext
@pytest.mark.parametrize("route", ["gemm", "winograd"])
def test_opcheck(route):
    x = torch.randn(2, 4, 6, 5, requires_grad=True)
    w = torch.randn(3, 4, 4, 4, requires_grad=True)
    wt = torch.randn(4, 3, 4, 4, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    gemm, winograd = _route(route)
    with ganengine.use_backend("cpu"), gemm, winograd:
        for s in (1, 2):
            torch.library.opcheck(cv.conv_fwd, (x, w, b, [s, s], [1, 1], [0, 0], False))
            torch.library.opcheck(cv.conv_fwd, (x, wt, None, [s, s], [1, 1], [s - 1, s - 1], True))
        torch.library.opcheck(cv.conv_bwd, (torch.randn(2, 3, 3, 2), x.detach(), w.detach(), [2, 2], [1, 1], [0, 0],
                                            False, [True, True, True]))
        torch.library.opcheck(cv.conv_bwd, (torch.randn(2, 3, 12, 10), x.detach(), wt.detach(), [2, 2], [1, 1],
                                            [0, 0], True, [False, True, False]))


@pytest.mark.parametrize("transposed", [False, True])
def test_gradcheck_and_double_backward(transposed):
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(*((2, 3) if transposed else (3, 2)), 4, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    if transposed:
        fn = lambda x, w, b: GF.conv_transpose2d(x, w, b, 2, 1)  # noqa: E731
    else:
        fn = lambda x, w, b: GF.conv2d(x, w, b, 2, 1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@needs_ext
@pytest.mark.parametrize("route", ["gemm", "winograd"])
@pytest.mark.parametrize("transposed", [False, True])
def test_double_backward_fp32_matches_reference(transposed, route):
    """WGAN-GP / R1 style: the gradient of a function of the input gradient, the GEMM form or the
    4x4 Winograd route (tests/test_conv4x4.py) first."""
    torch.manual_seed(3)
    x = torch.randn(2, 4, 9 if route == "winograd" else 4, 9 if route == "winograd" else 4, requires_grad=True)
    w = torch.randn(4, 4, 4, 4, requires_grad=True)
    ours = (lambda x, w: GF.conv_transpose2d(x, w, None, 2, 1)) if transposed else (lambda x, w: GF.conv2d(x, w, None, 2, 1))
    ref = (lambda x, w: F.conv_transpose2d(x, w, None, 2, 1)) if transposed else (lambda x, w: F.conv2d(x, w, None, 2, 1))
    res = []
    for f in (ours, ref):
        gemm, winograd = _route(route)
        with ganengine.use_backend("cpu"), gemm, winograd:
            (gx,) = torch.autograd.grad(f(x, w).square().sum(), x, create_graph=True)
            res.append(torch.autograd.grad(gx.square().sum(), w)[0])
    # normwise (tests/_model_bounds.py): 4 conv passes (y, dx and their derivatives); n: 4*16
    # taps forward, the dw's N H W (2 x 9 x 9 at most); the Winograd route's passes alpha
    # times (alpha from the transform matrices, F(3, 2): 9)
    cen = Census.of(n_fwd=4 * 16, n=2 * 9 * 9, depth=4)
    extra = 4 * (winograd_amplification(2) - 1) if route == "winograd" else 0
    assert_normwise(res[0], res[1], cen, backward=True, extra_depth=extra)


@needs_ext
def test_conv_act_uses_the_gemm_form_for_small_maps():
    """StarGAN's discriminator blocks (Conv2d -> LeakyReLU, fused) run the GEMM form too."""
    torch.manual_seed(6)
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    w = torch.randn(32, 16, 4, 4, requires_grad=True)
    b = torch.randn(32, requires_grad=True)
    g = torch.randn(2, 32, 2, 2)
    res = {}
    for policy in ("always", "never"):
        with on_backend("cpu"), cv.gemm_policy(policy):
            y = GF.conv2d_act(x, w, b, 2, 1, 0.01)
            res[policy] = (y,) + torch.autograd.grad(y, (x, w, b), g)
    # the block's elementwise bound (tests/_chain_bounds.py), both sides: twice it
    conv = nn.Conv2d(16, 32, 4, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(b)
    cb = ChainBounds([conv, nn.LeakyReLU(0.01)], x, g)
    bounds = (cb.e_y, cb.e_dx, cb.param_errs[id(conv.weight)], cb.param_errs[id(conv.bias)])
    for name, a, r, e in zip(("y", "dx", "dw", "db"), res["always"], res["never"], bounds):
        assert_below(a, r, 2 * e, name=name)


def test_fuse_rules_run_after_the_pair_rules():
    torch.manual_seed(4)
    ref = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2, True),        # pair: Conv2dAct
                        nn.Conv2d(8, 8, 4, 2, 1, bias=False), nn.BatchNorm2d(8),  # plain conv rule
                        nn.ConvTranspose2d(8, 4, 4, 2, 1), nn.ReLU(),              # transposed rule
                        nn.Conv2d(4, 4, 3, 1, 1, groups=2),                        # declined: groups
                        nn.ConvTranspose2d(4, 4, 3, 2, 1, output_padding=1, dilation=1))
    with cv.gemm_policy("always"):  # fuse rewrites a conv only where the op has a faster route for it
        fused, report = ganengine.fuse(ref, return_report=True)
    assert list(fused.state_dict()) == list(ref.state_dict())
    assert type(fused[0]).__name__ == "Conv2dAct" and isinstance(fused[1], nn.Identity)
    assert type(fused[2]) is ganengine.nn.Conv2d and type(fused[4]) is ganengine.nn.ConvTranspose2d
    assert type(fused[6]) is nn.Conv2d and type(fused[7]) is ganengine.nn.ConvTranspose2d
    assert fused[7].output_padding == (1, 1)
    assert report["conv2d"] == 1 and report["conv_transpose2d"] == 2
    x = torch.randn(2, 3, 16, 12)
    with census(ref) as cen:
        want = ref(x)
    with ganengine.use_backend("cpu"), cv.gemm_policy("always"):
        assert_normwise(fused(x), want, cen)  # normwise network bound (tests/_model_bounds.py)


def test_conv_transpose_output_size_argument():
    torch.manual_seed(7)
    ref = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1)
    ours = ganengine.nn.ConvTranspose2d.from_module(ref)
    x = torch.randn(1, 4, 5, 5)
    for size in ([9, 9], [10, 10], [1, 3, 10, 9]):
        want = ref(x, output_size=size)
        # both within gamma_n x sum|terms| of the exact value (tests/_conv_bounds.py)
        sc = conv_scales(x, ref.weight, torch.zeros(want.shape), ref.bias, 2, 1, transposed=True)
        assert_within_bound(ours(x, output_size=size), want, sc.y, n=sc.n_y, acc_dtype=torch.float32, c=2)


def test_bad_input_names_the_argument():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match="input channels"):
        GF.conv2d(x, torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"\(C_in, C_out, kH, kW\)"):
        GF.conv_transpose2d(x, torch.randn(3, 4, 3, 3))
    with pytest.raises(ValueError, match="bias must be None or a \\(6,\\) tensor"):
        GF.conv_transpose2d(x, torch.randn(4, 6, 3, 3), torch.randn(4))
    with pytest.raises(ValueError, match="output_padding"):
        GF.conv_transpose2d(x, torch.randn(4, 6, 3, 3), stride=2, output_padding=2)
    with pytest.raises(ValueError, match="smaller than the"):
        GF.conv2d(torch.randn(1, 4, 2, 2), torch.randn(4, 4, 4, 4))
    with pytest.raises(TypeError, match="stride must be an int or a pair"):
        GF.conv2d(x, torch.randn(4, 4, 3, 3), stride="2")
    with pytest.raises(TypeError, match="fp16, bf16, fp32 or fp64"):
        GF.conv2d(x.long(), torch.randn(4, 4, 3, 3).long())
    with pytest.raises(ValueError, match="groups=1"):
        ganengine.nn.Conv2d(4, 4, 3, groups=2)


# ----------------------------------------------------------------------------- the eager route (twin)
# (transposed, x shape, weight shape, stride, padding, output_padding, channels_last): 4x4 at stride 2
# (every cpu route legal), a single input pixel, an odd transposed map in channels_last
_TWIN_CASES = [(False, (2, 3, 9, 7), (5, 3, 4, 4), 2, 1, 0, False), (False, (1, 4, 1, 1), (3, 4, 4, 4), 1, 2, 0, False),
               (True, (2, 4, 5, 3), (4, 3, 4, 4), 2, 1, 1, True)]


@pytest.mark.parametrize("route", ["torch", pytest.param("gemm", marks=needs_ext),
                                   pytest.param("winograd", marks=needs_ext)])
@pytest.mark.parametrize("case", _TWIN_CASES, ids=lambda c: ("T" if c[0] else "") + "x".join(map(str, c[1]))
                         + ("-cl" if c[6] else ""))
def test_twin_matches_custom_op(monkeypatch, route, case):
    """The eager route (ops/_eager.py: the custom op's body and backward in an autograd.Function,
    what a plain eager call runs where the C++ entry declines and the call is not the vendor
    convolution: the torch backend, the cpu backend's GEMM / Winograd routes) against the custom op
    itself: the same bits, forward, backward and double backward. (The GPU backends call cuDNN
    directly, no custom op.)"""
    monkeypatch.setattr(_dispatch, "lean_op", lambda *a, **k: None)  # no C++ lean entry in front
    tr, xs, ws, s, p, op, cl = case
    dtype = torch.float64 if route == "torch" else torch.float32
    torch.manual_seed(0)
    x0 = torch.randn(xs, dtype=dtype)
    if cl:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    w0, b0 = torch.randn(ws, dtype=dtype) * 0.3, torch.randn(ws[1] if tr else ws[0], dtype=dtype)
    backend = "torch" if route == "torch" else "cpu"

    def run(twin):
        x, w, b = (t.detach().clone().requires_grad_() for t in (x0, w0, b0))
        policies = _route(route) if route != "torch" else (contextlib.nullcontext(), contextlib.nullcontext())
        with on_backend(backend), policies[0], policies[1]:
            if route != "torch":
                assert getattr(cv, f"uses_{route}")(x, w, [s, s], [p, p], tr, *([[op, op]] if route == "winograd" else []))
            if twin:
                y = GF.conv_transpose2d(x, w, b, s, p, op) if tr else GF.conv2d(x, w, b, s, p)
                assert type(y.grad_fn).__name__ == "ganengine::conv_fwdBackward"  # the twin served it
            else:
                y = cv.conv_fwd(x, w, b, [s, s], [p, p], [op, op], tr)
                assert type(y.grad_fn).__name__ != "ganengine::conv_fwdBackward"
            assert _dispatch.last_used["conv"] == backend
            return route_results(y, (x, w, b), dtype)

    assert_same_bits(run(True), run(False))


def test_modules_take_unbatched_inputs_as_torch_does():
    """nn.Conv2d / nn.ConvTranspose2d (and nn.InstanceNorm2d) take an unbatched (C, H, W) input:
    so do the drop-in modules fuse() puts in their place."""
    import ganengine.nn as gnn

    torch.manual_seed(0)
    x = torch.randn(4, 9, 7)
    pairs = [(gnn.Conv2d(4, 6, 3, 2, 1), nn.Conv2d(4, 6, 3, 2, 1)),
             (gnn.ConvTranspose2d(4, 6, 4, 2, 1), nn.ConvTranspose2d(4, 6, 4, 2, 1)),
             (gnn.Conv3x3(4, 6), nn.Conv2d(4, 6, 3, 1, 1)),
             (gnn.Conv2dAct(4, 6, 4, 2, 1), nn.Sequential(nn.Conv2d(4, 6, 4, 2, 1), nn.LeakyReLU(0.2))),
             (gnn.Conv2dInstanceNormAct(4, 6, 4, 2, 1),
              nn.Sequential(nn.Conv2d(4, 6, 4, 2, 1), nn.InstanceNorm2d(6), nn.LeakyReLU(0.2)))]
    for mod, ref in pairs:
        ref_conv = ref[0] if isinstance(ref, nn.Sequential) else ref
        mod.load_state_dict(ref_conv.state_dict())
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_ref = mod(xa), ref(xb)
        assert y.shape == y_ref.shape and y.dim() == 3
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        y.square().sum().backward()
        y_ref.square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    net = nn.Sequential(nn.Conv2d(4, 6, 3, 1, 1), nn.ReLU(), nn.Conv2d(6, 6, 4, 2, 1), nn.LeakyReLU(0.2))
    torch.testing.assert_close(ganengine.fuse(net)(x), net(x), rtol=1e-5, atol=1e-5)
    mod, ref = pairs[1]
    for size in ((19, 15), (6, 19, 15)):   # output_size with or without the channel entry, as torch takes it
        assert mod(x, output_size=size).shape == ref(x, output_size=size).shape == (6, 19, 15)


def test_ambiguous_layouts_follow_pytorchs_reading_of_the_strides():
    """A 1x1 map (or one channel) is NCHW- and NHWC-contiguous at once: PyTorch's convolution reads
    its strides (suggest_memory_format) and writes channels_last outputs for channels_last strides
    (the U-Net's innermost ConvTranspose in a channels_last model; dropout after it draws its mask in
    memory order), so the fused ops and modules do too, on every route."""
    import ganengine.nn as gnn

    torch.manual_seed(0)
    base = torch.randn(2, 8, 1, 1)
    inputs = {"nchw": base, "nhwc": base.contiguous(memory_format=torch.channels_last),
              "one channel nhwc": torch.randn(2, 1, 5, 5).contiguous(memory_format=torch.channels_last)}
    for name, x in inputs.items():
        c = x.shape[1]
        cases = [(gnn.ConvTranspose2d(c, 4, 4, 2, 1), nn.ConvTranspose2d(c, 4, 4, 2, 1)),
                 (gnn.Conv2d(c, 4, 3, 1, 1), nn.Conv2d(c, 4, 3, 1, 1)),
                 (gnn.Conv2dAct(c, 4, 3, 1, 1), nn.Sequential(nn.Conv2d(c, 4, 3, 1, 1), nn.LeakyReLU(0.2)))]
        for mod, ref in cases:
            (ref[0] if isinstance(ref, nn.Sequential) else ref).load_state_dict(mod.state_dict())
            for policy in ("auto", "always", "never"):
                with cv.gemm_policy(policy):
                    y, want = mod(x), ref(x)
                assert y.stride() == want.stride(), (name, type(mod).__name__, policy, y.stride(), want.stride())
                torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)


def test_sliced_channels_last_and_chained_tiny_outputs_keep_eagers_layout():
    """A slice of a channels_last map (neither layout dense: CUT's anti-aliased upsampling) gives
    channels_last outputs in eager; so do the fused modules. And an output that is both layouts at
    once (a 1x1 map from the GEMM route) carries the standard strides of its format, so the next
    conv reads it as eager's (the GEMM forms' views left other strides on its size-1 dims)."""
    import ganengine.nn as gnn

    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)[:, :, 1:, 1:]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    pairs = [(gnn.Conv2d(8, 4, 4, 2, 1), nn.Conv2d(8, 4, 4, 2, 1)),
             (gnn.ConvTranspose2d(8, 4, 4, 2, 1), nn.ConvTranspose2d(8, 4, 4, 2, 1)),
             (gnn.Conv3x3(8, 4), nn.Conv2d(8, 4, 3, 1, 1)),
             (gnn.Conv2dAct(8, 4, 4, 2, 1), nn.Sequential(nn.Conv2d(8, 4, 4, 2, 1), nn.LeakyReLU(0.2))),
             (gnn.BatchNormAct2d(8, activation="relu"), nn.Sequential(nn.BatchNorm2d(8), nn.ReLU())),
             (gnn.InstanceNormAct2d(8, activation="relu"), nn.Sequential(nn.InstanceNorm2d(8), nn.ReLU()))]
    for mod, ref in pairs:
        (ref[0] if isinstance(ref, nn.Sequential) else ref).load_state_dict(mod.state_dict())
        y, want = mod(x), ref(x)
        assert y.stride() == want.stride(), (type(mod).__name__, y.stride(), want.stride())
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    one = torch.randn(2, 6, 1, 1).contiguous(memory_format=torch.channels_last)[:, :3]   # a 1x1 slice
    bn, ref_bn = gnn.BatchNormAct2d(3, activation="relu"), nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())
    assert bn(one).stride() == ref_bn(one).stride()
    h = torch.randn(3, 2, 2, 2, requires_grad=True)
    w1, w2 = torch.randn(2, 4, 2, 2), torch.randn(4, 4, 4, 4)
    for policy in ("always", "auto"):
        with cv.gemm_policy(policy):
            a = GF.conv_transpose2d(h, w1, None, 1, 1)   # a 1x1 map
            y = GF.conv_transpose2d(a, w2, None, 2, 1)
        ea = F.conv_transpose2d(h, w1, None, 1, 1)
        assert a.stride() == ea.stride() and y.stride() == F.conv_transpose2d(ea, w2, None, 2, 1).stride()
        (dx,) = torch.autograd.grad(GF.conv2d(h, w2[:, :2, :2, :2].contiguous(), None, 1, 0).sum(), h)
        assert dx.stride() == h.stride()
