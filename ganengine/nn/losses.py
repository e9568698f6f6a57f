"""Loss modules on the fused loss reductions: GANLoss (the CycleGAN reference's interface) and
CycleLoss."""
from __future__ import annotations

import torch
from torch import nn

from ganengine._state import version
from ganengine.ops.losses import MODES, cycle_loss, discriminator_loss, gan_loss

_LABELLED = ("vanilla", "lsgan")  # the modes whose targets are the label buffers


def _numpy_views(r: torch.Tensor, f: torch.Tensor):
    """(r, f, 0-d NumPy views of their memory, their addresses), or None where NumPy cannot view them
    (bf16, a tensor requiring grad)."""
    try:
        vr, vf = r.detach().numpy(), f.detach().numpy()
    except (TypeError, RuntimeError):
        return None
    return (r, f, vr, vf, vr.__array_interface__["data"][0], vf.__array_interface__["data"][0])


class GANLoss(nn.Module):
    """Drop-in for the CycleGAN reference's ``GANLoss(gan_mode, target_real_label, target_fake_label)``.

    ``loss(prediction, target_is_real)`` is the mean loss of ``prediction`` against the real or
    fake label expanded to its shape (vanilla: BCE with logits, lsgan: MSE), or
    ``-mean``/``+mean`` for wgangp. ``gan_mode="hinge"`` adds the hinge loss; pass
    ``for_discriminator=False`` for the generator's -mean(x). ``real_label``/``fake_label`` are
    buffers as in the reference, so its state_dicts load here. ``mode=`` (keyword) is another name
    for ``gan_mode``, the name the functional losses use (lsgan when neither is given).
    """

    def __init__(self, gan_mode: str | None = None, target_real_label: float = 1.0, target_fake_label: float = 0.0,
                 *, mode: str | None = None):
        super().__init__()
        # gan_mode (the reference's name) or mode (the functional losses' name); lsgan when neither
        given = {k: v for k, v in (("gan_mode", gan_mode), ("mode", mode)) if v is not None}
        for name, value in given.items():
            if not isinstance(value, str) or value.lower() not in MODES:
                raise ValueError(f"{name} must be one of {MODES}, got {value!r}")
        if len(given) == 2 and gan_mode.lower() != mode.lower():
            raise TypeError(f"GANLoss: pass gan_mode or mode, not both (got gan_mode={gan_mode!r}, mode={mode!r})")
        gan_mode = next(iter(given.values()), "lsgan")
        self.gan_mode = gan_mode.lower()
        self.register_buffer("real_label", torch.tensor(float(target_real_label)))
        self.register_buffer("fake_label", torch.tensor(float(target_fake_label)))
        # Python copies of the labels, for the loss ops' float arguments. On the CPU they are read on
        # every call, as the reference reads its buffers (a label-smoothing schedule, a write through
        # .data, a load), through NumPy views of the buffers' memory (0.5 us a call; float() of the
        # two tensors costs 2 us). Reading a CUDA buffer would synchronise the GPU: there they are
        # re-read when a buffer changed (an edit in place bumps its version, a new buffer or
        # `.data = t` is another object or storage), which a write in place through `.data` (no
        # version bump) does not show: docs/losses.md.
        self._labels = (float(target_real_label), float(target_fake_label))
        self._label_key = self._buffers_key()
        self._views = None

    def _buffers_key(self) -> tuple:
        b = self._buffers
        r, f = b["real_label"], b["fake_label"]
        # (inference tensors keep no version counter, and cannot be edited outside inference mode)
        return r, f, version(r), version(f), r.data_ptr(), f.data_ptr()

    def _current(self) -> tuple[float, float]:
        if torch.compiler.is_compiling():  # (compiled: the labels as of the last eager call or load)
            return self._labels
        b, v = self._buffers, self._views
        r, f = b["real_label"], b["fake_label"]
        # (the views' own addresses: a copied module's views are copies, not its buffers' memory)
        if v is not None and v[0] is r and v[1] is f and r.data_ptr() == v[4] and f.data_ptr() == v[5]:
            labels = self.__dict__["_labels"] = (float(v[2]), float(v[3]))  # (nn.Module.__setattr__: ~1 us)
            return labels
        if r.is_cpu and f.is_cpu:
            self._labels = (float(r), float(f))
            self._views = _numpy_views(r, f)
            return self._labels
        key = self._label_key
        if (r is not key[0] or f is not key[1] or version(r) != key[2] or version(f) != key[3]
                or r.data_ptr() != key[4] or f.data_ptr() != key[5]):
            self._reread()
        return self._labels

    def _reread(self) -> None:
        """The labels read from the buffers now, and the key they were read under."""
        self._labels = (float(self.real_label), float(self.fake_label))
        self._label_key = self._buffers_key()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        if not (self.real_label.is_meta or self.fake_label.is_meta):  # (a meta module has no values)
            self._reread()   # (a compiled call reads these)

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state["_views"] = None   # (NumPy views of this module's buffers: rebuilt from the buffers)
        return state

    def forward(self, prediction: torch.Tensor, target_is_real: bool, for_discriminator: bool = True) -> torch.Tensor:
        # the labels apply to vanilla and lsgan only: wgangp and hinge (the WGAN-GP / hinge steps)
        # skip reading the buffers, part of what a call costs next to the reference's -mean(x)
        real, fake = self._current() if self.gan_mode in _LABELLED else (1.0, 0.0)
        return gan_loss(prediction, target_is_real, self.gan_mode, for_discriminator, real_label=real, fake_label=fake)

    def discriminator(self, real_prediction: torch.Tensor, fake_prediction: torch.Tensor) -> torch.Tensor:
        """0.5 * (loss(real, True) + loss(fake, False)) in one pass (the reference's backward_D)."""
        real, fake = self._current()
        return discriminator_loss(real_prediction, fake_prediction, self.gan_mode, real_label=real, fake_label=fake)

    def extra_repr(self) -> str:
        real, fake = self._current()
        return f"gan_mode={self.gan_mode!r}, target_real_label={real:.7g}, target_fake_label={fake:.7g}"


class CycleLoss(nn.Module):
    """CycleGAN's cycle-consistency and identity L1 terms, all in one pass.

    ``loss(real_a, rec_a, real_b, rec_b, idt_a=None, idt_b=None)`` returns ``(total, terms)``
    with terms ``cycle_a``, ``cycle_b`` (and ``idt_a``, ``idt_b``), weighted as the reference:
    lambda_a, lambda_b, lambda_b * lambda_identity, lambda_a * lambda_identity.
    """

    def __init__(self, lambda_a: float = 10.0, lambda_b: float = 10.0, lambda_identity: float = 0.5):
        super().__init__()
        self.lambda_a, self.lambda_b, self.lambda_identity = float(lambda_a), float(lambda_b), float(lambda_identity)

    def forward(self, real_a, rec_a, real_b, rec_b, idt_a=None, idt_b=None):
        return cycle_loss(real_a, rec_a, real_b, rec_b, idt_a, idt_b, self.lambda_a, self.lambda_b, self.lambda_identity)

    def extra_repr(self) -> str:
        return f"lambda_a={self.lambda_a}, lambda_b={self.lambda_b}, lambda_identity={self.lambda_identity}"
