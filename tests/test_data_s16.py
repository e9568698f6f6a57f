"""Data-pipeline acceptance findings (data16): class folders never take split folders for classes,
the sample grid at --batch_size 1 on mixed sizes, Unicode captions, RaFD evaluation's missing
split, an absolute recorded --dataroot, non-UTF-8 text files named, odd-width A|B pairs cut as the
reference cuts them (dataset and translate --aligned alike), translate's help on its transform."""
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ganengine.cli import main
from ganengine.data import AlignedDataset, CaptionedDataset, DataError, TransformOptions, build_dataset
from ganengine.data import transforms as T
from ganengine.data.classes import ClassFolderDataset
from ganengine.data.labelled import read_attr_file
from ganengine.data.text import _bucket, embed, read_caption_file, tokens
from tests._train_utils import TINY_FLAGS, cli_error, one_thread  # noqa: F401 (fixture)

FEATURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "feature_extractor.py")


def _img(path, w, h, seed=0):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(str(path))


def _gradient(path, w, h):
    """A smooth image (resampling differences show as large errors, not noise)."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x * 7 + y * 3) % 256], -1).astype(np.uint8)
    Image.fromarray(arr).save(str(path))


def _run(argv, root):
    return main(argv + ["--checkpoints_dir", str(root), "--max_steps", "1", "--no_progress", "--tensorboard", "off",
                        "--device", "cpu"])


# ----------------------------------------------------------------------------- 1. class folders and --phase
@pytest.fixture
def splits(tmp_path):
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            for i in range(2):
                _img(tmp_path / "d" / split / c / f"{i}.png", 12, 12, i)
    return tmp_path / "d"


def test_class_folders_missing_phase_is_an_error_not_the_split_folders_as_classes(splits):
    assert build_dataset("cgan", {"dataroot": str(splits), "image_size": 8}, phase="train").classes == ["cat", "dog"]
    with pytest.raises(DataError) as e:
        build_dataset("cgan", {"dataroot": str(splits), "image_size": 8}, phase="test")
    assert repr(str(splits / "test")) in str(e.value) and "train, val" in str(e.value) and "--phase" in str(e.value)


def test_class_folders_flat_layout_is_the_train_split_only(tmp_path):
    for c in ("a", "b"):
        _img(tmp_path / "flat" / c / "0.png", 12, 12)
    assert ClassFolderDataset(str(tmp_path / "flat"), 8).classes == ["a", "b"]  # DATAROOT/<class>/: train
    with pytest.raises(DataError, match=r"flat/test' does not exist.*--phase train"):
        ClassFolderDataset(str(tmp_path / "flat"), 8, phase="test")
    for split in ("val", "test"):  # no train/: the split folders are not two classes of a train split
        _img(tmp_path / "no_train" / split / "a" / "0.png", 12, 12)
    with pytest.raises(DataError, match=r"no_train/train' does not exist.*val, test: pick one with --phase"):
        ClassFolderDataset(str(tmp_path / "no_train"), 8)


# ----------------------------------------------------------------------------- 2. sample grid, mixed sizes
def test_sample_grid_keeps_one_size_so_batch_size_1_trains_on_mixed_sizes(tmp_path, one_thread, capsys):
    for i, (w, h) in enumerate([(64, 32), (80, 40), (96, 48), (48, 24)]):
        _img(tmp_path / "data" / "train" / f"{i}.png", w, h, i)
    rc = _run(["train", "pix2pix", "--dataroot", str(tmp_path / "data"), "--preprocess", "none", "--batch_size", "1",
               "--netG", "resnet_6blocks", "--ngf", "4", "--ndf", "4", "--n_layers_D", "2", "--name", "r"], tmp_path)
    assert rc == 0, capsys.readouterr().err
    grids = os.listdir(tmp_path / "r" / "samples")
    assert grids and Image.open(tmp_path / "r" / "samples" / grids[0]).size[0] > 0


def test_same_size_keeps_the_items_of_the_most_common_size():
    from ganengine.train.engine import _same_size

    items = [{"A": torch.zeros(3, 8, 8), "label": torch.tensor(k)} for k in range(2)]
    items.insert(1, {"A": torch.zeros(3, 8, 12), "label": torch.tensor(9)})
    assert [int(it["label"]) for it in _same_size(items)] == [0, 1]
    items.insert(0, {"A": torch.zeros(3, 5, 5), "label": torch.tensor(7)})  # (an odd first image)
    assert [int(it["label"]) for it in _same_size(items)] == [0, 1]
    tie = [{"A": torch.zeros(3, 4, 4 + k)} for k in range(3)]
    assert _same_size(tie) == tie[:1]


# ----------------------------------------------------------------------------- 3. Unicode captions
def _old_tokens(caption):
    """The tokens before Unicode words (checkpoints trained on ASCII captions depend on them)."""
    words = re.findall(r"[a-z0-9]+", caption.lower())
    return words + [a + "_" + b for a, b in zip(words, words[1:])]


ASCII = ["A small bird, with RED wings!", "snake_case x2 & 3.5cm", "", "  ...  ", "tab\there\nnewline 0042"]


def test_words_of_any_script_are_tokens_and_ascii_captions_embed_as_before():
    assert tokens("un oiseau très petit")[:4] == ["un", "oiseau", "très", "petit"]
    assert tokens("Птица с красными крыльями")[:4] == ["птица", "с", "красными", "крыльями"]
    assert tokens("STRASSE straße")[:2] == ["strasse", "strasse"]  # case-folded
    assert tokens("cafe\u0301") == tokens("caf\u00e9") == ["café"]  # decomposed = composed
    assert tokens("छोटी लाल") == ["छोटी", "लाल", "छोटी_लाल"]  # vowel signs (not \\w) stay in their word
    assert tokens("é_b") == ["é", "b", "é_b"]  # "_" still separates
    e = embed(["a café bird", "a caf bird"])
    assert float(e[0] @ e[1]) < 0.99
    for caption in ASCII:  # (checkpoints trained on ASCII captions: the same tokens, the same vectors)
        assert tokens(caption) == _old_tokens(caption)
        if _old_tokens(caption):
            expected = torch.zeros(64)
            for t in _old_tokens(caption):
                j, sign = _bucket(t, 64)
                expected[j] += sign
            torch.testing.assert_close(embed([caption], 64)[0], expected / expected.norm(), rtol=0, atol=0)


def _stackgan_data(root, caption_lines, encoding="utf-8"):
    for i in range(3):
        _img(root / "images" / f"{i}.png", 16, 16, i)
    (root / "captions.txt").write_bytes("".join(caption_lines).encode(encoding))


def test_a_russian_caption_embeds_and_a_caption_with_no_words_names_its_line(tmp_path):
    lines = [f"{i}.png\ta small bird with red wings\n" for i in range(3)]
    _stackgan_data(tmp_path / "ru", lines + ["2.png\tПтица с красными крыльями\n"])
    ds = CaptionedDataset(str(tmp_path / "ru"), image_size=8, text_dim=32)
    assert ds.captions[2][1] == "Птица с красными крыльями" and float(ds.embeddings[2, 1].norm()) > 0.99
    _stackgan_data(tmp_path / "dots", lines + ["\n", "2.png\t...\n"])
    with pytest.raises(DataError, match=r"captions\.txt:5: the caption '\.\.\.' has no words"):
        CaptionedDataset(str(tmp_path / "dots"), image_size=8, text_dim=32)
    root = tmp_path / "text_dir"
    for i in range(2):
        _img(root / "images" / f"{i}.png", 16, 16, i)
        os.makedirs(root / "text", exist_ok=True)
        (root / "text" / f"{i}.txt").write_text("a bird\n" + ("!!\n" if i else ""), encoding="utf-8")
    with pytest.raises(DataError, match=r"1\.txt:2: the caption '!!' has no words"):
        CaptionedDataset(str(root), image_size=8, text_dim=32)


def test_translate_caption_file_names_a_caption_with_no_words(tmp_path):
    path = tmp_path / "caps.txt"
    path.write_text("\ufeffune très petite\n\n--\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"caps\.txt:3: the caption '--'"):
        read_caption_file(str(path))
    path.write_text("\ufeffune très petite\r\nПтица\r\n", encoding="utf-8")
    assert read_caption_file(str(path)) == ["une très petite", "Птица"]


# ----------------------------------------------------------------------------- 4. RaFD evaluation, missing split
def _rafd(root):
    for d in ("angry", "happy"):
        for i in range(2):
            _img(root / "train" / d / f"{i}.png", 20, 20, i)


def test_rafd_model_data_missing_its_split_says_so(tmp_path):
    from ganengine.cli.evaluate import _default_phase

    _rafd(tmp_path / "rafd")
    opts = {"dataroot": str(tmp_path / "rafd"), "domains": ["angry", "happy"], "rafd_crop_size": 16,
            "image_size": 16}
    with pytest.raises(DataError) as e:  # (was: "attribute file ... list_attr_celeba.txt does not exist")
        build_dataset("stargan", opts, phase="test")
    assert "rafd/test' does not exist" in str(e.value) and "split(s) train: pick one with --phase" in str(e.value)
    assert len(build_dataset("stargan", opts, phase="train")) == 4
    assert _default_phase("stargan", str(tmp_path / "rafd"), opts) == "test"
    _img(tmp_path / "rafd" / "val" / "angry" / "0.png", 20, 20)
    assert _default_phase("stargan", str(tmp_path / "rafd"), opts) == "val"
    assert _default_phase("stargan", str(tmp_path / "rafd"), {}) == "test"  # CelebA: its attribute-file split


def test_evaluate_rafd_checkpoint_without_test_split(tmp_path, one_thread, capsys):
    _rafd(tmp_path / "rafd")
    assert _run(["train", "stargan", "--dataroot", str(tmp_path / "rafd"), "--rafd_crop_size", "20", "--image_size",
                 "32", "--g_conv_dim", "4", "--d_conv_dim", "4", "--g_repeat_num", "1", "--d_repeat_num", "5",
                 "--n_critic", "2", "--batch_size", "2", "--name", "r"], tmp_path) == 0, capsys.readouterr().err
    capsys.readouterr()
    argv = ["evaluate", "--checkpoint", str(tmp_path / "r"), "--metrics", "fid", "--feature_extractor",
            f"{FEATURES}:SmallFeatureExtractor", "--batch_size", "2", "--device", "cpu"]
    line = cli_error(capsys, argv, "rafd/test' does not exist", "pick one with --phase")
    assert "list_attr_celeba" not in line and "--dataset" not in line
    assert main(argv + ["--phase", "train"]) == 0, capsys.readouterr().err


# ----------------------------------------------------------------------------- 5. --dataroot recorded absolute
def test_relative_dataroot_is_recorded_absolute(tmp_path, one_thread, monkeypatch, capsys):
    for s in ("train", "val"):
        for i in range(2):
            _img(tmp_path / "w" / "data" / s / f"{i}.png", 64, 32, i)
    monkeypatch.chdir(tmp_path / "w")
    assert _run(["train", "pix2pix", "--dataroot", "data", *TINY_FLAGS["pix2pix"].split(), "--sample_every", "0",
                 "--name", "r"], "ck") == 0, capsys.readouterr().err
    ckpt = tmp_path / "w" / "ck" / "r" / "step_00000001.pt"
    assert torch.load(ckpt, weights_only=True)["data"]["dataroot"] == str(tmp_path / "w" / "data")
    monkeypatch.chdir(tmp_path)  # another folder: the data is still found
    assert main(["sample", "--checkpoint", str(ckpt), "--output", str(tmp_path / "s.png"), "--device", "cpu"]) == 0, \
        capsys.readouterr().err


# ----------------------------------------------------------------------------- 6. text files not UTF-8
def test_a_latin1_caption_file_is_named_with_its_line(tmp_path):
    lines = [f"{i}.png\ta small bird\n" for i in range(3)]
    _stackgan_data(tmp_path / "d", lines + ["2.png\ta caf\u00e9 bird\n"], encoding="latin-1")
    with pytest.raises(DataError, match=r"d/captions\.txt:4: not UTF-8 text \(byte 0xe9.*save the file as UTF-8"):
        CaptionedDataset(str(tmp_path / "d"), image_size=8, text_dim=32)
    (tmp_path / "caps.txt").write_bytes("ok\r\nok\r\ncaf\u00e9\r\n".encode("cp1252"))
    with pytest.raises(DataError, match=r"caps\.txt:3: not UTF-8"):
        read_caption_file(str(tmp_path / "caps.txt"))


def test_a_latin1_attribute_file_is_named_with_its_line(tmp_path):
    path = tmp_path / "list_attr_celeba.txt"
    path.write_bytes("2\nA B\n\na.jpg 1 -1\nb\u00e9.jpg -1 1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"list_attr_celeba\.txt:5: not UTF-8"):
        read_attr_file(str(path))
    path.write_bytes("\ufeff2\nA B\n\na.jpg 1 -1\nb\u00e9.jpg -1 1 1\n".encode("utf-8"))  # (UTF-8 + BOM reads)
    with pytest.raises(DataError, match=r"list_attr_celeba\.txt:5: expected a file name and 2 values"):
        read_attr_file(str(path))  # (the file's line number, the blank line counted)


# ----------------------------------------------------------------------------- 7. odd-width A|B pairs
def _reference_halves(path):
    """The junyanz reference's aligned_dataset cut."""
    ab = Image.open(path).convert("RGB")
    w, h = ab.size
    w2 = int(w / 2)
    return ab.crop((0, 0, w2, h)), ab.crop((w2, 0, w, h))


def _make_power_2(img, base=4):
    ow, oh = img.size
    w, h = int(round(ow / base) * base), int(round(oh / base) * base)
    return img if (w, h) == (ow, oh) else img.resize((w, h), Image.BICUBIC)


def _reference_none(tmp_path):
    """--preprocess none, 301 wide (w // 2 = 150): the reference rounds both halves to 152 wide."""
    _gradient(tmp_path / "none" / "train" / "p.png", 301, 150)
    item = AlignedDataset(str(tmp_path / "none"), "train", TransformOptions("none", 64, 64, False), cache=False)[0]
    a, b = _reference_halves(tmp_path / "none" / "train" / "p.png")
    assert torch.equal(item["A"], T.to_tensor(_make_power_2(a)))
    assert torch.equal(item["B"], T.to_tensor(_make_power_2(b)))


def _reference_scale_width_and_crop(tmp_path):
    _gradient(tmp_path / "swc" / "train" / "p.png", 61, 40)
    o = TransformOptions("scale_width_and_crop", 24, 16, False, center=True)
    item = AlignedDataset(str(tmp_path / "swc"), "train", o, cache=False)[0]
    a, b = _reference_halves(tmp_path / "swc" / "train" / "p.png")  # 30 and 31 wide: 24x32 and 24x30 scaled
    x, y = 4, 8  # (the centre of A's 24x32; the reference crops both halves where it crops A)
    for half, key in ((a, "A"), (b, "B")):
        ref = half.resize((24, max(int(24 * half.size[1] / half.size[0]), 16)), Image.BICUBIC)
        assert torch.equal(item[key], T.to_tensor(ref.crop((x, y, x + 16, y + 16)))), key


def _drops_last_column(tmp_path, preprocess, w, h):
    _gradient(tmp_path / preprocess / "train" / "p.png", w, h)
    o = TransformOptions(preprocess, 24, 16, False)
    item = AlignedDataset(str(tmp_path / preprocess), "train", o, cache=False)[0]
    assert item["A"].shape == item["B"].shape
    b = Image.open(tmp_path / preprocess / "train" / "p.png").convert("RGB").crop((w // 2, 0, 2 * (w // 2), h))
    assert torch.equal(item["B"], T.apply(b, o, T.get_params(b.size, o, torch.Generator())))


def test_odd_width_pair_b_is_the_references_unless_the_halves_would_differ(tmp_path):
    _reference_none(tmp_path)
    _reference_scale_width_and_crop(tmp_path)
    # B's last column left out only where the reference's halves come out of different sizes:
    # scale_width, A (30 wide) to 24x32, B (31 wide) to 24x30; none, w // 2 = 5: A to 4 wide, B (6) to 8
    _drops_last_column(tmp_path, "scale_width", 61, 40)
    _drops_last_column(tmp_path, "none", 11, 20)


# ----------------------------------------------------------------------------- 8. translate --aligned
def test_translate_aligned_reads_the_halves_as_the_held_out_dataset(tmp_path):
    from ganengine.cli.translate import _Reader

    _gradient(tmp_path / "val" / "p.png", 301, 150)
    for preprocess in ("resize_and_crop", "scale_width", "scale_width_and_crop", "none", "crop"):
        opts = {"dataroot": str(tmp_path), "preprocess": preprocess, "load_size": 143, "crop_size": 128,
                "direction": "BtoA"}
        held_out = build_dataset("pix2pix", opts, phase="val")[0]
        for reverse, key in ((False, "B"), (True, "A")):
            reader = _Reader("pix2pix", {"direction": "BtoA", "input_nc": 3, "output_nc": 3}, opts, None,
                             aligned=True, reverse=reverse)
            assert torch.equal(reader(str(tmp_path / "val" / "p.png")), held_out[key]), (preprocess, key)


# ----------------------------------------------------------------------------- 9. translate --help
def test_translate_help_describes_the_held_out_transform():
    from ganengine.cli import translate

    doc = " ".join(translate.__doc__.split())
    assert "resize (``--load_size``)" not in doc
    assert "``resize_and_crop`` resizes the whole image to ``--crop_size``" in doc
    assert "``--load_size`` is not used" in doc


# ----------------------------------------------------------------------------- 5b. IC-GAN resume
def test_icgan_resume_accepts_a_relative_dataroot_recorded_before(tmp_path, monkeypatch):
    """IC-GAN keeps dataroot among its model options: a run recorded with the relative path (before
    dataroots were recorded absolute) resumes from the folder it was started in; another folder's
    data still stops the resume."""
    from ganengine.models.icgan import ICGAN

    monkeypatch.chdir(tmp_path)
    model = ICGAN.__new__(ICGAN)
    model.options = {}
    assert ICGAN.resume_differences(model, {"dataroot": ("data", str(tmp_path / "data"))}) == {}
    other = {"dataroot": ("data", str(tmp_path / "elsewhere"))}
    assert ICGAN.resume_differences(model, other) == other
