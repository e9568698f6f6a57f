"""BigGAN-PyTorch's layers (ajbrock/BigGAN-PyTorch ``layers.py``), rewritten for ganengine.

Same module trees, attribute names, buffers and numerics as the reference, so its checkpoints
load as they are and its training behaviour is reproduced:

* ``SNConv2d`` / ``SNLinear`` / ``SNEmbedding``: the reference's own spectral norm (not
  PyTorch's): buffers ``u0..u{num_svs-1}`` (shape (1, num_outputs), drawn from ``randn`` and
  left un-normalised) and ``sv0..`` (logged only). Every forward, eval included, runs
  ``num_itrs`` power iterations with Gram-Schmidt across the ``num_svs`` vectors and divides the
  weight by the first singular value estimate; only training mode writes ``u*`` and ``sv*``. In
  eval mode ``num_itrs > 1`` repeats the same iteration (the vectors are not written back).
* ``ccbn`` (class-conditional batch norm): gain ``1 + which_linear(y)``, bias
  ``which_linear(y)`` (``self_modulation``, U-Net GAN's unconditional G: two-layer MLPs of z);
  ``F.batch_norm`` on ``stored_mean`` / ``stored_var`` with momentum 0.1
  fixed; no ``num_batches_tracked``. ``bn``: the same with learned per-channel gain and bias.
  ``mybn=True``: the reference's ``myBN`` (mean-of-squares variance, keys ``bn.stored_mean``,
  ``bn.stored_var``, ``bn.accumulation_counter``).
* ``GBlock`` / ``DBlock``: the residual blocks; ``Attention``: the non-local block (keys
  ``theta, phi, g, o, gamma``) built with the SN conv.

``fused=True`` (set per module by the networks) runs the same function on ganengine's ops:
see ``_fast`` helpers below and docs/synthesis_attention.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ganengine.models import biggan_ops as sn_biggan

# ----------------------------------------------------------------------------- spectral norm


class SN:
    """Mixin: the reference's spectral norm state and weight (``layers.SN``)."""

    def _init_sn(self, num_svs: int, num_itrs: int, num_outputs: int, transpose: bool = False,
                 eps: float = 1e-12) -> None:
        if not isinstance(num_svs, int) or num_svs < 1:
            raise ValueError(f"{type(self).__name__}: num_svs must be an int >= 1, got {num_svs!r}")
        if not isinstance(num_itrs, int) or num_itrs < 1:
            raise ValueError(f"{type(self).__name__}: num_itrs must be an int >= 1 (the reference's power "
                             f"iteration loop needs one pass), got {num_itrs!r}")
        self.num_itrs, self.num_svs, self.transpose, self.eps = num_itrs, num_svs, bool(transpose), float(eps)
        for i in range(num_svs):
            self.register_buffer(f"u{i}", torch.randn(1, num_outputs))
            self.register_buffer(f"sv{i}", torch.ones(1))
        self.fused = False

    @property
    def u(self) -> list:
        return [getattr(self, f"u{i}") for i in range(self.num_svs)]

    @property
    def sv(self) -> list:
        return [getattr(self, f"sv{i}") for i in range(self.num_svs)]

    def W_(self) -> torch.Tensor:
        """The spectrally normalised weight (the reference's method name); the one
        ``grouped_spectral_norms`` computed for this forward if there is one (used once: its
        buffer write is then due, see there)."""
        if not torch.compiler.is_compiling():  # (nothing is grouped under torch.compile)
            pending = self.__dict__.pop("_sn_pending", None)
            if pending is not None:
                return pending
            if _open_groups:  # a second call in a grouped forward: the first's write lands before it iterates
                for group in _open_groups:
                    group.write_taken(self)
        return sn_biggan.sn_weight(self.weight, self.u, self.sv, self.training, self.eps, self.num_itrs,
                                   self.transpose, fused=self.fused)


class SNConv2d(nn.Conv2d, SN):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, num_svs=1, num_itrs=1, eps=1e-12):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self._init_sn(num_svs, num_itrs, out_channels, eps=eps)

    def forward(self, x):
        if self.fused:
            return sn_biggan.conv(self, x, self.W_())
        return F.conv2d(x, self.W_(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class SNLinear(nn.Linear, SN):
    def __init__(self, in_features, out_features, bias=True, num_svs=1, num_itrs=1, eps=1e-12):
        nn.Linear.__init__(self, in_features, out_features, bias)
        self._init_sn(num_svs, num_itrs, out_features, eps=eps)

    def forward(self, x):
        return F.linear(x, self.W_(), self.bias)


class SNEmbedding(nn.Embedding, SN):
    """SN over the (num_embeddings, embedding_dim) table: u has num_embeddings entries."""

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, max_norm=None, norm_type=2.0,
                 scale_grad_by_freq=False, sparse=False, _weight=None, num_svs=1, num_itrs=1, eps=1e-12):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, padding_idx, max_norm, norm_type,
                              scale_grad_by_freq, sparse, _weight)
        self._init_sn(num_svs, num_itrs, num_embeddings, eps=eps)

    def forward(self, x):
        return F.embedding(x, self.W_())


def is_sn(m: nn.Module) -> bool:
    return isinstance(m, SN)


# the grouped_spectral_norms blocks open now that hold weights (SN.W_ looks here only when a layer
# comes without a pending weight: normally an empty list)
_open_groups: list = []


class grouped_spectral_norms:
    """``with grouped_spectral_norms(net):`` around a fused network's forward: every fused SN
    layer of ``net`` with one singular vector gets its normalised weight up front. Where
    ganengine's C++ spectral-norm op serves the weights (contiguous fp32/fp64 CPU weights, backend
    auto or cpu), every such layer of one train/eval mode runs in one call with one autograd node
    (``biggan_ops.sn_weights_native``: BigGAN at the sample-data size has 55 SN layers, most of
    different shapes); otherwise same-shaped small weights are batched per shape
    (``biggan_ops.sn_weights_grouped``: a dozen small ops per group instead of per layer). Each
    layer's next ``W_()`` takes its weight, so a layer run once per forward (every layer of
    these networks) iterates once, as the reference's per-call iteration; a second call of a
    layer in the same forward iterates again, as there. Weights not taken by the end of the
    forward are dropped. Nothing is grouped under torch.compile or for a network whose ``fused``
    attribute is False (the reference composition); under a torch.func transform the network
    runs the reference composition for the call (``biggan_ops.unfused_under_transform``).

    The buffer writes (``u0``, ``sv0``; training mode) are the reference's only for the layers
    the forward reached: at the end of the block (raised or not) the layers whose weight was
    taken get theirs; a layer never reached (the forward raised before it, in a bad ``y``, a
    hook, or does not use it) keeps its state, as in the reference. On a forward that took every
    weight that is one ``_foreach_copy_`` per buffer kind, as before, when the whole network is one
    group (the C++ op's case; per group otherwise, as before). A layer's second call in the
    forward first writes what is due. Between a layer's use and the end of the forward its
    buffers still hold the values from before the forward."""

    def __init__(self, net: nn.Module):
        self.members, self.unfused = [], None
        if not getattr(net, "fused", False) or torch.compiler.is_compiling():
            return
        if sn_biggan.functorch_active():
            self.unfused = sn_biggan.unfused_under_transform(net)
            return
        groups: dict = {}
        native = sn_biggan.native_sn_ops() is not None
        for m in net.modules():
            if isinstance(m, SN):
                key = (sn_biggan.sn_native_key(m) if native else None) or sn_biggan.sn_group_key(m)
                if key is not None:
                    groups.setdefault(key, []).append(m)
        self.writes = []
        try:
            for key, members in groups.items():
                if key[0] == "native":
                    weights = sn_biggan.sn_weights_native(members, self.writes)
                elif len(members) > 1:
                    weights = sn_biggan.sn_weights_grouped(members, self.writes)
                else:
                    continue
                self.members.extend(members)
                for m, w in zip(members, weights):
                    m.__dict__["_sn_pending"] = w
        except BaseException:  # (no block to exit: unmark the layers marked so far; nothing was written)
            for m in self.members:
                m.__dict__.pop("_sn_pending", None)
            raise
        if self.members:
            self.written = self.ids = None  # (the ids of the layers written before the end; of all: built when needed)
            _open_groups.append(self)

    def write_taken(self, layer=None):
        """Write the buffers of the layers whose weight was taken (not yet written); with
        ``layer`` only if it is one of this block's (a second call of it)."""
        if self.ids is None:
            self.ids = {id(m) for m in self.members}
        if layer is not None and id(layer) not in self.ids:
            return
        written = self.written = self.written or set()
        done = [m for m in self.members if "_sn_pending" not in m.__dict__ and id(m) not in written]
        written.update(id(m) for m in done)
        self._write({id(m) for m in done})

    def _write(self, ids):
        """The buffer writes of the layers in ``ids`` (None: every layer)."""
        for layers, u_bufs, u_new, sv_bufs, sv_new in self.writes:
            if ids is not None:
                keep = [k for k, m in enumerate(layers) if id(m) in ids]
                if not keep:
                    continue
                if len(keep) < len(layers):
                    u_bufs, u_new = [u_bufs[k] for k in keep], [u_new[k] for k in keep]
                    sv_bufs, sv_new = [sv_bufs[k] for k in keep], [sv_new[k] for k in keep]
            with torch.no_grad():
                torch._foreach_copy_(u_bufs, u_new)
                torch._foreach_copy_(sv_bufs, sv_new)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.members:
            _open_groups.remove(self)
            left = [m for m in self.members if m.__dict__.pop("_sn_pending", None) is not None]
            if not left and self.written is None:  # (every weight taken: the whole group's writes)
                self._write(None)
            else:
                ids = (self.ids or {id(m) for m in self.members}).difference(id(m) for m in left)
                self._write(ids.difference(self.written or ()))
        elif self.unfused is not None:
            self.unfused.__exit__(*exc)
        return False


# ----------------------------------------------------------------------------- batch norms
def fused_bn(x, mean, var, gain=None, bias=None, eps=1e-5):
    """The reference's scale-and-shift form: ``x * (rsqrt(var+eps)*gain) - (mean*scale - bias)``."""
    scale = torch.rsqrt(var + eps)
    if gain is not None:
        scale = scale * gain
    shift = mean * scale
    if bias is not None:
        shift = shift - bias
    return x * scale - shift


def manual_bn(x, gain=None, bias=None, return_mean_var=False, eps=1e-5):
    """Batch statistics as mean of squares minus squared mean, in fp32 (``layers.manual_bn``)."""
    xf = x.float()
    m = torch.mean(xf, [0, 2, 3], keepdim=True)
    m2 = torch.mean(xf ** 2, [0, 2, 3], keepdim=True)
    var = (m2 - m ** 2).type(x.type())
    m = m.type(x.type())
    out = fused_bn(x, m, var, gain, bias, eps)
    return (out, m.squeeze(), var.squeeze()) if return_mean_var else out


class myBN(nn.Module):  # noqa: N801 (the reference's class name; keys stored_mean, stored_var, accumulation_counter)
    """The reference's ``myBN``: running averages, or standing statistics when
    ``accumulate_standing`` is set (sums divided by ``accumulation_counter`` in eval)."""

    def __init__(self, num_channels, eps=1e-5, momentum=0.1):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("stored_mean", torch.zeros(num_channels))
        self.register_buffer("stored_var", torch.ones(num_channels))
        self.register_buffer("accumulation_counter", torch.zeros(1))
        self.accumulate_standing = False

    def reset_stats(self):
        self.stored_mean[:] = 0
        self.stored_var[:] = 0
        self.accumulation_counter[:] = 0

    def forward(self, x, gain, bias):
        if self.training:
            out, mean, var = manual_bn(x, gain, bias, return_mean_var=True, eps=self.eps)
            with torch.no_grad():
                if self.accumulate_standing:
                    self.stored_mean[:] = self.stored_mean + mean
                    self.stored_var[:] = self.stored_var + var
                    self.accumulation_counter += 1.0
                else:
                    self.stored_mean[:] = self.stored_mean * (1 - self.momentum) + mean * self.momentum
                    self.stored_var[:] = self.stored_var * (1 - self.momentum) + var * self.momentum
            return out
        mean = self.stored_mean.view(1, -1, 1, 1)
        var = self.stored_var.view(1, -1, 1, 1)
        if self.accumulate_standing:
            mean = mean / self.accumulation_counter
            var = var / self.accumulation_counter
        return fused_bn(x, mean, var, gain, bias, self.eps)

    def export_module(self, norm_stats: str):
        """ganengine.export's hook: batch statistics (``norm_stats="input"``) as the training-mode
        forward computes them, with nothing written."""
        return _MyBNBatchStatsExport(self.eps) if norm_stats == "input" else None


class _MyBNBatchStatsExport(nn.Module):
    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x, gain, bias):
        return manual_bn(x, gain, bias, eps=self.eps)


_NORM_STYLES = ("bn", "in", "nonorm")


def _check_bn_options(owner, cross_replica, mybn, norm_style=None):
    if cross_replica:
        raise ValueError(f"{owner}: cross_replica=True (the reference's SyncBN) is not supported: its "
                         "single-process path adds the gain instead of multiplying by it; use the default "
                         "batch norm (per-process statistics under DDP: --sync_bn does not reach these layers)")
    if norm_style is not None and norm_style not in _NORM_STYLES and not mybn:
        raise ValueError(f"{owner}: norm_style must be one of {_NORM_STYLES} (the reference's 'gn' path fails "
                         f"with an AttributeError), got {norm_style!r}")


class ccbn(nn.Module):  # noqa: N801 (the reference's class name)
    """Class-conditional batch norm: ``BN(x) * (1 + gain(y)) + bias(y)`` per sample.

    ``which_linear`` builds ``gain`` and ``bias`` (an SNLinear without bias when G shares its
    class embedding, else an ``nn.Embedding`` over the class indices). ``self_modulation=True``
    (U-Net GAN's unconditional generator, boschresearch/unetgan ``layers.ccbn``): each of them is
    ``Sequential(which_linear(in, in, bias=True), ReLU, which_linear(in, out, bias=False))``
    (keys ``gain.0.weight``, ``gain.0.bias``, ``gain.2.weight``), y being z itself."""

    def __init__(self, output_size, input_size, which_linear, eps=1e-5, momentum=0.1, cross_replica=False,
                 mybn=False, norm_style="bn", self_modulation=False):
        super().__init__()
        _check_bn_options("ccbn", cross_replica, mybn, norm_style)
        self.output_size, self.input_size = output_size, input_size
        self.self_modulation = bool(self_modulation)
        if self.self_modulation:
            self.gain = nn.Sequential(which_linear(input_size, input_size, bias=True), nn.ReLU(),
                                      which_linear(input_size, output_size, bias=False))
            self.bias = nn.Sequential(which_linear(input_size, input_size, bias=True), nn.ReLU(),
                                      which_linear(input_size, output_size, bias=False))
        else:
            self.gain = which_linear(input_size, output_size)
            self.bias = which_linear(input_size, output_size)
        self.eps, self.momentum = eps, momentum
        self.cross_replica, self.mybn, self.norm_style = cross_replica, mybn, norm_style
        if mybn:
            self.bn = myBN(output_size, self.eps, self.momentum)
        elif norm_style in ("bn", "in"):
            self.register_buffer("stored_mean", torch.zeros(output_size))
            self.register_buffer("stored_var", torch.ones(output_size))
        self.fused = False

    def gain_bias(self, y):
        """(N, C) gain ``1 + gain(y)`` and bias ``bias(y)``."""
        return sn_biggan.ccbn_gain_bias(self, y)

    def forward(self, x, y, activation=None):
        """``activation`` (ReLU only) is applied after the affine part; the blocks pass it so the
        fused path runs norm, affine and ReLU as one op."""
        gain, bias = self.gain_bias(y)
        if self.mybn:
            out = self.bn(x, gain=gain.view(gain.size(0), -1, 1, 1), bias=bias.view(bias.size(0), -1, 1, 1))
            return out if activation is None else activation(out)
        if self.norm_style == "bn" and self.fused and sn_biggan.relu_or_none(activation):
            return sn_biggan.conditional_bn_act(x, gain, bias, self.stored_mean, self.stored_var, self.training,
                                                self.eps, activation is not None)
        if self.norm_style == "bn":
            out = F.batch_norm(x, self.stored_mean, self.stored_var, None, None, self.training, 0.1, self.eps)
        elif self.norm_style == "in":
            out = F.instance_norm(x, self.stored_mean, self.stored_var, None, None, self.training, 0.1, self.eps)
        else:
            out = x
        out = out * gain.view(gain.size(0), -1, 1, 1) + bias.view(bias.size(0), -1, 1, 1)
        return out if activation is None else activation(out)

    def extra_repr(self):
        return f"out: {self.output_size}, in: {self.input_size}, cross_replica={self.cross_replica}"

    def export_module(self, norm_stats: str):
        """ganengine.export's hook: with ``norm_stats="input"`` (the batch statistics the
        reference samples with, in training mode) a plain-op norm that writes nothing; myBN
        (``mybn``) has its own hook."""
        if norm_stats != "input" or self.mybn or self.norm_style == "nonorm":
            return None
        return BatchStatsNormExport(self)


class bn(nn.Module):  # noqa: N801 (the reference's class name)
    """Unconditional batch norm with ``gain`` / ``bias`` parameters and ``stored_mean`` /
    ``stored_var`` buffers (G's output layer)."""

    def __init__(self, output_size, eps=1e-5, momentum=0.1, cross_replica=False, mybn=False):
        super().__init__()
        _check_bn_options("bn", cross_replica, mybn)
        self.output_size = output_size
        self.gain = nn.Parameter(torch.ones(output_size), requires_grad=True)
        self.bias = nn.Parameter(torch.zeros(output_size), requires_grad=True)
        self.eps, self.momentum = eps, momentum
        self.cross_replica, self.mybn = cross_replica, mybn
        if mybn:
            self.bn = myBN(output_size, self.eps, self.momentum)
        else:
            self.register_buffer("stored_mean", torch.zeros(output_size))
            self.register_buffer("stored_var", torch.ones(output_size))
        self.fused = False

    def forward(self, x, y=None, activation=None):
        if self.mybn:
            out = self.bn(x, gain=self.gain.view(1, -1, 1, 1), bias=self.bias.view(1, -1, 1, 1))
            return out if activation is None else activation(out)
        if self.fused and sn_biggan.relu_or_none(activation):
            return sn_biggan.bn_act(x, self.gain, self.bias, self.stored_mean, self.stored_var, self.training,
                                    self.momentum, self.eps, activation is not None)
        out = F.batch_norm(x, self.stored_mean, self.stored_var, self.gain, self.bias, self.training,
                           self.momentum, self.eps)
        return out if activation is None else activation(out)

    def export_module(self, norm_stats: str):
        """ganengine.export's hook (see ``ccbn.export_module``)."""
        return BatchStatsNormExport(self) if norm_stats == "input" and not self.mybn else None


class BatchStatsNormExport(nn.Module):
    """The export form (``ganengine.export``, ``norm_stats="input"``) of a ``ccbn`` or ``bn``:
    normalised with the input's own statistics (batch statistics; instance statistics for
    ccbn's ``norm_style="in"``), in plain ops (the ONNX exporter translates a training-mode
    batch_norm only for a fixed batch size) and writing no stored statistics; then the class-
    conditional (or plain) gain and bias and the activation, as the module computes them."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.conditional = isinstance(norm, ccbn)
        self.gain, self.bias = norm.gain, norm.bias  # the embeddings / SN linears, or Parameters
        self.dims = [2, 3] if getattr(norm, "norm_style", "bn") == "in" else [0, 2, 3]
        self.eps = norm.eps

    def forward(self, x, y=None, activation=None):
        var, mean = torch.var_mean(x, dim=self.dims, unbiased=False, keepdim=True)
        out = (x - mean) * torch.rsqrt(var + self.eps)
        if self.conditional:
            gain, bias = sn_biggan.ccbn_gain_bias(self, y)
            out = out * gain.view(gain.size(0), -1, 1, 1) + bias.view(bias.size(0), -1, 1, 1)
        else:
            out = out * self.gain.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out if activation is None else activation(out)


class OutputLayer(nn.Sequential):
    """G's ``nn.Sequential(bn, activation, conv)`` (keys ``0.*`` and ``2.*``), running its
    batch norm and ReLU as one op when fused."""

    def forward(self, x):
        norm, act, conv = self[0], self[1], self[2]
        return conv(norm(x, activation=act))


# ----------------------------------------------------------------------------- attention
class Attention(nn.Module):
    """The reference's non-local block (keys ``theta, phi, g, o, gamma``; 0-dim gamma; phi and g
    2x2 max-pooled; no 1/sqrt(d) scale). Fused, it runs ganengine's attention op, which never
    builds the N x N/4 map, with ``o`` applied to the pooled values before the attention (``o``
    is linear and each attention row sums to 1, so ``o(g P^T) = o(g) P^T``: N/4 positions
    instead of N), the path of ``ganengine.nn.BigGANSelfAttention2d``."""

    def __init__(self, ch, which_conv=SNConv2d, name="attention"):
        super().__init__()
        if ch < 8:  # theta/phi would have no channels: the reference's SN fails on them in forward
            raise ValueError(f"BigGAN attention needs at least 8 channels (theta/phi have ch // 8), got {ch}; "
                             "choose a wider G_ch/D_ch or no attention at that resolution")
        self.ch, self.which_conv = ch, which_conv
        self.theta = which_conv(ch, ch // 8, kernel_size=1, padding=0, bias=False)
        self.phi = which_conv(ch, ch // 8, kernel_size=1, padding=0, bias=False)
        self.g = which_conv(ch, ch // 2, kernel_size=1, padding=0, bias=False)
        self.o = which_conv(ch // 2, ch, kernel_size=1, padding=0, bias=False)
        self.gamma = nn.Parameter(torch.tensor(0.0), requires_grad=True)
        self.fused = False

    def forward(self, x, y=None):
        if x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"BigGAN attention: H and W must be even (2x2 pooling), got {tuple(x.shape)}")
        c, n = self.ch, x.shape[2] * x.shape[3]
        if self.fused:
            from ganengine.ops.attention import attention

            theta = self.theta(x).flatten(2)
            phi = F.max_pool2d(self.phi(x), [2, 2]).flatten(2)
            value = self.o(F.max_pool2d(self.g(x), [2, 2])).flatten(2)
            return attention(theta, phi, value, x.flatten(2), self.gamma).view_as(x)
        theta = self.theta(x).view(-1, c // 8, n)
        phi = F.max_pool2d(self.phi(x), [2, 2]).view(-1, c // 8, n // 4)
        g = F.max_pool2d(self.g(x), [2, 2]).view(-1, c // 2, n // 4)
        beta = F.softmax(torch.bmm(theta.transpose(1, 2), phi), -1)
        o = self.o(torch.bmm(g, beta.transpose(1, 2)).view(-1, c // 2, x.shape[2], x.shape[3]))
        return self.gamma * o + x


# ----------------------------------------------------------------------------- blocks
upsample2x = sn_biggan.upsample2x  # F.interpolate(x, scale_factor=2): nearest, the reference's upsample


class GBlock(nn.Module):
    """BigGAN's generator residual block: ccbn-ReLU-up-conv3x3-ccbn-ReLU-conv3x3 + up-conv1x1."""

    def __init__(self, in_channels, out_channels, which_conv=nn.Conv2d, which_bn=bn, activation=None,
                 upsample=None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.which_conv, self.which_bn = which_conv, which_bn
        self.activation = activation
        self.upsample = upsample
        self.conv1 = which_conv(in_channels, out_channels)
        self.conv2 = which_conv(out_channels, out_channels)
        self.learnable_sc = in_channels != out_channels or bool(upsample)
        if self.learnable_sc:
            self.conv_sc = which_conv(in_channels, out_channels, kernel_size=1, padding=0)
        self.bn1 = which_bn(in_channels)
        self.bn2 = which_bn(out_channels)
        self.fused = False

    def forward(self, x, y):
        if self.fused and sn_biggan.relu_or_none(self.activation):
            return sn_biggan.gblock_forward(self, x, y)
        h = self.activation(self.bn1(x, y))
        if self.upsample:
            h = self.upsample(h)
            x = self.upsample(x)
        h = self.conv1(h)
        h = self.activation(self.bn2(h, y))
        h = self.conv2(h)
        if self.learnable_sc:
            x = self.conv_sc(x)
        return h + x


class DBlock(nn.Module):
    """BigGAN's discriminator residual block (optionally pre-activated, optional 2x2 average
    pooling; the shortcut's 1x1 conv before the pooling when pre-activated, after it otherwise)."""

    def __init__(self, in_channels, out_channels, which_conv=SNConv2d, wide=True, preactivation=False,
                 activation=None, downsample=None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.hidden_channels = out_channels if wide else in_channels
        self.which_conv = which_conv
        self.preactivation, self.activation, self.downsample = preactivation, activation, downsample
        self.conv1 = which_conv(in_channels, self.hidden_channels)
        self.conv2 = which_conv(self.hidden_channels, out_channels)
        self.learnable_sc = bool(in_channels != out_channels or downsample)
        if self.learnable_sc:
            self.conv_sc = which_conv(in_channels, out_channels, kernel_size=1, padding=0)
        self.fused = False

    def shortcut(self, x):
        if self.preactivation:
            if self.learnable_sc:
                x = self.conv_sc(x)
            if self.downsample:
                x = self.downsample(x)
        else:
            if self.downsample:
                x = self.downsample(x)
            if self.learnable_sc:
                x = self.conv_sc(x)
        return x

    def forward(self, x):
        if self.fused and sn_biggan.relu_or_none(self.activation):
            return sn_biggan.dblock_forward(self, x)
        h = F.relu(x) if self.preactivation else x
        h = self.conv1(h)
        h = self.conv2(self.activation(h))
        if self.downsample:
            h = self.downsample(h)
        return h + self.shortcut(x)


# ----------------------------------------------------------------------------- init
def init_weights(net: nn.Module, init: str) -> int:
    """The reference's ``init_weights``: every Conv2d / Linear / Embedding weight (SN layers
    included) orthogonal ('ortho'), N(0, 0.02) ('N02') or xavier-uniform ('glorot' / 'xavier'),
    in module order. Another value keeps PyTorch's defaults, as the reference does (it prints a
    warning). Returns the parameter count of the initialised modules."""
    count = 0
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.Embedding)):
            if init == "ortho":
                nn.init.orthogonal_(module.weight)
            elif init == "N02":
                nn.init.normal_(module.weight, 0, 0.02)
            elif init in ("glorot", "xavier"):
                nn.init.xavier_uniform_(module.weight)
            count += sum(p.numel() for p in module.parameters())
    if init not in ("ortho", "N02", "glorot", "xavier"):
        import warnings

        warnings.warn(f"BigGAN init style {init!r} not recognised: PyTorch's default initialisation kept "
                      "(as the reference does)", stacklevel=3)
    return count


def set_fused(net: nn.Module, fused: bool) -> nn.Module:
    """Switch every BigGAN layer of ``net`` between the reference composition and ganengine's ops."""
    for m in net.modules():
        if hasattr(m, "fused") and isinstance(getattr(m, "fused"), bool) and not isinstance(m, nn.ModuleList):
            m.fused = bool(fused)
    return net
