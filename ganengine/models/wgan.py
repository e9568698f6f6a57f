"""WGAN (Arjovsky et al. 2017) and WGAN-GP (Gulrajani et al. 2017) as eriklindernoren/PyTorch-GAN's
``implementations/wgan/wgan.py`` and ``wgan_gp/wgan_gp.py`` train them (the same MLP networks,
``networks_pytorch_gan.WGANGPGenerator`` / ``WGANGPDiscriminator``).

Every step trains the critic: WGAN on ``-mean D(x) + mean D(G(z))`` with RMSprop (lr 5e-5) and
then clips every critic weight to ``[-clip_value, clip_value]``; WGAN-GP on the same plus
``lambda_gp`` times the gradient penalty at random interpolates of the real and fake batch, with
Adam (lr 2e-4, betas (b1 0.5, b2 0.999)). Every ``n_critic``-th step (steps 0, n_critic, ...) also
trains G on ``-mean D(G(z))`` with the same z (the reference runs G again, so its batch-norm
running statistics see the batch twice).

Deviations that change no number: the critic's pass over G(z) runs without building G's graph
(the reference's WGAN-GP back-propagates the critic loss into G too and zeroes those gradients
before G's step), except with ``fused`` on a generator step, where G runs once with its graph
and the G step reuses that output (G's weights have not changed since: the reference's second
G(z) is the same tensor) and the second pass's running-statistics update is applied by hand
(``_BatchNormRepeat``: the same to rounding; one G forward less, a sixth of the step's
multiply-adds); the critic's parameters are frozen during G's backward; the clipping is one
multi-tensor clamp. The reference's ``i`` restarts at every epoch; ganengine counts steps over
the whole run (``num_steps``, checkpointed), which is the same within the first epoch.
"""
from __future__ import annotations

import torch
from torch import nn

import ganengine.functional as GF
from ganengine.models._common import check_finite_nonnegative
from ganengine.models.base import DEFAULT_CONTEXT, StepContext, at_least_fp32, set_requires_grad
from ganengine.models.fused_rmsprop import FusedRMSprop
from ganengine.models.networks_pytorch_gan import WGANGPDiscriminator, WGANGPGenerator
from ganengine.models.synthesis import EMA_OPTIONS, SynthesisGAN


class _BatchNormRepeat:
    """The running-statistics update of a second training-mode pass of ``net`` on the same batch,
    without the pass. Take it (``_BatchNormRepeat(net)``) before the first pass, call
    ``update_again()`` after it: with momentum m, the first pass made ``r1 = (1 - m) r0 + m s``
    from the batch statistic s, so the second one's ``(1 - m) r1 + m s`` is ``r1 + (1 - m) (r1 -
    r0)`` (the same to rounding: a few units in the last place of r); ``num_batches_tracked``
    counts the pass."""

    @staticmethod
    def _norms(net: nn.Module) -> list:
        return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    @classmethod
    def applies(cls, net: nn.Module) -> bool:
        """Every norm in training mode with a fixed momentum (a cumulative average, momentum
        None, or a frozen norm keeps the second pass)."""
        return all(m.training and m.track_running_stats and m.momentum is not None for m in cls._norms(net))

    def __init__(self, net: nn.Module):
        self.norms = self._norms(net)
        self.before = [(m.running_mean.clone(), m.running_var.clone()) for m in self.norms]

    @torch.no_grad()
    def update_again(self) -> None:
        for m, (mean0, var0) in zip(self.norms, self.before):
            for r, r0 in ((m.running_mean, mean0), (m.running_var, var0)):
                r.add_(r - r0, alpha=1.0 - m.momentum)
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.add_(1)


class _Wasserstein(SynthesisGAN):
    """The critic / generator step both scripts share; subclasses give the critic loss, the
    optimisers and what follows a critic step."""

    network_names = ["G", "D"]

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        if not isinstance(o["n_critic"], int) or o["n_critic"] < 1:
            raise ValueError(f"{type(self).__name__}: n_critic must be an int >= 1, got {o['n_critic']!r}")
        self._check_options()
        self.G = WGANGPGenerator(o["latent_dim"], o["img_size"], o["channels"], fused=o["fused"])
        self.D = WGANGPDiscriminator(o["img_size"], o["channels"], fused=o["fused"])
        self.setup_ema()

    def _check_options(self):
        raise NotImplementedError

    def generator_inputs(self, z, labels):
        return (z,)

    def _wasserstein(self, real, fake):
        """-mean D(x) + mean D(G(z)), the scores in fp32. The critic has no batch-dependent layer
        (no norm, no dropout), so with ``fused`` it scores both batches in one pass (the same
        numbers up to rounding, half the calls) when the batch size is a power of two. Why only
        then: the loss does not depend on the critic's output bias, whose gradient the reference's
        two passes make exactly 0 (the two halves' sums cancel); one pass sums N terms -1/N and N
        terms +1/N together, which for other N leaves a rounding residue (~2^-26) of the same sign
        every step, and Adam, which normalises it, moves the bias by ~lr per step: the scores and
        the logged losses drift without bound. With N a power of two every partial sum is exact."""
        n = real.shape[0]
        if self.options["fused"] and n == fake.shape[0] and n & (n - 1) == 0:
            scores = at_least_fp32(self.D(torch.cat([real, fake.to(real.dtype)])))
            real_scores, fake_scores = scores[:real.shape[0]], scores[real.shape[0]:]
        else:
            real_scores, fake_scores = at_least_fp32(self.D(real)), at_least_fp32(self.D(fake))
        return self.losses.gan_loss(real_scores, True, "wgangp") + self.losses.gan_loss(fake_scores, False, "wgangp")

    def _critic_loss(self, real, fake) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def _after_critic_step(self):
        pass

    def train_step(self, batch: dict, optimizers: dict, ctx: StepContext = DEFAULT_CONTEXT) -> dict:
        o = self.options
        real = self._real_images(batch, o["channels"], o["img_size"])
        opt_G, opt_D = optimizers["G"], optimizers["D"]
        i = self.num_steps
        self.num_steps += 1

        g_step = i % o["n_critic"] == 0
        # fused, on a generator step: G runs once, with its graph, and the G step reuses that
        # output (G's weights do not change in between, so it is the reference's second G(z));
        # the second pass's batch-norm running-statistics update is then applied by hand
        repeat = g_step and o["fused"] and _BatchNormRepeat.applies(self.G)

        # ---- critic
        ctx.zero_grad(opt_D)
        z = self.sample_z(real.shape[0])
        with ctx.autocast():
            if repeat:
                norms = _BatchNormRepeat(self.G)
                fake_g = self.G(z)
                fake = fake_g.detach()
            else:
                with torch.no_grad():
                    fake = self.G(z)
            d_loss, extra = self._critic_loss(real, fake)
        ctx.backward(d_loss, "D")
        ctx.step(opt_D, "D")
        self._after_critic_step()
        losses = {"D_loss": d_loss, **extra}

        # ---- generator every n_critic steps, on the same z
        if g_step:
            set_requires_grad(self.D, False)
            ctx.zero_grad(opt_G)
            with ctx.autocast():
                g_loss = self.losses.gan_loss(at_least_fp32(self.D(fake_g if repeat else self.G(z))), True, "wgangp")
            ctx.backward(g_loss, "G")
            if repeat:  # (after G's backward: F.batch_norm saves the running statistics for it)
                norms.update_again()
            ctx.step(opt_G, "G")
            set_requires_grad(self.D, True)
            self.after_generator_step()
            losses["G_loss"] = g_loss
        return self._detached(losses)


class WGANGP(_Wasserstein):
    """WGAN-GP. Options: the reference flags ``latent_dim, img_size, channels, lr, b1, b2,
    n_critic`` and ``lambda_gp`` (a constant, 10, in the reference script)."""

    MODEL_NAME = "wgan_gp"
    double_backward = "takes a gradient penalty (lambda_gp)"
    DEFAULTS = dict(latent_dim=100, img_size=28, channels=1, lr=0.0002, b1=0.5, b2=0.999, n_critic=5,
                    lambda_gp=10.0, fused=True, fused_optimizer=True, **EMA_OPTIONS)

    def _check_options(self):
        check_finite_nonnegative(type(self).__name__, "lambda_gp", self.options["lambda_gp"])

    def make_optimizers(self):
        o = self.options
        return {"G": self._adam(self.G.parameters(), o["lr"], o["b1"], o["b2"]),
                "D": self._adam(self.D.parameters(), o["lr"], o["b1"], o["b2"])}

    def _critic_loss(self, real, fake):
        adv = self._wasserstein(real, fake)
        with torch.autocast(real.device.type, enabled=False):  # the squared gradient norms in fp32
            gp = GF.gradient_penalty(self.D, at_least_fp32(real), at_least_fp32(fake), weight=1.0)
        return adv + self.options["lambda_gp"] * gp, {"GP": gp}


class WGAN(_Wasserstein):
    """WGAN with weight clipping. Options: the reference flags ``latent_dim, img_size, channels,
    lr, n_critic, clip_value`` (RMSprop, no momentum, as the reference)."""

    MODEL_NAME = "wgan"
    DEFAULTS = dict(latent_dim=100, img_size=28, channels=1, lr=0.00005, n_critic=5, clip_value=0.01, fused=True,
                    fused_optimizer=True, **EMA_OPTIONS)

    def _check_options(self):
        check_finite_nonnegative(type(self).__name__, "clip_value", self.options["clip_value"])

    def make_optimizers(self):
        # the reference's torch.optim.RMSprop (alpha 0.99, eps 1e-8, no momentum); with
        # fused_optimizer the same update as one fused kernel (models/fused_rmsprop.py)
        lr = self.options["lr"]

        def rmsprop(params):
            params = list(params)
            if self.options["fused_optimizer"] and FusedRMSprop.supported(params):
                return FusedRMSprop(params, lr=lr)
            return torch.optim.RMSprop(params, lr=lr)

        return {"G": rmsprop(self.G.parameters()), "D": rmsprop(self.D.parameters())}

    def _critic_loss(self, real, fake):
        return self._wasserstein(real, fake), {}

    @torch.no_grad()
    def _after_critic_step(self):
        c = float(self.options["clip_value"])
        params = list(self.D.parameters())
        if self.options["fused"]:
            torch._foreach_clamp_min_(params, -c)
            torch._foreach_clamp_max_(params, c)
        else:
            for p in params:  # the reference's loop
                p.data.clamp_(-c, c)
