"""``ganengine sample``: write a sample grid (inputs, outputs, targets) from a trained model.

    ganengine sample --checkpoint checkpoints/cyclegan_sample --output grid.png

Uses the held-out split of the data the model was trained on (the built-in sample data when it
was trained without ``--dataroot``), or ``--dataroot``. Rows: pix2pix/CycleGAN input, output,
target (or the other domain); StarGAN input and its translation to every domain; StackGAN real
images and two generated rows for their captions. Synthesis models (DCGAN, WGAN, cGAN, AC-GAN,
ADC-GAN, InfoGAN, ...): real images, then one generated row per class for class-conditional models
(the same latent in each column), InfoGAN one row per categorical code and rows that vary each
continuous code from -1 to 1; ``--interpolate STEPS`` also writes latent interpolations (one per
row) to ``OUTPUT_interpolation.png``.
"""
from __future__ import annotations

import argparse
import os
import sys


def _debug() -> bool:
    from ganengine.backends import debug

    return debug()


def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="write an image grid from a trained model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) or run folder")
    p.add_argument("--output", default="samples.png", help="PNG file to write (default: %(default)s)")
    p.add_argument("--dataroot", default=None, help="take the images from this dataset instead")
    p.add_argument("--phase", default=None, help="split to draw from (default: val/test when present, else train)")
    p.add_argument("--n", type=int, default=8, help="images per row (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--max_rows", type=int, default=10, help="synthesis models: at most this many class rows "
                   "(default: %(default)s)")
    p.add_argument("--interpolate", type=int, default=0, metavar="STEPS",
                   help="synthesis models: also write latent interpolations, STEPS images per row, to "
                        "OUTPUT_interpolation.png (default: none)")
    p.set_defaults(func=run)


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
        from ganengine.cli._io import device_or_error, writable_dir

        device = device_or_error(args.device)
        writable_dir(os.path.dirname(os.path.abspath(args.output)), "--output's folder")
        model, state = load_model(args.checkpoint, map_location="cpu")
        model.to(device)
        name, data = state["model"], dict(state.get("data", {}))
        if args.dataroot:
            data["dataroot"] = args.dataroot
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
            raise DataError(errors[-1])
        n = min(args.n, len(ds))
        batch = torch.utils.data.default_collate([ds[i * len(ds) // n] for i in range(n)])
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        torch.manual_seed(args.seed)
        names = data.get("selected_attrs") or data.get("classes")
        grid_rows = rows(name, model, batch, names, max_rows=args.max_rows)
        save_grid([r.float() for r in grid_rows], args.output, row_labels(name, model, len(grid_rows), names))
        if args.interpolate:
            if not hasattr(model, "interpolation_rows"):
                raise ValueError(f"--interpolate: {name} is not a synthesis model (no latent to interpolate)")
            with torch.no_grad():
                inter = model.interpolation_rows(n_rows=min(4, args.max_rows), steps=args.interpolate)
            stem, ext = os.path.splitext(args.output)
            conditional = getattr(model, "CONDITIONAL", False)
            k = getattr(model, "n_classes", None) or 1
            labels = [(str(names[r % k]) if names else f"class {r % k}") if conditional else f"z pair {r + 1}"
                      for r in range(len(inter))]
            save_grid([r.float() for r in inter], f"{stem}_interpolation{ext or '.png'}", labels)
            print(f"ganengine sample: wrote {stem}_interpolation{ext or '.png'}", file=sys.stderr)
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
