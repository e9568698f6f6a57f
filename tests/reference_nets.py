"""Compact, faithful copies of the reference networks: the oracle for tests/test_models.py.

Rewritten from (read with the search tools, not copied):
* junyanz/pytorch-CycleGAN-and-pix2pix models/networks.py (current master: InstanceNorm2d with
  affine=False, track_running_stats=False; norm "none" gives Identity layers and bias-free convs),
* yunjey/stargan model.py,
* hanzhanggit/StackGAN-Pytorch code/model.py and code/miscc/utils.py (config values passed as
  arguments instead of the global ``cfg``).

Module trees, attribute names, layer order and the init functions must stay exactly the
reference's: the tests compare state_dict keys, shapes, parameter counts, initial weights drawn
from the same seed and outputs against these classes.
"""
import functools

import torch
from torch import nn
from torch.nn import init


# ------------------------------------------------------------------ CycleGAN / pix2pix
class Identity(nn.Module):
    def forward(self, x):
        return x


def get_norm_layer(norm_type="instance"):
    if norm_type == "batch":
        return functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True)
    if norm_type == "instance":
        return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    if norm_type == "none":
        def norm_layer(x):
            return Identity()
        return norm_layer
    raise NotImplementedError(norm_type)


def _use_bias(norm_layer):
    if type(norm_layer) == functools.partial:
        return norm_layer.func == nn.InstanceNorm2d
    return norm_layer == nn.InstanceNorm2d


def init_weights(net, init_type="normal", init_gain=0.02):
    def init_func(m):
        classname = m.__class__.__name__
        if hasattr(m, "weight") and (classname.find("Conv") != -1 or classname.find("Linear") != -1):
            if init_type == "normal":
                init.normal_(m.weight.data, 0.0, init_gain)
            elif init_type == "xavier":
                init.xavier_normal_(m.weight.data, gain=init_gain)
            elif init_type == "kaiming":
                init.kaiming_normal_(m.weight.data, a=0, mode="fan_in")
            elif init_type == "orthogonal":
                init.orthogonal_(m.weight.data, gain=init_gain)
            if hasattr(m, "bias") and m.bias is not None:
                init.constant_(m.bias.data, 0.0)
        elif classname.find("BatchNorm2d") != -1:
            init.normal_(m.weight.data, 1.0, init_gain)
            init.constant_(m.bias.data, 0.0)

    net.apply(init_func)
    return net


class ResnetBlock(nn.Module):
    def __init__(self, dim, padding_type, norm_layer, use_dropout, use_bias):
        super().__init__()
        layers = []
        for second in (False, True):
            p = 0
            if padding_type == "reflect":
                layers.append(nn.ReflectionPad2d(1))
            elif padding_type == "replicate":
                layers.append(nn.ReplicationPad2d(1))
            else:
                p = 1
            layers += [nn.Conv2d(dim, dim, kernel_size=3, padding=p, bias=use_bias), norm_layer(dim)]
            if not second:
                layers.append(nn.ReLU(True))
                if use_dropout:
                    layers.append(nn.Dropout(0.5))
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    def __init__(self, input_nc, output_nc, ngf=64, norm_layer=nn.BatchNorm2d, use_dropout=False,
                 n_blocks=6, padding_type="reflect"):
        super().__init__()
        use_bias = _use_bias(norm_layer)
        model = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, kernel_size=7, padding=0, bias=use_bias),
                 norm_layer(ngf), nn.ReLU(True)]
        for i in range(2):
            mult = 2 ** i
            model += [nn.Conv2d(ngf * mult, ngf * mult * 2, kernel_size=3, stride=2, padding=1, bias=use_bias),
                      norm_layer(ngf * mult * 2), nn.ReLU(True)]
        for i in range(n_blocks):
            model += [ResnetBlock(ngf * 4, padding_type, norm_layer, use_dropout, use_bias)]
        for i in range(2):
            mult = 2 ** (2 - i)
            model += [nn.ConvTranspose2d(ngf * mult, int(ngf * mult / 2), kernel_size=3, stride=2, padding=1,
                                         output_padding=1, bias=use_bias),
                      norm_layer(int(ngf * mult / 2)), nn.ReLU(True)]
        model += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, kernel_size=7, padding=0), nn.Tanh()]
        self.model = nn.Sequential(*model)

    def forward(self, x):
        return self.model(x)


class UnetSkipConnectionBlock(nn.Module):
    def __init__(self, outer_nc, inner_nc, input_nc=None, submodule=None, outermost=False, innermost=False,
                 norm_layer=nn.BatchNorm2d, use_dropout=False):
        super().__init__()
        self.outermost = outermost
        use_bias = _use_bias(norm_layer)
        if input_nc is None:
            input_nc = outer_nc
        downconv = nn.Conv2d(input_nc, inner_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
        downrelu = nn.LeakyReLU(0.2, True)
        downnorm = norm_layer(inner_nc)
        uprelu = nn.ReLU(True)
        upnorm = norm_layer(outer_nc)
        if outermost:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1)
            model = [downconv, submodule, uprelu, upconv, nn.Tanh()]
        elif innermost:
            upconv = nn.ConvTranspose2d(inner_nc, outer_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
            model = [downrelu, downconv, uprelu, upconv, upnorm]
        else:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
            model = [downrelu, downconv, downnorm, submodule, uprelu, upconv, upnorm]
            if use_dropout:
                model += [nn.Dropout(0.5)]
        self.model = nn.Sequential(*model)

    def forward(self, x):
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    def __init__(self, input_nc, output_nc, num_downs, ngf=64, norm_layer=nn.BatchNorm2d, use_dropout=False):
        super().__init__()
        block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, submodule=None, norm_layer=norm_layer, innermost=True)
        for _ in range(num_downs - 5):
            block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, submodule=block, norm_layer=norm_layer,
                                            use_dropout=use_dropout)
        block = UnetSkipConnectionBlock(ngf * 4, ngf * 8, submodule=block, norm_layer=norm_layer)
        block = UnetSkipConnectionBlock(ngf * 2, ngf * 4, submodule=block, norm_layer=norm_layer)
        block = UnetSkipConnectionBlock(ngf, ngf * 2, submodule=block, norm_layer=norm_layer)
        self.model = UnetSkipConnectionBlock(output_nc, ngf, input_nc=input_nc, submodule=block, outermost=True,
                                             norm_layer=norm_layer)

    def forward(self, x):
        return self.model(x)


class NLayerDiscriminator(nn.Module):
    def __init__(self, input_nc, ndf=64, n_layers=3, norm_layer=nn.BatchNorm2d):
        super().__init__()
        use_bias = _use_bias(norm_layer)
        seq = [nn.Conv2d(input_nc, ndf, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=2, padding=1, bias=use_bias),
                    norm_layer(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=1, padding=1, bias=use_bias),
                norm_layer(ndf * mult), nn.LeakyReLU(0.2, True)]
        seq += [nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1)]
        self.model = nn.Sequential(*seq)

    def forward(self, x):
        return self.model(x)


class PixelDiscriminator(nn.Module):
    def __init__(self, input_nc, ndf=64, norm_layer=nn.BatchNorm2d):
        super().__init__()
        use_bias = _use_bias(norm_layer)
        self.net = nn.Sequential(
            nn.Conv2d(input_nc, ndf, kernel_size=1, stride=1, padding=0), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf, ndf * 2, kernel_size=1, stride=1, padding=0, bias=use_bias), norm_layer(ndf * 2),
            nn.LeakyReLU(0.2, True), nn.Conv2d(ndf * 2, 1, kernel_size=1, stride=1, padding=0, bias=use_bias))

    def forward(self, x):
        return self.net(x)


def define_G(input_nc, output_nc, ngf, netG, norm="batch", use_dropout=False, init_type="normal", init_gain=0.02):
    norm_layer = get_norm_layer(norm)
    if netG.startswith("resnet"):
        net = ResnetGenerator(input_nc, output_nc, ngf, norm_layer=norm_layer, use_dropout=use_dropout,
                              n_blocks=9 if netG == "resnet_9blocks" else 6)
    else:
        net = UnetGenerator(input_nc, output_nc, 8 if netG == "unet_256" else 7, ngf, norm_layer=norm_layer,
                            use_dropout=use_dropout)
    return init_weights(net, init_type, init_gain)


def define_D(input_nc, ndf, netD, n_layers_D=3, norm="batch", init_type="normal", init_gain=0.02):
    norm_layer = get_norm_layer(norm)
    if netD == "basic":
        net = NLayerDiscriminator(input_nc, ndf, 3, norm_layer)
    elif netD == "n_layers":
        net = NLayerDiscriminator(input_nc, ndf, n_layers_D, norm_layer)
    else:
        net = PixelDiscriminator(input_nc, ndf, norm_layer)
    return init_weights(net, init_type, init_gain)


# ------------------------------------------------------------------ StarGAN
class StarResidualBlock(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(dim_in, dim_out, kernel_size=3, stride=1, padding=1, bias=False),
            nn.InstanceNorm2d(dim_out, affine=True, track_running_stats=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim_out, dim_out, kernel_size=3, stride=1, padding=1, bias=False),
            nn.InstanceNorm2d(dim_out, affine=True, track_running_stats=True))

    def forward(self, x):
        return x + self.main(x)


class StarGenerator(nn.Module):
    def __init__(self, conv_dim=64, c_dim=5, repeat_num=6):
        super().__init__()
        layers = [nn.Conv2d(3 + c_dim, conv_dim, kernel_size=7, stride=1, padding=3, bias=False),
                  nn.InstanceNorm2d(conv_dim, affine=True, track_running_stats=True), nn.ReLU(inplace=True)]
        d = conv_dim
        for _ in range(2):
            layers += [nn.Conv2d(d, d * 2, kernel_size=4, stride=2, padding=1, bias=False),
                       nn.InstanceNorm2d(d * 2, affine=True, track_running_stats=True), nn.ReLU(inplace=True)]
            d *= 2
        layers += [StarResidualBlock(d, d) for _ in range(repeat_num)]
        for _ in range(2):
            layers += [nn.ConvTranspose2d(d, d // 2, kernel_size=4, stride=2, padding=1, bias=False),
                       nn.InstanceNorm2d(d // 2, affine=True, track_running_stats=True), nn.ReLU(inplace=True)]
            d //= 2
        layers += [nn.Conv2d(d, 3, kernel_size=7, stride=1, padding=3, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, x, c):
        c = c.view(c.size(0), c.size(1), 1, 1).repeat(1, 1, x.size(2), x.size(3))
        return self.main(torch.cat([x, c], dim=1))


class StarDiscriminator(nn.Module):
    def __init__(self, image_size=128, conv_dim=64, c_dim=5, repeat_num=6):
        super().__init__()
        layers = [nn.Conv2d(3, conv_dim, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.01)]
        d = conv_dim
        for _ in range(1, repeat_num):
            layers += [nn.Conv2d(d, d * 2, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.01)]
            d *= 2
        kernel_size = int(image_size / 2 ** repeat_num)
        self.main = nn.Sequential(*layers)
        self.conv1 = nn.Conv2d(d, 1, kernel_size=3, stride=1, padding=1, bias=False)
        self.conv2 = nn.Conv2d(d, c_dim, kernel_size=kernel_size, bias=False)

    def forward(self, x):
        h = self.main(x)
        out_cls = self.conv2(h)
        return self.conv1(h), out_cls.view(out_cls.size(0), out_cls.size(1))


# ------------------------------------------------------------------ StackGAN (config as arguments)
def conv3x3(i, o, stride=1):
    return nn.Conv2d(i, o, kernel_size=3, stride=stride, padding=1, bias=False)


def upBlock(i, o):
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv3x3(i, o), nn.BatchNorm2d(o), nn.ReLU(True))


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block = nn.Sequential(conv3x3(c, c), nn.BatchNorm2d(c), nn.ReLU(True), conv3x3(c, c), nn.BatchNorm2d(c))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.block(x)
        out += x
        return self.relu(out)


class CA_NET(nn.Module):
    def __init__(self, t_dim, c_dim):
        super().__init__()
        self.t_dim, self.c_dim = t_dim, c_dim
        self.fc = nn.Linear(t_dim, c_dim * 2, bias=True)
        self.relu = nn.ReLU()

    def forward(self, text_embedding):
        x = self.relu(self.fc(text_embedding))
        mu, logvar = x[:, :self.c_dim], x[:, self.c_dim:]
        std = logvar.mul(0.5).exp_()
        eps = torch.randn(std.size(), dtype=std.dtype, device=std.device)
        return eps.mul(std).add_(mu), mu, logvar


class D_GET_LOGITS(nn.Module):
    def __init__(self, ndf, nef, bcondition=True):
        super().__init__()
        self.df_dim, self.ef_dim, self.bcondition = ndf, nef, bcondition
        if bcondition:
            self.outlogits = nn.Sequential(conv3x3(ndf * 8 + nef, ndf * 8), nn.BatchNorm2d(ndf * 8),
                                           nn.LeakyReLU(0.2, inplace=True),
                                           nn.Conv2d(ndf * 8, 1, kernel_size=4, stride=4), nn.Sigmoid())
        else:
            self.outlogits = nn.Sequential(nn.Conv2d(ndf * 8, 1, kernel_size=4, stride=4), nn.Sigmoid())

    def forward(self, h_code, c_code=None):
        if self.bcondition and c_code is not None:
            c_code = c_code.view(-1, self.ef_dim, 1, 1).repeat(1, 1, 4, 4)
            h_code = torch.cat((h_code, c_code), 1)
        return self.outlogits(h_code).view(-1)


class STAGE1_G(nn.Module):
    def __init__(self, gf_dim=128, condition_dim=128, text_dim=1024, z_dim=100):
        super().__init__()
        self.gf_dim, self.ef_dim, self.z_dim = gf_dim * 8, condition_dim, z_dim
        ngf = self.gf_dim
        self.ca_net = CA_NET(text_dim, condition_dim)
        self.fc = nn.Sequential(nn.Linear(z_dim + condition_dim, ngf * 16, bias=False), nn.BatchNorm1d(ngf * 16),
                                nn.ReLU(True))
        self.upsample1 = upBlock(ngf, ngf // 2)
        self.upsample2 = upBlock(ngf // 2, ngf // 4)
        self.upsample3 = upBlock(ngf // 4, ngf // 8)
        self.upsample4 = upBlock(ngf // 8, ngf // 16)
        self.img = nn.Sequential(conv3x3(ngf // 16, 3), nn.Tanh())

    def forward(self, text_embedding, noise):
        c_code, mu, logvar = self.ca_net(text_embedding)
        h = self.fc(torch.cat((noise, c_code), 1)).view(-1, self.gf_dim, 4, 4)
        h = self.upsample4(self.upsample3(self.upsample2(self.upsample1(h))))
        return None, self.img(h), mu, logvar


def _d_encoder(ndf, stage):
    layers = [nn.Conv2d(3, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
    mults = [1, 2, 4, 8] if stage == 1 else [1, 2, 4, 8, 16, 32]
    for a, b in zip(mults[:-1], mults[1:]):
        layers += [nn.Conv2d(ndf * a, ndf * b, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * b),
                   nn.LeakyReLU(0.2, inplace=True)]
    if stage == 2:
        layers += [conv3x3(ndf * 32, ndf * 16), nn.BatchNorm2d(ndf * 16), nn.LeakyReLU(0.2, inplace=True),
                   conv3x3(ndf * 16, ndf * 8), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True)]
    return nn.Sequential(*layers)


class STAGE1_D(nn.Module):
    def __init__(self, df_dim=64, condition_dim=128):
        super().__init__()
        self.df_dim, self.ef_dim = df_dim, condition_dim
        self.encode_img = _d_encoder(df_dim, 1)
        self.get_cond_logits = D_GET_LOGITS(df_dim, condition_dim)
        self.get_uncond_logits = None

    def forward(self, image):
        return self.encode_img(image)


class STAGE2_G(nn.Module):
    def __init__(self, stage1_g, gf_dim=128, condition_dim=128, text_dim=1024, z_dim=100, r_num=4):
        super().__init__()
        self.gf_dim, self.ef_dim, self.z_dim = gf_dim, condition_dim, z_dim
        self.STAGE1_G = stage1_g
        for p in self.STAGE1_G.parameters():
            p.requires_grad = False
        ngf = gf_dim
        self.ca_net = CA_NET(text_dim, condition_dim)
        self.encoder = nn.Sequential(conv3x3(3, ngf), nn.ReLU(True),
                                     nn.Conv2d(ngf, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
                                     nn.Conv2d(ngf * 2, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4),
                                     nn.ReLU(True))
        self.hr_joint = nn.Sequential(conv3x3(condition_dim + ngf * 4, ngf * 4), nn.BatchNorm2d(ngf * 4), nn.ReLU(True))
        self.residual = nn.Sequential(*[ResBlock(ngf * 4) for _ in range(r_num)])
        self.upsample1 = upBlock(ngf * 4, ngf * 2)
        self.upsample2 = upBlock(ngf * 2, ngf)
        self.upsample3 = upBlock(ngf, ngf // 2)
        self.upsample4 = upBlock(ngf // 2, ngf // 4)
        self.img = nn.Sequential(conv3x3(ngf // 4, 3), nn.Tanh())

    def forward(self, text_embedding, noise):
        _, stage1_img, _, _ = self.STAGE1_G(text_embedding, noise)
        stage1_img = stage1_img.detach()
        encoded = self.encoder(stage1_img)
        c_code, mu, logvar = self.ca_net(text_embedding)
        c_code = c_code.view(-1, self.ef_dim, 1, 1).repeat(1, 1, 16, 16)
        h = self.residual(self.hr_joint(torch.cat([encoded, c_code], 1)))
        h = self.upsample4(self.upsample3(self.upsample2(self.upsample1(h))))
        return stage1_img, self.img(h), mu, logvar


class STAGE2_D(nn.Module):
    def __init__(self, df_dim=64, condition_dim=128):
        super().__init__()
        self.df_dim, self.ef_dim = df_dim, condition_dim
        self.encode_img = _d_encoder(df_dim, 2)
        self.get_cond_logits = D_GET_LOGITS(df_dim, condition_dim, bcondition=True)
        self.get_uncond_logits = D_GET_LOGITS(df_dim, condition_dim, bcondition=False)

    def forward(self, image):
        return self.encode_img(image)


def stackgan_weights_init(m):
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        m.weight.data.normal_(0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        m.weight.data.normal_(1.0, 0.02)
        m.bias.data.fill_(0)
    elif classname.find("Linear") != -1:
        m.weight.data.normal_(0.0, 0.02)
        if m.bias is not None:
            m.bias.data.fill_(0.0)


# ------------------------------------------------------------------ reference training steps
# The reference update order and losses, rewritten from pix2pix_model.py / cycle_gan_model.py
# (optimize_parameters), stargan solver.py (train) and StackGAN trainer.py + miscc/utils.py.
import itertools  # noqa: E402

import torch.nn.functional as F  # noqa: E402


def _set_rg(nets, flag):
    for n in nets:
        for p in n.parameters():
            p.requires_grad = flag


def pix2pix_step(G, D, opt_G, opt_D, real_A, real_B, lambda_L1=100.0):
    gan = lambda p, real: F.binary_cross_entropy_with_logits(p, torch.full_like(p, float(real)))  # noqa: E731
    fake_B = G(real_A)
    _set_rg([D], True)
    opt_D.zero_grad()
    loss_D_fake = gan(D(torch.cat((real_A, fake_B), 1).detach()), False)
    loss_D_real = gan(D(torch.cat((real_A, real_B), 1)), True)
    ((loss_D_fake + loss_D_real) * 0.5).backward()
    opt_D.step()
    _set_rg([D], False)
    opt_G.zero_grad()
    loss_G_GAN = gan(D(torch.cat((real_A, fake_B), 1)), True)
    loss_G_L1 = F.l1_loss(fake_B, real_B) * lambda_L1
    (loss_G_GAN + loss_G_L1).backward()
    opt_G.step()
    return dict(G_GAN=loss_G_GAN, G_L1=loss_G_L1, D_real=loss_D_real, D_fake=loss_D_fake)


def cyclegan_step(G_A, G_B, D_A, D_B, opt_G, opt_D, real_A, real_B, lambda_A=10.0, lambda_B=10.0, lambda_idt=0.5):
    # one of the first pool_size steps: the history pool returns the new fakes themselves
    gan = lambda p, real: F.mse_loss(p, torch.full_like(p, float(real)))  # noqa: E731
    fake_B = G_A(real_A)
    rec_A = G_B(fake_B)
    fake_A = G_B(real_B)
    rec_B = G_A(fake_A)
    _set_rg([D_A, D_B], False)
    opt_G.zero_grad()
    idt_A = G_A(real_B)
    loss_idt_A = F.l1_loss(idt_A, real_B) * lambda_B * lambda_idt
    idt_B = G_B(real_A)
    loss_idt_B = F.l1_loss(idt_B, real_A) * lambda_A * lambda_idt
    loss_G_A = gan(D_A(fake_B), True)
    loss_G_B = gan(D_B(fake_A), True)
    loss_cycle_A = F.l1_loss(rec_A, real_A) * lambda_A
    loss_cycle_B = F.l1_loss(rec_B, real_B) * lambda_B
    (loss_G_A + loss_G_B + loss_cycle_A + loss_cycle_B + loss_idt_A + loss_idt_B).backward()
    opt_G.step()
    _set_rg([D_A, D_B], True)
    opt_D.zero_grad()
    loss_D_A = (gan(D_A(real_B), True) + gan(D_A(fake_B.detach()), False)) * 0.5
    loss_D_A.backward()
    loss_D_B = (gan(D_B(real_A), True) + gan(D_B(fake_A.detach()), False)) * 0.5
    loss_D_B.backward()
    opt_D.step()
    return dict(D_A=loss_D_A, G_A=loss_G_A, cycle_A=loss_cycle_A, idt_A=loss_idt_A, D_B=loss_D_B, G_B=loss_G_B,
                cycle_B=loss_cycle_B, idt_B=loss_idt_B)


def stargan_step(G, D, g_opt, d_opt, x_real, label_org, i, dataset="CelebA", c_dim=5, n_critic=5,
                 lambda_cls=1.0, lambda_rec=10.0, lambda_gp=10.0):
    def cls_loss(logit, target):
        if dataset == "CelebA":
            return F.binary_cross_entropy_with_logits(logit, target, reduction="sum") / logit.size(0)
        return F.cross_entropy(logit, target)

    rand_idx = torch.randperm(label_org.size(0))
    label_trg = label_org[rand_idx]
    if dataset == "CelebA":
        c_org, c_trg = label_org.clone(), label_trg.clone()
    else:
        c_org, c_trg = F.one_hot(label_org, c_dim).float(), F.one_hot(label_trg, c_dim).float()
    out_src, out_cls = D(x_real)
    d_loss_real = -torch.mean(out_src)
    d_loss_cls = cls_loss(out_cls, label_org)
    x_fake = G(x_real, c_trg)
    out_src, out_cls = D(x_fake.detach())
    d_loss_fake = torch.mean(out_src)
    alpha = torch.rand(x_real.size(0), 1, 1, 1)
    x_hat = (alpha * x_real.data + (1 - alpha) * x_fake.data).requires_grad_(True)
    out_src, _ = D(x_hat)
    dydx = torch.autograd.grad(out_src, x_hat, torch.ones(out_src.size()), retain_graph=True, create_graph=True,
                               only_inputs=True)[0].view(x_hat.size(0), -1)
    d_loss_gp = torch.mean((torch.sqrt(torch.sum(dydx ** 2, dim=1)) - 1) ** 2)
    d_loss = d_loss_real + d_loss_fake + lambda_cls * d_loss_cls + lambda_gp * d_loss_gp
    g_opt.zero_grad()
    d_opt.zero_grad()
    d_loss.backward()
    d_opt.step()
    loss = {"D/loss_real": d_loss_real, "D/loss_fake": d_loss_fake, "D/loss_cls": d_loss_cls, "D/loss_gp": d_loss_gp}
    if (i + 1) % n_critic == 0:
        x_fake = G(x_real, c_trg)
        out_src, out_cls = D(x_fake)
        g_loss_fake = -torch.mean(out_src)
        g_loss_cls = cls_loss(out_cls, label_trg)
        x_reconst = G(x_fake, c_org)
        g_loss_rec = torch.mean(torch.abs(x_real - x_reconst))
        g_loss = g_loss_fake + lambda_rec * g_loss_rec + lambda_cls * g_loss_cls
        g_opt.zero_grad()
        d_opt.zero_grad()
        g_loss.backward()
        g_opt.step()
        loss.update({"G/loss_fake": g_loss_fake, "G/loss_rec": g_loss_rec, "G/loss_cls": g_loss_cls})
    return loss


def stackgan_step(netG, netD, optimizerG, optimizerD, real_imgs, txt_embedding, z_dim, kl_coeff=2.0):
    crit = nn.BCELoss()
    n = real_imgs.size(0)
    real_labels, fake_labels = torch.ones(n), torch.zeros(n)
    noise = torch.FloatTensor(n, z_dim).normal_(0, 1)
    _, fake_imgs, mu, logvar = netG(txt_embedding, noise)
    netD.zero_grad()
    cond, fake = mu.detach(), fake_imgs.detach()
    real_features, fake_features = netD(real_imgs), netD(fake)
    errD_real = crit(netD.get_cond_logits(real_features, cond), real_labels)
    errD_wrong = crit(netD.get_cond_logits(real_features[:(n - 1)], cond[1:]), fake_labels[1:])
    errD_fake = crit(netD.get_cond_logits(fake_features, cond), fake_labels)
    if netD.get_uncond_logits is not None:
        uncond_real = crit(netD.get_uncond_logits(real_features), real_labels)
        uncond_fake = crit(netD.get_uncond_logits(fake_features), fake_labels)
        errD = (errD_real + uncond_real) / 2. + (errD_fake + errD_wrong + uncond_fake) / 3.
        errD_real, errD_fake = (errD_real + uncond_real) / 2., (errD_fake + uncond_fake) / 2.
    else:
        errD = errD_real + (errD_fake + errD_wrong) * 0.5
    errD.backward()
    optimizerD.step()
    netG.zero_grad()
    fake_features = netD(fake_imgs)
    errG = crit(netD.get_cond_logits(fake_features, mu.detach()), real_labels)
    if netD.get_uncond_logits is not None:
        errG = errG + crit(netD.get_uncond_logits(fake_features), real_labels)
    kl = torch.mean(mu.pow(2).add(logvar.exp()).mul(-1).add(1).add(logvar)).mul(-0.5)
    (errG + kl * kl_coeff).backward()
    optimizerG.step()
    return {"D_loss": errD, "D_loss_real": errD_real, "D_loss_wrong": errD_wrong, "D_loss_fake": errD_fake,
            "G_loss": errG, "KL_loss": kl}


def adam(params, lr, beta1=0.5, beta2=0.999):
    return torch.optim.Adam(params, lr=lr, betas=(beta1, beta2))


def chain(*nets):
    return itertools.chain(*[n.parameters() for n in nets])
