"""Benchmark outputs: JSON (every figure), Markdown tables, a PNG chart of speedups."""
from __future__ import annotations

import json
import math
import os

SCHEMA = "ganengine-bench"
SCHEMA_VERSION = 1


def build_report(result: dict, machine: dict, command: str | None = None, traffic: list | None = None) -> dict:
    return {"format": SCHEMA, "version": SCHEMA_VERSION, "command": command, "machine": machine,
            "settings": result["settings"], "records": result["records"], "traffic": traffic or []}


def write_json(report: dict, path: str) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, sort_keys=False, default=str)
    os.replace(tmp, path)
    return path


def _ms(rec: dict | None) -> str:
    if rec is None:
        return ""
    if rec["status"] != "ok":
        return "skip" if rec["status"] == "skipped" else "error"
    t = rec["time_ms"]
    med = t["median"]
    fmt = "{:.3f}" if med < 1 else ("{:.2f}" if med < 100 else "{:.0f}")
    noisy = " †" if t["iqr"] > med else ""
    return f"{fmt.format(med)} ± {fmt.format(t['iqr'] / 2)}{noisy}"


def _mib(n) -> str:
    return "" if n is None else f"{n / 2**20:.1f}"


def _x(v) -> str:
    return "" if v is None else f"{v:.2f}x"


def machine_line(machine: dict) -> str:
    git = machine.get("git") or {}
    commit = (git.get("commit") or "")[:10] or "(no commit)"
    if git.get("dirty"):
        commit += " + uncommitted changes"
    dev = machine["gpu"]["name"] if machine.get("gpu") else f"{machine['cpu_model']}"
    load = machine.get("load_average_1m")
    load_txt = f"; load average {load:.1f} when the run started" if load is not None else ""
    return (f"{dev}; {machine['cpu_physical_cores']} physical / {machine['cpu_logical_cores']} logical CPU cores; "
            f"Python {machine['python']}, torch {machine['torch']}, triton {machine['triton']}; git {commit}"
            f"{load_txt}")


# the ganengine runner `ganengine bench` times by default (runner.default_runners): the route a
# user's call takes. Tables from before 2026-12-07 were measured with ganengine:cpu, the default then.
DEFAULT_GANENGINE_RUNNER = "ganengine:auto"


def runners_line(runners: list[str]) -> str:
    """Which runners the table timed, and whether its ganengine runner is the default one (a table
    read later, after the default changed, still says what it measured)."""
    ours = [r for r in runners if r.startswith("ganengine:")]
    line = f"Runners: {', '.join(runners)}."
    if ours and DEFAULT_GANENGINE_RUNNER not in ours:
        line += (f" The ganengine figures are {', '.join(ours)} (a named backend, strict), not "
                 f"{DEFAULT_GANENGINE_RUNNER}, the route a user's call takes and `ganengine bench`'s default.")
    elif ours:
        line += f" {DEFAULT_GANENGINE_RUNNER} (the default) is the route a user's call takes."
    return line


def markdown(report: dict) -> str:
    """One table per (device, dtype): rows (case, shape, mode), a column per runner."""
    recs = report["records"]
    st = report["settings"]
    runners = st["runners"]
    amp = f", under torch.autocast to {st['autocast']} (float32 inputs)" if st.get("autocast") else ""
    lines = [f"Machine: {machine_line(report['machine'])}.",
             f"Settings: device {st['device']}, dtype {st['dtype']}{amp}, {st['size']} shapes, timer "
             f"{st['timer']}" + (f", {st['threads']} threads" if st.get("threads") else "") +
             ". Times are median ± half the interquartile range in ms; speedups are median ratios; "
             "peak memory is the extra memory of one call in MiB.", ""]
    if report.get("command"):
        lines.insert(1, f"Command: `{report['command']}`.")
    lines.insert(len(lines) - 1, runners_line(runners))
    natives = [r for r in runners if r.startswith("ganengine:")]
    head = ["case", "shape", "mode"] + [f"{r} ms" for r in runners]
    with_compile = "compile" in runners
    for r in natives:
        head += [f"{r} vs eager"] + ([f"{r} vs compile"] if with_compile else [])
    head += [f"peak MiB ({r})" for r in runners]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    rows: dict = {}
    for r in recs:
        if r.get("mode") is None:
            continue
        rows.setdefault((r["case"], r["shape_label"], r["mode"]), {})[r["runner"]] = r
    for (case, shape, mode), by in rows.items():
        cells = [case, shape, mode] + [_ms(by.get(r)) for r in runners]
        for r in natives:
            rec = by.get(r) or {}
            cells += [_x(rec.get("speedup_vs_eager"))] + ([_x(rec.get("speedup_vs_compile"))] if with_compile else [])
        cells += [_mib((by.get(r) or {}).get("peak_mem_bytes")) for r in runners]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r["status"] == "ok" and r["time_ms"] and r["time_ms"]["iqr"] > r["time_ms"]["median"] for r in recs):
        lines += ["", "† interquartile range wider than the median: the machine was busy (other processes "
                      "took the cores), so that figure and its ratios are noise, not the op."]
    problems = [r for r in recs if r["status"] != "ok"]
    if problems:
        lines += ["", "Not measured:", ""]
        for r in problems:
            lines.append(f"- {r['case']} [{r['shape_label']}] {r.get('mode')} {r.get('runner')}: "
                         f"{r['status']}: {r['reason']}")
    return "\n".join(lines) + "\n"


def write_markdown(report: dict, path: str) -> str:
    with open(path, "w") as f:
        f.write("# ganengine benchmark\n\n" + markdown(report))
        if report.get("traffic"):
            from ganengine.bench.traffic_table import traffic_markdown

            f.write("\n## Memory traffic (GPU proxy)\n\n" + traffic_markdown(report["traffic"]))
    return path


def write_chart(report: dict, path: str) -> str:
    """Horizontal bars: speedup of every non-eager runner over eager, per (case, shape, mode)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    recs = [r for r in report["records"] if r["status"] == "ok" and r["runner"] != "eager"
            and r.get("speedup_vs_eager") is not None]
    runners = [r for r in report["settings"]["runners"] if r != "eager"]
    labels = []
    for r in recs:
        lab = f"{r['case']} {r['shape_label']} {r['mode']}"
        if lab not in labels:
            labels.append(lab)
    fig_h = max(2.5, 0.35 * len(labels) * max(1, len(runners)) + 1.5)
    fig_w = 7 + 0.065 * max((len(lab) for lab in labels), default=0)  # room for the labels
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    bar_h = 0.8 / max(1, len(runners))
    for j, runner in enumerate(runners):
        ys, xs = [], []
        for i, lab in enumerate(labels):
            for r in recs:
                if r["runner"] == runner and f"{r['case']} {r['shape_label']} {r['mode']}" == lab:
                    ys.append(i + j * bar_h)
                    xs.append(r["speedup_vs_eager"])
        ax.barh(ys, xs, height=bar_h, label=runner)
        for y, x in zip(ys, xs):
            ax.text(x, y, f" {x:.2f}x", va="center", fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([i + bar_h * (len(runners) - 1) / 2 for i in range(len(labels))])
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    values = [r["speedup_vs_eager"] for r in recs]
    log = bool(values) and max(values) / max(min(values), 1e-9) > 20  # spread over decades
    if log:
        ax.set_xscale("log")
        decades = math.log10(max(values) / max(min(values), 1e-9))
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 3 else (1.0,)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_xlabel("speedup over eager PyTorch (median time ratio" + (", log scale)" if log else ")"))
    st = report["settings"]
    ax.set_title(f"ganengine vs eager PyTorch: {st['device']}, {st['dtype']}, {st['size']} shapes", fontsize=9)
    if runners:
        ax.legend(fontsize=7, loc="lower right")
    if not labels:
        ax.text(0.5, 0.5, "no speedups measured", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
