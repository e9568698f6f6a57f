"""BigGAN and BigGAN-deep (Brock et al. 2019), as ajbrock/BigGAN-PyTorch's train_fns.py trains
them (``GAN_training_function``):

* ``num_D_steps`` discriminator steps, each over ``num_D_accumulations`` chunks of the batch:
  z and y sampled, G(z, G.shared(y)) without gradients, D on ``cat([G_z, x])`` with
  ``cat([y, y_real])`` (one D pass, as the reference without ``split_D``), hinge loss
  ``mean(relu(1 - D_real)) + mean(relu(1 + D_fake))`` divided by the accumulations; ``D_ortho``
  orthogonal regularisation; one optimiser step;
* then ``num_G_accumulations`` generator passes ``-mean(D(G(z, G.shared(y)), y))`` on fresh z and
  y, ``G_ortho`` (the shared embedding exempt), one step; then the EMA of G (``ema``: a copy of G
  whose parameters and buffers follow G's, pegged to G before ``ema_start``).

The batch holds ``num_D_steps * num_D_accumulations`` chunks of real images (the reference's
loader batch is ``batch_size * num_D_steps * num_D_accumulations``); the generator's batch is
``max(G_batch_size, the chunk size)``, as the reference's train.py sizes it. The logged ``G_loss``
is the last pass's loss divided by ``num_G_accumulations``, as the reference's ``train()`` reports it.
``toggle_grads`` freezes the other network per phase.
Options are the reference's train.py flags with its defaults (note ``G_shared`` and ``hier`` are
off there; the paper's recipe is ``--G_shared --hier --dim_z 120 --shared_dim 128 --ema
--use_ema``), plus ``resolution`` and ``n_classes`` (from the data), ``fused``,
``fused_optimizer`` and LOGAN's ``latent_optimisation`` options.
"""
from __future__ import annotations

import torch
from torch import nn

from ganengine.models.base import DEFAULT_CONTEXT, GANModel, StepContext, set_requires_grad
from ganengine.models.networks_biggan import BigGANDiscriminator, BigGANGenerator
from ganengine.models.networks_biggan_deep import BigGANDeepDiscriminator, BigGANDeepGenerator
from ganengine.models.sagan import LATENT_OPTIONS, check_latent_options
from ganengine.models.synthesis_tools import StateEMA, class_indices, latent_optimise, ortho_, unwrap

_ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=False), "inplace_relu": lambda: nn.ReLU(inplace=True),
                "ir": lambda: nn.ReLU(inplace=True)}

BIGGAN_DEFAULTS = dict(
    resolution=128, n_classes=1000, G_param="SN", D_param="SN", G_ch=64, D_ch=64, G_depth=1, D_depth=1, D_wide=True,
    G_shared=False, shared_dim=0, dim_z=128, z_var=1.0, hier=False, mybn=False, G_nl="relu", D_nl="relu",
    G_attn="64", D_attn="64", norm_style="bn", G_init="ortho", D_init="ortho", G_lr=5e-5, D_lr=2e-4, G_B1=0.0,
    D_B1=0.0, G_B2=0.999, D_B2=0.999, adam_eps=1e-8, BN_eps=1e-5, SN_eps=1e-8, num_G_SVs=1, num_D_SVs=1,
    num_G_SV_itrs=1, num_D_SV_itrs=1, G_ortho=0.0, D_ortho=0.0, toggle_grads=True, num_D_steps=2,
    num_D_accumulations=1, num_G_accumulations=1, G_batch_size=0, ema=False, ema_decay=0.9999, use_ema=False,
    ema_start=0, G_eval_mode=False, fused=True, fused_optimizer=True, **LATENT_OPTIONS)


class BigGAN(GANModel):
    MODEL_NAME = "biggan"
    DEFAULTS = dict(BIGGAN_DEFAULTS)
    generator_name = "G"
    _G_CLASS, _D_CLASS = BigGANGenerator, BigGANDiscriminator

    @property
    def double_backward(self) -> str:
        return ("with --latent_optimisation differentiates through LOGAN's latent step"
                if self.options["latent_optimisation"] else "")

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        owner = type(self).__name__
        for name in ("G_nl", "D_nl"):
            self._choice(name, tuple(_ACTIVATIONS))
        for name in ("num_D_steps", "num_D_accumulations", "num_G_accumulations"):
            if not isinstance(o[name], int) or o[name] < (0 if name == "num_D_steps" else 1):
                raise ValueError(f"{owner}: {name} must be an int >= {0 if name == 'num_D_steps' else 1}, "
                                 f"got {o[name]!r}")
        if not isinstance(o["G_batch_size"], int) or o["G_batch_size"] < 0:
            raise ValueError(f"{owner}: G_batch_size must be an int >= 0 (0: the D chunk size), got "
                             f"{o['G_batch_size']!r}")
        check_latent_options(owner, o)
        self.G = self._make_G()
        self.D = self._D_CLASS(**self._net_args(), D_activation=_ACTIVATIONS[o["D_nl"]](), fused=o["fused"])
        self.network_names = ["G", "D"]
        self._ema = None
        if o["ema"]:
            self.G_ema = self._make_G(skip_init=True)
            self.G_ema.requires_grad_(False)  # follows G through the EMA only (and DDP leaves it unwrapped)
            self.network_names = ["G", "D", "G_ema"]
            self._ema = StateEMA(self.G, self.G_ema, o["ema_decay"], o["ema_start"])
        self.num_steps = 0  # the reference's state_dict['itr'] before the step

    def _net_args(self) -> dict:
        """The options as the networks' keyword arguments (the reference calls its constructors
        with the whole config; they take what they know)."""
        return {k: v for k, v in self.options.items() if k not in ("fused", "fused_optimizer")}

    def _make_G(self, skip_init: bool = False):
        o = self.options
        return self._G_CLASS(**self._net_args(), G_activation=_ACTIVATIONS[o["G_nl"]](), skip_init=skip_init,
                             fused=o["fused"])

    # -- optimisers ------------------------------------------------------------------------------
    def _adam_eps(self, params, lr, beta1, beta2):
        opt = self._adam(params, lr, beta1, beta2)
        for group in opt.param_groups:
            group["eps"] = self.options["adam_eps"]
        return opt

    def make_optimizers(self):
        o = self.options
        return {"G": self._adam_eps(self.G.parameters(), o["G_lr"], o["G_B1"], o["G_B2"]),
                "D": self._adam_eps(self.D.parameters(), o["D_lr"], o["D_B1"], o["D_B2"])}

    def make_schedulers(self, optimizers, n_epochs, n_epochs_decay, steps_per_epoch, max_steps=None):
        return {}  # the reference keeps its learning rates constant

    # -- sampling --------------------------------------------------------------------------------
    def sample_z(self, n: int) -> torch.Tensor:
        """z ~ N(0, z_var^2) (the reference's ``normal_(0, z_var)``)."""
        return torch.randn(n, unwrap(self.G).dim_z, device=self.device, dtype=self.latent_dtype) * self.options["z_var"]

    def latent_dim(self) -> int:
        return int(unwrap(self.G).dim_z)

    def sample_y(self, n: int) -> torch.Tensor:
        return torch.randint(0, self.options["n_classes"], (n,), device=self.device)

    def sample_conditionings(self, n: int) -> tuple:
        """G's and D's conditioning arguments for n generated images: (labels,) here (IC-GAN adds
        instance features). Drawn after z, as the reference draws them."""
        return (self.sample_y(n),)

    def _score(self, z, y, G=None):
        return self._score_cond(z, (y,), G)  # G embeds integer labels itself (shared embedding)

    def _score_cond(self, z, cond: tuple, G=None):
        G = self.G if G is None else G
        return self.D(G(z, *cond), *cond)

    def _optimise(self, z, y, differentiable: bool):
        return self._optimise_cond(z, (y,), differentiable)

    def _optimise_cond(self, z, cond: tuple, differentiable: bool):
        o = self.options
        if not o["latent_optimisation"]:
            return z
        return latent_optimise(z, lambda zz: self._score_cond(zz, cond), o["lo_rate"], o["lo_alpha"], o["lo_beta"],
                               o["lo_steps"], differentiable)

    # -- training --------------------------------------------------------------------------------
    def _chunks(self, x, y):
        o = self.options
        k = o["num_D_steps"] * o["num_D_accumulations"]
        if k == 0:
            return [], []
        if x.shape[0] % k:
            raise ValueError(f"{type(self).__name__}: the batch of {x.shape[0]} images must split into num_D_steps x "
                             f"num_D_accumulations = {k} equal chunks (the reference loads batch_size x {k} images "
                             "per iteration)")
        return torch.split(x, x.shape[0] // k), torch.split(y, x.shape[0] // k)

    def _d_losses(self, d_fake, d_real):
        return self.losses.gan_loss(d_real, True, "hinge"), self.losses.gan_loss(d_fake, False, "hinge")

    def _real_chunks(self, batch: dict):
        """(x, the real images' chunks, each chunk's conditioning tuple, as ``sample_conditionings``')."""
        x = self._to_device(batch["image"])
        y = self._to_device(class_indices(batch["label"], self.options["n_classes"], type(self).__name__))
        xs, ys = self._chunks(x, y)
        return x, xs, [(c,) for c in ys]

    def train_step(self, batch: dict, optimizers: dict, ctx: StepContext = DEFAULT_CONTEXT) -> dict:
        o = self.options
        x, xs, conds = self._real_chunks(batch)
        opt_G, opt_D = optimizers["G"], optimizers["D"]
        self.G.train()
        self.D.train()
        losses = {}
        if o["toggle_grads"]:
            set_requires_grad(self.D, True)
            set_requires_grad(self.G, False)
        counter = 0
        for _ in range(o["num_D_steps"]):
            ctx.zero_grad(opt_D)
            for _ in range(o["num_D_accumulations"]):
                real = xs[counter]
                n = real.shape[0]
                with ctx.autocast():
                    z = self.sample_z(n)
                    g_cond = self.sample_conditionings(n)
                    z = self._optimise_cond(z, g_cond, differentiable=False)
                    with torch.no_grad():
                        fake = self.G(z, *g_cond)
                    d_cond = [None if g is None else torch.cat([g, r]) for g, r in zip(g_cond, conds[counter])]
                    d_out = self.D(torch.cat([fake.to(real.dtype), real]), *d_cond)
                    d_fake, d_real = torch.split(d_out, [n, n])
                    loss_real, loss_fake = self._d_losses(d_fake, d_real)
                ctx.backward((loss_real + loss_fake) / float(o["num_D_accumulations"]), "D")
                counter += 1
            if o["D_ortho"] > 0:
                ctx.unscale(opt_D, "D")  # (AMP: the term adds to true gradients, not scaled ones)
                ortho_(self.D, o["D_ortho"])
            ctx.step(opt_D, "D")
            losses.update({"D_loss_real": loss_real, "D_loss_fake": loss_fake})
        if o["toggle_grads"]:
            set_requires_grad(self.D, False)
            set_requires_grad(self.G, True)

        ctx.zero_grad(opt_G)
        # the reference's train.py: G_batch_size = max(--G_batch_size, the chunk size)
        n = max(o["G_batch_size"], xs[0].shape[0] if xs else x.shape[0])
        for _ in range(o["num_G_accumulations"]):
            with ctx.autocast():
                z = self.sample_z(n)
                g_cond = self.sample_conditionings(n)
                z = self._optimise_cond(z, g_cond, differentiable=True)
                g_loss = self.losses.gan_loss(self._score_cond(z, g_cond), True, "hinge", for_discriminator=False)
            g_loss = g_loss / float(o["num_G_accumulations"])
            ctx.backward(g_loss, "G")
        if o["G_ortho"] > 0:
            ctx.unscale(opt_G, "G")
            ortho_(self.G, o["G_ortho"], blacklist=list(unwrap(self.G).shared.parameters()))
        ctx.step(opt_G, "G")
        if o["toggle_grads"]:
            set_requires_grad(self.D, True)
        self.num_steps += 1
        if self._ema is not None:
            self._ema.update(self.num_steps)
        # (logged as the reference's train() reports it: the last pass's loss / num_G_accumulations)
        losses["G_loss"] = g_loss
        return self._detached(losses)

    # -- evaluation ------------------------------------------------------------------------------
    def sampling_generator(self) -> nn.Module:
        """G_ema with ``ema`` and ``use_ema``, else G (the reference's ``which_G``)."""
        return self.G_ema if self._ema is not None and self.options["use_ema"] else self.G

    @torch.no_grad()
    def generate(self, n: int | None = None, labels=None, z: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1] for ``labels`` (class indices; random when None) and ``z`` (random
        when None). ``G_eval_mode`` samples in eval mode, otherwise in training mode, as the
        reference does (batch statistics; the BN / SN buffers of the sampling G move)."""
        G = self.sampling_generator()
        if labels is None:
            labels = self.sample_y(int(n) if n is not None else z.shape[0])
        labels = class_indices(torch.as_tensor(labels), self.options["n_classes"], type(self).__name__)
        labels = labels.to(self.device)
        z = self.sample_z(labels.shape[0]) if z is None else z.to(self.device)
        was = G.training
        G.train(not self.options["G_eval_mode"])
        try:
            return G(z, labels)
        finally:
            G.train(was)

    @torch.no_grad()
    def translate(self, batch: dict) -> torch.Tensor:
        return self.generate(labels=batch["label"], z=batch.get("z"))

    def extra_state(self) -> dict:
        return {"num_steps": self.num_steps}

    def load_extra_state(self, state: dict) -> None:
        self.num_steps = int(state.get("num_steps", 0))


class BigGANDeep(BigGAN):
    """BigGAN-deep (BigGANdeep.py): the same training; defaults as the reference's BigGAN-deep
    launch script where the generator cannot run otherwise (hier, G_shared) and its depth 2."""

    MODEL_NAME = "biggan_deep"
    DEFAULTS = dict(BIGGAN_DEFAULTS, G_depth=2, D_depth=2, G_shared=True, hier=True)
    _G_CLASS, _D_CLASS = BigGANDeepGenerator, BigGANDeepDiscriminator
