"""Regressions of the ops acceptance round 15:

* instance norm's running variance of a plane whose sum of squares overflows fp32 is inf, as
  eager's (it came out near 1: a zero rstd was read as a zero variance, a rule meant for eps = 0);
* attention's torch-backend composition and SelfAttention2d's map path keep their fp32
  accumulation under torch.autocast (autocast cast their bmm back to bf16: 0.28 from fp64);
* the C++ losses' sums: lanes of at most kSub / vector width fp32 additions, the rest in fp64
  (a lane ran through a 32K-element chunk: relative error 1e-5, 50x torch's cascade sum).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import ganengine
import ganengine.functional as GF
import ganengine.nn as gnn
from ganengine.ops.attention import attention
from tests._backends import backend_params, on_backend
from tests._tolerance import gamma, unit_roundoff

BACKENDS = backend_params()


# ============================================================================= 1. running_var of an overflowed plane
@pytest.mark.parametrize("big", [1e20, 1e30])
@pytest.mark.parametrize("backend", BACKENDS)
def test_instance_norm_running_var_of_an_overflowed_plane_is_inf(backend, big):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 5)
    x[1, 2, 0, 0] = big
    ref = nn.InstanceNorm2d(4, track_running_stats=True)
    ref(x)
    assert torch.isinf(ref.running_var[2])  # (eager's own behaviour, which ganengine follows)
    with on_backend(backend):
        m = gnn.InstanceNormAct2d(4, track_running_stats=True, activation="none")
        m(x)
        rm, rv = torch.zeros(4), torch.ones(4)
        GF.instance_norm_act(x, running_mean=rm, running_var=rv, activation="none")
    for got in (m.running_var, rv):
        torch.testing.assert_close(got, ref.running_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_instance_norm_running_var_of_a_constant_plane_with_eps_0(backend):
    """The rule the fix keeps: with eps = 0 a constant plane's zero rstd is a zero variance."""
    x = torch.randn(2, 3, 4, 4)
    x[0, 1] = 3.0
    ref = nn.InstanceNorm2d(3, eps=0.0, track_running_stats=True)
    ref(x)
    with on_backend(backend):
        m = gnn.InstanceNormAct2d(3, eps=0.0, track_running_stats=True, activation="none")
        m(x)
    assert torch.isfinite(m.running_var).all()
    torch.testing.assert_close(m.running_var, ref.running_var, rtol=1e-5, atol=1e-6)


# ============================================================================= 2. attention under autocast
def _fp64_attention(q, k, v, x, g):
    p = torch.softmax(torch.bmm(q.double().transpose(1, 2), k.double()), -1)
    return g.double() * torch.bmm(v.double(), p.transpose(1, 2)) + x.double()


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_keeps_fp32_accumulation_under_autocast(backend):
    torch.manual_seed(0)
    b, c, d, n = 2, 16, 2, 64
    q, k = (torch.randn(b, d, n) * 3).bfloat16(), (torch.randn(b, d, n) * 3).bfloat16()
    v, x, g = torch.randn(b, c, n).bfloat16(), torch.randn(b, c, n), torch.tensor([1.0])
    with ganengine.use_backend(backend):  # (the interpreter's Triton takes no bf16 tl.dot: torch serves)
        plain = attention(q, k, v, x, g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = attention(q, k, v, x, g)
    # the same fp32 computation either way; its distance from fp64: softmax and two length-n
    # products in fp32 over |v| and |x| (c = 4 covers exp/log's few ulps)
    torch.testing.assert_close(cast, plain, rtol=0, atol=0)
    bound = 4 * gamma(n + 8, torch.float32) * (v.abs().max().item() + x.abs().max().item())
    assert (cast.double() - _fp64_attention(q, k, v, x, g)).abs().max().item() <= bound


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_attention_map_path_keeps_fp32_under_autocast(backend):
    """gnn.SelfAttention2d(return_attention=True) (the one-softmax map path on the CPU): the
    projections run in bf16 as autocast makes them, the attention in fp32 (it ran in bf16: 0.07)."""
    torch.manual_seed(0)
    m = gnn.SelfAttention2d(16, reduction=8)
    with torch.no_grad():
        m.gamma.fill_(1.0)
        m.query_conv.weight.mul_(6)
        m.key_conv.weight.mul_(6)
    x = torch.randn(2, 16, 8, 8)
    with ganengine.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        out, attn = m(x, return_attention=True)
        q, k, v = (conv(x).flatten(2) for conv in (m.query_conv, m.key_conv, m.value_conv))
    assert q.dtype == torch.bfloat16 and out.dtype == torch.float32
    ref = _fp64_attention(q, k, v, x.flatten(2), m.gamma.detach()).view_as(x)
    bound = 4 * gamma(64 + 8, torch.float32) * (v.abs().max().item() + x.abs().max().item())
    assert (out.double() - ref).abs().max().item() <= bound


# ============================================================================= 3. the C++ losses' sums
def _bound(terms_abs_sum: float, result: float) -> float:
    """C++ losses: a lane adds at most kSub / 4 = 64 fp32 values (one vector accumulator of at
    least 4 lanes; the adversarial modes use four), a horizontal sum of at most 64 lanes (6 levels)
    and one tail add, then fp64 (its n * 2^-53 is below 1e-10 here) and one final rounding."""
    return gamma(64 + 6 + 1, torch.float32) * terms_abs_sum + unit_roundoff(torch.float32) * abs(result)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("torch", "cpu")])
def test_loss_sums_are_accurate_on_large_maps(backend):
    torch.manual_seed(0)
    n_shape = (4, 3, 128, 128)  # 196608 elements a term: six 32K chunks
    real_a, rec_a, real_b, rec_b = (torch.randn(n_shape) for _ in range(4))
    logits = torch.randn(16, 1, 90, 90) * 2
    with on_backend(backend):
        total, terms = GF.cycle_loss(real_a, rec_a, real_b, rec_b, lambda_a=1.0, lambda_b=1.0)
        adv = GF.gan_loss(logits, True, "lsgan")
    n = real_a.numel()
    for got, p, t in ((terms["cycle_a"], rec_a, real_a), (terms["cycle_b"], rec_b, real_b)):
        d = (p.double() - t.double()).abs()
        want = d.mean().item()
        assert abs(got.item() - want) <= _bound(d.sum().item() / n, want), (got.item(), want)
    sq = (logits.double() - 1) ** 2
    want = sq.mean().item()
    assert abs(adv.item() - want) <= _bound(sq.sum().item() / sq.numel(), want), (adv.item(), want)


# ============================================================================= 4. torch.func over BatchNormAct2d
@pytest.mark.parametrize("backend", backend_params(["cpu"]))
def test_batch_norm_under_torch_func_says_what_is_unsupported(backend):
    """torch.func.grad over a training BatchNormAct2d raised "Cannot access data pointer of Tensor
    that doesn't have storage" from the C++ kernel; README says torch.func is not supported."""
    from torch.func import functional_call, grad

    m = gnn.BatchNormAct2d(3)
    params = {k: v.detach() for k, v in m.named_parameters()}
    bufs = {k: v.clone() for k, v in m.named_buffers()}
    x = torch.randn(4, 3, 5, 5)
    with ganengine.use_backend(backend), pytest.raises(RuntimeError, match="torch.func transforms"):
        grad(lambda p: functional_call(m, (p, bufs), (x,)).pow(2).sum())(params)


@pytest.mark.parametrize("label, error", [("a", ValueError), (None, TypeError)])
def test_gan_loss_label_that_is_not_a_number_is_named(label, error):
    """(the error class float() raises, as before: only the message is new)"""
    with pytest.raises(error, match="real_label must be a number"):
        GF.gan_loss(torch.randn(2, 1, 4, 4), True, "lsgan", real_label=label)
    with pytest.raises(error, match="fake_label must be a number"):
        GF.discriminator_loss(torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), "vanilla", fake_label=label)


def test_attention_map_path_compiles_whole_under_autocast():
    """autocast_off first entered its contexts through an ExitStack, which Dynamo cannot trace:
    SelfAttention2d(return_attention=True) under autocast broke torch.compile's graph (fullgraph
    raised); plain ``with`` statements trace."""
    torch._dynamo.reset()
    m = gnn.SelfAttention2d(16, reduction=8)
    x = torch.randn(2, 16, 4, 4)
    f = torch.compile(lambda x: m(x, return_attention=True), backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, attn = f(x)
        want, want_attn = m(x, return_attention=True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(attn, want_attn)
    from ganengine.ops.attention import attention_map

    q = torch.randn(1, 2, 16)
    assert attention_map(q=q, k=q).shape == (1, 16, 16)  # (keywords pass through the wrapper)
    torch._dynamo.reset()
