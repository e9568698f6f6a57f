"""StarGAN's attribute-classification accuracy: does a classifier see the target attributes?

The StarGAN paper scores a translation by classifying the generated images with a classifier
trained on the real data and comparing with the *target* labels. The classifier is any module
mapping images to (N, c_dim) logits. Multi-label targets (CelebA attributes, float 0/1) are
scored per attribute (sigmoid > 0.5, i.e. logit > 0); one-hot targets (RaFD expressions) by
argmax.
"""
from __future__ import annotations

import torch


class AttributeAccuracy:
    """Streaming accuracy: ``update(logits, targets)`` per batch, then ``compute()``."""

    def __init__(self, multi_label: bool | None = None):
        self.multi_label = multi_label
        self.correct = 0
        self.total = 0
        self.per_attribute_correct: torch.Tensor | None = None
        self.samples = 0

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> "AttributeAccuracy":
        if logits.dim() != 2 or logits.shape != targets.shape:
            raise ValueError("AttributeAccuracy.update: logits and targets must both be (N, c_dim), got "
                             f"{tuple(logits.shape)} and {tuple(targets.shape)}")
        multi = self.multi_label
        if multi is None:  # one-hot rows (exactly one 1) mean a single-label task
            multi = not bool(((targets == 0) | (targets == 1)).all() and (targets.sum(1) == 1).all())
            self.multi_label = multi
        targets = targets.to(logits.device)
        if multi:
            hits = ((logits > 0) == (targets > 0.5)).to(torch.int64)
            per = hits.sum(0).cpu()
            self.per_attribute_correct = per if self.per_attribute_correct is None else self.per_attribute_correct + per
            self.correct += int(hits.sum())
            self.total += hits.numel()
        else:
            self.correct += int((logits.argmax(1) == targets.argmax(1)).sum())
            self.total += logits.shape[0]
        self.samples += logits.shape[0]
        return self

    def compute(self) -> float:
        if self.total == 0:
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
    """Accuracy of ``classifier(images)`` against ``targets`` ((N, c_dim) 0/1 or one-hot)."""
    return AttributeAccuracy(multi_label).update(classifier(images), targets).compute()
