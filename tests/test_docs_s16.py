"""Session 16 (tester docs16): InstanceNormAct2d's argument order, the CLI's --device advice, the
strict-mode error text, evaluate's --dataroot help and the docs that disagreed with the code."""
from __future__ import annotations

import ast
import inspect
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ganengine
import ganengine.functional as GF
import ganengine.nn as gnn
from ganengine import backends
from ganengine.ops import _dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def _subparser(name: str):
    from ganengine.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return parser, sub.choices[name]


# ----------------------------------------------------------------------------- item 1
CONTRACT_ORDER = ["num_features", "affine", "track_running_stats", "eps", "momentum", "activation",
                  "negative_slope"]


def test_instance_norm_act_signature_follows_the_contract():
    params = list(inspect.signature(gnn.InstanceNormAct2d.__init__).parameters)[1:]
    assert params[:len(CONTRACT_ORDER)] == CONTRACT_ORDER
    defaults = {k: p.default for k, p in inspect.signature(gnn.InstanceNormAct2d.__init__).parameters.items()}
    assert (defaults["affine"], defaults["track_running_stats"], defaults["eps"], defaults["momentum"],
            defaults["activation"], defaults["negative_slope"]) == (False, False, 1e-5, 0.1, "leaky_relu", 0.2)


def test_instance_norm_act_positional_call_written_to_the_contract():
    torch.manual_seed(0)
    m = gnn.InstanceNormAct2d(8, True, True, 1e-3, 0.3, "relu", 0.0)
    assert (m.affine, m.track_running_stats, m.eps, m.momentum, m.activation) == (True, True, 1e-3, 0.3, "relu")
    ref = nn.InstanceNorm2d(8, eps=1e-3, momentum=0.3, affine=True, track_running_stats=True)
    assert list(m.state_dict()) == list(ref.state_dict())  # keys unchanged
    m2 = gnn.InstanceNormAct2d(8, True, True)
    assert (m2.affine, m2.track_running_stats, m2.eps, m2.momentum) == (True, True, 1e-5, 0.1)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        got = m2(x)
    torch.testing.assert_close(got, F.leaky_relu(F.instance_norm(x, eps=1e-5), 0.2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("args", [(8, 1e-5), (8, 1e-5, 0.1), (8, 1e-5, 0.1, True, True), (8, 0.001, None, True)])
def test_instance_norm_act_rejects_nn_instance_norm_order(args):
    with pytest.raises(TypeError) as info:
        gnn.InstanceNormAct2d(*args)
    msg = str(info.value)
    assert "affine must be a bool" in msg
    assert "eps and momentum come after affine and track_running_stats" in msg and "keyword" in msg
    assert "InstanceNormAct2d(num_features, affine=False, track_running_stats=False, eps=1e-5" in msg


@pytest.mark.parametrize("kwargs, exc, words", [
    ({"track_running_stats": 0.1}, TypeError, "track_running_stats must be a bool"),
    ({"affine": 1e-5}, TypeError, "affine must be a bool"),
    ({"eps": True}, TypeError, "eps must be a real number"),
    ({"eps": "1e-5"}, TypeError, "eps must be a real number"),
    ({"eps": -1e-5}, ValueError, "eps must be a real number >= 0"),
    ({"eps": float("nan")}, ValueError, "eps must be a real number >= 0"),
    ({"momentum": True}, TypeError, "momentum must be a real number or None"),
    ({"momentum": "0.1"}, TypeError, "momentum must be a real number or None"),
])
def test_instance_norm_act_checks_argument_types(kwargs, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        gnn.InstanceNormAct2d(4, **kwargs)

    # keywords in nn.InstanceNorm2d's order still mean the same; from_modules is unchanged
    m = gnn.InstanceNormAct2d(4, eps=0, momentum=None, affine=True, track_running_stats=True)
    assert (m.eps, m.momentum, m.affine, m.track_running_stats) == (0, None, True, True)
    fused = gnn.InstanceNormAct2d.from_modules(nn.InstanceNorm2d(4, affine=True), nn.ReLU())
    assert fused.affine and fused.activation == "relu" and fused.keep_layout is False


# ----------------------------------------------------------------------------- item 2
@pytest.mark.parametrize("command", [["bench", "--ops", "gan_loss"], ["profile", "cyclegan"]])
def test_bench_and_profile_accept_the_device_they_advise(command):
    from ganengine.cli._io import OutputError, device_or_error

    parser, _ = _subparser(command[0])
    assert parser.parse_args([*command, "--device", "auto"]).device == "auto"
    if not torch.cuda.is_available():
        with pytest.raises(OutputError) as info:
            device_or_error("cuda")
        advice = re.search(r"use --device (\w+) or (\w+)", str(info.value)).groups()
        for choice in advice:  # every device the advice names parses
            assert parser.parse_args([*command, "--device", choice]).device == choice


def test_bench_device_auto_means_the_default(monkeypatch, tmp_path):
    """`--device auto` runs as no --device at all (cuda when available, else cpu)."""
    from ganengine.bench import runner
    from ganengine.cli import bench

    seen = {}

    def fake_run(cases, device, **kwargs):
        seen["device"] = device
        raise ValueError("stop here")

    monkeypatch.setattr(runner, "run", fake_run)
    parser, _ = _subparser("bench")
    args = parser.parse_args(["bench", "--ops", "gan_loss", "--device", "auto", "--no-chart",
                              "--runners", "eager", "--output", str(tmp_path / "b")])
    assert bench.run(args) == 2
    assert seen["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- item 3
def test_strict_error_does_not_claim_a_fallback(monkeypatch):
    x = torch.randn(1, 2, 3, 3)
    with ganengine.use_backend("cuda"):  # cannot serve CPU tensors
        with backends.strict(), pytest.raises(_dispatch.BackendFallbackError) as info:
            GF.instance_norm_act(x)
        msg = str(info.value)
        assert "cannot serve this call" in msg and "cuda" in msg
        assert "using 'torch'" not in msg and "strict" in msg
        monkeypatch.setenv("GANENGINE_DEBUG", "1")  # the non-strict warning still says what happens
        with pytest.warns(RuntimeWarning, match="; using 'torch'"):
            GF.instance_norm_act(x)


# ----------------------------------------------------------------------------- item 4
def test_evaluate_dataroot_help_names_the_trained_on_folder():
    _, evaluate = _subparser("evaluate")
    action = next(a for a in evaluate._actions if "--dataroot" in a.option_strings)
    assert "folder the checkpoint was trained on, else the built-in sample data" in action.help
    assert "(default: built-in sample data)" not in action.help


# ----------------------------------------------------------------------------- a-e
def test_readme_strict_sentence_matches_the_code():
    readme = " ".join(_read("README.md").split())
    assert "turns a fallback into an error." not in readme
    assert "turns a fallback away from a backend you asked for" in readme
    assert "`auto` falling back to torch" in readme and "never an error" in readme
    # and the code: under strict, auto declining every native backend is torch, not an error
    x = torch.randn(1, 2, 3, 3)
    with backends.strict(), ganengine.use_backend("auto"):
        assert _dispatch.choose("instance_norm_act", x, {"cpu": "declined", "triton": "declined"}) == "torch"


def test_interfaces_step_index_is_described_where_it_lives():
    from ganengine.models.base import StepContext
    from ganengine.train.context import AmpContext

    doc = " ".join(_read("docs", "INTERFACES.md").split())
    assert "`StepContext.step_index` gives models the global step" not in doc
    assert not hasattr(StepContext(), "step_index") and hasattr(AmpContext(), "step_index")
    assert "AmpContext" in doc and "`ctx.step_index`" in doc and "base `StepContext` has no step counter" in doc


def test_metrics_export_names_the_evaluate_synthesis_function():
    from ganengine.metrics import evaluate_synthesis

    doc = _read("docs", "metrics_export.md")
    assert "`ganengine.metrics.evaluate_synthesis` instead" not in doc
    assert "`ganengine.metrics.evaluate_synthesis.evaluate_synthesis(...)`" in doc
    assert inspect.ismodule(evaluate_synthesis) and inspect.isfunction(evaluate_synthesis.evaluate_synthesis)


def _synopsis(doc: str, command: str) -> str:
    block = re.search(r"## `ganengine " + command + r"`\s*```(.*?)```", doc, re.S)
    return block.group(1)


def test_bench_md_synopses_list_every_option():
    doc = _read("docs", "bench.md")
    for command in ("bench", "profile"):
        synopsis = _synopsis(doc, command)
        _, sub = _subparser(command)
        for action in sub._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help":
                    assert re.search(re.escape(opt) + r"(?![\w-])", synopsis), (command, opt)
            if action.choices and action.option_strings:
                for choice in action.choices:
                    assert choice in synopsis, (command, action.option_strings, choice)
        assert "--device auto|cpu|cuda" in synopsis, command
    for dtype in ("float32", "float16", "bfloat16", "float64"):
        assert dtype in _synopsis(doc, "bench")


def test_bench_md_lists_every_model_case():
    from ganengine.bench import registry

    models = [c.name for c in registry.all_cases().values() if c.kind == "model"]
    assert len(models) >= 11
    doc = _read("docs", "bench.md")
    para = re.search(r"Models \(one full `train_step`.*?\.\n", doc, re.S).group(0)
    for name in models:
        assert f"`{name}`" in para, name


def _checkpoint_keys() -> set:
    """The keys of the engine's checkpoint dict (Trainer._state's returned literal)."""
    tree = ast.parse(_read("ganengine", "train", "engine.py"))
    keys = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and fn.name == "_state":
            for node in ast.walk(fn):
                if isinstance(node, ast.Return) and isinstance(node.value, ast.Dict):
                    for k, v in zip(node.value.keys, node.value.values):
                        if k is not None:
                            keys.add(k.value)
                        else:  # **({...} if ... else {}): the keys of the dicts spread in
                            keys.update(kk.value for d in ast.walk(v) if isinstance(d, ast.Dict)
                                        for kk in d.keys if isinstance(kk, ast.Constant))
    return keys


def test_checkpoint_keys_documented():
    keys = _checkpoint_keys()
    assert {"schedule", "loss_sums", "networks", "step"} <= keys
    interfaces = _read("docs", "INTERFACES.md")
    block = re.search(r"## Training checkpoints.*?```(.*?)```", interfaces, re.S).group(1)
    training = _read("docs", "training.md")
    para = re.search(r"## Checkpoints and resume(.*?)Written to a temporary file", training, re.S).group(1)
    for key in sorted(keys):
        assert f'"{key}"' in block, ("INTERFACES.md", key)
        assert f"`{key}`" in para, ("training.md", key)


def test_instance_norm_act_takes_the_flags_nn_instance_norm_takes():
    """0 / 1, bool tensors and 0-dim tensors for eps stay accepted, as by nn.InstanceNorm2d."""
    for kw in (dict(affine=1), dict(track_running_stats=0), dict(affine=torch.tensor(True)),
               dict(eps=torch.tensor(1e-5)), dict(momentum=None)):
        gnn.InstanceNormAct2d(4, **kw)
