"""``ganengine evaluate`` on a synthesis checkpoint (DCGAN, WGAN, WGAN-GP, cGAN, AC-GAN, ADC-GAN,
InfoGAN, SAGAN, BigGAN, BigGAN-deep, U-Net GAN): generate --num_samples images and compare them
with the training images (``ganengine.metrics.evaluate_synthesis``).

    ganengine evaluate --checkpoint run/ --metrics fid,is,pr,dc,intra_fid,kid
        --inception_weights pt_inception-2015-12-05-6726825d.pth [--num_samples 10000] [--seed 0]

``cli/evaluate.py`` registers the options below and hands synthesis checkpoints to ``run``.
"""
from __future__ import annotations

import os
import sys

import torch

from ganengine.cli._options import seed_int


# the synthesis-only options' defaults (None in the parser: an image-to-image evaluation refuses them
# when given, rather than ignoring them)
DEFAULTS = dict(num_samples=10000, is_splits=10, pr_k=3, dc_k=5)


def add_arguments(p) -> None:
    g = p.add_argument_group("synthesis checkpoints (dcgan, wgan, ..., infogan, sagan, biggan, unetgan)")
    g.add_argument("--num_samples", type=int, default=None,
                   help=f"images to generate (default: {DEFAULTS['num_samples']}; papers report FID on 50000)")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="seed of the latents; for image-to-image checkpoints, of the random ops the evaluation runs "
                        "(pix2pix's dropout without --eval, KID's subsets) (default: %(default)s)")
    g.add_argument("--is_splits", type=int, default=None,
                   help=f"Inception Score splits (default: {DEFAULTS['is_splits']})")
    g.add_argument("--pr_k", type=int, default=None, help=f"k of precision/recall (default: {DEFAULTS['pr_k']})")
    g.add_argument("--dc_k", type=int, default=None, help=f"k of density/coverage (default: {DEFAULTS['dc_k']})")
    g.add_argument("--feature_file", default=None,
                   help="IC-GAN: the instance features file (default: the training's, as the checkpoint records it)")


def checkpoint_model_name(path: str) -> str | None:
    """The model name stored in a training checkpoint (or a run folder's newest), None when it
    cannot be read (the usual path then reports why)."""
    try:
        from ganengine.train.checkpoint import resolve

        state = torch.load(resolve(path), map_location="cpu", weights_only=True, mmap=True)
        return state.get("model") if isinstance(state, dict) else None
    except Exception:
        return None


def is_synthesis_checkpoint(path: str) -> bool:
    from ganengine.data import CLASS_MODELS

    return checkpoint_model_name(path) in CLASS_MODELS


def _positive(name: str, value: int, least: int = 1) -> None:
    if value < least:
        raise ValueError(f"--{name} must be >= {least}, got {value}"
                         + (" (the metrics' statistics need two images at least)" if least == 2 else ""))


def check_is_splits(metrics, is_splits: int, num_samples: int) -> None:
    """The Inception Score cuts the generated images into --is_splits parts of one image or more:
    refused before anything is loaded when there are fewer images than splits."""
    if "is" in metrics and is_splits > num_samples:
        raise ValueError(f"--is_splits {is_splits} is more than --num_samples {num_samples}: the Inception Score "
                         f"cuts the generated images into --is_splits parts of one image or more; pass --num_samples "
                         f">= {is_splits} or --is_splits <= {num_samples} (a score over 1-image parts is always 1)")


def run(args) -> int:
    from ganengine.cli.evaluate import (check_metric_counts, feature_extractor, load_checkpoint, output_file,
                                        resolve_device, write_output)
    from ganengine.data import build_dataset
    from ganengine.metrics.evaluate_synthesis import (check_logits, check_neighbour_counts, check_real_classes,
                                                     check_request, evaluate_synthesis, parse_synthesis_metrics,
                                                     real_loader)

    for name, value in DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    try:
        if getattr(args, "classifier", None):
            raise ValueError("--classifier is for the acc metric of image-to-image checkpoints (pix2pix, CycleGAN, "
                             "StarGAN, ...); a synthesis checkpoint's metrics take none: leave it out")
        metrics = parse_synthesis_metrics(args.metrics)
        for name in ("batch_size", "is_splits", "pr_k", "dc_k"):
            _positive(name, getattr(args, name))
        _positive("num_samples", args.num_samples, 2)
        if args.max_images is not None:
            _positive("max_images", args.max_images, 2)
        check_metric_counts(args, metrics)
        check_is_splits(metrics, args.is_splits, args.num_samples)
        check_neighbour_counts(metrics, args.num_samples, args.max_images, args.pr_k, args.dc_k)
        output_file(args)  # (checked by evaluate.run too; here for direct callers)
        device = resolve_device(args.device)
        extractor = feature_extractor(args, device)
        if "is" in metrics:
            check_logits(extractor)
        model, data_options = load_checkpoint(args.checkpoint, device)
        if args.feature_file is not None:
            if not hasattr(model, "use_feature_file"):
                raise ValueError(f"--feature_file is IC-GAN's instance features file; {model.MODEL_NAME} takes none: "
                                 "leave it out")
            model.use_feature_file(args.feature_file, data_options)
        if hasattr(model, "check_sample_count"):
            model.check_sample_count(min(args.batch_size, args.num_samples), "--batch_size")
        root = args.dataroot or data_options.get("dataroot")
        phase = args.phase or "train"
        dataset = build_dataset(model.MODEL_NAME, {**data_options, "dataroot": root, "no_flip": True}, phase)
        if "intra_fid" in metrics:
            check_request(model, metrics, args.num_samples, args.is_splits)  # (a conditional model: said first)
            check_real_classes(dataset, args.max_images, "--max_images")
        n_real = len(dataset) if args.max_images is None else min(len(dataset), args.max_images)
        limited = args.max_images is not None and args.max_images < len(dataset)
        check_neighbour_counts(metrics, None, n_real, args.pr_k, args.dc_k,
                               {"max_real": "--max_images" if limited else "the real images (--phase, --dataroot)"})
        loader = real_loader(dataset, args.batch_size, args.max_images)
        results = evaluate_synthesis(model, loader, metrics, extractor, num_samples=args.num_samples,
                                     batch_size=args.batch_size, seed=args.seed, max_real=args.max_images,
                                     is_splits=args.is_splits, pr_k=args.pr_k, dc_k=args.dc_k,
                                     kid_options={"subsets": args.kid_subsets, "subset_size": args.kid_subset_size})
    except (FileNotFoundError, ValueError, TypeError, RuntimeError, AttributeError, ImportError) as exc:
        print(f"ganengine evaluate: error: {exc}", file=sys.stderr)
        return 2
    results.pop("real")
    results = {"checkpoint": os.path.abspath(args.checkpoint), "model": model.MODEL_NAME,
               "dataroot": root or "built-in sample data", "phase": phase, "seed": args.seed, **results}
    for key, value in results.items():
        print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
    return write_output(args, results)


def refuse_synthesis_options(args) -> None:
    """An image-to-image checkpoint's evaluation uses none of the synthesis-only options: given, they
    are refused (they would be ignored)."""
    given = [f"--{name}" for name in (*DEFAULTS, "feature_file") if getattr(args, name, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} apply to synthesis checkpoints (noise -> image models) only; this "
                         "checkpoint translates images (its evaluation runs over the data's images): leave "
                         f"{'it' if len(given) == 1 else 'them'} out")
