"""``ganengine export``: a trained generator as ONNX, TorchScript or a state_dict.

    ganengine export --checkpoint run/latest.pt --format onnx [--output G.onnx]
    ganengine export --checkpoint run/latest.pt --format torchscript
    ganengine export --checkpoint run/latest.pt --format state_dict [--reference]

ONNX and TorchScript files contain standard ops only (the fused ops are lowered to their plain
PyTorch form), so they run in onnxruntime / ``torch.jit.load`` without ganengine. ``--reference``
writes the reference implementation's checkpoint format (e.g. CycleGAN's latest_net_G_A.pth).
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
    p.add_argument("--network", default=None, help="network to export (default: the model's generator, e.g. netG_A)")
    p.add_argument("--reference", action="store_true",
                   help="with --format state_dict: write the reference implementation's checkpoint format")
    p.add_argument("--image_size", type=int, default=None,
                   help="spatial size of the example input (default: the model's crop/image size)")
    p.add_argument("--norm_stats", default="auto", choices=("auto", "running", "input"),
                   help="normalisation statistics in the exported graph: running (eval mode) or the input's "
                        "(as the reference test code of StarGAN, and pix2pix without --eval); auto: as the "
                        "model's translate() does")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 15)")
    p.add_argument("--static_batch", action="store_true", help="ONNX: fix the batch size to 1")
    p.set_defaults(func=run)


def _opt(options: dict, *names, default=None):
    for name in names:
        if options.get(name) is not None:
            return options[name]
    return default


def example_input(model, net_name: str, image_size: int | None = None, batch: int = 1):
    """Inputs for tracing the generator: the model's own ``example_input`` when it has one,
    else shapes from its options (images (B, C, S, S); StarGAN adds labels (B, c_dim);
    StackGAN takes (embedding (B, text_dim), noise (B, z_dim)))."""
    if hasattr(model, "example_input"):
        return model.example_input(net_name, batch)
    net = getattr(model, net_name)
    device = next(net.parameters()).device
    o = dict(getattr(model, "options", {}) or {})
    name = getattr(model, "MODEL_NAME", "")
    if name == "stargan":
        size = image_size or _opt(o, "image_size", default=128)
        return (torch.rand(batch, 3, size, size, device=device) * 2 - 1,
                torch.eye(_opt(o, "c_dim", default=5), device=device)[torch.zeros(batch, dtype=torch.long)])
    if name == "stackgan":
        return (torch.randn(batch, _opt(o, "text_dim", default=1024), device=device),
                torch.randn(batch, _opt(o, "z_dim", default=100), device=device))
    size = image_size or _opt(o, "crop_size", default=256)
    channels = _opt(o, "output_nc" if net_name == "netG_B" else "input_nc", default=3)
    return torch.rand(batch, channels, size, size, device=device) * 2 - 1


def reference_arch(model, net_name: str) -> str:
    """The ``arch`` name of ``save_reference_checkpoint`` for the exported network."""
    if hasattr(model, "reference_arch"):
        return model.reference_arch(net_name)
    o = dict(getattr(model, "options", {}) or {})
    name = getattr(model, "MODEL_NAME", "")
    if name in ("pix2pix", "cyclegan"):
        return o.get("netG") or ("unet_256" if name == "pix2pix" else "resnet_9blocks")
    if name == "stargan":
        return "stargan_G"
    if name == "stackgan":
        return f"stackgan_stage{_opt(o, 'stage', 'STAGE', default=1)}_G"
    raise ValueError(f"no reference format known for model {name!r}")


def auto_norm_stats(model) -> str:
    """The statistics ``model.translate`` normalises with: StarGAN's reference never calls eval();
    pix2pix runs its generator in training mode unless trained/tested with --eval."""
    name = getattr(model, "MODEL_NAME", "")
    options = dict(getattr(model, "options", {}) or {})
    if name == "stargan" or (name == "pix2pix" and not options.get("eval", False)):
        return "input"
    return "running"


def run(args) -> int:
    from ganengine import export
    from ganengine.cli import evaluate as ev

    try:
        if args.reference and args.format != "state_dict":
            raise ValueError("--reference writes a reference checkpoint: use it with --format state_dict")
        model, _ = ev.load_checkpoint(args.checkpoint, "cpu")
        net_name = args.network or getattr(model, "generator_name", None)
        if not net_name or not isinstance(getattr(model, net_name, None), torch.nn.Module):
            names = getattr(model, "network_names", [])
            raise ValueError(f"--network {net_name!r} is not a network of this model (networks: {names})")
        net = getattr(model, net_name)
        ckpt = os.path.abspath(args.checkpoint).rstrip(os.sep)
        out = args.output or (os.path.join(ckpt, f"{net_name}{SUFFIX[args.format]}") if os.path.isdir(ckpt) else
                              f"{os.path.splitext(ckpt)[0]}_{net_name}{SUFFIX[args.format]}")
        if args.format == "state_dict":
            if args.reference:
                from ganengine.models import save_reference_checkpoint

                save_reference_checkpoint(net, out, reference_arch(model, net_name))
            else:
                torch.save(net.state_dict(), out)
        else:
            inputs = example_input(model, net_name, args.image_size)
            stats = auto_norm_stats(model) if args.norm_stats == "auto" else args.norm_stats
            if args.format == "onnx":
                export.to_onnx(net, inputs, out, opset_version=args.opset, dynamic_batch=not args.static_batch,
                               norm_stats=stats)
            else:
                export.to_torchscript(net, inputs, out, norm_stats=stats)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError, ImportError) as exc:
        print(f"ganengine export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
