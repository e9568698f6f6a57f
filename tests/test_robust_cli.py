"""Regression tests of issue 22's tracebacks in the data and CLI paths, each now one clear line:
truncated images (decode-checked before training), crops larger than the image, mixed sizes in
a batch, sizes the networks cannot take, bad StackGAN embeddings, a bad Inception weights file."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ganengine.cli import main
from ganengine.data import AlignedDataset, CaptionedDataset, DataError, TransformOptions, UnalignedDataset
from ganengine.data.images import ImageStore
from ganengine.train.engine import _explain

from tests._train_utils import one_thread, tiny_config  # noqa: F401  (fixture)


def _img(path, w, h, seed=0, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, fmt)


def test_truncated_image_found_before_training_without_cache(tmp_path):
    # issue: a truncated JPEG passed the header check and stopped training mid-epoch
    good, bad = str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")
    _img(good, 64, 64)
    _img(bad, 64, 64, seed=1)
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cannot read image .*b\.jpg"):
        ImageStore([good, bad], cache=False)
    with pytest.raises(DataError, match=r"cannot read image .*b\.jpg"):
        ImageStore([good, bad], cache=True)


def test_crop_larger_than_image(tmp_path):
    for i in range(2):
        _img(str(tmp_path / "train" / f"{i}.png"), 40 if i else 64, 32)
        _img(str(tmp_path / "trainA" / f"{i}.png"), 30 if i else 40, 40)
        _img(str(tmp_path / "trainB" / f"{i}.png"), 40, 40)
    o = TransformOptions("crop", 286, 32)
    with pytest.raises(DataError, match=r"1\.png' is 20x32 per half, smaller than --crop_size 32"):
        AlignedDataset(str(tmp_path), transform=o)
    with pytest.raises(DataError, match=r"1\.png' is 30x40, smaller than --crop_size 32"):
        UnalignedDataset(str(tmp_path), transform=o)


def test_explain_runtime_errors():
    wrapped = RuntimeError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                           "call last):\n  File x\nganengine.data.images.DataError: cannot read image 'x.jpg'")
    e = _explain(wrapped, False, None)
    assert isinstance(e, DataError) and str(e) == "cannot read image 'x.jpg'"
    e = _explain(RuntimeError("stack expects each tensor to be equal size, but got [3, 8, 8] at entry 0"), False, None)
    assert isinstance(e, ValueError) and "different sizes" in str(e)
    shape = RuntimeError("Calculated padded input size per channel: (1 x 1). Kernel size: (4 x 4).")
    assert "cannot take 8x8 inputs" in str(_explain(shape, True, (2, 3, 8, 8)))
    assert _explain(shape, False, (2, 3, 8, 8)) is shape  # later steps: not a data setting
    other = RuntimeError("something else")
    assert _explain(other, True, None) is other


def test_mixed_sizes_with_preprocess_none(tmp_path, capsys, one_thread):
    for i, (w, h) in enumerate([(64, 32), (80, 40)]):
        _img(str(tmp_path / "data" / "train" / f"{i}.png"), w, h)
    rc = main(["train", "pix2pix", "--dataroot", str(tmp_path / "data"), "--checkpoints_dir", str(tmp_path / "c"),
               "--preprocess", "none", "--batch_size", "2", "--max_steps", "1", "--no_progress", "--tensorboard",
               "off", "--netG", "resnet_6blocks", "--ngf", "4", "--ndf", "4", "--n_layers_D", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "different sizes" in err and "Traceback" not in err


def test_size_the_network_cannot_take(tmp_path, capsys, one_thread):
    rc = main(["train", "pix2pix", "--checkpoints_dir", str(tmp_path), "--netG", "unet_256", "--ngf", "4", "--ndf",
               "4", "--load_size", "36", "--crop_size", "32", "--batch_size", "2", "--max_steps", "1",
               "--no_progress", "--tensorboard", "off"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot take 32x32 inputs" in err and "Traceback" not in err


@pytest.mark.parametrize("emb,msg", [
    ([[0.1] * 8, [0.2] * 8], "is a list"),
    (torch.zeros(2, 0, 8), r"E, T >= 1"),
    (torch.tensor([[0.1] * 8, [float("nan")] * 8]), "NaN or inf"),
    (torch.zeros(2, 8, dtype=torch.long), "torch.int64 tensor"),
])
def test_stackgan_bad_embeddings(tmp_path, emb, msg):
    for i in range(2):
        _img(str(tmp_path / "images" / f"{i}.png"), 16, 16, seed=i)
    torch.save({"filenames": ["0.png", "1.png"], "embeddings": emb}, tmp_path / "embeddings.pt")
    with pytest.raises(DataError, match=msg):
        CaptionedDataset(str(tmp_path))


def test_inception_weights_bad_file(tmp_path):
    from ganengine.metrics import load_fid_inception

    path = tmp_path / "w.pth"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(ValueError, match=r"cannot read Inception weights .*w\.pth"):
        load_fid_inception(str(path))
