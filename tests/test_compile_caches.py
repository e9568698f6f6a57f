"""torch.compile(dynamic=True) compiles a fused op once for every shape, also on a process's
first calls: ganengine's per-process lookup caches (which backend serves a device, whether the
extension has a kernel, parsed settings, the last backend used) are neither read nor written while
Dynamo traces. Dynamo guarded on them, and the op's eager run (its implementation, its backward)
then changed them: one recompile per process (session 15)."""
from __future__ import annotations

import pytest
import torch

import ganengine.functional as GF
from ganengine import settings
from ganengine.ops import _dispatch

_W3 = torch.randn(3, 4, 3, 3)
_OPS = {
    "conv3x3": lambda x: GF.conv3x3(x, _W3, None, padding=1, padding_mode="reflect"),
    "conv2d_act": lambda x: GF.conv2d_act(x, _W3, None, padding=1),
    "instance_norm_act": lambda x: GF.instance_norm_act(x),
    "batch_norm_act": lambda x: GF.batch_norm_act(x, activation="leaky_relu"),
    "gan_loss": lambda x: GF.gan_loss(x, True, "lsgan"),
}


def _clear_caches():
    for cache in (_dispatch._SERVED, _dispatch._EXT_REASON, _dispatch.last_used, settings._PARSED):
        cache.clear()


@pytest.mark.parametrize("name", sorted(_OPS))
def test_compiles_once_from_cold_caches(name):
    from torch._dynamo.utils import counters

    f = _OPS[name]
    torch._dynamo.reset()
    counters.clear()
    _clear_caches()  # (as in a fresh process: earlier tests filled them)
    cf = torch.compile(f, dynamic=True, backend="aot_eager", fullgraph=True)
    for shape in ((2, 4, 6, 5), (3, 4, 7, 9), (4, 4, 8, 10)):
        x = torch.randn(*shape, requires_grad=True)
        (gc,) = torch.autograd.grad(cf(x).sum(), x)
        (ge,) = torch.autograd.grad(f(x).sum(), x)  # (an eager call between compiled ones fills the caches)
        torch.testing.assert_close(gc, ge, atol=1e-5, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1
    assert _dispatch.last_used  # (eager calls still record their backend)
    torch._dynamo.reset()
