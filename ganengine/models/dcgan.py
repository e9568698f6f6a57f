"""DCGAN (Radford et al. 2016) as pytorch/examples ``dcgan/main.py`` trains it.

One step, in the reference's order: D on a real batch (BCE against 1) and on G(z) detached (BCE
against 0), one D step on the sum; then G through D on the same fakes (BCE against 1), one G step.
Adam(lr 2e-4, betas (beta1 0.5, 0.999)) for both. D ends in a sigmoid and the losses are BCELoss
on its probabilities, in fp32 (as the reference; autocast refuses BCE on probabilities).

Deviations that change no number: the two D losses are back-propagated as one sum (the reference
calls backward twice; the gradients are the same two-term sums), and D's parameters are frozen
during G's backward (the reference computes D gradients there and zeroes them before D's next
step).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ganengine.models.base import DEFAULT_CONTEXT, StepContext, at_least_fp32, set_requires_grad
from ganengine.models.networks_dcgan import DCGANDiscriminator, DCGANGenerator
from ganengine.models.synthesis import EMA_OPTIONS, SynthesisGAN


def bce(prob: torch.Tensor, target: float) -> torch.Tensor:
    """nn.BCELoss()(prob, full_like(prob, target)) in fp32 (the reference's loss on sigmoid outputs).

    A NaN probability (diverged weights) makes the CPU kernel raise ("all elements of input should
    be between 0 and 1") before the training engine's NaN stop can see a loss: the loss is NaN
    then (still on prob's graph), and the engine stops with the step and the last good checkpoint.
    On CUDA the kernel's device assert fires instead, as in the references (docs/training.md)."""
    with torch.autocast(prob.device.type, enabled=False):
        prob = at_least_fp32(prob)
        try:
            return F.binary_cross_entropy(prob, torch.full_like(prob, target))
        except RuntimeError as exc:
            if "between 0 and 1" not in str(exc) or not bool(prob.isnan().any()):
                raise  # (a probability outside [0, 1]: a D without its sigmoid, said as the kernel says it)
            return (prob * float("nan")).mean()


class DCGAN(SynthesisGAN):
    """Options: the reference flags ``nz, ngf, ndf, lr, beta1`` (``nc``, the image channels, is
    set by the reference from its dataset: 3 for image folders, 1 for MNIST)."""

    MODEL_NAME = "dcgan"
    LATENT_OPTION = "nz"
    DEFAULTS = dict(nz=100, ngf=64, ndf=64, nc=3, lr=0.0002, beta1=0.5, fused=True, fused_optimizer=True,
                    **EMA_OPTIONS)
    IMAGE_SIZE = 64  # the reference networks' only size (--imageSize 64)

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        self.G = DCGANGenerator(o["nz"], o["ngf"], o["nc"], fused=o["fused"])
        self.D = DCGANDiscriminator(o["ndf"], o["nc"], fused=o["fused"])
        self.setup_ema()

    def make_optimizers(self):
        o = self.options
        return {"D": self._adam(self.D.parameters(), o["lr"], o["beta1"]),
                "G": self._adam(self.G.parameters(), o["lr"], o["beta1"])}

    def generator_inputs(self, z, labels):
        return (z.view(z.shape[0], -1, 1, 1),)

    def train_step(self, batch: dict, optimizers: dict, ctx: StepContext = DEFAULT_CONTEXT) -> dict:
        real = self._real_images(batch, self.options["nc"], self.IMAGE_SIZE)
        opt_D, opt_G = optimizers["D"], optimizers["G"]
        self.num_steps += 1

        # (1) D: maximise log D(x) + log(1 - D(G(z)))
        ctx.zero_grad(opt_D)
        with ctx.autocast():
            out_real = self.D(real)
            noise = self.sample_z(real.shape[0]).view(real.shape[0], -1, 1, 1)
            fake = self.G(noise)
            out_fake = self.D(fake.detach())
        err_real, err_fake = bce(out_real, 1.0), bce(out_fake, 0.0)
        ctx.backward(err_real + err_fake, "D")
        ctx.step(opt_D, "D")

        # (2) G: maximise log D(G(z)) on the same fakes
        set_requires_grad(self.D, False)
        ctx.zero_grad(opt_G)
        with ctx.autocast():
            out_g = self.D(fake)
        err_g = bce(out_g, 1.0)
        ctx.backward(err_g, "G")
        ctx.step(opt_G, "G")
        set_requires_grad(self.D, True)
        self.after_generator_step()
        return self._detached({"D_loss": err_real + err_fake, "G_loss": err_g, "D_x": out_real.float().mean(),
                               "D_G_z1": out_fake.float().mean(), "D_G_z2": out_g.float().mean()})
