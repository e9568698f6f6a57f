"""Image files: listing a folder, decoding with clear errors, and an in-memory decoded-image cache.

Image I/O uses Pillow: it is well kept, decodes every format the reference datasets use
(JPEG, PNG, BMP, ...), and the reference implementations use it too, so images decode to the
same pixels as there.
"""
from __future__ import annotations

import contextlib
import contextvars
import os

import numpy as np
from PIL import Image

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# decoded-image cache: on by default when the decoded images fit in this many bytes
CACHE_AUTO_BYTES = 1 << 30
# a dataset with more files than this is not header-checked up front (it would take too long)
CHECK_ALL_LIMIT = 20000


class DataError(ValueError):
    """A dataset problem found before training: names the file or folder and the fix."""


def is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


TRAIN_HINT = "Check --dataroot (and --phase), or leave --dataroot out to train on the built-in sample data."
# what the "does not exist" / "no images" errors tell the user to do: ``ganengine train``'s advice
# by default; other commands set their own for the duration of a call (``missing_data_hint``)
_HINT: contextvars.ContextVar[str] = contextvars.ContextVar("ganengine_data_hint", default=TRAIN_HINT)


@contextlib.contextmanager
def missing_data_hint(hint: str):
    """Within the block, a missing dataset folder is reported with ``hint`` instead of the
    training command's advice (e.g. ``ganengine sample --dataroot``: leave it out to use the
    data the model was trained on)."""
    token = _HINT.set(hint)
    try:
        yield
    finally:
        _HINT.reset(token)


def find_images(folder: str, what: str = "image folder", recursive: bool = True, hint: str | None = None) -> list[str]:
    """Sorted image paths under ``folder``; a DataError if it is missing or has no images
    (``hint``: what to do about it; default: the current ``missing_data_hint``)."""
    if not os.path.isdir(folder):
        raise DataError(f"{what} {folder!r} does not exist. {hint or _HINT.get()}")
    paths = []
    if recursive:
        # symbolic links to folders are followed, but a folder reached twice (a link loop, or two
        # links to one folder) is listed once: os.walk would otherwise descend a loop until the
        # path is too long and list its images dozens of times. A link to the folder itself or
        # to a folder above it is a loop too, and is not followed at all: through it the walk
        # would reach the dataset's other domains and its test split (trainA/up -> .. lists
        # trainB and testA as trainA images)
        top = os.path.realpath(folder)
        seen: set[str] = set()
        walked = []
        for root, dirs, files in os.walk(folder, followlinks=True):
            real = os.path.realpath(root)
            above = root != folder and (real == top or top.startswith(real.rstrip(os.sep) + os.sep))
            if real in seen or above:
                dirs[:] = []
                continue
            seen.add(real)
            dirs.sort()
            walked.append((root, files))
        for root, files in sorted(walked):
            paths += [os.path.join(root, f) for f in sorted(files) if is_image(f)]
    else:
        paths = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if is_image(f)]
    if not paths:
        raise DataError(f"{what} {folder!r} contains no images (looked for {', '.join(IMG_EXTENSIONS)}). "
                        + (hint or "Put the images there or point --dataroot at the folder that holds them."))
    return paths


# Pillow's 16-bit grayscale modes (16-bit PNG, TIFF): convert("L"/"RGB") clips them at 255, so an
# image above 1/256 of full range came out white. They are scaled to 8 bits instead (v / 257,
# rounded: 65535 -> 255). "I" (32-bit) is what older Pillow gives a 16-bit PNG, and Pillow gives a
# 16-bit PGM: read as 16-bit, unless the file says it has 32 bits per sample (to_8bit).
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_8bit(img: Image.Image) -> Image.Image:
    if img.mode not in _WIDE_MODES:
        return img
    if img.mode == "I" and _bits_per_sample(img) == 32:
        # a 32-bit integer image (TIFF): Pillow's own conversion, which clips to 0..255, as the
        # references' convert('RGB') reads it (integer images holding 8-bit values come out as they are)
        return img.convert("L")
    arr = np.asarray(img).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), mode="L")


def _bits_per_sample(img: Image.Image) -> int | None:
    """The file's bits per sample where the format records them (TIFF's tag 258), else None."""
    tags = getattr(img, "tag_v2", None)
    bits = tags.get(258) if tags is not None else None
    if isinstance(bits, tuple):
        bits = max(bits) if bits else None
    return int(bits) if bits else None


def _open(path: str) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except Exception as exc:  # PIL raises several types for broken files
        raise DataError(f"cannot read image {path!r} ({type(exc).__name__}: {exc}). "
                        "Replace or delete the file.") from exc
    return to_8bit(img)


def check_readable(paths: list[str], decode: bool = False) -> None:
    """Parse every header (cheap) so a broken file is reported before training starts; with
    ``decode``, decode every pixel too (a truncated JPEG has a good header and fails only when
    decoded, which would otherwise stop training mid-epoch)."""
    todo = paths if len(paths) <= CHECK_ALL_LIMIT else paths[:: max(1, len(paths) // 1000)]
    for p in todo:
        try:
            with Image.open(p) as img:
                if decode:
                    img.load()
                else:
                    img.size  # noqa: B018 - forces the header parse
        except Exception as exc:
            raise DataError(f"cannot read image {p!r} ({type(exc).__name__}: {exc}). "
                            "Replace or delete the file.") from exc


def image_sizes(paths: list[str]) -> list[tuple[int, int]]:
    """(width, height) from each header, for datasets small enough to check in full (a larger
    one gets an empty list: its images are checked as they are loaded)."""
    if len(paths) > CHECK_ALL_LIMIT:
        return []
    out = []
    for p in paths:
        with Image.open(p) as img:
            out.append(img.size)
    return out


def decoded_bytes(paths: list[str]) -> int:
    total = 0
    for p in paths:
        with Image.open(p) as img:
            total += img.size[0] * img.size[1] * 3
    return total


class ImageStore:
    """Loads images by index as RGB (or L) PIL images, keeping decoded pixels when ``cache``.

    The cache is filled in the constructing process, so DataLoader workers (forked) share it
    copy-on-write instead of each decoding the files again.
    """

    def __init__(self, paths: list[str], mode: str = "RGB", cache: bool | str = "auto"):
        self.paths = list(paths)
        self.mode = mode
        check_readable(self.paths)
        if cache == "auto":
            cache = len(self.paths) <= CHECK_ALL_LIMIT and decoded_bytes(self.paths) <= CACHE_AUTO_BYTES
        self.cached: list[np.ndarray] | None = None
        if cache:  # (decoding everything also proves every file decodes)
            self.cached = [np.asarray(self._decode(p)) for p in self.paths]
        else:
            check_readable(self.paths, decode=True)

    def _decode(self, path: str) -> Image.Image:
        img = _open(path)
        return img.convert(self.mode) if img.mode != self.mode else img

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Image.Image:
        if self.cached is not None:
            return Image.fromarray(self.cached[index])
        return self._decode(self.paths[index])
