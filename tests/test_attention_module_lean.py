"""nn.SelfAttention2d on CPU with plain 1x1 convs runs the whole block as one C++ call
(ganengine_C::self_attention2d, ops/attention.py's lean entry): the same bits and gradients as its
conv-modules route, which it still takes for hooked, parametrized (spectral-normed) convs and for
return_attention."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ganengine import _ext
from ganengine.ops import _dispatch
from ganengine.nn import SelfAttention2d

pytestmark = pytest.mark.skipif(not _ext.loaded(), reason="needs ganengine._C")


class _Names(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def _run(mod, x):
    xs = x.detach().clone().requires_grad_()
    mode = _Names()
    with mode:
        out = mod(xs)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return out.detach(), xs.grad, [p.grad.clone() for p in mod.parameters()], mode.names


@pytest.mark.parametrize("channels_last", [False, True])
def test_plain_convs_take_the_block_entry_with_the_same_bits(channels_last, monkeypatch):
    import ganengine.nn.attention as nn_attention
    from ganengine.ops import attention as attn_ops

    calls = []
    lean_calls = []

    def spy(*args, **kw):
        calls.append(1)
        return attn_ops.self_attention2d(*args, **kw)

    real_op = _dispatch.lean_op("self_attention2d", attn_ops._BLOCK_KERNELS)
    assert real_op is not None

    def op_spy(*args):
        lean_calls.append(1)
        return real_op(*args)

    monkeypatch.setattr(nn_attention, "self_attention2d", spy)
    monkeypatch.setattr(_dispatch, "lean_op", lambda name, kernels=(): op_spy if name == "self_attention2d" else None)
    torch.manual_seed(0)
    mod = SelfAttention2d(16)
    with torch.no_grad():
        mod.gamma.fill_(0.7)
    x = torch.randn(2, 16, 5, 3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    lean = _run(mod, x)
    assert len(calls) == 1 and len(lean_calls) == 1  # the module called the block, the block its C++ op
    mod.zero_grad()
    monkeypatch.undo()
    # the block's Python route (C++ entries off): its stacked projection and the same kernels
    monkeypatch.setattr(_dispatch, "lean_op", lambda name, kernels=(): None)
    route = _run(mod, x)
    assert torch.equal(lean[0], route[0]) and torch.equal(lean[1], route[1])
    for a, b in zip(lean[2], route[2]):
        assert torch.equal(a, b)


def test_spectral_normed_convs_and_return_attention_keep_the_module_route(monkeypatch):
    import ganengine.nn.attention as nn_attention

    calls = []
    monkeypatch.setattr(nn_attention, "self_attention2d", lambda *a, **k: calls.append(1))
    torch.manual_seed(0)
    mod = SelfAttention2d(16)
    nn.utils.parametrizations.spectral_norm(mod.value_conv)
    x = torch.randn(1, 16, 4, 4)
    _run(mod, x)
    assert not calls
    plain = SelfAttention2d(16)
    out, attn = plain(x, return_attention=True)
    assert attn.shape == (1, 16, 16) and out.shape == x.shape
