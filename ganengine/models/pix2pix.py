"""pix2pix (Isola et al. 2017), as the reference's pix2pix_model.py: a U-Net generator, a PatchGAN
discriminator on the (input, output) pair, vanilla GAN loss + lambda_L1 * L1."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ganengine.models.base import (DEFAULT_CONTEXT, GANModel, StepContext, check_lr_policy, per_image_in_training_mode,
                                   set_requires_grad)
from ganengine.models.networks_cyclegan import define_D, define_G

GAN_MODES = ("vanilla", "lsgan", "wgangp", "hinge")


class Pix2Pix(GANModel):
    """Options are the reference flags with pix2pix's defaults (``--netG unet_256 --norm batch
    --gan_mode vanilla --lambda_L1 100``, dropout on). ``eval=False`` (the reference's ``--eval``)
    keeps ``translate`` in training mode, as the reference's test script does: dropout active,
    batch statistics. ``attention_resolution`` adds a SAGAN block to the generator at that
    feature-map size for ``crop_size`` images."""

    MODEL_NAME = "pix2pix"
    DEFAULTS = dict(input_nc=3, output_nc=3, ngf=64, ndf=64, netG="unet_256", netD="basic", n_layers_D=3,
                    norm="batch", init_type="normal", init_gain=0.02, use_dropout=True, gan_mode="vanilla",
                    lambda_L1=100.0, lr=0.0002, beta1=0.5, lr_policy="linear", lr_decay_iters=50, direction="AtoB",
                    epoch_count=1, crop_size=256, eval=False, fused=True, fused_optimizer=True,
                    attention_resolution=None)
    network_names = ["netG", "netD"]
    generator_name = "netG"

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        self._choice("gan_mode", GAN_MODES)
        self._choice("direction", ("AtoB", "BtoA"))
        check_lr_policy("Pix2Pix", o)
        # same construction order as the reference: G, then D (same seed -> same weights)
        self.netG = define_G(o["input_nc"], o["output_nc"], o["ngf"], o["netG"], o["norm"], o["use_dropout"],
                             o["init_type"], o["init_gain"], o["fused"], self._attention_scale(o["crop_size"]))
        self.netD = define_D(o["input_nc"] + o["output_nc"], o["ndf"], o["netD"], o["n_layers_D"], o["norm"],
                             o["init_type"], o["init_gain"], o["fused"])

    def _inputs(self, batch):
        a, b = ("A", "B") if self.options["direction"] == "AtoB" else ("B", "A")
        return self._to_device(batch[a]), (self._to_device(batch[b]) if b in batch else None)

    def make_optimizers(self):
        o = self.options
        return {"G": self._adam(self.netG.parameters(), o["lr"], o["beta1"]),
                "D": self._adam(self.netD.parameters(), o["lr"], o["beta1"])}

    def train_step(self, batch: dict, optimizers: dict, ctx: StepContext = DEFAULT_CONTEXT) -> dict:
        o = self.options
        mode = o["gan_mode"]
        real_A, real_B = self._inputs(batch)
        opt_G, opt_D = optimizers["G"], optimizers["D"]
        with ctx.autocast():
            fake_B = self.netG(real_A)

        # D: fake pairs (detached), then real pairs
        set_requires_grad(self.netD, True)
        ctx.zero_grad(opt_D)
        with ctx.autocast():
            loss_D_fake = self.losses.gan_loss(self.netD(torch.cat((real_A, fake_B), 1).detach()), False, mode)
            loss_D_real = self.losses.gan_loss(self.netD(torch.cat((real_A, real_B), 1)), True, mode)
            loss_D = (loss_D_fake + loss_D_real) * 0.5
        ctx.backward(loss_D, "D")
        ctx.step(opt_D, "D")

        # G: fool the updated D, and stay close to the target in L1
        set_requires_grad(self.netD, False)
        ctx.zero_grad(opt_G)
        with ctx.autocast():
            loss_G_GAN = self.losses.gan_loss(self.netD(torch.cat((real_A, fake_B), 1)), True, mode, for_discriminator=False)
            loss_G_L1 = F.l1_loss(fake_B, real_B) * o["lambda_L1"]
            loss_G = loss_G_GAN + loss_G_L1
        ctx.backward(loss_G, "G")
        ctx.step(opt_G, "G")
        set_requires_grad(self.netD, True)
        return self._detached(dict(G_GAN=loss_G_GAN, G_L1=loss_G_L1, D_real=loss_D_real, D_fake=loss_D_fake))

    @torch.no_grad()
    def translate(self, batch: dict) -> torch.Tensor:
        real_A, _ = self._inputs(batch)
        was_training = self.netG.training
        self.netG.train(not self.options["eval"])
        try:
            return per_image_in_training_mode(self.netG, real_A)
        finally:
            self.netG.train(was_training)
