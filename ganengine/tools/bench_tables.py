"""Regenerate the measured tables for BENCHMARKS.md in one command.

    python -m ganengine.tools.bench_tables [--output docs/benchmarks_generated.md] [--quick]
        [--ops ...] [--models ...] [--no-compile] [--skip-timing] [--skip-traffic] [--skip-aot]

Sections (each measured now, on this machine, by ganengine's own benchmark code):
  1. timing: ``ganengine bench`` over the op cases (and model steps with --models) against eager
     PyTorch and torch.compile, at the reference shapes (or --quick);
  2. memory traffic: Triton kernel bytes vs the minimum vs eager PyTorch, per op and mode, with
     the predicted GPU speedup for memory-bound kernels (needs the Triton interpreter, which this
     tool turns on when there is no GPU);
  3. ahead-of-time resources (registers, spills, shared memory) from
     ``python -m ganengine.tools.aot_report``, run in a subprocess.
The raw figures go to ``<output stem>.json`` beside the Markdown.
"""
from __future__ import annotations

import os
import sys

# the traffic counter runs the kernels through the interpreter: set before triton is imported
if not os.environ.get("TRITON_INTERPRET"):
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # pragma: no cover
        pass

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402


def aot_section(timeout_s: int = 900) -> str:
    """The AOT resource table, or why it is missing."""
    with tempfile.TemporaryDirectory() as d:
        md = os.path.join(d, "aot.md")
        cmd = [sys.executable, "-m", "ganengine.tools.aot_report", "--markdown", md, "--allow-spills"]
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"AOT report not produced: {type(exc).__name__}: {exc}\n"
        if os.path.exists(md):
            text = open(md).read()
            note = "" if proc.returncode == 0 else f"\n(aot_report exited {proc.returncode})\n"
            return f"Command: `python -m ganengine.tools.aot_report`\n\n{text}{note}"
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return "AOT report not produced:\n\n```\n" + "\n".join(tail) + "\n```\n"


def _check_options(args) -> str | None:
    """The options' problem in one line naming the option, or None (sets ``args.chart``)."""
    import importlib.util

    from ganengine.bench import registry
    from ganengine.cli._io import OutputError, writable_file

    if args.repeats is not None and args.repeats < 1:
        return f"--repeats must be >= 1, got {args.repeats} (leave it out for the default)"
    try:
        registry.select(args.ops, None)
    except ValueError as exc:
        return f"--ops: {exc}"
    if args.models is not None:
        try:
            registry.select(None, args.models)
        except ValueError as exc:
            return f"--models: {exc}"
    try:
        writable_file(args.output, "--output", example="benchmarks_generated.md")
    except OutputError as exc:
        return str(exc)
    stem = os.path.splitext(args.output)[0]
    for ext in (".json", ".png"):  # written beside it
        if os.path.isdir(stem + ext):
            return (f"--output {args.output!r}: {stem + ext!r} (written beside it) is a folder: "
                    "pick another --output name")
    args.chart = not args.skip_timing and importlib.util.find_spec("matplotlib") is not None
    if not args.skip_timing and not args.chart:
        print("python -m ganengine.tools.bench_tables: matplotlib is not installed, so no chart "
              "(pip install matplotlib); writing the tables only", file=sys.stderr)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default="docs/benchmarks_generated.md")
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke run, not for publishing)")
    p.add_argument("--ops", nargs="*", default=[], help="op cases/families for timing (default: all)")
    p.add_argument("--models", nargs="*", default=None, help="model steps for timing (default: none)")
    p.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--traffic-size", default="traffic", choices=("traffic", "ref", "quick"),
                   help="shapes for the traffic table: each case's small traffic shape (default), "
                        "its first reference shape (slow under the interpreter) or its quick shape")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--skip-traffic", action="store_true")
    p.add_argument("--skip-aot", action="store_true")
    args = p.parse_args(argv)

    problem = _check_options(args)  # before the long measuring, not with a traceback after it
    if problem:
        print(f"python -m ganengine.tools.bench_tables: error: {problem}", file=sys.stderr)
        return 2
    import torch

    from ganengine.bench import machine, registry, report, runner, traffic_table

    cmd = "python -m ganengine.tools.bench_tables " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    mach = machine.machine_info()
    out: dict = {"command": cmd, "machine": mach, "generated_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    parts = ["<!-- generated by ganengine.tools.bench_tables: do not edit by hand -->", "",
             f"Generated {out['generated_utc']} by `{cmd.strip()}`.", "",
             f"Machine: {report.machine_line(mach)}.", ""]
    log = lambda s: print(f"  {s}", file=sys.stderr, flush=True)  # noqa: E731

    if not args.skip_timing:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        cases = registry.select(args.ops, args.models)  # (checked by _check_options)
        runners = runner.default_runners(torch.device(device), with_compile=not args.no_compile)
        res = runner.run(cases, device=device, quick=args.quick, runners=runners, repeats=args.repeats,
                         progress=log)
        rep = report.build_report(res, mach, command=cmd)
        out["timing"] = rep
        parts += [f"## Timing ({device}, {'quick' if args.quick else 'reference'} shapes)", "",
                  report.markdown(rep)]
        png = os.path.splitext(args.output)[0] + ".png"
        if args.chart:
            report.write_chart(rep, png)
            parts += [f"![speedups]({os.path.basename(png)})", ""]

    if not args.skip_traffic:
        from ganengine import backends

        parts += ["## Memory traffic per op (GPU proxy)", ""]
        if not backends.triton_interpret():
            parts += ["Not measured: needs `TRITON_INTERPRET=1` (set automatically when no GPU is visible).", ""]
        else:
            recs = traffic_table.measure(registry.select([], None), progress=log, size=args.traffic_size)
            out["traffic"] = recs
            parts += [
                "Bytes each implementation moves to and from global memory, counted on CPU tensors: "
                "Triton kernels under the interpreter with every active load/store lane counted, eager "
                "PyTorch as the sum over its aten kernels of bytes read and written, the minimum as "
                "inputs read once and outputs written once. A memory-bound GPU kernel runs at bytes / "
                "bandwidth, so eager / ganengine is the predicted speedup over eager PyTorch.", "",
                traffic_table.traffic_markdown(recs), "",
                "Per Triton launch and argument (total bytes, unique bytes in brackets: total > unique "
                "means a re-read that the L2 cache may absorb):", "",
                traffic_table.kernel_markdown(recs)]

    if not args.skip_aot:
        parts += ["## Ahead-of-time kernel resources (sm_80 / sm_90)", "", aot_section()]

    with open(args.output, "w") as f:
        f.write("\n".join(parts).rstrip() + "\n")
    with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
