"""Synthesis evaluation: ``evaluate_synthesis`` (FID, KID, IS, precision/recall, density/coverage,
intra-FID of generated images), training-time evaluation (``--eval_every``, best.pt) and
``ganengine evaluate`` on a synthesis checkpoint. A small seeded feature network
(tests/feature_extractor.py) stands in for Inception.
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch

import ganengine.metrics as gm
from ganengine.metrics import evaluate_synthesis as es
from ganengine.metrics.features import extract_features
from tests._train_utils import one_thread  # noqa: F401 (fixture)
from tests.feature_extractor import SmallClassifierFeatureExtractor, SmallFeatureExtractor

pytestmark = pytest.mark.usefixtures("one_thread")
FEATURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "feature_extractor.py")


class ToyConditional(torch.nn.Module):
    """A stand-in conditional synthesis model: image = class pattern + noise from the global RNG,
    with a buffer that generate() moves (as batch-norm generators sampled in training mode do)."""

    MODEL_NAME = "cgan"
    CONDITIONAL = True
    network_names = ["G"]

    def __init__(self, n_classes=3, size=8, noise=0.5):
        super().__init__()
        self.options = {"n_classes": n_classes}
        self.G = torch.nn.Module()
        self.G.register_buffer("calls", torch.zeros(()))
        self.patterns = torch.linspace(-0.8, 0.8, n_classes)
        self.size, self.noise = size, noise
        self.device = torch.device("cpu")

    @torch.no_grad()
    def generate(self, n, z=None, labels=None):
        self.G.calls += 1
        base = self.patterns[labels].view(-1, 1, 1, 1)
        return (base + self.noise * torch.randn(n, 1, self.size, self.size)).clamp(-1, 1)


def _real_batches(n_classes=3, per_class=12, size=8, seed=5):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes * per_class) % n_classes
    images = (torch.linspace(-0.8, 0.8, n_classes)[labels].view(-1, 1, 1, 1)
              + 0.4 * torch.randn(labels.shape[0], 1, size, size, generator=g)).clamp(-1, 1)
    return [{"image": images[i:i + 10], "label": labels[i:i + 10]} for i in range(0, labels.shape[0], 10)]


def _rgb_features(fx, images):
    return extract_features(fx, images.expand(-1, 3, -1, -1))


def test_matches_the_metrics_on_directly_computed_features():
    """The protocol: latents from ``seed`` (global RNG forked), labels 0..K-1 cycling, grayscale
    repeated to RGB; then each metric is the library function on those features."""
    model, fx = ToyConditional(), SmallClassifierFeatureExtractor().eval()
    batches = _real_batches()
    out = es.evaluate_synthesis(model, batches, "fid,kid,is,pr,dc,intra_fid", fx, num_samples=30, batch_size=7,
                                seed=3, is_splits=3, pr_k=2, dc_k=3, kid_options={"subsets": 4, "subset_size": 10})
    real = torch.cat([_rgb_features(fx, b["image"]) for b in batches])
    real_labels = torch.cat([b["label"] for b in batches])
    with torch.random.fork_rng():
        torch.manual_seed(3)
        chunks = [(torch.arange(s, min(s + 7, 30)) % 3) for s in range(0, 30, 7)]
        fake = [_rgb_features(fx, model.generate(c.shape[0], labels=c)) for c in chunks]
    logits = torch.cat([fx.logits(f) for f in fake])  # per batch, as generated (BLAS blocking)
    fake, fake_labels = torch.cat(fake), torch.cat(chunks)
    # FID from streamed float64 moments vs numpy's two-pass covariance. With fewer samples than
    # features the covariances are singular, and tr(sqrt(.)) turns a rounding perturbation
    # delta ~ N u |S| of a zero eigenvalue into sqrt(delta): at most 2 D sqrt(N u |S|) in all
    scale = max(float(np.trace(np.cov(f.double().numpy(), rowvar=False))) for f in (real, fake))
    tol = 2 * real.shape[1] * np.sqrt(real.shape[0] * 2.0 ** -53 * scale)
    assert out["fid"] == pytest.approx(gm.frechet_distance(real, fake), abs=tol)
    assert (out["kid"], out["kid_std"]) == gm.kernel_inception_distance(real, fake, subsets=4, subset_size=10,
                                                                         return_std=True)
    score = gm.inception_score(logits, splits=3)
    assert (out["is"], out["is_std"]) == (float(score), score.std)
    assert (out["precision"], out["recall"]) == tuple(gm.precision_recall(real, fake, k=2))
    assert (out["density"], out["coverage"]) == tuple(gm.density_coverage(real, fake, k=3))
    assert out["intra_fid"] == pytest.approx(
        gm.intra_class_frechet_distance(real, real_labels, fake, fake_labels), abs=tol)
    assert out["images"] == 30 and out["real_images"] == 36
    # the real side is reusable: the same numbers without reading the loader again
    again = es.evaluate_synthesis(model, out["real"], "fid,intra_fid", fx, num_samples=30, batch_size=7, seed=3)
    assert again["fid"] == out["fid"] and again["intra_fid"] == out["intra_fid"]


def test_leaves_rng_and_buffers_alone_and_is_seeded():
    model, fx = ToyConditional(), SmallFeatureExtractor().eval()
    rng = torch.get_rng_state()
    a = es.evaluate_synthesis(model, _real_batches(), "fid", fx, num_samples=12, seed=1)
    assert torch.equal(torch.get_rng_state(), rng) and float(model.G.calls) == 0
    assert es.evaluate_synthesis(model, a["real"], "fid", fx, num_samples=12, seed=1)["fid"] == a["fid"]
    assert es.evaluate_synthesis(model, a["real"], "fid", fx, num_samples=12, seed=2)["fid"] != a["fid"]


def test_generated_labels_are_class_balanced():
    feats, labels, logits = es.fake_features(ToyConditional(n_classes=4), SmallFeatureExtractor().eval(), 10,
                                             batch_size=3)
    assert feats.shape == (10, 64) and logits is None
    assert labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_no_batch_of_one_image():
    assert es.batch_sizes(7, 3) == [3, 4] and es.batch_sizes(6, 3) == [3, 3] and es.batch_sizes(8, 3) == [3, 3, 2]
    assert es.batch_sizes(1, 50) == [1] and es.batch_sizes(101, 50) == [50, 51] and es.batch_sizes(3, 1) == [1, 2]
    from ganengine.models import build_model

    cgan = build_model("cgan", latent_dim=4, img_size=8, n_classes=3)  # BatchNorm1d in training mode
    feats, labels, _ = es.fake_features(cgan, SmallFeatureExtractor().eval(), 7, batch_size=3)
    assert feats.shape[0] == 7 and labels.tolist() == [0, 1, 2, 0, 1, 2, 0]  # batches of 3 and 4


def test_a_better_generator_scores_better():
    """Generated classes that match the real ones beat generated images of one class only."""
    fx = SmallFeatureExtractor().eval()
    good = es.evaluate_synthesis(ToyConditional(noise=0.4), _real_batches(), "fid,pr,dc", fx, num_samples=36)
    collapsed = ToyConditional(noise=0.4)
    collapsed.patterns = torch.full((3,), 0.8)
    bad = es.evaluate_synthesis(collapsed, good["real"], "fid,pr,dc", fx, num_samples=36)
    assert good["fid"] < bad["fid"] and good["recall"] > bad["recall"] and good["coverage"] > bad["coverage"]


def test_inception_logits_are_the_fc_layer_without_bias():
    net = gm.FIDInceptionV3()
    torch.nn.init.normal_(net.fc.bias)
    feats = torch.randn(3, 2048, dtype=torch.float64)
    want = feats.float() @ net.fc.weight.T
    torch.testing.assert_close(es.inception_logits(net, feats), want)
    with pytest.raises(ValueError, match="logits"):
        es.inception_logits(SmallFeatureExtractor(), feats)


def test_bad_requests_fail_before_generating():
    model, fx = ToyConditional(), SmallFeatureExtractor().eval()
    real = _real_batches()
    for metrics, kw, message in (("fid,bogus", {}, "subset of"), ("", {}, "non-empty"),
                                 ("intra_fid", {"num_samples": 5}, "at least 2 generated images per class"),
                                 ("is", {}, "logits"), ("fid", {"num_samples": 0}, "num_samples")):
        with pytest.raises(ValueError, match=message):
            es.evaluate_synthesis(model, real, metrics, fx, **{"num_samples": 12, **kw})
    with pytest.raises(ValueError, match="feature extractor"):
        es.evaluate_synthesis(model, real, "fid", None)
    unconditional = ToyConditional()
    unconditional.CONDITIONAL = False
    with pytest.raises(ValueError, match="unconditional"):
        es.evaluate_synthesis(unconditional, real, "intra_fid", fx)
    with pytest.raises(TypeError, match="evaluate_generator"):
        es.evaluate_synthesis(torch.nn.Linear(2, 2), real, "fid", fx)
    assert float(model.G.calls) == 0
    assert es.parse_synthesis_metrics("FID, precision,coverage,recall") == ("fid", "pr", "dc")
    assert es.is_better_synthesis("fid", 1.0, 2.0) and es.is_better_synthesis("is", 3.0, 2.0)
    with pytest.raises(ValueError, match="rank"):
        es.is_better_synthesis("density", 1.0, None)


def test_is_splits_more_than_samples_fails_before_generating():
    # issue: splits were quietly cut to min(is_splits, num_samples): 8 one-image parts, IS 1.0, std 0
    model, fx = ToyConditional(), SmallClassifierFeatureExtractor().eval()
    for kw in ({"num_samples": 8}, {"num_samples": 12, "is_splits": 13}):
        with pytest.raises(ValueError, match=r"num_samples=\d+ .*is_splits=\d+.*--num_samples, --is_splits"):
            es.evaluate_synthesis(model, _real_batches(), "fid,is", fx, batch_size=4, **kw)
    with pytest.raises(ValueError, match="is_splits must be a positive int"):
        es.check_request(model, "is", 8, is_splits=0)
    assert float(model.G.calls) == 0
    es.check_request(model, "fid", 8)  # (only is has splits)
    out = es.evaluate_synthesis(model, _real_batches(), "is", fx, num_samples=8, batch_size=4, is_splits=8)
    assert out["images"] == 8


def test_model_helpers_know_the_synthesis_models():
    from ganengine.models import build_model

    cgan = build_model("cgan", latent_dim=4, img_size=8, n_classes=3)
    infogan = build_model("infogan", latent_dim=4, img_size=16, n_classes=3, code_dim=1)
    assert es.is_synthesis_model(cgan) and es.class_count(cgan) == 3
    assert es.class_count(infogan) is None  # its categorical code is not a class label


# ------------------------------------------------------------------ training-time evaluation
def _cfg(run_dir, **kw):
    from ganengine.train import TrainConfig

    base = dict(model="acgan", model_options=dict(latent_dim=8, img_size=16),
                data_options=dict(image_size=16, channels=1, no_flip=True), run_dir=str(run_dir), batch_size=4,
                max_steps=4, sample_every=0, save_every=2, print_freq=1, progress=False, tensorboard="off", seed=0,
                deterministic=True)
    base.update(kw)
    return TrainConfig(**base)


EVAL = dict(metrics="fid,intra_fid", num_samples=20, batch_size=20, max_real=40, feature_extractor=f"{FEATURES}:SmallFeatureExtractor")


def _log(run_dir):
    with open(os.path.join(run_dir, "eval_log.csv")) as f:
        return list(csv.DictReader(f))


def test_eval_every_keeps_the_best_checkpoint_and_leaves_training_alone(tmp_path):
    from ganengine.train import train
    from ganengine.train.checkpoint import list_checkpoints, load

    with_eval = train(_cfg(tmp_path / "eval", eval_every=2, eval_options=EVAL))
    without = train(_cfg(tmp_path / "plain"))
    a, b = load(with_eval["checkpoint"]), load(without["checkpoint"])
    for net in a["networks"]:
        for k, v in a["networks"][net].items():
            assert torch.equal(v, b["networks"][net][k]), (net, k)
    rows = _log(tmp_path / "eval")
    assert [int(r["step"]) for r in rows] == [2, 4] and all(r["intra_fid"] for r in rows)
    best = json.loads((tmp_path / "eval" / "best.json").read_text())
    fids = [float(r["fid"]) for r in rows]
    assert best["metric"] == "fid" and best["step"] == [2, 4][int(np.argmin(fids))]
    assert best["results"]["fid"] == pytest.approx(min(fids), rel=1e-5)  # the CSV holds 6 digits
    state = load(str(tmp_path / "eval" / "best.pt"))
    assert state["step"] == best["step"] and state["evaluation"]["value"] == best["results"]["fid"]
    assert [s for s, _ in list_checkpoints(str(tmp_path / "eval"))] == [2, 4]  # best.pt is not a step checkpoint


def test_resumed_run_keeps_its_best_and_log(tmp_path):
    from ganengine.train import train

    train(_cfg(tmp_path / "full", eval_every=1, eval_options=EVAL, max_steps=3, save_every=1))
    train(_cfg(tmp_path / "part", eval_every=1, eval_options=EVAL, max_steps=2, save_every=1))
    train(_cfg(tmp_path / "part", eval_every=1, eval_options=EVAL, max_steps=3, save_every=1, resume="latest"))
    assert _log(tmp_path / "full") == _log(tmp_path / "part")
    full, part = (json.loads((tmp_path / d / "best.json").read_text()) for d in ("full", "part"))
    assert full["step"] == part["step"] and full["results"] == part["results"]


def test_eval_options_are_checked_before_training(tmp_path):
    from ganengine.train import Trainer

    for options, message in (({}, "pt_inception-2015-12-05-6726825d.pth"),
                             ({**EVAL, "best_metric": "is"}, "--eval_best"),
                             ({**EVAL, "metrics": "fid,is"}, "logits"),
                             ({**EVAL, "num_samples": 5}, "per class"),
                             ({**EVAL, "feature_extractor": "nowhere.py:X"}, "--feature_extractor"),
                             ({**EVAL, "bogus": 1}, "unknown")):
        with pytest.raises(ValueError, match=message):
            Trainer(_cfg(tmp_path / "bad", eval_every=1, eval_options=options))


def test_command_line_train_with_eval_then_evaluate_the_best(tmp_path, capsys):
    from ganengine.cli import main

    rc = main(["train", "acgan", "--latent_dim", "8", "--img_size", "16", "--batch_size", "4", "--max_steps", "2",
               "--sample_every", "0", "--checkpoints_dir", str(tmp_path), "--name", "run", "--no_progress",
               "--tensorboard", "off", "--eval_every", "1", "--eval_metrics", "fid,is,pr,dc,intra_fid",
               "--eval_num_samples", "20", "--eval_batch_size", "20", "--eval_max_real", "40",
               "--feature_extractor", f"{FEATURES}:SmallClassifierFeatureExtractor"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "step 2: fid=" in err and "precision=" in err
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    out = tmp_path / "metrics.json"
    rc = main(["evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--metrics", "fid,is,pr,dc,intra_fid",
               "--num_samples", "20", "--batch_size", "20", "--max_images", "40", "--feature_extractor",
               f"{FEATURES}:SmallClassifierFeatureExtractor", "--output", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    res = json.loads(out.read_text())
    assert res["model"] == "acgan" and res["images"] == 20 and res["real_images"] == 40 and "intra_fid:" in captured.out
    for key in ("fid", "is", "precision", "recall", "density", "coverage", "intra_fid"):
        assert res[key] == best["results"][key], key  # the same protocol reproduces training-time numbers
    rc = main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--metrics", "is", "--num_samples", "20",
               "--feature_extractor", f"{FEATURES}:SmallFeatureExtractor"])
    assert rc == 2 and "logits" in capsys.readouterr().err
    rc = main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--metrics", "fid", "--num_samples", "1",
               "--feature_extractor", f"{FEATURES}:SmallFeatureExtractor"])
    assert rc == 2 and "--num_samples must be >= 2, got 1" in capsys.readouterr().err
    rc = main(["train", "acgan", "--max_steps", "1", "--eval_every", "1", "--checkpoints_dir", str(tmp_path)])
    assert rc == 2 and "pt_inception-2015-12-05-6726825d.pth" in capsys.readouterr().err
    rc = main(["train", "acgan", "--max_steps", "1", "--eval_every", "1", "--eval_metrics", "fid,is", "--eval_num_samples",
               "4", "--checkpoints_dir", str(tmp_path), "--name", "few", "--feature_extractor",
               f"{FEATURES}:SmallClassifierFeatureExtractor"])
    assert rc == 2 and "--eval_num_samples 4 images cannot be cut into the Inception Score's 10 splits" in \
        capsys.readouterr().err and not (tmp_path / "few" / "step_00000001.pt").exists()
    # intra-FID's real side: 50 of the digits' 1000 images spread over them hold class 8 once (was
    # found at the first evaluation, after training steps, naming no option)
    rc = main(["train", "cgan", "--latent_dim", "8", "--img_size", "16", "--max_steps", "2", "--batch_size", "4",
               "--eval_every", "1", "--eval_num_samples", "30", "--eval_max_real", "50", "--eval_metrics",
               "fid,intra_fid", "--checkpoints_dir", str(tmp_path), "--name", "intra", "--sample_every", "0",
               "--feature_extractor", f"{FEATURES}:SmallFeatureExtractor"])
    err = capsys.readouterr().err
    assert rc == 2 and "intra_fid: class 8 has 1 real image among the 50 read" in err and "--eval_max_real" in err
    assert not (tmp_path / "intra" / "step_00000001.pt").exists()


def test_ddp_two_processes_evaluate_on_rank0_and_stay_in_sync(tmp_path):
    """Rank 0 evaluates on the unwrapped networks while rank 1 waits; both write best.pt's state
    together (the RNG gather is collective); the training is the same as without evaluation."""
    from tests.test_cli_train import _ddp_worker, _free_port, _same

    common = ["train", "acgan", "--latent_dim", "8", "--img_size", "16", "--batch_size", "4", "--max_steps", "2",
              "--sample_every", "0", "--checkpoints_dir", str(tmp_path), "--no_progress", "--tensorboard", "off",
              "--deterministic"]
    runs = [("eval", common + ["--name", "eval", "--eval_every", "1", "--eval_num_samples", "20",
                               "--eval_batch_size", "20", "--eval_max_real", "40", "--eval_metrics", "fid,intra_fid",
                               "--feature_extractor", f"{FEATURES}:SmallFeatureExtractor"]),
            ("plain", common + ["--name", "plain"])]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), runs, str(tmp_path)), nprocs=2, join=True)
    r = {tag: [torch.load(tmp_path / f"{tag}_rank{k}.pt", weights_only=True) for k in range(2)] for tag, _ in runs}
    assert _same(*r["eval"]) and _same(r["eval"][0], r["plain"][0])
    assert [int(row["step"]) for row in _log(tmp_path / "eval")] == [1, 2]
    best = json.loads((tmp_path / "eval" / "best.json").read_text())
    state = torch.load(tmp_path / "eval" / "best.pt", weights_only=True)
    assert state["step"] == best["step"] and state["world_size"] == 2 and len(state["rng"]["per_rank"]) == 2


def test_best_tracking_rules():
    from ganengine.train.evaluation import SynthesisEvaluator

    ev = SynthesisEvaluator.__new__(SynthesisEvaluator)  # the rule alone, no feature network
    ev.o = {"best_metric": "fid"}
    assert ev.improves(3.0, None) and not ev.improves(float("nan"), None)
    assert ev.improves(2.0, {"metric": "fid", "value": 3.0, "step": 1})
    assert not ev.improves(3.0, {"metric": "fid", "value": 3.0, "step": 1})  # ties keep the earlier one
    assert ev.improves(9.0, {"metric": "is", "value": 1.0, "step": 1})  # resumed with another --eval_best
    ev.o = {"best_metric": "recall"}
    assert ev.improves(0.5, {"metric": "recall", "value": 0.4, "step": 1})


def test_eval_every_dc_on_a_dataset_too_small_is_refused_before_training(tmp_path):
    """The real images' count was checked against --eval_max_real only: a dataset with k images or
    fewer failed at the first evaluation, with the metric's message, after training had started;
    and a run's evaluation latents follow its seed (they used 0 unless eval_options named one)."""
    from ganengine.data import build_dataset
    from ganengine.train import Trainer

    n = len(build_dataset("acgan", dict(image_size=16, channels=1)))
    options = dict(EVAL, metrics="fid,dc", best_metric="fid", max_real=None, num_samples=20)
    import ganengine.train.evaluation as ev

    real_len = ev.SynthesisEvaluator._dataset
    try:  # (the built-in sample data has more than k images: pretend it has k)
        ev.SynthesisEvaluator._dataset = lambda self: list(range(5))
        with pytest.raises(ValueError, match=r"dc \(k = 5\).*real images.*training images"):
            Trainer(_cfg(tmp_path / "small", eval_every=2, eval_options=options))
    finally:
        ev.SynthesisEvaluator._dataset = real_len
    assert not (tmp_path / "small" / "loss_log.csv").exists() and n > 5
    trainer = Trainer(_cfg(tmp_path / "seeded", eval_every=2, eval_options=EVAL, seed=5))
    try:
        assert trainer.evaluator.o["seed"] == 5
    finally:
        trainer._release_lock()
