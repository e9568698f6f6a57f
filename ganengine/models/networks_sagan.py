"""SAGAN generator and discriminator (heykeetae/Self-Attention-GAN ``sagan_models.py``,
``spectral.py``) on ganengine's ops.

The reference's module tree and state_dict keys: ``l1`` .. ``l4`` and ``last`` Sequentials,
``attn1`` / ``attn2`` (``query_conv``, ``key_conv``, ``value_conv``, ``gamma`` of shape (1,)),
and its ``SpectralNorm`` wrapper holding the layer as ``.module`` with the Parameters
``weight_u``, ``weight_v`` (requires_grad False, so they count in ``parameters()``, as in the
reference) and ``weight_bar`` in place of ``weight``. Its spectral norm, kept exactly: every
forward, eval included, runs ``power_iterations`` steps ``v = l2n(W^T u)``, ``u = l2n(W v)``
with ``l2n(x) = x / (||x|| + eps)`` (eps 1e-12), writes u and v, and uses ``W / (u . W v)``,
W the weight viewed as (shape[0], -1) (so dim 0 also for the transposed convs).

Sizes: the reference runs only at ``image_size=64`` (``forward`` uses ``l4``, built only then)
with ``conv_dim=64`` (the attention widths 128/64 in G and 256/512 in D are hard-coded).
Here ``image_size`` must be 64 (else ValueError); ``conv_dim`` may differ, with the attention
widths following the feature maps they sit on (G: conv_dim*2 and conv_dim, D: conv_dim*4 and
conv_dim*8), which at conv_dim=64 are the reference's numbers; that is the only
generalisation (the reference cannot run any other width, so there are no reference
checkpoints it would misread).

Forwards return ``(out, p1, p2)`` like the reference: the attention maps (B, N, N) of the two
attention layers. Setting ``net.return_attention = False`` returns ``(out, None, None)`` and
skips building the maps (what the trainer does). D returns ``out.squeeze()``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ganengine.models._common import check_positive
from ganengine.models.biggan_ops import unfused_under_transform
from ganengine.nn.attention import SelfAttention2d


def l2normalize(v, eps=1e-12):
    return v / (v.norm() + eps)


class _DivBySigma(torch.autograd.Function):
    """``w / sigma`` with sigma = u . (W v) computed in forward, and the gradient through sigma,
    ``-(<g, w> / sigma^2) u v^T``, taken with the values u and v hold when backward runs.

    That is what the reference computes: its u and v are Parameters whose ``.data`` every
    forward replaces, and autograd's saved references to them see the replacement, so a
    backward after several forwards (D on real, then on fake images) uses the last forward's
    u and v for every pass (checked against the reference code). Written with torch ops on w,
    so it is differentiable again (gradient penalties)."""

    @staticmethod
    def forward(ctx, w, sigma, u, v):
        ctx.save_for_backward(w, sigma)
        ctx.uv = (u, v)  # the live Parameters, read at backward time
        return w / sigma

    @staticmethod
    def backward(ctx, g):
        w, sigma = ctx.saved_tensors
        u, v = ctx.uv
        c = (g * w).sum() / (sigma * sigma)
        return g / sigma - c * torch.outer(u, v).view_as(w), None, None, None


_is_tracing = torch._C._is_tracing
# under a torch.func transform (functionalize, grad, vmap) no autograd.Function runs ("NYI:
# Functionalize rule for custom_function_call"): ``w / sigma`` in plain ops there, sigma with its
# gradient as in the reference (the same function; u and v as the forward left them)
_functorch_active = torch._C._are_functorch_transforms_active


def _jit_tracing() -> bool:
    """Whether a jit trace (ganengine.export) is recording; False under torch.compile (dynamo cannot
    trace the C call, and a compiled step keeps the reference's in-place power iteration)."""
    return not torch.compiler.is_compiling() and _is_tracing()


def _traced_normalized_weight(w, w2, u, power_iterations: int):
    """``normalized_weight`` as a trace records it (ganengine.export): the same power iteration
    from the stored u, in standard ops, written nowhere, and ``w / sigma`` as a plain division.

    A traced ``copy_`` into u and v would make the exported TorchScript module rewrite them at
    every call (its outputs would drift from call to call) and the autograd Function is a Python
    call TorchScript cannot save. So every call of an exported graph computes what the network's
    next forward computes (one iteration from the u it holds at export time). The trace is for
    inference: the gradient through sigma (``_DivBySigma.backward``) is not part of it."""
    with torch.no_grad():
        v = None
        for _ in range(power_iterations):
            v = l2normalize(torch.mv(w2.t(), u))
            u = l2normalize(torch.mv(w2, v))
        sigma = u.dot(w2.mv(v))
    return w / sigma


def _transform_normalized_weight(w, w2, u, v, power_iterations: int):
    """``normalized_weight`` under a torch.func transform: the same iteration written into u and v
    with ``out=`` (torch.func.grad refuses ``copy_`` into a captured tensor), then the reference's
    own ``w / (u . W v)`` in plain ops, sigma with its gradient (the same function as
    ``_DivBySigma``; its backward reads u and v as this forward left them)."""
    with torch.no_grad():
        for _ in range(power_iterations):
            t = torch.mv(w2.t(), u)
            torch.div(t, t.norm() + 1e-12, out=v)
            t = torch.mv(w2, v)
            torch.div(t, t.norm() + 1e-12, out=u)
    return w / u.dot(w2.mv(v))


class SpectralNorm(nn.Module):
    """The reference ``SpectralNorm(module, name='weight', power_iterations=1)`` wrapper."""

    def __init__(self, module: nn.Module, name: str = "weight", power_iterations: int = 1):
        super().__init__()
        if not isinstance(power_iterations, int) or power_iterations < 1:
            raise ValueError(f"SpectralNorm: power_iterations must be an int >= 1, got {power_iterations!r}")
        self.module, self.name, self.power_iterations = module, name, power_iterations
        self.fused = False
        if not self._made_params():
            self._make_params()

    def _made_params(self) -> bool:
        return all(hasattr(self.module, self.name + s) for s in ("_u", "_v", "_bar"))

    def _make_params(self) -> None:
        w = getattr(self.module, self.name)
        height = w.data.shape[0]
        width = w.reshape(height, -1).data.shape[1]
        u = nn.Parameter(w.data.new(height).normal_(0, 1), requires_grad=False)
        v = nn.Parameter(w.data.new(width).normal_(0, 1), requires_grad=False)
        u.data = l2normalize(u.data)
        v.data = l2normalize(v.data)
        w_bar = nn.Parameter(w.data)
        del self.module._parameters[self.name]
        self.module.register_parameter(self.name + "_u", u)
        self.module.register_parameter(self.name + "_v", v)
        self.module.register_parameter(self.name + "_bar", w_bar)

    def running_parameters(self) -> tuple:
        """u and v: Parameters (the reference's) that every forward writes (ganengine._state)."""
        return tuple(getattr(self.module, self.name + s) for s in ("_u", "_v"))

    def normalized_weight(self) -> torch.Tensor:
        """``W / sigma`` after the power iteration (u and v written, in eval mode too)."""
        u = getattr(self.module, self.name + "_u")
        v = getattr(self.module, self.name + "_v")
        w = getattr(self.module, self.name + "_bar")
        height = w.shape[0]
        w2 = w.reshape(height, -1)
        if _jit_tracing():
            return _traced_normalized_weight(w, w2, u, self.power_iterations)
        if _functorch_active():
            return _transform_normalized_weight(w, w2, u, v, self.power_iterations)
        with torch.no_grad():
            for _ in range(self.power_iterations):
                v.copy_(l2normalize(torch.mv(w2.t(), u)))
                u.copy_(l2normalize(torch.mv(w2, v)))
            sigma = u.dot(w2.mv(v))
        return _DivBySigma.apply(w, sigma, u, v)

    def forward(self, *args):
        m = self.module
        weight = self.normalized_weight()
        if isinstance(m, nn.ConvTranspose2d):
            if self.fused and m.groups == 1 and m.dilation == (1, 1):
                from ganengine.ops.conv import conv_transpose2d

                return conv_transpose2d(args[0], weight, m.bias, m.stride, m.padding, m.output_padding)
            return F.conv_transpose2d(args[0], weight, m.bias, m.stride, m.padding, m.output_padding, m.groups,
                                      m.dilation)
        if isinstance(m, nn.Conv2d):
            if self.fused and m.groups == 1 and m.dilation == (1, 1) and m.padding_mode == "zeros":
                from ganengine.ops.conv import conv2d

                return conv2d(args[0], weight, m.bias, m.stride, m.padding)
            return F.conv2d(args[0], weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
        raise TypeError(f"SpectralNorm: wraps Conv2d / ConvTranspose2d here, got {type(m).__name__}")


class SelfAttn(nn.Module):
    """The reference ``Self_Attn(in_dim, activation)``: returns ``(gamma * attn(x) + x, attention)``.

    Fused, it runs SelfAttention2d's forward over its own children (the same query / key / value
    convs and gamma, one stacked q/k/v projection): on the CPU the map it returns is built once,
    with one softmax, when the call records no graph or N <= MAP_PATH_MAX_POSITIONS (a forward that
    ran the attention op and then the map again cost 1.3-1.6x the eager generator's eval forward);
    with a graph above that, and on CUDA, the flash-style op plus the map, as SelfAttention2d
    (ganengine/nn/attention.py says why). ``(out, None)`` without the map."""

    # what SelfAttention2d.forward reads besides the children: the reference's contiguous output
    keep_layout = False
    return_attention = True
    _projections = SelfAttention2d._projections

    def __init__(self, in_dim: int, activation: str = "relu"):
        super().__init__()
        if in_dim < 8:
            raise ValueError(f"Self_Attn: in_dim must be >= 8 (query/key have in_dim // 8 channels), got {in_dim}")
        self.chanel_in = in_dim  # (sic) the reference's attribute name
        self.activation = activation
        self.query_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)
        self.fused = False

    def forward(self, x, return_attention: bool = True):
        if self.fused:
            out = SelfAttention2d.forward(self, x, bool(return_attention))
            return out if return_attention else (out, None)
        b, c, width, height = x.size()
        proj_query = self.query_conv(x).view(b, -1, width * height).permute(0, 2, 1)
        proj_key = self.key_conv(x).view(b, -1, width * height)
        attention = self.softmax(torch.bmm(proj_query, proj_key))
        proj_value = self.value_conv(x).view(b, -1, width * height)
        out = torch.bmm(proj_value, attention.permute(0, 2, 1)).view(b, c, width, height)
        return self.gamma * out + x, attention


def _check_sizes(owner: str, image_size, conv_dim) -> None:
    check_positive(owner, conv_dim=conv_dim)
    if image_size != 64:
        raise ValueError(f"{owner}: image_size must be 64: the reference's forward uses the layer l4, which it builds "
                         f"only for 64x64 images (got image_size={image_size!r})")
    if conv_dim < 8:
        raise ValueError(f"{owner}: conv_dim must be >= 8 (the attention layers have conv_dim // 8 query channels), "
                         f"got {conv_dim}")


def _bn_relu(channels: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(channels), nn.ReLU()]


class SAGANGenerator(nn.Module):
    """The reference ``Generator(batch_size, image_size=64, z_dim=100, conv_dim=64)``;
    ``forward(z)`` -> ``(image, p1, p2)``. ``batch_size`` is unused, as in the reference."""

    def __init__(self, batch_size=64, image_size=64, z_dim=100, conv_dim=64, fused: bool = True):
        super().__init__()
        _check_sizes("SAGANGenerator", image_size, conv_dim)
        check_positive("SAGANGenerator", z_dim=z_dim)
        self.imsize, self.z_dim, self.conv_dim = image_size, z_dim, conv_dim
        repeat_num = int(math.log2(image_size)) - 3
        mult = 2 ** repeat_num
        curr = conv_dim * mult
        # layers drawn in order l1..l4 (the RNG order), registered l4 first (the reference's key order)
        l1 = nn.Sequential(SpectralNorm(nn.ConvTranspose2d(z_dim, curr, 4)), *_bn_relu(curr))
        l2 = nn.Sequential(SpectralNorm(nn.ConvTranspose2d(curr, curr // 2, 4, 2, 1)), *_bn_relu(curr // 2))
        curr //= 2
        l3 = nn.Sequential(SpectralNorm(nn.ConvTranspose2d(curr, curr // 2, 4, 2, 1)), *_bn_relu(curr // 2))
        curr //= 2
        self.l4 = nn.Sequential(SpectralNorm(nn.ConvTranspose2d(curr, curr // 2, 4, 2, 1)), *_bn_relu(curr // 2))
        curr //= 2
        self.l1, self.l2, self.l3 = l1, l2, l3
        self.last = nn.Sequential(nn.ConvTranspose2d(curr, 3, 4, 2, 1), nn.Tanh())
        self.attn1 = SelfAttn(conv_dim * 2, "relu")
        self.attn2 = SelfAttn(conv_dim, "relu")
        self.return_attention = True
        _set_fused(self, fused)

    def forward(self, z):
        if self.fused and _functorch_active():  # (a torch.func transform: the reference composition)
            with unfused_under_transform(self):
                return self.forward(z)
        z = z.view(z.size(0), z.size(1), 1, 1)
        out = _run(self.l1, z)
        out = _run(self.l2, out)
        out = _run(self.l3, out)
        out, p1 = self.attn1(out, self.return_attention)
        out = _run(self.l4, out)
        out, p2 = self.attn2(out, self.return_attention)
        out = self.last(out)
        return out, p1, p2


class SAGANDiscriminator(nn.Module):
    """The reference ``Discriminator(batch_size=64, image_size=64, conv_dim=64)``;
    ``forward(x)`` -> ``(out.squeeze(), p1, p2)``."""

    def __init__(self, batch_size=64, image_size=64, conv_dim=64, fused: bool = True):
        super().__init__()
        _check_sizes("SAGANDiscriminator", image_size, conv_dim)
        self.imsize, self.conv_dim = image_size, conv_dim
        curr = conv_dim
        l1 = nn.Sequential(SpectralNorm(nn.Conv2d(3, curr, 4, 2, 1)), nn.LeakyReLU(0.1))
        l2 = nn.Sequential(SpectralNorm(nn.Conv2d(curr, curr * 2, 4, 2, 1)), nn.LeakyReLU(0.1))
        curr *= 2
        l3 = nn.Sequential(SpectralNorm(nn.Conv2d(curr, curr * 2, 4, 2, 1)), nn.LeakyReLU(0.1))
        curr *= 2
        self.l4 = nn.Sequential(SpectralNorm(nn.Conv2d(curr, curr * 2, 4, 2, 1)), nn.LeakyReLU(0.1))
        curr *= 2
        self.l1, self.l2, self.l3 = l1, l2, l3
        self.last = nn.Sequential(nn.Conv2d(curr, 1, 4))
        self.attn1 = SelfAttn(conv_dim * 4, "relu")
        self.attn2 = SelfAttn(conv_dim * 8, "relu")
        self.return_attention = True
        _set_fused(self, fused)

    def forward(self, x):
        if self.fused and _functorch_active():  # (a torch.func transform: the reference composition)
            with unfused_under_transform(self):
                return self.forward(x)
        out = _run(self.l1, x)
        out = _run(self.l2, out)
        out = _run(self.l3, out)
        out, p1 = self.attn1(out, self.return_attention)
        out = _run(self.l4, out)
        out, p2 = self.attn2(out, self.return_attention)
        out = self.last(out)
        return out.squeeze(), p1, p2


def _set_fused(net: nn.Module, fused: bool) -> None:
    net.fused = bool(fused)
    for m in net.modules():
        if isinstance(m, (SpectralNorm, SelfAttn)):
            m.fused = bool(fused)


def _run(seq: nn.Sequential, x):
    """A (SN conv, [BatchNorm2d,] activation) Sequential; fused: batch norm + ReLU as one op and
    the discriminator's conv + LeakyReLU(0.1) as one op."""
    sn = seq[0]
    if not sn.fused:
        return seq(x)
    from ganengine.models import biggan_ops

    if isinstance(seq[1], nn.BatchNorm2d):
        h = sn(x)
        norm = seq[1]
        return biggan_ops.bn_act(h, norm.weight, norm.bias, norm.running_mean, norm.running_var,
                                 norm.training or norm.running_mean is None, _bn_momentum(norm), norm.eps, True)
    m = sn.module
    if isinstance(seq[1], nn.LeakyReLU) and isinstance(m, nn.Conv2d):
        from ganengine.ops.conv_act import conv2d_act

        return conv2d_act(x, sn.normalized_weight(), m.bias, m.stride, m.padding, negative_slope=seq[1].negative_slope)
    return seq(x)


def _bn_momentum(norm: nn.BatchNorm2d) -> float:
    """nn.BatchNorm2d's effective momentum for this call (it also counts num_batches_tracked)."""
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:
            return 1.0 / float(norm.num_batches_tracked)
    return 0.0 if norm.momentum is None else norm.momentum
