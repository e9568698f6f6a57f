"""``ganengine sample``: write a sample grid (inputs, outputs, targets) from a trained model.

    ganengine sample --checkpoint checkpoints/cyclegan_sample --output grid.png

Uses the held-out split of the data the model was trained on (the built-in sample data when it
was trained without ``--dataroot``), or ``--dataroot``. Rows: pix2pix/CycleGAN input, output,
target (or the other domain); StarGAN input and its translation to every domain; StackGAN real
images and two generated rows for their captions. Synthesis models (DCGAN, WGAN, cGAN, AC-GAN,
ADC-GAN, InfoGAN, ...): real images, then one generated row per class for class-conditional models
(the same latent in each column), InfoGAN one row per categorical code and rows that vary each
continuous code from -1 to 1; ``--interpolate STEPS`` also writes latent interpolations (one per
row) to ``OUTPUT_interpolation.png`` (those models; SAGAN, BigGAN, U-Net GAN and IC-GAN have no
interpolation grid).
"""
from __future__ import annotations

import argparse
import os
import sys

from ganengine.cli._options import seed_int


def _debug() -> bool:
    from ganengine.backends import debug

    return debug()


def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="write an image grid from a trained model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) or run folder")
    p.add_argument("--output", default="samples.png", help="image file to write: .png (default: %(default)s), "
                   ".jpg, or another format PIL can save")
    p.add_argument("--dataroot", default=None, help="take the images from this dataset instead")
    p.add_argument("--phase", default=None, help="split to draw from (default: val/test when present, else train); "
                   "StarGAN with an attribute file: train or test; StackGAN and IC-GAN have no splits; the other "
                   "synthesis models use it only for a class-per-folder DATAROOT with a DATAROOT/PHASE/ folder")
    p.add_argument("--feature_file", default=None,
                   help="IC-GAN: the instance features file (default: the training's, as the checkpoint records it); "
                        "it must hold the features the model was trained with (moved or copied, not changed)")
    p.add_argument("--n", type=int, default=8, help="images per row (default: %(default)s)")
    p.add_argument("--seed", type=seed_int, default=0, help="(default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--max_rows", type=int, default=10, help="synthesis models: at most this many class rows "
                   "(default: %(default)s)")
    p.add_argument("--interpolate", type=int, default=0, metavar="STEPS",
                   help="DCGAN, WGAN, WGAN-GP, cGAN, AC-GAN, ADC-GAN, InfoGAN: also write latent interpolations, "
                        "STEPS images per row, to OUTPUT_interpolation.png (default: none)")
    p.set_defaults(func=run)


# common image formats, suggested when --output names none PIL can write
COMMON_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _pil_can_write(ext: str) -> bool:
    """Whether PIL writes the grid (an RGB or grayscale image) as a file ending in ``ext``."""
    import io

    from PIL import Image

    Image.init()
    fmt = Image.registered_extensions().get(ext.lower())
    if fmt is None or fmt not in Image.SAVE:
        return False
    try:  # a registered writer may still be a stub without its handler
        for mode in ("RGB", "L"):
            Image.new(mode, (4, 4)).save(io.BytesIO(), format=fmt)
    except Exception:
        return False
    return True


def image_file(path: str, option: str) -> None:
    """A ValueError naming ``option`` and the accepted extensions unless PIL can write ``path``'s
    image format (checked before any image is generated)."""
    ext = os.path.splitext(path)[1]
    if ext and _pil_can_write(ext):
        return
    accepted = ", ".join(e for e in COMMON_EXTENSIONS if _pil_can_write(e))
    what = f"{ext!r} is not an image format PIL can write" if ext else "has no file extension"
    raise ValueError(f"{option} {path!r}: {what}: expected an image file name ending in {accepted} "
                     "(or another extension PIL can save)")


def check_phase(name: str, data: dict, phase: str) -> None:
    """When the data folder is there but has no ``phase`` split, a DataError naming --phase and
    the splits there are (instead of saying the data is gone)."""
    from ganengine.data import DataError, sample_root

    try:
        root = data.get("dataroot") or sample_root(name)
    except (DataError, ValueError):
        return
    if not os.path.isdir(root):
        return
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if name in ("cyclegan", "csgan"):  # DATAROOT/<phase>A and <phase>B
        phases = [d[:-1] for d in folders if d.endswith("A") and d[:-1] + "B" in folders]
    else:  # DATAROOT/<phase>/...
        phases = folders
    if phase in phases or not phases:
        return  # the split is there (or no split is: the folder is wrong): the original error says why
    layout = f"{phase}A and {phase}B folders" if name in ("cyclegan", "csgan") else f"{phase!r} folder"
    raise DataError(f"--phase {phase}: the data folder {root!r} has no {layout}; the phases there: "
                    f"{', '.join(phases)}")


def interpolation_path(output: str) -> str:
    """Where ``--interpolate`` writes its grid: OUTPUT_interpolation with OUTPUT's extension."""
    stem, ext = os.path.splitext(output)
    return f"{stem}_interpolation{ext or '.png'}"


def interpolation_file(output: str, steps: int) -> None:
    """A ValueError unless the --interpolate grid's file can be written (checked with --output,
    before the main grid is written)."""
    from ganengine.cli._io import writable_file

    path = interpolation_path(output)
    if os.path.isdir(path):
        raise ValueError(f"--interpolate {steps}: its grid goes to {path!r} (from --output), which is a folder: "
                         "move it away or pick another --output")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"--interpolate {steps}: its grid goes to {path!r} (from --output), which is not "
                         "writable: permission denied: pick another --output")
    writable_file(path, f"--interpolate {steps}: its grid", example=os.path.basename(path))


def _no_interpolation(name: str, steps: int) -> str:
    """Why ``name`` cannot write --interpolate's grid."""
    from ganengine.data import CLASS_MODELS
    from ganengine.models import MODELS

    having = [m for m, cls in MODELS.items() if hasattr(cls, "interpolation_rows")]
    if name in CLASS_MODELS:  # a synthesis model without the latent-interpolation grid
        return (f"--interpolate {steps}: {name} has no interpolation grid (the models with one: "
                f"{', '.join(having)}); leave --interpolate out")
    return (f"--interpolate {steps}: {name} is not a synthesis model (no latent to interpolate); leave "
            "--interpolate out")


def check_phase_used(name: str, data: dict, phase: str) -> None:
    """A DataError for a --phase the model's data cannot honour (said instead of drawing from
    another split silently): StackGAN's captioned data has no splits; the synthesis models use
    --phase only for a class-per-folder DATAROOT that has a DATAROOT/PHASE/ folder (IC-GAN never:
    it conditions on its training images)."""
    from ganengine.data import CLASS_MODELS, DataError

    root = data.get("dataroot")
    if name == "stackgan":
        where = f"{root}/images" if root else "the built-in sample data"
        raise DataError(f"--phase {phase}: StackGAN's data has no splits (sample draws from {where} and its captions, "
                        "as training did; embeddings.pt's file list, where there is one): leave --phase out, or "
                        "pass --dataroot a folder holding the images you want")
    if name not in CLASS_MODELS:
        return
    if name == "icgan":
        raise DataError(f"--phase {phase}: IC-GAN's grid conditions on instances of its training images; --phase is "
                        "not used: leave it out")
    if root and os.path.isdir(root) and os.path.isdir(os.path.join(root, phase)) and not any(
            f.endswith((".hdf5", ".h5")) for f in os.listdir(root)):
        return  # DATAROOT/PHASE/<class>/ is used
    where = (f"the class folder {root!r} has no {phase!r} folder" if root and os.path.isdir(root) else
             f"its data ({root!r}) has no splits" if root else "the built-in digits have no splits")
    raise DataError(f"--phase {phase}: {name} does not use --phase here: {where} (--phase picks DATAROOT/PHASE/ "
                    "where a class-per-folder DATAROOT has one); leave --phase out")


def check_celeba_phase(ds, phase: str) -> None:
    """StarGAN's CelebA-style data has the reference's two splits of its attribute file; another
    --phase would silently give the test split."""
    from ganengine.data import CelebADataset, DataError

    if isinstance(ds, CelebADataset) and phase not in ("train", "test"):
        raise DataError(f"--phase {phase}: StarGAN's CelebA-style data (an attribute file) has the phases train, "
                        "test (the reference's split of the attribute file)")


def run(args) -> int:
    import torch

    from ganengine.data import DataError, build_dataset
    from ganengine.train.checkpoint import CheckpointError, load_model
    from ganengine.train.logger import save_grid
    from ganengine.train.visuals import row_labels, rows

    try:
        if args.n < 1:
            raise ValueError(f"--n must be >= 1, got {args.n}")
        if args.max_rows < 1 or args.interpolate < 0 or args.interpolate == 1:
            raise ValueError(f"--max_rows must be >= 1 and --interpolate 0 or >= 2, got {args.max_rows}, "
                             f"{args.interpolate}")
        from ganengine.cli._io import device_or_error, writable_file

        device = device_or_error(args.device)
        image_file(args.output, "--output")
        writable_file(args.output, "--output", example="samples.png")
        if args.interpolate:  # its file checked before the main grid is written
            interpolation_file(args.output, args.interpolate)
        model, state = load_model(args.checkpoint, map_location="cpu")
        model.to(device)
        name, data = state["model"], dict(state.get("data", {}))
        if args.feature_file is not None:
            if name != "icgan":
                raise ValueError(f"--feature_file is IC-GAN's instance features file; {name} takes none: leave it out")
            model.use_feature_file(args.feature_file, data)
        if hasattr(model, "check_sample_count"):  # (a batch-norm generator cannot make one image per call)
            model.check_sample_count(args.n, "--n")
        if args.interpolate and not hasattr(model, "interpolation_rows"):  # said before anything is written
            raise ValueError(_no_interpolation(name, args.interpolate))
        if args.dataroot:
            data["dataroot"] = args.dataroot
        if args.phase:
            check_phase_used(name, data, args.phase)
        phases = [args.phase] if args.phase else (["val", "test", "train"] if name == "pix2pix" else ["test", "train"])
        ds, errors = None, []
        from ganengine.data.images import missing_data_hint

        hint = ("Check --dataroot (and --phase), or leave --dataroot out to draw from the data the model was "
                "trained on." if args.dataroot else "The data the model was trained on is not there any more: "
                "pass --dataroot with its folder (and --phase).")
        for phase in phases:
            try:
                with missing_data_hint(hint):
                    ds = build_dataset(name, data, phase=phase)
                break
            except DataError as exc:
                errors.append(str(exc))
        if ds is None:
            if args.phase:
                check_phase(name, data, args.phase)
            raise DataError(errors[-1])
        if args.phase:
            check_celeba_phase(ds, args.phase)
        n = min(args.n, len(ds))
        batch = torch.utils.data.default_collate([ds[i * len(ds) // n] for i in range(n)])
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        torch.manual_seed(args.seed)
        names = data.get("selected_attrs") or data.get("classes")
        grid_rows = rows(name, model, batch, names, max_rows=args.max_rows)
        save_grid([r.float() for r in grid_rows], args.output, row_labels(name, model, len(grid_rows), names))
        if args.interpolate:
            with torch.no_grad():
                inter = model.interpolation_rows(n_rows=min(4, args.max_rows), steps=args.interpolate)
            conditional = getattr(model, "CONDITIONAL", False)
            k = getattr(model, "n_classes", None) or 1
            labels = [(str(names[r % k]) if names else f"class {r % k}") if conditional else f"z pair {r + 1}"
                      for r in range(len(inter))]
            path = interpolation_path(args.output)
            save_grid([r.float() for r in inter], path, labels)
            print(f"ganengine sample: wrote {path}", file=sys.stderr)
    except (DataError, CheckpointError, ValueError) as exc:
        if _debug():
            raise
        print(f"ganengine sample: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # writing the grid failed (disk full, folder removed)
        from ganengine.cli._io import describe

        if _debug():
            raise
        print(f"ganengine sample: error: writing {exc.filename or args.output!r} failed: {describe(exc)}",
              file=sys.stderr)
        return 2
    print(f"ganengine sample: wrote {args.output}", file=sys.stderr)
    return 0
