"""InfoGAN (Chen et al. 2016) as eriklindernoren/PyTorch-GAN's ``implementations/infogan`` trains it.

G(noise, c_cat, c_cont): a categorical code (one-hot over ``n_classes``, not the data's labels:
InfoGAN is unsupervised) and ``code_dim`` continuous codes ~ U(-1, 1). One step, in the
reference's order: G step on MSE(D_adv(G(z, c)), 1); D step on (MSE(D_adv(x), 1) + MSE(D_adv(G(z, c))
detached, 0)) / 2; then the mutual-information step on fresh (labels, z, code): ``lambda_cat *
CE(D_cat(G), labels) + lambda_con * MSE(D_code(G), code)`` (CE applied to D's softmax
probabilities, as the reference), stepped by a third Adam over G's and D's parameters
(``info``). Adam(lr 2e-4, betas (0.5, 0.999)) throughout; D frozen during G's backward.

The discriminator's heads are not all used in every pass (the adversarial head in the info step,
the class and code heads in the D step), so under DDP it is wrapped with
``find_unused_parameters`` (``InfoGANDiscriminator.ddp_find_unused_parameters``).
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from ganengine.models._common import check_finite_nonnegative
from ganengine.models.base import DEFAULT_CONTEXT, StepContext, at_least_fp32, set_requires_grad
from ganengine.models.networks_pytorch_gan import InfoGANDiscriminator, InfoGANGenerator, init_in_reference_order
from ganengine.models.synthesis import EMA_OPTIONS, SynthesisGAN


class InfoGAN(SynthesisGAN):
    """Options: the reference flags ``latent_dim, code_dim, n_classes, img_size, channels, lr, b1,
    b2`` and its loss weights ``lambda_cat`` (1) and ``lambda_con`` (0.1)."""

    MODEL_NAME = "infogan"
    DEFAULTS = dict(latent_dim=62, code_dim=2, n_classes=10, img_size=32, channels=1, lr=0.0002, b1=0.5, b2=0.999,
                    lambda_cat=1.0, lambda_con=0.1, fused=True, fused_optimizer=True, **EMA_OPTIONS)

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        for name in ("lambda_cat", "lambda_con"):
            check_finite_nonnegative("InfoGAN", name, o[name])
        self.G = InfoGANGenerator(o["latent_dim"], o["n_classes"], o["code_dim"], o["img_size"], o["channels"],
                                  init_type=None, fused=False)
        self.D = InfoGANDiscriminator(o["n_classes"], o["code_dim"], o["img_size"], o["channels"], init_type=None,
                                      fused=False)
        init_in_reference_order(o["fused"], self.G, self.D)
        self.D.ddp_find_unused_parameters = True
        self.setup_ema()

    def make_optimizers(self):
        o = self.options
        adam = lambda params: self._adam(params, o["lr"], o["b1"], o["b2"])  # noqa: E731
        return {"G": adam(self.G.parameters()), "D": adam(self.D.parameters()),
                "info": adam(itertools.chain(self.G.parameters(), self.D.parameters()))}

    # -- codes ---------------------------------------------------------------------------------
    def sample_categories(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n,) uniform categorical codes."""
        if generator is not None:
            return torch.randint(0, self.options["n_classes"], (n,), generator=generator).to(self.device)
        return torch.randint(0, self.options["n_classes"], (n,), device=self.device)

    def sample_code(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, code_dim) continuous codes ~ U(-1, 1)."""
        if generator is not None:
            return (torch.rand(n, self.options["code_dim"], generator=generator) * 2 - 1).to(self.device)
        return torch.empty(n, self.options["code_dim"], device=self.device).uniform_(-1, 1)

    def one_hot(self, categories: torch.Tensor) -> torch.Tensor:
        return F.one_hot(categories, self.options["n_classes"]).float()

    def generator_inputs(self, z, labels, code=None):
        n = z.shape[0]
        if labels is None:
            labels = self.sample_categories(n)
        if code is None:
            code = torch.zeros(n, self.options["code_dim"], device=z.device)  # the reference grids' static code
        return z, self.one_hot(torch.as_tensor(labels, device=z.device).long().expand(n)), code.to(z.device)

    @torch.no_grad()
    def generate(self, n=None, z=None, labels=None, code=None) -> torch.Tensor:
        """Images for latents ``z`` (or ``n`` fresh ones), categorical codes ``labels`` (indices or
        an int; random when None) and continuous ``code`` (zeros when None)."""
        from ganengine.models.synthesis import preserved_buffers
        from ganengine.models.synthesis_tools import class_indices

        o, owner = self.options, type(self).__name__
        if z is None:
            if n is None:
                raise ValueError("generate: give n or z")
            z = self.sample_z(int(n))
        z = z.to(self.device)
        if labels is not None:  # (as SynthesisGAN.generate: the categories checked, one or one per latent)
            labels = torch.as_tensor(labels)
            labels = class_indices(labels.reshape(1) if labels.dim() == 0 else labels, o["n_classes"], owner)
            if labels.shape[0] not in (1, z.shape[0]):
                raise ValueError(f"{owner}: labels must be one category or one per latent ({z.shape[0]}), got "
                                 f"{labels.shape[0]}")
        if code is not None and tuple(code.shape) != (z.shape[0], o["code_dim"]):
            raise ValueError(f"{owner}: code must be ({z.shape[0]}, code_dim={o['code_dim']}), got {tuple(code.shape)}")
        net = self.sampling_generator()
        with preserved_buffers(net):
            return net(*self.generator_inputs(z, labels, code))

    def sample_rows(self, n: int = 8, max_rows: int = 10) -> list[torch.Tensor]:
        """The reference's grids: one row per categorical code (fixed z per column), then for each
        continuous code a row per category with that code varied from -1 to 1 along the row
        (z = 0, the other codes 0, as the reference's varying_c grids)."""
        o = self.options
        z = self.fixed_z(n)
        rows = [self.generate(z=z, labels=c) for c in range(min(o["n_classes"], max_rows))]
        steps = torch.linspace(-1, 1, n, device=self.device)
        for d in range(o["code_dim"]):
            code = torch.zeros(n, o["code_dim"], device=self.device)
            code[:, d] = steps
            for c in range(min(o["n_classes"], 2)):
                rows.append(self.generate(z=torch.zeros(n, self.latent_dim(), device=self.device), labels=c,
                                          code=code))
        return rows

    def sample_row_labels(self, n_rows: int, class_names=None) -> list[str]:
        o = self.options
        codes = [f"c{d + 1} -1..1, cat {c}" for d in range(o["code_dim"]) for c in range(min(o["n_classes"], 2))]
        # sample_rows' category rows: min(n_classes, max_rows), then the code rows
        n_categories = min(o["n_classes"], max(0, n_rows - len(codes)))
        return ([f"category {c}" for c in range(n_categories)] + codes)[:n_rows]

    # -- training --------------------------------------------------------------------------------
    def train_step(self, batch: dict, optimizers: dict, ctx: StepContext = DEFAULT_CONTEXT) -> dict:
        o = self.options
        real = self._real_images(batch, o["channels"], o["img_size"])
        opt_G, opt_D, opt_info = optimizers["G"], optimizers["D"], optimizers["info"]
        n = real.shape[0]
        self.num_steps += 1

        # ---- G
        set_requires_grad(self.D, False)
        ctx.zero_grad(opt_G)
        z, cat, code = self.sample_z(n), self.sample_categories(n), self.sample_code(n)
        with ctx.autocast():
            gen_imgs = self.G(z, self.one_hot(cat), code)
            g_loss = self.losses.gan_loss(at_least_fp32(self._without_ddp(self.D)(gen_imgs)[0]), True, "lsgan")
        ctx.backward(g_loss, "G")
        ctx.step(opt_G, "G")
        set_requires_grad(self.D, True)
        self.after_generator_step()

        # ---- D
        ctx.zero_grad(opt_D)
        with ctx.autocast():
            real_pred = self.D(real)[0]
            fake_pred = self.D(gen_imgs.detach())[0]
        d_loss = self.losses.discriminator_loss(at_least_fp32(real_pred), at_least_fp32(fake_pred), "lsgan")
        ctx.backward(d_loss, "D")
        ctx.step(opt_D, "D")

        # ---- information (G and D)
        ctx.zero_grad(opt_info)
        cat, z, code = self.sample_categories(n), self.sample_z(n), self.sample_code(n)
        with ctx.autocast():
            _, pred_label, pred_code = self.D(self.G(z, self.one_hot(cat), code))
        cat_loss = F.cross_entropy(at_least_fp32(pred_label), cat)
        pred_code = at_least_fp32(pred_code)  # (a float64 model's losses stay float64)
        con_loss = F.mse_loss(pred_code, code.to(pred_code.dtype))
        info_loss = o["lambda_cat"] * cat_loss + o["lambda_con"] * con_loss
        ctx.backward(info_loss, "info")
        ctx.step(opt_info, "info")
        return self._detached({"D_loss": d_loss, "G_loss": g_loss, "info_loss": info_loss, "info_cat": cat_loss,
                               "info_con": con_loss})
