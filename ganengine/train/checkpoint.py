"""Training checkpoints (format in docs/INTERFACES.md), written atomically, loaded weights_only.

``save`` writes ``DIR/step_00000300.pt`` through a temporary file in the same folder and
``os.replace`` (atomic on POSIX and Windows), so a crash never leaves a half-written checkpoint
behind, then deletes all but the newest ``keep`` checkpoints. Checkpoints of steps after the one
being saved belong to an abandoned branch of the run (training resumed from an older checkpoint
of the folder): they are moved to ``DIR/abandoned/`` first, so neither ``--resume`` nor the
pruning mistakes them for the newest. A run that does not continue the folder's run (a fresh
one, or one resumed from another folder's checkpoint) first moves the earlier run's files to
``DIR/previous/K/`` (``set_aside_previous_run``). Checkpoints get the permissions a plain
``open()`` gives (0o666 less the umask), like the logs and sample grids. Everything inside is
tensors and plain Python types, so
``torch.load(path, weights_only=True)`` reads it: no pickled code runs when a checkpoint is
loaded.

``RunLock`` keeps one trainer per run folder (an OS file lock, released when the process dies,
so a killed run never leaves a stale lock); under it, ``.tmp_step_*.pt`` files left by a process
killed during a save are removed.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import sys

import torch

from ganengine.models.checkpoints import TRAINING_CHECKPOINT_FORMAT, damaged_message, damaged_record

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here (msvcrt locks are mandatory); run unlocked
    fcntl = None

FORMAT, VERSION = TRAINING_CHECKPOINT_FORMAT, 1
_NAME = re.compile(r"^step_(\d+)\.pt$")
_SAMPLE = re.compile(r"^step_(\d+)\.png$")


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


def create_temporary(folder: str, prefix: str = ".tmp_step_", suffix: str = ".pt") -> tuple[int, str]:
    """A new ``PREFIX*SUFFIX`` file in ``folder``, opened for writing: created exclusively (as
    mkstemp does) but with mode 0o666 less the umask, as a plain ``open()`` would, so checkpoints
    get the same permissions as the logs and sample grids next to them (mkstemp's 0o600 made them
    unreadable to the group a run folder is shared with)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f"{prefix}{secrets.token_hex(8)}{suffix}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary checkpoint file in {folder!r}")


def write(state: dict, target: str) -> str:
    """``state`` to ``target`` through a temporary file in the same folder (atomic)."""
    folder = os.path.dirname(target) or "."
    os.makedirs(folder, exist_ok=True)
    return write_atomic(target, lambda f: torch.save(state, f))


def write_atomic(target: str, dump, binary: bool = True, prefix: str = ".tmp_step_", suffix: str = ".pt") -> str:
    """``dump(file)`` into a temporary file beside ``target`` (create_temporary), flushed to disk,
    then renamed over ``target``: a reader sees the old file or the whole new one, never a part.
    The temporary file is removed if anything fails."""
    fd, tmp = create_temporary(os.path.dirname(target) or ".", prefix, suffix)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            dump(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


ABANDONED = "abandoned"


def _free_name(dest_dir: str, base: str) -> str:
    """``dest_dir/base``, or ``stem.K.ext`` (K = 1, 2, ...) where that exists."""
    stem, ext = os.path.splitext(base)
    dest, k = os.path.join(dest_dir, base), 1
    while os.path.lexists(dest):
        dest = os.path.join(dest_dir, f"{stem}.{k}{ext}")
        k += 1
    return dest


def _step_of_best(run_dir: str) -> int | None:
    import json

    try:
        with open(os.path.join(run_dir, "best.json")) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def set_aside_newer(folder: str, step: int, log_dir: str | None = None) -> list[str]:
    """Move checkpoints of steps after ``step`` to ``folder/abandoned/`` (never deleted: they may
    be what the user wanted after all). Returns their new paths.

    With ``log_dir`` (the trainer resuming from an older checkpoint of the folder: the newer ones
    are a branch it abandons) the branch's other files go with them: its sample grids after
    ``step`` (to ``abandoned/samples/``), ``best.pt``/``best.json`` when the best is after ``step``
    (the resumed state carries its own best so far), and a copy of the loss and evaluation logs as
    they were (the trainer then drops their rows after ``step``, which the new branch logs again)."""
    moved = []
    dest_dir = os.path.join(folder, ABANDONED)
    for s, path in list_checkpoints(folder):
        if s <= step:
            continue
        os.makedirs(dest_dir, exist_ok=True)
        dest = _free_name(dest_dir, os.path.basename(path))
        os.replace(path, dest)
        moved.append(dest)
    if moved and log_dir is not None:
        samples = os.path.join(log_dir, "samples")
        for name in sorted(os.listdir(samples)) if os.path.isdir(samples) else ():
            m = _SAMPLE.match(name)
            if m and int(m.group(1)) > step:
                os.makedirs(os.path.join(dest_dir, "samples"), exist_ok=True)
                os.replace(os.path.join(samples, name), _free_name(os.path.join(dest_dir, "samples"), name))
        best_step = _step_of_best(folder)
        if best_step is not None and best_step > step:
            best_dest = None
            for name in ("best.pt", "best.json"):
                if os.path.exists(os.path.join(folder, name)):
                    dest = _free_name(dest_dir, name)
                    os.replace(os.path.join(folder, name), dest)
                    if name == "best.pt":
                        best_dest = dest
                    elif best_dest is not None:  # (best.pt may have been renamed best.K.pt there)
                        _repoint_best_json(dest, folder, dest_dir, best_dest)
        for name in ("loss_log.csv", "eval_log.csv"):
            if os.path.isfile(os.path.join(log_dir, name)):
                shutil.copy2(os.path.join(log_dir, name), _free_name(dest_dir, name))
    if moved:
        print(f"ganengine: {len(moved)} checkpoint(s) in {folder!r} are newer than step {step}, where this run "
              f"continues from an older checkpoint of the folder; moved to {dest_dir}"
              + (" with that branch's sample grids, best checkpoint and a copy of its logs" if log_dir else "")
              + " (nothing was deleted)", file=sys.stderr)
    return moved


PREVIOUS = "previous"
_RUN_FILES = ("best.pt", "best.json", ABANDONED)                          # besides step_*.pt
_LOG_FILES = ("loss_log.csv", "eval_log.csv", "samples", "tensorboard")


def _earlier_run_items(run_dir: str, log_dir: str) -> list[str]:
    """What an earlier run left in the run and log folders (the order they are moved in); empty
    when it left nothing worth keeping: no checkpoint, no loss or evaluation log, no sample grid
    (a TensorBoard folder alone, from a trainer closed before its first step, does not count)."""
    ckpts = [p for _, p in list_checkpoints(run_dir)]
    run_items = [os.path.join(run_dir, n) for n in _RUN_FILES if os.path.lexists(os.path.join(run_dir, n))]
    log_items = [os.path.join(log_dir, n) for n in _LOG_FILES if os.path.lexists(os.path.join(log_dir, n))]
    samples = os.path.join(log_dir, "samples")
    worth = ckpts or [p for p in run_items if not p.endswith(os.sep + ABANDONED)] or any(
        os.path.basename(p) in ("loss_log.csv", "eval_log.csv") for p in log_items) or (
        os.path.isdir(samples) and os.listdir(samples)) or os.path.isdir(os.path.join(run_dir, ABANDONED))
    return ckpts + run_items + log_items if worth else []


def _repoint_best_json(path: str, run_dir: str, dest_run: str, moved_to: str | None = None) -> None:
    """best.json names its best.pt: after both moved, name the moved one (``moved_to``: its new
    path where it was renamed; an unreadable file is left as it is: it only describes the
    checkpoint beside it)."""
    import json

    try:
        with open(path) as f:
            info = json.load(f)
        old = info.get("checkpoint")
        if not (isinstance(old, str) and os.path.dirname(os.path.abspath(old)) == os.path.abspath(run_dir)):
            return
        info["checkpoint"] = moved_to or os.path.join(dest_run, os.path.basename(old))
    except (OSError, ValueError, AttributeError):
        return
    write_atomic(path, lambda f: json.dump(info, f, indent=2), binary=False, prefix=".tmp_", suffix=".json")


def set_aside_previous_run(run_dir: str, log_dir: str | None = None) -> str | None:
    """Move an earlier run's files out of the way of a run that does not continue it (a fresh
    run, or one resumed from a checkpoint of another folder): its checkpoints, best.pt/json,
    abandoned/, loss and evaluation logs, sample grids and TensorBoard logs go to
    ``RUN_DIR/previous/K/`` (the log files to ``LOG_DIR/previous/K/``), K = 1, 2, ... Nothing is
    deleted, and neither ``--resume`` nor the checkpoint pruning sees them there. Returns a
    one-line note saying what was moved where (None when the folders held no earlier run)."""
    log_dir = log_dir or run_dir
    items = _earlier_run_items(run_dir, log_dir)
    if not items:
        return None
    taken = set()
    for folder in {run_dir, log_dir}:
        prev = os.path.join(folder, PREVIOUS)
        if os.path.isdir(prev):
            taken |= {int(n) for n in os.listdir(prev) if n.isdigit()}
    k = max(taken, default=0) + 1
    steps = [s for s, _ in list_checkpoints(run_dir)]
    dest_run = os.path.join(run_dir, PREVIOUS, str(k))
    moved_to = []
    for path in items:
        folder = os.path.dirname(path)
        dest_dir = dest_run if os.path.samefile(folder, run_dir) else os.path.join(log_dir, PREVIOUS, str(k))
        os.makedirs(dest_dir, exist_ok=True)
        dest = os.path.join(dest_dir, os.path.basename(path))
        os.replace(path, dest)
        if os.path.basename(dest) == "best.json":
            _repoint_best_json(dest, run_dir, dest_run)
        if dest_dir not in moved_to:
            moved_to.append(dest_dir)
    what = (f"checkpoints up to step {steps[-1]}" if steps else "no checkpoint") + ", " + ", ".join(
        n for n in ("best.pt",) + _LOG_FILES if any(os.path.basename(p) == n for p in items))
    return (f"{run_dir!r} held an earlier run's files ({what.rstrip(', ')}); this run does not continue it, so "
            f"they were moved to {' and '.join(repr(d) for d in moved_to)} (nothing was deleted). To continue "
            f"that run instead, stop this one and pass --resume {dest_run}; to keep runs apart, give each "
            "its own --name.")


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


def missing_folders(folder: str) -> list[str]:
    """``folder`` and its ancestors that do not exist yet, innermost first (what makedirs makes;
    what a refused run removes again: RunLock, ``ganengine translate``)."""
    out, f = [], os.path.abspath(folder)
    while not os.path.exists(f):
        out.append(f)
        parent = os.path.dirname(f)
        if parent == f:
            break
        f = parent
    return out


class RunLock:
    """An exclusive lock on a run folder for one trainer (``folder/.lock``, flock). A second
    trainer on the same folder gets a CheckpointError naming the holder's pid."""

    def __init__(self, folder: str, option: str = "--checkpoints_dir / --name"):
        self.folder, self.fd, self.option = folder, None, option  # (the option naming the folder)
        self.made = []  # the folders acquire() made, innermost first (the folder, then e.g. --checkpoints_dir):
        # release() removes them again while the lock file is all they hold

    def acquire(self) -> "RunLock":
        if fcntl is None or self.fd is not None:
            return self
        path = os.path.join(self.folder, ".lock")
        for _ in range(100):
            try:
                self.made = missing_folders(self.folder)
                os.makedirs(self.folder, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # (the folder went between makedirs and open: a refused run's cleanup)
                continue
            except OSError as exc:
                raise CheckpointError(f"cannot use {self._what()} {self.folder!r} ({exc.strerror or exc}). Check that "
                                      f"it is writable, or pick another {self.option}.") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise CheckpointError(f"{self._what()} {self.folder!r} is in use by another ganengine train (pid "
                                      f"{holder}): two runs would overwrite each other's files. Use another "
                                      f"{self.option.split(' / ')[-1]}, or wait for / stop that run.") from None
            # the lock is the file now at `path`: one a refused run removed (release) after this
            # process opened it locks nothing, so take the lock again on the new one
            try:
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        else:
            raise CheckpointError(f"cannot lock {self._what()} {self.folder!r}: its .lock file keeps being removed "
                                  f"(another process?); pick another {self.option}.")
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        remove_stale_temporaries(self.folder)
        return self

    def _what(self) -> str:
        return "run folder" if self.option.startswith("--checkpoints_dir") else f"{self.option} folder"

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.ftruncate(fd, 0)
                if self.made and os.listdir(self.folder) == [".lock"]:
                    # a run refused before it wrote anything leaves no folder behind (still holding the
                    # lock), nor the empty parents it made (a fresh --checkpoints_dir)
                    os.unlink(os.path.join(self.folder, ".lock"))
                    for folder in self.made:
                        os.rmdir(folder)  # (OSError once one is not empty: the rest stay)
            except OSError:
                pass
            os.close(fd)  # (closing releases the flock)

    def __del__(self):
        self.release()


_ZIP_SIGNATURE = b"PK\x03\x04"


def _file_head(path: str, n: int = 24) -> bytes | None:
    """The first ``n`` bytes of ``path``; None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return None


def _torch_save_head(head: bytes) -> bool:
    """Whether a file opening with ``head`` is in a format torch.save writes: a zip archive (also
    one cut short: the signature) or a legacy pickle (the pickle protocol byte 0x80)."""
    return head.startswith(_ZIP_SIGNATURE) or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _load_error(path: str, exc: Exception) -> str:
    """The message for a checkpoint torch.load refused: a file that is no torch.save output at all
    is said to be that (not torch's advice to retry with weights_only=False, which is wrong for it
    and unsafe for an untrusted pickle); otherwise the first line of torch's reason, without it."""
    expected = ("expected a ganengine training checkpoint (a step_*.pt / latest.pt file written by "
                "`ganengine train`, or its run folder)")
    head = _file_head(path)
    if head is not None and not _torch_save_head(head):
        what = f"it starts with {head!r}" if head else "it is empty"
        return (f"{path!r} is not a checkpoint: it is neither a zip archive nor a pickle as torch.save writes "
                f"({what}); {expected}")
    reason = str(exc)
    if "weights_only" in reason and "WeightsUnpickler error:" in reason:
        # keep torch's reason (which object was refused), leave out its advice to load unsafely
        detail = reason.split("WeightsUnpickler error:", 1)[1].strip().splitlines()
        reason = "the weights-only loader refused it: " + (detail[0].strip() if detail else "unsupported content")
    else:
        reason = reason.strip().splitlines()[0] if reason.strip() else ""
        import zipfile

        if head is not None and head.startswith(_ZIP_SIGNATURE) and not zipfile.is_zipfile(path):  # (no central directory)
            return (f"checkpoint {path!r} is truncated or damaged (a zip archive as torch.save writes, "
                    f"cut short or corrupted: {type(exc).__name__}: {reason}); {expected}, whole")
    return (f"cannot load checkpoint {path!r} with weights_only=True ({type(exc).__name__}: {reason}); "
            f"{expected}")


def load(path: str, map_location="cpu") -> dict:
    path = resolve(path)
    bad = damaged_record(path)   # (torch.load reads the payload without checking its CRC-32)
    if bad is not None:
        raise CheckpointError(damaged_message(path, bad))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(_load_error(path, exc)) from exc
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
