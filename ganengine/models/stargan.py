"""StarGAN (Choi et al. 2018), as the reference's solver.py (yunjey/stargan, single dataset).

Every step trains D: WGAN adversarial terms on real and (detached) fake images, the domain
classification loss on real images (lambda_cls) and the gradient penalty (lambda_gp), in one
backward. Every ``n_critic``-th step also trains G: adversarial + lambda_rec * L1 reconstruction
(G(G(x, c_trg), c_org)) + lambda_cls * classification of the fake into the target domain.
Target labels are the batch's labels in random order (``torch.randperm``), as the reference.

``dataset="CelebA"``: multi-label attributes, labels (N, c_dim) in {0, 1}, summed BCE-with-logits
divided by N. ``dataset="RaFD"``: single-label domains, labels as indices (N,) or one-hot
(N, c_dim), cross entropy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import ganengine.functional as GF
from ganengine.models.base import (DEFAULT_CONTEXT, GANModel, StepContext, at_least_fp32, iteration_decay_lambda,
                                   set_requires_grad)
from ganengine.models.networks_stargan import StarGANDiscriminator, StarGANGenerator


class StarGAN(GANModel):
    """Options are the reference's main.py flags and defaults. Learning-rate schedule
    (make_schedulers): with ``--num_iters`` / ``--max_steps`` the reference's iteration decay
    (``num_iters_decay``, ``lr_update_step``; base.iteration_decay_lambda); trained by epochs, a
    linear decay to zero over the decay epochs. ``attention_resolution`` adds SAGAN blocks to G
    and D at that feature-map size."""

    MODEL_NAME = "stargan"
    double_backward = "takes a gradient penalty (WGAN-GP, lambda_gp)"
    DEFAULTS = dict(c_dim=5, image_size=128, g_conv_dim=64, d_conv_dim=64, g_repeat_num=6, d_repeat_num=6,
                    lambda_cls=1.0, lambda_rec=10.0, lambda_gp=10.0, dataset="CelebA", g_lr=0.0001, d_lr=0.0001,
                    n_critic=5, beta1=0.5, beta2=0.999, num_iters_decay=100000, lr_update_step=1000,
                    lr_schedule="epochs", fused=True, fused_optimizer=True, attention_resolution=None)
    network_names = ["G", "D"]
    generator_name = "G"

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        self._choice("dataset", ("CelebA", "RaFD"))
        self._choice("lr_schedule", ("epochs", "iterations"))
        if not isinstance(o["n_critic"], int) or o["n_critic"] < 1:
            raise ValueError(f"StarGAN: n_critic must be an int >= 1, got {o['n_critic']!r}")
        for name in ("num_iters_decay", "lr_update_step"):
            if isinstance(o[name], bool) or not isinstance(o[name], int) or o[name] < 1:
                raise ValueError(f"StarGAN: {name} must be an int >= 1, got {o[name]!r}")
        scale = self._attention_scale(o["image_size"])
        self.G = StarGANGenerator(o["g_conv_dim"], o["c_dim"], o["g_repeat_num"], fused=o["fused"],
                                  attention_scale=scale if scale is None or scale <= 4 else None)
        self.D = StarGANDiscriminator(o["image_size"], o["d_conv_dim"], o["c_dim"], o["d_repeat_num"],
                                      fused=o["fused"], attention_scale=scale if scale != 1 else None)
        self.num_steps = 0  # the reference's iteration counter i (G trains when (i+1) % n_critic == 0)

    # -- labels ------------------------------------------------------------------------------
    def _label_indices(self, label: torch.Tensor) -> torch.Tensor:
        if label.dim() == 2:
            return label.argmax(1)
        if label.dim() == 1:
            return label.long()
        raise ValueError(f"StarGAN(dataset='RaFD'): labels must be indices (N,) or one-hot (N, c_dim), "
                         f"got shape {tuple(label.shape)}")

    def _labels(self, label: torch.Tensor):
        """(target for the cls loss, generator condition) from a batch's labels."""
        c_dim = self.options["c_dim"]
        if self.options["dataset"] == "CelebA":
            if label.dim() != 2 or label.size(1) != c_dim:
                raise ValueError(f"StarGAN(dataset='CelebA'): labels must have shape (N, {c_dim}), "
                                 f"got {tuple(label.shape)}")
            label = label.float()
            return label, label.clone()
        idx = self._label_indices(label)
        return idx, F.one_hot(idx, c_dim).float()

    def _cls_loss(self, logit, target):
        if self.options["dataset"] == "CelebA":
            return F.binary_cross_entropy_with_logits(logit, target, reduction="sum") / logit.size(0)
        return F.cross_entropy(logit, target)

    # -- training ----------------------------------------------------------------------------
    def make_optimizers(self):
        o = self.options
        return {"G": self._adam(self.G.parameters(), o["g_lr"], o["beta1"], o["beta2"]),
                "D": self._adam(self.D.parameters(), o["d_lr"], o["beta1"], o["beta2"])}

    @property
    def schedule_reads_max_steps(self) -> bool:
        """The iteration decay runs over the run's length (engine: a changed --max_steps on resume)."""
        return self.options["lr_schedule"] != "epochs"

    def make_schedulers(self, optimizers: dict, n_epochs: int, n_epochs_decay: int, steps_per_epoch: int,
                        max_steps: int | None = None) -> dict:
        """``lr_schedule="iterations"`` (what the command line sets with ``--num_iters`` /
        ``--max_steps``): the reference's iteration decay over ``max_steps``, the rates falling to 0
        over the last ``num_iters_decay`` iterations in drops every ``lr_update_step`` iterations
        (base.iteration_decay_lambda). ``"epochs"`` (the default, and what every checkpoint written
        before the option existed trained with): the linear rule over the epochs (constant for
        ``n_epochs``, to zero over ``n_epochs_decay``), whatever ``max_steps``."""
        o = self.options
        if o["lr_schedule"] == "epochs":
            return super().make_schedulers(optimizers, n_epochs, n_epochs_decay, steps_per_epoch)
        if max_steps is None:
            raise ValueError("StarGAN: lr_schedule='iterations' decays over the run's --num_iters / --max_steps; "
                             "give one, or lr_schedule='epochs'")
        rule = iteration_decay_lambda(max_steps, o["num_iters_decay"], o["lr_update_step"])
        return {name: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=rule) for name, opt in optimizers.items()}

    def train_step(self, batch: dict, optimizers: dict, ctx: StepContext = DEFAULT_CONTEXT) -> dict:
        o = self.options
        x_real, label_org = batch["image"], batch["label"]
        rand_idx = torch.randperm(label_org.size(0))  # CPU generator, as the reference
        label_trg = label_org[rand_idx.to(label_org.device)]
        label_org, c_org = self._labels(label_org)
        label_trg, c_trg = self._labels(label_trg)
        x_real, label_org, c_org, label_trg, c_trg = map(self._to_device, (x_real, label_org, c_org, label_trg, c_trg))
        opt_G, opt_D = optimizers["G"], optimizers["D"]

        # ---- D
        set_requires_grad(self.D, True)
        with ctx.autocast():
            out_src, out_cls = self.D(x_real)
            d_loss_real = self.losses.gan_loss(out_src, True, "wgangp")
            d_loss_cls = self._cls_loss(out_cls.float(), label_org)
            with torch.no_grad():  # the reference detaches x_fake: no graph through G needed
                x_fake = self.G(x_real, c_trg)
            out_src, _ = self.D(x_fake)
            d_loss_fake = self.losses.gan_loss(out_src, False, "wgangp")
        # the penalty in fp32 even under AMP (its squared gradient norms overflow fp16)
        with torch.autocast(x_real.device.type, enabled=False):
            d_loss_gp = GF.gradient_penalty(self.D, at_least_fp32(x_real), at_least_fp32(x_fake), weight=1.0)
        d_loss = d_loss_real + d_loss_fake + o["lambda_cls"] * d_loss_cls + o["lambda_gp"] * d_loss_gp
        ctx.zero_grad(opt_D)
        ctx.zero_grad(opt_G)
        ctx.backward(d_loss, "D")
        ctx.step(opt_D, "D")
        losses = {"D/loss_real": d_loss_real, "D/loss_fake": d_loss_fake, "D/loss_cls": d_loss_cls,
                  "D/loss_gp": d_loss_gp}

        # ---- G, every n_critic steps (D frozen: its gradients would be discarded anyway)
        if (self.num_steps + 1) % o["n_critic"] == 0:
            set_requires_grad(self.D, False)
            with ctx.autocast():
                x_fake = self.G(x_real, c_trg)
                out_src, out_cls = self.D(x_fake)
                g_loss_fake = self.losses.gan_loss(out_src, True, "wgangp", for_discriminator=False)
                g_loss_cls = self._cls_loss(out_cls.float(), label_trg)
                x_reconst = self.G(x_fake, c_org)
                g_loss_rec = torch.mean(torch.abs(x_real - x_reconst))
                g_loss = g_loss_fake + o["lambda_rec"] * g_loss_rec + o["lambda_cls"] * g_loss_cls
            ctx.zero_grad(opt_D)
            ctx.zero_grad(opt_G)
            ctx.backward(g_loss, "G")
            ctx.step(opt_G, "G")
            set_requires_grad(self.D, True)
            losses.update({"G/loss_fake": g_loss_fake, "G/loss_rec": g_loss_rec, "G/loss_cls": g_loss_cls})
        self.num_steps += 1
        return self._detached(losses)

    @torch.no_grad()
    def translate(self, batch: dict) -> torch.Tensor:
        """G(image, target labels) with ``batch["target_label"]`` (or ``batch["label"]``).

        Runs G in training mode, as the reference's test code (it never calls eval()): the
        instance norms use the input's statistics."""
        label = batch.get("target_label", batch["label"])
        _, c = self._labels(label)
        was_training = self.G.training
        self.G.train(True)
        try:
            return self.G(self._to_device(batch["image"]), self._to_device(c))
        finally:
            self.G.train(was_training)

    def extra_state(self) -> dict:
        return {"num_steps": self.num_steps}

    def load_extra_state(self, state: dict) -> None:
        self.num_steps = int(state["num_steps"])
