"""``GANModel``: what every model (pix2pix, CycleGAN, StarGAN, StackGAN) offers the training
engine, and ``StepContext``: how a model's ``train_step`` hands AMP / loss scaling to the engine.

Contract (docs/INTERFACES.md): ``__init__(**options)`` with options named as the reference's
command-line flags and the reference defaults (``self.options``, a JSON-able dict);
``make_optimizers()``; ``make_schedulers(optimizers, n_epochs, n_epochs_decay, steps_per_epoch, max_steps=None)``
(schedulers are stepped once per ``train_step``, i.e. per iteration; they reproduce the
reference's per-epoch schedule through ``steps_per_epoch``; ``max_steps`` is ``--max_steps`` /
``--num_iters`` when given, for the models whose reference schedules over iterations; a rate
never goes below 0); ``train_step(batch, optimizers,
ctx)`` doing the reference's full update; ``translate(batch)``; ``extra_state()`` /
``load_extra_state()``.
"""
from __future__ import annotations

import contextlib
import math
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

    def unscale(self, optimizer: torch.optim.Optimizer, opt_name: str) -> None:
        """Make the gradients the true ones before a step edits them (AMP's scaler: unscale_)."""

    def step(self, optimizer: torch.optim.Optimizer, opt_name: str) -> None:
        optimizer.step()

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)


DEFAULT_CONTEXT = StepContext()


def average_gradients(net: nn.Module, wrapped: nn.Module) -> None:
    """Average ``net``'s gradients over the processes where ``wrapped`` is its DDP wrapper (a
    backward that ran on the bare ``net``, which DDP's hooks did not see); nothing otherwise.
    Parameters without a gradient are the same on every process (same graph): skipped."""
    if not isinstance(getattr(wrapped, "_orig_mod", wrapped), nn.parallel.DistributedDataParallel):
        return
    import torch.distributed as dist

    grads = [p.grad for p in net.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def per_image_in_training_mode(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``net(x)`` image by image where ``net`` is in training mode and holds batch norm (the
    references' test scripts run G in training mode with batch_size 1: each image's statistics
    its own, so an output never depends on the other images of the batch), else in one call."""
    if net.training and x.shape[0] > 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        return torch.cat([net(x[i:i + 1]) for i in range(x.shape[0])])
    return net(x)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is half / bfloat16 (the gradient penalty's squared norms overflow
    fp16 under autocast), else as it is: a float64 model's penalty stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def set_requires_grad(nets: nn.Module | Iterable[nn.Module | None], requires_grad: bool) -> None:
    """The reference's set_requires_grad: freeze/unfreeze whole networks between phases."""
    if isinstance(nets, nn.Module):
        nets = [nets]
    for net in nets:
        if net is not None:
            for p in net.parameters():
                p.requires_grad = requires_grad


def _check_schedule_ints(_owner: str = "make_schedulers", **values) -> None:
    for name, v in values.items():
        positive = name in ("steps_per_epoch", "lr_decay_iters", "lr_update_step", "num_iters_decay", "max_steps",
                            "epoch_count", "lr_decay_epoch")
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if positive else 0):
            raise ValueError(f"{_owner}: {name} must be a {'positive' if positive else 'non-negative'} int, "
                             f"got {v!r}")


def linear_decay_lambda(n_epochs: int, n_epochs_decay: int, steps_per_epoch: int, epoch_count: int = 1,
                        at_epoch_begin: bool = True):
    """The reference 'linear' policy as a per-iteration multiplier: lambda_rule(epoch) = 1 - max(0,
    epoch + epoch_count - n_epochs) / (n_epochs_decay + 1), held at 0 once it reaches 0: training
    past the scheduled epochs (``--max_steps``) keeps the rate at 0 (the reference's rule, which
    never runs past them, would turn negative: gradient ascent).

    ``at_epoch_begin`` (the junyanz reference's train.py since 2020, which steps its schedulers at
    the beginning of every epoch): the k-th epoch of the run (k = 1, 2, ...; the reference's epoch
    ``epoch_count + k - 1``) trains at lambda_rule(k), i.e. ``step // steps_per_epoch + 1``; so
    the rate starts falling in the last of the ``n_epochs`` epochs and the last decay epoch
    (``n_epochs + n_epochs_decay``) trains at 0, as the reference's (its issue #1100). Without it
    (ganengine's own linear decay for the models whose references have none: StarGAN's epoch
    rule, the synthesis models' ``--n_epochs_decay``): lambda_rule(k - 1), constant for
    ``n_epochs`` epochs, then down over ``n_epochs_decay``."""
    _check_schedule_ints(n_epochs=n_epochs, n_epochs_decay=n_epochs_decay, steps_per_epoch=steps_per_epoch,
                         epoch_count=epoch_count)
    first = 1 if at_epoch_begin else 0

    def rule(step: int) -> float:
        epoch = step // steps_per_epoch + first
        return max(0.0, 1.0 - max(0, epoch + epoch_count - n_epochs) / float(n_epochs_decay + 1))

    return rule


LR_POLICIES = ("linear", "step", "plateau", "cosine")


def check_lr_policy(owner: str, options: dict) -> None:
    """``lr_policy`` / ``lr_decay_iters`` (the junyanz reference's flags): a clear error at
    construction for what ganengine does not implement."""
    policy = options.get("lr_policy", "linear")
    if policy == "plateau":
        raise ValueError(f"{owner}: lr_policy 'plateau' is not supported: the reference steps ReduceLROnPlateau "
                         "on a metric that is always 0 (BaseModel.metric), so it only cuts the rate by 0.2 every "
                         "6 epochs whatever the losses do; use --lr_policy step (--lr_decay_iters N) for that, "
                         "or linear / cosine")
    if policy not in LR_POLICIES:
        raise ValueError(f"{owner}: lr_policy must be one of {LR_POLICIES[:2] + LR_POLICIES[3:]}, got {policy!r}")
    _check_schedule_ints(owner, lr_decay_iters=options.get("lr_decay_iters", 50), epoch_count=options.get("epoch_count", 1))


def lr_policy_lambda(policy: str, n_epochs: int, n_epochs_decay: int, steps_per_epoch: int, epoch_count: int = 1,
                     lr_decay_iters: int = 50, at_epoch_begin: bool = True):
    """junyanz ``networks.get_scheduler`` as a per-iteration multiplier. The reference steps its
    scheduler once per epoch, at the beginning of the epoch (train.py since 2020): the k-th epoch
    of the run (k = 1, 2, ...) trains at the scheduler's epoch k, here ``k = step //
    steps_per_epoch + 1`` (``at_epoch_begin=False``: k - 1, the reference's order before 2020):

    * linear: ``linear_decay_lambda`` (held at 0 after the decay epochs);
    * step: StepLR(step_size=lr_decay_iters, gamma=0.1): ``0.1 ** (k // lr_decay_iters)``
      (lr_decay_iters counts epochs, as the reference steps it per epoch);
    * cosine: CosineAnnealingLR(T_max=n_epochs, eta_min=0): ``(1 + cos(pi * k / n_epochs)) / 2``,
      held at 0 from epoch ``n_epochs`` on (the reference's would climb back up during the decay
      epochs).

    ``epoch_count`` (the reference's ``--epoch_count``) enters the linear rule only, as in the
    reference.
    """
    if policy == "linear":
        return linear_decay_lambda(n_epochs, n_epochs_decay, steps_per_epoch, epoch_count, at_epoch_begin)
    check_lr_policy("make_schedulers", dict(lr_policy=policy, lr_decay_iters=lr_decay_iters, epoch_count=epoch_count))
    _check_schedule_ints(n_epochs=n_epochs, n_epochs_decay=n_epochs_decay, steps_per_epoch=steps_per_epoch)
    first = 1 if at_epoch_begin else 0
    if policy == "step":
        return lambda step: 0.1 ** ((step // steps_per_epoch + first) // lr_decay_iters)
    if n_epochs < 1:
        raise ValueError("lr_policy 'cosine' anneals over --n_epochs (CosineAnnealingLR T_max), which must be >= 1")
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step // steps_per_epoch + first, n_epochs) / n_epochs))


def iteration_decay_lambda(num_iters: int, num_iters_decay: int, lr_update_step: int):
    """StarGAN's iteration schedule (yunjey/stargan solver.py, ``--num_iters`` training): the rate
    is constant, then after every ``lr_update_step``-th iteration past ``num_iters -
    num_iters_decay`` it drops by ``lr * lr_update_step / num_iters_decay``, reaching 0 at
    ``num_iters`` (the paper's linear decay to 0) and never going below it. The reference code
    subtracts ``lr / num_iters_decay`` per drop, only ``lr / lr_update_step`` in all (0.1% by default),
    which contradicts the paper; it also restarts the decay from the initial rate on resume.

    The multiplier for the iteration after ``step`` iterations (the reference's ``i + 1``)."""
    _check_schedule_ints(num_iters=num_iters, num_iters_decay=num_iters_decay, lr_update_step=lr_update_step)
    start = max(0, num_iters - num_iters_decay)

    def rule(step: int) -> float:
        drops = max(0, step // lr_update_step - start // lr_update_step)
        return max(0.0, 1.0 - drops * lr_update_step / float(num_iters_decay))

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

    @property
    def latent_dtype(self) -> torch.dtype:
        """The dtype latents are drawn in: the first floating Parameter's (a model moved to float64
        draws float64 z; fp32 weights under autocast draw fp32, as the references do)."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.get_default_dtype())

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
    @property
    def double_backward(self) -> str:
        """What in this model's step differentiates a gradient (a gradient penalty, LOGAN's latent
        step), in words, or "" (torch.compile cannot train such a step: --compile refuses it)."""
        return ""

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    @property
    def lr_at_epoch_begin(self) -> bool:
        """Whether the epoch schedule follows the junyanz reference's timing (its schedulers
        stepped at the beginning of each epoch: lr_policy_lambda): the models with its
        ``--lr_policy`` (pix2pix, CycleGAN, CSGAN). The other models' linear decay over
        ``--n_epochs_decay`` is ganengine's own: constant for ``n_epochs`` epochs, then down."""
        return "lr_policy" in self.DEFAULTS

    def make_schedulers(self, optimizers: dict, n_epochs: int, n_epochs_decay: int, steps_per_epoch: int,
                        max_steps: int | None = None) -> dict:
        """The reference's ``--lr_policy`` schedule (default 'linear') for every optimiser, over
        epochs as the reference even when ``max_steps`` (``--max_steps``) ends the run; stepped
        once per train_step."""
        rule = lr_policy_lambda(self.options.get("lr_policy", "linear"), n_epochs, n_epochs_decay, steps_per_epoch,
                                self.options.get("epoch_count", 1), self.options.get("lr_decay_iters", 50),
                                at_epoch_begin=self.lr_at_epoch_begin)
        return {name: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=rule) for name, opt in optimizers.items()}

    def train_step(self, batch: dict, optimizers: dict, ctx: StepContext = DEFAULT_CONTEXT) -> dict:
        raise NotImplementedError

    @property
    def losses(self):
        """The adversarial / cycle losses the step uses: ``ganengine.functional``'s fused ops, or
        with ``fused=False`` the references' plain PyTorch (``models/plain_losses.py``; the same
        signatures), so that an unfused model is the code a user without ganengine runs."""
        if self.options.get("fused", True):
            import ganengine.functional as GF

            return GF
        from ganengine.models import plain_losses

        return plain_losses

    def check_batch_size(self, batch_size: int) -> None:
        """Refuse (ValueError naming --batch_size) a batch size ``train_step`` cannot take; the
        trainer asks before it touches the run folder. Any here."""

    @torch.no_grad()
    def translate(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def extra_state(self) -> dict:
        return {}

    def reseed(self, seed: int) -> None:
        """Seed the model's own random generators (beyond torch's) for this process: DDP gives each
        process its own streams. None here."""

    def load_extra_state(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no extra state, got keys {sorted(state)}")

    @staticmethod
    def _detached(losses: dict) -> dict:
        return {k: v.detach() for k, v in losses.items()}
