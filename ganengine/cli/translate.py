"""``ganengine translate``: run a trained generator on images (or captions) and write the results.

    ganengine translate --checkpoint checkpoints/cyclegan_sample --input photos/ --output out/
    ganengine translate --checkpoint RUN --input img.jpg --output out/ --target_attrs Blond_Hair Young   # StarGAN
    ganengine translate --checkpoint RUN --captions captions.txt --output out/                       # StackGAN

``--checkpoint`` takes a training checkpoint or a run folder (its newest checkpoint). Images are
read as the model's held-out data is (``ganengine sample`` / ``evaluate``): pix2pix, CycleGAN and
CSGAN with the reference's test transform of the training's ``--preprocess`` (its test options set
``--load_size`` to ``--crop_size``: ``resize_and_crop`` resizes the whole image to ``--crop_size``,
``scale_width`` scales its width to it; ``--load_size`` is not used), any crop left
(``crop``, ``scale_width_and_crop``) taken at the centre, no flip, grayscale where that side has 1
channel; ``--aligned`` A|B pairs cut as the held-out dataset cuts them; StarGAN with the centre
crop then the resize to ``--image_size``. ``--size S`` resizes that preprocessed input to S x S (a size the networks
cannot take is refused). The results are written as PNG under the input file names. StarGAN without
``--target_attrs`` writes one row per image: the input and its translation to every domain, the
reference test's create_labels from the image's own labels (those of the training data's attribute
file for one of its images, else all 0); with ``--target_attrs`` the named attributes are set
(a hair colour clears the other hair colours) and the others keep the image's own labels (0 for an
image not in that file).
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
    p.add_argument("--size", type=int, default=None,
                   help="resize inputs to SIZE x SIZE after the held-out preprocessing (the reference's test "
                        "transform, see above; default: the size it gives, the training size)")
    p.add_argument("--aligned", action="store_true",
                   help="inputs are A|B pairs side by side (pix2pix test sets): translate the half the generator "
                        "takes (A; B with --direction BtoA; the other half with --reverse)")
    p.add_argument("--reverse", action="store_true", help="CycleGAN: translate B -> A with netG_B")
    p.add_argument("--target_attrs", nargs="+", default=None,
                   help="StarGAN: attributes (CelebA) or the domain (folders) to translate to. CelebA: the "
                        "attributes not named keep the image's own labels when it is one of the training data's "
                        "images (its attribute file), else they are set to 0")
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


class _Reader:
    """Reads an input image as the model's held-out data is read (``build_dataset`` with a phase
    other than train): the same deterministic transform, so the generator sees what ``sample`` and
    ``evaluate`` feed it. ``size``: ``--size`` (the result resized to size x size), or None."""

    def __init__(self, name: str, opts: dict, data: dict, size: int | None, aligned: bool, reverse: bool):
        from ganengine.data import transforms as T

        self.name, self.size, self.aligned, self.reverse = name, size, aligned, bool(reverse)
        direction = opts.get("direction") or data.get("direction") or "AtoB"
        # the half of an A|B pair the generator takes: A with AtoB, B with BtoA; --reverse (netG_B) the other
        self.left = (direction == "AtoB") != bool(reverse)
        if name == "stargan":
            self.nc = 3
            self.image_size = data.get("image_size") or opts.get("image_size") or 128
            # (folder-per-domain, RaFD-style, data: its domains recorded in the checkpoint)
            self.crop = T.stargan_crop_size(data, "domains" in data or opts.get("dataset") == "RaFD")
        else:
            # a side with 1 channel is read as grayscale, as the datasets do (input_nc for netG_A's input)
            self.nc = opts.get("output_nc", 3) if reverse else opts.get("input_nc", 3)
            # build_dataset's held-out transform (the reference's test options)
            crop = data.get("crop_size") or 256
            preprocess = data.get("preprocess") or "resize_and_crop"
            self.transform = T.TransformOptions(preprocess, crop, crop).held_out().check()

    def training_size(self) -> int | None:
        """The square size the model was trained at (None where it follows each image's shape)."""
        if self.name == "stargan":
            return self.image_size
        o = self.transform
        return o.crop_size if o.preprocess in ("resize_and_crop", "crop", "scale_width_and_crop") else None

    def __call__(self, path: str):
        from ganengine.data import transforms as T
        from ganengine.data.images import _open

        img = _open(path).convert("RGB")
        params_size = img.size
        if self.aligned:
            from ganengine.data.paired import split_pair

            w, h = img.size
            if w < 2:
                raise UsageError(f"--aligned: {path!r} is {w}x{h}: an aligned pair holds A and B side by side "
                                 "(width 2*height)")
            # (the halves as the held-out dataset cuts them, and any crop where it crops A, as it does
            # for both halves: an odd width's B as evaluate / sample read it)
            a, b = split_pair(img, self.transform if self.name != "stargan" else None)
            img, params_size = (a if self.left else b), a.size
        g = _generator()
        if self.name == "stargan":  # centre crop, resize (the reference's test transform)
            return T.stargan(img, self.crop, self.size or self.image_size, False, g)
        if self.nc == 1:
            img = img.convert("L")
        x = T.apply(img, self.transform, T.get_params(params_size, self.transform, g))
        if self.size and tuple(x.shape[-2:]) != (self.size, self.size):
            x = T.to_tensor(T.to_image(x).resize((self.size, self.size), self.transform.resample))
        return x


def _generator():
    import torch

    return torch.Generator().manual_seed(0)  # (unused: no random crop or flip at test time)


def _hair_attrs() -> tuple:
    from ganengine.train.visuals import HAIR

    return HAIR


def _target_labels(names: list[str], data: dict, c_dim: int, original=None):
    """The target label row for ``--target_attrs``: the named attributes set; for CelebA-style
    labels the others kept from ``original`` (the image's own labels; None: all 0), a hair colour
    named clearing the other hair colours (as the reference's create_labels)."""
    import torch

    labels = data.get("selected_attrs") or data.get("domains")
    if labels is None:
        raise UsageError("this checkpoint does not record its label names; cannot map --target_attrs")
    unknown = [n for n in names if n not in labels]
    if unknown:
        raise UsageError(f"--target_attrs {unknown} not among the model's labels: {' '.join(labels)}")
    if "domains" in data and len(names) != 1:
        raise UsageError(f"a folder-per-domain StarGAN translates to one domain; got {names}")
    if "domains" in data or original is None:
        t = torch.zeros(1, c_dim)
    else:
        t = original.reshape(1, c_dim).clone().float()
        if any(n in _hair_attrs() for n in names):
            for j, label in enumerate(labels):
                if label in _hair_attrs() and label not in names:
                    t[0, j] = 0
    for n in names:
        t[0, labels.index(n)] = 1
    return t


def _original_labels(paths: list[str], data: dict, c_dim: int) -> list:
    """StarGAN (CelebA-style labels): each input's own labels from the training data's attribute
    file when the input is one of that data's images (a (c_dim,) 0/1 tensor), else None."""
    import warnings

    import torch

    selected = data.get("selected_attrs")
    if not selected or "domains" in data:
        return [None] * len(paths)
    from ganengine.data import DataError, sample_root
    from ganengine.data.labelled import celeba_image_dir, read_attr_file

    try:
        root = data.get("dataroot") or sample_root("stargan")
    except (DataError, ValueError):
        return [None] * len(paths)
    attr_path = data.get("attr_path") or os.path.join(root, "list_attr_celeba.txt")
    if not os.path.isfile(attr_path):
        return [None] * len(paths)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            names, rows = read_attr_file(attr_path)
    except (DataError, OSError, UnicodeDecodeError):
        return [None] * len(paths)
    if any(a not in names for a in selected) or len(selected) != c_dim:
        return [None] * len(paths)
    columns = [names.index(a) for a in selected]
    table = {os.path.normpath(r[0]): r[1] for r in rows}
    image_dir = os.path.realpath(celeba_image_dir(root))
    out = []
    for p in paths:
        rel = os.path.relpath(os.path.realpath(p), image_dir)
        values = None if rel.startswith(os.pardir + os.sep) or rel == os.pardir else table.get(os.path.normpath(rel))
        out.append(None if values is None else torch.tensor([1.0 if values[c] == 1 else 0.0 for c in columns]))
    return out


def _output_names(paths: list[str], root: str | None) -> list[str]:
    """PNG names for the inputs: the input's base name, and where two inputs would share one
    (a/x.jpg and b/x.jpg, or x.jpg and x.png; compared ignoring case, for case-insensitive file
    systems) their path below --input and extension; a name so made that another input's output
    already takes (x.jpg + sub/x.jpg give sub_x_jpg, the name of the input sub_x_jpg.png) gets a
    number (_2, _3, ...), so no output overwrites another."""
    key = str.casefold
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    counts: dict[str, int] = {}
    for s in stems:
        counts[key(s)] = counts.get(key(s), 0) + 1
    renamed = [counts[key(s)] > 1 for s in stems]
    used = {key(s) for s, r in zip(stems, renamed) if not r}  # the plain names keep theirs
    out = []
    for p, s, r in zip(paths, stems, renamed):
        if r:
            rel = os.path.relpath(p, root) if root else os.path.basename(p)
            base = rel.replace(os.sep, "_").replace(".", "_")
            s, k = base, 2
            while key(s) in used:
                s, k = f"{base}_{k}", k + 1
            used.add(key(s))
        out.append(s + ".png")
    return out


def _check_args(args) -> None:
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.n_per_caption < 1:
        raise UsageError(f"--n_per_caption must be at least 1, got {args.n_per_caption}")
    if args.size is not None and args.size < 1:
        raise UsageError(f"--size must be at least 1, got {args.size}")
    if args.captions is not None and os.path.isdir(args.captions):
        raise UsageError(f"--captions {args.captions!r} is a folder: expected a text file, one caption per line")
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
    if name == "stackgan" and args.size is not None:
        raise UsageError("--size resizes input images; StackGAN generates from captions, at the size it was "
                         "trained at: leave --size out")


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


def _forward(model, name: str, opts: dict, x, reverse: bool, label=None):
    """The generator's output for inputs ``x`` (StarGAN: to ``label``), as the model's translate
    runs it (training mode unless --eval, batch-norm generators image by image)."""
    if name == "stargan":
        return model.translate({"image": x, "label": label})
    # the generator's input side: A (B with direction BtoA); --reverse: the other side, netG_B
    a_key = "A" if opts.get("direction", "AtoB") == "AtoB" else "B"
    if reverse:
        return model.translate({"AB".replace(a_key, ""): x}, reverse=True)
    return model.translate({a_key: x})


def _probe(model, name: str, opts: dict, reader: _Reader, size: int, device) -> str | None:
    """Why the generator cannot take ``size`` x ``size`` inputs (None: it can, and gives images
    of that size back)."""
    import torch

    x = torch.zeros(1, reader.nc, size, size, device=device)
    label = torch.zeros(1, opts["c_dim"], device=device) if name == "stargan" else None
    try:
        out = _forward(model, name, opts, x, reader.reverse, label)
    except (RuntimeError, ValueError) as exc:
        return " ".join(str(exc).split())[:200]
    if tuple(out.shape[-2:]) != (size, size):
        return f"they turn {size}x{size} inputs into {out.shape[-2]}x{out.shape[-1]} images"
    return None


def _check_size(model, name: str, opts: dict, reader: _Reader, size: int, device) -> None:
    """``--size`` checked up front: a size the networks cannot take (a layer's error, or an output
    of another size) is refused naming --size and sizes that work."""
    why = _probe(model, name, opts, reader, size, device)
    if why is None:
        return
    tried: dict[int, bool] = {size: False}

    def works(s: int) -> bool:
        if s not in tried:
            tried[s] = _probe(model, name, opts, reader, s, device) is None
        return tried[s]

    below = above = None
    m = 2
    while m <= 512 and above is None:  # the nearest multiples of 2, 4, 8, ... that work
        lo, hi = size // m * m, -(-size // m) * m
        if below is None and lo >= 1 and works(lo):
            below = lo
        if works(hi):
            above = hi
        m *= 2
    sizes = [s for s in (below, above) if s is not None]
    trained = reader.training_size()
    hint = " or ".join(f"--size {s}" for s in sizes)
    if trained:
        hint = (hint + "; " if hint else "") + f"the model was trained at {trained}x{trained}"
    hint = f" ({hint})" if hint else ""
    raise UsageError(f"--size {size}: the networks cannot take {size}x{size} inputs: pick a size they can{hint} "
                     f"({why})")


def _run(args) -> int:
    from ganengine.train.checkpoint import load_model

    from ganengine.cli._io import device_or_error

    _check_args(args)
    device = device_or_error(args.device)
    model, state = load_model(args.checkpoint, map_location="cpu")
    name, opts, data = state["model"], state["options"], state.get("data", {})
    _check_model(name, args)  # before the output folder is made
    model.to(device)
    from ganengine.train.checkpoint import missing_folders

    made = missing_folders(args.output)
    written: list[str] = []
    try:
        _translate(args, model, name, opts, data, device, written)
    except BaseException:
        if not written:  # refused (or failed) before writing anything: no empty --output folder left
            for folder in made:
                try:
                    os.rmdir(folder)
                except OSError:
                    break
        raise
    print(f"ganengine translate: wrote {len(written)} image(s) to {args.output}", file=sys.stderr)
    return 0


def _translate(args, model, name: str, opts: dict, data: dict, device, written: list[str]) -> None:
    import torch

    from ganengine.data.transforms import to_image
    from ganengine.train.logger import save_grid

    from ganengine.cli._io import writable_dir

    if name == "stackgan":
        from ganengine.data.text import embed, read_caption_file

        if not args.captions:
            raise UsageError("StackGAN translates captions: pass --captions FILE (one caption per line)")
        caps = read_caption_file(args.captions)
        writable_dir(args.output, "--output")
        if data.get("text_embedder") == "precomputed":
            print("ganengine translate: warning: this model was trained on precomputed embeddings; captions are "
                  "embedded with ganengine's hashing embedder, which the model has not seen", file=sys.stderr)
        torch.manual_seed(args.seed)
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
        return

    paths = _inputs(args.input)
    names = _output_names(paths, args.input if os.path.isdir(args.input) else None)
    reader = _Reader(name, opts, data, args.size, args.aligned, args.reverse)
    originals = [None] * len(paths)
    if name == "stargan":
        c_dim = opts["c_dim"]
        originals = _original_labels(paths, data, c_dim)
        if args.target_attrs:
            _target_labels(args.target_attrs, data, c_dim)  # the names checked before anything is written
        unknown = sum(o is None for o in originals)
        if data.get("selected_attrs") and "domains" not in data and unknown:
            what = ("the attributes not named in --target_attrs are set to 0" if args.target_attrs else
                    "each row changes one attribute of all-0 labels")
            print(f"ganengine translate: note: {unknown} of {len(paths)} input(s) are not images of the training "
                  f"data's attribute file, so their own labels are unknown: {what}", file=sys.stderr)
    if args.size is not None:
        _check_size(model, name, opts, reader, args.size, device)
    writable_dir(args.output, "--output")
    torch.manual_seed(args.seed)
    for start in range(0, len(paths), args.batch_size):
        chunk = list(range(start, min(start + args.batch_size, len(paths))))
        images = {i: reader(paths[i]) for i in chunk}
        groups: dict[tuple, list[int]] = {}  # (--preprocess none / scale_width keep each image's shape)
        for i in chunk:
            groups.setdefault(tuple(images[i].shape), []).append(i)
        for group in groups.values():
            x = torch.stack([images[i] for i in group]).to(device)
            try:
                outs = _outputs(model, name, opts, data, args, x, [originals[i] for i in group])
            except (RuntimeError, ValueError) as exc:  # (a size --preprocess none / scale_width gave; --size
                clear = _explain(exc, x, paths[group[0]])  # is probed up front)
                if clear is exc:
                    raise
                raise clear from exc
            for k, i in enumerate(group):
                path = os.path.join(args.output, names[i])
                if len(outs) == 1:
                    to_image(outs[0][k]).save(path)
                else:
                    save_grid([torch.stack([x[k]] + [o[k] for o in outs])], path)
                written.append(path)


def _outputs(model, name: str, opts: dict, data: dict, args, x, originals: list) -> list:
    """The generator's outputs for the inputs ``x``: one tensor, or for StarGAN without
    --target_attrs one per target row (the reference's create_labels of the images' own labels)."""
    import torch

    from ganengine.train.visuals import stargan_targets

    if name != "stargan":
        return [_forward(model, name, opts, x, bool(args.reverse))]
    c_dim = opts["c_dim"]
    if args.target_attrs:
        label = torch.cat([_target_labels(args.target_attrs, data, c_dim, o) for o in originals]).to(x.device)
        return [_forward(model, name, opts, x, False, label)]
    c_org = torch.stack([o if o is not None else torch.zeros(c_dim) for o in originals]).to(x.device)
    return [_forward(model, name, opts, x, False, t) for t in stargan_targets(c_org, data.get("selected_attrs"))]


def _explain(exc: Exception, x, path: str) -> Exception:
    """A size the networks cannot take, said in one line naming the image (else ``exc`` itself)."""
    from ganengine.train.engine import _SHAPE_ERRORS

    msg = " ".join(str(exc).split())
    if not any(p in msg for p in _SHAPE_ERRORS + ("Expected more than 1 value per channel",)):
        return exc
    h, w = x.shape[-2:]
    return UsageError(f"the networks cannot take {h}x{w} inputs ({path!r} after the training's preprocessing): "
                      f"pick a --size they can ({msg[:200]})")
