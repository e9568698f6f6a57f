"""Compile every Triton kernel ahead of time for sm_80 and sm_90 and report its resources.

    python -m ganengine.tools.aot_report [--arch 80 90] [--markdown FILE] [--json FILE] [--allow-spills]

Needs no GPU. Every module in ``ganengine.kernels`` lists its kernels and shipped configs in
``AOT_SPECS`` (dicts with kernel, config, signature, constexprs, num_warps, num_stages). Each is
compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``; the cubin is
read with the ``cuobjdump`` shipped inside the Triton wheel (the CUDA toolkit's own tools may
reject Triton's PTX version). Prints kernel, config, registers, spill bytes (stack + local) and
shared memory; exits 1 if any kernel spills (unless --allow-spills) or fails to compile.
"""
from __future__ import annotations

import os

# ASTSource needs real JITFunctions: the interpreter replaces them, so it must be off here.
os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import pkgutil  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402


@dataclass
class Row:
    module: str
    kernel: str
    config: str
    arch: str
    registers: int | None
    spill_bytes: int | None
    shared_bytes: int | None
    error: str | None = None


def cuobjdump_path() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found in the triton wheel at {path}")
    return path


_RES = re.compile(r"Function\s+(\S+):\s*\n?\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


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


def compile_spec(spec: dict, cc: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = spec["kernel"]
    constexprs = dict(spec.get("constexprs", {}))
    signature = dict(spec["signature"])
    for name in constexprs:
        signature.setdefault(name, "constexpr")
    missing = [a for a in kernel.arg_names if a not in signature]
    if missing:
        raise ValueError(f"AOT spec for {kernel.__name__} lacks signature entries for {missing}")
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)}
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)


def kernel_modules():
    import ganengine.kernels as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        yield info.name, importlib.import_module(f"ganengine.kernels.{info.name}")


def collect(archs: list[int], only: list[str] | None = None) -> list[Row]:
    rows: list[Row] = []
    for mod_name, mod in kernel_modules():
        if only and mod_name not in only:
            continue
        for spec in getattr(mod, "AOT_SPECS", []):
            kname = spec["kernel"].__name__
            for cc in archs:
                arch = f"sm_{cc}"
                try:
                    compiled = compile_spec(spec, cc)
                    usage = resource_usage(compiled.asm["cubin"])
                    # the cubin holds the kernel (name may be mangled with its specialisation)
                    key = next((k for k in usage if kname in k), next(iter(usage), None))
                    if key is None:
                        raise RuntimeError("cuobjdump reported no function")
                    reg, stack, shared, local = usage[key]
                    shared = max(shared, int(compiled.metadata.shared))
                    rows.append(Row(mod_name, kname, spec.get("config", ""), arch, reg, stack + local, shared))
                except Exception as exc:  # report and fail, but keep going for the table
                    rows.append(Row(mod_name, kname, spec.get("config", ""), arch, None, None, None,
                                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"))
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| module | kernel | config | arch | registers | spill bytes | shared mem (B) |",
             "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.module} | {r.kernel} | {r.config} | {r.arch} | FAILED: {r.error} | | |")
        else:
            lines.append(f"| {r.module} | {r.kernel} | {r.config} | {r.arch} | {r.registers} | {r.spill_bytes} | "
                         f"{r.shared_bytes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    parser.add_argument("--modules", nargs="*", help="only these kernel modules (e.g. norm_act)")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--allow-spills", action="store_true", help="report spills without failing")
    args = parser.parse_args(argv)

    rows = collect(args.arch, args.modules)
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
    print(f"\n{len(rows)} kernel builds: {len(failed)} failed, {len(spills)} spilling", file=sys.stderr)
    if not rows:
        print("no AOT_SPECS found in ganengine.kernels", file=sys.stderr)
        return 1
    if failed or (spills and not args.allow_spills):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
