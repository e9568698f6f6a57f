"""The training loop: one code path for one process or many (torchrun), eager or AMP.

Order of one step: ``model.train_step`` (all networks, all losses, optimiser steps), then logs,
then the sample grid (under ``fork_rng``, so sampling never changes the training's random
numbers), then the checkpoint. Schedulers step once per step (they encode the reference's per-epoch
schedule through ``steps_per_epoch``).
Non-finite losses are detected without a device sync per step (a flag accumulates on the
device and is read at each log / sample / checkpoint point), so a NaN is always found before a
checkpoint could be written from bad weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field

import torch

from ganengine._state import restored, running_state
from ganengine.data import build_dataset, make_loader
from ganengine.data.sampler import mix
from ganengine.train import checkpoint as ckpt
from ganengine.train import distributed as D
from ganengine.train import rng
from ganengine.train.context import AmpContext
from ganengine.train.logger import TrainLogger
from ganengine.train.visuals import row_labels
from ganengine.train.visuals import rows as visual_rows


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainConfig:
    model: str
    model_options: dict = field(default_factory=dict)   # -> build_model(model, **model_options)
    data_options: dict = field(default_factory=dict)    # -> ganengine.data.build_dataset
    run_dir: str = "checkpoints/run"                    # checkpoints go here
    log_dir: str | None = None                          # logs, samples (default: run_dir)
    batch_size: int = 1                                 # per process
    n_epochs: int = 100
    n_epochs_decay: int = 100
    max_steps: int | None = None
    amp: str = "off"
    channels_last: bool = False
    compile: bool | str = False                         # True / a torch.compile mode
    seed: int | None = None                             # None: 0, or on --resume the run's own
    deterministic: bool = False
    resume: str | None = None                           # a checkpoint, a run folder, or "latest"
    sample_every: int = 100
    save_every: int = 500
    print_freq: int = 10
    keep_checkpoints: int = 3
    num_workers: int | None = None
    device: str = "auto"
    sync_bn: bool = False
    backend: str | None = None
    tensorboard: str = "auto"
    num_samples: int = 4
    progress: bool = True
    eval_every: int = 0                                 # synthesis models: metrics every N steps, best.pt
    eval_options: dict = field(default_factory=dict)    # -> ganengine.train.evaluation


def _configure_determinism(cfg: TrainConfig, device: torch.device) -> None:
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def _to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if channels_last and v.dim() == 4:
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def _unwrap(net: torch.nn.Module) -> torch.nn.Module:
    net = getattr(net, "_orig_mod", net)  # torch.compile
    return getattr(net, "module", net)    # DDP


_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _compile_mode(mode, device: torch.device) -> str | None:
    """torch.compile's mode for ``--compile [MODE]`` (True means the default mode)."""
    mode = "default" if mode is True else mode
    if mode not in _COMPILE_MODES:
        raise ValueError(f"--compile: mode must be one of {_COMPILE_MODES}, got {mode!r}")
    if mode == "reduce-overhead" and device.type != "cuda":
        raise ValueError(f"--compile reduce-overhead / --cuda_graphs replays CUDA graphs and needs a CUDA device; "
                         f"training runs on {device.type}: use --compile (default mode) there")
    return None if mode == "default" else mode


_SHAPE_ERRORS = ("Sizes of tensors must match", "Kernel size can't be greater", "Calculated padded input size",
                 "Output size is too small", "shapes cannot be multiplied", "must match the size of tensor",
                 "Padding size should be less than", "input image is smaller than kernel",
                 "is smaller than the",  # (ganengine's own conv checks)
                 "; they must match")    # (ganengine's losses: CycleGAN's reconstruction vs its input)
# a norm layer in training mode on a map the networks reduced to one value per channel
_ONE_VALUE = {"Expected more than 1 value per channel": "a batch norm got one value per channel (a 1x1 map of "
                                                        "one image)",
              "Expected more than 1 spatial element": "an instance norm got a 1x1 map (one value per channel)",
              "needs more than 1 spatial element": "an instance norm got a 1x1 map (one value per channel)"}


def _size(shape) -> str:
    return "x".join(map(str, shape[-2:])) if shape is not None else "these"


def _explain(exc: BaseException, new_size: bool, shape, where: str = "") -> BaseException:
    """A clear ValueError for the runtime errors bad data settings cause, else ``exc`` itself:
    images of several sizes in one batch (collate), and a network that cannot take the input size,
    where the failing input's size is a new one (``new_size``: the first step, or a size no earlier
    step of the run had, e.g. one tall photo with --preprocess scale_width; a size that already
    trained is not the cause). ``shape``: the failing input's; ``where``: its images, when known
    (said after the size). A DataError from a DataLoader worker comes back wrapped in the worker's
    traceback text: its last line is the message."""
    msg = str(exc)
    if "Original Traceback" in msg:
        last = [ln for ln in msg.splitlines() if ln.strip()][-1]
        name, _, text = last.partition(": ")
        if name.endswith("DataError") and text:
            from ganengine.data import DataError

            return DataError(text)
    if "stack expects each tensor to be equal size" in msg:
        return ValueError("a batch holds images of different sizes (--preprocess none and scale_width keep each "
                          "image's own size): resize the images to one size, use --batch_size 1, or a --preprocess "
                          "that crops to --crop_size")
    if not new_size or type(exc) not in (RuntimeError, ValueError):
        return exc
    line = " ".join(msg.split())[:200]
    one = next((what for key, what in _ONE_VALUE.items() if key in msg), None)
    if one is not None:
        # (typically a U-Net given a crop below 2^num_downs at the reference's batch 1)
        batch = f" at --batch_size {shape[0]}" if shape is not None else ""
        more = " or a larger --batch_size" if "batch norm" in one else ""
        return ValueError(f"the networks cannot take {_size(shape)} inputs{batch}{where}: {one}. Pick a size they can "
                          "(--crop_size, --load_size, --preprocess, --image_size; a U-Net needs a multiple of "
                          f"2^num_downs){more} ({line})")
    if any(p in msg for p in _SHAPE_ERRORS):
        return ValueError(f"the networks cannot take {_size(shape)} inputs{where}: pick a size they can (--crop_size, "
                          "--load_size, --preprocess, --image_size; a U-Net needs a multiple of 2^num_downs; a ResNet "
                          f"generator gives back its input's size only for multiples of 4) ({line})")
    return exc


def _same_size(items: list[dict]) -> list[dict]:
    """The sample grid's items whose images have the most common sizes (the first such item's on a
    tie): --preprocess none and scale_width keep each image's own size, and the grid's rows are one
    batch, which a run at --batch_size 1 (the reference's) must not be refused for."""
    def sizes(item: dict) -> tuple:
        return tuple(sorted((k, tuple(v.shape)) for k, v in item.items() if torch.is_tensor(v) and v.dim() == 3))

    keys = [sizes(it) for it in items]
    common = max(keys, key=keys.count)   # (max keeps the first of equal counts)
    return [it for it, k in zip(items, keys) if k == common]


def _input_shapes(batch: dict | None) -> dict:
    """The shapes of a batch's images (its 4-d tensors), by key."""
    return {k: tuple(v.shape) for k, v in (batch or {}).items() if torch.is_tensor(v) and v.dim() == 4}


def _failing_input(batch: dict | None, shapes: dict, trained_sizes: set) -> tuple:
    """(shape, whether its size is new, where) of the input a size error is about: the first of a
    size no step trained on (else the first), and its image files when the batch names them."""
    new = [k for k, sh in shapes.items() if sh[-2:] not in trained_sizes]
    key = (new or list(shapes) or [None])[0]
    if key is None:
        return None, False, ""
    paths = (batch or {}).get(f"{key}_paths")
    paths = [paths] if isinstance(paths, str) else list(paths or [])
    where = ""
    if new and paths:
        shown = ", ".join(repr(str(p)) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
        where = f" ({key}: {shown}, where the steps before had other sizes)"
    return shapes[key], bool(new), where


class Terminated(KeyboardInterrupt):
    """SIGTERM (what batch schedulers send before killing a job) during ``train()``: handled as
    Ctrl-C, so the work done so far is saved."""


def _interrupt(signum) -> KeyboardInterrupt:
    return Terminated(f"signal {signum}") if signum == signal.SIGTERM else KeyboardInterrupt()


def _changed(old: dict, new: dict) -> list[tuple]:
    """(key, old value, new value) for the keys whose values differ, sorted."""
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _same_folder(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # (one does not exist yet)
        return os.path.abspath(a) == os.path.abspath(b)


def _check_config(cfg: TrainConfig) -> None:
    """Numbers the loop divides by or counts with: one clear line instead of a ZeroDivisionError
    (or a silent no-op) deep in the sampler."""
    for name in ("batch_size", "print_freq"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"--{name} must be a whole number >= 1, got {v!r}")
    for name in ("n_epochs", "n_epochs_decay", "num_workers"):
        v = getattr(cfg, name)
        if v is None and name == "num_workers":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"--{name} must be a whole number >= 0, got {v!r}")
    if cfg.max_steps is not None and (not isinstance(cfg.max_steps, int) or cfg.max_steps < 1):
        raise ValueError(f"--max_steps must be a whole number >= 1, got {cfg.max_steps!r}")


def _say_unserved_backend(name: str, device: torch.device, main: bool) -> None:
    """--backend NAME that cannot serve this run's device: the fused ops fall back to torch
    (an error under GANENGINE_STRICT=1, at the first op); say so once, at the start, rather
    than train and time another backend without a word."""
    from ganengine import backends

    name = name.strip().lower()
    if name in ("auto", "torch") or backends.serves(name, device) or not main:
        return
    why = backends.status().get(name, "unavailable").removeprefix("unavailable: ")
    then = ("GANENGINE_STRICT=1 is set: the first fused op will raise" if backends.is_strict()
            else "the fused ops fall back to the torch backend")
    print(f"ganengine: --backend {name} cannot serve {device.type} tensors here ({why}); {then}", file=sys.stderr)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self._locks = []
        try:
            self._init(cfg)
        except BaseException as exc:
            self._release_lock()
            clear = _explain(exc, False, None)  # (the sample batch is collated here)
            if clear is exc:
                raise
            raise clear from exc

    def _release_lock(self) -> None:
        while self._locks:
            self._locks.pop().release()

    def _init(self, cfg: TrainConfig) -> None:
        from ganengine.models import build_model

        _check_config(cfg)
        self.dist = D.setup(cfg.device)
        self.device = self.dist.device
        self.log_dir = cfg.log_dir or cfg.run_dir
        if cfg.backend:
            import ganengine

            ganengine.use_backend(cfg.backend)
            _say_unserved_backend(cfg.backend, self.device, self.dist.is_main)
        _configure_determinism(cfg, self.device)

        # data first: a bad dataset is reported before any model is built
        self.dataset = build_dataset(cfg.model, cfg.data_options)
        # --serial_batches: the data in file order, as the reference's DataLoader(shuffle=not serial_batches)
        serial = bool((cfg.data_options or {}).get("serial_batches", False))
        # the run's seed: --seed, or 0; a resumed run keeps its own (_restore) when --seed is not given
        self.seed = 0 if cfg.seed is None else cfg.seed
        self.loader, self.sampler = make_loader(self.dataset, cfg.batch_size, self.device, self.seed, self.dist.rank,
                                                self.dist.world_size, cfg.num_workers, shuffle=not serial)
        self.steps_per_epoch = self.sampler.batches_per_epoch
        # the reference (junyanz train.py) trains epochs epoch_count .. n_epochs + n_epochs_decay:
        # --epoch_count N (pix2pix, CycleGAN, CSGAN) shortens the run by N - 1 epochs, as it shifts
        # the linear schedule (models/base.py); --max_steps overrides either
        epoch_count = (cfg.model_options or {}).get("epoch_count", 1)
        if isinstance(epoch_count, bool) or not isinstance(epoch_count, int) or epoch_count < 1:
            epoch_count = 1  # (the model refuses it when it is built)
        epochs = cfg.n_epochs + cfg.n_epochs_decay - epoch_count + 1
        self._epochs = epochs
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else epochs * self.steps_per_epoch
        if self.total_steps <= 0 or (epochs <= 0 and epoch_count > 1):  # (--max_steps would train at rate 0)
            if epoch_count > 1:
                raise ValueError(f"nothing to train: --epoch_count {epoch_count} is past the last epoch of the schedule "
                                 f"(--n_epochs {cfg.n_epochs} + --n_epochs_decay {cfg.n_epochs_decay} = "
                                 f"{cfg.n_epochs + cfg.n_epochs_decay}); the reference trains epochs epoch_count .. "
                                 "n_epochs + n_epochs_decay")
            raise ValueError(f"nothing to train: --max_steps / --n_epochs + --n_epochs_decay give {self.total_steps} steps")

        if self.dist.is_main:  # one trainer per run folder (before reading a checkpoint from it)
            self._locks.append(ckpt.RunLock(cfg.run_dir).acquire())
            if not _same_folder(self.log_dir, cfg.run_dir):  # and per log folder: a fresh run moves
                # the earlier run's logs aside, which must not happen under another live writer
                self._locks.append(ckpt.RunLock(self.log_dir, option="--log_dir").acquire())

        rng.seed_all(self.seed)  # identical initial weights on every rank
        self.model = build_model(cfg.model, **cfg.model_options).to(self.device)
        self.model.check_batch_size(cfg.batch_size)  # (before the run folder is touched)
        if cfg.compile and self.model.double_backward:
            flag = "--cuda_graphs / --compile reduce-overhead" if cfg.compile == "reduce-overhead" else "--compile"
            raise ValueError(f"{flag}: {cfg.model} {self.model.double_backward}, a double backward, "
                             f"which torch.compile's AOTAutograd cannot differentiate; train it without {flag}")
        if cfg.sample_every > 0 and hasattr(self.model, "check_sample_count"):  # (the grids: num_samples per call)
            self.model.check_sample_count(cfg.num_samples, "--num_samples (images per sample grid row)")
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.networks = {n: getattr(self.model, n) for n in self.model.network_names}  # unwrapped, for checkpoints
        self.optimizers = self.model.make_optimizers()
        self.schedulers = self.model.make_schedulers(self.optimizers, cfg.n_epochs, cfg.n_epochs_decay,
                                                     self.steps_per_epoch, max_steps=cfg.max_steps) or {}
        self.ctx = AmpContext(cfg.amp, self.device, list(self.optimizers))
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best, self.evaluator = None, None  # best evaluation so far: {"metric", "value", "step"}
        if cfg.eval_every > 0:
            from ganengine.train.evaluation import SynthesisEvaluator, check_options

            check_options(cfg.eval_options)  # on every rank: bad options stop all of them
            if self.dist.is_main:
                self.evaluator = SynthesisEvaluator(cfg.eval_options, self.model, cfg.model, cfg.data_options,
                                                    self.device, self.log_dir)
                self._seed_evaluator()

        self._sums: dict[str, tuple] = {}  # the losses since the last log row (restored on resume)
        resume_state = None
        if cfg.resume:
            path = ckpt.latest(cfg.run_dir) if cfg.resume == "latest" else ckpt.resolve(cfg.resume)
            if path is None:
                raise ckpt.CheckpointError(f"--resume: no checkpoint in {cfg.run_dir!r} to resume from "
                                           "(run without --resume to start training)")
            resume_state = self._load(path)
            self.resume_path = path
        else:
            seed = mix(self.seed, self.dist.rank, 1)
            rng.seed_all(seed)  # per-rank noise / dropout / pool draws
            if self.dist.world_size > 1:  # (the models' own generators too, e.g. CycleGAN's image pools)
                self.model.reseed(seed)
        continues = resume_state is not None and self._continues_folder(self.resume_path)

        for name, net in self.networks.items():  # DDP (and compile) wrappers for the step function
            wrapped = D.wrap(net, self.dist, cfg.sync_bn)
            if cfg.compile:
                wrapped = torch.compile(wrapped, mode=_compile_mode(cfg.compile, self.device))
            if wrapped is not net:
                setattr(self.model, name, wrapped)
        if cfg.sync_bn and self.dist.enabled:  # convert_sync_batchnorm may return new modules
            self.networks = {n: _unwrap(getattr(self.model, n)) for n in self.model.network_names}
        if resume_state is not None:
            rng.set_state(resume_state)

        self.sample_batch = self._sample_batch()  # (after the RNG state: as before the files below)

        self.logger = None
        # a resume already at its last step trains nothing: the folder and the checkpoint stay as they
        # are (no set-aside, no save of the converted position under the resumed step's name)
        self.nothing_to_train = resume_state is not None and self.step >= self.total_steps
        if self.dist.is_main and not self.nothing_to_train:
            if not continues:
                # an earlier run in the folder that this run does not continue: keep its files (moved
                # to RUN_DIR/previous/K/) rather than overwrite its checkpoints and delete its logs;
                # the last thing before this run writes its own files, so that a failure while the
                # trainer is built leaves the folder as it was
                note = ckpt.set_aside_previous_run(cfg.run_dir, self.log_dir)
                if note:
                    print(f"ganengine: {note}", file=sys.stderr)
            else:
                # resumed from an older checkpoint of the folder: its newer checkpoints belong to the
                # branch this run abandons, set aside now (the first save would overwrite one, and until
                # then a plain --resume would pick them as the newest)
                ckpt.set_aside_newer(cfg.run_dir, self.step, self.log_dir)
            self.logger = TrainLogger(self.log_dir, cfg.tensorboard, self.step if cfg.resume else None)
            if self.evaluator is not None:
                self.evaluator.start_log(self.step if cfg.resume else None)
        self._bad = torch.zeros((), dtype=torch.bool, device=self.device)
        self._bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.interrupted_checkpoint = None

    # ---------------------------------------------------------------- checkpoints
    def _continues_folder(self, resume_path) -> bool:
        """Whether this run continues the run folder's own run: resumed from a checkpoint in the
        folder (or in its abandoned/, an older branch of the same run)."""
        if not resume_path:
            return False
        where = os.path.realpath(os.path.dirname(os.path.abspath(resume_path)))
        run_dir = os.path.realpath(self.cfg.run_dir)
        return where in (run_dir, os.path.join(run_dir, ckpt.ABANDONED))

    def _state(self) -> dict:
        rngs = D.gather_objects(rng.get_state(), self.dist)
        extra = D.gather_objects(self.model.extra_state(), self.dist)
        return {
            "format": ckpt.FORMAT, "version": ckpt.VERSION, "model": self.cfg.model,
            "options": json.loads(json.dumps(self.model.options)),
            "data": json.loads(json.dumps(self.cfg.data_options)),  # for translate / sample
            "networks": {n: net.state_dict() for n, net in self.networks.items()},
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
            "scalers": self.ctx.state_dict(),
            "extra": extra[0],
            # (each process's own: CycleGAN's image pools hold that process's images and draws)
            **({"extra_per_rank": extra} if self.dist.world_size > 1 else {}),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.dist.world_size, "batch_size": self.cfg.batch_size, "seed": self.seed,
            # the epoch's length: a resume on a dataset that gained or lost images converts the position
            # and the epoch schedules (_convert_position), as for another --batch_size
            "dataset_size": self.sampler.n, "steps_per_epoch": self.steps_per_epoch,
            "schedule": self._schedule_options(),
            "rng": {"per_rank": rngs},
            "evaluation": dict(self.best) if self.best else {},
            # the losses summed since the last log row: a resumed run's first row averages the
            # same steps as the uninterrupted run's (a stop between rows, e.g. Ctrl-C, is common)
            "loss_sums": {k: [float(total), n] for k, (total, n) in self._sums.items()},
        }

    def save(self) -> str | None:
        state = self._state()  # collective (RNG gather): every rank takes part
        path = None
        if self.dist.is_main:
            path = ckpt.save(state, self.cfg.run_dir, self.step, self.cfg.keep_checkpoints)
        D.barrier(self.dist)
        return path

    def _load(self, path: str) -> dict:
        state = ckpt.load(path, map_location=self.device)
        try:
            return self._restore(path, state)
        except ckpt.CheckpointError:
            raise
        except (KeyError, IndexError, TypeError, AttributeError, RuntimeError, ValueError) as exc:
            # a hand-edited or damaged checkpoint: say which field, not a traceback from deep inside
            detail = " ".join(str(exc).split())  # one line (load_state_dict's message spans several)
            detail = detail if len(detail) <= 300 else detail[:297] + "..."
            what = f"field {exc.args[0]!r} is missing" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {detail}"
            raise ckpt.CheckpointError(f"--resume {path!r} cannot be restored ({what}). It was edited or damaged: "
                                       "resume from another checkpoint of the run.") from exc

    def _restore(self, path: str, state: dict) -> dict:
        if state["model"] != self.cfg.model:
            raise ckpt.CheckpointError(f"--resume {path!r} holds a {state['model']} checkpoint, not {self.cfg.model}")
        now = json.loads(json.dumps(self.model.options))
        # an option the checkpoint does not name is one added since it was written: the run had its
        # default's behaviour (e.g. --lr_policy linear), so the default is no difference
        defaults = json.loads(json.dumps(getattr(self.model, "DEFAULTS", {})))
        diff = {k: (state["options"].get(k), now.get(k)) for k in set(now) | set(state["options"])
                if state["options"].get(k) != now.get(k)
                and not (k not in state["options"] and k in defaults and now.get(k) == defaults[k])}
        if diff and hasattr(self.model, "resume_differences"):  # (what the model knows to be none)
            diff = self.model.resume_differences(diff)
        if diff:
            listed = ", ".join(f"--{k} {old!r} (now {new!r})" for k, (old, new) in sorted(diff.items()))
            raise ckpt.CheckpointError(f"--resume {path!r} was trained with different model options: {listed}. "
                                       "Resume with the options the run was started with.")
        self._adopt_seed(path, state.get("seed"))
        for name, net in self.networks.items():
            net.load_state_dict(state["networks"][name])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, sch in self.schedulers.items():
            if name in state["schedulers"]:
                sch.load_state_dict(state["schedulers"][name])
        self.ctx.load_state_dict(state.get("scalers", {}))
        per_rank_extra = state.get("extra_per_rank")
        if per_rank_extra is not None and len(per_rank_extra) == self.dist.world_size:
            self.model.load_extra_state(per_rank_extra[self.dist.rank])
        else:
            self.model.load_extra_state(state.get("extra", {}))
            if self.dist.world_size > 1:  # (rank 0's pools on every process: their draws per process again)
                self.model.reseed(mix(self.seed, self.dist.rank, state["step"]))
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state.get("batch_in_epoch", 0)
        self._convert_position(state)
        if self.dist.is_main:
            # (the run continues with the options given now: a default that changed between
            # versions, e.g. the synthesis models' flips, shows here)
            old_data = dict(state.get("data") or {})
            if old_data.get("dataroot"):  # (recorded as typed before: taken as relative to this run's folder)
                old_data["dataroot"] = os.path.abspath(old_data["dataroot"])
            changed = _changed(old_data, json.loads(json.dumps(self.cfg.data_options or {})))
            if changed:
                print("ganengine: resuming with data options that differ from the run's: " + ", ".join(
                    f"{k} {old!r} (now {new!r})" for k, old, new in changed), file=sys.stderr)
            old_schedule, now_schedule = dict(state.get("schedule") or {}), self._schedule_options()
            old_timing, now_timing = old_schedule.pop("lr_timing", None), now_schedule.pop("lr_timing", None)
            reads = self._schedule_reads()
            changed = [c for c in _changed(old_schedule, now_schedule) if c[0] in reads] if "schedule" in state else []
            if changed:
                print("ganengine: resuming with " + ", ".join(f"--{k} {old} (now {new})" for k, old, new in changed)
                      + f": the learning-rate schedules follow the new values from step {self.step} on (a rate may "
                      "rise again); resume with the old values to keep the run's schedule", file=sys.stderr)
            if now_timing is not None and old_timing != now_timing:
                print("ganengine: this checkpoint was written before the --lr_policy schedules followed the "
                      "reference's timing (junyanz train.py steps them at the beginning of each epoch): from step "
                      f"{self.step} on the rates follow it, one epoch ahead of the run's so far", file=sys.stderr)
        self.best = dict(state.get("evaluation") or {}) or None
        # (float + an fp32 loss tensor stays fp32: the sums continue bit for bit)
        self._sums = {k: (float(total), int(n)) for k, (total, n) in (state.get("loss_sums") or {}).items()}
        per_rank = state["rng"]["per_rank"]
        if len(per_rank) == self.dist.world_size:
            return per_rank[self.dist.rank]
        if self.dist.is_main:
            print(f"ganengine: resuming a {len(per_rank)}-process checkpoint on {self.dist.world_size} processes: "
                  "random streams restart (the run is not bit-exact)", file=sys.stderr)
        rng.seed_all(mix(self.seed, self.dist.rank, self.step))
        return rng.get_state()

    def _adopt_seed(self, path: str, stored) -> None:
        """The data order, each image's augmentation and the evaluation's latents follow the run's
        seed: a resume without --seed keeps the checkpoint's, and another --seed is refused (the
        saved position in the epoch refers to the old order: images would be fed twice or never)."""
        if stored is None or stored == self.seed:
            return
        if self.cfg.seed is not None:
            raise ckpt.CheckpointError(f"--resume {path!r} was trained with --seed {stored}, which orders its data and "
                                       f"augmentations; resume with --seed {stored} or without --seed, not "
                                       f"--seed {self.cfg.seed}")
        self.seed = stored
        self.sampler.seed = stored
        self.loader.generator.manual_seed(stored)
        self._seed_evaluator()

    def _seed_evaluator(self) -> None:
        """The evaluation's latents follow the run's seed, unless its options name their own."""
        if self.evaluator is not None and (self.cfg.eval_options or {}).get("seed") is None:
            self.evaluator.o["seed"] = self.seed

    def _schedule_options(self) -> dict:
        """The engine options the learning-rate schedules are built from (models/base.py), and for
        the models with the junyanz --lr_policy schedules their timing (schedulers stepped at the
        beginning of each epoch, as the reference's train.py; checkpoints from before say nothing)."""
        out = {"n_epochs": self.cfg.n_epochs, "n_epochs_decay": self.cfg.n_epochs_decay, "max_steps": self.cfg.max_steps}
        if getattr(self.model, "lr_at_epoch_begin", False):
            out["lr_timing"] = "epoch_begin"
        return out

    def _schedule_reads(self) -> set:
        """The options of _schedule_options that this run's schedules depend on (a change of the
        others on resume changes no rate): none without schedules; --max_steps only for the
        schedules over the run's length (StarGAN's iteration decay)."""
        if not self.schedulers:
            return set()
        reads = {"n_epochs", "n_epochs_decay"}
        if getattr(self.model, "schedule_reads_max_steps", False):
            reads.add("max_steps")
        return reads

    def _convert_position(self, state: dict) -> None:
        """The position in the epoch, for another --batch_size, process count or dataset size than the
        checkpoint's: the sampler deals one epoch order out to the processes, so after K batches of b
        images on W processes the first K b W images of the order are done. Resumed with b', W': the
        first whole batch past them (never an image twice in the epoch; fewer than b' W' skipped). A
        dataset that gained or lost images (another number of items per epoch) takes the same
        conversion: K b W images of the epoch are done, and the epoch is over when they are as many
        as the new epoch holds (its order is drawn anew for the new item count). Checkpoints without
        a field (older ones) count as unchanged in it."""
        old_b = state.get("batch_size", self.cfg.batch_size)  # (older checkpoints: assumed unchanged)
        old_w = state.get("world_size", 1)
        old_n = state.get("dataset_size", self.sampler.n)
        new_b, new_w, new_n = self.cfg.batch_size, self.dist.world_size, self.sampler.n
        if (old_b, old_w, old_n) == (new_b, new_w, new_n):
            return
        what_old, what_new = [], []
        if (old_b, old_w) != (new_b, new_w):
            what_old.append(f"--batch_size {old_b} on {old_w} process(es)")
            what_new.append(f"--batch_size {new_b} on {new_w}")
        if old_n != new_n:
            old_spe = state.get("steps_per_epoch")
            what_old.append(f"{old_n} images per epoch" + (f" ({old_spe} steps)" if old_spe is not None else ""))
            what_new.append(f"{new_n} images per epoch ({self.steps_per_epoch} steps; the dataset "
                            f"{'gained' if new_n > old_n else 'lost'} images)")
        note = None
        if self.batch_in_epoch:  # (mid-epoch: the batch to continue at)
            done = self.batch_in_epoch * old_b * old_w
            per_step = new_b * new_w
            position = -(-done // per_step)
            skipped = position * per_step - done
            if position >= self.steps_per_epoch:
                self.epoch, position, skipped = self.epoch + 1, 0, max(0, self.steps_per_epoch * per_step - done)
            note = (f"{done} images of epoch {state['epoch']} were done; continuing at batch {position} of epoch "
                    f"{self.epoch}" + (f" ({skipped} images of the epoch skipped)" if skipped else ""))
            self.batch_in_epoch = position
        elif old_n != new_n:  # (at an epoch boundary the position stands; the schedules and length change)
            note = f"continuing at batch 0 of epoch {self.epoch}"
        if note is not None and self.dist.is_main:
            extra = ("; the epoch schedules and the run's length follow the new steps per epoch (the epoch's "
                     "order is drawn anew)" if old_n != new_n else "")
            print(f"ganengine: resuming a checkpoint of {' and '.join(what_old)} with {' and '.join(what_new)}: "
                  f"{note}{extra}", file=sys.stderr)
        self._rebase_schedule()

    def _rebase_schedule(self) -> None:
        """(_convert_position) Another --batch_size, process count or dataset size than the
        checkpoint's gives another number of steps per epoch: the epoch schedules (their rate is a
        function of step // steps_per_epoch) and the run's length (epochs times steps per epoch) are re-based on the epoch
        and batch the position was converted to, so the rates and the epochs left are the
        uninterrupted run's. (Schedules over iterations, StarGAN's --num_iters decay, keep counting
        steps.)"""
        virtual = self.epoch * self.steps_per_epoch + self.batch_in_epoch
        if not getattr(self.model, "schedule_reads_max_steps", False):
            for sch in self.schedulers.values():
                lambdas = getattr(sch, "lr_lambdas", None)
                if lambdas is None:
                    continue
                sch.last_epoch = virtual
                lrs = [base * fn(virtual) for base, fn in zip(sch.base_lrs, lambdas)]
                for group, lr in zip(sch.optimizer.param_groups, lrs):
                    group["lr"] = lr
                sch._last_lr = lrs
        if self.cfg.max_steps is None:
            self.total_steps = self.step + max(0, self._epochs * self.steps_per_epoch - virtual)

    # ---------------------------------------------------------------- samples
    def _sample_batch(self) -> dict | None:
        # every rank builds and runs the sample batch (a SyncBatchNorm network would otherwise wait
        # for the others in its forward); rank 0 alone writes the grid
        if self.cfg.sample_every <= 0:
            return None
        ds = self.dataset
        try:  # held-out images when the layout has them
            opts = dict(self.cfg.data_options)
            ds = build_dataset(self.cfg.model, opts, phase="test" if self.cfg.model != "pix2pix" else "val")
        except Exception:
            pass
        n = min(self.cfg.num_samples, len(ds))
        items = _same_size([ds[i * len(ds) // n] for i in range(n)])
        batch = torch.utils.data.default_collate(items)
        return _to_device(batch, self.device, self.cfg.channels_last)

    def write_samples(self) -> str | None:
        if self.sample_batch is None:
            return None
        attrs = self.cfg.data_options.get("selected_attrs") or self.cfg.data_options.get("classes")  # row names
        devices = [self.device] if self.device.type == "cuda" else []
        # (the networks' running state as they were (_state.running_state): a grid in train mode
        # would move batch-norm statistics and spectral-norm vectors (SAGAN's are Parameters), so
        # the run's state would depend on --sample_every, and a run extended with --resume would
        # differ from an uninterrupted one by its end-of-run grid)
        with restored(running_state(self.model)), torch.random.fork_rng(devices=devices), self.ctx.autocast():
            rows = visual_rows(self.cfg.model, self.model, self.sample_batch, attrs)
        if self.logger is None:
            return None
        return self.logger.images(self.step, [r.float() for r in rows],
                                  row_labels(self.cfg.model, self.model, len(rows), attrs))

    # ---------------------------------------------------------------- evaluation
    @contextlib.contextmanager
    def _plain_networks(self):
        """The model's networks without DDP / compile wrappers (one process evaluates alone)."""
        wrapped = {n: getattr(self.model, n) for n in self.model.network_names}
        for n, net in self.networks.items():
            setattr(self.model, n, net)
        try:
            yield
        finally:
            for n, net in wrapped.items():
                setattr(self.model, n, net)

    def evaluate(self) -> dict | None:
        """Metrics on the main process (RNG streams and network state untouched); every process
        then takes part in writing best.pt when the tracked metric improved."""
        results, improved = None, False
        if self.evaluator is not None:
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), self._plain_networks():
                results = self.evaluator.evaluate(self.model)
            self.evaluator.log(self.step, self.epoch, results, self.logger)
            key = self.evaluator.o["best_metric"]
            improved = self.evaluator.improves(results[key], self.best)
            if improved:
                self.best = {"metric": key, "value": float(results[key]), "step": self.step}
        if D.any_true(improved, self.dist, self.device):
            state = self._state()  # collective
            if self.evaluator is not None:
                self.evaluator.save_best(state, self.cfg.run_dir, results)
            D.barrier(self.dist)
        return results

    # ---------------------------------------------------------------- loop
    def _check_finite(self) -> None:
        bad = D.any_true(bool(self._bad.item()), self.dist, self.device)
        if bad:
            last = ckpt.latest(self.cfg.run_dir)
            first = int(self._bad_step)
            where = f"step {first}" if first >= 0 else f"a step before {self.step} (on another process)"
            raise NonFiniteLossError(
                f"a loss became NaN or infinite at {where}; training stopped without writing a checkpoint from "
                f"the bad weights. Last good checkpoint: {last or 'none yet'}. Try a lower --lr, --amp bf16 "
                "instead of fp16, or --amp off; resume with --resume.")

    def _record(self, losses: dict) -> None:
        vals = [v.detach().float().reshape(()) for v in losses.values()]
        if vals:  # device-side bookkeeping: no sync here
            bad_now = ~torch.stack(vals).isfinite().all()
            self._bad_step = torch.where(bad_now & (self._bad_step < 0), self.step, self._bad_step)
            self._bad |= bad_now
        for k, v in zip(losses, vals):  # per-key counts: some losses exist only every n-th step
            total, n = self._sums.get(k, (0, 0))
            self._sums[k] = (total + v, n + 1)

    def _flush(self) -> dict[str, float]:
        """The mean of each loss since the last row, over the steps and (under DDP: a collective,
        at the same step on every rank) over the processes."""
        keys = list(self._sums)
        means = D.mean_over_ranks([float(total) / n for total, n in self._sums.values()], self.dist)
        self._sums = {}
        return dict(zip(keys, means))

    def train(self) -> dict:
        cfg = self.cfg
        bar = None
        if self.dist.is_main and cfg.progress:
            from tqdm import tqdm

            tty = sys.stderr.isatty()
            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                       mininterval=0.5 if tty else 10.0, desc=f"{cfg.model}", file=sys.stderr)
            if self.logger is not None and self.logger.note:
                bar.write(self.logger.note)
        images_per_step = cfg.batch_size * self.dist.world_size
        t_last, steps_last = time.perf_counter(), self.step
        last_losses: dict[str, float] = {}
        # Ctrl-C / SIGTERM: one process stops at the end of the step under way and saves it (an
        # interrupt inside a step would leave it half done: D stepped, G not); a second signal,
        # or any signal under DDP (the ranks would not agree on the step), stops at once, unsaved
        prev_handlers = {}
        self._stop_signal = None
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:  # (a job that ignores it keeps doing so)
                    prev_handlers[sig] = signal.signal(sig, self._on_signal)
        # the input sizes of the steps that trained: an error on a size none of them had (the first
        # step's, or one tall photo's under --preprocess scale_width) is explained as that size's
        first_step, batch, shapes, trained_sizes = self.step, None, {}, set()
        try:
            while self.step < self.total_steps:
                self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
                for batch in self.loader:
                    batch = _to_device(batch, self.device, cfg.channels_last)
                    shapes = _input_shapes(batch)
                    self.ctx.step_index = self.step
                    losses = self.model.train_step(batch, self.optimizers, self.ctx)
                    trained_sizes.update(sh[-2:] for sh in shapes.values())
                    with warnings.catch_warnings():
                        # a skipped optimiser step (StarGAN's G between critic steps, an fp16
                        # overflow) is expected here; the schedule still follows the step count
                        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                        for sch in self.schedulers.values():  # per-iteration schedules (models/base.py)
                            sch.step()
                    self.step += 1
                    self.batch_in_epoch += 1
                    self._record(losses)
                    log_now = self.step % cfg.print_freq == 0 or self.step == self.total_steps
                    sample_now = cfg.sample_every > 0 and (self.step % cfg.sample_every == 0 or self.step == self.total_steps)
                    save_now = (cfg.save_every > 0 and self.step % cfg.save_every == 0) or self.step == self.total_steps
                    eval_now = cfg.eval_every > 0 and (self.step % cfg.eval_every == 0 or self.step == self.total_steps)
                    if log_now or sample_now or save_now or eval_now:
                        self._check_finite()
                    if log_now:
                        last_losses = self._flush()
                        now = time.perf_counter()
                        ips = (self.step - steps_last) * images_per_step / max(now - t_last, 1e-9)
                        t_last, steps_last = now, self.step
                        if self.logger is not None:
                            self.logger.scalars(self.step, self.epoch, {**last_losses, "images_per_s": ips})
                        if bar is not None:
                            bar.set_postfix({**{k: f"{v:.3g}" for k, v in last_losses.items()}, "img/s": f"{ips:.1f}"},
                                            refresh=False)
                    if bar is not None:
                        bar.update(1)
                    if sample_now:
                        batch, shapes = self.sample_batch, _input_shapes(self.sample_batch)  # (held-out images)
                        self.write_samples()
                        trained_sizes.update(sh[-2:] for sh in shapes.values())
                        batch, shapes = None, {}
                    if eval_now:
                        results = self.evaluate()
                        if results is not None:
                            line = f"step {self.step}: " + " ".join(
                                f"{k}={v:.4g}" for k, v in results.items() if isinstance(v, float))
                            if bar is not None:
                                bar.write(line)
                            else:
                                print(f"ganengine: {line}", file=sys.stderr)
                    if self.step >= self.total_steps:
                        break
                    saved = self.save() if save_now else None
                    if self._stop_signal is not None:  # (a step boundary: the state is whole)
                        if saved is None and not bool(self._bad.item()):  # (not saved twice)
                            saved = self.save()
                        self.interrupted_checkpoint = saved
                        raise _interrupt(self._stop_signal)
                    if self.batch_in_epoch >= self.steps_per_epoch:
                        break
                if self.batch_in_epoch >= self.steps_per_epoch:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                if self.step >= self.total_steps:
                    break
            final = self.resume_path if self.nothing_to_train else self.save()
            if self._stop_signal is not None:  # (stopped in the last step: saved, and said so)
                self.interrupted_checkpoint = final
                raise _interrupt(self._stop_signal)
        except (RuntimeError, ValueError) as exc:
            shape, new, where = _failing_input(batch, shapes, trained_sizes)
            first = self.step == first_step  # (there every input is new: no file to single out)
            clear = _explain(exc, first or new, shape, "" if first else where)
            if clear is exc:
                raise
            raise clear from exc
        finally:
            for sig, handler in prev_handlers.items():
                signal.signal(sig, handler)
            if bar is not None:
                bar.close()
            if self.logger is not None:
                self.logger.close()
            self._release_lock()
        return {"step": self.step, "epoch": self.epoch, "checkpoint": final, "losses": last_losses,
                "run_dir": cfg.run_dir, "log_dir": self.log_dir, "steps_trained": self.step - first_step}

    def _on_signal(self, signum, frame) -> None:
        if self.dist.enabled or self._stop_signal is not None:
            raise _interrupt(signum)
        self._stop_signal = signum
        print(f"\nganengine: {'SIGTERM' if signum == signal.SIGTERM else 'interrupted'}: stopping at the end of "
              f"this step, with a checkpoint (again to stop at once, unsaved)", file=sys.stderr)

    def close(self) -> None:
        self._release_lock()
        D.teardown(self.dist)


def train(cfg: TrainConfig) -> dict:
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()


def config_from_dict(d: dict) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in names})
