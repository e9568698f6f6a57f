"""Benchmark registry, session 19: op cases under autocast (family "autocast", ``runner.run(...,
autocast=)``, ``host_cost --autocast``), the SAGAN generator's own attention block (``sagan_self_attn_*``),
bench_models.py's reference settings taken from the registry, and tables that name their runner.

Numbers: each side of a case is checked against the fp64 reference within an error bound
(tests/_tolerance.py, the *_bounds.py helpers); both within the bound of the same value is
"equal numbers within a bound". Under autocast the bounds take the inputs rounded to the autocast
format (u relative each) and the intermediates stored in it; the accumulation is the autocast
format's own where an op might reduce in it (a bound valid for any wider accumulation too)."""
from __future__ import annotations

import copy
import dataclasses
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from ganengine.bench import cases_autocast, host_cost, registry, report, runner
from tests._attention_bounds import core_bounds, self_attention_bounds
from tests._conv_bounds import conv_scales
from tests._norm_bounds import instance_norm_act_bounds
from tests._tolerance import assert_below, gamma, gamma_prob, unit_roundoff
from tests._train_utils import one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

BF16 = torch.bfloat16
U = unit_roundoff(BF16)
F32_GAMMA = lambda n: gamma(n, torch.float32)  # noqa: E731
CPU = torch.device("cpu")
# the families the brief asks the autocast mode to cover, by base case
REQUIRED = ("conv", "conv2d_act", "conv3x3", "instance_norm_act", "batch_norm_act", "self_attention2d", "gan_loss")


def _cases():
    return registry.all_cases()


def _autocast_names():
    return [f"{b}_autocast" for b in cases_autocast.BASES if f"{b}_autocast" in _cases()]


def _tiny(case):
    return dataclasses.replace(case, shapes={**case.shapes, "quick": [host_cost.tiny_shape(case)]})


# ----------------------------------------------------------------------------- registration
def test_autocast_family_covers_the_required_ops():
    cases = _cases()
    for base in REQUIRED:
        twin = cases[f"{base}_autocast"]
        assert twin.family == "autocast" and twin.modes == cases[base].modes == ("forward", "forward_backward")
    assert {c.name for c in registry.select(["autocast"], None)} == set(_autocast_names())


# ----------------------------------------------------------------------------- the region is active
def _probed(setup, seen):
    """``setup`` whose reference / fused functions record the autocast state they run in."""
    def probe(side, fn):
        def call(*args):
            seen.append((side, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return fn(*args)
        return call

    def wrapped(p, device, dtype):
        work = setup(p, device, dtype)
        return dataclasses.replace(work, reference=probe("eager", work.reference), fused=probe("ganengine", work.fused))
    return wrapped


@pytest.mark.parametrize("base", REQUIRED)
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_autocast_region_active_on_both_sides(base, mode):
    """Both runners' calls run inside torch.autocast('cpu', bfloat16); the backward outside it."""
    seen = []
    case = cases_autocast.autocast_case(dataclasses.replace(_cases()[base], setup=_probed(_cases()[base].setup, seen)))
    work = case.setup(host_cost.tiny_shape(case), CPU, torch.float32)
    for name in ("eager", "ganengine:auto"):
        call = runner.make_call(case, work, mode, name)
        seen.clear()
        with runner._scope_for(case, work, name)():   # (the runner's own scope for it)
            call()
        assert seen and all(on and dt == BF16 for _, on, dt in seen), (name, seen)
        assert not torch.is_autocast_enabled("cpu")   # (the region ends with the call)


def test_autocast_convolution_runs_in_bfloat16_on_both_sides():
    """Evidence the region acts, not only that it is entered: the conv's output is bfloat16."""
    case = _cases()["conv2d_act_autocast"]
    work = case.setup(host_cost.tiny_shape(case), CPU, torch.float32)
    with torch.no_grad():
        assert work.reference(*work.args).dtype == BF16
        assert work.fused(*work.args).dtype == BF16
    assert case.setup(host_cost.tiny_shape(case), CPU, torch.float16).fused.autocast == ("cpu", torch.float16)
    with pytest.raises(ValueError, match="dtype must be float32"):
        case.setup(host_cost.tiny_shape(case), CPU, torch.float64)


# ----------------------------------------------------------------------------- numbers within a bound
def _d(t):
    return t.detach().double()


def _conv_bound(x, w, b, stride, padding, transposed=False, reflect=False, extra_u=0.0):
    """A conv on bf16-rounded x, w, b (2u of every product, u of the bias: 2u of the scale),
    accumulated in fp32, plus ``extra_u`` relative roundings of the result (an activation in bf16)."""
    conv = F.conv_transpose2d if transposed else F.conv2d
    xin = F.pad(_d(x), (padding,) * 4, mode="reflect") if reflect else _d(x)
    y_shape = conv(xin, _d(w), None, stride, 0 if reflect else padding)   # (the upstream gradient's shape)
    sc = conv_scales(x, w, torch.ones_like(y_shape), b, stride, padding, transposed, reflect=reflect)
    return (F32_GAMMA(sc.n_y) + 2 * U + extra_u) * sc.y


def _forward_bounds(base: str, args, p):
    """(fp64 reference output, its allowed error) of ``base``'s reference on ``args`` under bf16 autocast."""
    ref = _cases()[base]
    a64 = [_d(t) if isinstance(t, torch.Tensor) else t for t in args]
    work64 = ref.setup(p, CPU, torch.float64)   # (the same functions; called on our fp64 copies)
    out = work64.reference(*a64)
    if base == "conv":
        return out, _conv_bound(args[0], args[1], None, p.get("stride", 2), p.get("padding", 1), p["transposed"])
    if base == "conv3x3":
        return out, _conv_bound(args[0], args[1], args[2], 1, 1, reflect=p["mode"] == "reflect")
    if base == "conv2d_act":  # + LeakyReLU, 1-Lipschitz, applied to the bf16 result: one more rounding
        return out, _conv_bound(args[0], args[1], args[2], p["stride"], p["padding"], extra_u=U)
    if base == "conv2d_instance_norm_act":   # the conv's error (and its bf16 storage) carried through the norm
        y = F.conv2d(_d(args[0]), _d(args[1]), None, p["stride"], p["padding"])
        e_y = _conv_bound(args[0], args[1], None, p["stride"], p["padding"], extra_u=U)
        return out, instance_norm_act_bounds(y, x_err=e_y, acc_dtype=BF16).y + U * out.abs()
    if base == "instance_norm_act":
        x, w, b = args
        return out, _norm_bound(x, w, b, "leaky_relu")
    if base == "batch_norm_act":   # per channel over (n, h, w): instance norm of the (1, c, n, h w) view
        x, w, b = args[:3]
        xr = x.transpose(0, 1).reshape(1, x.shape[1], x.shape[0], -1)
        e = _norm_bound(xr, w, b, "relu")
        return out, e.reshape(x.shape[1], x.shape[0], *x.shape[2:]).transpose(0, 1)
    if base == "self_attention2d":   # bf16 inputs, projections and core results stored in bf16, bf16 products
        return out, self_attention_bounds(*args, None, acc=torch.float32, store_dtype=BF16, input_dtype=BF16,
                                          product_u=U)[0]
    if base == "gan_loss":   # mean of softplus(-x) over n terms: its reduction (bf16: any accumulation), x's rounding
        x = _d(args[0])
        n = x.numel()
        return out, 2 * gamma_prob(n + 8, BF16) * F.softplus(-x).abs().mean() + U * x.abs().mean()
    if base == "cycle_loss":   # four weighted L1 means over the same n: reductions plus the operands' rounding
        ra, rec_a, rb, rec_b, ia, ib = (_d(t) for t in args)
        terms = [(rec_a, ra, 10.0), (rec_b, rb, 10.0), (ia, rb, 5.0), (ib, ra, 5.0)]
        n = ra.numel()
        s = sum(w * (a - b).abs().mean() for a, b, w in terms)
        ops = sum(w * (a.abs() + b.abs()).mean() for a, b, w in terms)
        return out, 2 * gamma_prob(4 * n + 16, BF16) * s + U * ops
    raise AssertionError(f"no bound for {base}")


def _norm_bound(x, w, b, activation):
    """Instance norm + activation of bf16-rounded x, w, b, reduced in bf16 at worst (a bound valid for
    fp32 statistics too): the norm's own bound with x's rounding carried, plus w's and b's rounding."""
    xd = _d(x)
    nb = instance_norm_act_bounds(x, w, b, activation=activation, slope=0.2, acc_dtype=BF16, x_err=U * xd.abs())
    mean = xd.mean((2, 3), keepdim=True)
    xh = (xd - mean) / (xd.var((2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
    return nb.y + U * (xh.abs() * _d(w).abs()[None, :, None, None] + _d(b).abs()[None, :, None, None])


@pytest.mark.parametrize("base", [b for b in cases_autocast.BASES])
def test_autocast_sides_agree_within_bound(base):
    """Forward: the eager side and the ganengine side under bf16 autocast are each within the
    mixed-precision bound of the fp64 reference (so within twice it of each other)."""
    if base not in _cases():
        pytest.skip(f"{base} is not in this build")
    case = _cases()[f"{base}_autocast"]
    p = host_cost.tiny_shape(case)
    work = case.setup(p, CPU, torch.float32)
    ref64, allowed = _forward_bounds(base, work.args, p)
    with torch.no_grad(), runner.backend_scope("auto"):
        sides = {"eager": work.reference(*work.args), "ganengine": work.fused(*work.args)}
    for side, out in sides.items():
        # (the output's own storage: u of its format, added by assert_below)
        assert_below(out, ref64, allowed, name=f"{base} {side}")


# ----------------------------------------------------------------------------- end to end
def test_runner_and_host_cost_run_the_autocast_family_at_tiny_shapes():
    cases = [_tiny(c) for c in registry.select(["autocast"], None)][:3] + [_tiny(_cases()["gan_loss_autocast"])]
    res = runner.run(cases, quick=True, runners=["eager", "ganengine:auto"], repeats=1, warmup=0, measure_memory=False)
    assert res["records"] and all(r["status"] == "ok" for r in res["records"]), res["records"]
    assert {r["autocast"] for r in res["records"]} == {"bfloat16"}   # (the record says what it timed)
    recs = host_cost.measure(cases[:1], calls=1, rounds=1)
    assert recs and all(r["status"] == "ok" and r["eager_kernels"] is None for r in recs), recs
    from ganengine.bench import traffic_table

    # the traffic table's strict triton call is not the autocast route: reported skipped, not counted
    assert {r["status"] for r in traffic_table.measure_case(cases[0])} == {"skipped"}


def test_runner_autocast_option():
    """run(autocast="bf16") puts any op case under autocast (settings and records say so); a model
    case is skipped with the reason; non-float32 inputs are a usage error before anything runs."""
    case = _tiny(_cases()["instance_norm_act"])
    res = runner.run([case], quick=True, runners=["eager", "ganengine:auto"], repeats=1, warmup=0,
                     measure_memory=False, autocast="bf16")
    assert res["settings"]["autocast"] == "bfloat16"
    assert all(r["status"] == "ok" and r["autocast"] == "bfloat16" for r in res["records"])
    md = report.markdown(report.build_report(res, _machine()))
    assert "under torch.autocast to bfloat16" in md
    model = next(c for c in _cases().values() if c.kind == "model")
    res = runner.run([model], quick=True, runners=["eager"], repeats=1, measure_memory=False, autocast="bf16")
    assert [r["status"] for r in res["records"]] == ["skipped"] and "--amp" in res["records"][0]["reason"]
    with pytest.raises(ValueError, match="dtype must be float32"):
        runner.run([case], dtype="float16", autocast="bf16")
    with pytest.raises(ValueError, match="autocast must be one of"):
        runner.run([case], autocast="int8")


def test_host_cost_autocast_command(capsys):
    assert host_cost.main(["--ops", "gan_loss", "--calls", "1", "--rounds", "1", "--autocast", "bf16",
                           "--clock", "thread"]) == 0
    out = capsys.readouterr().out
    assert "torch.autocast('cpu', dtype=torch.bfloat16)" in out and "| gan_loss |" in out
    recs = host_cost.measure_case(_cases()["gan_loss"], calls=1, rounds=1, autocast="bf16")
    assert [r["autocast"] for r in recs] == ["bfloat16", "bfloat16"]


def _machine():
    return {"cpu_model": "test", "cpu_physical_cores": 1, "cpu_logical_cores": 1, "python": "3", "torch": "2",
            "triton": "3", "git": {}, "gpu": None}


# ----------------------------------------------------------------------------- SAGAN's SelfAttn
@pytest.mark.parametrize("name", ["sagan_self_attn_eval", "sagan_self_attn_train"])
def test_sagan_self_attn_cases(name):
    """The fused side is ganengine's SelfAttn with fused set (the generator's), the eager side the
    same block unfused; both run through the runner and host_cost at the tiny shape."""
    case = _cases()[name]
    assert case.family == ("eval" if name.endswith("eval") else "attention")
    work = case.setup(host_cost.tiny_shape(case), CPU, torch.float32)
    blocks = [getattr(m, "block", m) for m in (work.reference, work.fused)]
    assert [b.fused for b in blocks] == [False, True] and all(b.training == name.endswith("train") for b in blocks)
    res = runner.run([_tiny(case)], quick=True, runners=["eager", "ganengine:auto"], repeats=1, warmup=0,
                     measure_memory=False)
    assert [r["mode"] for r in res["records"]] == [case.modes[0]] * 2
    assert all(r["status"] == "ok" for r in res["records"]), res["records"]
    assert all(r["status"] == "ok" for r in host_cost.measure_case(case, calls=1, rounds=1))
    from ganengine import backends

    if backends.triton_interpret():   # the cost rule's kernels per call on the CUDA path (interpreter)
        from ganengine.bench import traffic_table

        (k,) = traffic_table.measure_case(case, params=host_cost.tiny_shape(case))
        assert k["status"] == "ok" and 1 <= k["ganengine_kernels"] <= k["eager_kernels"], k


def _attention_args(block):
    q, k, v = block.query_conv, block.key_conv, block.value_conv
    return (q.weight, q.bias, k.weight, k.bias, v.weight, v.bias, block.gamma)


@pytest.mark.parametrize("shape", [dict(n=1, c=16, h=4, w=4), dict(n=2, c=16, h=24, w=24)])
def test_sagan_self_attn_eval_sides_agree_within_bound(shape):
    """(out, attention) of both sides, fp32, within the attention bound of the fp64 block."""
    case = _cases()["sagan_self_attn_eval"]
    work = case.setup(shape, CPU, torch.float32)
    x = work.args[0]
    block = work.reference
    ref64 = copy.deepcopy(block).double()
    with torch.no_grad():
        out64, attn64 = ref64(_d(x))
        sides = {"eager": work.reference(x), "ganengine": work.fused(x)}
    w = _attention_args(block)
    e_out = self_attention_bounds(x, *w, None)[0]
    e_attn = _map_bound(x, *w)
    for side, (out, attn) in sides.items():
        assert_below(out, out64, e_out, name=f"{side} out")
        assert_below(attn, attn64, e_attn, name=f"{side} attention")


def _map_bound(x, qw, qb, kw, kb, vw, vb, gamma_):
    """The attention map's bound: the projections' fp32 errors (self_attention_bounds' own terms)
    through the softmax (core_bounds' "attn")."""
    B, C = x.shape[:2]
    x2 = _d(x).flatten(2)
    proj, errs = [], []
    for wt, b in ((qw, qb), (kw, kb), (vw, vb)):
        w2, b2 = _d(wt).flatten(1), _d(b)
        proj.append(torch.einsum("oc,bcn->bon", w2, x2) + b2[None, :, None])
        ta = torch.einsum("oc,bcn->bon", w2.abs(), x2.abs()) + b2.abs()[None, :, None]
        errs.append(gamma(C + 1, torch.float32) * ta)
    core = core_bounds(*proj, x2, gamma_, None, torch.float32, *errs)
    return core["attn"]


def test_sagan_self_attn_train_gradients_within_bound():
    """Training forward+backward through the output (the map built): input and parameter
    gradients of both sides within the attention block's bounds of the fp64 block's."""
    case = _cases()["sagan_self_attn_train"]
    shape = dict(n=2, c=16, h=24, w=24)   # N = 576: above the map path's limit, the op + the map
    work = case.setup(shape, CPU, torch.float32)
    x = work.args[0]
    go = torch.randn_like(x)
    block = work.reference.block
    ref64 = copy.deepcopy(block).double().train()
    x64 = _d(x).requires_grad_()
    ref64(x64)[0].backward(_d(go))
    want = [x64.grad] + [t.grad for t in _attention_args(ref64)]
    bounds = self_attention_bounds(x, *_attention_args(block), go)[1:]
    for side, module in (("eager", work.reference), ("ganengine", work.fused)):
        module.zero_grad(set_to_none=True)
        xs = x.detach().requires_grad_()
        with runner.backend_scope("auto"):
            module(xs).backward(go)
        got = [xs.grad] + [t.grad for t in _attention_args(module.block)]
        for i, (g, r, e) in enumerate(zip(got, want, bounds)):
            assert_below(g, r, e, name=f"{side} grad {i}")


# ----------------------------------------------------------------------------- bench_models.py
def _bench_models():
    return importlib.import_module("benchmarks.bench_models")


def test_bench_models_reference_settings_are_the_registry_cases():
    """--reference-sizes runs `ganengine bench --models`' reference settings (one source): U-Net
    GAN unconditional without a shared embedding, BigGAN-deep with its two D steps, ..."""
    from ganengine.bench.cases_models import MODEL_SPECS

    mod = _bench_models()
    assert mod.REFERENCE["unetgan"][0].get("unconditional") is True and "G_shared" not in mod.REFERENCE["unetgan"][0]
    assert "num_D_steps" not in mod.REFERENCE["biggan_deep"][0]
    for name, spec in MODEL_SPECS.items():
        key = "stackgan1" if name == "stackgan" else name
        opts, size, batch = mod.REFERENCE[key]
        assert (batch, size) == spec["batch"]["ref"], name
        assert {k: v for k, v in opts.items() if k != "stage"} == spec["ref"], name
    assert mod.REFERENCE["stackgan1"][0]["stage"] == 1 and mod.REFERENCE["stackgan2"][0]["stage"] == 2
    assert set(mod.REFERENCE) <= set(mod.CPU_DEFAULT)


def test_stargan_case_trains_g_every_step():
    """The registered StarGAN step trains D and G (n_critic 1), as its description says: with the
    recipe's 5, four timed steps in five were D's alone."""
    from ganengine.bench.cases_models import MODEL_SPECS

    assert MODEL_SPECS["stargan"]["ref"].get("n_critic") == 1
    case = _cases()["stargan"]
    work = case.setup(case.shape_list("quick")[0], CPU, torch.float32)
    for _ in range(2):
        assert any(k.startswith("G/") for k in work.step()), "a timed StarGAN step without its G step"


# ----------------------------------------------------------------------------- runner named in tables
def test_tables_name_their_runner():
    res = {"settings": {"runners": ["eager", "compile", "ganengine:cpu"], "device": "cpu", "dtype": "float32",
                        "size": "ref", "timer": "time.perf_counter"}, "records": []}
    md = report.markdown(report.build_report(res, _machine()))
    assert "Runners: eager, compile, ganengine:cpu." in md and "not ganengine:auto" in md
    res["settings"]["runners"] = runner.default_runners(CPU)
    assert report.DEFAULT_GANENGINE_RUNNER in res["settings"]["runners"]
    md = report.markdown(report.build_report(res, _machine()))
    assert "ganengine:auto (the default)" in md


def test_generated_tables_say_their_runner():
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks_generated.md")
    head = open(path).read().split("## Timing")[0]
    assert "`ganengine:cpu`" in head and "now `ganengine:auto`" in head
