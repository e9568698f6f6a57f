"""``GANModel``: what every model (pix2pix, CycleGAN, StarGAN, StackGAN) offers the training
engine, and ``StepContext``: how a model's ``train_step`` hands AMP / loss scaling to the engine.

Contract (docs/INTERFACES.md): ``__init__(**options)`` with options named as the reference's
command-line flags and the reference defaults (``self.options``, a JSON-able dict);
``make_optimizers()``; ``make_schedulers(optimizers, n_epochs, n_epochs_decay, steps_per_epoch)``
(schedulers are stepped once per ``train_step``, i.e. per iteration; they reproduce the
reference's per-epoch schedule through ``steps_per_epoch``); ``train_step(batch, optimizers,
ctx)`` doing the reference's full update; ``translate(batch)``; ``extra_state()`` /
``load_extra_state()``.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn


class StepContext:
    """Hooks a model's ``train_step`` calls for everything precision- or scaling-related.

    The default does plain fp32 training. The engine subclasses it for AMP (``autocast`` and a
    GradScaler per optimiser name) without the models knowing.
    """

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, opt_name: str) -> None:
        loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, opt_name: str) -> None:
        optimizer.step()

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)


DEFAULT_CONTEXT = StepContext()


def set_requires_grad(nets: nn.Module | Iterable[nn.Module | None], requires_grad: bool) -> None:
    """The reference's set_requires_grad: freeze/unfreeze whole networks between phases."""
    if isinstance(nets, nn.Module):
        nets = [nets]
    for net in nets:
        if net is not None:
            for p in net.parameters():
                p.requires_grad = requires_grad


def linear_decay_lambda(n_epochs: int, n_epochs_decay: int, steps_per_epoch: int, epoch_count: int = 1):
    """The reference 'linear' policy as a per-iteration multiplier: constant for ``n_epochs``,
    then linear to zero over ``n_epochs_decay`` (lambda_rule(epoch) = 1 - max(0, epoch +
    epoch_count - n_epochs) / (n_epochs_decay + 1), evaluated at ``step // steps_per_epoch``)."""
    for name, v in (("n_epochs", n_epochs), ("n_epochs_decay", n_epochs_decay), ("steps_per_epoch", steps_per_epoch)):
        if not isinstance(v, int) or v < (1 if name == "steps_per_epoch" else 0):
            raise ValueError(f"make_schedulers: {name} must be a {'positive' if name == 'steps_per_epoch' else 'non-negative'}"
                             f" int, got {v!r}")

    def rule(step: int) -> float:
        epoch = step // steps_per_epoch
        return 1.0 - max(0, epoch + epoch_count - n_epochs) / float(n_epochs_decay + 1)

    return rule


class GANModel(nn.Module):
    """Base class. Subclasses set ``MODEL_NAME``, ``DEFAULTS`` (option -> reference default),
    ``network_names``, ``generator_name`` and implement the step."""

    MODEL_NAME: str = ""
    DEFAULTS: dict = {}
    network_names: list[str] = []
    generator_name: str = ""

    def __init__(self, **options):
        super().__init__()
        unknown = sorted(set(options) - set(self.DEFAULTS))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown option(s) {unknown}; the options are "
                            f"{sorted(self.DEFAULTS)}")
        self.options = {**self.DEFAULTS, **options}

    # -- helpers for subclasses ------------------------------------------------------------
    def _choice(self, name: str, choices) -> str:
        v = self.options[name]
        if v not in choices:
            raise ValueError(f"{type(self).__name__}: {name} must be one of {tuple(choices)}, got {v!r}")
        return v

    def _attention_scale(self, image_size: int):
        """``attention_resolution`` (feature-map side in pixels, None for no attention) as the
        networks' downsampling factor for ``image_size`` inputs."""
        res = self.options.get("attention_resolution")
        if res is None:
            return None
        if not isinstance(res, int) or res <= 0 or image_size % res:
            raise ValueError(f"{type(self).__name__}: attention_resolution must be a positive int dividing the image "
                             f"size {image_size}, got {res!r}")
        return image_size // res

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    def _adam(self, params, lr: float, beta1: float, beta2: float = 0.999):
        """The reference's Adam. With ``fused_optimizer`` (default) it runs as PyTorch's fused
        implementation (``fused=True``: one multi-tensor kernel per step, the same update to fp32
        rounding); the reference's default is the per-parameter loop, which allocates weight-sized
        temporaries per parameter per step (what it costs: docs/models.md, BENCHMARKS.md)."""
        params = list(params)
        return torch.optim.Adam(params, lr=lr, betas=(beta1, beta2), fused=self._fused_adam_ok(params) or None)

    def _fused_adam_ok(self, params) -> bool:
        if not self.options.get("fused_optimizer", False):
            return False
        # torch's fused Adam kernels exist for these devices (and float parameters)
        return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)

    # -- contract ---------------------------------------------------------------------------
    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def make_schedulers(self, optimizers: dict, n_epochs: int, n_epochs_decay: int, steps_per_epoch: int) -> dict:
        """Reference 'linear' schedule for every optimiser (stepped once per train_step)."""
        rule = linear_decay_lambda(n_epochs, n_epochs_decay, steps_per_epoch, self.options.get("epoch_count", 1))
        return {name: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=rule) for name, opt in optimizers.items()}

    def train_step(self, batch: dict, optimizers: dict, ctx: StepContext = DEFAULT_CONTEXT) -> dict:
        raise NotImplementedError

    @torch.no_grad()
    def translate(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no extra state, got keys {sorted(state)}")

    @staticmethod
    def _detached(losses: dict) -> dict:
        return {k: v.detach() for k, v in losses.items()}
