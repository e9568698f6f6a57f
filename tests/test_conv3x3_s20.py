"""gnn.Conv3x3 reads its weight and bias from _parameters (host time): what the attributes give
must still be what it uses — torch.func.functional_call's swapped tensors, a parametrized weight
(spectral norm as a parametrization), bias=False."""
import pytest
import torch
from torch import nn

import ganengine.nn as gnn


def _pair(bias=True, mode="zeros"):
    torch.manual_seed(0)
    ref = nn.Conv2d(4, 5, 3, 1, 1, bias=bias, padding_mode=mode).double()
    ours = gnn.Conv3x3(4, 5, bias=bias, padding_mode=mode).double()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_functional_call_uses_the_swapped_tensors(bias, mode):
    ref, ours = _pair(bias, mode)
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64)
    swap = {"weight": torch.randn_like(ref.weight)}
    if bias:
        swap["bias"] = torch.randn_like(ref.bias)
    want = torch.func.functional_call(ref, swap, (x,))
    got = torch.func.functional_call(ours, swap, (x,))
    # fp64 3x3 convs of the same tensors: apart by at most twice the sum's rounding bound
    bound = 2 * 36 * torch.finfo(torch.float64).eps * (x.abs().max() * swap["weight"].abs().sum((1, 2, 3)).max() + 1)
    assert (got - want).abs().max() <= bound
    assert (ours(x) - ref(x)).abs().max() <= 2 * 36 * torch.finfo(torch.float64).eps * (
        x.abs().max() * ref.weight.abs().sum((1, 2, 3)).max() + 1)
    assert not torch.allclose(got, ours(x))  # (the swapped weight really was used)


def test_parametrized_weight_is_read_through_the_parametrization():
    ref, ours = _pair()
    nn.utils.parametrizations.spectral_norm(ref)
    nn.utils.parametrizations.spectral_norm(ours)
    ours.load_state_dict(ref.state_dict())
    ref.eval(), ours.eval()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    w = ref.weight
    bound = 2 * 36 * torch.finfo(torch.float64).eps * (x.abs().max() * w.abs().sum((1, 2, 3)).max() + 1)
    assert (ours(x) - ref(x)).abs().max() <= bound
