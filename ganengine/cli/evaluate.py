"""``ganengine evaluate``: FID/KID/L1/PSNR/SSIM/accuracy of a trained checkpoint's generator.

    ganengine evaluate --checkpoint run/latest.pt [--dataroot DIR] [--phase test]
        [--metrics fid,kid] [--inception_weights pt_inception-2015-12-05-6726825d.pth |
         --feature_extractor module:attr] [--classifier module:attr] [--output metrics.json]

Nothing is downloaded: FID/KID use the Inception weights file you pass, or your own extractor.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from ganengine.cli import _evaluate_synthesis


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="compute FID/KID/L1/PSNR/SSIM/accuracy (translation) or FID/KID/IS/precision-recall/density-coverage/intra-FID (synthesis) of a checkpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) or run folder (its newest checkpoint)")
    p.add_argument("--dataroot", default=None, help="data folder in the reference layout (default: the folder the "
                   "checkpoint was trained on, else the built-in sample data)")
    p.add_argument("--phase", default=None, help="split to evaluate on (default: test, else val; synthesis: train)")
    p.add_argument("--metrics", default="fid", help="comma-separated subset of fid,kid,l1,psnr,ssim,acc; for a synthesis "
                   "checkpoint of fid,kid,is,pr,dc,intra_fid (default: fid)")
    p.add_argument("--inception_weights", default=None, metavar="PATH",
                   help="FID Inception weights file pt_inception-2015-12-05-6726825d.pth (for fid/kid)")
    p.add_argument("--feature_extractor", default=None, metavar="MODULE:ATTR",
                   help="your own feature extractor instead of Inception: 'pkg.module:attr' or 'file.py:attr' "
                        "(an nn.Module, or a class/factory called without arguments; images in [0, 1])")
    p.add_argument("--inception_resize", default=None, choices=("pytorch-fid", "tf1"),
                   help="resize to 299x299 as pytorch-fid/torchmetrics (default) or as TF1/torch-fidelity "
                        "(the Inception network's option: not with --feature_extractor)")
    p.add_argument("--classifier", default=None, metavar="MODULE:ATTR",
                   help="attribute classifier for acc (images in [-1, 1] -> (N, c_dim) logits)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_images", type=int, default=None,
                   help="evaluate at most this many images (synthesis checkpoints: real images)")
    p.add_argument("--kid_subsets", type=int, default=100)
    p.add_argument("--kid_subset_size", type=int, default=1000)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--output", default=None, help="also write the results as JSON to this file")
    _evaluate_synthesis.add_arguments(p)
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------- checkpoint -> model
def load_checkpoint(path: str, device: torch.device | str = "cpu"):
    """(model, data_options) from a ganengine training checkpoint or run folder (docs/INTERFACES.md):
    the GANModel on ``device`` and the data options it was trained with (may be empty)."""
    try:
        from ganengine.train.checkpoint import load_model
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("ganengine.train"):
            raise
        load_model = None
    if load_model is not None:
        model, state = load_model(path, map_location="cpu")
    else:  # the same recipe, for builds without the training engine
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--checkpoint: no such file {path!r}")
        from ganengine.models.checkpoints import damaged_message, damaged_record

        bad = damaged_record(path)
        if bad is not None:
            raise ValueError(f"--checkpoint: {damaged_message(path, bad)}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != "ganengine-checkpoint":
            raise ValueError(f"--checkpoint {path!r} is not a ganengine training checkpoint "
                             "(expected a dict with format='ganengine-checkpoint')")
        from ganengine.models import build_model

        model = build_model(state["model"], **state.get("options", {}))
        for name, net_state in state["networks"].items():
            getattr(model, name).load_state_dict(net_state)
    return model.to(device), dict(state.get("data") or {})


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as exc:  # torch's own words name no option
        raise ValueError(f"--device {name!r} is not a device: expected auto (cuda when available), cpu, cuda or "
                         f"cuda:N (another torch device type such as mps, with an optional :N index); {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available")
    return device


def feature_extractor(args, device: torch.device):
    """The feature network the options name: --feature_extractor module:attr, or the FID
    Inception network from --inception_weights (not both)."""
    if args.feature_extractor and args.inception_weights:
        raise ValueError("give --inception_weights or --feature_extractor, not both")
    if args.feature_extractor and args.inception_resize:
        raise ValueError("--inception_resize sets how the Inception network resizes its input; your "
                         "--feature_extractor takes the images as they are: give one of them")
    from ganengine.metrics import load_fid_inception, resolve_feature_extractor

    if args.feature_extractor:
        obj = load_user_object(args.feature_extractor, "--feature_extractor")
        try:
            return resolve_feature_extractor(obj, device=device)
        except TypeError as exc:
            raise TypeError(f"--feature_extractor {args.feature_extractor!r}: {exc}") from None
    return load_fid_inception(args.inception_weights, device, resize=args.inception_resize or "pytorch-fid")


def load_user_object(spec: str, option: str):
    """The object ``spec`` ('module:attr' or 'path/to/file.py:attr') names, or a ValueError
    naming ``option`` and the expected form when it cannot be found."""
    from ganengine.metrics.features import load_object

    form = "expected 'module:attr' (an importable module) or 'path/to/file.py:attr'"
    try:
        return load_object(spec)
    except ImportError as exc:
        module = spec.rsplit(":", 1)[0]
        name = getattr(exc, "name", None)
        if isinstance(exc, ModuleNotFoundError) and name and (name == module or module.startswith(name + ".")):
            raise ValueError(f"{option} {spec!r}: cannot import module {module!r} ({exc}); {form}") from None
        raise ValueError(f"{option} {spec!r}: importing {module!r} failed: {exc}") from None
    except ValueError:
        raise ValueError(f"{option} {spec!r}: {form}") from None
    except (FileNotFoundError, AttributeError) as exc:
        raise ValueError(f"{option} {exc}; {form}") from None


def output_file(args) -> None:
    """--output checked (and its missing folders created) before the evaluation runs."""
    if args.output:
        from ganengine.cli._io import writable_file

        writable_file(args.output, "--output")


def write_output(args, results: dict) -> int:
    """Write the JSON results to --output (0), or say in one line why that failed (2)."""
    if not args.output:
        return 0
    from ganengine.cli._io import describe

    try:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    except OSError as exc:
        print(f"ganengine evaluate: error: --output {args.output!r}: writing the results failed: {describe(exc)}",
              file=sys.stderr)
        return 2
    return 0


def check_metric_counts(args, metrics) -> None:
    """Counts the chosen metrics need: FID/KID statistics need two images at least, KID's
    subsets two samples at least."""
    if {"fid", "kid"} & set(metrics) and args.max_images is not None and args.max_images < 2:
        raise ValueError(f"--max_images must be >= 2 for fid/kid (their statistics need two images at least), "
                         f"got {args.max_images}")
    if "kid" in metrics and args.kid_subset_size < 2:
        raise ValueError(f"--kid_subset_size must be >= 2 (samples per KID subset), got {args.kid_subset_size}")


def _default_phase(model_name: str, root: str, data_options: dict | None = None) -> str:
    if model_name == "pix2pix":
        return "test" if os.path.isdir(os.path.join(root, "test")) else "val"
    if model_name == "cyclegan":
        return "test" if os.path.isdir(os.path.join(root, "testA")) else "val"
    if (data_options or {}).get("domains"):  # StarGAN on RaFD-style folders: DATAROOT/test/, else val/
        return "val" if not os.path.isdir(os.path.join(root, "test")) and os.path.isdir(os.path.join(root, "val")) \
            else "test"
    return "test"


def make_eval_loader(model, data_options: dict, dataroot: str | None, phase: str | None, batch_size: int,
                     device: torch.device):
    """A deterministic, unshuffled loader over ``phase`` of the data the model was trained on
    (``data_options`` from the checkpoint; ``dataroot`` overrides its folder)."""
    from ganengine import data

    name = model.MODEL_NAME
    root = dataroot or data_options.get("dataroot") or data.sample_root(name)
    phase = phase or _default_phase(name, root, data_options)
    options = {**(getattr(model, "options", {}) or {}), **data_options}
    options.update(dataroot=root, phase=phase, serial_batches=True, no_flip=True)
    from ganengine.data.images import missing_data_hint

    hint = ("Check --dataroot (and --phase), or leave --dataroot out to evaluate on the data the model was "
            "trained on." if dataroot else "Pass --dataroot with the folder of the data the model was trained "
            "on (and --phase).")
    with missing_data_hint(hint):
        dataset = data.build_dataset(name, options, phase)
    loader, _ = data.make_loader(dataset, batch_size, device, shuffle=False, drop_last=False, num_workers=0)
    return loader, phase, root


def _check_counts(args) -> None:
    for option in ("batch_size", "max_images", "kid_subsets", "kid_subset_size"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            what = "images" if option == "max_images" else "a whole number"
            raise ValueError(f"--{option} must be at least 1 ({what}), got {value}"
                             + ("; leave it out to evaluate every image" if option == "max_images" else ""))


def run(args) -> int:
    from ganengine.metrics import evaluate_generator, parse_metrics
    from ganengine.metrics.evaluate import check_paired

    try:  # counts and --output checked for both kinds of checkpoint, before anything is loaded
        if not os.path.exists(args.checkpoint):  # (said first: the metrics' checks depend on its kind)
            raise ValueError(f"--checkpoint {args.checkpoint!r} does not exist (expected a training checkpoint .pt "
                             "or a run folder)")
        if args.dataroot is not None and not os.path.exists(args.dataroot):  # (before the metrics' own needs)
            raise ValueError(f"--dataroot {args.dataroot!r} does not exist (expected the data folder, or leave "
                             "--dataroot out to evaluate on the data the model was trained on)")
        _check_counts(args)
        output_file(args)
    except ValueError as exc:
        print(f"ganengine evaluate: error: {exc}", file=sys.stderr)
        return 2
    if _evaluate_synthesis.is_synthesis_checkpoint(args.checkpoint):  # noise -> image models: generate N samples
        return _evaluate_synthesis.run(args)
    try:
        _evaluate_synthesis.refuse_synthesis_options(args)
        metrics = parse_metrics(args.metrics, "--metrics")
        check_metric_counts(args, metrics)
        if args.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
        device = resolve_device(args.device)
        extractor = classifier = None
        if {"fid", "kid"} & set(metrics):
            extractor = feature_extractor(args, device)
        if "acc" in metrics:
            if not args.classifier:
                raise ValueError("the acc metric needs --classifier module:attr")
            obj = load_user_object(args.classifier, "--classifier")
            classifier = (obj if isinstance(obj, torch.nn.Module) else obj()).to(device).eval()
        model, data_options = load_checkpoint(args.checkpoint, device)
        check_paired(model, metrics)  # (before the data is read)
        loader, phase, root = make_eval_loader(model, data_options, args.dataroot, args.phase, args.batch_size,
                                               device)
        torch.manual_seed(args.seed)  # (the same numbers on every run: dropout, KID subsets)
        results = evaluate_generator(model, loader, metrics, extractor, classifier, max_images=args.max_images,
                                     kid_options={"subsets": args.kid_subsets, "subset_size": args.kid_subset_size},
                                     selected_attrs=data_options.get("selected_attrs"))
    except (FileNotFoundError, ValueError, TypeError, RuntimeError, AttributeError, ImportError) as exc:
        print(f"ganengine evaluate: error: {exc}", file=sys.stderr)
        return 2
    results = {"checkpoint": os.path.abspath(args.checkpoint), "dataroot": root, "phase": phase, **results}
    for key, value in results.items():
        print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
    return write_output(args, results)
