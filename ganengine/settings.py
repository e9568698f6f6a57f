"""Every GANENGINE_* environment variable in one place: its name, allowed values, default, who
reads it and what it does; read and validated here.

* ``get(name)``: the validated value (the default when unset); a bad value raises
  ``SettingError`` (a ValueError) whose one line names the variable and the allowed values.
* ``problems()``: one line per bad variable, without raising: the CLI prints them and stops
  before any work (``--help`` never reads settings, so it always works); ``import ganengine``
  warns once per bad variable.
* ``report()``: every setting, its value and its source (environment / default), for
  ``ganengine info``.

The C++ extension reads its variables with ``std::getenv`` when a policy is first used (a
process-wide static) and parses them as ``get`` does; a value it cannot parse is the default
there, and the check here is what reports it (one line, before any work, instead of a
TORCH_CHECK traceback at the first convolution). (kernels/, the Triton side, reads no
GANENGINE_* variable; if one is added there it belongs in this table too.)

Build-time variables (read by setup.py, listed here for ``ganengine info``) are not validated
at run time: setup.py does that when it builds.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class SettingError(ValueError):
    pass


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str                 # "choice", "bool", "int"
    default: object
    help: str
    read_by: str = "python"   # "python", "C++ extension", "tests", "build (setup.py)"
    choices: tuple = ()
    minimum: int | None = None

    def allowed(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(map(str, self.choices))
        if self.kind == "bool":
            return "1/0 (true/false, yes/no, on/off)"
        if self.kind == "int":
            return f"a whole number >= {self.minimum}" if self.minimum is not None else "a whole number"
        return "any text"

    def parse(self, raw: str):
        text = raw.strip()
        if self.kind == "bool":
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
        elif self.kind == "int":
            try:
                value = int(text)
            except ValueError:
                value = None
            if value is not None and (self.minimum is None or value >= self.minimum):
                return value
        elif self.kind == "choice":
            low = text.lower()
            for c in self.choices:
                if low == str(c).lower():
                    return c
        else:
            return text
        raise SettingError(f"{self.name}={raw!r} is not valid: allowed values are {self.allowed()} "
                           f"(default {self.default!r}). {self.help}")


_BACKENDS = ("auto", "torch", "triton", "cpu", "cuda")
_POLICY = ("auto", "always", "never")

SETTINGS: dict[str, Setting] = {s.name: s for s in [
    Setting("GANENGINE_BACKEND", "choice", "auto", "Kernel backend of the fused ops (ganengine.use_backend "
            "overrides it).", choices=_BACKENDS),
    Setting("GANENGINE_STRICT", "bool", False, "A fallback away from a requested backend is an error "
            "(ganengine.backends.strict() overrides it)."),
    Setting("GANENGINE_DEBUG", "bool", False, "Fallbacks warn; CLI errors show their traceback."),
    Setting("GANENGINE_CONV_IMPL", "choice", "auto", "Triton convolution implementation (triton_conv_impl "
            "overrides it).", choices=("auto", "vendor", "igemm")),
    Setting("GANENGINE_WINOGRAD_TILE", "choice", 2, "cpu 3x3 Winograd tile: F(2x2, 3x3) or F(4x4, 3x3) "
            "(read per call).", read_by="C++ extension", choices=(2, 4)),
    Setting("GANENGINE_WINOGRAD_MIN_CHANNELS", "int", 128, "cpu 3x3 Winograd: fewest input and output channels "
            "it is used for (read at the first 3x3 convolution).", read_by="C++ extension", minimum=0),
    Setting("GANENGINE_CONV_GEMM", "choice", "auto", "cpu convolutions as one im2col GEMM (gemm_policy "
            "overrides it).", read_by="C++ extension", choices=_POLICY),
    Setting("GANENGINE_CONV_WINOGRAD", "choice", "auto", "cpu 4x4 convolutions as Winograd convolutions "
            "(winograd_policy overrides it).", read_by="C++ extension", choices=_POLICY),
    Setting("GANENGINE_WINOGRAD_S1_TILE", "choice", 2, "cpu 4x4 Winograd tile at stride 1.",
            read_by="C++ extension", choices=(2, 3)),
    Setting("GANENGINE_WINOGRAD_S2_TILE", "choice", 3, "cpu 4x4 Winograd tile at stride 2.",
            read_by="C++ extension", choices=(2, 3, 4)),
    Setting("GANENGINE_WINOGRAD_GEMM", "choice", "split", "cpu Winograd GEMMs: whole GEMMs per thread (split) or "
            "one threaded bmm.", read_by="C++ extension", choices=("split", "bmm")),
    Setting("GANENGINE_ATTENTION_NO_BLAS", "bool", False, "cpu attention without BLAS (tests).",
            read_by="C++ extension"),
    Setting("GANENGINE_TEST_NO_INTERPRET", "bool", False, "tests/conftest.py: leave TRITON_INTERPRET unset "
            "(Triton on a GPU).", read_by="tests"),
    Setting("GANENGINE_GPU_CHECK_DRY", "bool", False, "make gpu-check: tiny shapes on CPU tensors under the "
            "Triton interpreter (the dry run CI makes).", read_by="ganengine.tools.gpu_check"),
    Setting("GANENGINE_CPU_ARCH", "choice", "auto", "C++ build target.", read_by="build (setup.py)",
            choices=("auto", "default", "avx2", "avx512")),
    Setting("GANENGINE_BUILD_CUDA", "text", "", "Build the CUDA kernels: 1 required, 0 skipped, unset when "
            "possible.", read_by="build (setup.py)"),
    Setting("GANENGINE_CUDA_ARCH", "text", "8.0;9.0", "CUDA architectures to build for.", read_by="build (setup.py)"),
    Setting("GANENGINE_SKIP_EXT", "text", "", "1: install without the C++ extension.", read_by="build (setup.py)"),
]}


def _setting(name: str) -> Setting:
    try:
        return SETTINGS[name]
    except KeyError:
        raise KeyError(f"{name} is not a ganengine setting; they are: {', '.join(SETTINGS)}") from None


_PARSED: dict[tuple[str, str | None], object] = {}  # (name, raw value) -> validated value


def get(name: str):
    """The validated value of ``name`` (its default when unset or empty). Read on every call (a
    changed variable takes effect), parsed once per raw value: the dispatch of every op reads
    GANENGINE_BACKEND, and host time per call is what the fused ops are measured on."""
    raw = os.environ.get(name)
    if not _dynamo_compiling():  # (Dynamo would guard on the memo: a recompile once an eager call changes it)
        try:
            return _PARSED[(name, raw)]
        except KeyError:
            pass
    s = _setting(name)
    if raw is None or (raw.strip() == "" and s.kind != "bool"):
        value = s.default
    else:
        value = s.parse(raw)  # a bad value raises here, every time, and is never cached
    if not _dynamo_compiling():
        _PARSED[(name, raw)] = value
    return value


try:  # (setup.py reads settings, maybe before torch is installed)
    from torch.compiler import is_dynamo_compiling as _dynamo_compiling
except ImportError:  # pragma: no cover
    def _dynamo_compiling() -> bool:
        return False


def get_or_default(name: str):
    """``get`` for values read at import time: a bad value gives the default, with a warning
    naming the variable (the CLI stops on it before any work, through ``problems()``)."""
    try:
        return get(name)
    except SettingError as exc:
        import warnings

        warnings.warn(f"{exc} Using the default.", stacklevel=2)
        return _setting(name).default


def source(name: str) -> str:
    return "environment" if os.environ.get(name) not in (None, "") else "default"


def problems() -> list[str]:
    """One line per GANENGINE_* variable with a bad value (run-time settings only), and per
    GANENGINE_* variable that is not a setting at all (a typo)."""
    out = []
    for name, s in SETTINGS.items():
        if s.read_by.startswith("build"):
            continue
        try:
            get(name)
        except SettingError as exc:
            out.append(str(exc))
    for name in sorted(os.environ):
        if name.startswith("GANENGINE_") and name not in SETTINGS:
            out.append(f"{name} is set but is not a ganengine setting (a typo?); the settings are: "
                       f"{', '.join(SETTINGS)}")
    return out


def report() -> list[dict]:
    """Every setting: name, value (or the problem), source, allowed values, who reads it."""
    rows = []
    for name, s in SETTINGS.items():
        try:
            value = get(name)
        except SettingError:
            value = f"INVALID {os.environ.get(name)!r}"
        rows.append({"name": name, "value": value, "source": source(name), "allowed": s.allowed(),
                     "read_by": s.read_by, "help": s.help})
    return rows
