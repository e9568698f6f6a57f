"""Evaluate a generator over a data loader: FID, KID, L1/PSNR/SSIM, attribute accuracy.

``evaluate_generator`` is what ``ganengine evaluate`` runs and what the training engine calls
every N steps on a held-out split. Everything streams batch by batch: FID keeps only running
mean/covariance (float64), the paired metrics running sums; KID keeps the features (it needs
pairs of samples), as float32 on the CPU. Computation happens on the model's device.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ganengine.metrics.accuracy import AttributeAccuracy
from ganengine.metrics.features import as_rgb, extract_features
from ganengine.metrics.frechet import frechet_distance
from ganengine.metrics.kid import kernel_inception_distance
from ganengine.metrics.paired import l1_error, psnr, ssim
from ganengine.metrics.stats import FeatureStats

METRICS = ("fid", "kid", "l1", "psnr", "ssim", "acc")
# "min": lower is better; "max": higher is better (for keeping the best checkpoint)
MODES = {"fid": "min", "kid": "min", "l1": "min", "psnr": "max", "ssim": "max", "acc": "max"}


def parse_metrics(metrics, what: str = "metrics") -> tuple[str, ...]:
    """'fid,kid' or ['fid', 'kid'] -> ('fid', 'kid'), validated (``what``: the name an error gives
    the argument, e.g. the CLI's "--metrics")."""
    names = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise ValueError(f"{what} must be a non-empty subset of {METRICS}, got {metrics!r}")
    return tuple(dict.fromkeys(names))


def is_better(metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of ``metric`` improves on ``best`` (None: nothing yet)."""
    if best is None:
        return True
    return value < best if MODES[metric] == "min" else value > best


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _generate(model, batch: dict, device: torch.device) -> torch.Tensor:
    if hasattr(model, "translate"):  # a ganengine.models GANModel
        return model.translate(batch)
    if "A" not in batch:
        raise ValueError("evaluate_generator: a plain generator module needs batches with an 'A' input "
                         f"(pix2pix/CycleGAN layout); got keys {sorted(batch)}. Pass a GANModel instead.")
    return model(batch["A"].to(device))


def _batch_size(batch: dict) -> int:
    return next((v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim()), 0)


def _with_targets(model, batch: dict, start: int, selected_attrs=None) -> dict:
    """StarGAN batches from the data loader carry the images' own labels; each image is translated
    to a target from the reference test's create_labels of its own labels
    (``train.visuals.stargan_targets``: every domain one-hot for folder domains, each attribute
    flipped in turn for CelebA attributes, hair colours exclusive): image i of the evaluation
    (counted over the whole run, ``start`` + its place in the batch: the same at any batch size
    and loader order) takes target set i mod c_dim, and for one-hot labels the next domain where
    that set is its own domain. (Another image's labels, as the reference's training draws them,
    are mostly the image's own on domain-sorted data.)"""
    if getattr(model, "MODEL_NAME", "") != "stargan" or "target_label" in batch or "label" not in batch:
        return batch
    from ganengine.train.visuals import stargan_targets

    label = batch["label"]
    indices = label.dim() == 1  # (RaFD class indices)
    c = int(_options(model).get("c_dim", 0)) if indices else label.shape[1]
    onehot = F.one_hot(label.long(), c).float() if indices else label.float()
    # attributes (CelebA: each flipped in turn) unless the data are domains (RaFD: the dataset
    # option, or class indices); decided per model, never per batch (a single row can look one-hot)
    attributes = not indices and label_mode(model) is not False
    names = (selected_attrs or [f"attribute {j}" for j in range(c)]) if attributes else None
    sets = torch.stack(stargan_targets(onehot, names))  # (c, n, c)
    rows = torch.arange(onehot.shape[0])
    which = (rows + start) % c
    target = sets[which, rows]
    if not attributes:  # one-hot domains: never the image's own
        own = (target == onehot).all(1)
        target[own] = sets[(which[own] + 1) % c, rows[own]]
    return {**batch, "target_label": target.argmax(1).to(label.dtype) if indices else target.to(label.dtype)}


# models trained on unpaired data: batch["B"] is not the counterpart of batch["A"]
UNPAIRED_MODELS = ("cyclegan", "csgan")
PAIRED_METRICS = ("l1", "psnr", "ssim")


def _options(model) -> dict:
    options = getattr(model, "options", None)
    return options if isinstance(options, dict) else {}


def target_key(model, batch: dict) -> str:
    """The batch key of the real images ``model``'s outputs are compared with. pix2pix/CycleGAN
    batches keep the raw A and B images and the model applies its ``direction`` (``translate``
    reads ``batch["A"]`` under AtoB, ``batch["B"]`` under BtoA), so the target is the other one:
    "B" under AtoB, "A" under BtoA. StarGAN/StackGAN: "image"."""
    if "A" in batch or "B" in batch:
        key = "A" if _options(model).get("direction", "AtoB") == "BtoA" else "B"
        if key in batch:
            return key
    elif "image" in batch:
        return "image"
    raise ValueError(f"evaluate_generator: batches need real images under 'B' (under 'A' for a --direction BtoA "
                     f"model) or 'image', got keys {sorted(batch)}")


def _first_seen(paths, seen: set, count: int) -> list[int]:
    """Indices of the batch rows whose path is not in ``seen`` (added to it); every row where the
    batch carries no paths."""
    if paths is None:
        return list(range(count))
    keep = []
    for i, path in enumerate(paths):
        if path not in seen:
            seen.add(path)
            keep.append(i)
    return keep


def is_unpaired(model) -> bool:
    """Whether ``model`` trains on unpaired data (CycleGAN, CS-GAN): no pixel-wise target exists."""
    return getattr(model, "MODEL_NAME", "") in UNPAIRED_MODELS


def check_paired(model, metrics) -> None:
    """l1/psnr/ssim compare each output with its own target pixel by pixel: refused for models
    trained on unpaired data, where batch["B"] is just another image of domain B."""
    asked = [m for m in metrics if m in PAIRED_METRICS]
    if asked and is_unpaired(model):
        raise ValueError(f"--metrics {','.join(asked)}: paired metrics need aligned image pairs (pix2pix data); "
                         f"{model.MODEL_NAME} trains on unpaired data, where no B image is the counterpart of an A "
                         "image. Leave them out of --metrics (fid/kid compare the two domains' distributions).")
    name = getattr(model, "MODEL_NAME", "")
    if asked and name in ("stargan", "stackgan"):
        raise ValueError(f"--metrics {','.join(asked)}: paired metrics compare each output with its own target "
                         f"image (pix2pix data); {name} has none (its outputs are new attributes / images from "
                         "captions). Leave them out of --metrics (fid/kid compare distributions).")


def label_mode(model) -> bool | None:
    """Whether the attribute accuracy is multi-label (per attribute) for ``model``'s data: StarGAN
    dataset='CelebA' -> True (attributes), 'RaFD' -> False (one domain per image, argmax); None
    when the model does not say."""
    if getattr(model, "MODEL_NAME", "") == "stargan":
        dataset = _options(model).get("dataset")
        if dataset in ("CelebA", "RaFD"):
            return dataset == "CelebA"
    return None


@torch.no_grad()
def evaluate_generator(model, loader: Iterable[dict], metrics=("fid",), feature_extractor: nn.Module | None = None,
                       classifier: nn.Module | None = None, max_images: int | None = None,
                       kid_options: dict | None = None, data_range: float = 2.0,
                       multi_label: bool | None = None, selected_attrs=None) -> dict[str, float]:
    """Run the generator over ``loader`` and compute ``metrics``; returns {metric: value, ..., "images": n}.

    ``model``: a ganengine GANModel (its ``translate(batch)`` makes the images) or a plain generator
    module (called on ``batch["A"]``). Real images: ``batch["B"]`` (pix2pix/CycleGAN; ``batch["A"]``
    for a model trained with ``direction="BtoA"``, whose ``translate`` reads ``batch["B"]``) or
    ``batch["image"]`` (StarGAN/StackGAN). Images in [-1, 1].
    fid/kid need ``feature_extractor`` (``ganengine.metrics.resolve_feature_extractor``);
    l1/psnr/ssim compare output and that target pairwise (pix2pix: paired data only; refused for
    CycleGAN/CS-GAN, trained on unpaired data);
    acc needs ``classifier`` (images -> (N, c_dim) logits) and targets in ``batch["target_label"]``
    (else ``batch["label"]``). A StarGAN model without ``target_label`` in the batch translates
    each image to one of the reference test's create_labels targets of its labels (``_with_targets``).
    ``multi_label``: how acc scores (True: per attribute, False: argmax class); None takes it from
    the model (StarGAN dataset CelebA: per attribute, RaFD: argmax), else from all the targets seen
    (``AttributeAccuracy``). ``selected_attrs``: StarGAN's CelebA attribute names (the data's
    ``selected_attrs``), for the targets' hair-colour rule (not used for RaFD domains).
    The model's train/eval mode is left as the caller set it (``translate`` sets its own).
    """
    names = parse_metrics(metrics)
    if {"fid", "kid"} & set(names) and feature_extractor is None:
        from ganengine.metrics.inception import WEIGHTS_HELP

        raise ValueError("fid/kid need a feature extractor. " + WEIGHTS_HELP)
    if "acc" in names and classifier is None:
        raise ValueError("the acc metric needs a classifier module (images -> (N, c_dim) logits)")
    check_paired(model, names)
    device = _device_of(model)
    real_stats, fake_stats = FeatureStats(), FeatureStats()
    real_feats, fake_feats = [], []
    sums = {m: 0.0 for m in ("l1", "psnr", "ssim")}
    acc = AttributeAccuracy(label_mode(model) if multi_label is None else multi_label)
    n = n_seen = 0
    unpaired = is_unpaired(model)
    seen = {"A": set(), "B": set()}
    for batch in loader:
        if not isinstance(batch, dict):
            raise TypeError(f"evaluate_generator: batches must be dicts (see docs/INTERFACES.md), got {type(batch).__name__}")
        batch = _with_targets(model, batch, n_seen, selected_attrs)
        n_seen += _batch_size(batch)
        fake = _generate(model, batch, device).float()
        key = target_key(model, batch)
        real = batch[key].to(fake.device).float()
        if unpaired:
            # an unpaired epoch has max(|A|, |B|) items, the shorter folder repeating (B by index
            # modulo |B| with serial batches): each source image's output and each real image
            # counted once, as FID between the two folders counts them
            src = "A" if key == "B" else "B"
            fake = fake[_first_seen(batch.get(f"{src}_paths"), seen[src], fake.shape[0])]
            real = real[_first_seen(batch.get(f"{key}_paths"), seen[key], real.shape[0])]
        if max_images is not None:
            keep = max_images - n
            if keep <= 0:
                break
            fake, real = fake[:keep], real[:keep]
            batch = {k: (v[:keep] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        if {"fid", "kid"} & set(names):
            ff = extract_features(feature_extractor, as_rgb(fake))  # (grayscale: as evaluate_synthesis)
            fr = extract_features(feature_extractor, as_rgb(real))
            fake_stats.update(ff)
            real_stats.update(fr)
            if "kid" in names:
                fake_feats.append(ff.float().cpu())
                real_feats.append(fr.float().cpu())
        if {"l1", "psnr", "ssim"} & set(names):
            if key not in ("A", "B"):
                raise ValueError("l1/psnr/ssim need paired targets (batch['B'], pix2pix data)")
            if fake.shape != real.shape:
                raise ValueError(f"l1/psnr/ssim: generated {tuple(fake.shape)} and target {tuple(real.shape)} differ")
            if "l1" in names:
                sums["l1"] += float(l1_error(fake, real).sum())
            if "psnr" in names:
                sums["psnr"] += float(psnr(fake, real, data_range).sum())
            if "ssim" in names:
                sums["ssim"] += float(ssim(fake, real, data_range).sum())
        if "acc" in names:
            targets = batch.get("target_label", batch.get("label"))
            if targets is None:
                raise ValueError("acc needs target labels in batch['target_label'] or batch['label']")
            acc.update(classifier(fake.to(_device_of(classifier))), targets)
        n += fake.shape[0]
    if n == 0:
        raise ValueError("evaluate_generator: the loader produced no images")
    out: dict[str, float] = {}
    if "fid" in names:
        out["fid"] = frechet_distance(real_stats, fake_stats)
    if "kid" in names:
        kid, kid_std = kernel_inception_distance(torch.cat(real_feats), torch.cat(fake_feats), return_std=True,
                                                 **(kid_options or {}))
        out["kid"], out["kid_std"] = kid, kid_std
    for m in ("l1", "psnr", "ssim"):
        if m in names:
            out[m] = sums[m] / n
    if "acc" in names:
        out["acc"] = acc.compute()
    out["images"] = n
    return out
