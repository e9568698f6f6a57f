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


@pytest.fixture
def backend_restored():
    """`ganengine train --backend X` in this process sets the backend process-wide (as the CLI's own
    process wants): put the setting back for the tests that run after."""
    from ganengine import backends

    saved = (list(backends._requested._entries), backends._requested.value)
    yield
    backends._requested._entries, backends._requested.value = saved


def _train(tmp_path, extra):
    argv = (["train", "dcgan"] + TINY_FLAGS.get("dcgan", "").split() + ["--checkpoints_dir", str(tmp_path), "--name",
            "run", "--max_steps", "1", "--no_progress", "--tensorboard", "off", "--device", "cpu"] + extra)
    return main(argv)


def test_backend_that_cannot_serve_is_said_at_start(tmp_path, capsys, backend_restored):
    # (the cuda backend never serves CPU tensors; --device cpu)
    assert _train(tmp_path, ["--backend", "cuda"]) == 0
    err = capsys.readouterr().err
    assert "--backend cuda cannot serve cpu tensors here" in err and "fall back to the torch backend" in err


def test_backend_that_serves_says_nothing(tmp_path, capsys, backend_restored):
    assert _train(tmp_path, ["--backend", "cpu"]) == 0
    assert "cannot serve" not in capsys.readouterr().err


@pytest.mark.parametrize("command", [["train", "dcgan"], ["sample", "--checkpoint", "x.pt"]])
def test_seed_out_of_torch_range_names_the_option(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main(command + ["--seed", "99999999999999999999"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --seed" in err and "2**64 - 1" in err and "Overflow" not in err


def test_evaluate_names_a_missing_dataroot_first(tmp_path, capsys):
    ck = tmp_path / "ck.pt"
    ck.write_bytes(b"not read: --dataroot is checked first")
    code = main(["evaluate", "--checkpoint", str(ck), "--dataroot", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 2 and "--dataroot" in err and "does not exist" in err and "Inception" not in err


def test_resume_with_nothing_to_train_names_no_unwritten_log(tmp_path, capsys):
    assert _train(tmp_path, ["--save_every", "1"]) == 0
    ck = tmp_path / "run" / "step_00000001.pt"
    capsys.readouterr()
    for f in ("loss_log.csv",):
        (tmp_path / "run" / f).unlink(missing_ok=True)
    assert _train(tmp_path, ["--resume", str(ck)]) == 0
    err = capsys.readouterr().err
    assert "nothing to train" in err and "loss log:   none written" in err


def test_reference_checkpoint_errors_say_what_the_file_holds(tmp_path):
    import torch

    from ganengine.models.checkpoints import load_reference_checkpoint

    text = tmp_path / "notes.txt"
    text.write_text("hello world\n")
    with pytest.raises(ValueError, match="not a file torch.save wrote"):
        load_reference_checkpoint(str(text), "dcgan_G")
    with pytest.raises(ValueError, match=r"state dicts under \['G', 'D'\]: pass one of them"):
        load_reference_checkpoint({"G": {"w": torch.zeros(1)}, "D": {"w": torch.zeros(1)}}, "dcgan_G")
    with pytest.raises(ValueError, match="entry 'step' is not a tensor but a int"):
        load_reference_checkpoint({"w": torch.zeros(1), "step": 3}, "dcgan_G")


@pytest.mark.parametrize("value", ["no", "False", None, 1])
def test_attention_flag_is_a_bool_as_eager_flags_are(value):
    import torch

    import ganengine.functional as GF
    import ganengine.nn as gnn

    m = gnn.SelfAttention2d(16)
    x = torch.randn(1, 16, 4, 4)
    with pytest.raises(TypeError, match="return_attention must be a bool"):
        m(x, return_attention=value) if value is not None else gnn.SelfAttention2d(16, return_attention="x")
    with pytest.raises(TypeError, match="self_attention2d: return_attention must be a bool"):
        GF.self_attention2d(x, m.query_conv.weight, None, m.key_conv.weight, None, m.value_conv.weight, None, m.gamma,
                            return_attention=value if value is not None else "x")
    assert isinstance(m(x, return_attention=__import__("numpy").bool_(True)), tuple)


@pytest.mark.parametrize("model,option,sample", [("sagan", "--g_conv_dim", "16"), ("icgan", "--sample_every", "100"),
                                                 ("pix2pix", "--netG", "unet_128"), ("biggan", "--D_lr", "0.0004")])
def test_help_names_the_sample_data_value_beside_the_reference_default(model, option, sample, capsys):
    with pytest.raises(SystemExit):
        main(["train", model, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    after = text.split(f"{option} {option.lstrip('-').upper()} ", 1)[1]
    assert f"sample data: {sample})" in after.split(" --", 1)[0]
