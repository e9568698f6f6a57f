"""``SynthesisGAN``: what the image-synthesis models (noise [+ class] -> image) share on top of
``GANModel``: latent and label sampling, the batch's class labels, fixed sample noise for grids,
latent interpolations, an optional generator EMA and a step counter. DCGAN, WGAN, WGAN-GP, cGAN,
AC-GAN, ADC-GAN and InfoGAN subclass it; the contract is in docs/INTERFACES.md.

Random numbers: ``sample_z`` / ``sample_labels`` draw from torch's global generator on the
model's device, which the engine seeds per rank and checkpoints, so a resumed run draws the same
latents. Grids use ``fixed_z`` / ``fixed_labels``, drawn from a private generator seeded with
``SAMPLE_SEED``: the same images-to-be at every sampling step, and sampling never moves the
training's random streams (the engine also runs it under ``fork_rng``).

Sampling runs the generator as the reference samples (training mode for these batch-norm
generators: pytorch/examples and PyTorch-GAN never call ``eval()``), and restores the batch-norm
running statistics afterwards, so writing a grid does not change the training state.

EMA hook points: with the options ``ema=True`` (plus ``ema_decay``, ``ema_start``) the model keeps
``G_ema``, a copy of G whose parameters and buffers follow G's (``target = decay * target + (1 -
decay) * G``, a copy before ``ema_start``) after every generator step (``after_generator_step``),
checkpointed as a network; ``use_ema`` (default True with ``ema``) samples from it.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ganengine._state import restored, running_state
from ganengine.models.base import GANModel, set_requires_grad

EMA_OPTIONS = dict(ema=False, ema_decay=0.999, ema_start=0, use_ema=True)


def class_indices(label: torch.Tensor, n_classes: int, owner: str) -> torch.Tensor:
    """(N,) int64 class indices from indices or one-hot rows, checked against ``n_classes`` (on the
    CPU only: a device check would synchronise every step)."""
    from ganengine.models.synthesis_tools import class_indices as _ci

    return _ci(label, n_classes, owner)


def preserved_buffers(net: nn.Module):
    """Run ``net`` (in training mode, say) and put its running state (buffers; SAGAN's
    spectral-norm u / v Parameters: ``_state.running_state``) back afterwards."""
    return restored(running_state(net))


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between latent rows (linear where they are parallel)."""
    na, nb = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    omega = torch.acos((na * nb).sum(-1, keepdim=True).clamp(-1, 1))
    so = torch.sin(omega)
    lerp = (1 - t) * a + t * b
    out = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / so.clamp_min(1e-8)
    return torch.where(so.abs() < 1e-6, lerp, out)


class SynthesisGAN(GANModel):
    """Base class. Subclasses set ``LATENT_OPTION`` (the option holding the latent size: "nz",
    "latent_dim", ...), ``CONDITIONAL`` (G takes class labels), build ``self.G`` / ``self.D`` and
    implement ``generator_inputs(z, labels)`` (what G's reference forward takes) and
    ``train_step``."""

    LATENT_OPTION = "latent_dim"
    CONDITIONAL = False
    SAMPLE_SEED = 1234
    network_names = ["G", "D"]
    generator_name = "G"

    def __init__(self, **options):
        super().__init__(**options)
        self.num_steps = 0  # train_step calls so far (n_critic schedules); checkpointed
        self._ema = None
        self.network_names = list(type(self).network_names)

    # -- latents and labels --------------------------------------------------------------------
    def latent_dim(self) -> int:
        return int(self.options[self.LATENT_OPTION])

    @property
    def n_classes(self) -> int | None:
        return int(self.options["n_classes"]) if self.CONDITIONAL else None

    def sample_z(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, latent_dim) N(0, 1) latents on the model's device, in its weights' dtype (global RNG unless
        ``generator``)."""
        if generator is not None:
            return torch.randn(n, self.latent_dim(), generator=generator, dtype=self.latent_dtype).to(self.device)
        return torch.randn(n, self.latent_dim(), device=self.device, dtype=self.latent_dtype)

    def sample_labels(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n,) uniform class indices (the references' ``np.random.randint(0, n_classes, n)``)."""
        if generator is not None:
            return torch.randint(0, self.n_classes, (n,), generator=generator).to(self.device)
        return torch.randint(0, self.n_classes, (n,), device=self.device)

    def batch_labels(self, batch: dict) -> torch.Tensor:
        """The batch's class indices (``batch["label"]``: (N,) indices or (N, K) one-hot)."""
        if "label" not in batch:
            raise ValueError(f"{type(self).__name__} is class-conditional: batches need a 'label' entry (class "
                             "indices); train it on a class-per-folder dataset or the built-in digits")
        return class_indices(batch["label"], self.n_classes, type(self).__name__).to(self.device, non_blocking=True)

    def _sample_generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.SAMPLE_SEED + offset)

    def fixed_z(self, n: int, offset: int = 0) -> torch.Tensor:
        """The same (n, latent_dim) latents at every call (grids comparable over training)."""
        return self.sample_z(n, self._sample_generator(offset))

    # -- the generator ---------------------------------------------------------------------------
    def generator_inputs(self, z: torch.Tensor, labels: torch.Tensor | None) -> tuple:
        """The arguments of G's reference forward for latents ``z`` and class indices ``labels``."""
        raise NotImplementedError

    def sampling_generator(self) -> nn.Module:
        """G, or its EMA with ``ema`` and ``use_ema`` (the network grids and ``translate`` use)."""
        if self._ema is not None and self.options.get("use_ema", True):
            return self.G_ema
        return self.G

    @property
    def min_sample_batch(self) -> int:
        """The fewest images one ``generate`` call can make: 2 where the sampling generator
        normalises 1-D features with batch statistics (a BatchNorm1d in training mode, as the WGAN /
        cGAN references sample: one image has no batch statistics), else 1."""
        from ganengine.models.synthesis_tools import unwrap

        net = unwrap(self.sampling_generator())
        # (nn.BatchNorm1d: the fused BatchNormAct1d is one too)
        return 2 if any(isinstance(m, nn.BatchNorm1d) and m.training for m in net.modules()) else 1

    def check_sample_count(self, n: int, what: str) -> None:
        """A ValueError naming ``what`` (an option, or ``generate``'s n) unless one call can make n
        images (``min_sample_batch``)."""
        least = self.min_sample_batch
        if n < least:
            raise ValueError(f"{what} must be >= {least} for {self.MODEL_NAME}, got {n}: its generator normalises "
                             "with batch statistics over 1-D features (BatchNorm1d, in training mode as the reference "
                             "samples), which one image does not have")

    @torch.no_grad()
    def generate(self, n: int | None = None, z: torch.Tensor | None = None, labels=None) -> torch.Tensor:
        """Images in [-1, 1] for latents ``z`` (or ``n`` fresh ones) and class indices ``labels``
        (a tensor, an int for all, or None: random classes), as the reference samples them."""
        if z is None:
            if n is None:
                raise ValueError("generate: give n or z")
            z = self.sample_z(int(n))
        self.check_sample_count(z.shape[0], "generate: the number of images")
        z = z.to(self.device)
        if self.CONDITIONAL:
            if labels is None:
                labels = self.sample_labels(z.shape[0])
            elif isinstance(labels, int):
                labels = torch.full((z.shape[0],), labels, dtype=torch.long, device=self.device)
            labels = class_indices(torch.as_tensor(labels), self.n_classes, type(self).__name__).to(self.device)
        net = self.sampling_generator()
        with preserved_buffers(net):
            return net(*self.generator_inputs(z, labels if self.CONDITIONAL else None))

    @torch.no_grad()
    def translate(self, batch: dict) -> torch.Tensor:
        """Generated images for a batch: ``batch["z"]`` latents if given, else one per image; the
        batch's class labels for a conditional model."""
        if "z" not in batch and "image" not in batch:
            raise ValueError(f"{type(self).__name__} generates images from noise: translate(batch) takes batch['z'] "
                             "(latents) or batch['image'] (one generated image per image) and 'label' for a "
                             "conditional model; on the command line use ganengine sample, not ganengine translate")
        n = batch["z"].shape[0] if "z" in batch else batch["image"].shape[0]
        labels = self.batch_labels(batch) if self.CONDITIONAL and "label" in batch else None
        return self.generate(n, batch.get("z"), labels)

    # -- grids -------------------------------------------------------------------------------------
    def sample_rows(self, n: int = 8, max_rows: int = 10) -> list[torch.Tensor]:
        """Rows of generated images for a grid: one row per class (the first ``max_rows``) with
        the same latent in each column for a conditional model; else ``min(4, max_rows)`` rows."""
        rows = []
        if self.CONDITIONAL:
            z = self.fixed_z(n)
            for c in range(min(self.n_classes, max_rows)):
                rows.append(self.generate(z=z, labels=c))
        else:
            for r in range(min(4, max_rows)):
                rows.append(self.generate(z=self.fixed_z(n, offset=r)))
        return rows

    def sample_row_labels(self, n_rows: int, class_names=None) -> list[str]:
        if self.CONDITIONAL:
            names = [str(c) for c in class_names] if class_names else []
            # classes past the data's (--n_classes above its class count): "class k", as without names
            names += [f"class {k}" for k in range(len(names), self.n_classes)]
            return names[:n_rows]
        return [f"z set {r + 1}" for r in range(n_rows)]

    def interpolation_rows(self, n_rows: int = 4, steps: int = 8) -> list[torch.Tensor]:
        """``n_rows`` latent interpolations (slerp between two fixed latents, ``steps`` images
        each); a conditional model keeps one class per row (class r)."""
        a, b = self.fixed_z(n_rows, offset=100), self.fixed_z(n_rows, offset=101)
        rows = []
        for r in range(n_rows):
            z = torch.cat([slerp(a[r:r + 1], b[r:r + 1], t / max(1, steps - 1)) for t in range(steps)])
            rows.append(self.generate(z=z, labels=(r % self.n_classes) if self.CONDITIONAL else None))
        return rows

    # -- EMA hook points -------------------------------------------------------------------------
    def setup_ema(self) -> None:
        """Subclasses call this after building G (a no-op without the ``ema`` option)."""
        o = self.options
        if not o.get("ema"):
            return
        if not 0.0 <= float(o["ema_decay"]) < 1.0:
            raise ValueError(f"{type(self).__name__}: ema_decay must be in [0, 1), got {o['ema_decay']!r}")
        from ganengine.models.synthesis_tools import StateEMA

        self.G_ema = copy.deepcopy(self.G)
        self.G_ema.requires_grad_(False)  # follows G through the EMA only (DDP leaves it unwrapped)
        self.network_names = self.network_names + ["G_ema"]
        self._ema = StateEMA(self.G, self.G_ema, float(o["ema_decay"]), int(o["ema_start"]))

    def after_generator_step(self) -> None:
        """Call after every generator optimiser step."""
        if self._ema is not None:
            self._ema.update(self.num_steps)

    # -- state -----------------------------------------------------------------------------------
    def make_schedulers(self, optimizers: dict, n_epochs: int, n_epochs_decay: int, steps_per_epoch: int,
                        max_steps: int | None = None) -> dict:
        """The references train at a constant learning rate; with ``n_epochs_decay`` > 0 the
        rates decay linearly to zero over those epochs (the pix2pix rule, held at 0 after them),
        as an extension."""
        if n_epochs_decay <= 0:
            return {}
        return super().make_schedulers(optimizers, n_epochs, n_epochs_decay, steps_per_epoch, max_steps)

    def extra_state(self) -> dict:
        return {"num_steps": self.num_steps}

    def load_extra_state(self, state: dict) -> None:
        unknown = sorted(set(state) - {"num_steps"})
        if unknown:
            raise ValueError(f"{type(self).__name__}: unexpected extra state {unknown}")
        self.num_steps = int(state.get("num_steps", 0))

    # -- helpers for train_step -------------------------------------------------------------------
    def conditional_step(self, batch: dict, optimizers: dict, ctx, d_takes_labels: bool, g_loss_fn, d_loss_fn) -> dict:
        """The step cGAN, AC-GAN and ADC-GAN share, in the PyTorch-GAN scripts' order: z ~ N(0, 1)
        and uniform labels y; a G step on ``g_loss_fn(D(G(z, y)), y)`` with D frozen; then a D step
        on ``d_loss_fn(D(x), labels, D(G(z, y) detached), y)``. D is called ``D(img, labels)`` when
        ``d_takes_labels`` (cGAN), else ``D(img)``; D's outputs reach the loss functions as D
        returns them. Each loss function returns (loss, {name: logged tensor}); the step returns
        ``{"D_loss", "G_loss", *G's logs, *D's logs}`` detached."""
        o = self.options
        real = self._real_images(batch, o["channels"], o["img_size"])
        labels = self.batch_labels(batch)
        opt_G, opt_D = optimizers["G"], optimizers["D"]
        n = real.shape[0]
        self.num_steps += 1
        D = self.D
        run_D = (lambda img, y: D(img, y)) if d_takes_labels else (lambda img, y: D(img))

        # ---- G
        set_requires_grad(D, False)
        ctx.zero_grad(opt_G)
        z, gen_labels = self.sample_z(n), self.sample_labels(n)
        with ctx.autocast():
            gen_imgs = self.G(z, gen_labels)
            out_g = run_D(gen_imgs, gen_labels)
        g_loss, g_logs = g_loss_fn(out_g, gen_labels)
        ctx.backward(g_loss, "G")
        ctx.step(opt_G, "G")
        set_requires_grad(D, True)
        self.after_generator_step()

        # ---- D
        ctx.zero_grad(opt_D)
        with ctx.autocast():
            out_real = run_D(real, labels)
            out_fake = run_D(gen_imgs.detach(), gen_labels)
        d_loss, d_logs = d_loss_fn(out_real, labels, out_fake, gen_labels)
        ctx.backward(d_loss, "D")
        ctx.step(opt_D, "D")
        return self._detached({"D_loss": d_loss, "G_loss": g_loss, **g_logs, **d_logs})

    @staticmethod
    def _without_ddp(net: nn.Module) -> nn.Module:
        """``net`` without its DistributedDataParallel wrapper, for a pass whose parameters are
        frozen (no gradients to synchronise; a DDP wrapper with ``find_unused_parameters`` would
        otherwise wait for them)."""
        from ganengine.models.synthesis_tools import unwrap

        return unwrap(net)

    def _real_images(self, batch: dict, channels: int, size: int | None) -> torch.Tensor:
        real = self._to_device(batch["image"])
        if real.dim() != 4 or real.shape[1] != channels or (size is not None and tuple(real.shape[2:]) != (size, size)):
            want = f"(N, {channels}, {size}, {size})" if size is not None else f"(N, {channels}, H, W)"
            raise ValueError(f"{type(self).__name__}: expected real images of shape {want} (the network's channels "
                             f"and image size), got {tuple(real.shape)}; match --img_size/--channels (--imageSize/"
                             "--nc for DCGAN) to the data")
        self.check_batch_size(real.shape[0])
        return real

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size < 2:
            raise ValueError(f"{type(self).__name__} normalises with batch norm over the batch (as the reference "
                             f"networks): each batch needs at least 2 images, got {batch_size}; use --batch_size "
                             "2 or more")
