"""Fused forwards that ``retype`` puts in front of a user's own module class.

Each mixin reads the module's own tensors under the module's own names, so the retyped module
keeps its keys, Parameters, buffers, hooks and methods; only the arithmetic moves to the fused
ops. The spec attributes (``_ganengine_*``) are plain strings / floats set by the rule that
recognised the module (ganengine/fusion/recognise.py) after checking the equivalence
numerically.

``_ganengine_act_forward(activation, negative_slope, *inputs)`` is ``act(module(*inputs))`` in
one fused call: the graph rules (ganengine/fusion/graph.py) call it when a traced forward applies
an activation to the module's output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ganengine.fusion.copying import FusedModule
from ganengine.fusion.spectral import sagan_sigma
from ganengine.ops._conv_common import input_in_weight_layout, module_autocast


def _act_slope(activation: str, negative_slope: float):
    return None if activation == "none" else (0.0 if activation == "relu" else float(negative_slope))


def conv_apply(m, x: torch.Tensor, w: torch.Tensor, slope: float | None,
               sigma: torch.Tensor | None = None, side: str = "auto") -> torch.Tensor:
    """``leaky_relu(conv2d(x, w / sigma, m.bias, m.stride, m.padding), slope)`` (no activation
    when ``slope`` is None, no division when ``sigma`` is None) on the fused conv ops, honouring
    ``m.padding_mode`` ("zeros", or "reflect" for 3x3 stride-1 convs). With ``sigma``, the
    division goes to whichever is smaller, the weight or the output (ganengine/fusion/spectral.py)."""
    if sigma is None and module_autocast(x):
        return _plain_conv(m, x, w, m.bias, slope)
    if sigma is not None:
        if side == "auto" and x.dim() == 4 and not module_autocast(x):
            side = _sigma_side(m, x, w)
        if x.dim() != 4 or side != "output":
            # (under autocast eager's own ops, W / sigma then the module's conv: its dtype and numbers;
            # dividing the output would add the fp32 bias to the low-precision conv output)
            w = w / sigma
            if x.dim() == 4 and (x.shape, x.dtype, x.device, w.shape) in m.__dict__.get("_ganengine_plain_calls", ()):
                y = m._conv_forward(x, w, m.bias)  # (as below: a call _conv sent to PyTorch's conv)
                return y if slope is None else F.leaky_relu(y, slope, inplace=True)
            return _conv(m, x, w, m.bias, slope)
        y = _conv(m, x, w, None, None) / sigma
        if m.bias is not None:
            y = y + _bias_like(m.bias, y)
        return y if slope is None else F.leaky_relu(y, slope, inplace=True)
    if x.dim() == 4 and (x.shape, x.dtype, x.device, w.shape) in m.__dict__.get("_ganengine_plain_calls", ()):
        # a call _conv already sent to PyTorch's conv (its route is cached, see _route_pays):
        # straight there, so the rewrite costs next to nothing where it cannot gain
        y = m._conv_forward(x, w, m.bias)
        return y if slope is None else F.leaky_relu(y, slope, inplace=True)
    return _conv(m, x, w, m.bias, slope)


def _bias_like(bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The conv bias added to an output divided by sigma, in the output's dtype: under autocast
    with a named backend (which keeps the fused route) the output is low precision, and the fp32
    bias would promote the sum to fp32, where eager's conv adds the bias cast."""
    b = bias.view(1, -1, 1, 1)
    return b if b.dtype == y.dtype else b.to(y.dtype)


# Dividing the output instead of the weight adds, with a bias, one op forward (the bias add the
# conv no longer does) and one backward (the bias gradient's reduction): at the host's cost of an
# op (a few microseconds) this many elements of elementwise work
_SIDE_OP_ELEMENTS = 4096


def _sigma_side(m, x: torch.Tensor, w: torch.Tensor) -> str:
    """Which side of a spectral-normed conv the division by sigma goes to: the smaller of the
    weight and the output, counting the output side's extra bias pass and ops (without a bias
    both sides are two ops forward). Cached per call shape on the module (pure Python
    arithmetic, a few microseconds a call at the tiny sizes where it matters)."""
    key = (x.shape, w.shape)
    cache = m.__dict__.setdefault("_ganengine_sigma_sides", {})
    side = cache.get(key)
    if side is None:
        kh, kw = w.shape[-2:]
        (sh, sw), (ph, pw) = tuple(m.stride), tuple(m.padding)
        out = x.shape[0] * w.shape[0] * ((x.shape[2] + 2 * ph - kh) // sh + 1) * ((x.shape[3] + 2 * pw - kw) // sw + 1)
        if m.bias is not None:
            out = 2 * out + _SIDE_OP_ELEMENTS
        side = "weight" if w.numel() <= out else "output"
        if len(cache) < 64:
            cache[key] = side
    return side


_OPS: tuple = ()


def _ops() -> tuple:
    """(conv2d, conv3x3, winograd_profitable, conv2d_act), imported once (not at module import:
    the ops import the fusion package; not per call: a call that ends on PyTorch's conv pays
    only a few microseconds over the module it replaced)."""
    global _OPS
    if not _OPS:
        from ganengine.ops.conv import conv2d
        from ganengine.ops.conv3x3 import conv3x3, winograd_profitable
        from ganengine.ops.conv_act import conv2d_act
        _OPS = (conv2d, conv3x3, winograd_profitable, conv2d_act)
    return _OPS


def _plain_conv(m, x: torch.Tensor, w: torch.Tensor, bias, slope: float | None, inplace: bool = True):
    """PyTorch's own conv of the module (eager's call), then the activation."""
    y = m._conv_forward(x, w, bias) if hasattr(m, "_conv_forward") else F.conv2d(x, w, bias, m.stride, m.padding)
    return y if slope is None else F.leaky_relu(y, slope, inplace=inplace)


def _conv(m, x: torch.Tensor, w: torch.Tensor, bias, slope: float | None) -> torch.Tensor:
    # unbatched: PyTorch's own conv (the fused ops take (N, C, H, W)); autocast with backend 'auto':
    # the module's own forward (_conv_common.module_autocast: a named backend keeps its route)
    if x.dim() != 4 or module_autocast(x):
        return _plain_conv(m, x, w, bias, slope, inplace=x.dim() == 4)
    conv2d, conv3x3, winograd_profitable, conv2d_act = _ops()
    stride, padding, mode = tuple(m.stride), tuple(m.padding), m.padding_mode
    # under torch.compile the CPU routes' decisions (C++ builtins dynamo cannot trace) are not asked:
    # the compiler gets PyTorch's conv, and conv3x3's custom op for reflect padding; nor under
    # torch.jit.trace (export: the builtins return Python bools, which a trace cannot record)
    compiling = torch.compiler.is_compiling() or torch.jit.is_tracing()
    xw = input_in_weight_layout(x, w)  # (eager's output layout)
    if xw is None:  # (which only eager's call gives: _conv_common.input_in_weight_layout)
        return _plain_conv(m, x, w, bias, slope)
    x = xw
    if tuple(w.shape[-2:]) == (3, 3) and stride == (1, 1) and padding[0] == padding[1]:
        # Winograd where it pays (and for reflect padding, read in place); the activation, if
        # any, then runs in place on the conv's fresh output (nothing else holds it)
        if mode == "reflect" or (not compiling and winograd_profitable(x.shape, w.shape, padding[0])):
            y = conv3x3(x, w, bias, padding[0], mode)
            return y if slope is None else F.leaky_relu(y, slope, inplace=True)
    if mode == "zeros" and not compiling and _route_pays(m, x, w):
        return conv2d(x, w, bias, stride, padding) if slope is None else conv2d_act(x, w, bias, stride, padding, slope)
    # no faster route for this call: PyTorch's conv (the fused ops would only add their cost).
    # Not a 3x3 stride-1 conv: the decision was _route_pays' alone, cached; remember the call
    if not compiling and (tuple(w.shape[-2:]) != (3, 3) or stride != (1, 1)):
        plain = m.__dict__.setdefault("_ganengine_plain_calls", set())
        if len(plain) < 64:
            plain.add((x.shape, x.dtype, x.device, w.shape))
    y = m._conv_forward(x, w, bias)
    return y if slope is None else F.leaky_relu(y, slope, inplace=True)


def _route_pays(m, x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the conv op runs this call on its GEMM form or Winograd (asked of the op's rules
    once per input shape and cached on the module)."""
    key = (x.shape, x.dtype, x.device, w.shape)   # torch.Size is a hashable tuple
    cache = m.__dict__.setdefault("_ganengine_routes", {})
    hit = cache.get(key)
    if hit is None:
        from ganengine.ops.conv import uses_gemm, uses_winograd

        stride, padding = list(m.stride), list(m.padding)
        hit = bool(uses_gemm(x, w, stride, padding) or uses_winograd(x, w, stride, padding))
        if len(cache) < 64:
            cache[key] = hit
    return hit


class ConvMixin(FusedModule):
    """An nn.Conv2d (subclass) whose weight comes from ``_ganengine_weight``: None for
    ``self.weight`` (a Parameter, a parametrization, or the attribute a spectral-norm hook or
    wrapper sets), else the name of a method (``W_`` in BigGAN) or attribute that computes it.
    ``_ganengine_slope``: None, or the LeakyReLU slope fused after the conv (0 = ReLU)."""

    _ganengine_weight: str | None = None
    _ganengine_weight_call: bool = False
    _ganengine_slope: float | None = None
    _ganengine_sigma: str | None = None   # "biggan": weight = self.weight / biggan_sigma(self)
    _ganengine_sigma_side: str = "auto"   # where the division goes (forced only by the probes)

    @property
    def fused_name(self) -> str:
        act = "" if self._ganengine_slope is None else f" + leaky_relu({self._ganengine_slope})"
        return f"fused: conv{act}"

    def _fused_weight(self) -> torch.Tensor:
        if self._ganengine_weight is None:
            return self.weight
        w = getattr(self, self._ganengine_weight)
        return w() if self._ganengine_weight_call else w

    def _fused_call(self, x, slope):  # (not _apply: nn.Module._apply is what .to() / .double() call)
        if self._ganengine_sigma == "biggan":
            from ganengine.fusion.spectral import biggan_sigma

            return conv_apply(self, x, self.weight, slope, biggan_sigma(self), self._ganengine_sigma_side)
        return conv_apply(self, x, self._fused_weight(), slope)

    def forward(self, x):
        return self._fused_call(x, self._ganengine_slope)

    def _ganengine_act_forward(self, activation: str, negative_slope: float, x):
        if self._ganengine_slope is not None:
            raise RuntimeError("_ganengine_act_forward on a conv that already has an activation")
        return self._fused_call(x, _act_slope(activation, negative_slope))


class SpectralNormWrapperMixin(FusedModule):
    """SAGAN's ``SpectralNorm`` wrapper around a conv (ganengine/fusion/spectral.py,
    ``sagan_like``): its power iteration, then ``conv_apply`` on the inner conv with sigma, so
    the division goes to the smaller of the weight and the output (at SAGAN D's last convs the
    output is 8-32x smaller than the weight, and the weight-sized quotient and its backward were
    a third of the layer's time). ``_ganengine_slope``: the fused LeakyReLU slope or None.
    Unlike the wrapper's own forward, the inner conv's ``weight`` attribute (the wrapper's
    per-call ``W / sigma``) is not set: nothing in the module reads it."""

    _ganengine_slope: float | None = None
    _ganengine_sigma_side: str = "auto"   # where the division goes (forced only by the probes)

    @property
    def fused_name(self) -> str:
        act = "" if self._ganengine_slope is None else f" + leaky_relu({self._ganengine_slope})"
        return f"fused: spectral-normed conv{act}, sigma on the smaller side"

    def forward(self, x):
        w, sigma = sagan_sigma(self)
        m = self._modules["module"]   # (Module.__getattr__ costs ~0.7 us)
        if isinstance(m, torch.nn.ConvTranspose2d):
            return conv_transpose_apply(m, x, w, sigma, self._ganengine_sigma_side)
        return conv_apply(m, x, w, self._ganengine_slope, sigma, self._ganengine_sigma_side)


def conv_transpose_apply(m, x: torch.Tensor, w: torch.Tensor, sigma: torch.Tensor, side: str = "auto"):
    """``conv_transpose2d(x, w / sigma, m.bias, ...)`` of an nn.ConvTranspose2d ``m`` (zeros
    padding, no groups or dilation: checked by the rule) on the fused op, the division on the
    smaller of the weight and the output."""
    from ganengine.ops.conv import conv_transpose2d

    # (unbatched, or the output layout only eager's call gives: _conv_common.input_in_weight_layout;
    # w / sigma keeps w's layout)
    # (also under autocast: eager's own call, its dtype and numbers)
    if x.dim() != 4 or module_autocast(x) or (xw := input_in_weight_layout(x, w)) is None:
        return F.conv_transpose2d(x, w / sigma, m.bias, m.stride, m.padding, m.output_padding, m.groups, m.dilation)
    x = xw
    op = tuple(m._output_padding(x, None, list(m.stride), list(m.padding), list(m.kernel_size), 2, list(m.dilation)))
    if side == "auto":
        (sh, sw), (ph, pw), (kh, kw) = tuple(m.stride), tuple(m.padding), tuple(w.shape[-2:])
        out = (x.shape[0] * w.shape[1] * ((x.shape[2] - 1) * sh - 2 * ph + kh + op[0])
               * ((x.shape[3] - 1) * sw - 2 * pw + kw + op[1]))
        side = "weight" if w.numel() <= out else "output"
    if side == "weight":
        return conv_transpose2d(x, w / sigma, m.bias, m.stride, m.padding, op)
    y = conv_transpose2d(x, w, None, m.stride, m.padding, op) / sigma
    return y if m.bias is None else y + _bias_like(m.bias, y)


class ConvTransposeMixin(ConvMixin):
    """An nn.ConvTranspose2d whose weight comes from ``_ganengine_weight`` (see ConvMixin)."""

    @property
    def fused_name(self) -> str:
        return "fused: conv_transpose"

    def forward(self, x, output_size=None):
        from ganengine.ops.conv import conv_transpose2d

        w = self._fused_weight()
        if x.dim() != 4:
            return super(ConvMixin, self).forward(x, output_size)
        output_padding = self._output_padding(x, output_size, list(self.stride), list(self.padding),
                                              list(self.kernel_size), 2, list(self.dilation))
        if module_autocast(x) or (xw := input_in_weight_layout(x, w)) is None:
            # (nn.ConvTranspose2d.forward's call on the fused weight: eager's under autocast, and the
            # output layout only it gives, _conv_common.input_in_weight_layout)
            return F.conv_transpose2d(x, w, self.bias, self.stride, self.padding, output_padding, self.groups,
                                      self.dilation)
        return conv_transpose2d(xw, w, self.bias, self.stride, self.padding, tuple(output_padding))

    def _ganengine_act_forward(self, activation, negative_slope, x):  # not a graph head
        raise NotImplementedError


class BatchNormLikeMixin(FusedModule):
    """A batch norm written by hand (BigGAN's ``layers.bn``): ``F.batch_norm(x, mean, var,
    weight, bias, self.training, momentum, eps)`` under the names in ``_ganengine_bn``
    (mean, var, weight, bias buffer/parameter names; momentum), then ``_ganengine_activation``."""

    _ganengine_bn: tuple = ()
    _ganengine_activation: str = "none"
    _ganengine_negative_slope: float = 0.0

    @property
    def fused_name(self) -> str:
        return f"fused: batch_norm + {self._ganengine_activation}"

    def _ganengine_act_forward(self, activation, negative_slope, x, *unused):
        from ganengine.ops.batch_norm_act import batch_norm_act

        mean, var, weight, bias, momentum = self._ganengine_bn
        return batch_norm_act(x, getattr(self, mean), getattr(self, var), getattr(self, weight),
                              getattr(self, bias), self.training, momentum, self.eps, activation,
                              negative_slope)

    def forward(self, x, *unused):
        return self._ganengine_act_forward(self._ganengine_activation, self._ganengine_negative_slope, x)


class ConditionalBatchNormMixin(FusedModule):
    """BigGAN's ``ccbn``: ``bn(x) * gain(y) + bias(y)`` with ``gain(y) = 1 + <gain module>(y)``
    (``_ganengine_cbn = (gain child, bias child, mean buffer, var buffer, momentum, one_plus)``),
    then ``_ganengine_activation``; one ``GF.conditional_batch_norm_act`` call."""

    _ganengine_cbn: tuple = ()
    _ganengine_activation: str = "none"
    _ganengine_negative_slope: float = 0.0

    @property
    def fused_name(self) -> str:
        return f"fused: conditional_batch_norm + {self._ganengine_activation}"

    def _ganengine_act_forward(self, activation, negative_slope, x, y):
        from ganengine.ops.batch_norm_act import conditional_batch_norm_act

        gain_name, bias_name, mean, var, momentum, one_plus = self._ganengine_cbn
        gain = getattr(self, gain_name)(y)
        if one_plus:
            gain = 1 + gain
        bias = getattr(self, bias_name)(y)
        n = y.shape[0]
        return conditional_batch_norm_act(x, gain.reshape(n, -1), bias.reshape(n, -1), getattr(self, mean),
                                          getattr(self, var), self.training, momentum, self.eps, activation,
                                          negative_slope)

    def forward(self, x, y):
        return self._ganengine_act_forward(self._ganengine_activation, self._ganengine_negative_slope, x, y)
