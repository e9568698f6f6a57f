"""Class-conditional image datasets for the synthesis models (DCGAN, WGAN, WGAN-GP, cGAN, AC-GAN,
ADC-GAN, InfoGAN, SAGAN, BigGAN, BigGAN-deep, U-Net GAN).

Layouts (items ``{"image": (C, S, S) in [-1, 1], "label": int64 class index, "paths": str}``, C =
``channels``, 1 (grayscale, Pillow's ``convert("L")``) or 3):

* class per folder (ImageNet's and most class-conditional sets' layout)::

      DATAROOT/<phase>/<class>/*.png     (or DATAROOT/<class>/*.png: the train split only)

  sorted folder names are the class indices (``classes``); a missing DATAROOT/<phase>/ is an
  error, not DATAROOT read instead, except for the train split of a DATAROOT without split
  folders (train/, val/, test/);
* BigGAN-PyTorch's HDF5 (``make_hdf5.py``): a file (DATAROOT, or DATAROOT/*.hdf5) with
  ``imgs`` (N, 3, H, W) uint8 and ``labels`` (N,) integers;
* the built-in digits (``DATAROOT`` omitted): 1000 32x32 digits with their class in
  ``list_attr_celeba.txt`` (columns Zero .. Nine).

Images are centre-cropped to a square on the long edge (BigGAN's ``CenterCropLongEdge``),
resized to ``image_size`` (bilinear, torchvision's ``Resize`` as the references use it) and
randomly flipped where ``flip`` (the command line: ``--flip``; the references do not flip).
"""
from __future__ import annotations

import os

import torch
from PIL import Image

from ganengine.data import transforms as T
from ganengine.data.images import DataError, ImageStore, find_images, is_image
from ganengine.data.sampler import SeededDataset

DIGIT_NAMES = ["Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine"]


def square_resize(img: Image.Image, image_size: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    w, h = img.size
    s = min(w, h)
    left, top = int(round((w - s) / 2.0)), int(round((h - s) / 2.0))  # (torchvision's center_crop offsets)
    img = img.crop((left, top, left + s, top + s))
    if img.size != (image_size, image_size):  # (bilinear: torchvision's Resize, as the references)
        img = img.resize((image_size, image_size), Image.BILINEAR)
    if flip and T.coin(g):
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return T.to_tensor(img)


def _mode(channels: int, option: str = "--channels") -> str:
    """``option``: the command-line name of the channel count (``--nc`` for DCGAN)."""
    if isinstance(channels, bool) or channels not in (1, 3):
        raise DataError(f"{option} {channels!r}: the images are read as 3-channel RGB, or as 1-channel grayscale "
                        f"with {option} 1; use {option} 3 or 1")
    return "L" if channels == 1 else "RGB"


SPLITS = ("train", "val", "test")  # split folder names, never taken for classes


def _class_root(dataroot: str, phase: str) -> str:
    """DATAROOT/PHASE where it exists, else DATAROOT itself as the train split (DATAROOT/<class>/):
    another phase, or a DATAROOT holding split folders, would silently read other images (split
    folders as classes: an evaluation against train + val)."""
    split = os.path.join(dataroot, phase)
    if os.path.isdir(split):
        return split
    if not os.path.isdir(dataroot):
        raise DataError(f"class-per-folder root {dataroot!r} does not exist. Expected DATAROOT/<class>/*.png")
    found = [d for d in SPLITS if os.path.isdir(os.path.join(dataroot, d))]
    if phase == "train" and not found:
        return dataroot
    where = (f"{dataroot!r} holds the split folder(s) {', '.join(found)}: pick one with --phase" if found else
             f"{dataroot!r} holds its classes directly (DATAROOT/<class>/), which is the train split: use --phase "
             f"train, or add {split}/<class>/")
    raise DataError(f"class-per-folder split {split!r} does not exist (--phase {phase} reads "
                    f"DATAROOT/{phase}/<class>/*.png); {where}")


class ClassFolderDataset(SeededDataset):
    def __init__(self, dataroot: str, image_size: int = 128, flip: bool = True, phase: str = "train", cache="auto",
                 channels: int = 3, channel_option: str = "--channels"):
        mode = _mode(channels, channel_option)  # the arguments first, then the files
        root = _class_root(dataroot, phase)
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        loose = [f for f in os.listdir(root) if is_image(f)]
        if not self.classes or loose:
            raise DataError(f"{root!r} must hold one sub-folder per class and no loose images (found "
                            f"{len(self.classes)} sub-folders and {len(loose)} images there): put each class's "
                            f"images in {root}/<class>/")
        paths, labels = [], []
        for k, c in enumerate(self.classes):
            found = find_images(os.path.join(root, c), f"class folder {c!r}")
            paths += found
            labels += [k] * len(found)
        self.images = ImageStore(paths, mode=mode, cache=cache)
        self.labels = torch.tensor(labels)
        self.image_size, self.flip = image_size, flip

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.images)

    def get(self, index: int, g: torch.Generator) -> dict:
        img = square_resize(self.images[index], self.image_size, self.flip, g)
        return {"image": img, "label": self.labels[index], "paths": self.images.paths[index]}


class DigitsDataset(ClassFolderDataset):
    """The built-in digits (``ganengine/data/sample/digits``) as a 10-class dataset."""

    def __init__(self, root: str, image_size: int = 32, flip: bool = False, cache="auto", channels: int = 3,
                 channel_option: str = "--channels"):
        mode = _mode(channels, channel_option)
        from ganengine.data.labelled import read_attr_file

        names, rows = read_attr_file(os.path.join(root, "list_attr_celeba.txt"))
        cols = [names.index(n) for n in DIGIT_NAMES]
        paths, labels = [], []
        for fname, values in rows:
            paths.append(os.path.join(root, "images", fname))
            labels.append(max(range(10), key=lambda k: values[cols[k]]))
        self.classes = list(DIGIT_NAMES)
        self.images = ImageStore(paths, mode=mode, cache=cache)
        self.labels = torch.tensor(labels)
        self.image_size, self.flip = image_size, flip


def _hdf5_files(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith((".hdf5", ".h5")))


def hdf5_image_size(dataroot: str) -> int | None:
    """The image size of a BigGAN-PyTorch HDF5 dataset at ``dataroot`` (the file, or a folder with
    one), None for other data or a file that cannot be read (HDF5Dataset then says why)."""
    path = dataroot
    if os.path.isdir(dataroot):
        files = _hdf5_files(dataroot)
        if len(files) != 1:
            return None
        path = os.path.join(dataroot, files[0])
    if not os.path.isfile(path):
        return None
    try:
        import h5py

        with h5py.File(path, "r") as f:
            shape = f["imgs"].shape
        return int(shape[-1]) if len(shape) == 4 and shape[-1] == shape[-2] else None
    except Exception:  # (not HDF5, no 'imgs', no h5py: the dataset reports it)
        return None


class HDF5Dataset(SeededDataset):
    """BigGAN-PyTorch's ``ILSVRC*.hdf5``: ``imgs`` (N, 3, H, W) uint8, ``labels`` (N,)."""

    def __init__(self, path: str, image_size: int | None = None, flip: bool = False, channels: int = 3,
                 channel_option: str = "--channels"):
        gray = _mode(channels, channel_option) == "L"
        try:
            import h5py
        except ImportError:
            raise DataError("reading an HDF5 dataset needs the h5py package (pip install h5py)") from None
        if os.path.isdir(path):
            files = _hdf5_files(path)
            if len(files) != 1:
                raise DataError(f"{path!r} holds {len(files)} .hdf5 files; pass the file itself as --dataroot")
            path = os.path.join(path, files[0])
        try:
            f = h5py.File(path, "r")
        except OSError as exc:  # (not an HDF5 file: h5py's words name no option)
            raise DataError(f"--dataroot {path!r} is a file, which is read as a BigGAN-PyTorch HDF5 dataset, but it "
                            f"cannot be opened as HDF5 ({exc}); pass an .hdf5 file or a folder of class "
                            "subfolders") from None
        with f:
            missing = [k for k in ("imgs", "labels") if k not in f]
            if missing:
                raise DataError(f"{path!r} lacks the dataset(s) {missing}; BigGAN-PyTorch's layout has 'imgs' "
                                "(N, 3, H, W) uint8 and 'labels' (N,)")
            imgs = f["imgs"]
            if imgs.ndim != 4 or imgs.shape[1] != 3 or imgs.dtype.kind != "u":
                raise DataError(f"{path!r}: 'imgs' must be (N, 3, H, W) uint8, got {imgs.shape} {imgs.dtype}")
            if f["labels"].shape[0] != imgs.shape[0]:
                raise DataError(f"{path!r}: {imgs.shape[0]} images but {f['labels'].shape[0]} labels")
            self.imgs = torch.from_numpy(imgs[...])
            self.labels = torch.from_numpy(f["labels"][...].astype("int64"))
        self.path, self.flip, self.gray = path, flip, gray
        self.image_size = image_size or self.imgs.shape[-1]
        self.classes = [str(k) for k in range(int(self.labels.max()) + 1)] if len(self.labels) else []
        self.paths = [f"{path}[{i}]" for i in range(len(self.labels))]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.imgs.shape[0]

    def get(self, index: int, g: torch.Generator) -> dict:
        img = self.imgs[index].float()
        if self.gray:  # ITU-R 601-2 luma, as Pillow's convert("L")
            img = (img[0] * 299 + img[1] * 587 + img[2] * 114).div_(1000).round_()[None]
        img = img / 127.5 - 1
        if img.shape[-1] != self.image_size or img.shape[-2] != self.image_size:
            img = torch.nn.functional.interpolate(img[None], size=(self.image_size, self.image_size),
                                                  mode="bilinear", align_corners=False, antialias=True)[0]
        if self.flip and T.coin(g):
            img = img.flip(-1)
        return {"image": img, "label": self.labels[index], "paths": self.paths[index]}


def class_dataset(dataroot: str | None, sample_root: str, image_size: int, flip: bool, phase: str = "train",
                  cache="auto", channels: int = 3, channel_option: str = "--channels"):
    """``channel_option``: the command-line name of ``channels`` (for the error message)."""
    if dataroot is None:
        return DigitsDataset(sample_root, image_size, flip=False, cache=cache, channels=channels,
                             channel_option=channel_option)
    if os.path.isfile(dataroot) or (os.path.isdir(dataroot) and _hdf5_files(dataroot)):
        return HDF5Dataset(dataroot, image_size, flip, channels=channels, channel_option=channel_option)
    return ClassFolderDataset(dataroot, image_size, flip, phase, cache=cache, channels=channels,
                              channel_option=channel_option)
