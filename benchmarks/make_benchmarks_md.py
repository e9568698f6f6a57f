"""Regenerate BENCHMARKS.md in one command: every table measured now, on this machine.

    python benchmarks/make_benchmarks_md.py [--output BENCHMARKS.md] [--only SECTION ...] [--list]

Runs each section's benchmark script (the commands are printed in the file, so any single table
can be re-measured by hand), captures its Markdown output and writes the page with the machine,
the versions, the git revision, the load average before and after each section and the time it
took, followed by the previous page's hand-written sections (``hand_written``: every section whose
heading is not a generated one's), kept as they are. Sections run one after another;
nothing else should share the cores meanwhile (the load
average printed per section shows whether something did). ``--only`` re-measures some sections
and keeps the others' last output from ``docs/benchmarks_sections.json``. Takes ~40 min on the 2-core
CI-class machine (most of it compiling with torch.compile and the model steps).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# (key, title, command, text above the output)
SECTIONS = [
    ("models", "One training step per model",
     [PY, "benchmarks/bench_models.py", "--models", "cyclegan", "pix2pix", "stargan", "stackgan1", "stackgan2",
      "--warmup", "3", "--repeats", "3", "--split", "--compile"],
     "One full training step (every network forward + backward, every optimiser step). `torch`: the reference's "
     "step (the same module tree on the torch backend, the reference's per-parameter Adam); `ganengine`: fused ops "
     "and the fused Adam; `torch+fused-adam`: the torch backend with only the fused Adam, to show what the optimiser "
     "alone contributes; `compile`: the torch backend with every network wrapped in `torch.compile` (inductor; "
     "the reference's Adam, uncompiled). CycleGAN and pix2pix at their reference size (256x256, batch 1); StarGAN, StackGAN at "
     "CPU-sized batches (StarGAN 128x128 b2 instead of b16, StackGAN I 64x64 b16 instead of 64, II 256x256 b2 "
     "instead of 16: the reference batches take minutes per step on 2 cores). Each model and variant runs in its own process, "
     "3 warm-up steps first (the eager step's allocations settle over its first few steps). Target (issue 5): >= 1.3x the eager "
     "step for CycleGAN and pix2pix, never slower for any model. [docs/models.md](docs/models.md)"),
    ("conv", "Small-map convolutions: one GEMM vs oneDNN (cpu backend)",
     [PY, "benchmarks/bench_conv.py", "--repeats", "5"],
     "4x4 stride-2 convs and transposed convs at the U-Net bottleneck and StarGAN's last discriminator blocks; both "
     "columns are the same ganengine call with the choice forced (the Winograd route off in both). "
     "[docs/conv.md](docs/conv.md)"),
    ("conv4x4", "4x4 convolutions: Winograd vs oneDNN (cpu backend)",
     [PY, "benchmarks/bench_conv4x4.py", "--repeats", "5"],
     "The 4x4 layers of the PatchGAN discriminator, pix2pix's U-Net and StarGAN at their models' shapes: oneDNN in NCHW "
     "and in NHWC vs the Winograd route (F(2, 4) at stride 1, F(3, 2) over the polyphase form at stride 2; transposed "
     "convs as the adjoint), the same ganengine call with the choice forced; `auto picks` is the router's rule. "
     "[docs/conv4x4.md](docs/conv4x4.md)"),
    ("conv3x3", "3x3 convolutions: Winograd F(2x2, 3x3) vs oneDNN (cpu backend)",
     [PY, "benchmarks/bench_conv3x3.py", "--all", "--no-compile", "--repeats", "5"],
     "`--all` runs Winograd on every shape (the `winograd used` column says what the threshold picks). "
     "[docs/conv3x3.md](docs/conv3x3.md)"),
    ("norm_act", "Fused instance norm + LeakyReLU (cpu backend)",
     [PY, "-m", "benchmarks.bench_norm_act", "--repeats", "15", "--json", "docs/bench_norm_act.json"],
     "eager = `F.leaky_relu(F.instance_norm(x, w, b), 0.2)`; torch.compile = the same function compiled (inductor); "
     "floor = `x.clone()` of the same tensor (for tensors that fit in the L3 cache after warm-up an in-cache copy, "
     "so \"/ floor\" overstates the gap there). Targets (issue 2): forward within 2.5x of the floor, "
     "forward+backward >= 3x eager and >= 1.5x torch.compile."),
    ("attention", "SAGAN self-attention (cpu backend)",
     [PY, "benchmarks/bench_attention.py", "--shapes", "1,64,64", "8,64,64", "--impls", "reference", "ganengine",
      "compile", "--repeats", "3"],
     "Forward+backward, C=64 at 64x64: the reference formulation (bmm + softmax), torch.compile of it, ganengine's "
     "flash-style kernel; peak extra memory. [docs/attention.md](docs/attention.md)"),
    ("losses", "CycleGAN loss block (cpu backend)",
     [PY, "-m", "benchmarks.bench_losses", "--repeats", "300", "--threads", "1"],
     "2 lsgan terms on 30x30 maps + 2 cycle + 2 identity L1 terms at 256x256, batch 1, forward + backward. Targets "
     "(issue 4): >= 3x eager, >= 1.5x torch.compile. [docs/losses.md](docs/losses.md)"),
    ("conv_act", "70x70 PatchGAN discriminator forward+backward (cpu backend)",
     [PY, "benchmarks/bench_conv_act.py", "--batch", "1", "4", "--repeats", "5", "--threads", "1"],
     "Target (issue 4): >= 1.3x eager. [docs/conv_act.md](docs/conv_act.md)"),
    ("batch_norm_act", "Fused (conditional) batch norm + activation (cpu backend)",
     [PY, "-m", "benchmarks.bench_batch_norm_act", "--repeats", "15", "--threads", "1"],
     "eager = `F.relu(F.batch_norm(...))` (and the per-sample gain/bias form for BigGAN's ccbn); torch.compile = "
     "the same function compiled; forward+backward; host time at tiny shapes. "
     "[docs/batch_norm_act.md](docs/batch_norm_act.md)"),
    ("spectral_norm", "Spectral norm: a whole discriminator's layers (cpu backend)",
     [PY, "-m", "benchmarks.bench_spectral_norm", "--model", "sagan", "--backend", "cpu", "--threads", "1"],
     "PyTorch's parametrization vs ganengine per layer and grouped (SpectralNormGroup), forward+backward. "
     "[docs/spectral_norm.md](docs/spectral_norm.md)"),
    ("ema", "Generator EMA update",
     [PY, "-m", "benchmarks.bench_ema", "--scale", "2"],
     "BigGAN-128 generator's 166 tensors: BigGAN's per-tensor loop vs torch.optim.swa_utils.AveragedModel vs "
     "ganengine.train.EMA (multi-tensor lerp). [docs/ema.md](docs/ema.md)"),
    ("host_cost", "Host time and kernels per call at tiny shapes",
     [PY, "-m", "ganengine.bench.host_cost", "--rounds", "5", "--calls", "100"],
     "Every fused op at a tiny shape, where the arithmetic is negligible and host time decides: median us per "
     "call, ganengine vs the eager composition interleaved, forward and forward+backward, on the cpu backend; "
     "kernels per call on the CUDA path counted under the Triton interpreter (Triton launches plus the kernels "
     "of the torch ops around them) vs eager's. Target (issue 16): every fused call at or below eager in both. "
     "Run with TRITON_INTERPRET=1 for the kernel counts."),
    ("fuse", "fuse() on the reference networks",
     [PY, "benchmarks/bench_fuse.py", "--widths", "small", "--repeats", "5"],
     "The compact re-writes of the reference networks in `tests/`, the same module code before and after "
     "`ganengine.fuse()`; forward + backward, interleaved in one process. [docs/fuse.md](docs/fuse.md)"),
]


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except Exception:  # not a git checkout
        return "unknown"


def machine() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = float("nan")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version(),
            "git": _git_rev(), "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def section_command(cmd: list[str], store: Path) -> list[str]:
    """``cmd`` with the file its ``--json`` writes moved into the folder of ``store`` (the sections'
    raw output): by default docs/, as quoted in SECTIONS; with another --store, beside it, so a
    run that writes elsewhere never overwrites the repository's docs/ files (cmd runs in ROOT)."""
    out = list(cmd)
    for i in range(len(out) - 1):
        if out[i] == "--json":
            path = store.resolve().parent / Path(out[i + 1]).name
            try:
                out[i + 1] = str(path.relative_to(ROOT))
            except ValueError:  # outside the checkout
                out[i + 1] = str(path)
    return out


def run_section(key: str, cmd: list[str]) -> dict:
    load0 = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return {"key": key, "command": " ".join(["python"] + cmd[1:]), "returncode": proc.returncode,
            "stdout": proc.stdout, "stderr_tail": proc.stderr[-2000:], "seconds": round(time.time() - t0, 1),
            "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2)}


def clean_output(stdout: str) -> str:
    """A script's stdout as Markdown: tables kept, progress rows ("a | b" lines that are not
    table rows) dropped, "# ..." comment lines kept as plain text rather than headings."""
    keep = []
    for line in stdout.splitlines():
        s = line.strip()
        if " | " in s and not s.startswith("|"):
            continue
        s = s[1:].strip() if s.startswith("#") else s
        if keep and keep[-1] and s and keep[-1].startswith("|") != s.startswith("|"):
            keep.append("")  # a table only ends at a blank line
        keep.append(s)
    text = "\n".join(keep).strip()
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text


def hand_written(page: str) -> str:
    """The sections of an existing page that this script does not generate: every "## " section
    whose heading is not one of SECTIONS' titles (the re-measurements and session notes written
    after a run, each with the command that measured it), in their order, kept as they are."""
    generated = {f"## {title}" for _key, title, _cmd, _text in SECTIONS}
    kept, keep = [], False
    for line in page.splitlines():
        if line.startswith("## "):
            keep = line.rstrip() not in generated
        elif line.startswith("# "):
            keep = False
        if keep:
            kept.append(line)
    return "\n".join(kept).strip() + "\n" if kept else ""


def build_markdown(results: dict, info: dict, kept: str = "") -> str:
    """The page from {section key: run_section(...) result} and machine(), then ``kept`` (the
    previous page's hand-written sections, ``hand_written``)."""
    gpu = info.get("gpu") or "no GPU"
    out = ["# Benchmarks", "",
           "Generated by `python benchmarks/make_benchmarks_md.py` (do not edit the generated sections by hand: "
           "rerun it). Every table in them was measured by the command above it, in one run of that script; the "
           "sections after them (`--list` names the generated ones) are re-measurements and session notes written "
           "by hand, each with its own command, which the script keeps as they are:", "",
           f"- machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, {gpu}; CPU capability "
           f"{info['capability']}",
           f"- torch {info['torch']}, {info['threads']} threads, Python {info['python']}; git {info['git']}; "
           f"{info['date']}", "",
           "Ratios come from one run in which the variants were timed interleaved or back to back (median of the "
           "repeats). The GPU proxy (bytes each Triton kernel moves, counted under the interpreter) and the "
           "ahead-of-time resource table are in [docs/benchmarks_generated.md](docs/benchmarks_generated.md) "
           "(`python -m ganengine.tools.bench_tables`).", ""]
    for key, title, _cmd, text in SECTIONS:
        r = results.get(key)
        out += [f"## {title}", ""]
        if r is None:
            out += ["Not measured in this run.", ""]
            continue
        out += ["```", r["command"], "```", "", text, "",
                f"Load average {r['load_before']} before, {r['load_after']} after; {r['seconds']} s.", ""]
        if r["returncode"] != 0:
            out += [f"**The command failed (exit {r['returncode']})**; its last output:", "", "```",
                    r["stderr_tail"].strip(), "```", ""]
        out += [clean_output(r["stdout"]), ""]
    if kept:
        out += [kept]
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--store", default=str(ROOT / "docs" / "benchmarks_sections.json"),
                    help="every section's raw output (commands, stdout, load, time), read back by --only")
    ap.add_argument("--only", nargs="+", choices=[s[0] for s in SECTIONS], help="re-measure only these sections")
    ap.add_argument("--list", action="store_true", help="print the sections and their commands, run nothing")
    args = ap.parse_args(argv)
    if args.list:
        for key, title, cmd, _ in SECTIONS:
            print(f"{key:10s} {title}\n           python {' '.join(cmd[1:])}")
        return 0
    store = Path(args.store)
    store.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(store.read_text()) if (args.only and store.exists()) else {}
    for key, _title, cmd, _text in SECTIONS:
        if args.only and key not in args.only:
            continue
        cmd = section_command(cmd, store)
        print(f"[{key}] python {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        results[key] = run_section(key, cmd)
        print(f"[{key}] exit {results[key]['returncode']} in {results[key]['seconds']} s", file=sys.stderr, flush=True)
        store.write_text(json.dumps(results, indent=1))
    output = Path(args.output)
    kept = hand_written(output.read_text()) if output.exists() else ""
    output.write_text(build_markdown(results, machine(), kept))
    print(f"wrote {args.output} and {store}", file=sys.stderr)
    return 0 if all(r["returncode"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
