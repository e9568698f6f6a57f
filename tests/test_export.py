"""ganengine.export and the evaluate/export commands.

ONNX files are run with onnxruntime on CPU and compared with the ganengine output (normwise
network bounds, tests/_model_bounds.py);
TorchScript files are loaded in a fresh process that never imports ganengine. The generators
use the fused ops, so the tests also prove that no ganengine:: op survives the export.
"""
import copy
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
from ganengine.nn import BatchNormAct2d, InstanceNormAct2d
from tests._model_bounds import assert_normwise, census
from tests._train_utils import one_thread  # noqa: F401 (fixture)

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


class MultiscaleD(nn.Module):
    """pix2pixHD's / SPADE's MultiscaleDiscriminator output: [[features..., logits] per scale]."""

    def __init__(self):
        super().__init__()
        self.d0 = nn.Sequential(nn.Conv2d(3, 4, 4, 2, 1), nn.LeakyReLU(0.2))
        self.d1 = nn.Sequential(nn.Conv2d(3, 4, 4, 2, 1), nn.LeakyReLU(0.2))
        self.head = nn.Conv2d(4, 1, 3, 1, 1)

    def forward(self, x):
        f0, f1 = self.d0(x), self.d1(nn.functional.avg_pool2d(x, 2))
        return [[f0, self.head(f0)], [f1, None, self.head(f1)]]


def test_export_flattens_nested_outputs(tmp_path):
    """Nested lists were dropped: the TorchScript file returned () and the ONNX graph had no output."""
    m, x = MultiscaleD().eval(), torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        want = [t for scale in m(x) for t in scale if t is not None]
    to_torchscript(m, x, tmp_path / "d.pt")
    got = torch.jit.load(str(tmp_path / "d.pt"))(x)
    assert len(got) == 4
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    to_onnx(m, x, tmp_path / "d.onnx")
    outs = _run_ort(tmp_path / "d.onnx", [x])
    assert len(outs) == 4
    for a, b in zip(outs, want):
        torch.testing.assert_close(torch.from_numpy(a), b, atol=1e-5, rtol=1e-5)

    class ReturnsNothing(nn.Module):
        def forward(self, x):
            return [None, [None]]

    with pytest.raises(ExportError, match="no tensor to export"):
        trace(ReturnsNothing(), x)


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
    assert isinstance(fused[1], BatchNormAct2d)
    x = torch.randn(3, 3, 8, 8)
    path = to_onnx(fused, x, tmp_path / "f.onnx", norm_stats=norm_stats)
    ref = model.train() if norm_stats == "input" else model.eval()
    with torch.no_grad(), census(ref) as cen:
        expected = ref(x)
    assert_ort(_run_ort(path, [x])[0], expected, cen)


# ----------------------------------------------------------------------------- synthesis models
# tiny networks of every synthesis model (noise [+ class / codes / instance features] -> image)
SYNTHESIS_CASES = {
    "dcgan": dict(nz=8, ngf=4, ndf=4, nc=1),
    "wgan_gp": dict(latent_dim=8, img_size=8),
    "cgan": dict(latent_dim=8, img_size=8, n_classes=3),
    "acgan": dict(latent_dim=8, img_size=16, n_classes=3),
    "infogan": dict(latent_dim=8, img_size=16, n_classes=3),
    "sagan": dict(g_conv_dim=8, d_conv_dim=8, z_dim=8),
    "biggan": dict(resolution=32, G_ch=4, D_ch=4, G_attn="0", D_attn="16", dim_z=16, n_classes=3),
    "biggan_deep": dict(resolution=32, G_ch=4, D_ch=4, G_attn="0", D_attn="0", dim_z=8, n_classes=3),
    "unetgan": dict(resolution=32, G_ch=4, D_ch=4, G_attn="0", D_attn="0", dim_z=16, n_classes=3),
    "icgan": dict(resolution=32, n_classes=4, G_ch=4, D_ch=4, G_attn="0", D_attn="16", hier=True, dim_z=16,
                  shared_dim=6, G_shared_feat=True, shared_dim_feat=5, instance_sz=6),
}


def _synthesis_run(name, tmp_path, **extra):
    """A run folder with a checkpoint of the tiny ``name`` model, as the training engine writes it."""
    from ganengine.models import build_model
    from ganengine.train.checkpoint import save

    torch.manual_seed(0)
    model = build_model(name, **SYNTHESIS_CASES[name], **extra)
    state = {"format": "ganengine-checkpoint", "version": 1, "model": name, "options": model.options,
             "networks": {n: getattr(model, n).state_dict() for n in model.network_names}, "data": {}}
    save(state, str(tmp_path / name), step=1)
    return model, tmp_path / name


def _tensors(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in outs if isinstance(o, torch.Tensor)]


def _close(got, want):
    # fp32 graphs of standard ops against the eager (fused) network: outputs O(1)
    torch.testing.assert_close(torch.as_tensor(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", sorted(SYNTHESIS_CASES))
def test_export_command_synthesis_generators(name, tmp_path, capsys):
    """`ganengine export` of every synthesis model's generator, ONNX and TorchScript, with the
    generator's real inputs (noise, labels, codes, instance features): the files run at another
    batch size and compute what the eager generator computes as the model samples (training-mode
    batch statistics, --norm_stats auto), and the checkpoint's generator is left as it was."""
    _, run = _synthesis_run(name, tmp_path)
    for fmt, suffix in (("onnx", "onnx"), ("torchscript", "pt")):
        rc = cli_main(["export", "--checkpoint", str(run), "--format", fmt, "--output", str(tmp_path / f"G.{suffix}")])
        assert rc == 0, capsys.readouterr().err
    from ganengine.cli.evaluate import load_checkpoint
    from ganengine.cli.export import synthesis_generator_input

    model = load_checkpoint(str(run))[0]
    inputs = synthesis_generator_input(model, batch=3, seed=7)  # traced with 2: the batch is dynamic
    graph_inputs = [t for t in inputs if t is not None]
    with torch.no_grad():
        want = _tensors(copy.deepcopy(model.G).train()(*inputs))  # the model samples in training mode
        ts = torch.jit.load(str(tmp_path / "G.pt"))
        for _ in range(2):  # the loaded module keeps no state between calls
            got = _tensors(ts(*graph_inputs))
            assert len(got) == len(want)
            for g, w in zip(got, want):
                _close(g, w)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        pytest.skip("onnxruntime is not installed: the ONNX file was written but not run")
    got = _run_ort(tmp_path / "G.onnx", graph_inputs)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        _close(g, w)


@pytest.mark.parametrize("name", sorted(SYNTHESIS_CASES))
def test_export_reference_checkpoints_of_synthesis_models(name, tmp_path, capsys):
    """--format state_dict --reference of every synthesis model's G and D (what
    load_reference_checkpoint's error tells users to run): the files load back through
    load_reference_checkpoint with the arch and equal the networks' weights; a network the
    reference has no counterpart of (U-Net GAN's D) is a one-line error."""
    from ganengine.cli.export import _SYNTHESIS_ARCHS

    model, run = _synthesis_run(name, tmp_path)
    for net_name, arch in zip(("G", "D"), _SYNTHESIS_ARCHS[name]):
        out = tmp_path / f"{net_name}.pth"
        rc = cli_main(["export", "--checkpoint", str(run), "--format", "state_dict", "--reference",
                       "--network", net_name, "--output", str(out)])
        err = capsys.readouterr().err
        if arch is None:
            assert rc == 2 and f"no reference format known for network {net_name!r}" in err, err
            continue
        if name == "sagan":  # (the reference hard-codes conv_dim=64's attention widths: conv_dim 8 refused)
            assert rc == 2 and "conv_dim=64" in err and len(err.strip().splitlines()) == 1, err
            continue
        assert rc == 0, err
        sd = torch.load(out, weights_only=True)
        ours = getattr(model, net_name).state_dict()
        assert set(sd) == set(ours)
        for k in sd:
            torch.testing.assert_close(sd[k], ours[k], rtol=0, atol=0)
        from ganengine.models import CheckpointMismatchError, load_reference_checkpoint

        try:  # the arch's default sizes, else the call the mismatch error suggests, as a user runs it
            net = load_reference_checkpoint(str(out), arch)
        except CheckpointMismatchError as exc:
            call = str(exc).rsplit("its shapes fit ", 1)[1]
            net = eval(call, {"load_reference_checkpoint": load_reference_checkpoint, "path": str(out)})
        for k, v in net.state_dict().items():
            torch.testing.assert_close(v, ours[k], rtol=0, atol=0)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ["cgan", "icgan", "sagan", "unetgan"])
def test_export_command_synthesis_discriminators(name, tmp_path, capsys):
    """--network D: images of the generator's size plus the conditioning a conditional D takes
    (cGAN's labels, IC-GAN's instance features, U-Net GAN's labels and its two outputs)."""
    _, run = _synthesis_run(name, tmp_path)
    rc = cli_main(["export", "--checkpoint", str(run), "--format", "torchscript", "--network", "D",
                   "--output", str(tmp_path / "D.pt"), "--norm_stats", "running"])
    assert rc == 0, capsys.readouterr().err
    from ganengine.cli.evaluate import load_checkpoint
    from ganengine.cli.export import example_input

    model = load_checkpoint(str(run))[0]
    inputs = example_input(model, "D", batch=3, norm_stats="running")
    with torch.no_grad():
        want = _tensors(copy.deepcopy(model.D).eval()(*inputs))
        got = _tensors(torch.jit.load(str(tmp_path / "D.pt"))(*[t for t in inputs if t is not None]))
    assert len(got) == len(want) >= 1
    for g, w in zip(got, want):
        _close(g, w)


def test_export_command_default_network_is_the_sampling_generator(tmp_path, capsys):
    """With --ema and --use_ema the model samples from G_ema: that is what export writes by default."""
    _, run = _synthesis_run("cgan", tmp_path, ema=True, ema_decay=0.5)
    rc = cli_main(["export", "--checkpoint", str(run), "--format", "torchscript"])
    assert rc == 0, capsys.readouterr().err
    assert (run / "G_ema.pt").is_file()


def test_export_command_options_are_honoured_or_named(tmp_path, capsys):
    _, run = _synthesis_run("dcgan", tmp_path)
    ort = None
    try:
        import onnxruntime as ort
    except ImportError:
        pass
    # --batch_size with --static_batch fixes the graph's batch; --image_size sets a D's image size
    out = tmp_path / "g.onnx"
    rc = cli_main(["export", "--checkpoint", str(run), "--format", "onnx", "--static_batch", "--batch_size", "3",
                   "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    if ort is not None:
        (inp,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_inputs()
        assert list(inp.shape) == [3, 8, 1, 1]  # DCGAN's G takes z as (N, nz, 1, 1)
    _, big = _synthesis_run("biggan", tmp_path)
    rc = cli_main(["export", "--checkpoint", str(big), "--format", "torchscript", "--network", "D",
                   "--image_size", "16", "--output", str(tmp_path / "d.pt")])
    assert rc == 0, capsys.readouterr().err
    with torch.no_grad():  # traced on 16x16 images (BigGAN's D sums over space: any size runs)
        d = torch.jit.load(str(tmp_path / "d.pt"))
        assert d(torch.randn(2, 3, 16, 16), torch.tensor([0, 2])).shape == (2, 1)
    # options that cannot apply are errors naming the option
    bad = [(["--format", "onnx", "--image_size", "32"], "--image_size 32"),
           (["--format", "torchscript", "--static_batch"], "--static_batch"),
           (["--format", "torchscript", "--opset", "17"], "--opset"),
           (["--format", "state_dict", "--batch_size", "2"], "--batch_size"),
           (["--format", "state_dict", "--norm_stats", "running"], "--norm_stats"),
           (["--format", "onnx", "--opset", "11"], "--opset"),
           (["--format", "onnx", "--batch_size", "0"], "--batch_size")]
    for argv, flag in bad:
        rc = cli_main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "x")] + argv)
        err = capsys.readouterr().err
        assert rc == 2 and flag in err, (argv, err)


@pytest.mark.parametrize("fused", [True, False, "fuse"])
def test_sagan_networks_export_to_torchscript(fused, tmp_path):
    """SAGAN's reference spectral norm (an autograd.Function, power iteration writing u and v
    every forward) lowers to standard ops: the TorchScript file saves and loads, computes the
    network's next forward (one iteration from the stored u), every call the same, and the
    network's u and v are not moved by the export."""
    from ganengine.models.networks_sagan import SAGANDiscriminator, SAGANGenerator

    torch.manual_seed(0)
    for net, x in ((SAGANGenerator(2, 64, 16, 8, fused=fused is True), torch.randn(2, 16)),
                   (SAGANDiscriminator(2, 64, 8, fused=fused is True), torch.randn(2, 3, 64, 64))):
        if fused == "fuse":
            net = ganengine.fuse(net)
        net.eval()
        before = {k: v.clone() for k, v in net.state_dict().items()}
        path = to_torchscript(net, x, tmp_path / "s.pt")
        assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
        loaded = torch.jit.load(path)
        with torch.no_grad():
            first, second = loaded(x), loaded(x)
            want = net(x)  # the network's next forward (iterates from the same u)
        for a, b, w in zip(first, second, _tensors(want)):
            assert torch.equal(a, b)
            _close(a, w)


def test_export_leaves_state_alone_and_exports_the_current_state(tmp_path):
    """Export runs nothing on the model itself (SN u/v, BN running statistics, train/eval mode)
    and the graph holds the weights of now, not those after the export's own forwards (ONNX
    export used to run SAGAN's power iteration twice before the graph was recorded)."""
    from ganengine.models.networks_sagan import SAGANGenerator

    torch.manual_seed(0)
    net = SAGANGenerator(2, 64, 16, 8).train()
    z = torch.randn(2, 16)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    onnx_path = to_onnx(net, z, tmp_path / "s.onnx")
    assert net.training
    assert [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])] == []
    with torch.no_grad():
        want = copy.deepcopy(net).eval()(z)[0]  # what the network computes now (its next forward)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        pytest.skip("onnxruntime is not installed: the ONNX file was not run")
    _close(_run_ort(onnx_path, [z])[0], want)
    # a torch.nn.utils spectral norm and batch norm: running statistics and u untouched too
    plain = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(4, 8)), nn.BatchNorm1d(8)).train()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    x = torch.randn(3, 4)
    to_onnx(plain, x, tmp_path / "p.onnx", norm_stats="input")
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())
    ref = copy.deepcopy(plain)
    ref[0].eval()  # eval semantics for the spectral norm (no iteration), the batch's statistics for the norm
    with torch.no_grad():
        _close(_run_ort(tmp_path / "p.onnx", [x])[0], ref(x))


def test_example_input_with_none_for_an_optional_argument(tmp_path):
    """None in example_input: an argument the model is called without (IC-GAN's label without
    class_cond); the graph takes the tensors only."""

    class Optional(nn.Module):
        def forward(self, z, label=None, feats=None):
            assert label is None
            return torch.tanh(z + feats)

    z, f = torch.randn(2, 4), torch.randn(2, 4)
    loaded = torch.jit.load(to_torchscript(Optional(), (z, None, f), tmp_path / "o.pt"))
    torch.testing.assert_close(loaded(z, f), torch.tanh(z + f))
    with pytest.raises(TypeError, match="example_input"):
        to_torchscript(Optional(), (None, None), tmp_path / "n.pt")


@pytest.mark.parametrize("wrap", ["sn", "weight_norm", "old_sn", "linear_sn"])
def test_fused_computed_weight_layers_trace_and_export(wrap, tmp_path):
    """Convs whose weight is computed (torch's spectral_norm / weight_norm, new or old style) and
    ganengine's spectral norm on a Linear, after fuse(): torch.jit.trace and the exports ran the
    routing builtins (Python bools a trace cannot record) or the C++ route's autograd.Function
    (non-tensor arguments): both failed. The traces compute what the unfused model computes."""
    from ganengine import export

    P = nn.utils.parametrizations
    make = {"sn": lambda: P.spectral_norm(nn.Conv2d(4, 4, 3, 1, 1)),
            "weight_norm": lambda: P.weight_norm(nn.Conv2d(4, 4, 4, 2, 1)),
            "old_sn": lambda: nn.utils.spectral_norm(nn.Conv2d(4, 4, 3, 1, 1)),
            "linear_sn": lambda: P.spectral_norm(nn.Linear(8, 4))}[wrap]
    x = torch.randn(2, 8) if wrap == "linear_sn" else torch.randn(1, 4, 8, 8)

    def build():
        torch.manual_seed(0)
        return nn.Sequential(make(), nn.LeakyReLU(0.2)).eval()

    want = build()(x)
    fused = ganengine.fuse(build())
    traced = torch.jit.trace(fused, (x,), check_trace=False)
    torch.testing.assert_close(traced(x), want, rtol=1e-5, atol=1e-6)
    export.to_torchscript(ganengine.fuse(build()), x, str(tmp_path / "m.pt"))
    torch.testing.assert_close(torch.jit.load(str(tmp_path / "m.pt"))(x), want, rtol=1e-5, atol=1e-6)
    export.to_onnx(ganengine.fuse(build()), x, str(tmp_path / "m.onnx"))
    assert (tmp_path / "m.onnx").stat().st_size > 0


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ["pix2pix", "cyclegan"])
def test_export_batch_norm_translator_follows_translate_at_any_batch(name, tmp_path, capsys):
    """A batch-norm pix2pix / CycleGAN without --eval translates image by image in training mode
    (each image's own statistics, as the references test at batch size 1). --norm_stats auto
    exported batch-wide statistics: at batch 1 the same, at batch 2 each output depended on the
    other image (0.24 off). Now each image's own statistics: ONNX and TorchScript at batch 3 equal
    translate()."""
    from ganengine.cli.evaluate import load_checkpoint
    from ganengine.models import build_model
    from ganengine.train.checkpoint import save

    torch.manual_seed(0)
    # (no dropout: translate keeps pix2pix's dropout on without --eval, which no export reproduces)
    model = build_model(name, netG="resnet_6blocks", ngf=4, ndf=4, crop_size=16, norm="batch", use_dropout=False)
    for m in model.modules():  # (running statistics unlike any batch's: a wrong choice shows)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
    state = {"format": "ganengine-checkpoint", "version": 1, "model": name, "options": model.options,
             "networks": {n: getattr(model, n).state_dict() for n in model.network_names}, "data": {}}
    save(state, str(tmp_path / "run"), step=1)
    for fmt, suffix in (("onnx", "onnx"), ("torchscript", "pt")):
        rc = cli_main(["export", "--checkpoint", str(tmp_path / "run"), "--format", fmt, "--output",
                       str(tmp_path / f"G.{suffix}")])
        assert rc == 0, capsys.readouterr().err
    model = load_checkpoint(str(tmp_path / "run"))[0]
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        want = model.translate({"A": x, "B": x})
        torch.testing.assert_close(want[1:2], model.translate({"A": x[1:2], "B": x[1:2]}), rtol=0, atol=0)
        _close(torch.jit.load(str(tmp_path / "G.pt"))(x), want)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        pytest.skip("onnxruntime is not installed: the ONNX file was written but not run")
    _close(_run_ort(tmp_path / "G.onnx", [x])[0], want)


def test_per_image_statistics_refuse_batch_norm_without_positions(tmp_path):
    """norm_stats='per_image' on a BatchNorm1d over (N, C): no positions to normalise one image over
    (var_mean over no dims reduced everything): refused, naming the choice."""
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())
    with pytest.raises(ValueError, match="per_image"):
        to_torchscript(model, torch.randn(3, 4), tmp_path / "m.pt", norm_stats="per_image")
