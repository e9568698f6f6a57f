"""Spectral normalisation as a drop-in for ``torch.nn.utils.parametrizations.spectral_norm``,
the grouped refresh of a whole model's layers, and the ``ganengine.fuse`` rule.

* ``spectral_norm(module, name="weight", n_power_iterations=1, eps=1e-12, dim=None)``
  registers :class:`SpectralNorm` as a parametrization exactly as PyTorch registers its own:
  same state_dict keys (``parametrizations.weight.original``, ``parametrizations.weight.0._u``,
  ``._v``), same initialisation (the same random draws and 15 power iterations, so one seed
  gives the same u and v), same train/eval behaviour (train: one power iteration per access
  of ``module.weight``, u and v updated in place; eval: none), ``parametrize.cached()`` and
  ``remove_parametrizations`` work, checkpoints move both ways. The iteration runs on
  ganengine's backends (``ganengine.ops.spectral_norm``); on the torch backend it is
  PyTorch's own composition, bit for bit. Eval mode (nothing to iterate) is PyTorch's own
  ``weight / vdot(u, mv(M, v))`` on every backend, bit for bit, at no more host time.
* :class:`SpectralNormGroup` (``spectral_norm_group(model)``): before every forward of the
  model, one call refreshes every spectral-normed layer (power iteration, sigma and
  ``W / sigma``) in one grouped kernel per phase instead of about a dozen small kernels per
  layer; each layer's parametrization then hands out its precomputed weight. Same numbers as
  the per-layer path of the same backend (the kernels reduce per layer in a fixed order).
* fuse rule: PyTorch's ``_SpectralNorm`` parametrization inside a module becomes
  :class:`SpectralNorm` sharing its ``_u``/``_v`` buffers (same keys, same Parameter objects,
  the same numbers on the torch backend). The hook-based ``torch.nn.utils.spectral_norm``
  (``weight_orig`` + a forward pre-hook) has no parametrization: on a conv, fuse()'s conv_module
  rule fuses the conv with the hook kept (docs/fuse.md).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm as _TorchSpectralNorm

from ganengine._state import version
from ganengine.backends import use_backend
from ganengine.fuse import register_module_rule
from ganengine.ops.spectral_norm import U_STEP, choose_backend, run_group, run_layer, torch_iterate, weight_matrix

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class SpectralNorm(nn.Module):
    """The spectral-norm parametrization (``forward(weight) -> weight / sigma``).

    Same constructor, buffers (``_u``, ``_v``), attributes (``dim``, ``eps``,
    ``n_power_iterations``) and behaviour as PyTorch's ``_SpectralNorm``.
    """

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12):
        super().__init__()
        ndim = weight.ndim
        if dim >= ndim or dim < -ndim:
            raise IndexError(f"Dimension out of range (expected to be in range of [-{ndim}, {ndim - 1}] but got {dim})")
        if n_power_iterations <= 0:
            raise ValueError(f"Expected n_power_iterations to be positive, but got "
                             f"n_power_iterations={n_power_iterations}")
        self.dim = dim if dim >= 0 else dim + ndim
        self.eps = eps
        self._pending = None
        if ndim > 1:
            self.n_power_iterations = n_power_iterations
            wmat = weight_matrix(weight, self.dim)
            h, w = wmat.size()
            # the same draws, in the same order, as PyTorch's _SpectralNorm
            u = wmat.new_empty(h).normal_(0, 1)
            v = wmat.new_empty(w).normal_(0, 1)
            self.register_buffer("_u", F.normalize(u, dim=0, eps=self.eps))
            self.register_buffer("_v", F.normalize(v, dim=0, eps=self.eps))
            torch_iterate(wmat, self._u, self._v, U_STEP, 2 * 15, self.eps)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.ndim == 1:
            return F.normalize(weight, dim=0, eps=self.eps)
        pending = self._pending
        if pending is not None:
            self._pending = None
            # refreshed by a SpectralNormGroup for this very tensor, unchanged since (an optimiser
            # step or load_state_dict in between bumps its version: then computed afresh), with a
            # graph where this call needs one (a refresh under no_grad has none)
            if pending[0] is weight and pending[1] == version(weight):
                if pending[3] or not torch.is_grad_enabled():
                    return pending[2]
                # the refresh already iterated u, v: the same weight again, now with a graph
                return run_layer(weight, self._u, self._v, U_STEP, 0, self.eps, self.dim, "pytorch", in_place=True)[0]
        if not self.training:
            return self._eval_weight(weight)
        return run_layer(weight, self._u, self._v, U_STEP, 2 * self.n_power_iterations, self.eps, self.dim,
                         "pytorch", in_place=True)[0]

    def _eval_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Eval mode (no iteration): PyTorch's own formula, op for op, on every backend:
        ``sigma = vdot(u, mv(M, v))``, ``weight / sigma``. Nothing to iterate, so a native
        kernel (and its autograd node) could only add host time to these three small ops; the
        numbers are PyTorch's parametrization's, bit for bit. u and v are cloned, as PyTorch
        does, only when a graph is recorded (they are then saved for backward, and a later
        training-mode call updates them in place); without one nothing is saved, and a clone
        would give the same bits."""
        u, v = self._u, self._v
        if weight.requires_grad and torch.is_grad_enabled():
            u = u.clone(memory_format=torch.contiguous_format)
            v = v.clone(memory_format=torch.contiguous_format)
        return weight / torch.vdot(u, torch.mv(weight_matrix(weight, self.dim), v))

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def __getstate__(self):
        # a pending weight is transient (it carries an autograd graph): never copy or pickle it
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_pending"] = None
        return state

    def extra_repr(self) -> str:
        n = getattr(self, "n_power_iterations", None)
        return f"dim={self.dim}, eps={self.eps}" + (f", n_power_iterations={n}" if n is not None else "")

    @classmethod
    def from_torch(cls, sn: nn.Module) -> "SpectralNorm":
        """A SpectralNorm sharing ``sn``'s buffers (same tensors, same keys)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.dim, new.eps, new._pending = sn.dim, sn.eps, None
        if hasattr(sn, "n_power_iterations"):
            new.n_power_iterations = sn.n_power_iterations
        for name, b in sn._buffers.items():
            new._buffers[name] = b
        new._non_persistent_buffers_set = set(sn._non_persistent_buffers_set)
        new.train(sn.training)
        return new


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12,
                  dim: int | None = None) -> nn.Module:
    """Drop-in for ``torch.nn.utils.parametrizations.spectral_norm`` on ganengine's ops.

    ``dim`` defaults to 1 for ConvTranspose modules and 0 otherwise, as in PyTorch. Returns the
    module (its class becomes ``Parametrized<Class>``, as with PyTorch).
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}'")
    if dim is None:
        dim = 1 if isinstance(module, _TRANSPOSED) else 0
    # registration evaluates the parametrization once (one more power iteration in training
    # mode): on PyTorch's own ops, so that the initial u and v are PyTorch's bit for bit
    with use_backend("torch"):
        parametrize.register_parametrization(module, name, SpectralNorm(weight, n_power_iterations, dim, eps))
    return module


# ----------------------------------------------------------------------------- grouped refresh
def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "module", None)  # DistributedDataParallel / DataParallel
        if isinstance(inner, nn.Module) and type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
            model = inner
            continue
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            model = inner
            continue
        return model


class SpectralNormGroup:
    """Refreshes every spectral-normed layer of ``model`` in one grouped call per forward.

    Every parametrization ``module.parametrizations[name]`` whose first entry is a spectral
    norm (ganengine's, or PyTorch's, which is swapped for ganengine's sharing its buffers) joins
    the group. ``refresh()`` runs, for all of them at once, what each would run on its next
    access: the power iteration (training mode; u and v updated in place), sigma and
    ``W / sigma``, one autograd node for the lot; each layer then returns its precomputed
    weight on its next access. Layers in eval mode are not refreshed: each computes PyTorch's
    three-op eval formula itself on access (``SpectralNorm._eval_weight``; PyTorch's bits).
    With ``attach=True`` (default) a forward pre-hook on the model calls ``refresh()`` before
    every forward, so a training loop needs no change.

    The numbers are those of the per-layer path of the same backend. Differences from
    PyTorch's per-access semantics: a layer that a forward does not use still iterates once,
    and a layer used twice in one forward iterates once (as under ``parametrize.cached()``,
    which is respected: layers already cached are not refreshed). On the torch backend, and
    under ``torch.compile``, nothing is grouped (each layer runs its own path). Layers are
    grouped per (device, dtype, backend, n_power_iterations, eps, train/eval).
    """

    def __init__(self, model: nn.Module, attach: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"SpectralNormGroup: model must be an nn.Module, got {type(model).__name__}")
        self.model = _unwrap(model)
        self.layers: list[tuple[nn.Module, str, SpectralNorm]] = []
        for owner in self.model.modules():
            if not parametrize.is_parametrized(owner):
                continue
            for tensor_name, plist in owner.parametrizations.items():
                first = plist[0]
                if type(first) is _TorchSpectralNorm:
                    first = SpectralNorm.from_torch(first)
                    plist[0] = first
                if isinstance(first, SpectralNorm) and plist.original.dim() > 1:
                    self.layers.append((owner, tensor_name, first))
        self.attached = False
        self.last_refresh: dict[str, int] = {}
        if not self.layers:
            warnings.warn(f"spectral_norm_group: {type(self.model).__name__} has no layer with torch's or ganengine's "
                          "spectral-norm parametrization, so there is nothing to group (a reference's own "
                          "SpectralNorm class, SAGAN's or BigGAN's: ganengine.fuse(model) runs those on the fused "
                          "ops)", RuntimeWarning, stacklevel=3)
        if attach and self.layers:
            self.attach()

    def __len__(self) -> int:
        return len(self.layers)

    # The hook finds its group through the model (``model._ganengine_sn_group``), not through a
    # closure: ``copy.deepcopy(model)`` then copies the group with the model (its layers, buffers
    # and hook are the copy's), where a closure would keep refreshing the original's layers.
    def attach(self) -> "SpectralNormGroup":
        current = self.model.__dict__.get(_GROUP_ATTR)
        if current is not None and current is not self:
            current.detach()  # one group per model (two would both iterate every layer)
        self.model.__dict__[_GROUP_ATTR] = self
        self.attached = True
        if not self.model.__dict__.get(_HOOKED_ATTR, False):  # (one hook per model, kept: detach() unbinds)
            self.model.register_forward_pre_hook(_refresh_hook)
            self.model.__dict__[_HOOKED_ATTR] = True
        return self

    def detach(self) -> None:
        self.attached = False
        if self.model.__dict__.get(_GROUP_ATTR) is self:
            self.model.__dict__[_GROUP_ATTR] = None

    def refresh(self) -> None:
        """Compute every layer's normalised weight now (see the class docstring)."""
        if torch.compiler.is_compiling() or not self.layers:
            return
        groups: dict[tuple, list] = {}
        for owner, tensor_name, sn in self.layers:
            sn._pending = None
            if parametrize._cache_enabled and (id(owner), tensor_name) in parametrize._cache:
                continue
            if not sn.training:
                continue  # eval: each layer's own three ops (PyTorch's formula, SpectralNorm._eval_weight)
            weight = owner.parametrizations[tensor_name].original
            backend = choose_backend(weight, sn.dim)
            if backend == "torch":
                continue
            steps = 2 * sn.n_power_iterations
            key = (weight.device, weight.dtype, backend, steps, sn.eps)
            groups.setdefault(key, []).append((sn, weight))
        self.last_refresh = {}
        for (_, _, backend, steps, eps), members in groups.items():
            sns = [m[0] for m in members]
            weights = [m[1] for m in members]
            w_sns, _ = run_group(weights, [sn.dim for sn in sns], [sn._u for sn in sns], [sn._v for sn in sns],
                                 U_STEP, steps, eps, steps > 0, backend)
            graph = torch.is_grad_enabled()
            for sn, weight, w_sn in zip(sns, weights, w_sns):
                sn._pending = (weight, version(weight), w_sn, graph)
            self.last_refresh[backend] = self.last_refresh.get(backend, 0) + len(sns)

    def clear(self) -> None:
        """Drop precomputed weights that were not used (and the graph they hold)."""
        for _, _, sn in self.layers:
            sn._pending = None


_GROUP_ATTR = "_ganengine_sn_group"
_HOOKED_ATTR = "_ganengine_sn_group_hooked"


def _refresh_hook(module: nn.Module, args) -> None:
    group = module.__dict__.get(_GROUP_ATTR)
    if group is not None and group.attached:
        group.refresh()


def rebind_copied_groups(root: nn.Module) -> None:
    """After a structural copy (``fuse()``): a copied module still names the original's group in
    its ``__dict__``; give it a group of its own spectral-normed layers, attached as the
    original's was (else its forward would refresh the original's layers, and its own would
    iterate again)."""
    for m in root.modules():
        group = m.__dict__.get(_GROUP_ATTR)
        if group is None or group.model is m:
            continue
        m.__dict__[_GROUP_ATTR] = None  # (attach() would detach the original's group)
        new = SpectralNormGroup(m, attach=False)
        if group.attached:
            new.attach()


def spectral_norm_group(model: nn.Module, attach: bool = True) -> SpectralNormGroup:
    """Group every spectral-normed layer of ``model`` (DDP / compiled wrappers are unwrapped);
    see :class:`SpectralNormGroup`."""
    return SpectralNormGroup(model, attach=attach)


# ----------------------------------------------------------------------------- fuse rule
def _is_torch_spectral_norm(m: nn.Module) -> bool:
    return type(m) is _TorchSpectralNorm


register_module_rule("spectral_norm", _is_torch_spectral_norm, SpectralNorm.from_torch)
