"""StackGAN (Zhang et al. 2017), as the reference's trainer.py / miscc/utils.py
(hanzhanggit/StackGAN-Pytorch): Stage-I (64x64) or Stage-II (256x256, on a frozen Stage-I).

One step: G makes images from (text embedding, noise); D is trained with the matching-aware loss
on (real image, right text) -> 1, (real image, wrong text) -> 0, (fake image, right text) -> 0
(Stage-II adds the unconditional head on real/fake); then G is trained to make D say 1 on
(fake, right text) plus ``kl_coeff`` * KL(N(mu, sigma) || N(0, I)) from conditioning
augmentation. The conditioning fed to D is ``mu`` (detached), as the reference.

Wrong pairs: ``wrong_pairs="shift"`` (the reference) pairs image i with the text of image i+1;
``"batch"`` uses ``batch["wrong_image"]`` with the batch's texts.
"""
from __future__ import annotations

import torch

from ganengine.models.base import DEFAULT_CONTEXT, GANModel, StepContext, _check_schedule_ints, set_requires_grad
from ganengine.models.dcgan import bce  # the reference's nn.BCELoss on sigmoid outputs, in fp32
from ganengine.models.networks_stackgan import (Stage1Discriminator, Stage1Generator, Stage2Discriminator,
                                                Stage2Generator)


def kl_loss(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """mean(-0.5 * (1 + logvar - mu^2 - exp(logvar))), the reference's KL_loss."""
    return torch.mean(1 + logvar - mu.pow(2) - logvar.exp()).mul(-0.5)


class StackGAN(GANModel):
    """Options are the reference config's values, lower-cased (GAN.GF_DIM -> gf_dim, TEXT.DIMENSION
    -> text_dim, TRAIN.COEFF.KL -> kl_coeff, TRAIN.LR_DECAY_EPOCH -> lr_decay_epoch, ...).
    ``stage1_g``: for stage 2, a Stage-I generator checkpoint (reference format) to load into the
    frozen ``netG.STAGE1_G``, as the reference's STAGE1_G config entry. A stage-2 model built
    without it keeps a randomly initialised Stage I (for loading a Stage-II checkpoint into it);
    ``ganengine train stackgan --stage 2`` refuses to train one from scratch that way, as the
    reference does. ``lr_decay_epoch`` must be a positive int."""

    MODEL_NAME = "stackgan"
    DEFAULTS = dict(stage=1, gf_dim=128, df_dim=64, condition_dim=128, text_dim=1024, z_dim=100, r_num=4,
                    generator_lr=0.0002, discriminator_lr=0.0002, beta1=0.5, lr_decay_epoch=600, kl_coeff=2.0,
                    wrong_pairs="shift", stage1_g="", fused=True, fused_optimizer=True)
    network_names = ["netG", "netD"]
    generator_name = "netG"

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        self._choice("stage", (1, 2))
        self._choice("wrong_pairs", ("shift", "batch"))
        _check_schedule_ints("StackGAN", lr_decay_epoch=o["lr_decay_epoch"])  # (0: a division by zero; < 0: a rising rate)
        g = dict(gf_dim=o["gf_dim"], condition_dim=o["condition_dim"], text_dim=o["text_dim"], z_dim=o["z_dim"],
                 fused=o["fused"])
        if o["stage"] == 1:
            self.netG = Stage1Generator(**g)
            self.netD = Stage1Discriminator(o["df_dim"], o["condition_dim"], fused=o["fused"])
        else:
            self.netG = Stage2Generator(None, r_num=o["r_num"], **g)
            self.netD = Stage2Discriminator(o["df_dim"], o["condition_dim"], fused=o["fused"])
            if o["stage1_g"]:
                from ganengine.models.checkpoints import load_reference_checkpoint

                stage1 = load_reference_checkpoint(_stage1_state(o["stage1_g"]), "stackgan_stage1_G", fused=False,
                                                   **{k: o[k] for k in ("gf_dim", "condition_dim", "text_dim", "z_dim")})
                self.netG.STAGE1_G.load_state_dict(stage1.state_dict())

    def make_optimizers(self):
        o = self.options
        g_params = [p for p in self.netG.parameters() if p.requires_grad]  # Stage-I stays frozen
        return {"G": self._adam(g_params, o["generator_lr"], o["beta1"]),
                "D": self._adam(self.netD.parameters(), o["discriminator_lr"], o["beta1"])}

    def make_schedulers(self, optimizers: dict, n_epochs: int, n_epochs_decay: int, steps_per_epoch: int,
                        max_steps: int | None = None) -> dict:
        """The reference halves both learning rates every ``lr_decay_epoch`` epochs: epoch e
        (counted from 0) trains at ``0.5 ** (e // lr_decay_epoch)`` (trainer.py halves them at the
        start of every epoch e > 0 that is a multiple of it). ``n_epochs`` and ``n_epochs_decay``
        do not enter: the reference has no decay phase (the command line refuses a non-zero
        ``--n_epochs_decay`` for StackGAN)."""
        _check_schedule_ints(steps_per_epoch=steps_per_epoch)
        every = self.options["lr_decay_epoch"]
        _check_schedule_ints("StackGAN", lr_decay_epoch=every)

        def rule(step):
            return 0.5 ** ((step // steps_per_epoch) // every)

        return {name: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=rule) for name, opt in optimizers.items()}

    def _heads(self):
        # the logits heads are submodules called directly, as the reference does; reach them
        # through a DDP / DataParallel wrapper if the engine put one around netD
        return getattr(self.netD, "module", self.netD)

    def _d_loss(self, real_imgs, fake_imgs, cond, wrong_imgs=None):
        netD, heads = self.netD, self._heads()
        n = real_imgs.size(0)
        cond = cond.detach()
        real_features = netD(real_imgs)
        fake_features = netD(fake_imgs.detach())
        err_real = bce(heads.get_cond_logits(real_features, cond), 1.0)
        if wrong_imgs is None:
            err_wrong = bce(heads.get_cond_logits(real_features[:n - 1], cond[1:]), 0.0)
        else:
            err_wrong = bce(heads.get_cond_logits(netD(wrong_imgs), cond), 0.0)
        err_fake = bce(heads.get_cond_logits(fake_features, cond), 0.0)
        if heads.get_uncond_logits is not None:
            unc_real = bce(heads.get_uncond_logits(real_features), 1.0)
            unc_fake = bce(heads.get_uncond_logits(fake_features), 0.0)
            err_d = (err_real + unc_real) / 2.0 + (err_fake + err_wrong + unc_fake) / 3.0
            err_real, err_fake = (err_real + unc_real) / 2.0, (err_fake + unc_fake) / 2.0
        else:
            err_d = err_real + (err_fake + err_wrong) * 0.5
        return err_d, err_real, err_wrong, err_fake

    def _g_loss(self, fake_imgs, cond):
        heads = self._heads()
        fake_features = self.netD(fake_imgs)
        err = bce(heads.get_cond_logits(fake_features, cond.detach()), 1.0)
        if heads.get_uncond_logits is not None:
            err = err + bce(heads.get_uncond_logits(fake_features), 1.0)
        return err

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size < 2:
            # not only the shifted wrong pairs: the reference networks normalise with
            # BatchNorm1d/2d over the batch, which cannot train on one sample
            raise ValueError("StackGAN trains with batch norm over the batch (BatchNorm1d/BatchNorm2d, as the "
                             f"reference networks): each batch needs at least 2 images, got {batch_size}; "
                             "use --batch_size 2 or more")

    def train_step(self, batch: dict, optimizers: dict, ctx: StepContext = DEFAULT_CONTEXT) -> dict:
        o = self.options
        real_imgs, emb = self._to_device(batch["image"]), self._to_device(batch["embedding"]).float()
        self.check_batch_size(real_imgs.size(0))
        wrong = self._to_device(batch["wrong_image"]) if o["wrong_pairs"] == "batch" else None
        noise = torch.randn(real_imgs.size(0), o["z_dim"], device=real_imgs.device)
        opt_G, opt_D = optimizers["G"], optimizers["D"]
        with ctx.autocast():
            _, fake_imgs, mu, logvar = self.netG(emb, noise)

        set_requires_grad(self.netD, True)
        ctx.zero_grad(opt_D)
        with ctx.autocast():
            err_d, err_real, err_wrong, err_fake = self._d_loss(real_imgs, fake_imgs, mu, wrong)
        ctx.backward(err_d, "D")
        ctx.step(opt_D, "D")

        set_requires_grad(self.netD, False)  # the reference's extra D gradients are discarded anyway
        ctx.zero_grad(opt_G)
        with ctx.autocast():
            err_g = self._g_loss(fake_imgs, mu)
            kl = kl_loss(mu.float(), logvar.float())
            err_g_total = err_g + kl * o["kl_coeff"]
        ctx.backward(err_g_total, "G")
        ctx.step(opt_G, "G")
        set_requires_grad(self.netD, True)
        return self._detached({"D_loss": err_d, "D_loss_real": err_real, "D_loss_wrong": err_wrong,
                               "D_loss_fake": err_fake, "G_loss": err_g, "KL_loss": kl})

    @torch.no_grad()
    def translate(self, batch: dict) -> torch.Tensor:
        """Images for ``batch["embedding"]`` (and ``batch["noise"]`` if given), in eval mode as
        the reference's sample()."""
        emb = self._to_device(batch["embedding"]).float()
        noise = batch.get("noise")
        noise = torch.randn(emb.size(0), self.options["z_dim"], device=emb.device) if noise is None else self._to_device(noise)
        was_training = self.netG.training
        self.netG.eval()
        try:
            return self.netG(emb, noise)[1]
        finally:
            self.netG.train(was_training)


def _stage1_state(path: str):
    """``stage1_g``'s generator: a reference checkpoint (its path, read by load_reference_checkpoint),
    or the Stage-I generator of a ganengine StackGAN training checkpoint (its state dict)."""
    import os

    from ganengine.models.checkpoints import TRAINING_CHECKPOINT_FORMAT, damaged_message, damaged_record

    if not os.path.isfile(path):
        return path  # (load_reference_checkpoint says so)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return path  # (load_reference_checkpoint says why)
    if not (isinstance(state, dict) and state.get("format") == TRAINING_CHECKPOINT_FORMAT):
        return state
    bad = damaged_record(path)   # (ganengine's own checkpoint: its records' CRC-32 are checked as on resume)
    if bad is not None:
        raise ValueError(f"stage1_g: {damaged_message(path, bad)}")
    stage = (state.get("options") or {}).get("stage")
    if state.get("model") != "stackgan" or stage != 1:
        raise ValueError(f"stage1_g {path!r} is a ganengine training checkpoint of "
                         f"{state.get('model')!r}{f' stage {stage}' if state.get('model') == 'stackgan' else ''}; "
                         "Stage II needs a Stage-I StackGAN generator")
    return state["networks"]["netG"]
