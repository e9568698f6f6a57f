"""Run length, learning-rate schedules and option checks against the references' training scripts.

The expected values are the references' rules written out here (junyanz pytorch-CycleGAN-and-pix2pix
train.py + networks.get_scheduler, current version: the schedulers are stepped at the BEGINNING of
every epoch, so the k-th epoch of a run (k = 1, 2, ...) trains at the scheduler's epoch k;
hanzhanggit StackGAN-Pytorch trainer.py), not ganengine's code."""
import math

import pytest
import torch

from ganengine.models import build_model
from ganengine.models.stackgan import StackGAN
from ganengine.train import Trainer, train
from ganengine.train import checkpoint as ckpt
from tests._train_utils import one_thread, tiny_config  # noqa: F401 (fixture)

LR = 2e-4


def cli_error(capsys, argv, *words):
    """``ganengine <argv>`` exits 2 with one error line holding ``words`` (no traceback)."""
    from ganengine.cli import main

    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    line = next(ln for ln in err.splitlines() if ln.startswith(f"ganengine {argv[0]} {argv[1]}: error:"))
    for word in words:
        assert word in line, (word, line)
TINY_NETS = {"cyclegan": dict(netG="resnet_6blocks", ngf=4, ndf=4, n_layers_D=2),
             "csgan": dict(netG="resnet_6blocks", ngf=4, ndf=4, n_layers_D=2),
             "pix2pix": dict(netG="unet_128", ngf=4, ndf=4)}


# ---------------------------------------------------------------- the references' rules, written out
def junyanz_rate(policy, k, n_epochs, n_epochs_decay, epoch_count=1, lr_decay_iters=50):
    """The rate of the k-th epoch of a junyanz run (k = 1, 2, ...: its epoch epoch_count + k - 1):
    the scheduler has been stepped k times when that epoch starts."""
    if policy == "linear":  # LambdaLR(lambda_rule), lambda_rule(k) = 1 - max(0, k + epoch_count - n) / (d + 1)
        return LR * (1.0 - max(0, k + epoch_count - n_epochs) / float(n_epochs_decay + 1))
    if policy == "step":  # StepLR(step_size=lr_decay_iters, gamma=0.1)
        return LR * 0.1 ** (k // lr_decay_iters)
    if policy == "cosine":  # CosineAnnealingLR(T_max=n_epochs, eta_min=0), closed form (k <= T_max)
        return LR * (1 + math.cos(math.pi * k / n_epochs)) / 2
    raise AssertionError(policy)


def junyanz_epochs(n_epochs, n_epochs_decay, epoch_count=1):
    """train.py: for epoch in range(epoch_count, n_epochs + n_epochs_decay + 1)"""
    return len(range(epoch_count, n_epochs + n_epochs_decay + 1))


def per_epoch_rates(model, n_epochs, n_epochs_decay, steps_per_epoch, epochs, name="G"):
    """The rate each epoch of ganengine's run trains at (schedulers stepped once per step, as the
    engine does); every step of an epoch must have the same rate."""
    opts = model.make_optimizers()
    scheds = model.make_schedulers(opts, n_epochs, n_epochs_decay, steps_per_epoch)
    out = []
    for _ in range(epochs):
        rates = []
        for _ in range(steps_per_epoch):
            rates.append(opts[name].param_groups[0]["lr"])
            for o in opts.values():
                o.step()  # (no gradients: a no-op that keeps the scheduler's order check quiet)
            for s in scheds.values():
                s.step()
        assert len(set(rates)) == 1, rates
        out.append(rates[0])
    return out


# ---------------------------------------------------------------- 2. the --lr_policy schedules per epoch
def test_linear_policy_matches_the_reference_per_epoch():
    # the acceptance case: n_epochs 3, n_epochs_decay 3: 2e-4, 2e-4, 1.5e-4, 1e-4, 5e-5, 0 (the last
    # decay epoch at 0, as the reference's; ganengine used to run one epoch behind: 2e-4 x3, ..., 5e-5)
    for name in ("cyclegan", "pix2pix", "csgan"):
        model = build_model(name, **TINY_NETS[name])
        got = per_epoch_rates(model, 3, 3, steps_per_epoch=3, epochs=6)
        assert got == pytest.approx([2e-4, 2e-4, 1.5e-4, 1e-4, 5e-5, 0.0], abs=1e-15), name
        assert got == pytest.approx([junyanz_rate("linear", k, 3, 3) for k in range(1, 7)], abs=1e-15)


@pytest.mark.parametrize("n_epochs, n_epochs_decay, epoch_count", [(3, 3, 3), (2, 4, 2), (4, 0, 1), (1, 5, 1)])
def test_linear_policy_with_epoch_count_matches_the_reference(n_epochs, n_epochs_decay, epoch_count):
    model = build_model("cyclegan", epoch_count=epoch_count, **TINY_NETS["cyclegan"])
    epochs = junyanz_epochs(n_epochs, n_epochs_decay, epoch_count)
    got = per_epoch_rates(model, n_epochs, n_epochs_decay, steps_per_epoch=2, epochs=epochs)
    want = [junyanz_rate("linear", k, n_epochs, n_epochs_decay, epoch_count) for k in range(1, epochs + 1)]
    assert got == pytest.approx(want, abs=1e-15)
    assert got[-1] == 0.0  # the reference's last epoch trains at rate 0 (its issue #1100)


def test_step_and_cosine_policies_match_the_reference_per_epoch():
    step = build_model("cyclegan", lr_policy="step", lr_decay_iters=2, **TINY_NETS["cyclegan"])
    got = per_epoch_rates(step, 3, 4, steps_per_epoch=3, epochs=7)
    assert got == pytest.approx([junyanz_rate("step", k, 3, 4, lr_decay_iters=2) for k in range(1, 8)], rel=1e-12)
    assert got[:3] == pytest.approx([2e-4, 2e-5, 2e-5])
    cosine = build_model("pix2pix", lr_policy="cosine", **TINY_NETS["pix2pix"])
    got = per_epoch_rates(cosine, 4, 3, steps_per_epoch=3, epochs=7)
    assert got[:4] == pytest.approx([junyanz_rate("cosine", k, 4, 3) for k in range(1, 5)], abs=1e-15)
    assert got[3:] == pytest.approx([0.0] * 4, abs=1e-15)  # 0 at epoch n_epochs, then held (ganengine's)


def test_models_without_the_reference_policy_keep_their_own_linear_rule():
    # StarGAN's epoch rule and the synthesis models' --n_epochs_decay: constant for n_epochs
    # epochs, then down (ganengine's own schedules, not the junyanz timing)
    stargan = build_model("stargan", c_dim=2, image_size=16, g_conv_dim=4, d_conv_dim=4, g_repeat_num=1,
                          d_repeat_num=2)
    assert per_epoch_rates(stargan, 1, 1, steps_per_epoch=2, epochs=3) == pytest.approx([1e-4, 5e-5, 0.0])
    assert not stargan.lr_at_epoch_begin and build_model("cyclegan", **TINY_NETS["cyclegan"]).lr_at_epoch_begin


def test_resumed_schedulers_give_the_uninterrupted_sequence():
    def run(stop=None):
        model = build_model("cyclegan", epoch_count=2, **TINY_NETS["cyclegan"])
        opts = model.make_optimizers()
        scheds = model.make_schedulers(opts, 3, 3, 2)
        rates = []
        for step in range(10):
            if step == stop:  # a checkpoint here, read back by a fresh model
                saved = ({k: o.state_dict() for k, o in opts.items()}, {k: s.state_dict() for k, s in scheds.items()})
                model = build_model("cyclegan", epoch_count=2, **TINY_NETS["cyclegan"])
                opts = model.make_optimizers()
                scheds = model.make_schedulers(opts, 3, 3, 2)
                for k in opts:
                    opts[k].load_state_dict(saved[0][k])
                    scheds[k].load_state_dict(saved[1][k])
            rates.append(opts["G"].param_groups[0]["lr"])
            for o in opts.values():
                o.step()
            for s in scheds.values():
                s.step()
        return rates

    full = run()
    assert full == pytest.approx([junyanz_rate("linear", step // 2 + 1, 3, 3, 2) for step in range(10)], abs=1e-15)
    for stop in (1, 2, 5):
        assert run(stop) == full


def test_engine_resume_keeps_the_learning_rate_sequence(tmp_path, one_thread):
    # 120 pairs at batch 40: 3-step epochs; n_epochs 1 + n_epochs_decay 2 = 9 steps; 4 + resume to 9
    kw = dict(batch_size=40, n_epochs=1, n_epochs_decay=2, max_steps=None, save_every=1, keep_checkpoints=20)
    full = train(tiny_config("pix2pix", tmp_path / "full", **kw))
    assert full["step"] == 9
    rates = [torch.load(p, weights_only=True)["optimizers"]["G"]["param_groups"][0]["lr"]
             for _, p in ckpt.list_checkpoints(str(tmp_path / "full"))]
    # after step s the optimiser holds the rate of step s + 1 (run epoch (s // 3) + 1)
    assert rates[:-1] == pytest.approx([junyanz_rate("linear", s // 3 + 1, 1, 2) for s in range(1, 9)], abs=1e-15)
    train(tiny_config("pix2pix", tmp_path / "part", **{**kw, "max_steps": 4}))
    resumed = train(tiny_config("pix2pix", tmp_path / "part", **kw, resume="latest"))
    assert resumed["step"] == 9
    again = [torch.load(p, weights_only=True)["optimizers"]["G"]["param_groups"][0]["lr"]
             for _, p in ckpt.list_checkpoints(str(tmp_path / "part"))]
    assert again[-5:] == rates[-5:]


def test_resuming_a_checkpoint_from_before_the_timing_change_says_so(tmp_path, capsys, one_thread):
    result = train(tiny_config("pix2pix", tmp_path / "run", max_steps=2))
    state = torch.load(result["checkpoint"], weights_only=True)
    assert state["schedule"].pop("lr_timing") == "epoch_begin"
    old = tmp_path / "old.pt"
    torch.save(state, old)
    capsys.readouterr()
    train(tiny_config("pix2pix", tmp_path / "run2", max_steps=3, resume=str(old)))
    err = capsys.readouterr().err
    assert "one epoch ahead" in err and "--lr_timing" not in err
    train(tiny_config("pix2pix", tmp_path / "run", max_steps=3, resume="latest"))  # (a current one: silent)
    assert "one epoch ahead" not in capsys.readouterr().err


# ---------------------------------------------------------------- 1. --epoch_count shortens the run
@pytest.mark.parametrize("model, n_epochs, n_epochs_decay, epoch_count", [
    ("cyclegan", 2, 2, 3), ("cyclegan", 2, 2, 1), ("pix2pix", 1, 2, 2), ("pix2pix", 3, 0, 3)])
def test_epoch_count_trains_the_reference_number_of_epochs(tmp_path, model, n_epochs, n_epochs_decay, epoch_count):
    cfg = tiny_config(model, tmp_path, batch_size=20, n_epochs=n_epochs, n_epochs_decay=n_epochs_decay,
                      max_steps=None)
    cfg.model_options["epoch_count"] = epoch_count
    trainer = Trainer(cfg)
    try:
        assert trainer.total_steps == trainer.steps_per_epoch * junyanz_epochs(n_epochs, n_epochs_decay, epoch_count)
    finally:
        trainer.close()


def test_epoch_count_keeps_max_steps_and_refuses_an_empty_run(tmp_path):
    cfg = tiny_config("cyclegan", tmp_path / "a", batch_size=20, n_epochs=2, n_epochs_decay=2, max_steps=7)
    cfg.model_options["epoch_count"] = 3
    trainer = Trainer(cfg)
    try:
        assert trainer.total_steps == 7  # --max_steps overrides the epochs, as before
    finally:
        trainer.close()
    cfg = tiny_config("cyclegan", tmp_path / "b", batch_size=20, n_epochs=2, n_epochs_decay=2, max_steps=None)
    cfg.model_options["epoch_count"] = 5
    with pytest.raises(ValueError, match="--epoch_count 5 is past the last epoch"):
        Trainer(cfg)
    with pytest.raises(ValueError, match="epoch_count must be a positive int"):
        build_model("cyclegan", epoch_count=0, **TINY_NETS["cyclegan"])


def test_epoch_count_run_end_to_end(tmp_path, one_thread):
    # 120 pairs at batch 60: 2-step epochs; n_epochs 1 + n_epochs_decay 2 from epoch 2: 2 epochs
    cfg = tiny_config("pix2pix", tmp_path, batch_size=60, n_epochs=1, n_epochs_decay=2, max_steps=None, save_every=1,
                      keep_checkpoints=10)
    cfg.model_options["epoch_count"] = 2
    result = train(cfg)
    assert (result["step"], result["epoch"]) == (4, 2)
    rates = [torch.load(p, weights_only=True)["optimizers"]["G"]["param_groups"][0]["lr"]
             for _, p in ckpt.list_checkpoints(str(tmp_path))]
    assert rates[:3] == pytest.approx([junyanz_rate("linear", s // 2 + 1, 1, 2, 2) for s in range(1, 4)], abs=1e-15)


# ---------------------------------------------------------------- 3.-5. StackGAN
def test_stackgan_refuses_n_epochs_decay(capsys, tmp_path):
    cli_error(capsys, ["train", "stackgan", "--n_epochs_decay", "2", "--max_steps", "1", "--checkpoints_dir",
                       str(tmp_path)], "--n_epochs_decay 2", "no decay phase")
    from ganengine.cli import build_parser

    help_text = build_parser()._subparsers._group_actions[0].choices["train"]._subparsers._group_actions[0] \
        .choices["stackgan"].format_help()
    assert "epochs of linear decay" not in help_text


@pytest.mark.parametrize("value", ["0", "-1"])
def test_stackgan_lr_decay_epoch_must_be_positive(capsys, tmp_path, value):
    cli_error(capsys, ["train", "stackgan", "--lr_decay_epoch", value, "--max_steps", "1", "--checkpoints_dir",
                       str(tmp_path)], "--lr_decay_epoch", ">= 1")
    with pytest.raises(ValueError, match="lr_decay_epoch must be a positive int"):
        StackGAN(gf_dim=8, df_dim=4, condition_dim=8, z_dim=8, text_dim=16, lr_decay_epoch=int(value))


def test_stackgan_schedule_halves_every_lr_decay_epoch():
    # trainer.py: at the start of epoch e > 0 with e % LR_DECAY_EPOCH == 0 both rates halve
    model = StackGAN(gf_dim=8, df_dim=4, condition_dim=8, z_dim=8, text_dim=16, lr_decay_epoch=2)
    want, lr = [], LR
    for epoch in range(7):
        if epoch % 2 == 0 and epoch > 0:
            lr *= 0.5
        want.append(lr)
    assert per_epoch_rates(model, 7, 0, steps_per_epoch=2, epochs=7) == pytest.approx(want)
    assert per_epoch_rates(model, 7, 0, steps_per_epoch=2, epochs=7, name="D") == pytest.approx(want)


def test_stackgan_stage2_needs_stage1_weights(capsys, tmp_path):
    cli_error(capsys, ["train", "stackgan", "--stage", "2", "--max_steps", "1", "--checkpoints_dir", str(tmp_path)],
              "--stage1_g")
    # the other ways a Stage II gets its Stage-I weights stay open: a model built directly (then a
    # checkpoint loaded into it), and --resume of a Stage-II run (checked here before any data is read)
    StackGAN(stage=2, gf_dim=8, df_dim=2, condition_dim=8, text_dim=16, z_dim=10, r_num=1)
    from ganengine.cli.train import _check_stackgan

    _check_stackgan({"stage": 2}, {"n_epochs_decay": 0}, "latest")
    _check_stackgan({"stage": 2, "stage1_g": "s1.pt"}, {"n_epochs_decay": 0}, None)
    with pytest.raises(ValueError, match="--stage1_g"):
        _check_stackgan({"stage": 2}, {"n_epochs_decay": 0}, None)


# ---------------------------------------------------------------- 6. CycleGAN's two pools
def _decisions(pool, n=40):
    out = []
    for step in range(n):
        out.append(int(pool.query(torch.full((1, 1, 1, 1), float(step))).item()))
    return out


def test_cyclegan_pools_draw_independently_and_resume_exactly():
    torch.manual_seed(0)
    model = build_model("cyclegan", pool_size=4, **TINY_NETS["cyclegan"])
    assert model.fake_A_pool.rng.getstate() != model.fake_B_pool.rng.getstate()
    torch.manual_seed(0)
    again = build_model("cyclegan", pool_size=4, **TINY_NETS["cyclegan"])  # same seed: same streams
    assert model.fake_A_pool.rng.getstate() == again.fake_A_pool.rng.getstate()
    assert model.fake_B_pool.rng.getstate() == again.fake_B_pool.rng.getstate()
    # half-way, both pools' state (images and random streams) goes to another model
    first_a, first_b = _decisions(model.fake_A_pool, 10), _decisions(model.fake_B_pool, 10)
    torch.manual_seed(1)
    other = build_model("cyclegan", pool_size=4, **TINY_NETS["cyclegan"])
    other.load_extra_state(model.extra_state())
    a, b = _decisions(model.fake_A_pool), _decisions(model.fake_B_pool)
    assert first_a + a != first_b + b  # (one seed for both made these identical)
    assert _decisions(other.fake_A_pool) == a and _decisions(other.fake_B_pool) == b
