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

``target=G_ema`` (BigGAN's layout, used by the synthesis models): the averages live in a second
instance of the network instead of private shadows: it is loaded with the model's state at
construction and every update writes into its parameters and buffers (so it is checkpointed and
sampled from as an ordinary network). Its tensors keep their own dtypes (give an fp32 target for
a low-precision model). With ``target`` the update is ``torch._foreach_lerp_`` over the same
tensors as ``ganengine.models.synthesis_tools.StateEMA``, so it gives the same bits.

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
        target: a second instance of the network that holds the averages (``G_ema``), loaded
            with the model's state now; default: private shadows (fp32 for fp16/bf16 entries).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, start_step: int = 0, *, buffers: str = "average",
                 target: nn.Module | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"EMA: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA: decay must be a number in [0, 1], got {decay!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"EMA: start_step must be an int >= 0, got {start_step!r}")
        if buffers not in _BUFFER_MODES:
            raise ValueError(f"EMA: buffers must be one of {_BUFFER_MODES}, got {buffers!r}")
        if target is not None and not isinstance(target, nn.Module):
            raise TypeError(f"EMA: target must be an nn.Module or None, got {type(target).__name__}")
        self.decay, self.start_step, self.buffers = float(decay), int(start_step), buffers
        self.num_updates = 0
        self.model = _unwrap(model)
        self.target = _unwrap(target) if target is not None else None
        if self.target is self.model:
            raise ValueError("EMA: target must be a second instance of the network, not the model itself")
        live = _slots(self.model)
        self._averaged: dict[str, bool] = {}
        for key, (slot, t) in live.items():
            self._averaged[key] = t.is_floating_point() and (
                slot.kind == "param"
                or (buffers == "average" and not (_is_sn_module(slot.owner) and slot.local in _SN_VECTORS)))
        self._shadow: dict[str, torch.Tensor] = {}
        self._target_slots: dict[str, _Slot] | None = None
        with torch.no_grad():
            if self.target is not None:
                held = _slots(self.target)
                self._check_keys(held, "the target's")
                for key, (slot, t) in held.items():
                    if t.shape != live[key][1].shape:
                        raise ValueError(f"EMA: {key!r} has shape {tuple(t.shape)} in the target but "
                                         f"{tuple(live[key][1].shape)} in the model")
                    t.copy_(live[key][1])
                self._target_slots = {k: s for k, (s, _) in held.items()}
            else:
                for key, (_, t) in live.items():
                    dtype = _shadow_dtype(t.dtype) if self._averaged[key] else t.dtype
                    self._shadow[key] = t.detach().to(dtype=dtype, copy=True)
        self._plans: dict[int, tuple] = {}

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        """{state-dict key: averaged tensor} (the target's own tensors when there is a target)."""
        if self._target_slots is not None:
            return {k: s.get() for k, s in self._target_slots.items()}
        return self._shadow

    # ------------------------------------------------------------------ plumbing
    def _check_keys(self, other: dict, what: str) -> None:
        missing = [k for k in self._averaged if k not in other]
        unexpected = [k for k in other if k not in self._averaged]
        if missing or unexpected:
            raise ValueError(f"EMA: {what} state-dict keys differ from the averaged model's "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")

    def _plan(self, model: nn.Module):
        """Per model: ([(shadow keys, slots)] groups to average, same to copy), cached; a group
        has one (device, shadow dtype, live dtype) so each is one multi-tensor call."""
        cached = self._plans.get(id(model))
        if cached is not None and cached[0] is model:
            return cached[1]
        slots = _slots(model)
        self._check_keys(slots, "the model's")
        groups = {True: defaultdict(lambda: ([], [])), False: defaultdict(lambda: ([], []))}
        for key, shadow in self.shadow.items():
            slot, live = slots[key]
            if live.shape != shadow.shape:
                raise ValueError(f"EMA: {key!r} has shape {tuple(live.shape)} in the model but "
                                 f"{tuple(shadow.shape)} in the average")
            g = groups[self._averaged[key]][(shadow.device, shadow.dtype, live.dtype)]
            g[0].append(key)
            g[1].append(slot)
        plan = tuple(list(groups[flag].values()) for flag in (True, False))
        self._plans[id(model)] = (model, plan)
        return plan

    def _shadows(self, keys) -> list[torch.Tensor]:
        if self._target_slots is not None:  # looked up per call: the target may have been moved
            return [self._target_slots[k].get() for k in keys]
        return [self._shadow[k] for k in keys]

    @staticmethod
    def _lives(slots, like: torch.Tensor):
        lives = [s.get() for s in slots]
        if lives and (lives[0].dtype != like.dtype or lives[0].device != like.device):
            lives = [t.to(device=like.device, dtype=like.dtype) for t in lives]
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
        for keys, slots in averaged:
            shadows = self._shadows(keys)
            lives = self._lives(slots, shadows[0])
            if peg or self.decay == 0.0:
                torch._foreach_copy_(shadows, lives)
            elif self.decay != 1.0:
                torch._foreach_lerp_(shadows, lives, 1.0 - self.decay)
        for keys, slots in copied:
            shadows = self._shadows(keys)
            torch._foreach_copy_(shadows, self._lives(slots, shadows[0]))
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> nn.Module:
        """Write the averaged values into ``model`` (default: the tracked one); any model with
        the same state-dict keys (another instance, a ``ganengine.fuse``d copy). Returns it."""
        target = _unwrap(model) if model is not None else self.model
        for groups in self._plan(target):
            for keys, slots in groups:
                lives = [s.get() for s in slots]
                torch._foreach_copy_(lives, self._shadows(keys))
        return model if model is not None else self.model

    @contextlib.contextmanager
    def swap(self, model: nn.Module | None = None):
        """``with ema.swap():`` the model holds the averaged values inside the block and its
        own values again after it (also on an exception)."""
        target = _unwrap(model) if model is not None else self.model
        plan = self._plan(target)
        with torch.no_grad():
            backup = [[s.get().clone() for s in slots] for groups in plan for _, slots in groups]
            self.copy_to(target)
        try:
            yield target
        finally:
            with torch.no_grad():
                i = 0
                for groups in plan:
                    for _, slots in groups:
                        torch._foreach_copy_([s.get() for s in slots], backup[i])
                        i += 1

    def to(self, device=None) -> "EMA":
        """Move the private shadows (e.g. after moving the model); a target is moved as a module."""
        for key in self._shadow:
            self._shadow[key] = self._shadow[key].to(device)
        self._plans.clear()
        return self

    def state_dict(self) -> dict:
        """Settings, update count and (without a target) the shadows; with a target the averages
        are the target network's own state dict, checkpointed with it."""
        state = {"decay": self.decay, "start_step": self.start_step, "buffers": self.buffers,
                 "num_updates": self.num_updates, "averaged": sorted(k for k, a in self._averaged.items() if a)}
        if self._target_slots is None:
            state["shadow"] = dict(self._shadow)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` (values copied bit for bit into the shadows)."""
        if not isinstance(state, dict) or ("shadow" not in state and self._target_slots is None):
            raise ValueError("EMA.load_state_dict: expected a dict from EMA.state_dict() (with a 'shadow' entry)")
        if state.get("buffers", self.buffers) != self.buffers:
            raise ValueError(f"EMA.load_state_dict: saved with buffers={state['buffers']!r}, this EMA averages "
                             f"buffers={self.buffers!r}")
        shadow = state.get("shadow")
        if shadow is not None:
            own = self.shadow
            self._check_keys(shadow, "the saved")
            for key, t in shadow.items():
                if t.shape != own[key].shape:
                    raise ValueError(f"EMA.load_state_dict: {key!r} has shape {tuple(t.shape)}, expected "
                                     f"{tuple(own[key].shape)}")
            for key, t in shadow.items():
                own[key].copy_(t)
        self.decay = float(state.get("decay", self.decay))
        self.start_step = int(state.get("start_step", self.start_step))
        self.num_updates = int(state.get("num_updates", 0))

    def __repr__(self) -> str:
        n_avg = sum(self._averaged.values())
        where = ", target" if self.target is not None else ""
        return (f"EMA(decay={self.decay}, start_step={self.start_step}, buffers={self.buffers!r}{where}, "
                f"updates={self.num_updates}, {n_avg} averaged / {len(self._averaged) - n_avg} copied tensors)")
