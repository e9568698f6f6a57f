"""The rule table of ``ganengine.fuse``: every rewrite, in the order it is tried, in one place.

Three kinds of rule:

* ``ModuleRule``: one module becomes one module computing the same function (same keys, same
  Parameters and buffers). ``stage="early"`` rules run on a container's children before the
  sequence rules (so that e.g. a 3x3 conv is already a Winograd ``Conv3x3`` when
  ``ReflectionPad2d -> Conv3x3`` is matched); ``"late"`` rules after them, on what they left.
* ``SequenceRule``: consecutive children of a plain ``nn.Sequential`` (not a subclass with its own
  forward, not one its parent indexes or iterates) become one fused module at one index and
  ``nn.Identity()`` at the others, so indices and state_dict keys stay the same.
* graph rules (ganengine/fusion/graph.py): the same patterns written as calls in a forward.

A rule's ``match`` is a cheap structural test; its ``build`` returns the replacement(s), or a
``Decline(reason)`` (listed in the report) when it cannot keep the numbers exactly, or None when
it is not a candidate after all. At each position of a Sequential the sequence rules are tried
in table order and the first that builds wins. The table order is the priority: longer
patterns before their prefixes (conv -> norm -> act before norm -> act), specific before
general.

``register_module_rule`` / ``register_pair_rule`` (ganengine.fuse) append user rules after
the built-in ones of their kind.
"""
from __future__ import annotations

import contextvars
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ganengine.fusion import checks, recognise
from ganengine.fusion.recognise import Decline, activation_slope

# fuse(keep_channels_last=...): whether the instance norms fuse() builds keep a channels_last input's
# layout (True) or give nn.InstanceNorm2d's contiguous output (False, the default: same layout, same
# behaviour downstream); set by fuse() around its run
KEEP_LAYOUT: contextvars.ContextVar[bool] = contextvars.ContextVar("ganengine_fuse_keep_layout", default=False)


@dataclass(frozen=True)
class ModuleRule:
    name: str
    match: Callable[[nn.Module], bool]
    build: Callable[[nn.Module], object]
    stage: str = "late"


@dataclass(frozen=True)
class SequenceRule:
    name: str
    pattern: tuple[Callable[[nn.Module], bool], ...]
    build: Callable[..., object]   # (*modules) -> list of replacements | Decline | None
    # build also gets ``parents={id(module): number of parents}`` of the whole tree (a rule that
    # edits inside a module must know it is not shared)
    needs_parents: bool = False


# ----------------------------------------------------------------------------- matchers
def _plain(m: nn.Module) -> bool:
    """Runs exactly its class's forward on its own Parameters: no hooks, no parametrization,
    no patched forward."""
    return not (checks.hook_kinds(m) or parametrize.is_parametrized(m) or checks.patched_forward(m))


def _why_not_plain(*mods: nn.Module) -> str | None:
    for m in mods:
        if checks.hook_kinds(m):
            return checks.hooks_reason(m)
        if parametrize.is_parametrized(m):
            return f"{type(m).__name__} is parametrized"
        if checks.patched_forward(m):
            return f"{type(m).__name__}'s forward was replaced on the instance"
    return None


def _parametrized(m: nn.Module, kind: type) -> bool:
    """A ``kind`` module that ``register_parametrization`` retyped (torch swaps its class for a
    generated ``Parametrized<Kind>`` subclass): it still sits at the pattern's position, so the rule
    matches it and declines it with the reason, instead of passing it by in silence."""
    return parametrize.is_parametrized(m) and type(m).__bases__ == (kind,)


def _exact_or_parametrized(kind: type):
    return lambda m: type(m) is kind or _parametrized(m, kind)


def _is_act(m: nn.Module) -> bool:
    return type(m) in (nn.ReLU, nn.LeakyReLU)


def _exact_conv(m: nn.Module) -> bool:
    return type(m) is nn.Conv2d


def _conv_like(m: nn.Module) -> bool:
    """nn.Conv2d or a subclass / parametrized / hooked conv (not a transposed conv)."""
    from ganengine.fusion.copying import FusedModule

    return (isinstance(m, nn.Conv2d) and not isinstance(m, FusedModule)
            and not type(m).__module__.startswith("ganengine."))


def _legal_zero_conv(m: nn.Module) -> bool:
    return (m.groups == 1 and tuple(m.dilation) == (1, 1) and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def _own_weight(m: nn.Module) -> bool:
    return isinstance(m._parameters.get("weight"), nn.Parameter)


# ----------------------------------------------------------------------------- module rules
def _attention(kind: str):
    def match(m):
        from ganengine.nn import attention as A
        return A._match_sagan(m) if kind == "sagan" else A._match_biggan(m)

    def build(m):
        from ganengine.nn import attention as A
        why = _why_not_plain(m) or (_extra_forward_args(m) if kind == "sagan" else None)
        if why:
            return Decline(why)
        for name, child in m.named_modules():  # (said before the probe runs: it would call them)
            if child is not m and checks.hook_kinds(child) and not checks.weight_prehooks_only(child):
                return Decline(f"its {name} has a {' and a '.join(checks.hook_kinds(child))} (the fused block "
                               "does not run it as a module)")
        new = A._build_sagan(m, KEEP_LAYOUT.get()) if kind == "sagan" else A._build_biggan(m)
        return new if new is not None else Decline("the fused block's output differs from the module's on a probe")
    return match, build


def _extra_forward_args(m: nn.Module) -> str | None:
    """Why SelfAttention2d cannot stand in for ``m``'s forward calls: ``m`` takes arguments besides
    the input, which the probe, calling ``m(x)``, never tried, and which SelfAttention2d would read
    as its own ``return_attention`` (ganengine's SAGAN ``SelfAttn(x, False)`` returns ``(out, None)``,
    SelfAttention2d ``out``). (BigGAN's blocks take the reference's unused ``y``, as its does.)"""
    try:
        params = list(inspect.signature(m.forward).parameters.values())
    except (TypeError, ValueError):
        return "its forward's signature cannot be read"
    if len(params) == 1 and params[0].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                               inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return None
    return (f"its forward takes {', '.join(p.name for p in params)}; the fused block takes the input alone "
            "(the probe could not try the other arguments)")


def _match_conv3x3(m):
    from ganengine.nn import conv3x3
    from ganengine.ops import conv3x3 as ops

    # below the Winograd threshold the op runs PyTorch's conv behind a custom op: only its cost
    return conv3x3._is_plain_conv3x3(m) and min(m.in_channels, m.out_channels) >= ops.MIN_CHANNELS


def _build_conv3x3(m):
    from ganengine.nn.conv3x3 import Conv3x3
    if _why_not_plain(m) or not _own_weight(m):
        return None  # hooks, parametrizations, wrappers: the late conv_module rule decides
    return Conv3x3.from_conv(m)


def _match_plain_conv(kind):
    def match(m):
        return type(m) is kind and _legal_zero_conv(m)
    return match


def conv_route_may_pay(m: nn.Module, w: torch.Tensor | None = None) -> bool:
    """Whether the conv op could run this conv on its own route (GEMM form, Winograd 4x4) for
    some input size, asked of the op's rules themselves (ganengine.ops.conv.uses_gemm /
    uses_winograd, on stride-0 stand-in inputs: the smallest map for the GEMM form, a large one
    for Winograd). If not, every call would run PyTorch's conv behind the op: only its cost."""
    from ganengine.ops import conv as ops

    w = m.weight if w is None else w
    if w.is_meta:
        return True
    transposed = isinstance(m, nn.ConvTranspose2d)
    stride, padding = list(m.stride), list(m.padding)
    one = torch.zeros((), dtype=w.dtype, device=w.device)
    k = tuple(m.kernel_size)
    small = 1 if transposed else max(k[0] - 2 * padding[0], k[1] - 2 * padding[1], 1)
    try:
        return bool(ops.uses_gemm(one.expand(1, m.in_channels, small, small), w, stride, padding, transposed)
                    or ops.uses_winograd(one.expand(1, m.in_channels, 128, 128), w, stride, padding, transposed,
                                         list(getattr(m, "output_padding", (0, 0)))))
    except Exception:  # the route rules could not answer: keep PyTorch's conv
        return False


def conv_act_may_pay(m: nn.Module, w: torch.Tensor | None = None) -> bool:
    """Whether conv2d_act pays for this plain conv on its weight's device. On CUDA: where its call is
    the CUDA C++ entry (auto takes the cuda backend first where the build has its kernels): cuDNN's
    convolution plus one epilogue kernel each way, one kernel and one pass over the output fewer
    than eager's bias add and activation, at eager's host cost (the CPU proxy of the CUDA path:
    docs/conv_act.md); the Triton route costs more host time than eager there. Elsewhere: where the
    conv op has a route of its own (conv_route_may_pay). (fuse() decides on the device the model is
    on: fuse after moving it.)"""
    w = m.weight if w is None else w
    if w.is_cuda:
        from ganengine.ops import _dispatch, conv_act
        return _dispatch.cuda_entry("conv2d_act", "conv2d_act", conv_act._ACT_KERNELS) is not None
    return conv_route_may_pay(m, w)


def computed_conv_declined(m: nn.Module, with_act: bool) -> Decline | None:
    """A computed-weight conv (a spectral / weight norm by hook or parametrization, a subclass
    computing its weight): its fused module pays only where the conv op has a route of its own for
    the conv (as a plain conv's), or for BigGAN's own SN, whose sigma it computes on cheaper ops
    than the reference (docs/spectral_norm.md). Asked of the stored weight (reading ``m.weight`` of
    a parametrized conv would run its power iteration)."""
    from ganengine.fusion.spectral import biggan_like

    if biggan_like(m):
        return None
    if parametrize.is_parametrized(m, "weight"):
        w = getattr(m.parametrizations.weight, "original", None)  # (original0, 1, ...: a split one)
    else:
        w = m._parameters.get("weight")
        w = m._parameters.get("weight_orig") if w is None else w
    if not isinstance(w, torch.Tensor) or nn.parameter.is_lazy(w) or w.dim() != 4:
        return None  # (cannot tell: the probe decides as before)
    pays = conv_act_may_pay(m, w) if with_act else conv_route_may_pay(m, w)
    if pays:
        return None
    return Decline(_NO_CUDA_ENTRY if (with_act and w.is_cuda) else _NO_ROUTE)


def _build_plain_conv(m):
    from ganengine.nn.conv import Conv2d, ConvTranspose2d
    if not _own_weight(m) or _why_not_plain(m):
        return None  # left to the computed-weight rule below, which knows hooks and wrappers
    if not conv_route_may_pay(m):
        return None
    return (Conv2d if type(m) is nn.Conv2d else ConvTranspose2d).from_module(m)


def _match_computed_conv(m):
    from ganengine.fusion.copying import FusedModule
    return (isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and not isinstance(m, FusedModule)
            and not type(m).__module__.startswith("ganengine.")
            and not (type(m) in (nn.Conv2d, nn.ConvTranspose2d) and _own_weight(m) and _plain(m)))


def _build_computed_conv(m):
    if type(m) in (nn.Conv2d, nn.ConvTranspose2d) and not _own_weight(m) and not m._forward_pre_hooks:
        return None  # an inner conv whose wrapper sets its weight: the wrapper's rule handles it
    return computed_conv_declined(m, False) or recognise.build_conv(m)


def _match_norm(kind):
    return _exact_or_parametrized(kind)


def _build_instance_norm(m):
    from ganengine.nn.norm_act import InstanceNormAct2d
    why = _why_not_plain(m)
    return Decline(why) if why else InstanceNormAct2d.from_modules(m, None, keep_layout=KEEP_LAYOUT.get())


def _build_batch_norm(m):
    from ganengine.nn.batch_norm_act import FusedBatchNorm1d, FusedBatchNorm2d
    why = _why_not_plain(m)
    if why:
        return Decline(why)
    # (class names holding "BatchNorm2d"/"BatchNorm1d": init code that finds norms by name)
    return (FusedBatchNorm2d if type(m) is nn.BatchNorm2d else FusedBatchNorm1d).from_modules(m, None)


# ----------------------------------------------------------------------------- sequence rules
def _build_pad_conv3x3(pad, conv):
    from ganengine.nn.conv3x3 import Conv3x3
    if conv.padding[0] != 0:
        return None
    why = _why_not_plain(pad, conv)
    if why:
        return Decline(why)
    return [nn.Identity(), Conv3x3.from_conv(conv, padding=pad.padding[0], padding_mode="reflect")]


def _build_pad_conv(pad, conv):
    if tuple(conv.padding) != (0, 0) or tuple(conv.kernel_size) == (3, 3):
        return None
    return Decline(f"no fused op reads reflect padding for a {conv.kernel_size[0]}x{conv.kernel_size[1]} "
                   f"kernel: the pad stays a separate op (docs/fuse.md measures its share)")


_NO_ROUTE = ("the conv op has no faster route for this conv (GEMM form, Winograd): the fused op would only "
             "add its per-call cost, measured in docs/fuse.md")
_NO_CUDA_ENTRY = ("conv2d_act's CUDA C++ entry does not serve this call under the requested backend (or the "
                  "build has no CUDA kernels): its Triton route costs more host time per call than eager's conv and "
                  "activation (docs/conv_act.md)")


def _build_conv_in_act(conv, norm, act):
    from ganengine.nn.conv_act import Conv2dInstanceNormAct
    if parametrize.is_parametrized(conv) or parametrize.is_parametrized(norm):
        # (the norm + activation pair is tried next; a parametrized conv is the conv_module rule's job)
        return Decline(f"{type(conv if parametrize.is_parametrized(conv) else norm).__name__} is parametrized")
    if not _legal_zero_conv(conv) or not _own_weight(conv):
        return None
    if not conv_route_may_pay(conv):
        return Decline(_NO_ROUTE + "; the norm and activation fuse as a pair")
    slope = activation_slope(act)
    why = _why_not_plain(conv, norm, act)
    if why is None and norm.affine:
        why = "affine instance norm: its parameters' keys would move to the conv's index"
    if why is None and norm.track_running_stats:
        why = "instance norm with running statistics (the fused conv op keeps none)"
    if why is None and norm.num_features != conv.out_channels:
        why = f"the norm has {norm.num_features} features but the conv {conv.out_channels} channels"
    if why is None and slope is None:
        why = "LeakyReLU with a negative slope"
    if why:
        return Decline(why)
    activation, slope = recognise.activation_name(slope)
    fused = Conv2dInstanceNormAct(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                  bias=conv.bias is not None, eps=norm.eps, affine=False, activation=activation,
                                  negative_slope=slope if activation == "leaky_relu" else 0.2, device="meta")
    fused.weight, fused.bias = conv.weight, conv.bias
    fused.keep_layout = KEEP_LAYOUT.get()
    fused.train(conv.training)
    return [fused, nn.Identity(), nn.Identity()]


def _build_norm_act(norm, act):
    from ganengine.nn.norm_act import InstanceNormAct2d
    why = _why_not_plain(norm, act)
    return Decline(why) if why else [InstanceNormAct2d.from_modules(norm, act, keep_layout=KEEP_LAYOUT.get()),
                                     nn.Identity()]


def _build_bn_act(norm, act):
    from ganengine.nn.batch_norm_act import FusedBatchNorm1d, FusedBatchNorm2d
    why = _why_not_plain(norm, act)
    if why:
        return Decline(why)
    cls = FusedBatchNorm2d if type(norm) is nn.BatchNorm2d else FusedBatchNorm1d
    return [cls.from_modules(norm, act), nn.Identity()]


def _build_bn_like_act(norm, act):
    slope = activation_slope(act)
    why = _why_not_plain(act) or (None if slope is not None else "LeakyReLU with a negative slope")
    if why:
        return Decline(why)
    activation, slope = recognise.activation_name(slope)
    new = recognise.build_batch_norm_like(norm, activation, slope, act=act)
    return new if isinstance(new, Decline) else [new, nn.Identity()]


def _build_conv_act(conv, act):
    from ganengine.nn.conv_act import Conv2dAct
    slope = activation_slope(act)
    why = _why_not_plain(act) or (None if slope is not None else "LeakyReLU with a negative slope")
    if why:
        return Decline(why)
    if type(conv) is nn.Conv2d and _own_weight(conv) and _plain(conv):
        if not _legal_zero_conv(conv):
            return Decline(f"groups={conv.groups}, dilation={tuple(conv.dilation)}, padding_mode="
                           f"{conv.padding_mode!r} (the fused conv takes groups 1, dilation 1, zero padding)")
        if not conv_act_may_pay(conv):
            return Decline(_NO_CUDA_ENTRY if conv.weight.is_cuda else _NO_ROUTE)
        fused = Conv2dAct.from_modules(conv, act)
        fused.negative_slope = slope
        return [fused, nn.Identity()]
    new = computed_conv_declined(conv, True) or recognise.build_conv(conv, slope, act=act)
    return new if isinstance(new, Decline) else [new, nn.Identity()]


def _preact_producer(m):
    """What can take the activation of the block after it into its epilogue (a parametrized norm:
    matched, to be declined with the reason)."""
    return (any(_exact_or_parametrized(k)(m) for k in (nn.BatchNorm2d, nn.BatchNorm1d, nn.InstanceNorm2d))
            or _conv_like(m) or recognise.batch_norm_like(m) or _is_conv_wrapper(m))


def _build_pre_activation(producer, block, parents):
    """``producer -> block`` where ``block`` first activates its input: the activation moves into
    the producer's fused op, the block's becomes Identity (ganengine/fusion/preact.py says when
    that is exact; the producer's own pair rule says whether its fused op pays)."""
    from ganengine.fusion import preact

    slot = preact.fold_slot(block, parents)
    if slot is None or isinstance(slot, Decline):
        return slot
    if any(_parametrized(producer, k) for k in (nn.BatchNorm2d, nn.BatchNorm1d, nn.InstanceNorm2d)):
        return Decline(_why_not_plain(producer))
    act = slot[2]
    if type(producer) in (nn.BatchNorm2d, nn.BatchNorm1d):
        out = _build_bn_act(producer, act)
    elif type(producer) is nn.InstanceNorm2d:
        out = _build_norm_act(producer, act)
    elif _conv_like(producer):
        out = _build_conv_act(producer, act)
    elif recognise.batch_norm_like(producer):
        out = _build_bn_like_act(producer, act)
    else:
        out = _build_wrapped_conv_act(producer, act)
    if out is None or isinstance(out, Decline):
        return out
    shared = checks.shared_reason(producer, parents)  # (before the edit: the engine's check comes after)
    if shared:
        return Decline(shared)
    preact.apply(slot)
    return [out[0], block]


def _is_conv_wrapper(m):
    return recognise.wrapped_child(m) is not None and isinstance(next(iter(m._modules.values())), nn.Conv2d)


def _build_wrapped_conv_act(wrapper, act):
    slope = activation_slope(act)
    why = _why_not_plain(act) or (None if slope is not None else "LeakyReLU with a negative slope")
    if why:
        return Decline(why)
    new = recognise.build_wrapped_conv(wrapper, slope, act=act)
    return new if isinstance(new, Decline) else [new, nn.Identity()]


def _is_wrapper(m):
    return (recognise.wrapped_child(m) is not None
            and isinstance(next(iter(m._modules.values())), (nn.Conv2d, nn.ConvTranspose2d)))


def _preact_block(m):
    from ganengine.fusion import preact
    return preact.starts_with_act(m)


def _exact(kind):
    return lambda m: type(m) is kind


_sagan = _attention("sagan")
_biggan = _attention("biggan")

RULES = (
    # -- early module rules: whole blocks, and 3x3 convs onto Winograd before pairs are matched
    ModuleRule("sagan_self_attention", *_sagan, stage="early"),
    ModuleRule("biggan_self_attention", *_biggan, stage="early"),
    ModuleRule("conv3x3", _match_conv3x3, _build_conv3x3, stage="early"),
    # -- sequences, longest and most specific first
    SequenceRule("reflection_pad+conv3x3", (lambda m: type(m) is nn.ReflectionPad2d and len(set(m.padding)) == 1,
                                            lambda m: type(m).__name__ == "Conv3x3"), _build_pad_conv3x3),
    SequenceRule("reflection_pad+conv", (_exact(nn.ReflectionPad2d), _exact_conv), _build_pad_conv),
    SequenceRule("conv2d+instance_norm+act", (_exact_or_parametrized(nn.Conv2d), _exact_or_parametrized(nn.InstanceNorm2d),
                                              _is_act), _build_conv_in_act),
    SequenceRule("instance_norm+act", (_exact_or_parametrized(nn.InstanceNorm2d), _is_act), _build_norm_act),
    SequenceRule("batch_norm+act", (_exact_or_parametrized(nn.BatchNorm2d), _is_act), _build_bn_act),
    SequenceRule("batch_norm1d+act", (_exact_or_parametrized(nn.BatchNorm1d), _is_act), _build_bn_act),
    SequenceRule("batch_norm_like+act", (recognise.batch_norm_like, _is_act), _build_bn_like_act),
    SequenceRule("conv2d+leaky_relu", (_conv_like, _is_act), _build_conv_act),
    SequenceRule("wrapped_conv+leaky_relu", (_is_conv_wrapper, _is_act), _build_wrapped_conv_act),
    SequenceRule("pre_activation", (_preact_producer, lambda m: _preact_block(m)), _build_pre_activation,
                 needs_parents=True),
    # -- late module rules: what the sequences left
    ModuleRule("conv2d", _match_plain_conv(nn.Conv2d), _build_plain_conv),
    ModuleRule("conv_transpose2d", _match_plain_conv(nn.ConvTranspose2d), _build_plain_conv),
    ModuleRule("conv_module", _match_computed_conv, _build_computed_conv),
    ModuleRule("wrapped_conv", _is_wrapper, recognise.build_wrapped_conv),
    ModuleRule("instance_norm", _match_norm(nn.InstanceNorm2d), _build_instance_norm),
    ModuleRule("batch_norm", _match_norm(nn.BatchNorm2d), _build_batch_norm),
    ModuleRule("batch_norm1d", _match_norm(nn.BatchNorm1d), _build_batch_norm),
    ModuleRule("batch_norm_like", recognise.batch_norm_like, recognise.build_batch_norm_like),
    ModuleRule("conditional_batch_norm", recognise.conditional_batch_norm_like,
               recognise.build_conditional_batch_norm),
)

# user rules (ganengine.fuse.register_*): tried after the built-in rules of their kind
EXTRA_MODULE_RULES: list[ModuleRule] = []
EXTRA_SEQUENCE_RULES: list[SequenceRule] = []


def module_rules(stage: str):
    return [r for r in RULES if isinstance(r, ModuleRule) and r.stage == stage] + \
        [r for r in EXTRA_MODULE_RULES if r.stage == stage]


def sequence_rules():
    return [r for r in RULES if isinstance(r, SequenceRule)] + EXTRA_SEQUENCE_RULES
