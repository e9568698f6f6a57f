"""Model benchmark cases for every model of ``ganengine.models.MODELS`` (issue s18): `ganengine bench
--models`, `ganengine profile` and `benchmarks/bench_models.py` time csgan, sagan, biggan,
biggan_deep, unetgan and icgan too, on batches in the layout their train_step reads."""
from __future__ import annotations

import math
import re

import pytest
import torch

import ganengine
from ganengine.bench import cases_models, registry
from ganengine.models import MODELS, build_model
from tests._train_utils import one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

# the models that had no case before (the older ones' quick steps run in tests/test_models_backends.py)
NEW = ("csgan", "sagan", "biggan", "biggan_deep", "unetgan", "icgan")


def _model_cases() -> set[str]:
    return {name for name, case in registry.all_cases().items() if case.kind == "model"}


def test_every_model_has_a_case():
    assert set(MODELS) - _model_cases() == set()
    assert set(NEW) <= set(MODELS)


def test_every_model_is_a_profile_target():
    from ganengine.bench.profile import resolve_target

    for name in MODELS:
        assert resolve_target(name) == ("model", name)


@pytest.mark.parametrize("command", ["profile", "bench"])
def test_help_names_every_model(command, capsys):
    from ganengine.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    words = set(re.findall(r"[a-z0-9_]+", capsys.readouterr().out))
    missing = [name for name in MODELS if name not in words]
    assert not missing, missing


def _finite(losses: dict) -> bool:
    return bool(losses) and all(math.isfinite(float(v)) for v in losses.values())


@pytest.mark.parametrize("name", NEW)
def test_quick_case_steps_fused_and_reference(name):
    """The quick case's fused step (backend auto) and the plain model's step (backend torch, as the
    eager runner runs it) both train: finite losses, the same loss terms."""
    case = registry.all_cases()[name]
    work = case.setup(case.shape_list("quick")[0], torch.device("cpu"), torch.float32)
    assert work.reference_step is not None
    fused = work.step()
    with ganengine.use_backend("torch"):
        plain = work.reference_step()
    assert _finite(fused) and _finite(plain), (fused, plain)
    assert fused.keys() == plain.keys()


@pytest.mark.parametrize("name", NEW)
def test_batch_layout(name):
    """Each model's synthetic batch has the keys, shapes and ranges its train_step reads, at the
    image size of the model's options."""
    spec = cases_models.MODEL_SPECS[name]
    model = build_model(name, **spec["quick"])
    n, size = spec["batch"]["quick"]
    size = cases_models._image_size(name, model, size)
    batch = cases_models.make_batch(name, model, n, size, "cpu")
    images = [batch[k] for k in ("A", "B", "image") if k in batch]
    assert images and all(t.shape == (n, 3, size, size) and t.abs().max() <= 1 for t in images)
    if name != "csgan":  # class indices (SAGAN and the unconditional U-Net GAN ignore them)
        labels = batch["label"]
        assert labels.dtype == torch.int64 and labels.shape == (n,) and int(labels.min()) >= 0
        assert int(labels.max()) < model.options.get("n_classes", 10)
    if name == "icgan":  # instance features: rows of the synthetic bank the generator draws from
        bank = model.bank
        assert len(bank) == cases_models.INSTANCE_BANK_SIZE and "synthetic" in bank.source
        assert batch["feature"].shape == (n, model.options["instance_sz"])
        assert all(any(torch.equal(row, f) for f in bank.features) for row in batch["feature"])


def test_icgan_case_gives_both_models_one_bank():
    """The fused and the plain IC-GAN draw their generator conditionings from the same instances."""
    spec = cases_models.MODEL_SPECS["icgan"]
    fused, plain = (build_model("icgan", **spec["quick"], fused=f) for f in (True, False))
    cases_models.make_batch("icgan", fused, 2, 32, "cpu")
    cases_models._share_data(plain, fused)
    assert plain.bank is fused.bank


def test_bench_models_script_quick_sizes(capsys):
    """benchmarks/bench_models.py --quick runs `ganengine bench --quick`'s settings, IC-GAN included."""
    import importlib.util
    import os
    import time

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_models.py")
    spec = importlib.util.spec_from_file_location("bench_models_s18", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        mod.main(["--quick", "--models", "icgan", "--interleave", "--clock", "cpu", "--threads", "1",
                  "--repeats", "1", "--warmup", "0"])
    finally:
        mod.CLOCK[0] = time.perf_counter
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| icgan |")]
    assert len(rows) == 1 and "| 32x32 | 2 |" in rows[0], rows
    assert set(mod.quick_table()) >= set(NEW)
