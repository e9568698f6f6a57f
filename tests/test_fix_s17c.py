"""Forward-only routes of the attention blocks (cost rule, session 17c): a call that records no
autograd graph takes the eager block's own composition where it costs less host time than the
C++ flash forward (ops/attention.py ``composes``: 144 < N, N M <= 2^20 positions pairs), and a
map-returning SelfAttention2d call forms ``out`` from the map it returns at every N (one softmax,
not the flash pass plus the map). Graph-recording calls keep the flash op. Each route is checked
against the fp64 eager formula within its error bound, and which route ran is read from the
profiler's event names (the C++ entries are dispatcher ops: ``ganengine_C::...``)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import ganengine
import ganengine.functional as GF
import ganengine.nn as gnn
from ganengine import _ext
from ganengine.ops import _dispatch
from ganengine.ops import attention as A
from tests._attention_bounds import core_bounds, self_attention_bounds
from tests._tolerance import assert_below, gamma as g_, unit_roundoff
from tests.test_attention import BigGANAttention, Self_Attn, _sagan_reference

pytestmark = pytest.mark.skipif(not _ext.has_kernel("attention_fwd", "CPU"),
                                reason="ganengine._C is not built with the attention CPU kernels")
F32 = torch.float32


def _events(fn):
    with torch.autograd.profiler.profile() as prof:
        res = fn()
    return res, [e.name for e in prof.function_events]


def _route(names):
    """'flash' (a ganengine C++ / custom op ran), 'composed' (only aten ops: the softmax among them)."""
    if any(n.startswith(("ganengine_C::", "ganengine::")) for n in names):
        return "flash"
    assert "aten::_softmax" in names, names
    return "composed"


def _sagan(c=16, gamma=0.7, seed=0):
    torch.manual_seed(seed)
    ref = Self_Attn(c)
    with torch.no_grad():
        ref.gamma.fill_(gamma)
        for conv in (ref.query_conv, ref.key_conv, ref.value_conv):   # non-zero biases
            conv.bias.normal_(0, 0.1)
    mod = gnn.SelfAttention2d(c)
    mod.load_state_dict(ref.state_dict())
    return mod, ref


def _params64(mod):
    return [t.detach().double() for t in (mod.query_conv.weight, mod.query_conv.bias, mod.key_conv.weight,
                                          mod.key_conv.bias, mod.value_conv.weight, mod.value_conv.bias, mod.gamma)]


def _check_out_and_map(mod, x, out, attn=None):
    """out (and the map) vs the fp64 eager formula on the same fp32 values, within the bounds."""
    p = _params64(mod)
    x64 = x.detach().double()
    want, want_attn = _sagan_reference(x64, *p)
    fwd = self_attention_bounds(x64, *p, None, input_dtype=F32)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_below(out, want, fwd[0], name="out")
    if attn is not None:
        c = x.shape[1]
        x2 = x64.flatten(2)
        proj, errs = [], []
        for w, b in ((p[0], p[1]), (p[2], p[3])):   # q, k and the 1x1 convs' rounding (C + 1 terms)
            proj.append(F.conv2d(x64, w, b).flatten(2))
            errs.append(g_(c + 1, F32) * (torch.einsum("oc,bcn->bon", w.flatten(1).abs(), x2.abs())
                                          + b.abs()[None, :, None]))
        v = F.conv2d(x64, p[4], p[5]).flatten(2)
        core = core_bounds(proj[0], proj[1], v, x2, p[6], None, e_q=errs[0], e_k=errs[1])
        assert attn.shape == want_attn.shape and attn.dtype == x.dtype
        assert_below(attn, want_attn, core["attn"], name="attention")


# odd N (non-power-of-two H*W) inside the window, its edges, and above it
WINDOW = [(13, 12), (17, 15), (16, 16), (31, 33)]          # N = 156, 255, 256, 1023: 144 < N, N^2 <= 2^20
OUTSIDE = [(8, 8), (11, 11), (12, 12), (33, 32)]             # N = 64, 121, 144 (the edge), 1056 (N^2 > 2^20)


@pytest.mark.parametrize("hw", WINDOW + OUTSIDE, ids=str)
def test_sagan_no_map_forward_only_route_and_numbers(hw):
    mod, _ = _sagan(16)
    x = torch.randn(2, 16, *hw)
    with torch.no_grad():
        out, names = _events(lambda: mod(x))
    n = hw[0] * hw[1]
    assert _route(names) == ("composed" if 144 < n and n * n <= (1 << 20) else "flash")
    assert not out.requires_grad
    _check_out_and_map(mod, x, out)
    # inference mode and "nothing requires grad" under grad mode are forward-only calls too
    with torch.inference_mode():
        out_i, names_i = _events(lambda: mod(x))
    assert _route(names_i) == _route(names) and torch.equal(out_i, out)
    frozen = copy.deepcopy(mod).requires_grad_(False)
    out_f, names_f = _events(lambda: frozen(x))
    assert _route(names_f) == _route(names) and torch.equal(out_f, out)


@pytest.mark.parametrize("hw", [(12, 11), (31, 33)], ids=str)
def test_sagan_no_map_graph_calls_keep_the_flash_op(hw):
    """A graph-recording call: the flash op, out and all gradients within their fp64 bounds."""
    mod, _ = _sagan(16)
    x = torch.randn(2, 16, *hw, requires_grad=True)
    out, names = _events(lambda: mod(x))
    assert _route(names) == "flash"
    go = torch.randn_like(out)
    ins = [x, mod.query_conv.weight, mod.query_conv.bias, mod.key_conv.weight, mod.key_conv.bias,
           mod.value_conv.weight, mod.value_conv.bias, mod.gamma]
    grads = torch.autograd.grad(out, ins, go)
    p = _params64(mod)
    x64 = x.detach().double().requires_grad_()
    p64 = [t.clone().requires_grad_() for t in p]
    want, _ = _sagan_reference(x64, *p64)
    want_g = torch.autograd.grad(want, [x64] + p64, go.double())
    bounds = self_attention_bounds(x.detach().double(), *p, go, input_dtype=F32)
    assert_below(out, want, bounds[0], name="out")
    for i, (g, w, bd) in enumerate(zip(grads, want_g, bounds[1:])):
        assert_below(g, w, bd, name=f"grad {i}")


@pytest.mark.parametrize("hw", [(17, 16), (31, 33), (33, 32)], ids=str)
def test_sagan_map_forward_only_takes_one_softmax_at_any_n(hw):
    """return_attention above MAP_PATH_MAX_POSITIONS without a graph: one softmax (the flash pass +
    the map before the fix); out and map within the fp64 bounds."""
    mod, _ = _sagan(16)
    mod.return_attention = True
    x = torch.randn(2, 16, *hw)
    with torch.no_grad():
        (out, attn), names = _events(lambda: mod(x))
    assert _route(names) == "composed" and names.count("aten::_softmax") == 1
    _check_out_and_map(mod, x, out, attn)
    with torch.inference_mode():
        (out_i, attn_i), names_i = _events(lambda: mod(x))
    assert _route(names_i) == "composed" and torch.equal(out_i, out) and torch.equal(attn_i, attn)


@pytest.mark.parametrize("hw", [(17, 16), (31, 33)], ids=str)
def test_sagan_map_graph_calls_keep_flash_plus_map(hw):
    """With a graph above MAP_PATH_MAX_POSITIONS: the flash op plus the map (it wins forward +
    backward), numbers unchanged; gradients through out and the map vs fp64."""
    from tests.test_attention_map_path import _check_against_fp64

    mod, ref = _sagan(16)
    x = torch.randn(2, 16, *hw, requires_grad=True)
    (out, attn), names = _events(lambda: mod(x, return_attention=True))
    assert _route(names) == "flash" and "aten::_softmax" in names
    _check_out_and_map(mod, x, out, attn)
    _check_against_fp64(mod, ref, x.detach())


def test_explicit_cpu_backend_keeps_the_cpu_kernels():
    """Only backend 'auto' routes: a requested backend runs its kernels, graph or not."""
    mod, _ = _sagan(16)
    x = torch.randn(1, 16, 17, 16)   # N = 272: in the window, above MAP_PATH_MAX_POSITIONS
    with torch.no_grad(), ganengine.use_backend("cpu"):
        out, names = _events(lambda: mod(x))
        (out2, attn), names2 = _events(lambda: mod(x, return_attention=True))
    assert _route(names) == "flash" and _route(names2) == "flash"
    _check_out_and_map(mod, x, out)
    _check_out_and_map(mod, x, out2, attn)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_composed_route_dtypes(dtype):
    """fp64: accumulates in fp64; bf16 (module and input): fp32 accumulation, out and map bf16."""
    mod, _ = _sagan(16)
    mod = mod.to(dtype)
    x = torch.randn(1, 16, 13, 12, dtype=dtype)
    with torch.no_grad():
        out, names = _events(lambda: mod(x))
        out2, attn = mod(x, return_attention=True)
    assert _route(names) == "composed" and out.dtype == out2.dtype == attn.dtype == dtype
    p = _params64(mod)
    want, want_attn = _sagan_reference(x.double(), *p)
    acc = torch.float64 if dtype == torch.float64 else F32
    bd = self_attention_bounds(x.double(), *p, None, acc=acc, store_dtype=None if dtype == torch.float64 else dtype,
                               input_dtype=dtype)[0]
    assert_below(out, want, bd, name="out")
    assert_below(out2, want, bd, name="out (map call)")
    # the map: softmax of fp32-accumulated scores, stored in dtype (u(dtype) relative; plus the
    # scores' error: bf16 q and k make that of the size of the scores' own rounding, so a loose
    # relative check on the rows, whose entries sum to 1)
    torch.testing.assert_close(attn.double().sum(-1), torch.ones(1, 156, dtype=torch.float64),
                               rtol=0, atol=156 * unit_roundoff(dtype))


def test_channels_last_and_keep_layout():
    mod, _ = _sagan(16)
    x = torch.randn(2, 16, 17, 15).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out, names = _events(lambda: mod(x))
        mod.keep_layout = False
        out2 = mod(x)
    assert _route(names) == "composed"
    assert out.is_contiguous(memory_format=torch.channels_last) and out2.is_contiguous()
    _check_out_and_map(mod, x, out)
    assert torch.equal(out, out2)


def test_functional_forward_only_routes():
    """GF.self_attention2d: forward only at N in the window -> the composition, the map call ->
    one softmax; with a graph -> the fused op (plus the map)."""
    mod, _ = _sagan(16)
    p = [mod.query_conv.weight, mod.query_conv.bias, mod.key_conv.weight, mod.key_conv.bias,
         mod.value_conv.weight, mod.value_conv.bias, mod.gamma]
    x = torch.randn(2, 16, 17, 15)
    with torch.no_grad():
        out, names = _events(lambda: GF.self_attention2d(x, *p))
        (out2, attn), names2 = _events(lambda: GF.self_attention2d(x, *p, return_attention=True))
        big = torch.randn(1, 16, 33, 32)
        (out3, attn3), names3 = _events(lambda: GF.self_attention2d(big, *p, return_attention=True))
    assert _route(names) == _route(names2) == _route(names3) == "composed"
    assert names2.count("aten::_softmax") == 1 and names3.count("aten::_softmax") == 1
    _check_out_and_map(mod, x, out)
    _check_out_and_map(mod, x, out2, attn)
    _check_out_and_map(mod, big, out3, attn3)
    (out4, attn4), names4 = _events(lambda: GF.self_attention2d(x, *p, return_attention=True))
    assert _route(names4) == "flash"
    _check_out_and_map(mod, x, out4, attn4)


def _biggan(c=32, seed=0):
    torch.manual_seed(seed)
    ref = BigGANAttention(c)
    with torch.no_grad():
        ref.gamma.fill_(0.7)
    mod = gnn.BigGANSelfAttention2d(c)
    mod.load_state_dict(ref.state_dict())
    return mod, ref


def _check_biggan(mod, x, out):
    """out vs the fp64 BigGAN formula: the core's bound on theta, pooled phi and o(pooled g), each
    with its convs' rounding (a max-pool of perturbed values moves by at most the window's largest
    perturbation: the pool of the bounds)."""
    x64 = x.detach().double()
    c = x.shape[1]
    w = {n: getattr(mod, n).weight.detach().double() for n in ("theta", "phi", "g", "o")}
    a = {n: t.abs() for n, t in w.items()}
    theta = F.conv2d(x64, w["theta"]).flatten(2)
    phi = F.max_pool2d(F.conv2d(x64, w["phi"]), [2, 2]).flatten(2)
    g = F.max_pool2d(F.conv2d(x64, w["g"]), [2, 2])
    value = F.conv2d(g, w["o"]).flatten(2)
    xa = x64.abs()
    e_t = g_(c, F32) * F.conv2d(xa, a["theta"]).flatten(2)
    e_p = g_(c, F32) * F.max_pool2d(F.conv2d(xa, a["phi"]), [2, 2]).flatten(2)
    e_g = g_(c, F32) * F.max_pool2d(F.conv2d(xa, a["g"]), [2, 2])
    e_v = (g_(c // 2, F32) * F.conv2d(g.abs(), a["o"]) + F.conv2d(e_g, a["o"])).flatten(2)
    gm = mod.gamma.detach().double()
    core = core_bounds(theta, phi, value, x64.flatten(2), gm, None, e_q=e_t, e_k=e_p, e_v=e_v)
    # (o applied before the attention: equal to the reference's order in exact arithmetic; the
    # reference formula itself in fp64 as the ground truth)
    ref64 = BigGANAttention(c).double()
    ref64.load_state_dict({k: v.double() for k, v in mod.state_dict().items()})
    with torch.no_grad():
        want = ref64(x64)
    assert_below(out, want, core["out"].view(x.shape) + 1e-12 * want.abs(), name="biggan out")


@pytest.mark.parametrize("c,hw,route", [(32, (16, 16), "composed"), (32, (18, 14), "composed"), (32, (8, 8), "flash"),
                                        (32, (46, 46), "flash"), (128, (12, 12), "flash"), (128, (14, 12), "composed")], ids=str)
def test_biggan_forward_only_route_and_numbers(c, hw, route):
    """N M = 16384 / 15876 (odd: 18x14 -> 9x7 keys; 3C < N there: o after the attention) and 5184
    (C = 128 at 12x12: 3C >= N, o first, through the core's composition): the composition; 1024
    (8x8) and 1,119,364 (46x46, > 2^20): the flash op. Graph calls: the flash op."""
    mod, _ = _biggan(c)
    x = torch.randn(2 if hw[0] * hw[1] <= 256 else 1, c, *hw)
    with torch.no_grad():
        out, names = _events(lambda: mod(x))
    assert _route(names) == route
    _check_biggan(mod, x, out)
    if hw[0] * hw[1] <= 256:
        xg = x.clone().requires_grad_()
        out_g, names_g = _events(lambda: mod(xg))
        assert _route(names_g) == "flash"
        _check_biggan(mod, x, out_g)
        out_g.sum().backward()
        assert xg.grad is not None and mod.gamma.grad is not None


def test_core_forward_only_route_and_errors():
    """ops.attention.attention: the composition without a graph (N M in the window), the public
    errors still raised first; last_used records 'torch' for the composition."""
    torch.manual_seed(0)
    q, k, v, x = torch.randn(2, 3, 150), torch.randn(2, 3, 127), torch.randn(2, 8, 127), torch.randn(2, 8, 150)
    gamma = torch.tensor([0.6])
    with torch.no_grad():
        out, names = _events(lambda: A.attention(q, k, v, x, gamma))
        assert _dispatch.last_used["attention"] == "torch"
        with pytest.raises(ValueError, match="x must be"):
            A.attention(q, k, v, x[:, :4], gamma)
    assert _route(names) == "composed"
    ref = A.reference_attention(q.double(), k.double(), v.double(), x.double(), gamma.double())
    core = core_bounds(q, k, v, x, gamma, None)
    assert_below(out, ref, core["out"], name="core out")
    out_g, names_g = _events(lambda: A.attention(q, k, v.requires_grad_(), x, gamma))
    assert _route(names_g) == "flash"
    assert_below(out_g, ref, core["out"], name="core out (graph)")
