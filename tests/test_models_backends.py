"""Every model's training step on every CPU backend: the ``torch`` backend (the ground truth and the
benchmark baseline) must train what the default backend trains, with the same first-step losses.

WGAN / WGAN-GP crashed on the torch backend: the fused generator step updated batch norm's running
statistics in place between G's forward and its backward, and ``F.batch_norm`` saves them for the
backward (the C++ kernels do not)."""
from __future__ import annotations

import pytest
import torch

from ganengine import backends
from ganengine.bench.cases_models import MODEL_SPECS, make_batch
from ganengine.models import build_model
from tests._train_utils import one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = [n for n in MODEL_SPECS if n not in ("pix2pix", "stackgan")]  # (the larger two: the slow set)


def _model_and_batch(name):
    torch.manual_seed(0)
    spec = MODEL_SPECS[name]
    model = build_model(name, **spec["quick"])
    n, size = spec["batch"]["quick"]
    return model, make_batch(name, model, n, size, torch.device("cpu"))


def _first_step_losses(name, backend):
    with backends.use_backend(backend):
        model, batch = _model_and_batch(name)
        opts = model.make_optimizers()
        torch.manual_seed(1)
        first = {k: float(v) for k, v in model.train_step(batch, opts).items()}
        second = model.train_step(batch, opts)
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in second.values()), (name, backend, second)
    return first


def _check(name):
    want = _first_step_losses(name, "torch")
    for backend in ("cpu",):
        if not backends.available().get(backend):
            continue
        got = _first_step_losses(name, backend)
        assert got.keys() == want.keys()
        for k in want:
            # the networks' outputs agree to a few fp32 ulps per layer (each op's own tests bound that);
            # a loss is a mean of them: 1e-4 relative leaves a wide margin over a dozen layers
            assert abs(got[k] - want[k]) <= 1e-4 * (1 + abs(want[k])), (name, k, got[k], want[k])


@pytest.mark.parametrize("name", QUICK)
def test_training_step_on_every_backend(name):
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pix2pix", "stackgan"])
def test_training_step_on_every_backend_larger_models(name):
    _check(name)


@pytest.mark.parametrize("name", QUICK)
def test_unfused_model_is_plain_pytorch_with_the_same_losses(name, monkeypatch):
    """fused=False (the benchmarks' eager baseline) ran ganengine's losses (the C++ kernels on auto,
    a slower composition on the torch backend) and PatchDiscriminator's fused convs: it runs plain
    PyTorch now (the gradient penalty is ganengine's own, either way), with the fused model's losses."""
    import tests.test_models_backends as here

    first = _first_step_losses(name, "auto")
    real_build = build_model
    monkeypatch.setattr(here, "build_model", lambda n, **kw: real_build(n, **{**kw, "fused": False}))
    model, batch = _model_and_batch(name)
    opts = model.make_optimizers()
    torch.manual_seed(1)
    with torch.profiler.profile() as prof:
        got = {k: float(v) for k, v in model.train_step(batch, opts).items()}
    ops = {e.name for e in prof.events() if e.name.startswith(("ganengine", "ganengine_C"))}
    assert ops <= {"ganengine::gradient_penalty"}, (name, ops)
    assert got.keys() == first.keys()
    for k in first:  # (as _check's bound: the same networks, losses and draws)
        assert abs(got[k] - first[k]) <= 1e-4 * (1 + abs(first[k])), (name, k, got[k], first[k])
