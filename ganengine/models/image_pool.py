"""CycleGAN's image history buffer (Shrivastava et al. 2017), as the reference's ImagePool.

``query(images)`` returns a batch of the same size: while the pool is filling, the new images;
afterwards each image is, with probability 1/2, swapped for a random stored one (which the new
image replaces). The reference draws with Python's global ``random``; here each pool owns a
``random.Random`` seeded from torch's initial seed and the pool's ``stream`` number, so the pool's
draws do not disturb (and are not disturbed by) anything else, two pools of one model (CycleGAN's
fake_A_pool and fake_B_pool: streams 0 and 1) make independent decisions, as the reference's two
pools drawing one after the other from the one global generator do, and its state checkpoints
with ``state_dict()``.
"""
from __future__ import annotations

import random

import torch


class ImagePool:
    def __init__(self, pool_size: int = 50, seed: int | None = None, stream: int = 0):
        if not isinstance(pool_size, int) or pool_size < 0:
            raise ValueError(f"ImagePool: pool_size must be an int >= 0, got {pool_size!r}")
        if isinstance(stream, bool) or not isinstance(stream, int) or stream < 0:
            raise ValueError(f"ImagePool: stream must be an int >= 0, got {stream!r}")
        self.pool_size = pool_size
        self.images: list[torch.Tensor] = []
        self.stream = stream
        self.reseed(torch.initial_seed() if seed is None else seed)

    def reseed(self, seed: int) -> None:
        # stream 0: the seed itself (as before streams existed); another stream: a string seed,
        # which random.Random hashes (SHA-512) into an unrelated state
        self.rng = random.Random(seed if self.stream == 0 else f"ganengine.ImagePool:{seed}:{self.stream}")

    def __len__(self) -> int:
        return len(self.images)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.pool_size == 0:
            return images
        out = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.pool_size:
                self.images.append(image)
                out.append(image)
            elif self.rng.uniform(0, 1) > 0.5:
                i = self.rng.randint(0, self.pool_size - 1)
                out.append(self.images[i].clone())
                self.images[i] = image
            else:
                out.append(image)
        return torch.cat(out, 0)

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"pool_size": self.pool_size, "images": [t.cpu() for t in self.images],
                "rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict, device=None) -> None:
        if state.get("pool_size") != self.pool_size:
            raise ValueError(f"ImagePool: saved pool_size {state.get('pool_size')} != this pool's {self.pool_size}")
        self.images = [t.to(device) if device is not None else t for t in state["images"]]
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
