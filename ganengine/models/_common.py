"""Helpers shared by the network files: fusing, optional SAGAN attention, argument checks."""
from __future__ import annotations

import math

from torch import nn


def finish(net: nn.Module, fused: bool) -> nn.Module:
    """Rewrite ``net`` in place onto the fused ops (same state_dict keys) when ``fused``.

    Besides ``ganengine.fuse``'s pair rules, an InstanceNorm2d with no activation after it (the
    second norm of every residual block) runs as ``InstanceNormAct2d(activation="none")``, the
    fused single-pass norm, sharing the same parameters and buffers."""
    if fused:
        import ganengine
        from ganengine.nn import InstanceNormAct2d

        # (ganengine's own networks: --channels_last runs them NHWC throughout)
        ganengine.fuse(net, inplace=True, keep_channels_last=True)
        for module in net.modules():
            for name, child in list(module.named_children()):
                if type(child) is nn.InstanceNorm2d:
                    setattr(module, name, InstanceNormAct2d.from_modules(child, None, keep_layout=True))
    return net


def make_attention(channels: int) -> nn.Module:
    """A SAGAN self-attention block (keys query_conv, key_conv, value_conv, gamma)."""
    from ganengine.nn import SelfAttention2d

    return SelfAttention2d(channels)


def check_attention_scale(owner: str, scale, valid: dict[int, object]) -> None:
    if scale is not None and scale not in valid:
        raise ValueError(f"{owner}: attention_scale={scale!r} is not available; this network has feature maps "
                         f"at downsampling factors {sorted(valid)} (None for no attention)")


def run_with_attention(seq: nn.Sequential, x, index: int, attn: nn.Module):
    """``seq(x)`` with ``attn`` applied to the input of ``seq[index]`` (or after the last layer)."""
    for i, layer in enumerate(seq):
        if i == index:
            x = attn(x)
        x = layer(x)
    if index >= len(seq):
        x = attn(x)
    return x


def check_finite_nonnegative(owner: str, name: str, v) -> None:
    """A loss weight: a finite int or float >= 0 (not a bool)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {v!r}")


def check_positive(owner: str, **values) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{owner}: {name} must be a positive int, got {v!r}")
