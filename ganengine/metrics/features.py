"""Feature extractors for FID/KID: the FID Inception network or any user-given nn.Module.

A feature extractor takes images (N, C, H, W) in [0, 1] (the convention of pytorch-fid and
torchmetrics' ``normalize=True``) and returns (N, D) features (any trailing dimensions are
flattened). ganengine's generators produce [-1, 1]; ``extract_features`` maps them.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch
from torch import nn

from ganengine.metrics.inception import WEIGHTS_HELP, load_fid_inception


def load_object(spec: str):
    """``"package.module:attr"`` or ``"path/to/file.py:attr"`` (attr may be dotted) -> the object."""
    if not isinstance(spec, str) or spec.count(":") < 1:
        raise ValueError(f"expected 'module:attr' or 'path/to/file.py:attr', got {spec!r}")
    module_part, attr = spec.rsplit(":", 1)
    if module_part.endswith(".py") or os.sep in module_part:
        if not os.path.isfile(module_part):
            raise FileNotFoundError(f"{spec!r}: no such file {module_part!r}")
        name = "_ganengine_user_" + os.path.splitext(os.path.basename(module_part))[0]
        mspec = importlib.util.spec_from_file_location(name, module_part)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_part)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"{spec!r}: {module_part!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def resolve_feature_extractor(spec=None, inception_weights=None, device=None) -> nn.Module:
    """The feature extractor to use: a module, a 'module:attr' spec (a module instance, or a class
    or factory called without arguments), else the FID Inception network from ``inception_weights``."""
    if spec is not None and inception_weights is not None:
        raise ValueError("give either a feature extractor or Inception weights, not both")
    if spec is None:
        if inception_weights is None:
            raise FileNotFoundError("FID and KID need a feature extractor. " + WEIGHTS_HELP)
        extractor = load_fid_inception(inception_weights)
    else:
        obj = load_object(spec) if isinstance(spec, str) else spec
        extractor = obj if isinstance(obj, nn.Module) else obj()
        if not isinstance(extractor, nn.Module):
            raise TypeError(f"feature extractor {spec!r} must be an nn.Module or build one when called, "
                            f"got {type(extractor).__name__}")
        extractor.eval().requires_grad_(False)
    return extractor.to(device) if device is not None else extractor


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """1-channel (N, 1, H, W) images repeated to RGB (as pytorch-fid and torch-fidelity feed
    grayscale data to Inception); others as they are."""
    return images.expand(-1, 3, -1, -1) if images.dim() == 4 and images.shape[1] == 1 else images


@torch.no_grad()
def extract_features(extractor: nn.Module, images: torch.Tensor, value_range=(-1.0, 1.0)) -> torch.Tensor:
    """(N, D) features of ``images`` whose values lie in ``value_range`` (ganengine: [-1, 1]);
    uint8 images are read as 8-bit pictures, [0, 255], whatever ``value_range`` says."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"extract_features: images must be a tensor, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        lo, hi = 0.0, 255.0
    elif images.is_floating_point():
        lo, hi = value_range
    else:
        raise TypeError(f"extract_features: images must be floating point (values in {tuple(value_range)}) or "
                        f"uint8 (0..255), got {images.dtype}")
    x = ((images.float() - lo) / (hi - lo)).clamp(0.0, 1.0)
    try:
        device = next(extractor.parameters()).device
    except StopIteration:
        device = x.device
    feats = extractor(x.to(device))
    if isinstance(feats, (tuple, list)):  # e.g. pytorch-fid's InceptionV3 returns a list of blocks
        feats = feats[-1]
    if not isinstance(feats, torch.Tensor) or feats.shape[0] != x.shape[0]:
        raise ValueError("the feature extractor must return an (N, ...) tensor for N images, got "
                         f"{getattr(feats, 'shape', type(feats).__name__)}")
    return feats.flatten(1)
