"""ganengine.settings: every GANENGINE_* variable read and validated in one place; a bad value is
one line naming the variable and its allowed values, never a traceback (issue 22: one bad
WINOGRAD_MIN_CHANNELS broke every command, --help included, without naming the variable)."""
import glob
import os
import re
import subprocess
import sys

import pytest

from ganengine import settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# compile-time macros setup.py passes to the C++ build (not environment variables)
_MACROS = {"GANENGINE_CPU_FLAGS", "GANENGINE_WITH_CUDA", "GANENGINE_CUDA_REASON"}

BAD = {"int": "abc", "bool": "maybe", "choice": "nonsense"}


def test_every_variable_in_the_source_is_a_setting():
    files = glob.glob(os.path.join(ROOT, "ganengine", "**", "*.py"), recursive=True)
    files += glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True)
    files += glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True)
    files += [os.path.join(ROOT, "setup.py"), os.path.join(ROOT, "tests", "conftest.py")]
    found = set()
    for f in files:
        with open(f, encoding="utf-8") as fh:
            found |= set(re.findall(r'"(GANENGINE_[A-Z0-9_]+)"', fh.read()))
    missing = sorted(found - set(settings.SETTINGS) - _MACROS)
    assert not missing, f"read but not in ganengine/settings.py: {missing}"


@pytest.mark.parametrize("name", [n for n, s in settings.SETTINGS.items() if s.kind in BAD])
def test_bad_value_names_the_variable_and_allowed_values(monkeypatch, name):
    s = settings.SETTINGS[name]
    monkeypatch.setenv(name, BAD[s.kind])
    with pytest.raises(settings.SettingError) as info:
        settings.get(name)
    msg = str(info.value)
    assert "\n" not in msg and name in msg and s.allowed() in msg
    if not s.read_by.startswith("build"):
        assert any(name in p for p in settings.problems())
    monkeypatch.delenv(name)
    assert settings.get(name) == s.default and settings.source(name) == "default"


def test_values_parse(monkeypatch):
    monkeypatch.setenv("GANENGINE_WINOGRAD_TILE", "4")
    monkeypatch.setenv("GANENGINE_STRICT", "Yes")
    monkeypatch.setenv("GANENGINE_BACKEND", "CPU")
    assert settings.get("GANENGINE_WINOGRAD_TILE") == 4 and settings.get("GANENGINE_STRICT") is True
    assert settings.get("GANENGINE_BACKEND") == "cpu" and settings.source("GANENGINE_BACKEND") == "environment"
    monkeypatch.setenv("GANENGINE_WINOGRAD_MIN_CHANELS", "64")  # a typo is reported too
    assert any("GANENGINE_WINOGRAD_MIN_CHANELS is set but is not a ganengine setting" in p
               for p in settings.problems())


def _cli(args, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("GANENGINE_")}
    e.update(env, PYTHONPATH=ROOT + os.pathsep + e.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "ganengine", *args], capture_output=True, text=True, env=e,
                          timeout=300)


def test_cli_with_a_bad_variable():
    bad = {"GANENGINE_WINOGRAD_MIN_CHANNELS": "abc", "GANENGINE_CONV_GEMM": "sometimes"}
    r = _cli(["train", "--help"], **bad)
    assert r.returncode == 0 and "usage" in r.stdout and "Traceback" not in r.stderr
    r = _cli(["train", "pix2pix", "--max_steps", "1"], **bad)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "GANENGINE_WINOGRAD_MIN_CHANNELS='abc' is not valid: allowed values are a whole number >= 0" in r.stderr
    assert "GANENGINE_CONV_GEMM='sometimes' is not valid: allowed values are one of auto, always, never" in r.stderr
    r = _cli(["info"], **bad)
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert re.search(r"GANENGINE_CONV_GEMM\s+INVALID 'sometimes'\s+environment", r.stdout)
    assert re.search(r"GANENGINE_WINOGRAD_TILE\s+2\s+default", r.stdout)
