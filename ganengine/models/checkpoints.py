"""Build networks by reference architecture name, and read/write the reference implementations'
checkpoints (pix2pix/CycleGAN ``latest_net_G.pth``, StarGAN ``*-G.ckpt``/``*-D.ckpt``, StackGAN
``netG_epoch_*.pth``: all plain state dicts).

Loading is ``torch.load(..., weights_only=True)``: a checkpoint cannot run code. Accepted the way
the reference accepts them: ``module.`` prefixes (DataParallel), and InstanceNorm
running_mean/running_var/num_batches_tracked entries written by older reference versions for
norms that no longer track running statistics (the reference's
``__patch_instance_norm_state_dict`` deletes them). Anything else that does not fit raises
``CheckpointMismatchError`` naming the key or shape that disagreed and the arguments the
checkpoint's shapes imply.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable

import torch
from torch import nn

from ganengine.models import networks_cyclegan as ncg
from ganengine.models import networks_stackgan as nsk
from ganengine.models import networks_stargan as nsg

# what ganengine's training checkpoints hold under "format" (ganengine/train/checkpoint.py writes them)
TRAINING_CHECKPOINT_FORMAT = "ganengine-checkpoint"


def damaged_record(path: str) -> str | None:
    """The first record of the zip archive at ``path`` (torch.save's format) whose bytes fail
    their CRC-32 check, e.g. ``"archive/data/67"``: payload bytes changed since they were written
    (bit rot, a bad copy), which torch.load does not notice (it reads tensors without checking).
    None for an intact archive, and for a file that is no zip archive or one cut short (torch.load
    then fails, and the caller reports that). Reads the whole file once (about a millisecond per
    few MB)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None


def damaged_message(path: str, record: str) -> str:
    """What a loader says of a checkpoint ``damaged_record`` found a bad record in."""
    return (f"checkpoint {path!r} is damaged: its record {record!r} fails its CRC-32 check (its bytes changed "
            "after it was written: bit rot, a bad copy or transfer); restore it from a good copy, or use an earlier "
            "checkpoint")

ARCHS = ("resnet_9blocks", "resnet_6blocks", "unet_256", "unet_128", "patchgan", "pixel", "stargan_G", "stargan_D",
         "stackgan_stage1_G", "stackgan_stage1_D", "stackgan_stage2_G", "stackgan_stage2_D")

_STACKGAN_ARGS = dict(gf_dim=128, df_dim=64, condition_dim=128, text_dim=1024, z_dim=100, r_num=4)

# arch -> (defaults of its architecture arguments, builder(**args, fused=..., init_type=...))
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "resnet_9blocks": dict(input_nc=3, output_nc=3, ngf=64, norm="instance", use_dropout=False),
    "resnet_6blocks": dict(input_nc=3, output_nc=3, ngf=64, norm="instance", use_dropout=False),
    "unet_256": dict(input_nc=3, output_nc=3, ngf=64, norm="batch", use_dropout=False),
    "unet_128": dict(input_nc=3, output_nc=3, ngf=64, norm="batch", use_dropout=False),
    "patchgan": dict(input_nc=3, ndf=64, n_layers=3, norm="instance"),
    "pixel": dict(input_nc=3, ndf=64, norm="instance"),
    "stargan_G": dict(conv_dim=64, c_dim=5, repeat_num=6),
    "stargan_D": dict(image_size=128, conv_dim=64, c_dim=5, repeat_num=6),
    "stackgan_stage1_G": dict(_STACKGAN_ARGS),
    "stackgan_stage1_D": dict(_STACKGAN_ARGS),
    "stackgan_stage2_G": dict(_STACKGAN_ARGS),
    "stackgan_stage2_D": dict(_STACKGAN_ARGS),
}


def _pick(d, *names):
    return {n: d[n] for n in names}


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet_9blocks": lambda a, **k: ncg.ResnetGenerator(**a, n_blocks=9, **k),
    "resnet_6blocks": lambda a, **k: ncg.ResnetGenerator(**a, n_blocks=6, **k),
    "unet_256": lambda a, **k: ncg.UnetGenerator(num_downs=8, **a, **k),
    "unet_128": lambda a, **k: ncg.UnetGenerator(num_downs=7, **a, **k),
    "patchgan": lambda a, **k: ncg.patch_discriminator(**a, **k),
    "pixel": lambda a, **k: ncg.PixelDiscriminator(**a, **k),
    "stargan_G": lambda a, init_type=None, **k: nsg.StarGANGenerator(**a, **k),
    "stargan_D": lambda a, init_type=None, **k: nsg.StarGANDiscriminator(**a, **k),
    "stackgan_stage1_G": lambda a, **k: nsk.Stage1Generator(
        **_pick(a, "gf_dim", "condition_dim", "text_dim", "z_dim"), **k),
    "stackgan_stage1_D": lambda a, **k: nsk.Stage1Discriminator(**_pick(a, "df_dim", "condition_dim"), **k),
    "stackgan_stage2_G": lambda a, **k: nsk.Stage2Generator(
        None, **_pick(a, "gf_dim", "condition_dim", "text_dim", "z_dim", "r_num"), **k),
    "stackgan_stage2_D": lambda a, **k: nsk.Stage2Discriminator(**_pick(a, "df_dim", "condition_dim"), **k),
}

_DEFAULT_INIT = {"stackgan": "stackgan", "stargan": None}


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not fit the network built from the given arguments."""


def _check_arch(arch: str) -> str:
    if arch not in _ARCH_DEFAULTS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return arch


def _arch_args(arch: str, kwargs: dict) -> dict:
    defaults = _ARCH_DEFAULTS[arch]
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown and arch not in _OPEN_ARCHS:  # (BigGAN's constructors take **kwargs: extra config keys)
        raise TypeError(f"arch {arch!r} takes the architecture arguments {sorted(defaults)}; unknown: {unknown}")
    return {**defaults, **kwargs}


def build_network(arch: str, fused: bool = True, init_type: str | None = "default", **kwargs) -> nn.Module:
    """A ganengine network for a reference architecture name (see ``ARCHS``).

    ``kwargs`` are the reference constructors' arguments (e.g. ``ngf``, ``norm``, ``conv_dim``,
    ``gf_dim``); missing ones take the reference defaults. ``init_type="default"`` applies the
    reference's own initialisation for that family (pix2pix/CycleGAN: normal 0.02; StarGAN:
    PyTorch default; StackGAN: its weights_init); ``None`` skips it.
    """
    _check_arch(arch)
    args = _arch_args(arch, kwargs)
    if init_type == "default" and arch not in _SPEC_ARCHS:  # spec builders apply their reference's own init
        init_type = "stackgan" if arch.startswith("stackgan") else (None if arch.startswith("stargan") else "normal")
    return _BUILDERS[arch](args, fused=fused, init_type=init_type)


# ------------------------------------------------------------------ reading state dicts
def _read(path_or_state_dict) -> dict[str, torch.Tensor]:
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_reference_checkpoint: no checkpoint file at {path!r}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"load_reference_checkpoint: {path!r} is not a checkpoint that can be read safely "
                             f"with torch.load(weights_only=True): {_load_failure(path, exc)}") from exc
    else:
        obj = path_or_state_dict
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and obj.get("format") == TRAINING_CHECKPOINT_FORMAT:
        raise ValueError(f"load_reference_checkpoint: this is a ganengine training checkpoint (model "
                         f"{obj.get('model')!r}), not a reference implementation's: load it with "
                         "ganengine.train.checkpoint.load_model(path), or write the reference's format with "
                         "`ganengine export --checkpoint PATH --format state_dict --reference`")
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("load_reference_checkpoint: expected a state dict (a mapping of names to tensors) as the "
                         "reference code saves with torch.save(net.state_dict(), path); got " + _not_a_state_dict(obj))
    return dict(obj)


def _not_a_state_dict(obj) -> str:
    """What ``obj`` is, in words, when it is not a state dict: a dict's first non-tensor entry, or the
    state dicts it holds (several networks saved together: pass one of them)."""
    if not isinstance(obj, dict):
        return type(obj).__name__
    nested = [k for k, v in obj.items() if isinstance(v, dict) and v and all(isinstance(t, torch.Tensor)
                                                                            for t in v.values())]
    if nested:
        return (f"a dict holding state dicts under {nested[:8]}: pass one of them (e.g. "
                f"checkpoint[{nested[0]!r}])")
    key, value = next((k, v) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    return f"a dict whose entry {key!r} is not a tensor but a {type(value).__name__}"


def _load_failure(path: str, exc: Exception) -> str:
    """torch.load's failure in words: a file that is no torch.save output gets a bare KeyError /
    UnpicklingError (``'101'``) from the legacy reader."""
    import zipfile

    if isinstance(exc, (KeyError, EOFError)) or type(exc).__name__ == "UnpicklingError":
        if not zipfile.is_zipfile(path):
            return f"it is not a file torch.save wrote (neither a zip archive nor a legacy pickle; {type(exc).__name__}: {exc})"
    return str(exc)


def _strip_prefixes(sd: dict) -> dict:
    # DataParallel / DDP wrap the network as `.module`
    out = {}
    for k, v in sd.items():
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out


def _patch_instance_norm(sd: dict, net: nn.Module) -> dict:
    """Drop running stats that older reference versions saved for InstanceNorm layers which do
    not track them (what the reference's loader does)."""
    out = dict(sd)
    for key in sd:
        module_path, _, name = key.rpartition(".")
        if name not in ("running_mean", "running_var", "num_batches_tracked"):
            continue
        try:
            module = net.get_submodule(module_path)
        except AttributeError:
            continue
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and getattr(module, name, None) is None:
            del out[key]
    return out


def _fmt_shape(t):
    return tuple(t.shape)


def _infer(arch: str, sd: dict) -> tuple[str | None, dict]:
    """Architecture name and arguments implied by a state dict (best effort)."""
    try:
        return _INFER[_family(arch)](sd)
    except Exception:  # a state dict too foreign to read: no suggestion
        return None, {}


def _family(arch):
    if arch.startswith("resnet"):
        return "resnet"
    if arch.startswith("unet"):
        return "unet"
    if arch.startswith("stackgan"):
        return arch
    return arch


def _indices(sd, pattern):
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


def _norm_of(sd, batch_key, bias_key):
    if batch_key in sd:
        return "batch"
    return "instance" if bias_key in sd else "none"


def _infer_resnet(sd):
    w = sd["model.1.weight"]
    blocks = _indices(sd, r"model\.(\d+)\.conv_block\.")
    last = max(_indices(sd, r"model\.(\d+)\.weight$"))
    args = dict(input_nc=w.shape[1], output_nc=sd[f"model.{last}.weight"].shape[0], ngf=w.shape[0],
                norm=_norm_of(sd, "model.2.weight", "model.1.bias"))
    if blocks:  # conv_block: pad, conv, norm, relu, [dropout,] pad, conv, norm: with dropout index 6 is the conv
        w6 = sd.get(f"model.{blocks[0]}.conv_block.6.weight")
        args["use_dropout"] = w6 is not None and w6.dim() == 4
    n = len(blocks)
    arch = {9: "resnet_9blocks", 6: "resnet_6blocks"}.get(n)
    if arch is None:
        args["n_blocks"] = n  # not one of the named archs: say so
    return arch, args


def _infer_unet(sd):
    w = sd["model.model.0.weight"]
    depth, prefix = 1, "model.model.1.model."
    while any(k.startswith(prefix) for k in sd):
        depth += 1
        prefix += "3.model."
    args = dict(input_nc=w.shape[1], output_nc=sd["model.model.3.weight"].shape[1], ngf=w.shape[0],
                norm=_norm_of(sd, "model.model.1.model.2.weight", "model.model.0.bias"))
    arch = {8: "unet_256", 7: "unet_128"}.get(depth)
    if arch is None:
        args["num_downs"] = depth
    return arch, args


def _infer_patch(sd):
    w = sd["model.0.weight"]
    convs = [i for i in _indices(sd, r"model\.(\d+)\.weight$") if sd[f"model.{i}.weight"].dim() == 4]
    return "patchgan", dict(input_nc=w.shape[1], ndf=w.shape[0], n_layers=len(convs) - 2,
                            norm=_norm_of(sd, "model.3.weight", "model.2.bias"))


def _infer_pixel(sd):
    w = sd["net.0.weight"]
    return "pixel", dict(input_nc=w.shape[1], ndf=w.shape[0], norm=_norm_of(sd, "net.3.weight", "net.2.bias"))


def _infer_star_g(sd):
    w = sd["main.0.weight"]
    return "stargan_G", dict(conv_dim=w.shape[0], c_dim=w.shape[1] - 3,
                             repeat_num=len(_indices(sd, r"main\.(\d+)\.main\.")))


def _infer_star_d(sd):
    w, c = sd["main.0.weight"], sd["conv2.weight"]
    repeat = len(_indices(sd, r"main\.(\d+)\.weight$"))
    return "stargan_D", dict(image_size=c.shape[-1] * 2 ** repeat, conv_dim=w.shape[0], c_dim=c.shape[0],
                             repeat_num=repeat)


def _infer_stack_g1(sd, prefix=""):
    fc, ca = sd[prefix + "fc.0.weight"], sd[prefix + "ca_net.fc.weight"]
    cond = ca.shape[0] // 2
    return "stackgan_stage1_G", dict(gf_dim=fc.shape[0] // 16 // 8, condition_dim=cond, text_dim=ca.shape[1],
                                     z_dim=fc.shape[1] - cond)


def _infer_stack_g2(sd):
    _, args = _infer_stack_g1(sd, "STAGE1_G.")
    args.update(gf_dim=sd["encoder.0.weight"].shape[0], r_num=len(_indices(sd, r"residual\.(\d+)\.")))
    return "stackgan_stage2_G", args


def _infer_stack_d(stage):
    def infer(sd):
        ndf = sd["encode_img.0.weight"].shape[0]
        cond = sd["get_cond_logits.outlogits.0.weight"].shape[1] - ndf * 8
        return f"stackgan_stage{stage}_D", dict(df_dim=ndf, condition_dim=cond)
    return infer


_INFER = {"resnet": _infer_resnet, "unet": _infer_unet, "patchgan": _infer_patch, "pixel": _infer_pixel,
          "stargan_G": _infer_star_g, "stargan_D": _infer_star_d, "stackgan_stage1_G": _infer_stack_g1,
          "stackgan_stage2_G": _infer_stack_g2, "stackgan_stage1_D": _infer_stack_d(1),
          "stackgan_stage2_D": _infer_stack_d(2)}

# SAGAN / BigGAN / BigGAN-deep (attention, spectral norm): ganengine/models/archs_attention.py
from ganengine.models.archs_attention import EXPLAIN as _EXPLAIN, OPEN_ARCHS as _OPEN_ARCHS, SPECS as _ATTN_SPECS  # noqa: E402,E501
ARCHS += tuple(_ATTN_SPECS)
# DCGAN (pytorch/examples) and PyTorch-GAN's wgan_gp / cgan / acgan / infogan: networks_dcgan.py, networks_pytorch_gan.py
from ganengine.models.networks_dcgan import SPECS as _DCGAN_SPECS  # noqa: E402
from ganengine.models.networks_pytorch_gan import SPECS as _PYTORCH_GAN_SPECS  # noqa: E402
ARCHS += tuple(_DCGAN_SPECS) + tuple(_PYTORCH_GAN_SPECS)
from ganengine.models.icgan_networks import OPEN_ARCHS as _ICGAN_OPEN, SPECS as _ICGAN_SPECS  # noqa: E402 (IC-GAN)
ARCHS += tuple(_ICGAN_SPECS)
_OPEN_ARCHS = _OPEN_ARCHS | _ICGAN_OPEN
_SPEC_ARCHS = {**_ATTN_SPECS, **_DCGAN_SPECS, **_PYTORCH_GAN_SPECS, **_ICGAN_SPECS}
for _arch, _spec in _SPEC_ARCHS.items():
    _ARCH_DEFAULTS[_arch], _BUILDERS[_arch], _INFER[_arch] = _spec


_UNSET = object()


def _mismatch_message(arch, args, sd, expected, raw=None) -> str | None:
    """Why ``sd`` (patched for the network built from ``args``) does not fit ``expected``, and what
    would fit, inferred from ``raw`` (the checkpoint as read: the patch for a wrong guess deletes
    keys, e.g. a batch norm's running statistics for norm='instance'), or None where it fits."""
    raw = sd if raw is None else raw
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    shapes = [(k, _fmt_shape(sd[k]), _fmt_shape(expected[k])) for k in expected
              if k in sd and sd[k].shape != expected[k].shape]
    if not (missing or unexpected or shapes):
        return None
    given = ", ".join(f"{k}={v!r}" for k, v in args.items())
    parts = [f"load_reference_checkpoint: the checkpoint does not fit arch={arch!r} with {given}:"]
    if shapes:
        k, got, want = shapes[0]
        parts.append(f"key {k!r} has shape {got} in the checkpoint but {want} in the network"
                     + (f" (and {len(shapes) - 1} more shape mismatches)" if len(shapes) > 1 else "") + ";")
    if missing:
        parts.append(f"{len(missing)} network keys are missing from the checkpoint, e.g. {missing[:3]};")
    if unexpected:
        parts.append(f"{len(unexpected)} checkpoint keys are not in the network, e.g. {unexpected[:3]};")
    inferred_arch, inferred = _infer(arch, raw)
    differing = {k: v for k, v in inferred.items() if args.get(k) != v}
    # a suggestion is made only once a network built from it has exactly the checkpoint's keys
    # and shapes: a checkpoint of another arch (a generator's given as its discriminator) can
    # also be read by this arch's inference, which then suggests nonsense arguments
    if inferred_arch is not None and (differing or inferred_arch != arch) and _fits(inferred_arch, inferred, raw):
        # the call as it must be typed: what differs from the user's call, and what the user's call
        # set that the arch's defaults would not give (else the suggestion fails when run as printed)
        defaults = _ARCH_DEFAULTS.get(inferred_arch, {})
        needed = {k: v for k, v in inferred.items() if k in differing or defaults.get(k, _UNSET) != v}
        call = ", ".join([repr(inferred_arch)] + [f"{k}={v!r}" for k, v in needed.items()])
        parts.append(f"its shapes fit load_reference_checkpoint(path, {call})")
        return " ".join(parts)
    other = _fitting_arch(raw, exclude=arch)
    explain = _EXPLAIN.get(arch)
    explained = explain(raw, args) if explain is not None and other is None else None
    if other is not None:
        other_arch, other_args = other
        call = ", ".join([repr(other_arch)] + [f"{k}={v!r}" for k, v in other_args.items()
                                               if _ARCH_DEFAULTS[other_arch].get(k) != v])
        parts.append(f"it is a checkpoint of arch={other_arch!r}, not {arch!r}: its keys and shapes fit "
                     f"load_reference_checkpoint(path, {call})")
    elif explained:
        parts.append(explained)
    elif inferred and differing:
        parts.append("its shapes imply " + ", ".join(f"{k}={v!r}" for k, v in differing.items())
                     + ", which no arch name provides")
    else:
        parts.append("it may be a checkpoint of another architecture")
    return " ".join(parts)


def _fits(arch: str, args: dict, sd: dict) -> bool:
    """Whether the network of ``arch`` built from ``args`` has exactly ``sd``'s keys and shapes
    (built on the meta device: no memory, no init)."""
    try:
        with torch.device("meta"):
            net = build_network(arch, fused=False, init_type=None,
                                **{k: v for k, v in args.items() if k in _ARCH_DEFAULTS[arch]})
    except Exception:  # arguments the builder rejects: no fit
        return False
    sd = _patch_instance_norm(sd, net)
    expected = net.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    return not missing and set(sd) <= set(expected) and all(sd[k].shape == expected[k].shape for k in sd)


def _fitting_arch(sd: dict, exclude: str):
    """(arch, arguments) of another arch whose network has exactly ``sd``'s keys and shapes, or None."""
    tried = set()
    for candidate in ARCHS:
        if candidate == exclude:
            continue
        inferred_arch, inferred = _infer(candidate, sd)
        if inferred_arch is None or inferred_arch == exclude or inferred_arch in tried:
            continue
        tried.add(inferred_arch)
        if _fits(inferred_arch, inferred, sd):
            return inferred_arch, inferred
    return None


def load_reference_checkpoint(path_or_state_dict, arch: str, fused: bool = True, strict: bool = True,
                              **arch_kwargs) -> nn.Module:
    """Load a checkpoint written by the reference implementation of ``arch``.

    Returns a ganengine network (fused ops unless ``fused=False``) in eval mode that computes the
    same outputs as the reference network with those weights. ``arch_kwargs`` are the reference
    constructor arguments (``input_nc, output_nc, ngf, ndf, n_layers, norm, use_dropout``;
    StarGAN ``conv_dim, c_dim, repeat_num, image_size``; StackGAN ``gf_dim, df_dim,
    condition_dim, text_dim, z_dim, r_num``). With ``strict=False`` missing/unexpected keys are
    tolerated (shapes must still agree).
    """
    _check_arch(arch)
    args = _arch_args(arch, arch_kwargs)
    raw = _strip_prefixes(_read(path_or_state_dict))
    net = build_network(arch, fused=fused, init_type=None, **args)
    # (asked of the reference's module tree: fuse() may have folded a norm into its conv)
    with torch.device("meta"):
        layout = build_network(arch, fused=False, init_type=None, **args) if fused else net
    sd = _patch_instance_norm(raw, layout)
    expected = net.state_dict()
    msg = _mismatch_message(arch, args, sd, expected, raw)
    if msg is not None and (strict or any(k in sd and sd[k].shape != expected[k].shape for k in expected)):
        raise CheckpointMismatchError(msg)
    # old checkpoints (torch < 0.4.1) lack num_batches_tracked: keep the network's value
    for k, v in expected.items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = v
    net.load_state_dict(sd, strict=strict)
    return net.eval()


def save_reference_checkpoint(net: nn.Module, path, arch: str) -> None:
    """Write ``net``'s weights as the reference code of ``arch`` saves them (a plain CPU state dict
    with the reference's keys), so the reference can load it with ``load_state_dict``."""
    _check_arch(arch)
    if isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        net = net.module
    net = getattr(net, "_orig_mod", net)  # torch.compile wrapper
    if any(getattr(m, "attention_scale", None) is not None for m in net.modules()):
        raise ValueError("save_reference_checkpoint: this network has SAGAN attention blocks, which the reference "
                         "architecture does not have; it cannot be saved as a reference checkpoint")
    sd = {k: v.detach().to("cpu").clone() for k, v in _strip_prefixes(net.state_dict()).items()}
    _check_sagan_runs_in_reference(arch, sd)
    # the reference builds the same arch from the same arguments: check the keys fit it
    inferred_arch, inferred = _infer(arch, sd)
    try:
        if inferred_arch is None and not inferred:
            raise ValueError("its keys are not this architecture's")
        with torch.device("meta"):  # keys and shapes only
            reference = build_network(arch, fused=False, init_type=None,
                                      **{k: v for k, v in inferred.items() if k in _ARCH_DEFAULTS[arch]})
    except (ValueError, TypeError) as exc:
        _raise_if_other_arch(net, sd, arch)
        raise ValueError(f"save_reference_checkpoint: the network ({type(net).__name__}) does not look like "
                         f"arch={arch!r}: {exc}") from exc
    msg = _mismatch_message(arch, inferred, sd, reference.state_dict())
    if msg is not None:
        _raise_if_other_arch(net, sd, arch)
        raise ValueError(f"save_reference_checkpoint: the network's keys are not those of arch={arch!r}: {msg}")
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(sd, tmp)
    os.replace(tmp, os.fspath(path))


def _check_sagan_runs_in_reference(arch: str, sd: dict) -> None:
    """The reference SAGAN runs only at image_size=64 and conv_dim=64: its attention widths are
    hard-coded for conv_dim=64 and its forward always runs layer l4 (built at 64 only). Its
    constructor takes other values, but the file of such a network loads into no reference
    network that runs (archs_attention._explain_sagan), so it is refused, not written."""
    from ganengine.models.archs_attention import _SAGAN_ATTN_WIDTHS, sagan_attn_widths

    if arch not in _SAGAN_ATTN_WIDTHS or "attn1.value_conv.weight" not in sd:
        return  # (not a SAGAN network: the arch checks after this say what it is)
    widths = sagan_attn_widths(sd)
    has_l4 = any(k.startswith("l4.") for k in sd)
    if widths != _SAGAN_ATTN_WIDTHS[arch] or not has_l4:
        what = ("no layer l4 (image_size != 64)" if not has_l4 else
                f"attention widths {widths} where the reference's are {_SAGAN_ATTN_WIDTHS[arch]} (conv_dim != 64)")
        raise ValueError(f"save_reference_checkpoint: arch={arch!r}: the network has {what}; the reference "
                         "(heykeetae/Self-Attention-GAN) hard-codes its attention widths for conv_dim=64 and runs "
                         "only at image_size=64, so it cannot load this network: only image_size=64, conv_dim=64 "
                         "SAGAN networks can be saved as reference checkpoints")


def _raise_if_other_arch(net: nn.Module, sd: dict, arch: str) -> None:
    other = _fitting_arch(sd, exclude=arch)
    if other is not None:
        raise ValueError(f"save_reference_checkpoint: the network ({type(net).__name__}) is an arch={other[0]!r} "
                         f"network (its keys and shapes fit that arch), not arch={arch!r}")
