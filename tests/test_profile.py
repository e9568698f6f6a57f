"""`ganengine profile`: Chrome trace + operator table grouped into ganengine vs plain PyTorch."""
import json

import pytest
import torch

from ganengine.bench import profile as gprof
from ganengine.bench import registry
from ganengine.bench.registry import BenchCase, Workload
from ganengine.cli import main


def test_classify():
    names = {"_fwd_fused_kernel"}
    assert gprof.classify("ganengine::instance_norm_act_fwd", names) == "ganengine"
    assert gprof.classify("ganengine_C::norm_act_fwd", names) == "ganengine"
    assert gprof.classify("_fwd_fused_kernel", names) == "ganengine"
    assert gprof.classify("GeneratedBackwardFor_ganengine_x_default", names) == "ganengine"
    assert gprof.classify("autograd::engine::evaluate_function: torch::autograd::CppNode<ganengine::bn::"
                          "(anonymous namespace)::BatchNormActFn>", names) == "ganengine"  # (a C++ Function's node)
    assert gprof.classify("autograd::engine::evaluate_function: ConvolutionBackward0", names) == "pytorch"
    assert gprof.classify("aten::convolution", names) == "pytorch"
    assert gprof.classify("triton_poi_fused_add_0", names) == "pytorch"  # inductor's, not ours
    assert gprof.classify("ProfilerStep#3", names) == "profiler"


def _check_outputs(out, target, steps):
    trace = json.loads((out / "trace.json").read_text())
    assert isinstance(trace["traceEvents"], list) and trace["traceEvents"]
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert sum(n.startswith("ganengine.profile.step") for n in names) == steps
    res = json.loads((out / "profile.json").read_text())
    assert res["format"] == "ganengine-profile" and res["target"] == target and res["steps"] == steps
    table = res["table"]
    assert {"time_kind", "total_self_time_us", "groups", "top", "all_ops"} <= set(table)
    for row in table["top"]:
        assert {"name", "group", "calls", "self_time_us", "percent"} <= set(row)
        assert row["group"] in ("ganengine", "pytorch")
    times = [r["self_time_us"] for r in table["top"]]
    assert times == sorted(times, reverse=True)
    assert sum(g["percent"] for g in table["groups"].values()) == pytest.approx(100.0)
    md = (out / "profile.md").read_text()
    assert "| operator | ran by | calls | self time ms | share |" in md
    return res


def test_profile_op_groups_fused_and_pytorch(tmp_path):
    if "instance_norm_act" not in registry.all_cases():
        pytest.skip("norm_act is not in this build")
    out = tmp_path / "p"
    # torch backend: the custom op runs, its body is plain aten ops -> both groups appear
    assert main(["profile", "norm_act", "--quick", "--steps", "2", "--backend", "torch",
                 "--output", str(out)]) == 0
    res = _check_outputs(out, "norm_act", 2)
    rows = {r["name"]: r for r in res["table"]["top"]}
    assert rows["ganengine::instance_norm_act_fwd"]["group"] == "ganengine"
    assert rows["ganengine::instance_norm_act_fwd"]["calls"] == 2
    assert {"ganengine", "pytorch"} <= set(res["table"]["groups"])


def test_profile_model_target(tmp_path):
    def setup(p, device, dtype):
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
        opt = torch.optim.Adam(net.parameters())
        x = torch.randn(1, 3, 16, 16)

        def step():
            opt.zero_grad()
            net(x).mean().backward()
            opt.step()

        return Workload(step=step)

    registry.register(BenchCase(name="toy_gan", family="models", kind="model", setup=setup,
                                modes=("step",), shapes={"ref": [dict(size="ref")], "quick": [dict(size="quick")]}),
                      replace=True)
    try:
        out = tmp_path / "m"
        assert main(["profile", "toy_gan", "--steps", "3", "--output", str(out)]) == 0
        res = _check_outputs(out, "toy_gan", 3)
        assert res["target_kind"] == "model"
        assert any(r["name"] == "aten::convolution" or r["name"].startswith("aten::") for r in res["table"]["top"])
    finally:
        registry.unregister("toy_gan")


def test_profile_errors(tmp_path, capsys):
    assert main(["profile", "no_such_model", "--output", str(tmp_path)]) == 2
    assert "unknown profile target 'no_such_model'" in capsys.readouterr().err
    assert main(["profile", "norm_act", "--steps", "0", "--output", str(tmp_path)]) == 2


def test_profile_attributes_gemms_inside_ganengine_ops_to_ganengine():
    """The profiler table counts aten ops called from inside a ganengine op as ganengine's."""
    from types import SimpleNamespace

    from ganengine.bench.profile import _group_of

    top = SimpleNamespace(name="ganengine_C::conv3x3_fwd", cpu_parent=None)
    step = SimpleNamespace(name="ProfilerStep#1", cpu_parent=None)
    inner = SimpleNamespace(name="aten::mm", cpu_parent=SimpleNamespace(name="aten::matmul", cpu_parent=top))
    outer = SimpleNamespace(name="aten::mm", cpu_parent=step)
    assert _group_of(inner, set(), {}) == "ganengine"
    assert _group_of(outer, set(), {}) == "pytorch"
    assert _group_of(top, set(), {}) == "ganengine"


def test_ganengine_functions_are_grouped_as_ganengine():
    """ganengine's own autograd.Functions (the eager twins, named ganengine::<op>, and _TritonFn,
    _AdvFn, SpectralNormFn, ...) are ganengine's work in a profile, forward and backward."""
    import ganengine.ops.losses  # noqa: F401
    from ganengine.bench.profile import classify, ganengine_function_names

    names = ganengine_function_names()
    assert {"_AdvFn", "_AdvFnBackward"} <= names
    assert classify("_AdvFnBackward", names) == "ganengine"
    assert classify("ganengine::instance_norm_act_fwdBackward", set()) == "ganengine"
    assert classify("ConvolutionBackward0", names) == "pytorch"


def _run_cli(argv, env_drop=()):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "ganengine", *argv], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_profile_backend_that_cannot_serve_the_device_is_a_usage_error(tmp_path, backend):
    """--backend triton (no interpreter) / cuda on CPU tensors: one line naming --backend, exit 2,
    before anything runs (it was a BackendFallbackError traceback from the first step, exit 1)."""
    p = _run_cli(["profile", "norm_act", "--quick", "--steps", "1", "--device", "cpu", "--backend", backend,
                  "--output", str(tmp_path / "p")], env_drop=("TRITON_INTERPRET",))
    err = "\n".join(line for line in p.stderr.splitlines() if line.startswith("ganengine"))
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert f"--backend {backend} cannot run on cpu" in err and "expected one of auto | torch" in err
    assert not (tmp_path / "p" / "trace.json").exists()


def test_profile_backend_checked_in_process(tmp_path, capsys, monkeypatch):
    from ganengine import backends

    monkeypatch.setattr(backends, "serves", lambda name, device: name != "triton")
    monkeypatch.setattr(gprof, "run_profile", lambda *a, **k: pytest.fail("ran before checking --backend"))
    assert main(["profile", "norm_act", "--quick", "--steps", "1", "--backend", "triton",
                 "--output", str(tmp_path)]) == 2
    assert "--backend triton cannot run on" in capsys.readouterr().err
    assert main(["profile", "norm_act", "--backend", "bogus", "--output", str(tmp_path)]) == 2
    assert "--backend must be one of auto | torch | triton | cpu | cuda, got 'bogus'" in capsys.readouterr().err


def test_profile_backend_fallback_is_a_usage_error(tmp_path, capsys, monkeypatch):
    """A backend that serves the device but not this workload (strict): one line, exit 2."""
    from ganengine.ops._dispatch import BackendFallbackError

    def boom(*a, **k):
        raise BackendFallbackError("ganengine.x: backend 'cpu' cannot serve this call (no kernel); using 'torch'")

    monkeypatch.setattr(gprof, "run_profile", boom)
    assert main(["profile", "norm_act", "--quick", "--backend", "torch", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ganengine profile: error: --backend torch cannot run norm_act:") and err.count("\n") == 1


# ----------------------------------------------------------------------------- regressions (session 14)
@pytest.mark.parametrize("target", ["rmsprop_step", "optim"])
def test_profile_forward_only_op_case(tmp_path, target):
    """`ganengine profile rmsprop_step` (an optimiser step: modes=("forward",)) crashed in
    autograd.grad with no inputs: op cases are profiled in the case's own modes. The step inside
    ganengine's FusedRMSprop is ganengine's work."""
    if "rmsprop_step" not in registry.all_cases():
        pytest.skip("optim is not in this build")
    out = tmp_path / "p"
    assert main(["profile", target, "--quick", "--steps", "1", "--warmup", "1", "--output", str(out)]) == 0
    res = _check_outputs(out, target, 1)
    assert res["case"] == "rmsprop_step" and res["mode"] == "forward"
    rows = {r["name"]: r for r in res["table"]["top"]}
    steps = [r for n, r in rows.items() if n.startswith("Optimizer.step#FusedRMSprop")]
    assert steps and all(r["group"] == "ganengine" for r in steps)
    assert "(op, forward)" in (out / "profile.md").read_text()


def test_profile_backward_of_ops_inside_a_ganengine_op_is_ganengine():
    """attention's 1x1 convs run inside ganengine_C::self_attention2d: their forward was tagged
    ganengine but their backward (ConvolutionBackward0, convolution_backward, CatBackward0) pytorch,
    so it showed as left to fuse. The autograd node's sequence number links it to the forward op
    that created it; a plain convolution's backward outside any ganengine op stays pytorch."""
    from torch.profiler import profile

    if "self_attention2d" not in registry.all_cases():
        pytest.skip("attention is not in this build")
    fn = gprof.op_workload("self_attention2d", torch.device("cpu"), torch.float32, "quick")
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 1, 1, requires_grad=True)

    def plain():
        torch.autograd.grad(torch.nn.functional.conv2d(x, w).sum(), [x, w])

    fn(), plain()
    with profile() as prof:
        fn()
        plain()
    names = gprof.ganengine_kernel_names() | gprof.ganengine_function_names()
    table = gprof.top_table(prof, names, use_device=False, top=10_000)
    groups = {}
    for r in table["top"]:
        groups.setdefault(r["name"], set()).add(r["group"])
    conv_bwd = "autograd::engine::evaluate_function: ConvolutionBackward0"
    assert groups[conv_bwd] == {"ganengine", "pytorch"}  # attention's (ganengine), the plain one (pytorch)
    assert groups["aten::convolution_backward"] == {"ganengine", "pytorch"}
    assert groups["autograd::engine::evaluate_function: CatBackward0"] == {"ganengine"}
    by_group = {(r["name"], r["group"]): r["calls"] for r in table["top"]}
    assert by_group[(conv_bwd, "pytorch")] == 1 and by_group[(conv_bwd, "ganengine")] >= 1
