"""ganengine.train.EMA: averaged parameters and buffers, swap / copy_to, checkpoints, wrappers.

The update is ``torch.lerp(shadow, live, 1 - decay)`` (one ``_foreach_lerp_`` per dtype group):
checked bit for bit against a per-tensor ``torch.lerp`` loop, and against BigGAN's formula
``shadow * decay + live * (1 - decay)`` within its rounding (a few units of roundoff).
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_sn

import ganengine
import ganengine.nn as gnn
from ganengine.train import EMA
from tests._tolerance import unit_roundoff


def _net(sn=torch_sn, dtype=torch.float32, seed=0):
    """Linear -> BatchNorm1d -> ReLU -> spectral-normed Linear: parameters, float buffers
    (running stats), an int buffer (num_batches_tracked) and power-iteration vectors."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), sn(nn.Linear(8, 3))).to(dtype)


def _train_a_bit(model, seed, scale=0.1):
    """Move every parameter and (through a train-mode forward) the BN stats and SN vectors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)
        model.train()
        model(torch.randn(5, 6, generator=g).to(next(model.parameters()).dtype))


def _lerp_ref(shadow, model, decay, averaged, peg):
    """The expected shadows after one update, tensor by tensor."""
    out = {}
    for k, live in model.state_dict().items():
        if averaged[k] and not peg:
            out[k] = torch.lerp(shadow[k], live.to(shadow[k].dtype), 1.0 - decay)
        else:
            out[k] = live.to(shadow[k].dtype).clone()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sn", [torch_sn, gnn.spectral_norm], ids=["torch_sn", "gnn_sn"])
def test_update_is_lerp_bit_exact(dtype, sn):
    model = _net(sn, dtype)
    ema = EMA(model, decay=0.9, start_step=2)
    sd = model.state_dict()
    averaged = {k: v.is_floating_point() and not k.endswith(("._u", "._v")) for k, v in sd.items()}
    assert {k for k, a in ema._averaged.items() if a} == {k for k, a in averaged.items() if a}
    expect = {k: v.clone() for k, v in sd.items()}
    for step in (1, 2, 3, 4):  # step 1 < start_step: pegged to the model
        _train_a_bit(model, step)
        expect = _lerp_ref(expect, model, 0.9, averaged, peg=step < 2)
        ema.update(step)
        for k, v in expect.items():
            assert ema.shadow[k].dtype == v.dtype and torch.equal(ema.shadow[k], v), (step, k)
    live = model.state_dict()
    # SN vectors and integer buffers are copies of the model's; the rest moved away from it
    for k in live:
        if not averaged[k]:
            assert torch.equal(ema.shadow[k], live[k]), k
    assert not torch.equal(ema.shadow["0.weight"], live["0.weight"])
    assert not torch.equal(ema.shadow["1.running_mean"], live["1.running_mean"])
    # BigGAN's utils.ema formula, t * decay + s * (1 - decay): equal up to a few roundings
    t, s = expect["0.weight"], live["0.weight"]
    _train_a_bit(model, 9)
    ema.update(9)
    s = model.state_dict()["0.weight"]
    biggan = t * 0.9 + s * (1 - 0.9)
    tol = 4 * unit_roundoff(dtype) * (t.abs() + s.abs())
    assert ((ema.shadow["0.weight"] - biggan).abs() <= tol).all()


def test_step_none_counts_updates_and_decay_edges():
    model = _net()
    ema = EMA(model, decay=0.5, start_step=2)
    _train_a_bit(model, 1)
    ema.update()  # step 0 < 2: a copy
    ema.update()  # step 1 < 2: a copy
    assert torch.equal(ema.shadow["0.weight"], model[0].weight) and ema.num_updates == 2
    before = ema.shadow["0.weight"].clone()
    _train_a_bit(model, 2)
    ema.update()  # step 2: averages
    assert torch.equal(ema.shadow["0.weight"], torch.lerp(before, model[0].weight.detach(), 0.5))
    frozen = EMA(model, decay=1.0)
    _train_a_bit(model, 3)
    frozen.update(5)
    assert not torch.equal(frozen.shadow["0.weight"], model[0].weight)
    copying = EMA(model, decay=0.0)
    _train_a_bit(model, 4)
    copying.update(5)
    assert torch.equal(copying.shadow["0.weight"], model[0].weight)


def test_buffers_copy_mode():
    model = _net()
    ema = EMA(model, decay=0.9, buffers="copy")
    _train_a_bit(model, 1)
    ema.update()
    assert torch.equal(ema.shadow["1.running_mean"], model[1].running_mean)
    assert torch.equal(ema.shadow["1.num_batches_tracked"], model[1].num_batches_tracked)
    assert not torch.equal(ema.shadow["0.weight"], model[0].weight)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_model_keeps_fp32_shadow(dtype):
    model = nn.Linear(4, 4, bias=False).to(dtype)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.999)
    assert ema.shadow["weight"].dtype == torch.float32
    step = torch.finfo(dtype).eps  # the next representable value above 1
    with torch.no_grad():
        model.weight.fill_(1.0 + step)
    want = torch.ones(4, 4)
    for i in range(5):
        ema.update(i)
        want = torch.lerp(want, torch.full((4, 4), 1.0 + step), 1.0 - 0.999)
    # a shadow in the model's dtype would round every one of these updates away
    assert torch.equal(ema.shadow["weight"], want) and (want > 1.0).all() and (want < 1.0 + step / 2).all()
    other = nn.Linear(4, 4, bias=False).to(dtype)
    ema.copy_to(other)
    assert other.weight.dtype == dtype and torch.equal(other.weight, want.to(dtype))


def test_swap_and_copy_to():
    model = _net()
    ema = EMA(model, decay=0.8)
    for s in range(3):
        _train_a_bit(model, s)
        ema.update()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    with ema.swap() as m:
        assert m is model
        for k, v in model.state_dict().items():
            assert torch.equal(v, ema.shadow[k]), k
    for k, v in model.state_dict().items():
        assert torch.equal(v, own[k]), k
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swap():
            raise RuntimeError("boom")
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items())
    assert all(a is b for a, b in zip(params, model.parameters()))  # same Parameter objects throughout
    other = _net(seed=5)
    assert ema.copy_to(other) is other
    assert all(torch.equal(v, ema.shadow[k]) for k, v in other.state_dict().items())
    with pytest.raises(ValueError, match="keys differ"):
        ema.copy_to(nn.Linear(6, 8))


def test_state_dict_resume_is_bit_exact():
    model_a, model_b = _net(), _net()
    run_a = EMA(model_a, decay=0.99, start_step=1)
    run_b = EMA(model_b, decay=0.99, start_step=1)
    for s in range(3):
        for m, e in ((model_a, run_a), (model_b, run_b)):
            _train_a_bit(m, s)
            e.update()
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "ema": run_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    model_c = _net(seed=7)
    model_c.load_state_dict(ckpt["model"])
    resumed = EMA(model_c, decay=0.5)  # settings come from the checkpoint
    resumed.load_state_dict(ckpt["ema"])
    assert (resumed.decay, resumed.start_step, resumed.num_updates) == (0.99, 1, 3)
    for s in range(3, 6):
        for m, e in ((model_a, run_a), (model_c, resumed)):
            _train_a_bit(m, s)
            e.update()
    for k, v in run_a.shadow.items():
        assert torch.equal(resumed.shadow[k], v), k
    with pytest.raises(ValueError, match="keys differ"):
        EMA(nn.Linear(2, 2)).load_state_dict(ckpt["ema"])
    with pytest.raises(ValueError, match="buffers"):
        EMA(_net(), buffers="copy").load_state_dict(ckpt["ema"])
    bad = dict(ckpt["ema"], shadow=dict(ckpt["ema"]["shadow"], **{"0.bias": torch.zeros(3)}))
    with pytest.raises(ValueError, match="shape"):
        EMA(_net()).load_state_dict(bad)


def test_wrapped_models_are_unwrapped():
    import os
    import tempfile

    import torch.distributed as dist

    plain = _net()
    compiled = torch.compile(copy.deepcopy(plain))  # wrapping only: never called here
    dp = nn.DataParallel(copy.deepcopy(plain))
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(plain))
            emas = [EMA(m, decay=0.9) for m in (plain, compiled, dp, ddp)]
            inner = [plain, compiled._orig_mod, dp.module, ddp.module]
            for m in inner:
                _train_a_bit(m, 1)
            for e in emas:
                e.update()
        finally:
            dist.destroy_process_group()
    for e, m in zip(emas, inner):
        assert e.model is m and set(e.shadow) == set(plain.state_dict())
        for k, v in emas[0].shadow.items():
            assert torch.equal(e.shadow[k], v), k


def test_fused_model_shares_the_average():
    """An EMA of the plain network applies to its ganengine.fuse()d copy and back (same keys)."""
    torch.manual_seed(3)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True), nn.LeakyReLU(0.2),
                          nn.Conv2d(4, 2, 3, padding=1))
    fused, report = ganengine.fuse(plain, return_report=True)
    assert report and set(fused.state_dict()) == set(plain.state_dict())
    ema = EMA(plain, decay=0.7)
    for s in range(2):
        _move(plain, s)
        ema.update()
    ema.copy_to(fused)
    x = torch.randn(2, 3, 5, 5)
    with ema.swap():
        want = plain(x)
    torch.testing.assert_close(fused(x), want, rtol=1e-5, atol=1e-5)
    # and an EMA that tracks the fused network directly averages the same values
    fused_live = ganengine.fuse(plain)
    on_fused = EMA(fused_live, decay=0.7)
    on_plain = EMA(plain, decay=0.7)
    _move(plain, 5)
    fused_live.load_state_dict(plain.state_dict())
    on_fused.update()
    on_plain.update()
    assert all(torch.equal(on_fused.shadow[k], v) for k, v in on_plain.shadow.items())


def _move(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_target_mode_matches_private_shadows():
    """EMA(G, target=G_ema) writes into G_ema the bits the private shadows get (fp32 BigGAN
    generator: its own SN buffers u0/sv0, ccbn stored stats); the synthesis models' StateEMA is
    this mode with BigGAN's options (tests/test_ema_models.py)."""
    from ganengine.models.networks_biggan import BigGANGenerator

    torch.manual_seed(0)
    G = BigGANGenerator(G_ch=4, dim_z=8, resolution=32, G_attn="0", n_classes=3, shared_dim=4, hier=True)
    G_ema = copy.deepcopy(G)
    _move(G_ema, 1)  # loaded with G's state at construction, whatever it held
    private = EMA(G, decay=0.9, start_step=2)
    ours = EMA(G, decay=0.9, start_step=2, target=G_ema)
    for itr in (1, 2, 3):
        _move(G, 10 + itr)
        with torch.no_grad():
            G.train()
            G(torch.randn(2, 8), G.shared(torch.tensor([0, 2])))  # moves u0 / sv0 / stored stats
        private.update(itr)
        ours.update(itr)
        for k, v in private.shadow.items():
            assert torch.equal(G_ema.state_dict()[k], v), (itr, k)
    assert not torch.equal(G_ema.state_dict()["linear.weight"], G.state_dict()["linear.weight"])
    assert "shadow" not in ours.state_dict() and ours.shadow["linear.weight"] is G_ema.linear.weight
    with pytest.raises(ValueError, match="second instance"):
        EMA(G, target=G)
    with pytest.raises(ValueError, match="keys differ"):
        EMA(G, target=nn.Linear(2, 2))


def test_sn_vectors_average_and_integer_buffers_keep():
    """BigGAN's utils.ema treatment: every floating entry averaged (SN vectors too), integer
    buffers left at their value from construction (copy_to / swap still write the whole average)."""
    model = _net()
    ema = EMA(model, decay=0.9, sn_vectors="average", integer_buffers="keep")
    sd = model.state_dict()
    floating = {k for k, v in sd.items() if v.is_floating_point()}
    assert {k for k, a in ema._averaged.items() if a} == floating and any(k.endswith("._u") for k in floating)
    expect = {k: v.clone() for k, v in sd.items()}
    for step in (1, 2, 3):
        _train_a_bit(model, step)  # moves num_batches_tracked and the SN vectors too
        ema.update(step)
        expect = {k: torch.lerp(v, model.state_dict()[k], 1.0 - 0.9) if k in floating else v for k, v in expect.items()}
        for k, v in expect.items():
            assert torch.equal(ema.shadow[k], v), (step, k)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    assert not torch.equal(ema.shadow["1.num_batches_tracked"], live["1.num_batches_tracked"])
    with ema.swap():
        assert all(torch.equal(v, expect[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())
    other = ema.copy_to(_net(seed=5))
    assert all(torch.equal(v, expect[k]) for k, v in other.state_dict().items())


def test_start_rule_biggan():
    """``if itr and itr < start_itr``: a step of 0 or None averages, 0 < step < start_step pegs."""
    model = _net()
    ema = EMA(model, decay=0.5, start_step=3, start_rule="biggan")
    for step, pegged in ((0, False), (None, False), (1, True), (2, True), (3, False), (None, False)):
        before = ema.shadow["0.weight"].clone()
        _train_a_bit(model, 20 if step is None else step)
        ema.update(step)
        live = model[0].weight.detach()
        want = live if pegged else torch.lerp(before, live, 0.5)
        assert torch.equal(ema.shadow["0.weight"], want), step
    assert ema.num_updates == 6


def test_state_dict_carries_the_options():
    model = _net()
    ema = EMA(model, decay=0.9, start_step=4, sn_vectors="average", integer_buffers="keep", start_rule="biggan")
    state = ema.state_dict()
    assert (state["sn_vectors"], state["integer_buffers"], state["start_rule"]) == ("average", "keep", "biggan")
    resumed = EMA(_net(seed=1), sn_vectors="average", integer_buffers="keep")  # the start rule is a setting
    resumed.load_state_dict(state)
    assert (resumed.start_rule, resumed.start_step, resumed.decay) == ("biggan", 4, 0.9)
    for name, value in (("sn_vectors", "copy"), ("integer_buffers", "copy")):
        with pytest.raises(ValueError, match=name):
            EMA(_net(), **{"sn_vectors": "average", "integer_buffers": "keep", name: value}).load_state_dict(state)
    # a state dict from before these options: written with their defaults
    old = {k: v for k, v in EMA(model).state_dict().items() if k not in ("sn_vectors", "integer_buffers",
                                                                      "start_rule")}
    plain = EMA(_net(seed=2))
    plain.load_state_dict(old)
    assert plain.start_rule == "step" and all(torch.equal(plain.shadow[k], v) for k, v in old["shadow"].items())
    with pytest.raises(ValueError, match="sn_vectors"):
        EMA(_net(), sn_vectors="average").load_state_dict(old)


def test_bad_arguments():
    m = nn.Linear(2, 2)
    for kw, match in ((dict(decay=1.5), "decay"), (dict(decay="0.9"), "decay"), (dict(start_step=-1), "start_step"),
                      (dict(start_step=1.5), "start_step"), (dict(buffers="mean"), "buffers"),
                      (dict(sn_vectors="mean"), "sn_vectors"), (dict(integer_buffers="drop"), "integer_buffers"),
                      (dict(start_rule="itr"), "start_rule")):
        with pytest.raises(ValueError, match=match):
            EMA(m, **kw)
    with pytest.raises(TypeError, match="nn.Module"):
        EMA(torch.zeros(2))
    with pytest.raises(ValueError, match="shadow"):
        EMA(m).load_state_dict({"decay": 0.5})
