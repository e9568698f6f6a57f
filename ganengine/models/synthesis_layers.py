"""Rewriting the synthesis networks (DCGAN, PyTorch-GAN's wgan_gp / cgan / acgan / infogan) onto
the fused ops, keeping every state_dict key, parameter and buffer object.

``finish_synthesis(net, fused, ganengine_conv=...)``, applied after the reference tree is built
and initialised, rewrites inside every ``nn.Sequential``:

1. nearest 2x ``nn.Upsample`` followed by a 3x3 / padding-1 conv -> one ``UpsampleConv3x3`` at the
   conv's index (``nn.Identity`` at the upsample's): a 4x4 stride-2 transposed conv whose kernel
   is derived from the 3x3 one on every call (2.25x fewer multiply-adds, the upsampled map is
   never written; the same function up to rounding; the gradient reaches the 3x3 weight through
   the derivation);
2. BatchNorm1d/2d -> ReLU / LeakyReLU -> one ``BatchNormAct1d/2d`` (``nn.Identity`` at the
   activation's index); a batch norm with no activation after it (AC-GAN's first generator norm,
   its discriminator's norms after Dropout2d) -> ``BatchNormAct(activation="none")``;
3. the convolutions ``ganengine_conv(conv, seq, index)`` selects -> ganengine's conv ops
   (``Conv2dAct`` when a LeakyReLU follows, else ``ganengine.nn.Conv2d`` / ``ConvTranspose2d``);
   the others stay PyTorch's (oneDNN on the CPU, cuDNN on GPUs).

Why a selection and not every conv: at these networks' batch sizes (64) the CPU backend's 4x4
Winograd route and its conv + activation op lose to oneDNN (measured per layer, 1 thread, under
load: DCGAN's 4x4 stride-2 layers 1.1-1.6x slower with Winograd, AC-GAN's small 3x3 convs 1.2-1.3x
slower as Conv2dAct), while its GEMM form wins on a 1x1 input (DCGAN's first transposed conv) and
its conv + LeakyReLU on DCGAN's first 3 -> ndf layer. Each network states its selection.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
        from ganengine.models.biggan_ops import upsample_conv_weight

        # the vendor transposed conv: at these sizes oneDNN beats the Winograd route (see above)
        return F.conv_transpose2d(x, upsample_conv_weight(self.weight), self.bias, 2, 1)

    def extra_repr(self) -> str:
        return "upsample nearest 2x, then " + super().extra_repr()


def _is_upsample2x(m) -> bool:
    return (type(m) is nn.Upsample and m.mode == "nearest" and m.size is None
            and m.scale_factor in (2, 2.0, (2, 2), (2.0, 2.0)))


def _is_conv3x3(m) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.stride == (1, 1) and m.padding == (1, 1)
            and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros")


def _act(m) -> bool:
    return type(m) in (nn.ReLU, nn.LeakyReLU)


def _rewrite_sequential(seq: nn.Sequential, ganengine_conv) -> None:
    from ganengine.nn import BatchNormAct1d, BatchNormAct2d, Conv2dAct
    from ganengine.nn import Conv2d as GConv2d
    from ganengine.nn import ConvTranspose2d as GConvTranspose2d

    names = list(seq._modules)
    mods = seq._modules
    i = 0
    while i < len(names):
        a = mods[names[i]]
        b = mods[names[i + 1]] if i + 1 < len(names) else None
        if _is_upsample2x(a) and _is_conv3x3(b):
            mods[names[i + 1]], mods[names[i]] = UpsampleConv3x3.from_module(b), nn.Identity()
            i += 2
            continue
        if type(a) in (nn.BatchNorm1d, nn.BatchNorm2d):
            fused_cls = BatchNormAct2d if type(a) is nn.BatchNorm2d else BatchNormAct1d
            if _act(b):
                mods[names[i]], mods[names[i + 1]] = fused_cls.from_modules(a, b), nn.Identity()
                i += 2
                continue
            mods[names[i]] = fused_cls.from_modules(a, None)
        elif type(a) in (nn.Conv2d, nn.ConvTranspose2d) and ganengine_conv(a, seq, i):
            if type(a) is nn.Conv2d and type(b) is nn.LeakyReLU:
                mods[names[i]], mods[names[i + 1]] = Conv2dAct.from_modules(a, b), nn.Identity()
                i += 2
                continue
            mods[names[i]] = (GConv2d if type(a) is nn.Conv2d else GConvTranspose2d).from_module(a)
        i += 1


def finish_synthesis(net: nn.Module, fused: bool, ganengine_conv=lambda conv, seq, index: False) -> nn.Module:
    """Rewrite ``net`` in place onto the fused ops (keys, parameters and buffers unchanged)."""
    if fused:
        for seq in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
            _rewrite_sequential(seq, ganengine_conv)
    return net
