"""Backend registry, selection and fallback rules."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import ganengine
import ganengine.functional as GF
from ganengine import backends
from ganengine.ops import _dispatch


def test_available_and_status_cover_every_backend():
    avail, status = backends.available(), backends.status()
    assert set(avail) == set(status) == {"torch", "triton", "cpu", "cuda"}
    assert avail["torch"] is True
    for name in avail:
        assert isinstance(status[name], str) and status[name]
        assert status[name].startswith("available") == avail[name]


@pytest.mark.skipif(not os.environ.get("CI"), reason="CI must build every backend it can test")
def test_ci_has_the_cpu_extension_and_the_triton_interpreter():
    avail = backends.available()
    assert avail["cpu"], backends.status()["cpu"]
    assert avail["triton"], backends.status()["triton"]
    assert ganengine._ext.build_info().get("with_cuda"), "CI builds the CUDA kernels with nvcc"


def test_use_backend_is_a_setter_and_a_context_manager():
    before = backends.current()
    with ganengine.use_backend("torch"):
        assert backends.current() == "torch"
        with ganengine.use_backend("auto"):
            assert backends.current() == "auto"
        assert backends.current() == "torch"
    assert backends.current() == before
    token = ganengine.use_backend("torch")
    try:
        assert backends.current() == "torch"
    finally:
        token.__exit__(None, None, None)
    assert backends.current() == before


def test_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("GANENGINE_BACKEND", "torch")
    assert backends.current() == "torch"
    GF.instance_norm_act(torch.randn(1, 2, 3, 3))
    assert _dispatch.last_used["instance_norm_act"] == "torch"
    monkeypatch.setenv("GANENGINE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="GANENGINE_BACKEND"):
        backends.current()


def test_environment_variable_in_a_fresh_process():
    code = ("import torch, ganengine.functional as GF; from ganengine.ops import _dispatch;"
            "GF.instance_norm_act(torch.randn(1,2,3,3)); print(_dispatch.last_used['instance_norm_act'])")
    env = dict(os.environ, GANENGINE_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"


def test_auto_picks_the_cpu_extension_for_cpu_tensors():
    with ganengine.use_backend("auto"):
        GF.instance_norm_act(torch.randn(1, 2, 3, 3))
    expected = "cpu" if backends.available()["cpu"] else "torch"
    assert _dispatch.last_used["instance_norm_act"] == expected


def test_fallback_is_correct_loud_in_debug_and_an_error_in_strict(monkeypatch):
    x = torch.randn(1, 2, 3, 3)
    with ganengine.use_backend("torch"):
        want = GF.instance_norm_act(x)
    with ganengine.use_backend("cuda"):  # cannot serve CPU tensors
        got = GF.instance_norm_act(x)
        assert _dispatch.last_used["instance_norm_act"] == "torch"
        torch.testing.assert_close(got, want)
        monkeypatch.setenv("GANENGINE_DEBUG", "1")
        with pytest.warns(RuntimeWarning, match="cannot serve"):
            GF.instance_norm_act(x)
        with backends.strict(), pytest.raises(_dispatch.BackendFallbackError, match="cuda"):
            GF.instance_norm_act(x)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="must be one of"):
        ganengine.use_backend("metal")


def test_info_command_prints_every_backend(capsys):
    from ganengine.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "triton", "cpu", "cuda"):
        assert name in out


def test_import_without_extension_keeps_torch_backend():
    code = ("import sys; sys.modules['ganengine._C'] = None\n"
            "import torch, ganengine, ganengine.functional as GF\n"
            "from ganengine import backends\n"
            "assert not backends.available()['cpu'], backends.status()\n"
            "assert 'not importable' in backends.status()['cpu']\n"
            "GF.instance_norm_act(torch.randn(1, 2, 3, 3)); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_backend_choice_is_seen_by_other_threads():
    # CUDA backward passes run on autograd worker threads: they must see the requested backend
    import threading

    seen = {}
    with ganengine.use_backend("torch"), backends.strict():
        t = threading.Thread(target=lambda: seen.update(name=backends.current(), strict=backends.is_strict()))
        t.start()
        t.join()
    assert seen == {"name": "torch", "strict": True}


def test_auto_order_per_op_on_cuda(monkeypatch):
    """On CUDA tensors 'auto' takes the device order (Triton first) except where a GPU measurement
    put an op's CUDA C++ kernel first (the losses, instance norm on NCHW planes, batch norm on small
    NCHW maps); a backend that
    cannot serve is skipped."""
    from ganengine.ops import _dispatch

    monkeypatch.setattr(backends, "serves", lambda name, device: True)

    class OnCuda:
        device = torch.device("cuda")

    both = {"triton": None, "cuda": None}
    assert _dispatch.choose("gan_loss", OnCuda(), both) == "cuda"
    assert _dispatch.choose("cycle_loss", OnCuda(), both) == "cuda"
    assert _dispatch.choose("instance_norm_act", OnCuda(), both) == "cuda"
    assert _dispatch.choose("instance_norm_act", OnCuda(), both, "channels_last") == "triton"
    assert _dispatch.choose("instance_norm_act", OnCuda(), both, "channels_last_small") == "cuda"
    assert _dispatch.choose("batch_norm_act", OnCuda(), both) == "triton"
    assert _dispatch.choose("batch_norm_act", OnCuda(), both, "channels_last") == "triton"  # no variant rule
    assert _dispatch.choose("batch_norm_act", OnCuda(), both, "small") == "cuda"  # small NCHW maps
    assert _dispatch.choose("conditional_batch_norm_act", OnCuda(), both, "small") == "cuda"
    assert _dispatch.choose("conditional_batch_norm_act", OnCuda(), both) == "triton"
    assert _dispatch.choose("batch_norm_act", OnCuda(), {"triton": None, "cuda": "no kernel"}, "small") == "triton"
    assert _dispatch.choose("instance_norm_act", OnCuda(), {"triton": None, "cuda": "no kernel"}) == "triton"
    assert _dispatch.choose("gan_loss", OnCuda(), {"triton": None, "cuda": "no kernel"}) == "triton"
    assert _dispatch.choose("gan_loss", OnCuda(), {"triton": "too many terms", "cuda": "no kernel"}) == "torch"


def test_missing_extension_file_is_named_not_a_circular_import(tmp_path):
    # a copy of the package without _C*.so (GANENGINE_SKIP_EXT=1, a failed build): Python's own
    # message blamed "a circular import"
    import shutil

    pkg = os.path.dirname(ganengine.__file__)
    shutil.copytree(pkg, tmp_path / "ganengine", ignore=shutil.ignore_patterns("_C*.so", "__pycache__", "sample"))
    import site

    # (-S: without site's .pth files, the editable install's finder, which maps ganengine._C to the
    # checkout's build; site-packages appended by hand for torch)
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); sys.path += {site.getsitepackages()!r}\n"
            "import ganengine\n"
            "assert ganengine.__file__.startswith(sys.path[0]), ganengine.__file__\n"
            "print(ganengine.backends.status()['cpu'])")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "no extension file ganengine/_C" in out.stdout and "circular" not in out.stdout, out.stdout


def test_overlapping_scopes_in_two_threads_leave_the_setting_right():
    """Thread A enters torch, B enters cpu, A exits, B exits: the setting is back to what it was
    (each scope removes its own entry; "restore the value before me" left 'torch' for good)."""
    import threading

    before = backends.current()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a():
        with ganengine.use_backend("torch"):
            a_in.set()
            b_in.wait()
        a_out.set()

    def b():
        a_in.wait()
        with ganengine.use_backend("cpu"):
            b_in.set()
            a_out.wait()
            assert backends.current() == "cpu"

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert backends.current() == before
    with ganengine.use_backend("torch"):  # nesting as before; a setter inside a scope outlives it
        with ganengine.use_backend("cpu"):
            assert backends.current() == "cpu"
        assert backends.current() == "torch"
    assert backends.current() == before


def test_auto_falling_back_to_torch_is_said_in_debug(monkeypatch):
    """auto on CPU tensors the cpu extension does not serve (fp64 GEMM convolution): torch, with
    a warning in debug mode ("a fallback is never silent in debug mode"), never an error."""
    if not backends.available()["cpu"]:
        pytest.skip("needs the cpu extension")
    x, w = torch.randn(1, 4, 6, 6, dtype=torch.float64), torch.randn(4, 4, 4, 4, dtype=torch.float64)
    monkeypatch.setenv("GANENGINE_DEBUG", "1")
    with ganengine.use_backend("auto"), backends.strict():
        with pytest.warns(RuntimeWarning, match=r"ganengine.conv: auto falls back to 'torch' \(cpu: "):
            GF.conv2d(x, w, None, 2, 1)
    assert _dispatch.last_used["conv"] == "torch"


def test_interpreter_set_after_triton_was_imported_is_not_claimed():
    """triton.jit decides at import: TRITON_INTERPRET=1 set after Triton was imported leaves GPU
    functions (tl.sum ...), which fail on CPU tensors. available() says so and the op falls back
    (it crashed inside the interpreter)."""
    code = ("import os, torch, triton, ganengine, ganengine.functional as GF\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "from ganengine import backends\n"
            "assert not backends.available()['triton'], backends.status()['triton']\n"
            "assert 'set after triton was imported' in backends.status()['triton']\n"
            "with ganengine.use_backend('triton'):\n"
            "    GF.instance_norm_act(torch.randn(2, 3, 4, 4))\n"
            "from ganengine.ops import _dispatch; print(_dispatch.last_used['instance_norm_act'])")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch"


def test_import_warns_once_per_bad_setting():
    code = "import warnings; warnings.simplefilter('always'); import ganengine"
    env = dict(os.environ, GANENGINE_BAKEND="cpu", GANENGINE_BACKEND="bogus")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("RuntimeWarning") == 2, out.stderr
    assert "GANENGINE_BAKEND is set but is not a ganengine setting" in out.stderr
    assert "GANENGINE_BACKEND='bogus' is not valid" in out.stderr
