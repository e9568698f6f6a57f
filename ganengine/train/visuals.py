"""The image rows of a sample grid, per model (inputs, outputs, targets)."""
from __future__ import annotations

import torch

HAIR = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")


def stargan_targets(label: torch.Tensor, selected_attrs: list[str] | None) -> list[torch.Tensor]:
    """The reference's create_labels: one-hot labels for folder domains; for CelebA attributes,
    each attribute flipped in turn (hair colours exclusive)."""
    c_dim = label.shape[1]
    one_hot = bool(((label.sum(1) == 1) & ((label == 0) | (label == 1)).all(1)).all()) and not selected_attrs
    out = []
    for i in range(c_dim):
        if one_hot or selected_attrs is None:
            t = torch.zeros_like(label)
            t[:, i] = 1
        else:
            t = label.clone()
            if selected_attrs[i] in HAIR:
                t[:, i] = 1
                for j, name in enumerate(selected_attrs):
                    if j != i and name in HAIR:
                        t[:, j] = 0
            else:
                t[:, i] = 1 - t[:, i]
        out.append(t)
    return out


def row_labels(model_name: str, model, n_rows: int, selected_attrs=None) -> list[str]:
    """What each row of :func:`rows` shows, for the label strip of the sample grids."""
    options = getattr(model, "options", {}) or {}
    if model_name in ("pix2pix", "cyclegan", "csgan"):
        a, b = ("A", "B") if options.get("direction", "AtoB") == "AtoB" else ("B", "A")
        if model_name == "pix2pix":
            return [f"input {a}", f"output G({a})", f"target {b}"][:n_rows]
        return [f"real {a}", f"translated G({a})", f"real {b} (unpaired)"][:n_rows]
    if model_name == "stargan":
        names = list(selected_attrs) if selected_attrs else [f"domain {i}" for i in range(n_rows - 1)]
        flip = "set" if not selected_attrs else "flip"
        return ["real"] + [f"{flip} {n}" for n in names][:n_rows - 1]
    if model_name == "stackgan":
        return ["real", "generated", "generated (new z)"][:n_rows]
    if hasattr(model, "instance_row_labels"):  # IC-GAN (no row of real images first)
        return model.instance_row_labels(n_rows, selected_attrs)
    if hasattr(model, "sample_row_labels"):  # SynthesisGAN models (models/synthesis.py)
        return ["real"] + model.sample_row_labels(n_rows - 1, selected_attrs)
    if hasattr(model, "generate"):  # class-conditional synthesis: one row per class (synthesis_rows)
        classes = getattr(model, "class_names", None) or [f"class {k}" for k in range(n_rows - 1)]
        if not _conditional(model):
            return ["real"] + [f"generated {i + 1}" for i in range(n_rows - 1)]
        return ["real"] + [str(c) for c in classes][:n_rows - 1]
    return [f"row {i}" for i in range(n_rows)]


def _conditional(model) -> bool:
    o = getattr(model, "options", {}) or {}
    return "n_classes" in o and not o.get("unconditional", False)


def synthesis_rows(model, batch: dict, max_rows: int = 10) -> list[torch.Tensor]:
    """Real images, then generated ones: for a class-conditional model one row per class (the
    first ``max_rows``) with the same z in every column position across rows; otherwise two
    rows of fresh samples."""
    real = batch["image"]
    n = real.shape[0]
    g = torch.Generator().manual_seed(1234)  # the same z at every sampling step: a grid to compare over time
    if not _conditional(model):
        return [real] + [model.generate(n) for _ in range(2)]
    k = min(int(model.options["n_classes"]), max_rows)
    out = [real]
    dim = model.latent_dim() if hasattr(model, "latent_dim") else None
    z = torch.randn(n, dim, generator=g) if dim else None
    for c in range(k):
        out.append(model.generate(labels=torch.full((n,), c, dtype=torch.long), z=z))
    return out


@torch.no_grad()
def rows(model_name: str, model, batch: dict, selected_attrs=None, max_rows: int = 10) -> list[torch.Tensor]:
    # translate() sets the modes the model is evaluated in (pix2pix keeps dropout on, as the
    # reference does without --eval); restore the training modes afterwards
    modes = {m: m.training for m in model.modules()}
    try:
        if model_name in ("pix2pix", "cyclegan", "csgan"):  # input, output, target (or the other domain)
            a, b = ("A", "B") if getattr(model, "options", {}).get("direction", "AtoB") == "AtoB" else ("B", "A")
            return [batch[a], model.translate(batch), batch[b]]
        if model_name == "stargan":
            out = [batch["image"]]
            for t in stargan_targets(batch["label"], selected_attrs)[:max_rows]:
                out.append(model.translate({"image": batch["image"], "label": t}))
            return out
        if model_name == "stackgan":
            return [batch["image"], model.translate(batch), model.translate(batch)]
        if hasattr(model, "instance_rows"):  # IC-GAN: per conditioning instance, its image then G's
            return model.instance_rows(batch, max_rows)
        if hasattr(model, "sample_rows"):  # SynthesisGAN models: real images, then the model's own grid rows
            return [batch["image"]] + model.sample_rows(batch["image"].shape[0], max_rows)
        if hasattr(model, "generate"):
            return synthesis_rows(model, batch, max_rows)
        raise ValueError(f"unknown model {model_name!r}")
    finally:
        for m, mode in modes.items():
            m.training = mode
