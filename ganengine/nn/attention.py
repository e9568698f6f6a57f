"""SAGAN and BigGAN self-attention modules on the fused attention op, and their fuse rules.

``SelfAttention2d`` has the SAGAN reference's (heykeetae ``Self_Attn``) state_dict keys
``query_conv.{weight,bias}``, ``key_conv.{weight,bias}``, ``value_conv.{weight,bias}``,
``gamma`` (shape (1,), zeros), so a SAGAN checkpoint loads as is.

``BigGANSelfAttention2d`` has BigGAN-PyTorch ``layers.Attention``'s keys ``theta``, ``phi``,
``g``, ``o`` (1x1 convs without bias) and ``gamma`` (a 0-dim tensor). The reference builds them
with its ``SNConv2d``; here they are plain ``nn.Conv2d`` by default, and any 1x1 conv module
works in their place (``which_conv=``, torch's ``spectral_norm`` parametrization, or the
reference's own SN convs moved in by ``ganengine.fuse``), because the convs run as modules.
The output conv ``o`` is applied to the pooled values before the attention, not after: ``o``
is affine and every attention row sums to 1, so ``o(attn(g)) == attn(o(g))`` exactly in exact
arithmetic, and it then works on N/4 positions instead of N and lets the residual fuse.

Fuse rules (``ganengine.fuse``): any module with ``query_conv``/``key_conv``/``value_conv`` and
a one-element ``gamma`` parameter (SAGAN), or ``theta``/``phi``/``g``/``o`` and ``gamma``
(BigGAN), is swapped for the module above, reusing its conv submodules and its gamma
Parameter (same keys, same Parameter objects). The swap is verified: both modules run on a
probe input (eval mode, gamma temporarily 0.5, state restored afterwards) and the rule declines
unless the outputs match; a module that returned ``(out, attention)`` gets a replacement that
does too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ganengine.fusion.checks import any_global_hooks
from ganengine.ops import _dispatch, _eager
from ganengine.ops._eager import autocast_off
from ganengine.ops._flags import flag
from ganengine.ops.attention import (_as, acc_dtype, attention, attention_map, autocast_core, autocast_eager,
                                     composed_attend, composes, self_attention2d, stacked_conv1x1)

# SelfAttention2d with the map returned (SAGAN's ``Self_Attn`` returns ``(out, attention)``): up to
# this many positions N = H*W the block runs as ONE softmax over the map it must build anyway
# (out = x + gamma * V P^T), on one projection conv for q, k and v; above it the flash-style op
# (which never reads the map) plus the map. Measured on the CPU, forward + backward, the map in the
# loss or not, SAGAN's shapes (B = 8; C = 16..512): the one-softmax block 0.97-1.47x the eager one at
# N = 16..256 (1.02-1.11x at SAGAN D's blocks, the map in the loss) where the flash pass + map ran
# 0.86-0.95x; level at N = 512; at N = 1024 the flash pass + map 1.3-2.7x, the one-softmax block
# 1.25-1.9x (docs/fuse.md, "SAGAN D and the small discriminators").
# A call that records no autograd graph (no_grad / inference_mode, or nothing requiring grad: sampling,
# evaluation) takes the one-softmax block at EVERY N on the CPU (backend "auto"), with o = V P^T:
# forward only, the flash pass + map is two softmaxes where eager does one (1.44-2.06x the eager
# block's forward at N = 576..1024, 1.16-1.35x at 4096), the one-softmax block 0.79-1.16x at
# N = 256..4096 (the eager block's own ops, within the machine's noise; docs/attention.md
# "Forward-only calls", /tmp/acc/fix17c/bench.py, 2026-12-07, one thread).
MAP_PATH_MAX_POSITIONS = 256
# In that path, from this many positions on o is formed as (P V^T)^T: the map's gradient from the
# product is then contiguous and adds to a caller's map gradient without a strided copy (N = 256:
# 1.02-1.47x vs 1.04-1.17x); below, V P^T is cheaper (N <= 64: 0.97-1.11x vs 0.95-1.08x).
MAP_PATH_TRANSPOSED_FROM = 256


def _plain_1x1s(*convs: nn.Module) -> bool:
    """Whether each is an nn.Conv2d whose call is exactly F.conv2d(x, weight, bias) with a 1x1
    kernel: no subclass forward, hooks or parametrization (a spectral-normed conv computes its
    weight). Asked every call (hooks can be added any time), so the global hooks once for all."""
    if any_global_hooks():
        return False
    for m in convs:
        if not (type(m) is nn.Conv2d and not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                                               or m._backward_pre_hooks)
                and "parametrizations" not in m.__dict__ and m.kernel_size == (1, 1) and m.stride == (1, 1)
                and m.padding == (0, 0) and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros"):
            return False
    return True


def _own_param(module: nn.Module, name: str):
    """``module.<name>`` read from its parameters dict where it is one (a functional_call's swap
    too), without Module.__getattr__ (~1 us a name); else the attribute (a parametrization)."""
    p = module._parameters
    return p[name] if name in p else getattr(module, name)


def _weight_bias(conv: nn.Module):
    """conv.weight, conv.bias of a plain conv (``_plain_1x1s``) without Module.__getattr__."""
    p = conv._parameters
    if "weight" in p and "bias" in p:
        return p["weight"], p["bias"]
    return conv.weight, conv.bias


class SelfAttention2d(nn.Module):
    """SAGAN self-attention ``gamma * attn(x) + x`` without the N x N map (with it, one softmax over
    the map, when the map is returned on the CPU and N <= MAP_PATH_MAX_POSITIONS or the call
    records no autograd graph; forward-only calls without the map at 144 < N <= 1024 run the
    plain composition: ops/attention.py ``composes``).

    Args:
        in_channels: C.
        reduction: query/key channels are ``in_channels // reduction`` (8 in SAGAN).
        return_attention: if True, ``forward`` returns ``(out, attention)`` like the reference
            ``Self_Attn`` (attention (B, N, N), built only then); ``forward(x,
            return_attention=...)`` overrides it per call.

    ``keep_layout`` (attribute): True (the default) keeps a channels_last input's layout in the
    output; False gives the reference ``Self_Attn``'s contiguous output (what ``ganengine.fuse``
    sets unless ``keep_channels_last=True``: a ``.view`` after the block needs it).
    """

    keep_layout: bool = True

    def __init__(self, in_channels: int, reduction: int = 8, return_attention: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if int(in_channels) < 1 or int(reduction) < 1 or in_channels // reduction < 1:
            raise ValueError(f"SelfAttention2d: need in_channels >= reduction >= 1, got in_channels="
                             f"{in_channels}, reduction={reduction}")
        kw = dict(device=device, dtype=dtype)
        self.in_channels, self.reduction = int(in_channels), int(reduction)
        d = self.in_channels // self.reduction
        self.query_conv = nn.Conv2d(in_channels, d, kernel_size=1, **kw)
        self.key_conv = nn.Conv2d(in_channels, d, kernel_size=1, **kw)
        self.value_conv = nn.Conv2d(in_channels, in_channels, kernel_size=1, **kw)
        self.gamma = nn.Parameter(torch.zeros(1, **kw))
        self.return_attention = flag(return_attention, "SelfAttention2d", "return_attention")

    @classmethod
    def from_modules(cls, query_conv: nn.Module, key_conv: nn.Module, value_conv: nn.Module,
                     gamma: nn.Parameter, return_attention: bool = False) -> "SelfAttention2d":
        """Wrap existing conv modules and gamma (used by ``ganengine.fuse``)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.query_conv, self.key_conv, self.value_conv, self.gamma = query_conv, key_conv, value_conv, gamma
        self.in_channels = _in_channels(value_conv)
        self.reduction = 0  # unknown for wrapped modules
        self.return_attention = flag(return_attention, "SelfAttention2d", "return_attention")
        return self

    def forward(self, x: torch.Tensor, return_attention: bool | None = None):
        if x.dim() != 4:
            raise ValueError(f"SelfAttention2d: expected a (B, C, H, W) input, got shape {tuple(x.shape)}")
        want = (self.return_attention if return_attention is None else return_attention
                if return_attention is True or return_attention is False
                else flag(return_attention, "SelfAttention2d", "return_attention"))
        qc, kc, vc = self.query_conv, self.key_conv, self.value_conv
        plain = _plain_1x1s(qc, kc, vc)
        if not want and plain:
            # the functional block: on the cpu backend one C++ call (ops/attention.py's lean entry;
            # the same three convolutions and kernels, so the same bits as the hooked-modules route),
            # elsewhere its Python route (the stacked projection into the core's Function)
            # (weights read from the _parameters dicts: Module.__getattr__ costs ~1 us a name, 7 names a
            # call; a plain conv's weight and bias are there, torch.func.functional_call's swaps too)
            qw, qb = _weight_bias(qc)
            kw, kb = _weight_bias(kc)
            vw, vb = _weight_bias(vc)
            out = self_attention2d(x, qw, qb, kw, kb, vw, vb, _own_param(self, "gamma"))
            return out if self.keep_layout or out.is_contiguous() else out.contiguous()
        b, c, h, w = x.shape
        q, k, v = self._projections(x, plain)
        gamma = _own_param(self, "gamma")
        if want and autocast_eager(x, h * w, x):   # CPU autocast: eager's ops (ops/attention.py autocast_eager)
            out, attn = autocast_core(q, k, v, x, gamma, True)
            return (out if self.keep_layout or out.is_contiguous() else out.contiguous()), attn
        if want and x.is_cpu:
            n = h * w
            # forward only (no graph recorded): one softmax at any N, o = V P^T (the transposed
            # form only pays for itself in the backward); with a graph: up to MAP_PATH_MAX_POSITIONS
            graph = _eager.records_graph((q, k, v, x, gamma), forward_ad=False)
            if n <= MAP_PATH_MAX_POSITIONS or not (graph or _dispatch._requested_backend() != "auto"):
                out, attn = _map_and_out(q, k, v, x, gamma, graph and n >= MAP_PATH_TRANSPOSED_FROM)
                return (out if self.keep_layout or out.is_contiguous() else out.contiguous()), attn
        out = attention(q, k, v, x.flatten(2), gamma).view(b, c, h, w)
        if not (self.keep_layout or out.is_contiguous()):
            out = out.contiguous()
        return (out, attention_map(q, k)) if want else out

    def runs_own_convs(self) -> bool:
        """True when the three convs are plain 1x1 convs that ``forward`` runs itself (one C++
        block, or one stacked projection); ``ganengine.fuse`` then leaves them alone."""
        return _plain_1x1s(self.query_conv, self.key_conv, self.value_conv)

    def _projections(self, x: torch.Tensor, plain: bool):
        """q, k, v (B, d / d / C, N): one conv with the three weights stacked when all three are
        plain 1x1 convs (``plain``) with biases all present or all absent (ops/attention.py
        ``stacked_conv1x1``: one GEMM and one input gradient instead of three; the weight copy is
        1 / (B N) of the conv's work), else the three modules (hooks, parametrizations run)."""
        qc, kc, vc = self.query_conv, self.key_conv, self.value_conv
        if plain and qc.weight.shape[0] == kc.weight.shape[0]:
            # one split (its backward one cat), not three slices (three zero-filled grads summed)
            qkv = stacked_conv1x1(x, (qc.weight, kc.weight, vc.weight), (qc.bias, kc.bias, vc.bias))
            if qkv is not None:
                return qkv.flatten(2).split_with_sizes((qc.weight.shape[0], kc.weight.shape[0], vc.weight.shape[0]), 1)
        return qc(x).flatten(2), kc(x).flatten(2), vc(x).flatten(2)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, return_attention={self.return_attention}"


@autocast_off
def _map_and_out(q, k, v, x, gamma, transposed: bool):
    """``(out, attention)`` with one softmax from the projections: the reference's formula in fp32 / fp64
    (autocast off: it would run the products in bf16 / fp16 again). ``transposed``: o formed as
    (P V^T)^T (see MAP_PATH_TRANSPOSED_FROM), else V P^T."""
    b, c, h, w = x.shape
    qt = q.dtype
    ct = acc_dtype(qt)
    if qt != ct:   # (each .to is a call even when it has nothing to do: ~1 us at tiny maps)
        q, k, v = q.to(ct), k.to(ct), v.to(ct)
    p = torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1)
    if transposed:
        o = torch.bmm(p, v.transpose(1, 2)).transpose(1, 2)
    else:
        o = torch.bmm(v, p.transpose(1, 2))
    xc = x      # gamma: (1,) in SAGAN, () in BigGAN: both broadcast
    if xc.dtype != ct:
        xc = xc.to(ct)
    if gamma.dtype != ct:
        gamma = gamma.to(ct)
    out = torch.addcmul(xc, gamma, o.view(b, c, h, w))
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out, (p if qt == ct else p.to(qt))


class BigGANSelfAttention2d(nn.Module):
    """BigGAN's attention block (BigGAN-PyTorch ``layers.Attention``): theta/phi C/8, g C/2,
    2x2 max-pooled phi and g, output 1x1 conv ``o`` (C/2 -> C), ``gamma`` (0-dim, zero), no
    scale; ``gamma * o(attn) + x``. Keys ``theta``, ``phi``, ``g``, ``o``, ``gamma``.

    ``which_conv`` builds the convs (``nn.Conv2d`` by default; pass a spectral-norm conv
    constructor, e.g. BigGAN's ``SNConv2d``, to match a reference checkpoint with SN buffers).
    Odd H or W: the pooled maps use floor sizes, as ``F.max_pool2d`` does.
    """

    def __init__(self, in_channels: int, which_conv=nn.Conv2d):
        super().__init__()
        ch = int(in_channels)
        if ch < 8:
            raise ValueError(f"BigGANSelfAttention2d: in_channels must be >= 8 (theta/phi have C/8), got {ch}")
        self.in_channels = ch
        self.theta = which_conv(ch, ch // 8, kernel_size=1, padding=0, bias=False)
        self.phi = which_conv(ch, ch // 8, kernel_size=1, padding=0, bias=False)
        self.g = which_conv(ch, ch // 2, kernel_size=1, padding=0, bias=False)
        self.o = which_conv(ch // 2, ch, kernel_size=1, padding=0, bias=False)
        self.gamma = nn.Parameter(torch.tensor(0.0))

    @classmethod
    def from_modules(cls, theta, phi, g, o, gamma) -> "BigGANSelfAttention2d":
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.theta, self.phi, self.g, self.o, self.gamma = theta, phi, g, o, gamma
        self.in_channels = _in_channels(theta)
        return self

    def forward(self, x: torch.Tensor, y=None) -> torch.Tensor:  # y: the reference's unused arg
        if x.dim() != 4:
            raise ValueError(f"BigGANSelfAttention2d: expected a (B, C, H, W) input, got shape {tuple(x.shape)}")
        if x.shape[2] < 2 or x.shape[3] < 2:
            raise ValueError(f"BigGANSelfAttention2d: H and W must be >= 2 (2x2 pooling), got {tuple(x.shape)}")
        b, c, h, w = x.shape
        tc, pc, gc = self.theta, self.phi, self.g
        # plain 1x1 convs (not the reference's SN convs): theta | phi | g as one stacked conv
        # (ops/attention.py stacked_conv1x1) and phi | g pooled in one max_pool2d call
        if _plain_1x1s(tc, pc, gc):
            (tw, tb), (pw, pb), (gw, gb) = _weight_bias(tc), _weight_bias(pc), _weight_bias(gc)
            tpg = stacked_conv1x1(x, (tw, pw, gw), (tb, pb, gb))
        else:
            tpg = None
        if tpg is not None:
            d, d_phi, d_g = tw.shape[0], pw.shape[0], gw.shape[0]
            # split in two (its backward: one cat): theta, and phi | g for the one pool
            theta, pg = tpg.split_with_sizes((d, d_phi + d_g), 1)
            phi, g = F.max_pool2d(pg, [2, 2]).split_with_sizes((d_phi, d_g), 1)
            theta, phi = theta.flatten(2), phi.flatten(2)
        else:
            theta = tc(x).flatten(2)
            phi = F.max_pool2d(pc(x), [2, 2]).flatten(2)
            g = F.max_pool2d(gc(x), [2, 2])
        n, m, cg = theta.shape[2], phi.shape[2], g.shape[1]
        gamma = _own_param(self, "gamma")
        # forward only (no graph recorded; ops/attention.py ``composes``): the plain composition, and
        # o after the attention (the reference's order) where that is fewer multiply-adds: the
        # product on C/2 channels and o on N positions vs the product on C and o on M = N/4
        # (3C < N); o first otherwise, as the flash route always does. (At N = 4096, N M = 2^22, outside
        # the window, the flash op ran 0.48-1.04x the eager forward in one run, 1.09-1.32x in another:
        # eager's map out of cache varies 10-26 ms at C = 16; the window was not extended.)
        if cg * n * m + c * cg * n < c * n * m + c * cg * m and composes(n, m, theta, phi, g, x, gamma):
            att = composed_attend(theta, phi, g.flatten(2))
            out = self.o(_as(att, g.dtype).view(b, cg, h, w))
            return torch.addcmul(x, gamma, out)
        value = self.o(g).flatten(2)   # o before attn: see module doc
        return attention(theta, phi, value, x.flatten(2), gamma).view(b, c, h, w)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}"


# ----------------------------------------------------------------------------- fuse rules
def _in_channels(conv: nn.Module) -> int | None:
    for m in (conv, getattr(conv, "module", None)):  # plain conv, or a wrapper holding .module
        if m is not None and isinstance(getattr(m, "in_channels", None), int):
            return m.in_channels
    return None


def _is_param1(p) -> bool:
    return isinstance(p, nn.Parameter) and p.numel() == 1


def _probe_matches(original: nn.Module, replacement: nn.Module, channels: int):
    """Run both on one input; return (matches, original returned a tuple). State restored."""
    params = list(original.parameters())
    if not params:
        return False, False
    ref = params[0]
    saved = {k: v.detach().clone() for k, v in original.state_dict().items()}
    was_training = original.training
    gamma = original.gamma
    try:
        original.eval()
        replacement.eval()
        with torch.no_grad():
            gamma.fill_(0.5)
            x = torch.randn(2, channels, 4, 6, device=ref.device, dtype=ref.dtype)
            want = original(x)
            got = replacement(x) if not isinstance(want, tuple) else replacement(x, return_attention=True)
            is_tuple = isinstance(want, tuple)
            if is_tuple:
                if not isinstance(got, tuple) or len(want) != len(got):
                    return False, is_tuple
                pairs = list(zip(want, got))
            else:
                pairs = [(want, got)]
            tol = 1e-3 if ref.dtype in (torch.float16, torch.bfloat16) else 1e-4
            ok = all(isinstance(a, torch.Tensor) and a.shape == b.shape
                     and torch.allclose(a.float(), b.float(), rtol=tol * 10, atol=tol) for a, b in pairs)
            return ok, is_tuple
    except Exception:  # a module we do not understand: leave it alone
        return False, False
    finally:
        with torch.no_grad():
            original.load_state_dict(saved)
        original.train(was_training)
        replacement.train(was_training)


def _match_sagan(m: nn.Module) -> bool:
    return (not isinstance(m, SelfAttention2d)
            and all(isinstance(getattr(m, n, None), nn.Module) for n in ("query_conv", "key_conv", "value_conv"))
            and _is_param1(getattr(m, "gamma", None)))


def _build_sagan(m: nn.Module, keep_layout: bool = False):
    channels = _in_channels(m.value_conv)
    if channels is None:
        return None
    new = SelfAttention2d.from_modules(m.query_conv, m.key_conv, m.value_conv, m.gamma)
    new.keep_layout = keep_layout  # (the reference's output is contiguous)
    ok, is_tuple = _probe_matches(m, new, channels)
    if not ok:
        return None
    new.return_attention = is_tuple
    return new


def _match_biggan(m: nn.Module) -> bool:
    return (not isinstance(m, BigGANSelfAttention2d)
            and all(isinstance(getattr(m, n, None), nn.Module) for n in ("theta", "phi", "g", "o"))
            and _is_param1(getattr(m, "gamma", None)))


def _build_biggan(m: nn.Module):
    channels = _in_channels(m.theta)
    if channels is None:
        return None
    new = BigGANSelfAttention2d.from_modules(m.theta, m.phi, m.g, m.o, m.gamma)
    ok, is_tuple = _probe_matches(m, new, channels)
    return new if ok and not is_tuple else None
