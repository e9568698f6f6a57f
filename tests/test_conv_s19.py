"""Conv family, session 19: the small-kernel route decision, a named backend under autocast in
fuse()'s conv modules, and eager's output layout for maps that are both layouts at once.

* The router answers 1x1 / 2x2 / 3x3 kernels below its thresholds first (csrc/cpu/conv_route.cpp
  ``small_kernel_onednn``); the route of every shape is the one its rules give (checked here against
  those rules, under each GEMM policy).
* ``_conv_common.autocast_for``: the public functions' and modules' cheap ask whether autocast is on
  for x's device (csrc/cpu/conv_py.cpp).
* ganengine.nn's drop-in conv modules and fuse()'s conv modules answer "eager's own call under
  autocast?" with one rule (``_conv_common.module_autocast``): backend 'auto' only; a backend named
  explicitly keeps its route in both (fuse()'s took PyTorch's conv there before).
* A channels_last model on a 1x1 (or 1xW, Hx1) map: the output layout is eager's, strides
  included (``input_in_weight_layout`` read a map that is both layouts at once as NCHW; DCGAN's
  generator's first ConvTranspose2d on N x nz x 1 x 1 noise came out NCHW).
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ganengine
import ganengine.nn as gnn
from ganengine import _ext
from ganengine.backends import use_backend
from ganengine.ops import _dispatch
from ganengine.ops import conv as conv_ops
from ganengine.ops._conv_common import autocast_for
from tests import reference_nets_attention as R
from tests._conv_bounds import conv_scales
from tests._tolerance import assert_within_bound

needs_router = pytest.mark.skipif(not _ext.has_kernel("conv_route", "CPU"), reason="needs the cpu conv router")

CL = torch.channels_last


# ----------------------------------------------------------------------------- (a) routes
def _route(x, w, stride, padding, transposed=False):
    return tuple(_ext.op("conv_route")(x, w, list(stride), list(padding), transposed, [0, 0]))


def _small_kernel_rule(x, w, stride, padding, transposed, policy):
    """The router's rules for kernels of fewer than 16 taps (conv_route.cpp use_gemm: oneDNN under
    'auto' (the 3x3 exception for 2^19+ element weights on at most 64 GEMM columns lost in forward
    wherever measured and went in session 20), every legal fp32 call under 'always'; Winograd 4x4
    and the NHWC rules take 16+ taps only)."""
    legal = x.dtype == torch.float32 and w.dtype == torch.float32
    if policy == "always":
        return 1 if legal else 0
    if policy == "never" or not legal:
        return 0
    return 0


SMALL_KERNEL_CASES = [  # (x shape, w shape, stride, padding, transposed)
    ((1, 8, 8, 8), (8, 8, 3, 3), (1, 1), (1, 1), False),         # host_cost's conv_small_kernels
    ((4, 256, 4, 4), (512, 256, 3, 3), (1, 1), (1, 1), False),   # 2^20-element 3x3 on 64 columns: oneDNN
    ((1, 256, 8, 8), (256, 256, 3, 3), (1, 1), (1, 1), False),   # 2^19+ on 64 columns: oneDNN too
    ((2, 256, 8, 8), (256, 256, 3, 3), (1, 1), (1, 1), False),   # 128 columns: oneDNN
    ((1, 16, 8, 8), (16, 16, 2, 2), (2, 2), (0, 0), False),
    ((2, 32, 5, 7), (16, 32, 1, 1), (1, 1), (0, 0), False),
    ((1, 16, 4, 4), (16, 8, 3, 3), (1, 1), (1, 1), True),
    ((1, 16, 4, 4), (16, 8, 2, 2), (2, 2), (0, 0), True),
]


@needs_router
@pytest.mark.parametrize("policy", ["auto", "always", "never"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", range(len(SMALL_KERNEL_CASES)))
def test_small_kernels_take_the_route_their_rules_give(case, layout, policy):
    xs, ws, stride, padding, transposed = SMALL_KERNEL_CASES[case]
    x = torch.randn(xs).contiguous(memory_format=CL if layout == "channels_last" else torch.contiguous_format)
    w = torch.randn(ws)
    with conv_ops.gemm_policy(policy):
        assert _route(x, w, stride, padding, transposed) == (
            _small_kernel_rule(x, w, stride, padding, transposed, policy), 0)
        if policy != "always":  # (fp64: never the GEMM form)
            assert _route(x.double(), w.double(), stride, padding, transposed) == (0, 0)


@needs_router
def test_small_kernel_calls_match_eager():
    """The call through the fast entry (oneDNN for these kernels): eager's numbers bit for bit."""
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 8, 8, 8), torch.randn(8, 8, 3, 3) * 0.2, torch.randn(8)
    assert torch.equal(ganengine.functional.conv2d(x, w, b, 1, 1), F.conv2d(x, w, b, 1, 1))
    x1 = torch.randn(2, 8, 5, 5)
    assert torch.equal(ganengine.functional.conv_transpose2d(x1, w, b, 1, 1), F.conv_transpose2d(x1, w, b, 1, 1))


@pytest.mark.skipif(getattr(_ext._C, "autocast_for", None) is None, reason="needs the extension's autocast_for")
def test_autocast_for_asks_about_xs_device():
    x = torch.randn(2, 3)
    assert autocast_for(x) is False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_for(x) is True
        assert autocast_for(torch.empty(2, device="meta")) is None  # (a device autocast does not know)
    assert autocast_for(3) is None and autocast_for(None) is None


class _Tagged(torch.Tensor):
    pass


@pytest.mark.skipif(getattr(_ext._C, "conv_entry_default", None) is None or not _ext.has_kernel("conv_fwd", "CPU"),
                    reason="needs the extension's conv_entry_default")
def test_default_entry_serves_the_default_state_only(monkeypatch):
    """conv_entry_default (what GF.conv2d / conv_transpose2d ask first) serves a plain CPU call with
    backend 'auto', as conv_entry does (under autocast: eager's own call), and records it; anything
    else it declines (None, nothing recorded), so that the full route serves it in its order: a named
    backend (set or through GANENGINE_BACKEND), a tensor subclass, and a replaced conv_routes /
    lean_op / backends.serves (a test's: the routes it forces)."""
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 8, 6, 6), torch.randn(8, 8, 3, 3) * 0.2, torch.randn(8)
    want = F.conv2d(x, w, b, 1, 1)
    assert torch.equal(ganengine.functional.conv2d(x, w, b, 1, 1), want)  # (binds the default state)
    entry = conv_ops._default_entry

    def served():
        _dispatch.last_used.clear()
        y = entry(x, w, b, 1, 1, 0, False)
        assert (y is None) == (_dispatch.last_used == {})
        return y

    y = served()
    assert torch.equal(y, want) and _dispatch.last_used == {"conv": "cpu"}
    with use_backend("auto"):
        assert served() is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # eager's own call (its casts), recorded as "torch"
        want_bf16 = F.conv2d(x, w, b, 1, 1)
        y = served()
        assert y is not None and y.dtype == torch.bfloat16 and torch.equal(y, want_bf16)
        assert _dispatch.last_used == {"conv": "torch"}
        assert entry(x.double(), w.double(), None, 1, 1, 0, False) is None  # (fp64: the route casts it)
        assert entry(x, w, b, 1, 1, 0, False) is not None
        assert entry(x, torch.randn(8, 3, 3, 3), b, 1, 1, 0, False) is None  # ATen refuses: the route's error
    with use_backend("torch"):
        assert served() is None
    assert entry(x.as_subclass(_Tagged), w, b, 1, 1, 0, False) is None
    with monkeypatch.context() as m:
        m.setenv("GANENGINE_BACKEND", "torch")
        assert served() is None
    for spelling in ("auto", " AUTO ", "Auto", ""):  # settings.py's reading of 'auto' (and unset)
        with monkeypatch.context() as m:
            m.setenv("GANENGINE_BACKEND", spelling)
            assert served() is not None, spelling
            assert _dispatch.lean_op("conv", conv_ops._KERNELS) is not None, spelling
    for module, name in ((_dispatch, "conv_routes"), (_dispatch, "lean_op"), (ganengine.backends, "serves")):
        with monkeypatch.context() as m:
            real = getattr(module, name)
            m.setattr(module, name, lambda *a, real=real, **k: real(*a, **k))
            assert served() is None, name
    assert torch.equal(served(), want)


# ----------------------------------------------------------------------------- (b) named backends
class _UserConv(nn.Conv2d):
    """A conv class of the user's own: fuse() retypes it with fusion/mixins.ConvMixin (a plain
    nn.Conv2d becomes the drop-in gnn module)."""


class _UserConvTranspose(nn.ConvTranspose2d):
    """(as _UserConv: fusion/mixins.ConvTransposeMixin)"""


def _fused_copy(m):
    """fuse() of a copy of m (eval mode: no spectral-norm power iteration in either), with m's state."""
    fused = ganengine.fuse(copy.deepcopy(m)).eval()
    fused.load_state_dict(m.state_dict())
    m.eval()
    return fused


def _mixin_convs(m) -> int:
    from ganengine.fusion.mixins import ConvMixin, SpectralNormWrapperMixin

    return sum(isinstance(c, ConvMixin | SpectralNormWrapperMixin) for c in m.modules())


def _module_kinds():
    """(name, eager module, the ganengine module sharing its parameters or state, input shape)."""
    torch.manual_seed(1)
    c = nn.Conv2d(8, 16, 4, 2, 1)
    yield "gnn.Conv2d", c, gnn.Conv2d.from_module(c), (2, 8, 8, 8)
    ct = nn.ConvTranspose2d(8, 4, 4, 2, 1)
    yield "gnn.ConvTranspose2d", ct, gnn.ConvTranspose2d.from_module(ct), (2, 8, 5, 5)
    c = nn.Conv2d(8, 8, 3, 1, 1)
    yield "gnn.Conv3x3", c, gnn.Conv3x3.from_conv(c), (2, 8, 6, 6)
    c, act = nn.Conv2d(8, 16, 4, 2, 1), nn.LeakyReLU(0.2)
    yield "gnn.Conv2dAct", nn.Sequential(c, act), gnn.Conv2dAct.from_modules(c, act), (2, 8, 8, 8)
    sn = torch.nn.utils.parametrizations.spectral_norm
    for name, ref, shape in (("fuse user Conv2d", nn.Sequential(_UserConv(8, 16, 4, 2, 1)), (2, 8, 8, 8)),
                             ("fuse user Conv2d + LeakyReLU",
                              nn.Sequential(_UserConv(8, 16, 4, 2, 1), nn.LeakyReLU(0.2, True)), (2, 8, 8, 8)),
                             ("fuse user ConvTranspose2d", nn.Sequential(_UserConvTranspose(8, 4, 4, 2, 1)),
                              (2, 8, 5, 5)),
                             ("fuse spectral-normed Conv2d", nn.Sequential(sn(nn.Conv2d(8, 16, 4, 2, 1))),
                              (2, 8, 8, 8))):
        fused = _fused_copy(ref)
        assert _mixin_convs(fused) == 1, f"{name}: fuse did not retype the conv"
        yield name, ref, fused, shape


MODULE_KINDS = [k[0] for k in _module_kinds()]


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("kind", MODULE_KINDS)
def test_both_module_kinds_honour_a_named_backend_under_autocast(kind, backend):
    """CPU bf16 autocast: with backend 'auto' both module kinds run nn's own forward (no ganengine
    route asked: _dispatch.last_used untouched); with a backend named they keep its route (the
    route ran: it records its backend), as in fp32. The numbers are eager's in both (ATen's conv on
    the same bf16 casts)."""
    _, ref, mod, shape = next(k for k in _module_kinds() if k[0] == kind)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = ref(x)
        _dispatch.last_used.clear()
        with use_backend(backend):
            got = mod(x)
        routes_ran = dict(_dispatch.last_used)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    if backend == "auto":
        assert routes_ran == {}, f"{kind}: a ganengine route ran under autocast with backend auto: {routes_ran}"
    else:
        assert routes_ran, f"{kind}: backend {backend!r} named, but its route never ran (PyTorch's conv instead)"
        assert set(routes_ran.values()) == {backend}


# ----------------------------------------------------------------------------- (c) layouts
def _layout_kinds():
    """(name, eager module factory on c_in, ganengine module from the eager one). Conv2dAct's
    reference applies LeakyReLU in place, as the reference models do (a non-inplace activation
    gives a 1x1 output NCHW strides, an in-place one keeps the conv's: eager's own layout there
    depends on that flag)."""
    yield "Conv2d 1x1", lambda ci: nn.Conv2d(ci, 6, 1), gnn.Conv2d.from_module
    yield "Conv2d 3x3", lambda ci: nn.Conv2d(ci, 6, 3, 1, 1), gnn.Conv2d.from_module
    yield "Conv3x3", lambda ci: nn.Conv2d(ci, 6, 3, 1, 1), gnn.Conv3x3.from_conv
    yield "ConvTranspose2d 4x4 s1", lambda ci: nn.ConvTranspose2d(ci, 6, 4, 1, 0), gnn.ConvTranspose2d.from_module
    yield "ConvTranspose2d 4x4 s2", lambda ci: nn.ConvTranspose2d(ci, 6, 4, 2, 1), gnn.ConvTranspose2d.from_module
    yield ("Conv2dAct", lambda ci: nn.Sequential(nn.Conv2d(ci, 6, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True)),
           lambda m: gnn.Conv2dAct.from_modules(m[0], m[1]))
    # fuse(): plain convs become the drop-in modules above; a conv class of the user's own, a
    # spectral-normed one and SAGAN's wrapper the mixins (fusion/mixins.py)
    sn = torch.nn.utils.parametrizations.spectral_norm
    for name, make in (("fuse Conv2d 1x1", lambda ci: nn.Sequential(nn.Conv2d(ci, 6, 1))),
                       ("fuse ConvTranspose2d", lambda ci: nn.Sequential(nn.ConvTranspose2d(ci, 6, 4, 1, 0))),
                       ("fuse user Conv2d 4x4", lambda ci: nn.Sequential(_UserConv(ci, 6, 4, 1, 2))),
                       ("fuse user Conv2d 4x4 + LeakyReLU",
                        lambda ci: nn.Sequential(_UserConv(ci, 6, 4, 1, 2), nn.LeakyReLU(0.2, inplace=True))),
                       ("fuse user ConvTranspose2d", lambda ci: nn.Sequential(_UserConvTranspose(ci, 6, 4, 1, 0))),
                       ("fuse spectral-normed Conv2d 4x4", lambda ci: nn.Sequential(sn(nn.Conv2d(ci, 6, 4, 1, 2)))),
                       ("fuse SAGAN SN ConvTranspose2d",
                        lambda ci: nn.Sequential(R.SpectralNorm(nn.ConvTranspose2d(ci, 6, 4))))):
        yield name, make, _fused_copy


LAYOUT_KINDS = {k[0]: k for k in _layout_kinds()}
MAPS = [(1, 1), (1, 5), (5, 1), (4, 4)]


def _fp64_and_bound(ref, x):
    """ref's convolution (and activation) in fp64 on the weight its forward just used (a SAGAN
    wrapper's w_bar / sigma, a parametrization's weight), and the (scale, n) of its rounding bound."""
    conv = next(m for m in ref.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d))
    w, b = conv.weight.detach(), conv.bias
    tr = isinstance(conv, nn.ConvTranspose2d)
    args = (x.double(), w.double(), None if b is None else b.detach().double(), conv.stride, conv.padding)
    y64 = F.conv_transpose2d(*args, conv.output_padding) if tr else F.conv2d(*args)
    act = next((m for m in ref.modules() if isinstance(m, nn.LeakyReLU)), None)
    if act is not None:
        y64 = F.leaky_relu(y64, act.negative_slope)
    sc = conv_scales(x, w, torch.zeros(y64.shape), b, conv.stride, conv.padding, tr)
    return y64, sc.y, sc.n_y


@pytest.mark.parametrize("x_cl", [False, True], ids=["x_nchw", "x_nhwc"])
@pytest.mark.parametrize("model_cl", [False, True], ids=["model_nchw", "model_nhwc"])
@pytest.mark.parametrize("n,c_in", [(1, 5), (2, 5), (2, 1)])
@pytest.mark.parametrize("hw", MAPS, ids=[f"{h}x{w}" for h, w in MAPS])
@pytest.mark.parametrize("kind", list(LAYOUT_KINDS))
def test_module_output_layout_is_eagers(kind, hw, n, c_in, model_cl, x_cl):
    """Output strides (so both is_contiguous answers and suggest_memory_format) as eager's, for
    channels_last and contiguous models and inputs, 1x1 / 1xW / Hx1 maps, batch 1, one input
    channel; the numbers within the convolution's rounding bound of the fp64 result."""
    _, make, to_ganengine = LAYOUT_KINDS[kind]
    if model_cl and "SAGAN" in kind:
        pytest.skip("the reference wrapper's w.view() refuses a channels_last weight: eager has no output")
    torch.manual_seed(3)
    ref = make(c_in)
    if model_cl:
        ref = ref.to(memory_format=CL)
    mod = to_ganengine(ref)
    x = torch.randn(n, c_in, *hw)
    if x_cl:
        x = x.contiguous(memory_format=CL)
    with torch.no_grad():
        want, got = ref(x), mod(x)
    y64, scale, n_y = _fp64_and_bound(ref, x)
    assert got.shape == want.shape
    assert got.stride() == want.stride(), f"strides {got.stride()}, eager's {want.stride()}"
    assert got.is_contiguous(memory_format=CL) == want.is_contiguous(memory_format=CL)
    assert got.is_contiguous() == want.is_contiguous()
    assert_within_bound(got, y64, scale, n_y, torch.float32, name=kind)


def test_dcgan_generator_first_layer_channels_last():
    """pytorch/examples DCGAN's generator head, ConvTranspose2d(nz, ngf * 8, 4, 1, 0) on N x nz x 1 x 1
    noise, in a channels_last model after fuse(): channels_last out as eager's (it came out NCHW,
    so every later layer's output too), and the weight's gradient in eager's layout."""
    torch.manual_seed(4)
    ref = nn.Sequential(nn.ConvTranspose2d(16, 32, 4, 1, 0, bias=False), nn.BatchNorm2d(32), nn.ReLU(True),
                        nn.ConvTranspose2d(32, 8, 4, 2, 1, bias=False)).to(memory_format=CL)
    fused = _fused_copy(ref)
    noise = torch.randn(4, 16, 1, 1)
    with torch.no_grad():
        first = fused[0](noise)
        assert first.is_contiguous(memory_format=CL) and not first.is_contiguous()
        assert first.stride() == ref[0](noise).stride()
    layouts = []
    for m in (ref, fused):
        z = noise.clone().requires_grad_()
        y = m(z)
        y.square().sum().backward()
        # (the noise's gradient is both layouts at once: its strides may differ on its size-1 dims
        # only, which autograd's layout contract for a leaf's .grad leaves free)
        layouts.append((y.stride(), m[0].weight.grad.stride(), z.grad.is_contiguous(),
                        z.grad.is_contiguous(memory_format=CL)))
    assert layouts[1] == layouts[0]


@pytest.mark.skipif(getattr(_ext._C, "conv_entry_default", None) is None or not _ext.has_kernel("conv_fwd", "CPU"),
                    reason="needs the extension's conv_entry_default")
def test_conv3x3_and_conv2d_act_under_autocast_take_the_c_entry(monkeypatch):
    """Under CPU bf16 autocast with backend auto, conv3x3 (zero padding) and conv2d_act make their
    convolution from conv_entry_default (checks in C), not their Python shortcuts: eager's bits,
    dtype and layout, recorded under their own key; the Python shortcut still serves what the entry
    declines (reflect padding)."""
    from ganengine.ops import conv3x3 as c3_ops
    from ganengine.ops import conv_act as ca_ops

    def unused(*args, **kwargs):
        raise AssertionError("the Python autocast shortcut ran")

    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    w = (torch.randn(8, 8, 3, 3) * 0.2).requires_grad_()
    b = torch.randn(8).requires_grad_()
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want3 = F.conv2d(xl, w, b, 1, 1)
            want_act = F.leaky_relu(F.conv2d(xl, w, b, 2, 1), 0.2)
            with monkeypatch.context() as m:
                m.setattr(c3_ops, "_autocast_call", unused)
                m.setattr(ca_ops, "_act_autocast_call", unused)
                _dispatch.last_used.clear()
                got3 = ganengine.functional.conv3x3(xl, w, b, 1)
                got_act = ganengine.functional.conv2d_act(xl, w, b, 2, 1, 0.2)
                assert _dispatch.last_used == {"conv3x3": "torch", "conv2d_act": "torch"}
            got_reflect = ganengine.functional.conv3x3(xl, w, b, 1, "reflect")  # (the Python shortcut)
            want_reflect = F.conv2d(F.pad(xl, (1, 1, 1, 1), mode="reflect"), w, b)
        for got, want in ((got3, want3), (got_act, want_act), (got_reflect, want_reflect)):
            assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
            assert got.is_contiguous(memory_format=layout) == want.is_contiguous(memory_format=layout)
        gw = torch.autograd.grad(got_act.float().sum(), w)[0]
        ww = torch.autograd.grad(want_act.float().sum(), w)[0]
        assert torch.equal(gw, ww)
