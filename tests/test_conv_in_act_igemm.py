"""conv2d_instance_norm_act on the Triton implicit-GEMM path: the instance statistics combined from
the GEMM's tile partials in one launch (kernels/conv_act.py, _combine_stats), over several tiles
(tests/test_conv_act.py's shapes fit one 32-pixel tile), and the kernels one call issues.

Bounds (tests/_tolerance.py): the mean is a length-HW fp32 reduction (tile sums, then T tile
means weighted by their counts): |error| <= gamma_{HW + T + 2} mean|c|. The variance, Chan's
formula, adds per tile M2 and count * (tile mean - mean)^2, whose tile means carry that error
too: |error| <= 4 gamma_{HW + T + 4} (var + mean^2) (c = 4: the square doubles a relative error,
the weights and the division add two roundings). rstd = (var + eps)^-1/2 halves var's relative
error and adds 3 roundings (add, sqrt, divide).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ganengine
import ganengine.functional as GF
from ganengine.bench.timing import count_kernels
from ganengine.ops import conv_act as ops
from tests._tolerance import gamma, unit_roundoff


def _triton():
    if not ganengine.backends.available()["triton"]:
        pytest.skip(f"triton unavailable: {ganengine.backends.status()['triton']}")
    from ganengine.kernels import conv_act as tk

    return tk


@pytest.mark.parametrize("shape", [(2, 3, 16, 18, 5, 2, 1), (1, 4, 11, 12, 33, 1, 2)])
def test_tile_statistics_over_several_tiles(shape):
    tk = _triton()
    n, ci, h, w, co, s, p = shape
    x = torch.randn(n, ci, h, w)
    wt = torch.randn(co, ci, 4, 4) * 0.2
    eps = 1e-5
    c, mean, rstd = tk.conv2d(x, wt, None, (s, s), (p, p), stats_eps=eps)
    hw = c.shape[2] * c.shape[3]
    tiles = -(-hw // tk._GEMM_CPU["BLOCK_M"])
    assert tiles >= 2 and hw % tk._GEMM_CPU["BLOCK_M"] != 0  # several tiles, a partial last one
    c64 = c.double()
    var, m64 = torch.var_mean(c64, dim=(2, 3), unbiased=False)
    u = unit_roundoff(torch.float32)
    mean_err = gamma(hw + tiles + 2, torch.float32) * c64.abs().mean(dim=(2, 3))
    assert ((mean.double() - m64).abs() <= mean_err + u * m64.abs()).all()
    var_err = 4 * gamma(hw + tiles + 4, torch.float32) * (var + m64 ** 2)
    r64 = (var + eps).rsqrt()
    rel = 0.5 * var_err / (var + eps) + 3 * u
    assert ((rstd.double() - r64).abs() <= rel * r64).all()


def test_kernels_per_call_no_more_than_eager():
    """The cost rule, counted as `ganengine bench` counts (interpreter launches + ATen ops around)."""
    _triton()
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    w = torch.randn(4, 4, 4, 4, requires_grad=True)
    g = torch.randn(1, 4, 4, 4)

    def fused():
        with ganengine.use_backend("triton"), ops.triton_conv_impl("igemm"):
            y = GF.conv2d_instance_norm_act(x, w, None, 2, 1)
            return torch.autograd.grad(y, [x, w], g)

    def eager():
        y = F.leaky_relu(F.instance_norm(F.conv2d(x, w, None, 2, 1)), 0.2)
        return torch.autograd.grad(y, [x, w], g)

    fused(), eager()
    ours, theirs = count_kernels(fused), count_kernels(eager)
    assert ours["method"] == "interpreter"
    assert ours["triton_launches"] == 6  # conv, statistics, norm + act; norm backward, dgrad, wgrad
    assert ours["kernels"] <= theirs["kernels"]
