"""Modules over :mod:`ganengine.ops.conv_small_map`: bias-free 4x4 stride-2 padding-1
``nn.Conv2d`` / ``nn.ConvTranspose2d`` (same ``weight``, same keys) that run as one GEMM on small
CPU maps and as PyTorch's conv elsewhere (DCGAN's 8x8 <-> 4x4 layers, issue 19)."""
from __future__ import annotations

import torch
from torch import nn

from ganengine.ops.conv_small_map import conv4x4s2_gemm, conv_transpose4x4s2_gemm, small_map_route


def is_4x4s2p1(m) -> bool:
    return (m.kernel_size == (4, 4) and m.stride == (2, 2) and m.padding == (1, 1) and m.dilation == (1, 1)
            and m.groups == 1 and m.bias is None and m.padding_mode == "zeros"
            and getattr(m, "output_padding", (0, 0)) == (0, 0))


class SmallMapConv2d(nn.Conv2d):
    """A bias-free 4x4 stride-2 padding-1 ``nn.Conv2d`` (same ``weight``) that runs as one GEMM
    when its output map is small (``small_map_route``), else as PyTorch's conv."""

    @classmethod
    def from_module(cls, conv: nn.Conv2d) -> "SmallMapConv2d":
        if type(conv) is not nn.Conv2d or not is_4x4s2p1(conv):
            raise ValueError(f"SmallMapConv2d: expected a bias-free 4x4 stride-2 padding-1 nn.Conv2d, got {conv}")
        new = cls(conv.in_channels, conv.out_channels, 4, 2, 1, bias=False, device="meta")
        new.weight = conv.weight
        new.train(conv.training)
        return new

    def extra_repr(self) -> str:
        return super().extra_repr() + ", one GEMM on small CPU maps"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        even = x.dim() == 4 and x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0  # the im2col's geometry
        if even and small_map_route(x, self.weight, (x.shape[-2] // 2) * (x.shape[-1] // 2)):
            return conv4x4s2_gemm(x, self.weight)
        return super().forward(x)


class SmallMapConvTranspose2d(nn.ConvTranspose2d):
    """A bias-free 4x4 stride-2 padding-1 ``nn.ConvTranspose2d`` (same ``weight``) that runs as
    one GEMM when its input map is small (``small_map_route``), else as PyTorch's."""

    @classmethod
    def from_module(cls, conv: nn.ConvTranspose2d) -> "SmallMapConvTranspose2d":
        if type(conv) is not nn.ConvTranspose2d or not is_4x4s2p1(conv):
            raise ValueError("SmallMapConvTranspose2d: expected a bias-free 4x4 stride-2 padding-1 "
                             f"nn.ConvTranspose2d, got {conv}")
        new = cls(conv.in_channels, conv.out_channels, 4, 2, 1, bias=False, device="meta")
        new.weight = conv.weight
        new.train(conv.training)
        return new

    def extra_repr(self) -> str:
        return super().extra_repr() + ", one GEMM on small CPU maps"

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if output_size is None and small_map_route(x, self.weight, x.shape[-2] * x.shape[-1]):
            return conv_transpose4x4s2_gemm(x, self.weight)
        return super().forward(x, output_size)
