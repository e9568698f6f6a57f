"""Regression tests of the s18 acceptance findings on the models: ganengine's SAGAN self-attention
(fused) builds the map it returns once (one softmax over QK^T), as the block fuse() puts in a
reference SAGAN does, instead of running the attention op and then the map again (1.3-1.6x the
eager generator's eval forward)."""
import pytest
import torch

from ganengine.models.networks_sagan import SelfAttn
from ganengine.ops import attention as attention_ops
from ganengine.nn import attention as attention_nn


def _reference(m: SelfAttn, x):
    b, c, w, h = x.shape
    q = m.query_conv(x).view(b, -1, w * h).permute(0, 2, 1)
    k = m.key_conv(x).view(b, -1, w * h)
    p = torch.softmax(torch.bmm(q, k), dim=-1)
    v = m.value_conv(x).view(b, -1, w * h)
    return m.gamma * torch.bmm(v, p.permute(0, 2, 1)).view(b, c, w, h) + x, p


@pytest.mark.parametrize("size", [8, 32])
def test_fused_self_attn_builds_its_map_once(size, monkeypatch):
    torch.manual_seed(0)
    m = SelfAttn(16).double()
    with torch.no_grad():
        m.gamma.fill_(0.7)
    m.fused = True
    x = torch.randn(2, 16, size, size, dtype=torch.float64)

    def refuse(*a, **k):
        raise AssertionError("the attention op ran beside the map")

    for mod in (attention_ops, attention_nn):
        monkeypatch.setattr(mod, "attention", refuse)
        monkeypatch.setattr(mod, "attention_map", refuse)
    with torch.no_grad():
        out, p = m(x)
    with torch.no_grad():
        ref_out, ref_p = _reference(m, x)
    # fp64 both ways: the same products in another order (bound ~ n * eps, n = N + C terms)
    tol = 4 * (size * size + 16) * torch.finfo(torch.float64).eps
    torch.testing.assert_close(p, ref_p, rtol=0, atol=tol)
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol * float(ref_out.abs().max()))
    monkeypatch.undo()
    out2, none = m(x, False)
    assert none is None
    torch.testing.assert_close(out2.detach(), ref_out, rtol=tol, atol=tol * float(ref_out.abs().max()))
