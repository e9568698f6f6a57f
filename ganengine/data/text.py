"""An offline caption embedder for StackGAN: no download, no model weights, deterministic.

The reference StackGAN conditions on 1024-d char-CNN-RNN embeddings that were precomputed with
a separately trained text encoder. ganengine ships no such encoder (it would be weights to
download), so captions are embedded with **signed feature hashing** of lower-cased word
unigrams and bigrams into ``dim`` buckets, L2-normalised: captions that share words get
similar vectors, which is what the conditioning augmentation (CA_NET) needs to learn a
caption -> image mapping. It is stable across machines and runs (BLAKE2 hashes, not Python's
randomised ``hash``). To use real precomputed embeddings instead, see ``captioned.py``
(``embeddings.pt``).
"""
from __future__ import annotations

import hashlib
import re

import torch

DEFAULT_DIM = 1024  # the reference's TEXT.DIMENSION
_WORD = re.compile(r"[a-z0-9]+")


def tokens(caption: str) -> list[str]:
    words = _WORD.findall(caption.lower())
    return words + [a + "_" + b for a, b in zip(words, words[1:])]


def _bucket(token: str, dim: int) -> tuple[int, float]:
    h = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
    return (h >> 1) % dim, (1.0 if h & 1 else -1.0)


class CaptionEmbedder:
    """``CaptionEmbedder(dim)(["a red bird", ...]) -> (N, dim)`` float tensor of unit vectors."""

    def __init__(self, dim: int = DEFAULT_DIM):
        if dim < 2:
            raise ValueError(f"embedding dim must be >= 2, got {dim}")
        self.dim = dim
        self._cache: dict[str, tuple[int, float]] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        out = torch.zeros(len(captions), self.dim)
        for i, caption in enumerate(captions):
            toks = tokens(caption)
            if not toks:
                raise ValueError(f"caption {i} ({caption!r}) has no words to embed")
            for t in toks:
                if t not in self._cache:
                    self._cache[t] = _bucket(t, self.dim)
                j, s = self._cache[t]
                out[i, j] += s
        return out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)


def embed(captions: list[str], dim: int = DEFAULT_DIM) -> torch.Tensor:
    return CaptionEmbedder(dim)(captions)


def read_caption_file(path: str) -> list[str]:
    """One caption per line (blank lines skipped), for ``ganengine translate --captions FILE``."""
    with open(path) as f:
        caps = [ln.strip() for ln in f if ln.strip()]
    if not caps:
        raise ValueError(f"caption file {path!r} has no captions (expected one per line)")
    return caps
