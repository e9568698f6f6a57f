"""Rewriting the synthesis networks (DCGAN, PyTorch-GAN's wgan_gp / cgan / acgan / infogan) onto
the fused ops, keeping every state_dict key.

``finish_synthesis(net, fused)``, applied after the reference tree is built and initialised:

1. inside ``nn.Sequential``\\ s, nearest 2x ``nn.Upsample`` followed by a 3x3 / padding-1 conv becomes
   one ``UpsampleConv3x3`` at the conv's index (``nn.Identity`` at the upsample's): a 4x4
   stride-2 transposed conv whose kernel is derived from the 3x3 one on every call (2.25x fewer
   multiply-adds, the upsampled map is never written; the same function up to rounding, and the
   gradient reaches the 3x3 weight through the derivation);
2. ``ganengine.fuse``: BatchNorm -> ReLU/LeakyReLU pairs (``BatchNormAct2d`` / ``1d``),
   Conv2d -> LeakyReLU pairs (``Conv2dAct``), plain (transposed) convs on ganengine's conv ops;
3. a batch norm with no activation after it (AC-GAN's first generator norm, its discriminator's
   norms after Dropout2d) runs as ``BatchNormAct2d/1d(activation="none")``, sharing the same
   parameters and buffers.

``SOLO_NORM_FUSED`` switches step 3 (one line) should the fused norm stop paying on some backend.
"""
from __future__ import annotations

import torch
from torch import nn

SOLO_NORM_FUSED = True


class UpsampleConv3x3(nn.Conv2d):
    """``conv(upsample_nearest_2x(x))`` for a 3x3, stride-1, padding-1 conv, as one 4x4 stride-2
    transposed conv. Subclasses nn.Conv2d: the same ``weight`` (Cout, Cin, 3, 3) and ``bias``."""

    @classmethod
    def from_module(cls, conv: nn.Conv2d) -> "UpsampleConv3x3":
        new = cls(conv.in_channels, conv.out_channels, 3, 1, 1, bias=conv.bias is not None, device="meta")
        new.weight, new.bias = conv.weight, conv.bias
        new.train(conv.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import ganengine.functional as GF
        from ganengine.models.biggan_ops import upsample_conv_weight

        return GF.conv_transpose2d(x, upsample_conv_weight(self.weight), self.bias, 2, 1)

    def extra_repr(self) -> str:
        return "upsample nearest 2x, then " + super().extra_repr()


def _is_upsample2x(m) -> bool:
    return (type(m) is nn.Upsample and m.mode == "nearest" and m.size is None
            and m.scale_factor in (2, 2.0, (2, 2), (2.0, 2.0)))


def _is_conv3x3(m) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.stride == (1, 1) and m.padding == (1, 1)
            and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros")


def _fold_upsample_convs(net: nn.Module) -> None:
    for seq in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names[:-1], names[1:]):
            if _is_upsample2x(seq._modules[a]) and _is_conv3x3(seq._modules[b]):
                seq._modules[b] = UpsampleConv3x3.from_module(seq._modules[b])
                seq._modules[a] = nn.Identity()


def _fuse_solo_norms(net: nn.Module) -> None:
    from ganengine.nn import BatchNormAct1d, BatchNormAct2d

    for module in net.modules():
        for name, child in list(module.named_children()):
            if type(child) is nn.BatchNorm2d:
                setattr(module, name, BatchNormAct2d.from_modules(child, None))
            elif type(child) is nn.BatchNorm1d:
                setattr(module, name, BatchNormAct1d.from_modules(child, None))


def finish_synthesis(net: nn.Module, fused: bool) -> nn.Module:
    """Rewrite ``net`` in place onto the fused ops (keys, parameters and buffers unchanged)."""
    if fused:
        import ganengine

        _fold_upsample_convs(net)
        ganengine.fuse(net, inplace=True)
        if SOLO_NORM_FUSED:
            _fuse_solo_norms(net)
    return net
