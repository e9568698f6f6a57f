"""ganengine.export and the evaluate/export commands.

ONNX files are run with onnxruntime on CPU and compared with the ganengine output (normwise
network bounds, tests/_model_bounds.py);
TorchScript files are loaded in a fresh process that never imports ganengine. The generators
use the fused ops, so the tests also prove that no ganengine:: op survives the export.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import ganengine
from ganengine.cli import main as cli_main
from ganengine.export import ExportError, custom_ops_in_graph, to_onnx, to_torchscript, trace
from ganengine.nn import InstanceNormAct2d
from tests._model_bounds import assert_normwise, census

# the tests trace models without lowering on purpose; torch.jit warns about that and its deprecation
RAW_TRACE_WARNINGS = [pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
                      pytest.mark.filterwarnings("ignore::FutureWarning")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEATURES = os.path.join(ROOT, "tests", "feature_extractor.py") + ":SmallFeatureExtractor"


def _ort():
    return pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")


class TinyResnetG(nn.Module):
    """A CycleGAN-style generator on the fused op (conv -> InstanceNormAct -> residual -> tanh)."""

    def __init__(self, ngf=8):
        super().__init__()
        self.head = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7), InstanceNormAct2d(ngf, activation="relu"))
        self.down = nn.Sequential(nn.Conv2d(ngf, 2 * ngf, 3, 2, 1), InstanceNormAct2d(2 * ngf, affine=True,
                                                                                      activation="relu"))
        self.block = nn.Sequential(nn.Conv2d(2 * ngf, 2 * ngf, 3, 1, 1), InstanceNormAct2d(2 * ngf, activation="none"))
        self.up = nn.Sequential(nn.ConvTranspose2d(2 * ngf, ngf, 3, 2, 1, output_padding=1),
                                InstanceNormAct2d(ngf, activation="leaky_relu", negative_slope=0.2))
        self.tail = nn.Sequential(nn.Conv2d(ngf, 3, 3, 1, 1), nn.Tanh())

    def forward(self, x):
        h = self.down(self.head(x))
        return self.tail(self.up(h + self.block(h)))


class TinyConditionalG(nn.Module):
    """Two inputs and a tuple output with a None (as StarGAN's inputs, StackGAN's outputs)."""

    def __init__(self, c_dim=3):
        super().__init__()
        self.conv = nn.Conv2d(3 + c_dim, 8, 3, 1, 1)
        self.norm = InstanceNormAct2d(8, affine=True, track_running_stats=True, activation="relu")
        self.out = nn.Conv2d(8, 3, 3, 1, 1)

    def forward(self, x, c):
        c = c[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
        h = self.norm(self.conv(torch.cat([x, c], 1)))
        return None, torch.tanh(self.out(h)), h.mean((2, 3))


def assert_ort(got, expected, cen):
    """onnxruntime's output within the normwise network bound of ganengine's (tests/_model_bounds.py),
    both fp32; onnxruntime folds constants (a norm's scale into the conv weight): one more
    rounding stage."""
    assert_normwise(torch.from_numpy(got), expected, cen, extra_depth=1)


def _run_ort(path, inputs):
    ort = _ort()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return sess.run(None, feeds)


@RAW_TRACE_WARNINGS[0]
@RAW_TRACE_WARNINGS[1]
def test_plain_trace_keeps_custom_op_and_export_lowers_it():
    # without lowering, a trace records the opaque custom op (the reason export must lower)
    model, x = TinyResnetG().eval(), torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        raw = torch.jit.trace(model, x, check_trace=False)
    # (ganengine:: custom ops, or the C++ ops with their autograd in C++, ganengine_C::, that the
    # cpu backend's lean entries call)
    assert any(k.startswith(("ganengine::", "ganengine_C::")) for k in custom_ops_in_graph(raw.inlined_graph))
    assert custom_ops_in_graph(trace(model, x).inlined_graph) == []


def test_onnx_matches_ganengine_output(tmp_path):
    _ort()
    model = TinyResnetG()
    x = torch.randn(2, 3, 24, 24)
    path = to_onnx(model, x, tmp_path / "g.onnx")
    assert model.training  # mode restored after export
    model.eval()
    for batch in (x, torch.randn(3, 3, 24, 24)):  # the batch dimension is dynamic
        with torch.no_grad(), census(model) as cen:
            expected = model(batch)
        (got,) = _run_ort(path, [batch])
        assert_ort(got, expected, cen)


def test_onnx_fused_model_from_ganengine_fuse(tmp_path):
    _ort()
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.InstanceNorm2d(8, affine=True), nn.LeakyReLU(0.2),
                          nn.Conv2d(8, 3, 3, 1, 1), nn.Tanh()).eval()
    fused = ganengine.fuse(plain)
    assert any(isinstance(m, InstanceNormAct2d) for m in fused.modules())
    x = torch.randn(2, 3, 20, 20)
    path = to_onnx(fused, x, tmp_path / "f.onnx")
    with torch.no_grad(), census(plain) as cen:
        expected = plain(x)
    assert_ort(_run_ort(path, [x])[0], expected, cen)


def test_onnx_multiple_inputs_and_outputs(tmp_path):
    _ort()
    model = TinyConditionalG()
    model.norm.running_mean.uniform_(-0.5, 0.5)
    model.norm.running_var.uniform_(0.5, 2.0)
    model.eval()
    x, c = torch.randn(2, 3, 12, 12), torch.eye(3)[[0, 2]]
    path = to_onnx(model, (x, c), tmp_path / "c.onnx")
    with torch.no_grad(), census(model) as cen:
        _, image, pooled = model(x, c)
    got_image, got_pooled = _run_ort(path, [x, c])
    assert_ort(got_image, image, cen)
    assert_ort(got_pooled, pooled, cen)


def test_norm_stats_input_matches_training_mode_output(tmp_path):
    # StarGAN's reference translates in training mode: instance norms use the input statistics
    model = TinyConditionalG()
    model.norm.running_mean.fill_(3.0)  # would change the output if they were used
    x, c = torch.randn(2, 3, 12, 12), torch.eye(3)[[0, 1]]
    path = to_onnx(model, (x, c), tmp_path / "i.onnx", norm_stats="input")
    assert float(model.norm.running_mean[0]) == 3.0  # the model itself is untouched
    with torch.no_grad(), census(model) as cen:
        _, expected, _ = model.train()(x, c)
    assert_ort(_run_ort(path, [x, c])[0], expected, cen)
    with pytest.raises(ValueError, match="norm_stats"):
        to_onnx(model, (x, c), tmp_path / "j.onnx", norm_stats="batch")


def test_batch_norm_on_batch_statistics_with_dynamic_batch(tmp_path):
    # pix2pix's batch norm as its reference tests it (no --eval), and a BatchNorm that tracks nothing
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4, track_running_stats=False), nn.Tanh())
    model[1].running_mean.fill_(5.0)
    x = torch.randn(3, 3, 8, 8)
    path = to_onnx(model, x, tmp_path / "bn.onnx", norm_stats="input")
    with torch.no_grad(), census(model) as cen:
        expected = model.train()(x)
    assert_ort(_run_ort(path, [x])[0], expected, cen)


def _run_without_ganengine(script: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GANENGINE_BACKEND")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_torchscript_loads_without_ganengine(tmp_path):
    model = TinyResnetG().eval()
    x = torch.randn(2, 3, 16, 16)
    to_torchscript(model, x, tmp_path / "g.pt")
    with torch.no_grad(), census(model) as cen:
        y = model(x)
    # the normwise network bound (tests/_model_bounds.py), both fp32: handed to the subprocess
    from tests._tolerance import gamma_prob

    tol = 2 * max(cen.depth, 1) * gamma_prob(cen.n_fwd, torch.float32) * max(y.abs().max().item(), cen.last_scale)
    torch.save({"x": x, "y": y, "tol": tol}, tmp_path / "io.pt")
    proc = _run_without_ganengine("""
        import sys, warnings
        warnings.simplefilter("ignore")
        import torch
        m = torch.jit.load("g.pt")
        io = torch.load("io.pt")
        with torch.no_grad():
            y = m(io["x"])
        assert (y - io["y"]).abs().max() <= io["tol"] + 2 ** -24 * io["y"].abs().max(), (y - io["y"]).abs().max()
        assert "ganengine" not in sys.modules, sorted(k for k in sys.modules if "ganengine" in k)
        print("OK")
    """, tmp_path)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_export_argument_errors(tmp_path):
    with pytest.raises(TypeError, match="example_input"):
        to_onnx(TinyResnetG(), [1, 2], tmp_path / "x.onnx")
    with pytest.raises(TypeError, match="nn.Module"):
        trace(lambda x: x, torch.zeros(1))

    class ReturnsDict(nn.Module):
        def forward(self, x):
            return {"y": x}

    with pytest.raises(ExportError, match="tensors"):
        trace(ReturnsDict(), torch.zeros(1, 3, 4, 4))


# ----------------------------------------------------------------------------- networks of ganengine.models
def _build_network():
    models = pytest.importorskip("ganengine.models", reason="ganengine.models is not available in this build")
    if not hasattr(models, "build_network"):
        pytest.skip("ganengine.models.build_network is not available in this build")
    return models.build_network


MODEL_CASES = {
    "resnet_6blocks": (dict(input_nc=3, output_nc=3, ngf=8), lambda: (torch.randn(1, 3, 32, 32),)),
    "unet_128": (dict(input_nc=3, output_nc=3, ngf=4), lambda: (torch.randn(1, 3, 128, 128),)),
    "stargan_G": (dict(conv_dim=8, c_dim=3, repeat_num=2), lambda: (torch.randn(1, 3, 32, 32), torch.eye(3)[[1]])),
    "stackgan_stage1_G": (dict(gf_dim=16, condition_dim=8, text_dim=16, z_dim=10),
                          lambda: (torch.randn(2, 16), torch.randn(2, 10))),
}


@pytest.mark.parametrize("arch", sorted(MODEL_CASES))
def test_models_generators_export(arch, tmp_path):
    _ort()
    build_network = _build_network()
    kwargs, make_inputs = MODEL_CASES[arch]
    net = build_network(arch, **kwargs).eval()
    inputs = make_inputs()
    path = to_onnx(net, inputs, tmp_path / f"{arch}.onnx")
    with torch.no_grad(), census(net, winograd=True) as cen:
        out = net(*inputs)
    outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
    got = _run_ort(path, inputs)
    assert len(got) == len(outs)
    for g, e in zip(got, outs):
        if arch.startswith("stackgan"):
            # the conditioning augmentation samples noise inside the graph: compare shapes only
            # for the sampled outputs, values for the deterministic mu/logvar
            assert tuple(g.shape) == tuple(e.shape)
        else:
            assert_ort(g, e, cen)
    if arch.startswith("stackgan"):
        assert_ort(got[-1], outs[-1], cen)
        assert_ort(got[-2], outs[-2], cen)
    ts = trace(net, inputs)
    assert custom_ops_in_graph(ts.inlined_graph) == []


@RAW_TRACE_WARNINGS[0]
@RAW_TRACE_WARNINGS[1]
def test_generator_with_sagan_attention_exports(tmp_path):
    # the attention op, and the conv/norm ops around it, lowered in one graph
    models = pytest.importorskip("ganengine.models", reason="ganengine.models is not available in this build")
    _ort()
    net = models.StarGANGenerator(conv_dim=8, c_dim=3, repeat_num=1, attention_scale=4).eval()
    x, c = torch.randn(2, 3, 16, 16), torch.eye(3)[[0, 2]]
    with torch.no_grad():
        raw = torch.jit.trace(net, (x, c), check_trace=False)
        with census(net, winograd=True) as cen:
            expected = net(x, c)
    assert any("attention" in k for k in custom_ops_in_graph(raw.inlined_graph))
    path = to_onnx(net, (x, c), tmp_path / "attn.onnx")
    assert_ort(_run_ort(path, [x, c])[0], expected, cen)


# ----------------------------------------------------------------------------- commands
class TinyPix2Pix(nn.Module):
    """Stands in for ganengine.models.Pix2Pix where that package is not built yet: the GANModel
    surface the commands use (MODEL_NAME, options, generator_name, network_names, translate)."""

    MODEL_NAME = "pix2pix"
    generator_name = "netG"
    network_names = ["netG"]

    def __init__(self):
        super().__init__()
        self.options = {"input_nc": 3, "output_nc": 3, "load_size": 32, "crop_size": 32, "netG": "resnet_6blocks"}
        self.netG = TinyResnetG()

    def translate(self, batch):
        return self.netG(batch["A"])


@pytest.fixture
def tiny_checkpoint(tmp_path, monkeypatch):
    """A small pix2pix training checkpoint: a run folder written by the training engine's
    checkpoint writer with a real ganengine.models model when those exist, else a checkpoint file
    of TinyPix2Pix with the commands' loader pointed at it."""
    try:
        from ganengine.models import build_model
        from ganengine.train.checkpoint import save
    except ImportError:
        build_model = None
    if build_model is not None:
        model = build_model("pix2pix", netG="resnet_6blocks", ngf=8, ndf=8, crop_size=32)
        state = {"format": "ganengine-checkpoint", "version": 1, "model": "pix2pix", "options": model.options,
                 "networks": {n: getattr(model, n).state_dict() for n in model.network_names}, "data": {}}
        save(state, str(tmp_path / "run"), step=3)
        return tmp_path / "run"
    model = TinyPix2Pix()
    path = tmp_path / "ckpt.pt"
    torch.save({"format": "ganengine-checkpoint", "version": 1, "model": "pix2pix", "options": model.options,
                "networks": {"netG": model.netG.state_dict()}}, path)
    monkeypatch.setattr("ganengine.cli.evaluate.load_checkpoint", lambda p, device="cpu": (model, {}))
    return path


def test_evaluate_command_on_builtin_data(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    rc = cli_main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--metrics", "fid,kid,l1,psnr,ssim",
                   "--feature_extractor", FEATURES, "--batch_size", "8", "--kid_subsets", "10",
                   "--max_images", "12", "--output", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    res = json.loads(out.read_text())
    assert res["phase"] == "val" and res["images"] == 12  # the built-in pix2pix split (20 images)
    assert res["fid"] > 0 and res["l1"] > 0 and -1 <= res["ssim"] <= 1 and "kid" in res
    assert "fid:" in captured.out


def test_evaluate_command_errors(tiny_checkpoint, capsys):
    rc = cli_main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--metrics", "fid"])
    assert rc == 2 and "pt_inception-2015-12-05-6726825d.pth" in capsys.readouterr().err
    rc = cli_main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--metrics", "fid,bogus"])
    assert rc == 2 and "subset of" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "state_dict"])
def test_export_command(fmt, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / f"g.{fmt}"
    rc = cli_main(["export", "--checkpoint", str(tiny_checkpoint), "--format", fmt, "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert out.stat().st_size > 0
    if fmt == "onnx" and _ort():
        (y,) = _run_ort(out, [torch.randn(2, 3, 32, 32)])
        assert y.shape == (2, 3, 32, 32)
    if fmt == "state_dict":
        assert all(isinstance(v, torch.Tensor) for v in torch.load(out, weights_only=True).values())
    rc = cli_main(["export", "--checkpoint", str(tiny_checkpoint), "--format", "onnx", "--reference"])
    assert rc == 2 and "--reference" in capsys.readouterr().err


def test_export_reference_checkpoint_round_trip(tiny_checkpoint, tmp_path, capsys):
    models = pytest.importorskip("ganengine.models", reason="ganengine.models is not available in this build")
    out = tmp_path / "latest_net_G.pth"
    rc = cli_main(["export", "--checkpoint", str(tiny_checkpoint), "--format", "state_dict", "--reference",
                   "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    from ganengine.cli.evaluate import load_checkpoint

    original = load_checkpoint(str(tiny_checkpoint))[0].netG.eval()
    loaded = models.load_reference_checkpoint(str(out), "resnet_6blocks", ngf=8, norm="batch", use_dropout=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with census(original, winograd=True) as cen:
            want = original(x)
        assert_normwise(loaded(x), want, cen)  # normwise network bound (tests/_model_bounds.py)


@pytest.mark.parametrize("norm_stats", ["input", "running"])
def test_fused_batch_norm_act_keeps_its_activation(tmp_path, norm_stats):
    """A fuse()d BatchNorm2d -> LeakyReLU (gnn.BatchNormAct2d) exports with its activation under
    both norm_stats settings (the input-statistics rewrite once dropped it)."""
    import ganengine

    model = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.LeakyReLU(0.2), nn.Conv2d(4, 2, 1))
    model[2].negative_slope = 0.3
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    fused = ganengine.fuse(model)
    assert type(fused[1]).__name__ == "BatchNormAct2d"
    x = torch.randn(3, 3, 8, 8)
    path = to_onnx(fused, x, tmp_path / "f.onnx", norm_stats=norm_stats)
    ref = model.train() if norm_stats == "input" else model.eval()
    with torch.no_grad(), census(ref) as cen:
        expected = ref(x)
    assert_ort(_run_ort(path, [x])[0], expected, cen)
