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
