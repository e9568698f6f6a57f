"""Pieces the attention / spectral-norm synthesis models (SAGAN, BigGAN, BigGAN-deep, U-Net GAN)
share: class labels from a batch, LOGAN's latent optimisation, BigGAN's orthogonal
regularisation and its generator EMA.

Batches (docs/INTERFACES.md): ``{"image": (N, 3, H, W) in [-1, 1], "label": (N,) class indices
or (N, K) one-hot}``; unconditional models ignore the label.
"""
from __future__ import annotations

import torch
from torch import nn

from ganengine.train.ema import EMA


def unwrap(net: nn.Module) -> nn.Module:
    """The network inside DDP / torch.compile wrappers (for its attributes)."""
    net = getattr(net, "_orig_mod", net)
    return getattr(net, "module", net)


def class_indices(label: torch.Tensor, n_classes: int, owner: str) -> torch.Tensor:
    """(N,) int64 class indices from indices or one-hot rows, checked against ``n_classes`` (on
    the CPU; a device check would synchronise every step)."""
    cpu = label.device.type == "cpu" and label.numel() > 0
    if label.dim() == 2:
        if label.shape[1] != n_classes:
            raise ValueError(f"{owner}: one-hot labels must have {n_classes} columns (n_classes), got "
                             f"{tuple(label.shape)}")
        if cpu and not bool((((label == 0) | (label == 1)).all() & (label.sum(1) == 1).all())):
            raise ValueError(f"{owner}: one-hot labels must hold one 1 per row and 0 elsewhere (soft or "
                             "multi-hot rows have no class index); pass class indices (N,) or one-hot rows")
        label = label.argmax(1)
    elif label.dim() != 1:
        raise ValueError(f"{owner}: labels must be class indices (N,) or one-hot (N, {n_classes}), got shape "
                         f"{tuple(label.shape)}")
    elif cpu and label.is_floating_point() and not bool((label == label.round()).all()):
        raise ValueError(f"{owner}: class indices must be whole numbers, got a {label.dtype} tensor with "
                         "fractional values")
    label = label.long()
    if label.numel() and label.device.type == "cpu" and (int(label.min()) < 0 or int(label.max()) >= n_classes):
        raise ValueError(f"{owner}: class labels must lie in [0, {n_classes}), got {int(label.min())}.."
                         f"{int(label.max())}; set n_classes to the number of classes in the data")
    return label


def latent_optimise(z: torch.Tensor, score, rate: float, alpha: float, beta: float, steps: int,
                    differentiable: bool) -> torch.Tensor:
    """LOGAN (Wu et al. 2019) as StudioGAN implements it: ``steps`` natural-gradient ascent steps
    on D's score of G(z): ``g = d score / dz``, ``z <- clamp(z + mask * alpha * g / (beta +
    ||g||^2), -1, 1)`` with ``mask`` keeping each sample with probability ``rate``.

    ``score(z)`` returns D's (N, ...) outputs for G(z). With ``differentiable`` (the generator
    step) the gradient is taken with ``create_graph=True`` so the generator's update sees the
    optimisation step (D is not stepped there); otherwise the result is detached (the
    discriminator step). Every sample's z is clamped, optimised or not (StudioGAN's clamp)."""
    n = z.shape[0]
    for _ in range(steps):
        mask = (torch.rand(n, 1, device=z.device) > 1 - rate).to(z.dtype)
        zz = z if z.requires_grad else z.detach().requires_grad_(True)
        with torch.enable_grad():
            out = score(zz)
            g, = torch.autograd.grad(out.sum(), zz, create_graph=differentiable)
        norm2 = g.pow(2).sum(1, keepdim=True)
        z = torch.clamp(zz + mask * (alpha * g / (beta + norm2)), -1.0, 1.0)
        if not differentiable:
            z = z.detach()
    return z


@torch.no_grad()
def ortho_(model: nn.Module, strength: float, blacklist=()) -> None:
    """BigGAN's modified orthogonal regularisation (``utils.ortho``), added to the gradients of
    every parameter with at least two dimensions (not in ``blacklist``):
    ``grad += strength * 2 * ((W W^T) * (1 - I)) W`` with W the parameter as (out, -1)."""
    black = {id(p) for p in blacklist}
    for p in model.parameters():
        if p.dim() < 2 or id(p) in black or p.grad is None:
            continue
        w = p.reshape(p.shape[0], -1)
        gram = torch.mm(w, w.t())
        gram.diagonal().zero_()
        p.grad.add_(torch.mm(gram, w).view_as(p), alpha=2.0 * strength)


class StateEMA(EMA):
    """BigGAN's ``utils.ema`` on :class:`ganengine.train.EMA`: ``target`` (``G_ema``, a second
    instance of the network) is loaded with ``source``'s state and each ``update(itr)`` moves
    its floating tensors, parameters and buffers alike (batch-norm and ccbn statistics, SN
    vectors), to ``lerp(target, source, 1 - decay)``, one multi-tensor call per dtype; pegged to
    the source (a copy) while ``itr and itr < start_itr``. Integer buffers
    (``num_batches_tracked``) keep their value from construction. No state of its own beyond
    the target network, which the models checkpoint as ``G_ema``."""

    def __init__(self, source: nn.Module, target: nn.Module, decay: float = 0.9999, start_itr: int = 0):
        # a negative start never pegs under BigGAN's rule, as 0 does
        super().__init__(source, float(decay), max(0, int(start_itr)), target=target, start_rule="biggan",
                         sn_vectors="average", integer_buffers="keep")

    @property
    def source(self) -> nn.Module:
        return self.model

    @property
    def start_itr(self) -> int:
        return self.start_step
