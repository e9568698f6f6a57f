"""Compile every Triton kernel launch ahead of time for sm_80 and sm_90 and report its resources.

    python -m ganengine.tools.aot_report [--arch 80 90] [--modules norm_act ...] [--markdown FILE]
                                         [--json FILE] [--allow-spills] [--jobs N] [--sms 132]

Needs no GPU. What is compiled is what the launchers would launch: every module in
``ganengine.kernels`` lists model-shaped calls in ``aot_cases()`` (label, thunk); each thunk runs
the real launchers on ``meta`` tensors inside ``_launch.planning_for_gpu`` (so block sizes,
warps, stages and splits come from the launchers' own plan for a GPU with ``--sms`` SMs), with
``JITFunction.run`` replaced by a recorder. Each recorded launch goes through Triton's own JIT
binder, so the signature and the specialisation are the runtime's: integers equal to 1 become
constants, integers and (16-byte aligned, as fresh allocations are) pointers divisible by 16
carry ``tt.divisibility=16``. Identical compilations are deduplicated.

Each is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``; the
cubin is read with the ``cuobjdump`` shipped inside the Triton wheel (the CUDA toolkit's own
tools may reject Triton's PTX version). Prints kernel, config, registers, spill bytes (stack +
local), shared memory, the MMA instruction (wgmma / mma.sync) and the widest global load;
exits 1 if any kernel spills (unless --allow-spills) or fails to compile.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field


@dataclass
class Row:
    module: str
    kernel: str
    config: str
    arch: str
    registers: int | None
    spill_bytes: int | None
    shared_bytes: int | None
    mma: str = ""
    widest_load_bytes: int | None = None
    cases: list = field(default_factory=list)
    error: str | None = None


@dataclass
class Build:
    """One distinct compilation: a kernel with one signature, specialisation and options."""
    module: str
    fn: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    cases: list = field(default_factory=list)

    @property
    def config(self) -> str:
        names = self.fn.arg_names
        const = ",".join(f"{names[k[0]]}={v}" for k, v in sorted(self.constexprs.items())
                         if names[k[0]].isupper() or "BLOCK" in names[k[0]])
        ones = [names[k[0]] for k, v in sorted(self.constexprs.items()) if not (names[k[0]].isupper() or "BLOCK" in names[k[0]])]
        div16 = [names[k[0]] for k, v in sorted(self.attrs.items()) if v and not self.signature[names[k[0]]].startswith("*")]
        dtypes = sorted({t for t in self.signature.values() if t.startswith("*")})
        parts = [const, f"warps={self.options['num_warps']}", f"stages={self.options['num_stages']}",
                 "/".join(t[1:] for t in dtypes)]
        if ones:
            parts.append("=1:" + "/".join(ones))
        if div16:
            parts.append("%16:" + "/".join(div16))
        return " ".join(p for p in parts if p)


def cuobjdump_path() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found in the triton wheel at {path}")
    return path


_RES = re.compile(r"Function\s+(\S+):\s*\n?\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_LD = re.compile(r"ld\.global(?:\.[a-z0-9_]+)*?(?:\.v(\d))?\.(?:b|f|u|s)(\d+)\s")


def resource_usage(cubin: bytes) -> dict[str, tuple[int, int, int, int]]:
    """{function: (registers, stack, shared, local)} read off a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        name = f.name
    try:
        out = subprocess.run([cuobjdump_path(), "--dump-resource-usage", name], capture_output=True,
                             text=True, check=True).stdout
    finally:
        os.unlink(name)
    return {m.group(1): tuple(int(m.group(i)) for i in range(2, 6)) for m in _RES.finditer(out)}


def ptx_facts(ptx: str) -> tuple[str, int | None]:
    """(MMA instruction family used, widest global load in bytes) read off the PTX."""
    mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "")
    widths = [int(m.group(1) or 1) * int(m.group(2)) // 8 for m in _LD.finditer(ptx)]
    return mma, (max(widths) if widths else None)


# ----------------------------------------------------------------------------- recording launches
def kernel_modules():
    import ganengine.kernels as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        yield info.name, importlib.import_module(f"ganengine.kernels.{info.name}")


def record_launches(thunk) -> list[tuple]:
    """Run ``thunk`` with every JIT launch recorded, not run: [(fn, grid, args, kwargs)]."""
    from triton.runtime.jit import JITFunction

    launches = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, grid, args, kwargs))

    JITFunction.run = record
    try:
        thunk()
    finally:
        JITFunction.run = original
    return launches


def bind(fn, args, kwargs, cc: int):
    """What the JIT would compile for this launch on sm_<cc>: (signature, constexprs, attrs, options)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import create_function_from_signature

    backend = CUDABackend(GPUTarget("cuda", cc, 32))
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def plan_builds(cc: int, only: list[str] | None, sms: int) -> tuple[list[Build], list[str]]:
    """Distinct compilations of every module's AOT cases for sm_<cc> (and errors while planning)."""
    from triton.runtime.jit import JITFunction

    from ganengine.kernels import _launch, norm_act

    if not isinstance(norm_act._fwd_fused_kernel, JITFunction):
        raise RuntimeError("the AOT report needs real JITFunctions: run it in a process without TRITON_INTERPRET=1")

    builds: dict[str, Build] = {}
    errors = []
    for mod_name, mod in kernel_modules():
        if only and mod_name not in only:
            continue
        cases = getattr(mod, "aot_cases", None)
        if cases is None:
            errors.append(f"{mod_name}: no aot_cases()")
            continue
        for label, thunk in cases():
            try:
                with _launch.planning_for_gpu(sms, cc):
                    launches = record_launches(thunk)
            except Exception as exc:  # a launcher that cannot plan this case is a failure
                errors.append(f"{mod_name} {label}: {type(exc).__name__}: {exc}")
                continue
            for fn, _grid, args, kwargs in launches:
                sig, const, attrs, opts = bind(fn, args, kwargs, cc)
                key = repr((fn.__name__, sorted(sig.items()), sorted(const.items(), key=str), sorted(attrs.items()),
                            opts["num_warps"], opts["num_stages"]))
                if key not in builds:
                    builds[key] = Build(mod_name, fn, sig, const, attrs, opts)
                builds[key].cases.append(label)
    return list(builds.values()), errors


# ----------------------------------------------------------------------------- compiling
_PENDING: list[tuple[Build, int]] = []  # read by forked workers by index (nothing to pickle)


def _compile_one(i: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    build, cc = _PENDING[i]
    try:
        src = ASTSource(fn=build.fn, signature=build.signature, constexprs=build.constexprs, attrs=build.attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=build.options)
        usage = resource_usage(compiled.asm["cubin"])
        kname = build.fn.__name__
        key = next((k for k in usage if kname in k), next(iter(usage), None))
        if key is None:
            raise RuntimeError("cuobjdump reported no function")
        reg, stack, shared, local = usage[key]
        mma, widest = ptx_facts(compiled.asm["ptx"])
        return reg, stack + local, max(shared, int(compiled.metadata.shared)), mma, widest, None
    except Exception as exc:  # report and fail, but keep going for the table
        msg = str(exc).splitlines()[0][:200] if str(exc) else ""
        return None, None, None, "", None, f"{type(exc).__name__}: {msg}"


def collect(archs: list[int], only: list[str] | None = None, sms: int = 132, jobs: int = 1) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    errors: list[str] = []
    _PENDING.clear()
    for cc in archs:
        builds, errs = plan_builds(cc, only, sms)
        errors += [f"sm_{cc}: {e}" for e in errs]
        _PENDING.extend((b, cc) for b in builds)
    if jobs > 1 and len(_PENDING) > 1:
        with cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_compile_one, range(len(_PENDING)), chunksize=4))
    else:
        results = [_compile_one(i) for i in range(len(_PENDING))]
    for (build, cc), (reg, spill, shared, mma, widest, err) in zip(_PENDING, results):
        cases = build.cases
        rows.append(Row(build.module, build.fn.__name__, build.config, f"sm_{cc}", reg, spill, shared, mma, widest,
                        cases, err))
    return rows, errors


def markdown(rows: list[Row]) -> str:
    lines = ["| module | kernel | config | arch | registers | spill bytes | shared mem (B) | mma | widest load (B) "
             "| model cases |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: | --- |"]
    for r in rows:
        cases = f"{r.cases[0]}" + (f" (+{len(r.cases) - 1})" if len(r.cases) > 1 else "")
        if r.error:
            lines.append(f"| {r.module} | {r.kernel} | {r.config} | {r.arch} | FAILED: {r.error} | | | | | {cases} |")
        else:
            lines.append(f"| {r.module} | {r.kernel} | {r.config} | {r.arch} | {r.registers} | {r.spill_bytes} | "
                         f"{r.shared_bytes} | {r.mma or '-'} | {r.widest_load_bytes or '-'} | {cases} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    parser.add_argument("--modules", nargs="*", help="only these kernel modules (e.g. norm_act)")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--allow-spills", action="store_true", help="report spills without failing")
    parser.add_argument("--sms", type=int, default=132, help="SM count the launch plans assume (H100/H200: 132)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compilations")
    args = parser.parse_args(argv)
    # ASTSource needs real JITFunctions (the interpreter replaces them): off before the kernels
    # are imported (only in this entry point: importing this module changes nothing)
    os.environ.pop("TRITON_INTERPRET", None)

    for out in (args.markdown, args.json):  # (their folders made before the compiles, not after)
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    t0 = time.perf_counter()
    rows, errors = collect(args.arch, args.modules, args.sms, args.jobs)
    table = markdown(rows)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    failed = [r for r in rows if r.error]
    spills = [r for r in rows if not r.error and r.spill_bytes]
    for e in errors:
        print(f"planning error: {e}", file=sys.stderr)
    for r in spills:
        print(f"SPILL: {r.module}.{r.kernel} [{r.config}] {r.arch}: {r.spill_bytes} B ({r.cases[0]})", file=sys.stderr)
    print(f"\n{len(rows)} kernel builds in {time.perf_counter() - t0:.0f} s: {len(failed)} failed, "
          f"{len(spills)} spilling, {len(errors)} planning errors", file=sys.stderr)
    if not rows:
        print("no aot_cases found in ganengine.kernels", file=sys.stderr)
        return 1
    if failed or errors or (spills and not args.allow_spills):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
