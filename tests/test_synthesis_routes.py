"""The speed routes of the synthesis models (issue 19): WGAN/WGAN-GP's single generator pass on a
generator step (with the second pass's running-statistics update applied by hand) and DCGAN's
channels_last activations on the CPU. Each route is the same function as the reference's to
rounding; the end-to-end equality with the reference loops is test_synthesis_models.py's."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ganengine.models import build_model
from ganengine.models.networks_dcgan import CHANNELS_LAST_FROM, DCGANDiscriminator, DCGANGenerator
from ganengine.models.wgan import _BatchNormRepeat
from ganengine.nn import BatchNormAct1d
from tests._model_bounds import assert_normwise, census
from tests._tolerance import unit_roundoff
from tests._train_utils import one_thread  # noqa: F401 (fixture)


# ------------------------------------------------------------------ WGAN: one G pass per generator step
def _norm_net():
    torch.manual_seed(0)
    lin = nn.Linear(5, 7)
    return nn.Sequential(lin, BatchNormAct1d.from_modules(nn.BatchNorm1d(7, 0.8), nn.LeakyReLU(0.2)),
                         nn.Linear(7, 6), nn.BatchNorm1d(6, momentum=0.3))


def test_batch_norm_repeat_is_a_second_pass():
    net, x = _norm_net(), torch.randn(9, 5)
    twice = copy.deepcopy(net)
    for m in list(net.modules()) + list(twice.modules()):  # non-trivial running statistics first
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-2, 2)
            m.running_var.uniform_(0.5, 3)
    twice.load_state_dict(net.state_dict())
    assert _BatchNormRepeat.applies(net)
    repeat = _BatchNormRepeat(net)
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in repeat.norms]
    net(x)
    repeat.update_again()
    twice(x), twice(x)
    u = unit_roundoff(torch.float32)
    for m, m2, (mean0, var0) in zip(repeat.norms, _BatchNormRepeat._norms(twice), before):
        for got, want, r0 in ((m.running_mean, m2.running_mean, mean0), (m.running_var, m2.running_var, var0)):
            # r2 = r1 + (1 - m)(r1 - r0) in fp32 against (1 - m) r1 + m s: each side a few roundings
            # of values of size max(|r0|, |r1|, |r2|); 8 of them bound both together
            scale = torch.stack([r0.abs(), got.abs(), want.abs()]).amax(0)
            assert ((got - want).abs() <= 8 * u * scale).all(), (got, want)
        assert int(m.num_batches_tracked) == int(m2.num_batches_tracked) == 2


def test_batch_norm_repeat_applies_only_to_fixed_momentum_training_norms():
    net = _norm_net()
    net[3].momentum = None  # a cumulative average depends on the count: keep the second pass
    assert not _BatchNormRepeat.applies(net)
    net = _norm_net().eval()
    assert not _BatchNormRepeat.applies(net)
    assert _BatchNormRepeat.applies(nn.Sequential(nn.Linear(2, 2)))  # no norms: nothing to repeat


@pytest.mark.parametrize("name", ["wgan", "wgan_gp"])
@pytest.mark.parametrize("fused", [True, False])
def test_wgan_runs_the_generator_once_on_a_generator_step(name, fused, one_thread):
    torch.manual_seed(0)
    model = build_model(name, latent_dim=8, img_size=8, n_critic=2, fused=fused, fused_optimizer=fused)
    calls = []
    model.G.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    opts = model.make_optimizers()
    batch = {"image": torch.rand(4, 1, 8, 8) * 2 - 1}
    model.train_step(batch, opts)  # step 0: critic and generator
    model.train_step(batch, opts)  # step 1: critic only (no graph)
    # fused: one pass with its graph, reused by the G step; the reference: a no-grad pass for the
    # critic and G run again for the G step
    assert calls == ([True, False] if fused else [False, True, False]), calls


# ------------------------------------------------------------------ DCGAN: channels_last on the CPU
def test_dcgan_fused_networks_switch_to_channels_last_where_stated(one_thread):
    torch.manual_seed(0)
    G, D = DCGANGenerator(nz=8, ngf=4, nc=3), DCGANDiscriminator(ndf=4, nc=3)
    seen = {}

    def layout(m, inp, key):
        x = inp[0]
        if x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1:  # where the two layouts differ
            seen[key] = "channels_last" if x.is_contiguous(memory_format=torch.channels_last) else "nchw"

    for tag, net in (("G", G), ("D", D)):
        for index, layer in enumerate(net.main):
            layer.register_forward_pre_hook(lambda m, inp, key=(tag, index): layout(m, inp, key))
    img = G(torch.randn(3, 8, 1, 1))
    assert img.is_contiguous()
    D(img)
    assert len(seen) >= 15, seen
    for (tag, index), got in seen.items():
        assert got == ("channels_last" if index >= CHANNELS_LAST_FROM[tag] else "nchw"), (tag, index)
    assert G.channels_last_from == CHANNELS_LAST_FROM["G"] and D.channels_last_from == CHANNELS_LAST_FROM["D"]
    ref = DCGANGenerator(nz=8, ngf=4, nc=3, fused=False), DCGANDiscriminator(ndf=4, nc=3, fused=False)
    assert ref[0].channels_last_from is None and ref[1].channels_last_from is None


def test_dcgan_channels_last_is_the_nchw_function(one_thread):
    torch.manual_seed(0)
    G, D = DCGANGenerator(nz=8, ngf=4, nc=3), DCGANDiscriminator(ndf=4, nc=3)
    G2, D2 = copy.deepcopy(G), copy.deepcopy(D)
    G2.channels_last_from = D2.channels_last_from = None
    z = torch.randn(5, 8, 1, 1)
    with census(G2, D2) as cen:
        want_img = G2(z)
        want = D2(want_img)
    got_img = G(z)
    got = D(got_img)
    assert_normwise(got_img, want_img, cen, name="G(z)")
    assert_normwise(got, want, cen, name="D(G(z))")
    got.sum().backward()
    want.sum().backward()
    for (name, p), p2 in zip(list(G.named_parameters()) + list(D.named_parameters()),
                             list(G2.parameters()) + list(D2.parameters())):
        scale = max(q.grad.abs().max().item() for q in list(G2.parameters()) + list(D2.parameters()))
        assert_normwise(p.grad, p2.grad, cen, scale=scale, backward=True, name=name)
    for b, b2 in zip(list(G.buffers()) + list(D.buffers()), list(G2.buffers()) + list(D2.buffers())):
        if b.is_floating_point():  # running statistics: one batch's statistics, normwise
            assert_normwise(b, b2, cen, name="running statistics")
