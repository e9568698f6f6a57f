"""fuse() and the conv op's route (session 17 review): a conv whose weight is computed (spectral /
weight norm by hook or parametrization) is declined where the conv op has no faster route for it,
as a plain conv is (its fused module would only add its per-call cost: 1.17-1.43x eager at a small
3x3); BigGAN's own SN keeps its fused sigma at any size."""
import pytest
import torch
from torch import nn

import ganengine
from ganengine import _ext

needs_ext = pytest.mark.skipif(not _ext.loaded(), reason="ganengine._C not built")


def _hooked(k, c=8):
    return nn.utils.spectral_norm(nn.Conv2d(c, c, k, 1, k // 2))


def _parametrized(k, c=8):
    return nn.utils.parametrizations.spectral_norm(nn.Conv2d(c, c, k, 1, k // 2))


@needs_ext
@pytest.mark.parametrize("make", [_hooked, _parametrized], ids=["hook", "parametrization"])
@pytest.mark.parametrize("with_act", [False, True], ids=["conv", "conv+act"])
def test_small_computed_convs_without_a_route_are_declined(make, with_act):
    torch.manual_seed(0)
    for k, fused_expected in ((3, False), (1, False), (5, True)):
        conv = make(k)
        net = nn.Sequential(conv, nn.LeakyReLU(0.2)) if with_act else nn.Sequential(conv)
        u0 = {n: b.clone() for n, b in net.named_buffers()}
        fused, report = ganengine.fuse(net, return_report=True)
        # (deciding reads no computed weight: the power iteration's buffers are untouched)
        assert all(torch.equal(b, u0[n]) for n, b in net.named_buffers())
        # (a parametrization is first swapped for gnn.SpectralNorm by its own rule: not a conv fusion)
        got = {r: n for r, n in dict(report).items() if r != "spectral_norm"}
        if fused_expected:
            assert got, (k, report)
        else:
            assert not got, (k, got)
            assert any("no faster route" in d.reason for d in report.declined), (k, report.declined)
        x = torch.randn(2, 8, 6, 6)
        net.eval(), fused.eval()
        with torch.no_grad():
            torch.testing.assert_close(fused(x), net(x), rtol=1e-5, atol=1e-5)


@needs_ext
def test_biggan_sn_conv_fuses_at_any_size():
    """BigGAN-PyTorch's SNConv2d (tests/reference_nets_attention.py): a small 3x3 still fuses (its
    fused sigma costs less than the reference's: 0.71-0.98x at tiny layers, docs/spectral_norm.md)."""
    from tests import reference_nets_attention as RA

    torch.manual_seed(0)
    net = nn.Sequential(RA.SNConv2d(8, 8, 3, padding=1), nn.ReLU())
    fused, report = ganengine.fuse(net, return_report=True)
    assert dict(report), report
    x = torch.randn(2, 8, 6, 6)
    net.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), net(x), rtol=1e-5, atol=1e-5)
