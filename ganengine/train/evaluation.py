"""Training-time evaluation (``--eval_every N``) of the synthesis models, keeping the best checkpoint.

Every N steps (and at the last step) the main process generates ``num_samples`` images with
``ganengine.metrics.evaluate_synthesis`` (fixed latents, class-balanced labels, the training's
random streams and network buffers untouched), compares them with the training images (their
features are computed once per run and kept), appends the results to ``LOG_DIR/eval_log.csv``
(and TensorBoard under ``eval/``), and when ``best_metric`` (default fid) improves, the engine
writes the full training state to ``RUN_DIR/best.pt`` (same format as ``step_*.pt``, never pruned,
never picked by ``--resume``) and ``RUN_DIR/best.json`` (step and results). The best value so far
is part of every checkpoint, so a resumed run keeps comparing against it.

Options (``TrainConfig.eval_options``): metrics ("fid"), num_samples (5000), batch_size (50),
seed (0), max_real (None: all training images), best_metric ("fid"), inception_weights,
inception_resize, feature_extractor (a 'module:attr' spec or an nn.Module).
"""
from __future__ import annotations

import csv
import json
import math
import os

import torch

from ganengine.metrics.evaluate_synthesis import (SYNTHESIS_METRICS, SYNTHESIS_MODES, check_neighbour_counts,
                                                  evaluate_synthesis, is_better_synthesis, parse_synthesis_metrics,
                                                  real_loader)

DEFAULTS = dict(metrics="fid", num_samples=5000, batch_size=50, seed=0, max_real=None, best_metric="fid",
                inception_weights=None, inception_resize=None, feature_extractor=None)
BEST_FILE, BEST_JSON, LOG_FILE = "best.pt", "best.json", "eval_log.csv"


def check_options(options: dict) -> dict:
    """Defaults filled in and every option validated (before any training runs)."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"eval_options: unknown {unknown}; known: {sorted(DEFAULTS)}")
    o = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    o["metrics"] = ",".join(parse_synthesis_metrics(o["metrics"]))
    for key in ("num_samples", "batch_size"):
        if isinstance(o[key], bool) or not isinstance(o[key], int) or o[key] < 1:
            raise ValueError(f"--eval_{key}: expected a positive int, got {o[key]!r}")
    if o["max_real"] is not None and (isinstance(o["max_real"], bool) or not isinstance(o["max_real"], int)
                                      or o["max_real"] < 2):
        raise ValueError(f"--eval_max_real: expected an int >= 2, got {o['max_real']!r}")
    produced = {k for m in o["metrics"].split(",") for k in SYNTHESIS_METRICS[m]}
    if o["best_metric"] not in SYNTHESIS_MODES or o["best_metric"] not in produced:
        raise ValueError(f"--eval_best {o['best_metric']!r}: must be one of the computed results that rank "
                         f"checkpoints, {sorted(produced & set(SYNTHESIS_MODES))} (add its metric to --eval_metrics)")
    if o["feature_extractor"] is None and o["inception_weights"] is None:
        from ganengine.metrics.inception import WEIGHTS_HELP

        raise ValueError("--eval_every needs a feature network for its metrics. " + WEIGHTS_HELP)
    if o["feature_extractor"] is not None and o["inception_weights"] is not None:
        raise ValueError("give --inception_weights or --feature_extractor, not both")
    check_neighbour_counts(o["metrics"].split(","), o["num_samples"], o["max_real"],
                           names={"num_samples": "--eval_num_samples", "max_real": "--eval_max_real", "pr_k": None,
                                  "dc_k": None})
    if o["feature_extractor"] is not None and o["inception_resize"] is not None:
        raise ValueError("--inception_resize sets how the Inception network resizes its input; your "
                         "--feature_extractor takes the images as they are: give one of them")
    if o["inception_resize"] not in (None, "pytorch-fid", "tf1"):
        raise ValueError(f"--inception_resize: expected 'pytorch-fid' or 'tf1', got {o['inception_resize']!r}")
    return o


def load_extractor(o: dict, device: torch.device):
    from ganengine.metrics import load_fid_inception, resolve_feature_extractor

    try:
        if o["feature_extractor"] is not None:
            return resolve_feature_extractor(o["feature_extractor"], device=device)
        return load_fid_inception(o["inception_weights"], device, resize=o["inception_resize"] or "pytorch-fid")
    except (FileNotFoundError, ImportError, AttributeError, TypeError) as exc:  # one clear line from the CLI
        option = "--feature_extractor" if o["feature_extractor"] is not None else "--inception_weights"
        raise ValueError(f"{option}: {exc}") from exc


def write_atomic_json(obj, path: str) -> None:
    """``obj`` to ``path`` through a temporary file and a rename, with the permissions a plain
    open() gives (as the checkpoints: checkpoint.create_temporary)."""
    from ganengine.train.checkpoint import write_atomic

    write_atomic(path, lambda f: json.dump(obj, f, indent=2), binary=False, prefix=".tmp_", suffix=".json")


class SynthesisEvaluator:
    """Runs on the main process only; holds the feature network and the real images' features."""

    def __init__(self, options: dict, model, model_name: str, data_options: dict, device: torch.device,
                 log_dir: str):
        from ganengine.metrics.evaluate_synthesis import check_logits, check_request, is_synthesis_model

        if not is_synthesis_model(model):
            raise ValueError(f"--eval_every evaluates the synthesis models (dcgan, wgan, ..., biggan); {model_name} "
                             "is not one: evaluate its checkpoints with ganengine evaluate")
        self.o = check_options(options)
        if "is" in self.o["metrics"].split(",") and self.o["num_samples"] < 10:  # (the metric's 10 splits)
            raise ValueError(f"--eval_metrics is: --eval_num_samples {self.o['num_samples']} images cannot be cut "
                             "into the Inception Score's 10 splits: give --eval_num_samples >= 10")
        check_request(model, self.o["metrics"], self.o["num_samples"])
        if hasattr(model, "check_sample_count"):  # (batch_sizes never leaves a last batch of one)
            model.check_sample_count(min(self.o["batch_size"], self.o["num_samples"]), "--eval_batch_size")
        self.extractor = load_extractor(self.o, device)
        if "is" in self.o["metrics"].split(","):
            check_logits(self.extractor)  # now, not at the first evaluation
        self.model_name, self.data_options = model_name, dict(data_options)
        self.device, self.log_dir = device, log_dir
        if "intra_fid" in self.o["metrics"].split(","):  # (the real side's classes: now, not at step N)
            from ganengine.metrics.evaluate_synthesis import check_real_classes

            check_real_classes(self._dataset(), self.o["max_real"], "--eval_max_real")
        if {"pr", "dc"} & set(self.o["metrics"].split(",")):  # (the real side: the dataset's size, now)
            n = len(self._dataset())
            limited = self.o["max_real"] is not None and self.o["max_real"] < n
            check_neighbour_counts(self.o["metrics"].split(","), None, min(n, self.o["max_real"] or n),
                                   names={"max_real": "--eval_max_real" if limited else "the training images (--dataroot)",
                                          "pr_k": None, "dc_k": None})
        self.real = None  # the training images' features: computed at the first evaluation, kept for the run

    def _dataset(self):
        from ganengine.data import build_dataset

        # the training images as they are: no random flips (the metric must not depend on the draws)
        return build_dataset(self.model_name, {**self.data_options, "no_flip": True})

    def _real_loader(self):
        return real_loader(self._dataset(), self.o["batch_size"], self.o["max_real"])

    def evaluate(self, model) -> dict:
        o = self.o
        was = {n: getattr(model, n).training for n in model.network_names}
        try:
            out = evaluate_synthesis(model, self.real if self.real is not None else self._real_loader(),
                                     o["metrics"], self.extractor, num_samples=o["num_samples"],
                                     batch_size=o["batch_size"], seed=o["seed"], max_real=o["max_real"])
        finally:
            for n, mode in was.items():
                getattr(model, n).train(mode)
        self.real = out.pop("real")
        return out

    def improves(self, value: float, best: dict | None) -> bool:
        if not math.isfinite(value):
            return False  # a NaN never becomes the best (and would block every later comparison)
        if best and best.get("metric") not in (None, self.o["best_metric"]):
            return True  # the run was resumed tracking another metric: start over with this one
        return is_better_synthesis(self.o["best_metric"], value, best.get("value") if best else None)

    def save_best(self, state: dict, run_dir: str, results: dict | None) -> str:
        from ganengine.train import checkpoint as ckpt

        path = ckpt.write(state, os.path.join(run_dir, BEST_FILE))
        write_atomic_json({"step": state["step"], "epoch": state["epoch"], "metric": self.o["best_metric"],
                           "results": results or {}, "checkpoint": path}, os.path.join(run_dir, BEST_JSON))
        return path

    def start_log(self, resume_step: int | None) -> None:
        """A fresh run starts a fresh eval_log.csv; a resumed one drops the rows after its step."""
        path = os.path.join(self.log_dir, LOG_FILE)
        if resume_step is None:
            if os.path.exists(path):
                os.unlink(path)
        else:
            truncate_log(self.log_dir, resume_step)

    def log(self, step: int, epoch: int, results: dict, logger=None) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        path = os.path.join(self.log_dir, LOG_FILE)
        keys = [k for k in results if isinstance(results[k], (int, float))]
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "epoch"] + keys)
            w.writerow([step, epoch] + [f"{results[k]:.6g}" if isinstance(results[k], float) else results[k]
                                        for k in keys])
        tb = getattr(logger, "tb", None)
        if tb is not None:
            for k in keys:
                tb.add_scalar(f"eval/{k}", results[k], step)


def truncate_log(log_dir: str, step: int) -> None:
    """A resumed run drops the evaluations after its checkpoint's step (they will be redone)."""
    path = os.path.join(log_dir, LOG_FILE)
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= step]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(kept)


__all__ = ["SynthesisEvaluator", "check_options", "DEFAULTS", "BEST_FILE", "BEST_JSON", "LOG_FILE",
           "truncate_log", "write_atomic_json", "is_better_synthesis"]
