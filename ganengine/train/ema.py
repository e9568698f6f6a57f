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
dtype: a few kernels for the whole model), or copies ``live`` while ``step < start_step``.
``step=None`` counts this object's own updates from 0. ``start_rule="biggan"`` takes BigGAN's
test instead, ``if itr and itr < start_itr``: only a step the caller passes, other than 0, pegs.

What is averaged (each entry gets one role at construction: averaged, copied or kept):
  * floating parameters: always; fp16/bf16 ones keep an fp32 shadow (their averages would
    round to nothing at decay 0.9999), fp32/fp64 ones a shadow of their own dtype;
  * floating buffers (batch-norm running statistics): averaged with ``buffers="average"``
    (default, as BigGAN, whose ``G_ema`` is evaluated with averaged statistics), copied with
    ``buffers="copy"``;
  * spectral-norm power-iteration vectors (``_u``/``_v`` of PyTorch's or ganengine's
    parametrization): copied with ``sn_vectors="copy"`` (default: an average of unit vectors
    is not a unit vector, and the parametrization's eval mode uses them as they are), averaged
    like any floating buffer with ``sn_vectors="average"`` (BigGAN's ``utils.ema``);
  * integer and other non-floating buffers (``num_batches_tracked``): copied with
    ``integer_buffers="copy"`` (default), left at their value from construction with
    ``integer_buffers="keep"`` (what BigGAN's float arithmetic and the synthesis models do).

``target=G_ema`` (BigGAN's layout, used by the synthesis models): the averages live in a second
instance of the network instead of private shadows: it is loaded with the model's state at
construction and every update writes into its parameters and buffers (so it is checkpointed and
sampled from as an ordinary network). Its tensors keep their own dtypes (give an fp32 target for
a low-precision model). ``ganengine.models.synthesis_tools.StateEMA`` is this mode with
``start_rule="biggan", sn_vectors="average", integer_buffers="keep"``.

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
_SN_MODES = ("copy", "average")
_INTEGER_MODES = ("copy", "keep")
_START_RULES = ("step", "biggan")
_SN_VECTORS = ("_u", "_v")
_AVERAGE, _COPY, _KEEP = "average", "copy", "keep"


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

    __slots__ = ("owner", "kind", "local", "table")

    def __init__(self, owner, kind, local):
        self.owner, self.kind, self.local = owner, kind, local
        # the owner's dict itself (Module.to() and load_state_dict() update it in place): a
        # lookup per update follows a moved model, and costs one dict access per tensor
        self.table = owner._parameters if kind == "param" else owner._buffers

    def get(self) -> torch.Tensor:
        return self.table[self.local]


def _fetch(refs) -> list[torch.Tensor]:
    """The tensors now held at ``refs`` ([(owner dict, local name)])."""
    return [table[local] for table, local in refs]


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"EMA: {name} must be one of {choices}, got {value!r}")


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
        sn_vectors: ``"copy"`` (default) or ``"average"`` for spectral-norm ``_u``/``_v``.
        integer_buffers: ``"copy"`` (default) or ``"keep"`` (left as they are now) for
            integer and other non-floating buffers.
        start_rule: ``"step"`` (default: ``step < start_step`` pegs, ``step=None`` is the own
            update count) or ``"biggan"`` (``if itr and itr < start_itr``: a step of 0 or None
            never pegs).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, start_step: int = 0, *, buffers: str = "average",
                 target: nn.Module | None = None, sn_vectors: str = "copy", integer_buffers: str = "copy",
                 start_rule: str = "step"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"EMA: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA: decay must be a number in [0, 1], got {decay!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"EMA: start_step must be an int >= 0, got {start_step!r}")
        _check_choice("buffers", buffers, _BUFFER_MODES)
        _check_choice("sn_vectors", sn_vectors, _SN_MODES)
        _check_choice("integer_buffers", integer_buffers, _INTEGER_MODES)
        _check_choice("start_rule", start_rule, _START_RULES)
        if target is not None and not isinstance(target, nn.Module):
            raise TypeError(f"EMA: target must be an nn.Module or None, got {type(target).__name__}")
        self.decay, self.start_step, self.buffers = float(decay), int(start_step), buffers
        self.sn_vectors, self.integer_buffers, self.start_rule = sn_vectors, integer_buffers, start_rule
        self.num_updates = 0
        self.model = _unwrap(model)
        self.target = _unwrap(target) if target is not None else None
        if self.target is self.model:
            raise ValueError("EMA: target must be a second instance of the network, not the model itself")
        live = _slots(self.model)
        self._role: dict[str, str] = {key: self._role_of(slot, t) for key, (slot, t) in live.items()}
        self._averaged: dict[str, bool] = {key: role == _AVERAGE for key, role in self._role.items()}
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

    def _role_of(self, slot: _Slot, t: torch.Tensor) -> str:
        if not t.is_floating_point():
            return _COPY if self.integer_buffers == "copy" else _KEEP
        if slot.kind == "param":
            return _AVERAGE
        if _is_sn_module(slot.owner) and slot.local in _SN_VECTORS:
            return _AVERAGE if self.sn_vectors == "average" else _COPY
        return _AVERAGE if self.buffers == "average" else _COPY

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        """{state-dict key: averaged tensor} (the target's own tensors when there is a target)."""
        if self._target_slots is not None:
            return {k: s.get() for k, s in self._target_slots.items()}
        return self._shadow

    # ------------------------------------------------------------------ plumbing
    def _check_keys(self, other: dict, what: str) -> None:
        missing = [k for k in self._role if k not in other]
        unexpected = [k for k in other if k not in self._role]
        if missing or unexpected:
            raise ValueError(f"EMA: {what} state-dict keys differ from the averaged model's "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")

    def _plan(self, model: nn.Module):
        """Per model: {role: [(shadow refs, live refs)]}, cached; a group has one (device, shadow
        dtype, live dtype) so each is one multi-tensor call. A ref is (owner dict, local name)
        (private shadows: (self._shadow, key)), looked up per call."""
        cached = self._plans.get(id(model))
        if cached is not None and cached[0] is model:
            return cached[1]
        slots = _slots(model)
        self._check_keys(slots, "the model's")
        groups = {role: defaultdict(lambda: ([], [])) for role in (_AVERAGE, _COPY, _KEEP)}
        seen = set()
        for key, shadow in self.shadow.items():
            slot, live = slots[key]
            # a tied tensor (one Parameter under several keys, e.g. out.weight = emb.weight) is one
            # tensor of the target too: averaged once per update, not once per key (decay ** 2)
            if self._target_slots is not None:
                if id(shadow) in seen:
                    continue
                seen.add(id(shadow))
            if live.shape != shadow.shape:
                raise ValueError(f"EMA: {key!r} has shape {tuple(live.shape)} in the model but "
                                 f"{tuple(shadow.shape)} in the average")
            g = groups[self._role[key]][(shadow.device, shadow.dtype, live.dtype)]
            held = self._target_slots[key] if self._target_slots is not None else None
            g[0].append((held.table, held.local) if held is not None else (self._shadow, key))
            g[1].append((slot.table, slot.local))
        plan = {role: list(groups[role].values()) for role in groups}
        self._plans[id(model)] = (model, plan)
        return plan

    @staticmethod
    def _lives(refs, like: torch.Tensor):
        lives = _fetch(refs)
        if lives and (lives[0].dtype != like.dtype or lives[0].device != like.device):
            lives = [t.to(device=like.device, dtype=like.dtype) for t in lives]
        return lives

    def _pegged(self, step: int | None) -> bool:
        if self.start_rule == "biggan":  # BigGAN-PyTorch: `if itr and itr < self.start_itr`
            return bool(step) and int(step) < self.start_step
        return (self.num_updates if step is None else int(step)) < self.start_step

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def update(self, step: int | None = None) -> None:
        """One averaging step: ``shadow = lerp(shadow, live, 1 - decay)`` for the averaged
        entries (a copy while pegged by ``start_step``, see ``start_rule``), a copy for the
        copied ones; kept entries are not touched. ``step`` defaults to the number of updates
        so far."""
        peg = self._pegged(step)
        plan = self._plan(self.model)
        for shadow_refs, live_refs in plan[_AVERAGE]:
            shadows = _fetch(shadow_refs)
            lives = self._lives(live_refs, shadows[0])
            if peg or self.decay == 0.0:
                torch._foreach_copy_(shadows, lives)
            elif self.decay != 1.0:
                torch._foreach_lerp_(shadows, lives, 1.0 - self.decay)
        for shadow_refs, live_refs in plan[_COPY]:
            shadows = _fetch(shadow_refs)
            torch._foreach_copy_(shadows, self._lives(live_refs, shadows[0]))
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> nn.Module:
        """Write the averaged state (every entry, kept ones included) into ``model`` (default:
        the tracked one); any model with the same state-dict keys (another instance, a
        ``ganengine.fuse``d copy). Returns it."""
        target = _unwrap(model) if model is not None else self.model
        for groups in self._plan(target).values():
            for shadow_refs, live_refs in groups:
                torch._foreach_copy_(_fetch(live_refs), _fetch(shadow_refs))
        return model if model is not None else self.model

    @contextlib.contextmanager
    def swap(self, model: nn.Module | None = None):
        """``with ema.swap():`` the model holds the averaged values inside the block and its
        own values again after it (also on an exception)."""
        target = _unwrap(model) if model is not None else self.model
        groups = [g for role_groups in self._plan(target).values() for g in role_groups]
        with torch.no_grad():
            backup = [[t.clone() for t in _fetch(live_refs)] for _, live_refs in groups]
            self.copy_to(target)
        try:
            yield target
        finally:
            with torch.no_grad():
                for (_, live_refs), saved in zip(groups, backup):
                    torch._foreach_copy_(_fetch(live_refs), saved)

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
                 "sn_vectors": self.sn_vectors, "integer_buffers": self.integer_buffers,
                 "start_rule": self.start_rule, "num_updates": self.num_updates,
                 "averaged": sorted(k for k, a in self._averaged.items() if a)}
        if self._target_slots is None:
            state["shadow"] = dict(self._shadow)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` (values copied bit for bit into the shadows). A
        checkpoint without the newer settings (``sn_vectors``, ``integer_buffers``,
        ``start_rule``) was written with their defaults."""
        if not isinstance(state, dict) or ("shadow" not in state and self._target_slots is None):
            raise ValueError("EMA.load_state_dict: expected a dict from EMA.state_dict() (with a 'shadow' entry)")
        # these decide which entries are averaged; a state dict from before sn_vectors and
        # integer_buffers existed was written with their defaults
        defaults = {"buffers": self.buffers, "sn_vectors": "copy", "integer_buffers": "copy"}
        for name, default in defaults.items():
            saved, own = state.get(name, default), getattr(self, name)
            if saved != own:
                raise ValueError(f"EMA.load_state_dict: saved with {name}={saved!r}, this EMA has {name}={own!r}")
        rule = state.get("start_rule", "step")
        _check_choice("start_rule", rule, _START_RULES)
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
        self.start_rule = rule
        self.num_updates = int(state.get("num_updates", 0))

    def __repr__(self) -> str:
        counts = {role: sum(r == role for r in self._role.values()) for role in (_AVERAGE, _COPY, _KEEP)}
        where = ", target" if self.target is not None else ""
        kept = f" / {counts[_KEEP]} kept" if counts[_KEEP] else ""
        return (f"EMA(decay={self.decay}, start_step={self.start_step}, buffers={self.buffers!r}, "
                f"sn_vectors={self.sn_vectors!r}, integer_buffers={self.integer_buffers!r}, "
                f"start_rule={self.start_rule!r}{where}, updates={self.num_updates}, {counts[_AVERAGE]} averaged / "
                f"{counts[_COPY]} copied{kept} tensors)")
