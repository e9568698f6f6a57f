"""Regenerate the built-in sample data in ``ganengine/data/sample/`` (a development-time script).

The sample data ships with the package so that ``ganengine train MODEL`` without ``--dataroot``
works offline. It is made from real images that two PyPI packages carry in their wheels
(nothing is downloaded, here or at run time):

* scikit-image's bundled photographs (``skimage/data/*.png|jpg``; only files that are inside the
  wheel, never the ones ``skimage.data`` fetches with pooch): astronaut (NASA, public domain),
  chelsea (Stefan van der Walt, CC0), coffee (Rachel Michetti, CC0), rocket (SpaceX, public
  domain), hubble_deep_field (NASA, public domain).
* scikit-learn's handwritten digits (``sklearn/datasets/data/digits.csv.gz``, the UCI "Optical
  Recognition of Handwritten Digits" test set, CC BY 4.0): 1797 8x8 images with labels 0-9.

Layouts written (the reference implementations' layouts, read by the same loaders as real data):

* ``photos_paired/{train,val}/NNNN.jpg``: pix2pix aligned pairs, A|B side by side, each half
  72x72. A is the grayscale version of B, B a colour crop (a colourisation task). Train crops come
  from the left 80% of each photo, val crops from the right 20%, so they do not overlap.
* ``photos_unpaired/{trainA,trainB,testA,testB}/NNNN.jpg``: CycleGAN unaligned domains, 72x72.
  A = colour crops, B = grayscale crops of *other* random crops (colour <-> grayscale).
* ``digits/images/NNNN.png`` (32x32 grayscale) with ``digits/list_attr_celeba.txt`` (StarGAN's
  CelebA attribute format: count line, attribute-name line, then ``file v1 v2 ...`` with 1/-1;
  attributes Zero..Nine and Bold = ink above the median of its class) and
  ``digits/captions.txt`` (StackGAN captions: ``file<TAB>caption``, five per image).

Run (needs scikit-image, scikit-learn and Pillow; users never need the first two):
    python -m ganengine.data.make_sample [--out ganengine/data/sample]
"""
from __future__ import annotations

import argparse
import os
import random
import shutil

import numpy as np
from PIL import Image

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg"]
DIGIT_NAMES = ["Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine"]
SIDE = 72  # stored size; the sample defaults resize to 72 and random-crop 64 (reference 286 -> 256)
JPEG_QUALITY = 92


def _skimage_photos() -> list[Image.Image]:
    import skimage

    folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    out = []
    for name in PHOTOS:
        path = os.path.join(folder, name)
        if not os.path.exists(path):  # must be bundled: we never fetch
            raise SystemExit(f"{path} is not bundled in this scikit-image wheel")
        out.append(Image.open(path).convert("RGB"))
    return out


def _random_crop(img: Image.Image, rng: random.Random, x_lo: float, x_hi: float) -> Image.Image:
    """A square crop of random size (1/4..2/3 of the short side) inside columns [x_lo, x_hi) * W."""
    w, h = img.size
    short = min(w, h)
    lo_px, hi_px = int(x_lo * w), int(x_hi * w)
    hi_side = min(short * 2 // 3, hi_px - lo_px)
    side = rng.randint(min(short // 4, hi_side), hi_side)
    x = rng.randint(lo_px, hi_px - side)
    y = rng.randint(0, h - side)
    return img.crop((x, y, x + side, y + side)).resize((SIDE, SIDE), Image.BICUBIC)


def _gray(img: Image.Image) -> Image.Image:
    return img.convert("L").convert("RGB")


def _crops(photos, rng, n, x_lo, x_hi):
    return [_random_crop(photos[i % len(photos)], rng, x_lo, x_hi) for i in range(n)]


def make_paired(out: str, photos, rng: random.Random, n_train=120, n_val=20) -> None:
    for split, n, (lo, hi) in (("train", n_train, (0.0, 0.8)), ("val", n_val, (0.8, 1.0))):
        os.makedirs(os.path.join(out, split))
        for i, b in enumerate(_crops(photos, rng, n, lo, hi)):
            ab = Image.new("RGB", (2 * SIDE, SIDE))
            ab.paste(_gray(b), (0, 0))
            ab.paste(b, (SIDE, 0))
            ab.save(os.path.join(out, split, f"{i:04d}.jpg"), quality=JPEG_QUALITY)


def make_unpaired(out: str, photos, rng: random.Random, n_train=100, n_test=12) -> None:
    for phase, n, (lo, hi) in (("train", n_train, (0.0, 0.8)), ("test", n_test, (0.8, 1.0))):
        for domain, convert in (("A", lambda im: im), ("B", _gray)):
            folder = os.path.join(out, phase + domain)
            os.makedirs(folder)
            for i, img in enumerate(_crops(photos, rng, n, lo, hi)):
                convert(img).save(os.path.join(folder, f"{i:04d}.jpg"), quality=JPEG_QUALITY)


CAPTION_TEMPLATES = [
    "a handwritten digit {name}",
    "the number {digit} written by hand",
    "a {weight} handwritten {name}",
    "a scanned {name} drawn with a {weight} pen stroke",
    "an image of the digit {name} in white ink on black",
]


def make_digits(out: str, rng: random.Random, per_class=100) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target
    ink = images.reshape(len(images), -1).sum(1)
    median = {c: np.median(ink[labels == c]) for c in range(10)}
    chosen = [i for c in range(10) for i in np.flatnonzero(labels == c)[:per_class]]
    rng.shuffle(chosen)
    os.makedirs(os.path.join(out, "images"))
    attr_lines, caption_lines = [], []
    for k, i in enumerate(chosen):
        name = f"{k:04d}.png"
        pixels = (images[i] / 16.0 * 255.0).round().astype(np.uint8)
        Image.fromarray(pixels, "L").resize((32, 32), Image.BICUBIC).save(os.path.join(out, "images", name))
        c = int(labels[i])
        bold = ink[i] > median[c]
        values = [1 if j == c else -1 for j in range(10)] + [1 if bold else -1]
        attr_lines.append(name + " " + " ".join(f"{v:2d}" for v in values))
        weight = "thick" if bold else "thin"
        for t in CAPTION_TEMPLATES:
            caption_lines.append(f"{name}\t" + t.format(name=DIGIT_NAMES[c].lower(), digit=c, weight=weight))
    with open(os.path.join(out, "list_attr_celeba.txt"), "w") as f:
        f.write(f"{len(attr_lines)}\n" + " ".join(DIGIT_NAMES + ["Bold"]) + "\n" + "\n".join(attr_lines) + "\n")
    with open(os.path.join(out, "captions.txt"), "w") as f:
        f.write("\n".join(caption_lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    readme = os.path.join(args.out, "README.md")
    kept = open(readme).read() if os.path.exists(readme) else None
    for sub in ("photos_paired", "photos_unpaired", "digits"):
        shutil.rmtree(os.path.join(args.out, sub), ignore_errors=True)
    rng = random.Random(args.seed)
    photos = _skimage_photos()
    make_paired(os.path.join(args.out, "photos_paired"), photos, rng)
    make_unpaired(os.path.join(args.out, "photos_unpaired"), photos, rng)
    make_digits(os.path.join(args.out, "digits"), rng)
    if kept is not None:
        with open(readme, "w") as f:
            f.write(kept)
    print(f"sample data written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
