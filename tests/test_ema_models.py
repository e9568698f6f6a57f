"""The synthesis models' generator EMA (``synthesis_tools.StateEMA``) as ``ganengine.train.EMA``:
the same bits as the standalone ``StateEMA`` it replaced, and checkpoints written with that code
path resume bit for bit with the new one.

``_ReplacedStateEMA`` is ganengine's own ``StateEMA`` as it stood before the unification (kept
here verbatim as the baseline: BigGAN's ``utils.ema`` rule as one ``_foreach_lerp_`` over every
floating state-dict tensor, integer buffers left alone).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_sn

import ganengine.nn as gnn
from ganengine.models.synthesis_tools import StateEMA
from ganengine.train import EMA
from tests._train_utils import one_thread  # noqa: F401  (fixture)


class _ReplacedStateEMA:
    def __init__(self, source: nn.Module, target: nn.Module, decay: float = 0.9999, start_itr: int = 0):
        self.source, self.target, self.decay, self.start_itr = source, target, float(decay), int(start_itr)
        self._pairs = None
        with torch.no_grad():
            target.load_state_dict(source.state_dict())

    def _tensors(self):
        if self._pairs is None:
            src, tgt = self.source.state_dict(keep_vars=True), self.target.state_dict(keep_vars=True)
            keys = [k for k, v in src.items() if v.is_floating_point()]
            self._pairs = ([tgt[k].data for k in keys], [src[k].data for k in keys])
        return self._pairs

    @torch.no_grad()
    def update(self, itr: int | None = None) -> None:
        decay = 0.0 if (itr and itr < self.start_itr) else self.decay
        targets, sources = self._tensors()
        if decay == 0.0:
            torch._foreach_copy_(targets, sources)
        else:
            torch._foreach_lerp_(targets, sources, 1.0 - decay)


def _biggan_G():
    from ganengine.models.networks_biggan import BigGANGenerator

    return BigGANGenerator(G_ch=4, dim_z=8, resolution=32, G_attn="0", n_classes=3, shared_dim=4, hier=True)


def _bn_sn_net(sn):
    """Parameters, BN running stats, an int buffer (num_batches_tracked), SN vectors _u/_v."""
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), sn(nn.Linear(8, 3)))


NETS = {"biggan_G": _biggan_G, "torch_sn": lambda: _bn_sn_net(torch_sn),
        "gnn_sn": lambda: _bn_sn_net(gnn.spectral_norm), "fp16": lambda: _bn_sn_net(torch_sn).half()}


def _move(model, seed):
    """Change every state-dict entry as training would: floats by noise, integers by one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_((torch.randn(t.shape, generator=g) * 0.1).to(t.dtype))
            else:
                t.add_(1)


def _assert_same_state(a: nn.Module, b: nn.Module, what):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k, v in sa.items():
        assert sb[k].dtype == v.dtype and torch.equal(sb[k], v), (what, k)


@pytest.mark.parametrize("decay", [0.9, 0.0])
@pytest.mark.parametrize("net", list(NETS))
def test_state_ema_writes_the_bits_of_the_replaced_implementation(net, decay):
    torch.manual_seed(0)
    G = NETS[net]()
    old_target, new_target = copy.deepcopy(G), copy.deepcopy(G)
    _move(old_target, 1)
    _move(new_target, 2)  # both start from G's state, whatever the targets held
    old = _ReplacedStateEMA(G, old_target, decay, start_itr=3)
    new = StateEMA(G, new_target, decay, start_itr=3)
    assert isinstance(new, EMA) and new.source is G and new.target is new_target and new.start_itr == 3
    _assert_same_state(old_target, new_target, "construction")
    ints = [k for k, v in G.state_dict().items() if not v.is_floating_point()]
    # BigGAN's rule: steps 0 and None never peg, 1 and 2 (< start_itr 3) do, then averages
    for i, itr in enumerate((0, None, 1, 2, 3, 4, 7)):
        _move(G, 10 + i)
        old.update(itr)
        new.update(itr)
        _assert_same_state(old_target, new_target, itr)
    live, avg = G.state_dict(), new_target.state_dict()
    if decay:
        assert not torch.equal(avg[next(iter(avg))], live[next(iter(live))])
    for k in ints:  # integer buffers stay at their value from construction
        assert not torch.equal(avg[k], live[k]), k
    for k in [k for k in live if k.endswith(("._u", "._v"))]:  # SN vectors are averaged, as BigGAN does
        assert not decay or not torch.equal(avg[k], live[k]), k


def test_state_ema_follows_a_moved_model():
    """The lookups happen per update: after G and G_ema are converted (new tensors behind the same
    Parameters, new buffer tensors), updates land in the converted G_ema (the replaced class kept
    the tensors it saw first and went on updating those)."""
    torch.manual_seed(0)
    G = _bn_sn_net(torch_sn)
    G_ema = copy.deepcopy(G)
    ema = StateEMA(G, G_ema, 0.5)
    _move(G, 1)
    ema.update(1)
    G.double()
    G_ema.double()
    before = {k: v.clone() for k, v in G_ema.state_dict().items()}
    _move(G, 2)
    ema.update(2)
    for k, v in G.state_dict().items():
        want = torch.lerp(before[k], v, 0.5) if v.is_floating_point() else before[k]
        assert v.dtype == torch.float64 or not v.is_floating_point()
        assert torch.equal(G_ema.state_dict()[k], want), k


def _with_replaced_state_ema(monkeypatch):
    import ganengine.models.biggan as biggan
    import ganengine.models.synthesis_tools as tools

    monkeypatch.setattr(tools, "StateEMA", _ReplacedStateEMA)  # SynthesisGAN.setup_ema imports it from here
    monkeypatch.setattr(biggan, "StateEMA", _ReplacedStateEMA)


def test_model_g_ema_matches_the_replaced_implementation(monkeypatch, one_thread):  # noqa: F811
    from ganengine.models import build_model

    def run(replaced):
        with monkeypatch.context() as m:
            if replaced:
                _with_replaced_state_ema(m)
            torch.manual_seed(0)
            model = build_model("acgan", latent_dim=8, img_size=16, n_classes=3, ema=True, ema_decay=0.5, ema_start=2)
            assert isinstance(model._ema, _ReplacedStateEMA if replaced else StateEMA)
            opts = model.make_optimizers()
            for _ in range(3):  # step 1 pegged, 2 and 3 averaged
                batch = {"image": torch.rand(4, 1, 16, 16) * 2 - 1, "label": torch.randint(0, 3, (4,))}
                model.train_step(batch, opts)
        return model

    old, new = run(True), run(False)
    _assert_same_state(old.G_ema, new.G_ema, "acgan G_ema")
    assert not torch.equal(new.G_ema.state_dict()["l1.0.weight"], new.G.state_dict()["l1.0.weight"])


def test_checkpoint_of_the_replaced_implementation_resumes_bit_exact(tmp_path, monkeypatch, one_thread):  # noqa: F811
    """A run checkpointed with the replaced StateEMA (G, D, G_ema networks + num_steps: the EMA
    keeps no state of its own) resumes with the new one to the bits of an uninterrupted run."""
    from ganengine.train import TrainConfig, train
    from ganengine.train.checkpoint import load

    def cfg(run, steps, **kw):
        return TrainConfig(model="acgan", model_options=dict(latent_dim=8, img_size=16, ema=True, ema_decay=0.5,
                                                             ema_start=3),
                           data_options=dict(image_size=16, channels=1, no_flip=True), run_dir=str(tmp_path / run),
                           batch_size=4, max_steps=steps, sample_every=0, save_every=0, print_freq=1, progress=False,
                           tensorboard="off", seed=0, deterministic=True, **kw)

    with monkeypatch.context() as m:
        _with_replaced_state_ema(m)
        full = train(cfg("full", 4))
        part = train(cfg("part", 2))
    saved = load(part["checkpoint"])
    assert set(saved["networks"]) == {"G", "D", "G_ema"} and saved["extra"] == {"num_steps": 2}
    resumed = train(cfg("part", 4, resume="latest"))  # steps 3 and 4 average: the new StateEMA
    a, b = load(full["checkpoint"]), load(resumed["checkpoint"])
    assert a["extra"] == b["extra"] == {"num_steps": 4}
    for net in a["networks"]:
        assert list(a["networks"][net]) == list(b["networks"][net])
        for k, v in a["networks"][net].items():
            assert torch.equal(b["networks"][net][k], v), (net, k)
    g, e = a["networks"]["G"], a["networks"]["G_ema"]
    assert not torch.equal(g["l1.0.weight"], e["l1.0.weight"])  # the average moved away from G
    ints = [k for k, v in e.items() if not v.is_floating_point()]
    assert ints and all(not torch.equal(g[k], e[k]) for k in ints)  # num_batches_tracked kept from construction
