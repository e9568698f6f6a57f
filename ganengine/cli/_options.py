"""Shared option handling for the training-side commands (train, translate, sample).

Model options are generated from each model class's ``DEFAULTS`` (the reference flags with their
reference defaults), so ``ganengine train MODEL --help`` lists exactly what that model takes.
Every option's argparse default is ``None`` ("not given"): only options the user typed reach the
model, everything else keeps the model's reference default, and the built-in sample data can
fill in small-data defaults without overriding anything the user chose.
"""
from __future__ import annotations

import argparse
import os

MODEL_NAMES = ("pix2pix", "cyclegan", "stargan", "stackgan", "csgan", "sagan", "biggan", "biggan_deep", "unetgan", "icgan",
               "dcgan", "wgan", "wgan_gp", "cgan", "acgan", "adcgan", "infogan")

# help texts for the reference flags (the reference implementations' wording, shortened)
MODEL_HELP = {
    "input_nc": "input image channels (3 RGB, 1 grayscale)",
    "output_nc": "output image channels (3 RGB, 1 grayscale)",
    "ngf": "generator filters in the last conv layer",
    "ndf": "discriminator filters in the first conv layer",
    "netG": "generator architecture",
    "netD": "discriminator architecture (basic = 70x70 PatchGAN)",
    "n_layers_D": "discriminator layers (netD n_layers)",
    "norm": "normalisation: instance, batch or none",
    "init_type": "weight initialisation",
    "init_gain": "scale of the initialisation",
    "use_dropout": "dropout in the generator",
    "gan_mode": "GAN loss: vanilla, lsgan, hinge or wgangp",
    "lambda_L1": "weight of the L1 loss (pix2pix)",
    "lambda_A": "weight of the cycle loss A -> B -> A",
    "lambda_B": "weight of the cycle loss B -> A -> B",
    "lambda_identity": "weight of the identity loss, relative to lambda_A/B",
    "pool_size": "size of the image history buffer (0: none)",
    "lr": "initial learning rate (Adam; RMSprop for wgan)",
    "beta1": "Adam beta1",
    "beta2": "Adam beta2",
    "lr_policy": "learning-rate policy: linear (constant for --n_epochs, then to 0 over --n_epochs_decay), step "
                 "(x0.1 every --lr_decay_iters epochs) or cosine (to 0 over --n_epochs); plateau is refused (the "
                 "reference steps it on a constant metric)",
    "lr_decay_iters": "lr_policy step: multiply the rate by 0.1 every N epochs",
    "lr_schedule": "StarGAN: 'iterations' (set by --num_iters / --max_steps): the reference's iteration decay; "
                   "'epochs': the linear rule over --n_epochs / --n_epochs_decay",
    "num_iters_decay": "with --num_iters: the rates fall linearly to 0 over the last N iterations",
    "lr_update_step": "with --num_iters: lower the rates every N iterations during the decay",
    "c_dim": "number of domain labels (default: from the data)",
    "image_size": "image resolution",
    "g_conv_dim": "generator filters in the first conv layer",
    "d_conv_dim": "discriminator filters in the first conv layer",
    "g_repeat_num": "generator residual blocks",
    "d_repeat_num": "discriminator strided conv layers",
    "lambda_cls": "weight of the domain classification loss",
    "lambda_rec": "weight of the reconstruction loss",
    "lambda_gp": "weight of the gradient penalty",
    "n_critic": "discriminator updates per generator update",
    "g_lr": "generator learning rate",
    "d_lr": "discriminator learning rate",
    "gf_dim": "generator base filters (GAN.GF_DIM)",
    "df_dim": "discriminator base filters (GAN.DF_DIM)",
    "condition_dim": "conditioning augmentation size (GAN.CONDITION_DIM)",
    "text_dim": "text embedding size (TEXT.DIMENSION; default: from the data)",
    "z_dim": "noise size (Z_DIM)",
    "r_num": "residual blocks in stage II (GAN.R_NUM)",
    "stage1_g": "--stage 2: the trained Stage-I generator to build on (frozen): a reference netG_*.pth, or a "
                "ganengine Stage-I training checkpoint (step_*.pt, best.pt)",
    # SAGAN / BigGAN / U-Net GAN / CSGAN / LOGAN
    "imsize": "image resolution (SAGAN runs at 64 only, as the reference)",
    "g_conv_dim": "generator filters in the first conv layer",
    "adv_loss": "SAGAN loss: hinge or wgan-gp",
    "resolution": "BigGAN image resolution (default: --image_size)",
    "n_classes": "number of classes (default: from the data)",
    "G_ch": "BigGAN generator channel multiplier",
    "D_ch": "BigGAN discriminator channel multiplier",
    "G_attn": "resolutions with attention in G, e.g. 64 or 32_64 (0: none)",
    "D_attn": "resolutions with attention in D, e.g. 64 or 32_64 (0: none)",
    "G_shared": "shared class embedding in G",
    "hier": "hierarchical z (a chunk of z to every block)",
    "dim_z": "latent size",
    "shared_dim": "shared embedding size (0: dim_z)",
    "G_lr": "generator learning rate",
    "D_lr": "discriminator learning rate",
    "num_D_steps": "discriminator steps per generator step",
    "G_ortho": "orthogonal regularisation strength in G",
    "D_ortho": "orthogonal regularisation strength in D",
    "ema": "keep an exponential moving average of G",
    "use_ema": "sample with the EMA of G",
    "ema_start": "step at which the EMA starts averaging (before it copies G)",
    "ema_decay": "EMA decay",
    "latent_optimisation": "LOGAN: natural-gradient steps on z (--lo_steps) before the G and D updates",
    "lo_alpha": "LOGAN step size alpha",
    "lo_beta": "LOGAN damping beta",
    "lo_rate": "LOGAN: fraction of the samples whose z is optimised",
    "lo_steps": "LOGAN: optimisation steps on z",
    "lambda_CS": "weight of the cycle-synthesized L1 terms (CSGAN)",
    "gan_loss": "U-Net GAN loss: hinge or vanilla (the reference code's BCE)",
    "unet_mixup": "CutMix regularisation of the U-Net discriminator",
    "unconditional": "ignore class labels",
    # DCGAN (pytorch/examples) and PyTorch-GAN's wgan / wgan_gp / cgan / acgan / infogan
    "nz": "size of the latent z vector",
    "nc": "image channels (the reference takes them from its dataset: 3 for image folders, 1 for MNIST)",
    "latent_dim": "dimensionality of the latent space",
    "code_dim": "InfoGAN: continuous latent codes",
    "img_size": "size of each image dimension",
    "channels": "number of image channels",
    "b1": "adam: decay of first order momentum of gradient",
    "b2": "adam: decay of second order momentum of gradient",
    "clip_value": "WGAN: lower and upper clip value for the critic's weights",
    "lambda_adc": "ADC-GAN: weight of the discriminative classifier's losses",
    "lambda_cat": "InfoGAN: weight of the categorical code loss",
    "lambda_con": "InfoGAN: weight of the continuous code loss",
    # IC-GAN
    "class_cond": "IC-GAN: also condition on class labels (cc-IC-GAN)",
    "G_shared_feat": "IC-GAN: a linear layer maps the instance features to shared_dim_feat in G",
    "shared_dim_feat": "IC-GAN: width of G's instance-feature embedding (the features' width without G_shared_feat)",
    "instance_sz": "IC-GAN: width of the instance features; taken from the features when not given",
    "k_nn": "IC-GAN: neighbours per instance (the real images of an instance are drawn from them)",
    "feature_file": "IC-GAN: (N, D) instance features, .npy or .npz, row i = dataset item i; '' = pixel "
                    "features (8x8 luma thumbnails)",
    "fused": "run the networks on ganengine's fused ops (false: plain PyTorch layers)",
    "fused_optimizer": "PyTorch's fused / multi-tensor optimiser implementation (false: the per-parameter loop)",
}


def str2bool(value) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def scalar(value: str):
    """For options whose reference default is None: int, float, 'none' or a string."""
    if value.lower() == "none":
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def positive_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def nonneg_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def seed_int(value: str) -> int:
    """A --seed: an integer torch.manual_seed takes (-2**63 .. 2**64 - 1)."""
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if not -(1 << 63) <= v < (1 << 64):
        raise argparse.ArgumentTypeError(f"expected an integer from -2**63 to 2**64 - 1 (what torch.manual_seed "
                                         f"takes), got {v}")
    return v


def model_class(name: str):
    from ganengine import models

    return models.MODELS[name]


def add_model_options(parser: argparse.ArgumentParser, defaults: dict, skip=(), model: str | None = None) -> list[str]:
    """One option per model option not already defined by ``parser``, then the reference's
    spellings of the engine options (``add_reference_aliases``); returns all model option names."""
    group = parser.add_argument_group("model options (reference flags; defaults are the reference's)")
    added = []
    for name, default in defaults.items():
        added.append(name)  # the value passes to the model even when a data option defines the flag
        if name in skip or f"--{name}" in parser._option_string_actions:
            continue
        help_text = MODEL_HELP.get(name, name.replace("_", " "))
        if help_text.endswith("default: from the data)"):  # the data's value wins (cli/train.py)
            help_text = f"{help_text[:-1]}; the reference's: {default!r})".replace("%", "%%")
        else:
            help_text = f"{help_text} (default: {default!r})".replace("%", "%%")
        partner = PAIRED_OPTIONS.get(name)
        if partner and f"--{partner}" in parser._option_string_actions and not isinstance(default, bool):
            group.add_argument(f"--{name}", type=type(default) if isinstance(default, (int, float)) else scalar,
                               default=None, help=help_text, action=_SetsPartner, partner=partner)
            continue
        if isinstance(default, bool):
            group.add_argument(f"--{name}", type=str2bool, nargs="?", const=True, default=None, metavar="BOOL",
                               help=help_text)
        elif isinstance(default, int):
            group.add_argument(f"--{name}", type=int, default=None, help=help_text)
        elif isinstance(default, float):
            group.add_argument(f"--{name}", type=float, default=None, help=help_text)
        elif isinstance(default, (list, tuple)):
            group.add_argument(f"--{name}", nargs="+", default=None, help=help_text)
        elif isinstance(default, str):
            group.add_argument(f"--{name}", type=str, default=None, help=help_text)
        else:
            group.add_argument(f"--{name}", type=scalar, default=None, help=help_text)
    if "use_dropout" in defaults and "use_dropout" not in skip:  # the reference's spelling
        group.add_argument("--no_dropout", dest="use_dropout", action="store_false", default=None,
                           help="no dropout in the generator (same as --use_dropout false)")
    if model is None:  # the subcommand's name ends its prog ("ganengine train sagan")
        model = parser.prog.split()[-1] if parser.prog.split() else ""
    add_reference_aliases(parser, model)
    return added


# A model option that is also a data option under another name (``--imsize`` / ``--image_size``):
# giving one sets both, so the other's default never counts as given (a disagreement is still an
# error: both given with different values).
PAIRED_OPTIONS = {"imsize": "image_size", "resolution": "image_size"}


class _SetsPartner(argparse.Action):
    """Stores the value, and the same value in ``partner`` unless that option was given first."""

    def __init__(self, option_strings, dest, partner, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.partner = partner

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        if getattr(namespace, self.partner, None) is None:
            setattr(namespace, self.partner, values)


def _load_epoch(value: str) -> str:
    if value != "latest":
        raise argparse.ArgumentTypeError(
            f"{value!r}: ganengine checkpoints by step, not by epoch (CHECKPOINTS_DIR/NAME/step_XXXXXXXX.pt); give "
            "--epoch latest (the default) or resume a given checkpoint with --resume PATH")
    return value


def _no_pool(value: str) -> int:
    if value.strip() != "0":
        raise argparse.ArgumentTypeError(
            f"{value!r}: pix2pix has no image pool (the reference's pix2pix model never uses one, whatever "
            "--pool_size says): give 0, as its train_pix2pix.sh does, or leave it out")
    return 0


# the junyanz --dataset_mode each model reads its data as (its options.py / models set these defaults)
_DATASET_MODES = {"pix2pix": "aligned", "cyclegan": "unaligned", "csgan": "unaligned"}
_LAYOUTS = {"aligned": "the paired layout, A|B side by side in DATAROOT/PHASE",
            "unaligned": "two unpaired folders, DATAROOT/PHASEA and DATAROOT/PHASEB"}


def _dataset_mode(model: str):
    def check(value: str) -> str:
        mode = _DATASET_MODES[model]
        if value != mode:
            other = [m for m, want in _DATASET_MODES.items() if want == value]
            if other:
                hint = f" ({value} is {' and '.join(m + chr(39) + 's' for m in other)}: train that model for it)"
            elif value in ("single", "colorization"):
                hint = (" (the reference's single mode is for its test.py, as `ganengine translate`; colorization is "
                        "for its colorization model, which ganengine does not have)")
            else:
                hint = ""
            raise argparse.ArgumentTypeError(
                f"{value!r}: {model} reads {_LAYOUTS[mode]}, the reference's --dataset_mode {mode}; give {mode} or "
                f"leave it out{hint}")
        return value
    return check


def _gpu_ids(value: str) -> str:
    """The reference's --gpu_ids (``-1`` for CPU, ``0``, ``0,1,2``) as a --device: ``cpu`` or
    ``cuda:N``. Several ids (the reference's DataParallel) are refused: ganengine runs one
    process per GPU under torchrun."""
    ids = [v.strip() for v in value.split(",") if v.strip()]
    try:
        nums = [int(v) for v in ids]
    except ValueError:
        nums = None
    if not nums or any(n < -1 for n in nums):
        raise argparse.ArgumentTypeError(f"{value!r}: expected -1 (CPU) or one GPU id such as 0, as the reference's "
                                         "--gpu_ids")
    if nums == [-1]:
        return "cpu"
    if len(nums) > 1 or -1 in nums:
        gpus = list(dict.fromkeys(n for n in nums if n >= 0))  # (in order, each once)
        raise argparse.ArgumentTypeError(
            f"{value!r}: several GPUs (the reference's DataParallel) are one process per GPU here: "
            f"CUDA_VISIBLE_DEVICES={','.join(map(str, gpus))} torchrun --nproc_per_node "
            f"{len(gpus)} -m ganengine train ... (--batch_size is per process there, the "
            "reference's is split over the GPUs); give -1 (CPU) or one GPU id")
    return f"cuda:{nums[0]}"


def reference_device(args) -> str:
    """--device after the reference's --gpu_ids (``ganengine train``): a refusal where both are
    given and disagree, or the id names a GPU that is not there."""
    device = getattr(args, "device", "auto") or "auto"
    gpu = getattr(args, "gpu_ids", None)
    if gpu is None:
        return device
    if device != "auto" and device != gpu.split(":")[0]:
        raise ValueError(f"--gpu_ids {'-1' if gpu == 'cpu' else gpu.split(':')[1]} (device {gpu}) and --device "
                         f"{device} disagree; give one of them")
    if gpu.startswith("cuda") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # (torchrun: each process trains on its LOCAL_RANK's GPU; choose them with CUDA_VISIBLE_DEVICES)
        raise ValueError(f"--gpu_ids {gpu.split(':')[1]} under torchrun: each process uses the GPU of its "
                         "LOCAL_RANK; choose the GPUs with CUDA_VISIBLE_DEVICES and leave --gpu_ids out")
    if gpu.startswith("cuda"):
        import torch

        index, count = int(gpu.split(":")[1]), torch.cuda.device_count()
        if index >= count:
            seen = (f"only {count} CUDA device(s) are visible (ids 0..{count - 1})" if count
                    else "no CUDA device is visible")
            raise ValueError(f"--gpu_ids {index}: {seen}; give --gpu_ids -1 to train on the CPU")
    return gpu


def add_reference_aliases(parser: argparse.ArgumentParser, model: str) -> None:
    """The reference implementations' spellings of engine and data options for ``model``, where
    they map onto what ganengine does (``--num_iters`` / ``--celeba_crop_size`` are defined with
    the options themselves; DCGAN and PyTorch-GAN's: cli/_synthesis_models.py)."""
    g = parser.add_argument_group("the reference's spellings")
    if model in ("pix2pix", "cyclegan", "csgan"):  # junyanz options.py
        g.add_argument("--continue_train", dest="resume", action="store_const", const="latest",
                       help="same as --resume with no value: continue from the newest checkpoint of --name")
        g.add_argument("--epoch", dest="load_epoch", type=_load_epoch, default=None, metavar="latest",
                       help="which checkpoint --continue_train loads: latest only (checkpoints are per step; "
                            "--resume PATH for another)")
        g.add_argument("--dataset_mode", type=_dataset_mode(model), default=None, metavar=_DATASET_MODES[model],
                       help=f"{_DATASET_MODES[model]} only: {model} reads {_LAYOUTS[_DATASET_MODES[model]]} (the "
                            "reference's scripts pass it)")
        g.add_argument("--gpu_ids", type=_gpu_ids, default=None, metavar="ID",
                       help="the reference's device choice: -1 = --device cpu, N = CUDA device N (one only: several "
                            "GPUs are one process each under torchrun)")
    if model == "pix2pix":  # (the reference's scripts/train_pix2pix.sh passes --pool_size 0)
        g.add_argument("--pool_size", dest="pix2pix_pool_size", type=_no_pool, default=None, metavar="0",
                       help="0 only: pix2pix has no image pool (the reference's pix2pix model never uses one)")
    if model == "stargan":  # yunjey/stargan main.py
        g.add_argument("--rafd_crop_size", type=positive_int, default=None,
                       help="centre crop of RaFD (folder-per-domain) images before resizing (default: --crop_size "
                            "where given, else 256, as the reference)")
        g.add_argument("--resume_iters", type=positive_int, default=None, metavar="STEP",
                       help="resume from that step's checkpoint of --name (CHECKPOINTS_DIR/NAME/step_XXXXXXXX.pt)")
    if model == "sagan":  # heykeetae parameter.py
        g.add_argument("--total_step", dest="max_steps", type=positive_int, default=None,
                       help="same as --max_steps: stop after N steps")
