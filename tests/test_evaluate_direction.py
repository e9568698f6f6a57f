"""``evaluate_generator`` / ``ganengine evaluate``: what the outputs are scored against.

* the real target follows the model's ``direction`` (pix2pix, CycleGAN, CS-GAN under BtoA read
  ``batch["B"]``, so the target is ``batch["A"]``);
* paired metrics (l1/psnr/ssim) are refused on unpaired (CycleGAN) data;
* StarGAN's attribute accuracy scores as the model's dataset defines (CelebA: per attribute,
  RaFD: argmax), whatever the batching;
* bad ``--device`` / ``--is_splits`` requests name their options.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from ganengine.cli import main
from ganengine.metrics import AttributeAccuracy, evaluate_generator
from ganengine.metrics.paired import l1_error
from tests._train_utils import cli_error, one_thread  # noqa: F401 (fixture)
from tests.feature_extractor import SmallFeatureExtractor

pytestmark = pytest.mark.usefixtures("one_thread")
FEATURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "feature_extractor.py")
U32 = 2.0 ** -24  # unit roundoff of float32

TINY = dict(netG="resnet_6blocks", ngf=4, ndf=4, n_layers_D=2, crop_size=16, use_dropout=False, norm="instance")


def _model(name, direction="AtoB"):
    from ganengine.models import build_model

    torch.manual_seed(0)
    return build_model(name, direction=direction, **TINY)


def _batches(n_batches=2, size=4, side=16, seed=3):
    """A and B unalike: A near +0.8, B uniform in [-1, 1] (so scoring against the wrong one shows)."""
    g = torch.Generator().manual_seed(seed)
    return [{"A": (0.8 + 0.1 * torch.rand(size, 3, side, side, generator=g)).clamp(-1, 1),
             "B": torch.rand(size, 3, side, side, generator=g) * 2 - 1} for _ in range(n_batches)]


def _save(tmp_path, model, name="run"):
    from ganengine.train.checkpoint import save

    state = {"format": "ganengine-checkpoint", "version": 1, "model": model.MODEL_NAME, "options": model.options,
             "networks": {n: getattr(model, n).state_dict() for n in model.network_names}, "data": {}}
    save(state, str(tmp_path / name), step=1)
    return str(tmp_path / name)


# ----------------------------------------------------------------------------- 1. the target follows direction
@pytest.mark.parametrize("name", ["pix2pix", "cyclegan", "csgan"])
def test_btoa_target_is_batch_a(name):
    """A BtoA model on (A, B) is the same computation as the AtoB model on the swapped batch (A'=B,
    B'=A): translate reads the same tensor, the target is the same tensor, so every metric must come
    out identical (same kernels on the same inputs in the same order: no rounding difference can
    arise, hence exact equality). The old code scored the BtoA run against its own input B."""
    model = _model(name, "BtoA")
    batches = _batches()
    swapped = [{"A": b["B"], "B": b["A"]} for b in batches]
    paired = name == "pix2pix"
    metrics = "fid,kid,l1,psnr,ssim" if paired else "fid,kid"
    fx, kid = SmallFeatureExtractor(), {"subsets": 3, "subset_size": 4}
    btoa = evaluate_generator(model, batches, metrics, fx, kid_options=kid)
    model.options["direction"] = "AtoB"
    atob = evaluate_generator(model, swapped, metrics, fx, kid_options=kid)
    assert btoa == atob
    model.options["direction"] = "BtoA"
    if not paired:
        return
    # and directly: mean L1 between translate(batch) (generated from B) and A, the target.
    # Each per-image value is a float32 mean of m = 3*16*16 terms in [0, 2]; whatever the reduction
    # order, it is within gamma_m = m*u/(1-m*u) (relative) of the exact mean; two such evaluations
    # differ by at most 2*gamma_m relative (the float64 sum over images adds ~1e-16, negligible).
    with torch.no_grad():
        fakes = [model.translate(b) for b in batches]
    m = 3 * 16 * 16
    gamma = m * U32 / (1 - m * U32)
    n = sum(f.shape[0] for f in fakes)
    want = sum(float(l1_error(f, b["A"]).sum()) for f, b in zip(fakes, batches)) / n
    wrong = sum(float(l1_error(f, b["B"]).sum()) for f, b in zip(fakes, batches)) / n
    assert abs(btoa["l1"] - want) <= 2 * gamma * want
    assert abs(wrong - want) > 4 * gamma * want  # (the check above tells input from target)


def test_atob_target_is_still_batch_b():
    model = _model("pix2pix", "AtoB")
    batches = _batches()
    out = evaluate_generator(model, batches, "l1")
    with torch.no_grad():
        fakes = [model.translate(b) for b in batches]
    want = sum(float(l1_error(f, b["B"]).sum()) for f, b in zip(fakes, batches)) / 8
    gamma = 3 * 16 * 16 * U32 / (1 - 3 * 16 * 16 * U32)  # (bound as in test_btoa_target_is_batch_a)
    assert abs(out["l1"] - want) <= 2 * gamma * want


def test_cli_evaluate_btoa_pix2pix_scores_against_a(tmp_path, capsys):
    """``ganengine evaluate`` on a BtoA pix2pix checkpoint: l1 against batch['A'] of its own loader."""
    from ganengine.cli.evaluate import load_checkpoint, make_eval_loader

    run = _save(tmp_path, _model("pix2pix", "BtoA"))
    out = tmp_path / "m.json"
    assert main(["evaluate", "--checkpoint", run, "--metrics", "l1", "--batch_size", "4", "--max_images", "8",
                 "--device", "cpu", "--output", str(out)]) == 0, capsys.readouterr().err
    import json

    got = json.loads(out.read_text())["l1"]
    model, data = load_checkpoint(run)
    loader, _, _ = make_eval_loader(model, data, None, None, 4, torch.device("cpu"))
    total, n = 0.0, 0
    with torch.no_grad():
        for b in loader:
            if n >= 8:
                break
            fake = model.translate(b).float()[:8 - n]
            total += float(l1_error(fake, b["A"][:8 - n].float()).sum())
            n += fake.shape[0]
    m = fake[0].numel()
    gamma = m * U32 / (1 - m * U32)  # (bound as in test_btoa_target_is_batch_a)
    assert abs(got - total / n) <= 2 * gamma * (total / n)


# ----------------------------------------------------------------------------- 4. paired metrics, unpaired data
@pytest.mark.parametrize("name", ["cyclegan", "csgan"])
def test_paired_metrics_refused_on_unpaired_models(name):
    model = _model(name)
    for metrics in ("l1", "psnr", "ssim", "fid,l1,psnr,ssim"):
        with pytest.raises(ValueError, match="--metrics .*unpaired"):
            evaluate_generator(model, _batches(1), metrics, SmallFeatureExtractor())
    assert evaluate_generator(model, _batches(), "fid", SmallFeatureExtractor())["images"] == 8


@pytest.mark.parametrize("name", ["stargan", "stackgan"])
def test_paired_metrics_refused_on_models_without_targets(name):
    """(they ended in an internal message about batch['B'] that named no option)"""
    from ganengine.metrics.evaluate import check_paired

    model = type("M", (), {"MODEL_NAME": name})()
    with pytest.raises(ValueError, match=f"--metrics l1,ssim: .*{name} has none"):
        check_paired(model, ["fid", "l1", "ssim"])
    check_paired(model, ["fid", "kid"])


def test_cli_paired_metrics_on_cyclegan_is_one_error_line(tmp_path, capsys):
    run = _save(tmp_path, _model("cyclegan"))
    line = cli_error(capsys, ["evaluate", "--checkpoint", run, "--metrics", "l1,psnr,ssim", "--max_images", "4",
                              "--device", "cpu"], "--metrics", "l1,psnr,ssim", "unpaired")
    assert "cyclegan" in line


# ----------------------------------------------------------------------------- 3. accuracy mode
class _Painter(nn.Module):
    """A StarGAN stand-in whose output paints its target labels (+1 where 1, -1 where 0)."""

    MODEL_NAME = "stargan"

    def __init__(self, dataset):
        super().__init__()
        self.options = {"dataset": dataset, "c_dim": 3}
        self.scale = nn.Parameter(torch.ones(()))

    def translate(self, batch):
        t = batch["target_label"].float()
        return (t[:, :, None, None] * 2 - 1).expand(-1, -1, 8, 8) * self.scale


class _AllPositive(nn.Module):
    """Logits painted + 1.5: 2.5 where the target is 1, 0.5 where 0; all positive, argmax right."""

    def forward(self, x):
        return x.mean((2, 3)) + 1.5


def _one_hot_batches(batch_size):
    labels = torch.nn.functional.one_hot(torch.arange(12) % 3, 3).float()
    return [{"image": torch.zeros(len(lab), 3, 8, 8), "label": lab} for lab in labels.split(batch_size)]


@pytest.mark.parametrize("batch_size", [1, 4, 12])
def test_stargan_accuracy_mode_comes_from_the_dataset_option(batch_size):
    """CelebA labels that happen to be one-hot rows are still attributes: each image's target
    flips one of its attributes (image i: attribute i mod 3, its own 1 here: all-0 targets) and
    is scored per attribute (the classifier says 1 everywhere: 0 of 36 right, exactly); RaFD:
    another domain, scored by argmax (all right)."""
    batches = _one_hot_batches(batch_size)
    assert evaluate_generator(_Painter("CelebA"), batches, "acc", classifier=_AllPositive())["acc"] == 0.0
    assert evaluate_generator(_Painter("RaFD"), batches, "acc", classifier=_AllPositive())["acc"] == 1.0
    # explicit mode wins
    out = evaluate_generator(_Painter("CelebA"), batches, "acc", classifier=_AllPositive(), multi_label=False)
    assert out["acc"] == 1.0


def test_rafd_class_index_labels():
    labels = torch.arange(6) % 3
    batches = [{"image": torch.zeros(3, 3, 8, 8), "label": lab} for lab in labels.split(3)]

    class IndexPainter(_Painter):
        def translate(self, batch):
            return super().translate({"target_label": torch.nn.functional.one_hot(batch["target_label"], 3)})

    assert evaluate_generator(IndexPainter("RaFD"), batches, "acc", classifier=_AllPositive())["acc"] == 1.0
    acc = AttributeAccuracy(multi_label=False).update(torch.eye(3), torch.tensor([0, 1, 1]))
    assert acc.compute() == 2 / 3
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        AttributeAccuracy(multi_label=False).update(torch.eye(3), torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="multi-label"):
        AttributeAccuracy(multi_label=True).update(torch.eye(3), torch.tensor([0, 1, 2]))


def test_auto_accuracy_mode_does_not_depend_on_batching():
    """No definition given: the mode is decided from all the targets (here multi-label: rows 2-4
    have several 1s), so batch size 1 (first batch one-hot) and one batch of 4 agree exactly (integer
    counts), and equal the per-attribute accuracy."""
    targets = torch.tensor([[1., 0, 0, 0, 0], [0., 1, 0, 1, 1], [0., 0, 1, 0, 1], [1., 0, 0, 1, 0]])
    logits = torch.tensor([[5., -5, -5, 5, 5], [-5., 5, -5, 5, 5], [-5., -5, 5, 5, 5], [5., -5, -5, 5, 5]])
    per_attribute = int(((logits > 0) == (targets > 0.5)).sum()) / targets.numel()
    for size in (1, 2, 3, 4):
        acc = AttributeAccuracy()
        for i in range(0, 4, size):
            acc.update(logits[i:i + size], targets[i:i + size])
        assert acc.multi_label is True
        assert acc.compute() == per_attribute, size
        assert acc.per_attribute() == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.5], abs=0)
    # every row one-hot: argmax, whatever the batching
    one_hot = torch.eye(5)[[0, 3, 1, 4]]
    for size in (1, 4):
        acc = AttributeAccuracy()
        for i in range(0, 4, size):
            acc.update(logits[i:i + size], one_hot[i:i + size])
        assert acc.multi_label is False
        assert acc.compute() == int((logits.argmax(1) == one_hot.argmax(1)).sum()) / 4
        with pytest.raises(ValueError, match="multi-label"):
            acc.per_attribute()
    assert AttributeAccuracy().multi_label is None


# ----------------------------------------------------------------------------- 5. --device
def test_cli_bad_device_names_the_option(tmp_path, capsys):
    run = _save(tmp_path, _model("pix2pix"))
    for bad in ("bogus", "cuda:x"):
        line = cli_error(capsys, ["evaluate", "--checkpoint", run, "--metrics", "l1", "--device", bad],
                         "--device", repr(bad), "expected", "cpu", "cuda")
        assert "Traceback" not in line


# ----------------------------------------------------------------------------- 2. --is_splits (synthesis)
@pytest.fixture
def cgan_run(tmp_path):
    from ganengine.models import build_model

    return _save(tmp_path, build_model("cgan", latent_dim=4, img_size=8, n_classes=3), "cgan")


def test_cli_is_splits_more_than_num_samples_is_an_error(cgan_run, capsys, monkeypatch):
    import ganengine.cli.evaluate as cli_evaluate

    def no_loading(*a, **k):  # the request is refused before anything is loaded or generated
        raise AssertionError("loaded the checkpoint")

    monkeypatch.setattr(cli_evaluate, "load_checkpoint", no_loading)
    extractor = f"{FEATURES}:SmallClassifierFeatureExtractor"
    cli_error(capsys, ["evaluate", "--checkpoint", cgan_run, "--metrics", "is", "--feature_extractor", extractor,
                       "--num_samples", "8", "--device", "cpu"], "--is_splits 10", "--num_samples 8")
    cli_error(capsys, ["evaluate", "--checkpoint", cgan_run, "--metrics", "fid,is", "--feature_extractor", extractor,
                       "--num_samples", "20", "--is_splits", "21", "--device", "cpu"], "--is_splits 21",
              "--num_samples 20")


def test_cli_synthesis_bad_device_names_the_option(cgan_run, capsys):
    cli_error(capsys, ["evaluate", "--checkpoint", cgan_run, "--metrics", "fid", "--feature_extractor",
                       f"{FEATURES}:SmallFeatureExtractor", "--num_samples", "4", "--device", "bogus"],
              "--device", "'bogus'", "expected")


def test_rafd_targets_stay_domains_when_attribute_names_are_given():
    """A RaFD model's evaluation with the data's selected_attrs set (the reference's CLI carries a
    default list): the targets are still other one-hot domains (flipping 'attributes' made all-0
    rows)."""
    from ganengine.metrics.evaluate import _with_targets

    label = torch.nn.functional.one_hot(torch.arange(6) % 3, 3).float()
    out = _with_targets(_Painter("RaFD"), {"label": label}, 0, ["angry", "happy", "sad"])["target_label"]
    assert torch.equal(out.sum(1), torch.ones(6)) and not (out == label).all(1).any()


# ----------------------------------------------------------------------------- unpaired folders of other sizes
@pytest.mark.parametrize("n_a,n_b", [(6, 3), (3, 6)])
@pytest.mark.parametrize("name", ["cyclegan", "csgan"])
def test_unpaired_evaluation_counts_each_image_once(tmp_path, name, n_a, n_b):
    """An unpaired epoch has max(|A|, |B|) items, the shorter folder repeating: FID's real set held
    each B image twice (|A| = 6, |B| = 3) or the fake set each A image's output twice (3, 6). Each
    source image's output and each real image now count once: the same FID as on the folders' own
    images, and ``images`` is |A|."""
    from PIL import Image

    from ganengine import data
    from ganengine.cli.evaluate import make_eval_loader
    from ganengine.metrics import frechet_distance
    from ganengine.metrics.features import extract_features

    g = torch.Generator().manual_seed(0)
    for side, n in (("A", n_a), ("B", n_b)):
        os.makedirs(tmp_path / f"test{side}")
        for i in range(n):
            arr = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(tmp_path / f"test{side}" / f"{i}.png")
    model = _model(name)
    loader, *_ = make_eval_loader(model, {"load_size": 16, "crop_size": 16}, str(tmp_path), "test", 4,
                                  torch.device("cpu"))
    fx = SmallFeatureExtractor()
    got = evaluate_generator(model, loader, "fid", fx)
    assert got["images"] == n_a
    ds = data.build_dataset(name, {**model.options, "dataroot": str(tmp_path), "phase": "test", "load_size": 16,
                                   "crop_size": 16, "serial_batches": True, "no_flip": True}, "test")
    a = torch.stack([ds[i]["A"] for i in range(n_a)])
    b = torch.stack([ds[i]["B"] for i in range(n_b)])
    with torch.no_grad():
        fake = model.translate({"A": a, "B": b[:1].expand(n_a, -1, -1, -1)})
    want = frechet_distance(extract_features(fx, b), extract_features(fx, fake))
    assert got["fid"] == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_cli_evaluate_is_repeatable_with_dropout(tmp_path, capsys):
    """pix2pix without --eval keeps its dropout on at test time (the reference's): --seed (default 0)
    seeds it, so two evaluations give the same numbers, and another seed others."""
    import json

    from ganengine.models import build_model

    torch.manual_seed(0)
    run = _save(tmp_path, build_model("pix2pix", **dict(TINY, use_dropout=True)))

    def l1(seed):
        out = tmp_path / f"m{seed}.json"
        assert main(["evaluate", "--checkpoint", run, "--metrics", "l1", "--batch_size", "4", "--max_images", "4",
                     "--device", "cpu", "--seed", str(seed), "--output", str(out)]) == 0, capsys.readouterr().err
        return json.loads(out.read_text())["l1"]

    assert l1(0) == l1(0) != l1(1)


def test_cli_unknown_metric_names_the_option(tmp_path, capsys):
    run = _save(tmp_path, _model("cyclegan"))
    cli_error(capsys, ["evaluate", "--checkpoint", run, "--metrics", "bogus", "--device", "cpu"],
              "--metrics must be a non-empty subset", "bogus")
