"""The conv router's GEMM rules bounded by the GEMM's shape (csrc/cpu/conv_route.cpp, kRowsPerColumn:
columns <= rows / 4; kTinyUnfold: the unfolded matrix): calls where unfolding costs more than oneDNN saves run oneDNN
(the acceptance sweep's PatchGAN heads and batched small maps, 3x3 kernels, one-channel inputs),
the calls where the GEMM form wins keep it, and Conv2dAct's convolution follows the same route.
Each route's numbers are tested elsewhere (tests/test_conv.py, test_conv_lean.py); here: the route."""
from __future__ import annotations

import pytest
import torch

import ganengine.nn as gnn
from ganengine import _ext
from ganengine.ops import conv as cv

from tests._backends import on_backend

needs_ext = pytest.mark.skipif(not _ext.has_kernel("conv_fwd", "CPU"), reason="ganengine._C not built")

# (transposed, x shape, w shape, stride, padding, GEMM form under 'auto')
ROUTES = [
    # few-output-channel heads (PatchGAN's last conv, 4x4 stride 1 padding 1): oneDNN
    (False, (1, 512, 6, 6), (1, 512, 4, 4), 1, 1, False),    # 1 row, U = 204800 unfolded elements
    (False, (1, 512, 7, 7), (1, 512, 4, 4), 1, 1, False),
    (False, (1, 256, 7, 7), (1, 256, 4, 4), 1, 1, False),
    (False, (1, 128, 7, 7), (1, 128, 4, 4), 1, 1, False),
    (False, (1, 128, 7, 7), (2, 128, 4, 4), 1, 1, False),
    (False, (8, 8, 12, 12), (2, 8, 4, 4), 2, 1, False),      # U = 36864 > 2^14
    # a head on a tiny unfolded matrix keeps the GEMM form
    (False, (1, 64, 4, 4), (1, 64, 4, 4), 1, 1, True),       # U = 9216
    (False, (1, 16, 16, 16), (16, 16, 4, 4), 2, 1, True),    # U = 2^14, 2^18 MACs: the boundary
    (False, (1, 3, 4, 4), (8, 3, 4, 4), 2, 1, True),
    # columns made of a batch: at most a quarter of the rows (output channels)
    (False, (16, 64, 4, 4), (64, 64, 4, 4), 2, 1, False),    # 64 columns, 64 rows
    (False, (8, 64, 4, 4), (64, 64, 4, 4), 2, 1, False),     # 32
    (False, (4, 64, 4, 4), (64, 64, 4, 4), 2, 1, True),      # 16: the boundary
    (False, (1, 64, 4, 4), (64, 64, 4, 4), 2, 1, True),
    (False, (16, 128, 4, 4), (128, 128, 4, 4), 2, 1, False),  # 64 columns, 128 rows
    (False, (4, 128, 8, 8), (128, 128, 4, 4), 2, 1, False),
    (False, (8, 128, 4, 4), (128, 128, 4, 4), 2, 1, True),   # 32
    (False, (16, 512, 4, 4), (512, 512, 4, 4), 2, 1, True),
    (False, (1, 512, 4, 4), (512, 512, 4, 4), 2, 1, True),
    # the big-weight rules (65-256 columns), bounded the same way
    (False, (16, 512, 8, 8), (1024, 512, 4, 4), 2, 1, True),  # 256 columns, 1024 rows
    (False, (8, 256, 8, 8), (512, 256, 4, 4), 2, 1, True),    # 128, 512 (SAGAN D's layer)
    (False, (16, 256, 8, 8), (512, 256, 4, 4), 2, 1, False),  # 256, 512: 1.22-1.25x forward on the GEMM form
    # transposed: rows = input channels, U = col2im's elements
    (True, (1, 1024, 4, 4), (1024, 512, 4, 4), 2, 1, True),
    (True, (4, 64, 2, 2), (64, 64, 4, 4), 2, 1, True),       # 16 columns, 64 rows
    (True, (16, 64, 2, 2), (64, 64, 4, 4), 2, 1, False),     # 64 columns
    (True, (1, 1, 4, 4), (1, 64, 4, 4), 2, 1, True),         # U = 16384, tiny
    (True, (1, 2, 6, 6), (2, 128, 4, 4), 2, 1, False),       # U = 73728 > 2^15
    # a one-channel x (both layouts at once) runs the NCHW form: the NHWC rules only within its bounds
    (True, (16, 1, 6, 6), (1, 64, 4, 4), 1, 0, False),       # 576 columns, U = 589824
    (True, (16, 1, 8, 8), (1, 64, 4, 4), 2, 1, False),
    (False, (1, 1, 16, 16), (128, 1, 4, 4), 1, 0, True),     # 169 columns, U = 2704
    # 3x3 kernels: oneDNN (the GEMM form lost in forward at every size measured)
    (False, (4, 256, 4, 4), (512, 256, 3, 3), 1, 1, False),
    (False, (8, 512, 1, 1), (256, 512, 3, 3), 2, 1, False),
    (False, (2, 256, 4, 4), (512, 256, 3, 3), 2, 1, False),
]


def _ids(c):
    return ("T" if c[0] else "") + "x".join(map(str, c[1])) + "-w" + "x".join(map(str, c[2]))


@needs_ext
@pytest.mark.parametrize("case", ROUTES, ids=_ids)
def test_gemm_route_under_auto(case):
    tr, xs, ws, s, p, gemm = case
    x, w = torch.randn(xs), torch.randn(ws) * 0.05
    with on_backend("cpu"), cv.gemm_policy("auto"), cv.winograd_policy("auto"):
        assert cv.uses_gemm(x, w, (s, s), (p, p), tr) == gemm
        route = _ext.op("conv_route")(x, w, [s, s], [p, p], tr, [0, 0])[0]
        assert route == (1 if gemm else 0), route  # (none of these is Winograd-sized)
        # the route named is the one run: ATen's convolution appears exactly where oneDNN runs
        with torch.no_grad(), torch.autograd.profiler.profile() as prof:
            cv.conv_transpose2d(x, w, None, s, p) if tr else cv.conv2d(x, w, None, s, p)
    ran_onednn = any("convolution" in e.name and "ganengine" not in e.name for e in prof.function_events)
    assert ran_onednn == (not gemm)


@needs_ext
@pytest.mark.parametrize("n, c, hw, gemm", [(16, 64, 4, False), (4, 128, 8, False), (1, 64, 4, True)])
def test_conv2d_act_follows_the_router(n, c, hw, gemm):
    """Conv2dAct (what fuse() builds for Conv2d -> LeakyReLU) asks the same router: the batched
    small maps of the acceptance finding run oneDNN, one image keeps the GEMM form."""
    torch.manual_seed(0)
    m = gnn.Conv2dAct(c, c, 4, 2, 1, negative_slope=0.2)
    x = torch.randn(n, c, hw, hw)
    with on_backend("cpu"), cv.gemm_policy("auto"), cv.winograd_policy("auto"):
        with torch.no_grad(), torch.autograd.profiler.profile() as prof:
            m(x)
    ran_onednn = any("convolution" in e.name and "ganengine" not in e.name for e in prof.function_events)
    assert ran_onednn == (not gemm), sorted({e.name for e in prof.function_events})
