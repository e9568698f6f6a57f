"""BigGAN's fused block pieces (ganengine/models/biggan_ops.py, issue 19): the residual add of an
upsampling block, the 2x2 average pooling and the upsample / pool weight folds equal the eager
compositions they replace, forward and backward (bit for bit where they sum the same terms in
the same order). The networks' end-to-end equality with the reference is test_sagan_biggan.py's."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ganengine.models import biggan_ops as ops


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("shape", [(2, 3, 8, 10), (1, 5, 9, 7), (2, 4, 1, 1), (3, 2, 4, 4)])
@pytest.mark.parametrize("sliced", [False, True])
def test_add_upsampled_equals_interpolate_then_add(shape, sliced):
    torch.manual_seed(0)
    n, c, h, w = shape
    x = torch.randn(n, 2 * c, h, w)[:, :c] if sliced else torch.randn(shape)  # BigGAN-deep's x[:, :out]
    x.requires_grad_()
    hh = torch.randn(n, c, 2 * h, 2 * w, requires_grad=True)
    got, want = ops.add_upsampled(hh, x), hh + F.interpolate(x, scale_factor=2)
    assert got.is_contiguous() and torch.equal(got, want)
    g = torch.randn_like(want)
    for a, b in zip(_grads(got, (hh, x), g), _grads(want, (hh, x), g)):
        assert torch.equal(a, b)


def test_add_upsampled_falls_back_and_differentiates_twice():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    h_t = torch.randn(2, 3, 8, 8).transpose(2, 3)  # not dense NCHW: the eager composition
    torch.testing.assert_close(ops.add_upsampled(h_t, x), h_t + F.interpolate(x, scale_factor=2), atol=0, rtol=0)
    xd = torch.randn(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    hd = torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.add_upsampled, (hd, xd))
    assert torch.autograd.gradgradcheck(ops.add_upsampled, (hd, xd))


@pytest.mark.parametrize("shape", [(2, 3, 8, 10), (1, 5, 2, 2), (3, 2, 16, 4)])
def test_downsample_equals_avg_pool2d(shape):
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    pool = nn.AvgPool2d(2)
    got, want = ops.downsample(pool, x), F.avg_pool2d(x, 2)
    assert torch.equal(got, want)
    g = torch.randn_like(want)
    assert torch.equal(*(_grads(o, (x,), g)[0] for o in (got, want)))


def test_downsample_falls_back_and_differentiates_twice():
    torch.manual_seed(0)
    odd = torch.randn(2, 3, 5, 7)
    assert torch.equal(ops.downsample(nn.AvgPool2d(2), odd), F.avg_pool2d(odd, 2))  # floor mode: eager
    other = nn.AvgPool2d(2, ceil_mode=True)
    assert torch.equal(ops.downsample(other, odd), other(odd))
    xd = torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    pool = nn.AvgPool2d(2)
    assert torch.autograd.gradcheck(lambda t: ops.downsample(pool, t), (xd,))
    assert torch.autograd.gradgradcheck(lambda t: ops.downsample(pool, t), (xd,))


def test_weight_folds_equal_the_unfolded_convs():
    """nearest x2 + conv3x3 == the folded 4x4 transposed conv; conv3x3 + 2x2 average pooling ==
    the folded 4x4 stride-2 conv (fp64: the folds only regroup the same products)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    w = torch.randn(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64)
    up = F.conv_transpose2d(x, ops.upsample_conv_weight(w), b, 2, 1)
    torch.testing.assert_close(up, F.conv2d(F.interpolate(x, scale_factor=2), w, b, padding=1))
    x2 = torch.randn(2, 5, 8, 6, dtype=torch.float64)
    pooled = F.conv2d(x2, ops.conv_pool_weight(w), b, 2, 1)
    torch.testing.assert_close(pooled, F.avg_pool2d(F.conv2d(x2, w, b, padding=1), 2))
    assert torch.autograd.gradcheck(ops.upsample_conv_weight, (w,))
    assert torch.autograd.gradcheck(ops.conv_pool_weight, (w,))
