"""Training checkpoints (format in docs/INTERFACES.md), written atomically, loaded weights_only.

``save`` writes ``DIR/step_00000300.pt`` through a temporary file in the same folder and
``os.replace`` (atomic on POSIX and Windows), so a crash never leaves a half-written checkpoint
behind, then deletes all but the newest ``keep`` checkpoints. Checkpoints of steps after the one
being saved belong to an abandoned run (training resumed from an older checkpoint): they are
moved to ``DIR/abandoned/`` first, so neither ``--resume`` nor the pruning mistakes them for the
newest. Everything inside is tensors and plain Python types, so
``torch.load(path, weights_only=True)`` reads it: no pickled code runs when a checkpoint is
loaded.

``RunLock`` keeps one trainer per run folder (an OS file lock, released when the process dies,
so a killed run never leaves a stale lock); under it, ``.tmp_step_*.pt`` files left by a process
killed during a save are removed.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile

import torch

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here (msvcrt locks are mandatory); run unlocked
    fcntl = None

FORMAT, VERSION = "ganengine-checkpoint", 1
_NAME = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(ValueError):
    pass


def path_for(folder: str, step: int) -> str:
    return os.path.join(folder, f"step_{step:08d}.pt")


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, f)) for f in os.listdir(folder) if (m := _NAME.match(f))]
    return sorted(found)


def latest(folder: str) -> str | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def resolve(path: str) -> str:
    """A checkpoint file, or the newest checkpoint in a run folder."""
    if os.path.isdir(path):
        found = latest(path)
        if found is None:
            raise CheckpointError(f"no checkpoint (step_*.pt) in folder {path!r}")
        return found
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    return path


def save(state: dict, folder: str, step: int, keep: int = 3) -> str:
    target = write(state, path_for(folder, step))
    set_aside_newer(folder, step)
    if keep > 0:
        for _, old in list_checkpoints(folder)[:-keep]:
            os.unlink(old)
    return target


def write(state: dict, target: str) -> str:
    """``state`` to ``target`` through a temporary file in the same folder (atomic)."""
    folder = os.path.dirname(target) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_step_", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


ABANDONED = "abandoned"


def set_aside_newer(folder: str, step: int) -> list[str]:
    """Move checkpoints of steps after ``step`` to ``folder/abandoned/`` (never deleted: they may
    be what the user wanted after all). Returns their new paths."""
    moved = []
    for s, path in list_checkpoints(folder):
        if s <= step:
            continue
        dest_dir = os.path.join(folder, ABANDONED)
        os.makedirs(dest_dir, exist_ok=True)
        base, dest, k = os.path.basename(path), os.path.join(dest_dir, os.path.basename(path)), 1
        while os.path.exists(dest):
            dest = os.path.join(dest_dir, f"{base[:-3]}.{k}.pt")
            k += 1
        os.replace(path, dest)
        moved.append(dest)
    if moved:
        print(f"ganengine: {len(moved)} checkpoint(s) after step {step} belong to an abandoned run "
              f"(training resumed from an older one); moved to {os.path.join(folder, ABANDONED)}", file=sys.stderr)
    return moved


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete ``.tmp_step_*.pt`` files (left by a process killed while saving). Call only while
    holding the folder's RunLock: no other trainer can be writing one then."""
    removed = []
    if os.path.isdir(folder):
        for f in os.listdir(folder):
            if f.startswith(".tmp_step_") and f.endswith(".pt"):
                try:
                    os.unlink(os.path.join(folder, f))
                    removed.append(f)
                except FileNotFoundError:
                    pass
    return removed


class RunLock:
    """An exclusive lock on a run folder for one trainer (``folder/.lock``, flock). A second
    trainer on the same folder gets a CheckpointError naming the holder's pid."""

    def __init__(self, folder: str):
        self.folder, self.fd = folder, None

    def acquire(self) -> "RunLock":
        if fcntl is None or self.fd is not None:
            return self
        try:
            os.makedirs(self.folder, exist_ok=True)
            fd = os.open(os.path.join(self.folder, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CheckpointError(f"cannot use run folder {self.folder!r} ({exc.strerror or exc}). Check that it "
                                  "is writable, or pick another --checkpoints_dir / --name.") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise CheckpointError(f"run folder {self.folder!r} is in use by another ganengine train (pid {holder}): "
                                  "two runs would overwrite each other's checkpoints. Use another --name, or wait "
                                  "for / stop that run.") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        remove_stale_temporaries(self.folder)
        return self

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)  # (closing releases the flock)

    def __del__(self):
        self.release()


def load(path: str, map_location="cpu") -> dict:
    path = resolve(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load checkpoint {path!r} with weights_only=True ({type(exc).__name__}: "
                              f"{exc}). Is it a ganengine training checkpoint?") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a ganengine training checkpoint (no format={FORMAT!r}). "
                              "For a reference implementation's weights use ganengine.models.load_reference_checkpoint.")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path!r} has checkpoint version {state['version']}; this ganengine reads <= {VERSION}. "
                              "Upgrade ganengine.")
    return state


def load_model(path: str, map_location="cpu", **overrides):
    """Rebuild the model a checkpoint was trained with (``model`` + ``options``) and load its networks."""
    from ganengine.models import build_model

    state = load(path, map_location)
    options = dict(state["options"])
    options.update(overrides)
    model = build_model(state["model"], **options)
    for name, sd in state["networks"].items():
        getattr(model, name).load_state_dict(sd)
    return model, state
