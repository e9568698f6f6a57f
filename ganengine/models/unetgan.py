"""U-Net GAN (Schonfeld, Schiele, Khoreva, CVPR 2020), as boschresearch/unetgan's train_fns.py
trains it: BigGAN's generator against a U-Net discriminator with a global (encoder) and a
per-pixel (decoder) output (networks_unetgan.py).

Per step (``num_D_steps`` times, each over ``num_D_accumulations`` chunks of the batch, the same
chunks in every D step as the reference):

* D on ``cat([G_z, x(, mixed)])``: real/fake terms of both heads, ``0.5 * (real_2d + real_middle)
  + 0.5 * (fake_2d + fake_middle)``;
* ``unet_mixup`` (CutMix regularisation): a CutMix map M per image of a chunk (a box covering
  1 - lam of the image, lam ~ U(0, 1), inverted with probability 1/2; drawn once per iteration and
  used by every chunk and D step, as the reference), ``mixed = M * x + (1 - M) * G_z`` (the
  fakes drawn with the real images' labels, as the reference). The augmentation loss trains the
  decoder to output M on the mix (per-pixel targets) and the encoder to call the mix fake; the
  consistency loss ``mse(D_dec(mixed), M * D_dec(x) + (1 - M) * D_dec(G_z))``.
  ``consistency_loss_and_augmentation`` (the reference's recipe) uses both, ``consistency_loss``
  only the consistency term, neither of them only the augmentation term;
* G: ``0.5 * loss(D_middle(G_z)) + 0.5 * loss(D_dec(G_z))`` on fresh z.

``gan_loss`` 'hinge' (default: the issue's per-pixel + global hinge losses) or 'vanilla' (the
reference code's binary cross-entropy: the per-pixel mix target is M). The reference's
``full_batch_mixup`` / ``slow_mixup`` schedules are not implemented (the recipes it ships for
CelebA and FFHQ do not use them on top of the consistency+augmentation recipe). The rest
(options, EMA, orthogonal regularisation, LOGAN) is BigGAN's.

``unconditional`` builds the reference's unconditional generator (``BigGANGenerator(unconditional=
True)``: self-modulated ccbn, the full z to every block; ``hier`` on unless given, no
``G_shared``) and a D without class projections; the labels both are handed are class 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ganengine.models._common import check_finite_nonnegative
from ganengine.models.base import DEFAULT_CONTEXT, StepContext, set_requires_grad
from ganengine.models.biggan import BIGGAN_DEFAULTS, BigGAN
from ganengine.models.networks_unetgan import UNetDiscriminator
from ganengine.models.synthesis_tools import class_indices, ortho_, unwrap


def cutmix_maps(n: int, size: int, device=None) -> torch.Tensor:
    """(n, 1, size, size) CutMix maps as the reference's ``mixup.CutMix``: 1 (real) outside a box
    of side ``int(size * sqrt(1 - lam))`` centred at a uniform pixel (clipped at the borders),
    lam ~ U(0, 1); each map inverted with probability 1/2."""
    lam = torch.rand(n)
    side = (size * torch.sqrt(1.0 - lam)).long()
    cx, cy = torch.randint(0, size, (n,)), torch.randint(0, size, (n,))
    x1, x2 = (cx - side // 2).clamp(0, size), (cx + side // 2).clamp(0, size)
    y1, y2 = (cy - side // 2).clamp(0, size), (cy + side // 2).clamp(0, size)
    r = torch.arange(size)
    rows = (r[None, :] >= x1[:, None]) & (r[None, :] < x2[:, None])
    cols = (r[None, :] >= y1[:, None]) & (r[None, :] < y2[:, None])
    box = rows[:, :, None] & cols[:, None, :]
    maps = (~box).float()
    flip = torch.rand(n) > 0.5
    maps[flip] = 1 - maps[flip]
    return maps[:, None].to(device)


OLD_UNCONDITIONAL_G = "ganengine's earlier --unconditional: a class-conditional BigGAN G fed class 0"


def check_unconditional_options(o: dict) -> None:
    """``unconditional`` builds the reference's unconditional generator, which runs only with
    ``hier`` and without ``G_shared``; the other combinations are errors naming the options (the
    options of a checkpoint written by ganengine's earlier --unconditional land here too)."""
    if not o.get("unconditional"):
        return
    old = (f" (if these options come from a checkpoint, it was written by the old unconditional generator, "
           f"{OLD_UNCONDITIONAL_G}, and cannot be loaded as an unconditional U-Net GAN; retrain)")
    if not o.get("hier"):
        raise ValueError("UNetGAN: --unconditional needs --hier (the reference's unconditional generator gives "
                         "every block's self-modulated batch norm all of z; without hier it fails); leave --hier "
                         "out (on with --unconditional) or drop --unconditional" + old)
    if o.get("G_shared"):
        raise ValueError("UNetGAN: --unconditional takes no --G_shared (the reference's unconditional generator has "
                         "no class embedding: with one its self-modulated batch norms get the wrong input width); "
                         "give --G_shared false (the reference recipes' setting)" + old)


class UNetGAN(BigGAN):
    MODEL_NAME = "unetgan"
    DEFAULTS = dict(BIGGAN_DEFAULTS, num_D_steps=1, unconditional=False, gan_loss="hinge", unet_mixup=True,
                    consistency_loss_and_augmentation=True, consistency_loss=False, lambda_consistency=1.0)
    _D_CLASS = UNetDiscriminator

    def __init__(self, **options):
        options = dict(options)
        if options.get("unconditional") and "hier" not in options:
            options["hier"] = True  # the reference's recipes (--hier --unconditional; its G needs hier)
        check_unconditional_options({**self.DEFAULTS, **options})
        check_finite_nonnegative("UNetGAN", "lambda_consistency",
                                 options.get("lambda_consistency", self.DEFAULTS["lambda_consistency"]))
        super().__init__(**options)
        self._choice("gan_loss", ("hinge", "vanilla"))

    def resume_differences(self, diff: dict) -> dict:
        """A run of ganengine's earlier ``--unconditional`` (a class-conditional G fed class 0: its
        options have hier off or G_shared on, which the reference's unconditional G cannot take),
        resumed as an unconditional run now: said as such, not as an option difference."""
        if self.options["unconditional"] and "unconditional" not in diff and (
                diff.get("hier", (None,))[0] is False or diff.get("G_shared", (None,))[0] is True):
            from ganengine.train.checkpoint import CheckpointError  # (the engine's "cannot resume" error)

            raise CheckpointError("--resume: the checkpoint was written by the old unconditional generator "
                                  f"({OLD_UNCONDITIONAL_G}), not the reference's unconditional generator that "
                                  "--unconditional builds now; it cannot be resumed as an unconditional run")
        return diff

    # --unconditional: G is the reference's unconditional generator (it ignores labels); D has no
    # class projection; the labels both are handed are class 0, as the reference's training zeroes them
    def sample_y(self, n: int) -> torch.Tensor:
        if self.options["unconditional"]:
            return torch.zeros(n, dtype=torch.long, device=self.device)
        return super().sample_y(n)

    @torch.no_grad()
    def generate(self, n: int | None = None, labels=None, z: torch.Tensor | None = None) -> torch.Tensor:
        if self.options["unconditional"] and labels is not None:  # (a batch's labels: not G's input here)
            labels = torch.zeros(torch.as_tensor(labels).reshape(-1).shape[0], dtype=torch.long)
        return super().generate(n, labels, z)

    def _score_cond(self, z, cond: tuple, G=None):
        G = self.G if G is None else G
        pix, glob = self.D(G(z, *cond), *cond)
        return glob  # LOGAN optimises z for the global score

    def _real_fake(self, x, real: bool):
        mode = self.options["gan_loss"]
        return self.losses.gan_loss(x, real, "hinge" if mode == "hinge" else "vanilla")

    def _pixel_target_loss(self, d, target):
        """Per-pixel loss of ``d`` against a real(1)/fake(0) map, mean over all pixels."""
        if self.options["gan_loss"] == "vanilla":
            return F.binary_cross_entropy_with_logits(d, target)
        return (target * F.relu(1.0 - d) + (1.0 - target) * F.relu(1.0 + d)).mean()

    def train_step(self, batch: dict, optimizers: dict, ctx: StepContext = DEFAULT_CONTEXT) -> dict:
        o = self.options
        x = self._to_device(batch["image"])
        y = (torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if o["unconditional"] else
             self._to_device(class_indices(batch["label"], o["n_classes"], "UNetGAN")))
        k = o["num_D_accumulations"]
        if x.shape[0] % k:
            raise ValueError(f"UNetGAN: the batch of {x.shape[0]} images must split into num_D_accumulations={k} "
                             "equal chunks")
        xs, ys = torch.split(x, x.shape[0] // k), torch.split(y, x.shape[0] // k)
        opt_G, opt_D = optimizers["G"], optimizers["D"]
        self.G.train()
        self.D.train()
        losses = {}
        # one CutMix map per image of a chunk, drawn once per iteration and used by every chunk
        # and D step, as the reference's train.py draws target_map before calling train()
        maps = (cutmix_maps(xs[0].shape[0], x.shape[-1], x.device).to(x.dtype) if o["unet_mixup"]
                else None)
        if o["toggle_grads"]:
            set_requires_grad(self.D, True)
            set_requires_grad(self.G, False)
        for _ in range(o["num_D_steps"]):
            ctx.zero_grad(opt_D)
            for real, real_y in zip(xs, ys):
                n = real.shape[0]
                with ctx.autocast():
                    z = self.sample_z(n)
                    gy = real_y if o["unet_mixup"] else self.sample_y(n)  # mixup: fakes of the real labels
                    z = self._optimise(z, gy, differentiable=False)
                    with torch.no_grad():
                        fake = self.G(z, gy).to(real.dtype)
                    inputs, labels = [fake, real], [gy, real_y]
                    if o["unet_mixup"]:
                        inputs.append(maps * real + (1 - maps) * fake)
                        labels.append(real_y)
                    pix, glob = self.D(torch.cat(inputs), torch.cat(labels))
                    parts = [n] * len(inputs)
                    pix, glob = torch.split(pix, parts), torch.split(glob, parts)
                    real_2d, fake_2d = self._real_fake(pix[1], True), self._real_fake(pix[0], False)
                    real_mid, fake_mid = self._real_fake(glob[1], True), self._real_fake(glob[0], False)
                    d_loss = 0.5 * (real_2d + real_mid) + 0.5 * (fake_2d + fake_mid)
                    step_losses = {"D_loss_real_2d": real_2d, "D_loss_fake_2d": fake_2d,
                                   "D_loss_real_middle": real_mid, "D_loss_fake_middle": fake_mid}
                    if o["unet_mixup"]:
                        mix_loss = 0.0
                        if o["consistency_loss"] or o["consistency_loss_and_augmentation"]:
                            target = maps * pix[1] + (1 - maps) * pix[0]
                            consistency = o["lambda_consistency"] * F.mse_loss(pix[2], target)
                            step_losses["consistency"] = consistency
                            mix_loss = consistency
                        if not o["consistency_loss"]:
                            mixed_2d = self._pixel_target_loss(pix[2], maps)
                            mixed_mid = self._real_fake(glob[2], False)  # the encoder calls a mix fake
                            step_losses.update(D_loss_mixed_2d=mixed_2d, mixed_middle_loss=mixed_mid)
                            mix_loss = mix_loss + mixed_2d + mixed_mid
                        d_loss = d_loss + mix_loss
                ctx.backward(d_loss / float(k), "D")
            if o["D_ortho"] > 0:
                ctx.unscale(opt_D, "D")  # (AMP: the term adds to true gradients, not scaled ones)
                ortho_(self.D, o["D_ortho"])
            ctx.step(opt_D, "D")
            losses.update(step_losses)
        if o["toggle_grads"]:
            set_requires_grad(self.D, False)
            set_requires_grad(self.G, True)

        ctx.zero_grad(opt_G)
        # the reference's U-Net step takes chunk-size slices of its G latents: --G_batch_size has no
        # effect on the G batch here (BigGAN's step uses max(G_batch_size, chunk))
        n = xs[0].shape[0]
        for _ in range(o["num_G_accumulations"]):
            with ctx.autocast():
                z = self.sample_z(n)
                gy = torch.zeros_like(ys[0][:1]).expand(n) if o["unconditional"] else self.sample_y(n)
                z = self._optimise(z, gy, differentiable=True)
                pix, glob = self.D(self.G(z, gy), gy)
                if o["gan_loss"] == "hinge":
                    g_2d = self.losses.gan_loss(pix, True, "hinge", for_discriminator=False)
                    g_mid = self.losses.gan_loss(glob, True, "hinge", for_discriminator=False)
                else:
                    g_2d, g_mid = self.losses.gan_loss(pix, True, "vanilla"), self.losses.gan_loss(glob, True, "vanilla")
                g_loss = 0.5 * g_mid + 0.5 * g_2d
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
        # (G_loss as the reference's train() reports it: the last pass's loss / num_G_accumulations)
        losses.update(G_loss=g_loss, G_loss_fake_2d=g_2d, G_loss_fake_middle=g_mid)
        return self._detached(losses)
