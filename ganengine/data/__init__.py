"""Datasets in the reference implementations' layouts, built-in sample data, and loaders.

* ``AlignedDataset`` (pix2pix A|B pairs), ``UnalignedDataset`` (CycleGAN trainA/trainB),
  ``CelebADataset`` / ``DomainFolderDataset`` (StarGAN), ``CaptionedDataset`` (StackGAN).
* ``build_dataset(model, options)`` picks the right one for a model and the command-line options.
* ``sample_root(model)``: the built-in sample data for a model (ships with the package).
* ``make_loader(...)``: a DataLoader with the deterministic, resumable, distributed sampler.
Batches are dicts as described in docs/INTERFACES.md; images are in [-1, 1].
"""
from __future__ import annotations

import os

from ganengine.data.captioned import CaptionedDataset
from ganengine.data.images import DataError, ImageStore, find_images
from ganengine.data.labelled import CelebADataset, DomainFolderDataset, has_domain_folders
from ganengine.data.loader import make_loader
from ganengine.data.paired import AlignedDataset
from ganengine.data.sampler import ResumableSampler
from ganengine.data.transforms import TransformOptions, stargan_crop_size
from ganengine.data.unpaired import UnalignedDataset

SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample")
SAMPLE_DATA = {"pix2pix": "photos_paired", "cyclegan": "photos_unpaired", "stargan": "digits", "stackgan": "digits"}
CLASS_MODELS = ("sagan", "biggan", "biggan_deep", "unetgan",
                "dcgan", "wgan", "wgan_gp", "cgan", "acgan", "adcgan", "infogan",
                "icgan")  # image synthesis on class data (data/classes.py; icgan: data/instance_features.py)
SAMPLE_DATA.update(csgan="photos_unpaired", **{m: "digits" for m in CLASS_MODELS})
MODELS = tuple(SAMPLE_DATA)

__all__ = ["AlignedDataset", "UnalignedDataset", "CelebADataset", "DomainFolderDataset", "CaptionedDataset",
           "DataError", "ImageStore", "ResumableSampler", "TransformOptions", "build_dataset", "find_images",
           "make_loader", "sample_root", "SAMPLE_DIR"]


def sample_root(model: str) -> str:
    if model not in SAMPLE_DATA:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    root = os.path.join(SAMPLE_DIR, SAMPLE_DATA[model])
    if not os.path.isdir(root):
        raise DataError(f"the built-in sample data {root!r} is missing from this install (was the package "
                        "built without its data files?). Reinstall ganengine or pass --dataroot.")
    return root


def _get(options, name, default=None):
    value = options.get(name) if isinstance(options, dict) else getattr(options, name, None)
    return default if value is None else value


def build_dataset(model: str, options, phase: str | None = None):
    """The dataset ``model`` trains on, from command-line style options (a dict or Namespace).

    Options read: dataroot (None: built-in sample data), phase, preprocess, load_size, crop_size,
    no_flip, direction, input_nc, output_nc, serial_batches, cache_images; StarGAN: dataset,
    selected_attrs, attr_path, image_size, crop_size (CelebA; default 178),
    rafd_crop_size (RaFD folders; default crop_size, else 256), domains (recorded by training on
    RaFD folders: that layout); StackGAN: image_size, text_dim.
    """
    root = _get(options, "dataroot") or sample_root(model)
    phase = phase or _get(options, "phase", "train")
    cache = {"auto": "auto", "on": True, "off": False}[_get(options, "cache_images", "auto")]
    flip = not _get(options, "no_flip", False) and phase == "train"
    if model == "icgan":  # instance features + k-NN neighbourhoods (data/instance_features.py)
        from ganengine.data.instance_features import instance_dataset

        return instance_dataset(options, phase)
    if model in CLASS_MODELS:
        from ganengine.data.classes import class_dataset

        return class_dataset(_get(options, "dataroot"), sample_root(model) if not _get(options, "dataroot") else None,
                             _get(options, "image_size", 64), flip, phase, cache=cache,
                             channels=_get(options, "channels", 3),
                             channel_option="--nc" if model == "dcgan" else "--channels")
    if model in ("pix2pix", "cyclegan", "csgan"):
        transform = TransformOptions(_get(options, "preprocess", "resize_and_crop"), _get(options, "load_size", 286),
                                     _get(options, "crop_size", 256), flip)
        if phase != "train":  # (the reference's test transform: TransformOptions.held_out)
            transform = transform.held_out()
        common = dict(transform=transform, direction=_get(options, "direction", "AtoB"),
                      input_nc=_get(options, "input_nc", 3), output_nc=_get(options, "output_nc", 3), cache=cache,
                      max_dataset_size=_get(options, "max_dataset_size"))
        if model == "pix2pix":
            return AlignedDataset(root, phase, **common)
        return UnalignedDataset(root, phase, serial_batches=bool(_get(options, "serial_batches", False)), **common)
    if model == "stargan":
        kind = _get(options, "dataset", "auto")
        size = _get(options, "image_size", 128)
        crops = {k: _get(options, k) for k in ("crop_size", "rafd_crop_size")}
        attr_path = _get(options, "attr_path")
        # (a trained model's options record its domains: folder-per-domain data, whatever this split holds)
        if kind == "RaFD" or _get(options, "domains") or (
                kind == "auto" and attr_path is None and not os.path.isfile(os.path.join(root, "list_attr_celeba.txt"))
                and has_domain_folders(os.path.join(root, phase))):
            return DomainFolderDataset(root, phase, stargan_crop_size(crops, True), size, flip, cache=cache)
        return CelebADataset(root, _get(options, "selected_attrs"), "train" if phase == "train" else "test",
                             stargan_crop_size(crops, False), size, attr_path, flip=flip, cache=cache)
    if model == "stackgan":
        return CaptionedDataset(root, _get(options, "image_size", 64), _get(options, "text_dim", 1024), flip, cache=cache)
    raise ValueError(f"model must be one of {MODELS}, got {model!r}")
