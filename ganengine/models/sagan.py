"""SAGAN (Zhang et al. 2019), as heykeetae/Self-Attention-GAN's trainer.py trains it: per step,
D on real images and on G(z) (one optimiser step), then, with ``adv_loss='wgan-gp'``, a separate
gradient-penalty step on D, then G on fresh noise. Hinge loss by default (the issue's and the
paper's choice; the reference script's default is wgan-gp, available as ``adv_loss``), spectral
norm in G and D (the reference's own SpectralNorm), TTUR learning rates g_lr 1e-4 / d_lr 4e-4,
Adam betas (0.0, 0.9). Unconditional: batch labels are ignored.

``latent_optimisation=True`` adds LOGAN's natural-gradient step on z before the D and G updates
(``synthesis_tools.latent_optimise``; differentiable in the G step).
"""
from __future__ import annotations

import torch

import ganengine.functional as GF
from ganengine.models.base import (DEFAULT_CONTEXT, GANModel, StepContext, at_least_fp32, average_gradients,
                                   set_requires_grad)
from ganengine.models.networks_sagan import SAGANDiscriminator, SAGANGenerator
from ganengine.models.synthesis_tools import latent_optimise, unwrap

LATENT_OPTIONS = dict(latent_optimisation=False, lo_rate=0.5, lo_alpha=0.9, lo_beta=5.0, lo_steps=1)


def check_latent_options(owner: str, o: dict) -> None:
    if not 0.0 <= float(o["lo_rate"]) <= 1.0:
        raise ValueError(f"{owner}: lo_rate must be in [0, 1], got {o['lo_rate']!r}")
    if not isinstance(o["lo_steps"], int) or o["lo_steps"] < 1:
        raise ValueError(f"{owner}: lo_steps must be an int >= 1, got {o['lo_steps']!r}")
    if float(o["lo_beta"]) <= 0:
        raise ValueError(f"{owner}: lo_beta must be > 0, got {o['lo_beta']!r}")


class SAGAN(GANModel):
    """Options are the reference's parameter.py flags (imsize, z_dim, g_conv_dim, d_conv_dim,
    adv_loss, lambda_gp, g_lr, d_lr, beta1, beta2) with its defaults, except adv_loss='hinge'."""

    MODEL_NAME = "sagan"
    DEFAULTS = dict(imsize=64, z_dim=128, g_conv_dim=64, d_conv_dim=64, adv_loss="hinge", lambda_gp=10.0,
                    g_lr=0.0001, d_lr=0.0004, beta1=0.0, beta2=0.9, fused=True, fused_optimizer=True,
                    **LATENT_OPTIONS)
    network_names = ["G", "D"]
    generator_name = "G"

    @property
    def double_backward(self) -> str:
        if self.options["adv_loss"] == "wgan-gp":
            return "with --adv_loss wgan-gp takes a gradient penalty"
        return "with --latent_optimisation differentiates through LOGAN's latent step" if \
            self.options["latent_optimisation"] else ""

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        self._choice("adv_loss", ("hinge", "wgan-gp"))
        check_latent_options("SAGAN", o)
        self.G = SAGANGenerator(o["imsize"], o["imsize"], o["z_dim"], o["g_conv_dim"], fused=o["fused"])
        self.D = SAGANDiscriminator(o["imsize"], o["imsize"], o["d_conv_dim"], fused=o["fused"])
        # training never looks at the attention maps: skip building them (the nets still return
        # (out, p1, p2) with None maps; set True for the reference's maps)
        self.G.return_attention = self.D.return_attention = False

    def make_optimizers(self):
        o = self.options
        g = [p for p in self.G.parameters() if p.requires_grad]  # the reference filters out u and v
        d = [p for p in self.D.parameters() if p.requires_grad]
        return {"G": self._adam(g, o["g_lr"], o["beta1"], o["beta2"]),
                "D": self._adam(d, o["d_lr"], o["beta1"], o["beta2"])}

    def make_schedulers(self, optimizers: dict, n_epochs: int, n_epochs_decay: int, steps_per_epoch: int,
                        max_steps: int | None = None) -> dict:
        """Constant learning rates, as the reference (its ``lr_decay`` flag is never used), for
        any ``--total_step``; with ``n_epochs_decay`` > 0 a linear decay to zero over those epochs
        (the pix2pix rule, held at 0 after them), as an extension."""
        if n_epochs_decay <= 0:
            return {}
        return super().make_schedulers(optimizers, n_epochs, n_epochs_decay, steps_per_epoch, max_steps)

    def _z(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.options["z_dim"], device=self.device, dtype=self.latent_dtype)

    def _optimise(self, z, differentiable: bool):
        o = self.options
        if not o["latent_optimisation"]:
            return z
        return latent_optimise(z, lambda zz: self.D(self.G(zz)[0])[0], o["lo_rate"], o["lo_alpha"], o["lo_beta"],
                               o["lo_steps"], differentiable)

    def train_step(self, batch: dict, optimizers: dict, ctx: StepContext = DEFAULT_CONTEXT) -> dict:
        o = self.options
        real = self._to_device(batch["image"])
        n = real.shape[0]
        opt_G, opt_D = optimizers["G"], optimizers["D"]
        self.G.train()
        self.D.train()

        # ---- D (G frozen: the reference's G gradients from this pass are zeroed before G's step)
        set_requires_grad(self.G, False)
        with ctx.autocast():
            z = self._optimise(self._z(n), differentiable=False)
            d_out_real = self.D(real)[0]
            with torch.no_grad():
                fake = self.G(z)[0]
            d_out_fake = self.D(fake)[0]
            if o["adv_loss"] == "hinge":
                d_loss_real = self.losses.gan_loss(d_out_real, True, "hinge")
                d_loss_fake = self.losses.gan_loss(d_out_fake, False, "hinge")
            else:
                d_loss_real = self.losses.gan_loss(d_out_real, True, "wgangp")
                d_loss_fake = self.losses.gan_loss(d_out_fake, False, "wgangp")
        ctx.zero_grad(opt_D)
        ctx.backward(d_loss_real + d_loss_fake, "D")
        ctx.step(opt_D, "D")
        losses = {"D/loss_real": d_loss_real, "D/loss_fake": d_loss_fake}
        if o["adv_loss"] == "wgan-gp":
            # the penalty's own step, as the reference: its backward reaches only the parameters the
            # input gradient depends on (not the biases), which a DDP wrapper would wait for; so it
            # runs on the bare D and its gradients are averaged over the processes here
            d_net = unwrap(self.D)
            with torch.autocast(real.device.type, enabled=False):  # squared gradient norms: fp32
                d_loss_gp = GF.gradient_penalty(d_net, at_least_fp32(real), at_least_fp32(fake), weight=1.0)
            ctx.zero_grad(opt_D)
            ctx.backward(o["lambda_gp"] * d_loss_gp, "D")
            average_gradients(d_net, self.D)
            ctx.step(opt_D, "D")
            losses["D/loss_gp"] = d_loss_gp

        # ---- G on fresh noise (D frozen)
        set_requires_grad(self.G, True)
        set_requires_grad(self.D, False)
        with ctx.autocast():
            z = self._optimise(self._z(n), differentiable=True)
            g_loss_fake = self.losses.gan_loss(self.D(self.G(z)[0])[0], True, "hinge", for_discriminator=False)
        ctx.zero_grad(opt_G)
        ctx.backward(g_loss_fake, "G")
        ctx.step(opt_G, "G")
        set_requires_grad(self.D, True)
        losses["G/loss_fake"] = g_loss_fake
        return self._detached(losses)

    def latent_dim(self) -> int:
        return int(self.options["z_dim"])

    @torch.no_grad()
    def generate(self, n: int | None = None, z: torch.Tensor | None = None, labels=None) -> torch.Tensor:
        """Images G(z) in [-1, 1] (training mode, as the reference's sample step)."""
        if z is None:
            z = self._z(int(n))
        return self.G(z.to(self.device))[0]

    @torch.no_grad()
    def translate(self, batch: dict) -> torch.Tensor:
        return self.generate(z=batch["z"]) if "z" in batch else self.generate(batch["image"].shape[0])
