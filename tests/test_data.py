"""ganengine.data: reference layouts, transforms, sampler, built-in sample data, clear errors."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ganengine.data import (AlignedDataset, CaptionedDataset, CelebADataset, DataError, DomainFolderDataset,
                            ResumableSampler, SAMPLE_DIR, TransformOptions, UnalignedDataset, build_dataset,
                            make_loader, sample_root)
from ganengine.data import transforms as T
from ganengine.data.sampler import mix
from ganengine.data.text import CaptionEmbedder, embed
from tests._tolerance import assert_within_bound


def _img(path, w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path)
    return arr


# ------------------------------------------------------------------ built-in sample data
@pytest.mark.parametrize("model", ["pix2pix", "cyclegan", "stargan", "stackgan"])
def test_sample_data_loads(model):
    opts = {"load_size": 36, "crop_size": 32, "image_size": 32 if model == "stargan" else 64,
            "selected_attrs": ["Zero", "One", "Two"]}
    ds = build_dataset(model, opts)
    assert len(ds) >= 100
    item = ds[(3, 1234)]
    for k, v in item.items():
        if torch.is_tensor(v) and v.dim() == 3:
            assert v.dtype == torch.float32 and -1.0 <= v.min() and v.max() <= 1.0
            assert v.shape[0] == 3
    if model in ("pix2pix", "cyclegan"):
        assert item["A"].shape == item["B"].shape == (3, 32, 32)
    if model == "stargan":
        assert item["label"].shape == (3,) and set(item["label"].tolist()) <= {0.0, 1.0}
    if model == "stackgan":
        assert item["embedding"].shape == (1024,) and item["wrong_image"].shape == (3, 64, 64)


def test_sample_data_is_small_and_in_reference_layouts():
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(SAMPLE_DIR) for f in fs)
    assert total < 4 * 1024 * 1024
    assert os.path.isdir(os.path.join(sample_root("pix2pix"), "train"))
    assert os.path.isdir(os.path.join(sample_root("pix2pix"), "val"))
    for d in ("trainA", "trainB", "testA", "testB"):
        assert os.path.isdir(os.path.join(sample_root("cyclegan"), d))
    assert os.path.isfile(os.path.join(sample_root("stargan"), "list_attr_celeba.txt"))
    assert os.path.isfile(os.path.join(sample_root("stackgan"), "captions.txt"))


# ------------------------------------------------------------------ transforms
def test_aligned_pair_shares_crop_and_flip(tmp_path):
    half = _img(str(tmp_path / "h.png"), 40, 40, seed=1)
    ab = np.concatenate([half, half], axis=1)
    os.makedirs(tmp_path / "train")
    Image.fromarray(ab).save(tmp_path / "train" / "0.png")
    ds = AlignedDataset(str(tmp_path), "train", TransformOptions("resize_and_crop", 36, 32, True))
    for seed in range(12):
        item = ds[(0, seed)]
        assert item["A"].shape == (3, 32, 32)
        torch.testing.assert_close(item["A"], item["B"])  # same crop and flip on both halves
        assert torch.equal(item["A"], ds[(0, seed)]["A"])  # an item's seed fixes its augmentation
    crops = {tuple(ds[(0, s)]["A"][:, 0, 0].tolist()) for s in range(12)}
    assert len(crops) > 1  # random crops differ between items


def test_direction_and_channels(tmp_path):
    a = _img(str(tmp_path / "a.png"), 16, 16, seed=2)
    b = _img(str(tmp_path / "b.png"), 16, 16, seed=3)
    os.makedirs(tmp_path / "train")
    Image.fromarray(np.concatenate([a, b], 1)).save(tmp_path / "train" / "0.png")
    o = TransformOptions("none", 16, 16, False)
    ds = AlignedDataset(str(tmp_path), "train", o, direction="AtoB", input_nc=1)
    item = ds[0]
    assert item["A"].shape == (1, 16, 16) and item["B"].shape == (3, 16, 16)
    torch.testing.assert_close(item["B"], T.to_tensor(Image.fromarray(b)))  # halves are not swapped by the data
    ds = AlignedDataset(str(tmp_path), "train", o, direction="BtoA", input_nc=1)
    assert ds[0]["A"].shape == (3, 16, 16) and ds[0]["B"].shape == (1, 16, 16)


def test_preprocess_modes():
    img = Image.fromarray(np.zeros((30, 60, 3), np.uint8))
    g = torch.Generator().manual_seed(0)
    for mode, shape in [("resize_and_crop", (3, 16, 16)), ("crop", (3, 16, 16)), ("scale_width", (3, 16, 20)),
                        ("scale_width_and_crop", (3, 16, 16)), ("none", (3, 32, 60))]:
        o = TransformOptions(mode, 20, 16, True).check()
        assert T.apply(img, o, T.get_params(img.size, o, g)).shape == shape, mode
    with pytest.raises(ValueError, match="--crop_size"):
        TransformOptions("resize_and_crop", 16, 32).check()
    with pytest.raises(ValueError, match="--preprocess"):
        TransformOptions("zoom", 16, 16).check()


def test_tensor_image_round_trip():
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    t = T.to_tensor(Image.fromarray(arr))
    assert t.shape == (3, 5, 7) and t.min() >= -1 and t.max() <= 1
    assert np.array_equal(np.asarray(T.to_image(t)), arr)


# ------------------------------------------------------------------ sampler
def test_sampler_is_deterministic_and_resumes_mid_epoch():
    s = ResumableSampler(10, 3, shuffle=True, seed=7)
    s.set_epoch(2)
    full = list(s)
    assert len(full) == s.batches_per_epoch * 3 == 9
    s.set_epoch(2, start_batch=2)
    assert list(s) == full[6:]
    s.set_epoch(3)
    assert [i for i, _ in s] != [i for i, _ in full]  # a new order per epoch


def test_sampler_partitions_across_ranks():
    parts = []
    for rank in range(3):
        s = ResumableSampler(12, 2, shuffle=True, seed=1, rank=rank, world_size=3)
        s.set_epoch(0)
        parts.append([i for i, _ in s])
    assert all(len(p) == 4 for p in parts)
    assert sorted(sum(parts, [])) == list(range(12))


def test_ranks_see_one_process_items_and_item_seeds():
    """N processes at batch b see, batch by batch, the (index, augmentation seed) pairs one process
    at batch N*b sees: an item's crop / flip seed comes from its position in the whole epoch, not
    in the process's share (docs/training.md, DDP); one process keeps its seeds as before."""
    for n, world, b in ((12, 2, 3), (13, 3, 2), (7, 2, 2)):
        one = ResumableSampler(n, world * b, shuffle=True, seed=5)
        one.set_epoch(1)
        single = list(one)
        ranks = []
        for rank in range(world):
            s = ResumableSampler(n, b, shuffle=True, seed=5, rank=rank, world_size=world)
            s.set_epoch(1)
            ranks.append(list(s))
        steps = min(len(single) // (world * b), min(len(r) for r in ranks) // b)
        assert steps >= 1
        for k in range(steps):
            merged = sorted(sum((r[k * b:(k + 1) * b] for r in ranks), []))
            assert merged == sorted(single[k * world * b:(k + 1) * world * b]), (n, world, b, k)
    s = ResumableSampler(10, 3, shuffle=True, seed=7)
    s.set_epoch(2)
    assert [seed for _, seed in s][:3] == [mix(7, 2, 0, pos) for pos in range(3)]


def test_loader_same_batches_with_and_without_workers():
    ds = build_dataset("cyclegan", {"load_size": 36, "crop_size": 32})
    out = []
    for workers in (0, 2):
        loader, sampler = make_loader(ds, 4, seed=3, num_workers=workers)
        sampler.set_epoch(1)
        it = iter(loader)
        out.append([next(it) for _ in range(2)])
    for b0, b1 in zip(*out):
        assert torch.equal(b0["A"], b1["A"]) and torch.equal(b0["B"], b1["B"])


def test_cache_gives_same_pixels(tmp_path):
    for i in range(3):
        _img(str(tmp_path / "trainA" / f"{i}.png"), 20, 20, seed=i)
        _img(str(tmp_path / "trainB" / f"{i}.jpg"), 24, 20, seed=10 + i)
    o = TransformOptions("resize_and_crop", 20, 16)
    on = UnalignedDataset(str(tmp_path), "train", o, cache=True)
    off = UnalignedDataset(str(tmp_path), "train", o, cache=False)
    assert on.A.cached is not None and off.A.cached is None
    for i in range(3):
        a, b = on[(i, 99)], off[(i, 99)]
        assert torch.equal(a["A"], b["A"]) and torch.equal(a["B"], b["B"]) and a["B_paths"] == b["B_paths"]


# ------------------------------------------------------------------ StarGAN / StackGAN layouts
def test_celeba_layout(tmp_path):
    names = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    for i, n in enumerate(names):
        _img(str(tmp_path / "images" / n), 20, 24, seed=i)
    rows = ["a.jpg 1 -1 1", "b.jpg -1 1 1", "c.jpg 1 1 -1", "d.jpg -1 -1 -1"]
    (tmp_path / "list_attr_celeba.txt").write_text("4\nBlack_Hair Male Young\n" + "\n".join(rows) + "\n")
    ds = CelebADataset(str(tmp_path), ["Young", "Black_Hair"], crop_size=16, image_size=8, test_size=0)
    assert len(ds) == 4 and ds.c_dim == 2
    by_name = {os.path.basename(ds.images.paths[i]): ds[i]["label"].tolist() for i in range(4)}
    assert by_name == {"a.jpg": [1.0, 1.0], "b.jpg": [1.0, 0.0], "c.jpg": [0.0, 1.0], "d.jpg": [0.0, 0.0]}
    assert ds[0]["image"].shape == (3, 8, 8)
    test = CelebADataset(str(tmp_path), ["Young"], mode="test", crop_size=16, image_size=8, test_size=1)
    assert len(test) == 1


def test_domain_folder_layout(tmp_path):
    for d, n in (("angry", 2), ("happy", 3)):
        for i in range(n):
            _img(str(tmp_path / "train" / d / f"{i}.png"), 12, 12, seed=i)
    ds = build_dataset("stargan", {"dataroot": str(tmp_path), "crop_size": 12, "image_size": 8})
    assert isinstance(ds, DomainFolderDataset) and ds.domains == ["angry", "happy"]
    labels = torch.stack([ds[i]["label"] for i in range(5)])
    assert labels.tolist() == [[1, 0], [1, 0], [0, 1], [0, 1], [0, 1]]


def test_captions_and_embeddings(tmp_path):
    for i in range(3):
        _img(str(tmp_path / "images" / f"{i}.png"), 16, 16, seed=i)
    (tmp_path / "captions.txt").write_text("0.png\ta red bird\n0.png\ta small red bird\n1.png\ta blue bird\n2.png\ta cat\n")
    ds = CaptionedDataset(str(tmp_path), image_size=16, text_dim=64)
    assert ds.counts.tolist() == [2, 1, 1] and ds.text_dim == 64
    item = ds[(0, 5)]
    assert item["image"].shape == item["wrong_image"].shape == (3, 16, 16)
    assert not torch.equal(item["image"], item["wrong_image"])
    torch.save({"filenames": ["0.png", "1.png", "2.png"], "embeddings": torch.randn(3, 4, 10)},
               tmp_path / "embeddings.pt")
    ds = CaptionedDataset(str(tmp_path), image_size=16)
    assert ds.text_dim == 10 and ds.precomputed


def test_stackgan_reads_the_reference_pickles_keys_and_split(tmp_path):
    """The reference's filenames.pickle keys (no extension) and a train-split embeddings file while
    images/ holds both splits' classes (CUB): the file's list is the split."""
    keys = ["001.A/a_1", "001.A/a_2", "002.B/b_1", "200.Z/z_1"]
    for i, k in enumerate(keys):
        _img(str(tmp_path / "images" / (k + ".jpg")), 20, 16, seed=i)
    emb = torch.randn(3, 10, 8)
    torch.save({"filenames": keys[:3], "embeddings": emb}, tmp_path / "embeddings.pt")
    ds = CaptionedDataset(str(tmp_path), image_size=16)
    assert len(ds) == 3 and [os.path.relpath(p, tmp_path / "images") for p in ds.images.paths] == \
        [k + ".jpg" for k in keys[:3]]
    assert torch.equal(ds.embeddings, emb)
    torch.save({"filenames": keys[:2] + ["003.C/missing"], "embeddings": emb}, tmp_path / "embeddings.pt")
    with pytest.raises(DataError, match=r"names 1 image\(s\) not in .*003.C/missing.*with or without the extension"):
        CaptionedDataset(str(tmp_path), image_size=16)


def test_stackgan_crops_cub_birds_to_their_boxes(tmp_path):
    """CUB_200_2011's images.txt + bounding_boxes.txt: the reference's crop (1.5x the longer box
    side around its centre, clipped), then its resize and crop."""
    from ganengine.data.captioned import crop_to_box

    keys = ["001.A/a_1", "002.B/b_1"]
    for i, k in enumerate(keys):
        _img(str(tmp_path / "images" / (k + ".jpg")), 60, 40, seed=i)
    (tmp_path / "images.txt").write_text("1 001.A/a_1.jpg\n2 002.B/b_1.jpg\n")
    (tmp_path / "bounding_boxes.txt").write_text("1 10.0 5.0 20.0 12.0\n2 40.7 30.2 30.0 9.0\n")
    torch.save({"filenames": keys, "embeddings": torch.randn(2, 3, 8)}, tmp_path / "embeddings.pt")
    ds = CaptionedDataset(str(tmp_path), image_size=16, flip=False)
    assert ds.boxes == [(10, 5, 20, 12), (40, 30, 30, 9)]
    img = Image.open(tmp_path / "images" / "001.A" / "a_1.jpg").convert("RGB")
    assert crop_to_box(img, (10, 5, 20, 12)).size == (30, 26)  # x 5..35, y 0 (clipped)..26
    g = torch.Generator().manual_seed(7)
    got = ds.get(0, g)["image"]
    g = torch.Generator().manual_seed(7)
    T.randint(g, 2), T.randint(g, 0)  # (the embedding index and the wrong image's, drawn first)
    assert torch.equal(got, T.stackgan(crop_to_box(img, (10, 5, 20, 12)), 16, False, g))
    (tmp_path / "bounding_boxes.txt").write_text("1 10.0 5.0 20.0\n")
    with pytest.raises(DataError, match=r"bounding_boxes.txt:1: expected 5 fields"):
        CaptionedDataset(str(tmp_path), image_size=16)


def test_stackgan_resizes_bilinear_as_its_get_img():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    g = torch.Generator().manual_seed(3)
    got = T.stackgan(img, 16, False, g)
    g = torch.Generator().manual_seed(3)
    x, y = T.randint(g, 19 - 16), T.randint(g, 19 - 16)  # (load 19 = int(16 * 76 / 64))
    want = T.to_tensor(img.resize((19, 19), Image.BILINEAR).crop((x, y, x + 16, y + 16)))
    assert torch.equal(got, want)


def test_captions_with_a_byte_order_mark(tmp_path):
    for i in range(2):
        _img(str(tmp_path / "images" / f"{i}.png"), 16, 16, seed=i)
    (tmp_path / "captions.txt").write_bytes("0.png\ta red bird\n1.png\ta blue bird\n".encode("utf-8-sig"))
    assert CaptionedDataset(str(tmp_path), image_size=16, text_dim=32).counts.tolist() == [1, 1]


def test_stargan_crop_defaults_follow_the_kind_of_data(tmp_path):
    """The reference: --celeba_crop_size 178, --rafd_crop_size 256."""
    for d in ("angry", "happy"):
        _img(str(tmp_path / "rafd" / "train" / d / "0.png"), 12, 12)
    root = str(tmp_path / "rafd")
    assert build_dataset("stargan", {"dataroot": root, "image_size": 8}).crop_size == 256
    assert build_dataset("stargan", {"dataroot": root, "image_size": 8, "crop_size": 40}).crop_size == 40
    assert build_dataset("stargan", {"dataroot": root, "image_size": 8, "crop_size": 40,
                                     "rafd_crop_size": 30}).crop_size == 30
    for i, n in enumerate(("a.jpg", "b.jpg")):
        _img(str(tmp_path / "celeba" / "images" / n), 20, 24, seed=i)
    (tmp_path / "celeba" / "list_attr_celeba.txt").write_text("2\nMale Young\na.jpg 1 -1\nb.jpg -1 1\n")
    assert build_dataset("stargan", {"dataroot": str(tmp_path / "celeba"), "image_size": 8,
                                     "selected_attrs": ["Male"]}).crop_size == 178
    # the reference's RaFD split folder given as the data root: the error says what to pass
    with pytest.raises(DataError, match="one folder per domain.*Pass --dataroot the folder above it"):
        build_dataset("stargan", {"dataroot": str(tmp_path / "rafd" / "train"), "image_size": 8})


def test_celeba_test_split_is_the_references(tmp_path):
    from ganengine.data import labelled

    # the reference holds out lines with (i + 1) < 2000: 1999 of a full CelebA; a tenth of small sets
    names = [f"{i}.png" for i in range(30)]
    for i, n in enumerate(names):
        _img(str(tmp_path / "images" / n), 4, 4, seed=i)
    rows = "\n".join(f"{n} {1 if i % 2 else -1}" for i, n in enumerate(names))
    (tmp_path / "list_attr_celeba.txt").write_text(f"30\nMale\n{rows}\n")
    assert len(CelebADataset(str(tmp_path), ["Male"], mode="test", crop_size=4, image_size=4)) == 3
    assert labelled.test_split_size(202599) == 1999 and labelled.test_split_size(19990) == 1999
    assert labelled.test_split_size(19989) == 1998
    (tmp_path / "list_attr_celeba.txt").write_text(f"50\nMale\n{rows}\n")  # line 1 disagrees: truncated?
    with pytest.warns(UserWarning, match="line 1 says 50 images, the file lists 30"):
        CelebADataset(str(tmp_path), ["Male"], crop_size=4, image_size=4)


def test_held_out_split_takes_the_reference_test_transform(tmp_path):
    """sample / evaluate: the reference's test options (load_size = crop_size), the crop central
    (a random one in the reference's test), no flip."""
    for split in ("train", "val"):
        _img(str(tmp_path / split / "0.png"), 160, 40)  # halves of 80x40
    for pp in ("scale_width", "scale_width_and_crop", "resize_and_crop", "crop"):
        o = dict(dataroot=str(tmp_path), preprocess=pp, load_size=64, crop_size=32)
        val = build_dataset("pix2pix", o, phase="val")
        item = val[(0, 0)]["A"]
        half = Image.open(tmp_path / "val" / "0.png").convert("RGB").crop((0, 0, 80, 40))
        t = TransformOptions(pp, 32, 32, False)
        w, h = T._resized_size(80, 40, t)
        params = {"crop_pos": (int(round(max(0, w - 32) / 2)), int(round(max(0, h - 32) / 2))), "flip": False}
        assert torch.equal(item, T.apply(half, t, params)), pp


def test_text_embedder_is_stable_and_meaningful():
    e = CaptionEmbedder(256)
    a, b, c = e(["a small red bird", "a red bird", "the number 7 written by hand"])
    # normalised to 1, then the norm taken again here: two length-256 fp32 reductions, a sqrt
    # and a division (tests/_tolerance.py)
    assert_within_bound(a.norm(), torch.tensor(1.0), 1.0, n=2 * 256 + 4, acc_dtype=torch.float32)
    assert (a @ b) > 0.3 > abs(float(a @ c))
    torch.testing.assert_close(embed(["a small red bird"], 256)[0], a)  # deterministic across instances
    with pytest.raises(ValueError, match="no words"):
        e(["..."])


# ------------------------------------------------------------------ errors name the file and the fix
def test_error_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*--dataroot"):
        build_dataset("pix2pix", {"dataroot": str(tmp_path / "nope")})


def test_error_empty_split(tmp_path):
    os.makedirs(tmp_path / "trainA")
    os.makedirs(tmp_path / "trainB")
    _img(str(tmp_path / "trainA" / "x.png"), 8, 8)
    (tmp_path / "trainB" / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match=r"trainB.*contains no images"):
        build_dataset("cyclegan", {"dataroot": str(tmp_path)})


def test_error_unreadable_image(tmp_path):
    _img(str(tmp_path / "train" / "good.png"), 16, 8)
    (tmp_path / "train" / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match=r"broken\.jpg.*Replace or delete"):
        build_dataset("pix2pix", {"dataroot": str(tmp_path)})


def test_error_label_file_mismatch(tmp_path):
    _img(str(tmp_path / "images" / "a.jpg"), 8, 8)
    (tmp_path / "list_attr_celeba.txt").write_text("2\nMale Young\na.jpg 1 -1\nmissing.jpg -1 1\n")
    with pytest.raises(DataError, match=r"missing\.jpg.*must match the images"):
        CelebADataset(str(tmp_path), ["Male"], test_size=0)
    (tmp_path / "list_attr_celeba.txt").write_text("1\nMale Young\na.jpg 1\n")
    with pytest.raises(DataError, match=r"list_attr_celeba.txt:3"):
        CelebADataset(str(tmp_path), ["Male"], test_size=0)
    (tmp_path / "list_attr_celeba.txt").write_text("1\nMale Young\na.jpg 1 -1\n")
    with pytest.raises(DataError, match=r"--selected_attrs \['Bald'\].*Male Young"):
        CelebADataset(str(tmp_path), ["Bald"], test_size=0)


def test_error_missing_captions(tmp_path):
    for i in range(2):
        _img(str(tmp_path / "images" / f"{i}.png"), 8, 8, seed=i)
    (tmp_path / "captions.txt").write_text("0.png\ta caption\n")
    with pytest.raises(DataError, match=r"have no caption.*1\.png"):
        CaptionedDataset(str(tmp_path))
    (tmp_path / "captions.txt").write_text("0.png\ta\n1.png\tb\n9.png\tc\n")
    with pytest.raises(DataError, match=r"9\.png"):
        CaptionedDataset(str(tmp_path))


def _center_crop_reference(img: Image.Image, size: int) -> Image.Image:
    """torchvision's CenterCrop, written out: zero padding to the crop size first, then
    round((w - size) / 2) offsets."""
    w, h = img.size
    if size > w or size > h:
        pl, pt = (size - w) // 2 if size > w else 0, (size - h) // 2 if size > h else 0
        pr, pb = (size - w + 1) // 2 if size > w else 0, (size - h + 1) // 2 if size > h else 0
        arr = np.pad(np.asarray(img), ((pt, pb), (pl, pr), (0, 0)))
        img = Image.fromarray(arr)
        w, h = img.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


@pytest.mark.parametrize("size", [(300, 150), (100, 120), (178, 218), (179, 219)])
def test_stargan_center_crop_pads_small_images_as_torchvision(size):
    # issue: an image smaller than the crop was cropped to its own short side (a zoomed-in square)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    got = T.stargan(img, 178, 64, False, torch.Generator().manual_seed(0))
    want = T.to_tensor(_center_crop_reference(img, 178).resize((64, 64), Image.BILINEAR))
    assert torch.equal(got, want)


@pytest.mark.parametrize("size", [(7, 4), (35, 32), (32, 35), (39, 32), (36, 32)])
def test_class_folders_center_crop_long_edge_as_torchvision(size):
    # issue: the square crop used (w - s) // 2, one pixel off torchvision's round((w - s) / 2)
    from ganengine.data.classes import square_resize
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    s = min(size)
    got = square_resize(img, s, False, torch.Generator().manual_seed(0))
    assert torch.equal(got, T.to_tensor(_center_crop_reference(img, s)))


def test_translation_datasets_sort_paths_as_the_reference(tmp_path):
    # issue: a sub-folder's files came after the folder's own (the reference sorts the whole list)
    for p in ("trainA/2019/a.png", "trainA/2020.png", "trainB/b.png", "train/2019/x.png", "train/2020.png"):
        os.makedirs(os.path.dirname(tmp_path / p), exist_ok=True)
        Image.new("RGB", (16, 8)).save(tmp_path / p)
    un = UnalignedDataset(str(tmp_path), "train")
    assert [os.path.relpath(p, tmp_path) for p in un.A.paths] == ["trainA/2019/a.png", "trainA/2020.png"]
    al = AlignedDataset(str(tmp_path), "train")
    assert [os.path.relpath(p, tmp_path) for p in al.images.paths] == ["train/2019/x.png", "train/2020.png"]


@pytest.mark.parametrize("preprocess", ["resize_and_crop", "crop"])
def test_aligned_odd_width_takes_the_references_halves(tmp_path, preprocess):
    # the reference's B of an odd-width A|B image is its right w - w // 2 columns (one wider than A),
    # then both are resized / cropped to one size: B's pixels came from one column fewer here
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, (40, 81, 3), dtype=np.uint8)
    os.makedirs(tmp_path / "train")
    Image.fromarray(arr).save(tmp_path / "train" / "ab.png")
    o = TransformOptions(preprocess, 36, 32, False)
    ds = AlignedDataset(str(tmp_path), "train", transform=o)
    item = ds.get(0, torch.Generator().manual_seed(0))
    ab = Image.fromarray(arr)
    a, b = ab.crop((0, 0, 40, 40)), ab.crop((40, 0, 81, 40))
    params = T.get_params(a.size, o, torch.Generator().manual_seed(0))
    assert torch.equal(item["A"], T.apply(a, o, params)) and torch.equal(item["B"], T.apply(b, o, params))
    assert item["A"].shape == item["B"].shape
