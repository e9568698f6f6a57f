"""IC-GAN's data: instance features, their k-NN neighbourhoods, and the dataset of (conditioning
instance, real neighbour) pairs (facebookresearch/ic_gan ``data_utils/datasets_common.py``,
``make_hdf5_nns.py``; rewritten, no faiss).

* Features: a user file ``--feature_file F`` (``.npy``, or ``.npz`` holding one array or an array
  named ``feats`` / ``features``), shape (N, D) with row i = item i of the dataset in the loader's
  order (class folders sorted, files sorted; the HDF5's rows), D > 0, finite, no all-zero row.
  Rows are L2-normalised as the reference does. Without a file: **pixel features**, the image at
  the training resolution in luma, area-averaged to 8x8, mean-subtracted and L2-normalised
  (D = 64; a fixed, documented stand-in for the reference's ResNet-50 / SwAV features that makes
  neighbours look alike in layout and stroke).
* Neighbourhoods: the ``k_nn`` most cosine-similar other items of each item (cosine = the
  reference's L2 distance on normalised features), by ``torch.topk`` over chunks of rows of the
  similarity matrix; the item itself is excluded (the reference searches k + 1 and drops it).
  Computed once per process and cached (``instance_bank``: the dataset, the model and the sample
  grids share it).
* Items (training phase): item i is the conditioning instance; ``image`` / ``label`` / ``paths``
  are those of a neighbour drawn uniformly from i's neighbourhood with the item's own seed
  (deterministic and exact on resume), ``feature`` is h_i, ``index`` i, ``neighbour`` j. Any
  other phase (sample grids) gives item i itself with h_i.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from ganengine.data.images import DataError
from ganengine.data.sampler import SeededDataset

PIXEL_FEATURE_SIZE = 8  # pixel features: 8x8 luma, D = 64
_BANKS: dict = {}


def _err(path, msg) -> DataError:
    return DataError(f"--feature_file {path!r}: {msg}")


def load_feature_file(path: str, n_items: int) -> torch.Tensor:
    """(N, D) float32 features of ``path`` (.npy / .npz), checked against the dataset's ``n_items``."""
    import numpy as np

    if not os.path.isfile(path):
        raise _err(path, "no such file (expected an (N, D) float array saved as .npy or .npz)")
    if not path.endswith((".npy", ".npz")):
        raise _err(path, "must be a .npy or .npz file holding an (N, D) float array")
    try:
        obj = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise _err(path, f"cannot be read as a NumPy array file without pickles: {exc}") from None
    if path.endswith(".npz"):
        names = list(obj.files)
        name = next((n for n in ("feats", "features") if n in names), names[0] if len(names) == 1 else None)
        if name is None:
            raise _err(path, f"holds the arrays {names}; store one array, or name it 'feats' or 'features'")
        obj = obj[name]
    if obj.dtype.kind not in "fiu":
        raise _err(path, f"must hold numbers, got dtype {obj.dtype}")
    if obj.ndim != 2:
        raise _err(path, f"must be (N, D), got shape {tuple(obj.shape)}")
    n, d = obj.shape
    if d < 1:
        raise _err(path, f"feature dimension D must be > 0, got shape {tuple(obj.shape)}")
    if n != n_items:
        raise _err(path, f"has {n} rows but the dataset has {n_items} items; row i must be the features of "
                         "item i in the loader's order")
    feats = torch.from_numpy(np.ascontiguousarray(obj)).to(torch.float64)
    bad = ~torch.isfinite(feats).all(1)
    if bad.any():
        raise _err(path, f"{int(bad.sum())} rows hold NaN or infinite values (first: row {int(bad.nonzero()[0])})")
    # each row scaled by its largest magnitude first: the norm of rows of huge or tiny values would
    # overflow (an all-zero feature after normalising) or underflow (a non-zero row refused)
    scale = feats.abs().amax(dim=1, keepdim=True)
    zero = scale.squeeze(1) == 0
    if zero.any():
        raise _err(path, f"{int(zero.sum())} rows are all zero (first: row {int(zero.nonzero()[0])}); "
                         "features are L2-normalised, as the reference does")
    return F.normalize(feats / scale, dim=1).to(torch.float32)


def pixel_features(dataset, size: int = PIXEL_FEATURE_SIZE) -> torch.Tensor:
    """(N, size*size) L2-normalised, mean-subtracted luma thumbnails of ``dataset``'s images (unflipped)."""
    rows = []
    g = torch.Generator()
    for i in range(len(dataset)):
        img = dataset.get(i, g)["image"]
        rows.append(F.adaptive_avg_pool2d(img.mean(0, keepdim=True)[None], size).flatten())
    feats = torch.stack(rows)
    return F.normalize(feats - feats.mean(1, keepdim=True), dim=1)


def knn_neighbourhoods(features: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """(N, k) int64 indices of each row's k most cosine-similar other rows (most similar first;
    ``features`` L2-normalised), ``chunk`` rows of the similarity matrix at a time."""
    n = features.shape[0]
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > n - 1:
        raise DataError(f"--k_nn must be an int in [1, {n - 1}] (neighbours other than the item itself among "
                        f"{n} items), got {k!r}")
    out = torch.empty(n, k, dtype=torch.long)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        sim = features[start:stop] @ features.t()
        rows = torch.arange(stop - start)
        sim[rows, rows + start] = float("-inf")  # not its own neighbour
        out[start:stop] = sim.topk(k, dim=1).indices
    return out


class InstanceBank:
    """Features (N, D), neighbourhoods (N, k) and labels (N,) of a dataset; ``sample`` draws the
    generator's conditionings as the reference's ``sample_conditioning_instance_balance``: an
    instance uniformly (its features), and the label of a uniformly drawn neighbour."""

    def __init__(self, features: torch.Tensor, neighbours: torch.Tensor, labels: torch.Tensor, source: str):
        self.features, self.neighbours, self.labels, self.source = features, neighbours, labels.long(), source
        self._on = {}

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @functools.cached_property
    def digest(self) -> str:
        """A short hash of the features: a checkpoint records it, so a feature file replaced since
        training is said, not silently used (computed once per bank: banks are cached per file)."""
        import hashlib

        return hashlib.sha1(self.features.contiguous().numpy().tobytes()).hexdigest()[:16]

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def features_on(self, device) -> torch.Tensor:
        device = torch.device(device)
        if device not in self._on:
            self._on[device] = self.features.to(device)
        return self._on[device]

    def sample(self, n: int, device="cpu", generator: torch.Generator | None = None):
        """(features (n, D), neighbour labels (n,), instance indices (n,)) from torch's global
        generator (checkpointed by the engine: a resumed run draws the same) or ``generator``."""
        idx = torch.randint(0, len(self), (n,), generator=generator)
        pick = torch.randint(0, self.neighbours.shape[1], (n,), generator=generator)
        nbr = self.neighbours[idx, pick]
        dev = torch.device(device)
        return self.features_on(dev)[idx.to(dev)], self.labels[nbr].to(dev), idx


def _file_key(path: str | None):
    if not path:
        return None
    st = os.stat(path)
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


def base_dataset(dataroot: str | None, image_size: int, flip: bool = False, cache="auto", channels: int = 3):
    """The class dataset IC-GAN draws its instances from (always the training split)."""
    from ganengine.data import sample_root
    from ganengine.data.classes import class_dataset

    return class_dataset(dataroot or None, sample_root("icgan") if not dataroot else None, image_size, flip,
                         "train", cache=cache, channels=channels)


def instance_bank(dataroot: str | None, image_size: int, feature_file: str | None, k_nn: int, channels: int = 3,
                  dataset=None) -> InstanceBank:
    """The bank of the dataset at ``dataroot`` (None / "": the built-in digits), computed once per
    process for these arguments (and the feature file's size and modification time)."""
    if feature_file and not os.path.isfile(feature_file):
        raise _err(feature_file, "no such file (expected an (N, D) float array saved as .npy or .npz)")
    key = (os.path.abspath(dataroot) if dataroot else None, int(image_size), _file_key(feature_file), k_nn, channels)
    bank = _BANKS.get(key)
    if bank is None:
        ds = dataset if dataset is not None else base_dataset(dataroot, image_size, False, channels=channels)
        if feature_file:
            feats, source = load_feature_file(feature_file, len(ds)), f"file {feature_file}"
        else:
            feats, source = pixel_features(ds), f"pixel features ({PIXEL_FEATURE_SIZE}x{PIXEL_FEATURE_SIZE} luma)"
        bank = _BANKS[key] = InstanceBank(feats, knn_neighbourhoods(feats, k_nn), ds.labels, source)
    return bank


class InstanceDataset(SeededDataset):
    """(conditioning instance, real neighbour) items over a class dataset (module docstring)."""

    def __init__(self, base, bank: InstanceBank, neighbours: bool = True):
        if len(bank) != len(base):
            raise DataError(f"the instance features have {len(bank)} rows but the dataset has {len(base)} items")
        self.base, self.bank, self.neighbours = base, bank, neighbours
        self.classes = list(base.classes)
        self.labels = base.labels
        self.images = getattr(base, "images", None)  # (for the loader's worker default)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.base)

    def get(self, index: int, g: torch.Generator) -> dict:
        j = index
        if self.neighbours:
            nbrs = self.bank.neighbours[index]
            j = int(nbrs[int(torch.randint(0, nbrs.shape[0], (1,), generator=g))])
        item = self.base.get(j, g)
        item.update(feature=self.bank.features[index], index=torch.tensor(index), neighbour=torch.tensor(j))
        return item


def check_digest(bank: InstanceBank, feature_file: str | None, digest: str | None) -> InstanceBank:
    """``bank``, unless the features of ``feature_file`` are not those recorded (``digest``) at
    training: a file replaced since (another width, or the same width and other values)."""
    if feature_file and digest and bank.digest != digest:
        raise _err(feature_file, "its features are not those the model was trained with (the file changed "
                                 "since); pass the training's feature file with --feature_file")
    return bank


def _get(options, name, default=None):
    value = options.get(name) if isinstance(options, dict) else getattr(options, name, None)
    return default if value is None else value


def instance_dataset(options, phase: str = "train") -> InstanceDataset:
    """``build_dataset("icgan", options, phase)``: neighbours in the training phase, the
    instances themselves otherwise (sample grids)."""
    cache = {"auto": "auto", "on": True, "off": False}[_get(options, "cache_images", "auto")]
    dataroot, size = _get(options, "dataroot") or None, _get(options, "image_size", 64)
    train = phase == "train"
    base = base_dataset(dataroot, size, train and not _get(options, "no_flip", False), cache=cache)
    feature_file = _get(options, "feature_file") or None
    bank = instance_bank(dataroot, size, feature_file, _get(options, "k_nn", 50), dataset=base if not base.flip else None)
    return InstanceDataset(base, check_digest(bank, feature_file, _get(options, "feature_digest")), neighbours=train)
