"""StackGAN data: images with captions, or with precomputed text embeddings.

Layout (DATAROOT)::

    images/**/*.jpg|png      the images (sub-folders allowed; names below are relative to images/)
    captions.txt             "relative/name.jpg<TAB>a caption" lines, any number per image, or
    text/**/<name>.txt       one file per image (same relative path, .txt), one caption per line
                             (the CUB ``text_c10`` layout), or
    images.txt, bounding_boxes.txt   optional (CUB_200_2011's): each bird cropped around its box,
                             as the reference does for birds
    embeddings.pt            precomputed embeddings, read with torch.load(weights_only=True):
                             {"filenames": [relative names], "embeddings": Tensor (N, T) or (N, E, T)}
                             (E embeddings per image, e.g. the reference's 10 char-CNN-RNN vectors;
                             convert the reference pickles once with a few lines of Python). Its
                             file list is the split, as the reference's filenames.pickle: images/
                             may hold more (CUB's test classes); names may omit the extension.

Text files are read as UTF-8 (``text.read_lines``: a file in another encoding, or a caption with no
word, is reported naming its file and line). Captions are embedded once, at start-up, by
``ganengine.data.text`` (offline hashing embedder, words of any script).
Each item returns a random one of its image's embeddings, the image (resized to 76/64 of
``image_size``, random crop, flip, as in the reference) and a "wrong" image of another file
for the matching-aware discriminator loss.
"""
from __future__ import annotations

import os
from collections import defaultdict

import torch

from ganengine.data import transforms as T
from ganengine.data.images import DataError, ImageStore, find_images
from ganengine.data.sampler import SeededDataset
from ganengine.data.text import CaptionEmbedder, check_caption, read_lines


def _read_captions(dataroot: str, names: list[str]) -> dict[str, list[str]]:
    table = os.path.join(dataroot, "captions.txt")
    text_dir = os.path.join(dataroot, "text")
    caps: dict[str, list[str]] = defaultdict(list)
    if os.path.isfile(table):
        for k, line in enumerate(read_lines(table), start=1):  # (UTF-8; a BOM is not a name)
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if "\t" not in line:
                raise DataError(f"{table}:{k}: expected 'file<TAB>caption', got {line[:60]!r}")
            name, caption = line.split("\t", 1)
            check_caption(caption.strip(), f"{table}:{k}")
            caps[name.strip()].append(caption.strip())
        unknown = sorted(set(caps) - set(names))
        if unknown:
            raise DataError(f"{table} has captions for {len(unknown)} file(s) not in {dataroot}/images "
                            f"(first: {unknown[:3]}). The caption file must match the images.")
    elif os.path.isdir(text_dir):
        for name in names:
            path = os.path.join(text_dir, os.path.splitext(name)[0] + ".txt")
            if os.path.isfile(path):
                for k, line in enumerate(read_lines(path), start=1):
                    if line.strip():
                        check_caption(line.strip(), f"{path}:{k}")
                        caps[name].append(line.strip())
    else:
        raise DataError(f"no captions for {dataroot!r}: expected captions.txt, a text/ folder or embeddings.pt "
                        "there (see `ganengine train stackgan --help` and docs/training.md).")
    missing = [n for n in names if not caps.get(n)]
    if missing:
        raise DataError(f"{len(missing)} image(s) in {dataroot}/images have no caption (first: {missing[:3]}). "
                        "Add captions for them or remove the images.")
    return caps


class CaptionedDataset(SeededDataset):
    def __init__(self, dataroot: str, image_size: int = 64, text_dim: int = 1024, flip: bool = True,
                 cache="auto"):
        image_dir = os.path.join(dataroot, "images")
        paths = find_images(image_dir, "StackGAN image folder")
        names = [os.path.relpath(p, image_dir) for p in paths]
        if len(paths) < 2:
            raise DataError(f"{image_dir!r} has one image; StackGAN needs at least two (it pairs each with a wrong one).")
        emb_path = os.path.join(dataroot, "embeddings.pt")
        self.precomputed = os.path.isfile(emb_path)
        if self.precomputed:  # (its file list is the split: the images it names)
            names, self.embeddings, self.counts = self._load_embeddings(emb_path, names)
            paths = [os.path.join(image_dir, n) for n in names]
            if len(paths) < 2:
                raise DataError(f"{emb_path} names one image; StackGAN needs at least two (it pairs each with a "
                                "wrong one).")
        else:
            caps = _read_captions(dataroot, names)
            embed = CaptionEmbedder(text_dim)
            most = max(len(caps[n]) for n in names)
            self.embeddings = torch.zeros(len(names), most, text_dim)
            self.counts = torch.tensor([len(caps[n]) for n in names])
            for i, n in enumerate(names):
                self.embeddings[i, : len(caps[n])] = embed(caps[n])
            self.captions = [caps[n] for n in names]
        self.images = ImageStore(paths, cache=cache)
        self.image_size, self.flip = image_size, flip
        # CUB's bird boxes (DATAROOT = CUB_200_2011: images.txt, bounding_boxes.txt): the reference
        # crops each bird to 1.5x its box's longer side around its centre before resizing
        rel = [os.path.splitext(os.path.relpath(p, image_dir))[0].replace(os.sep, "/") for p in paths]
        boxes = read_cub_boxes(dataroot)
        self.boxes = None if boxes is None else [boxes.get(r) for r in rel]

    @staticmethod
    def _load_embeddings(path: str, names: list[str]):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            files, emb = list(data["filenames"]), data["embeddings"]
        except Exception as exc:
            raise DataError(f"cannot read {path!r} ({exc}); expected torch.save({{'filenames': [...], "
                            "'embeddings': Tensor (N, T) or (N, E, T)}})") from exc
        if not isinstance(emb, torch.Tensor) or not emb.is_floating_point():
            what = f"a {emb.dtype} tensor" if isinstance(emb, torch.Tensor) else f"a {type(emb).__name__}"
            raise DataError(f"{path}: 'embeddings' is {what}; expected a floating-point Tensor (N, T) or (N, E, T) "
                            "(convert a list with torch.tensor(...) before saving).")
        if emb.dim() == 2:
            emb = emb[:, None]
        if emb.dim() != 3 or emb.shape[0] != len(files) or emb.shape[1] == 0 or emb.shape[2] == 0:
            raise DataError(f"{path}: 'embeddings' has shape {tuple(emb.shape)} for {len(files)} filenames; "
                            "expected (N, T) or (N, E, T) with N = len(filenames) and E, T >= 1.")
        bad = (~torch.isfinite(emb)).flatten(1).any(1)
        if bad.any():
            raise DataError(f"{path}: the embeddings of {int(bad.sum())} file(s) hold NaN or inf (first: "
                            f"{files[int(bad.nonzero()[0])]!r}); they would make every loss NaN. Fix or drop them.")
        # a file name as the images/ folder has it, or without its extension (the reference's
        # filenames.pickle keys: "001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111")
        on_disk = set(names)
        by_stem: dict[str, str] = {}
        for n in names:
            by_stem.setdefault(os.path.splitext(n)[0].replace(os.sep, "/"), n)
        chosen, absent = [], []
        for f in files:
            f = str(f)
            name = f if f in on_disk else by_stem.get(f.replace("\\", "/"))
            if name is None:
                absent.append(f)
            chosen.append(name)
        if absent:
            raise DataError(f"{path} names {len(absent)} image(s) not in {os.path.dirname(path)}/images (first: "
                            f"{absent[:3]}); names are relative to images/, with or without the extension.")
        if len(set(chosen)) != len(chosen):
            dup = next(n for n in chosen if chosen.count(n) > 1)
            raise DataError(f"{path} lists the image {dup!r} twice; one entry per image (its E embeddings in one row).")
        return chosen, emb.float(), torch.full((len(chosen),), emb.shape[1])

    @property
    def text_dim(self) -> int:
        return self.embeddings.shape[-1]

    def __len__(self) -> int:
        return len(self.images)

    def _image(self, index: int):
        img = self.images[index]
        box = self.boxes[index] if self.boxes is not None else None
        return img if box is None else crop_to_box(img, box)

    def get(self, index: int, g: torch.Generator) -> dict:
        k = T.randint(g, int(self.counts[index]) - 1)
        wrong = T.randint(g, len(self) - 2)
        wrong += wrong >= index  # any other image
        return {"image": T.stackgan(self._image(index), self.image_size, self.flip, g),
                "embedding": self.embeddings[index, k].clone(),
                "wrong_image": T.stackgan(self._image(wrong), self.image_size, self.flip, g),
                "paths": self.images.paths[index]}


def read_cub_boxes(dataroot: str) -> dict | None:
    """{relative name without extension: (x, y, w, h)} from CUB's images.txt and bounding_boxes.txt
    in ``dataroot`` ("<id> <path>" and "<id> <x> <y> <w> <h>" lines), or None where they are not
    both there. Values truncated to integers, as the reference's ``astype(int)``."""
    names_path, boxes_path = os.path.join(dataroot, "images.txt"), os.path.join(dataroot, "bounding_boxes.txt")
    if not (os.path.isfile(names_path) and os.path.isfile(boxes_path)):
        return None
    names, boxes = {}, {}
    for path, table, width in ((names_path, names, 2), (boxes_path, boxes, 5)):
        for k, line in enumerate(read_lines(path), start=1):  # (UTF-8; a BOM is not an id)
            parts = line.split()
            if not parts:
                continue
            if len(parts) != width:
                raise DataError(f"{path}:{k}: expected {width} fields (CUB's format), got {len(parts)}: "
                                f"{line.strip()[:60]!r}")
            table[parts[0]] = parts[1] if width == 2 else parts[1:]
    out = {}
    for image_id, name in names.items():
        box = boxes.get(image_id)
        if box is None:
            raise DataError(f"{boxes_path} has no box for image id {image_id} ({name}) of {names_path}")
        try:
            out[os.path.splitext(name)[0]] = tuple(int(float(v)) for v in box)
        except ValueError:
            raise DataError(f"{boxes_path}: the box of image id {image_id} is not numeric: {box}") from None
    return out


def crop_to_box(img, box):
    """The reference's bird crop: a square of 1.5x the box's longer side around its centre,
    clipped to the image."""
    x, y, w, h = box
    r = int(max(w, h) * 0.75)
    cx, cy = int((2 * x + w) / 2), int((2 * y + h) / 2)
    width, height = img.size
    return img.crop((max(0, cx - r), max(0, cy - r), min(width, cx + r), min(height, cy + r)))
