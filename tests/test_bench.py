"""`ganengine bench`: registry, timing/memory helpers, and the CLI writing JSON/Markdown/PNG."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from ganengine.bench import memory, registry, runner, timing
from ganengine.bench.registry import BenchCase, Workload
from ganengine.cli import main


def _toy_setup(p, device, dtype):
    x = torch.randn(p["n"], p["c"], device=device, dtype=dtype)
    b = torch.randn(p["c"], device=device, dtype=dtype)

    def reference(x, b):
        return F.leaky_relu(x + b, 0.2)

    def fused(x, b):  # same math, another formulation: what a backend would run
        z = x + b
        return torch.where(z > 0, z, z * 0.2)

    return Workload(args=(x, b), reference=reference, fused=fused, grad_args=(0, 1))


@pytest.fixture
def toy_cases():
    op = registry.register(BenchCase(
        name="toy_bias_act", family="toy", kind="op", setup=_toy_setup, description="toy",
        shapes={"ref": [dict(n=64, c=32)], "quick": [dict(n=16, c=8)]}), replace=True)
    steps = []

    def model_setup(p, device, dtype):
        net = torch.nn.Linear(8, 8)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        x = torch.randn(4, 8)

        def step():
            opt.zero_grad()
            loss = net(x).square().mean()
            loss.backward()
            opt.step()
            steps.append(1)
            return {"loss": loss.detach()}

        return Workload(step=step)

    model = registry.register(BenchCase(
        name="toy_model", family="models", kind="model", setup=model_setup, modes=("step",),
        compile_ok=False, shapes={"ref": [dict(size="ref")], "quick": [dict(size="quick")]}), replace=True)
    yield op, model, steps
    registry.unregister("toy_bias_act")
    registry.unregister("toy_model")


def test_summarize_exact():
    s = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median"], s["q1"], s["q3"], s["iqr"], s["min"], s["max"], s["repeats"]) == (3.0, 2.0, 4.0, 2.0, 1.0, 5.0, 5)
    with pytest.raises(ValueError):
        timing.summarize([])


def test_time_cpu_respects_repeats():
    calls = []
    s = timing.time_cpu(lambda: calls.append(1), warmup=2, repeats=7)
    assert s["repeats"] == 7 and len(calls) == 9 and s["min"] <= s["median"] <= s["max"]


@pytest.mark.skipif(not memory.hwm_resettable(), reason="needs Linux /proc/self/clear_refs")
def test_cpu_peak_memory_sees_a_64mib_buffer():
    def alloc():
        t = torch.ones(16 * 2**20)  # 64 MiB, touched
        return float(t[-1])

    peak = memory.cpu_peak_bytes(alloc)
    assert 60 * 2**20 <= peak <= 200 * 2**20
    assert memory.cpu_peak_bytes(lambda: None) < 8 * 2**20


def _alloc_builder(mib):
    def call():
        t = torch.ones(mib * 2**18)
        return float(t[-1])
    return call


def test_cpu_peak_memory_in_child_process():
    # large enough to rise above the child's import-time peak (the ru_maxrss baseline)
    peak = memory.cpu_peak_bytes_in_child(_alloc_builder, (768,), timeout_s=120)
    assert peak is not None and 512 * 2**20 <= peak <= 1024 * 2**20


def test_select_and_errors(toy_cases):
    assert [c.name for c in registry.select(["toy"], None)] == ["toy_bias_act"]
    assert [c.name for c in registry.select(None, ["toy_model"])] == ["toy_model"]
    assert all(c.kind == "op" for c in registry.select([], None))
    with pytest.raises(ValueError, match="unknown op 'nope'.*toy_bias_act"):
        registry.select(["nope"], None)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(toy_cases[0])
    with pytest.raises(ValueError, match="runner must be"):
        runner.check_runner("fast")
    with pytest.raises(ValueError, match="dtype must be"):
        runner.parse_dtype("float8")


def test_runner_records(toy_cases):
    op, model, steps = toy_cases
    res = runner.run([op, model], device="cpu", quick=True, runners=["eager", "ganengine:torch"],
                     repeats=5, warmup=1)
    recs = res["records"]
    assert len(recs) == 2 * 2 + 2  # op: 2 modes x 2 runners; model: 1 mode x 2 runners
    assert all(r["status"] == "ok" for r in recs), [r["reason"] for r in recs]
    for r in recs:
        assert r["time_ms"]["repeats"] == 5 and r["time_ms"]["median"] > 0
        assert r["speedup_vs_eager"] == pytest.approx(
            next(e for e in recs if e["runner"] == "eager" and e["case"] == r["case"]
                 and e["mode"] == r["mode"])["time_ms"]["median"] / r["time_ms"]["median"])
    fwd = [r for r in recs if r["mode"] == "forward" and r["runner"] == "ganengine:torch"][0]
    assert fwd["max_abs_err"] < 1e-6
    assert len(steps) >= 2 * (1 + 1 + 5)  # first call + warm-up + repeats, per runner
    assert res["settings"]["threads"] == torch.get_num_threads() or res["settings"]["threads"] >= 1


def test_backend_that_cannot_serve_is_skipped_not_timed(toy_cases):
    from ganengine import backends

    cases = registry.all_cases()
    if "instance_norm_act" not in cases or backends.serves("cuda", torch.device("cpu")):
        pytest.skip("needs the norm_act case")
    res = runner.run([cases["instance_norm_act"]], device="cpu", quick=True,
                     runners=["ganengine:cuda"], modes=["forward"], repeats=3, measure_memory=False)
    assert {r["status"] for r in res["records"]} == {"skipped"}
    assert "cannot serve" in res["records"][0]["reason"]


EXPECTED_RECORD_FIELDS = {"case", "family", "kind", "mode", "shape", "shape_label", "device", "dtype",
                          "runner", "status", "reason", "time_ms", "peak_mem_bytes", "max_abs_err",
                          "first_call_s", "speedup_vs_eager", "speedup_vs_compile"}


def test_cli_quick_writes_json_markdown_png(toy_cases, tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["bench", "--ops", "toy_bias_act", "--models", "toy_model", "--quick", "--device", "cpu",
               "--runners", "eager", "compile", "ganengine:torch", "--repeats", "5", "--output", str(out)])
    assert rc == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["format"] == "ganengine-bench" and report["version"] == 1
    m = report["machine"]
    for key in ("cpu_model", "cpu_logical_cores", "cpu_physical_cores", "python", "torch", "triton",
                "git", "backends", "platform", "load_average_1m"):
        assert key in m
    assert report["settings"]["size"] == "quick" and report["settings"]["runners"] == ["eager", "compile", "ganengine:torch"]
    assert "--quick" in report["command"]
    recs = report["records"]
    assert len(recs) == 2 * 3 + 3
    for r in recs:
        assert EXPECTED_RECORD_FIELDS <= set(r), EXPECTED_RECORD_FIELDS - set(r)
    ok = [r for r in recs if r["status"] == "ok"]
    assert {r["runner"] for r in ok} == {"eager", "compile", "ganengine:torch"}
    comp = [r for r in recs if r["runner"] == "compile" and r["kind"] == "model"]
    assert comp and comp[0]["status"] == "skipped"
    for r in ok:
        assert {"median", "q1", "q3", "iqr", "min", "max", "mean", "repeats"} <= set(r["time_ms"])
        assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] >= 0
    md = (out / "bench.md").read_text()
    assert "| case | shape | mode | eager ms | compile ms | ganengine:torch ms |" in md
    assert "toy_bias_act" in md and "forward_backward" in md and "Machine:" in md
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(out / "bench.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100
    assert "bench.json" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    assert main(["bench", "--ops", "no_such_op", "--output", str(tmp_path)]) == 2
    assert "unknown op 'no_such_op'" in capsys.readouterr().err
    assert main(["bench", "--list"]) == 0


def test_cli_without_matplotlib_says_so_first_and_writes_tables(toy_cases, tmp_path, capsys, monkeypatch):
    """No matplotlib: one line before the work starts, then the tables without the chart (issue 16)."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    out = tmp_path / "bench"
    rc = main(["bench", "--ops", "toy_bias_act", "--quick", "--device", "cpu", "--runners", "eager",
               "--repeats", "3", "--output", str(out)])
    assert rc == 0
    assert (out / "bench.json").exists() and (out / "bench.md").exists() and not (out / "bench.png").exists()
    err = capsys.readouterr().err
    assert "matplotlib is not installed" in err and "Traceback" not in err
    assert err.index("matplotlib is not installed") < err.index("toy_bias_act")


def test_cli_norm_act_quick(tmp_path):
    if "instance_norm_act" not in registry.all_cases():
        pytest.skip("norm_act is not in this build")
    out = tmp_path / "b"
    rc = main(["bench", "--ops", "norm_act", "--quick", "--no-compile", "--repeats", "3",
               "--output", str(out)])
    report = json.loads((out / "bench.json").read_text())
    recs = [r for r in report["records"] if r["case"] == "instance_norm_act"]
    assert rc == 0, [r["reason"] for r in recs if r["status"] == "error"]
    assert {r["mode"] for r in recs} == {"forward", "forward_backward"}
    assert all(r["max_abs_err"] < 1e-4 for r in recs if r["mode"] == "forward" and r["status"] == "ok")
    assert os.path.getsize(out / "bench.png") > 1000


def test_bench_tables_writes_generated_markdown(toy_cases, tmp_path):
    from ganengine.tools import bench_tables

    out = tmp_path / "docs" / "benchmarks_generated.md"
    assert bench_tables.main(["--output", str(out), "--ops", "toy_bias_act", "--quick", "--no-compile",
                              "--repeats", "3", "--skip-traffic", "--skip-aot"]) == 0
    text = out.read_text()
    assert text.startswith("<!-- generated by ganengine.tools.bench_tables")
    assert "## Timing (cpu, quick shapes)" in text and "toy_bias_act" in text and "Machine:" in text
    data = json.loads((tmp_path / "docs" / "benchmarks_generated.json").read_text())
    assert data["timing"]["records"] and data["machine"]["cpu_model"]
    assert (tmp_path / "docs" / "benchmarks_generated.png").read_bytes()[:4] == b"\x89PNG"


def test_benchmarks_md_generator_renders_every_section(tmp_path):
    """benchmarks/make_benchmarks_md.py: the page has every section with its command, the
    machine, cleaned tables (progress rows dropped, a blank line after each table) and failures
    said plainly."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "make_benchmarks_md.py"
    spec = importlib.util.spec_from_file_location("make_benchmarks_md", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = "# header line\n  row 1 | progress\n| a | b |\n| --- | --- |\n| 1 | 2 |\nunits: ms\n"
    assert mod.clean_output(out) == "header line\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\nunits: ms"
    keys = [s[0] for s in mod.SECTIONS]
    assert {"models", "conv", "conv4x4", "conv3x3", "norm_act", "attention", "losses", "conv_act"} <= set(keys)
    results = {k: dict(command=f"python bench_{k}.py", returncode=0, stdout=out, stderr_tail="", seconds=1.0,
                       load_before=0.1, load_after=0.2) for k in keys[1:]}
    results["conv"] = dict(results["conv"], returncode=2, stderr_tail="Traceback: boom")
    info = dict(cpu="Test CPU", cores=2, memory_gib=24.0, gpu=None, torch="2.x", threads=2, capability="AVX2",
                python="3.11", git="abc123", date="today")
    page = mod.build_markdown(results, info)
    assert "Test CPU, 2 cores, 24.0 GiB, no GPU" in page and "git abc123" in page
    for key, title, _cmd, _text in mod.SECTIONS:
        assert f"## {title}" in page
    assert "Not measured in this run." in page  # models: no result
    assert "python bench_conv3x3.py" in page and "progress" not in page
    assert "**The command failed (exit 2)**" in page and "boom" in page
    # a rerun keeps the hand-written sections after the generated ones, as they are
    notes = "## A session's notes\n\n```\npython bench_x.py\n```\n\n| a |\n| --- |\n| 1 |\n\n## Another\n\ntext\n"
    assert mod.hand_written(page) == ""
    again = mod.build_markdown(results, info, mod.hand_written(page + "\n" + notes))
    assert again.endswith(notes) and again.count("## A session's notes") == 1
    assert mod.hand_written(again) == notes
    # (one between generated sections is kept too, and a generated one is never kept twice)
    title = mod.SECTIONS[1][1]
    mixed = page.replace(f"## {title}", notes + f"\n## {title}")
    assert mod.hand_written(mixed) == notes
    assert mod.build_markdown(results, info, mod.hand_written(mixed)).count(f"## {title}") == 1


# ----------------------------------------------------------------------------- regressions (session 14)
def test_cli_repeated_runner_is_measured_once(toy_cases, tmp_path, capsys):
    """`--runners eager eager ...` crashed after all measuring (add_speedups on a record the
    interleaved timing never filled in) and wrote nothing; a name given twice is measured once."""
    out = tmp_path / "b"
    rc = main(["bench", "--ops", "toy_bias_act", "--quick", "--threads", "1", "--repeats", "1", "--no-memory",
               "--no-chart", "--runners", "eager", "eager", "ganengine:torch", "eager", "--output", str(out)])
    assert rc == 0
    data = json.loads((out / "bench.json").read_text())
    assert data["settings"]["runners"] == ["eager", "ganengine:torch"]
    for mode in ("forward", "forward_backward"):
        recs = [r for r in data["records"] if r["mode"] == mode]
        assert [r["runner"] for r in recs] == ["eager", "ganengine:torch"]
        assert all(r["status"] == "ok" and r["time_ms"]["median"] > 0 for r in recs)
        assert recs[1]["speedup_vs_eager"] > 0
    op, _, _ = toy_cases
    res = runner.run([op], device="cpu", quick=True, runners=["eager", "eager"], repeats=1, measure_memory=False)
    assert [r["runner"] for r in res["records"]] == ["eager", "eager"]  # one per mode
    with pytest.raises(ValueError, match="no runner"):
        runner.run([op], device="cpu", quick=True, runners=[], repeats=1)


def test_model_eager_baseline_runs_on_the_torch_backend(toy_cases):
    """The models' eager baseline (the plain model, fused=False) ran on the auto backend, so the
    layers and losses it shares with the fused model ran ganengine's C++ kernels inside it; it runs
    on the torch backend now (and so does its peak-memory measurement)."""
    from ganengine import backends

    seen = {"reference": set(), "fused": set()}

    def setup(p, device, dtype):
        def step(which):
            def call():
                seen[which].add(backends.current())
                return {}
            return call
        return Workload(step=step("fused"), reference_step=step("reference"))

    case = registry.register(BenchCase(
        name="toy_model_with_reference", family="models", kind="model", setup=setup, modes=("step",),
        compile_ok=False, shapes={"ref": [dict(size="ref")], "quick": [dict(size="quick")]}), replace=True)
    try:
        res = runner.run([case], device="cpu", quick=True, runners=["eager", "ganengine:torch"], repeats=1,
                         measure_memory=False)
        assert all(r["status"] == "ok" for r in res["records"]), res["records"]
        assert seen["reference"] == {"torch"} and seen["fused"] == {"torch"}
        work = setup({}, None, None)
        with runner._scope_for(case, work, "eager")():
            assert backends.current() == "torch"
        scoped = runner.child_call(case.name, dict(size="quick"), "step", "eager", "cpu", "float32")
        seen["reference"].clear()
        scoped()
        assert seen["reference"] == {"torch"}
    finally:
        registry.unregister("toy_model_with_reference")


def test_model_eager_baseline_runs_no_ganengine_kernel():
    """The real models: the eager step under the runner's scope runs none of ganengine's C++ ops
    (pix2pix's conv_act / batch_norm_act / gan_loss and wgan's loss ran them on auto)."""
    from torch.profiler import profile

    cases = registry.all_cases()
    if "wgan" not in cases:
        pytest.skip("wgan is not in this build")
    case = cases["wgan"]
    work = case.setup(case.shape_list("quick")[0], torch.device("cpu"), torch.float32)
    assert work.reference_step is not None
    with runner._scope_for(case, work, "eager")():
        work.reference_step()
        with profile() as prof:
            work.reference_step()
    assert not [e.name for e in prof.events() if e.name.startswith("ganengine_C::")]


def test_cli_models_quick_still_runs(tmp_path):
    if "wgan" not in registry.all_cases():
        pytest.skip("wgan is not in this build")
    out = tmp_path / "m"
    assert main(["bench", "--models", "wgan", "--quick", "--threads", "1", "--repeats", "1", "--no-memory",
                 "--no-chart", "--runners", "eager", "ganengine:cpu", "--output", str(out)]) == 0
    recs = json.loads((out / "bench.json").read_text())["records"]
    assert [(r["runner"], r["status"]) for r in recs] == [("eager", "ok"), ("ganengine:cpu", "ok")]


def test_benchmarks_md_norm_act_json_goes_beside_the_store(tmp_path, monkeypatch):
    """The norm_act section wrote docs/bench_norm_act.json in the checkout even when --store and
    --output pointed elsewhere; it goes beside the store now (docs/ by default, as quoted)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "make_benchmarks_md.py"
    spec = importlib.util.spec_from_file_location("make_benchmarks_md", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ran = []

    def fake_run(key, cmd):
        ran.append(cmd)
        return dict(key=key, command=" ".join(["python"] + cmd[1:]), returncode=0, stdout="| a |\n", stderr_tail="",
                    seconds=0.0, load_before=0.0, load_after=0.0)

    monkeypatch.setattr(mod, "run_section", fake_run)
    monkeypatch.setattr(mod, "machine", lambda: dict(cpu="c", cores=2, memory_gib=1.0, gpu=None, torch="t",
                                                       threads=1, capability="x", python="3", git="g", date="d"))
    store = tmp_path / "out" / "sections.json"
    assert mod.main(["--only", "norm_act", "--store", str(store), "--output", str(tmp_path / "B.md")]) == 0
    (cmd,) = ran
    assert cmd[cmd.index("--json") + 1] == str(tmp_path / "out" / "bench_norm_act.json")
    default = mod.section_command(cmd, mod.ROOT / "docs" / "benchmarks_sections.json")
    assert default[default.index("--json") + 1] == "docs/bench_norm_act.json"


def test_default_runner_times_the_route_a_users_call_takes():
    """`ganengine bench` timed ganengine under the strict cpu backend only, so calls that backend
    "auto" leaves on eager's own ops (eval batch norm without an activation, forward-only
    attention, the attention map) were timed on a route no user's call takes. The default runner
    is ganengine:auto now, in a non-strict scope; the native backends stay available by name."""
    assert runner.default_runners(torch.device("cpu")) == ["eager", "compile", "ganengine:auto"]
    assert runner.default_runners(torch.device("cpu"), with_compile=False) == ["eager", "ganengine:auto"]
    assert runner.check_runner("ganengine:cpu") == "ganengine:cpu"
    from ganengine import backends

    seen = {}
    for name in ("auto", "cpu"):
        with runner.backend_scope(name):
            seen[name] = (backends.current(), backends.is_strict(), os.environ["GANENGINE_STRICT"])
    assert seen == {"auto": ("auto", False, "0"), "cpu": ("cpu", True, "1")}

    from ganengine.nn import batch_norm_act as bn_mod

    # the eval batch norm case: under ganengine:auto the fused module's call is F.batch_norm itself
    case = registry.all_cases()["batch_norm2d_eval"]
    work = case.setup(case.shape_list("quick")[0], torch.device("cpu"), torch.float32)
    call = runner.make_call(case, work, "forward", "ganengine:auto")
    with runner._scope_for(case, work, "ganengine:auto")(), \
            pytest.MonkeyPatch.context() as mp:
        mp.setattr(bn_mod, "batch_norm_act", lambda *a, **k: pytest.fail("the fused op ran under auto"))
        call()
