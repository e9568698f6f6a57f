"""Evaluate an image-synthesis model (noise [+ class] -> image): FID, KID, Inception Score,
precision/recall, density/coverage and, for class-conditional models, intra-class FID.

``evaluate_synthesis`` is what ``ganengine evaluate`` runs on a DCGAN/WGAN/.../BigGAN checkpoint
and what the training engine calls every ``--eval_every`` steps. It generates ``num_samples``
images and compares their features with those of the real images:

* latents come from a private seed (``seed``): the same latents at every evaluation, and the
  training's random streams are untouched (the draws run under ``fork_rng``);
* a conditional model gets class-balanced labels ``0, 1, ..., K-1, 0, 1, ...``, so every class
  has ``num_samples // K`` (or one more) samples for intra-FID;
* the networks' buffers (batch-norm running statistics, spectral-norm vectors: the references
  sample in training mode and move them) are put back afterwards;
* grayscale images are repeated to three channels before the feature network (as pytorch-fid
  and torch-fidelity do), images go to it in [0, 1] (``extract_features``);
* IS uses the same network's class logits: for the FID Inception network the 1008-way logits of
  its pool features without the bias (the original TF Inception Score code's ``pool3 @ W``, also
  torch-fidelity's ``logits_unbiased``); another extractor offers IS with a ``logits(features)``
  method.

The real side (``RealFeatures``) is computed once and can be reused: training-time evaluation
keeps it for the whole run. Features are kept as float32 on the CPU (precision/recall, density/
coverage, KID and intra-FID need the samples, not only their statistics).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ganengine._state import restored, running_state
from ganengine.metrics.features import as_rgb, extract_features
from ganengine.metrics.frechet import frechet_distance, intra_class_frechet_distance
from ganengine.metrics.inception import FIDInceptionV3
from ganengine.metrics.inception_score import inception_score
from ganengine.metrics.kid import kernel_inception_distance
from ganengine.metrics.manifold import density_coverage, precision_recall
from ganengine.metrics.stats import FeatureStats

# what --metrics accepts for a synthesis model -> the result keys it produces
SYNTHESIS_METRICS = {"fid": ("fid",), "kid": ("kid", "kid_std"), "is": ("is", "is_std"),
                     "pr": ("precision", "recall"), "dc": ("density", "coverage"), "intra_fid": ("intra_fid",)}
_ALIASES = {"precision": "pr", "recall": "pr", "density": "dc", "coverage": "dc", "inception_score": "is",
            "intra-fid": "intra_fid", "ifid": "intra_fid"}
# result keys that can pick the best checkpoint: lower or higher is better (density has no such
# direction: about 1 is best)
SYNTHESIS_MODES = {"fid": "min", "kid": "min", "intra_fid": "min", "is": "max", "precision": "max",
                   "recall": "max", "coverage": "max"}


def is_synthesis_model(model) -> bool:
    """Whether ``model`` is a noise-to-image synthesis model (DCGAN ... InfoGAN, SAGAN, BigGAN ...)."""
    from ganengine.data import CLASS_MODELS

    return getattr(model, "MODEL_NAME", None) in CLASS_MODELS and hasattr(model, "generate")


def class_count(model) -> int | None:
    """The number of classes a conditional model generates, None for an unconditional one
    (InfoGAN's categorical code is not a class label: unconditional here)."""
    conditional = getattr(model, "CONDITIONAL", None)
    if conditional is None:  # models without the SynthesisGAN flag (BigGAN family): by their options
        options = getattr(model, "options", None) or {}
        conditional = "n_classes" in options and not options.get("unconditional", False)  # (U-Net GAN's)
    return int(model.options["n_classes"]) if conditional else None


def parse_synthesis_metrics(metrics) -> tuple[str, ...]:
    """'fid,is,pr' or a list -> ('fid', 'is', 'pr'), validated (aliases: precision, recall -> pr;
    density, coverage -> dc)."""
    names = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    names = [_ALIASES.get(m, m) for m in names]
    bad = [m for m in names if m not in SYNTHESIS_METRICS]
    if bad or not names:
        raise ValueError(f"metrics for a synthesis model must be a non-empty subset of {tuple(SYNTHESIS_METRICS)} "
                         f"(pr = precision/recall, dc = density/coverage), got {metrics!r}")
    return tuple(dict.fromkeys(names))


def is_better_synthesis(key: str, value: float, best: float | None) -> bool:
    """Whether result ``key`` (fid, is, precision, ...) improves on ``best`` (None: nothing yet)."""
    if key not in SYNTHESIS_MODES:
        raise ValueError(f"cannot rank checkpoints by {key!r}: choose one of {tuple(SYNTHESIS_MODES)}")
    if best is None:
        return True
    return value < best if SYNTHESIS_MODES[key] == "min" else value > best


def check_logits(extractor: nn.Module) -> None:
    """Raise a clear error when ``extractor`` cannot give class logits for the Inception Score."""
    if not (isinstance(extractor, FIDInceptionV3) or callable(getattr(extractor, "logits", None))):
        raise ValueError(f"the is metric needs class logits from the feature network: the FID Inception network "
                         f"(--inception_weights), or an extractor with a logits(features) method; "
                         f"{type(extractor).__name__} has none")


def inception_logits(extractor: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Class logits for the Inception Score from the extractor's (N, D) features."""
    check_logits(extractor)
    if callable(getattr(extractor, "logits", None)):
        return extractor.logits(features)
    fc = extractor.fc
    return F.linear(features.to(fc.weight.device, fc.weight.dtype), fc.weight)  # no bias (original IS code)


@dataclass
class RealFeatures:
    """Features of the real images (float32, CPU), their class labels (None when not kept) and
    their running statistics for FID."""
    features: torch.Tensor
    labels: torch.Tensor | None
    stats: FeatureStats

    @property
    def count(self) -> int:
        return int(self.features.shape[0])


def real_loader(dataset, batch_size: int = 50, max_images: int | None = None):
    """An unshuffled loader over ``dataset``, or over ``max_images`` of its images spread evenly
    through it (index ``i * len // max_images``: every class of a class-sorted dataset is in)."""
    if max_images is not None and max_images < len(dataset):
        dataset = torch.utils.data.Subset(dataset, [i * len(dataset) // max_images for i in range(max_images)])
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)


def check_real_classes(dataset, max_images: int | None, option: str) -> None:
    """intra-FID needs two real images of every class it meets: a ValueError naming ``option``
    (the cap on the real images) when the images ``real_loader`` would read hold a class once;
    said before any image is generated (datasets without a ``labels`` tensor: at the metric)."""
    labels = getattr(dataset, "labels", None)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or not len(labels):
        return
    n = len(labels)
    if max_images is not None and max_images < n:
        labels = labels[[i * n // max_images for i in range(max_images)]]
    counts = torch.bincount(labels.long())
    once = (counts == 1).nonzero().flatten().tolist()
    if once:
        capped = max_images is not None and max_images < n
        where = (f"among the {len(labels)} read ({option} caps them at {max_images} of {n})" if capped else
                 f"in the whole data ({n} images)")
        fix = f"raise {option} or leave intra_fid out" if capped else "leave intra_fid out (or add images of it)"
        raise ValueError(f"intra_fid: class {once[0]} has 1 real image {where}; {len(once)} such classes: the "
                         f"per-class statistics need 2 images of every class; {fix}")


@torch.no_grad()
def real_features(loader: Iterable[dict], extractor: nn.Module, max_images: int | None = None,
                  labels: bool = False) -> RealFeatures:
    """Features of the real images ``batch["image"]`` of ``loader`` (at most ``max_images``);
    with ``labels`` also their class indices ``batch["label"]`` (for intra-FID)."""
    feats, labs, stats, n = [], [], FeatureStats(), 0
    for batch in loader:
        if not isinstance(batch, dict) or "image" not in batch:
            got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"synthesis evaluation: real batches must be dicts with an 'image' entry, got {got}")
        images = batch["image"]
        keep = images.shape[0] if max_images is None else min(images.shape[0], max_images - n)
        if keep <= 0:
            break
        f = extract_features(extractor, as_rgb(images[:keep]))
        stats.update(f)
        feats.append(f.float().cpu())
        if labels:
            if "label" not in batch:
                raise ValueError("intra_fid needs the real images' class labels (batch['label']): a class-per-folder "
                                 "dataset, the built-in digits or HDF5 with labels")
            lab = batch["label"][:keep]
            labs.append((lab.argmax(1) if lab.dim() == 2 else lab).long().cpu())
        n += keep
    if n == 0:
        raise ValueError("synthesis evaluation: the real-image loader produced no images")
    return RealFeatures(torch.cat(feats), torch.cat(labs) if labels else None, stats)


def _networks(model) -> list[nn.Module]:
    names = getattr(model, "network_names", None) or []
    return [getattr(model, n) for n in names if isinstance(getattr(model, n, None), nn.Module)]


def _cuda_devices(model) -> list:
    device = torch.device(getattr(model, "device", "cpu"))
    return [device] if device.type == "cuda" else []


@contextlib.contextmanager
def _model_state_kept(model, seed: int):
    """Seeded draws that leave the training's RNG streams and the networks' running state
    (buffers; SAGAN's spectral-norm u / v Parameters: ``_state.running_state``) as they were."""
    with torch.random.fork_rng(devices=_cuda_devices(model)), \
            restored([t for net in _networks(model) for t in running_state(net)]):
        torch.manual_seed(seed)
        yield


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """``n`` split in batches of ``batch_size``, with no batch of one image when n > 1 (batch-norm
    generators sampling in training mode cannot normalise a single image): a remainder of 1
    joins the batch before it."""
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    if len(sizes) > 1 and sizes[-1] == 1:
        sizes[-2:] = [sizes[-2] + 1]
    return sizes


@torch.no_grad()
def fake_features(model, extractor: nn.Module, num_samples: int, batch_size: int = 50, seed: int = 0,
                  logits: bool = False):
    """(features, labels or None, logits or None) of ``num_samples`` generated images: latents
    from ``seed``, class-balanced labels for a conditional model."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n_classes = class_count(model)
    device = getattr(model, "device", torch.device("cpu"))
    feats, labs, logs = [], [], []
    with _model_state_kept(model, seed):
        start = 0
        for b in batch_sizes(num_samples, batch_size):
            labels = None
            if n_classes is not None:
                labels = torch.arange(start, start + b, device=device) % n_classes
                labs.append(labels.cpu())
            images = model.generate(b, labels=labels)
            f = extract_features(extractor, as_rgb(images.float()))
            feats.append(f.float().cpu())
            if logits:
                logs.append(inception_logits(extractor, f).float().cpu())
            start += b
    return (torch.cat(feats), torch.cat(labs) if labs else None, torch.cat(logs) if logs else None)


def check_neighbour_counts(metrics, num_samples: int | None, n_real: int | None, pr_k: int = 3, dc_k: int = 5,
                           names: dict | None = None) -> None:
    """pr / dc take each sample's k-th nearest neighbour in its own set (the sample itself
    excluded): both sets need more than k points. Refused before anything is generated, naming the
    options (``names``: num_samples, max_real, pr_k, dc_k -> the option each is given by; a k
    without an option is said as its value)."""
    names = {"num_samples": "--num_samples", "max_real": "--max_images", "pr_k": "--pr_k", "dc_k": "--dc_k",
             **(names or {})}
    for metric, key, k in (("pr", "pr_k", pr_k), ("dc", "dc_k", dc_k)):
        if metric not in metrics:
            continue
        k_said = f"{names[key]} {k}" if names[key] else f"k = {k}"
        for count, what, key_n in ((num_samples, "generated images", "num_samples"),
                                   (n_real, "real images", "max_real")):
            if count is not None and count <= k:
                raise ValueError(f"{metric} ({k_said}) needs more than {k} {what} (each one's k-th nearest "
                                 f"neighbour excludes itself), got {count}: raise {names[key_n]}"
                                 + (f" or lower {names[key]}" if names[key] else ""))


def check_request(model, metrics, num_samples: int, is_splits: int = 10) -> None:
    """Errors that can be told before anything is generated: a non-synthesis model, intra_fid on an
    unconditional model or with fewer than 2 generated images per class, is with fewer generated
    images than ``is_splits`` (never quietly fewer splits: a score over 1-image parts is always 1)."""
    names = parse_synthesis_metrics(metrics)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if "is" in names:
        if isinstance(is_splits, bool) or not isinstance(is_splits, int) or is_splits < 1:
            raise ValueError(f"is_splits must be a positive int, got {is_splits!r}")
        if is_splits > num_samples:
            raise ValueError(f"is: num_samples={num_samples} generated images cannot be cut into is_splits={is_splits} "
                             f"Inception Score splits (--num_samples, --is_splits): generate at least {is_splits} "
                             f"images or use at most {num_samples} splits")
    if not is_synthesis_model(model):
        raise TypeError(f"synthesis evaluation needs a ganengine synthesis model (with generate()), got "
                        f"{type(model).__name__}; use evaluate_generator for image-to-image models")
    if "intra_fid" in names:
        n_classes = class_count(model)
        if n_classes is None:
            raise ValueError(f"intra_fid is for class-conditional models; {model.MODEL_NAME} is unconditional")
        if num_samples < 2 * n_classes:
            raise ValueError(f"intra_fid needs at least 2 generated images per class: num_samples >= 2 x {n_classes} "
                             f"classes = {2 * n_classes}, got {num_samples}")


def evaluate_synthesis(model, real, metrics=("fid",), feature_extractor: nn.Module | None = None,
                       num_samples: int = 10000, batch_size: int = 50, seed: int = 0, max_real: int | None = None,
                       is_splits: int = 10, pr_k: int = 3, dc_k: int = 5, kid_options: dict | None = None) -> dict:
    """Generate ``num_samples`` images with ``model`` and compare them with ``real``: a loader of
    ``{"image", "label"}`` batches (its first ``max_real`` images are read: ``real_loader`` spreads
    them over a dataset) or a ``RealFeatures``
    from an earlier call. Returns {"fid": ..., "is": ..., "is_std": ..., "precision": ...,
    "recall": ..., "density": ..., "coverage": ..., "intra_fid": ..., "kid": ..., "kid_std":
    ..., "images": n_generated, "real_images": n_real} for the requested ``metrics`` (see
    ``SYNTHESIS_METRICS``), plus ``"real"``: the RealFeatures, to pass back next time.

    ``intra_fid`` needs a conditional model and real labels; the classes averaged over are those
    of the real images, each needing 2 or more real and generated samples.
    """
    names = parse_synthesis_metrics(metrics)
    if feature_extractor is None:
        from ganengine.metrics.inception import WEIGHTS_HELP

        raise ValueError("synthesis metrics need a feature extractor. " + WEIGHTS_HELP)
    check_request(model, names, num_samples, is_splits)
    need_labels = "intra_fid" in names
    if "is" in names:
        check_logits(feature_extractor)  # before anything is generated
    if isinstance(real, RealFeatures):
        if need_labels and real.labels is None:
            raise ValueError("intra_fid needs the real images' labels: these RealFeatures were computed without "
                             "them (real_features(..., labels=True))")
    else:
        with torch.random.fork_rng(devices=_cuda_devices(model)):  # a DataLoader draws a seed when iterated
            real = real_features(real, feature_extractor, max_real, need_labels)
    fake, fake_labels, logits = fake_features(model, feature_extractor, num_samples, batch_size, seed,
                                              logits="is" in names)
    out: dict = {}
    if "fid" in names:
        fake_stats = FeatureStats()
        fake_stats.update(fake.double())
        out["fid"] = frechet_distance(real.stats, fake_stats)
    if "kid" in names:
        out["kid"], out["kid_std"] = kernel_inception_distance(real.features, fake, return_std=True,
                                                               **(kid_options or {}))
    if "is" in names:
        score = inception_score(logits, splits=is_splits)
        out["is"], out["is_std"] = float(score), score.std
    if "pr" in names:
        out["precision"], out["recall"] = precision_recall(real.features, fake, k=pr_k)
    if "dc" in names:
        out["density"], out["coverage"] = density_coverage(real.features, fake, k=dc_k)
    if "intra_fid" in names:
        out["intra_fid"] = intra_class_frechet_distance(real.features, real.labels, fake, fake_labels)
    out["images"], out["real_images"], out["real"] = int(fake.shape[0]), real.count, real
    return out


__all__ = ["evaluate_synthesis", "real_loader", "real_features", "fake_features", "RealFeatures", "inception_logits", "check_logits",
           "is_synthesis_model", "class_count", "check_request", "check_real_classes", "parse_synthesis_metrics", "is_better_synthesis",
           "SYNTHESIS_METRICS", "SYNTHESIS_MODES"]
