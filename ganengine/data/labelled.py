"""StarGAN data: CelebA-style attribute files and folder-per-domain (RaFD-style) datasets.

CelebA layout (reference ``data_loader.CelebA``)::

    DATAROOT/images/*.jpg            (or DATAROOT/img_align_celeba/)
    DATAROOT/list_attr_celeba.txt    line 1: image count; line 2: attribute names;
                                     then "file v1 v2 ..." with 1 / -1 per attribute

``selected_attrs`` picks the label columns (multi-label, float 0/1). As in the reference the lines
are shuffled with ``random.seed(1234)`` and the first ``test_size`` go to the test split (1999, as
the reference's ``(i+1) < 2000``; a tenth of a data set under 19990 images).

Folder-per-domain layout (reference RaFD through ``ImageFolder``)::

    DATAROOT/PHASE/<domain>/*.jpg    one sub-folder per domain, sorted names = class indices

labels are one-hot (float) vectors of length = number of domains.
"""
from __future__ import annotations

import os
import random
import warnings

import torch

from ganengine.data import transforms as T
from ganengine.data.images import DataError, ImageStore, find_images, is_image
from ganengine.data.sampler import SeededDataset
from ganengine.data.text import read_lines

CELEBA_DEFAULT_ATTRS = ["Black_Hair", "Blond_Hair", "Brown_Hair", "Male", "Young"]


def read_attr_file(attr_path: str) -> tuple[list[str], list[tuple[str, list[int]]]]:
    if not os.path.isfile(attr_path):
        raise DataError(f"attribute file {attr_path!r} does not exist. A CelebA-style dataset needs "
                        "DATAROOT/list_attr_celeba.txt (or pass --attr_path).")
    numbered = [(k, ln.strip()) for k, ln in enumerate(read_lines(attr_path), start=1) if ln.strip()]
    lines = [ln for _, ln in numbered]
    if len(lines) < 3:
        raise DataError(f"attribute file {attr_path!r} has {len(lines)} non-empty lines; expected a count line, "
                        "an attribute-name line and one line per image.")
    names = lines[1].split()
    rows = []
    for k, line in numbered[2:]:  # (k: the file's line number, blank lines counted)
        parts = line.split()
        if len(parts) != len(names) + 1:
            raise DataError(f"{attr_path}:{k}: expected a file name and {len(names)} values (one per attribute "
                            f"on line 2), got {len(parts)} fields. Fix or remove that line.")
        try:
            values = [int(v) for v in parts[1:]]
        except ValueError:
            raise DataError(f"{attr_path}:{k}: attribute values must be 1 or -1 (or 0), got {parts[1:]}") from None
        bad = [v for v in values if v not in (1, -1, 0)]
        if bad:  # (the reference reads "1" as set and anything else as unset: a 2 or a 5 is a typo)
            raise DataError(f"{attr_path}:{k}: attribute values must be 1 or -1 (or 0), got {bad[0]}. "
                            "Fix that line.")
        rows.append((parts[0], values))
    try:
        count = int(lines[0].split()[0])
    except ValueError:
        count = None
    if count is not None and count != len(rows):  # (a truncated download, say; the reference ignores line 1)
        warnings.warn(f"attribute file {attr_path!r}: line 1 says {count} images, the file lists {len(rows)}; "
                      f"using the {len(rows)} listed. Is the file complete?", stacklevel=2)
    return names, rows


def celeba_image_dir(dataroot: str) -> str:
    """DATAROOT/images, or DATAROOT/img_align_celeba (CelebA's own folder) where only that exists."""
    image_dir = os.path.join(dataroot, "images")
    if not os.path.isdir(image_dir) and os.path.isdir(os.path.join(dataroot, "img_align_celeba")):
        image_dir = os.path.join(dataroot, "img_align_celeba")
    return image_dir


def test_split_size(n: int) -> int:
    """The reference's CelebA test split: lines i with (i + 1) < 2000, the first 1999; a tenth of a
    small data set, which 1999 would leave without a training split."""
    return min(1999, n // 10)


class CelebADataset(SeededDataset):
    def __init__(self, dataroot: str, selected_attrs: list[str] | None = None, mode: str = "train",
                 crop_size: int = 178, image_size: int = 128, attr_path: str | None = None,
                 image_dir: str | None = None, test_size: int | None = None, flip: bool = True, cache="auto"):
        attr_path = attr_path or os.path.join(dataroot, "list_attr_celeba.txt")
        if image_dir is None:
            image_dir = celeba_image_dir(dataroot)
        if not os.path.isfile(attr_path) and has_domain_folders(dataroot):
            raise DataError(f"attribute file {attr_path!r} does not exist, and {dataroot!r} holds one folder per "
                            "domain: a RaFD-style split. Pass --dataroot the folder above it (the one holding "
                            f"{os.path.basename(os.path.normpath(dataroot))}/), or --dataset RaFD.")
        names, rows = read_attr_file(attr_path)
        selected = list(selected_attrs or CELEBA_DEFAULT_ATTRS)
        missing = [a for a in selected if a not in names]
        if missing:
            raise DataError(f"--selected_attrs {missing} not in {attr_path!r}; its attributes are: {' '.join(names)}")
        columns = [names.index(a) for a in selected]
        on_disk = {os.path.relpath(p, image_dir) for p in find_images(image_dir, "StarGAN image folder")}
        absent = [r[0] for r in rows if r[0] not in on_disk]
        if absent:
            raise DataError(f"{len(absent)} file(s) listed in {attr_path!r} are not in {image_dir!r} "
                            f"(first: {absent[:3]}). The attribute file must match the images: remove those "
                            "lines or add the images.")
        rows = list(rows)
        random.Random(1234).shuffle(rows)  # the reference's fixed split
        n_test = test_split_size(len(rows)) if test_size is None else test_size
        rows = rows[:n_test] if mode == "test" else rows[n_test:]
        if not rows:
            raise DataError(f"the {mode} split of {attr_path!r} is empty ({n_test} test images held out of "
                            f"{len(rows) + n_test}). Add images or lower the test size.")
        self.selected_attrs = selected
        self.labels = torch.tensor([[1.0 if r[1][c] == 1 else 0.0 for c in columns] for r in rows])
        self.images = ImageStore([os.path.join(image_dir, r[0]) for r in rows], cache=cache)
        self.crop_size, self.image_size, self.flip = crop_size, image_size, flip and mode == "train"

    @property
    def c_dim(self) -> int:
        return len(self.selected_attrs)

    def __len__(self) -> int:
        return len(self.images)

    def get(self, index: int, g: torch.Generator) -> dict:
        img = T.stargan(self.images[index], self.crop_size, self.image_size, self.flip, g)
        return {"image": img, "label": self.labels[index].clone(), "paths": self.images.paths[index]}


class DomainFolderDataset(SeededDataset):
    def __init__(self, dataroot: str, phase: str = "train", crop_size: int = 256, image_size: int = 128,
                 flip: bool = True, cache="auto"):
        root = os.path.join(dataroot, phase)
        if not os.path.isdir(root):
            raise DataError(f"folder-per-domain root {root!r} does not exist. Expected DATAROOT/{phase}/<domain>/images"
                            + _other_phases(dataroot))
        self.domains = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not self.domains:
            raise DataError(f"{root!r} has no domain sub-folders. Put each domain's images in its own folder "
                            f"({root}/<domain>/*.jpg).")
        paths, labels = [], []
        for k, d in enumerate(self.domains):
            found = find_images(os.path.join(root, d), f"domain folder {d!r}")
            paths += found
            labels += [k] * len(found)
        self.images = ImageStore(paths, cache=cache)
        self.labels = torch.tensor(labels)
        self.crop_size, self.image_size, self.flip = crop_size, image_size, flip and phase == "train"

    @property
    def c_dim(self) -> int:
        return len(self.domains)

    def __len__(self) -> int:
        return len(self.images)

    def get(self, index: int, g: torch.Generator) -> dict:
        img = T.stargan(self.images[index], self.crop_size, self.image_size, self.flip, g)
        label = torch.nn.functional.one_hot(self.labels[index], self.c_dim).float()
        return {"image": img, "label": label, "paths": self.images.paths[index]}


def _other_phases(dataroot: str) -> str:
    """The end of a missing-split message: the splits DATAROOT has (for --phase), else '.'."""
    found = sorted(d for d in os.listdir(dataroot) if has_domain_folders(os.path.join(dataroot, d))) \
        if os.path.isdir(dataroot) else []
    return f"; {dataroot!r} has the split(s) {', '.join(found)}: pick one with --phase." if found else "."


def has_domain_folders(folder: str) -> bool:
    if not os.path.isdir(folder):
        return False
    subs = [d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))]
    return bool(subs) and not any(is_image(f) for f in os.listdir(folder))
