"""Regression tests of issue 22's silent wrong numbers in the data side: symlink loops, a padded
evaluation split, 16-bit PNGs, pix2pix pairs past the first, StarGAN attribute values."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ganengine.data import AlignedDataset, CelebADataset, DataError, ResumableSampler, make_loader
from ganengine.data.images import ImageStore, find_images
from ganengine.data.sampler import SeededDataset


def _img(path, w, h, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_symlink_loop_to_parent_lists_only_the_folder(tmp_path):
    # issue: trainA/up -> .. made 4 images 3764, with trainB and the test split among them
    for d in ("trainA", "trainB", "testA"):
        for i in range(2):
            _img(str(tmp_path / d / f"{i}.png"), 4, 4, seed=i)
    os.symlink("..", tmp_path / "trainA" / "up")
    os.symlink(".", tmp_path / "trainA" / "self")
    os.symlink(str(tmp_path / "trainA"), tmp_path / "trainA" / "abs")
    (tmp_path / "trainA" / "sub").mkdir()
    _img(str(tmp_path / "trainA" / "sub" / "s.png"), 4, 4)
    os.symlink(str(tmp_path / "trainA" / "sub"), tmp_path / "trainA" / "sub2")  # one folder twice: once
    paths = find_images(str(tmp_path / "trainA"))
    names = sorted(os.path.relpath(p, tmp_path / "trainA") for p in paths)
    assert names == ["0.png", "1.png", os.path.join("sub", "s.png")]
    # a link to a folder outside the tree (data kept on another disk) is still followed
    _img(str(tmp_path / "elsewhere" / "e.png"), 4, 4)
    os.symlink(str(tmp_path / "elsewhere"), tmp_path / "trainB" / "more")
    assert len(find_images(str(tmp_path / "trainB"))) == 3


class _Count(SeededDataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def get(self, index, g):
        return {"i": torch.tensor(index)}


@pytest.mark.parametrize("n,bs", [(4, 16), (5, 2), (6, 3), (1, 8)])
def test_evaluation_loader_sees_each_item_once(n, bs):
    # issue: evaluate padded a test split smaller than the batch (4 images counted as 16)
    loader, sampler = make_loader(_Count(n), bs, "cpu", shuffle=False, drop_last=False, num_workers=0)
    seen = torch.cat([b["i"] for b in loader]).tolist()
    assert seen == list(range(n)) and len(sampler) == n
    # training (drop_last) still gets a full batch from a tiny dataset
    s = ResumableSampler(n, bs, shuffle=False, drop_last=True)
    assert len(list(s)) == len(s) == max(bs, n // bs * bs)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_16bit_png_scaled_not_saturated(tmp_path, mode):
    # issue: 16-bit PNGs decoded as white (Pillow's convert clips at 255)
    arr = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)
    path = str(tmp_path / "g16.png")
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    for cache in (False, True):
        got = np.asarray(ImageStore([path], mode=mode, cache=cache)[0])
        want = np.arange(256, dtype=np.uint8).reshape(16, 16)
        assert np.array_equal(got if mode == "L" else got[..., 0], want)


def test_32bit_integer_tiff_read_as_the_references_convert(tmp_path):
    # issue: a 32-bit integer TIFF holding 0..255 values was scaled as 16-bit (200 -> 1)
    path = str(tmp_path / "i32.tif")
    Image.fromarray(np.full((4, 4), 200, np.int32)).save(path)
    assert Image.open(path).mode == "I"
    for cache in (False, True):
        got = np.asarray(ImageStore([path], mode="RGB", cache=cache)[0])
        assert np.array_equal(got, np.asarray(Image.open(path).convert("RGB")))
        assert got.max() == 200


def test_pix2pix_checks_every_pair(tmp_path):
    # issue: only the first image's width was checked; a 1-px image trained as all -1
    _img(str(tmp_path / "train" / "a.png"), 16, 8)
    _img(str(tmp_path / "train" / "b.png"), 1, 8)
    with pytest.raises(DataError, match=r"b\.png.*1x8.*side by side"):
        AlignedDataset(str(tmp_path))


@pytest.mark.parametrize("value", ["2", "5", "-2"])
def test_stargan_attribute_values_other_than_1_minus1_0(tmp_path, value):
    # issue: a value other than 1/-1/0 silently became 0
    _img(str(tmp_path / "images" / "a.jpg"), 8, 8)
    (tmp_path / "list_attr_celeba.txt").write_text(f"1\nMale Young\na.jpg 1 {value}\n")
    with pytest.raises(DataError, match=rf"list_attr_celeba.txt:3: .*1 or -1.*got {value}"):
        CelebADataset(str(tmp_path), ["Male"], test_size=0)
    (tmp_path / "list_attr_celeba.txt").write_text("1\nMale Young\na.jpg 0 -1\n")
    assert CelebADataset(str(tmp_path), ["Male"], test_size=0).labels.tolist() == [[0.0]]


def test_channel_counts_checked_by_the_datasets(tmp_path):
    # issue: input_nc 4 reached the generator as 3 channels (a conv2d traceback mid-training)
    from ganengine.data import UnalignedDataset, build_dataset

    for i in range(2):
        _img(str(tmp_path / "train" / f"{i}.png"), 16, 8, seed=i)
        _img(str(tmp_path / "trainA" / f"{i}.png"), 8, 8, seed=i)
        _img(str(tmp_path / "trainB" / f"{i}.png"), 8, 8, seed=i)
    with pytest.raises(DataError, match=r"--input_nc 4: the pix2pix images are read as 3-channel RGB, or as "
                                        r"1-channel grayscale when --input_nc is 1"):
        AlignedDataset(str(tmp_path), input_nc=4)
    with pytest.raises(DataError, match=r"--output_nc 2: the CycleGAN images"):
        UnalignedDataset(str(tmp_path), output_nc=2)
    # 1 = grayscale on that side (the reference's get_transform(grayscale=True)), with BtoA too
    item = AlignedDataset(str(tmp_path), input_nc=1, direction="BtoA")[0]
    assert item["A"].shape[0] == 3 and item["B"].shape[0] == 1
    # the synthesis models name their own option: --nc for DCGAN, --channels for the others
    with pytest.raises(DataError, match=r"--nc 4: the images are read as 3-channel RGB.*use --nc 3 or 1"):
        build_dataset("dcgan", {"channels": 4, "image_size": 8})
    with pytest.raises(DataError, match=r"--channels 2: .*use --channels 3 or 1"):
        build_dataset("wgan", {"channels": 2, "image_size": 8})
    assert build_dataset("wgan", {"channels": 1, "image_size": 8})[0]["image"].shape == (1, 8, 8)


def test_missing_folder_hint_follows_the_command(tmp_path):
    from ganengine.data.images import missing_data_hint

    with pytest.raises(DataError, match="leave --dataroot out to train on the built-in sample data"):
        find_images(str(tmp_path / "nope"))
    with missing_data_hint("Use the data the model was trained on."):
        with pytest.raises(DataError, match=r"'.*nope' does not exist\. Use the data the model was trained on\.$"):
            find_images(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="to train on the built-in sample data"):  # restored afterwards
        find_images(str(tmp_path / "nope"))
