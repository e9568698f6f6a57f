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


_FEATURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "feature_extractor.py")


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
    assert sorted(os.listdir(run / ckpt.ABANDONED)) == ["loss_log.csv", "step_00000004.pt", "step_00000006.pt"]
    assert ckpt.latest(str(run)).endswith("step_00000003.pt")


def test_resume_from_older_checkpoint_sets_newer_aside_at_once(trained, tmp_path, one_thread):
    # issue: the newer checkpoints were moved only at the first save (with --save_every 3 the
    # abandoned step 6 stayed the folder's newest, then was overwritten by the new step 6)
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    trainer = Trainer(tiny_config("pix2pix", run, max_steps=6, save_every=3, resume=str(run / "step_00000002.pt")))
    try:
        assert _steps(run) == [2]
        assert sorted(os.listdir(run / ckpt.ABANDONED)) == ["loss_log.csv", "step_00000004.pt", "step_00000006.pt"]
    finally:
        trainer._release_lock()


def test_resume_from_older_checkpoint_sets_the_branchs_other_files_aside(trained, tmp_path, one_thread):
    """The abandoned branch's sample grids stayed beside the new branch's, its best.pt / best.json
    (a step the run no longer has) stayed the folder's best, and its log rows were deleted."""
    import csv
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "samples").mkdir(exist_ok=True)
    for s in (2, 4, 6):
        (run / "samples" / f"step_{s:08d}.png").write_bytes(b"png")
    (run / "best.pt").write_bytes(b"best")
    (run / "best.json").write_text(json.dumps({"step": 4, "checkpoint": str(run / "best.pt")}))
    with open(run / "loss_log.csv") as f:
        rows_before = list(csv.reader(f))
    trainer = Trainer(tiny_config("pix2pix", run, max_steps=6, save_every=3, resume=str(run / "step_00000002.pt")))
    trainer._release_lock()
    gone = run / ckpt.ABANDONED
    assert sorted(os.listdir(run / "samples")) == ["step_00000002.png"]
    assert sorted(os.listdir(gone / "samples")) == ["step_00000004.png", "step_00000006.png"]
    assert not (run / "best.pt").exists() and (gone / "best.pt").read_bytes() == b"best"
    assert json.loads((gone / "best.json").read_text())["checkpoint"] == str(gone / "best.pt")
    with open(gone / "loss_log.csv") as f:
        assert list(csv.reader(f)) == rows_before


def test_resume_from_another_folder_keeps_this_folders_run_whole(trained, tmp_path, one_thread):
    # issue: resuming from another folder's checkpoint set this folder's newer checkpoints aside as an
    # abandoned branch (their run is not the one continued: the whole earlier run moves to previous/)
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    trainer = Trainer(tiny_config("pix2pix", run, max_steps=6, resume=str(trained / "step_00000002.pt")))
    try:
        assert not (run / ckpt.ABANDONED).exists()
        assert {"step_00000002.pt", "step_00000004.pt", "step_00000006.pt"} <= set(os.listdir(run / "previous" / "1"))
    finally:
        trainer._release_lock()


def test_sample_grids_leave_the_networks_state_alone(tmp_path, one_thread):
    # issue: a grid ran G in train mode: batch-norm statistics moved with --sample_every, so a run
    # extended with --resume (its end-of-run grid) differed from an uninterrupted one
    opts = dict(norm="batch")
    a = tiny_config("pix2pix", tmp_path / "a", max_steps=3, sample_every=1)
    b = tiny_config("pix2pix", tmp_path / "b", max_steps=3, sample_every=0)
    for cfg in (a, b):
        cfg.model_options.update(opts)
        train(cfg)
    sa, sb = (torch.load(ckpt.latest(str(tmp_path / n)), weights_only=True) for n in ("a", "b"))
    assert any("running_mean" in k for k in sa["networks"]["netG"])
    assert _same_state(sa["networks"], sb["networks"])


@pytest.mark.parametrize("what", ["sample_every", "eval_every"])
def test_sagan_grids_and_evaluation_leave_its_spectral_norm_vectors_alone(what, tmp_path, one_thread):
    """SAGAN's reference SpectralNorm keeps u / v as Parameters (and set_requires_grad(G, True)
    turns their requires_grad on): the grid and the evaluation restored the buffers only, so
    --sample_every / --eval_every changed the training (u off by 0.1 after 2 steps) and --resume
    differed from an uninterrupted run by the end-of-run grid (session 15)."""
    from ganengine.train import TrainConfig

    states = []
    for n, every in (("a", 1), ("b", 0)):
        extra = {what: every}
        if what == "eval_every" and every:
            extra["eval_options"] = dict(metrics="fid", num_samples=8, batch_size=8, max_real=16,
                                         feature_extractor=f"{_FEATURES}:SmallFeatureExtractor")
        cfg = TrainConfig(model="sagan", model_options=dict(g_conv_dim=8, d_conv_dim=8, z_dim=8), data_options={},
                          run_dir=str(tmp_path / n), batch_size=4, max_steps=2, save_every=0, print_freq=1,
                          progress=False, tensorboard="off", seed=5, deterministic=True,
                          **({"sample_every": 0} if what == "eval_every" else {}), **extra)
        train(cfg)
        states.append(torch.load(ckpt.latest(str(tmp_path / n)), weights_only=True)["networks"])
    assert any(k.endswith("weight_u") for k in states[0]["G"])
    assert _same_state(*states)


def test_epoch_count_past_the_schedule_refused_with_max_steps(tmp_path):
    # issue: with --max_steps the run trained at learning rate 0 from the first step
    cfg = tiny_config("pix2pix", tmp_path / "r", max_steps=3, n_epochs=1, n_epochs_decay=1)
    cfg.model_options["epoch_count"] = 3
    with pytest.raises(ValueError, match="--epoch_count 3 is past the last epoch"):
        Trainer(cfg)


def _same_state(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_ctrl_c_inside_a_step_saves_the_whole_step(tmp_path, one_thread, monkeypatch):
    """SIGINT between D's and G's optimiser steps: the step finishes and is saved whole (it had
    saved D's half-done step under the previous step's number); a second signal stops at once."""
    from ganengine.train import context

    train(tiny_config("cyclegan", tmp_path / "a", max_steps=4, save_every=1))
    real = context.AmpContext.step
    kills = {"n": 1}

    def step(self, optimizer, name):
        if name == "D" and self.step_index == 2:
            for _ in range(kills["n"]):
                os.kill(os.getpid(), signal.SIGINT)
        return real(self, optimizer, name)

    monkeypatch.setattr(context.AmpContext, "step", step)
    trainer = Trainer(tiny_config("cyclegan", tmp_path / "b", max_steps=4, save_every=1))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.close()
    assert trainer.interrupted_checkpoint.endswith("step_00000003.pt")
    a = torch.load(tmp_path / "a" / "step_00000003.pt", weights_only=True)
    b = torch.load(trainer.interrupted_checkpoint, weights_only=True)
    for key in ("networks", "optimizers", "schedulers", "step", "epoch"):
        assert _same_state(a[key], b[key]), key
    kills["n"] = 2  # Ctrl-C twice: out at once, nothing saved over the last whole step
    trainer = Trainer(tiny_config("cyclegan", tmp_path / "c", max_steps=4, save_every=1))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.close()
    assert trainer.interrupted_checkpoint is None and _steps(tmp_path / "c") == [1, 2]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


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


def test_shared_log_dir_is_locked_too(tmp_path, one_thread):
    # two runs (other run folders) writing one --log_dir: the second would move the first's live
    # logs to previous/K, so it is refused while the first runs
    logs = tmp_path / "logs"
    first = Trainer(tiny_config("pix2pix", tmp_path / "run1", log_dir=str(logs)))
    if ckpt.fcntl is not None:
        with pytest.raises(ckpt.CheckpointError, match=r"--log_dir folder .* in use by another ganengine train.*"
                                                       r"Use another --log_dir"):
            Trainer(tiny_config("pix2pix", tmp_path / "run2", log_dir=str(logs)))
    first.train()
    assert (logs / "loss_log.csv").exists()
    assert not (logs / "previous").exists()  # the first run's logs stayed where its writer is
    first.close()
    Trainer(tiny_config("pix2pix", tmp_path / "run2", log_dir=str(logs))).close()  # free again


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


# ----------------------------------------------------------------------------- acceptance-test defects
def test_translate_on_a_synthesis_checkpoint_says_use_sample(tmp_path, capsys, one_thread):
    # issue: KeyError: 'image' from models/synthesis.py (BigGAN and IC-GAN the same)
    assert main(["train", "dcgan", "--nc", "1", "--ngf", "4", "--ndf", "4", "--batch_size", "2", "--max_steps", "1",
                 "--checkpoints_dir", str(tmp_path), "--name", "d", "--no_progress", "--tensorboard", "off"]) == 0
    _png(str(tmp_path / "in" / "a.png"))
    capsys.readouterr()
    rc = main(["translate", "--checkpoint", str(tmp_path / "d"), "--input", str(tmp_path / "in" / "a.png"),
               "--output", str(tmp_path / "out" / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "holds a dcgan model" in err and "translate is for pix2pix, CycleGAN" in err and "ganengine sample" in err
    assert not (tmp_path / "out").exists()  # refused before the output folder was made


def test_synthesis_translate_without_inputs_is_a_clear_error():
    from ganengine.models import build_model

    model = build_model("dcgan", ngf=4, ndf=4)
    with pytest.raises(ValueError, match=r"generates images from noise: translate\(batch\) takes batch\['z'\]"):
        model.translate({"A": torch.zeros(1, 3, 64, 64)})
    assert model.translate({"z": torch.zeros(2, model.latent_dim())}).shape == (2, 3, 64, 64)


@pytest.mark.parametrize("argv,msg", [
    (["--reverse"], "--reverse translates B -> A with a CycleGAN's netG_B; this checkpoint holds a pix2pix"),
    (["--target_attrs", "Young"], "--target_attrs is for StarGAN"),
])
def test_translate_options_of_other_models(trained, tmp_path, capsys, argv, msg):
    _png(str(tmp_path / "in" / "x.png"))
    rc = main(["translate", "--checkpoint", str(trained), "--input", str(tmp_path / "in"), "--output",
               str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and "Traceback" not in err


def test_translate_missing_input_names_input_not_dataroot(trained, tmp_path, capsys):
    # issue: "... or leave --dataroot out to train on the built-in sample data"
    rc = main(["translate", "--checkpoint", str(trained), "--input", str(tmp_path / "missing.png"), "--output",
               str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and f"--input {str(tmp_path / 'missing.png')!r} does not exist" in err
    assert "--dataroot" not in err and "train" not in err
    (tmp_path / "empty").mkdir()
    rc = main(["translate", "--checkpoint", str(trained), "--input", str(tmp_path / "empty"), "--output",
               str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "contains no images" in err and "--dataroot" not in err


def test_sample_and_evaluate_bad_dataroot_wording(trained, tmp_path, capsys):
    bad = str(tmp_path / "bad")
    assert main(["sample", "--checkpoint", str(trained), "--dataroot", bad, "--output", str(tmp_path / "g.png"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "leave --dataroot out to draw from the data the model was trained on" in err
    assert "to train on the built-in" not in err
    assert main(["evaluate", "--checkpoint", str(trained), "--dataroot", bad, "--metrics", "l1", "--device",
                 "cpu"]) == 2
    err = capsys.readouterr().err
    assert "leave --dataroot out to evaluate on the data the model was trained on" in err
    assert "to train on the built-in" not in err


@pytest.mark.parametrize("option", ["--max_images", "--kid_subsets"])
def test_evaluate_zero_counts_name_the_option(trained, capsys, option):
    # issue: --max_images 0 said "the loader produced no images"
    assert main(["evaluate", "--checkpoint", str(trained), "--metrics", "l1", "--device", "cpu", option, "0"]) == 2
    err = capsys.readouterr().err
    assert f"{option} must be at least 1" in err and "loader produced no images" not in err


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoints_get_the_umask_permissions(tmp_path, umask):
    # issue: mkstemp made every checkpoint 0600 while logs and samples were 0644
    old = os.umask(umask)
    try:
        path = ckpt.write({"format": ckpt.FORMAT, "x": torch.ones(2)}, str(tmp_path / "step_00000001.pt"))
        from ganengine.train.evaluation import write_atomic_json

        write_atomic_json({"metric": "fid"}, str(tmp_path / "best.json"))  # (best.json, beside best.pt)
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("as open() makes it")
    finally:
        os.umask(old)
    for p in (path, tmp_path / "best.json"):
        assert os.stat(p).st_mode & 0o777 == 0o666 & ~umask == os.stat(tmp_path / "plain.txt").st_mode & 0o777
    assert sorted(os.listdir(tmp_path)) == ["best.json", "plain.txt", "step_00000001.pt"]  # no temporary left
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))


def _log_steps(path):
    import csv

    with open(path) as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def test_fresh_run_in_a_used_folder_keeps_the_earlier_run(tmp_path, capsys, one_thread):
    # issue: "checkpoint(s) ... belong to an abandoned run (training resumed from an older one)" though
    # nothing was resumed, and the earlier run's loss_log.csv was deleted
    run = tmp_path / "run"
    train(tiny_config("pix2pix", run, max_steps=4, save_every=2, sample_every=2))
    capsys.readouterr()
    train(tiny_config("pix2pix", run, max_steps=2, save_every=1))
    err = capsys.readouterr().err
    assert "abandoned" not in err and "resumed" not in err
    assert "held an earlier run's files (checkpoints up to step 4" in err and "--resume" in err
    prev = run / ckpt.PREVIOUS / "1"
    assert _steps(prev) == [2, 4] and _log_steps(prev / "loss_log.csv") == [1, 2, 3, 4]
    assert sorted(os.listdir(prev / "samples")) == ["step_00000002.png", "step_00000004.png"]
    assert _steps(run) == [1, 2] and _log_steps(run / "loss_log.csv") == [1, 2]
    assert not (run / ckpt.ABANDONED).exists() and not (run / "samples").exists()
    # that earlier run can still be continued (into its own folder's successor: this run moves aside)
    train(tiny_config("pix2pix", run, max_steps=5, resume=str(prev)))
    assert capsys.readouterr().err.count("previous/2") >= 1
    assert _steps(run) == [5] and _steps(run / ckpt.PREVIOUS / "2") == [1, 2]
    assert _log_steps(run / "loss_log.csv") == [5]


def test_resume_in_the_folder_moves_nothing(trained, tmp_path, capsys, one_thread):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    train(tiny_config("pix2pix", run, max_steps=7, resume="latest"))
    assert "earlier run" not in capsys.readouterr().err
    assert not (run / "previous").exists() and _steps(run) == [4, 6, 7]  # (--keep_checkpoints 3)


def test_a_trainer_that_fails_while_built_leaves_the_earlier_run_in_place(tmp_path, monkeypatch, one_thread):
    """The earlier run is set aside as the last thing before the new run writes its own files: a
    failure while the trainer is built (here its sample batch) leaves the folder as it was."""
    from ganengine.train import Trainer, train
    from tests._train_utils import tiny_config

    train(tiny_config("pix2pix", tmp_path / "run", max_steps=2, save_every=1))
    before = sorted(os.listdir(tmp_path / "run"))

    def boom(self):
        raise RuntimeError("sample batch failed")

    monkeypatch.setattr(Trainer, "_sample_batch", boom)
    with pytest.raises(RuntimeError, match="sample batch failed"):
        Trainer(tiny_config("pix2pix", tmp_path / "run", max_steps=2))
    after = sorted(n for n in os.listdir(tmp_path / "run") if n != ".lock")
    assert after == [n for n in before if n != ".lock"] and "previous" not in after


def test_best_json_set_aside_names_the_moved_best_pt(tmp_path):
    """best.json names its best.pt; moved to previous/K together, it names the moved one."""
    import json

    run = tmp_path / "run"
    state = {"format": ckpt.FORMAT, "x": torch.ones(1)}
    ckpt.write(state, str(run / "step_00000002.pt"))
    best = ckpt.write(state, str(run / "best.pt"))
    (run / "best.json").write_text(json.dumps({"step": 2, "metric": "fid", "checkpoint": best}))
    assert "previous" in ckpt.set_aside_previous_run(str(run))
    moved = json.loads((run / ckpt.PREVIOUS / "1" / "best.json").read_text())
    assert moved["checkpoint"] == str(run / ckpt.PREVIOUS / "1" / "best.pt") and os.path.isfile(moved["checkpoint"])
    assert moved["step"] == 2 and sorted(os.listdir(run)) == [ckpt.PREVIOUS]


def test_batch_norm_on_one_value_per_channel_is_explained():
    # pix2pix's reference batch of one with a crop the U-Net reduces to 1x1: torch's batch-norm
    # message named no option
    from ganengine.train.engine import _explain

    exc = ValueError("Expected more than 1 value per channel when training, got input size [1, 32, 1, 1]")
    out = _explain(exc, True, (1, 3, 128, 128))
    assert isinstance(out, ValueError) and "cannot take 128x128 inputs at --batch_size 1" in str(out)
    assert "--crop_size" in str(out) and "larger --batch_size" in str(out)
    assert _explain(exc, False, (1, 3, 128, 128)) is exc  # (later steps: as it is)


def test_serial_batches_reads_the_data_in_order(tmp_path, one_thread):
    # the reference's DataLoader(shuffle=not serial_batches): A (and B) in file order
    cfg = tiny_config("cyclegan", tmp_path / "run")
    cfg.data_options["serial_batches"] = True
    trainer = Trainer(cfg)
    try:
        assert trainer.sampler.shuffle is False
        first = next(iter(trainer.loader))
        paths = sorted(trainer.dataset.A.paths)
        assert list(first["A_paths"]) == paths[:len(first["A_paths"])]
    finally:
        trainer.close()


def test_resume_with_another_batch_size_sees_no_image_twice(tmp_path, one_thread, capsys):
    """The position in the epoch is converted from images done (it was taken as a count of batches
    of the new size: images fed twice, or skipped)."""
    run = tmp_path / "run"
    train(tiny_config("pix2pix", run, max_steps=2, save_every=1, batch_size=2))  # 4 images done
    trainer = Trainer(tiny_config("pix2pix", run, max_steps=4, batch_size=1, resume="latest"))
    try:
        assert trainer.batch_in_epoch == 4 and trainer.epoch == 0
        assert "4 images of epoch 0 were done; continuing at batch 4 of epoch 0" in capsys.readouterr().err
        first = trainer.sampler
        first.set_epoch(0, 0)
        order = [i for i, _ in first]  # the epoch's order at batch size 1
        first.set_epoch(0, trainer.batch_in_epoch)
        rest = [i for i, _ in first]
        assert rest == order[4:]  # the first run's 4 images (2 batches of 2) are not fed again
    finally:
        trainer.close()
    trainer = Trainer(tiny_config("pix2pix", run, max_steps=4, batch_size=3, resume="latest"))
    try:  # 4 done, batches of 3: continue at batch 2 (images 6..), 2 skipped, none twice
        assert trainer.batch_in_epoch == 2
        # (and another --max_steps than the run's: pix2pix's schedule runs over epochs, not the run's
        # length, so no rate changes and nothing is said about it)
        assert "learning-rate schedules follow" not in capsys.readouterr().err
    finally:
        trainer.close()


def test_ctrl_c_in_the_last_step_and_an_ignored_sigint(tmp_path, one_thread):
    """A signal in the last step still ends as an interrupt (exit 130/143 on the command line),
    the last step saved; a process that ignores SIGINT (a background job) keeps ignoring it."""
    def run(folder, at, ignore=False):
        trainer = Trainer(tiny_config("cyclegan", folder, max_steps=3))
        real_step = trainer.model.train_step

        def step(batch, optimizers, ctx):
            if ctx.step_index == at:
                os.kill(os.getpid(), signal.SIGINT)
            return real_step(batch, optimizers, ctx)

        trainer.model.train_step = step
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if ignore else None
        try:
            return trainer, trainer.train()
        finally:
            if ignore:
                signal.signal(signal.SIGINT, previous)
            trainer.close()

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "last", 2)
    assert _steps(tmp_path / "last") == [3]
    trainer, result = run(tmp_path / "ignored", 1, ignore=True)
    assert result["step"] == 3 and trainer.interrupted_checkpoint is None


def test_resume_says_which_data_options_changed(tmp_path, one_thread, capsys):
    run = tmp_path / "run"
    train(tiny_config("pix2pix", run, max_steps=1, save_every=1))
    cfg = tiny_config("pix2pix", run, max_steps=2, resume="latest")
    cfg.data_options["no_flip"] = True
    Trainer(cfg).close()
    assert "data options that differ from the run's: no_flip None (now True)" in capsys.readouterr().err


def test_resume_with_another_batch_size_keeps_the_epoch_schedule(tmp_path, one_thread):
    """The epoch schedules' rates and the run's length follow epochs: resumed with another
    --batch_size (or process count: the same steps-per-epoch change) the rates were those of another
    epoch (step // the new steps per epoch) and the run trained extra epochs."""
    run = tmp_path / "run"
    cfg = tiny_config("pix2pix", run, max_steps=None, n_epochs=1, n_epochs_decay=2, save_every=1, batch_size=2)
    cfg.data_options["max_dataset_size"] = 4   # 2 steps per epoch at batch 2, 3 epochs
    train(cfg)
    lr_at = {s: torch.load(p, weights_only=True)["optimizers"]["G"]["param_groups"][0]["lr"]
             for s, p in ckpt.list_checkpoints(str(run))}
    assert max(lr_at) == 6
    cfg2 = tiny_config("pix2pix", run, max_steps=None, n_epochs=1, n_epochs_decay=2, batch_size=1,
                       resume=str(run / "step_00000004.pt"))
    cfg2.data_options["max_dataset_size"] = 4
    trainer = Trainer(cfg2)   # epoch 2 of 3 left, 4 steps per epoch at batch 1
    try:
        assert trainer.epoch == 2 and trainer.total_steps == 4 + 4
        assert trainer.optimizers["G"].param_groups[0]["lr"] == pytest.approx(lr_at[4])
    finally:
        trainer.close()


def _weights(run, step):
    return ckpt.load(str(run / f"step_{step:08d}.pt"))["networks"]


def test_resume_with_nothing_to_train_leaves_the_checkpoint_alone(trained, tmp_path, one_thread):
    """A resume already at its last step saved its converted position (another --batch_size) over
    the checkpoint it resumed from: a later resume with the run's own options no longer continued it."""
    import hashlib
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    digest = hashlib.sha256((run / "step_00000006.pt").read_bytes()).hexdigest()
    result = train(tiny_config("pix2pix", run, max_steps=6, batch_size=1, resume="latest"))
    assert result["steps_trained"] == 0 and result["checkpoint"] == str(run / "step_00000006.pt")
    assert hashlib.sha256((run / "step_00000006.pt").read_bytes()).hexdigest() == digest
    assert _steps(run) == [2, 4, 6] and not (run / ckpt.ABANDONED).exists()


def test_resume_keeps_the_runs_seed(tmp_path, one_thread):
    """A resume without --seed used seed 0 for the data order, while the saved position referred to
    the run's --seed order: images fed twice or never. It keeps the run's seed now; another is refused."""
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    train(tiny_config("pix2pix", straight, max_steps=4, save_every=4, seed=3, deterministic=True))
    train(tiny_config("pix2pix", parted, max_steps=2, save_every=2, seed=3, deterministic=True))
    with pytest.raises(ckpt.CheckpointError, match="--seed 3"):
        Trainer(tiny_config("pix2pix", parted, max_steps=4, save_every=4, seed=5, resume="latest"))
    train(tiny_config("pix2pix", parted, max_steps=4, save_every=4, seed=None, resume="latest", deterministic=True))
    a, b = _weights(straight, 4), _weights(parted, 4)
    for net in a:
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    assert ckpt.load(str(parted / "step_00000004.pt"))["seed"] == 3


def test_first_log_row_after_a_resume_averages_the_same_steps(tmp_path, one_thread):
    """The losses summed since the last log row were not checkpointed: a run resumed between rows
    (a Ctrl-C checkpoint) logged only the steps after the resume in its first row."""
    import csv

    import shutil

    straight, parted = tmp_path / "straight", tmp_path / "parted"
    train(tiny_config("pix2pix", straight, max_steps=4, print_freq=4, save_every=3, deterministic=True))
    shutil.copytree(straight, parted)
    # (step 3's checkpoint holds steps 1-3's sums, as a Ctrl-C checkpoint between rows would)
    train(tiny_config("pix2pix", parted, max_steps=4, print_freq=4, resume=str(parted / "step_00000003.pt"),
                      deterministic=True))

    def rows(run):
        with open(run / "loss_log.csv") as f:
            return [r for r in csv.DictReader(f)]

    want, got = rows(straight), rows(parted)
    assert [r["step"] for r in want] == ["4"]
    # (images_per_s is a timing; every loss column is the same average)
    assert [{k: v for k, v in r.items() if k != "images_per_s"} for r in got] == \
        [{k: v for k, v in r.items() if k != "images_per_s"} for r in want]


def test_second_abandoned_branch_best_json_names_its_own_best(trained, tmp_path, one_thread):
    """best.pt renamed best.1.pt in abandoned/ (a second branch) was named as abandoned/best.pt, the
    first branch's, by its best.json."""
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    gone = run / ckpt.ABANDONED
    for tag in ("first", "second"):
        (run / "best.pt").write_text(tag)
        (run / "best.json").write_text(json.dumps({"step": 6, "checkpoint": str(run / "best.pt")}))
        if tag == "second":
            shutil.copy2(gone / "step_00000004.pt", run / "step_00000004.pt")
        ckpt.set_aside_newer(str(run), 2, str(run))
    info = json.loads((gone / "best.1.json").read_text())
    assert info["checkpoint"] == str(gone / "best.1.pt") and (gone / "best.1.pt").read_text() == "second"
