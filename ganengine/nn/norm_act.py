"""``InstanceNormAct2d``: nn.InstanceNorm2d followed by an activation, as one fused op.

State dict keys are those of ``nn.InstanceNorm2d`` (weight, bias, running_mean, running_var,
num_batches_tracked, as configured), so checkpoints move between the two unchanged.
``ganengine.fuse`` turns InstanceNorm2d -> LeakyReLU/ReLU pairs and lone InstanceNorm2d layers into
it (rules in ganengine/fusion/rules.py).
"""
from __future__ import annotations

import numbers
import warnings

import torch
from torch import nn

from ganengine.nn._adopt import act_repr, norm_with_activation

from ganengine.ops.norm_act import ACTIVATIONS, instance_norm_act


_ORDER = ("InstanceNormAct2d(num_features, affine=False, track_running_stats=False, eps=1e-5, momentum=0.1, "
          "activation='leaky_relu', negative_slope=0.2)")


def _is_bool(value) -> bool:
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool"))


def _check_args(affine, track_running_stats, eps, momentum) -> None:
    """Fail loudly on arguments given in nn.InstanceNorm2d's positional order (num_features, eps,
    momentum, affine, track_running_stats), which would otherwise build another norm silently: a
    float where a flag belongs, a bool where eps / momentum belong. (What nn.InstanceNorm2d takes
    for the flags otherwise, bools, 0 / 1, a bool tensor, stays accepted.)"""
    for name, value in (("affine", affine), ("track_running_stats", track_running_stats)):
        if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and not _is_bool(value):
            raise TypeError(
                f"InstanceNormAct2d: {name} must be a bool, got {value!r} ({type(value).__name__}). The order is "
                f"{_ORDER}: eps and momentum come after affine and track_running_stats (not in "
                "nn.InstanceNorm2d's order); pass them by keyword, e.g. InstanceNormAct2d(64, eps=1e-5, affine=True)")
    for name, value in (("eps", eps), ("momentum", momentum)):
        if value is None and name == "momentum" or isinstance(value, torch.Tensor) and value.numel() == 1:
            continue
        if _is_bool(value) or not isinstance(value, numbers.Real):
            what = "a real number >= 0" if name == "eps" else "a real number or None"
            raise TypeError(f"InstanceNormAct2d: {name} must be {what}, got {value!r} ({type(value).__name__}). "
                            f"The order is {_ORDER}; pass eps and momentum by keyword")
    if not isinstance(eps, torch.Tensor) and not eps >= 0:
        raise ValueError(f"InstanceNormAct2d: eps must be a real number >= 0, got {eps!r}")


class InstanceNormAct2d(nn.InstanceNorm2d):
    """``activation(InstanceNorm2d(x))`` on the fused op.

    ``InstanceNormAct2d(num_features, affine=False, track_running_stats=False, eps=1e-5,
    momentum=0.1, activation="leaky_relu", negative_slope=0.2)``: ``nn.InstanceNorm2d``'s
    arguments, but **affine and track_running_stats come before eps and momentum** (unlike
    ``nn.InstanceNorm2d(num_features, eps, momentum, affine, track_running_stats)``), plus
    ``activation`` ("leaky_relu", "relu", "none") and ``negative_slope``. Pass all but
    ``num_features`` by keyword; the types are checked so that a call in either order by position
    that would mean something else fails with a TypeError/ValueError instead (affine and
    track_running_stats: bool; eps: a real number >= 0; momentum: a real number or None).

    Training/eval behaviour follows ``nn.InstanceNorm2d`` exactly: input statistics in training or
    when ``track_running_stats=False``, running statistics in eval; a single pixel (H * W == 1)
    with input statistics raises its ValueError.

    ``keep_layout`` (attribute): True (the default) keeps a channels_last input's layout in the
    output (no conversion, as the NHWC kernels allow); False gives ``nn.InstanceNorm2d``'s layout,
    always contiguous (what ``ganengine.fuse`` sets, unless ``keep_channels_last=True``: a layout
    feeds what follows, e.g. the mask dropout draws under a seed and whether ``.view`` works).
    """

    keep_layout: bool = True

    def __init__(self, num_features: int, affine: bool = False, track_running_stats: bool = False,
                 eps: float = 1e-5, momentum: float | None = 0.1,
                 activation: str = "leaky_relu", negative_slope: float = 0.2,
                 device=None, dtype=None):
        _check_args(affine, track_running_stats, eps, momentum)
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
