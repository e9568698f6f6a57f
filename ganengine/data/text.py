"""An offline caption embedder for StackGAN: no download, no model weights, deterministic.

The reference StackGAN conditions on 1024-d char-CNN-RNN embeddings that were precomputed with
a separately trained text encoder. ganengine ships no such encoder (it would be weights to
download), so captions are embedded with **signed feature hashing** of case-folded word
unigrams and bigrams (words of any script, ``words``) into ``dim`` buckets, L2-normalised: captions that share words get
similar vectors, which is what the conditioning augmentation (CA_NET) needs to learn a
caption -> image mapping. It is stable across machines and runs (BLAKE2 hashes, not Python's
randomised ``hash``). To use real precomputed embeddings instead, see ``captioned.py``
(``embeddings.pt``).
"""
from __future__ import annotations

import codecs
import hashlib
import io
import re
import unicodedata

import torch

from ganengine.data.images import DataError

DEFAULT_DIM = 1024  # the reference's TEXT.DIMENSION
_WORD = re.compile(r"[a-z0-9]+")
_NOT_WORD = re.compile(r"[\W_]")  # (\w less "_", which joins bigrams)


def _keep(m: re.Match) -> str:
    # a combining mark (Devanagari vowel signs, ...) belongs to its word though \w does not match it
    return m.group() if unicodedata.category(m.group()).startswith("M") else " "


def words(caption: str) -> list[str]:
    """The caption's words: runs of letters and digits, case-folded. ASCII text as ever (its
    tokens, hence its embeddings and trained checkpoints, unchanged); other text in any script,
    NFKC-normalised first (a composed and a decomposed "é" are one letter)."""
    if caption.isascii():
        return _WORD.findall(caption.lower())
    text = unicodedata.normalize("NFKC", caption).casefold()
    return _NOT_WORD.sub(_keep, text).split()


def tokens(caption: str) -> list[str]:
    w = words(caption)
    return w + [a + "_" + b for a, b in zip(w, w[1:])]


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


def read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file, as iterating ``open(path, encoding="utf-8-sig")`` gives them
    (a BOM, as Windows editors write, skipped); a DataError naming the file and the line of the
    first byte that is not UTF-8 (the codec's own words name neither)."""
    with open(path, "rb") as f:
        raw = f.read()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = bom + exc.start
        before = raw[:at].decode("utf-8", "replace")
        line = before.replace("\r\n", "\n").replace("\r", "\n").count("\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[at]:02x} at offset {at}; a Latin-1 or "
                        "Windows-1252 file, say): save the file as UTF-8") from None
    return io.StringIO(text, newline=None).readlines()


def check_caption(caption: str, where: str) -> None:
    """A DataError naming ``where`` (file:line) for a caption with no word to embed."""
    if not words(caption):
        raise DataError(f"{where}: the caption {caption[:60]!r} has no words to embed (letters or digits); "
                        "fix or remove that line")


def read_caption_file(path: str) -> list[str]:
    """One caption per line (blank lines skipped), for ``ganengine translate --captions FILE``."""
    caps = []
    for k, line in enumerate(read_lines(path), start=1):
        if line.strip():
            check_caption(line.strip(), f"{path}:{k}")
            caps.append(line.strip())
    if not caps:
        raise ValueError(f"caption file {path!r} has no captions (expected one per line)")
    return caps
