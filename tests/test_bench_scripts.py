"""Smoke test of every benchmarks/bench_*.py script this branch owns: its main() runs at its
smallest setting (tiny shapes, one or two repeats, no torch.compile) in a second or two, through
the shared timing core, and prints its table. Figures are not checked (they are noise here);
that the command lines BENCHMARKS.md and docs/ quote still parse and run is."""
import importlib
import re

import pytest
import torch


@pytest.fixture
def script(monkeypatch):
    threads = torch.get_num_threads()  # the scripts' --threads 1 (less contention in CI) is undone after

    def load(name, **attrs):
        mod = importlib.import_module(f"benchmarks.{name}")
        for key, value in attrs.items():
            monkeypatch.setattr(mod, key, value)
        return mod

    yield load
    torch.set_num_threads(threads)


def _table_rows(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]


def test_bench_norm_act(script, capsys):
    mod = script("bench_norm_act", QUICK_SHAPES=[(1, 4, 5, 3)])
    torch.set_num_threads(1)  # the script has no --threads (the fixture restores it)
    assert mod.main(["--quick", "--device", "cpu", "--repeats", "2", "--no-compile", "--kernels"]) == 0
    out = capsys.readouterr().out
    assert "| 1x4x5x3 | float32 | forward+backward |" in out and "load average" in out
    assert re.search(r"\| eager \| \d+ \| \d+ \| \d+ \| (aten|interpreter) \|", out)  # --kernels: the kernel table


def test_bench_batch_norm_act(script, capsys):
    mod = script("bench_batch_norm_act", QUICK_SHAPES=[(4, 3, 2, 3)])
    assert mod.main(["--quick", "--device", "cpu", "--repeats", "2", "--no-compile", "--no-host", "--threads", "1"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert len(rows) == 1 + 2 * 2  # header + 2 ops x 2 passes


def test_bench_conv(script, capsys):
    mod = script("bench_conv", SHAPES=[(False, 1, 4, 8, 4), (True, 1, 8, 4, 2)])
    mod.main(["--repeats", "2", "--threads", "1"])
    rows = _table_rows(capsys.readouterr().out)
    assert len(rows) == 1 + 2 * 2 and rows[1].startswith("| conv | 1 | 4 -> 8 | 4 | fwd |")


def test_bench_conv3x3(script, capsys, monkeypatch):
    from ganengine.ops import conv3x3 as cm

    monkeypatch.setenv("GANENGINE_WINOGRAD_TILE", "2")
    monkeypatch.setattr(cm, "MIN_CHANNELS", cm.MIN_CHANNELS)  # --all lowers them: restored after
    monkeypatch.setattr(cm, "MIN_TILES", cm.MIN_TILES)
    mod = script("bench_conv3x3", SHAPES=[(1, 4, 5, 6, 6, "reflect")])
    mod.main(["--all", "--no-compile", "--repeats", "2", "--threads", "1"])
    rows = _table_rows(capsys.readouterr().out)
    assert len(rows) == 1 + 2 and "| 1,4,5,6,6,reflect | yes | forward |" in rows[1]


def test_bench_conv4x4(script, capsys):
    mod = script("bench_conv4x4", SHAPES=[("patchgan", False, 1, 3, 4, 8, 2, 1), ("unet", True, 1, 4, 3, 4, 2, 1)])
    mod.main(["--repeats", "1", "--only", "patchgan", "--threads", "1"])
    rows = _table_rows(capsys.readouterr().out)
    assert len(rows) == 1 + 2 and rows[1].startswith("| patchgan | conv | 1 | 3 -> 4 | 8 | 2 | fwd |")


def test_bench_conv_act(script, capsys):
    mod = script("bench_conv_act")
    mod.main(["--batch", "1", "--norm", "instance", "--repeats", "1", "--no-compile", "--size", "32", "--threads", "1"])
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert len(rows) == 2 and rows[-1].startswith("| instance | 1 |")


def test_bench_ema(script, capsys, tmp_path):
    mod = script("bench_ema")
    mod.main(["--scale", "8", "--repeats", "2", "--threads", "1", "--ops", "--json", str(tmp_path / "ema.json")])
    rows = _table_rows(capsys.readouterr().out)
    assert len(rows) == 1 + 3 and rows[3].startswith("| ganengine EMA |")
    import json

    data = json.loads((tmp_path / "ema.json").read_text())
    assert data["tensors"] == 166 and data["aten_ops"]["ganengine EMA"] < data["aten_ops"]["loop (BigGAN utils.ema)"]


def test_bench_losses(script, capsys):
    mod = script("bench_losses")
    mod.main(["--repeats", "2", "--size", "16", "--no-compile", "--kernels", "--threads", "1"])
    rows = _table_rows(capsys.readouterr().out)
    assert [r.split(" | ")[0] for r in rows[1:3]] == ["| eager PyTorch", "| ganengine (cpu)"]


def test_bench_spectral_norm(script, capsys):
    mod = script("bench_spectral_norm")
    mod.main(["--model", "sagan", "--backend", "cpu", "--scale", "16", "--repeats", "2", "--no-compile", "--threads", "1"])
    rows = _table_rows(capsys.readouterr().out)
    assert len(rows) == 1 + 3 and rows[3].startswith("| ganengine grouped (cpu) |")


def test_bench_attention(script, capsys, tmp_path):
    mod = script("bench_attention")
    torch.set_num_threads(1)  # the script has no --threads (the fixture restores it)
    mod.main(["--shapes", "1,8,4", "--impls", "reference", "ganengine", "sdpa_math", "--repeats", "2",
              "--json", str(tmp_path / "att.json")])
    rows = _table_rows(capsys.readouterr().out)
    assert len(rows) == 1 + 2 * 3
    assert rows[2].startswith("| 1 | 8 | 4x4 | fwd | ganengine (") and rows[1].endswith("| 1.00x |")


def test_bench_fuse_calls(script, capsys):
    mod = script("bench_fuse_calls")
    mod.main(["--repeats", "1", "--calls", "2"])
    assert len(_table_rows(capsys.readouterr().out)) == 1 + 6 + 8


def test_bench_models_interleaved_cpu_clock(script, capsys):
    """The command docs/synthesis.md and BENCHMARKS.md quote for the synthesis steps' ratios."""
    import time
    mod = script("bench_models", CLOCK=[time.perf_counter])   # (main sets the clock: undone after)
    mod.main(["--models", "wgan", "cgan", "--interleave", "--clock", "cpu", "--threads", "1", "--repeats", "1",
              "--warmup", "0", "--batch", "2"])
    rows = _table_rows(capsys.readouterr().out)
    assert len(rows) == 1 + 2 and rows[1].startswith("| wgan |") and rows[2].endswith("x |")


@pytest.mark.parametrize("name", ["cyclegan", "stackgan1"])
def test_bench_models_reference_step_is_the_plain_model(script, name):
    """The "torch" (reference) and "compile" steps are the model built with fused=False (the
    reference's own layers and plain losses): they were the fused networks on the torch backend."""
    mod = script("bench_models")
    for variant in ("torch", "compile", "torch+fused-adam"):
        opts, size, _ = mod.CPU_DEFAULT[name]
        model = mod.build(name, {**opts, **mod.VARIANTS[variant][1]}, 64)
        assert model.options["fused"] is False, variant
    assert mod.build(name, {**opts, **mod.VARIANTS["ganengine"][1]}, 64).options["fused"] is True


def test_bench_cuda_path_host(script, capsys):
    mod = script("bench_cuda_path_host")
    assert mod.main(["--ops", "instance_norm_act", "--rounds", "1", "--calls", "2"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["instance_norm_act", "instance_norm_act"]
    from ganengine import backends

    if backends.triton_interpret():  # the model steps: the routing through every fused layer runs
        assert mod.main(["--models", "pix2pix", "--rounds", "1"]) == 0
        assert "| pix2pix | 1x128x128 |" in capsys.readouterr().out


# ----------------------------------------------------------------------------- regressions (session 14)
def test_bench_losses_without_compile_prints_a_dash(script, capsys):
    """--no-compile printed "nanx" in the "vs torch.compile" column (bench_conv_act prints "-")."""
    mod = script("bench_losses")
    mod.main(["--repeats", "1", "--size", "8", "--no-compile", "--threads", "1"])
    out = capsys.readouterr().out
    rows = _table_rows(out)[1:]
    assert rows and "nan" not in out
    assert all(r.rstrip().endswith("| - |") for r in rows)


def test_bench_cuda_path_host_model_baseline_is_plain_pytorch(script, monkeypatch):
    """measure_models' "eager" (fused=False) ran on the auto backend, so the layers and losses it
    shares with the fused model ran ganengine's C++ ops; it runs on the torch backend now."""
    from torch.profiler import profile

    from ganengine import backends
    from ganengine.bench import registry, timing

    if "wgan" not in registry.all_cases():
        pytest.skip("wgan is not in this build")
    mod = script("bench_cuda_path_host")
    seen = {}

    def fake_interleave(calls, repeats, scopes=None, **kw):
        with scopes["eager"]():
            seen["backend"] = backends.current()
            calls["eager"]()
            with profile() as prof:
                calls["eager"]()
        seen["ops"] = [e.name for e in prof.events() if e.name.startswith("ganengine_C::")]
        return {name: timing.summarize([1.0]) for name in calls}

    monkeypatch.setattr(mod.timing, "interleave", fake_interleave)
    (rec,) = mod.measure_models(["wgan"], 1)
    assert seen["backend"] == "torch" and seen["ops"] == []
