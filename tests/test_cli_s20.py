"""`ganengine train`: a model that cannot be imported says why (not "unrecognized arguments"), and a
--backend that cannot serve this run's device says so at the start (the fused ops fall back)."""
import pytest

from ganengine.cli import main
from tests._train_utils import TINY_FLAGS, one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_unimportable_model_names_the_import_error(monkeypatch, capsys):
    from ganengine import models

    class Missing(dict):
        def __getitem__(self, name):
            if name == "pix2pix":
                raise ImportError("cannot import name 'Pix2Pix' (simulated partial install)")
            return super().__getitem__(name)

    monkeypatch.setattr(models, "MODELS", Missing(models.MODELS))
    code = main(["train", "pix2pix", "--ngf", "4", "--ndf", "4", "--netG", "unet_32"])
    err = capsys.readouterr().err
    assert code == 1
    assert "unrecognized arguments" not in err
    assert "pix2pix" in err and "cannot be imported" in err and "simulated partial install" in err


def _train(tmp_path, extra):
    argv = (["train", "dcgan"] + TINY_FLAGS.get("dcgan", "").split() + ["--checkpoints_dir", str(tmp_path), "--name",
            "run", "--max_steps", "1", "--no_progress", "--tensorboard", "off", "--device", "cpu"] + extra)
    return main(argv)


def test_backend_that_cannot_serve_is_said_at_start(tmp_path, capsys):
    # (the cuda backend never serves CPU tensors; --device cpu)
    assert _train(tmp_path, ["--backend", "cuda"]) == 0
    err = capsys.readouterr().err
    assert "--backend cuda cannot serve cpu tensors here" in err and "fall back to the torch backend" in err


def test_backend_that_serves_says_nothing(tmp_path, capsys):
    assert _train(tmp_path, ["--backend", "cpu"]) == 0
    assert "cannot serve" not in capsys.readouterr().err
