"""Output folders and OS errors for the CLI: checked before the long work, said in one line."""
from __future__ import annotations

import errno
import os
import tempfile


class OutputError(ValueError):
    """An output folder that cannot be written (or a write that failed): one clear line."""


def writable_dir(path: str, option: str) -> str:
    """Create ``path`` if needed and prove it writable by creating and removing a file there, so
    a read-only or full disk is reported before any training / translating starts."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ganengine_probe_", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{option} {path!r} is not writable: {describe(exc)}") from None
    return path


def describe(exc: OSError) -> str:
    """An OSError in words, with what to do for the common ones."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full (or over quota): free space or write elsewhere"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (read-only or not yours): pick a folder you can write"
    if exc.errno == errno.ENOTDIR:
        return "a part of the path is a file, not a folder"
    return exc.strerror or str(exc)


def device_or_error(name: str, option: str = "--device"):
    """torch.device for "auto" / "cpu" / "cuda", or a clear error when CUDA is asked for and absent."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OutputError(f"{option} {name}: no CUDA device is available here (torch {torch.__version__}, "
                          f"CUDA build: {torch.version.cuda or 'none'}); use {option} cpu or auto")
    return torch.device(name)
