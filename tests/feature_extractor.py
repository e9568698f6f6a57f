"""A small, deterministic feature extractor that ships with the tests (stands in for Inception).

``ganengine evaluate --feature_extractor tests/feature_extractor.py:SmallFeatureExtractor`` uses it.
Fixed weights from a seeded generator, so features are the same in every process.
"""
import torch
import torch.nn.functional as F
from torch import nn


class SmallFeatureExtractor(nn.Module):
    """Images (N, C, H, W) in [0, 1] (C = 1 or 3) -> (N, 64) features."""

    def __init__(self, seed: int = 1234):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        x = F.relu(self.conv1(2 * x - 1))
        x = F.relu(self.conv2(x))
        return F.adaptive_avg_pool2d(x, 2).flatten(1)


class SmallClassifierFeatureExtractor(SmallFeatureExtractor):
    """SmallFeatureExtractor with a fixed 10-way ``logits(features)`` head: what the Inception
    Score needs from a feature network (the FID Inception network has its own)."""

    def __init__(self, seed: int = 1234):
        super().__init__(seed)
        g = torch.Generator().manual_seed(seed + 1)
        self.head = nn.Linear(64, 10)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g))
            self.head.bias.zero_()

    def logits(self, features):
        return self.head(features)
