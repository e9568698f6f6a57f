"""attention family: every backend vs an fp64 reference of the SAGAN formula, forward and all
gradients; layouts, return_attention, double backward, opcheck, compile, modules, fuse."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ganengine
import ganengine.functional as GF
import ganengine.nn as gnn
from ganengine import _ext
from ganengine.ops import _dispatch
from ganengine.ops import attention as A
from tests._attention_bounds import core_bounds, self_attention_bounds
from tests._backends import backend_params, on_backend, autograd_node_names
from tests._model_bounds import Census, assert_normwise, census
from tests._tolerance import assert_below, gamma as gamma_n, unit_roundoff

BACKENDS = ["torch", "triton", "cpu"]


def _skip_unless(backend):
    if backend == "cpu" and not _ext.has_kernel("attention_fwd", "CPU"):
        pytest.skip("ganengine._C is not built with the attention CPU kernels")
    if backend == "triton" and not ganengine.backends.serves("triton", torch.device("cpu")):
        pytest.skip("triton cannot run on CPU tensors here (TRITON_INTERPRET unset)")


class Self_Attn(nn.Module):
    """Copy of the SAGAN reference block (heykeetae/Self-Attention-GAN sagan_models.py)."""

    def __init__(self, in_dim, activation="relu"):
        super().__init__()
        self.chanel_in = in_dim
        self.activation = activation
        self.query_conv = nn.Conv2d(in_channels=in_dim, out_channels=in_dim // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_channels=in_dim, out_channels=in_dim // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_channels=in_dim, out_channels=in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        m_batchsize, C, width, height = x.size()
        proj_query = self.query_conv(x).view(m_batchsize, -1, width * height).permute(0, 2, 1)
        proj_key = self.key_conv(x).view(m_batchsize, -1, width * height)
        energy = torch.bmm(proj_query, proj_key)
        attention = self.softmax(energy)
        proj_value = self.value_conv(x).view(m_batchsize, -1, width * height)
        out = torch.bmm(proj_value, attention.permute(0, 2, 1))
        out = out.view(m_batchsize, C, width, height)
        out = self.gamma * out + x
        return out, attention


class BigGANAttention(nn.Module):
    """Copy of BigGAN-PyTorch layers.Attention with plain convs (the reference uses SNConv2d)."""

    def __init__(self, ch, which_conv=nn.Conv2d):
        super().__init__()
        self.ch = ch
        self.theta = which_conv(self.ch, self.ch // 8, kernel_size=1, padding=0, bias=False)
        self.phi = which_conv(self.ch, self.ch // 8, kernel_size=1, padding=0, bias=False)
        self.g = which_conv(self.ch, self.ch // 2, kernel_size=1, padding=0, bias=False)
        self.o = which_conv(self.ch // 2, self.ch, kernel_size=1, padding=0, bias=False)
        self.gamma = nn.Parameter(torch.tensor(0.), requires_grad=True)

    def forward(self, x, y=None):
        theta = self.theta(x)
        phi = F.max_pool2d(self.phi(x), [2, 2])
        g = F.max_pool2d(self.g(x), [2, 2])
        theta = theta.view(-1, self.ch // 8, x.shape[2] * x.shape[3])
        phi = phi.view(-1, self.ch // 8, x.shape[2] * x.shape[3] // 4)
        g = g.view(-1, self.ch // 2, x.shape[2] * x.shape[3] // 4)
        beta = F.softmax(torch.bmm(theta.transpose(1, 2), phi), -1)
        o = self.o(torch.bmm(g, beta.transpose(1, 2)).view(-1, self.ch // 2, x.shape[2], x.shape[3]))
        return self.gamma * o + x


def _params(c, d, gamma, dtype=torch.float64):
    s = c ** -0.5
    return [torch.randn(d, c, 1, 1, dtype=dtype) * s, torch.randn(d, dtype=dtype) * 0.1,
            torch.randn(d, c, 1, 1, dtype=dtype) * s, torch.randn(d, dtype=dtype) * 0.1,
            torch.randn(c, c, 1, 1, dtype=dtype) * s, torch.randn(c, dtype=dtype) * 0.1,
            torch.tensor([gamma], dtype=dtype)]


def _sagan_reference(x, qw, qb, kw, kb, vw, vb, gamma):
    b, c, h, w = x.shape
    q = F.conv2d(x, qw, qb).view(b, -1, h * w).permute(0, 2, 1)
    k = F.conv2d(x, kw, kb).view(b, -1, h * w)
    attn = torch.softmax(torch.bmm(q, k), dim=-1)
    v = F.conv2d(x, vw, vb).view(b, -1, h * w)
    out = torch.bmm(v, attn.permute(0, 2, 1)).view(b, c, h, w)
    return gamma * out + x, attn


def _sagan_module_bounds(mod, x):
    """Forward bounds (out, attention map) of a Self_Attn-style module at fp32 input x."""
    p = [mod.query_conv.weight, mod.query_conv.bias, mod.key_conv.weight, mod.key_conv.bias,
         mod.value_conv.weight, mod.value_conv.bias, mod.gamma]
    e_out = self_attention_bounds(x, *p, None)[0]
    proj = [F.conv2d(x, p[i], p[i + 1]).flatten(2) for i in (0, 2, 4)]
    e_proj = [gamma_n(x.shape[1] + 1, torch.float32) * F.conv2d(x.abs(), p[i].abs(), p[i + 1].abs()).flatten(2).double()
              for i in (0, 2, 4)]
    e_attn = core_bounds(*proj, x.flatten(2), p[6], None, e_q=e_proj[0], e_k=e_proj[1], e_v=e_proj[2])["attn"]
    return e_out, e_attn




def _run_case(backend, b, c, h, w, gamma, dtype, channels_last=False, sum_grad=False):
    _skip_unless(backend)
    d = max(1, c // 8)
    x64 = torch.randn(b, c, h, w, dtype=torch.float64)
    p64 = _params(c, d, gamma)
    ins64 = [t.clone().requires_grad_() for t in [x64] + p64]
    ref, _ = _sagan_reference(*ins64)
    go = torch.randn_like(ref)
    if sum_grad:
        ref_grads = torch.autograd.grad(ref.sum(), ins64)
    else:
        ref_grads = torch.autograd.grad(ref, ins64, go)

    x = x64.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ins = [x.requires_grad_()] + [t.to(dtype).requires_grad_() for t in p64]
    with ganengine.backends.strict(), ganengine.use_backend(backend):
        out = GF.self_attention2d(*ins)
        assert _dispatch.last_used["attention"] == backend
        loss = out.sum() if sum_grad else (out * go.to(dtype)).sum()
        grads = torch.autograd.grad(loss, ins)
    assert out.dtype == dtype and out.shape == ref.shape
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    # elementwise bounds of the block (tests/_attention_bounds.py): fp32 accumulation (fp64 for
    # fp64), the inputs rounded to dtype from the fp64 reference's, fp16 intermediates rounded
    low = dtype in (torch.float16, torch.bfloat16)
    bounds = self_attention_bounds(x64, *p64, torch.ones_like(ref) if sum_grad else go,
                                   acc=A.acc_dtype(dtype), store_dtype=dtype if low else None,
                                   input_dtype=None if dtype == torch.float64 else dtype)
    assert_below(out, ref, bounds[0], name="out")
    names = ["x", "query_weight", "query_bias", "key_weight", "key_bias", "value_weight", "value_bias", "gamma"]
    for name, g, r, e in zip(names, grads, ref_grads, bounds[1:]):
        if gamma == 0.0 and name in ("query_weight", "query_bias", "key_weight", "key_bias",
                                     "value_weight", "value_bias"):
            assert g.abs().max().item() == 0.0, f"{name}: gradient must vanish at gamma=0"
            continue
        # (the key bias adds a per-query constant to every score: softmax ignores it, its exact
        # gradient is 0 and a backend's is rounding noise, bounded like the others)
        assert_below(g, r, e, name=name)


SHAPES = [(2, 16, 1, 1), (2, 24, 3, 5), (1, 80, 7, 9), (2, 24, 16, 16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward_fp32(backend, shape):
    _run_case(backend, *shape, gamma=0.7, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gamma_zero(backend):
    _run_case(backend, 2, 24, 3, 5, gamma=0.0, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 24, 3, 5), (1, 32, 9, 9)], ids=lambda s: "x".join(map(str, s)))
def test_forward_backward_fp16(backend, shape):
    _run_case(backend, *shape, gamma=0.7, dtype=torch.float16)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_forward_backward_fp64(backend):
    _run_case(backend, 2, 16, 5, 3, gamma=-0.4, dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_and_expanded_grad(backend):
    _run_case(backend, 2, 24, 7, 5, gamma=0.5, dtype=torch.float32, channels_last=True, sum_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,m", [(15, 4), (70, 17), (1, 9)])
def test_core_unequal_lengths(backend, n, m):
    """k/v shorter than q (BigGAN pools them): M != N, tails on both."""
    _skip_unless(backend)
    b, d, c = 2, 5, 40
    ts = [torch.randn(b, d, n), torch.randn(b, d, m), torch.randn(b, c, m), torch.randn(b, c, n), torch.tensor(0.3)]
    ts64 = [t.double().requires_grad_() for t in ts]
    ref = A.reference_attention(*ts64)
    go = torch.randn_like(ref)
    ref_g = torch.autograd.grad(ref, ts64, go)
    ins = [t.clone().requires_grad_() for t in ts]
    with ganengine.backends.strict(), ganengine.use_backend(backend):
        out = A.attention(*ins)
        grads = torch.autograd.grad(out, ins, go.float())
    # elementwise (tests/_attention_bounds.py); the upstream gradient is go rounded to fp32 (u
    # relative, like a rounded gamma); dx = that rounding of go
    bnd = core_bounds(*ts, go, u_gamma=unit_roundoff(torch.float32))
    assert_below(out, ref, bnd["out"], name="out")
    for name, g, r in zip("q k v x gamma".split(), grads, ref_g):
        assert g.shape == r.shape, name
        assert_below(g, r, bnd.get(name, 0.0), name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_like_autocast(backend):
    """fp16 q/k/v (autocast convs) with an fp32 residual: out and dx stay fp32."""
    _skip_unless(backend)
    b, d, c, n = 2, 4, 32, 20
    ts = [torch.randn(b, d, n), torch.randn(b, d, n), torch.randn(b, c, n), torch.randn(b, c, n), torch.tensor([0.6])]
    ts64 = [t.double().requires_grad_() for t in ts]
    ref = A.reference_attention(*ts64)
    ref_g = torch.autograd.grad(ref.sum(), ts64)
    ins = [t.half() for t in ts[:3]] + ts[3:]
    ins = [t.clone().requires_grad_() for t in ins]
    with ganengine.backends.strict(), ganengine.use_backend(backend):
        out = A.attention(*ins)
        grads = torch.autograd.grad(out.sum(), ins)
    assert out.dtype == torch.float32 and grads[3].dtype == torch.float32 and grads[0].dtype == torch.float16
    # q, k, v rounded to fp16 from the reference's values (u16 |.|), fp32 accumulation; the fp16
    # gradients rounded once more (assert_below's u(fp16) |ref|)
    u16 = unit_roundoff(torch.float16)
    bnd = core_bounds(*ts, torch.ones(ref.shape), e_q=u16 * ts[0].abs().double(), e_k=u16 * ts[1].abs().double(),
                      e_v=u16 * ts[2].abs().double())
    assert_below(out, ref, bnd["out"], name="out")
    for name, g, r in zip("q k v x gamma".split(), grads, ref_g):
        assert_below(g, r, bnd.get(name, 0.0), name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_attention(backend):
    _skip_unless(backend)
    x = torch.randn(2, 16, 3, 4, dtype=torch.float64)
    p = _params(16, 2, 0.6)
    ins64 = [t.clone().requires_grad_() for t in [x] + p]
    ref_out, ref_attn = _sagan_reference(*ins64)
    ref_g = torch.autograd.grad(ref_out.sum() + (ref_attn ** 2).sum(), ins64)
    ins = [t.float().requires_grad_() for t in [x] + p]
    with ganengine.backends.strict(), ganengine.use_backend(backend):
        out, attn = GF.self_attention2d(*ins, return_attention=True)
        grads = torch.autograd.grad(out.sum() + (attn ** 2).sum(), ins)
    assert attn.shape == (2, 12, 12)
    # out and the map: elementwise (tests/_attention_bounds.py, inputs rounded to fp32); the
    # gradients of out.sum() + |attn|^2 (two upstream paths) normwise: the block's 3 convs,
    # 2 products and the softmax, n the longest (16 channels, 12 keys, 2 x 12 pixels for dW)
    fwd = self_attention_bounds(x, *p, None, input_dtype=torch.float32)
    core = core_bounds(*(F.conv2d(x, w_, b_).flatten(2) for w_, b_ in ((p[0], p[1]), (p[2], p[3]), (p[4], p[5]))),
                       x.flatten(2), p[6], None, e_q=None)
    assert_below(out, ref_out, fwd[0], name="out")
    assert_below(attn, ref_attn, core["attn"] + 4 * unit_roundoff(torch.float32) * ref_attn.abs(), name="attention")
    cen = Census.of(n_fwd=16 + 1, n=2 * 12, depth=6)
    scale = max(r.abs().max().item() for r in ref_g)
    for g, r in zip(grads, ref_g):
        assert_normwise(g, r, cen, scale=scale, backward=True, sides=1)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck_and_gradgradcheck(backend):
    _skip_unless(backend)
    # the whole block, first order (tiny: gradcheck perturbs every element)
    x = torch.randn(1, 8, 2, 2, dtype=torch.float64, requires_grad=True)
    p = [t.requires_grad_() for t in _params(8, 1, 0.8)]
    # the attention core (the convs are torch's own), first and second order
    ts = [torch.randn(1, 2, 3, dtype=torch.float64), torch.randn(1, 2, 2, dtype=torch.float64),
          torch.randn(1, 3, 2, dtype=torch.float64), torch.randn(1, 3, 3, dtype=torch.float64),
          torch.tensor([0.8], dtype=torch.float64)]
    ts = [t.requires_grad_() for t in ts]
    with ganengine.backends.strict(), ganengine.use_backend(backend):
        assert torch.autograd.gradcheck(GF.self_attention2d, (x, *p), fast_mode=True)
        # (second order through the block: on the torch backend its stacked projection's Function)
        assert torch.autograd.gradgradcheck(GF.self_attention2d, (x, *p), fast_mode=True)
        assert torch.autograd.gradcheck(A.attention, ts)
        assert torch.autograd.gradgradcheck(A.attention, ts)
        assert _dispatch.last_used["attention"] == backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_matches_reference(backend):
    """R1-style penalty through the op (create_graph=True) in fp32, vs the reference."""
    _skip_unless(backend)
    x = torch.randn(2, 16, 4, 5)
    p = _params(16, 2, 0.9, dtype=torch.float32)

    def penalty(fn):
        xs = x.clone().requires_grad_()
        ps = [t.clone().requires_grad_() for t in p]
        y = fn(xs, *ps)
        y = y[0] if isinstance(y, tuple) else y
        (gx,) = torch.autograd.grad((y ** 2).sum(), xs, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), [xs] + ps)

    want = penalty(_sagan_reference)
    with ganengine.backends.strict(), ganengine.use_backend(backend):
        got = penalty(GF.self_attention2d)
    # normwise (tests/_model_bounds.py), one scale for all: the key-bias gradient is exactly 0
    # in exact arithmetic (softmax is shift invariant), so fp32 leaves only rounding noise of
    # the other terms' size there. Double backward of the block: 3 convs, 2 products and the
    # softmax, forward and backward, differentiated again: 4 x 6 stages; n the longest (16
    # channels, 20 keys, 2 x 20 pixels)
    scale = max(r.abs().max().item() for r in want)
    cen = Census.of(n_fwd=20, n=2 * 20, depth=4 * 6)
    for g, r in zip(got, want):
        assert_normwise(g, r, cen, scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    _skip_unless(backend)
    b, d, c, n, m = 2, 3, 16, 11, 7
    q, k, v, x = torch.randn(b, d, n), torch.randn(b, d, m), torch.randn(b, c, m), torch.randn(b, c, n)
    gamma = torch.tensor([0.5])
    with ganengine.backends.strict(), ganengine.use_backend(backend):
        torch.library.opcheck(torch.ops.ganengine.attention_fwd.default,
                              (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(),
                               x.requires_grad_(), gamma.requires_grad_()))
        _, o, lse = A.attention_fwd(q, k, v, x, gamma)
        g = torch.randn(b, c, n).expand(b, c, n)
        args = [t.detach() for t in (g, q, k, v, o, lse, gamma)]
        torch.library.opcheck(torch.ops.ganengine.attention_bwd.default, tuple(args))


def test_compile_fullgraph():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), gnn.SelfAttention2d(16), nn.Conv2d(16, 1, 1))
    with torch.no_grad():
        model[1].gamma.fill_(0.4)
    x = torch.randn(2, 3, 6, 5)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    want = model(x)
    want.sum().backward()
    want_g = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = compiled(x)
    got.sum().backward()
    torch.testing.assert_close(got, want)
    for p, g in zip(model.parameters(), want_g):
        torch.testing.assert_close(p.grad, g)


def test_module_matches_reference_and_loads_checkpoint():
    ref = Self_Attn(32)
    mod = gnn.SelfAttention2d(32)
    assert set(mod.state_dict()) == set(ref.state_dict())
    assert mod.gamma.shape == (1,) and mod.gamma.abs().sum() == 0
    with torch.no_grad():
        ref.gamma.fill_(0.7)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 32, 5, 6)
    want_out, want_attn = ref(x)
    # both fp32 within the block's elementwise bound (tests/_attention_bounds.py): twice it
    e_out, e_attn = _sagan_module_bounds(ref, x)
    assert_below(mod(x), want_out, 2 * e_out)
    m2 = gnn.SelfAttention2d(32, return_attention=True)
    m2.load_state_dict(ref.state_dict())
    out, attn = m2(x)
    assert_below(out, want_out, 2 * e_out)
    assert_below(attn, want_attn, 2 * e_attn)


@pytest.mark.parametrize("hw", [(6, 10), (5, 7)])
def test_biggan_module_matches_reference(hw):
    torch.manual_seed(1)
    ref = BigGANAttention(32).double()
    mod = gnn.BigGANSelfAttention2d(32).double()
    assert set(mod.state_dict()) == set(ref.state_dict())
    assert mod.gamma.shape == ()
    with torch.no_grad():
        ref.gamma.fill_(0.8)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 32, *hw, dtype=torch.float64, requires_grad=True)
    if hw[0] % 2 == 0 and hw[1] % 2 == 0:
        want = ref(x)
    else:  # the reference's view(H*W//4) needs even sizes; use the pooled size instead
        theta = ref.theta(x).flatten(2)
        phi = F.max_pool2d(ref.phi(x), 2).flatten(2)
        g = F.max_pool2d(ref.g(x), 2).flatten(2)
        beta = torch.softmax(torch.bmm(theta.transpose(1, 2), phi), -1)
        want = ref.gamma * ref.o(torch.bmm(g, beta.transpose(1, 2)).view(2, 16, *hw)) + x
    got = mod(x)
    # fp64 both, normwise (tests/_model_bounds.py): 4 convs, 2 products, softmax, pooling;
    # n the longest (32 channels, H*W = 35..60 queries, 2 H W pixels for dW)
    cen = Census.of(n_fwd=32, n=2 * hw[0] * hw[1], depth=7)
    assert_normwise(got, want, cen, acc_dtype=torch.float64)
    gw = torch.autograd.grad(want.sum(), [x] + list(ref.parameters()))
    gg = torch.autograd.grad(got.sum(), [x] + list(mod.parameters()))
    scale = max(b.abs().max().item() for b in gw)
    for a, b in zip(gg, gw):
        assert_normwise(a, b, cen, scale=scale, backward=True, acc_dtype=torch.float64)


class _ScaledAttn(Self_Attn):
    """Same attributes as Self_Attn but a different formula: fuse must not touch it."""

    def forward(self, x):
        out, attn = super().forward(x * 2.0)
        return out, attn


def test_fuse_swaps_sagan_and_biggan_blocks():
    torch.manual_seed(2)
    model = nn.ModuleDict({"sagan": Self_Attn(32), "biggan": BigGANAttention(32), "decoy": _ScaledAttn(32)})
    for m in model.values():
        with torch.no_grad():
            m.gamma.fill_(0.6)
    keys = set(model.state_dict())
    fused, report = ganengine.fuse(model, return_report=True)
    assert isinstance(fused["sagan"], gnn.SelfAttention2d)
    assert isinstance(fused["biggan"], gnn.BigGANSelfAttention2d)
    assert type(fused["decoy"]) is _ScaledAttn
    assert report.get("sagan_self_attention") == 1 and report.get("biggan_self_attention") == 1
    assert set(fused.state_dict()) == keys
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[k], v, rtol=0, atol=0)
    x = torch.randn(2, 32, 4, 6, requires_grad=True)
    want_out, want_attn = model["sagan"](x)
    got = fused["sagan"](x)
    assert isinstance(got, tuple) and len(got) == 2, "a tuple-returning block must stay tuple-returning"
    e_out, e_attn = _sagan_module_bounds(model["sagan"], x)  # both sides: twice the bound
    assert_below(got[0], want_out, 2 * e_out)
    assert_below(got[1], want_attn, 2 * e_attn)
    with census(model["biggan"]) as cen:
        want_b = model["biggan"](x)
    assert_normwise(fused["biggan"](x), want_b, cen)  # normwise (tests/_model_bounds.py)
    # same training behaviour: parameter gradients agree (normwise, the network's largest
    # gradient as the scale; the upstream 2 out carries out's error: one more stage)
    gw = torch.autograd.grad(model["sagan"](x)[0].square().sum(), list(model["sagan"].parameters()))
    gg = torch.autograd.grad(fused["sagan"](x)[0].square().sum(), list(fused["sagan"].parameters()))
    cen = Census.of(n_fwd=32 + 1, n=2 * 4 * 6, depth=7)
    scale = max(b.abs().max().item() for b in gw)
    for a, b in zip(gg, gw):
        assert_normwise(a, b, cen, scale=scale, backward=True)


def test_errors_name_the_argument():
    x = torch.randn(1, 16, 3, 3)
    p = _params(16, 2, 0.1, dtype=torch.float32)
    with pytest.raises(ValueError, match="value_weight"):
        GF.self_attention2d(x, *p[:4], torch.randn(8, 16, 1, 1), *p[5:])
    with pytest.raises(ValueError, match="key_bias"):
        GF.self_attention2d(x, p[0], p[1], p[2], torch.randn(3), *p[4:])
    with pytest.raises(ValueError, match="x must be a 4-D"):
        GF.self_attention2d(x[0], *p)
    with pytest.raises(ValueError, match="gamma"):
        GF.self_attention2d(x, *p[:6], torch.ones(2))
    with pytest.raises(ValueError, match="in_channels"):
        gnn.SelfAttention2d(4)
    with pytest.raises(ValueError, match="x has 17 channels but query_weight"):
        gnn.SelfAttention2d(16)(torch.randn(1, 17, 3, 3))
    ints = [t if t is None else (t * 10).to(torch.int32) for t in p]  # (integer convs ran, an int result)
    for backend in ("torch", "cpu"):
        with ganengine.use_backend(backend), pytest.raises(TypeError, match="x must be a floating-point tensor"):
            GF.self_attention2d((x * 10).to(torch.int32), *ints)


@pytest.mark.parametrize("backend", ["torch", "cpu", "auto"])
def test_empty_batch_gives_an_empty_output(backend):
    """B = 0 (the empty last shard of a split batch): an empty output and zero parameter
    gradients, as the references' attention layers give; other empty sizes stay errors."""
    for mod in (gnn.SelfAttention2d(16), gnn.BigGANSelfAttention2d(16)):
        x = torch.randn(0, 16, 4, 4, requires_grad=True)
        with ganengine.use_backend(backend):
            y = mod(x)
            y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape
        assert all(p.grad is not None and not p.grad.any() for p in mod.parameters())
    from ganengine.ops.attention import attention
    q = torch.randn(0, 2, 5)
    out = attention(q, torch.randn(0, 2, 3), torch.randn(0, 4, 3), torch.randn(0, 4, 5), torch.tensor(0.5))
    assert out.shape == (0, 4, 5)
    with pytest.raises(ValueError, match="empty input"):
        attention(torch.randn(1, 2, 0), torch.randn(1, 2, 3), torch.randn(1, 4, 3), torch.randn(1, 4, 0), torch.tensor(0.5))


def test_cpu_autocast_bf16_keeps_residual_dtype():
    mod = gnn.SelfAttention2d(16)
    with torch.no_grad():
        mod.gamma.fill_(0.5)
    x = torch.randn(2, 16, 4, 4)
    want = mod(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mod(x)
    assert got.dtype == torch.float32
    # the fp32 side's bound plus the autocast side's: x and the weights rounded to bf16 for the
    # convs, q, k, v stored in bf16, fp32 accumulation (tests/_attention_bounds.py)
    e32, _ = _sagan_module_bounds(mod, x)
    p = [mod.query_conv.weight, mod.query_conv.bias, mod.key_conv.weight, mod.key_conv.bias,
         mod.value_conv.weight, mod.value_conv.bias, mod.gamma]
    e16 = self_attention_bounds(x, *p, None, store_dtype=torch.bfloat16, input_dtype=torch.bfloat16)[0]
    assert_below(got, want, e32 + e16, name="autocast out")


def test_cpu_kernel_without_blas():
    """The C++ kernel's plain-loop GEMM fallback (used when no BLAS symbol is found)."""
    _skip_unless("cpu")
    code = (
        "import torch, ganengine\n"
        "from ganengine.ops import attention as A\n"
        "torch.manual_seed(0)\n"
        "ts = [torch.randn(2, 3, 70, dtype=torch.float64), torch.randn(2, 3, 300, dtype=torch.float64),\n"
        "      torch.randn(2, 20, 300, dtype=torch.float64), torch.randn(2, 20, 70, dtype=torch.float64),\n"
        "      torch.tensor([0.7], dtype=torch.float64)]\n"
        "ins = [t.clone().requires_grad_() for t in ts]\n"
        "with ganengine.backends.strict(), ganengine.use_backend('cpu'):\n"
        "    out = A.attention(*ins); g = torch.autograd.grad(out.square().sum(), ins)\n"
        "ref_in = [t.clone().requires_grad_() for t in ts]\n"
        "ref = A.reference_attention(*ref_in); rg = torch.autograd.grad(ref.square().sum(), ref_in)\n"
        # fp64 both, normwise: 3 products and the softmax (forward), x2 with the backward of
        # out^2; n the longest reduction (300 keys, the online softmax's rescales: 2 x 300 + 8)
        "from tests._tolerance import gamma\n"
        "tol = lambda r, c: c * gamma(2 * 300 + 8, torch.float64) * r.abs().max()\n"
        "assert (out - ref).abs().max() <= tol(ref, 2 * 4), 'out'\n"
        "assert all((a - b).abs().max() <= tol(b, 2 * 8 + 2) for a, b in zip(g, rg)), 'grads'\n"
        "print('ok')\n")
    env = dict(os.environ, GANENGINE_ATTENTION_NO_BLAS="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hw", [(64, 64), (45, 51)])
def test_large_n(backend, hw):
    if backend == "triton" and hw == (64, 64):
        pytest.skip("N=4096 under the interpreter takes minutes; 45x51 covers the same paths")
    _run_case(backend, 2, 64, *hw, gamma=0.3, dtype=torch.float32)


@pytest.mark.slow
def test_compile_inductor():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), gnn.SelfAttention2d(16))
    with torch.no_grad():
        model[1].gamma.fill_(0.4)
    x = torch.randn(2, 3, 6, 5)
    with census(model) as cen:
        want = model(x)
    assert_normwise(torch.compile(model, fullgraph=True)(x), want, cen)  # (tests/_model_bounds.py)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 64, 16, 16), (1, 128, 33, 31), (2, 512, 8, 8)])
def test_triton_cuda(dtype, shape):
    b, c, h, w = shape
    x = torch.randn(b, c, h, w, device="cuda", dtype=torch.float64)
    p = [t.cuda() for t in _params(c, c // 8, 0.7)]
    ins64 = [t.clone().requires_grad_() for t in [x] + p]
    ref, _ = _sagan_reference(*ins64)
    ref_g = torch.autograd.grad(ref.sum(), ins64)
    ins = [t.to(dtype).requires_grad_() for t in [x] + p]
    with ganengine.backends.strict(), ganengine.use_backend("triton"):
        out = GF.self_attention2d(*ins)
        grads = torch.autograd.grad(out.sum(), ins)
    # elementwise bounds (tests/_attention_bounds.py): inputs rounded to dtype from the fp64
    # reference's, fp16/bf16 intermediates stored, fp32 products possibly TF32 (u = 2^-11)
    low = dtype != torch.float32
    bounds = self_attention_bounds(x, *p, torch.ones_like(ref), store_dtype=dtype if low else None,
                                   input_dtype=dtype, product_u=0.0 if low else 2.0 ** -11)
    assert_below(out, ref, bounds[0], name="out")
    for g, r, e in zip(grads, ref_g, bounds[1:]):
        assert_below(g, r, e, name="grad")


def test_fuse_keeps_spectral_norm_convs():
    """BigGAN uses spectral-norm convs: the fused module runs them as modules, so SN stays."""
    from torch.nn.utils.parametrizations import spectral_norm

    def sn_conv(*args, **kwargs):
        return spectral_norm(nn.Conv2d(*args, **kwargs))

    torch.manual_seed(3)
    ref = BigGANAttention(32, which_conv=sn_conv)
    with torch.no_grad():
        ref.gamma.fill_(0.7)
    ref.eval()
    keys = set(ref.state_dict())
    fused = ganengine.fuse(ref)
    assert isinstance(fused, gnn.BigGANSelfAttention2d) and set(fused.state_dict()) == keys
    x = torch.randn(2, 32, 6, 4)
    with census(ref) as cen:
        want = ref(x)
    assert_normwise(fused(x), want, cen)  # normwise (tests/_model_bounds.py)


# ----------------------------------------------------------------------------- eager route (twin)
# A plain eager call on the Python route runs the custom op's body in an autograd.Function
# (ops/_eager.py); tracing runs the custom op. Same body, same backward: the same bits.
def _python_route(monkeypatch):
    # the route the CUDA path takes: no C++ lean entry (CPU only) in front of it
    monkeypatch.setattr(_dispatch, "lean_op", lambda *a, **k: None)




def _assert_bits(got, want):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), i
        assert torch.equal(a, b), f"[{i}] max diff {(a.double() - b.double()).abs().max().item()}"


def _twin_dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64  # (triton: no fp64 kernels)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("b,d,n,m,c,strided", [(2, 3, 7, 5, 6, False), (1, 1, 1, 1, 1, False),
                                                (2, 2, 9, 4, 5, True)], ids=["odd", "single", "strided"])
def test_core_twin_matches_custom_op(monkeypatch, backend, b, d, n, m, c, strided):
    _python_route(monkeypatch)
    dt = _twin_dtype(backend)
    if strided:  # positions-major views and a strided slice, as the convs of a channels_last x give
        ins0 = [torch.randn(b, n, d, dtype=dt).transpose(1, 2), torch.randn(b, d, 2 * m, dtype=dt)[:, :, ::2],
                torch.randn(b, m, c, dtype=dt).transpose(1, 2), torch.randn(b, n, c, dtype=dt).transpose(1, 2)]
    else:
        ins0 = [torch.randn(b, d, n, dtype=dt), torch.randn(b, d, m, dtype=dt), torch.randn(b, c, m, dtype=dt),
                torch.randn(b, c, n, dtype=dt)]
    ins0.append(torch.tensor([0.7], dtype=dt))
    gy = torch.randn(b, c, n, dtype=dt)

    def run(route):
        ins = [t.detach().requires_grad_() for t in ins0]  # (strides kept)
        with on_backend(backend):
            if route == "twin":
                y = A.attention(*ins)
                assert type(y.grad_fn).__name__ == "ganengine::attention_fwdBackward"  # the twin served it
            else:
                y = A.attention_fwd(*ins)[0]
                assert type(y.grad_fn).__name__ != "ganengine::attention_fwdBackward"
            first = torch.autograd.grad(y, ins, gy, retain_graph=True)  # the backward body / custom op
            grads = torch.autograd.grad(y, ins, gy, create_graph=True)  # double backward (R1, WGAN-GP)
            # (dx = grad_out: x is not in the second-order graph)
            gg = torch.autograd.grad(sum((g * g).sum() for g in grads), ins[:3] + ins[4:])
        return [y, *first, *grads, *gg]

    _assert_bits(run("twin"), run("custom_op"))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("shape,cl", [((2, 16, 3, 5), True), ((1, 8, 1, 1), False)], ids=["nhwc", "1px"])
def test_block_twin_matches_custom_op(monkeypatch, backend, shape, cl):
    """The block (convs + the core) with the core on the twin (the stacked projection's Function,
    which writes dq, dk, dv into one gradient) vs on the custom op; stride-0 grad."""
    _python_route(monkeypatch)
    dt = _twin_dtype(backend)
    x0 = torch.randn(shape, dtype=dt)
    if cl:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    p0 = _params(shape[1], max(1, shape[1] // 8), 0.6, dtype=dt)

    def run():
        ins = [t.detach().requires_grad_() for t in [x0, *p0]]
        with on_backend(backend):
            y = GF.self_attention2d(*ins)
            grads = torch.autograd.grad(y.sum(), ins)
        return y, [y, *grads]

    y, got = run()
    assert "ganengine::attention_fwdBackward" in autograd_node_names(y)

    def stacked_on_the_custom_op(qkv, x, gamma, d):  # (the stacked projection's route, split outside)
        q, k, v = qkv.flatten(2).split_with_sizes((d, d, qkv.shape[1] - 2 * d), 1)
        return A.attention_fwd(q, k, v, x.flatten(2), gamma)

    monkeypatch.setattr(A, "_eager_fwd", A.attention_fwd)
    monkeypatch.setattr(A, "_eager_stacked", stacked_on_the_custom_op)
    y_ref, want = run()
    assert "ganengine::attention_fwdBackward" not in autograd_node_names(y_ref)
    # key_bias's gradient (index 5) is the sum of dk over the positions, mathematically 0 (softmax
    # is shift-invariant along the keys): rounding noise, whose bits follow the summation order,
    # which the stacked gradient's layout (twin: qkv's NHWC; custom op: the split's cat, NCHW) and
    # the thread count choose. Each side within the block's error bound of that gradient (vs 0).
    kb_bound = self_attention_bounds(x0, *p0, torch.ones_like(y))[5]
    for t in (got[5], want[5]):
        assert_below(t, torch.zeros_like(t), kb_bound, name="key_bias grad")
    _assert_bits(got[:5] + got[6:], want[:5] + want[6:])


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_tracing_takes_the_custom_op(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    _python_route(monkeypatch)
    seen = []
    real = A.attention_fwd
    monkeypatch.setattr(A, "attention_fwd", lambda *args: seen.append(True) or real(*args))
    ins = [torch.randn(1, 1, 3), torch.randn(1, 1, 2), torch.randn(1, 2, 2), torch.randn(1, 2, 3),
           torch.tensor([0.5])]
    with FakeTensorMode() as mode:
        y = A.attention(*[mode.from_tensor(t) for t in ins])
    assert seen and y.shape == ins[3].shape
    seen.clear()
    traced = torch.jit.trace(lambda *t: A.attention(*t), tuple(ins), check_trace=False)
    assert seen and "ganengine::attention_fwd" in str(traced.graph)
    seen.clear()
    A.attention(*ins)
    assert not seen


def test_backend_choice_kept_only_without_a_fallback(monkeypatch):
    """The attention backend choice is kept per (dtype, device, requested backend) only where
    choose() served the request itself: a fallback (here fp64 on the triton backend, which its
    verdict refuses) still raises in strict mode on every call, and auto's choice is recorded in
    last_used on every call."""

    monkeypatch.setattr(A, "_CHOSEN", {})
    q, k, v, x = torch.randn(1, 2, 5), torch.randn(1, 2, 4), torch.randn(1, 8, 4), torch.randn(1, 8, 5)
    gamma = torch.tensor([0.5])
    want = A.reference_attention(q, k, v, x, gamma)
    with ganengine.use_backend("triton"):
        for _ in range(2):
            with ganengine.backends.strict(), pytest.raises(_dispatch.BackendFallbackError):
                A.attention(q.double(), k.double(), v.double(), x.double(), gamma.double())
            torch.testing.assert_close(A.attention(q.double(), k.double(), v.double(), x.double(),
                                                    gamma.double()), want.double())
            assert _dispatch.last_used["attention"] == "torch"
    # auto (the C++ entry off, so the Python route chooses): the first call's choice is kept, and
    # the kept one is recorded in last_used on every call
    monkeypatch.setattr(_dispatch, "lean_op", lambda *a, **k: None)
    with ganengine.use_backend("auto"):
        A.attention(q, k, v, x, gamma)
        first = _dispatch.last_used["attention"]
        assert first == ("cpu" if _ext.has_kernel("attention_fwd", "CPU") else "torch")
        assert [name for (op, *_), name in A._CHOSEN.items() if op == "attention_fwd"] == [first]
        for _ in range(2):
            _dispatch.last_used.pop("attention", None)
            A.attention(q, k, v, x, gamma)
            assert _dispatch.last_used["attention"] == first
