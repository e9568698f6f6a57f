"""``ganengine bench``: time every op and model step against eager PyTorch and torch.compile."""
from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys

from ganengine.cli.profile import model_case_names


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark the fused ops and model training steps",
        description="Times every op (forward, forward+backward) and model training step for every "
                    "available backend against eager PyTorch and torch.compile; writes bench.json, "
                    "bench.md and bench.png to --output.")
    p.add_argument("--ops", nargs="*", default=None, metavar="OP",
                   help="op cases or families to run (default: all; give the flag with no names "
                        "for all ops and no models)")
    p.add_argument("--models", nargs="*", default=None, metavar="MODEL",
                   help="models whose training step to time: "
                        f"{', '.join(model_case_names()) or 'see --list'} (default: all; flag alone: all models)")
    p.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"),
                   help="auto | cpu | cuda (default: auto, cuda when available, else cpu)")
    p.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16 | float64")
    p.add_argument("--autocast", default=None, choices=("bf16", "fp16"),
                   help="run every op case's calls, eager's and ganengine's alike, each inside its own "
                        "torch.autocast(device, dtype) region (float32 inputs; model steps are skipped)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (a couple of minutes on CPU)")
    p.add_argument("--output", default="bench_results", metavar="DIR", help="output folder (default: bench_results)")
    p.add_argument("--runners", nargs="+", default=None, metavar="RUNNER",
                   help="eager, compile, ganengine:<backend> with backend auto, cpu, triton, cuda or torch "
                        "(default: eager, compile, ganengine:auto, the route a user's call takes, and on "
                        "CUDA ganengine:triton and ganengine:cuda)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile runner")
    p.add_argument("--modes", nargs="+", default=None, choices=("forward", "forward_backward"),
                   help="op modes (default: both)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads to pin (default: the number of physical cores)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (CPU)")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    p.add_argument("--traffic", action="store_true",
                   help="also count the Triton kernels' memory traffic (needs TRITON_INTERPRET=1)")
    p.add_argument("--host", action="store_true",
                   help="also measure host time and kernels per call of every op at a tiny shape "
                        "(kernel counts need TRITON_INTERPRET=1)")
    p.add_argument("--no-chart", action="store_true", help="do not draw bench.png")
    p.add_argument("--list", action="store_true", help="list the cases in this build and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ganengine.bench import machine, registry, report, runner
    from ganengine.cli._io import device_or_error, writable_dir

    if args.list:
        for case in registry.all_cases().values():
            shapes = "; ".join(registry.shape_label(s) for s in case.shapes.get("ref", []))
            print(f"{case.kind:5s} {case.name:24s} {case.family:10s} {case.description}  [{shapes}]")
        from ganengine.bench import cases_ops

        for family, why in cases_ops.unavailable.items():
            print(f"(op family {family} not benchmarked: {why})")
        return 0
    for option in ("threads", "repeats"):  # (left out: the defaults; 0 is not a way to ask for them)
        value = getattr(args, option)
        if value is not None and value < 1:
            print(f"ganengine bench: error: --{option} must be >= 1, got {value} (leave it out for the default)",
                  file=sys.stderr)
            return 2
    if args.traffic:  # say it before the timings, which a late failure would discard
        from ganengine import backends

        problem = None
        if not backends.triton_interpret():
            problem = ("--traffic counts the Triton kernels' memory traffic under the Triton interpreter: "
                       "set TRITON_INTERPRET=1 in the environment (e.g. `TRITON_INTERPRET=1 ganengine bench "
                       "--traffic ...`), or leave --traffic out")
        elif backends._triton_import_error():
            problem = f"--traffic needs Triton: {backends._triton_import_error()}"
        if problem:
            print(f"ganengine bench: error: {problem}", file=sys.stderr)
            return 2
    if args.device == "auto":  # (the default: cuda when available, else cpu)
        args.device = None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:  # --dtype and --device before anything is measured or the output folder is created
        runner.check_autocast(runner.parse_autocast(args.autocast), runner.parse_dtype(args.dtype))
        device_or_error(device)
    except ValueError as exc:
        msg = str(exc).replace("dtype must be", "--dtype must be", 1)
        print(f"ganengine bench: error: {msg}", file=sys.stderr)
        return 2
    if not args.no_chart and importlib.util.find_spec("matplotlib") is None:
        # say it before the long work, not with a traceback after it
        print("ganengine bench: matplotlib is not installed, so no bench.png "
              "(pip install 'ganengine[bench]' or matplotlib); writing the tables only", file=sys.stderr)
        args.no_chart = True
    try:
        cases = registry.select(args.ops, args.models)
        runners = args.runners
        if runners is None:
            runners = runner.default_runners(torch.device(device), with_compile=not args.no_compile)
        else:
            runners = list(dict.fromkeys(runners))  # a name given twice is measured once
            for name in runners:
                runner.check_runner(name)
            if args.no_compile:
                runners = [r for r in runners if r != "compile"]
                if not runners:
                    raise ValueError("--runners compile with --no-compile leaves no runner to measure: "
                                     "drop --no-compile, or name other runners in --runners")
        writable_dir(args.output, "--output")
        result = runner.run(cases, device=device, dtype=args.dtype, quick=args.quick, runners=runners,
                            modes=args.modes, threads=args.threads, repeats=args.repeats,
                            measure_memory=not args.no_memory, autocast=args.autocast,
                            progress=lambda s: print(f"  {s}", file=sys.stderr, flush=True))
    except ValueError as exc:
        print(f"ganengine bench: error: {exc}", file=sys.stderr)
        return 2
    traffic = []
    traffic_failed = False
    if args.traffic:
        from ganengine.bench import traffic_table

        try:
            traffic = traffic_table.measure(_with_modes(cases, args.modes), dtype=args.dtype)
        except RuntimeError as exc:  # the timings are still written below
            print(f"ganengine bench: error: --traffic: {exc}", file=sys.stderr)
            traffic_failed = True
    host = []
    if args.host:
        from ganengine.bench import host_cost

        host = host_cost.measure(_at_dtype(_with_modes(cases, args.modes), args.dtype),
                                 progress=lambda s: print(f"  {s}", file=sys.stderr, flush=True),
                                 autocast=args.autocast)
        host_dtype = str(runner.parse_dtype(args.dtype)).replace("torch.", "")
        for rec in host:
            rec["dtype"] = host_dtype
    rep = report.build_report(result, machine.machine_info(), command=_command_line(args), traffic=traffic)
    paths = [report.write_json(rep, os.path.join(args.output, "bench.json")),
             report.write_markdown(rep, os.path.join(args.output, "bench.md"))]
    if not args.no_chart:
        paths.append(report.write_chart(rep, os.path.join(args.output, "bench.png")))
    print(report.markdown(rep))
    if host:
        from ganengine.bench import host_cost

        text = (f"## Host time and kernels per call (tiny shapes, {host_dtype}, 1 thread, auto backend)\n\n"
                + host_cost.markdown(host))
        with open(os.path.join(args.output, "host_cost.md"), "w") as f:
            f.write(text)
        paths.append(os.path.join(args.output, "host_cost.md"))
        print(text)
    print("wrote " + ", ".join(paths))
    errors = [r for r in rep["records"] if r["status"] == "error"]
    return 1 if errors or traffic_failed else 0


def _with_modes(cases, modes):
    """The op cases restricted to the ``--modes`` asked for (all of them when None): the traffic
    and host tables measure every mode a case registers, so the cases are narrowed here, as the
    timings are (model cases have their one step mode and pass through)."""
    import dataclasses

    if not modes:
        return list(cases)
    out = []
    for case in cases:
        if case.kind == "op":
            kept = tuple(m for m in case.modes if m in modes)
            if not kept:
                continue
            case = dataclasses.replace(case, modes=kept)
        out.append(case)
    return out


def _at_dtype(cases, dtype: str):
    """The op cases set up at ``--dtype`` whatever dtype their caller asks for: the host table
    (bench.host_cost) builds its tiny inputs in float32."""
    import dataclasses

    from ganengine.bench.runner import parse_dtype

    dt = parse_dtype(dtype)
    if dt == parse_dtype("float32"):
        return list(cases)

    def at(setup):
        return lambda params, device, _dtype: setup(params, device, dt)

    return [dataclasses.replace(c, setup=at(c.setup)) if c.kind == "op" else c for c in cases]


def _command_line(args: argparse.Namespace) -> str:
    """The equivalent command line, recorded with the figures."""
    parts = ["ganengine", "bench"]
    for name in ("ops", "models", "runners", "modes"):
        value = getattr(args, name)
        if value is not None:
            parts += [f"--{name}", *value]
    for name in ("device", "threads", "repeats", "autocast"):
        if getattr(args, name) is not None:
            parts += [f"--{name}", str(getattr(args, name))]
    if args.dtype != "float32":
        parts += ["--dtype", args.dtype]
    for flag in ("quick", "no_compile", "no_memory", "traffic", "host", "no_chart"):
        if getattr(args, flag):
            parts.append("--" + flag.replace("_", "-"))
    parts += ["--output", args.output]
    return " ".join(shlex.quote(p) for p in parts)
