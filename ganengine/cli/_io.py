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
    blocker = _file_in_the_way(path)
    if blocker == os.path.abspath(path):
        raise OutputError(f"{option} {path!r} is not writable: it is a file: expected a folder (a new or existing "
                          "one)")
    if blocker:
        raise OutputError(f"{option} {path!r} is not writable: {blocker!r} is a file, not a folder: expected a "
                          "folder path (missing folders are created)")
    _create_and_probe(path, f"{option} {path!r} is not writable")
    return path


def writable_file(path: str, option: str, example: str = "results.json") -> str:
    """Check an output file's path before the long work: not an existing folder, its folder
    created if missing (as the training creates its folders) and writable; one clear line naming
    ``option`` otherwise (``example``: a file name to suggest inside a folder given instead)."""
    if os.path.isdir(path):
        raise OutputError(f"{option} {path!r} is a folder: expected a file name "
                          f"(e.g. {os.path.join(path, example)!r})")
    folder = os.path.dirname(os.path.abspath(path))
    blocker = _file_in_the_way(folder)
    if blocker:
        raise OutputError(f"{option} {path!r} is not writable: {blocker!r} is a file, not a folder: expected a "
                          "file path in a folder (missing folders are created)")
    _create_and_probe(folder, f"{option} {path!r} is not writable (its folder {folder!r})")
    return path


def _create_and_probe(folder: str, what: str) -> None:
    """Create ``folder`` if needed and write and remove a file there; ``what``: the error's start."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ganengine_probe_", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{what}: {describe(exc)}") from None


def _file_in_the_way(folder: str) -> str | None:
    """The nearest existing part of ``folder`` (itself or a parent) when it is not a folder."""
    part = os.path.abspath(folder)
    while not os.path.exists(part):
        parent = os.path.dirname(part)
        if parent == part:
            return None
        part = parent
    return None if os.path.isdir(part) else part


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
