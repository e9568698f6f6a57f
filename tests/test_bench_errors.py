"""Option errors of the benchmarking tools: one line naming the option and what it expects (exit 2),
said before anything is measured; no tracebacks, no silently replaced values."""
import importlib
import json

import pytest
import torch

from ganengine.bench import runner
from ganengine.cli import main


# ----------------------------------------------------------------------------- ganengine bench --traffic
def test_bench_traffic_without_interpreter_fails_before_timing(tmp_path, capsys, monkeypatch):
    """--traffic without TRITON_INTERPRET=1 used to run every timing first, then fail and write nothing."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("timed before checking --traffic"))
    out = tmp_path / "b"
    assert main(["bench", "--quick", "--ops", "gan_loss", "--no-compile", "--threads", "1", "--no-chart",
                 "--traffic", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ganengine bench: error: --traffic") and "TRITON_INTERPRET=1" in err
    assert len(err.splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


def test_bench_traffic_failure_keeps_the_timings(tmp_path, capsys, monkeypatch):
    """A traffic measurement that still fails after the timings does not discard them."""
    from ganengine.bench import traffic_table

    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def boom(*a, **k):
        raise RuntimeError("counting failed")

    monkeypatch.setattr(traffic_table, "measure", boom)
    out = tmp_path / "b"
    rc = main(["bench", "--quick", "--ops", "gan_loss", "--modes", "forward", "--runners", "eager",
               "--threads", "1", "--repeats", "1", "--no-memory", "--no-chart", "--traffic", "--output", str(out)])
    assert rc == 1
    assert "ganengine bench: error: --traffic: counting failed" in capsys.readouterr().err
    data = json.loads((out / "bench.json").read_text())
    assert any(r["case"] == "gan_loss" for r in data["records"])


# ----------------------------------------------------------------------------- python -m ganengine.bench.host_cost
@pytest.mark.parametrize("argv, message", [
    (["--ops", "nosuch"], "--ops: unknown op 'nosuch'"),
    (["--ops", "gan_loss", "--calls", "0"], "--calls must be >= 1, got 0"),
    (["--ops", "gan_loss", "--rounds", "0"], "--rounds must be >= 1, got 0"),
])
def test_host_cost_option_errors(argv, message, capsys, monkeypatch):
    from ganengine.bench import host_cost

    monkeypatch.setattr(host_cost, "measure", lambda *a, **k: pytest.fail("measured with a bad option"))
    with pytest.raises(SystemExit) as exc:
        host_cost.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ----------------------------------------------------------------------------- benchmarks/*.py
@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("script, argv, message", [
    ("bench_attention", ["--shapes", "1,8", "--repeats", "1"], "--shapes expects B,C,HW"),
    ("bench_attention", ["--shapes", "1,x,4"], "--shapes expects B,C,HW"),
    ("bench_attention", ["--shapes", "1,8,4", "--repeats", "0"], "--repeats must be >= 1"),
    ("bench_ema", ["--scale", "0", "--repeats", "1", "--threads", "1"], "--scale must be >= 1"),
    ("bench_ema", ["--repeats", "0"], "--repeats must be >= 1"),
    ("bench_losses", ["--repeats", "0", "--size", "16", "--no-compile", "--threads", "1"], "--repeats must be >= 1"),
    ("bench_losses", ["--size", "0", "--no-compile"], "--size must be >= 1"),
    ("bench_norm_act", ["--quick", "--device", "cpu", "--repeats", "0", "--no-compile"], "--repeats must be >= 1"),
])
def test_benchmark_script_option_errors(script, argv, message, capsys, threads):
    mod = importlib.import_module(f"benchmarks.{script}")
    with pytest.raises(SystemExit) as exc:
        mod.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ----------------------------------------------------------------------------- regressions (session 14)
def test_bench_runners_all_filtered_by_no_compile_is_an_error(tmp_path, capsys, monkeypatch):
    """`--runners compile --no-compile` left no runner, and runner.run then ran every default
    runner, compile included; it is a usage error naming both options now."""
    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("measured with no runner left"))
    rc = main(["bench", "--ops", "gan_loss", "--quick", "--threads", "1", "--runners", "compile", "compile",
               "--no-compile", "--no-memory", "--no-chart", "--output", str(tmp_path / "b")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ganengine bench: error:") and "--runners" in err and "--no-compile" in err
    assert len(err.splitlines()) == 1
    rc = main(["bench", "--ops", "gan_loss", "--quick", "--runners", "nosuch", "--no-compile", "--no-chart",
               "--output", str(tmp_path / "b")])
    assert rc == 2 and "runner must be" in capsys.readouterr().err


@pytest.fixture
def bench_tables_no_measuring(monkeypatch):
    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("measured with a bad option"))
    from ganengine.tools import bench_tables

    return bench_tables


@pytest.mark.parametrize("argv, message", [
    (["--ops", "nosuch"], "--ops: unknown op 'nosuch'"),
    (["--models", "nosuch"], "--models: unknown model 'nosuch'"),
    (["--repeats", "-1"], "--repeats must be >= 1, got -1"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
])
def test_bench_tables_option_errors(argv, message, bench_tables_no_measuring, tmp_path, capsys):
    out = tmp_path / "x.md"
    rc = bench_tables_no_measuring.main(["--quick", "--no-compile", "--skip-traffic", "--skip-aot",
                                         "--output", str(out), *argv])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_bench_tables_output_errors(bench_tables_no_measuring, tmp_path, capsys):
    """--output an existing folder failed after the whole timing run (and wrote <folder>.png
    beside it); --output under a file raised FileExistsError. Both are said first now."""
    folder = tmp_path / "adir"
    folder.mkdir()
    (tmp_path / "afile").write_text("")
    for output, message in ((folder, "is a folder: expected a file name"),
                            (tmp_path / "afile" / "x.md", "is a file, not a folder")):
        rc = bench_tables_no_measuring.main(["--quick", "--no-compile", "--ops", "gan_loss", "--skip-traffic",
                                             "--skip-aot", "--output", str(output)])
        assert rc == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("python -m ganengine.tools.bench_tables: error: --output") and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]  # no adir.png beside


def test_host_cost_json_checked_before_measuring(tmp_path, capsys, monkeypatch):
    from ganengine.bench import host_cost

    monkeypatch.setattr(host_cost, "measure", lambda *a, **k: pytest.fail("measured with a bad --json"))
    (tmp_path / "afile").write_text("")
    for path, message in ((tmp_path, "is a folder"), (tmp_path / "afile" / "r.json", "is a file, not a folder")):
        with pytest.raises(SystemExit) as exc:
            host_cost.main(["--ops", "gan_loss", "--json", str(path)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--json" in err and message in err and "Traceback" not in err
