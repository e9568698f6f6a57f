"""The adversarial and cycle losses written as the reference implementations write them, in plain
PyTorch, with ``ganengine.functional``'s signatures: what a model built with ``fused=False``
computes (``GANModel.losses``), so that the benchmarks' eager baseline runs the code a user
without ganengine runs, not ganengine's torch-backend compositions (which mirror the kernels'
structure and cost several times more host time per call).

The CycleGAN reference's GANLoss: vanilla = BCE-with-logits and lsgan = MSE against the label
expanded to the prediction's shape, wgangp = -mean if real else +mean; hinge as the SAGAN / BigGAN
references. The gradient penalty is ganengine's own (its random draws and double backward are the
op's)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import ganengine.functional as GF

gradient_penalty = GF.gradient_penalty


def gan_loss(logits, target_is_real: bool, mode: str = "lsgan", for_discriminator: bool = True, *,
             real_label: float = 1.0, fake_label: float = 0.0) -> torch.Tensor:
    if isinstance(logits, (list, tuple)):  # (the sum of each map's loss, as GF.gan_loss's lists)
        return sum(gan_loss(x, target_is_real, mode, for_discriminator, real_label=real_label,
                            fake_label=fake_label) for x in logits)
    if mode in ("vanilla", "lsgan"):
        label = real_label if target_is_real else fake_label
        target = torch.tensor(label, dtype=logits.dtype, device=logits.device).expand_as(logits)
        if mode == "vanilla":
            return F.binary_cross_entropy_with_logits(logits, target)
        return F.mse_loss(logits, target)
    if mode == "hinge" and for_discriminator:
        return F.relu(1.0 - logits).mean() if target_is_real else F.relu(1.0 + logits).mean()
    if mode in ("wgangp", "hinge"):
        return -logits.mean() if target_is_real else logits.mean()
    raise ValueError(f"mode must be one of ('vanilla', 'lsgan', 'wgangp', 'hinge'), got {mode!r}")


def discriminator_loss(real_logits, fake_logits, mode: str = "lsgan", *, real_label: float = 1.0,
                       fake_label: float = 0.0) -> torch.Tensor:
    return 0.5 * (gan_loss(real_logits, True, mode, real_label=real_label, fake_label=fake_label)
                  + gan_loss(fake_logits, False, mode, real_label=real_label, fake_label=fake_label))


def cycle_loss(real_a, rec_a, real_b, rec_b, idt_a=None, idt_b=None, lambda_a: float = 10.0,
               lambda_b: float = 10.0, lambda_identity: float = 0.5):
    """(total, terms) as GF.cycle_loss: the reference's criterionCycle / criterionIdt (L1Loss)."""
    terms = {"cycle_a": F.l1_loss(rec_a, real_a) * lambda_a, "cycle_b": F.l1_loss(rec_b, real_b) * lambda_b}
    if idt_a is not None:
        terms["idt_a"] = F.l1_loss(idt_a, real_b) * lambda_b * lambda_identity
    if idt_b is not None:
        terms["idt_b"] = F.l1_loss(idt_b, real_a) * lambda_a * lambda_identity
    return sum(terms.values()), terms


def cycle_synthesized_loss(real_a, rec_a, real_b, rec_b, fake_a, fake_b, idt_a=None, idt_b=None,
                           lambda_a: float = 10.0, lambda_b: float = 10.0, lambda_identity: float = 0.5,
                           lambda_cs: float = 30.0):
    """(total, terms) as GF.cycle_synthesized_loss: cycle_loss's terms and the reference CS-GAN's
    cycle-synthesized ones, L1(fake, rec.detach()) * lambda_cs."""
    _, terms = cycle_loss(real_a, rec_a, real_b, rec_b, idt_a, idt_b, lambda_a, lambda_b, lambda_identity)
    terms["cs_a"] = F.l1_loss(fake_a, rec_a.detach()) * lambda_cs
    terms["cs_b"] = F.l1_loss(fake_b, rec_b.detach()) * lambda_cs
    return sum(terms.values()), terms
