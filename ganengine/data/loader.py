"""DataLoader construction: the resumable sampler, workers, pinned memory on GPU."""
from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader

from ganengine.data.sampler import ResumableSampler


def default_workers(dataset, device: torch.device) -> int:
    """Workers for ``--num_threads auto``: none when the images are decoded in memory and we train
    on CPU (worker processes would only compete with the training threads for the cores);
    otherwise up to 4, as the reference's --num_threads."""
    store = getattr(dataset, "images", None) or getattr(dataset, "A", None)
    cached = store is not None and getattr(store, "cached", None) is not None
    if device.type == "cpu" and cached:
        return 0
    return min(4, os.cpu_count() or 1)


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave Ctrl-C / SIGTERM to the trainer (a terminal signals the whole process group):
    it stops at the end of the step and shuts them down; a worker that died of the signal instead
    would fail the batch under way (spawn / forkserver workers do not inherit its handler)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset, batch_size: int, device: torch.device | str = "cpu", seed: int = 0, rank: int = 0,
                world_size: int = 1, num_workers: int | None = None, shuffle: bool = True,
                drop_last: bool = True) -> tuple[DataLoader, ResumableSampler]:
    device = torch.device(device)
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    sampler = ResumableSampler(len(dataset), batch_size, shuffle, seed, rank, world_size, drop_last)
    workers = default_workers(dataset, device) if num_workers is None else num_workers
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        pin_memory=device.type == "cuda", drop_last=False,
        persistent_workers=False,  # a fresh iterator per epoch re-reads the sampler's epoch/start
        prefetch_factor=4 if workers > 0 else None,
        # own generator: creating an iterator must not draw from the global RNG (exact resume)
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_ignore_stop_signals if workers > 0 else None,
    )
    return loader, sampler
