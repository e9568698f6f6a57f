"""Bad command-line input of evaluate / profile / bench / export / sample: one clear error line
naming the option and what is expected (exit code 2), said before the long work; output folders
that are missing are created."""
import json
import os

import pytest

from ganengine.cli import main
from tests._train_utils import TINY_FLAGS, one_thread, cli_error  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
FEATURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "feature_extractor.py")
EXTRACTOR = f"{FEATURES}:SmallFeatureExtractor"


def _train(model, root, flags):
    """A one-step run of ``model`` with tiny networks (its folder)."""
    import torch

    argv = (["train", model] + flags.split() + ["--checkpoints_dir", str(root), "--name", model, "--max_steps", "1",
            "--sample_every", "0", "--no_progress", "--tensorboard", "off"])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(before)
    return str(root / model)


@pytest.fixture(scope="module")
def cyclegan_run(tmp_path_factory):
    return _train("cyclegan", tmp_path_factory.mktemp("ck"), TINY_FLAGS["cyclegan"])


@pytest.fixture(scope="module")
def dcgan_run(tmp_path_factory):
    return _train("dcgan", tmp_path_factory.mktemp("ck"), "--ngf 4 --ndf 4 --batch_size 2")


_error = cli_error  # (tests/_train_utils.py)


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("")
    return path


# ----------------------------------------------------------------------------- 1. evaluate --output
def test_evaluate_output_missing_folder_is_created(cyclegan_run, tmp_path, capsys):
    out = tmp_path / "missing" / "dir" / "r.json"
    assert main(["evaluate", "--checkpoint", cyclegan_run, "--metrics", "fid", "--feature_extractor", EXTRACTOR,
                 "--max_images", "2", "--output", str(out)]) == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["images"] == 2


@pytest.mark.parametrize("metrics", ["fid,intra_fid", "fid", "l1"])
def test_evaluate_missing_checkpoint_is_said_first(metrics, tmp_path, capsys):
    """A checkpoint that is not there: said before the metrics are checked against its kind (a
    synthesis metric was refused as not an image-to-image one; fid asked for Inception weights)."""
    cli_error(capsys, ["evaluate", "--checkpoint", str(tmp_path / "no" / "run.pt"), "--metrics", metrics],
              "--checkpoint", "does not exist")


def test_evaluate_synthesis_output_missing_folder_is_created(dcgan_run, tmp_path, capsys):
    out = tmp_path / "missing" / "r.json"
    assert main(["evaluate", "--checkpoint", dcgan_run, "--metrics", "fid", "--num_samples", "4", "--max_images",
                 "4", "--batch_size", "4", "--feature_extractor", EXTRACTOR, "--output", str(out)]) == 0, \
        capsys.readouterr().err
    assert json.loads(out.read_text())["model"] == "dcgan"


@pytest.mark.parametrize("run", ["cyclegan_run", "dcgan_run"])
def test_evaluate_output_folder_or_under_a_file(run, request, tmp_path, a_file, capsys, monkeypatch):
    import ganengine.metrics

    def never(*a, **k):
        raise AssertionError("the evaluation ran before --output was checked")

    monkeypatch.setattr(ganengine.metrics, "evaluate_generator", never)
    import ganengine.metrics.evaluate_synthesis as es

    monkeypatch.setattr(es, "evaluate_synthesis", never)
    ckpt = request.getfixturevalue(run)
    base = ["evaluate", "--checkpoint", ckpt, "--metrics", "fid", "--feature_extractor", EXTRACTOR]
    _error(capsys, base + ["--output", str(tmp_path)], "--output", "is a folder", "expected a file")
    _error(capsys, base + ["--output", str(a_file / "r.json")], "--output", "is a file, not a folder")


# ----------------------------------------------------------------------------- 2. profile / bench --output
def test_profile_output_under_a_file(a_file, capsys):
    _error(capsys, ["profile", "cyclegan", "--quick", "--steps", "1", "--warmup", "0", "--output",
                    str(a_file / "prof")], "--output", "is a file, not a folder")
    _error(capsys, ["profile", "cyclegan", "--quick", "--steps", "1", "--warmup", "0", "--output", str(a_file)],
           "--output", "is a file: expected a folder")


def test_bench_output_under_a_file(a_file, capsys):
    quick = ["bench", "--ops", "gan_loss", "--quick", "--no-compile", "--no-chart", "--runners", "eager",
             "--modes", "forward", "--no-memory"]
    _error(capsys, quick + ["--output", str(a_file / "bench")], "--output", "is a file, not a folder")
    _error(capsys, quick + ["--output", str(a_file)], "--output", "is a file: expected a folder")


# ----------------------------------------------------------------------------- 3. export
def test_export_image_size_into_a_missing_folder(cyclegan_run, tmp_path, capsys):
    out = tmp_path / "missing" / "dir" / "D.pt"
    rc = main(["export", "--checkpoint", cyclegan_run, "--format", "torchscript", "--network", "netD_A",
               "--image_size", "48", "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert out.is_file()


def test_export_errors_name_the_right_option(cyclegan_run, tmp_path, a_file, capsys):
    base = ["export", "--checkpoint", cyclegan_run, "--format", "torchscript", "--network", "netD_A"]
    # a size the network cannot take is still an --image_size error
    _error(capsys, base + ["--image_size", "8", "--output", str(tmp_path / "d8.pt")], "--image_size 8", "8x8")
    # output problems are --output errors, not --image_size ones
    line = _error(capsys, base + ["--image_size", "48", "--output", str(a_file / "D.pt")], "--output",
                  "is a file, not a folder")
    assert "--image_size" not in line
    _error(capsys, base + ["--image_size", "48", "--output", str(tmp_path)], "--output", "is a folder")


# ----------------------------------------------------------------------------- 4. sample --output
@pytest.mark.parametrize("name", ["grid", "grid.xyz"])
def test_sample_output_needs_an_image_extension(name, cyclegan_run, tmp_path, capsys):
    out = tmp_path / name
    _error(capsys, ["sample", "--checkpoint", cyclegan_run, "--output", str(out)], "--output", ".png", ".jpg")
    assert not os.listdir(tmp_path)


def test_sample_output_jpg_in_a_missing_folder(cyclegan_run, tmp_path, capsys):
    out = tmp_path / "missing" / "grid.jpg"
    assert main(["sample", "--checkpoint", cyclegan_run, "--n", "2", "--output", str(out)]) == 0, \
        capsys.readouterr().err
    assert out.is_file()


# ----------------------------------------------------------------------------- 5. options not named / accepted
def test_evaluate_counts_the_metrics_need(cyclegan_run, dcgan_run, capsys):
    fid = ["--metrics", "fid", "--feature_extractor", EXTRACTOR]
    _error(capsys, ["evaluate", "--checkpoint", cyclegan_run, "--max_images", "1"] + fid, "--max_images", ">= 2")
    for ckpt, extra in ((cyclegan_run, []), (dcgan_run, ["--num_samples", "4"])):
        _error(capsys, ["evaluate", "--checkpoint", ckpt, "--metrics", "kid", "--feature_extractor", EXTRACTOR,
                        "--kid_subset_size", "1", "--max_images", "4", *extra],
               "--kid_subset_size", ">= 2")


def test_evaluate_refuses_options_of_the_other_kind_of_checkpoint(cyclegan_run, dcgan_run, capsys):
    """The synthesis-only options on an image-to-image checkpoint, and --classifier on a synthesis
    checkpoint, were accepted and ignored: refused, naming them."""
    fid = ["--metrics", "fid", "--feature_extractor", EXTRACTOR]
    _error(capsys, ["evaluate", "--checkpoint", cyclegan_run, "--num_samples", "8", "--is_splits", "2"] + fid,
           "--num_samples, --is_splits", "synthesis checkpoints")
    _error(capsys, ["evaluate", "--checkpoint", cyclegan_run, "--pr_k", "2"] + fid, "--pr_k", "leave it out")
    _error(capsys, ["evaluate", "--checkpoint", dcgan_run, "--classifier", f"{FEATURES}:SmallFeatureExtractor",
                    "--num_samples", "4"] + fid, "--classifier", "image-to-image")


def test_inception_resize_with_a_feature_extractor_is_refused(cyclegan_run, capsys):
    """--inception_resize only sets the Inception network's resize: with --feature_extractor it was
    accepted and ignored."""
    _error(capsys, ["evaluate", "--checkpoint", cyclegan_run, "--metrics", "fid", "--feature_extractor", EXTRACTOR,
                    "--inception_resize", "tf1"], "--inception_resize", "--feature_extractor")
    from ganengine.train.evaluation import check_options

    with pytest.raises(ValueError, match="--inception_resize.*--feature_extractor"):
        check_options(dict(feature_extractor=EXTRACTOR, inception_resize="tf1"))
    with pytest.raises(ValueError, match="--inception_resize: expected 'pytorch-fid' or 'tf1'"):
        check_options(dict(inception_weights="w.pth", inception_resize="bilinear"))
    assert check_options(dict(feature_extractor=EXTRACTOR))["inception_resize"] is None


@pytest.mark.parametrize("spec", ["nomod:X", "nomod.sub:X", "nowhere.py:X", "noattr", f"{FEATURES}:Nope"])
def test_evaluate_feature_extractor_errors_name_the_option(spec, cyclegan_run, capsys):
    _error(capsys, ["evaluate", "--checkpoint", cyclegan_run, "--metrics", "fid", "--feature_extractor", spec],
           "--feature_extractor", "module:attr", "path/to/file.py:attr")


def test_evaluate_classifier_errors_name_the_option(cyclegan_run, capsys):
    _error(capsys, ["evaluate", "--checkpoint", cyclegan_run, "--metrics", "acc", "--classifier", "nomod:X"],
           "--classifier", "module:attr")


@pytest.mark.parametrize("argv, words", [
    (["--steps", "0"], ["--steps", ">= 1"]),
    (["--warmup", "-1"], ["--warmup", ">= 0"]),
])
def test_profile_counts(argv, words, tmp_path, capsys):
    _error(capsys, ["profile", "cyclegan", "--quick", "--output", str(tmp_path / "p")] + argv, *words)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("option", ["--repeats", "--threads"])
def test_bench_counts(option, tmp_path, capsys):
    _error(capsys, ["bench", "--ops", "gan_loss", "--quick", "--no-compile", "--no-chart", "--runners", "eager",
                    "--modes", "forward", "--no-memory", option, "0", "--output", str(tmp_path / "b")],
           option, ">= 1")
    assert not (tmp_path / "b").exists()


def test_sample_interpolate_on_a_translation_model_writes_nothing(cyclegan_run, tmp_path, capsys):
    _error(capsys, ["sample", "--checkpoint", cyclegan_run, "--interpolate", "3", "--output",
                    str(tmp_path / "g.png")], "--interpolate 3", "not a synthesis model")
    assert not os.listdir(tmp_path)


def test_sample_missing_phase_lists_the_phases(cyclegan_run, tmp_path, capsys):
    line = _error(capsys, ["sample", "--checkpoint", cyclegan_run, "--phase", "nosuch", "--output",
                           str(tmp_path / "g.png")], "--phase nosuch", "test, train")
    assert "not there any more" not in line


# ------------------------------------------------------------------ one image per generator call
# WGAN / WGAN-GP / cGAN generators batch-normalise 1-D features in training mode (as their
# references sample): one image has no batch statistics. Every option that would ask for one image
# per call is refused up front, naming itself (torch's "Expected more than 1 value per channel"
# came mid-run: after training steps, at the first grid or evaluation, with no checkpoint).
WGAN_FLAGS = "--latent_dim 4 --img_size 8 --batch_size 2"


@pytest.fixture(scope="module")
def wgan_run(tmp_path_factory):
    return _train("wgan", tmp_path_factory.mktemp("ck"), WGAN_FLAGS)


def test_sample_one_image_per_row_from_a_batch_norm_generator(wgan_run, tmp_path, capsys):
    _error(capsys, ["sample", "--checkpoint", wgan_run, "--n", "1", "--output", str(tmp_path / "g.png")],
           "--n must be >= 2 for wgan, got 1", "BatchNorm1d")
    assert not (tmp_path / "g.png").exists()
    assert main(["sample", "--checkpoint", wgan_run, "--n", "2", "--output", str(tmp_path / "g.png")]) == 0


@pytest.mark.parametrize("flags, words", [
    ("--num_samples 1 --sample_every 1", ("--num_samples (images per sample grid row) must be >= 2 for wgan",)),
    (f"--eval_every 1 --eval_batch_size 1 --eval_num_samples 4 --feature_extractor {EXTRACTOR}",
     ("--eval_batch_size must be >= 2 for wgan",)),
])
def test_train_options_asking_one_image_per_call_are_refused_up_front(flags, words, tmp_path, capsys):
    argv = (["train", "wgan"] + WGAN_FLAGS.split() + flags.split() + ["--checkpoints_dir", str(tmp_path), "--name", "w",
            "--max_steps", "2", "--no_progress", "--tensorboard", "off"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words) and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "w" / "step_00000001.pt")


def test_evaluate_batch_of_one_from_a_batch_norm_generator(wgan_run, capsys):
    _error(capsys, ["evaluate", "--checkpoint", wgan_run, "--metrics", "fid", "--num_samples", "4", "--batch_size", "1",
                    "--feature_extractor", EXTRACTOR], "--batch_size must be >= 2 for wgan")


def test_evaluate_intra_fid_on_an_unconditional_model_says_so_first(dcgan_run, capsys):
    """(the real side's per-class check came first and asked for more --max_images)"""
    _error(capsys, ["evaluate", "--checkpoint", dcgan_run, "--metrics", "fid,intra_fid", "--num_samples", "20",
                    "--max_images", "20", "--feature_extractor", EXTRACTOR],
           "intra_fid is for class-conditional models; dcgan is unconditional")


def test_neighbour_metrics_counts_name_the_options(dcgan_run, capsys):
    """pr / dc with k or more samples in a set failed inside the metric ("precision_recall: k=3 needs
    more than k samples"), naming none of the options that set the counts."""
    fid = ["--feature_extractor", EXTRACTOR]
    _error(capsys, ["evaluate", "--checkpoint", dcgan_run, "--metrics", "pr", "--num_samples", "3"] + fid,
           "pr (--pr_k 3)", "--num_samples", "--pr_k")
    _error(capsys, ["evaluate", "--checkpoint", dcgan_run, "--metrics", "dc", "--num_samples", "8",
                    "--max_images", "4"] + fid, "dc (--dc_k 5)", "real images", "--max_images")
    from ganengine.train.evaluation import check_options

    with pytest.raises(ValueError, match=r"pr \(k = 3\).*--eval_num_samples"):
        check_options(dict(metrics="pr", num_samples=3, feature_extractor=EXTRACTOR, best_metric="precision"))
    with pytest.raises(ValueError, match=r"dc \(k = 5\).*real images.*--eval_max_real"):
        check_options(dict(metrics="dc", max_real=5, feature_extractor=EXTRACTOR, best_metric="coverage"))
