"""Regression tests of the s15 acceptance findings: bench --traffic / --host following --modes and
--dtype, usage errors leaving no output folder, to_onnx's type check, metrics on huge finite
features, a text file given as a checkpoint, the gradient penalty of float64 models, U-Net GAN's
unconditional --reference export, and translate's pixel values (the reference's truncation)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ganengine.bench import registry
from ganengine.bench.registry import BenchCase, Workload
from ganengine.cli import main
from tests._train_utils import float64_step


# ----------------------------------------------------------------------------- bench --traffic / --host
def _toy_setup(p, device, dtype):
    x = torch.randn(p["n"], p["c"], device=device, dtype=dtype)
    return Workload(args=(x,), reference=lambda x: F.relu(x), fused=lambda x: x.clamp_min(0), grad_args=(0,))


@pytest.fixture
def toy_case():
    case = registry.register(BenchCase(name="s15_toy_relu", family="s15toy", kind="op", setup=_toy_setup,
                                       description="toy", shapes={"ref": [dict(n=4, c=4)], "quick": [dict(n=4, c=4)]}),
                             replace=True)
    yield case
    registry.unregister("s15_toy_relu")


def test_bench_traffic_and_host_follow_modes_and_dtype(toy_case, tmp_path, monkeypatch, capsys):
    from ganengine import backends
    from ganengine.bench import host_cost, traffic_table

    monkeypatch.setattr(backends, "triton_interpret", lambda: True)
    monkeypatch.setattr(backends, "_triton_import_error", lambda: None)
    seen = {}

    def fake_traffic(cases, dtype="float32", **kw):
        seen["traffic"] = ([c.modes for c in cases], dtype)
        return []

    def fake_host(cases, progress=None, **kw):
        cases = list(cases)
        work = cases[0].setup(dict(n=2, c=2), torch.device("cpu"), torch.float32)  # as host_cost asks
        seen["host"] = ([c.modes for c in cases], work.args[0].dtype)
        return [{"case": c.name, "mode": m, "shape_label": "n=2,c=2", "status": "ok", "backends": {},
                 "eager_us": 1.0, "ganengine_us": 1.0, "ratio": 1.0, "eager_kernels": None,
                 "ganengine_kernels": None} for c in cases for m in c.modes]

    monkeypatch.setattr(traffic_table, "measure", fake_traffic)
    monkeypatch.setattr(host_cost, "measure", fake_host)
    out = tmp_path / "b"
    rc = main(["bench", "--ops", "s15_toy_relu", "--quick", "--runners", "eager", "--threads", "1",
               "--repeats", "1", "--no-memory", "--no-chart", "--modes", "forward", "--dtype", "float64",
               "--traffic", "--host", "--output", str(out)])
    capsys.readouterr()
    assert rc == 0
    assert seen["traffic"] == ([("forward",)], "float64")
    assert seen["host"] == ([("forward",)], torch.float64)
    text = (out / "host_cost.md").read_text()
    assert "float64" in text.splitlines()[0] and "forward_backward" not in text


@pytest.mark.parametrize("argv", [
    ["bench", "--dtype", "int8", "--ops", "gan_loss"],
    ["bench", "--device", "cuda", "--ops", "gan_loss"],
    ["profile", "pix2pix", "--device", "cuda"],
])
def test_usage_errors_leave_no_output_folder(argv, tmp_path, capsys):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "results"
    assert main(argv + ["--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("--dtype" in err or "--device cuda" in err)
    assert not out.exists()


# ----------------------------------------------------------------------------- export
def test_to_onnx_non_module_is_a_type_error(tmp_path):
    from ganengine.export import to_onnx

    with pytest.raises(TypeError, match="model must be an nn.Module, got function"):
        to_onnx(lambda x: x * 2, torch.randn(1, 3, 4, 4), tmp_path / "f.onnx")


# ----------------------------------------------------------------------------- metrics on huge features
def _sets():
    rng = np.random.RandomState(0)
    return rng.randn(50, 4), rng.randn(40, 4) + 0.5


@pytest.mark.parametrize("scale", [1e160, 1e200, 1e-200])
def test_precision_recall_density_coverage_are_scale_invariant(scale):
    import ganengine.metrics as M

    a, b = _sets()
    assert tuple(M.precision_recall(a * scale, b * scale)) == tuple(M.precision_recall(a, b))
    assert tuple(M.density_coverage(a * scale, b * scale)) == tuple(M.density_coverage(a, b))


def test_kid_overflow_is_an_error_not_nan():
    import ganengine.metrics as M

    a, b = _sets()
    with pytest.raises(ValueError, match="features_a and features_b overflows float64"):
        M.kernel_inception_distance(a * 1e60, b * 1e60, subsets=3)
    # a finite mean whose spread's squares overflow: the std is finite too (it was inf)
    mean, std = M.kernel_inception_distance(a * 1e30, b * 1e30, subsets=3, subset_size=20, return_std=True)
    assert np.isfinite(mean) and np.isfinite(std) and std > 0


def test_frechet_distance_on_huge_features():
    import ganengine.metrics as M

    a, b = _sets()
    d = M.frechet_distance(a, b)
    s = 2.0 ** 300  # the covariance product overflowed (LinAlgError); the distance itself is finite
    assert M.frechet_distance(a * s, b * s) == pytest.approx(d * s * s, rel=1e-12)
    with pytest.raises(ValueError, match="covariance of features_a overflows float64"):
        M.frechet_distance(a * 1e160, b * 1e160)


# ----------------------------------------------------------------------------- a text file as checkpoint
def test_text_file_is_not_a_checkpoint(tmp_path, capsys):
    from ganengine.train.checkpoint import CheckpointError, load

    p = tmp_path / "notes.txt"
    p.write_text("ganengine: a log line\n")
    with pytest.raises(CheckpointError, match="is not a checkpoint") as info:
        load(str(p))
    assert "weights_only" not in str(info.value) and "expected a ganengine training checkpoint" in str(info.value)
    assert main(["evaluate", "--checkpoint", str(p), "--metrics", "l1"]) == 2
    err = capsys.readouterr().err
    assert "is not a checkpoint" in err and "will likely succeed" not in err


# ----------------------------------------------------------------------------- float64 gradient penalty
def _sagan():
    from ganengine.models import SAGAN

    m = SAGAN(g_conv_dim=8, d_conv_dim=8, z_dim=8, adv_loss="wgan-gp", fused=False, fused_optimizer=False)
    return m, {"image": torch.rand(2, 3, 64, 64, dtype=torch.float64) * 2 - 1}


def _wgan_gp():
    from ganengine.models import build_model

    m = build_model("wgan_gp", latent_dim=8, img_size=8, channels=1, fused=False, fused_optimizer=False, n_critic=1)
    return m, {"image": torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1}


def _stargan():
    from ganengine.models import StarGAN

    m = StarGAN(g_conv_dim=4, d_conv_dim=4, g_repeat_num=1, d_repeat_num=2, image_size=16, n_critic=1,
                fused=False, fused_optimizer=False)
    return m, {"image": torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1,
               "label": torch.tensor([[1., 0, 0, 1, 0], [0, 1, 0, 0, 1]], dtype=torch.float64)}


@pytest.mark.parametrize("make", [_sagan, _wgan_gp, _stargan], ids=["sagan", "wgan_gp", "stargan"])
def test_gradient_penalty_of_a_float64_model(make):
    out = float64_step(*make())
    assert all(np.isfinite(float(v)) for v in out.values())


def test_gradient_penalty_inputs_widen_half_but_keep_float64():
    from ganengine.models import base, sagan, stargan, wgan

    for mod in (sagan, wgan, stargan):  # (the three penalties' one helper)
        assert mod.at_least_fp32 is base.at_least_fp32
        assert mod.at_least_fp32(torch.zeros(1, dtype=torch.float16)).dtype == torch.float32
        assert mod.at_least_fp32(torch.zeros(1, dtype=torch.bfloat16)).dtype == torch.float32
        assert mod.at_least_fp32(torch.zeros(1, dtype=torch.float64)).dtype == torch.float64


# ----------------------------------------------------------------------------- U-Net GAN --reference
def test_unetgan_unconditional_reference_export_only_at_the_reference_sizes():
    from ganengine.cli.export import reference_arch
    from ganengine.models import build_model

    small = dict(G_ch=4, D_ch=4, G_attn="0", D_attn="0", dim_z=16, unconditional=True)
    with pytest.raises(ValueError, match=r"--resolution 32.*128 or 256"):
        reference_arch(build_model("unetgan", resolution=32, **small), "G")
    with pytest.raises(ValueError, match=r"--resolution 64"):
        reference_arch(build_model("unetgan", resolution=64, **small), "G_ema")
    assert reference_arch(build_model("unetgan", resolution=128, **small), "G") == "biggan_G"
    # the class-conditional G is BigGAN-PyTorch's, which runs at 32
    cond = dict(small, unconditional=False, n_classes=3)
    assert reference_arch(build_model("unetgan", resolution=32, **cond), "G") == "biggan_G"


# ----------------------------------------------------------------------------- translate's pixel values
def test_to_image_truncates_as_the_reference_tensor2im():
    from ganengine.data import transforms as T

    y = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ref = ((y.permute(1, 2, 0).numpy() + 1) / 2.0 * 255.0).astype(np.uint8)  # junyanz util.tensor2im
    assert np.array_equal(np.asarray(T.to_image(y)), ref)
    # clamped, not wrapped; and an image read in is written out unchanged (all 256 levels)
    assert np.asarray(T.to_image(torch.tensor([[[-3.0, 3.0]]]))).tolist() == [[0, 255]]
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(np.asarray(T.to_image(T.to_tensor(Image.fromarray(arr)))), arr)


def test_truncated_checkpoint_is_called_damaged(tmp_path):
    """A torch.save zip cut short (disk full, an interrupted copy) has no central directory:
    it was reported as "not a checkpoint" (session 15 review); it is a damaged one."""
    from ganengine.train import checkpoint as ckpt

    path = tmp_path / "step_00000001.pt"
    torch.save({"format": ckpt.FORMAT, "x": torch.randn(10000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated or damaged"):
        ckpt.load(str(path))
