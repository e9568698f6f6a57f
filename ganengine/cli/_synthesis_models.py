"""``ganengine train`` entries for DCGAN (pytorch/examples) and PyTorch-GAN's WGAN, WGAN-GP, cGAN,
AC-GAN (+ ADC-GAN) and InfoGAN: descriptions, the references' engine defaults, the built-in-data
defaults, their data options and what follows from the data. ``cli/train.py`` merges these.

Data: a class-per-folder dataset (``DATAROOT/<class>/*.png``, sorted folder names = labels; the
reference DCGAN's ``--dataset folder`` is the same layout through ImageFolder), BigGAN's HDF5, or,
without ``--dataroot``, the built-in digits (10 classes, 32x32). Images are read with
``--channels`` (``--nc`` for DCGAN) channels at the networks' size (``--img_size``; DCGAN 64), not
flipped unless ``--flip`` (the references do not flip).
"""
from __future__ import annotations

import argparse

MODELS = ("dcgan", "wgan", "wgan_gp", "cgan", "acgan", "adcgan", "infogan")
CONDITIONAL = ("cgan", "acgan", "adcgan")  # class labels from the data (InfoGAN's categories are its own)

DESCRIPTIONS = {
    "dcgan": "DCGAN: unconditional synthesis, pytorch/examples dcgan (DATAROOT/<class>/*.png, 64x64).",
    "wgan": "WGAN: weight-clipped critic, RMSprop (PyTorch-GAN wgan; DATAROOT/<class>/*.png).",
    "wgan_gp": "WGAN-GP: critic with gradient penalty (PyTorch-GAN wgan_gp; DATAROOT/<class>/*.png).",
    "cgan": "cGAN: class-conditional MLP GAN (PyTorch-GAN cgan; DATAROOT/<class>/*.png, labels from folders).",
    "acgan": "AC-GAN: auxiliary-classifier GAN (PyTorch-GAN acgan; DATAROOT/<class>/*.png, labels from folders).",
    "adcgan": "ADC-GAN: AC-GAN networks with a 2K-way discriminative classifier (DATAROOT/<class>/*.png).",
    "infogan": "InfoGAN: categorical and continuous codes, mutual-information loss (PyTorch-GAN infogan; "
               "DATAROOT/<class>/*.png, labels unused).",
}

_PYTORCH_GAN = dict(batch_size=64, n_epochs=200, n_epochs_decay=0)
REFERENCE = {"dcgan": dict(batch_size=64, image_size=64, n_epochs=25, n_epochs_decay=0),
             **{m: dict(_PYTORCH_GAN) for m in MODELS[1:]}}

# built-in digits (1000 images, 32x32 grayscale): a few hundred steps in a few CPU minutes
_RUN = dict(sample_every=100, save_every=500)
SAMPLE = {
    "dcgan": dict(nc=1, ngf=64, ndf=64, batch_size=32, max_steps=600, **_RUN),
    "wgan": dict(img_size=32, batch_size=64, n_critic=5, lr=0.0002, max_steps=3000, sample_every=500, save_every=1000),
    "wgan_gp": dict(img_size=32, batch_size=64, n_critic=5, max_steps=2000, sample_every=250, save_every=1000),
    "cgan": dict(img_size=32, batch_size=64, max_steps=1500, sample_every=250, save_every=500),
    "acgan": dict(img_size=32, batch_size=64, max_steps=600, **_RUN),
    "adcgan": dict(img_size=32, batch_size=64, max_steps=600, **_RUN),
    "infogan": dict(img_size=32, batch_size=64, max_steps=600, **_RUN),
}


def add_data_options(g: argparse._ArgumentGroup, model: str) -> None:
    """The data options these models take besides --dataroot, --cache_images, --no_flip."""
    g.add_argument("--flip", action="store_true", help="random horizontal flips (the references do not flip)")
    if model == "dcgan":
        g.add_argument("--imageSize", "--image_size", dest="image_size", type=int, default=None,
                       help="image size; the reference networks take 64 only (default: 64)")


def add_aliases(mp: argparse.ArgumentParser, model: str) -> None:
    """The references' spellings of engine options."""
    if model == "dcgan":
        mp.add_argument("--batchSize", dest="batch_size", type=int, help="same as --batch_size")
        mp.add_argument("--niter", dest="n_epochs", type=int, help="same as --n_epochs (epochs to train)")
        mp.add_argument("--manualSeed", dest="seed", type=int, help="same as --seed")
    else:
        mp.add_argument("--sample_interval", dest="sample_every", type=int, help="same as --sample_every")


def derive(model: str, model_opts: dict, data_opts: dict, flip: bool) -> None:
    """Image size, channels and (for the conditional models) the class count follow the options
    and the data; the data is read at the networks' size and channels."""
    from ganengine.cli._options import model_class
    from ganengine.data import build_dataset

    defaults = model_class(model).DEFAULTS
    if model == "dcgan":
        size = data_opts.get("image_size", 64)
        if size != 64:
            raise ValueError(f"--imageSize {size}: the reference DCGAN networks make and take 64x64 images only "
                             "(five 4x4 (transposed) convolutions); leave it out")
        data_opts["image_size"], data_opts["channels"] = 64, model_opts.get("nc", defaults["nc"])
    else:
        data_opts["image_size"] = model_opts.get("img_size", defaults["img_size"])
        data_opts["channels"] = model_opts.get("channels", defaults["channels"])
    data_opts["no_flip"] = not flip
    if model in CONDITIONAL:
        ds = build_dataset(model, data_opts)
        n = len(ds.classes)
        if "n_classes" in model_opts and model_opts["n_classes"] < n:
            raise ValueError(f"--n_classes {model_opts['n_classes']} is smaller than the {n} classes in the data "
                             f"({', '.join(map(str, ds.classes[:5]))}{', ...' if n > 5 else ''}); leave it out to "
                             "take it from the data")
        model_opts.setdefault("n_classes", n)
        data_opts["classes"] = [str(c) for c in ds.classes]


def add_eval_options(mp: argparse.ArgumentParser) -> None:
    """Training-time evaluation of a synthesis model (ganengine/train/evaluation.py)."""
    from ganengine.cli._options import nonneg_int, positive_int

    g = mp.add_argument_group("evaluation (FID and more every N steps; the best checkpoint is kept as best.pt)")
    g.add_argument("--eval_every", type=nonneg_int, default=0,
                   help="every N steps (and at the last step) generate --eval_num_samples images, compute "
                        "--eval_metrics against the training images, log them to eval_log.csv and keep the "
                        "checkpoint with the best --eval_best as RUN_DIR/best.pt (0 = never; default: %(default)s)")
    g.add_argument("--eval_metrics", default="fid",
                   help="comma-separated subset of fid,kid,is,pr,dc,intra_fid (pr = precision/recall, "
                        "dc = density/coverage; intra_fid for class-conditional models) (default: %(default)s)")
    g.add_argument("--eval_num_samples", type=positive_int, default=5000,
                   help="generated images per evaluation (default: %(default)s)")
    g.add_argument("--eval_batch_size", type=positive_int, default=50, help="(default: %(default)s)")
    g.add_argument("--eval_max_real", type=positive_int, default=None,
                   help="use at most this many training images as the real set (default: all)")
    g.add_argument("--eval_best", default="fid",
                   help="result that picks best.pt: fid, kid, intra_fid (lower is better), is, precision, "
                        "recall, coverage (higher is better) (default: %(default)s)")
    g.add_argument("--inception_weights", default=None, metavar="PATH",
                   help="FID Inception weights file pt_inception-2015-12-05-6726825d.pth (nothing is downloaded)")
    g.add_argument("--inception_resize", default=None, choices=("pytorch-fid", "tf1"),
                   help="resize to 299x299 as pytorch-fid (default) or as TF1/torch-fidelity (not with "
                        "--feature_extractor)")
    g.add_argument("--feature_extractor", default=None, metavar="MODULE:ATTR",
                   help="your own feature network instead of Inception ('pkg.module:attr' or 'file.py:attr'; "
                        "images in [0, 1]; a logits(features) method enables is)")


def eval_options(args) -> tuple[int, dict]:
    """(eval_every, TrainConfig.eval_options) from the parsed arguments."""
    every = getattr(args, "eval_every", 0) or 0
    if not every:
        return 0, {}
    return every, dict(metrics=args.eval_metrics, num_samples=args.eval_num_samples, batch_size=args.eval_batch_size,
                       max_real=args.eval_max_real, best_metric=args.eval_best, inception_weights=args.inception_weights,
                       inception_resize=args.inception_resize, feature_extractor=args.feature_extractor,
                       seed=args.seed)
