"""Class-conditional image data for the synthesis models: class-per-folder datasets, the built-in
digits, BigGAN's HDF5 layout, their up-front checks, and build_dataset for the synthesis models."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ganengine.data import DataError, build_dataset, sample_root
from ganengine.data.classes import ClassFolderDataset, DigitsDataset, HDF5Dataset, class_dataset
from ganengine.data.images import find_images


def _png(path, value=128, size=(20, 12), mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, 7)
    Image.new(mode, size, color).save(path)


@pytest.fixture
def folders(tmp_path):
    root = tmp_path / "data"
    for cls, n, v in (("zebra", 2, 10), ("apple", 3, 200), ("mango", 1, 90)):
        for i in range(n):
            _png(str(root / cls / f"{i}.png"), v)
    return root


def test_classes_are_sorted_folder_names(folders):
    ds = ClassFolderDataset(str(folders), image_size=8, flip=False)
    assert ds.classes == ["apple", "mango", "zebra"] and ds.n_classes == 3 and len(ds) == 6
    assert ds.labels.tolist() == [0, 0, 0, 1, 2, 2]
    item = ds[0]
    assert item["image"].shape == (3, 8, 8) and item["label"].dtype == torch.int64
    assert -1 <= float(item["image"].min()) and float(item["image"].max()) <= 1
    # the value written: (200, 55, 7) -> [-1, 1]
    torch.testing.assert_close(item["image"][:, 4, 4], torch.tensor([200, 55, 7]) / 127.5 - 1)
    gray = ClassFolderDataset(str(folders), image_size=8, flip=False, channels=1)
    assert gray[0]["image"].shape == (1, 8, 8)


def test_phase_subfolder_is_used_when_present(folders):
    _png(str(folders / "train" / "a" / "0.png"))
    ds = ClassFolderDataset(str(folders), 8, phase="train")  # DATAROOT/train/<class>/
    assert ds.classes == ["a"] and len(ds) == 1
    # no DATAROOT/test: an error naming it (not the split folders read as classes)
    with pytest.raises(DataError, match=r"test' does not exist.*split folder\(s\) train"):
        ClassFolderDataset(str(folders), 8, phase="test")


def test_bad_layouts_are_reported_before_training(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ClassFolderDataset(str(tmp_path / "missing"), 8)
    empty = tmp_path / "empty_class"
    _png(str(empty / "a" / "0.png"))
    os.makedirs(empty / "b")
    with pytest.raises(DataError, match="class folder 'b'.*contains no images"):
        ClassFolderDataset(str(empty), 8)
    loose = tmp_path / "loose"
    _png(str(loose / "a" / "0.png"))
    _png(str(loose / "x.png"))
    with pytest.raises(DataError, match="no loose images"):
        ClassFolderDataset(str(loose), 8)
    broken = tmp_path / "broken"
    _png(str(broken / "a" / "0.png"))
    (broken / "a" / "1.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="1.png"):
        ClassFolderDataset(str(broken), 8)
    with pytest.raises(DataError, match="channels"):
        ClassFolderDataset(str(empty), 8, channels=2)


def test_symlink_loops_are_not_followed(tmp_path):
    root = tmp_path / "loop"
    _png(str(root / "a" / "0.png"))
    os.symlink(root, root / "a" / "back")  # a/back -> the root: a loop
    os.symlink(root / "a", root / "a_again")  # a second link to the same folder: listed once
    assert find_images(str(root)) == [str(root / "a" / "0.png")]
    ds = ClassFolderDataset(str(root), 8)
    assert len(ds) == 2 and ds.classes == ["a", "a_again"]  # each class folder is its own class


def test_builtin_digits_are_ten_balanced_classes():
    ds = DigitsDataset(sample_root("acgan"), image_size=32, channels=1)
    assert len(ds) == 1000 and ds.classes[0] == "Zero" and ds.classes[9] == "Nine"
    assert torch.bincount(ds.labels, minlength=10).tolist() == [100] * 10
    item = ds[5]
    assert item["image"].shape == (1, 32, 32)
    # the digits are white on black: the background is -1
    assert float(item["image"][0, 0, 0]) == -1.0 and float(item["image"].max()) > 0.5


@pytest.mark.parametrize("model", ["dcgan", "wgan", "wgan_gp", "cgan", "acgan", "adcgan", "infogan"])
def test_build_dataset_for_the_synthesis_models(model, folders):
    ds = build_dataset(model, {"image_size": 16, "channels": 1, "no_flip": True})
    assert isinstance(ds, DigitsDataset) and ds[0]["image"].shape == (1, 16, 16)
    ds = build_dataset(model, {"dataroot": str(folders), "image_size": 64, "channels": 3})
    assert isinstance(ds, ClassFolderDataset) and ds[0]["image"].shape == (3, 64, 64)


def test_flip_is_seeded_per_item(folders):
    _png(str(folders / "half" / "0.png"), 0, size=(8, 8))
    img = Image.open(folders / "half" / "0.png").convert("RGB")
    px = np.array(img)
    px[:, :4] = 255
    Image.fromarray(px).save(folders / "half" / "0.png")
    ds = ClassFolderDataset(str(folders), 8, flip=True)
    k = ds.labels.tolist().index(ds.classes.index("half"))
    seen = {float(ds[(k, seed)]["image"][0, 0, 0]) for seed in range(16)}
    assert seen == {-1.0, 1.0}  # flipped for some seeds only
    assert float(ds[(k, 3)]["image"][0, 0, 0]) == float(ds[(k, 3)]["image"][0, 0, 0])


def test_hdf5_layout(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "ILSVRC8.hdf5"
    imgs = np.random.default_rng(0).integers(0, 256, (5, 3, 8, 8), dtype=np.uint8)
    with h5py.File(path, "w") as f:
        f["imgs"] = imgs
        f["labels"] = np.array([0, 2, 1, 2, 0])
    ds = class_dataset(str(path), None, 8, False, channels=3)
    assert isinstance(ds, HDF5Dataset) and len(ds) == 5 and ds.n_classes == 3
    torch.testing.assert_close(ds[1]["image"], torch.from_numpy(imgs[1]).float() / 127.5 - 1)
    gray = class_dataset(str(path), None, 8, False, channels=1)
    luma = np.floor((imgs[1, 0] * 299.0 + imgs[1, 1] * 587.0 + imgs[1, 2] * 114.0) / 1000.0 + 0.5)
    torch.testing.assert_close(gray[1]["image"][0], torch.from_numpy(luma).float() / 127.5 - 1)
    with h5py.File(tmp_path / "bad.hdf5", "w") as f:
        f["imgs"] = imgs
    with pytest.raises(DataError, match="labels"):
        HDF5Dataset(str(tmp_path / "bad.hdf5"))
    (tmp_path / "x.png").write_bytes(b"not hdf5")  # a file given as --dataroot: read as HDF5, said so
    with pytest.raises(DataError, match=r"--dataroot .*x.png' is a file, which is read as a BigGAN-PyTorch HDF5"):
        class_dataset(str(tmp_path / "x.png"), None, 8, False)
