"""Regression tests of session 15's image-to-image acceptance findings: a resume on a dataset that
gained or lost images (schedule and run length), CycleGAN sizes its networks cannot take (at any
step), a missing --stage1_g, and the junyanz reference's --dataset_mode / --gpu_ids."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ganengine.train import Trainer, train
from ganengine.train import checkpoint as ckpt
from ganengine.cli import main
from tests._train_utils import TINY_FLAGS, one_thread, tiny_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

# pix2pix on the sample data at batch 1, --n_epochs 2 --n_epochs_decay 2: epoch k (1-based) trains at
# lr * [1, 2/3, 1/3, 0][k - 1] (the reference's lambda rule, stepped at the beginning of each epoch)
RATES = [1.0, 2 / 3, 1 / 3, 0.0]


def cli_error(capsys, argv, *words):
    """``ganengine <argv>`` fails with exit code 2 and an error line (argparse's, or the command's)
    holding ``words``, no traceback; returns that line."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # (argparse)
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    line = next(ln for ln in err.splitlines() if ln.startswith(f"ganengine {argv[0]} {argv[1]}: error:"))
    for word in words:
        assert word in line, (word, line)
    return line


def _config(run, items, **kw):
    kw = dict(dict(batch_size=1, n_epochs=2, n_epochs_decay=2), **kw)
    cfg = tiny_config("pix2pix", run, **kw)
    cfg.data_options["max_dataset_size"] = items  # items per epoch (steps per epoch at batch 1)
    return cfg


def _lr(trainer):
    return trainer.optimizers["G"].param_groups[0]["lr"]


def test_resume_on_a_dataset_that_lost_images_keeps_the_epoch_schedule(tmp_path, capsys):
    """4 -> 2 images per epoch at step 7 (3 of epoch 1's 4 done): the run stopped at step 8 after one
    step at epoch 1's rate, where epochs 2 and 3 (2 steps each) were due."""
    run = tmp_path / "run"
    train(_config(run, 4, max_steps=7, save_every=7))
    base = torch.load(run / "step_00000007.pt", weights_only=True)
    assert base["dataset_size"] == 4 and base["steps_per_epoch"] == 4
    lr0 = base["optimizers"]["G"]["param_groups"][0]["initial_lr"]
    capsys.readouterr()
    trainer = Trainer(_config(run, 2, max_steps=None, resume="latest", save_every=1, keep_checkpoints=20))
    try:  # 3 images done >= the new epoch's 2: epoch 1 is over
        assert (trainer.epoch, trainer.batch_in_epoch, trainer.total_steps) == (2, 0, 7 + 2 * 2)
        assert _lr(trainer) == pytest.approx(lr0 * RATES[2])
        err = capsys.readouterr().err
        assert "4 images per epoch (4 steps) with 2 images per epoch (2 steps; the dataset lost images)" in err
        assert "3 images of epoch 1 were done; continuing at batch 0 of epoch 2" in err
        assert "run's length follow the new steps per epoch" in err
        result = trainer.train()
    finally:
        trainer.close()
    assert result["step"] == 11
    lrs = {s: torch.load(p, weights_only=True)["optimizers"]["G"]["param_groups"][0]["lr"]
           for s, p in ckpt.list_checkpoints(str(run))}
    # the rate after step s is the one step s + 1 trains at: epochs 3 and 4 (1-based), 2 steps each
    assert [lrs[s] / lr0 for s in (8, 9, 10)] == pytest.approx([RATES[2], RATES[3], RATES[3]])


def test_resume_on_a_dataset_that_gained_images_keeps_the_epoch_schedule(tmp_path, capsys):
    """4 -> 6 images per epoch at step 6 (2 of epoch 1's done): the rest of epoch 1 and the later
    epochs ran at the rates of the wrong epochs, and a fifth epoch was added."""
    run = tmp_path / "run"
    train(_config(run, 4, max_steps=6, save_every=6))
    lr0 = torch.load(run / "step_00000006.pt", weights_only=True)["optimizers"]["G"]["param_groups"][0]["initial_lr"]
    capsys.readouterr()
    trainer = Trainer(_config(run, 6, max_steps=None, resume="latest"))
    try:  # epoch 1 continues at its image 2 of 6; then epochs 2 and 3 of 6 steps: 6 + 4 + 12
        assert (trainer.epoch, trainer.batch_in_epoch, trainer.total_steps) == (1, 2, 22)
        assert _lr(trainer) == pytest.approx(lr0 * RATES[1])
        assert "(6 steps; the dataset gained images)" in capsys.readouterr().err
    finally:
        trainer.close()


def test_resume_of_a_checkpoint_without_the_dataset_size_is_as_before(tmp_path, capsys):
    """Checkpoints written before the field: the dataset counts as unchanged (no conversion, no note)."""
    run = tmp_path / "run"
    train(_config(run, 4, max_steps=7, save_every=7))
    path = run / "step_00000007.pt"
    state = torch.load(path, weights_only=True)
    del state["dataset_size"], state["steps_per_epoch"]
    torch.save(state, path)
    capsys.readouterr()
    trainer = Trainer(_config(run, 2, max_steps=None, resume="latest"))
    try:
        assert (trainer.epoch, trainer.batch_in_epoch, trainer.total_steps) == (1, 3, 4 * 2)
        assert "images per epoch" not in capsys.readouterr().err
    finally:
        trainer.close()


def test_resume_with_another_batch_size_still_says_so(tmp_path, capsys):
    """(one conversion: the batch-size note is unchanged, the dataset not mentioned)"""
    run = tmp_path / "run"
    train(_config(run, 4, max_steps=1, save_every=1, batch_size=2))
    capsys.readouterr()
    trainer = Trainer(_config(run, 4, max_steps=None, resume="latest"))
    try:
        assert (trainer.epoch, trainer.batch_in_epoch, trainer.total_steps) == (0, 2, 1 + 4 * 4 - 2)
        err = capsys.readouterr().err
        assert "--batch_size 2 on 1 process(es) with --batch_size 1 on 1: 2 images of epoch 0 were done" in err
        assert "images per epoch" not in err
    finally:
        trainer.close()


# ---------------------------------------------------------------- sizes the networks cannot take
def test_size_errors_of_cyclegan_are_explained():
    from ganengine.train.engine import _explain

    rec = ValueError("cycle_loss: rec_a has shape (1, 3, 36, 36) but real_a has shape (1, 3, 33, 33); they must match")
    out = _explain(rec, True, (1, 3, 33, 33))
    assert isinstance(out, ValueError) and "cannot take 33x33 inputs" in str(out)
    assert "--crop_size" in str(out) and "--preprocess" in str(out)
    norm = ValueError("Expected more than 1 spatial element when training, got input size torch.Size([1, 64, 1, 1])")
    out = _explain(norm, True, (1, 3, 33, 33))
    assert isinstance(out, ValueError) and "cannot take 33x33 inputs at --batch_size 1" in str(out)
    assert "instance norm" in str(out) and "--load_size" in str(out)
    assert _explain(rec, False, (1, 3, 33, 33)) is rec  # (a size that already trained: not the cause)


def _image(path, w, h, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _cyclegan(tmp_path, extra):
    flags = TINY_FLAGS["cyclegan"].replace("--load_size 36 --crop_size 32 --batch_size 2", "").split()
    return (["train", "cyclegan"] + flags + ["--dataroot", str(tmp_path / "data"), "--checkpoints_dir",
            str(tmp_path / "ck"), "--name", "run", "--no_progress", "--tensorboard", "off", "--sample_every", "0",
            "--batch_size", "1", "--crop_size", "32"] + extra)


def test_cyclegan_size_error_on_the_first_step_names_the_options(tmp_path, capsys):
    for i in range(2):
        _image(str(tmp_path / "data" / "trainA" / f"{i}.png"), 32, 32, i)
        _image(str(tmp_path / "data" / "trainB" / f"{i}.png"), 32, 32, 10 + i)
    cli_error(capsys, _cyclegan(tmp_path, ["--preprocess", "scale_width", "--load_size", "33", "--max_steps", "1"]),
              "cannot take 33x33 inputs", "--crop_size", "--load_size", "--preprocess")


def test_cyclegan_size_error_at_a_later_step_names_the_options_and_the_image(tmp_path, capsys):
    """--preprocess scale_width keeps each photo's aspect: one tall photo (30x47 -> 32x50, which the
    ResNet generator gives back as 32x52) crashed at step 3 with the loss's internal message."""
    for i in range(2):
        _image(str(tmp_path / "data" / "trainA" / f"{i}.png"), 32, 32, i)
        _image(str(tmp_path / "data" / "trainB" / f"{i}.png"), 32, 32, 10 + i)
    _image(str(tmp_path / "data" / "trainA" / "2_tall.png"), 30, 47, 5)
    line = cli_error(capsys, _cyclegan(tmp_path, ["--preprocess", "scale_width", "--load_size", "32",
                                                  "--max_steps", "6", "--serial_batches"]),
                     "cannot take 50x32 inputs", "2_tall.png", "--crop_size", "--preprocess")
    assert "the steps before had other sizes" in line


# ---------------------------------------------------------------- --stage1_g
def test_stage1_g_missing_file_or_folder_names_the_option(tmp_path, capsys):
    flags = TINY_FLAGS["stackgan"].split()
    base = ["train", "stackgan"] + flags + ["--stage", "2", "--checkpoints_dir", str(tmp_path / "ck"), "--name", "s2",
                                            "--max_steps", "1", "--no_progress", "--tensorboard", "off"]
    line = cli_error(capsys, base + ["--stage1_g", str(tmp_path / "nope.pth")], "--stage1_g", "no such file",
                     "netG_*.pth", "Stage-I")
    assert "writing" not in line
    folder = tmp_path / "stage1_run"
    folder.mkdir()
    line = cli_error(capsys, base + ["--stage1_g", str(folder)], "--stage1_g", "is a folder", "Stage-I")
    assert "writing" not in line


# ---------------------------------------------------------------- the reference's --dataset_mode, --gpu_ids
def _config_of(argv):
    from ganengine.cli import build_parser
    from ganengine.cli.train import make_config

    args = build_parser().parse_args(argv)
    return make_config(args)[0]


def _pix2pix(tmp_path, *extra):
    return ["train", "pix2pix"] + TINY_FLAGS["pix2pix"].split() + ["--checkpoints_dir", str(tmp_path), "--name", "r",
                                                                   "--max_steps", "1", "--no_progress"] + list(extra)


def test_reference_dataset_mode_and_gpu_ids_are_accepted(tmp_path, monkeypatch):
    cfg = _config_of(_pix2pix(tmp_path, "--dataset_mode", "aligned", "--gpu_ids", "-1"))
    assert cfg.device == "cpu"
    assert _config_of(_pix2pix(tmp_path, "--dataset_mode", "aligned")).device == "auto"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _config_of(_pix2pix(tmp_path, "--gpu_ids", "1")).device == "cuda:1"
    cyc = ["train", "cyclegan"] + TINY_FLAGS["cyclegan"].split() + ["--checkpoints_dir", str(tmp_path), "--name", "c",
                                                                    "--dataset_mode", "unaligned", "--gpu_ids", "-1"]
    assert _config_of(cyc).device == "cpu"


def test_reference_dataset_mode_and_gpu_ids_are_refused_where_they_do_not_apply(tmp_path, capsys, monkeypatch):
    cli_error(capsys, _pix2pix(tmp_path, "--dataset_mode", "unaligned"), "--dataset_mode", "aligned", "paired")
    cli_error(capsys, ["train", "cyclegan", "--dataset_mode", "aligned"], "--dataset_mode", "unaligned")
    cli_error(capsys, _pix2pix(tmp_path, "--gpu_ids", "0,1"), "--gpu_ids", "torchrun", "one GPU id")
    cli_error(capsys, _pix2pix(tmp_path, "--gpu_ids", "-1", "--device", "cuda"), "--gpu_ids -1", "--device cuda",
              "disagree")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    cli_error(capsys, _pix2pix(tmp_path, "--gpu_ids", "0"), "--gpu_ids 0", "no CUDA device", "--gpu_ids -1")


def test_run_lock_taken_again_when_a_refused_run_removed_it(tmp_path, monkeypatch):
    """A refused run's release() removes the folder it created (and its .lock) while still holding
    the lock: a second trainer that had opened that .lock just before held a lock on a removed
    file, and a third got the new one: two trainers in one folder. The second now locks again."""
    import fcntl

    from ganengine.train import checkpoint as ckpt

    folder = str(tmp_path / "run")
    first = ckpt.RunLock(folder).acquire()
    real_flock = fcntl.flock

    def flock_after_the_first_released(fd, op):
        monkeypatch.setattr(ckpt.fcntl, "flock", real_flock)
        first.release()  # (removes the folder: it created it and holds nothing else)
        return real_flock(fd, op)

    monkeypatch.setattr(ckpt.fcntl, "flock", flock_after_the_first_released)
    second = ckpt.RunLock(folder).acquire()
    assert os.fstat(second.fd).st_nlink == 1 and os.path.isdir(folder)
    with pytest.raises(ckpt.CheckpointError, match="in use by another ganengine train"):
        ckpt.RunLock(folder).acquire()
    second.release()


def test_cuda_graphs_options_are_named(tmp_path, capsys):
    """--cuda_graphs on a double-backward model was refused naming only --compile, and --cuda_graphs
    with --compile max-autotune-no-cudagraphs silently became reduce-overhead."""
    from ganengine.cli import main

    base = ["train", "stargan"] + TINY_FLAGS["stargan"].split() + ["--checkpoints_dir", str(tmp_path), "--name", "r",
                                                                   "--max_steps", "1", "--no_progress",
                                                                   "--tensorboard", "off", "--device", "cpu"]
    assert main(base + ["--cuda_graphs", "--compile", "max-autotune-no-cudagraphs"]) == 2
    assert "--cuda_graphs is --compile reduce-overhead" in capsys.readouterr().err
    from ganengine.cli import build_parser
    from ganengine.cli.train import make_config

    cfg, _ = make_config(build_parser().parse_args(base + ["--cuda_graphs"]))
    from ganengine.train.engine import Trainer

    cfg.device = "cpu"
    with pytest.raises(ValueError, match="--cuda_graphs / --compile reduce-overhead"):
        Trainer(cfg)
