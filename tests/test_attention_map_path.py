"""SelfAttention2d returning the map (SAGAN's ``Self_Attn`` contract): the per-call choice between
one softmax over the map (N <= MAP_PATH_MAX_POSITIONS, both products formed from the map the
caller gets, on one stacked projection conv) and the flash-style op plus the map (above). Both
against the fp64 reference, forward and gradients through out and the map; which path ran;
the stacked projection's fallbacks; double backward; fuse() leaving the block's convs alone."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ganengine
import ganengine.nn as gnn
import ganengine.nn.attention as nn_attention
from tests._attention_bounds import core_bounds, self_attention_bounds
from tests._model_bounds import Census, assert_normwise
from tests._tolerance import assert_below, unit_roundoff
from tests.test_attention import Self_Attn


def _params(m):
    q, k, v = m.query_conv, m.key_conv, m.value_conv
    return [q.weight, q.bias, k.weight, k.bias, v.weight, v.bias, m.gamma]


def _check_against_fp64(mod, ref, x):
    """mod (fp32) vs ref.double() on x: out and map elementwise, the gradients of
    out.sum() + |map|^2 (both outputs feed the loss) normwise."""
    ref64 = copy.deepcopy(ref).double()   # mod shares ref's convs
    x64 = x.double().requires_grad_()
    ref_out, ref_attn = ref64(x64)
    ins64 = [x64] + list(ref64.parameters())
    ref_g = torch.autograd.grad(ref_out.sum() + (ref_attn ** 2).sum(), ins64)
    xi = x.float().requires_grad_()
    out, attn = mod(xi, return_attention=True)
    grads = torch.autograd.grad(out.sum() + (attn ** 2).sum(), [xi] + list(mod.parameters()))
    b, c, h, w = x.shape
    n = h * w
    assert out.shape == x.shape and attn.shape == (b, n, n)
    p = [None if t is None else t.detach().double() for t in _params(ref64)]
    for i in (1, 3, 5):   # the bounds take biases: a zero bias has the bound of none
        p[i] = torch.zeros(p[i - 1].shape[0], dtype=torch.float64) if p[i] is None else p[i]
    x2 = x.detach().double()
    fwd = self_attention_bounds(x2, *p, None, input_dtype=torch.float32)
    core = core_bounds(*(F.conv2d(x2, p[i], p[i + 1]).flatten(2) for i in (0, 2, 4)), x2.flatten(2), p[6], None)
    assert_below(out, ref_out, fwd[0], name="out")
    assert_below(attn, ref_attn, core["attn"] + 4 * unit_roundoff(torch.float32) * ref_attn.abs(), name="attention")
    # the block's 3 convs, 2 products and the softmax; n the longest reduction (C + 1, N keys, B N pixels)
    cen = Census.of(n_fwd=c + 1, n=max(b * n, n, c + 1), depth=6)
    scale = max(r.abs().max().item() for r in ref_g)
    for g, r in zip(grads, ref_g):
        assert_normwise(g, r, cen, scale=scale, backward=True, sides=1)


def _pair(c, bias=True):
    torch.manual_seed(0)
    ref = Self_Attn(c)
    if not bias:
        for conv in (ref.query_conv, ref.key_conv, ref.value_conv):
            conv.bias = None
    with torch.no_grad():
        ref.gamma.fill_(0.7)
    mod = gnn.SelfAttention2d.from_modules(ref.query_conv, ref.key_conv, ref.value_conv, ref.gamma)
    return mod, ref


def _count_flash(monkeypatch):
    calls = []
    real = nn_attention.attention
    monkeypatch.setattr(nn_attention, "attention", lambda *a: calls.append(1) or real(*a))
    return calls


# (1, 1): one position; (5, 7): N = 35 (V P^T); (16, 16): N = 256, the last size of the
# one-softmax path, in its transposed form (P V^T)^T; (17, 16): N = 272, the flash op + the map
@pytest.mark.parametrize("hw,flash", [((1, 1), False), ((5, 7), False), ((16, 16), False), ((17, 16), True)])
def test_map_path_matches_fp64_reference_and_picks_the_path(monkeypatch, hw, flash):
    assert nn_attention.MAP_PATH_MAX_POSITIONS == 256 and nn_attention.MAP_PATH_TRANSPOSED_FROM == 256
    mod, ref = _pair(16)
    calls = _count_flash(monkeypatch)
    x = torch.randn(2, 16, *hw)
    _check_against_fp64(mod, ref, x)
    assert bool(calls) == flash


def test_map_path_channels_last_and_noncontiguous():
    mod, ref = _pair(16)
    x = torch.randn(2, 16, 6, 10).contiguous(memory_format=torch.channels_last)
    _check_against_fp64(mod, ref, x)
    _check_against_fp64(mod, ref, torch.randn(2, 16, 12, 5).transpose(2, 3))   # non-contiguous
    # (out.sum() in _check_against_fp64: the upstream gradient of out is a stride-0 expand)


def test_stacked_projection_and_its_fallbacks(monkeypatch):
    """One conv with the three weights stacked where all three are plain 1x1 convs with biases
    all present or all absent; otherwise the three modules (hooks and parametrizations run)."""
    convs = []
    real = F.conv2d
    x = torch.randn(2, 16, 3, 3)

    def convs_of(mod):   # the conv output widths one call of mod runs (F.conv2d is patched globally)
        convs.clear()
        monkeypatch.setattr(nn_attention.F, "conv2d", lambda x_, w, *a: convs.append(w.shape[0]) or real(x_, w, *a))
        mod(x, return_attention=True)
        monkeypatch.setattr(nn_attention.F, "conv2d", real)
        return list(convs)

    mod, ref = _pair(16)
    assert convs_of(mod) == [2 + 2 + 16]                # one conv, d + d + C outputs
    mod, ref = _pair(16, bias=False)
    assert convs_of(mod) == [2 + 2 + 16]
    _check_against_fp64(mod, ref, x)
    mod, ref = _pair(16)
    mod.key_conv.bias = None                            # mixed biases: the three modules
    assert sorted(convs_of(mod)) == [2, 2, 16]
    _check_against_fp64(mod, ref, x)
    mod, ref = _pair(16)
    seen = []
    mod.value_conv.register_forward_hook(lambda m, i, o: seen.append(1))
    assert sorted(convs_of(mod)) == [2, 2, 16] and seen == [1]   # a hooked conv runs as its module
    _check_against_fp64(mod, ref, x)


def test_map_path_double_backward():
    torch.manual_seed(0)
    mod = gnn.SelfAttention2d(8, return_attention=True).double()
    with torch.no_grad():
        mod.gamma.fill_(0.9)
    x = torch.randn(1, 8, 2, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda x_: tuple(t.sum(-1) for t in mod(x_)), (x,))


def test_map_path_bf16():
    """bf16 module and input: the path accumulates in fp32 (as the fused op), out in bf16."""
    mod, ref = _pair(16)
    x = torch.randn(2, 16, 4, 4)
    out, attn = copy.deepcopy(mod).bfloat16()(x.bfloat16(), return_attention=True)
    assert out.dtype == attn.dtype == torch.bfloat16
    ro, ra = copy.deepcopy(ref).double()(x.bfloat16().double())
    u = unit_roundoff(torch.bfloat16)
    # bf16 weights and conv outputs (q, k, v rounded: relative u each, scores (d + 1) u |q||k|,
    # a softmax's relative error ~ 2 * |score error|), out rounded once more: generous constant 8
    s = torch.bmm(ref.query_conv(x).flatten(2).abs().transpose(1, 2).double(),
                  ref.key_conv(x).flatten(2).abs().double())
    e_attn = 8 * (2 + 1) * u * s.amax(-1, keepdim=True) * ra
    assert_below(attn, ra, e_attn + 2 * u * ra.abs(), name="attention")
    vmax = ref.value_conv(x).abs().amax().item() + 1
    assert_below(out, ro, 8 * u * (ro.abs() + 0.7 * vmax * (1 + s.amax().item())), name="out")


def test_fuse_leaves_the_block_convs_alone():
    """A swapped SAGAN block (or a gnn.SelfAttention2d) with plain 1x1 convs runs them itself: no
    conv rule may turn its stacked projection / C++ block off; SN convs inside are still walked."""
    torch.manual_seed(0)
    net = nn.Sequential(Self_Attn(64))
    fused, report = ganengine.fuse(net, return_report=True)
    assert report.get("sagan_self_attention") == 1
    assert all(type(getattr(fused[0], n)) is nn.Conv2d for n in ("query_conv", "key_conv", "value_conv"))
    assert not any(where.startswith("0.") for where, _ in report.replaced)
    own = nn.Sequential(gnn.SelfAttention2d(64))
    assert own[0].runs_own_convs()
    nn.utils.parametrizations.spectral_norm(own[0].value_conv)
    assert not own[0].runs_own_convs()
