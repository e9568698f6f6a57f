"""``ganengine export``: a trained generator as ONNX, TorchScript or a state_dict.

    ganengine export --checkpoint run/latest.pt --format onnx [--output G.onnx]
    ganengine export --checkpoint run/latest.pt --format torchscript
    ganengine export --checkpoint run/latest.pt --format state_dict [--reference]

ONNX and TorchScript files contain standard ops only (the fused ops are lowered to their plain
PyTorch form), so they run in onnxruntime / ``torch.jit.load`` without ganengine. ``--reference``
writes the reference implementation's checkpoint format (e.g. CycleGAN's latest_net_G_A.pth).

Each network is traced with its real inputs: images (+ StarGAN's labels), StackGAN's embedding
and noise, a synthesis generator's noise, class labels, InfoGAN's codes, IC-GAN's instance
features (as the model's own sampling calls it), a discriminator's images of its generator's size
(+ the conditioning a conditional D takes). The export never changes the checkpoint's networks
(see docs/metrics_export.md, "Mode").
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

FORMATS = ("onnx", "torchscript", "state_dict")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "state_dict": ".pth"}


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a trained generator (ONNX, TorchScript, state_dict)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) or run folder (its newest checkpoint)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", default=None, help="output file (default: beside the checkpoint, named after the network)")
    p.add_argument("--network", default=None,
                   help="network to export (default: the generator the model samples/translates with, e.g. netG_A, "
                        "or G_ema with --ema --use_ema)")
    p.add_argument("--reference", action="store_true",
                   help="with --format state_dict: write the reference implementation's checkpoint format")
    p.add_argument("--image_size", type=int, default=None,
                   help="spatial size of the example image input (default: the model's crop/image size; a "
                        "discriminator: the size of its generator's images). Not for networks whose inputs are "
                        "noise/labels/embeddings (a synthesis generator's image size is fixed by the checkpoint)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="batch size of the example input (default: 1; 2 for a synthesis model's networks on batch "
                        "statistics); with --static_batch, the ONNX graph's fixed batch size")
    p.add_argument("--norm_stats", default="auto", choices=("auto", "running", "input", "per_image"),
                   help="normalisation statistics in the exported graph: running (eval mode), the input batch's "
                        "(as the reference test code of StarGAN), or each image's own (batch norms as in training "
                        "mode on one image: pix2pix / CycleGAN without --eval, tested at batch size 1); auto: as "
                        "the model's translate() does")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (>= 15; default 17)")
    p.add_argument("--static_batch", action="store_true",
                   help="ONNX: fix the batch size to the example's (--batch_size) instead of a dynamic one")
    p.set_defaults(func=run)


def _opt(options: dict, *names, default=None):
    for name in names:
        if options.get(name) is not None:
            return options[name]
    return default


def is_discriminator(net_name: str) -> bool:
    """Whether a network name is a discriminator's (``D``, ``netD``, ``netD_A``, ...)."""
    return net_name.removeprefix("net").startswith("D")


def is_synthesis(model) -> bool:
    """A noise (+ class) -> image model: DCGAN, WGAN(-GP), cGAN, AC-GAN, ADC-GAN, InfoGAN, SAGAN,
    BigGAN(-deep), U-Net GAN, IC-GAN."""
    return callable(getattr(model, "latent_dim", None)) and callable(getattr(model, "generate", None))


def synthesis_generator_input(model, batch: int = 2, seed: int = 0) -> tuple:
    """The arguments of a synthesis model's generator forward for ``batch`` samples, as the
    model's own sampling (``generate``, ``ganengine sample``) calls it: noise z, then the class
    labels (cGAN, AC-GAN, ADC-GAN, BigGAN family: int64 indices; the BigGAN generators embed them
    with their shared class embedding), InfoGAN's one-hot categorical and continuous codes, IC-GAN's
    instance features (None for an argument the generator is called without, e.g. IC-GAN's label
    without class_cond). Drawn from a private generator seeded with ``seed`` (the training's
    random streams are not touched)."""
    from ganengine.models.biggan import BigGAN
    from ganengine.models.icgan import ICGAN
    from ganengine.models.synthesis import SynthesisGAN

    gen = torch.Generator().manual_seed(seed)
    o = dict(model.options)
    device = model.device if hasattr(model, "device") else torch.device("cpu")
    z = torch.randn(batch, model.latent_dim(), generator=gen)
    n_classes = o.get("n_classes")
    labels = torch.randint(0, int(n_classes), (batch,), generator=gen) if n_classes else None
    if isinstance(model, SynthesisGAN):
        z, labels = z.to(device), labels.to(device) if labels is not None else None
        if callable(getattr(model, "sample_code", None)):  # InfoGAN: categorical + continuous codes
            code = (torch.rand(batch, int(o["code_dim"]), generator=gen) * 2 - 1).to(device)
            return tuple(model.generator_inputs(z, labels, code))
        return tuple(model.generator_inputs(z, labels if model.CONDITIONAL else None))
    if isinstance(model, BigGAN):
        z = z * float(o.get("z_var", 1.0))  # the model's sample_z: N(0, z_var^2)
        if o.get("unconditional"):  # U-Net GAN's unconditional G and D ignore labels: class 0 (its step's)
            labels = torch.zeros(batch, dtype=torch.long)
        if isinstance(model, ICGAN):
            feats = torch.nn.functional.normalize(torch.randn(batch, int(o["instance_sz"]), generator=gen), dim=1)
            return (z.to(device), labels.to(device) if o["class_cond"] else None, feats.to(device))
        return z.to(device), labels.to(device)
    return (z.to(device),)  # SAGAN: G(z)


def _discriminator_channels(model, net_name: str, generated: int) -> int:
    """Image channels a discriminator takes: pix2pix's conditional D sees input and output
    concatenated; CycleGAN's D_A judges domain B (output_nc), D_B domain A (input_nc); otherwise
    the generator's images."""
    o = dict(getattr(model, "options", {}) or {})
    name = getattr(model, "MODEL_NAME", "")
    if name == "pix2pix":
        return int(o.get("input_nc", 3)) + int(o.get("output_nc", 3))
    if net_name in ("netD_A", "netD_B") and "input_nc" in o and "output_nc" in o:
        return int(o["output_nc"] if net_name == "netD_A" else o["input_nc"])
    return generated


def _positional_arity(net) -> int:
    import inspect

    params = inspect.signature(net.forward).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 1 << 30
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _generated_images(model, gen_name: str, inputs, norm_stats: str) -> torch.Tensor:
    """The first image output of the generator on ``inputs``, computed on an export copy (the
    model is not touched)."""
    from ganengine.export import _TensorOutputs, _as_inputs, lowered_ops, prepare_for_export

    tensors, present = _as_inputs(inputs)
    net = _TensorOutputs(prepare_for_export(getattr(model, gen_name), norm_stats=norm_stats), present)
    with torch.no_grad(), lowered_ops():
        out = net(*tensors)
    outs = (out,) if isinstance(out, torch.Tensor) else out
    return next(o for o in outs if o.dim() == 4)


def example_input(model, net_name: str, image_size: int | None = None, batch: int = 1, norm_stats: str = "running"):
    """Inputs for tracing network ``net_name`` of ``model`` (a tuple; None for an argument the
    network is called without): the model's own ``example_input`` when it has one; a synthesis
    generator's noise/labels/codes (``synthesis_generator_input``); a discriminator's images of
    its generator's output size and channels (``image_size`` overrides the spatial size;
    pix2pix's D takes input and output concatenated), plus the class
    labels / instance features a conditional discriminator takes; else images from the model's
    options (StarGAN adds labels (B, c_dim); StackGAN's G takes (embedding (B, text_dim), noise
    (B, z_dim))). Raises ValueError naming --image_size where the network's input has no image
    size to set."""
    if hasattr(model, "example_input"):
        return model.example_input(net_name, batch)
    net = getattr(model, net_name)
    device = next(net.parameters()).device
    o = dict(getattr(model, "options", {}) or {})
    name = getattr(model, "MODEL_NAME", "")
    gen_name = getattr(model, "generator_name", None)
    synthesis = is_synthesis(model)
    if is_discriminator(net_name) and gen_name and gen_name != net_name:
        if synthesis:
            gen_inputs = synthesis_generator_input(model, batch)
        else:
            gen_inputs = example_input(model, gen_name, image_size, batch, norm_stats)
        images = _generated_images(model, gen_name, gen_inputs, norm_stats)
        channels = _discriminator_channels(model, net_name, images.shape[1])
        h, w = (image_size, image_size) if image_size else images.shape[-2:]
        x = torch.rand(batch, channels, h, w, generator=torch.Generator().manual_seed(1)).to(device) * 2 - 1
        extra = tuple(gen_inputs[1:]) if synthesis else ()
        return ((x,) + extra)[:max(1, _positional_arity(net))]
    if synthesis or name == "stackgan":
        inputs = (synthesis_generator_input(model, batch) if synthesis else
                  (torch.randn(batch, _opt(o, "text_dim", default=1024), device=device),
                   torch.randn(batch, _opt(o, "z_dim", default=100), device=device)))
        if image_size is not None:
            size = tuple(_generated_images(model, net_name, inputs, norm_stats).shape[-2:])
            if size != (image_size, image_size):
                raise ValueError(f"--image_size {image_size}: the {type(model).__name__} network {net_name!r} takes "
                                 f"{'noise' if synthesis else 'a text embedding and noise'} and makes "
                                 f"{size[0]}x{size[1]} images, a size fixed by its architecture and checkpoint; "
                                 "leave --image_size out")
        return inputs
    if name == "stargan":
        size = image_size or _opt(o, "image_size", default=128)
        return (torch.rand(batch, 3, size, size, device=device) * 2 - 1,
                torch.eye(_opt(o, "c_dim", default=5), device=device)[torch.zeros(batch, dtype=torch.long)])
    size = image_size or _opt(o, "crop_size", default=256)
    channels = _opt(o, "output_nc" if net_name == "netG_B" else "input_nc", default=3)
    return torch.rand(batch, channels, size, size, device=device) * 2 - 1


# the reference architectures of the synthesis models' networks: (generator, discriminator);
# None where the reference has no such network (ADC-GAN's 2K-way D; U-Net GAN's U-Net D)
_SYNTHESIS_ARCHS = {
    "dcgan": ("dcgan_G", "dcgan_D"), "wgan": ("wgan_gp_G", "wgan_gp_D"), "wgan_gp": ("wgan_gp_G", "wgan_gp_D"),
    "cgan": ("cgan_G", "cgan_D"), "acgan": ("acgan_G", "acgan_D"), "adcgan": ("acgan_G", None),
    "infogan": ("infogan_G", "infogan_D"), "sagan": ("sagan_G", "sagan_D"), "biggan": ("biggan_G", "biggan_D"),
    "biggan_deep": ("biggan_deep_G", "biggan_deep_D"), "icgan": ("icgan_G", "icgan_D"), "unetgan": ("biggan_G", None),
}
_GENERATORS = ("G", "G_ema", "netG", "netG_A", "netG_B")
_DISCRIMINATORS = ("D", "netD", "netD_A", "netD_B")


# the sizes boschresearch/unetgan's Generator(unconditional=True) builds (its BigGAN.py G_arch);
# BigGAN-PyTorch, the reference of the class-conditional G, has no unconditional generator
UNETGAN_UNCONDITIONAL_SIZES = (128, 256)


def _check_unetgan_unconditional_size(options: dict) -> None:
    """An unconditional U-Net GAN generator at a size the reference cannot build is refused (as
    SAGAN's export refuses networks no reference runs), not written as a file no reference loads."""
    size = options.get("resolution")
    if options.get("unconditional") and size not in UNETGAN_UNCONDITIONAL_SIZES:
        sizes = " or ".join(str(s) for s in UNETGAN_UNCONDITIONAL_SIZES)
        raise ValueError(f"--reference: this U-Net GAN was trained with --unconditional at --resolution {size}; "
                         "the reference's unconditional generator (boschresearch/unetgan BigGAN.Generator("
                         f"unconditional=True)) is built only at resolution {sizes}, so no reference can load it: "
                         "expected a run trained at --resolution (--image_size) "
                         f"{sizes}, or export without --reference (ganengine's keys)")


def reference_arch(model, net_name: str) -> str:
    """The ``arch`` name of ``save_reference_checkpoint`` for the exported network."""
    if hasattr(model, "reference_arch"):
        return model.reference_arch(net_name)
    o = dict(getattr(model, "options", {}) or {})
    name = getattr(model, "MODEL_NAME", "")
    is_g, is_d = net_name in _GENERATORS, net_name in _DISCRIMINATORS
    arch = None
    if name in ("pix2pix", "cyclegan", "csgan"):
        if is_g:
            arch = o.get("netG") or ("unet_256" if name == "pix2pix" else "resnet_9blocks")
        elif is_d:
            arch = "pixel" if o.get("netD") == "pixel" else "patchgan"
    elif name == "stargan" and (is_g or is_d):
        arch = "stargan_G" if is_g else "stargan_D"
    elif name == "stackgan" and (is_g or is_d):
        arch = f"stackgan_stage{_opt(o, 'stage', 'STAGE', default=1)}_{'G' if is_g else 'D'}"
    elif name in _SYNTHESIS_ARCHS and (is_g or is_d):
        arch = _SYNTHESIS_ARCHS[name][0 if is_g else 1]
        if name == "unetgan" and is_g:
            _check_unetgan_unconditional_size(o)
    if arch is None:
        raise ValueError(f"no reference format known for network {net_name!r} of model {name!r} "
                         "(--reference writes the reference implementation's own checkpoint; "
                         "without it the state dict is written with ganengine's keys)")
    return arch


def auto_norm_stats(model) -> str:
    """The statistics ``model.translate`` / ``generate`` normalises with: StarGAN's reference never
    calls eval(); pix2pix runs its generator in training mode unless trained/tested with --eval;
    the synthesis models sample in training mode as their references (batch statistics), BigGAN's
    family unless ``G_eval_mode``."""
    name = getattr(model, "MODEL_NAME", "")
    options = dict(getattr(model, "options", {}) or {})
    if name == "stargan":
        return "input"
    if name in ("pix2pix", "cyclegan", "csgan") and not options.get("eval", False):
        # translate runs G in training mode image by image (models/base.per_image_in_training_mode)
        return "per_image"
    if is_synthesis(model):
        return "running" if options.get("G_eval_mode", False) else "input"
    return "running"


def default_network(model) -> str | None:
    """The network ``ganengine export`` exports by default: the one the model samples/translates
    with (a synthesis model's generator EMA with ``ema`` and ``use_ema``), else its generator."""
    sampler = getattr(model, "sampling_generator", None)
    if callable(sampler):
        net = sampler()
        for name in getattr(model, "network_names", []):
            if getattr(model, name, None) is net:
                return name
    return getattr(model, "generator_name", None)


def _check_options(args) -> None:
    """Options that do not apply to the chosen format are errors, not silently ignored."""
    if args.reference and args.format != "state_dict":
        raise ValueError("--reference writes a reference checkpoint: use it with --format state_dict")
    if args.format != "onnx":
        for flag, given in (("--opset", args.opset is not None), ("--static_batch", args.static_batch)):
            if given:
                raise ValueError(f"{flag} is an ONNX option: use it with --format onnx (got --format {args.format})")
    if args.format == "state_dict":
        for flag, given in (("--image_size", args.image_size is not None), ("--batch_size", args.batch_size is not None),
                            ("--norm_stats", args.norm_stats != "auto")):
            if given:
                raise ValueError(f"{flag} sets the traced graph: use it with --format onnx or torchscript "
                                 "(--format state_dict writes the weights as they are)")
    if args.image_size is not None and args.image_size < 1:
        raise ValueError(f"--image_size must be >= 1, got {args.image_size}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.opset is not None and args.opset < 15:
        raise ValueError(f"--opset must be >= 15 (the export uses CastLike), got {args.opset}")


def _check_runs_at_size(net, net_name: str, inputs, norm_stats: str, image_size: int) -> None:
    """Run the network once (on an export copy: nothing of it changes) on the --image_size
    example, so that a size it cannot take is reported as an --image_size error, and only that:
    the export's other failures (its output file, say) keep their own message."""
    from ganengine.export import ExportError, _TensorOutputs, _as_inputs, lowered_ops, prepare_for_export

    tensors, present = _as_inputs(inputs)
    wrapper = _TensorOutputs(prepare_for_export(net, norm_stats=norm_stats), present)
    try:
        with torch.no_grad(), lowered_ops():
            wrapper(*tensors)
    except ExportError:
        raise
    except (RuntimeError, ValueError, IndexError) as exc:
        raise ValueError(f"--image_size {image_size}: {type(net).__name__} ({net_name!r}) cannot run on "
                         f"{image_size}x{image_size} inputs: {exc}") from exc


def run(args) -> int:
    from ganengine import export
    from ganengine.cli import evaluate as ev
    from ganengine.cli._io import describe, writable_file

    out = args.output
    try:
        _check_options(args)
        model, _ = ev.load_checkpoint(args.checkpoint, "cpu")
        net_name = args.network or default_network(model)
        if not net_name or not isinstance(getattr(model, net_name, None), torch.nn.Module):
            names = getattr(model, "network_names", [])
            raise ValueError(f"--network {net_name!r} is not a network of this model (networks: {names})")
        net = getattr(model, net_name)
        ckpt = os.path.abspath(args.checkpoint).rstrip(os.sep)
        out = args.output or (os.path.join(ckpt, f"{net_name}{SUFFIX[args.format]}") if os.path.isdir(ckpt) else
                              f"{os.path.splitext(ckpt)[0]}_{net_name}{SUFFIX[args.format]}")
        # the output's folder is created (or a clear --output error given) before the export runs
        writable_file(out, "--output", example=f"{net_name}{SUFFIX[args.format]}")
        if args.format == "state_dict":
            if args.reference:
                from ganengine.models import save_reference_checkpoint

                save_reference_checkpoint(net, out, reference_arch(model, net_name))
            else:
                torch.save(net.state_dict(), out)
        else:
            stats = auto_norm_stats(model) if args.norm_stats == "auto" else args.norm_stats
            # a synthesis generator on batch statistics needs a batch to normalise over (its
            # BatchNorm1d layers see one value per channel and sample)
            batch = args.batch_size or (2 if stats == "input" and is_synthesis(model) else 1)
            inputs = example_input(model, net_name, args.image_size, batch, stats)
            if args.image_size is not None:
                _check_runs_at_size(net, net_name, inputs, stats, args.image_size)
            if args.format == "onnx":
                export.to_onnx(net, inputs, out, opset_version=args.opset or export.DEFAULT_OPSET,
                               dynamic_batch=not args.static_batch, norm_stats=stats)
            else:
                export.to_torchscript(net, inputs, out, norm_stats=stats)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError, ImportError) as exc:
        print(f"ganengine export: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # writing the file failed (disk full, folder removed meanwhile)
        print(f"ganengine export: error: --output {out!r}: writing failed: {describe(exc)}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
