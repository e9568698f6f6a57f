"""ganengine.train: checkpoints, exact resume, NaN stop, AMP, logs (engine level, tiny models)."""
import csv
import os
import signal

import pytest
import torch

from tests._train_utils import one_thread, tiny_config  # noqa: F401 (fixture)
from ganengine.train import NonFiniteLossError, Trainer, train
from ganengine.train import checkpoint as ckpt
from ganengine.train.context import AmpContext

pytestmark = pytest.mark.usefixtures("one_thread")


def _assert_same_state(a, b):
    for name in a["networks"]:
        for k, v in a["networks"][name].items():
            assert torch.equal(v, b["networks"][name][k]), f"{name}.{k} differs"
    for name in a["optimizers"]:
        sa, sb = a["optimizers"][name]["state"], b["optimizers"][name]["state"]
        assert sa.keys() == sb.keys()
        for p in sa:
            for k in sa[p]:
                assert torch.equal(torch.as_tensor(sa[p][k]), torch.as_tensor(sb[p][k])), f"optimizer {name} {k}"
    assert a["schedulers"] == b["schedulers"]
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]


def test_checkpoint_format_and_retention(tmp_path):
    result = train(tiny_config("cyclegan", tmp_path, max_steps=5, save_every=1, keep_checkpoints=2))
    files = sorted(os.listdir(tmp_path))
    assert [f for f in files if f.endswith(".pt")] == ["step_00000004.pt", "step_00000005.pt"]
    assert not [f for f in files if f.startswith(".tmp")]  # atomic writes leave no temp files
    state = torch.load(result["checkpoint"], weights_only=True)
    assert state["format"] == "ganengine-checkpoint" and state["version"] == 1 and state["model"] == "cyclegan"
    assert set(state["networks"]) == {"netG_A", "netG_B", "netD_A", "netD_B"}
    assert set(state["optimizers"]) == {"G", "D"} and state["step"] == 5
    assert "fake_A_pool" in state["extra"] and state["options"]["ngf"] == 4
    model, _ = ckpt.load_model(result["checkpoint"])
    for k, v in model.netG_A.state_dict().items():
        assert torch.equal(v, state["networks"]["netG_A"][k])
    with open(tmp_path / "loss_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5] and "cycle_A" in rows[0]


@pytest.mark.parametrize("model", ["cyclegan", "pix2pix", "stargan"])
def test_resume_is_bit_exact(tmp_path, model):
    # one run of 6 steps vs 3 steps + resume to 6, compared bit for bit
    full = train(tiny_config(model, tmp_path / "full", max_steps=6))
    train(tiny_config(model, tmp_path / "part", max_steps=3))
    resumed = train(tiny_config(model, tmp_path / "part", max_steps=6, resume="latest"))
    _assert_same_state(torch.load(full["checkpoint"], weights_only=True),
                       torch.load(resumed["checkpoint"], weights_only=True))
    with open(tmp_path / "part" / "loss_log.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_across_epoch_boundary(tmp_path):
    # the 120 built-in pairs at batch 40 make 3-step epochs: 2 steps + resume crosses into epoch 1
    kw = dict(batch_size=40, max_steps=4)  # 120 images -> 3 steps per epoch
    full = train(tiny_config("pix2pix", tmp_path / "full", **kw))
    train(tiny_config("pix2pix", tmp_path / "part", **{**kw, "max_steps": 2}))
    resumed = train(tiny_config("pix2pix", tmp_path / "part", **kw, resume=str(tmp_path / "part")))
    a = torch.load(full["checkpoint"], weights_only=True)
    assert a["epoch"] == 1
    _assert_same_state(a, torch.load(resumed["checkpoint"], weights_only=True))


def _lrs(checkpoint):
    state = torch.load(checkpoint, weights_only=True)
    return {n: o["param_groups"][0]["lr"] for n, o in state["optimizers"].items()}


def test_max_steps_past_the_scheduled_epochs_keeps_the_rate_at_zero(tmp_path):
    # 120 pairs at batch 60: 2-step epochs; 1 + 2 scheduled epochs = 6 steps, --max_steps 10 runs
    # 2 epochs past them: the rate stays 0 there (it went to -1.33e-4: gradient ascent)
    result = train(tiny_config("pix2pix", tmp_path, batch_size=60, n_epochs=1, n_epochs_decay=2, max_steps=10,
                               save_every=2))
    rates = [_lrs(path) for _, path in ckpt.list_checkpoints(str(tmp_path))]
    assert [r["G"] for r in rates] == pytest.approx([0.0, 0.0, 0.0])  # steps 6, 8, 10 (3 kept)
    assert _lrs(result["checkpoint"]) == {"G": 0.0, "D": 0.0}


def test_stargan_num_iters_schedule_and_exact_resume(tmp_path):
    # --num_iters 6 --num_iters_decay 8 --lr_update_step 2: a drop of 1e-4 * 2 / 8 after steps 2, 4, 6
    def config(folder, **kw):
        cfg = tiny_config("stargan", tmp_path / folder, **kw)
        cfg.model_options.update(num_iters_decay=8, lr_update_step=2, lr_schedule="iterations")
        return cfg

    full = train(config("full", max_steps=6, save_every=2))
    got = [_lrs(p)["G"] for _, p in ckpt.list_checkpoints(str(tmp_path / "full"))]
    assert got == pytest.approx([1e-4 * 0.75, 1e-4 * 0.5, 1e-4 * 0.25])
    train(config("part", max_steps=3))
    resumed = train(config("part", max_steps=6, resume="latest"))
    _assert_same_state(torch.load(full["checkpoint"], weights_only=True),
                       torch.load(resumed["checkpoint"], weights_only=True))


@pytest.mark.parametrize("model", ["pix2pix", "cyclegan"])
def test_max_dataset_size_limits_the_images_of_each_folder(tmp_path, model):
    # the reference's --max_dataset_size (data option): the first N sorted images (of each domain)
    from ganengine.data import build_dataset

    cfg = tiny_config(model, tmp_path)
    full = build_dataset(model, cfg.data_options)
    ds = build_dataset(model, {**cfg.data_options, "max_dataset_size": 10})
    stores = [ds.images] if model == "pix2pix" else [ds.A, ds.B]
    fulls = [full.images] if model == "pix2pix" else [full.A, full.B]
    assert len(ds) == 10 and [s.paths for s in stores] == [f.paths[:10] for f in fulls]
    with pytest.raises(ValueError, match="--max_dataset_size must be a whole number >= 1"):
        build_dataset(model, {**cfg.data_options, "max_dataset_size": 0})
    trainer = Trainer(tiny_config(model, tmp_path, data_options={**cfg.data_options, "max_dataset_size": 10}))
    try:
        assert trainer.steps_per_epoch == 5  # 10 images at batch 2
    finally:
        trainer.close()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config("pix2pix", tmp_path, max_steps=6, save_every=2))
    real_step = trainer.model.train_step

    def poisoned(batch, optimizers, ctx):
        losses = real_step(batch, optimizers, ctx)
        if ctx.step_index == 4:  # the 5th step
            losses["G_L1"] = torch.tensor(float("nan"))
        return losses

    monkeypatch.setattr(trainer.model, "train_step", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 5.*Last good checkpoint: .*step_00000004\.pt"):
        trainer.train()
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [2, 4]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains(tmp_path, amp):
    result = train(tiny_config("cyclegan", tmp_path, amp=amp, max_steps=2, deterministic=False))
    assert all(torch.isfinite(torch.tensor(v)) for v in result["losses"].values())
    state = torch.load(result["checkpoint"], weights_only=True)
    if amp == "fp16":  # one scaler per optimiser, checkpointed
        assert set(state["scalers"]) == {"G", "D"} and state["scalers"]["G"]["scale"] > 0
    for sd in state["networks"].values():
        assert all(v.dtype != torch.float16 for v in sd.values())  # master weights stay fp32


def test_amp_context_scaler_per_optimizer():
    ctx = AmpContext("fp16", "cpu", ["G", "D"])
    assert set(ctx.scalers) == {"G", "D"} and ctx.scalers["G"] is not ctx.scalers["D"]
    with ctx.autocast():
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.float16
    with pytest.raises(ValueError, match="--amp"):
        AmpContext("fp8")


def test_channels_last_and_samples(tmp_path):
    result = train(tiny_config("stargan", tmp_path, channels_last=True, max_steps=2, sample_every=2,
                               num_samples=2))
    grids = os.listdir(tmp_path / "samples")
    assert grids == ["step_00000002.png"]
    from PIL import Image

    img = Image.open(tmp_path / "samples" / grids[0])
    assert img.size[1] > img.size[0] // 2  # input row + one row per domain (3)
    assert result["step"] == 2


def test_resume_errors(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        Trainer(tiny_config("cyclegan", tmp_path / "empty", resume="latest"))
    bad = tmp_path / "bad.pt"
    torch.save({"hello": 1}, bad)
    with pytest.raises(ckpt.CheckpointError, match="not a ganengine training checkpoint"):
        ckpt.load(str(bad))
    result = train(tiny_config("stargan", tmp_path / "sg", max_steps=1))
    with pytest.raises(ckpt.CheckpointError, match="stargan checkpoint, not cyclegan"):
        Trainer(tiny_config("cyclegan", tmp_path / "x", resume=result["checkpoint"]))
    cfg = tiny_config("stargan", tmp_path / "sg", resume="latest")
    cfg.model_options["g_conv_dim"] = 8
    with pytest.raises(ckpt.CheckpointError, match=r"--g_conv_dim 4 \(now 8\)"):
        Trainer(cfg)


def _val_l1(model, data_options):
    from ganengine.data import build_dataset

    ds = build_dataset("pix2pix", data_options, phase="val")
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    torch.manual_seed(0)
    with torch.no_grad():
        return float((model.translate(batch) - batch["B"]).abs().mean())


@pytest.mark.slow
def test_pix2pix_learns_on_builtin_data(tmp_path):
    """The README's promise: a few CPU minutes on the built-in pairs clearly lower validation L1."""
    from ganengine.cli import build_parser
    from ganengine.cli.train import make_config
    from ganengine.models import build_model
    from ganengine.train.rng import seed_all

    args = build_parser().parse_args(["train", "pix2pix", "--checkpoints_dir", str(tmp_path), "--max_steps", "150",
                                      "--no_progress", "--tensorboard", "off", "--sample_every", "100"])
    cfg, _ = make_config(args)
    seed_all(cfg.seed)
    untrained = _val_l1(build_model("pix2pix", **cfg.model_options), cfg.data_options)
    result = train(cfg)
    trained_model, _ = ckpt.load_model(result["checkpoint"])
    trained = _val_l1(trained_model, cfg.data_options)
    print(f"validation L1: untrained {untrained:.4f} -> trained {trained:.4f}")
    assert trained < 0.5 * untrained


def test_ctrl_c_saves_a_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config("cyclegan", tmp_path, max_steps=6))
    real_step = trainer.model.train_step

    def interrupted(batch, optimizers, ctx):
        if ctx.step_index == 3:  # Ctrl-C as the 4th step starts: it finishes, and is saved
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(batch, optimizers, ctx)

    monkeypatch.setattr(trainer.model, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.interrupted_checkpoint.endswith("step_00000004.pt")
    assert torch.load(trainer.interrupted_checkpoint, weights_only=True)["step"] == 4


def test_tensorboard_is_optional(tmp_path):
    from ganengine.train.logger import TrainLogger

    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    log = TrainLogger(str(tmp_path), "auto")
    assert log.tb is None and "pip install tensorboard" in log.note
    log.scalars(1, 0, {"a": 1.0})
    log.scalars(2, 0, {"a": 2.0, "b": 3.0})  # a loss that appears later extends the CSV
    with open(tmp_path / "loss_log.csv") as f:
        assert f.read().splitlines() == ["step,epoch,a,b", "1,0,1,", "2,0,2,3"]
    with pytest.raises(ValueError, match="pip install tensorboard"):
        TrainLogger(str(tmp_path), "on")


def test_sample_grid_rows_are_labelled(tmp_path):
    """The sample grids name their rows (real / translated / target...) in a strip on the left."""
    from PIL import Image

    from ganengine.train.logger import save_grid
    from ganengine.train.visuals import row_labels

    class _M:
        options = {"direction": "AtoB"}

    labels = row_labels("pix2pix", _M(), 3)
    assert labels == ["input A", "output G(A)", "target B"]
    assert row_labels("stargan", _M(), 3, ["Blond_Hair", "Male"]) == ["real", "flip Blond_Hair", "flip Male"]
    rows = [torch.zeros(2, 3, 8, 8) for _ in range(3)]
    save_grid(rows, str(tmp_path / "plain.png"))
    save_grid(rows, str(tmp_path / "labelled.png"), labels)
    with Image.open(tmp_path / "plain.png") as a, Image.open(tmp_path / "labelled.png") as b:
        assert b.height == a.height and b.width > a.width + 20
        strip = torch.tensor(list(b.convert("L").getdata())).view(b.height, b.width)[:, :b.width - a.width]
        assert (strip < 128).any(), "no text drawn in the label strip"


def test_resume_a_checkpoint_written_before_an_option_existed(tmp_path):
    """A checkpoint from before an option was added (no such key in its options) resumes with the
    option at its default (the behaviour the run had); a non-default value is a difference."""
    result = train(tiny_config("pix2pix", tmp_path / "run", max_steps=2))
    state = torch.load(result["checkpoint"], weights_only=True)
    assert state["options"].pop("lr_policy") == "linear"  # as written before --lr_policy existed
    old = tmp_path / "old.pt"
    torch.save(state, old)
    resumed = train(tiny_config("pix2pix", tmp_path / "run2", max_steps=3, resume=str(old)))
    assert torch.load(resumed["checkpoint"], weights_only=True)["step"] == 3
    cfg = tiny_config("pix2pix", tmp_path / "run3", resume=str(old))
    cfg.model_options["lr_policy"] = "step"
    with pytest.raises(ckpt.CheckpointError, match=r"--lr_policy None \(now 'step'\)"):
        Trainer(cfg)


def test_stargan_checkpoint_before_the_iteration_schedule_keeps_its_epoch_rule(tmp_path):
    """A StarGAN checkpoint written before --lr_schedule existed trained with the epoch rule, even
    with --max_steps: resumed as it is, the rule stays (the missing option is its default); asked
    for the iteration decay, the resume says --lr_schedule differs instead of switching silently."""
    result = train(tiny_config("stargan", tmp_path / "run", max_steps=2))
    state = torch.load(result["checkpoint"], weights_only=True)
    for k in ("lr_schedule", "num_iters_decay", "lr_update_step"):
        state["options"].pop(k)
    old = tmp_path / "old.pt"
    torch.save(state, old)
    cfg = tiny_config("stargan", tmp_path / "run2", max_steps=3, resume=str(old))
    cfg.model_options["lr_schedule"] = "iterations"
    with pytest.raises(ckpt.CheckpointError, match=r"--lr_schedule None \(now 'iterations'\)"):
        Trainer(cfg)
    resumed = train(tiny_config("stargan", tmp_path / "run3", max_steps=3, resume=str(old)))
    assert torch.load(resumed["checkpoint"], weights_only=True)["options"]["lr_schedule"] == "epochs"
