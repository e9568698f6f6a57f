"""``InstanceNormAct2d``: nn.InstanceNorm2d followed by an activation, as one fused op.

State dict keys are those of ``nn.InstanceNorm2d`` (weight, bias, running_mean, running_var,
num_batches_tracked, as configured), so checkpoints move between the two unchanged.
``ganengine.fuse`` turns InstanceNorm2d -> LeakyReLU/ReLU pairs and lone InstanceNorm2d layers into
it (rules in ganengine/fusion/rules.py).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ganengine.nn._adopt import act_repr, norm_with_activation

from ganengine.ops.norm_act import ACTIVATIONS, instance_norm_act


class InstanceNormAct2d(nn.InstanceNorm2d):
    """``activation(InstanceNorm2d(x))`` on the fused op.

    Args are ``nn.InstanceNorm2d``'s plus ``activation`` ("leaky_relu", "relu", "none") and
    ``negative_slope``. Training/eval behaviour follows ``nn.InstanceNorm2d`` exactly: input
    statistics in training or when ``track_running_stats=False``, running statistics in eval; a
    single pixel (H * W == 1) with input statistics raises its ValueError.

    ``keep_layout`` (attribute): True (the default) keeps a channels_last input's layout in the
    output (no conversion, as the NHWC kernels allow); False gives ``nn.InstanceNorm2d``'s layout,
    always contiguous (what ``ganengine.fuse`` sets, unless ``keep_channels_last=True``: a layout
    feeds what follows, e.g. the mask dropout draws under a seed and whether ``.view`` works).
    """

    keep_layout: bool = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = False, track_running_stats: bool = False,
                 activation: str = "leaky_relu", negative_slope: float = 0.2,
                 device=None, dtype=None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"InstanceNormAct2d: activation must be one of {ACTIVATIONS}, got {activation!r}")
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = float(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm_call(x, self.activation, self.negative_slope)

    def _norm_call(self, x: torch.Tensor, activation: str, negative_slope: float) -> torch.Tensor:
        """forward() with another activation (fuse()'s rewritten graphs call it too)."""
        if x.dim() not in (3, 4):
            raise ValueError(f"InstanceNormAct2d: expected a 3-D or 4-D input, got shape {tuple(x.shape)}")
        channels = x.shape[-3]
        if channels != self.num_features:
            # as nn.InstanceNorm2d: an error when the channel count matters, else a warning
            if self.affine or self.track_running_stats:
                raise ValueError(f"InstanceNormAct2d: expected {self.num_features} channels, got input of "
                                 f"shape {tuple(x.shape)} ({channels} channels)")
            warnings.warn(f"InstanceNormAct2d: input has {channels} channels but num_features is "
                          f"{self.num_features} (unused because affine=False)", stacklevel=2)
        # exactly nn.InstanceNorm2d's rule: input statistics when training or not tracking;
        # momentum None means no running-stat update (instance norm keeps no batch count)
        use_input_stats = self.training or not self.track_running_stats
        if use_input_stats and x.shape[-1] * x.shape[-2] == 1:  # (F.instance_norm's own check and words)
            raise ValueError(f"Expected more than 1 spatial element when training, got input size {x.size()}")
        y = instance_norm_act(
            x, self.weight, self.bias, self.running_mean, self.running_var, use_input_stats,
            self.momentum if self.momentum is not None else 0.0, self.eps, activation, negative_slope)
        return y if self.keep_layout or y.is_contiguous() else y.contiguous()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={act_repr(self.activation, self.negative_slope)}"

    @classmethod
    def from_modules(cls, norm: nn.InstanceNorm2d, act: nn.Module | None,
                     keep_layout: bool = False) -> "InstanceNormAct2d":
        """A fused module sharing ``norm``'s parameters and buffers (same tensors, same keys);
        by default with ``norm``'s output layout (``keep_layout=False``)."""
        fused = norm_with_activation(cls, norm, act)
        fused.keep_layout = bool(keep_layout)
        return fused
