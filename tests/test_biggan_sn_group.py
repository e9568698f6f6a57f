"""BigGAN's grouped spectral-norm power iterations (layers_biggan.grouped_spectral_norms, issue 19):
which layers are grouped, and that a grouped forward equals the per-layer fused path (weights, u0
and sv0 buffers, gradients) with the reference's once-per-call iteration kept. The networks'
end-to-end equality with the reference is test_sagan_biggan.py's."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ganengine

from ganengine.models import biggan_ops
from ganengine.models import layers_biggan as L


class _Net(nn.Module):
    """Same-shaped SN layers (two convs, two linears), a lone one, one with two singular vectors
    and an embedding (transposed u); ``forward`` uses each once (``twice``: conv ``a`` twice)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = L.SNConv2d(3, 4, 3, padding=1), L.SNConv2d(3, 4, 3, padding=1)
        self.c, self.d = L.SNLinear(6, 5), L.SNLinear(6, 5)
        self.lone = L.SNLinear(6, 7)
        self.two = L.SNLinear(6, 5, num_svs=2)
        self.e, self.f = L.SNEmbedding(4, 6), L.SNEmbedding(4, 6)
        self.fused = True
        self.twice = False
        L.set_fused(self, True)

    def forward(self, x, z, y):
        with L.grouped_spectral_norms(self):
            h = self.a(x) + self.b(x)
            if self.twice:
                h = h + self.a(x)
            lin = self.c(z) + self.d(z) + self.two(z) + self.lone(z).sum(1, keepdim=True)
            return h.sum() + lin.sum() + (self.e(y) * self.f(y)).sum()


def _net():
    torch.manual_seed(0)
    net = _Net().double()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3)
    return net


def _inputs():
    torch.manual_seed(1)
    return torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64), torch.tensor([1, 3])


def test_grouped_layers_are_the_same_shaped_small_fused_ones(monkeypatch):
    net = _net()
    with ganengine.use_backend("torch"):  # no C++ spectral-norm op: same-shaped small weights only
        group = L.grouped_spectral_norms(net)
        assert {id(m) for m in group.members} == {id(net.a), id(net.b), id(net.c), id(net.d), id(net.e),
                                                  id(net.f)}
        group.__exit__(None, None, None)
        assert not any("_sn_pending" in m.__dict__ for m in net.modules())
        net.fused = False  # the reference composition: nothing grouped
        assert L.grouped_spectral_norms(net).members == []
        net.fused = True
        net.b.eval()  # train and eval layers are not mixed
        assert id(net.a) not in {id(m) for m in L.grouped_spectral_norms(net).members}
        monkeypatch.setattr(biggan_ops, "SN_GROUP_MAX_NUMEL", 24)  # larger weights keep the per-layer path
        assert {id(m) for m in L.grouped_spectral_norms(net).members} == {id(net.e), id(net.f)}
        L.grouped_spectral_norms(net).__exit__(None, None, None)


@pytest.mark.skipif(biggan_ops.native_sn_ops() is None, reason="needs ganengine's C++ spectral-norm op")
def test_native_groups_take_every_single_vector_layer(monkeypatch):
    """With the C++ op, one call per (train/eval, eps, iterations) takes every fused
    single-vector layer whatever its shape; two singular vectors keep the per-layer path."""
    net = _net()
    net.b.eval()
    calls = []
    real = biggan_ops.sn_weights_native
    monkeypatch.setattr(biggan_ops, "sn_weights_native", lambda ms, *a: calls.append({id(m) for m in ms}) or real(ms, *a))
    group = L.grouped_spectral_norms(net)
    assert sorted(calls, key=len) == [{id(net.b)}, {id(net.a), id(net.c), id(net.d), id(net.lone), id(net.e),
                                                    id(net.f)}]
    assert id(net.two) not in {id(m) for m in group.members}
    group.__exit__(None, None, None)
    assert not any("_sn_pending" in m.__dict__ for m in net.modules())


@pytest.mark.parametrize("mode", ["train", "eval", "twice"])
def test_grouped_forward_equals_the_per_layer_path(mode):
    grouped = _net()
    grouped.train(mode != "eval")
    grouped.twice = mode == "twice"
    per_layer = copy.deepcopy(grouped)
    per_layer.fused = False  # no grouping; the layers stay fused (the per-layer fused sn_weight)
    assert all(m.fused for m in per_layer.modules() if isinstance(m, L.SN))
    for step in range(2):  # the second step starts from the first one's u0
        got, want = grouped(*_inputs()), per_layer(*_inputs())
        torch.testing.assert_close(got, want)
        got.backward()
        want.backward()
        for (name, b1), b2 in zip(grouped.named_buffers(), per_layer.buffers()):
            torch.testing.assert_close(b1, b2, msg=f"{name} after step {step}")
        for (name, p1), p2 in zip(grouped.named_parameters(), per_layer.parameters()):
            torch.testing.assert_close(p1.grad, p2.grad, msg=f"grad {name} after step {step}")
    if mode != "eval":  # u0 moved: the iteration ran (twice for ``a`` in "twice")
        assert not torch.equal(grouped.a.u0, _net().a.u0)
    assert not any("_sn_pending" in m.__dict__ for m in grouped.modules())
