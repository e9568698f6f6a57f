"""``ganengine.fuse()`` on the reference networks as users run them: the same module code
before and after ``fuse()``, forward + backward step time and the share of the forward's ops
that now run inside fused ops. Also the micro-measurements behind the rule table's choices.

    python benchmarks/bench_fuse.py                          # every family, small and reference widths
    python benchmarks/bench_fuse.py --families cyclegan biggan_G --widths small --repeats 5
    python benchmarks/bench_fuse.py --decisions              # triple vs pair, pre-activation, pad share
    python benchmarks/bench_fuse.py --decisions fold         # one of them
    python benchmarks/bench_fuse.py --decisions upsample     # BigGAN's upsample -> conv rules, per GBlock
    python benchmarks/bench_fuse.py --families pix2pix_G --widths reference --ablate pre_activation
    python benchmarks/bench_fuse.py --compile                # + torch.compile of the original / the fused
    python benchmarks/bench_fuse.py --layers --families sagan_D --widths small   # each rewrite alone
    python benchmarks/bench_fuse.py --profile --families biggan_G --widths reference --threads 1  # time by layer kind

The networks are the compact re-writes of the references in tests/ (reference_nets.py:
junyanz CycleGAN / pix2pix, yunjey StarGAN; reference_nets_attention.py: ajbrock BigGAN,
heykeetae SAGAN),
built from one seed. One step = ``loss(net(*inputs)).backward()`` with parameter gradients, in
training mode. Variants take turns (round robin) in one process, ``--warmup`` untimed rounds
first, and the median of ``--repeats`` rounds is reported, so a load change on a shared machine
hits all of them alike: read the ratios. ``fused ops`` = 1 - (aten ops the fused forward still
issues) / (aten ops of the original forward), counted with a TorchDispatchMode (views, detach
and allocations not counted); ``ganengine ops`` = the fused ops it issues instead.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ganengine  # noqa: E402
from ganengine.bench import timing  # noqa: E402
from tests import reference_nets_attention as R  # noqa: E402
from tests import reference_nets as ref  # noqa: E402


# ----------------------------------------------------------------------------- families
class _WithShared(nn.Module):
    """BigGAN's G as its training step calls it: ``G(z, G.shared(y))``."""

    def __init__(self, **kw):
        super().__init__()
        self.G = R.BigGANGenerator(**kw)   # hier=True, G_shared=True: y = shared(labels)

    def forward(self, z, labels):
        return self.G(z, self.G.shared(labels))


def _img(n, c, s):
    return lambda: (torch.randn(n, c, s, s),)


def _labels(n, z, classes):
    return lambda: (torch.randn(n, z), torch.randint(0, classes, (n,)))


def _stargan_in(n, s, c=5):
    return lambda: (torch.randn(n, 3, s, s), torch.rand(n, c).round())


def _biggan_d_in(n, s, classes):
    return lambda: (torch.randn(n, 3, s, s), torch.randint(0, classes, (n,)))


# name -> width -> (builder, inputs); "reference" = the reference's widths and image size
# (batch 1-8 instead of the papers' 1-256: a 2-core CPU), "small" = a quarter-width model
FAMILIES = {
    "cyclegan_G": {
        "reference": (lambda: ref.define_G(3, 3, 64, "resnet_9blocks", norm="instance"), _img(1, 3, 256)),
        "small": (lambda: ref.define_G(3, 3, 16, "resnet_9blocks", norm="instance"), _img(1, 3, 64))},
    "cyclegan_D": {
        "reference": (lambda: ref.define_D(3, 64, "basic", norm="instance"), _img(1, 3, 256)),
        "small": (lambda: ref.define_D(3, 16, "basic", norm="instance"), _img(1, 3, 64))},
    "pix2pix_G": {
        "reference": (lambda: ref.define_G(3, 3, 64, "unet_256", norm="batch", use_dropout=True), _img(1, 3, 256)),
        "small": (lambda: ref.define_G(3, 3, 16, "unet_256", norm="batch", use_dropout=True), _img(1, 3, 256))},
    "pix2pix_D": {
        "reference": (lambda: ref.define_D(6, 64, "basic", norm="batch"), _img(1, 6, 256)),
        "small": (lambda: ref.define_D(6, 16, "basic", norm="batch"), _img(1, 6, 64))},
    "stargan_G": {
        "reference": (lambda: ref.StarGenerator(64, 5, 6), _stargan_in(1, 128)),
        "small": (lambda: ref.StarGenerator(16, 5, 6), _stargan_in(1, 64))},
    "stargan_D": {
        "reference": (lambda: ref.StarDiscriminator(128, 64, 5, 6), _img(2, 3, 128)),
        "small": (lambda: ref.StarDiscriminator(64, 16, 5, 5), _img(2, 3, 64))},
    "biggan_G": {   # BigGAN-128: G_ch 96, dim_z 120, shared_dim 128, hier, attention at 64
        "reference": (lambda: _WithShared(G_ch=96, dim_z=120, shared_dim=128, n_classes=1000, resolution=128,
                                          G_attn="64", hier=True), _labels(2, 120, 1000)),
        "small": (lambda: _WithShared(G_ch=16, dim_z=120, shared_dim=32, n_classes=10, resolution=128,
                                      G_attn="64", hier=True), _labels(2, 120, 10))},
    "biggan_D": {
        "reference": (lambda: R.BigGANDiscriminator(D_ch=96, n_classes=1000, resolution=128, D_attn="64"),
                      _biggan_d_in(2, 128, 1000)),
        "small": (lambda: R.BigGANDiscriminator(D_ch=16, n_classes=10, resolution=128, D_attn="64"),
                  _biggan_d_in(2, 128, 10))},
    "sagan_G": {   # image_size 64; the reference's batch is 64
        "reference": (lambda: R.SAGANGenerator(8, z_dim=128, conv_dim=64), lambda: (torch.randn(8, 128),)),
        "small": (lambda: R.SAGANGenerator(8, z_dim=128, conv_dim=16), lambda: (torch.randn(8, 128),))},
    "sagan_D": {
        "reference": (lambda: R.SAGANDiscriminator(conv_dim=64), _img(8, 3, 64)),
        "small": (lambda: R.SAGANDiscriminator(conv_dim=16), _img(8, 3, 64))},
}


# ----------------------------------------------------------------------------- measuring
_UNCOUNTED = ("view", "_unsafe_view", "reshape", "detach", "empty", "empty_like", "empty_strided", "t",
              "transpose", "permute", "expand", "squeeze", "unsqueeze", "as_strided", "alias", "slice", "select",
              "split", "split_with_sizes", "chunk", "unbind", "lift_fresh", "_to_copy", "clone", "zeros_like",
              "ones_like", "zero_", "fill_", "set_", "resolve_conj", "resolve_neg", "_reshape_alias")


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.aten, self.ganengine = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns = func.namespace
        name = func._schema.name.split("::")[-1]
        if ns.startswith("ganengine"):
            self.ganengine += 1
        elif ns == "aten" and name not in _UNCOUNTED:
            self.aten += 1
        return func(*args, **(kwargs or {}))


def count_forward_ops(net, inputs) -> tuple[int, int]:
    with torch.no_grad():
        net(*inputs)  # warm-up: a first call's lazy work is not what every call issues
        with _CountOps() as c:
            net(*inputs)
    return c.aten, c.ganengine


def _loss(out):
    out = out if isinstance(out, tuple) else (out,)
    return sum(o.float().square().mean() for o in out if o.is_floating_point())


def step_fn(net, inputs):
    params = [p for p in net.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        _loss(net(*inputs)).backward()
    return step


def round_robin(fns: dict, warmup: int, repeats: int) -> dict:
    """{name: median ms}, the variants taking turns (ganengine.bench.timing.interleave), the order
    reversed every other round (neither always runs on the caches the other left warm)."""
    return timing.medians(timing.interleave(fns, repeats, warmup=warmup, alternate=True, clock=CLOCK[0]))


# --clock cpu: the calling thread's CPU time (CLOCK_THREAD_CPUTIME_ID) instead of wall time. With
# --threads 1 every op runs on that thread, so the figure leaves out the time the process spent
# descheduled by other jobs: on a shared, loaded machine a ms-long step's wall time is mostly that
CLOCK = [time.perf_counter]


@contextlib.contextmanager
def without_rules(names):
    """fuse() with the named built-in rules left out of the table (the ablation variants)."""
    from ganengine.fusion import graph, rules

    saved, saved_up = rules.RULES, set(graph.UPSAMPLE_RULES)
    rules.RULES = tuple(r for r in saved if r.name not in set(names))
    graph.UPSAMPLE_RULES -= {n.split("+")[-1] for n in names if n.startswith("graph:upsample+")}
    try:
        yield
    finally:
        rules.RULES = saved
        graph.UPSAMPLE_RULES.clear()
        graph.UPSAMPLE_RULES.update(saved_up)


def run_family(name: str, width: str, warmup: int, repeats: int, compile_: bool, ablate=()) -> dict:
    make, inputs_of = FAMILIES[name][width]
    torch.manual_seed(0)
    net = make().train()
    t0 = time.perf_counter()
    fused, report = ganengine.fuse(net, return_report=True)
    fuse_s = time.perf_counter() - t0
    torch.manual_seed(1)
    inputs = inputs_of()
    orig_aten, _ = count_forward_ops(net, inputs)
    left_aten, gan_ops = count_forward_ops(fused, inputs)
    fns = {"original": step_fn(net, inputs), "fused": step_fn(fused, inputs)}
    for spec in ablate:   # the same net fused without a rule (or "a,b": several): what they buy in the step
        names = spec.split(",")
        if any(report.get(rule) for rule in names):
            with without_rules(names):
                fns[f"fused -{spec}"] = step_fn(ganengine.fuse(net), inputs)
    if compile_:
        fns["compile(original)"] = step_fn(torch.compile(net), inputs)
        fns["compile(fused)"] = step_fn(torch.compile(fused), inputs)
    times = round_robin(fns, warmup, repeats)
    return {"family": name, "width": width, "params": sum(p.numel() for p in net.parameters()),
            "shape": [tuple(t.shape) for t in inputs], "ms": times,
            "speedup": times["original"] / times["fused"], "fuse_s": fuse_s,
            "fused_ops": 1 - left_aten / orig_aten, "aten_ops": [orig_aten, left_aten], "ganengine_ops": gan_ops,
            "report": dict(report), "declined": [tuple(d) for d in report.declined],
            "not_traced": report.not_traced}


def run_layers(name: str, width: str, warmup: int, repeats: int) -> list:
    """Each place fuse() rewrote, on its own: the original modules there (a Sequential's fused
    run: the fused module's index and the Identity placeholders after it) against the fused
    module, forward + backward on the input the original model gives that place, interleaved.
    Says which rewrite gains or loses how much inside a family's step ("--layers")."""
    make, inputs_of = FAMILIES[name][width]
    torch.manual_seed(0)
    net = make().train()
    fused, report = ganengine.fuse(net, return_report=True)
    torch.manual_seed(1)
    inputs = inputs_of()
    orig_mods, fused_mods = dict(net.named_modules()), dict(fused.named_modules())
    captured, hooks = {}, []
    for where, _ in report.replaced:
        if where in orig_mods and where not in captured:
            captured[where] = None
            hooks.append(orig_mods[where].register_forward_pre_hook(
                lambda m, args, where=where: captured.__setitem__(where, tuple(a.detach() for a in args)) if
                captured[where] is None else None))
    with torch.no_grad():
        net(*inputs)
    for h in hooks:
        h.remove()
    rows = []
    for where, rule in report.replaced:
        args = captured.get(where)
        if not args or where not in fused_mods or rule.startswith("graph:"):
            continue
        parent, _, idx = where.rpartition(".")
        group_o, group_f = [orig_mods[where]], [fused_mods[where]]
        fparent = fused_mods.get(parent) if parent else fused
        if isinstance(fparent, nn.Sequential) and idx.isdigit():
            oparent = orig_mods[parent] if parent else net
            names = list(fparent._modules)
            for n in names[names.index(idx) + 1:]:
                if not isinstance(fparent._modules[n], nn.Identity) or isinstance(oparent._modules[n], nn.Identity):
                    break
                group_o.append(oparent._modules[n])
                group_f.append(fparent._modules[n])

        def step(group):
            params = [p for m in group for p in m.parameters()]

            def run():
                for p in params:
                    p.grad = None
                xs = tuple(a.clone().requires_grad_(a.is_floating_point()) for a in args)
                out = group[0](*xs)
                for m in group[1:]:
                    out = m(out)
                _loss(out).backward()
            return run
        t = round_robin({"original": step(group_o), "fused": step(group_f)}, warmup, repeats)
        rows.append({"where": where, "rule": rule, "input": tuple(args[0].shape), **t,
                     "saved ms": t["original"] - t["fused"]})
    return rows


def _op_kind(name: str, shapes) -> str:
    """A profiled op's layer kind, from its name and input shapes (--profile)."""
    kernels = {tuple(sh[2:]) for sh in shapes if isinstance(sh, list) and len(sh) == 4}
    if any(k in name for k in ("attention", "softmax", "bmm", "max_pool")):
        return "attention"
    if "upsample" in name:
        return "upsample"
    if any(k in name for k in ("batch_norm", "instance_norm", "threshold", "relu")):
        return "norm / act"
    if any(k in name for k in ("winograd", "conv3x3", "im2col", "col2im")):
        return "conv 3x3"
    if "conv" in name:
        for k, kind in (((3, 3), "conv 3x3"), ((1, 1), "conv 1x1"), ((2, 2), "conv 3x3 (sub-pixel phases)")):
            if k in kernels:
                return kind
        return "conv, other kernels"
    if name in ("aten::mm", "aten::addmm"):
        dims = [d for sh in shapes if isinstance(sh, list) for d in sh]
        return "mm with a unit dim (SN power iteration, sigma grad)" if 1 in dims else \
            "mm (conv GEMM form / Winograd, linears)"
    if name in ("aten::div", "aten::neg", "aten::mul"):
        return "mul / div / neg (SN weight quotient, ccbn)"
    return "the rest"


def profile_family(name: str, width: str) -> dict:
    """Self CPU time of one training step (torch.profiler, after two warm-up steps) by layer kind
    (``_op_kind``), original and fused ("--profile")."""
    from collections import Counter

    make, inputs_of = FAMILIES[name][width]
    torch.manual_seed(0)
    net = make().train()
    fused = ganengine.fuse(net)
    torch.manual_seed(1)
    inputs = inputs_of()
    out = {}
    for which, m in (("original", net), ("fused", fused)):
        step = step_fn(m, inputs)
        step(), step()
        with torch.profiler.profile(record_shapes=True) as prof:
            step()
        kinds = Counter()
        for e in prof.key_averages(group_by_input_shape=True):
            kinds[_op_kind(e.key, e.input_shapes)] += e.self_cpu_time_total / 1e3
        out[which] = dict(kinds.most_common())
    return out


# ----------------------------------------------------------------------------- decisions
def _pair_vs_triple(warmup, repeats):
    """PatchGAN / CycleGAN Conv -> InstanceNorm -> act: one op (conv2d_instance_norm_act) or the
    conv op + InstanceNormAct2d; and the eager reference."""
    import ganengine.functional as GF

    rows = []
    for (n, c, k, s, ks, st, pad, slope) in [(1, 3, 64, 262, 7, 1, 0, 0.0), (1, 64, 128, 256, 3, 2, 1, 0.0),
                                              (1, 128, 256, 128, 3, 2, 1, 0.0), (1, 64, 128, 128, 4, 2, 1, 0.2),
                                              (1, 128, 256, 64, 4, 2, 1, 0.2), (1, 256, 512, 32, 4, 1, 1, 0.2)]:
        torch.manual_seed(0)
        x = torch.randn(n, c, s, s)
        w = (torch.randn(k, c, ks, ks) * 0.05).requires_grad_()
        b = torch.zeros(k, requires_grad=True)
        act = "relu" if slope == 0 else "leaky_relu"

        def step(f):
            def run():
                w.grad = b.grad = None
                f().square().mean().backward()
            return run
        fns = {
            "eager": step(lambda: F.leaky_relu(F.instance_norm(F.conv2d(x, w, b, st, pad)), slope)),
            "conv op + InstanceNormAct": step(lambda: GF.instance_norm_act(GF.conv2d(x, w, b, st, pad),
                                                                           activation=act, negative_slope=slope)),
            "conv2d_instance_norm_act": step(lambda: GF.conv2d_instance_norm_act(x, w, b, st, pad, activation=act,
                                                                                 negative_slope=slope)),
        }
        t = round_robin(fns, warmup, repeats)
        rows.append({"case": f"{n}x{c}x{s}x{s} -> {k}, {ks}x{ks} s{st}", **t})
    return rows


def _pre_activation(warmup, repeats):
    """pix2pix's U-Net: LeakyReLU(0.2, inplace) -> Conv 4x4 s2 and ReLU(inplace) -> ConvTranspose
    4x4 s2: what share of the pair's forward + backward the separate activation costs (the most an
    input-activation prologue inside the conv could save)."""
    import ganengine.functional as GF

    rows = []
    for (c, k, s, transposed) in [(64, 128, 128, False), (128, 256, 64, False), (256, 512, 32, False),
                                  (512, 512, 8, False), (1024, 256, 32, True), (512, 128, 64, True),
                                  (256, 64, 128, True)]:
        torch.manual_seed(0)
        x0 = torch.randn(1, c, s, s)
        w = (torch.randn(*((c, k) if transposed else (k, c)), 4, 4) * 0.05).requires_grad_()
        conv = (lambda h: GF.conv_transpose2d(h, w, None, 2, 1)) if transposed else (lambda h: GF.conv2d(h, w, None, 2, 1))
        relu = (lambda h: F.relu(h, inplace=True)) if transposed else (lambda h: F.leaky_relu(h, 0.2, inplace=True))

        def step(with_act):
            def run():
                w.grad = None
                h = x0.clone().requires_grad_()
                y = conv(relu(h * 1.0) if with_act else h * 1.0)
                y.square().mean().backward()
            return run
        t = round_robin({"act + conv": step(True), "conv": step(False)}, warmup, repeats)
        rows.append({"case": f"1x{c}x{s}x{s} {'convT' if transposed else 'conv'} -> {k}", **t,
                     "act share": 1 - t["conv"] / t["act + conv"]})
    return rows


def _pre_activation_fold(warmup, repeats):
    """pix2pix's down path, ``BatchNorm2d -> [next block: LeakyReLU(0.2, inplace) -> Conv 4x4 s2]``:
    the norm and the separate in-place activation (what fuse() did before the pre_activation
    rule: batch_norm + the block's own LeakyReLU) against the activation in the norm's epilogue
    (BatchNormAct2d, what the rule builds), each followed by the conv, forward + backward."""
    import ganengine.functional as GF
    import ganengine.nn as gnn

    rows = []
    for (c, k, s) in [(128, 256, 64), (256, 512, 32), (512, 512, 16), (512, 512, 8), (512, 512, 4)]:
        torch.manual_seed(0)
        x0 = torch.randn(1, c, s, s)
        w = (torch.randn(k, c, 4, 4) * 0.05).requires_grad_()
        bn = gnn.BatchNormAct2d(c, activation="none").train()
        bn_act = gnn.BatchNormAct2d(c, activation="leaky_relu", negative_slope=0.2).train()
        bn_act.weight, bn_act.bias = bn.weight, bn.bias

        def step(fused):
            def run():
                w.grad = bn.weight.grad = bn.bias.grad = None
                h = x0.clone().requires_grad_()
                a = bn_act(h) if fused else F.leaky_relu(bn(h), 0.2, inplace=True)
                GF.conv2d(a, w, None, 2, 1).square().mean().backward()
            return run
        t = round_robin({"norm, act, conv": step(False), "norm+act, conv": step(True)}, warmup, repeats)
        rows.append({"case": f"1x{c}x{s}x{s} bn -> lrelu -> conv {k}", **t,
                     "saved": 1 - t["norm+act, conv"] / t["norm, act, conv"]})
    return rows


def _pad_share(warmup, repeats):
    """CycleGAN's ReflectionPad2d(3) -> Conv 7x7 (first and last layers): the pad's share."""
    import ganengine.functional as GF

    rows = []
    for (c, k, s) in [(3, 64, 256), (64, 3, 256)]:
        torch.manual_seed(0)
        x = torch.randn(1, c, s, s, requires_grad=True)
        w = (torch.randn(k, c, 7, 7) * 0.05).requires_grad_()

        def step(pad):
            def run():
                w.grad = x.grad = None
                h = F.pad(x, (3, 3, 3, 3), mode="reflect") if pad else x
                GF.conv2d(h, w, None, 1, 0 if pad else 3).square().mean().backward()
            return run
        t = round_robin({"pad + conv": step(True), "conv (zero padding)": step(False)}, warmup, repeats)
        rows.append({"case": f"1x{c}x{s}x{s} -> {k}, 7x7", **t, "pad share": 1 - t["conv (zero padding)"] / t["pad + conv"]})
    return rows


def _biggan_upsample_convs(warmup, repeats):
    """BigGAN-128's GBlocks (ch 96, batch 2): ``conv1(upsample(h))`` (SN 3x3) and
    ``conv_sc(upsample(x))`` (SN 1x1) as the reference runs them, on fuse()'s SN conv (what fuse()
    built before the upsample rules), and as the graph rules run them now (ganengine/fusion/upsample.py:
    the sub-pixel form forced on, whatever MIN_PIXELS says; the 1x1 conv before the upsample)."""
    from ganengine.fusion import upsample as U
    from ganengine.fusion.spectral import biggan_sigma

    rows = []
    chans = [(1536, 1536, 4), (1536, 768, 8), (768, 384, 16), (384, 192, 32), (192, 96, 64)]
    for cin, cout, s in chans:
        for k in (3, 1):
            torch.manual_seed(0)
            conv = R.SNConv2d(cin, cout, kernel_size=k, padding=k // 2)
            fconv = ganengine.fuse(conv)
            x = torch.randn(2, cin, s, s, requires_grad=True)
            up = functools.partial(F.interpolate, scale_factor=2)

            def step(f, m):
                def run():
                    x.grad = m.weight.grad = m.bias.grad = None
                    f().square().mean().backward()
                return run
            fns = {"reference": step(lambda: conv(up(x)), conv), "fused conv": step(lambda: fconv(up(x)), fconv)}
            if k == 3:
                fns["rule"] = step(lambda: U.subpixel_conv3x3(x, fconv.weight, fconv.bias, biggan_sigma(fconv)), fconv)
            else:
                fns["rule"] = step(lambda: U.upsample_conv1x1(fconv, x, (2.0, 2.0), {"scale_factor": 2}), fconv)
            t = round_robin(fns, warmup, repeats)
            rows.append({"case": f"2x{cin}x{s}x{s} up2 -> {k}x{k} {cout}", **t,
                         "rule vs fused conv": t["fused conv"] / t["rule"],
                         "small-map pixels": 2 * s * s})
    return rows


def _table(rows, keys):
    out = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join(out)


_DECISIONS = {
    "triple": ("conv -> instance norm -> act (ms, fwd+bwd)", _pair_vs_triple,
               ["case", "eager", "conv op + InstanceNormAct", "conv2d_instance_norm_act"]),
    "preact": ("pre-activation (ms, fwd+bwd)", _pre_activation, ["case", "act + conv", "conv", "act share"]),
    "fold": ("pre-activation folded into the norm before (ms, fwd+bwd)", _pre_activation_fold,
             ["case", "norm, act, conv", "norm+act, conv", "saved"]),
    "pad": ("reflection pad + 7x7 conv (ms, fwd+bwd)", _pad_share, ["case", "pad + conv", "conv (zero padding)",
                                                                   "pad share"]),
    "upsample": ("BigGAN GBlock upsample -> SN conv (ms, fwd+bwd)", _biggan_upsample_convs,
                 ["case", "small-map pixels", "reference", "fused conv", "rule", "rule vs fused conv"]),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--widths", nargs="*", default=["small", "reference"], choices=["small", "reference"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="also torch.compile(original) and torch.compile(fused)")
    p.add_argument("--decisions", nargs="*", default=None, choices=list(_DECISIONS),
                   help="the rule-table micro-measurements instead (all, or the named ones)")
    p.add_argument("--ablate", nargs="*", default=[], metavar="RULE",
                   help="also time each family fused without RULE (where RULE fused something); "
                        "RULE1,RULE2 leaves several out together")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or the main thread's CPU time (with --threads 1: robust to other jobs' load)")
    p.add_argument("--profile", action="store_true",
                   help="self CPU time of one step by layer kind, original and fused (torch.profiler)")
    p.add_argument("--layers", action="store_true",
                   help="time each place fuse() rewrote on its own (original modules vs fused module)")
    p.add_argument("--json", default=None, help="write the records to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if torch.get_num_threads() != 1:
            p.error("--clock cpu needs --threads 1 (CPU time of the calling thread only)")
        CLOCK[0] = time.thread_time
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, load average "
          f"{os.getloadavg()[0]:.1f}, backend "
          f"{ganengine.backends.status() if hasattr(ganengine.backends, 'status') else ''}", flush=True)
    records = []
    if args.profile:
        for name in args.families:
            for width in args.widths:
                prof = profile_family(name, width)
                records.append({"family": name, "width": width, "profile_ms": prof})
                kinds = list(dict.fromkeys(list(prof["original"]) + list(prof["fused"])))
                tot = {w: sum(prof[w].values()) for w in prof}
                rows = [{"layer kind": k, **{w: f"{prof[w].get(k, 0.0):.0f} ms ({prof[w].get(k, 0.0) / tot[w]:.1%})"
                                             for w in prof}} for k in kinds]
                rows.append({"layer kind": "total", **{w: f"{tot[w]:.0f} ms" for w in prof}})
                print(f"\n{name} ({width}): self CPU time of one step by layer kind\n"
                      + _table(rows, ["layer kind", "original", "fused"]), flush=True)
    elif args.layers:
        for name in args.families:
            for width in args.widths:
                rows = run_layers(name, width, args.warmup, args.repeats)
                records.append({"family": name, "width": width, "layers": rows})
                print(f"\n{name} ({width}): each rewrite alone, ms fwd+bwd\n"
                      + _table(rows, ["where", "rule", "input", "original", "fused", "saved ms"]), flush=True)
    elif args.decisions is not None:
        for name, (title, fn, keys) in _DECISIONS.items():
            if args.decisions and name not in args.decisions:
                continue
            rows = fn(args.warmup, args.repeats)
            records.append({"decision": title, "rows": rows})
            print(f"\n{title}\n" + _table(rows, keys), flush=True)
    else:
        print("| family | width | params | input | original ms | fused ms | speed-up | fused ops | "
              "ganengine ops |" + (" compile(orig) ms | compile(fused) ms |" if args.compile else ""))
        print("|" + " --- |" * (9 + 2 * args.compile))
        for name in args.families:
            for width in args.widths:
                r = run_family(name, width, args.warmup, args.repeats, args.compile, args.ablate)
                records.append(r)
                extra = (f" {r['ms']['compile(original)']:.1f} | {r['ms']['compile(fused)']:.1f} |"
                         if args.compile else "")
                for k in r["ms"]:
                    if k.startswith("fused -"):   # the step time without that rule / with it
                        extra += f" {k}: {r['ms'][k]:.1f} ms ({r['ms'][k] / r['ms']['fused']:.3f}x the fused step) |"
                print(f"| {name} | {width} | {r['params'] / 1e6:.2f} M | {r['shape'][0]} | {r['ms']['original']:.1f} | "
                      f"{r['ms']['fused']:.1f} | {r['speedup']:.2f}x | {r['fused_ops']:.0%} | {r['ganengine_ops']} |"
                      + extra, flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1, default=str)


if __name__ == "__main__":
    main()
