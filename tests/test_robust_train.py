"""Regression tests of issue 22's lost work and unclear errors in training and the CLI: resuming
from an older checkpoint, translate name collisions, SIGTERM, stale temporaries, the run-folder
lock, bad numbers and damaged checkpoints, CLI arguments that gave tracebacks or silent no-ops."""
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from ganengine.cli import main
from ganengine.train import Trainer, train
from ganengine.train import checkpoint as ckpt
from ganengine.train.engine import Terminated

from tests._train_utils import one_thread, tiny_config  # noqa: F401  (fixture)


def _steps(folder):
    return [s for s, _ in ckpt.list_checkpoints(str(folder))]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny pix2pix run with checkpoints at steps 2, 4, 6."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config("pix2pix", run, max_steps=6, save_every=2))
    torch.set_num_threads(before)
    return run


def test_resume_from_older_checkpoint_keeps_it_and_sets_newer_aside(trained, tmp_path, one_thread):
    # issue: resuming from step 2 into the same folder deleted step 2 and kept the stale 4 and 6,
    # so a later --resume picked the abandoned run
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert _steps(run) == [2, 4, 6]
    train(tiny_config("pix2pix", run, max_steps=3, save_every=1, resume=str(run / "step_00000002.pt")))
    assert _steps(run) == [2, 3]
    assert sorted(os.listdir(run / ckpt.ABANDONED)) == ["step_00000004.pt", "step_00000006.pt"]
    assert ckpt.latest(str(run)).endswith("step_00000003.pt")


def test_sigterm_saves_like_ctrl_c(tmp_path, one_thread):
    trainer = Trainer(tiny_config("cyclegan", tmp_path, max_steps=6))
    real_step = trainer.model.train_step

    def step(batch, optimizers, ctx):
        if ctx.step_index == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(batch, optimizers, ctx)

    trainer.model.train_step = step
    with pytest.raises(Terminated):
        trainer.train()
    assert trainer.interrupted_checkpoint is not None
    assert torch.load(trainer.interrupted_checkpoint, weights_only=True)["step"] in (3, 4)
    assert signal.getsignal(signal.SIGTERM) is not signal.getsignal(signal.SIGINT)  # handler restored
    trainer.close()


def test_run_folder_lock_and_stale_temporaries(tmp_path, one_thread):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".tmp_step_abc123.pt").write_bytes(b"half a checkpoint")
    first = Trainer(tiny_config("pix2pix", run))
    assert not (run / ".tmp_step_abc123.pt").exists()  # removed under the lock
    if ckpt.fcntl is not None:
        with pytest.raises(ckpt.CheckpointError, match=rf"in use by another ganengine train \(pid {os.getpid()}\)"):
            Trainer(tiny_config("pix2pix", run))
    first.close()
    Trainer(tiny_config("pix2pix", run)).close()  # free again


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("batch_size", -3), ("print_freq", 0),
                                         ("max_steps", 0), ("n_epochs", -1)])
def test_bad_numbers_are_one_clear_error(tmp_path, field, value):
    with pytest.raises(ValueError, match=rf"--{field} must be a whole number"):
        Trainer(tiny_config("pix2pix", tmp_path, **{field: value}))


@pytest.mark.parametrize("edit", ["drop_networks", "step_text", "drop_optimizer", "bad_shape"])
def test_hand_edited_checkpoint_is_a_checkpoint_error(trained, tmp_path, edit, one_thread):
    state = torch.load(trained / "step_00000006.pt", weights_only=True)
    if edit == "drop_networks":
        del state["networks"]
    elif edit == "step_text":
        state["rng"] = "oops"
    elif edit == "drop_optimizer":
        state["optimizers"].pop(next(iter(state["optimizers"])))
    else:
        net = next(iter(state["networks"].values()))
        key = next(k for k, v in net.items() if v.dim() == 4)
        net[key] = net[key][:1]
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    with pytest.raises(ckpt.CheckpointError, match="cannot be restored.*edited or damaged"):
        Trainer(tiny_config("pix2pix", tmp_path / "run", resume=str(path)))
    Trainer(tiny_config("pix2pix", tmp_path / "run")).close()  # the lock was released


# ----------------------------------------------------------------------------- translate / sample
def _png(path, w=32, h=32, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def test_translate_does_not_overwrite_colliding_names(trained, tmp_path, one_thread):
    # issue: 4 inputs, "wrote 4", 1 file
    src = tmp_path / "in"
    for rel in ("x.png", "x.jpg", os.path.join("a", "x.png"), os.path.join("b", "x.png"), "y.png"):
        _png(str(src / rel), seed=len(rel))
    out = tmp_path / "out"
    assert main(["translate", "--checkpoint", str(trained), "--input", str(src), "--output", str(out),
                 "--device", "cpu"]) == 0
    assert len(os.listdir(out)) == 5 and "y.png" in os.listdir(out)


@pytest.mark.parametrize("argv,msg", [
    (["--batch_size", "-1"], "--batch_size must be at least 1"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--n_per_caption", "0"], "--n_per_caption must be at least 1"),
    (["--captions", "/nonexistent/caps.txt"], "--captions '/nonexistent/caps.txt' does not exist"),
])
def test_translate_bad_arguments(trained, tmp_path, capsys, argv, msg):
    _png(str(tmp_path / "in" / "x.png"))
    rc = main(["translate", "--checkpoint", str(trained), "--input", str(tmp_path / "in"), "--output",
               str(tmp_path / "out"), *argv])
    assert rc == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("cmd", ["translate", "sample"])
def test_device_cuda_without_cuda(trained, tmp_path, capsys, cmd):
    _png(str(tmp_path / "in" / "x.png"))
    extra = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")] if cmd == "translate" else \
        ["--output", str(tmp_path / "g.png")]
    assert main([cmd, "--checkpoint", str(trained), "--device", "cuda", *extra]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA device" in err and "Traceback" not in err


@pytest.mark.parametrize("cmd", ["translate", "sample"])
def test_unwritable_output_checked_up_front(trained, tmp_path, capsys, cmd):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    _png(str(tmp_path / "in" / "x.png"))
    extra = ["--input", str(tmp_path / "in"), "--output", str(blocker / "out")] if cmd == "translate" else \
        ["--output", str(blocker / "sub" / "g.png")]
    assert main([cmd, "--checkpoint", str(trained), "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and "Traceback" not in err


def test_train_unwritable_run_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc = main(["train", "pix2pix", "--checkpoints_dir", str(blocker), "--max_steps", "1", "--no_progress",
               "--tensorboard", "off", "--batch_size", "2", "--ngf", "4", "--ndf", "4"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "cannot use run folder" in err and "Traceback" not in err
