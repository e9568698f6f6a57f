"""``EMA``: an exponential moving average of a generator's parameters and buffers.

    ema = EMA(G, decay=0.9999, start_step=0)
    ...
    optimizer.step(); ema.update(step)         # once per generator step
    with ema.swap():                           # sample / evaluate with the averaged weights
        images = G(z)
    ema.copy_to(G_ema)                         # or write them into another instance

Semantics (BigGAN-PyTorch's ``utils.ema``, the reference for this): every tensor of the model's
state dict has a shadow, initialised to the model's value. ``update(step)`` sets
``shadow = lerp(shadow, live, 1 - decay)`` (``torch._foreach_lerp_``, grouped per device and
dtype: a few kernels for the whole model), or copies ``live`` while ``step < start_step``
(BigGAN pegs the average to the weights before ``ema_start``; it skips the peg for a step of
0, which it never passes). ``step=None`` counts this object's own updates from 0.

What is averaged:
  * floating parameters: always; fp16/bf16 ones keep an fp32 shadow (their averages would
    round to nothing at decay 0.9999), fp32/fp64 ones a shadow of their own dtype;
  * floating buffers (batch-norm running statistics): averaged with ``buffers="average"``
    (default, as BigGAN, whose ``G_ema`` is evaluated with averaged statistics), copied with
    ``buffers="copy"``;
  * integer buffers (``num_batches_tracked``) and spectral-norm power-iteration vectors
    (``_u``/``_v`` of PyTorch's or ganengine's parametrization): always copied; an average of
    unit vectors is not a unit vector, and the parametrization's eval mode uses them as they are.

The model may be wrapped in DistributedDataParallel / DataParallel / ``torch.compile`` (the
inner module is used) or rewritten by ``ganengine.fuse`` (same keys: an EMA of the plain model
applies to the fused one and back). ``state_dict()`` / ``load_state_dict()`` carry the shadows,
the update count and the settings, so a resumed run continues bit for bit.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch import nn

_BUFFER_MODES = ("average", "copy")
_SN_VECTORS = ("_u", "_v")


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if type(model).__name__ in ("DistributedDataParallel", "DataParallel") and isinstance(
                getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def _is_sn_module(m: nn.Module) -> bool:
    from torch.nn.utils.parametrizations import _SpectralNorm

    from ganengine.nn.spectral_norm import SpectralNorm

    return isinstance(m, (_SpectralNorm, SpectralNorm))


def _shadow_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _Slot:
    """Where one state-dict entry lives in a model: (owner module, kind, local name)."""

    __slots__ = ("owner", "kind", "local")

    def __init__(self, owner, kind, local):
        self.owner, self.kind, self.local = owner, kind, local

    def get(self) -> torch.Tensor:
        table = self.owner._parameters if self.kind == "param" else self.owner._buffers
        return table[self.local]


def _slots(model: nn.Module) -> dict[str, tuple[_Slot, torch.Tensor]]:
    """{state-dict key: (slot, tensor)} for every tensor in model.state_dict()."""
    out = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor):
            continue
        owner_name, _, local = key.rpartition(".")
        try:
            owner = model.get_submodule(owner_name) if owner_name else model
        except AttributeError:
            owner = None
        if owner is not None and owner._parameters.get(local) is t:
            out[key] = (_Slot(owner, "param", local), t)
        elif owner is not None and owner._buffers.get(local) is t:
            out[key] = (_Slot(owner, "buffer", local), t)
        else:
            raise ValueError(f"EMA: cannot locate state-dict entry {key!r} in the model (a state_dict hook "
                             "that renames keys?)")
    return out


class EMA:
    """Exponential moving average of ``model``'s parameters and buffers (see the module doc).

    Args:
        model: the live network (DDP / DataParallel / compiled wrappers are unwrapped).
        decay: weight of the old average per update, in [0, 1].
        start_step: ``update(step)`` copies instead of averaging while ``step < start_step``.
        buffers: ``"average"`` (default) or ``"copy"`` for floating buffers.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, start_step: int = 0, *, buffers: str = "average"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"EMA: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA: decay must be a number in [0, 1], got {decay!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"EMA: start_step must be an int >= 0, got {start_step!r}")
        if buffers not in _BUFFER_MODES:
            raise ValueError(f"EMA: buffers must be one of {_BUFFER_MODES}, got {buffers!r}")
        self.decay, self.start_step, self.buffers = float(decay), int(start_step), buffers
        self.num_updates = 0
        self.model = _unwrap(model)
        self.shadow: dict[str, torch.Tensor] = {}
        self._averaged: dict[str, bool] = {}
        with torch.no_grad():
            for key, (slot, t) in _slots(self.model).items():
                averaged = t.is_floating_point() and (
                    slot.kind == "param"
                    or (buffers == "average" and not (_is_sn_module(slot.owner) and slot.local in _SN_VECTORS)))
                dtype = _shadow_dtype(t.dtype) if averaged else t.dtype
                self.shadow[key] = t.detach().to(dtype=dtype, copy=True)
                self._averaged[key] = averaged
        self._plans: dict[int, tuple] = {}

    # ------------------------------------------------------------------ plumbing
    def _plan(self, model: nn.Module):
        """Per model: ([(shadows, slots, cast)] groups to average, same to copy), cached."""
        cached = self._plans.get(id(model))
        if cached is not None and cached[0] is model:
            return cached[1]
        slots = _slots(model)
        missing = [k for k in self.shadow if k not in slots]
        unexpected = [k for k in slots if k not in self.shadow]
        if missing or unexpected:
            raise ValueError(f"EMA: the model's state-dict keys differ from the averaged ones "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        groups = {True: defaultdict(lambda: ([], [])), False: defaultdict(lambda: ([], []))}
        for key, shadow in self.shadow.items():
            slot, live = slots[key]
            if live.shape != shadow.shape:
                raise ValueError(f"EMA: {key!r} has shape {tuple(live.shape)} in the model but "
                                 f"{tuple(shadow.shape)} in the average")
            g = groups[self._averaged[key]][(shadow.device, shadow.dtype, live.dtype)]
            g[0].append(shadow)
            g[1].append(slot)
        plan = tuple([(sh, sl, k[2]) for k, (sh, sl) in groups[flag].items()] for flag in (True, False))
        self._plans[id(model)] = (model, plan)
        return plan

    @staticmethod
    def _lives(slots, dtype, device):
        lives = [s.get() for s in slots]
        if lives and (lives[0].dtype != dtype or lives[0].device != device):
            lives = [t.to(device=device, dtype=dtype) for t in lives]
        return lives

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def update(self, step: int | None = None) -> None:
        """One averaging step: ``shadow = lerp(shadow, live, 1 - decay)`` for the averaged
        entries (a copy while ``step < start_step``), a copy for the others. ``step`` defaults
        to the number of updates so far."""
        step = self.num_updates if step is None else int(step)
        peg = step < self.start_step
        averaged, copied = self._plan(self.model)
        for shadows, slots, _ in averaged:
            lives = self._lives(slots, shadows[0].dtype, shadows[0].device)
            if peg or self.decay == 0.0:
                torch._foreach_copy_(shadows, lives)
            elif self.decay != 1.0:
                torch._foreach_lerp_(shadows, lives, 1.0 - self.decay)
        for shadows, slots, _ in copied:
            torch._foreach_copy_(shadows, [s.get() for s in slots])
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> nn.Module:
        """Write the averaged values into ``model`` (default: the tracked one); any model with
        the same state-dict keys (another instance, a ``ganengine.fuse``d copy). Returns it."""
        target = _unwrap(model) if model is not None else self.model
        for groups in self._plan(target):
            for shadows, slots, live_dtype in groups:
                lives = [s.get() for s in slots]
                torch._foreach_copy_(lives, shadows)
        return model if model is not None else self.model

    @contextlib.contextmanager
    def swap(self, model: nn.Module | None = None):
        """``with ema.swap():`` the model holds the averaged values inside the block and its
        own values again after it (also on an exception)."""
        target = _unwrap(model) if model is not None else self.model
        plan = self._plan(target)
        with torch.no_grad():
            backup = [[s.get().clone() for s in slots] for groups in plan for _, slots, _ in groups]
            self.copy_to(target)
        try:
            yield target
        finally:
            with torch.no_grad():
                i = 0
                for groups in plan:
                    for _, slots, _ in groups:
                        torch._foreach_copy_([s.get() for s in slots], backup[i])
                        i += 1

    def to(self, device=None) -> "EMA":
        """Move the shadows (e.g. after moving the model)."""
        for key in self.shadow:
            self.shadow[key] = self.shadow[key].to(device)
        self._plans.clear()
        return self

    def state_dict(self) -> dict:
        return {"decay": self.decay, "start_step": self.start_step, "buffers": self.buffers,
                "num_updates": self.num_updates, "shadow": dict(self.shadow),
                "averaged": sorted(k for k, a in self._averaged.items() if a)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` (values copied bit for bit into the shadows)."""
        if not isinstance(state, dict) or "shadow" not in state:
            raise ValueError("EMA.load_state_dict: expected a dict from EMA.state_dict() (with a 'shadow' entry)")
        shadow = state["shadow"]
        missing = [k for k in self.shadow if k not in shadow]
        unexpected = [k for k in shadow if k not in self.shadow]
        if missing or unexpected:
            raise ValueError(f"EMA.load_state_dict: keys differ from this model's (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        for key, t in shadow.items():
            if t.shape != self.shadow[key].shape:
                raise ValueError(f"EMA.load_state_dict: {key!r} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(self.shadow[key].shape)}")
        for key, t in shadow.items():
            self.shadow[key].copy_(t)
        self.decay = float(state.get("decay", self.decay))
        self.start_step = int(state.get("start_step", self.start_step))
        self.num_updates = int(state.get("num_updates", 0))
        if state.get("buffers", self.buffers) != self.buffers:
            raise ValueError(f"EMA.load_state_dict: saved with buffers={state['buffers']!r}, this EMA averages "
                             f"buffers={self.buffers!r}")

    def __repr__(self) -> str:
        n_avg = sum(self._averaged.values())
        return (f"EMA(decay={self.decay}, start_step={self.start_step}, buffers={self.buffers!r}, "
                f"updates={self.num_updates}, {n_avg} averaged / {len(self.shadow) - n_avg} copied tensors)")
