"""CycleGAN (Zhu et al. 2017), as the reference's cycle_gan_model.py: two ResNet generators
(G_A: A->B, G_B: B->A), two PatchGAN discriminators (D_A judges B images, D_B judges A images),
LSGAN loss, cycle (lambda_A, lambda_B) and identity (lambda_identity) L1 terms, and a 50-image
history pool per discriminator."""
from __future__ import annotations

import itertools

import torch

from ganengine.models.base import (DEFAULT_CONTEXT, GANModel, StepContext, check_lr_policy, per_image_in_training_mode,
                                   set_requires_grad)
from ganengine.models.image_pool import ImagePool
from ganengine.models.networks_cyclegan import define_D, define_G
from ganengine.models.pix2pix import GAN_MODES


class CycleGAN(GANModel):
    """Options are the reference flags with CycleGAN's defaults (``--netG resnet_9blocks --norm
    instance --gan_mode lsgan --pool_size 50``, no dropout). ``attention_resolution`` adds a
    SAGAN block to both generators at that feature-map size for ``crop_size`` images."""

    MODEL_NAME = "cyclegan"
    DEFAULTS = dict(input_nc=3, output_nc=3, ngf=64, ndf=64, netG="resnet_9blocks", netD="basic", n_layers_D=3,
                    norm="instance", init_type="normal", init_gain=0.02, use_dropout=False, gan_mode="lsgan",
                    lambda_A=10.0, lambda_B=10.0, lambda_identity=0.5, pool_size=50, lr=0.0002, beta1=0.5,
                    lr_policy="linear", lr_decay_iters=50, direction="AtoB", epoch_count=1, crop_size=256,
                    eval=False, fused=True, fused_optimizer=True, attention_resolution=None)
    network_names = ["netG_A", "netG_B", "netD_A", "netD_B"]
    generator_name = "netG_A"

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        self._choice("gan_mode", GAN_MODES)
        self._choice("direction", ("AtoB", "BtoA"))
        check_lr_policy(type(self).__name__, o)
        if o["lambda_identity"] > 0 and o["input_nc"] != o["output_nc"]:
            raise ValueError(f"CycleGAN: the identity loss (lambda_identity={o['lambda_identity']}) needs "
                             f"input_nc == output_nc, got {o['input_nc']} and {o['output_nc']}; set lambda_identity=0")
        scale = self._attention_scale(o["crop_size"])
        g = dict(norm=o["norm"], use_dropout=o["use_dropout"], init_type=o["init_type"], init_gain=o["init_gain"],
                 fused=o["fused"], attention_scale=scale)
        d = dict(n_layers_D=o["n_layers_D"], norm=o["norm"], init_type=o["init_type"], init_gain=o["init_gain"],
                 fused=o["fused"])
        # reference construction order: G_A, G_B, D_A, D_B
        self.netG_A = define_G(o["input_nc"], o["output_nc"], o["ngf"], o["netG"], **g)
        self.netG_B = define_G(o["output_nc"], o["input_nc"], o["ngf"], o["netG"], **g)
        self.netD_A = define_D(o["output_nc"], o["ndf"], o["netD"], **d)
        self.netD_B = define_D(o["input_nc"], o["ndf"], o["netD"], **d)
        # two independent random streams (one seed for both made the pools' decisions identical)
        self.fake_A_pool = ImagePool(o["pool_size"], stream=0)
        self.fake_B_pool = ImagePool(o["pool_size"], stream=1)

    def _inputs(self, batch):
        a, b = ("A", "B") if self.options["direction"] == "AtoB" else ("B", "A")
        return self._to_device(batch[a]), (self._to_device(batch[b]) if b in batch else None)

    def make_optimizers(self):
        o = self.options
        return {"G": self._adam(itertools.chain(self.netG_A.parameters(), self.netG_B.parameters()), o["lr"], o["beta1"]),
                "D": self._adam(itertools.chain(self.netD_A.parameters(), self.netD_B.parameters()), o["lr"], o["beta1"])}

    def train_step(self, batch: dict, optimizers: dict, ctx: StepContext = DEFAULT_CONTEXT) -> dict:
        o = self.options
        mode, lambda_idt = o["gan_mode"], o["lambda_identity"]
        real_A, real_B = self._inputs(batch)
        opt_G, opt_D = optimizers["G"], optimizers["D"]
        with ctx.autocast():
            fake_B = self.netG_A(real_A)
            rec_A = self.netG_B(fake_B)
            fake_A = self.netG_B(real_B)
            rec_B = self.netG_A(fake_A)

        # generators, with both discriminators frozen
        set_requires_grad([self.netD_A, self.netD_B], False)
        ctx.zero_grad(opt_G)
        with ctx.autocast():
            idt_A = idt_B = None
            if lambda_idt > 0:
                idt_A = self.netG_A(real_B)
                idt_B = self.netG_B(real_A)
            loss_G_A = self.losses.gan_loss(self.netD_A(fake_B), True, mode, for_discriminator=False)
            loss_G_B = self.losses.gan_loss(self.netD_B(fake_A), True, mode, for_discriminator=False)
            loss_l1, terms = self._l1_losses(real_A, rec_A, real_B, rec_B, fake_A, fake_B, idt_A, idt_B)
            loss_G = loss_G_A + loss_G_B + loss_l1
        ctx.backward(loss_G, "G")
        ctx.step(opt_G, "G")

        # discriminators on real images and on fakes drawn from the history pools
        set_requires_grad([self.netD_A, self.netD_B], True)
        ctx.zero_grad(opt_D)
        fake_B_hist = self.fake_B_pool.query(fake_B)
        with ctx.autocast():
            loss_D_A = self.losses.discriminator_loss(self.netD_A(real_B), self.netD_A(fake_B_hist.detach()), mode)
        ctx.backward(loss_D_A, "D")
        fake_A_hist = self.fake_A_pool.query(fake_A)
        with ctx.autocast():
            loss_D_B = self.losses.discriminator_loss(self.netD_B(real_A), self.netD_B(fake_A_hist.detach()), mode)
        ctx.backward(loss_D_B, "D")
        ctx.step(opt_D, "D")

        out = dict(D_A=loss_D_A, G_A=loss_G_A, cycle_A=terms["cycle_a"], D_B=loss_D_B, G_B=loss_G_B,
                   cycle_B=terms["cycle_b"])
        if lambda_idt > 0:
            out.update(idt_A=terms["idt_a"], idt_B=terms["idt_b"])
        out.update({name: terms[key] for key, name in self.EXTRA_LOSS_TERMS.items()})
        return self._detached(out)

    EXTRA_LOSS_TERMS: dict = {}  # subclasses' extra L1 terms: key in the terms dict -> logged name

    def _l1_losses(self, real_A, rec_A, real_B, rec_B, fake_A, fake_B, idt_A, idt_B):
        """(total, terms) of the L1 terms, one fused pass (CSGAN adds its own terms here)."""
        o = self.options
        return self.losses.cycle_loss(real_A, rec_A, real_B, rec_B, idt_A, idt_B, lambda_a=o["lambda_A"], lambda_b=o["lambda_B"],
                             lambda_identity=o["lambda_identity"])

    @torch.no_grad()
    def translate(self, batch: dict, reverse: bool = False) -> torch.Tensor:
        """G_A(real_A); ``reverse``: G_B(real_B), the B -> A direction (``ganengine translate
        --reverse``). In training mode unless ``eval``, as the reference's test."""
        # (with direction BtoA, "A" is the B folder: the reference swaps the inputs, as _inputs)
        a, b = ("A", "B") if self.options["direction"] == "AtoB" else ("B", "A")
        net, x = (self.netG_B, self._to_device(batch[b])) if reverse else (self.netG_A, self._to_device(batch[a]))
        was_training = net.training
        net.train(not self.options["eval"])
        try:
            return per_image_in_training_mode(net, x)
        finally:
            net.train(was_training)

    def extra_state(self) -> dict:
        return {"fake_A_pool": self.fake_A_pool.state_dict(), "fake_B_pool": self.fake_B_pool.state_dict()}

    def reseed(self, seed: int) -> None:
        """The pools' draws per process (DDP): each process pools its own images."""
        for pool in (self.fake_A_pool, self.fake_B_pool):
            pool.reseed(seed)

    def load_extra_state(self, state: dict) -> None:
        device = next(self.parameters()).device
        self.fake_A_pool.load_state_dict(state["fake_A_pool"], device)
        self.fake_B_pool.load_state_dict(state["fake_B_pool"], device)
