"""eriklindernoren/PyTorch-GAN networks on the fused ops: ``implementations/wgan_gp`` (also the
``wgan`` script's), ``cgan``, ``acgan`` and ``infogan``.

The reference classes read a global ``opt``; here its fields are constructor arguments of the same
names (``latent_dim``, ``n_classes``, ``code_dim``, ``img_size``, ``channels``), defaulting to each
script's own defaults. Module trees, layer order, state_dict keys and forward signatures are the
reference's, including its quirks:

* ``nn.BatchNorm1d(C, 0.8)`` / ``nn.BatchNorm2d(C, 0.8)`` pass 0.8 as ``eps`` (not momentum);
  the first norm of the AC-GAN / InfoGAN generators is ``BatchNorm2d(128)`` (eps 1e-5);
* cGAN: G(noise, labels) feeds ``cat(label_emb(labels), noise)``, D(img, labels) ``cat(img.flat,
  label_embedding(labels))``, D has Dropout(0.4) before two of its LeakyReLUs;
* AC-GAN: G multiplies ``label_emb(labels) * noise``; D returns ``(sigmoid validity, softmax
  class probabilities)`` (the reference then applies CrossEntropyLoss to the probabilities);
* InfoGAN: G(noise, one-hot labels, code) feeds ``cat(noise, labels, code)``; D returns
  ``(validity, softmax class probabilities, code)``, the validity without a sigmoid;
* AC-GAN / InfoGAN discriminators: Conv -> LeakyReLU -> Dropout2d(0.25) -> BatchNorm2d(C, 0.8)
  blocks, 4 stride-2 convs, so ``img_size`` must be a multiple of 16 (the reference's linear
  layers are sized ``img_size // 16``); ``init_type="normal"`` is their ``weights_init_normal``
  (conv weights N(0, 0.02), batch-norm weights N(1, 0.02), biases 0; linear layers and
  embeddings keep PyTorch's default init).

The reference's ``nn.Softmax()`` (implicit dim, 1 for these 2-D inputs) is ``nn.Softmax(dim=1)``
here: the same function, without the deprecation warning on every call.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ganengine.models._common import check_positive
from ganengine.models.synthesis_layers import finish_synthesis


def weights_init_normal(m: nn.Module) -> None:
    """acgan.py / infogan.py ``weights_init_normal`` (by class name)."""
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        nn.init.normal_(m.weight.data, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        nn.init.normal_(m.weight.data, 1.0, 0.02)
        nn.init.constant_(m.bias.data, 0.0)


def _init(net: nn.Module, init_type) -> None:
    if init_type == "normal":
        net.apply(weights_init_normal)
    elif init_type is not None:
        raise ValueError(f"init_type must be 'normal' (the reference weights_init_normal) or None (PyTorch "
                         f"default), got {init_type!r}")


def init_in_reference_order(fused: bool, *nets: nn.Module) -> None:
    """PyTorch-GAN's acgan.py / infogan.py build G and D, then apply weights_init_normal to G and
    then to D: the nets (built with init_type=None, fused=False) initialised in that order, so
    that one seed gives the script's weights, then put on the fused ops (same parameters)."""
    for net in nets:
        _init(net, "normal")
    for net in nets:
        finish_synthesis(net, fused)


def _mlp_block(in_feat: int, out_feat: int, normalize: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Linear(in_feat, out_feat)]
    if normalize:
        layers.append(nn.BatchNorm1d(out_feat, 0.8))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return layers


def _mlp_generator(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(*_mlp_block(in_dim, 128, normalize=False), *_mlp_block(128, 256), *_mlp_block(256, 512),
                         *_mlp_block(512, 1024), nn.Linear(1024, out_dim), nn.Tanh())


def _check_labels(owner: str, labels: torch.Tensor, n: int) -> None:
    if labels.dim() != 1 or labels.shape[0] != n or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{owner}: labels must be ({n},) class indices (int64), got {tuple(labels.shape)} "
                         f"{labels.dtype}")


def _check_image(owner: str, img: torch.Tensor, channels: int, img_size: int) -> None:
    if img.dim() != 4 or tuple(img.shape[1:]) != (channels, img_size, img_size):
        raise ValueError(f"{owner}: expected images of shape (N, {channels}, {img_size}, {img_size}) (channels, "
                         f"img_size), got {tuple(img.shape)}")


# ----------------------------------------------------------------------------- WGAN / WGAN-GP
class WGANGPGenerator(nn.Module):
    """wgan_gp.py / wgan.py ``Generator``: z (N, latent_dim) -> (N, channels, img_size, img_size)."""

    def __init__(self, latent_dim: int = 100, img_size: int = 28, channels: int = 1, init_type=None,
                 fused: bool = True):
        super().__init__()
        check_positive("WGANGPGenerator", latent_dim=latent_dim, img_size=img_size, channels=channels)
        self.latent_dim, self.img_shape = latent_dim, (channels, img_size, img_size)
        self.model = _mlp_generator(latent_dim, channels * img_size * img_size)
        _init(self, init_type)
        finish_synthesis(self, fused)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"WGANGPGenerator: expected z of shape (N, {self.latent_dim}) (latent_dim), got "
                             f"{tuple(z.shape)}")
        img = self.model(z)
        return img.view(img.shape[0], *self.img_shape)


class WGANGPDiscriminator(nn.Module):
    """wgan_gp.py / wgan.py ``Discriminator`` (critic): images -> (N, 1) scores, no sigmoid."""

    def __init__(self, img_size: int = 28, channels: int = 1, init_type=None, fused: bool = True):
        super().__init__()
        check_positive("WGANGPDiscriminator", img_size=img_size, channels=channels)
        self.img_shape = (channels, img_size, img_size)
        self.model = nn.Sequential(nn.Linear(channels * img_size * img_size, 512), nn.LeakyReLU(0.2, inplace=True),
                                   nn.Linear(512, 256), nn.LeakyReLU(0.2, inplace=True), nn.Linear(256, 1))
        _init(self, init_type)
        finish_synthesis(self, fused)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        _check_image("WGANGPDiscriminator", img, *self.img_shape[:2])
        return self.model(img.reshape(img.shape[0], -1))


# ----------------------------------------------------------------------------- cGAN
class CGANGenerator(nn.Module):
    """cgan.py ``Generator``: (noise (N, latent_dim), labels (N,)) -> images."""

    def __init__(self, latent_dim: int = 100, n_classes: int = 10, img_size: int = 32, channels: int = 1,
                 init_type=None, fused: bool = True):
        super().__init__()
        check_positive("CGANGenerator", latent_dim=latent_dim, n_classes=n_classes, img_size=img_size,
                       channels=channels)
        self.latent_dim, self.n_classes, self.img_shape = latent_dim, n_classes, (channels, img_size, img_size)
        self.label_emb = nn.Embedding(n_classes, n_classes)
        self.model = _mlp_generator(latent_dim + n_classes, channels * img_size * img_size)
        _init(self, init_type)
        finish_synthesis(self, fused)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if noise.dim() != 2 or noise.shape[1] != self.latent_dim:
            raise ValueError(f"CGANGenerator: expected noise of shape (N, {self.latent_dim}) (latent_dim), got "
                             f"{tuple(noise.shape)}")
        _check_labels("CGANGenerator", labels, noise.shape[0])
        img = self.model(torch.cat((self.label_emb(labels), noise), -1))
        return img.view(img.size(0), *self.img_shape)


class CGANDiscriminator(nn.Module):
    """cgan.py ``Discriminator``: (images, labels) -> (N, 1) scores (no sigmoid; the reference's
    loss is MSE)."""

    def __init__(self, n_classes: int = 10, img_size: int = 32, channels: int = 1, init_type=None,
                 fused: bool = True):
        super().__init__()
        check_positive("CGANDiscriminator", n_classes=n_classes, img_size=img_size, channels=channels)
        self.n_classes, self.img_shape = n_classes, (channels, img_size, img_size)
        self.label_embedding = nn.Embedding(n_classes, n_classes)
        self.model = nn.Sequential(
            nn.Linear(n_classes + channels * img_size * img_size, 512), nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(512, 512), nn.Dropout(0.4), nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(512, 512), nn.Dropout(0.4), nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(512, 1))
        _init(self, init_type)
        finish_synthesis(self, fused)

    def forward(self, img: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_image("CGANDiscriminator", img, *self.img_shape[:2])
        _check_labels("CGANDiscriminator", labels, img.shape[0])
        return self.model(torch.cat((img.reshape(img.size(0), -1), self.label_embedding(labels)), -1))


# ----------------------------------------------------------------------------- AC-GAN / InfoGAN
def _conv_generator_blocks(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(128), nn.Upsample(scale_factor=2), nn.Conv2d(128, 128, 3, stride=1, padding=1),
        nn.BatchNorm2d(128, 0.8), nn.LeakyReLU(0.2, inplace=True), nn.Upsample(scale_factor=2),
        nn.Conv2d(128, 64, 3, stride=1, padding=1), nn.BatchNorm2d(64, 0.8), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(64, channels, 3, stride=1, padding=1), nn.Tanh())


def _conv_discriminator_blocks(channels: int) -> nn.Sequential:
    def block(in_filters, out_filters, bn=True):
        layers = [nn.Conv2d(in_filters, out_filters, 3, 2, 1), nn.LeakyReLU(0.2, inplace=True), nn.Dropout2d(0.25)]
        if bn:
            layers.append(nn.BatchNorm2d(out_filters, 0.8))
        return layers

    return nn.Sequential(*block(channels, 16, bn=False), *block(16, 32), *block(32, 64), *block(64, 128))


def _check_img_size_16(owner: str, img_size: int) -> int:
    if img_size % 16:
        raise ValueError(f"{owner}: img_size must be a multiple of 16 (four stride-2 convs, then linear layers sized "
                         f"for img_size // 16 as in the reference, which fails on other sizes), got {img_size}")
    return img_size // 16


class _ConvGenerator(nn.Module):
    def _setup(self, in_dim: int, img_size: int, channels: int):
        if img_size < 4:
            raise ValueError(f"{type(self).__name__}: img_size must be >= 4, got {img_size}")
        self.init_size = img_size // 4  # the reference's initial size before two 2x upsamplings
        self.l1 = nn.Sequential(nn.Linear(in_dim, 128 * self.init_size ** 2))
        self.conv_blocks = _conv_generator_blocks(channels)

    def _image(self, gen_input: torch.Tensor) -> torch.Tensor:
        out = self.l1(gen_input)
        return self.conv_blocks(out.view(out.shape[0], 128, self.init_size, self.init_size))


class ACGANGenerator(_ConvGenerator):
    """acgan.py ``Generator``: (noise (N, latent_dim), labels (N,)) -> images; the label embedding
    multiplies the noise."""

    def __init__(self, latent_dim: int = 100, n_classes: int = 10, img_size: int = 32, channels: int = 1,
                 init_type: str | None = "normal", fused: bool = True):
        super().__init__()
        check_positive("ACGANGenerator", latent_dim=latent_dim, n_classes=n_classes, img_size=img_size,
                       channels=channels)
        self.latent_dim, self.n_classes = latent_dim, n_classes
        self.label_emb = nn.Embedding(n_classes, latent_dim)
        self._setup(latent_dim, img_size, channels)
        _init(self, init_type)
        finish_synthesis(self, fused)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if noise.dim() != 2 or noise.shape[1] != self.latent_dim:
            raise ValueError(f"ACGANGenerator: expected noise of shape (N, {self.latent_dim}) (latent_dim), got "
                             f"{tuple(noise.shape)}")
        _check_labels("ACGANGenerator", labels, noise.shape[0])
        return self._image(torch.mul(self.label_emb(labels), noise))


class ACGANDiscriminator(nn.Module):
    """acgan.py ``Discriminator``: images -> (validity (N, 1) in (0, 1), class probabilities
    (N, n_classes))."""

    def __init__(self, n_classes: int = 10, img_size: int = 32, channels: int = 1,
                 init_type: str | None = "normal", fused: bool = True):
        super().__init__()
        check_positive("ACGANDiscriminator", n_classes=n_classes, img_size=img_size, channels=channels)
        ds_size = _check_img_size_16("ACGANDiscriminator", img_size)
        self.n_classes, self.img_shape = n_classes, (channels, img_size, img_size)
        self.conv_blocks = _conv_discriminator_blocks(channels)
        self.adv_layer = nn.Sequential(nn.Linear(128 * ds_size ** 2, 1), nn.Sigmoid())
        self.aux_layer = nn.Sequential(nn.Linear(128 * ds_size ** 2, n_classes), nn.Softmax(dim=1))
        _init(self, init_type)
        finish_synthesis(self, fused)

    def features(self, img: torch.Tensor) -> torch.Tensor:
        _check_image(type(self).__name__, img, *self.img_shape[:2])
        out = self.conv_blocks(img)
        return out.reshape(out.shape[0], -1)

    def forward(self, img: torch.Tensor):
        out = self.features(img)
        return self.adv_layer(out), self.aux_layer(out)


class InfoGANGenerator(_ConvGenerator):
    """infogan.py ``Generator``: (noise (N, latent_dim), one-hot labels (N, n_classes), code
    (N, code_dim)) -> images."""

    def __init__(self, latent_dim: int = 62, n_classes: int = 10, code_dim: int = 2, img_size: int = 32,
                 channels: int = 1, init_type: str | None = "normal", fused: bool = True):
        super().__init__()
        check_positive("InfoGANGenerator", latent_dim=latent_dim, n_classes=n_classes, code_dim=code_dim,
                       img_size=img_size, channels=channels)
        self.latent_dim, self.n_classes, self.code_dim = latent_dim, n_classes, code_dim
        self._setup(latent_dim + n_classes + code_dim, img_size, channels)
        _init(self, init_type)
        finish_synthesis(self, fused)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        n = noise.shape[0]
        for name, t, width in (("noise", noise, self.latent_dim), ("labels", labels, self.n_classes),
                               ("code", code, self.code_dim)):
            if t.dim() != 2 or t.shape != (n, width):
                raise ValueError(f"InfoGANGenerator: expected {name} of shape ({n}, {width}), got {tuple(t.shape)}"
                                 + (" (labels are one-hot floats, as the reference's to_categorical)"
                                    if name == "labels" else ""))
        return self._image(torch.cat((noise, labels, code), -1))


class InfoGANDiscriminator(ACGANDiscriminator):
    """infogan.py ``Discriminator``: images -> (validity (N, 1) without sigmoid, class
    probabilities (N, n_classes), code (N, code_dim))."""

    def __init__(self, n_classes: int = 10, code_dim: int = 2, img_size: int = 32, channels: int = 1,
                 init_type: str | None = "normal", fused: bool = True):
        nn.Module.__init__(self)
        check_positive("InfoGANDiscriminator", n_classes=n_classes, code_dim=code_dim, img_size=img_size,
                       channels=channels)
        ds_size = _check_img_size_16("InfoGANDiscriminator", img_size)
        self.n_classes, self.code_dim, self.img_shape = n_classes, code_dim, (channels, img_size, img_size)
        self.conv_blocks = _conv_discriminator_blocks(channels)
        self.adv_layer = nn.Sequential(nn.Linear(128 * ds_size ** 2, 1))
        self.aux_layer = nn.Sequential(nn.Linear(128 * ds_size ** 2, n_classes), nn.Softmax(dim=1))
        self.latent_layer = nn.Sequential(nn.Linear(128 * ds_size ** 2, code_dim))
        _init(self, init_type)
        finish_synthesis(self, fused)

    def forward(self, img: torch.Tensor):
        out = self.features(img)
        return self.adv_layer(out), self.aux_layer(out), self.latent_layer(out)


# ----------------------------------------------------------------------------- reference checkpoints
# arch -> (defaults of the reference script's ``opt`` fields that shape the networks, builder,
# infer). G and D of one script take the same fields (the script's ``opt``); a field a network
# does not use is accepted and ignored, as the reference class ignores it.
_WGAN_GP = dict(latent_dim=100, img_size=28, channels=1)
_CGAN = dict(latent_dim=100, n_classes=10, img_size=32, channels=1)
_INFOGAN = dict(latent_dim=62, n_classes=10, code_dim=2, img_size=32, channels=1)


def _builder(cls, names, default_init=None):
    def build(args, fused=True, init_type="default"):
        init = default_init if init_type == "default" else init_type
        return cls(**{k: args[k] for k in names}, init_type=init, fused=fused)
    return build


def _image_args(pixels: int) -> dict:
    """(img_size, channels) with channels * img_size**2 == pixels (the checkpoint holds only the
    product): grayscale if it is a square, else RGB."""
    for c in (1, 3, 4, 2):
        s = math.isqrt(pixels // c) if pixels % c == 0 else 0
        if s and s * s * c == pixels:
            return dict(img_size=s, channels=c)
    raise ValueError(f"{pixels} pixels are no channels x img_size x img_size")


def _infer_wgan_g(sd):
    return "wgan_gp_G", dict(latent_dim=sd["model.0.weight"].shape[1], **_image_args(sd["model.11.weight"].shape[0]))


def _infer_wgan_d(sd):
    return "wgan_gp_D", _image_args(sd["model.0.weight"].shape[1])


def _infer_cgan_g(sd):
    k = sd["label_emb.weight"].shape[0]
    return "cgan_G", dict(latent_dim=sd["model.0.weight"].shape[1] - k, n_classes=k,
                          **_image_args(sd["model.11.weight"].shape[0]))


def _infer_cgan_d(sd):
    k = sd["label_embedding.weight"].shape[0]
    return "cgan_D", dict(n_classes=k, **_image_args(sd["model.0.weight"].shape[1] - k))


def _conv_g_image(sd) -> dict:
    init = math.isqrt(sd["l1.0.weight"].shape[0] // 128)
    return dict(img_size=4 * init, channels=sd["conv_blocks.9.weight"].shape[0])


def _conv_d_image(sd) -> dict:
    ds = math.isqrt(sd["adv_layer.0.weight"].shape[1] // 128)
    return dict(img_size=16 * ds, channels=sd["conv_blocks.0.weight"].shape[1])


def _infer_acgan_g(sd):
    k, latent = sd["label_emb.weight"].shape
    return "acgan_G", dict(latent_dim=latent, n_classes=k, **_conv_g_image(sd))


def _infer_acgan_d(sd):
    return "acgan_D", dict(n_classes=sd["aux_layer.0.weight"].shape[0], **_conv_d_image(sd))


def _infer_infogan_g(sd):
    # only latent_dim + n_classes + code_dim is stored: split it with the default label and code sizes
    # (every split gives the same shapes), shrunk where the total is too small for them (each size >= 1)
    total = sd["l1.0.weight"].shape[1]
    code_dim = min(_INFOGAN["code_dim"], max(1, total - 2))
    n_classes = min(_INFOGAN["n_classes"], max(1, total - code_dim - 1))
    return "infogan_G", dict(latent_dim=total - n_classes - code_dim, n_classes=n_classes, code_dim=code_dim,
                             **_conv_g_image(sd))


def _infer_infogan_d(sd):
    return "infogan_D", dict(n_classes=sd["aux_layer.0.weight"].shape[0], code_dim=sd["latent_layer.0.weight"].shape[0],
                             **_conv_d_image(sd))


SPECS = {
    "wgan_gp_G": (dict(_WGAN_GP), _builder(WGANGPGenerator, ("latent_dim", "img_size", "channels")), _infer_wgan_g),
    "wgan_gp_D": (dict(_WGAN_GP), _builder(WGANGPDiscriminator, ("img_size", "channels")), _infer_wgan_d),
    "cgan_G": (dict(_CGAN), _builder(CGANGenerator, ("latent_dim", "n_classes", "img_size", "channels")),
               _infer_cgan_g),
    "cgan_D": (dict(_CGAN), _builder(CGANDiscriminator, ("n_classes", "img_size", "channels")), _infer_cgan_d),
    "acgan_G": (dict(_CGAN), _builder(ACGANGenerator, ("latent_dim", "n_classes", "img_size", "channels"), "normal"),
                _infer_acgan_g),
    "acgan_D": (dict(_CGAN), _builder(ACGANDiscriminator, ("n_classes", "img_size", "channels"), "normal"),
                _infer_acgan_d),
    "infogan_G": (dict(_INFOGAN), _builder(InfoGANGenerator, ("latent_dim", "n_classes", "code_dim", "img_size",
                                                             "channels"), "normal"), _infer_infogan_g),
    "infogan_D": (dict(_INFOGAN), _builder(InfoGANDiscriminator, ("n_classes", "code_dim", "img_size", "channels"),
                                           "normal"), _infer_infogan_d),
}
