"""ganengine train MODEL: train an image-to-image model (pix2pix, CycleGAN, CSGAN, StarGAN, StackGAN)
or a synthesis model (DCGAN, WGAN, WGAN-GP, cGAN, AC-GAN, ADC-GAN, InfoGAN, SAGAN, BigGAN,
BigGAN-deep, U-Net GAN, IC-GAN); `ganengine train MODEL --help` lists its options.

Without --dataroot it trains on the built-in sample data (shipped with the package, made from
scikit-image's and scikit-learn's bundled images) with small-data defaults, so the command works
offline on a laptop CPU. Multi-GPU / multi-process: torchrun --nproc_per_node N -m ganengine
train ...; --batch_size is per process, as in the reference implementations.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time

from ganengine.cli import _synthesis_models as _basic
from ganengine.cli._options import (MODEL_NAMES, add_model_options, model_class, nonneg_int, positive_int,
                                    reference_device, seed_int, str2bool)

DESCRIPTIONS = {
    "pix2pix": "pix2pix: paired image-to-image translation (DATAROOT/train/*.jpg, A|B side by side).",
    "cyclegan": "CycleGAN: unpaired translation (DATAROOT/trainA, DATAROOT/trainB).",
    "stargan": "StarGAN: multi-domain translation (CelebA: DATAROOT/images + list_attr_celeba.txt; "
               "or folder per domain: DATAROOT/train/<domain>/).",
    "stackgan": "StackGAN: text-to-image (DATAROOT/images + captions.txt, text/*.txt or embeddings.pt).",
    "csgan": "CSGAN: CycleGAN + cycle-synthesized losses (DATAROOT/trainA, DATAROOT/trainB).",
    "sagan": "SAGAN: self-attention GAN, unconditional synthesis (DATAROOT/<class>/*.png or BigGAN's HDF5).",
    "biggan": "BigGAN: class-conditional synthesis (DATAROOT/<class>/*.png or BigGAN's HDF5).",
    "biggan_deep": "BigGAN-deep: class-conditional synthesis (DATAROOT/<class>/*.png or BigGAN's HDF5).",
    "unetgan": "U-Net GAN: BigGAN G + U-Net discriminator, CutMix (DATAROOT/<class>/*.png or BigGAN's HDF5).",
    "icgan": "IC-GAN: instance-conditioned BigGAN, --class_cond for cc-IC-GAN (DATAROOT/<class>/*.png or BigGAN's "
             "HDF5; --feature_file F.npy: (N, D) instance features).",
}

# engine / data defaults: the reference implementations' where they have the option; StarGAN's
# n_epochs / n_epochs_decay are ganengine's (its reference counts iterations: --num_iters 200000),
# StackGAN's n_epochs is the reference's TRAIN.MAX_EPOCH (model options live in the model classes)
REFERENCE = {
    "pix2pix": dict(batch_size=1, load_size=286, crop_size=256, n_epochs=100, n_epochs_decay=100),
    "cyclegan": dict(batch_size=1, load_size=286, crop_size=256, n_epochs=100, n_epochs_decay=100),
    # (crop_size: 178 for CelebA, 256 for RaFD folders, chosen with the data: data/__init__.py)
    "stargan": dict(batch_size=16, image_size=128, n_epochs=20, n_epochs_decay=10),
    "stackgan": dict(batch_size=64, image_size=64, n_epochs=600, n_epochs_decay=0),
    "csgan": dict(batch_size=1, load_size=286, crop_size=256, n_epochs=100, n_epochs_decay=100),
    "sagan": dict(batch_size=64, image_size=64, n_epochs=100, n_epochs_decay=0),
    "biggan": dict(batch_size=64, image_size=128, n_epochs=100, n_epochs_decay=0),
    "biggan_deep": dict(batch_size=64, image_size=128, n_epochs=100, n_epochs_decay=0),
    "unetgan": dict(batch_size=50, image_size=128, n_epochs=100, n_epochs_decay=0),
    "icgan": dict(batch_size=64, image_size=128, n_epochs=100, n_epochs_decay=0),
}
SYNTHESIS = ("sagan", "biggan", "biggan_deep", "unetgan", "icgan")
# synthesis models whose reference does not flip the training images unless asked (the PyTorch-GAN
# family's: cli/_synthesis_models.py)
_NO_FLIP_BY_DEFAULT = ("sagan", "biggan", "biggan_deep")

# small-data defaults used with the built-in sample data (no --dataroot), for options the user did
# not give: 64x64 images and slimmer networks so that a few hundred steps on a 2-core CPU take a
# few minutes and visibly learn. Every one can be overridden on the command line.
SAMPLE = {
    "pix2pix": dict(load_size=143, crop_size=128, batch_size=4, netG="unet_128", ngf=32, ndf=32,
                    max_steps=300, sample_every=50, save_every=100),
    "cyclegan": dict(load_size=72, crop_size=64, batch_size=2, netG="resnet_6blocks", ngf=16, ndf=32,
                     max_steps=300, sample_every=50, save_every=100),
    "stargan": dict(crop_size=32, image_size=32, batch_size=16, g_conv_dim=32, d_conv_dim=32,
                    g_repeat_num=4, d_repeat_num=5, n_critic=1,
                    selected_attrs=["Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine"],
                    max_steps=300, sample_every=50, save_every=100),
    "stackgan": dict(image_size=64, batch_size=16, gf_dim=32, df_dim=16, condition_dim=32, z_dim=32,
                     max_steps=300, sample_every=50, save_every=100),
    "csgan": dict(load_size=72, crop_size=64, batch_size=2, netG="resnet_6blocks", ngf=16, ndf=32,
                  max_steps=300, sample_every=50, save_every=100),
    "sagan": dict(image_size=64, batch_size=16, g_conv_dim=16, d_conv_dim=16, z_dim=64,
                  max_steps=300, sample_every=50, save_every=100),
    "biggan": dict(image_size=32, batch_size=16, G_ch=16, D_ch=16, G_attn="16", D_attn="16", G_shared=True,
                   hier=True, dim_z=64, shared_dim=32, num_D_steps=1, G_lr=1e-4, D_lr=4e-4, ema=True, use_ema=True,
                   ema_start=100, max_steps=300, sample_every=50, save_every=100),
    "biggan_deep": dict(image_size=32, batch_size=16, G_ch=16, D_ch=16, G_attn="16", D_attn="16", dim_z=64,
                        shared_dim=32, num_D_steps=1, G_lr=1e-4, D_lr=4e-4, ema=True, use_ema=True, ema_start=100,
                        max_steps=300, sample_every=50, save_every=100),
    "unetgan": dict(image_size=32, batch_size=16, G_ch=16, D_ch=16, G_attn="0", D_attn="0", G_shared=True,
                    hier=True, dim_z=64, shared_dim=32, G_lr=1e-4, D_lr=4e-4, max_steps=300, sample_every=50,
                    save_every=100),
    "icgan": dict(image_size=32, batch_size=16, G_ch=16, D_ch=16, G_attn="16", D_attn="16", hier=True, dim_z=64,
                  shared_dim=32, G_shared_feat=True, shared_dim_feat=32, num_D_steps=1, G_lr=1e-4, D_lr=4e-4,
                  ema=True, use_ema=True, ema_start=100, ema_decay=0.99, max_steps=600, sample_every=100,
                  save_every=200),
}

# DCGAN, WGAN, WGAN-GP, cGAN, AC-GAN, ADC-GAN, InfoGAN: cli/_synthesis_models.py
DESCRIPTIONS.update(_basic.DESCRIPTIONS)
REFERENCE.update(_basic.REFERENCE)
SAMPLE.update(_basic.SAMPLE)

ENGINE_OPTIONS = ("batch_size", "n_epochs", "n_epochs_decay", "max_steps", "sample_every", "save_every")
DATA_OPTIONS = ("dataroot", "phase", "direction", "load_size", "crop_size", "preprocess", "no_flip",
                "serial_batches", "cache_images", "dataset", "selected_attrs", "attr_path", "image_size",
                "input_nc", "output_nc", "text_dim", "max_dataset_size", "rafd_crop_size")


def _add_run_options(p: argparse.ArgumentParser, model: str) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--name", default=None, help="experiment name: checkpoints go to CHECKPOINTS_DIR/NAME "
                   f"(default: {model}_<dataroot folder name>, or {model}_sample)")
    g.add_argument("--checkpoints_dir", default="./checkpoints", help="where runs are saved (default: %(default)s)")
    g.add_argument("--log_dir", default=None, help="loss CSV, sample grids and TensorBoard logs (default: the run folder)")
    g.add_argument("--batch_size", type=positive_int, default=None,
                   help=f"images per batch PER PROCESS, as in the reference; under torchrun the global batch is "
                        f"batch_size x processes (default: {REFERENCE[model]['batch_size']})")
    n, d = REFERENCE[model]["n_epochs"], REFERENCE[model]["n_epochs_decay"]
    if model == "stackgan":
        n_help = f"epochs to train (the reference's TRAIN.MAX_EPOCH) (default: {n})"
        d_help = ("not used by StackGAN: the reference has no decay phase (the rates halve every --lr_decay_epoch "
                  "epochs), so only 0 is accepted (default: 0)")
    elif model == "stargan":
        n_help = (f"epochs at the initial learning rate (ganengine's default: {n}; the reference has no epoch "
                  "option: it trains --num_iters 200000 iterations)")
        d_help = (f"epochs of linear decay to zero (ganengine's default: {d}; the reference decays over the last "
                  "--num_iters_decay iterations of --num_iters)")
    elif model in ("pix2pix", "cyclegan", "csgan"):
        n_help = (f"epochs at the initial learning rate (as the reference, which steps the schedule at the start "
                  f"of each epoch, the rate already drops in the last of them) (default: {n})")
        d_help = f"epochs of linear decay to zero (as the reference, the last of them trains at rate 0) (default: {d})"
    else:
        n_help = f"epochs at the initial learning rate (default: {n})"
        d_help = f"epochs of linear decay to zero (default: {d})"
    g.add_argument("--n_epochs", type=nonneg_int, default=None, help=n_help)
    g.add_argument("--n_epochs_decay", type=nonneg_int, default=None, help=d_help)
    g.add_argument("--max_steps", "--num_iters", dest="max_steps", type=positive_int, default=None,
                   help="stop after this many steps (one step = one batch on every process); overrides the epochs"
                        + (" (the reference's --num_iters, default 200000 there; without it ganengine trains "
                           "--n_epochs + --n_epochs_decay epochs)" if model == "stargan" else ""))
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue a run: a checkpoint file, a run folder, or nothing for the newest checkpoint "
                        "of this --name. Networks, optimisers, schedulers, scalers, image pools, step and RNG "
                        "states are restored (bit-exact on CPU with --deterministic)")
    g.add_argument("--seed", type=seed_int, default=None,
                   help="random seed (default: 0; with --resume the run's own, which another value may not change)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (bit-exact reruns and resumes on CPU; slower on GPU)")
    g.add_argument("--sample_every", type=nonneg_int, default=None,
                   help="write a PNG sample grid every N steps, 0 = never (default: 500)")
    g.add_argument("--save_every", type=nonneg_int, default=None,
                   help="checkpoint every N steps, 0 = only at the end (default: 5000)")
    g.add_argument("--keep_checkpoints", type=positive_int, default=3,
                   help="keep the newest N checkpoints (default: %(default)s)")
    g.add_argument("--print_freq", type=positive_int, default=10,
                   help="log losses (CSV, TensorBoard, progress bar) every N steps (default: %(default)s)")
    g.add_argument("--num_samples", type=positive_int, default=4, help="images per sample grid row (default: %(default)s)")
    g.add_argument("--tensorboard", choices=("auto", "on", "off"), default="auto",
                   help="TensorBoard logs: auto = when the tensorboard package is installed (default: %(default)s)")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")

    e = p.add_argument_group("engine")
    from ganengine.backends import CHOICES

    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto = cuda when available (default: %(default)s)")
    e.add_argument("--backend", choices=CHOICES, default=None,
                   help="kernel backend for the fused ops (default: $GANENGINE_BACKEND or auto)")
    e.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off",
                   help="mixed precision: bf16 autocast, or fp16 autocast with a gradient scaler per optimiser; "
                        "losses stay fp32 (default: %(default)s)")
    e.add_argument("--channels_last", action="store_true", help="NHWC memory format for networks and batches")
    e.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile the networks (the fused ops compile through their fake impls); MODE "
                        "reduce-overhead replays each network's step as a CUDA graph on a GPU, which removes the "
                        "per-op host cost (default mode: %(const)s)")
    e.add_argument("--cuda_graphs", action="store_true",
                   help="shorthand for --compile reduce-overhead: CUDA-graph replay of every network (CUDA only)")
    e.add_argument("--sync_bn", action="store_true", help="SyncBatchNorm across processes under torchrun")
    e.add_argument("--num_threads", type=nonneg_int, default=None,
                   help="DataLoader worker processes (default: 0 when the decoded images are cached and "
                        "training runs on CPU, else 4)")


def _add_data_options(p: argparse.ArgumentParser, model: str, model_defaults: dict) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataroot", default=None,
                   help="dataset folder (default: the built-in sample data, with small-data defaults)")
    g.add_argument("--cache_images", choices=("auto", "on", "off"), default="auto",
                   help="keep decoded images in memory: auto = when they fit in 1 GiB (default: %(default)s)")
    g.add_argument("--no_flip", action="store_true", help="no random horizontal flip")
    ref = REFERENCE[model]
    if model in ("pix2pix", "cyclegan", "csgan"):
        g.add_argument("--phase", default="train", help="split folder: train, val, test (default: %(default)s)")
        g.add_argument("--direction", choices=("AtoB", "BtoA"), default="AtoB", help="(default: %(default)s)")
        g.add_argument("--preprocess", default="resize_and_crop",
                       choices=("resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "none"),
                       help="(default: %(default)s)")
        g.add_argument("--load_size", type=positive_int, default=None, help=f"resize to this size (default: {ref['load_size']})")
        g.add_argument("--crop_size", type=positive_int, default=None, help=f"then crop to this size (default: {ref['crop_size']})")
        g.add_argument("--max_dataset_size", type=positive_int, default=None,
                       help="use at most N images of each folder, the first N of the sorted file names "
                            "(default: all)")
        g.add_argument("--serial_batches", action="store_true",
                       help="take the images in file order, not shuffled (CycleGAN: B in order too, not at random)")
    elif model == "stargan":
        g.add_argument("--dataset", choices=("auto", "CelebA", "RaFD"), default="auto",
                       help="CelebA = attribute file, RaFD = folder per domain; auto detects (default: %(default)s)")
        g.add_argument("--selected_attrs", nargs="+", default=None,
                       help="CelebA attributes to use as labels (default: Black_Hair Blond_Hair Brown_Hair Male Young)")
        g.add_argument("--attr_path", default=None, help="attribute file (default: DATAROOT/list_attr_celeba.txt)")
        g.add_argument("--crop_size", "--celeba_crop_size", dest="crop_size", type=positive_int, default=None,
                       help="centre crop before resizing (default: 178 for CelebA data; for RaFD folders "
                            "--rafd_crop_size, default 256, as the reference)")
        g.add_argument("--phase", default="train", help="split (default: %(default)s)")
    else:
        g.add_argument("--phase", default="train", help=argparse.SUPPRESS)
    if model in _basic.MODELS:
        _basic.add_data_options(g, model)
    elif model in _NO_FLIP_BY_DEFAULT:  # (heykeetae's SAGAN never flips; BigGAN-PyTorch with --augment)
        g.add_argument("--flip", "--augment", dest="flip", action="store_true",
                       help="random horizontal flips (the reference flips only with --augment)")
    if "image_size" not in model_defaults and model in ("stargan", "stackgan") + SYNTHESIS:
        g.add_argument("--image_size", type=positive_int, default=None,
                       help=f"image resolution (default: {ref['image_size']})")


def _debug() -> bool:
    from ganengine.backends import debug

    return debug()


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train pix2pix, cyclegan, stargan, stackgan, csgan, dcgan, wgan, wgan_gp, "
                              "cgan, acgan, adcgan, infogan, sagan, biggan, biggan_deep, unetgan or icgan",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="model", metavar="MODEL", required=True)
    for name in MODEL_NAMES:
        mp = sub.add_parser(name, help=DESCRIPTIONS[name].split(": ", 1)[1].split(" (")[0], description=DESCRIPTIONS[name] + " "
                            + __doc__.split("\n\n")[1].replace("\n", " "))
        try:
            defaults = dict(model_class(name).DEFAULTS)
        except ImportError as exc:
            # a broken install (or one being rebuilt): say why when this model is asked for, rather
            # than answer its options with "unrecognized arguments"
            mp.set_defaults(func=functools.partial(_unimportable, name, exc), _takes_any=True)
            continue
        _add_data_options(mp, name, defaults)
        _add_run_options(mp, name)
        if name in _basic.MODELS:
            _basic.add_aliases(mp, name)
        if name in _basic.MODELS + SYNTHESIS:
            _basic.add_eval_options(mp)
        model_opts = add_model_options(mp, defaults)
        _note_sample_defaults(mp, SAMPLE.get(name, {}))
        mp.set_defaults(func=run, _model_options=model_opts)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _note_sample_defaults(parser: argparse.ArgumentParser, sample: dict) -> None:
    """Each option the built-in sample data gives another value (no --dataroot: SAMPLE) says so in
    its help, beside the reference's default: "(default: 64; sample data: 16)"."""
    for action in parser._actions:
        if action.dest not in sample or not action.option_strings or action.help in (None, argparse.SUPPRESS):
            continue
        if "sample data" in action.help or action.help.startswith("same as"):
            continue
        value = sample[action.dest]
        value = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        text = action.help.rstrip()
        if f"(default: {value})" in text or f"(default: {value!r})" in text:
            continue   # (the same value)
        if text.endswith(")") and "(default: " in text:
            action.help = f"{text[:-1]}; sample data: {value})".replace("%(default)s", str(action.default))
        else:
            action.help = f"{text} (sample data: {value})"


def _unimportable(name: str, exc: ImportError, args) -> int:
    print(f"ganengine train {name}: error: the model cannot be imported ({type(exc).__name__}: {exc}); "
          "reinstall or rebuild ganengine (README: make setup)", file=sys.stderr)
    return 1


def _given(args, name):
    return getattr(args, name, None)


def resolve(args) -> tuple[dict, dict, dict, list[str]]:
    """-> (model options, data options, engine options, notes) after sample/reference defaults."""
    model = args.model
    notes = []
    known = set(args._model_options)
    if model == "stackgan" and getattr(args, "image_size", None) is None and int(getattr(args, "stage", None) or 1) == 2:
        args.image_size = 256  # Stage II's size (4x Stage I's 64), before any default fills in 64
    if args.dataroot is None:
        filled = {}
        sample = SAMPLE[model]
        if model == "unetgan" and getattr(args, "unconditional", None):
            # the unconditional G (the reference's: self-modulated norms, no class embedding) takes no
            # shared embedding
            sample = {k: v for k, v in sample.items() if k not in ("G_shared", "shared_dim")}
        for k, v in sample.items():
            if (k in known or hasattr(args, k) or k in ENGINE_OPTIONS) and getattr(args, k, None) is None:
                setattr(args, k, v)
                filled[k] = v
        from ganengine.data import SAMPLE_DATA

        notes.append(f"no --dataroot: training on the built-in sample data '{SAMPLE_DATA[model]}' with small-data "
                     "defaults " + " ".join(f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                                            for k, v in filled.items()) + " (override any of them)")
    if args.dataroot is not None and model in SYNTHESIS[1:] and getattr(args, "image_size", None) is None:
        from ganengine.data.classes import hdf5_image_size

        native = hdf5_image_size(args.dataroot)
        if native in (32, 64, 128, 256):  # (sizes the networks take; the default would resample the images)
            args.image_size = native
            notes.append(f"--image_size {native}: the HDF5 file's image size (pass --image_size to resample)")
    for k, v in REFERENCE[model].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    model_opts = {k: getattr(args, k) for k in args._model_options if getattr(args, k, None) is not None}
    data = {k: getattr(args, k) for k in DATA_OPTIONS if getattr(args, k, None) is not None}
    if data.get("dataroot"):  # (recorded absolute: sample / evaluate / translate may run from another folder)
        data["dataroot"] = os.path.abspath(data["dataroot"])
    engine = {k: getattr(args, k) for k in ENGINE_OPTIONS if getattr(args, k, None) is not None}
    engine.setdefault("sample_every", 500)
    engine.setdefault("save_every", 5000)
    return model_opts, data, engine, notes


def _derive_from_data(model: str, model_opts: dict, data_opts: dict, known: list[str]) -> None:
    """c_dim (StarGAN) and text_dim (StackGAN) follow the dataset unless given; a mismatch is an error."""
    from ganengine.data import build_dataset

    if model == "stargan" and "c_dim" in known:
        ds = build_dataset(model, data_opts)
        if "c_dim" in model_opts and model_opts["c_dim"] != ds.c_dim:
            raise ValueError(f"--c_dim {model_opts['c_dim']} does not match the data: {ds.c_dim} labels "
                             f"({'--selected_attrs' if hasattr(ds, 'selected_attrs') else 'domain folders'}). "
                             "Leave --c_dim out to take it from the data.")
        model_opts["c_dim"] = ds.c_dim
        model_opts["dataset"] = "CelebA" if hasattr(ds, "selected_attrs") else "RaFD"  # label semantics
        if hasattr(ds, "selected_attrs"):
            data_opts["selected_attrs"] = ds.selected_attrs
        else:
            data_opts["domains"] = ds.domains  # label names, for translate --target_attrs
    if model == "stackgan" and "text_dim" in known:
        ds = build_dataset(model, data_opts)
        if "text_dim" in model_opts and model_opts["text_dim"] != ds.text_dim:
            raise ValueError(f"--text_dim {model_opts['text_dim']} does not match the embeddings in the data "
                             f"({ds.text_dim}); leave it out to take it from the data.")
        model_opts["text_dim"] = ds.text_dim
        data_opts["text_embedder"] = "precomputed" if ds.precomputed else "ganengine-hash-v1"


def _derive_synthesis(model: str, model_opts: dict, data_opts: dict, engine: dict) -> None:
    """Image size and class count of the synthesis models follow the data; BigGAN loads
    batch_size x num_D_steps x num_D_accumulations images per step, as the reference."""
    from ganengine.cli._options import model_class
    from ganengine.data import build_dataset

    defaults = model_class(model).DEFAULTS
    size_key = "imsize" if model == "sagan" else "resolution"
    if size_key in model_opts and model_opts[size_key] != data_opts["image_size"]:
        raise ValueError(f"--{size_key} {model_opts[size_key]} and --image_size {data_opts['image_size']} disagree; "
                         "give one of them")
    model_opts[size_key] = data_opts["image_size"]
    if model == "icgan":  # the feature file, k-NN and feature width (models/icgan.py)
        from ganengine.models.icgan import derive_options
        derive_options(model_opts, data_opts)
    if "n_classes" in defaults:
        ds = build_dataset(model, data_opts)
        n = len(ds.classes)
        if "n_classes" in model_opts and model_opts["n_classes"] < n:
            raise ValueError(f"--n_classes {model_opts['n_classes']} is smaller than the {n} classes in the data; "
                             "leave it out to take it from the data")
        model_opts.setdefault("n_classes", n)
        data_opts["classes"] = list(ds.classes)
    if model in ("biggan", "biggan_deep", "unetgan", "icgan"):
        steps = 1 if model == "unetgan" else model_opts.get("num_D_steps", defaults["num_D_steps"])
        engine["batch_size"] *= max(1, steps) * model_opts.get("num_D_accumulations", defaults["num_D_accumulations"])


# what the numeric model options must be (checked before any data is read or a network built, so
# a bad value is one line naming the option, never torch's "Invalid learning rate: -1.0" or a
# traceback from a layer constructor)
_LEARNING_RATES = ("lr", "g_lr", "d_lr", "G_lr", "D_lr", "generator_lr", "discriminator_lr")
_BETAS = ("beta1", "beta2", "b1", "b2", "G_B1", "G_B2", "D_B1", "D_B2")
_EPSILONS = ("adam_eps", "BN_eps", "SN_eps")
_WIDTHS = ("ngf", "ndf", "nz", "nc", "channels", "latent_dim", "code_dim", "img_size", "g_conv_dim", "d_conv_dim",
           "gf_dim", "df_dim", "condition_dim", "z_dim", "text_dim", "c_dim", "G_ch", "D_ch", "dim_z", "n_classes",
           "input_nc", "output_nc", "k_nn", "instance_sz", "shared_dim_feat")
_COUNTS = ("shared_dim", "n_layers_D", "r_num", "ema_start", "pool_size", "g_repeat_num")
_POSITIVE_COUNTS = ("lr_decay_epoch", "epoch_count", "lr_decay_iters")  # (epochs; 0 would divide by zero)


def _check_model_numbers(model_opts: dict) -> None:
    for k, v in model_opts.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"--{k} must be a finite number, got {v}")
        if k in _LEARNING_RATES and v < 0:
            raise ValueError(f"--{k} (a learning rate) must be a number >= 0, got {v}")
        if k in _BETAS and not 0 <= v < 1:
            raise ValueError(f"--{k} (an Adam beta) must be in [0, 1), got {v}")
        if k == "ema_decay" and not 0 <= v < 1:
            raise ValueError(f"--{k} must be in [0, 1), got {v}")
        if k in _EPSILONS and v <= 0:
            raise ValueError(f"--{k} must be a number > 0, got {v}")
        if (k.startswith("lambda_") or k in ("init_gain", "kl_coeff")) and v < 0:
            raise ValueError(f"--{k} must be a number >= 0, got {v}")
        if k in _WIDTHS and (not isinstance(v, int) or v < 1):
            raise ValueError(f"--{k} must be a whole number >= 1, got {v}")
        if k in _COUNTS and (not isinstance(v, int) or v < 0):
            raise ValueError(f"--{k} must be a whole number >= 0, got {v}")
        if k in _POSITIVE_COUNTS and (not isinstance(v, int) or v < 1):
            raise ValueError(f"--{k} must be a whole number >= 1, got {v}")


def _check_model_rules(model: str, model_opts: dict, data_opts: dict) -> None:
    """Constraints of one model's networks, named by the option the user typed (the constructors
    name their own arguments: conv_dim, image_size)."""
    if model == "sagan":
        for k in ("g_conv_dim", "d_conv_dim"):
            if k in model_opts and model_opts[k] < 8:
                raise ValueError(f"--{k} must be >= 8 (SAGAN's attention layers have {k} // 8 query channels), "
                                 f"got {model_opts[k]}")
        size = model_opts.get("imsize", data_opts.get("image_size", 64))
        if size != 64:
            raise ValueError(f"--imsize / --image_size must be 64 for SAGAN (the reference's forward uses the layer "
                             f"l4, which it builds only for 64x64 images), got {size}")
    if model in ("biggan", "unetgan", "icgan") and model_opts.get("hier") and "dim_z" in model_opts:
        from ganengine.models.networks_biggan import G_arch

        resolution = model_opts.get("resolution")
        arch = G_arch(1, "0").get(resolution)
        slots = len(arch["in_channels"]) + 1 if arch else 0
        if model_opts["dim_z"] < slots:
            raise ValueError(f"--dim_z {model_opts['dim_z']} is smaller than the {slots} chunks --hier splits z into "
                             f"at resolution {resolution} (one per generator block, one for the linear layer): give "
                             f"--dim_z >= {slots}")
    if "G_param" in model_opts and model_opts["G_param"] not in ("SN", "None", "none", None):
        raise ValueError(f"--G_param must be 'SN' (spectral norm) or 'None' (plain layers), got "
                         f"{model_opts['G_param']!r}")


def _check_stackgan(model_opts: dict, engine: dict, resume) -> None:
    """What the StackGAN reference (hanzhanggit trainer.py) has no way to do: a decay phase, and
    Stage II from scratch without Stage-I weights (it stops: "Please give the Stage1_G path")."""
    if engine.get("n_epochs_decay", 0) != 0:
        raise ValueError(f"--n_epochs_decay {engine['n_epochs_decay']}: StackGAN has no decay phase (the reference "
                         "halves both rates every --lr_decay_epoch epochs, and --n_epochs is its TRAIN.MAX_EPOCH); "
                         "leave --n_epochs_decay out (0), and set --n_epochs / --lr_decay_epoch")
    if int(model_opts.get("stage", 1)) == 2 and not model_opts.get("stage1_g") and resume is None:
        raise ValueError("--stage 2 needs --stage1_g: Stage II trains on a frozen Stage-I generator, which would "
                         "otherwise be random weights (the reference stops: \"Please give the Stage1_G path\"); "
                         "give --stage1_g with a trained Stage-I generator (a reference netG_*.pth or a ganengine "
                         "Stage-I checkpoint), or --resume a Stage-II run")


def _check_stage1_g(model_opts: dict) -> None:
    """--stage1_g names a file (it is read while the model is built, where a missing one surfaced as
    a failed write of the run folder)."""
    stage1_g = model_opts.get("stage1_g")
    if int(model_opts.get("stage", 1)) == 2 and stage1_g and not os.path.isfile(stage1_g):
        expected = ("a trained Stage-I generator file: a reference netG_*.pth or a ganengine Stage-I training "
                    "checkpoint (step_*.pt, best.pt)")
        if os.path.isdir(stage1_g):
            from ganengine.train.checkpoint import latest

            newest = latest(stage1_g)
            raise ValueError(f"--stage1_g {stage1_g!r} is a folder; it takes {expected}"
                             + (f", e.g. --stage1_g {newest}" if newest else ""))
        raise ValueError(f"--stage1_g {stage1_g!r}: no such file; it takes {expected}")


def make_config(args):
    from ganengine.train import TrainConfig

    model_opts, data_opts, engine, notes = resolve(args)
    _check_model_numbers(model_opts)
    if args.model == "stackgan":  # (before any data is read; StackGAN has no --resume_iters)
        _check_stackgan(model_opts, engine, args.resume)
        _check_stage1_g(model_opts)
    if args.model == "stargan" and "lr_schedule" not in model_opts and engine.get("max_steps") is not None:
        # --num_iters / --max_steps: the reference's iteration decay (a run trained before the option
        # existed had the epoch rule: resuming it says --lr_schedule differs; give --lr_schedule epochs)
        model_opts["lr_schedule"] = "iterations"
    if args.model in SYNTHESIS:
        _derive_synthesis(args.model, model_opts, data_opts, engine)
    if args.model in _basic.MODELS:
        _basic.derive(args.model, model_opts, data_opts, args.flip)
    elif args.model in _NO_FLIP_BY_DEFAULT:
        data_opts["no_flip"] = not args.flip
    _derive_from_data(args.model, model_opts, data_opts, args._model_options)
    _check_model_rules(args.model, model_opts, data_opts)
    eval_every, eval_opts = _basic.eval_options(args)
    name = args.name or f"{args.model}_" + (os.path.basename(os.path.normpath(args.dataroot)) if args.dataroot else "sample")
    run_dir = os.path.join(args.checkpoints_dir, name)
    resume = args.resume
    if getattr(args, "resume_iters", None) is not None:  # StarGAN's spelling: that step's checkpoint of the run
        if resume is not None:
            raise ValueError("give --resume or --resume_iters, not both")
        from ganengine.train.checkpoint import path_for

        resume = path_for(run_dir, args.resume_iters)
        if not os.path.isfile(resume):
            raise ValueError(f"--resume_iters {args.resume_iters}: {resume!r} does not exist (checkpoints of "
                             f"--name {name!r} are saved every --save_every steps; --resume alone takes the newest)")
    if args.cuda_graphs and args.compile not in (None, "default", "reduce-overhead"):
        raise ValueError(f"--cuda_graphs is --compile reduce-overhead: it cannot be given with --compile {args.compile} "
                         "(another mode); give one of them")
    cfg = TrainConfig(
        model=args.model, model_options=model_opts, data_options=data_opts, run_dir=run_dir, log_dir=args.log_dir,
        batch_size=engine["batch_size"], n_epochs=engine["n_epochs"], n_epochs_decay=engine["n_epochs_decay"],
        max_steps=engine.get("max_steps"), amp=args.amp, channels_last=args.channels_last, compile=("reduce-overhead" if args.cuda_graphs else args.compile) or False,
        seed=args.seed, deterministic=args.deterministic, resume=resume, sample_every=engine["sample_every"],
        save_every=engine["save_every"], print_freq=args.print_freq, keep_checkpoints=args.keep_checkpoints,
        num_workers=args.num_threads, device=reference_device(args), sync_bn=args.sync_bn, backend=args.backend,
        tensorboard=args.tensorboard, num_samples=args.num_samples, progress=not args.no_progress,
        eval_every=eval_every, eval_options=eval_opts)
    return cfg, notes


def run(args) -> int:
    from ganengine.data import DataError
    from ganengine.train import CheckpointError, NonFiniteLossError, Trainer
    from ganengine.train.engine import Terminated

    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        cfg, notes = make_config(args)
        if rank0:
            for n in notes:
                print(f"ganengine: {n}", file=sys.stderr)
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        try:
            result = trainer.train()
        except KeyboardInterrupt as exc:
            term = isinstance(exc, Terminated)
            if rank0:
                saved = trainer.interrupted_checkpoint
                print(f"\nganengine train {args.model}: {'terminated (SIGTERM)' if term else 'interrupted'} at step "
                      f"{trainer.step}" + (f"; checkpoint saved: {saved} (continue with --resume)" if saved else ""),
                      file=sys.stderr)
            return 143 if term else 130
        finally:
            trainer.close()
    except (DataError, CheckpointError, ValueError) as exc:
        if _debug():
            raise
        print(f"ganengine train {args.model}: error: {exc}\n(set GANENGINE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"ganengine train {args.model}: stopped: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:  # a save or log write failing (disk full, folder removed or read-only)
        from ganengine.cli._io import describe

        if _debug():
            raise
        print(f"ganengine train {args.model}: error: writing {exc.filename or 'the run folder'!r} failed: "
              f"{describe(exc)}\n(set GANENGINE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    if rank0:
        dt = time.perf_counter() - t0
        losses = " ".join(f"{k}={v:.4g}" for k, v in result["losses"].items())
        done = (f"trained {cfg.model} to step {result['step']} in {dt:.1f} s ({losses})" if result["steps_trained"]
                else f"nothing to train: the run is already at step {result['step']} "
                     "(a larger --max_steps or more epochs continue it)")
        samples = os.path.join(result["log_dir"], "samples")
        print(f"ganengine: {done}\n"
              f"  checkpoint: {result['checkpoint']}\n"
              + (f"  samples:    {samples}\n" if os.path.isdir(samples) else "  samples:    none written\n")
              + (f"  loss log:   {log}" if os.path.isfile(log := os.path.join(result["log_dir"], "loss_log.csv"))
                 else "  loss log:   none written"), file=sys.stderr)
    return 0


__all__ = ["register", "run", "str2bool"]
