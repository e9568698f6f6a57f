"""CycleGAN unaligned domains: ``DATAROOT/PHASEA`` and ``DATAROOT/PHASEB`` (e.g. trainA, trainB),
as in the reference ``unaligned_dataset.py``: A is taken in order, B at random (or in order with
``serial_batches``); an epoch has max(|A|, |B|) items. As in the reference, "A" is always
the A folder: the model applies ``direction``; here it only sets the channel counts."""
from __future__ import annotations

import os

import torch

from ganengine.data import transforms as T
from ganengine.data.images import ImageStore, find_images, image_sizes
from ganengine.data.sampler import SeededDataset


class UnalignedDataset(SeededDataset):
    def __init__(self, dataroot: str, phase: str = "train", transform: T.TransformOptions | None = None,
                 direction: str = "AtoB", input_nc: int = 3, output_nc: int = 3,
                 serial_batches: bool = False, cache="auto", max_dataset_size: int | None = None):
        if direction not in ("AtoB", "BtoA"):
            raise ValueError(f"--direction must be AtoB or BtoA, got {direction!r}")
        T.check_channels(input_nc, output_nc, "CycleGAN")  # the arguments first, then the files
        a_dir, b_dir = os.path.join(dataroot, phase + "A"), os.path.join(dataroot, phase + "B")
        # (sorted as paths after the cut, as the reference's sorted(make_dataset(...)): paired.py)
        self.A = ImageStore(sorted(T.first_n(find_images(a_dir, f"CycleGAN domain A folder ({phase}A)"),
                                             max_dataset_size)), cache=cache)
        self.B = ImageStore(sorted(T.first_n(find_images(b_dir, f"CycleGAN domain B folder ({phase}B)"),
                                             max_dataset_size)), cache=cache)
        self.transform = (transform or T.TransformOptions()).check()
        for store in (self.A, self.B):
            T.check_crop_fits(store.paths, image_sizes(store.paths), self.transform)
        self.input_nc, self.output_nc = (input_nc, output_nc) if direction == "AtoB" else (output_nc, input_nc)
        self.serial_batches = serial_batches

    def __len__(self) -> int:
        return max(len(self.A), len(self.B))

    def get(self, index: int, g: torch.Generator) -> dict:
        ia = index % len(self.A)
        ib = index % len(self.B) if self.serial_batches else T.randint(g, len(self.B) - 1)
        a, b = self.A[ia], self.B[ib]
        if self.input_nc == 1:
            a = a.convert("L")
        if self.output_nc == 1:
            b = b.convert("L")
        # independent random crops/flips per domain, as in the reference
        ta = T.apply(a, self.transform, T.get_params(a.size, self.transform, g))
        tb = T.apply(b, self.transform, T.get_params(b.size, self.transform, g))
        return {"A": ta, "B": tb, "A_paths": self.A.paths[ia], "B_paths": self.B.paths[ib]}
