"""``ganengine translate``: run a trained generator on images (or captions) and write the results.

    ganengine translate --checkpoint checkpoints/cyclegan_sample --input photos/ --output out/
    ganengine translate --checkpoint RUN --input img.jpg --output out/ --target_attrs Blond_Hair Young   # StarGAN
    ganengine translate --checkpoint RUN --captions captions.txt --output out/                       # StackGAN

``--checkpoint`` takes a training checkpoint or a run folder (its newest checkpoint). Images are
resized to the size the model was trained at (``--size`` overrides) and written as PNG under the
input file names. StarGAN without ``--target_attrs`` writes one row per image: the input and its
translation to every domain, as the reference test does.
"""
from __future__ import annotations

import argparse
import os
import sys


def _debug() -> bool:
    from ganengine.backends import debug

    return debug()


def register(subparsers) -> None:
    p = subparsers.add_parser("translate", help="translate images with a trained generator",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) or run folder")
    p.add_argument("--input", help="an image or a folder of images (pix2pix, cyclegan, stargan)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--size", type=int, default=None, help="resize inputs to SIZE x SIZE (default: the training size)")
    p.add_argument("--aligned", action="store_true",
                   help="inputs are A|B pairs side by side (pix2pix test sets): translate the input half")
    p.add_argument("--reverse", action="store_true", help="CycleGAN: translate B -> A with netG_B")
    p.add_argument("--target_attrs", nargs="+", default=None,
                   help="StarGAN: attributes (CelebA) or the domain (folders) to translate to")
    p.add_argument("--captions", help="StackGAN: a text file, one caption per line")
    p.add_argument("--n_per_caption", type=int, default=1, help="StackGAN: images per caption (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=8, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (StackGAN, dropout) (default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.set_defaults(func=run)


class UsageError(ValueError):
    pass


def _inputs(path: str | None) -> list[str]:
    from ganengine.data.images import find_images, is_image

    if path is None:
        raise UsageError("--input is required for this model (an image or a folder of images)")
    if os.path.isfile(path):
        if not is_image(path):
            raise UsageError(f"--input {path!r} is not an image file")
        return [path]
    if not os.path.exists(path):
        raise UsageError(f"--input {path!r} does not exist (pass an image file or a folder of images)")
    return find_images(path, "--input folder", hint="Pass an image file or a folder of images as --input.")


def _load(path: str, size: int, aligned: bool, direction: str, nc: int):
    from PIL import Image

    from ganengine.data import transforms as T
    from ganengine.data.images import _open

    img = _open(path).convert("RGB")
    if aligned:
        w, h = img.size
        img = img.crop((0, 0, w // 2, h)) if direction == "AtoB" else img.crop((w // 2, 0, 2 * (w // 2), h))
    if nc == 1:
        img = img.convert("L")
    img = img.resize((size, size), Image.BICUBIC)
    return T.to_tensor(img)


def _target_labels(names: list[str], data: dict, c_dim: int):
    import torch

    labels = data.get("selected_attrs") or data.get("domains")
    if labels is None:
        raise UsageError("this checkpoint does not record its label names; cannot map --target_attrs")
    unknown = [n for n in names if n not in labels]
    if unknown:
        raise UsageError(f"--target_attrs {unknown} not among the model's labels: {' '.join(labels)}")
    if "domains" in data and len(names) != 1:
        raise UsageError(f"a folder-per-domain StarGAN translates to one domain; got {names}")
    t = torch.zeros(1, c_dim)
    for n in names:
        t[0, labels.index(n)] = 1
    return t


def _output_names(paths: list[str], root: str | None) -> list[str]:
    """PNG names for the inputs: the input's base name, and where two inputs would share one
    (a/x.jpg and b/x.jpg, or x.jpg and x.png) their path below --input and extension, so no
    output overwrites another."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    out = []
    for p, s in zip(paths, stems):
        if counts[s] > 1:
            rel = os.path.relpath(p, root) if root else os.path.basename(p)
            s = rel.replace(os.sep, "_").replace(".", "_")
        out.append(s + ".png")
    return out


def _check_args(args) -> None:
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.n_per_caption < 1:
        raise UsageError(f"--n_per_caption must be at least 1, got {args.n_per_caption}")
    if args.size is not None and args.size < 1:
        raise UsageError(f"--size must be at least 1, got {args.size}")
    if args.captions is not None and not os.path.isfile(args.captions):
        raise UsageError(f"--captions {args.captions!r} does not exist (a text file, one caption per line)")


TRANSLATION_MODELS = ("pix2pix", "cyclegan", "csgan", "stargan", "stackgan")


def _check_model(name: str, args) -> None:
    """translate runs image-to-image (and StackGAN's text-to-image) generators; a synthesis model
    (noise -> image) has no input to translate: ``ganengine sample`` writes its images."""
    if name not in TRANSLATION_MODELS:
        raise UsageError(f"--checkpoint {args.checkpoint!r} holds a {name} model, which generates images from noise: "
                         "translate is for pix2pix, CycleGAN, CSGAN, StarGAN and StackGAN. To write its images use "
                         f"ganengine sample --checkpoint {args.checkpoint} --output grid.png")
    if args.reverse and name not in ("cyclegan", "csgan"):
        raise UsageError(f"--reverse translates B -> A with a CycleGAN's netG_B; this checkpoint holds a {name} model")
    if args.target_attrs and name != "stargan":
        raise UsageError(f"--target_attrs is for StarGAN; this checkpoint holds a {name} model")
    if args.captions and name != "stackgan":
        raise UsageError(f"--captions is for StackGAN; this checkpoint holds a {name} model (pass --input images)")


def run(args) -> int:
    from ganengine.cli._io import describe

    try:
        return _run(args)
    except (UsageError, ValueError) as exc:
        if _debug():
            raise
        print(f"ganengine translate: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a write failing part-way (disk full, folder removed)
        if _debug():
            raise
        print(f"ganengine translate: error: writing {exc.filename or args.output!r} failed: {describe(exc)}",
              file=sys.stderr)
        return 2


def _run(args) -> int:
    import torch

    from ganengine.data.transforms import to_image
    from ganengine.train.checkpoint import load_model
    from ganengine.train.logger import save_grid
    from ganengine.train.visuals import stargan_targets

    from ganengine.cli._io import device_or_error, writable_dir

    _check_args(args)
    device = device_or_error(args.device)
    model, state = load_model(args.checkpoint, map_location="cpu")
    name, opts, data = state["model"], state["options"], state.get("data", {})
    _check_model(name, args)  # before the output folder is made
    writable_dir(args.output, "--output")
    model.to(device)
    torch.manual_seed(args.seed)
    written = []

    if name == "stackgan":
        from ganengine.data.text import embed, read_caption_file

        if not args.captions:
            raise UsageError("StackGAN translates captions: pass --captions FILE (one caption per line)")
        if data.get("text_embedder") == "precomputed":
            print("ganengine translate: warning: this model was trained on precomputed embeddings; captions are "
                  "embedded with ganengine's hashing embedder, which the model has not seen", file=sys.stderr)
        caps = read_caption_file(args.captions)
        emb = embed(caps, opts["text_dim"]).repeat_interleave(args.n_per_caption, 0)
        for start in range(0, emb.shape[0], args.batch_size):
            out = model.translate({"embedding": emb[start:start + args.batch_size].to(device)})
            for k, img in enumerate(out):
                i = start + k
                path = os.path.join(args.output, f"caption{i // args.n_per_caption:04d}_{i % args.n_per_caption}.png")
                to_image(img).save(path)
                written.append(path)
        with open(os.path.join(args.output, "captions.txt"), "w") as f:
            f.write("\n".join(f"caption{i:04d}\t{c}" for i, c in enumerate(caps)) + "\n")
    else:
        paths = _inputs(args.input)
        names = _output_names(paths, args.input if os.path.isdir(args.input) else None)
        size = args.size or (data.get("image_size") if name == "stargan" else data.get("crop_size")) or 256
        direction = opts.get("direction", "AtoB")
        in_nc = opts.get("input_nc", 3) if not args.reverse else opts.get("output_nc", 3)
        for start in range(0, len(paths), args.batch_size):
            chunk = paths[start:start + args.batch_size]
            x = torch.stack([_load(p, size, args.aligned, direction, in_nc) for p in chunk]).to(device)
            if name == "stargan":
                if args.target_attrs:
                    label = _target_labels(args.target_attrs, data, opts["c_dim"]).expand(len(chunk), -1).to(device)
                    outs = [model.translate({"image": x, "label": label})]
                else:
                    zero = torch.zeros(len(chunk), opts["c_dim"], device=device)
                    outs = [model.translate({"image": x, "label": t}) for t in
                            stargan_targets(zero, data.get("selected_attrs"))]
            elif name in ("cyclegan", "csgan") and args.reverse:
                with torch.no_grad():
                    net = model.netG_B
                    net.train(not opts.get("eval", False))
                    outs = [net(x)]
            else:
                key = "A" if direction == "AtoB" else "B"
                outs = [model.translate({key: x})]
            for k, p in enumerate(chunk):
                path = os.path.join(args.output, names[start + k])
                if len(outs) == 1:
                    to_image(outs[0][k]).save(path)
                else:
                    save_grid([torch.stack([x[k]] + [o[k] for o in outs])], path)
                written.append(path)
    print(f"ganengine translate: wrote {len(written)} image(s) to {args.output}", file=sys.stderr)
    return 0
