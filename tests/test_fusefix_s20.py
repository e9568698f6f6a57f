"""Session 20 (fusefix): two missed fusions found running reference code.

D1. pytorch/examples' DCGAN hands its Sequential to ``nn.parallel.data_parallel(self.main, input,
range(self.ngpu))`` on multi-GPU runs; that function only calls the module (on replicas), so it
counts as a call (ganengine/fusion/checks.py, ``_MODULE_CALLERS``) when the callee really is torch's
function: resolved through the method's globals and module attributes, from the source and from
the bytecode (a class made by exec). A user function of the same name, a local of that name, or
the Sequential passed in another position still decline.

D2. U-Net GAN's self-modulated ``ccbn`` computes its gain and bias with ``Sequential(Linear, ReLU,
Linear)`` on the latent: it fuses as a conditional batch norm (+ the ReLU after it), equal to
eager in train and eval mode, running statistics included. A ccbn-shaped module whose children
fuse() cannot probe is declined with a reason instead of passed over in silence.

Outputs: equal to eager within the network's normwise rounding bound (tests/_model_bounds.py).
"""
from __future__ import annotations

import copy
import importlib.util
import sys

import pytest
import torch
from torch import nn

import ganengine
from ganengine.fusion.mixins import ConditionalBatchNormMixin
from tests._model_bounds import Census, assert_normwise, census

# ----------------------------------------------------------------------------- D1: data_parallel
DCGAN = '''
import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn.parallel import data_parallel
from torch.utils.checkpoint import checkpoint
nz, ngf, ndf, nc = 16, 8, 8, 3


def my_parallel(module, inputs, ids):   # a user function: reads an entry of the Sequential
    return module[0](inputs)


class Generator(nn.Module):
    def __init__(self, ngpu=1):
        super(Generator, self).__init__()
        self.ngpu = ngpu
        self.other = nn.Identity()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, nc, 4, 2, 1, bias=False), nn.Tanh())

    def forward(self, input):
        if (input.is_cuda or input.is_xpu) and self.ngpu > 1:
            output = CALL
        else:
            output = self.main(input)
        return output


class Discriminator(nn.Module):
    def __init__(self, ngpu=1):
        super(Discriminator, self).__init__()
        self.ngpu = ngpu
        self.other = nn.Identity()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, 1, 4, 1, 0, bias=False), nn.Sigmoid())

    def forward(self, input):
        if (input.is_cuda or input.is_xpu) and self.ngpu > 1:
            output = CALL
        else:
            output = self.main(input)
        return output.view(-1, 1).squeeze(1)
'''

FUSING = {
    "pytorch/examples verbatim": "nn.parallel.data_parallel(self.main, input, range(self.ngpu))",
    "full path": "torch.nn.parallel.data_parallel(self.main, input, list(range(self.ngpu)))",
    "imported name": "data_parallel(self.main, input, range(self.ngpu))",
    "module keyword": "nn.parallel.data_parallel(module=self.main, inputs=input)",
    "checkpoint": "torch.utils.checkpoint.checkpoint(self.main, input, use_reentrant=False)",
    "imported checkpoint": "checkpoint(self.main, input, use_reentrant=True)",
    "checkpoint function keyword": "checkpoint(function=self.main, use_reentrant=False)",
}
DECLINING = {
    "a user function": "my_parallel(self.main, input, range(self.ngpu))",
    "not the module argument": "nn.parallel.data_parallel(self.other, self.main)",
    "another keyword": "nn.parallel.data_parallel(inputs=self.main, module=self.other)",
    "a keyword of another callee": "checkpoint(self.other, module=self.main)",
    "the name shadowed by a local": "[data_parallel := my_parallel, data_parallel(self.main, input, None)][1]",
    "the name a comprehension's variable": ("[data_parallel(self.main, input, None)"
                                            " for data_parallel in (my_parallel,)][0]"),
    "the name a lambda's parameter": "(lambda data_parallel: data_parallel(self.main, input, None))(my_parallel)",
}
# the sequence rules DCGAN's Sequentials give, where
WANT = {"Generator": [("main.1", "batch_norm+act"), ("main.4", "batch_norm+act")],
        "Discriminator": [("main.0", "conv2d+leaky_relu"), ("main.3", "batch_norm+act")]}


def _classes(call: str, tmp_path, name: str):
    """Generator and Discriminator from the DCGAN text twice: imported from a file (the source
    reader) and exec'd (no source: the bytecode reader)."""
    src = DCGAN.replace("CALL", call)
    path = tmp_path / f"fusefix_{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"fusefix_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    scope = {"__name__": f"fusefix_exec_{name}"}
    exec(compile(src, "<string>", "exec"), scope)
    return {"source": (mod.Generator, mod.Discriminator), "bytecode": (scope["Generator"], scope["Discriminator"])}


def _key(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def _sequence_rules(report):
    return sorted((w, r) for w, r in report.replaced if "+" in r)


@pytest.mark.parametrize("reader", ["source", "bytecode"])
@pytest.mark.parametrize("case", list(FUSING))
def test_dcgan_sequential_handed_to_data_parallel_fuses(case, reader, tmp_path):
    gen_cls, disc_cls = _classes(FUSING[case], tmp_path, _key(case))[reader]
    inputs = {"Generator": torch.randn(4, 16, 1, 1, generator=torch.Generator().manual_seed(1)),
              "Discriminator": torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))}
    for cls in (gen_cls, disc_cls):
        torch.manual_seed(0)
        model = cls(1).train()
        eager = copy.deepcopy(model)
        fused, report = ganengine.fuse(model, return_report=True)
        assert [d for d in report.declined if d.where.startswith("main.")] == [], (case, reader, report.declined)
        assert _sequence_rules(report) == WANT[cls.__name__], (case, reader, report)
        x = inputs[cls.__name__]
        for mode in ("train", "eval"):   # (the CPU branch: self.main(input))
            getattr(eager, mode)(), getattr(fused, mode)()
            with census(eager, winograd=True) as cen:
                want = eager(x)
            assert_normwise(fused(x), want, cen, name=f"{case} {reader} {cls.__name__} {mode}")


@pytest.mark.parametrize("reader", ["source", "bytecode"])
@pytest.mark.parametrize("case", list(DECLINING))
def test_other_callees_of_the_sequential_still_decline(case, reader, tmp_path):
    gen_cls, disc_cls = _classes(DECLINING[case], tmp_path, "no_" + _key(case))[reader]
    for cls in (gen_cls, disc_cls):
        fused, report = ganengine.fuse(cls(1), return_report=True)
        assert not [f for f in _sequence_rules(report) if f[0].startswith("main.")], (case, reader, report)
        reasons = [d.reason for d in report.declined if d.where.startswith("main.")]
        assert reasons and all("self.main" in r for r in reasons), (case, reader, report.declined)


CHECKPOINTED = '''
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


class P(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.main = nn.Sequential(
            nn.ConvTranspose2d(16, 16, 4, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(True),
            nn.Conv2d(16, 8, 3, 1, 1), nn.InstanceNorm2d(8, affine=True), nn.LeakyReLU(0.2),
            nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.LeakyReLU(0.2, True), nn.Conv2d(8, 3, 3, 1, 1))

    def forward(self, x):
        return checkpoint(self.main, x, use_reentrant=self.reentrant)
'''


def _checkpointed(tmp_path, name):
    path = tmp_path / f"fusefix_ckpt_{name}.py"
    path.write_text(CHECKPOINTED)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    scope = {"__name__": f"fusefix_exec_ckpt_{name}"}
    exec(compile(CHECKPOINTED, "<string>", "exec"), scope)
    return {"source": mod.P, "bytecode": scope["P"]}


@pytest.mark.parametrize("reader", ["source", "bytecode"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_sequential_fuses_and_trains_as_eager(reentrant, reader, tmp_path):
    """``checkpoint(self.main, x)`` runs the fused Sequential, then again in backward: outputs,
    gradients and running statistics as eager's (the batch norms count two updates per step, as
    eager's do: num_batches_tracked exactly)."""
    cls = _checkpointed(tmp_path, f"{reader}_{reentrant}")[reader]
    torch.manual_seed(0)
    model = cls(reentrant).train()
    eager = copy.deepcopy(model)
    fused, report = ganengine.fuse(model, return_report=True)
    for where, rule in (("main.1", "batch_norm+act"), ("main.4", "instance_norm+act")):
        assert (where, rule) in report.replaced, report
    assert not [d for d in report.declined if "self.main" in d.reason], report.declined
    gen = torch.Generator().manual_seed(4)
    for step in range(2):
        x = torch.randn(4, 16, 6, 6, generator=gen)
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        with census(eager, winograd=True) as cen:
            want = eager(xs[0])
        got = fused(xs[1])
        assert_normwise(got, want, cen, name=f"out step {step}")
        g = torch.randn(want.shape, generator=gen)
        want.backward(g), got.backward(g)
        ref = {n: p.grad for n, p in eager.named_parameters()}
        scale = max([t.abs().max().item() for t in ref.values()] + [xs[0].grad.abs().max().item()])
        for name, p in fused.named_parameters():
            assert_normwise(p.grad, ref[name], cen, scale=scale, backward=True, name=f"d{name} step {step}")
        assert_normwise(xs[1].grad, xs[0].grad, cen, scale=scale, backward=True, name=f"dx step {step}")
        eager.zero_grad(), fused.zero_grad()
    bufs = dict(eager.named_buffers())
    for name, t in fused.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert t.item() == bufs[name].item() == 4, (name, t, bufs[name])   # (two runs a step)
        else:   # (a mean / variance over the plane of values the network's bound covers)
            assert_normwise(t, bufs[name], cen, scale=max(1.0, bufs[name].abs().max().item()), name=name)


# ----------------------------------------------------------------------------- D2: self-modulated ccbn
class ccbn(nn.Module):
    """boschresearch/unetgan layers.ccbn (mybn=False, norm_style='bn'), forward verbatim."""

    def __init__(self, output_size, input_size, which_linear, eps=1e-5, momentum=0.1, self_modulation=False):
        super().__init__()
        self.output_size, self.input_size = output_size, input_size
        if self_modulation:
            self.gain = nn.Sequential(which_linear(input_size, input_size, bias=True), nn.ReLU(),
                                      which_linear(input_size, output_size, bias=False))
            self.bias = nn.Sequential(which_linear(input_size, input_size, bias=True), nn.ReLU(),
                                      which_linear(input_size, output_size, bias=False))
        else:
            self.gain = which_linear(input_size, output_size)
            self.bias = which_linear(input_size, output_size)
        self.eps, self.momentum = eps, momentum
        self.mybn, self.cross_replica, self.norm_style = False, False, "bn"
        self.register_buffer("stored_mean", torch.zeros(output_size))
        self.register_buffer("stored_var", torch.ones(output_size))

    def forward(self, x, y):
        gain = (1 + self.gain(y)).view(y.size(0), -1, 1, 1)
        bias = self.bias(y).view(y.size(0), -1, 1, 1)
        out = torch.nn.functional.batch_norm(x, self.stored_mean, self.stored_var, None, None,
                                             self.training, 0.1, self.eps)
        return out * gain + bias


class GBlock(nn.Module):
    """The shape of U-Net GAN's generator block around it: activation(bn(x, y)), then a conv."""

    def __init__(self, c=6, zdim=5):
        super().__init__()
        self.bn1 = ccbn(c, zdim, nn.Linear, self_modulation=True)
        self.activation = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x, y):
        return self.conv1(self.activation(self.bn1(x, y)))


class Opaque(nn.Module):
    """A gain / bias child fuse() cannot make an input for."""

    def __init__(self, d, c):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, c))

    def forward(self, y):
        return y @ self.w


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_self_modulated_ccbn_fuses_with_its_relu_and_matches_eager():
    n, c, zdim, h, w = 4, 6, 5, 5, 6
    torch.manual_seed(0)
    model = GBlock(c, zdim).train()
    eager = copy.deepcopy(model)
    fused, report = ganengine.fuse(model, return_report=True)
    assert isinstance(fused.bn1, ConditionalBatchNormMixin), report
    assert ("bn1", "graph:conditional_batch_norm+act") in report.replaced, report   # (with the ReLU after it)
    assert report.declined == [], report.declined
    gen = torch.Generator().manual_seed(3)
    # reductions: the two Linear layers (zdim), the norm's plane (N H W), the conv (C k^2); backward:
    # also the conv's and the Linear weights' sums over the batch and the plane
    cen = Census.of(n_fwd=max(zdim, n * h * w, 9 * c), n=max(zdim, n * h * w, 9 * c), depth=4)
    for step in range(2):   # (train: batch statistics, running statistics updated each step)
        x = torch.randn(n, c, h, w, generator=gen)
        y = torch.randn(n, zdim, generator=gen)
        g = torch.randn(n, c, h, w, generator=gen)
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        ys = [y.clone().requires_grad_(True) for _ in range(2)]
        want, got = eager(xs[0], ys[0]), fused(xs[1], ys[1])
        assert_normwise(got, want, cen, name=f"train step {step}")
        want.backward(g), got.backward(g)
        ref = _grads(eager)
        scale = max([t.abs().max().item() for t in ref.values()] + [xs[0].grad.abs().max().item(),
                                                                      ys[0].grad.abs().max().item()])
        for name, t in _grads(fused).items():
            assert_normwise(t, ref[name], cen, scale=scale, backward=True, name=f"d{name} step {step}")
        assert_normwise(xs[1].grad, xs[0].grad, cen, scale=scale, backward=True, name="dx")
        assert_normwise(ys[1].grad, ys[0].grad, cen, scale=scale, backward=True, name="dy")
        for model_ in (eager, fused):
            model_.zero_grad()
        # running statistics: a mean (var) over the plane, then the momentum update
        stats = Census.of(n_fwd=n * h * w, n=n * h * w, depth=1)
        assert_normwise(fused.bn1.stored_mean, eager.bn1.stored_mean, stats, scale=x.abs().max().item(),
                        name="stored_mean")
        assert_normwise(fused.bn1.stored_var, eager.bn1.stored_var, stats, scale=x.abs().max().item() ** 2 + 1,
                        name="stored_var")
    eager.eval(), fused.eval()
    x, y = torch.randn(n, c, h, w, generator=gen), torch.randn(n, zdim, generator=gen)
    assert_normwise(fused(x, y), eager(x, y), cen, name="eval")


def test_ccbn_shaped_module_it_cannot_probe_is_declined_with_a_reason():
    model = GBlock()
    model.bn1.gain, model.bn1.bias = Opaque(5, 6), Opaque(5, 6)
    fused, report = ganengine.fuse(model, return_report=True)
    assert type(fused.bn1) is ccbn
    reasons = [d.reason for d in report.declined if d.where == "bn1"]
    assert reasons and "gain child (Opaque)" in reasons[0], report.declined


# ----------------------------------------------------------------------------- D1 under other Pythons
# The bytecode of the call differs between 3.10 (LOAD_METHOD / CALL_METHOD), 3.11 (PRECALL), 3.12
# (LOAD_ATTR's method flag) and 3.13 (the callable below NULL). PYTHONS_FOR_BYTECODE_TESTS
# (interpreters, os.pathsep-separated, as tests/test_bcfix_s20.py) runs both readers under each, with
# a stand-in torch whose nn.parallel.data_parallel is the function the readers must recognise.
_PARALLEL_STUB = {
    "torch/__init__.py": "from . import nn, utils\n",
    "torch/utils/__init__.py": "",
    "torch/utils/checkpoint.py": "def checkpoint(function, *args, use_reentrant=None):\n    return function(*args)\n",
    "torch/nn/__init__.py": "from . import modules, parallel\nfrom .modules.module import Module\n"
                            "class Sequential(Module):\n    pass\n",
    "torch/nn/modules/__init__.py": "from . import module\n",
    "torch/nn/modules/module.py": ("_global_forward_hooks = {}\n_global_forward_pre_hooks = {}\n"
                                   "_global_backward_hooks = {}\n"
                                   "class Module:\n    def __init__(self):\n        pass\n"),
    "torch/nn/parallel/__init__.py": "from .data_parallel import data_parallel\n",
    "torch/nn/parallel/data_parallel.py": ("def data_parallel(module, inputs, device_ids=None):\n"
                                           "    return module(inputs)\n"),
    "torch/nn/utils/__init__.py": "",
}
_PARALLEL_HEADER = ('import torch\nimport torch.nn as nn\nimport torch.utils.checkpoint\n'
                    'from torch.nn.parallel import data_parallel\nfrom torch.utils.checkpoint import checkpoint\n\n'
                    'def my_parallel(module, inputs, ids):\n    return module[0](inputs)\n\n'
                    'class P(nn.Module):\n    ngpu = 2\n\n    def forward(self, input):\n'
                    '        if input.is_cuda and self.ngpu > 1:\n            output = CALL\n'
                    '        else:\n            output = self.main(input)\n        return output\n')
_PARALLEL_RUNNER = '''
import importlib.util, json, sys
stub, checks_path, cases_path, folder = sys.argv[1:5]
sys.path.insert(0, stub)
spec = importlib.util.spec_from_file_location("checks", checks_path)
checks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(checks)
cases, header = json.load(open(cases_path))
out = {}
for i, (case, call) in enumerate(sorted(cases.items())):
    src = header.replace("CALL", call)
    path = f"{folder}/p{i}.py"
    open(path, "w").write(src)
    s = importlib.util.spec_from_file_location(f"p{i}", path)
    mod = importlib.util.module_from_spec(s)
    sys.modules[s.name] = mod
    s.loader.exec_module(mod)
    scope = {"__name__": f"pe{i}"}
    exec(compile(src, "<string>", "exec"), scope)
    out[case] = [checks.chain_only_called(cls(), ("main",)) for cls in (mod.P, scope["P"])]
print(json.dumps(out))
'''


def _other_pythons():
    import os

    return [p for p in os.environ.get("PYTHONS_FOR_BYTECODE_TESTS", "").split(os.pathsep) if p]


@pytest.mark.skipif(not _other_pythons(), reason="set PYTHONS_FOR_BYTECODE_TESTS to interpreters to check")
@pytest.mark.parametrize("python", _other_pythons() or ["-"])
def test_data_parallel_decisions_under_other_pythons(python, tmp_path):
    import json
    import subprocess

    from ganengine.fusion import checks

    for rel, text in _PARALLEL_STUB.items():
        (tmp_path / "stub" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "stub" / rel).write_text(text)
    cases = {**FUSING, **DECLINING}
    (tmp_path / "cases.json").write_text(json.dumps([cases, _PARALLEL_HEADER]))
    (tmp_path / "run.py").write_text(_PARALLEL_RUNNER)
    (tmp_path / "mods").mkdir()
    done = subprocess.run([python, str(tmp_path / "run.py"), str(tmp_path / "stub"), checks.__file__,
                           str(tmp_path / "cases.json"), str(tmp_path / "mods")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)
    wrong = {case: answers[case] for case in cases
             if [a is None for a in answers[case]] != [case in FUSING] * 2}
    assert not wrong, (python, wrong)
