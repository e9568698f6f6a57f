"""StarGAN's attribute-classification accuracy: does a classifier see the target attributes?

The StarGAN paper scores a translation by classifying the generated images with a classifier
trained on the real data and comparing with the *target* labels. The classifier is any module
mapping images to (N, c_dim) logits. Multi-label targets (CelebA attributes, float 0/1) are
scored per attribute (sigmoid > 0.5, i.e. logit > 0); one-hot targets (RaFD expressions) by
argmax. Which of the two is a property of the data: pass ``multi_label`` when it is known.
"""
from __future__ import annotations

import torch


class AttributeAccuracy:
    """Streaming accuracy: ``update(logits, targets)`` per batch, then ``compute()``.

    ``multi_label``: True scores every attribute (CelebA), False the argmax class (RaFD); say it
    whenever the data's definition is known (``evaluate_generator`` takes it from StarGAN's
    ``dataset`` option). None decides from *all* the targets seen, at ``compute()``: single-label
    when every target row of every batch is one-hot, else multi-label, so the result does not
    depend on how the data was batched. Single-label targets may also be class indices (N,).
    """

    def __init__(self, multi_label: bool | None = None):
        if multi_label is not None and not isinstance(multi_label, bool):
            raise TypeError(f"AttributeAccuracy: multi_label must be True, False or None, got {multi_label!r}")
        self._multi_label = multi_label
        self._all_one_hot = True  # (auto mode) every target row seen so far has exactly one 1
        self._multi_correct = 0
        self._single_correct = 0
        self._multi_total = 0
        self._per_attribute: torch.Tensor | None = None
        self.samples = 0

    @property
    def multi_label(self) -> bool | None:
        """The scoring: as given, or (auto) as decided from the targets seen so far (None: none yet)."""
        if self._multi_label is not None or self.samples == 0:
            return self._multi_label
        return not self._all_one_hot

    @property
    def correct(self) -> int:
        return self._multi_correct if self.multi_label else self._single_correct

    @property
    def total(self) -> int:
        return self._multi_total if self.multi_label else self.samples

    @property
    def per_attribute_correct(self) -> torch.Tensor | None:
        return self._per_attribute if self.multi_label else None

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> "AttributeAccuracy":
        if (logits.dim() == 2 and targets.dim() == 1 and targets.shape[0] == logits.shape[0]
                and not targets.is_floating_point() and not targets.is_complex() and targets.dtype != torch.bool):
            if self._multi_label:
                raise ValueError("AttributeAccuracy.update: multi-label scoring needs (N, c_dim) 0/1 targets, "
                                 f"got class indices of shape {tuple(targets.shape)}")
            c_dim = logits.shape[1]
            if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= c_dim):
                raise ValueError(f"AttributeAccuracy.update: class indices must be in [0, {c_dim}), got "
                                 f"{int(targets.min())}..{int(targets.max())}")
            targets = torch.nn.functional.one_hot(targets.long(), c_dim)
        if logits.dim() != 2 or logits.shape != targets.shape:
            raise ValueError("AttributeAccuracy.update: logits and targets must both be (N, c_dim), got "
                             f"{tuple(logits.shape)} and {tuple(targets.shape)}")
        targets = targets.to(logits.device)
        multi = self._multi_label
        if multi is None:  # one-hot rows (exactly one 1) are compatible with a single-label task
            one_hot = bool(((targets == 0) | (targets == 1)).all() and (targets.sum(1) == 1).all())
            self._all_one_hot = self._all_one_hot and one_hot
        if multi is None or multi:  # (auto: both tallies, the choice is made at compute())
            hits = ((logits > 0) == (targets > 0.5)).to(torch.int64)
            per = hits.sum(0).cpu()
            self._per_attribute = per if self._per_attribute is None else self._per_attribute + per
            self._multi_correct += int(hits.sum())
            self._multi_total += hits.numel()
        if multi is None and self._all_one_hot or multi is False:
            self._single_correct += int((logits.argmax(1) == targets.argmax(1)).sum())
        self.samples += logits.shape[0]
        return self

    def compute(self) -> float:
        if self.samples == 0 or self.total == 0:
            raise ValueError("AttributeAccuracy.compute: no samples were added")
        return self.correct / self.total

    def per_attribute(self) -> list[float]:
        """Accuracy of each attribute (multi-label only)."""
        if self.per_attribute_correct is None:
            raise ValueError("AttributeAccuracy.per_attribute: only for multi-label targets with samples")
        return (self.per_attribute_correct.double() / self.samples).tolist()


@torch.no_grad()
def attribute_accuracy(classifier: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor,
                       multi_label: bool | None = None) -> float:
    """Accuracy of ``classifier(images)`` against ``targets`` ((N, c_dim) 0/1 or one-hot, or (N,)
    class indices); ``multi_label`` as ``AttributeAccuracy``."""
    return AttributeAccuracy(multi_label).update(classifier(images), targets).compute()
