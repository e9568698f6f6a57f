"""``Conv2d`` and ``ConvTranspose2d``: ``nn.Conv2d`` / ``nn.ConvTranspose2d`` on
``ganengine.functional.conv2d`` / ``conv_transpose2d`` (small output maps run as one GEMM on the
cpu backend; see ganengine/ops/conv.py). Same parameters, same keys, same constructor.

``ganengine.fuse`` has two module rules for them (ganengine/fusion/rules.py), run after the pair rules (so Conv2d -> LeakyReLU
pairs and ReflectionPad2d -> 3x3 conv pairs still fuse as pairs): a plain ``nn.Conv2d`` /
``nn.ConvTranspose2d`` with groups 1, dilation 1 and zero padding becomes the ganengine module
sharing its parameters.
"""
from __future__ import annotations

import torch
from torch import nn

from ganengine.ops._conv_common import input_in_weight_layout, module_autocast
from ganengine.ops.conv import conv2d, conv_transpose2d


def _legal(m) -> bool:
    return (m.groups == 1 and tuple(m.dilation) == (1, 1) and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (groups 1, dilation 1, zero padding) on ``ganengine.functional.conv2d``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not _legal(self):
            raise ValueError(f"ganengine.nn.Conv2d: supports groups=1, dilation=1, padding_mode='zeros' and "
                             f"numeric padding; got groups={self.groups}, dilation={self.dilation}, "
                             f"padding_mode={self.padding_mode!r}, padding={self.padding!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if module_autocast(x):  # (eager's call under autocast: _conv_common)
            return super().forward(x)
        if x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d takes it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        w = self.weight
        if (xw := input_in_weight_layout(x, w)) is None:  # (eager's output layout: only eager's call gives it)
            return super().forward(x)
        return conv2d(xw, w, self.bias, self.stride, self.padding)

    @classmethod
    def from_module(cls, conv: nn.Conv2d) -> "Conv2d":
        """A ``Conv2d`` sharing ``conv``'s parameters (same tensors, same names)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  bias=conv.bias is not None, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        return new


class ConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` (groups 1, dilation 1) on ``ganengine.functional.conv_transpose2d``;
    ``forward(x, output_size=None)`` as in PyTorch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not _legal(self):
            raise ValueError(f"ganengine.nn.ConvTranspose2d: supports groups=1 and dilation=1; got "
                             f"groups={self.groups}, dilation={self.dilation}")

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if module_autocast(x):  # (eager's call under autocast: _conv_common)
            return super().forward(x, output_size)
        if x.dim() == 3:  # unbatched (C, H, W), as nn.ConvTranspose2d takes it
            size = None if output_size is None else list(output_size)[-2:]  # ((C, H, W) as torch takes it)
            return self.forward(x.unsqueeze(0), size).squeeze(0)
        if x.dim() != 4:
            raise ValueError(f"ganengine.nn.ConvTranspose2d: expected an (N, C, H, W) input, got {tuple(x.shape)}")
        output_padding = self._output_padding(x, output_size, list(self.stride), list(self.padding),
                                              list(self.kernel_size), 2, list(self.dilation))
        w = self.weight
        if (xw := input_in_weight_layout(x, w)) is None:  # (as Conv2d's)
            return super().forward(x, output_size)
        return conv_transpose2d(xw, w, self.bias, self.stride, self.padding, tuple(output_padding))

    @classmethod
    def from_module(cls, conv: nn.ConvTranspose2d) -> "ConvTranspose2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  output_padding=conv.output_padding, bias=conv.bias is not None, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        return new
