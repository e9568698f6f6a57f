"""pix2pix aligned pairs: ``DATAROOT/PHASE/*.jpg`` with A and B side by side (A|B), as in the
reference ``aligned_dataset.py``. Items always hold the left half as "A" and the right half as
"B"; the model applies ``direction`` (as the reference's set_input does), and the dataset only
uses it for the channel counts (with BtoA, A has output_nc channels)."""
from __future__ import annotations

import os

import torch

from ganengine.data import transforms as T
from ganengine.data.images import DataError, ImageStore, find_images, image_sizes
from ganengine.data.sampler import SeededDataset


def _check_pair(path: str, w: int, h: int) -> None:
    if w < 2 or h < 1:
        raise DataError(f"{path!r} is {w}x{h}: an aligned pair must hold A and B side by side (width 2*height). "
                        "Fix or remove that file.")


def split_pair(ab, o: T.TransformOptions | None):
    """The A and B halves of an A|B image, as the reference cuts them (A: the left w // 2 columns,
    B: the right w - w // 2, one wider for an odd width), except where ``o`` would then bring A
    and B to different sizes (``scale_width``; ``none`` for some widths: the reference's pair
    would not collate, nor train at batch 1): there B's last column is left out, so both halves
    keep one size. ``o`` None: the reference's cut. Used by the dataset and ``translate --aligned``."""
    w, h = ab.size
    half = w // 2
    right = w
    if o is not None and w % 2 and T.output_size((half, h), o) != T.output_size((w - half, h), o):
        right = 2 * half
    return ab.crop((0, 0, half, h)), ab.crop((half, 0, right, h))


class AlignedDataset(SeededDataset):
    def __init__(self, dataroot: str, phase: str = "train", transform: T.TransformOptions | None = None,
                 direction: str = "AtoB", input_nc: int = 3, output_nc: int = 3, cache="auto",
                 max_dataset_size: int | None = None):
        if direction not in ("AtoB", "BtoA"):
            raise ValueError(f"--direction must be AtoB or BtoA, got {direction!r}")
        T.check_channels(input_nc, output_nc, "pix2pix")  # the arguments first, then the files
        self.root = os.path.join(dataroot, phase)
        # (the reference's order: its make_dataset list, cut at max_dataset_size, then sorted as paths:
        # a sub-folder's files sort among the folder's own, not after them)
        paths = sorted(T.first_n(find_images(self.root, f"pix2pix {phase} folder (A|B pairs side by side)"),
                                 max_dataset_size))
        self.images = ImageStore(paths, cache=cache)
        self.transform = (transform or T.TransformOptions()).check()
        self.direction, self.input_nc, self.output_nc = direction, input_nc, output_nc
        # every pair, not only the first: a 1-px-wide image has empty halves (trained as all -1)
        sizes = image_sizes(paths)
        for path, (w, h) in zip(paths, sizes):
            _check_pair(path, w, h)
        T.check_crop_fits(paths, sizes, self.transform, half=True)

    def __len__(self) -> int:
        return len(self.images)

    def get(self, index: int, g: torch.Generator) -> dict:
        ab = self.images[index]
        w, h = ab.size
        _check_pair(self.images.paths[index], w, h)  # (datasets too large to check every header up front)
        a, b = split_pair(ab, self.transform)  # (an odd width: see split_pair)
        params = T.get_params(a.size, self.transform, g)  # one set of parameters for both halves
        a_nc, b_nc = (self.input_nc, self.output_nc) if self.direction == "AtoB" else (self.output_nc, self.input_nc)
        if a_nc == 1:
            a = a.convert("L")
        if b_nc == 1:
            b = b.convert("L")
        path = self.images.paths[index]
        return {"A": T.apply(a, self.transform, params), "B": T.apply(b, self.transform, params),
                "A_paths": path, "B_paths": path}
