"""Training checkpoints (format in docs/INTERFACES.md), written atomically, loaded weights_only.

``save`` writes ``DIR/step_00000300.pt`` through a temporary file in the same folder and
``os.replace`` (atomic on POSIX and Windows), so a crash never leaves a half-written checkpoint
behind, then deletes all but the newest ``keep`` checkpoints. Everything inside is tensors and
plain Python types, so ``torch.load(path, weights_only=True)`` reads it: no pickled code runs
when a checkpoint is loaded.
"""
from __future__ import annotations

import os
import re
import tempfile

import torch

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
