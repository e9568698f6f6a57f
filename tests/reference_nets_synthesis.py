"""Compact, faithful re-writes of the reference synthesis networks and training steps: the oracle
for tests/test_synthesis_models.py.

Rewritten from (read, not copied):
* pytorch/examples dcgan/main.py (Generator, Discriminator, weights_init, the training loop),
* eriklindernoren/PyTorch-GAN implementations/wgan/wgan.py, wgan_gp/wgan_gp.py, cgan/cgan.py,
  acgan/acgan.py, infogan/infogan.py (their global ``opt`` fields passed as arguments).

Module trees, attribute names, layer order, the init functions and the order of the training
operations must stay exactly the reference's. The random draws of the reference loops (numpy's
noise, labels, codes, gradient-penalty alphas) are arguments here, so the tests can hand both
sides the same ones.
"""
import itertools

import numpy as np
import torch
import torch.autograd as autograd
from torch import nn


# ------------------------------------------------------------------ DCGAN (pytorch/examples)
def dcgan_weights_init(m):
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        torch.nn.init.normal_(m.weight, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        torch.nn.init.normal_(m.weight, 1.0, 0.02)
        torch.nn.init.zeros_(m.bias)


class DCGAN_G(nn.Module):
    def __init__(self, nz=100, ngf=64, nc=3):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())

    def forward(self, input):
        return self.main(input)


class DCGAN_D(nn.Module):
    def __init__(self, ndf=64, nc=3):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid())

    def forward(self, input):
        return self.main(input).view(-1, 1).squeeze(1)


def dcgan_step(netG, netD, optimizerG, optimizerD, real, noise):
    criterion = nn.BCELoss()
    netD.zero_grad()
    label = torch.full((real.size(0),), 1.0)
    output = netD(real)
    errD_real = criterion(output, label)
    errD_real.backward()
    fake = netG(noise)
    label.fill_(0.0)
    output = netD(fake.detach())
    errD_fake = criterion(output, label)
    errD_fake.backward()
    optimizerD.step()
    netG.zero_grad()
    label.fill_(1.0)
    output = netD(fake)
    errG = criterion(output, label)
    errG.backward()
    optimizerG.step()
    return {"D_loss": errD_real + errD_fake, "G_loss": errG}


# ------------------------------------------------------------------ PyTorch-GAN: shared pieces
def _block(in_feat, out_feat, normalize=True):
    layers = [nn.Linear(in_feat, out_feat)]
    if normalize:
        layers.append(nn.BatchNorm1d(out_feat, 0.8))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return layers


def _mlp_g(in_dim, out_dim):
    return nn.Sequential(*_block(in_dim, 128, normalize=False), *_block(128, 256), *_block(256, 512),
                         *_block(512, 1024), nn.Linear(1024, out_dim), nn.Tanh())


def pytorch_gan_weights_init_normal(m):  # acgan.py / infogan.py
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        torch.nn.init.normal_(m.weight.data, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        torch.nn.init.normal_(m.weight.data, 1.0, 0.02)
        torch.nn.init.constant_(m.bias.data, 0.0)


# ------------------------------------------------------------------ wgan / wgan_gp
class WGAN_G(nn.Module):
    def __init__(self, latent_dim=100, img_size=28, channels=1):
        super().__init__()
        self.img_shape = (channels, img_size, img_size)
        self.model = _mlp_g(latent_dim, int(np.prod(self.img_shape)))

    def forward(self, z):
        img = self.model(z)
        return img.view(img.shape[0], *self.img_shape)


class WGAN_D(nn.Module):
    def __init__(self, img_size=28, channels=1):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(channels * img_size * img_size, 512), nn.LeakyReLU(0.2, inplace=True),
                                   nn.Linear(512, 256), nn.LeakyReLU(0.2, inplace=True), nn.Linear(256, 1))

    def forward(self, img):
        return self.model(img.view(img.shape[0], -1))


def wgan_step(generator, discriminator, optimizer_G, optimizer_D, real_imgs, z, i, n_critic=5, clip_value=0.01):
    """One iteration of wgan.py's loop (batch index i)."""
    optimizer_D.zero_grad()
    fake_imgs = generator(z).detach()
    loss_D = -torch.mean(discriminator(real_imgs)) + torch.mean(discriminator(fake_imgs))
    loss_D.backward()
    optimizer_D.step()
    for p in discriminator.parameters():
        p.data.clamp_(-clip_value, clip_value)
    out = {"D_loss": loss_D}
    if i % n_critic == 0:
        optimizer_G.zero_grad()
        gen_imgs = generator(z)
        loss_G = -torch.mean(discriminator(gen_imgs))
        loss_G.backward()
        optimizer_G.step()
        out["G_loss"] = loss_G
    return out


def compute_gradient_penalty(D, real_samples, fake_samples, alpha):
    interpolates = (alpha * real_samples + ((1 - alpha) * fake_samples)).requires_grad_(True)
    d_interpolates = D(interpolates)
    fake = torch.ones(real_samples.shape[0], 1)
    gradients = autograd.grad(outputs=d_interpolates, inputs=interpolates, grad_outputs=fake, create_graph=True,
                              retain_graph=True, only_inputs=True)[0]
    gradients = gradients.view(gradients.size(0), -1)
    return ((gradients.norm(2, dim=1) - 1) ** 2).mean()


def wgan_gp_step(generator, discriminator, optimizer_G, optimizer_D, real_imgs, z, alpha, i, n_critic=5,
                 lambda_gp=10):
    """One iteration of wgan_gp.py's loop (batch index i); alpha (N, 1, 1, 1)."""
    optimizer_D.zero_grad()
    fake_imgs = generator(z)
    real_validity = discriminator(real_imgs)
    fake_validity = discriminator(fake_imgs)
    gradient_penalty = compute_gradient_penalty(discriminator, real_imgs.data, fake_imgs.data, alpha)
    d_loss = -torch.mean(real_validity) + torch.mean(fake_validity) + lambda_gp * gradient_penalty
    d_loss.backward()
    optimizer_D.step()
    optimizer_G.zero_grad()
    out = {"D_loss": d_loss}
    if i % n_critic == 0:
        fake_imgs = generator(z)
        fake_validity = discriminator(fake_imgs)
        g_loss = -torch.mean(fake_validity)
        g_loss.backward()
        optimizer_G.step()
        out["G_loss"] = g_loss
    return out


# ------------------------------------------------------------------ cgan
class CGAN_G(nn.Module):
    def __init__(self, latent_dim=100, n_classes=10, img_size=32, channels=1):
        super().__init__()
        self.img_shape = (channels, img_size, img_size)
        self.label_emb = nn.Embedding(n_classes, n_classes)
        self.model = _mlp_g(latent_dim + n_classes, int(np.prod(self.img_shape)))

    def forward(self, noise, labels):
        img = self.model(torch.cat((self.label_emb(labels), noise), -1))
        return img.view(img.size(0), *self.img_shape)


class CGAN_D(nn.Module):
    def __init__(self, n_classes=10, img_size=32, channels=1):
        super().__init__()
        self.label_embedding = nn.Embedding(n_classes, n_classes)
        self.model = nn.Sequential(
            nn.Linear(n_classes + channels * img_size * img_size, 512), nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(512, 512), nn.Dropout(0.4), nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(512, 512), nn.Dropout(0.4), nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(512, 1))

    def forward(self, img, labels):
        return self.model(torch.cat((img.view(img.size(0), -1), self.label_embedding(labels)), -1))


def cgan_step(generator, discriminator, optimizer_G, optimizer_D, real_imgs, labels, z, gen_labels):
    adversarial_loss = torch.nn.MSELoss()
    n = real_imgs.shape[0]
    valid, fake = torch.ones(n, 1), torch.zeros(n, 1)
    optimizer_G.zero_grad()
    gen_imgs = generator(z, gen_labels)
    g_loss = adversarial_loss(discriminator(gen_imgs, gen_labels), valid)
    g_loss.backward()
    optimizer_G.step()
    optimizer_D.zero_grad()
    d_real_loss = adversarial_loss(discriminator(real_imgs, labels), valid)
    d_fake_loss = adversarial_loss(discriminator(gen_imgs.detach(), gen_labels), fake)
    d_loss = (d_real_loss + d_fake_loss) / 2
    d_loss.backward()
    optimizer_D.step()
    return {"D_loss": d_loss, "G_loss": g_loss}


# ------------------------------------------------------------------ acgan / infogan
def _conv_g_blocks(channels):
    return nn.Sequential(
        nn.BatchNorm2d(128), nn.Upsample(scale_factor=2), nn.Conv2d(128, 128, 3, stride=1, padding=1),
        nn.BatchNorm2d(128, 0.8), nn.LeakyReLU(0.2, inplace=True), nn.Upsample(scale_factor=2),
        nn.Conv2d(128, 64, 3, stride=1, padding=1), nn.BatchNorm2d(64, 0.8), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(64, channels, 3, stride=1, padding=1), nn.Tanh())


def _conv_d_blocks(channels):
    def discriminator_block(in_filters, out_filters, bn=True):
        block = [nn.Conv2d(in_filters, out_filters, 3, 2, 1), nn.LeakyReLU(0.2, inplace=True), nn.Dropout2d(0.25)]
        if bn:
            block.append(nn.BatchNorm2d(out_filters, 0.8))
        return block

    return nn.Sequential(*discriminator_block(channels, 16, bn=False), *discriminator_block(16, 32),
                         *discriminator_block(32, 64), *discriminator_block(64, 128))


class ACGAN_G(nn.Module):
    def __init__(self, latent_dim=100, n_classes=10, img_size=32, channels=1):
        super().__init__()
        self.label_emb = nn.Embedding(n_classes, latent_dim)
        self.init_size = img_size // 4
        self.l1 = nn.Sequential(nn.Linear(latent_dim, 128 * self.init_size ** 2))
        self.conv_blocks = _conv_g_blocks(channels)

    def forward(self, noise, labels):
        out = self.l1(torch.mul(self.label_emb(labels), noise))
        return self.conv_blocks(out.view(out.shape[0], 128, self.init_size, self.init_size))


class ACGAN_D(nn.Module):
    def __init__(self, n_classes=10, img_size=32, channels=1):
        super().__init__()
        self.conv_blocks = _conv_d_blocks(channels)
        ds_size = img_size // 2 ** 4
        self.adv_layer = nn.Sequential(nn.Linear(128 * ds_size ** 2, 1), nn.Sigmoid())
        self.aux_layer = nn.Sequential(nn.Linear(128 * ds_size ** 2, n_classes), nn.Softmax(dim=1))

    def forward(self, img):
        out = self.conv_blocks(img)
        out = out.view(out.shape[0], -1)
        return self.adv_layer(out), self.aux_layer(out)


def acgan_step(generator, discriminator, optimizer_G, optimizer_D, real_imgs, labels, z, gen_labels):
    adversarial_loss, auxiliary_loss = torch.nn.BCELoss(), torch.nn.CrossEntropyLoss()
    n = real_imgs.shape[0]
    valid, fake = torch.ones(n, 1), torch.zeros(n, 1)
    optimizer_G.zero_grad()
    gen_imgs = generator(z, gen_labels)
    validity, pred_label = discriminator(gen_imgs)
    g_loss = 0.5 * (adversarial_loss(validity, valid) + auxiliary_loss(pred_label, gen_labels))
    g_loss.backward()
    optimizer_G.step()
    optimizer_D.zero_grad()
    real_pred, real_aux = discriminator(real_imgs)
    d_real_loss = (adversarial_loss(real_pred, valid) + auxiliary_loss(real_aux, labels)) / 2
    fake_pred, fake_aux = discriminator(gen_imgs.detach())
    d_fake_loss = (adversarial_loss(fake_pred, fake) + auxiliary_loss(fake_aux, gen_labels)) / 2
    d_loss = (d_real_loss + d_fake_loss) / 2
    d_loss.backward()
    optimizer_D.step()
    return {"D_loss": d_loss, "G_loss": g_loss}


class InfoGAN_G(nn.Module):
    def __init__(self, latent_dim=62, n_classes=10, code_dim=2, img_size=32, channels=1):
        super().__init__()
        self.init_size = img_size // 4
        self.l1 = nn.Sequential(nn.Linear(latent_dim + n_classes + code_dim, 128 * self.init_size ** 2))
        self.conv_blocks = _conv_g_blocks(channels)

    def forward(self, noise, labels, code):
        out = self.l1(torch.cat((noise, labels, code), -1))
        return self.conv_blocks(out.view(out.shape[0], 128, self.init_size, self.init_size))


class InfoGAN_D(nn.Module):
    def __init__(self, n_classes=10, code_dim=2, img_size=32, channels=1):
        super().__init__()
        self.conv_blocks = _conv_d_blocks(channels)
        ds_size = img_size // 2 ** 4
        self.adv_layer = nn.Sequential(nn.Linear(128 * ds_size ** 2, 1))
        self.aux_layer = nn.Sequential(nn.Linear(128 * ds_size ** 2, n_classes), nn.Softmax(dim=1))
        self.latent_layer = nn.Sequential(nn.Linear(128 * ds_size ** 2, code_dim))

    def forward(self, img):
        out = self.conv_blocks(img)
        out = out.view(out.shape[0], -1)
        return self.adv_layer(out), self.aux_layer(out), self.latent_layer(out)


def to_categorical(y, num_columns):
    y_cat = torch.zeros(y.shape[0], num_columns)
    y_cat[range(y.shape[0]), y] = 1.0
    return y_cat


def infogan_optimizers(generator, discriminator, lr=0.0002, b1=0.5, b2=0.999):
    return (torch.optim.Adam(generator.parameters(), lr=lr, betas=(b1, b2)),
            torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(b1, b2)),
            torch.optim.Adam(itertools.chain(generator.parameters(), discriminator.parameters()), lr=lr,
                             betas=(b1, b2)))


def infogan_step(generator, discriminator, optimizer_G, optimizer_D, optimizer_info, real_imgs, draws,
                 n_classes=10, lambda_cat=1.0, lambda_con=0.1):
    """draws: (z, label indices, code) for the G step, then (z, label indices, code) for the info step."""
    adversarial_loss, categorical_loss, continuous_loss = torch.nn.MSELoss(), torch.nn.CrossEntropyLoss(), torch.nn.MSELoss()
    n = real_imgs.shape[0]
    valid, fake = torch.ones(n, 1), torch.zeros(n, 1)
    (z, lab, code), (z2, lab2, code2) = draws
    optimizer_G.zero_grad()
    gen_imgs = generator(z, to_categorical(lab, n_classes), code)
    validity, _, _ = discriminator(gen_imgs)
    g_loss = adversarial_loss(validity, valid)
    g_loss.backward()
    optimizer_G.step()
    optimizer_D.zero_grad()
    real_pred, _, _ = discriminator(real_imgs)
    d_real_loss = adversarial_loss(real_pred, valid)
    fake_pred, _, _ = discriminator(gen_imgs.detach())
    d_fake_loss = adversarial_loss(fake_pred, fake)
    d_loss = (d_real_loss + d_fake_loss) / 2
    d_loss.backward()
    optimizer_D.step()
    optimizer_info.zero_grad()
    gen_imgs = generator(z2, to_categorical(lab2, n_classes), code2)
    _, pred_label, pred_code = discriminator(gen_imgs)
    info_loss = lambda_cat * categorical_loss(pred_label, lab2) + lambda_con * continuous_loss(pred_code, code2)
    info_loss.backward()
    optimizer_info.step()
    return {"D_loss": d_loss, "G_loss": g_loss, "info_loss": info_loss}


def adam(params, lr=0.0002, b1=0.5, b2=0.999):
    return torch.optim.Adam(params, lr=lr, betas=(b1, b2))
