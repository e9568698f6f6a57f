"""conv_act family: every backend vs the fp64 torch composition, forward and backward."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ganengine
import ganengine.functional as GF
import ganengine.nn as gnn
from ganengine import _ext
from ganengine.backends import strict
from ganengine.ops import _dispatch
from ganengine.ops import conv_act as ops
from tests._backends import out_round
from tests._chain_bounds import ChainBounds
from tests._conv_bounds import conv_scales, cpu_winograd_route
from tests._model_bounds import Census, assert_normwise, census
from tests._tolerance import assert_below, gamma, unit_roundoff
from tests._train_utils import one_thread  # noqa: F401 (fixture)

# (backend, triton conv implementation)
BACKENDS = [("torch", None), ("cpu", None), ("triton", "igemm"), ("triton", "vendor")]
IDS = ["torch", "cpu", "triton-igemm", "triton-vendor"]


def _skip_unavailable(backend):
    if not ganengine.backends.available()[backend]:
        pytest.skip(f"backend {backend} unavailable: {ganengine.backends.status()[backend]}")


def _layout(x, kind):
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "strided":  # a non-dense view
        return torch.cat([x, x], dim=3)[:, :, :, ::2]
    return x


def _run(backend, impl, fn, tensors, grad_fn, **kw):
    """Forward + backward of fn on copies of ``tensors``; returns (out, grads)."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in tensors]
    ctx = ops.triton_conv_impl(impl) if impl else ops.triton_conv_impl("auto")
    with ganengine.use_backend(backend), strict(), ctx:
        out = fn(*leaves, **kw)
        grad_fn(out).backward()
    return out, [t.grad if t is not None and t.requires_grad else None for t in leaves]


def _block(tensors, stride, padding, norm, slope=0.2):
    """The reference layers of a conv_act / conv_in_act call: conv (+ instance norm) + LeakyReLU(slope)."""
    x, wt, b = tensors[:3]
    conv = nn.Conv2d(wt.shape[1], wt.shape[0], wt.shape[2], stride, padding, bias=b is not None, device=x.device)
    with torch.no_grad():
        conv.weight.copy_(wt.float())
        if b is not None:
            conv.bias.copy_(b.float())
    layers = [conv]
    if norm:
        gam, bet = (tensors[3], tensors[4]) if len(tensors) > 3 else (None, None)
        inorm = nn.InstanceNorm2d(wt.shape[0], affine=gam is not None, device=x.device)
        if gam is not None:
            with torch.no_grad():
                inorm.weight.copy_(gam.float())
                inorm.bias.copy_(bet.float())
        layers.append(inorm)
    return layers + [nn.LeakyReLU(slope)]


def _bounds(backend, tensors, grad, stride, padding, norm, store_dtype=None, grad_err=None, product_u=0.0,
            slope=0.2):
    """Elementwise bounds (tests/_chain_bounds.py) of out and of each input's gradient: the conv's
    own rounding (the larger of the direct form's and a Winograd route the cpu backend may take),
    carried through the norm and the activation."""
    layers = _block(tensors, stride, padding, norm, slope)
    with ganengine.use_backend(backend):
        cb = ChainBounds(layers, tensors[0], grad, winograd=cpu_winograd_route if backend == "cpu" else None,
                         store_dtype=store_dtype, grad_err=grad_err, product_u=product_u)
    if grad is None:
        return cb, []
    params = [p for m in layers for p in m.parameters()]
    per = {id(p): cb.param_errs.get(id(p)) for p in params}
    conv, norm_layer = layers[0], layers[1] if norm else None
    errs = [cb.e_dx, per[id(conv.weight)], None if conv.bias is None else per[id(conv.bias)]]
    if norm_layer is not None and norm_layer.affine:
        errs += [per[id(norm_layer.weight)], per[id(norm_layer.bias)]]
    return cb, errs


def _compare(out, grads, ref_out, ref_grads, bounds, backend="torch"):
    """out and every gradient within the bounds of the exact (fp64) reference."""
    cb, errs = bounds
    assert_below(out, ref_out, cb.e_y, name="out", out_round=out_round(backend, out.dtype))
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        if r is None:
            continue
        assert_below(g, r, errs[i], name=f"grad {i}", out_round=out_round(backend, g.dtype))




SHAPES = [  # (N, C_in, H, W, C_out, stride, padding)
    (1, 3, 9, 11, 5, 2, 1),
    (3, 5, 7, 6, 7, 1, 1),
    (2, 4, 8, 9, 3, 2, 0),
]


@pytest.mark.parametrize("backend,impl", BACKENDS, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_conv2d_act_matches_reference(backend, impl, shape, layout):
    _skip_unavailable(backend)
    n, ci, h, w, co, s, p = shape
    x = _layout(torch.randn(n, ci, h, w), layout).requires_grad_()
    wt = (torch.randn(co, ci, 4, 4) * 0.2).requires_grad_()
    b = torch.randn(co).requires_grad_()
    g = torch.randn(n, co, (h + 2 * p - 4) // s + 1, (w + 2 * p - 4) // s + 1)
    out, grads = _run(backend, impl, GF.conv2d_act, (x, wt, b), lambda y: (y * g).sum(), stride=s, padding=p)
    assert _dispatch.last_used["conv2d_act"] == backend
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    ref_out, ref_grads = _run("torch", None, ops.reference_conv2d_act,
                              [t.double() for t in (x, wt, b)], lambda y: (y * g.double()).sum(),
                              stride=s, padding=p, negative_slope=0.2)
    _compare(out, grads, ref_out, ref_grads, _bounds(backend, (x, wt, b), g, s, p, False), backend)


@pytest.mark.parametrize("backend,impl", BACKENDS, ids=IDS)
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_conv2d_instance_norm_act_matches_reference(backend, impl, affine, shape):
    _skip_unavailable(backend)
    n, ci, h, w, co, s, p = shape
    x = _layout(torch.randn(n, ci, h, w), "channels_last" if affine else "contiguous").requires_grad_()
    wt = (torch.randn(co, ci, 4, 4) * 0.2).requires_grad_()
    b = torch.randn(co).requires_grad_()
    gam = (torch.rand(co) + 0.5).requires_grad_() if affine else None
    bet = torch.randn(co).requires_grad_() if affine else None
    g = torch.randn(n, co, (h + 2 * p - 4) // s + 1, (w + 2 * p - 4) // s + 1)

    def fn(x, wt, b, gam, bet, **kw):
        return GF.conv2d_instance_norm_act(x, wt, b, s, p, gam, bet, **kw)

    def ref(x, wt, b, gam, bet):
        return ops.reference_conv2d_in_act(x, wt, b, s, p, gam, bet, 1e-5, 0.2)

    out, grads = _run(backend, impl, fn, (x, wt, b, gam, bet), lambda y: (y * g).sum())
    assert _dispatch.last_used["conv2d_instance_norm_act"] == backend
    ref_out, ref_grads = _run("torch", None, ref, [t.double() if t is not None else None for t in (x, wt, b, gam, bet)],
                              lambda y: (y * g.double()).sum())
    # the conv bias cancels exactly: our gradient is exactly 0, torch's is rounding noise
    assert torch.equal(grads[2], torch.zeros_like(b))
    ref_grads[2] = None
    _compare(out, grads, ref_out, ref_grads, _bounds(backend, (x, wt, b, gam, bet), g, s, p, True), backend)


@pytest.mark.parametrize("backend,impl", BACKENDS, ids=IDS)
@pytest.mark.parametrize("norm", [False, True])
def test_sum_backward_stride0_grad(backend, impl, norm):
    """``y.sum().backward()`` hands the backward an expanded (stride-0) gradient."""
    _skip_unavailable(backend)
    x = torch.randn(2, 3, 9, 9).requires_grad_()
    wt = (torch.randn(4, 3, 4, 4) * 0.3).requires_grad_()
    b = torch.randn(4).requires_grad_()
    fn = GF.conv2d_instance_norm_act if norm else GF.conv2d_act
    ref = (lambda x, w, b, **k: ops.reference_conv2d_in_act(x, w, b, 2, 1, None, None, 1e-5, 0.2)) if norm else \
        (lambda x, w, b, **k: ops.reference_conv2d_act(x, w, b, 2, 1, 0.2))
    out, grads = _run(backend, impl, fn, (x, wt, b), lambda y: y.sum(), stride=2, padding=1)
    ref_out, ref_grads = _run("torch", None, ref, [t.double() for t in (x, wt, b)], lambda y: y.sum())
    if norm:
        ref_grads[2] = None
    _compare(out, grads, ref_out, ref_grads, _bounds(backend, (x, wt, b), torch.ones(ref_out.shape), 2, 1, norm),
             backend)


@pytest.mark.parametrize("backend,impl", [("cpu", None), ("triton", "igemm")], ids=["cpu", "triton-igemm"])
def test_fp16(backend, impl):
    _skip_unavailable(backend)
    x = torch.randn(2, 4, 9, 8).half().requires_grad_()
    wt = (torch.randn(6, 4, 4, 4) * 0.2).half().requires_grad_()
    b = torch.randn(6).half().requires_grad_()
    for fn in (GF.conv2d_act, GF.conv2d_instance_norm_act):
        out, grads = _run(backend, impl, fn, (x, wt, b), lambda y: (y.float() ** 2).sum() * 0.01, stride=2, padding=1)
        assert out.dtype == torch.float16
        f = ops.reference_conv2d_act if fn is GF.conv2d_act else (
            lambda x, w, b, s, p, sl: ops.reference_conv2d_in_act(x, w, b, s, p, None, None, 1e-5, sl))
        ref_out, ref_grads = _run("torch", None, f, [t.double() for t in (x, wt, b)],
                                  lambda y: (y ** 2).sum() * 0.01, s=2, p=1, sl=0.2) if fn is not GF.conv2d_act else \
            _run("torch", None, f, [t.double() for t in (x, wt, b)], lambda y: (y ** 2).sum() * 0.01,
                 stride=2, padding=1, negative_slope=0.2)
        if fn is not GF.conv2d_act:
            ref_grads[2] = None
        # fp32 accumulation, every intermediate possibly stored in fp16 (u16 per stage); the
        # loss's gradient 0.02 y carries y's error (fp16 y: its bound plus u16 |y|)
        norm = fn is not GF.conv2d_act
        fwd, _ = _bounds(backend, (x, wt, b), None, 2, 1, norm, store_dtype=torch.float16)
        e_grad = 0.02 * (fwd.e_y + unit_roundoff(torch.float16) * ref_out.abs())
        _compare(out, grads, ref_out, ref_grads,
                 _bounds(backend, (x, wt, b), 0.02 * ref_out, 2, 1, norm, torch.float16, e_grad), backend)


def test_fp64_gradcheck_and_gradgradcheck(one_thread):
    """Double backward (WGAN-GP) through both ops: exact second derivatives. Tiny fp64 shapes."""
    backend = "cpu" if ganengine.backends.available()["cpu"] else "torch"
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(2, 2, 3, 3, dtype=torch.float64) * 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    gam = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    with ganengine.use_backend(backend), strict():
        f = lambda x, w, b: GF.conv2d_act(x, w, b, 2, 1)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, w, b))
        assert torch.autograd.gradgradcheck(f, (x, w, b))
        f = lambda x, w, g: GF.conv2d_instance_norm_act(x, w, None, 1, 1, g, None)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, w, gam))
        assert torch.autograd.gradgradcheck(f, (x, w, gam))


def test_gradient_penalty_matches_torch():
    """The WGAN-GP pattern: grad of D wrt its input with create_graph, then backward to weights."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    w = (torch.randn(4, 3, 4, 4) * 0.3).requires_grad_()
    b = torch.randn(4).requires_grad_()

    def penalty(fn):
        w.grad = b.grad = None
        y = fn(x, w, b, 2, 1)
        (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        ((gx.flatten(1).norm(dim=1) - 1) ** 2).mean().backward()
        return w.grad.clone(), b.grad.clone()

    with ganengine.use_backend("cpu" if ganengine.backends.available()["cpu"] else "torch"):
        got = penalty(GF.conv2d_act)
    ref = penalty(lambda x, w, b, s, p: F.leaky_relu(F.conv2d(x, w, b, s, p), 0.2))
    # normwise (tests/_model_bounds.py): conv forward and dx, their derivatives, the penalty's
    # norm (4 conv passes + 1); n: 3*16 taps forward, dw over 2*5*5 pixels
    cen = Census.of(n_fwd=3 * 16, n=2 * 5 * 5, depth=5)
    for a, r in zip(got, ref):
        assert_normwise(a, r, cen, backward=True)


_ALL_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
                "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("backend,impl", [("cpu", None), ("triton", "igemm"), ("triton", "vendor")],
                         ids=["cpu", "triton-igemm", "triton-vendor"])
def test_opcheck(backend, impl, one_thread):
    _skip_unavailable(backend)
    x = torch.randn(2, 3, 7, 6).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 3, 4, 4) * 0.3
    b = torch.randn(4)
    y = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    with ganengine.use_backend(backend), strict(), ops.triton_conv_impl(impl or "auto"):
        torch.library.opcheck(ops.conv2d_act_fwd, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(),
                                                   [2, 2], [1, 1], 0.2))
        torch.library.opcheck(ops.conv2d_in_act_fwd, (x, w, b, torch.rand(4).requires_grad_(), None,
                                                      [2, 2], [1, 1], 1e-5, 0.2))
        torch.library.opcheck(ops.conv2d_act_bwd, (y.abs(), x.detach(), w.detach(), y, [2, 2], [1, 1], 0.2,
                                                   [True, True, True]), test_utils=_ALL_OPCHECK)
        _, c, mean, rstd = ops.conv2d_in_act_fwd(x.detach(), w.detach(), None, None, None, [2, 2], [1, 1], 1e-5, 0.2)
        in_args = (y, x.detach(), w.detach(), c, mean, rstd)
        torch.library.opcheck(ops.conv2d_in_act_bwd, (*in_args, torch.rand(4), torch.randn(4), [2, 2], [1, 1], 0.2,
                                                      [True, False]), test_utils=_ALL_OPCHECK)
        # without beta: its gradient slot is an empty (0,) tensor on every route (the triton routes
        # once left a (C,) one unwritten, which the aot tests compared between two calls)
        torch.library.opcheck(ops.conv2d_in_act_bwd, (*in_args, torch.rand(4), None, [2, 2], [1, 1], 0.2,
                                                      [True, False]), test_utils=_ALL_OPCHECK)


_RAW_OPS = pytest.mark.skipif(
    not (_ext.loaded() and _ext.has_kernel("conv2d_act", "CompositeExplicitAutograd")
         and _ext.has_kernel("conv2d_in_act", "CompositeExplicitAutograd")),
    reason="the C++ extension (ganengine_C::conv2d_act / conv2d_in_act) is not built")
# (layout, conv bias, dtype) of the raw C++ entries' opchecks
_RAW_CASES = [("nchw", True, torch.float32), ("channels_last", True, torch.float32),
              ("nchw", False, torch.float32), ("channels_last", False, torch.bfloat16)]
_RAW_IDS = ["nchw-bias-fp32", "channels_last-bias-fp32", "nchw-nobias-fp32", "channels_last-nobias-bf16"]


def _raw_conv_args(layout, bias, dtype):
    """x (2, 3, 7, 6), weight (4, 3, 4, 4), bias? of the raw entries, requiring grad."""
    g = torch.Generator().manual_seed(7)
    x = _layout(torch.randn(2, 3, 7, 6, generator=g).to(dtype), layout)
    w = (torch.randn(4, 3, 4, 4, generator=g) * 0.3).to(dtype)
    b = torch.randn(4, generator=g).to(dtype).requires_grad_() if bias else None
    return x.requires_grad_(), w.requires_grad_(), b


@_RAW_OPS
@pytest.mark.parametrize("layout,bias,dtype", _RAW_CASES, ids=_RAW_IDS)
def test_raw_conv2d_act_opcheck(layout, bias, dtype, one_thread):
    """The eager C++ entry ganengine_C::conv2d_act passes every opcheck test, AOT dispatch with
    dynamic (symbolic) shapes included: its checks read SymInt sizes."""
    x, w, b = _raw_conv_args(layout, bias, dtype)
    torch.library.opcheck(torch.ops.ganengine_C.conv2d_act.default, (x, w, b, [2, 2], [1, 1], 0.2),
                          test_utils=_ALL_OPCHECK)


@_RAW_OPS
@pytest.mark.parametrize("layout,bias,dtype", _RAW_CASES, ids=_RAW_IDS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_raw_conv2d_in_act_opcheck(layout, bias, dtype, affine, one_thread):
    """As test_raw_conv2d_act_opcheck for ganengine_C::conv2d_in_act (a bias requiring grad: its
    zero gradient is shaped by the traced bias's sizes), with and without gamma / beta (fp32 for
    a reduced x: the dtype rule of F.instance_norm)."""
    x, w, b = _raw_conv_args(layout, bias, dtype)
    gam = bet = None
    if affine:
        gam, bet = (torch.rand(4) + 0.5).requires_grad_(), torch.randn(4).requires_grad_()
    torch.library.opcheck(torch.ops.ganengine_C.conv2d_in_act.default,
                          (x, w, b, gam, bet, [2, 2], [1, 1], 1e-5, 0.2), test_utils=_ALL_OPCHECK)


def test_torch_compile_fullgraph():
    x = torch.randn(2, 3, 9, 9).requires_grad_()
    w = (torch.randn(4, 3, 4, 4) * 0.3).requires_grad_()
    b = torch.randn(4).requires_grad_()

    def f(x, w, b):
        y = GF.conv2d_act(x, w, b, 2, 1)
        return GF.conv2d_instance_norm_act(y, w.new_ones(5, 4, 4, 4) * 0.1, None, 1, 1).sum()

    backend = "cpu" if ganengine.backends.available()["cpu"] else "torch"
    with ganengine.use_backend(backend):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        out = compiled(x, w, b)
        out.backward()
        gx = x.grad.clone()
        x.grad = None
        ref = f(x, w, b)
        ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, x.grad)


def test_autocast_runs_conv_in_autocast_dtype():
    x = torch.randn(1, 3, 8, 8)
    w = torch.randn(4, 3, 4, 4) * 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = GF.conv2d_act(x, w, None, 2, 1)
        ref = F.leaky_relu(F.conv2d(x, w, None, 2, 1), 0.2)
    assert y.dtype == ref.dtype == torch.bfloat16
    # both from the same bf16-rounded x and w: fp32 accumulation (gamma_n x sum|terms|), the
    # result rounded to bf16 (conv output, then the activation's): 2 u |y| a side
    xb, wb = x.bfloat16(), w.bfloat16()
    sc = conv_scales(xb, wb, torch.zeros(ref.shape), None, 2, 1)
    allowed = 2 * gamma(sc.n_y, torch.float32) * sc.y + 4 * unit_roundoff(torch.bfloat16) * ref.double().abs()
    assert_below(y.float(), ref.float(), allowed, out_dtype=torch.bfloat16)


def test_negative_slope_and_activations():
    x = torch.randn(1, 2, 7, 7, dtype=torch.float64)
    w = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    # fp64 both sides, normwise (tests/_model_bounds.py): conv (2*16 taps) and instance norm
    # (a 6x6 plane); the conv alone is one stage
    conv_only, with_norm = Census.of(2 * 16 + 1, 2 * 16 + 1, 1), Census.of(6 * 6, 6 * 6, 2)
    assert_normwise(GF.conv2d_act(x, w, None, 1, 1, negative_slope=-0.5),
                    F.leaky_relu(F.conv2d(x, w, None, 1, 1), -0.5), conv_only, acc_dtype=torch.float64)
    c = F.conv2d(x, w, None, 1, 1)
    assert_normwise(GF.conv2d_instance_norm_act(x, w, None, 1, 1, activation="relu"),
                    F.relu(F.instance_norm(c)), with_norm, acc_dtype=torch.float64)
    assert_normwise(GF.conv2d_instance_norm_act(x, w, None, 1, 1, activation="none"), F.instance_norm(c),
                    with_norm, acc_dtype=torch.float64)


def test_errors_name_the_argument():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="input channels"):
        GF.conv2d_act(x, torch.randn(4, 2, 4, 4))
    with pytest.raises(ValueError, match="x must be"):
        GF.conv2d_act(x[0], torch.randn(4, 3, 4, 4))
    with pytest.raises(ValueError, match="stride"):
        GF.conv2d_act(x, torch.randn(4, 3, 4, 4), stride=0)
    with pytest.raises(ValueError, match="bias"):
        GF.conv2d_act(x, torch.randn(4, 3, 4, 4), torch.randn(5))
    with pytest.raises(ValueError, match="activation"):
        GF.conv2d_instance_norm_act(x, torch.randn(4, 3, 4, 4), activation="gelu")
    from ganengine.nn.conv_act import _check_supported

    with pytest.raises(ValueError, match="groups"):
        _check_supported("Conv2dAct", 2, (1, 1), "zeros", 0)
    with pytest.raises(ValueError, match="padding_mode"):
        _check_supported("Conv2dAct", 1, (1, 1), "reflect", 0)


def test_modules_and_fuse():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2, True), nn.Conv2d(8, 4, 3, 1, 1, groups=2),
                        nn.LeakyReLU(0.2), nn.Conv2d(4, 2, 4, 1, 1), nn.LeakyReLU(0.1))
    import ganengine.ops.conv as cv

    with cv.gemm_policy("always"):  # fuse rewrites a conv only where the op has a faster route for it
        fused, report = ganengine.fuse(seq, return_report=True)
    assert report.get("conv2d+leaky_relu") == 2  # the grouped conv is declined
    assert isinstance(fused[0], gnn.Conv2dAct) and isinstance(fused[1], nn.Identity)
    assert type(fused[2]) is nn.Conv2d
    assert isinstance(fused[4], gnn.Conv2dAct) and fused[4].negative_slope == 0.1
    assert list(fused.state_dict()) == list(seq.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with census(seq) as cen:
        want = seq(x.clone())
    assert_normwise(fused(x), want, cen)  # normwise network bound (tests/_model_bounds.py)

    m = gnn.Conv2dInstanceNormAct(3, 5, 4, 2, 1, affine=True)
    assert set(m.state_dict()) == {"weight", "bias", "norm_weight", "norm_bias"}
    want = F.leaky_relu(F.instance_norm(F.conv2d(x, m.weight, m.bias, 2, 1), weight=m.norm_weight,
                                        bias=m.norm_bias), 0.2)
    cb = ChainBounds(_block((x, m.weight, m.bias, m.norm_weight, m.norm_bias), 2, 1, True), x)
    assert_below(m(x), want, 2 * cb.e_y)  # the block's elementwise bound, both sides


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["igemm", "vendor"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_triton(impl, dtype):
    """On a GPU: both triton convolution paths (bf16 tl.dot only works there) vs fp64 torch."""
    torch.manual_seed(0)
    x = torch.randn(3, 16, 33, 31, device="cuda").contiguous(memory_format=torch.channels_last)
    w = torch.randn(32, 16, 4, 4, device="cuda") * 0.1
    b = torch.randn(32, device="cuda")
    for stride in (1, 2):
        for fn in (GF.conv2d_act, GF.conv2d_instance_norm_act):
            # (clone: for fp32, .to(dtype) returns x itself, whose .grad would accumulate over the loop)
            ins = [t.to(dtype).clone().requires_grad_() for t in (x, w, b)]
            with ganengine.use_backend("triton"), strict(), ops.triton_conv_impl(impl):
                y = fn(*ins, stride=stride, padding=1)
                g = torch.randn_like(y)
                (y * g).sum().backward()
            refs = [t.detach().double().requires_grad_() for t in ins]
            if fn is GF.conv2d_act:
                yr = ops.reference_conv2d_act(*refs, stride, 1, 0.2)
            else:
                yr = ops.reference_conv2d_in_act(*refs, stride, 1, None, None, 1e-5, 0.2)
            (yr * g.double()).sum().backward()
            # the block's bounds (tests/_chain_bounds.py); fp32 convs may run as TF32 (products of
            # inputs rounded to 10-bit mantissas: u = 2^-11), fp16/bf16 ones store intermediates
            low = dtype != torch.float32
            bounds = _bounds("triton", ins, g, stride, 1, fn is not GF.conv2d_act,
                             store_dtype=dtype if low else None, product_u=0.0 if low else 2.0 ** -11)
            _compare(y, [a.grad for a in ins[:2]], yr, [r.grad for r in refs[:2]], bounds, "triton")



@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_cuda_calls_take_the_fast_entry(monkeypatch, layout):
    """On a GPU, with the cuda backend chosen, GF.conv2d_act is one call of the fast entry (its CUDA
    bit), not the dispatcher op, with the dispatcher op's numbers bit for bit (the same C++ body;
    cuDNN deterministic for the comparison)."""
    if not ops._ext.has_kernel("conv_act_fwd", "CUDA"):
        pytest.skip("ganengine._C without the CUDA conv_act kernels")
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    dispatcher = ops._act_dispatcher_entry
    monkeypatch.setattr(ops, "_act_dispatcher_entry", lambda *a: pytest.fail("the dispatcher op was taken"))
    torch.manual_seed(0)
    x = torch.randn(2, 5, 13, 11, device="cuda")
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(7, 5, 4, 4, device="cuda") * 0.1, torch.randn(7, device="cuda")
    outs = []
    for call in (lambda *a: GF.conv2d_act(*a, 2, 1), lambda *a: dispatcher(*a, 2, 1, 0.2)):
        ins = [t.clone().requires_grad_() for t in (x, w, b)]
        with ganengine.use_backend("cuda"), strict():
            y = call(*ins)
        y.backward(torch.cos(y.detach()))
        outs.append([y] + [t.grad for t in ins])
    assert _dispatch.last_used["conv2d_act"] == "cuda"
    for a, r in zip(*outs):
        assert torch.equal(a, r)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("slope,bias", [(0.2, True), (0.0, True), (1.0, False), (0.2, False)])
def test_cuda_backend(dtype, layout, slope, bias):
    """On a GPU: the cuda backend of conv2d_act (cuDNN convolution + CUDA C++ epilogues) and of
    conv2d_instance_norm_act (cuDNN + the CUDA C++ instance norm kernels), through their C++ entries,
    vs fp64 torch, forward and the x / weight gradients, within the block's bounds (TF32 products
    for fp32, as the Triton vendor route's test allows)."""
    if not (ops._ext.has_kernel("conv_act_fwd", "CUDA") and ops._ext.has_kernel("conv_in_act_fwd", "CUDA")):
        pytest.skip("ganengine._C without the CUDA conv_act kernels")
    torch.manual_seed(0)
    x = torch.randn(3, 16, 33, 31, device="cuda")
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(32, 16, 4, 4, device="cuda") * 0.1
    b = torch.randn(32, device="cuda") if bias else None
    act = {0.2: "leaky_relu", 0.0: "relu", 1.0: "none"}[slope]
    gb = [torch.randn(32, device="cuda") + 1, torch.randn(32, device="cuda")]  # the norm's affine (with a bias)
    for stride in (1, 2):
        for norm in (False, True):
            ins = [t.to(dtype).clone().requires_grad_() if t is not None else None for t in (x, w, b)]
            if norm and bias:  # the affine instance norm (gamma, beta in fp32, as modules keep them)
                ins += [t.clone().requires_grad_() for t in gb]
            with ganengine.use_backend("cuda"), strict():
                if norm:
                    y = GF.conv2d_instance_norm_act(*ins[:3], stride=stride, padding=1,
                                                    norm_weight=ins[3] if len(ins) > 3 else None,
                                                    norm_bias=ins[4] if len(ins) > 3 else None, activation=act,
                                                    negative_slope=slope)
                else:
                    y = GF.conv2d_act(*ins, stride=stride, padding=1, negative_slope=slope)
                g = torch.randn_like(y)
                (y * g).sum().backward()
            assert _dispatch.last_used["conv2d_instance_norm_act" if norm else "conv2d_act"] == "cuda"
            assert y.is_contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)
            refs = [t.detach().double().requires_grad_() if t is not None else None for t in ins]
            if norm:
                gam, bet = (refs[3], refs[4]) if len(refs) > 3 else (None, None)
                yr = ops.reference_conv2d_in_act(*refs[:3], stride, 1, gam, bet, 1e-5, slope)
            else:
                yr = ops.reference_conv2d_act(*refs, stride, 1, slope)
            (yr * g.double()).sum().backward()
            low = dtype != torch.float32
            bounds = _bounds("cuda", [t for t in ins], g, stride, 1, norm, store_dtype=dtype if low else None,
                             product_u=0.0 if low else 2.0 ** -11, slope=slope)
            # every gradient but the normed conv's bias (exactly zero there, where torch's is rounding noise)
            which = [0, 1, 3, 4] if norm else [0, 1, 2]
            which = [i for i in which if i < len(ins) and ins[i] is not None]
            _compare(y, [ins[i].grad if i in which else None for i in range(len(ins))], yr,
                     [refs[i].grad if i in which else None for i in range(len(refs))], bounds, "cuda")


@pytest.mark.gpu
def test_cuda_auto_takes_the_cuda_entry_with_the_python_routes_bits(monkeypatch):
    """auto on CUDA runs conv2d_act's and conv2d_instance_norm_act's C++ entries (cuda first in the
    auto order on NCHW): C++ autograd, and the same bits as the Python route on the cuda backend's
    kernels (forward, gradients, double backward)."""
    if not (ops._ext.has_kernel("conv_act_fwd", "CUDA") and ops._ext.has_kernel("conv_in_act_fwd", "CUDA")):
        pytest.skip("ganengine._C without the CUDA conv_act kernels")
    torch.manual_seed(0)
    base = [torch.randn(2, 3, 9, 7, device="cuda"), torch.randn(5, 3, 4, 4, device="cuda"),
            torch.randn(5, device="cuda")]
    # bitwise comparisons of two runs: cuDNN's deterministic algorithms
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)

    for fn, name in ((lambda x, w, b: GF.conv2d_act(x, w, b, 2, 1, 0.2), "conv2d_act"),
                     (lambda x, w, b: GF.conv2d_instance_norm_act(x, w, b, 2, 1), "conv2d_instance_norm_act")):
        def run():
            x, w, b = (t.clone().requires_grad_() for t in base)
            y = fn(x, w, b)
            plain = torch.autograd.grad((y * y).sum(), (x, w, b))  # the fused backward kernels
            grads = torch.autograd.grad((fn(x, w, b) ** 2).sum(), (x, w, b), create_graph=True)
            gg = torch.autograd.grad(sum(t.sum() for t in grads[:2]), (x, w))  # the composition's
            return y, [y.detach(), *plain, *[t.detach() for t in grads], *gg]

        y, got = run()
        assert _dispatch.last_used[name] == "cuda"
        assert type(y.grad_fn).__name__ == "CppFunction"
        with monkeypatch.context() as m:
            m.setattr(_dispatch, "cuda_entry", lambda *a, **k: None)
            with ganengine.use_backend("cuda"), strict():
                _, want = run()
        for a, c in zip(got, want):
            assert torch.equal(a, c), name

# ----------------------------------------------------------------------------- the eager route (twin)
# (N, C_in, H, W, C_out, kernel, stride, padding, channels_last): a PatchGAN 4x4 stride-2 layer, a
# single input pixel (3x3 at padding 1: a 1x1 output map), odd sizes in channels_last
TWIN_CASES = [(2, 3, 7, 5, 4, 4, 2, 1, False), (1, 2, 1, 1, 3, 3, 1, 1, False), (2, 3, 6, 7, 5, 3, 2, 1, True)]


@pytest.mark.parametrize("backend,impl", BACKENDS, ids=IDS)
@pytest.mark.parametrize("norm", [False, True], ids=["act", "in_act"])
@pytest.mark.parametrize("case", TWIN_CASES, ids=lambda c: "x".join(map(str, c[:4])) + ("-cl" if c[8] else ""))
def test_twin_matches_custom_op(monkeypatch, backend, impl, norm, case, one_thread):
    """The eager route (ops/_eager.py: the custom op's body and backward in an autograd.Function,
    what a plain eager call on the Python route runs: the CUDA path's) against the custom op
    itself: the same bits, forward, backward and double backward (WGAN-GP, R1)."""
    _skip_unavailable(backend)
    monkeypatch.setattr(_dispatch, "lean_op", lambda *a, **k: None)  # no C++ lean entry (CPU only) in front
    _twin_vs_custom_op(backend, impl, norm, case, torch.float64 if backend == "torch" else torch.float32, "cpu")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_twin_under_autocast_matches_custom_op(monkeypatch, backend, one_thread):
    """Under autocast (AMP training) the public functions cast the conv's inputs, then either route
    runs with autocast still on: the same bits, forward and backward."""
    _skip_unavailable(backend)
    monkeypatch.setattr(_dispatch, "lean_op", lambda *a, **k: None)
    torch.manual_seed(0)
    x0, w0, b0, g0 = torch.randn(2, 3, 7, 5), torch.randn(4, 3, 4, 4) * 0.3, torch.randn(4), torch.rand(4) + 0.5
    calls = {"act": lambda x, w, b, g: GF.conv2d_act(x, w, b, 2, 1),
             "in_act": lambda x, w, b, g: GF.conv2d_instance_norm_act(x, w, b, 2, 1, g, b)}
    for name, fn in calls.items():
        res = []
        for twin in (True, False):
            if not twin:
                monkeypatch.setattr(ops._eager, "plain_eager", lambda *t: False)  # the custom op
            ins = [t.detach().clone().requires_grad_() for t in (x0, w0, b0, g0)]
            with ganengine.use_backend(backend), strict(), torch.autocast("cpu", dtype=torch.bfloat16):
                y = fn(*ins)
                assert type(y.grad_fn).__name__.startswith("ganengine::") == twin  # the twin's node
                res.append([y, *torch.autograd.grad(y.float().square().sum(), ins[:4 if name == "in_act" else 3])])
        monkeypatch.undo()
        monkeypatch.setattr(_dispatch, "lean_op", lambda *a, **k: None)
        assert res[0][0].dtype == torch.bfloat16
        for a, b in zip(*res, strict=True):
            assert torch.equal(a, b), name


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["igemm", "vendor"])
@pytest.mark.parametrize("norm", [False, True], ids=["act", "in_act"])
def test_cuda_twin_matches_custom_op(monkeypatch, impl, norm):
    """The CUDA path's eager route against its custom op, both triton implementations (cuDNN's
    deterministic algorithms: the same convolution both ways)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    for case in TWIN_CASES:
        _twin_vs_custom_op("triton", impl, norm, case, torch.float32, "cuda")


def _twin_vs_custom_op(backend, impl, norm, case, dtype, device):
    n, ci, h, w, co, k, s, p, cl = case
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=dtype) * scale).to(device)

    x0 = randn(n, ci, h, w)
    if cl:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    w0, b0 = randn(co, ci, k, k, scale=0.3), randn(co)
    g0, t0 = randn(co).abs() + 0.5, randn(co)
    name = "ganengine::conv2d_in_act_fwdBackward" if norm else "ganengine::conv2d_act_fwdBackward"

    def run(route):
        ins = [t.detach().clone().requires_grad_() for t in ((x0, w0, b0, g0, t0) if norm else (x0, w0, b0))]
        with ganengine.use_backend(backend), strict(), ops.triton_conv_impl(impl or "auto"):
            if route == "twin":
                y = (GF.conv2d_instance_norm_act(*ins[:3], s, p, *ins[3:]) if norm
                     else GF.conv2d_act(*ins, s, p))
                assert type(y.grad_fn).__name__ == name  # the twin served it
            else:
                y = (ops.conv2d_in_act_fwd(*ins, [s, s], [p, p], 1e-5, 0.2)[0] if norm
                     else ops.conv2d_act_fwd(*ins, [s, s], [p, p], 0.2))
                assert type(y.grad_fn).__name__ != name
            assert _dispatch.last_used["conv2d_instance_norm_act" if norm else "conv2d_act"] == backend
            gy = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(1)).to(device)
            grads = torch.autograd.grad(y, ins, gy, create_graph=True)
            first = torch.autograd.grad(y, ins, gy)  # (create_graph=False: the backward body / op)
            gg = torch.autograd.grad(sum((g * g).sum() for g in grads if g.requires_grad), ins[:2])
        return [y, *first, *grads, *gg]

    for a, b in zip(run("twin"), run("custom_op"), strict=True):
        assert a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b)


def test_conv_instance_norm_module_reset_parameters():
    """reset_parameters resets the norm's affine parameters too (nn.InstanceNorm2d's ones and
    zeros): the meta-device pattern, to_empty then reset_parameters, initialises every parameter."""
    m = gnn.Conv2dInstanceNormAct(3, 4, 3, affine=True)
    with torch.no_grad():
        m.norm_weight.fill_(7.0)
        m.norm_bias.fill_(7.0)
    m.reset_parameters()
    assert torch.equal(m.norm_weight, torch.ones(4)) and torch.equal(m.norm_bias, torch.zeros(4))
    meta = gnn.Conv2dInstanceNormAct(3, 4, 3, affine=True, device="meta").to_empty(device="cpu")
    meta.reset_parameters()
    assert torch.equal(meta.norm_weight, torch.ones(4)) and torch.equal(meta.norm_bias, torch.zeros(4))
    assert meta.weight.abs().max() <= 1 / (3 * 9) ** 0.5  # nn.Conv2d's kaiming-uniform bound
