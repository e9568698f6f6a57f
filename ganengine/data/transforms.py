"""The reference implementations' image transforms, written with Pillow and torch.

pix2pix/CycleGAN (``--preprocess``): ``resize_and_crop`` (resize to load_size, random crop to
crop_size), ``crop``, ``scale_width``, ``scale_width_and_crop``, ``none`` (round to a multiple of
4), then a random horizontal flip unless ``no_flip``, then normalise to [-1, 1]. Aligned pairs
share one set of random parameters, as in the reference. StarGAN: flip, centre crop, resize.
StackGAN: resize to 76/64 of the image size, random crop, flip.

Random choices come from a ``torch.Generator`` handed in by the dataset (seeded per item from
the run seed, the epoch and the index), so augmentation does not depend on the number of
DataLoader workers and an interrupted run resumes with the same crops and flips.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

PREPROCESS = ("resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "none")


def randint(g: torch.Generator, high: int) -> int:
    """Uniform integer in [0, high] (inclusive, like random.randint(0, high))."""
    return int(torch.randint(0, high + 1, (1,), generator=g)) if high > 0 else 0


def coin(g: torch.Generator) -> bool:
    return bool(torch.rand((), generator=g) > 0.5)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> float (C, H, W) in [-1, 1] (ToTensor + Normalize(0.5, 0.5))."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
    return t.div_(127.5).sub_(1.0)


def to_image(t: torch.Tensor) -> Image.Image:
    """(C, H, W) tensor in [-1, 1] -> PIL RGB/L image.

    Pixel values as the junyanz reference's ``util.tensor2im``: ``(x + 1) / 2 * 255`` in float32,
    truncated (``astype(np.uint8)``), here clamped to [0, 255] first; so ``translate`` writes
    the bytes the reference's test.py writes. One exception keeps ``to_image(to_tensor(img))``
    equal to ``img``: a value that is exactly ``to_tensor``'s value of a level k
    (``k / 127.5 - 1`` in float32) gives k, where the float32 formula can land just below k
    (63 of the 256 levels) and truncation would give k - 1. Network outputs hit those 256 exact
    values with probability ~0, except -1 and 1 (0 and 255 either way)."""
    x = t.detach().float().cpu()
    level = ((x + 1) / 2 * 255).clamp(0, 255).floor()  # tensor2im: truncation (non-negative here)
    k = ((x + 1) * 127.5).round().clamp(0, 255)
    arr = torch.where(k / 127.5 - 1 == x, k, level).to(torch.uint8)
    arr = arr.permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], "L")
    return Image.fromarray(arr[:, :, :3], "RGB")


@dataclass
class TransformOptions:
    preprocess: str = "resize_and_crop"
    load_size: int = 286
    crop_size: int = 256
    flip: bool = True
    resample: int = Image.BICUBIC  # the resize filter (junyanz's; StackGAN's get_img uses BILINEAR)
    center: bool = False  # crop at the centre, not at random (evaluation)

    def held_out(self) -> "TransformOptions":
        """The transform of the other splits (evaluation, sample, translate): the reference's test
        options (load_size = crop_size: "avoid cropping when testing"), any crop central rather
        than random, no flip."""
        return TransformOptions(self.preprocess, self.crop_size, self.crop_size, False, self.resample, center=True)

    def check(self) -> "TransformOptions":
        if self.preprocess not in PREPROCESS:
            raise ValueError(f"--preprocess must be one of {PREPROCESS}, got {self.preprocess!r}")
        if self.load_size < 1 or self.crop_size < 1:
            raise ValueError(f"--load_size and --crop_size must be positive, got {self.load_size}, {self.crop_size}")
        if "crop" in self.preprocess and self.preprocess != "crop" and self.crop_size > self.load_size:
            raise ValueError(f"--crop_size ({self.crop_size}) must not exceed --load_size ({self.load_size}) "
                             f"with --preprocess {self.preprocess}")
        return self


def check_channels(input_nc, output_nc, what: str) -> None:
    """pix2pix/CycleGAN read each image as 3-channel RGB, or as 1-channel grayscale when its
    side's channel count is 1 (the reference's ``get_transform(grayscale=(nc == 1))``): any other
    count would reach the networks as 3 channels and fail inside the first convolution."""
    from ganengine.data.images import DataError

    for option, nc in (("--input_nc", input_nc), ("--output_nc", output_nc)):
        if isinstance(nc, bool) or not isinstance(nc, int) or nc not in (1, 3):
            raise DataError(f"{option} {nc!r}: the {what} images are read as 3-channel RGB, or as 1-channel "
                            f"grayscale when {option} is 1 (as the reference's get_transform(grayscale=...)); "
                            f"use {option} 3 or 1")


def first_n(paths: list[str], max_dataset_size) -> list[str]:
    """The reference's ``--max_dataset_size``: at most that many images of a folder (None: all).
    The first of the sorted paths, so the subset does not depend on the file system's listing
    order (the reference cuts ``os.walk``'s unsorted file lists)."""
    if max_dataset_size is None:
        return paths
    if isinstance(max_dataset_size, bool) or not isinstance(max_dataset_size, int) or max_dataset_size < 1:
        raise ValueError(f"--max_dataset_size must be a whole number >= 1, got {max_dataset_size!r}")
    return paths[:max_dataset_size]


def check_crop_fits(paths: list[str], sizes: list[tuple[int, int]], o: TransformOptions, half: bool = False) -> None:
    """--preprocess crop takes crop_size x crop_size from each image as it is: an image smaller
    than that would come out smaller (a batch of mixed sizes, or a size the networks cannot
    take). ``half``: the image holds an A|B pair side by side."""
    if o.preprocess != "crop":
        return
    from ganengine.data.images import DataError

    for p, (w, h) in zip(paths, sizes):
        w = w // 2 if half else w
        if w < o.crop_size or h < o.crop_size:
            raise DataError(f"{p!r} is {w}x{h}{' per half' if half else ''}, smaller than --crop_size {o.crop_size} "
                            "with --preprocess crop. Use a smaller --crop_size, --preprocess resize_and_crop, or "
                            "remove the image.")


def _resized_size(w: int, h: int, o: TransformOptions) -> tuple[int, int]:
    if o.preprocess == "resize_and_crop":
        return o.load_size, o.load_size
    if o.preprocess.startswith("scale_width"):  # width to load_size, height kept >= crop_size
        if w == o.load_size and h >= o.crop_size:
            return w, h
        return o.load_size, max(int(o.load_size * h / w), o.crop_size)
    return w, h


def _multiple_of_4(w: int, h: int) -> tuple[int, int]:
    # the reference's rounding under --preprocess none, so the U-Net/ResNet shapes work
    return max(4, round(w / 4) * 4), max(4, round(h / 4) * 4)


def output_size(size: tuple[int, int], o: TransformOptions) -> tuple[int, int]:
    """The (w, h) ``apply`` gives an image of ``size`` under ``o``, whatever the crop position."""
    w, h = _resized_size(*size, o)
    if "crop" in o.preprocess:
        w, h = min(w, o.crop_size), min(h, o.crop_size)
    return _multiple_of_4(w, h) if o.preprocess == "none" else (w, h)


def get_params(size: tuple[int, int], o: TransformOptions, g: torch.Generator) -> dict:
    """Random crop position and flip for an image of ``size`` (w, h), as the reference get_params."""
    w, h = _resized_size(*size, o)
    if o.center:  # (torchvision's CenterCrop position)
        x, y = int(round(max(0, w - o.crop_size) / 2.0)), int(round(max(0, h - o.crop_size) / 2.0))
    else:
        x = randint(g, max(0, w - o.crop_size))
        y = randint(g, max(0, h - o.crop_size))
    return {"crop_pos": (x, y), "flip": coin(g) if o.flip else False}


def apply(img: Image.Image, o: TransformOptions, params: dict) -> torch.Tensor:
    w, h = img.size
    nw, nh = _resized_size(w, h, o)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), o.resample)
    if "crop" in o.preprocess:
        x, y = params["crop_pos"]
        cs = o.crop_size
        if nw > cs or nh > cs:
            img = img.crop((x, y, x + min(cs, nw), y + min(cs, nh)))
    if o.preprocess == "none":
        rw, rh = _multiple_of_4(nw, nh)
        if (rw, rh) != (nw, nh):
            img = img.resize((rw, rh), Image.BICUBIC)
    if params.get("flip"):
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(img)


def stargan_crop_size(options: dict, folder_per_domain: bool) -> int:
    """StarGAN's centre crop, as the reference's defaults: --rafd_crop_size (else --crop_size, else
    256) for folder-per-domain (RaFD) data, --crop_size (--celeba_crop_size, else 178) for CelebA."""
    crop = options.get("crop_size")
    if folder_per_domain:
        return options.get("rafd_crop_size") or crop or 256
    return crop or 178


def stargan(img: Image.Image, crop_size: int, image_size: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    """StarGAN: RandomHorizontalFlip, CenterCrop(crop_size), Resize(image_size), Normalize."""
    if flip and coin(g):
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    w, h = img.size
    cs = crop_size
    if cs > w or cs > h:
        # torchvision's CenterCrop pads a smaller image with zeros to the crop size first (the
        # reference's RaFD images under --rafd_crop_size 256, say): the same bands here
        pl, pt = (cs - w) // 2 if cs > w else 0, (cs - h) // 2 if cs > h else 0
        pr, pb = (cs - w + 1) // 2 if cs > w else 0, (cs - h + 1) // 2 if cs > h else 0
        canvas = Image.new(img.mode, (w + pl + pr, h + pt + pb), 0)
        canvas.paste(img, (pl, pt))
        img, (w, h) = canvas, canvas.size
    left, top = int(round((w - cs) / 2.0)), int(round((h - cs) / 2.0))
    img = img.crop((left, top, left + cs, top + cs))
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    return to_tensor(img)


def stackgan(img: Image.Image, image_size: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    """StackGAN: resize to image_size * 76 / 64 (bilinear, as the reference's get_img),
    RandomCrop(image_size), RandomHorizontalFlip."""
    load = int(image_size * 76 / 64)
    o = TransformOptions("resize_and_crop", load, image_size, flip, Image.BILINEAR)
    return apply(img, o, get_params(img.size, o, g))
