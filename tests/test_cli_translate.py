"""`ganengine translate` and `ganengine sample` (acceptance findings): inputs read as the model's
held-out data, --aligned --reverse, --size checked up front, StarGAN's target labels from the
image's own labels, --interpolate / --phase refused for the right reason, output names that never
collide, no empty --output folder left by a refused run."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ganengine.cli import main
from tests._train_utils import TINY_FLAGS, one_thread, cli_error  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ganengine", "data", "sample")
DIGIT = os.path.join(SAMPLE, "digits", "images", "0000.png")  # list_attr_celeba.txt: Zero -1, One -1, Two 1
PHOTO = os.path.join(SAMPLE, "photos_unpaired", "testA", "0000.jpg")  # 72x72


def _train(root, model, flags, name=None):
    """A one-step run with tiny networks; its run folder."""
    name = name or model
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", model] + flags.split() + ["--checkpoints_dir", str(root), "--name", name,
                                                        "--max_steps", "1", "--sample_every", "0", "--no_progress",
                                                        "--tensorboard", "off"]) == 0
    finally:
        torch.set_num_threads(before)
    return str(root / name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    return {
        "cyclegan": _train(root, "cyclegan", TINY_FLAGS["cyclegan"]),
        # the held-out transforms that differ from squashing the whole image to --crop_size
        "cyclegan_none": _train(root, "cyclegan", TINY_FLAGS["cyclegan"] + " --preprocess none --batch_size 1",
                                "cyclegan_none"),
        "pix2pix_crop": _train(root, "pix2pix", TINY_FLAGS["pix2pix"] + " --preprocess crop", "pix2pix_crop"),
        "stargan": _train(root, "stargan", TINY_FLAGS["stargan"] + " --crop_size 24"),  # centre 24 of 32, to 32
        "stackgan": _train(root, "stackgan", TINY_FLAGS["stackgan"]),
        "dcgan": _train(root, "dcgan", "--ngf 4 --ndf 4 --batch_size 2"),
        "sagan": _train(root, "sagan", "--batch_size 2 --g_conv_dim 8 --d_conv_dim 8 --z_dim 16"),
    }


_error = cli_error  # (tests/_train_utils.py)


def _spy(monkeypatch, cls, seen):
    original = cls.translate

    def translate(self, batch, *a, **k):
        seen.append({k: v.detach().cpu().clone() for k, v in batch.items() if torch.is_tensor(v)})
        return original(self, batch, *a, **k)

    monkeypatch.setattr(cls, "translate", translate)


def _png(path):
    return np.asarray(Image.open(path)).astype(int)


# ----------------------------------------------------------------------------- 1. the training's preprocessing
@pytest.mark.parametrize("run,model,phase,key,extra", [
    ("pix2pix_crop", "pix2pix", "val", "A", ["--aligned"]),  # --preprocess crop: the centre crop of each half
    ("cyclegan_none", "cyclegan", "test", "A", []),  # --preprocess none: 72x72, not --crop_size
    ("stargan", "stargan", "test", "image", ["--target_attrs", "One"]),  # centre crop 24, resize to 32
])
def test_inputs_are_read_as_the_held_out_data(runs, run, model, phase, key, extra, tmp_path, monkeypatch, capsys):
    from ganengine.data import build_dataset
    from ganengine.models import MODELS
    from ganengine.train.checkpoint import load_model

    _, state = load_model(runs[run], map_location="cpu")
    item = build_dataset(model, state["data"], phase=phase)[0]  # what sample / evaluate feed the generator
    path = item.get("paths") or item[f"{key}_paths"]
    seen = []
    _spy(monkeypatch, MODELS[model], seen)
    assert main(["translate", "--checkpoint", runs[run], "--input", path, "--output", str(tmp_path / "o"),
                 *extra]) == 0, capsys.readouterr().err
    x = seen[0][key][0]
    assert x.shape == item[key].shape
    assert torch.allclose(x, item[key], atol=1e-6), (x - item[key]).abs().max()
    out = os.path.join(tmp_path, "o", os.listdir(tmp_path / "o")[0])
    assert Image.open(out).size == tuple(item[key].shape[-2:])[::-1]


# ----------------------------------------------------------------------------- 2. --aligned --reverse
def test_aligned_reverse_translates_the_b_half(runs, tmp_path, capsys):
    a = Image.open(PHOTO).convert("RGB").resize((32, 32))
    b = Image.open(os.path.join(SAMPLE, "photos_unpaired", "testB", "0000.jpg")).convert("RGB").resize((32, 32))
    pair = Image.new("RGB", (64, 32))
    pair.paste(a, (0, 0))
    pair.paste(b, (32, 0))
    for folder, img in (("pair", pair), ("a", a), ("b", b)):
        os.makedirs(tmp_path / folder)
        img.save(tmp_path / folder / "x.png")

    def reverse(folder, *extra):
        out = tmp_path / f"out_{folder}"
        assert main(["translate", "--checkpoint", runs["cyclegan"], "--input", str(tmp_path / folder), "--output",
                     str(out), "--reverse", *extra]) == 0, capsys.readouterr().err
        return _png(out / "x.png")

    aligned = reverse("pair", "--aligned")
    assert np.array_equal(aligned, reverse("b"))  # netG_B (B -> A) takes the B half
    assert not np.array_equal(aligned, reverse("a"))


# ----------------------------------------------------------------------------- 3. --size
@pytest.mark.parametrize("run,size", [("cyclegan", 30), ("cyclegan", 3), ("stargan", 30), ("stargan", 4)])
def test_size_the_networks_cannot_take_is_refused_up_front(runs, run, size, tmp_path, capsys):
    out = tmp_path / "missing" / "out"
    img = DIGIT if run == "stargan" else PHOTO
    _error(capsys, ["translate", "--checkpoint", runs[run], "--input", img, "--output", str(out), "--size",
                    str(size)], f"--size {size}", f"cannot take {size}x{size} inputs", "pick a size they can")
    assert not (tmp_path / "missing").exists()  # nothing written, no folder left


@pytest.mark.parametrize("run", ["cyclegan", "stargan"])
def test_size_they_can_take_is_written_at_that_size(runs, run, tmp_path, capsys):
    img = DIGIT if run == "stargan" else PHOTO
    assert main(["translate", "--checkpoint", runs[run], "--input", img, "--output", str(tmp_path / "o"),
                 "--size", "28", "--target_attrs" if run == "stargan" else "--batch_size",
                 "One" if run == "stargan" else "1"]) == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "o" / os.listdir(tmp_path / "o")[0]).size == (28, 28)


# ----------------------------------------------------------------------------- 4. StarGAN target labels
def test_stargan_labels_start_from_the_images_own_labels(runs, tmp_path, monkeypatch, capsys):
    from ganengine.models import StarGAN

    seen = []
    _spy(monkeypatch, StarGAN, seen)
    # 0000.png of the training data: Zero 0, One 0, Two 1
    assert main(["translate", "--checkpoint", runs["stargan"], "--input", DIGIT, "--output", str(tmp_path / "t"),
                 "--target_attrs", "Zero"]) == 0, capsys.readouterr().err
    assert seen[0]["label"].tolist() == [[1.0, 0.0, 1.0]]  # Two kept
    seen.clear()
    assert main(["translate", "--checkpoint", runs["stargan"], "--input", DIGIT, "--output",
                 str(tmp_path / "all")]) == 0
    # the reference's create_labels(c_org): each attribute of the image's labels flipped in turn
    assert [s["label"].tolist() for s in seen] == [[[1.0, 0.0, 1.0]], [[0.0, 1.0, 1.0]], [[0.0, 0.0, 0.0]]]
    capsys.readouterr()

    # an image that is not in the training data's attribute file: the attributes not named are 0, and said so
    os.makedirs(tmp_path / "mine")
    Image.open(DIGIT).save(tmp_path / "mine" / "0000.png")
    seen.clear()
    assert main(["translate", "--checkpoint", runs["stargan"], "--input", str(tmp_path / "mine"), "--output",
                 str(tmp_path / "m"), "--target_attrs", "Zero"]) == 0
    assert seen[0]["label"].tolist() == [[1.0, 0.0, 0.0]]
    assert "set to 0" in capsys.readouterr().err


def test_target_attrs_hair_colour_clears_the_other_hair_colours():
    from ganengine.cli.translate import _target_labels

    data = {"selected_attrs": ["Black_Hair", "Blond_Hair", "Young"]}
    own = torch.tensor([0.0, 1.0, 1.0])  # blond, young
    assert _target_labels(["Black_Hair"], data, 3, own).tolist() == [[1.0, 0.0, 1.0]]
    assert _target_labels(["Black_Hair"], data, 3, None).tolist() == [[1.0, 0.0, 0.0]]


# ----------------------------------------------------------------------------- 5. sample --interpolate
def test_sample_interpolate_on_sagan_names_the_real_reason(runs, tmp_path, capsys):
    line = _error(capsys, ["sample", "--checkpoint", runs["sagan"], "--interpolate", "4", "--output",
                           str(tmp_path / "g.png")], "--interpolate 4", "sagan has no interpolation grid")
    assert "not a synthesis model" not in line
    assert not os.listdir(tmp_path)


def test_sample_interpolate_file_checked_before_the_grid(runs, tmp_path, capsys):
    os.makedirs(tmp_path / "g_interpolation.png")  # a folder where the interpolation grid goes
    _error(capsys, ["sample", "--checkpoint", runs["dcgan"], "--interpolate", "3", "--output",
                    str(tmp_path / "g.png")], "--interpolate 3", "g_interpolation.png", "folder")
    assert not (tmp_path / "g.png").exists()
    assert main(["sample", "--checkpoint", runs["dcgan"], "--interpolate", "3", "--output",
                 str(tmp_path / "h.png")]) == 0
    assert (tmp_path / "h.png").exists() and (tmp_path / "h_interpolation.png").exists()


# ----------------------------------------------------------------------------- 6. sample --phase
@pytest.mark.parametrize("run,words", [
    ("stargan", ["--phase no_such_split", "train, test"]),
    ("stackgan", ["--phase no_such_split", "no splits"]),
    ("dcgan", ["--phase no_such_split", "leave --phase out"]),
])
def test_sample_unknown_phase_is_refused(runs, run, words, tmp_path, capsys):
    _error(capsys, ["sample", "--checkpoint", runs[run], "--phase", "no_such_split", "--output",
                    str(tmp_path / "g.png")], *words)
    assert not (tmp_path / "g.png").exists()


def test_sample_celeba_phases_still_work(runs, tmp_path, capsys):
    for phase in ("train", "test"):
        assert main(["sample", "--checkpoint", runs["stargan"], "--phase", phase, "--n", "2", "--output",
                     str(tmp_path / f"{phase}.png")]) == 0, capsys.readouterr().err


# ----------------------------------------------------------------------------- 7. names, captions, output folder
def test_renamed_duplicate_never_takes_another_inputs_name(runs, tmp_path, capsys):
    src = tmp_path / "in"
    os.makedirs(src / "sub")
    photo = Image.open(PHOTO).convert("RGB")
    photo.save(src / "x.jpg")
    photo.save(src / "sub" / "x.jpg")
    photo.rotate(90).save(src / "sub_x_jpg.png")
    assert main(["translate", "--checkpoint", runs["cyclegan"], "--input", str(src), "--output",
                 str(tmp_path / "o")]) == 0
    assert "wrote 3 image(s)" in capsys.readouterr().err
    assert len(os.listdir(tmp_path / "o")) == 3


def test_output_names_are_unique():
    from ganengine.cli.translate import _output_names

    paths = [os.path.join("r", p) for p in ("x.jpg", os.path.join("sub", "x.jpg"), "sub_x_jpg.png", "X.png",
                                            "sub_x_jpg_2.png", "y.png")]
    names = _output_names(paths, "r")
    assert len({n.casefold() for n in names}) == len(paths)
    assert names[-1] == "y.png" and names[2] == "sub_x_jpg.png"


def test_captions_folder_is_named_a_folder(runs, tmp_path, capsys):
    os.makedirs(tmp_path / "caps")
    _error(capsys, ["translate", "--checkpoint", runs["stackgan"], "--captions", str(tmp_path / "caps"), "--output",
                    str(tmp_path / "o")], "--captions", "is a folder", "text file")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["stackgan_without_captions", "input_without_images", "unknown_target"])
def test_refused_run_leaves_no_empty_output_folder(runs, case, tmp_path, capsys):
    os.makedirs(tmp_path / "empty")
    argv = {"stackgan_without_captions": ["--checkpoint", runs["stackgan"]],
            "input_without_images": ["--checkpoint", runs["cyclegan"], "--input", str(tmp_path / "empty")],
            "unknown_target": ["--checkpoint", runs["stargan"], "--input", DIGIT, "--target_attrs", "Blond_Hair"]}
    _error(capsys, ["translate", *argv[case], "--output", str(tmp_path / "new" / "out")])
    assert not (tmp_path / "new").exists()
