"""Conditional GAN (Mirza & Osindero 2014) as eriklindernoren/PyTorch-GAN's ``implementations/cgan``
trains it: label-conditioned MLP generator and discriminator (``networks_pytorch_gan``), least-
squares (MSE) adversarial loss, Adam(lr 2e-4, betas (0.5, 0.999)).

One step, in the reference's order: z ~ N(0, 1) and random labels; G step on MSE(D(G(z, y), y), 1);
then D step on (MSE(D(x, labels), 1) + MSE(D(G(z, y) detached, y), 0)) / 2. D's dropout draws
from the global generator in that order (G-step pass, real pass, fake pass), as in the reference.
D's parameters are frozen during G's backward (the reference's D gradients from it are zeroed
before D's step: no number changes).
"""
from __future__ import annotations

from ganengine.models.base import DEFAULT_CONTEXT, StepContext, at_least_fp32
from ganengine.models.networks_pytorch_gan import CGANDiscriminator, CGANGenerator
from ganengine.models.synthesis import EMA_OPTIONS, SynthesisGAN


class CGAN(SynthesisGAN):
    """Options: the reference flags ``latent_dim, n_classes, img_size, channels, lr, b1, b2``."""

    MODEL_NAME = "cgan"
    CONDITIONAL = True
    DEFAULTS = dict(latent_dim=100, n_classes=10, img_size=32, channels=1, lr=0.0002, b1=0.5, b2=0.999,
                    fused=True, fused_optimizer=True, **EMA_OPTIONS)

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        self.G = CGANGenerator(o["latent_dim"], o["n_classes"], o["img_size"], o["channels"], fused=o["fused"])
        self.D = CGANDiscriminator(o["n_classes"], o["img_size"], o["channels"], fused=o["fused"])
        self.setup_ema()

    def make_optimizers(self):
        o = self.options
        return {"G": self._adam(self.G.parameters(), o["lr"], o["b1"], o["b2"]),
                "D": self._adam(self.D.parameters(), o["lr"], o["b1"], o["b2"])}

    def generator_inputs(self, z, labels):
        return z, labels

    def train_step(self, batch: dict, optimizers: dict, ctx: StepContext = DEFAULT_CONTEXT) -> dict:
        def g_loss(validity, gen_labels):
            return self.losses.gan_loss(at_least_fp32(validity), True, "lsgan"), {}

        def d_loss(validity_real, labels, validity_fake, gen_labels):
            return self.losses.discriminator_loss(at_least_fp32(validity_real), at_least_fp32(validity_fake), "lsgan"), {}

        return self.conditional_step(batch, optimizers, ctx, True, g_loss, d_loss)
