"""First run on a GPU machine: one command that checks and measures what no CPU can.

    make gpu-check                      # = python -m ganengine.tools.gpu_check --out gpu_check_report
    python -m ganengine.tools.gpu_check [--out DIR] [--budget SECONDS] [--only CHECK ...] [--dry-run]

Prints one line per result (``OK``, ``FAIL``, ``SKIP`` or a figure), never stops at the first
failure, and writes ``report.json`` and ``report.md`` into ``--out``. Every check runs in its
own try/except under its own time budget (SIGALRM), and a total budget (default 450 s: the
whole run fits 8 minutes on one H100/H200 with start-up) skips what no longer fits, with a
line saying so. The checks, in order of value:

  env             device, capability, SMs, versions, which backends serve CUDA tensors
  attention_bf16  bf16 tl.dot has never run anywhere: attention in bf16 against fp64, first
  pytest_gpu      every gpu-marked test (pytest -m gpu, 4 processes), one line with the counts
  determinism     every op (batch norm and conditional batch norm included) twice, forward and
                  backward: bitwise equal (triton and cuda;
                  cuDNN pinned to deterministic algorithms for the vendor-conv paths)
  cuda_graph      capture and replay of a step using conv_act, batch norm (running statistics),
                  instance norm, attention and the losses
  large_shapes    pix2pixHD-size launches (1x8x1100x2048 conv_act, many-plane instance norms,
                  batch norm over 1x64x1100x2048 and 512x512x4x4) vs torch
  second_device   tensors on cuda:1 while cuda:0 is current (skipped with one device)
  speed_norm_act  instance and batch norm forward: GB/s vs a copy of the same tensor (NCHW/NHWC,
                  split and single-plane)
  speed_attention TFLOP/s forward and forward+backward
  speed_losses    latency per call, Triton vs the C++ CUDA kernels
  host_cost       every fused op at a tiny shape vs its eager composition: us per call (host-bound)
                  and kernels per call, per backend, forward and forward+backward (the cost rule)
  sanitizer       compute-sanitizer --tool memcheck on one tiny case per kernel family
  speed_models    CycleGAN and pix2pix steps at 256x256 batch 1: ganengine vs eager vs
                  torch.compile, fp32 and bf16 autocast

``GANENGINE_GPU_CHECK_DRY=1`` (or ``--dry-run``): tiny shapes, CPU tensors under the Triton
interpreter, no GPU; every check's code runs (what needs a GPU reports SKIP). CI runs it
(tests/test_gpu_readiness.py) so this script cannot rot.
"""
from __future__ import annotations

import os
import sys

DRY = os.environ.get("GANENGINE_GPU_CHECK_DRY", "0") not in ("", "0") or "--dry-run" in sys.argv
if DRY:  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Result:
    check: str
    status: str          # OK, FAIL, SKIP, INFO (a figure)
    label: str
    figure: str = ""
    seconds: float = 0.0
    details: dict = dataclasses.field(default_factory=dict)

    def line(self) -> str:
        what = f"{self.check}: {self.label}" if self.label else self.check
        return f"{self.status:<5} {what}" + (f"  {self.figure}" if self.figure else "")


class CheckTimeout(Exception):
    pass


class Ctx:
    """What a check needs: the device, the mode, where to write, how to time, how to report."""

    def __init__(self, dry: bool, out: Path, deadline: float, printer=print):
        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")
        self.out = out
        self.deadline = deadline
        self.results: list[Result] = []
        self.check = ""
        self._print = printer
        self._t0 = time.perf_counter()

    def emit(self, status: str, label: str = "", figure: str = "", **details) -> None:
        r = Result(self.check, status, label, figure, round(time.perf_counter() - self._t0, 2), details)
        self.results.append(r)
        self._print(r.line(), flush=True) if self._print is print else self._print(r.line())

    def time_left(self) -> float:
        return self.deadline - time.perf_counter()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def bench_ms(self, fn: Callable[[], object], reps: int = 50) -> float:
        """Median time of fn in ms: triton.testing.do_bench on a GPU, a perf_counter median on CPU."""
        if self.device.type == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median"))
        fn()
        times = []
        for _ in range(1 if self.dry else 3):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)


# ----------------------------------------------------------------------------- helpers
def _backends_for_device(ctx: Ctx) -> list[str]:
    """Fused backends that serve this device (cuda: triton and the CUDA C++ kernels)."""
    from ganengine import backends

    names = ["triton", "cuda"] if ctx.device.type == "cuda" else ["triton"]
    return [n for n in names if backends.serves(n, ctx.device)]


def _backend_ctx(backend: str):
    """use_backend without strict mode: ops the backend does not serve run on torch."""
    import ganengine

    return ganengine.use_backend(backend)


@contextlib.contextmanager
def _on(backend: str):
    import ganengine
    from ganengine import backends

    with ganengine.use_backend(backend), backends.strict():
        yield


def _op_cases(ctx: Ctx, dtype=torch.float32):
    """(name, fn(inputs) -> outputs, make_inputs()) for every fused op, at small shapes."""
    import ganengine.functional as GF
    from ganengine.ops import attention as attn_ops

    dev = ctx.device
    s = 8 if ctx.dry else 64

    def rnd(*shape, cl=False, scale=1.0):
        t = torch.randn(*shape, device=dev, dtype=torch.float32) * scale
        t = t.to(dtype)
        return t.contiguous(memory_format=torch.channels_last) if cl else t

    def norm(cl):
        return lambda: [rnd(2, 16, s, s, cl=cl), rnd(16), rnd(16)], lambda x, w, b: GF.instance_norm_act(x, w, b)

    def attention():
        c = 16 if ctx.dry else 64
        return (lambda: [rnd(2, c // 8, s * s // 4), rnd(2, c // 8, s * s // 4), rnd(2, c, s * s // 4),
                         rnd(2, c, s * s // 4), torch.tensor([0.5], device=dev)],
                lambda q, k, v, x, g: attn_ops.attention(q, k, v, x, g))

    def conv_act(cl):
        return (lambda: [rnd(1, 8, s, s, cl=cl), rnd(16, 8, 4, 4, scale=0.1), rnd(16)],
                lambda x, w, b: GF.conv2d_act(x, w, b, stride=2, padding=1))

    def conv_in_act():
        return (lambda: [rnd(1, 8, s, s), rnd(16, 8, 4, 4, scale=0.1), rnd(16)],
                lambda x, w, b: GF.conv2d_instance_norm_act(x, w, b, stride=2, padding=1))

    def batch_norm(cl):  # training, leaky ReLU; the running statistics are covered by the step below
        return (lambda: [rnd(4, 16, s // 2, s // 2, cl=cl), rnd(16), rnd(16)],
                lambda x, w, b: GF.batch_norm_act(x, None, None, w, b, activation="leaky_relu"))

    def cond_batch_norm():  # BigGAN's per-sample gain and bias
        return (lambda: [rnd(4, 16, s // 2, s // 2), rnd(4, 16), rnd(4, 16)],
                lambda x, g, b: GF.conditional_batch_norm_act(x, g, b))

    def losses():
        n = 8 if ctx.dry else 30
        return (lambda: [rnd(1, 1, n, n), rnd(1, 1, n, n)] + [rnd(1, 3, s, s) for _ in range(4)],
                lambda r, f, a, ra, b, rb: (GF.discriminator_loss(r, f, "vanilla"), GF.gan_loss([r, f], True, "lsgan"),
                                            GF.cycle_loss(a, ra, b, rb)[0]))

    cases = [("instance_norm_act nchw", *norm(False)), ("instance_norm_act nhwc", *norm(True)),
             ("attention", *attention()), ("conv2d_act nchw", *conv_act(False)),
             ("conv2d_act nhwc", *conv_act(True)), ("conv2d_instance_norm_act", *conv_in_act()),
             ("batch_norm_act nchw", *batch_norm(False)), ("batch_norm_act nhwc", *batch_norm(True)),
             ("conditional_batch_norm_act", *cond_batch_norm()), ("losses", *losses())]
    return [(name, fn, make) for name, make, fn in cases]


# the op cases the CUDA C++ backend serves (the rest run on Triton only)
_CUDA_CPP_OPS = ("instance_norm_act", "batch_norm_act", "conditional_batch_norm_act", "losses", "conv2d_act",
                 "conv2d_instance_norm_act")


def _run_fwd_bwd(fn, inputs, seed=0):
    """Outputs and input gradients of sum(out * fixed random weights)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator(device="cpu").manual_seed(seed)
    total = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    total.backward()
    return [o.detach() for o in outs], [t.grad for t in leaves if t.grad is not None]


def _run_group(cmd: list[str], timeout: float, env=None) -> tuple[str, int | None]:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (pytest-xdist
    workers, sanitizer children) and return what it printed so far. (output, returncode or None)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return out, proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return out or "", None


# ----------------------------------------------------------------------------- checks
def check_env(ctx: Ctx):
    import triton

    from ganengine import _ext, backends

    if ctx.device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        ctx.emit("INFO", "device", f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                 f"{p.total_memory / 2 ** 30:.0f} GiB, {torch.cuda.device_count()} device(s)")
    else:
        ctx.emit("INFO", "device", "cpu (dry run: Triton interpreter)")
    ctx.emit("INFO", "versions", f"torch {torch.__version__}, triton {triton.__version__}, "
             f"CUDA {torch.version.cuda}, ganengine._C {'built' if _ext.loaded() else 'not built'} "
             f"({'with' if _ext.build_info().get('with_cuda') else 'without'} CUDA kernels)")
    serving = [n for n in ("triton", "cuda", "cpu") if backends.serves(n, ctx.device)]
    want = {"triton", "cuda"} if ctx.device.type == "cuda" else {"triton"}
    missing = sorted(want - set(serving))
    ctx.emit("FAIL" if missing else "OK", "backends serving this device", ", ".join(serving) +
             (f"; missing {missing}: {[backends.status()[m] for m in missing]}" if missing else ""))


def check_attention_bf16(ctx: Ctx):
    """The first bf16 tl.dot anywhere: forward and backward against an fp64 reference."""
    from ganengine.ops import attention as attn_ops

    dtype = torch.float16 if ctx.dry else torch.bfloat16  # the interpreter's bf16 tl.dot is broken
    u = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    b, c, n = (1, 16, 64) if ctx.dry else (2, 256, 1024)
    torch.manual_seed(0)
    q64, k64 = torch.randn(b, c // 8, n, dtype=torch.float64) * 0.5, torch.randn(b, c // 8, n, dtype=torch.float64) * 0.5
    v64, x64 = torch.randn(b, c, n, dtype=torch.float64), torch.randn(b, c, n, dtype=torch.float64)
    g = torch.tensor([0.7], dtype=torch.float64)
    ins = [t.to(dtype).to(torch.float64) for t in (q64, k64, v64, x64)]  # the rounded inputs
    ref_leaves = [t.clone().requires_grad_() for t in ins[:3]]
    ref = attn_ops.reference_attention(*ref_leaves, ins[3], g)
    gout = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * gout).sum(), ref_leaves)
    leaves = [t.to(ctx.device, dtype).requires_grad_() for t in ins[:3]]
    with _on("triton"):
        out = attn_ops.attention(*leaves, ins[3].to(ctx.device, dtype), g.float().to(ctx.device))
        grads = torch.autograd.grad((out.float() * gout.to(ctx.device).float()).sum(), leaves)
    # error relative to the output scale, in units of the format's unit roundoff
    for name, a, r in [("out", out, ref)] + list(zip(("dq", "dk", "dv"), grads, ref_grads)):
        err = (a.double().cpu() - r).abs().max().item() / max(r.abs().max().item(), 1e-30)
        ok = err < 64 * u  # a wrong index or layout gives errors of the size of the values
        ctx.emit("OK" if ok else "FAIL", f"{str(dtype)[6:]} {name} vs fp64", f"max rel error {err:.2e} ({err / u:.1f} u)")


def check_pytest_gpu(ctx: Ctx):
    files = ["tests/test_norm_act.py", "tests/test_attention.py", "tests/test_losses.py", "tests/test_conv_act.py",
             "tests/test_batch_norm_act.py", "tests/test_gpu_readiness.py"]
    files = [f for f in files if (REPO / f).exists()]
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-rfE"]
    if ctx.dry:
        cmd += ["--collect-only", "-q"]
    else:
        cmd += ["-v", "-n", "4"]
    budget = max(10.0, min(200.0, ctx.time_left() - 220))
    log = ctx.out / "pytest_gpu.log"
    env = dict(os.environ)
    if ctx.dry:
        env.pop("GANENGINE_GPU_CHECK_DRY", None)
    text, code = _run_group(cmd + files, budget, env)
    timed_out = code is None
    log.write_text(text)
    if ctx.dry:
        n = sum(1 for line in text.splitlines() if "::" in line)
        ctx.emit("OK" if n else "FAIL", "collected (dry run: not run)", f"{n} gpu-marked tests", log=str(log))
        return
    passed = text.count(" PASSED")
    failed = text.count(" FAILED") + text.count(" ERROR")
    skipped = text.count(" SKIPPED")
    status = "FAIL" if (failed or timed_out or passed == 0) else "OK"
    ctx.emit(status, "pytest -m gpu", f"{passed} passed, {failed} failed, {skipped} skipped"
             + (f", timed out after {budget:.0f} s" if timed_out else ""), log=str(log))
    for line in [x for x in text.splitlines() if x.startswith("FAILED") or x.startswith("ERROR")][:15]:
        ctx.emit("FAIL", "test", line[:200])


@contextlib.contextmanager
def _deterministic_cudnn():
    """cuDNN's backward algorithms may use atomics: pin deterministic ones (vendor conv paths)."""
    old = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old


def check_determinism(ctx: Ctx):
    with _deterministic_cudnn():
        _determinism(ctx)


def _determinism(ctx: Ctx):
    for backend in _backends_for_device(ctx):
        for name, fn, make in _op_cases(ctx):
            if backend == "cuda" and not name.startswith(_CUDA_CPP_OPS):
                continue  # the CUDA C++ kernels cover the norms and the losses
            torch.manual_seed(1)
            inputs = make()
            try:
                with _on(backend):
                    a = _run_fwd_bwd(fn, inputs)
                    b = _run_fwd_bwd(fn, inputs)
            except Exception as exc:
                ctx.emit("FAIL", f"{backend} {name}", f"{type(exc).__name__}: {exc}"[:200])
                continue
            same = all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))
            ctx.emit("OK" if same else "FAIL", f"{backend} {name}", "bitwise equal across two runs" if same
                     else "results differ between two runs")


def _step_fn(ctx: Ctx, dtype=torch.float32):
    """A small discriminator step using conv_act, batch_norm_act (running statistics updated in
    place), norm_act, attention and the losses."""
    import ganengine.functional as GF
    from ganengine.ops import attention as attn_ops

    dev = ctx.device
    s = 8 if ctx.dry else 32
    torch.manual_seed(0)
    w1 = (torch.randn(16, 3, 4, 4, device=dev) * 0.1).requires_grad_()
    w2 = (torch.randn(16, 16, 3, 3, device=dev) * 0.1).requires_grad_()
    wq = (torch.randn(2, 16, 1, 1, device=dev) * 0.1).requires_grad_()
    wk = (torch.randn(2, 16, 1, 1, device=dev) * 0.1).requires_grad_()
    wv = (torch.randn(16, 16, 1, 1, device=dev) * 0.1).requires_grad_()
    wo = (torch.randn(1, 16, 4, 4, device=dev) * 0.1).requires_grad_()
    gamma = torch.tensor([0.5], device=dev, requires_grad=True)
    bn_w = torch.ones(16, device=dev, requires_grad=True)
    bn_b = torch.zeros(16, device=dev, requires_grad=True)
    running_mean, running_var = torch.zeros(16, device=dev), torch.ones(16, device=dev)  # updated in place
    params = [w1, w2, wq, wk, wv, wo, gamma, bn_w, bn_b]
    real = torch.randn(1, 3, s, s, device=dev)
    fake = torch.randn(1, 3, s, s, device=dev)
    rec = torch.randn(1, 3, s, s, device=dev)

    def disc(img):
        h = GF.conv2d_act(img, w1, None, stride=2, padding=1)
        h = GF.batch_norm_act(h, running_mean, running_var, bn_w, bn_b, activation="leaky_relu")
        h = torch.nn.functional.conv2d(h, w2, padding=1)
        h = GF.instance_norm_act(h)
        q, k, v = (torch.nn.functional.conv2d(h, w).flatten(2) for w in (wq, wk, wv))
        h = attn_ops.attention(q, k, v, h.flatten(2), gamma).view_as(h)
        return torch.nn.functional.conv2d(h, wo, padding=1)

    def step():
        for p in params:
            p.grad = None
        loss = GF.discriminator_loss(disc(real), disc(fake), "lsgan") + GF.cycle_loss(real, rec, fake, rec)[0]
        loss.backward()
        return [loss.detach()] + [p.grad for p in params]

    return step


def check_cuda_graph(ctx: Ctx):
    with _deterministic_cudnn():
        _cuda_graph(ctx)


def _cuda_graph(ctx: Ctx):
    for backend in _backends_for_device(ctx):
        if backend == "cuda":
            continue  # the step's attention runs on Triton; "auto" below covers the mix
        with _on(backend):
            step = _step_fn(ctx)
            eager = [t.clone() for t in step()]
            if ctx.device.type != "cuda":
                again = step()
                ok = all(torch.equal(a, b) for a, b in zip(eager, again))
                ctx.emit("OK" if ok else "FAIL", f"{backend} step (eager, dry run)", "ran twice, bitwise equal")
                ctx.emit("SKIP", f"{backend} capture + replay", "needs a CUDA device")
                continue
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):  # warm up: compile, autotune, allocate, fill the launchers' caches
                    step()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = step()
            graph.replay()
            torch.cuda.synchronize()
            ok = all(torch.equal(a, b) for a, b in zip(eager, captured))
            close = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(eager, captured))
            ctx.emit("OK" if ok or close else "FAIL", f"{backend} capture + replay",
                     "replay equals eager bitwise" if ok else ("replay close to eager (not bitwise)" if close
                                                              else "replay differs from eager"))


def check_large_shapes(ctx: Ctx):
    import torch.nn.functional as F

    import ganengine.functional as GF
    from ganengine.ops import conv_act as conv_ops

    dev = ctx.device
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    h, w = (11, 20) if ctx.dry else (1100, 2048)
    torch.manual_seed(0)
    x = torch.randn(1, 8, h, w, device=dev).to(dtype)
    wt = (torch.randn(64, 8, 4, 4, device=dev) * 0.1).to(dtype)
    ref = F.leaky_relu(F.conv2d(x.float(), wt.float(), stride=1, padding=1), 0.2)
    impls = ["igemm"] if ctx.dry else ["igemm", "vendor"]
    for impl in impls:
        with _on("triton"), conv_ops.triton_conv_impl(impl):
            y = GF.conv2d_act(x, wt, None, stride=1, padding=1)
        err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
        ok = err < (2e-2 if dtype == torch.bfloat16 else 1e-4)
        ctx.emit("OK" if ok else "FAIL", f"conv2d_act {impl} 1x8x{h}x{w} -> 64 ch", f"max rel error {err:.1e}")
    if "cuda" in _backends_for_device(ctx):  # the cuda backend's epilogues over the same map
        with _on("cuda"):
            y = GF.conv2d_act(x, wt, None, stride=1, padding=1)
        err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
        ok = err < (2e-2 if dtype == torch.bfloat16 else 1e-4)
        ctx.emit("OK" if ok else "FAIL", f"conv2d_act cuda 1x8x{h}x{w} -> 64 ch", f"max rel error {err:.1e}")
    xg = x.detach().clone().requires_grad_()
    with _on("triton"), conv_ops.triton_conv_impl("igemm"):
        GF.conv2d_act(xg, wt, None, stride=1, padding=1).float().sum().backward()
    ctx.emit("OK" if torch.isfinite(xg.grad).all() else "FAIL", "conv2d_act igemm backward at that size",
             "finite data gradient")
    shapes = [(64, 64, 3, 3), (2, 8, 9, 9)] if ctx.dry else [(512, 1024, 4, 4), (1, 64, h, w), (1, 3, 2048, 2048)]
    for shape in shapes:
        x = torch.randn(shape, device=dev).to(dtype)
        ref = F.leaky_relu(F.instance_norm(x.float()), 0.2)
        for backend in _backends_for_device(ctx):
            with _on(backend):
                y = GF.instance_norm_act(x)
            err = (y.float() - ref).abs().max().item()
            ok = err < (5e-2 if dtype == torch.bfloat16 else 1e-4)
            ctx.emit("OK" if ok else "FAIL", f"instance_norm_act {backend} {'x'.join(map(str, shape))}",
                     f"max abs error {err:.1e}")
    # batch norm: one channel's statistics over N*H*W = 2.25M elements (split reduction), and DCGAN's
    # many small planes
    shapes = [(4, 8, 11, 20), (64, 32, 4, 4)] if ctx.dry else [(1, 64, h, w), (512, 512, 4, 4)]
    for shape in shapes:
        x = torch.randn(shape, device=dev).to(dtype)
        ref = F.leaky_relu(F.batch_norm(x.float(), None, None, training=True), 0.0)
        for backend in _backends_for_device(ctx):
            with _on(backend):
                y = GF.batch_norm_act(x)
            err = (y.float() - ref).abs().max().item()
            ok = err < (5e-2 if dtype == torch.bfloat16 else 1e-4)
            ctx.emit("OK" if ok else "FAIL", f"batch_norm_act {backend} {'x'.join(map(str, shape))}",
                     f"max abs error {err:.1e}")


def check_second_device(ctx: Ctx):
    with _deterministic_cudnn():
        _second_device(ctx)


def _second_device(ctx: Ctx):
    if ctx.device.type == "cuda" and torch.cuda.device_count() < 2:
        ctx.emit("SKIP", "cuda:1", "one CUDA device: tensors on a second device not checked")
        return
    first = ctx.device if ctx.dry else torch.device("cuda:0")
    second = ctx.device if ctx.dry else torch.device("cuda:1")
    for backend in _backends_for_device(ctx):
        for name, fn, make in _op_cases(ctx):
            if backend == "cuda" and not name.startswith(_CUDA_CPP_OPS):
                continue
            torch.manual_seed(2)
            inputs = make()
            with _on(backend):
                a = _run_fwd_bwd(fn, [t.to(first) for t in inputs])
                with torch.cuda.device(first) if first.type == "cuda" else contextlib.nullcontext():
                    b = _run_fwd_bwd(fn, [t.to(second) for t in inputs])
            same = all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a[0] + a[1], b[0] + b[1]))
            where = "cpu twice (dry run)" if ctx.dry else "cuda:1 with cuda:0 current"
            ctx.emit("OK" if same else "FAIL", f"{backend} {name}", f"{where}: " + ("same bits as on cuda:0"
                                                                                if same else "differs"))


_SANITIZER_CASE = r"""
import torch, ganengine, ganengine.functional as GF
from ganengine.ops import attention as A
from ganengine import backends
dev = "cuda"
for be in [b for b in ("triton", "cuda") if backends.serves(b, torch.device(dev))]:
    with ganengine.use_backend(be):
        x = torch.randn(2, 5, 7, 9, device=dev, requires_grad=True)
        GF.instance_norm_act(x, torch.randn(5, device=dev), torch.randn(5, device=dev)).sum().backward()
        xl = torch.randn(2, 5, 7, 9, device=dev).contiguous(memory_format=torch.channels_last).requires_grad_()
        GF.instance_norm_act(xl).sum().backward()
        rm, rv = torch.zeros(5, device=dev), torch.ones(5, device=dev)
        for xb in (x, xl):
            GF.batch_norm_act(xb, rm, rv, torch.randn(5, device=dev), torch.randn(5, device=dev)).sum().backward()
            GF.batch_norm_act(xb.detach(), rm, rv, training=False)
        gb = torch.randn(2, 5, device=dev, requires_grad=True)
        GF.conditional_batch_norm_act(x, gb, gb * 0.5).sum().backward()
        if be == "cuda":  # conv_act's cuda backend (the triton one is below)
            for xc in (x, xl):
                wc = torch.randn(4, 5, 3, 3, device=dev, requires_grad=True)
                GF.conv2d_act(xc, wc, torch.randn(4, device=dev), stride=2, padding=1).sum().backward()
                GF.conv2d_instance_norm_act(xc, wc, None, stride=1, padding=1).sum().backward()
        r = torch.randn(1, 1, 5, 5, device=dev, requires_grad=True)
        f = torch.randn(1, 1, 5, 5, device=dev, requires_grad=True)
        for mode in ("vanilla", "lsgan", "hinge", "wgangp"):
            GF.discriminator_loss(r, f, mode).backward()
        imgs = [torch.randn(1, 3, 9, 9, device=dev, requires_grad=True) for _ in range(4)]
        GF.cycle_loss(*imgs)[0].backward()
        if be == "triton":
            q, k = (torch.randn(1, 2, 33, device=dev, requires_grad=True) for _ in range(2))
            v, xx = torch.randn(1, 16, 33, device=dev, requires_grad=True), torch.randn(1, 16, 33, device=dev)
            A.attention(q, k, v, xx, torch.tensor([0.5], device=dev)).sum().backward()
            from ganengine.ops import conv_act as C
            for impl in ("igemm", "vendor"):
                with C.triton_conv_impl(impl):
                    xc = torch.randn(1, 3, 11, 13, device=dev, requires_grad=True)
                    wc = torch.randn(8, 3, 4, 4, device=dev, requires_grad=True)
                    GF.conv2d_act(xc, wc, None, stride=2, padding=1).sum().backward()
                    GF.conv2d_instance_norm_act(xc, wc, None, stride=1, padding=1).sum().backward()
torch.cuda.synchronize()
print("sanitizer case done")
"""


def _find_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "compute-sanitizer")):
            return os.path.join(root, "bin", "compute-sanitizer")
    return None


def check_sanitizer(ctx: Ctx):
    tool = _find_sanitizer()
    if ctx.dry:
        compile(_SANITIZER_CASE, "<sanitizer case>", "exec")  # at least the script parses
        ctx.emit("SKIP", "memcheck", f"dry run (compute-sanitizer {'at ' + tool if tool else 'not found'})")
        return
    if tool is None:
        ctx.emit("SKIP", "memcheck", "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
        return
    log = ctx.out / "sanitizer.log"
    budget = max(30.0, min(150.0, ctx.time_left() - 90))
    text, code = _run_group([tool, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-c",
                             _SANITIZER_CASE], budget)
    log.write_text(text)
    if code is None:
        ctx.emit("FAIL", "memcheck", f"timed out after {budget:.0f} s", log=str(log))
        return
    summary = next((x for x in text.splitlines() if "ERROR SUMMARY" in x), "no summary")
    ok = code == 0 and "sanitizer case done" in text and "0 errors" in summary
    ctx.emit("OK" if ok else "FAIL", "memcheck (norm_act, batch_norm_act, losses, attention, conv_act; triton + cuda)",
             summary.strip(), log=str(log))


def _kernel_us(ctx: Ctx, fn: Callable[[], object], calls: int = 20) -> tuple[float, int]:
    """(device time of the kernels per call in us, kernels per call), read with torch.profiler:
    beside a do_bench time it says whether a call is bound by its kernels or by the host."""
    from torch.profiler import ProfilerActivity, profile

    if ctx.device.type != "cuda":
        return float("nan"), 0
    fn()
    ctx.sync()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            ctx.sync()
        evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return sum(e.device_time_total for e in evs) / calls, round(len(evs) / calls)
    except Exception:  # noqa: BLE001 - a figure the profiler cannot give must not stop the timings
        return float("nan"), -1


def _norm_eager(op: str, x, rm, rv):
    import torch.nn.functional as F

    if op == "instance_norm_act":
        return lambda: F.leaky_relu(F.instance_norm(x), 0.2)
    return lambda: F.leaky_relu(F.batch_norm(x, rm, rv, training=True), 0.2)


def check_speed_norm_act(ctx: Ctx):
    """Forward and forward+backward of each norm against eager (F.instance_norm / F.batch_norm +
    leaky_relu) and a copy, with the kernels' own device time beside do_bench's (a do_bench time
    far above the kernel time is host time)."""
    import ganengine.functional as GF

    shapes = [(1, 4, 16, 16)] if ctx.dry else [(1, 64, 256, 256), (1, 128, 128, 128), (1, 256, 64, 64),
                                               (16, 64, 128, 128)]
    dtypes = [torch.float32] if ctx.dry else [torch.bfloat16, torch.float32]
    for dtype in dtypes:
        for shape in shapes:
            for cl in (False, True):
                x = torch.randn(shape, device=ctx.device).to(dtype)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                xg = x.detach().clone().requires_grad_()
                gy = torch.randn_like(x)
                y = torch.empty_like(x)
                copy_ms = ctx.bench_ms(lambda: y.copy_(x))
                rm, rv = torch.zeros(shape[1], device=ctx.device), torch.ones(shape[1], device=ctx.device)
                fused = {"instance_norm_act": lambda t: GF.instance_norm_act(t),
                         "batch_norm_act": lambda t: GF.batch_norm_act(t, rm, rv)}  # training, running stats
                tag = f"{str(dtype)[6:]} {'NHWC' if cl else 'NCHW'} {'x'.join(map(str, shape))}"
                for op, call in fused.items():
                    variants = [("eager", contextlib.nullcontext, _norm_eager(op, x, rm, rv),
                                 _norm_eager(op, xg, rm, rv))]
                    variants += [(b, functools.partial(_on, b), functools.partial(call, x), functools.partial(call, xg))
                                 for b in _backends_for_device(ctx)]
                    for label, where, fwd, fwd_g in variants:
                        with where():
                            ms = ctx.bench_ms(fwd)
                            ms_bwd = ctx.bench_ms(lambda: torch.autograd.backward(fwd_g(), gy))
                            k_us, k_n = _kernel_us(ctx, fwd)
                        gbs = 2 * x.numel() * x.element_size() / ms / 1e6
                        ctx.emit("INFO", f"{op} {label} {tag}",
                                 f"forward {ms:.3f} ms ({gbs:.0f} GB/s, {copy_ms / ms * 100:.0f}% of a copy at "
                                 f"{copy_ms:.3f} ms; kernels {k_us:.1f} us in {k_n}), forward+backward {ms_bwd:.3f} ms",
                                 ms=ms, ms_fwd_bwd=ms_bwd, kernel_us=k_us, kernels=k_n, copy_ms=copy_ms)


def check_speed_attention(ctx: Ctx):
    from ganengine.ops import attention as attn_ops

    cases = [(1, 16, 64, torch.float32)] if ctx.dry else [(8, 256, 1024, torch.bfloat16), (8, 256, 1024, torch.float32),
                                                         (4, 512, 4096, torch.bfloat16)]
    for b, c, n, dtype in cases:
        q, k = (torch.randn(b, c // 8, n, device=ctx.device).to(dtype).requires_grad_() for _ in range(2))
        v = torch.randn(b, c, n, device=ctx.device).to(dtype).requires_grad_()
        x = torch.randn(b, c, n, device=ctx.device).to(dtype)
        g = torch.tensor([0.5], device=ctx.device)
        flops = 2.0 * b * n * n * (c // 8 + c)
        with _on("triton"):
            fwd = ctx.bench_ms(lambda: attn_ops.attention(q, k, v, x, g))
            out = attn_ops.attention(q, k, v, x, g)
            grad = torch.randn_like(out)
            both = ctx.bench_ms(lambda: torch.autograd.grad(attn_ops.attention(q, k, v, x, g), (q, k, v), grad))
        # backward: P recomputed (qk^T) twice + dO v^T twice + dv + dk + dq ~ 2.5x the forward's flops
        ctx.emit("INFO", f"triton {str(dtype)[6:]} B={b} C={c} N={n}",
                 f"forward {fwd:.3f} ms ({flops / fwd / 1e9:.1f} TFLOP/s), forward+backward {both:.3f} ms "
                 f"({3.5 * flops / both / 1e9:.1f} TFLOP/s)", forward_ms=fwd, fwd_bwd_ms=both)


def check_speed_losses(ctx: Ctx):
    import ganengine.functional as GF

    n = 8 if ctx.dry else 30
    s = 16 if ctx.dry else 256
    r, f = (torch.randn(1, 1, n, n, device=ctx.device, requires_grad=True) for _ in range(2))
    imgs = [torch.randn(1, 3, s, s, device=ctx.device, requires_grad=True) for _ in range(4)]
    for backend in _backends_for_device(ctx) + ["torch"]:
        with _on(backend):
            d_ms = ctx.bench_ms(lambda: GF.discriminator_loss(r, f, "lsgan").backward())
            c_ms = ctx.bench_ms(lambda: GF.cycle_loss(*imgs)[0].backward())
            calls = 20 if ctx.dry else 200
            ctx.sync()
            t = time.perf_counter()
            for _ in range(calls):
                GF.discriminator_loss(r, f, "lsgan")
            ctx.sync()
            host_us = (time.perf_counter() - t) / calls * 1e6
        ctx.emit("INFO", f"{backend} losses", f"discriminator_loss {n}x{n} fwd+bwd {d_ms * 1e3:.0f} us, "
                 f"cycle_loss 4x{s}x{s} fwd+bwd {c_ms * 1e3:.0f} us, forward call incl. host {host_us:.0f} us",
                 disc_ms=d_ms, cycle_ms=c_ms, host_us=host_us)


def check_speed_models(ctx: Ctx):
    from ganengine.bench.cases_models import MODEL_SPECS, make_batch
    from ganengine.models import build_model
    from ganengine.train.context import AmpContext

    # ganengine: the auto backend order (instance norm on NCHW planes and the losses on the CUDA
    # C++ entries, the rest on Triton); "ganengine[triton]": Triton wherever it serves;
    # "ganengine[cuda]": the CUDA C++ kernels where they exist (norms, losses) and torch elsewhere:
    # the three measure which order should be the default (ordered so that a short budget still
    # gets the comparison with eager and torch.compile)
    variants = [("ganengine", True, False), ("eager", False, False), ("ganengine[triton]", True, False),
                ("torch.compile", False, True), ("ganengine[cuda]", True, False)]
    amps = ["off"] if ctx.dry else ["off", "bf16"]
    tiny = dict(crop_size=32, ngf=4, ndf=4, netG="resnet_6blocks", n_layers_D=2)
    for name in ("cyclegan", "pix2pix"):
        size = "ref"
        spec = MODEL_SPECS[name]
        if ctx.dry:  # the code path at a size the interpreter and a loaded CPU run in seconds
            spec = dict(ref=tiny, batch=dict(ref=(1, 32)))
        for amp in amps:
            times = {}
            for label, fused, compiled in variants:
                if compiled and ctx.dry:
                    ctx.emit("SKIP", f"{name} {label}", "dry run (compiling takes minutes on a CPU)")
                    continue
                if label == "ganengine[triton]" and ctx.dry:  # (the auto variant's code path)
                    ctx.emit("SKIP", f"{name} {label}", "dry run (a whole step of interpreted kernels)")
                    continue
                if ctx.time_left() < 60:
                    ctx.emit("SKIP", f"{name} {label} amp={amp}", "out of time")
                    continue
                backend = label[len("ganengine["):-1] if label.startswith("ganengine[") else None
                if backend is not None and backend not in _backends_for_device(ctx):
                    continue
                torch.manual_seed(0)
                model = build_model(name, **dict(spec[size]), fused=fused, fused_optimizer=fused).to(ctx.device)
                model.train()
                if compiled:
                    for net in model.network_names:
                        setattr(model, net, torch.compile(getattr(model, net)))
                opts = model.make_optimizers()
                n, img = spec["batch"][size]
                batch = make_batch(name, model, n, img, ctx.device)
                step_ctx = AmpContext(amp, ctx.device, list(opts))
                where = _backend_ctx(backend) if backend is not None else contextlib.nullcontext()
                with where:
                    t0 = time.perf_counter()
                    model.train_step(batch, opts, step_ctx)  # first step: compile / autotune
                    ctx.sync()
                    first = time.perf_counter() - t0
                    if ctx.dry:
                        t0 = time.perf_counter()
                        model.train_step(batch, opts, step_ctx)
                        ms = (time.perf_counter() - t0) * 1e3
                    else:
                        ms = ctx.bench_ms(lambda: model.train_step(batch, opts, step_ctx), reps=200)
                times[label] = ms
                ctx.emit("INFO", f"{name} {img}x{img} batch {n} amp={amp} {label}",
                         f"{ms:.2f} ms per step (first step {first:.1f} s)", ms=ms, first_s=first)
            if "ganengine" in times and len(times) > 1:
                rel = ", ".join(f"{times[k] / times['ganengine']:.2f}x {k}" for k in times if k != "ganengine")
                ctx.emit("INFO", f"{name} amp={amp} ganengine speed-up", rel)


def check_host_cost(ctx: Ctx):
    """The cost rule on the CUDA path: every fused op at its tiny shape (arithmetic negligible, host
    time decides) against the eager composition it replaces, per backend (auto, triton, cuda), forward
    and forward+backward: us per call over 100 calls with one synchronize at the end (what a step
    sees: the host's time where it exceeds the device's), interleaved, median of rounds; and kernels
    per call (torch.profiler)."""
    from ganengine.bench import registry, timing
    from ganengine.bench.host_cost import case_calls

    calls = 5 if ctx.dry else 100
    rounds = 1 if ctx.dry else 5
    names = ["auto"] + _backends_for_device(ctx)
    cases = [c for c in registry.select([], None) if c.kind == "op"]
    for case in cases[:2] if ctx.dry else cases:  # (dry: the code path, on two ops)
        if ctx.time_left() < 20:
            continue
        _, calls_by_mode = case_calls(case, ctx.device)
        for mode, (reference, fused) in calls_by_mode.items():
            variants = {"eager": reference, **{f"ganengine[{b}]": fused for b in names}}
            scopes = {f"ganengine[{b}]": functools.partial(_backend_ctx, b) for b in names}
            errors = {}
            res = timing.interleave(variants, rounds, warmup=3, calls_per_sample=calls, alternate=True,
                                    scopes=scopes, sync=ctx.sync, on_error=lambda n, e: errors.__setitem__(n, e))
            us = {k: v["median"] * 1e3 for k, v in res.items()}
            kernels = {}
            for k in us:
                with (scopes[k]() if k in scopes else contextlib.nullcontext()):
                    kernels[k] = _kernel_us(ctx, variants[k])[1]
            eager = us.get("eager")
            text = ", ".join(f"{k} {v:.1f} us ({v / eager:.2f}x) in {kernels[k]} kernels" if eager else f"{k} {v:.1f} us"
                             for k, v in us.items())
            text += "".join(f"; {k} failed: {type(e).__name__}: {str(e)[:80]}" for k, e in errors.items())
            ctx.emit("INFO", f"{case.name} {mode}", text, us=us, kernels=kernels)


def check_profile_models(ctx: Ctx):
    """Where a CycleGAN training step spends its time, ganengine vs eager: wall time, kernel time
    and kernels per step, the top kernels by device time and the top host ops by self CPU time
    (torch.profiler over 3 steps after 2 warm-up steps)."""
    from torch.profiler import ProfilerActivity, profile

    from ganengine.bench.cases_models import MODEL_SPECS, make_batch
    from ganengine.models import build_model
    from ganengine.train.context import AmpContext

    spec = MODEL_SPECS["cyclegan"]
    if ctx.dry:
        spec = dict(ref=dict(crop_size=32, ngf=4, ndf=4, netG="resnet_6blocks", n_layers_D=2), batch=dict(ref=(1, 32)))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    steps = 1 if ctx.dry else 3
    for label, fused in (("ganengine", True), ("eager", False)):
        torch.manual_seed(0)
        model = build_model("cyclegan", **dict(spec["ref"]), fused=fused, fused_optimizer=fused).to(ctx.device)
        model.train()
        opts = model.make_optimizers()
        n, img = spec["batch"]["ref"]
        batch = make_batch("cyclegan", model, n, img, ctx.device)
        step_ctx = AmpContext("off", ctx.device, list(opts))
        for _ in range(1 if ctx.dry else 2):
            model.train_step(batch, opts, step_ctx)
        ctx.sync()
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            for _ in range(steps):
                model.train_step(batch, opts, step_ctx)
            ctx.sync()
        wall = (time.perf_counter() - t0) * 1e3 / steps
        table = prof.key_averages()
        dev = [e for e in table if e.device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA]
        k_ms = sum(e.device_time_total for e in dev) / 1e3 / steps
        k_n = sum(e.count for e in dev) / steps
        ctx.emit("INFO", f"cyclegan {img}x{img} batch {n} {label}",
                 f"{wall:.2f} ms per step under the profiler, kernels {k_ms:.2f} ms in {k_n:.0f} launches",
                 wall_ms=wall, kernel_ms=k_ms, kernels=k_n)
        for e in sorted(dev, key=lambda e: -e.device_time_total)[:10]:
            ctx.emit("INFO", f"{label} kernel {e.key[:70]}",
                     f"{e.device_time_total / 1e3 / steps:.3f} ms per step in {e.count / steps:.0f} calls")
        host = [e for e in table if e.self_cpu_time_total > 0]
        for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:8]:
            ctx.emit("INFO", f"{label} host {e.key[:70]}",
                     f"{e.self_cpu_time_total / 1e3 / steps:.3f} ms self CPU per step in {e.count / steps:.0f} calls")


CHECKS: list[tuple[str, Callable[[Ctx], None], float]] = [
    ("env", check_env, 30),
    ("attention_bf16", check_attention_bf16, 60),
    ("pytest_gpu", check_pytest_gpu, 240),
    ("determinism", check_determinism, 60),
    ("cuda_graph", check_cuda_graph, 60),
    ("large_shapes", check_large_shapes, 60),
    ("second_device", check_second_device, 60),
    ("speed_norm_act", check_speed_norm_act, 90),
    ("speed_attention", check_speed_attention, 60),
    ("speed_losses", check_speed_losses, 30),
    ("host_cost", check_host_cost, 45),
    ("sanitizer", check_sanitizer, 160),
    ("profile_models", check_profile_models, 60),
    ("speed_models", check_speed_models, 240),
]


# ----------------------------------------------------------------------------- runner
@contextlib.contextmanager
def _alarm(seconds: float):
    """Raise CheckTimeout in the main thread after ``seconds`` (no-op off the main thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def fire(signum, frame):
        raise CheckTimeout(f"over its {seconds:.0f} s budget")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run(dry: bool, out: Path, budget: float, only: list[str] | None = None, printer=print) -> list[Result]:
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ctx = Ctx(dry, out, start + budget, printer)
    if not dry and not torch.cuda.is_available():
        ctx.check = "env"
        ctx.emit("FAIL", "CUDA", "no CUDA device visible to torch (set GANENGINE_GPU_CHECK_DRY=1 for the CPU dry run)")
        return ctx.results
    for name, fn, limit in CHECKS:
        if only and name not in only:
            continue
        ctx.check = name
        if dry:  # the limits are a GPU's; the dry run's interpreter on a busy CPU gets the total budget's slack
            limit *= 4
        left = ctx.time_left()
        if left < min(limit, 20):
            ctx.emit("SKIP", "", f"total budget spent ({budget:.0f} s)")
            continue
        t0 = time.perf_counter()
        try:
            with _alarm(min(limit, left)):
                fn(ctx)
        except CheckTimeout as exc:  # a figure that did not fit is a SKIP; a check that hangs, a FAIL
            ctx.emit("SKIP" if name.startswith("speed_") else "FAIL", "timeout", str(exc))
        except Exception as exc:
            ctx.emit("FAIL", "error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                     traceback=traceback.format_exc()[-3000:])
        finally:
            if ctx.device.type == "cuda":
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
        ctx.results.append(Result(name, "TIME", "", f"{time.perf_counter() - t0:.1f} s",
                                  round(time.perf_counter() - start, 2)))
    write_reports(ctx.results, out, dry, time.perf_counter() - start)
    return ctx.results


def write_reports(results: list[Result], out: Path, dry: bool, seconds: float) -> None:
    shown = [r for r in results if r.status != "TIME"]
    counts = {s: sum(r.status == s for r in shown) for s in ("OK", "FAIL", "SKIP", "INFO")}
    from ganengine.bench.machine import git_revision

    meta = dict(dry_run=dry, seconds=round(seconds, 1), counts=counts, git=git_revision(str(REPO)),
                torch=torch.__version__, device=(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"))
    (out / "report.json").write_text(json.dumps(dict(meta=meta, results=[dataclasses.asdict(r) for r in results]),
                                                indent=1, default=str))
    lines = [f"# ganengine gpu-check{' (dry run)' if dry else ''}", "",
             f"{meta['device']}, torch {meta['torch']}, {seconds:.0f} s: "
             f"{counts['OK']} OK, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP, {counts['INFO']} figures", "",
             "| check | status | what | result |", "| --- | --- | --- | --- |"]
    for r in shown:
        lines.append(f"| {r.check} | {r.status} | {r.label} | {r.figure.replace('|', '/')} |")
    times = [r for r in results if r.status == "TIME"]
    lines += ["", "Time per check: " + ", ".join(f"{r.check} {r.figure}" for r in times)]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check_report", help="folder for report.json, report.md and logs")
    parser.add_argument("--budget", type=float, default=450.0, help="total seconds (default 450)")
    parser.add_argument("--only", nargs="*", help=f"only these checks: {[c[0] for c in CHECKS]}")
    parser.add_argument("--dry-run", action="store_true", help="tiny CPU shapes under the Triton interpreter (CI)")
    args = parser.parse_args(argv)
    dry = args.dry_run or DRY
    if dry and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and "triton" in sys.modules:
        print("dry run needs TRITON_INTERPRET=1 before triton is imported", file=sys.stderr)
        return 2
    results = run(dry, Path(args.out), args.budget, args.only)
    failed = [r for r in results if r.status == "FAIL"]
    print(f"\n{sum(r.status == 'OK' for r in results)} OK, {len(failed)} FAIL, "
          f"{sum(r.status == 'SKIP' for r in results)} SKIP; reports in {args.out}/report.md and report.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
