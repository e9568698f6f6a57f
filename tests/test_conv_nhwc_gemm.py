"""The conv router's GEMM form on channels_last inputs (the NHWC form in csrc/cpu/conv_gemm.cpp,
the folded DCGAN small-map route of issue 19): the same function as PyTorch's conv forward and
backward in fp64 (odd shapes, padding, output_padding, stride-0 gradients, bias), its routing rules
(conv_route.cpp nhwc_gemm_pays), and which DCGAN layers take it at the reference setting."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ganengine.functional as GF
import ganengine.nn as gnn
from ganengine import _ext
from ganengine.models.networks_dcgan import DCGANDiscriminator, DCGANGenerator
from ganengine.ops import conv as cv

from tests._backends import on_backend
from tests._conv_bounds import conv_scales
from tests._tolerance import assert_within_bound

needs_ext = pytest.mark.skipif(not _ext.has_kernel("conv_fwd", "CPU"), reason="ganengine._C not built")
CL = torch.channels_last

# transposed, N, C_in, C_out, H, W, kernel, stride, padding, output_padding
SHAPES = [
    (False, 3, 7, 5, 8, 6, 4, 2, 1, 0), (False, 2, 4, 3, 11, 5, 3, 2, 2, 0), (False, 2, 6, 9, 4, 4, 4, 1, 0, 0),
    (True, 3, 7, 5, 3, 4, 4, 2, 1, 0), (True, 3, 4, 6, 2, 3, 3, 2, 1, 1), (True, 2, 3, 8, 4, 7, 4, 2, 0, 0),
]


def _ids(s):
    return f"{'convT' if s[0] else 'conv'}-{s[1]}x{s[2]}x{s[4]}x{s[5]}-k{s[6]}s{s[7]}p{s[8]}op{s[9]}"


@needs_ext
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_nhwc_form_matches_fp64_reference(shape, bias):
    tr, n, ci, co, h, w, k, s, p, op = shape
    torch.manual_seed(0)
    x = torch.randn(n, ci, h, w).contiguous(memory_format=CL).requires_grad_()
    wt = torch.randn(*((ci, co) if tr else (co, ci)), k, k).requires_grad_()
    b = torch.randn(co).requires_grad_() if bias else None
    with on_backend("cpu"), cv.gemm_policy("always"):
        assert cv.uses_gemm(x, wt, (s, s), (p, p), tr)
        y = GF.conv_transpose2d(x, wt, b, s, p, op) if tr else GF.conv2d(x, wt, b, s, p)
        y.sum().backward()  # a stride-0 gradient
    assert y.is_contiguous(memory_format=CL) and x.grad.is_contiguous(memory_format=CL)
    leaves = [t.detach().double().requires_grad_() for t in (x, wt) + ((b,) if bias else ())]
    bd = leaves[2] if bias else None
    y64 = (F.conv_transpose2d(leaves[0], leaves[1], bd, s, p, op) if tr else F.conv2d(leaves[0], leaves[1], bd, s, p))
    y64.sum().backward()
    # gamma_n(fp32) x sum|terms| of each product, n its terms per element (tests/_conv_bounds.py)
    sc = conv_scales(x, wt, torch.ones(y64.shape), b, s, p, tr)
    got = (y, x.grad, wt.grad) + ((b.grad,) if bias else ())
    want = (y64,) + tuple(t.grad for t in leaves)
    for (name, scale, nterms), a, r in zip(sc.items(), got, want):
        assert a.shape == r.shape and a.dtype == torch.float32
        assert_within_bound(a, r, scale, n=nterms, acc_dtype=torch.float32, name=name)


def _cl(*shape):
    return torch.empty(shape).contiguous(memory_format=CL)


@needs_ext
def test_nhwc_rules():
    """conv_route.cpp's nhwc_gemm_pays at its boundaries (N x P GEMM rows, P small-map pixels),
    channels_last inputs only; NCHW inputs keep the NCHW rules."""
    cases = [  # (transposed, x shape, w shape, GEMM?)
        (False, (4, 16, 16, 16), (32, 16, 4, 4), True),       # N P = 256
        (False, (4, 16, 18, 16), (32, 16, 4, 4), False),      # N P = 288, 16 channels, not transposed
        (False, (64, 256, 8, 8), (512, 256, 4, 4), True),     # P = 16, 256 channels: any batch
        (False, (64, 255, 8, 8), (512, 255, 4, 4), False),    # 255 channels
        (False, (64, 256, 10, 8), (512, 256, 4, 4), False),   # P = 20
        (True, (64, 512, 4, 4), (512, 256, 4, 4), True),      # P = 16 (the transposed conv's input)
        (True, (64, 256, 8, 8), (256, 128, 4, 4), False),     # P = 64, N P = 4096
        (True, (4, 16, 16, 16), (16, 8, 4, 4), True),         # transposed, 8 channels, N P = 1024
        (True, (4, 17, 16, 16), (17, 17, 4, 4), False),       # 17 channels
        (True, (5, 16, 16, 16), (16, 8, 4, 4), False),        # N P = 1280
        (True, (64, 64, 32, 32), (64, 3, 4, 4), True),        # an image layer: <= 4 outputs from 64+
        (True, (64, 32, 32, 32), (32, 3, 4, 4), False),       # from 32
        (True, (64, 64, 32, 32), (64, 5, 4, 4), False),       # 5 outputs
        (False, (1, 64, 64, 64), (128, 64, 4, 4), False),     # Winograd 4x4 takes it first
    ]
    for tr, xs, ws, gemm in cases:
        x, w = _cl(*xs), torch.empty(ws)
        with on_backend("cpu"):
            assert cv.uses_gemm(x, w, (2, 2), (1, 1), tr) == gemm, (tr, xs, ws)
            if xs[0] * 4 <= 256 and not cv.uses_winograd(x, w, (2, 2), (1, 1), tr):  # NCHW: its own rule
                assert not cv.uses_gemm(x.contiguous(), w, (2, 2), (1, 1), tr) or w.numel() >= 1 << 16
    assert cv.uses_winograd(_cl(1, 64, 64, 64), torch.empty(128, 64, 4, 4), (2, 2), (1, 1), False)
    # NCHW: a plain conv onto a map of <= 16 pixels with 256+ channels, up to 256 GEMM columns and
    # at most a quarter of its rows (SAGAN D's 8x256x8x8 -> 512: 128 columns; 16 images' 256 columns
    # lost to oneDNN, session 20); pix2pix D small's 1x32x16x16 -> 64 stays oneDNN
    for xs, ws, gemm in (((8, 256, 8, 8), (512, 256, 4, 4), True), ((16, 256, 8, 8), (512, 256, 4, 4), False),
                         ((32, 256, 8, 8), (512, 256, 4, 4), False), ((8, 128, 8, 8), (256, 128, 4, 4), False),
                         ((4, 256, 16, 16), (512, 256, 4, 4), False), ((1, 32, 16, 16), (64, 32, 4, 4), False)):
        with on_backend("cpu"):
            assert cv.uses_gemm(torch.empty(xs), torch.empty(ws), (2, 2), (1, 1), False) == gemm, xs


@needs_ext
def test_dcgan_layers_and_routes_at_the_reference_setting():
    """Every DCGAN conv is ganengine's (keys unchanged); at batch 64 with the networks' layouts the
    router takes the GEMM form for G's 1x1-input and image layers, D's last (4x4 -> 1x1) and the
    8x8 <-> 4x4 layers, oneDNN for the rest (decided from shapes: no convolution runs)."""
    G, D = DCGANGenerator(init_type=None), DCGANDiscriminator(init_type=None)
    ref_keys = DCGANGenerator(init_type=None, fused=False).state_dict().keys()
    assert G.state_dict().keys() == ref_keys
    gemm = set()
    for tag, net, size, fmt_from in (("G", G, 1, G.channels_last_from), ("D", D, 64, D.channels_last_from)):
        convs = [(i, m) for i, m in enumerate(net.main) if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        assert all(isinstance(m, (gnn.Conv2d, gnn.ConvTranspose2d, gnn.Conv2dAct)) for _, m in convs)
        for i, m in convs:
            tr = isinstance(m, nn.ConvTranspose2d)
            x = torch.empty(64, m.in_channels, size, size)
            if i >= fmt_from:
                x = x.contiguous(memory_format=CL)
            with on_backend("cpu"):
                if cv.uses_gemm(x, m.weight, m.stride, m.padding, tr):
                    gemm.add((tag, i))
            k, s, p = m.kernel_size[0], m.stride[0], m.padding[0]
            size = (size - 1) * s - 2 * p + k if tr else (size + 2 * p - k) // s + 1
    assert gemm == {("G", 0), ("G", 3), ("G", 12), ("D", 8), ("D", 11)}, gemm
