"""fuse() must decline a forward that calls a Sequential's own children one by one and keeps what
comes out between them (feature matching): the fused entries give other intermediates. Both the
source reader and the bytecode reader (a class without readable source)."""
import importlib
import sys

import pytest
import torch

import ganengine
from ganengine.fusion import checks

SRC = '''
import torch, torch.nn as nn
class D(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.BatchNorm2d(8), nn.LeakyReLU(0.2),
                                   nn.Conv2d(8, 1, 4, 1, 1))
    def forward(self, x):
        feats = []
        LOOP
            x = layer(x)
            feats.append(x)
        return feats
'''
LOOPS = {"children": "for layer in self.model.children():",
         "named_children": "for _, layer in self.model.named_children():"}


def _build(readable: bool, loop: str, tmp_path):
    src = SRC.replace("LOOP", LOOPS[loop])
    if not readable:
        scope = {"__name__": "execd"}
        exec(compile(src, "<string>", "exec"), scope)
        return scope["D"]
    name = f"feats_{loop}_s20"
    (tmp_path / f"{name}.py").write_text(src)
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module(name).D
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


@pytest.mark.parametrize("readable", [True, False], ids=["source", "bytecode"])
@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_calling_the_sequentials_own_children_one_by_one_declines(readable, loop, tmp_path):
    torch.manual_seed(0)
    m = _build(readable, loop, tmp_path)().train()
    assert checks.chain_only_called(m, ("model",)) is not None
    x = torch.randn(2, 3, 16, 16)
    want = [t.detach().clone() for t in m(x)]
    fused = ganengine.fuse(m)
    # the norm and the activation stay two entries (fused, the norm's entry would return the activation)
    assert type(fused.model[2]) is torch.nn.LeakyReLU and str(getattr(fused.model[1], "activation", "none")) == "none"
    got = fused(x)
    assert len(got) == len(want)
    # (the convs may take another route: fp32 rounding of at most 128-term sums through four layers,
    # bounded by 4 * gamma(128) ~ 512 eps of the largest magnitude; a wrong fusion is off by O(1))
    eps = torch.finfo(torch.float32).eps
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 512 * eps * b.abs().max().clamp_min(1.0)
