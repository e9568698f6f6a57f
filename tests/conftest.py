"""Test setup: run the Triton kernels on CPU through the interpreter when there is no GPU."""
import os

import pytest

# must happen before anything imports triton
if not os.environ.get("GANENGINE_TEST_NO_INTERPRET"):
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    except ImportError:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    has_cuda = torch.cuda.is_available()
    run_slow = "slow" in (config.getoption("-m") or "")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow test: run with -m slow")
    for item in items:
        # markers, not item.keywords: keywords hold every parent's name too, so a checkout in a
        # folder named "gpu" or "slow" would skip everything
        if item.get_closest_marker("gpu") is not None and not has_cuda:
            item.add_marker(skip_gpu)
        if item.get_closest_marker("slow") is not None and not run_slow:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield
