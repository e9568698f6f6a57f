"""Building a fused norm module around an existing one's tensors (used by ``from_modules`` of
InstanceNormAct2d and BatchNormAct2d, and so by ``fuse()``)."""
from __future__ import annotations

from torch import nn


def activation_of(act: nn.Module | None, who: str) -> tuple[str, float]:
    """(activation name, negative slope) of the activation module that follows a norm."""
    if isinstance(act, nn.LeakyReLU):
        return "leaky_relu", float(act.negative_slope)
    if isinstance(act, nn.ReLU):
        return "relu", 0.0
    if act is None or isinstance(act, nn.Identity):
        return "none", 0.0
    raise TypeError(f"{who}: unsupported activation {type(act).__name__}")


def act_repr(activation: str, negative_slope: float) -> str:
    """An activation as the modules' reprs show it: ``relu``, ``none``, ``leaky_relu(0.2)``."""
    return activation + (f"({negative_slope})" if activation == "leaky_relu" else "")


def norm_with_activation(cls, norm: nn.Module, act: nn.Module | None):
    """An instance of ``cls`` holding ``norm``'s Parameters and buffers themselves (the same tensor
    objects under the same keys, so an optimiser built before fusing keeps training them), its
    hyper-parameters and training mode, and the activation of ``act``."""
    activation, slope = activation_of(act, f"{cls.__name__}.from_modules")
    fused = cls.__new__(cls)
    nn.Module.__init__(fused)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        setattr(fused, attr, getattr(norm, attr))
    fused._parameters.update(norm._parameters)
    fused._buffers.update(norm._buffers)
    fused._non_persistent_buffers_set = set(norm._non_persistent_buffers_set)
    fused.activation, fused.negative_slope = activation, slope
    fused.train(norm.training)
    return fused
