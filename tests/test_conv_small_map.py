"""The GEMM form of 4x4 stride-2 padding-1 (transposed) convolutions on small CPU maps
(ganengine/ops/conv_small_map.py, modules in ganengine/nn/conv_small_map.py, issue 19): the same function as PyTorch's conv forward and
backward, its routing rule, and where the DCGAN networks take it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ganengine.nn.conv_small_map import SmallMapConv2d, SmallMapConvTranspose2d
from ganengine.ops.conv_small_map import FEW_ROWS, NARROW, SMALL_MAP, WIDE, conv4x4s2_gemm, conv_transpose4x4s2_gemm
from ganengine.models.networks_dcgan import DCGANDiscriminator, DCGANGenerator
from tests._tolerance import assert_within_bound
from tests._train_utils import one_thread  # noqa: F401 (fixture)

CL = torch.channels_last


def _route(y: torch.Tensor) -> str:
    name = type(y.grad_fn).__name__
    return "gemm" if name.startswith(("_Conv4x4s2", "_ConvTranspose4x4s2")) else "torch"


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_gemm_form_gradcheck_fp64(transposed, fmt):
    torch.manual_seed(0)
    if transposed:  # odd input sizes are fine for the transposed form
        x, w, fn = torch.randn(2, 3, 3, 2, dtype=torch.float64), torch.randn(3, 5, 4, 4, dtype=torch.float64), \
            conv_transpose4x4s2_gemm
    else:
        x, w, fn = torch.randn(2, 3, 6, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64), \
            conv4x4s2_gemm
    x = x.contiguous(memory_format=fmt).requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(fn, (x, w))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_gemm_form_fp32_against_fp64_conv(transposed, fmt):
    """fp32 forward and both gradients against PyTorch's conv in fp64, elementwise bounds from
    the reduction lengths (stride-0 ``.sum().backward()`` gradient, odd channel counts)."""
    torch.manual_seed(1)
    n, cin, cout = 3, 7, 5
    if transposed:
        x, w = torch.randn(n, cin, 3, 4), torch.randn(cin, cout, 4, 4)
        ref_fn = lambda a, b: F.conv_transpose2d(a, b, None, 2, 1)  # noqa: E731
        fn, k_out, k_gx, k_gw = conv_transpose4x4s2_gemm, cin * 4, cout * 16, n * 3 * 4 * 4
    else:
        x, w = torch.randn(n, cin, 8, 6), torch.randn(cout, cin, 4, 4)
        ref_fn = lambda a, b: F.conv2d(a, b, None, 2, 1)  # noqa: E731
        fn, k_out, k_gx, k_gw = conv4x4s2_gemm, cin * 16, cout * 4, n * 4 * 3
    x = x.contiguous(memory_format=fmt).requires_grad_()
    w.requires_grad_()
    y = fn(x, w)
    y.sum().backward()
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yd = ref_fn(xd, wd)
    yd.sum().backward()
    scale = ref_fn(xd.detach().abs(), wd.detach().abs())
    assert_within_bound(y, yd, scale, k_out, torch.float32, name="forward")
    # |d sum / dx| and |d sum / dw| are sums of |w| and |x| terms: their sums of absolute terms
    ones = torch.ones_like(yd)
    gx_scale = torch.autograd.grad(ref_fn(xd, wd.detach().abs()), xd, ones)[0]
    gw_scale = torch.autograd.grad(ref_fn(xd.detach().abs(), wd), wd, ones)[0]
    assert_within_bound(x.grad, xd.grad, gx_scale, k_gx, torch.float32, name="grad x")
    assert_within_bound(w.grad, wd.grad, gw_scale, k_gw, torch.float32, name="grad w")
    assert y.is_contiguous(memory_format=CL) and w.grad.is_contiguous()


def test_gemm_form_has_no_double_backward():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    w = torch.randn(5, 3, 4, 4, requires_grad=True)
    (gx,) = torch.autograd.grad(conv4x4s2_gemm(x, w).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()  # a gradient penalty through it must fail, not be silently wrong


def test_small_map_routing_rule():
    torch.manual_seed(0)
    c = NARROW  # NARROW channels route with at most FEW_ROWS output rows (batch x small-map pixels)
    conv = SmallMapConv2d.from_module(nn.Conv2d(c, c, 4, 2, 1, bias=False))
    convt = SmallMapConvTranspose2d.from_module(nn.ConvTranspose2d(c, c, 4, 2, 1, bias=False))
    side = int(SMALL_MAP ** 0.5)  # 4: a 4x4 small map routes, 6x4 does not
    n_ok = FEW_ROWS // SMALL_MAP
    assert _route(conv(torch.randn(n_ok, c, 2 * side, 2 * side))) == "gemm"
    assert _route(conv(torch.randn(n_ok + 1, c, 2 * side, 2 * side))) == "torch"  # too many rows for NARROW
    assert _route(conv(torch.randn(1, c, 2 * side + 4, 2 * side))) == "torch"  # 6x4 = 24 pixels
    assert _route(conv(torch.randn(1, c, 7, 8))) == "torch"  # odd: not the im2col's geometry
    assert _route(convt(torch.randn(n_ok, c, side, side))) == "gemm"
    assert _route(convt(torch.randn(1, c, 3, 5))) == "gemm"
    assert _route(convt(torch.randn(1, c, side + 1, side))) == "torch"
    narrow = SmallMapConv2d.from_module(nn.Conv2d(NARROW - 1, 2 * c, 4, 2, 1, bias=False))
    assert _route(narrow(torch.randn(1, NARROW - 1, 8, 8))) == "torch"  # too few channels on one side
    wide = SmallMapConvTranspose2d.from_module(nn.ConvTranspose2d(WIDE, WIDE, 4, 2, 1, bias=False))
    assert _route(wide(torch.randn(n_ok + 1, WIDE, side, side))) == "gemm"  # WIDE: any batch
    conv64 = SmallMapConv2d.from_module(nn.Conv2d(c, c, 4, 2, 1, bias=False).double())
    assert _route(conv64(torch.randn(1, c, 8, 8, dtype=torch.float64))) == "torch"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _route(conv(torch.randn(1, c, 8, 8))) == "torch"
    traced = torch.jit.trace(convt, torch.randn(1, c, side, side))  # export traces PyTorch's conv
    assert "PythonOp" not in str(traced.graph) and "conv" in str(traced.graph)
    # same parameter object, same keys; bias / other geometries are refused
    c4 = nn.Conv2d(4, 6, 4, 2, 1, bias=False)
    assert SmallMapConv2d.from_module(c4).weight is c4.weight and list(SmallMapConv2d.from_module(c4).state_dict()) == ["weight"]
    with pytest.raises(ValueError, match="4x4 stride-2 padding-1"):
        SmallMapConv2d.from_module(nn.Conv2d(4, 6, 4, 2, 1, bias=True))
    with pytest.raises(ValueError, match="4x4 stride-2 padding-1"):
        SmallMapConvTranspose2d.from_module(nn.ConvTranspose2d(4, 6, 4, 1, 0, bias=False))


def test_dcgan_takes_the_gemm_form_on_its_small_maps(one_thread):
    torch.manual_seed(0)
    G, D = DCGANGenerator(nz=8, ngf=16, nc=3), DCGANDiscriminator(ndf=16, nc=3)  # 64 <-> 128 channels at 4x4
    seen = {}
    for tag, net in (("G", G), ("D", D)):
        for index, layer in enumerate(net.main):
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                layer.register_forward_hook(lambda m, i, o, key=(tag, index): seen.__setitem__(key, _route(o)))
    D(G(torch.randn(2, 8, 1, 1)))
    assert {k for k, v in seen.items() if v == "gemm"} == {("G", 3), ("D", 8)}, seen
    ref = DCGANGenerator(nz=8, ngf=16, nc=3, fused=False), DCGANDiscriminator(ndf=16, nc=3, fused=False)
    assert not any(isinstance(m, (SmallMapConv2d, SmallMapConvTranspose2d)) for r in ref for m in r.modules())

