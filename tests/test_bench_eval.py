"""The eval / forward-only benchmark cases (ganengine/bench/cases_eval.py, family "eval"): each
case's reference and fused calls compute the same function (each within its error bound of the
fp64 reference, tests/_tolerance.py), and each measures through host_cost at its tiny shape with
no more kernels on the CUDA path than eager."""
from __future__ import annotations

import pytest
import torch

from ganengine import backends
from ganengine.bench import host_cost, registry, traffic_table
from tests._attention_bounds import core_bounds, self_attention_bounds
from tests._conv_bounds import conv_scales
from tests._tolerance import assert_below, assert_within_bound, gamma, unit_roundoff

NAMES = ("instance_norm_act_eval", "spectral_norm_eval", "self_attention_eval", "self_attention_map_eval",
         "sagan_self_attn_eval", "batch_norm2d_eval", "batch_norm1d_eval", "biggan_snconv_eval", "biggan_snconv_train")
F32 = torch.float32
U = unit_roundoff(F32)


def _case(name):
    return registry.all_cases()[name]


def _setup(name, params, dtype, seed=0):
    """The case's workload; the same seed gives the same values in every dtype (the setups draw
    in fp32 and convert), so a float64 setup is the exact reference of the float32 one."""
    torch.manual_seed(seed)
    return _case(name).setup(params, torch.device("cpu"), dtype)


def _run(work):
    with torch.no_grad():
        ref, fused = work.reference(*work.args), work.fused(*work.args)
    as_tuple = lambda t: t if isinstance(t, tuple) else (t,)  # noqa: E731
    return as_tuple(ref), as_tuple(fused)


def _shapes(name):
    case = _case(name)
    return case.shapes["tiny"] + case.shapes["quick"]


def test_the_eval_family_selects_every_case_forward_only():
    cases = registry.select(["eval"], None)
    assert tuple(c.name for c in cases) == NAMES
    for c in cases:
        assert c.modes == ("forward",) and c.kind == "op"
        assert {"ref", "quick", "tiny"} <= set(c.shapes) and c.traffic_shape is not None


# ----------------------------------------------------------------------------- numerics
def _affine_map_bound(x64, mean, var, weight, bias, eps):
    """|terms| of act(w (x - mean) / sqrt(var + eps) + b), fp64: batch norm's eval map in fp32
    (alpha = w / sqrt(var + eps), beta = b - mean alpha, y = x alpha + beta): eps add, sqrt,
    division, product with w (4 roundings in alpha), mean alpha and the subtraction, x alpha and
    the add: at most 7 roundings relative to these terms, c = 8 with a leaky slope's product."""
    inv = weight.double().abs() / (var.double() + eps).sqrt()
    shape = (1, -1) + (1,) * (x64.dim() - 2)
    return (x64.abs() + mean.double().abs().view(shape)) * inv.view(shape) + bias.double().abs().view(shape)


@pytest.mark.parametrize("name", ["instance_norm_act_eval", "batch_norm2d_eval", "batch_norm1d_eval"])
def test_norm_eval_cases_agree(name):
    for params in _shapes(name) + ([dict(n=2, c=3, h=5, w=4, act="leaky_relu")] if "instance" in name else []):
        ref32, fused32 = _run(_setup(name, params, F32))
        work64 = _setup(name, params, torch.float64)
        (ref64,), _ = _run(work64)
        norm = work64.reference
        norm = norm[0] if isinstance(norm, torch.nn.Sequential) else norm
        scale = _affine_map_bound(work64.args[0], norm.running_mean, norm.running_var, norm.weight, norm.bias,
                                  norm.eps)
        for got in (ref32[0], fused32[0]):
            assert got.shape == ref64.shape and got.dtype == F32
            assert_within_bound(got, ref64, scale, n=1, acc_dtype=F32, c=8, name=f"{name} {params}")


def test_spectral_norm_eval_case_agrees():
    name = "spectral_norm_eval"
    for params in _shapes(name):
        ref32, fused32 = _run(_setup(name, params, F32))
        work64 = _setup(name, params, torch.float64)
        (ref64,), _ = _run(work64)
        conv = work64.reference
        sn = conv.parametrizations.weight[0]
        w, u, v, x = conv.parametrizations.weight.original, sn._u, sn._v, work64.args[0]
        wm = w.flatten(1)
        sigma = torch.dot(u, wm @ v)
        # sigma = vdot(u, mv(W, v)) in fp32: a nested sum of K = ci k k then co terms
        e_sigma = gamma(wm.shape[1] + wm.shape[0], F32) * (u.abs() @ wm.abs() @ v.abs())
        sc = conv_scales(x, w / sigma.abs(), torch.ones_like(ref64), conv.bias, conv.stride, conv.padding)
        # the conv's own rounding (K + 1 terms), sigma's relative error carried to y (twice: first
        # order, with room for the second), W / sigma rounded once
        allowed = gamma(sc.n_y, F32) * sc.y + (2 * e_sigma / sigma.abs() + U) * sc.y
        for got in (ref32[0], fused32[0]):
            assert_below(got, ref64, allowed, name=f"{name} {params}")


def _projection_errors(block, x64):
    """q, k (B, d, N) in fp64 and their fp32 rounding bounds (1x1 convs: C + 1 terms)."""
    out = []
    for conv in (block.query_conv, block.key_conv):
        w, b = conv.weight.flatten(1), conv.bias
        t = torch.einsum("oc,bcn->bon", w, x64.flatten(2)) + b[None, :, None]
        ta = torch.einsum("oc,bcn->bon", w.abs(), x64.flatten(2).abs()) + b.abs()[None, :, None]
        out.append((t, gamma(x64.shape[1] + 1, F32) * ta))
    return out


@pytest.mark.parametrize("name", ["self_attention_eval", "self_attention_map_eval"])
def test_self_attention_eval_cases_agree(name):
    # tiny: N = 16 (the C++ block / the map block); quick: N = 576 (the forward-only composition)
    for params in _shapes(name):
        ref32, fused32 = _run(_setup(name, params, F32))
        work64 = _setup(name, params, torch.float64)
        ref64, _ = _run(work64)
        block = work64.reference
        block = getattr(block, "block", block)
        x = work64.args[0]
        conv_args = [t for c in (block.query_conv, block.key_conv, block.value_conv) for t in (c.weight, c.bias)]
        (e_out,) = self_attention_bounds(x, *conv_args, block.gamma, None)
        for got in (ref32, fused32):
            assert len(got) == len(ref64) == (2 if "map" in name else 1)
            assert_below(got[0], ref64[0], e_out, name=f"{name} {params} out")
        if "map" in name:
            (q, e_q), (k, e_k) = _projection_errors(block, x)
            v = block.value_conv(x).flatten(2)
            e_map = core_bounds(q, k, v, x.flatten(2), block.gamma, None, F32, e_q, e_k)["attn"]
            for got in (ref32, fused32):
                assert_below(got[1], ref64[1], e_map, name=f"{name} {params} map")


def _biggan_errors(conv):
    """(sigma, bound on |sigma_fp32 - sigma|, normwise bound on u's error) of BigGAN's one power
    iteration from u0, in fp64: a = u0 W (co terms), v = a / ||a|| moves by <= 2 |da| / ||a|| + the
    norm's own rounding (K terms) and the division's; t = v W^T (K terms) moves by ||W||_2 <=
    ||W||_F times v's error plus its own rounding; sigma = t . normalize(t) = ||t|| by as much, plus
    the last dot's and the normalisation's rounding (co terms: twice gamma_co + 4 u, relative);
    u = t / ||t|| by 2 |dt| / ||t|| + gamma_co + 2 u."""
    W, u0 = conv.weight.detach().double().flatten(1), conv.u0.double()
    co, K = W.shape
    a = u0 @ W
    e_v = 2 * gamma(co, F32) * (u0.abs() @ W.abs()).norm() / a.norm() + gamma(K, F32) + 2 * U
    v = a / a.norm()
    t = v @ W.t()
    sigma = t.norm()
    e_t = W.norm() * e_v + gamma(K, F32) * (v.abs() @ W.abs().t()).norm()
    return sigma, e_t + (2 * gamma(co, F32) + 4 * U) * sigma, 2 * e_t / sigma + gamma(co, F32) + 2 * U


@pytest.mark.parametrize("name", ["biggan_snconv_eval", "biggan_snconv_train"])
def test_biggan_snconv_cases_agree(name):
    from ganengine.ops.conv3x3 import winograd_tile

    for params in _shapes(name):
        ref32, fused32 = _run(_setup(name, params, F32))
        work64 = _setup(name, params, torch.float64)
        conv = work64.reference
        x = work64.args[0]
        sigma, e_sigma, _ = _biggan_errors(conv)  # (before the fp64 call: it writes u0 in training)
        (ref64,), _ = _run(work64)
        allowed = 0.0
        # the conv's rounding on either route the fused layer may take: direct / GEMM, or Winograd
        # F(tile, 3) for a 3x3 stride-1 conv (tests/_conv_bounds.py); the weight divided (or the
        # output) rounded once more; sigma's relative error carried to y, twice for the second order
        routes = [None] + ([(winograd_tile(), 3)] if params["k"] == 3 else [])
        for route in routes:
            sc = conv_scales(x, conv.weight / sigma, torch.ones_like(ref64), conv.bias, 1, params["k"] // 2,
                             winograd=route)
            allowed = allowed + (gamma(sc.n_y, F32) + 2 * e_sigma / sigma + 2 * U) * sc.y
        for got in (ref32[0], fused32[0]):
            assert_below(got, ref64, allowed, name=f"{name} {params}")


def test_biggan_snconv_train_writes_u0_as_the_reference():
    """Training mode: both layers write their own u0 (the fused one is a copy), the same vector."""
    work = _setup("biggan_snconv_train", dict(n=1, ci=8, co=8, k=3, h=8), F32)
    ref, fused = work.reference, work.fused
    assert ref.training and fused.training and ref.u0 is not fused.u0
    start = ref.u0.clone()
    _, _, e_u = _biggan_errors(ref)
    _run(work)
    assert not torch.equal(ref.u0, start)
    # each side's u = normalize(v W^T) within e_u of the exact one (normwise, so per element)
    assert (fused.u0.double() - ref.u0.double()).abs().max() <= 2 * e_u


# ----------------------------------------------------------------------------- measuring
@pytest.mark.parametrize("name", NAMES)
def test_case_measures_at_its_tiny_shape(name):
    case = _case(name)
    (rec,) = host_cost.measure_case(case, calls=2, rounds=1)
    assert rec["status"] == "ok", rec["reason"]
    assert rec["mode"] == "forward" and rec["eager_us"] > 0 and rec["ganengine_us"] > 0
    if not backends.triton_interpret():
        return
    # the CUDA path's kernels per call (interpreter): never more than the eager composition's
    (k,) = traffic_table.measure_case(case, params=host_cost.tiny_shape(case))
    assert k["status"] == "ok", k["reason"]
    assert 1 <= k["ganengine_kernels"] <= k["eager_kernels"], (k["ganengine_kernels"], k["eager_kernels"])
    if not case.triton_kernels:  # (a case marked eager's ops by design launches no Triton kernel)
        assert k["triton_launches"] == 0
