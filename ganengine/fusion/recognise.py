"""Recognising modules by structure and behaviour, and building their fused twins.

Each ``build_*`` returns the replacement module, or a ``Decline(reason)``; it never raises for a
module it does not understand and never mutates the module it was given. A recognition is a
hypothesis from structure (what ``forward`` says, which tensors the module owns), confirmed by
``verify.same_function`` on a probe before it is used.

* conv modules: nn.Conv2d / nn.ConvTranspose2d whose weight is computed (BigGAN's ``SNConv2d``
  forward ``F.conv2d(x, self.W_(), self.bias, self.stride, ...)``; a parametrization such as
  ``torch.nn.utils.parametrizations.spectral_norm``; the pre-hook of the older
  ``torch.nn.utils.spectral_norm`` / ``weight_norm``), optionally with an activation fused;
* wrappers that set their inner conv's weight and call it (SAGAN's ``SpectralNorm``);
* hand-written batch norm (BigGAN's ``layers.bn``) and class-conditional batch norm (``ccbn``).
"""
from __future__ import annotations

import ast
import inspect
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from ganengine.fusion import checks
from ganengine.fusion.copying import FusedModule, clone, retype
from ganengine.fusion.mixins import (BatchNormLikeMixin, ConditionalBatchNormMixin, ConvMixin,
                                     ConvTransposeMixin, SpectralNormWrapperMixin)
from ganengine.fusion.spectral import biggan_like, sagan_like
from ganengine.fusion.verify import probe_like, same_function


class Decline(NamedTuple):
    reason: str


# ----------------------------------------------------------------------------- conv modules
_CONV_FUNCS = {"conv2d"}
_CONV_ARGS = ("bias", "stride", "padding", "dilation", "groups")


def _is_self_attr(node, name=None) -> bool:
    return (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
            and (name is None or node.attr == name))


def _call_name(func) -> str | None:
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return None


def _body(fn: ast.FunctionDef) -> list:
    body = list(fn.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # docstring
    return body


def conv_forward_weight(cls: type) -> tuple[str | None, bool] | Decline:
    """For an nn.Conv2d subclass that overrides forward: the weight source of a forward that is
    exactly ``return F.conv2d(x, <weight>, self.bias, self.stride, self.padding, self.dilation,
    self.groups)`` (or ``self._conv_forward(x, <weight>, self.bias)``), ``<weight>`` being
    ``self.NAME()`` or ``self.NAME``: ``(NAME, called)``."""
    fn = checks.function_ast(cls.forward)
    if fn is None:
        return Decline(f"cannot read the source of {cls.__name__}.forward")
    args = [a.arg for a in fn.args.args]
    body = _body(fn)
    if len(args) != 2 or fn.args.vararg or fn.args.kwarg or len(body) != 1 or not isinstance(body[0], ast.Return):
        return Decline(f"{cls.__name__}.forward is not a single conv call")
    call = body[0].value
    if not isinstance(call, ast.Call):
        return Decline(f"{cls.__name__}.forward does not return a conv call")
    name = _call_name(call.func)
    conv_forward = name == "_conv_forward" and _is_self_attr(call.func)
    if name not in _CONV_FUNCS and not conv_forward:
        return Decline(f"{cls.__name__}.forward calls {name}, not conv2d")
    pos = list(call.args)
    if any(isinstance(a, ast.Starred) for a in pos) or len(pos) < 2:
        return Decline(f"{cls.__name__}.forward passes unusual arguments to its conv")
    if not (isinstance(pos[0], ast.Name) and pos[0].id == args[1]):
        return Decline(f"{cls.__name__}.forward does not convolve its input directly")
    w = pos[1]
    if isinstance(w, ast.Call) and _is_self_attr(w.func) and not w.args and not w.keywords:
        source = (w.func.attr, True)
    elif _is_self_attr(w):
        source = (w.attr, False)
    else:
        return Decline(f"{cls.__name__}.forward computes its weight inline")
    # the remaining arguments must be the module's own settings, in order
    given = {}
    for i, a in enumerate(pos[2:]):
        given[_CONV_ARGS[i] if i < len(_CONV_ARGS) else "?"] = a
    for kw in call.keywords:
        given[kw.arg] = kw.value
    wanted = ("bias",) if conv_forward else _CONV_ARGS
    for key, node in given.items():
        if key not in wanted or not _is_self_attr(node, key):
            return Decline(f"{cls.__name__}.forward passes {key} other than self.{key}")
    missing = [k for k in wanted if k not in given]
    return source + (tuple(missing),)


def _conv_legal(m: nn.Module) -> str | None:
    if m.groups != 1 or tuple(m.dilation) != (1, 1):
        return f"groups={m.groups}, dilation={tuple(m.dilation)} (the fused convs take groups 1, dilation 1)"
    if isinstance(m.padding, str):
        return f"padding={m.padding!r} (give padding as numbers)"
    ks = tuple(m.kernel_size)
    if m.padding_mode != "zeros" and not (m.padding_mode == "reflect" and ks == (3, 3) and tuple(m.stride) == (1, 1)
                                         and not isinstance(m, nn.ConvTranspose2d)):
        return f"padding_mode={m.padding_mode!r} (only 3x3 stride-1 convs read reflect padding in place)"
    return None


def conv_weight_source(m: nn.Module) -> tuple[str | None, bool, str] | Decline:
    """How a conv module gets the weight its forward uses: ``(name or None, called, kind)``,
    ``kind`` the report's rule name."""
    base = nn.ConvTranspose2d if isinstance(m, nn.ConvTranspose2d) else nn.Conv2d
    cls = type(m)
    why = _conv_legal(m)
    if why:
        return Decline(why)
    if checks.patched_forward(m):
        return Decline("its forward was replaced on the instance")
    hooked = bool(m._forward_pre_hooks or m._forward_hooks or m._backward_hooks
                  or getattr(m, "_backward_pre_hooks", None))
    if hooked and not checks.weight_prehooks_only(m):
        return Decline(checks.hooks_reason(m))
    kind = ("conv_transpose2d" if base is nn.ConvTranspose2d else "conv2d")
    if cls.forward is base.forward:
        if getattr(cls, "_conv_forward", None) is not getattr(base, "_conv_forward", None) and base is nn.Conv2d:
            return Decline(f"{cls.__name__} overrides _conv_forward")
        if parametrize.is_parametrized(m, "weight"):
            return (None, False, kind + "(parametrized weight)")
        if hooked:
            return (None, False, kind + "(weight from a pre-hook)")
        if not isinstance(m._parameters.get("weight"), nn.Parameter):
            return (None, False, kind + "(weight set by a wrapper)")
        return (None, False, kind)
    if base is nn.ConvTranspose2d:
        return Decline(f"{cls.__name__} overrides forward")
    src = conv_forward_weight(cls)
    if isinstance(src, Decline):
        return src
    name, called, missing = src
    defaults = {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 1, "bias": None}
    for key in missing:  # an argument left out of the call must be at its default in the module
        value = getattr(m, key)
        if key in ("stride", "padding", "dilation"):
            value = tuple(value)
        if value != defaults[key]:
            return Decline(f"{cls.__name__}.forward leaves out {key}, which the module sets to {value}")
    return (name, called, kind + "(computed weight)")


def _conv_probe(m: nn.Module, wrapper: nn.Module | None = None):
    """Inputs for a conv probe: (1 or 2, C_in, k + 3, k + 3)."""
    ref = checks.first_tensor(m)
    in_ch = m.in_channels
    kh, kw = tuple(m.kernel_size)
    shape = (2, in_ch, kh + 3, kw + 3)

    def make(gen):
        return (probe_like(ref if ref is not None else torch.empty(0), shape, gen),)
    return make


def build_conv(m: nn.Module, slope: float | None = None, act: nn.Module | None = None):
    """A retyped conv running on the fused ops (with the activation ``slope`` fused), or Decline."""
    if isinstance(m, FusedModule):
        return Decline("already fused")
    src = conv_weight_source(m)
    if isinstance(src, Decline):
        return src
    name, called, _kind = src
    if isinstance(m, nn.ConvTranspose2d) and slope is not None:
        return Decline("no fused transposed conv + activation op")
    why = checks.has_data(m)
    if why:
        return Decline(why)
    mixin = ConvTransposeMixin if isinstance(m, nn.ConvTranspose2d) else ConvMixin
    new = retype(m, mixin, _ganengine_weight=name, _ganengine_weight_call=called, _ganengine_slope=slope)
    if type(m) in (nn.Conv2d, nn.ConvTranspose2d) and isinstance(m._parameters.get("weight"), nn.Parameter) \
            and not m._forward_pre_hooks:
        return new  # plain PyTorch conv reading its own Parameter: nothing to verify
    if not isinstance(getattr(m, "in_channels", None), int):
        return Decline("cannot tell its input channels to probe it")
    original = m if act is None else (lambda x: act(m(x)))
    candidates = [new]
    if called and mixin is ConvMixin and biggan_like(m):
        # BigGAN's SN: the same sigma, dividing the output where that is the smaller tensor
        candidates.insert(0, retype(m, mixin, _ganengine_weight=name, _ganengine_weight_call=called,
                                    _ganengine_slope=slope, _ganengine_sigma="biggan"))
    why = None
    for cand in candidates:
        sides = ("output", "weight") if cand.__dict__.get("_ganengine_sigma") else ("auto",)
        for side in sides:  # each path the sigma candidate can take at run time
            object.__setattr__(cand, "_ganengine_sigma_side", side)
            why = same_function(original, cand, [m, cand] + ([act] if act is not None else []), _conv_probe(m))
            if why:
                break
        if why is None:
            object.__setattr__(cand, "_ganengine_sigma_side", "auto")
            return cand
    return Decline(why)


def conv_kind(m: nn.Module) -> str:
    src = conv_weight_source(m)
    return src.reason if isinstance(src, Decline) else src[2]


# ----------------------------------------------------------------------------- wrappers
def wrapped_child(w: nn.Module) -> str | None:
    """The child a wrapper's forward ends by calling with all its arguments (SAGAN's
    ``SpectralNorm``: ``...; return self.module.forward(*args)``), when the statements before
    do not read those arguments."""
    if len(w._modules) != 1 or checks.is_torch_class(type(w)) or isinstance(w, FusedModule):
        return None
    (child_name,) = w._modules
    fn = checks.function_ast(type(w).forward)
    if fn is None:
        return None
    body = _body(fn)
    if not body or not isinstance(body[-1], ast.Return) or not isinstance(body[-1].value, ast.Call):
        return None
    call = body[-1].value
    f = call.func
    if isinstance(f, ast.Attribute) and f.attr == "forward":
        f = f.value
    if not _is_self_attr(f, child_name):
        return None
    params = [a.arg for a in fn.args.args[1:]]
    star = fn.args.vararg.arg if fn.args.vararg else None
    if star and params:
        return None
    if star:
        if not (len(call.args) == 1 and isinstance(call.args[0], ast.Starred)
                and isinstance(call.args[0].value, ast.Name) and call.args[0].value.id == star):
            return None
        names = {star}
    else:
        if [getattr(a, "id", None) for a in call.args] != params or call.keywords:
            return None
        names = set(params)
    for stmt in body[:-1]:
        if any(isinstance(n, ast.Name) and n.id in names for n in ast.walk(stmt)):
            return None
    return child_name


def build_wrapped_conv(w: nn.Module, slope: float | None = None, act: nn.Module | None = None):
    """A copy of the wrapper whose inner conv runs on the fused ops (with the activation)."""
    child_name = wrapped_child(w)
    inner = w._modules[child_name] if child_name else None
    if not isinstance(inner, (nn.Conv2d, nn.ConvTranspose2d)):
        return Decline("not a wrapper around a conv")
    if checks.hook_kinds(w):
        return Decline(checks.hooks_reason(w))
    src = conv_weight_source(inner)
    if isinstance(src, Decline):
        return src
    if isinstance(inner, nn.ConvTranspose2d) and slope is not None:
        return Decline("no fused transposed conv + activation op")
    why = checks.has_data(w)
    if why:
        return Decline(why)
    original = w if act is None else (lambda x: act(w(x)))
    if type(inner) in (nn.Conv2d, nn.ConvTranspose2d) and sagan_like(w):
        cand = _sagan_wrapper(w, child_name, inner, slope, original, act)
        if cand is not None:
            return cand
    mixin = ConvTransposeMixin if isinstance(inner, nn.ConvTranspose2d) else ConvMixin
    new = clone(w)
    new.__dict__["_ganengine_fused_wrapper"] = True  # fuse leaves its insides alone from now on
    new._modules[child_name] = retype(inner, mixin, _ganengine_weight=src[0], _ganengine_weight_call=src[1],
                                      _ganengine_slope=slope)
    why = same_function(original, new, [w, new] + ([act] if act is not None else []), _conv_probe(inner))
    return Decline(why) if why else new


def _sagan_wrapper(w, child_name, inner, slope, original, act):
    """SAGAN's SpectralNorm wrapper with sigma on the smaller side (mixins.SpectralNormWrapperMixin),
    verified on both sides against the wrapper's own forward; None if it does not match (the
    caller then fuses only the inner conv)."""
    new = retype(w, SpectralNormWrapperMixin, _ganengine_slope=slope)
    new._modules[child_name] = clone(inner)   # same Parameters; its route caches stay off the original
    for side in ("output", "weight"):
        object.__setattr__(new, "_ganengine_sigma_side", side)
        if same_function(original, new, [w, new] + ([act] if act is not None else []), _conv_probe(inner)):
            return None
    object.__setattr__(new, "_ganengine_sigma_side", "auto")
    return new


# ----------------------------------------------------------------------------- batch norms
def _vectors(d: dict, c: int | None = None) -> list[str]:
    return [k for k, t in d.items() if t is not None and t.dim() == 1 and t.is_floating_point()
            and (c is None or t.shape[0] == c)]


def _forward_arity(cls: type) -> int | None:
    try:
        sig = inspect.signature(cls.forward)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())[1:]
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    return sum(1 for p in params if p.default is inspect.Parameter.empty)


def _user_class(m: nn.Module) -> bool:
    cls = type(m)
    return not (checks.is_torch_class(cls) or cls.__module__.startswith("ganengine.") or isinstance(m, FusedModule))


def batch_norm_like(m: nn.Module) -> bool:
    """Structure of a hand-written batch norm: no children, two (C,) parameters, two (C,)
    buffers, an ``eps``, forward(x) (BigGAN's ``layers.bn`` takes an unused ``y=None``)."""
    if not _user_class(m) or m._modules or not isinstance(getattr(m, "eps", None), float):
        return False
    params, bufs = _vectors(m._parameters), _vectors(m._buffers)
    if len(params) != 2 or len(bufs) != 2 or len(m._parameters) != 2 or len(m._buffers) != 2:
        return False
    c = m._parameters[params[0]].shape[0]
    return all(t.shape[0] == c for t in list(m._parameters.values()) + list(m._buffers.values())) \
        and _forward_arity(type(m)) == 1


def build_batch_norm_like(m: nn.Module, activation: str = "none", negative_slope: float = 0.0,
                          act: nn.Module | None = None):
    if checks.hook_kinds(m):
        return Decline(checks.hooks_reason(m))
    if checks.patched_forward(m):
        return Decline("its forward was replaced on the instance")
    why = checks.has_data(m)
    if why:
        return Decline(why)
    (w, b), (mean, var) = _vectors(m._parameters), _vectors(m._buffers)
    momentum = getattr(m, "momentum", 0.1)
    if not isinstance(momentum, float):
        return Decline(f"momentum={momentum!r} (a float expected)")
    ref = m._parameters[w]
    c = ref.shape[0]
    new = retype(m, BatchNormLikeMixin, _ganengine_bn=(mean, var, w, b, momentum),
                 _ganengine_activation=activation, _ganengine_negative_slope=float(negative_slope))

    def make(gen):
        return (probe_like(ref, (3, c, 3, 4), gen),)
    original = m if act is None else (lambda x: act(m(x)))
    why = same_function(original, new, [m, new], make)
    return Decline(f"forward is not batch norm with its own tensors: {why}") if why else new


def conditional_batch_norm_like(m: nn.Module) -> bool:
    """Structure of BigGAN's ``ccbn``: two child modules (gain, bias), no parameters of its own, two
    (C,) buffers (mean, var), an ``eps``, forward(x, y). What the children are is the builder's
    question (it declines, saying why, where it cannot make a y for them: the report then names
    the module instead of passing over it)."""
    if not _user_class(m) or len(m._modules) != 2 or m._parameters or not isinstance(getattr(m, "eps", None), float):
        return False
    bufs = _vectors(m._buffers)
    if len(bufs) != 2 or len(m._buffers) != 2 or m._buffers[bufs[0]].shape != m._buffers[bufs[1]].shape:
        return False
    return _forward_arity(type(m)) == 2


def _y_probe(child: nn.Module):
    """A function gen -> y for a Linear-like or Embedding child, or a plain Sequential starting with
    one (U-Net GAN's self-modulated ``ccbn``: ``Sequential(Linear, ReLU, Linear)`` on the latent);
    None otherwise. (The probe only makes a y: what the child computes is checked against the
    original's forward by the builder.)"""
    if checks.plain_sequential(child) and len(child) > 0:
        return _y_probe(child[0])
    if isinstance(child, nn.Embedding):
        n = child.num_embeddings
        return lambda gen: torch.randint(0, n, (3,), generator=gen)
    if isinstance(child, nn.Linear) and isinstance(child.in_features, int):
        d = child.in_features
        return lambda gen: torch.randn(3, d, generator=gen)
    return None


def build_conditional_batch_norm(m: nn.Module, activation: str = "none", negative_slope: float = 0.0,
                                 act: nn.Module | None = None):
    if checks.hook_kinds(m):
        return Decline(checks.hooks_reason(m))
    if checks.patched_forward(m):
        return Decline("its forward was replaced on the instance")
    why = checks.has_data(m)
    if why:
        return Decline(why)
    gain_name, bias_name = list(m._modules)
    mean, var = _vectors(m._buffers)
    momentum = getattr(m, "momentum", 0.1)
    if not isinstance(momentum, float):
        return Decline(f"momentum={momentum!r} (a float expected)")
    ref = m._buffers[mean]
    c = ref.shape[0]
    y_of = _y_probe(m._modules[gain_name])
    if y_of is None or _y_probe(m._modules[bias_name]) is None:
        odd = next(n for n in (gain_name, bias_name) if _y_probe(m._modules[n]) is None)
        return Decline(f"its {odd} child ({type(m._modules[odd]).__name__}) is not a Linear, an Embedding or a "
                       "Sequential starting with one: fuse() cannot make a y to check it on")

    def make(gen):
        y = y_of(gen).to(ref.device)
        if y.is_floating_point():
            y = y.to(ref.dtype).requires_grad_(True)
        return probe_like(ref, (3, c, 3, 4), gen), y

    original = m if act is None else (lambda x, y: act(m(x, y)))
    last = None
    for one_plus in (True, False):  # BigGAN's gain is 1 + linear(y)
        new = retype(m, ConditionalBatchNormMixin,
                     _ganengine_cbn=(gain_name, bias_name, mean, var, momentum, one_plus),
                     _ganengine_activation=activation, _ganengine_negative_slope=float(negative_slope))
        last = same_function(original, new, [m, new], make)
        if last is None:
            return new
    return Decline(f"forward is not conditional batch norm (gain, bias from its children): {last}")


def activation_slope(act: nn.Module) -> float | None:
    """The LeakyReLU slope of an exact nn.ReLU / nn.LeakyReLU (slope >= 0), else None."""
    if type(act) is nn.ReLU:
        return 0.0
    if type(act) is nn.LeakyReLU and act.negative_slope >= 0:
        return float(act.negative_slope)
    return None


def activation_name(slope: float) -> tuple[str, float]:
    return ("relu", 0.0) if slope == 0.0 else ("leaky_relu", slope)

