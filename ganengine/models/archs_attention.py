"""Reference-checkpoint arch names for the attention / spectral-norm synthesis networks:
``sagan_G``, ``sagan_D`` (heykeetae/Self-Attention-GAN) and ``biggan_G``, ``biggan_D``,
``biggan_deep_G``, ``biggan_deep_D`` (ajbrock/BigGAN-PyTorch).

``SPECS[arch]`` = (defaults of the reference constructor's arguments, builder, infer):
``builder(args, fused=..., init_type=...)`` returns the network; ``infer(state_dict)`` returns
the arguments a reference checkpoint's keys and shapes imply (for error messages and for
``save_reference_checkpoint``'s key check). ``OPEN_ARCHS``: archs whose reference constructor
takes ``**kwargs`` (the BigGAN ones are called with the whole training config): extra keyword
arguments are accepted and ignored, as there.
"""
from __future__ import annotations

import inspect
import re

from ganengine.models import networks_biggan as nb
from ganengine.models import networks_biggan_deep as nbd
from ganengine.models import networks_sagan as ns

_NOT_ARCH = {"self", "kwargs", "fused"}


def _signature_defaults(cls) -> dict:
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if name not in _NOT_ARCH and p.kind is p.POSITIONAL_OR_KEYWORD}


def _biggan_builder(cls):
    def build(args, fused=True, init_type="default"):
        args = dict(args)
        if init_type is None:  # loading a checkpoint: the init would be overwritten
            args["skip_init"] = True
        return cls(**args, fused=fused)
    return build


def _sagan_builder(cls):
    def build(args, fused=True, init_type="default"):  # the reference applies PyTorch's default init only
        return cls(**args, fused=fused)
    return build


# ----------------------------------------------------------------------------- inference
def _indices(sd, pattern):
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


def _infer_sagan_g(sd):
    z_dim = sd["l1.0.module.weight_bar"].shape[0]
    return "sagan_G", dict(z_dim=z_dim, conv_dim=sd["last.0.weight"].shape[0])


def _infer_sagan_d(sd):
    return "sagan_D", dict(conv_dim=sd["l1.0.module.weight_bar"].shape[0])


def _num_svs(sd, prefix):
    return len(_indices(sd, re.escape(prefix) + r"u(\d+)$")) or 1


def _attn_string(resolutions):
    return "_".join(str(r) for r in sorted(set(resolutions))) or "0"


def _infer_biggan_g_common(sd, deep: bool):
    out_w = sd["output_layer.2.weight"]
    sn = "output_layer.2.u0" in sd
    args = dict(G_param="SN" if sn else "none")
    if sn:
        args["num_G_SVs"] = _num_svs(sd, "output_layer.2.")
    first_bn = "blocks.0.0.bn1."
    args["mybn"] = any(k.startswith(first_bn + "bn.") for k in sd)
    if not args["mybn"]:
        args["norm_style"] = "bn" if first_bn + "stored_mean" in sd else "nonorm"
    shared = sd.get("shared.weight")
    args["G_shared"] = shared is not None
    if shared is not None:
        args["n_classes"], args["shared_dim"] = shared.shape
    elif first_bn + "gain.weight" in sd:  # (a self-modulated G's ccbn, gain.0.weight, names no classes)
        args["n_classes"] = sd[first_bn + "gain.weight"].shape[0]
    return args, out_w


def _self_modulated(sd) -> bool:
    """Whether a BigGAN G state dict is U-Net GAN's unconditional generator's (its ccbn gains are
    Linear-ReLU-Linear MLPs of z: keys ``gain.0.weight``, ``gain.2.weight``)."""
    return "blocks.0.0.bn1.gain.0.weight" in sd


def _infer_biggan_g(sd):
    args, out_w = _infer_biggan_g_common(sd, deep=False)
    n_blocks = len(_indices(sd, r"blocks\.(\d+)\.0\."))
    resolution = {3: 32, 4: 64, 5: 128, 6: 256, 7: 512}[n_blocks]
    arch = nb.G_arch(1, "0")[resolution]
    args.update(resolution=resolution, G_ch=out_w.shape[1] // arch["out_channels"][-1],
                G_attn=_attn_string(arch["resolution"][i] for i in _indices(sd, r"blocks\.(\d+)\.1\.")))
    lin = sd["linear.weight"]
    unconditional = _self_modulated(sd)
    if unconditional:  # the full z feeds the linear layer and every ccbn's MLP (hier, dim_z not rounded)
        args.update(hier=True, dim_z=lin.shape[1])
    else:
        gain = sd["blocks.0.0.bn1.gain.weight"]
        if args["G_shared"] and gain.shape[1] > args["shared_dim"]:
            args.update(hier=True, dim_z=(gain.shape[1] - args["shared_dim"]) * (n_blocks + 1))
        else:
            args.update(hier=False, dim_z=lin.shape[1])
    # G_shared's default (None) is True, False with unconditional=True: named only where it differs
    if args["G_shared"] == (not unconditional):
        args["G_shared"] = None
    args["unconditional"] = unconditional
    return "biggan_G", args


def _deep_g_entries(arch, depth):
    """conv1 input widths (in units of G_ch) of every block entry, in order."""
    return [arch["in_channels"][s] for s in range(len(arch["out_channels"])) for _ in range(depth)]


def _infer_biggan_deep_g(sd):
    args, out_w = _infer_biggan_g_common(sd, deep=True)
    n_entries = len(_indices(sd, r"blocks\.(\d+)\.0\."))
    widths = [sd[f"blocks.{i}.0.conv1.weight"].shape[1] for i in range(n_entries)]
    for resolution in (32, 64, 128, 256):
        arch = nbd.G_arch(1, "0")[resolution]
        n_stages = len(arch["out_channels"])
        if n_entries % n_stages or out_w.shape[1] % arch["out_channels"][-1]:
            continue
        depth, ch = n_entries // n_stages, out_w.shape[1] // arch["out_channels"][-1]
        if [w * ch for w in _deep_g_entries(arch, depth)] == widths:
            break
    else:
        return None, {}
    args.update(resolution=resolution, G_depth=depth, G_ch=ch, hier=True,
                G_attn=_attn_string(arch["resolution"][i // depth] for i in _indices(sd, r"blocks\.(\d+)\.1\.")))
    args["dim_z"] = sd["linear.weight"].shape[1] - args["shared_dim"]
    return "biggan_deep_G", args


def _infer_biggan_d(sd):
    n_blocks = len(_indices(sd, r"blocks\.(\d+)\.0\."))
    resolution = {4: 32, 5: 64, 6: 128, 7: 256}[n_blocks]
    arch = nb.D_arch(1, "0")[resolution]
    first = sd["blocks.0.0.conv1.weight"]
    last = sd["linear.weight"]
    ch = last.shape[1] // arch["out_channels"][-1]
    wide = first.shape[0] == arch["out_channels"][0] * ch
    return "biggan_D", dict(resolution=resolution, D_ch=ch, D_wide=wide, n_classes=sd["embed.weight"].shape[0],
                            output_dim=last.shape[0], num_D_SVs=_num_svs(sd, "linear."),
                            D_attn=_attn_string(arch["resolution"][i] for i in _indices(sd, r"blocks\.(\d+)\.1\.")))


def _infer_biggan_deep_d(sd):
    n_stages = len(_indices(sd, r"blocks\.(\d+)\.0\."))
    resolution = {3: 32, 4: 64, 5: 128, 6: 256}[n_stages]
    arch = nbd.D_arch(1, "0")[resolution]
    last = sd["linear.weight"]
    ch = last.shape[1] // arch["out_channels"][-1]
    per_stage = [len(_indices(sd, rf"blocks\.{s}\.(\d+)\.conv1\.")) for s in range(n_stages)]
    depth = per_stage[0]
    attn = [s for s in range(n_stages) if any(k.startswith(f"blocks.{s}.{depth}.theta") for k in sd)]
    return "biggan_deep_D", dict(resolution=resolution, D_ch=ch, D_depth=depth, n_classes=sd["embed.weight"].shape[0],
                                 output_dim=last.shape[0], num_D_SVs=_num_svs(sd, "linear."),
                                 D_attn=_attn_string(arch["resolution"][s] for s in attn))


SPECS = {
    "sagan_G": (_signature_defaults(ns.SAGANGenerator), _sagan_builder(ns.SAGANGenerator), _infer_sagan_g),
    "sagan_D": (_signature_defaults(ns.SAGANDiscriminator), _sagan_builder(ns.SAGANDiscriminator), _infer_sagan_d),
    "biggan_G": (_signature_defaults(nb.BigGANGenerator), _biggan_builder(nb.BigGANGenerator), _infer_biggan_g),
    "biggan_D": (_signature_defaults(nb.BigGANDiscriminator), _biggan_builder(nb.BigGANDiscriminator),
                 _infer_biggan_d),
    # (hier=True: the reference's BigGAN-deep generator runs only with it; its signature says False)
    "biggan_deep_G": ({**_signature_defaults(nbd.BigGANDeepGenerator), "hier": True}, _biggan_builder(nbd.BigGANDeepGenerator),
                      _infer_biggan_deep_g),
    "biggan_deep_D": (_signature_defaults(nbd.BigGANDeepDiscriminator), _biggan_builder(nbd.BigGANDeepDiscriminator),
                      _infer_biggan_deep_d),
}
OPEN_ARCHS = frozenset({"biggan_G", "biggan_D", "biggan_deep_G", "biggan_deep_D"})


# ----------------------------------------------------------------------------- mismatch explanations
# The reference SAGAN hard-codes its attention widths for conv_dim=64 (G: Self_Attn(128) and
# Self_Attn(64); D: Self_Attn(256) and Self_Attn(512)). Its constructor accepts any conv_dim and
# writes a checkpoint, but that network cannot run forward (the attention layers do not fit the
# feature maps they sit on), so no network computes "its outputs". Say so instead of suggesting
# another architecture.
_SAGAN_ATTN_WIDTHS = {"sagan_G": (128, 64), "sagan_D": (256, 512)}


def sagan_attn_widths(sd) -> tuple:
    """The input widths of a SAGAN state dict's two attention layers (None where one is missing)."""
    return tuple(sd[f"attn{i}.value_conv.weight"].shape[1] if f"attn{i}.value_conv.weight" in sd else None
                 for i in (1, 2))


def _explain_sagan(arch):
    def explain(sd, args):
        if "l4.0.module.weight_bar" not in sd and "l3.0.module.weight_bar" in sd:
            return ("it has no layer l4: the reference builds l4 only for image_size=64 and its forward always runs "
                    "it, so a reference network of another image_size cannot run and there are no outputs to "
                    "reproduce (only image_size=64 reference checkpoints are loadable)")
        widths = sagan_attn_widths(sd)
        try:
            conv_dim = (_infer_sagan_g if arch == "sagan_G" else _infer_sagan_d)(sd)[1]["conv_dim"]
        except (KeyError, IndexError):
            return None
        if widths != _SAGAN_ATTN_WIDTHS[arch] or conv_dim == 64:
            return None
        return (f"it was written by the reference at conv_dim={conv_dim}, and its attention layers have the "
                f"reference's hard-coded widths {widths} (those of conv_dim=64) where conv_dim={conv_dim} puts "
                f"{_sagan_maps(arch, conv_dim)} channels: that reference "
                f"{'Generator' if arch == 'sagan_G' else 'Discriminator'} cannot run forward, so there are no outputs "
                f"to reproduce (ganengine's sagan networks with conv_dim != 64 put the attention widths on the feature "
                f"maps; only conv_dim=64 reference checkpoints are loadable)")
    return explain


def _sagan_maps(arch, conv_dim):
    return (conv_dim * 2, conv_dim) if arch == "sagan_G" else (conv_dim * 4, conv_dim * 8)


EXPLAIN = {arch: _explain_sagan(arch) for arch in _SAGAN_ATTN_WIDTHS}
