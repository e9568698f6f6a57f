"""IC-GAN data and training: feature-file validation, k-NN neighbourhoods against a brute-force
search, the (instance, neighbour) items, the training step against a re-write of ic_gan's
train_fns.GAN_training_function, and ``ganengine train icgan`` / ``--resume`` / ``ganengine
sample`` at a tiny size."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ganengine.data import DataError, build_dataset
from ganengine.data import instance_features as IF
from tests._train_utils import one_thread  # noqa: F401 (fixture)
from tests.test_sagan_biggan import _ema_ref, _ortho_ref, _toggle

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks; two spinning OpenMP threads are 10x slower under load


# ----------------------------------------------------------------------------- feature files
@pytest.mark.parametrize("make,name,match", [
    (lambda: np.zeros((4, 3)) + 1, "f.npy", "has 4 rows but the dataset has 5 items"),
    (lambda: np.ones(5), "f.npy", r"must be \(N, D\)"),
    (lambda: np.ones((5, 0)), "f.npy", "D must be > 0"),
    (lambda: np.where(np.eye(5, 3) > 0, np.nan, 1.0), "f.npy", "rows hold NaN or infinite"),
    (lambda: np.vstack([np.ones((4, 3)), np.zeros((1, 3))]), "f.npy", "rows are all zero"),
    (lambda: np.array([["a"] * 3] * 5), "f.npy", "must hold numbers"),
    (lambda: {"a": np.ones((5, 3)), "b": np.ones((5, 3))}, "f.npz", "name it 'feats' or 'features'"),
    (lambda: None, "missing.npy", "no such file"),
    (lambda: np.ones((5, 3)), "f.txt", "must be a .npy or .npz"),
])
def test_feature_file_errors_name_the_argument(tmp_path, make, name, match):
    path = str(tmp_path / name)
    obj = make()
    if isinstance(obj, dict):
        np.savez(path, **obj)
    elif obj is not None:
        with open(path, "wb") as f:
            np.save(f, obj)
    with pytest.raises(DataError, match=r"--feature_file .*" + match):
        IF.load_feature_file(path, 5)


def test_feature_file_is_read_and_normalised(tmp_path):
    x = np.random.RandomState(0).randn(5, 3).astype(np.float64)
    np.savez(tmp_path / "f.npz", feats=x, other=np.ones(2))
    got = IF.load_feature_file(str(tmp_path / "f.npz"), 5)
    torch.testing.assert_close(got, F.normalize(torch.from_numpy(x).float(), dim=1))
    # rows of huge or tiny values (fp32's norm overflows above ~1.8e19, underflows below ~1e-19):
    # unit rows, the same directions (fp32 rounding of the result: rtol 2**-22 plus the fp64 norm's)
    for scale in (1e20, 1e-25, 1e300, 1e-300):
        np.save(tmp_path / "s.npy", x * scale)
        got = IF.load_feature_file(str(tmp_path / "s.npy"), 5)
        torch.testing.assert_close(got, F.normalize(torch.from_numpy(x), dim=1).float(), rtol=2 ** -21, atol=2 ** -24)


# ----------------------------------------------------------------------------- neighbourhoods
def test_knn_equals_a_brute_force_search():
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(37, 5, generator=g, dtype=torch.float64), dim=1).float()
    got = IF.knn_neighbourhoods(feats, 6, chunk=8)  # chunks with a ragged last one
    d = torch.cdist(feats.double(), feats.double())  # the reference's L2 distance on normalised features
    for i in range(37):
        order = [j for j in torch.argsort(d[i]).tolist() if j != i][:6]
        assert got[i].tolist() == order, i
    with pytest.raises(DataError, match=r"--k_nn must be an int in \[1, 36\]"):
        IF.knn_neighbourhoods(feats, 37)


def test_items_are_neighbours_of_the_instance_and_reproducible():
    ds = build_dataset("icgan", dict(image_size=32, k_nn=5))
    bank = ds.bank
    assert bank.features.shape == (1000, 64) and bank.neighbours.shape == (1000, 5)
    torch.testing.assert_close(bank.features.norm(dim=1), torch.ones(1000))
    for i in (0, 17, 999):
        item = ds[(i, 123)]
        assert int(item["neighbour"]) in bank.neighbours[i].tolist() and int(item["index"]) == i
        torch.testing.assert_close(item["feature"], bank.features[i])
        assert int(item["label"]) == int(ds.labels[int(item["neighbour"])])
        again = ds[(i, 123)]
        assert torch.equal(again["image"], item["image"]) and int(again["neighbour"]) == int(item["neighbour"])
    assert len({int(ds[(3, s)]["neighbour"]) for s in range(40)}) > 1  # drawn, not fixed
    held = build_dataset("icgan", dict(image_size=32, k_nn=5), phase="test")
    assert held.bank is bank  # computed once per process
    assert int(held[(7, 1)]["neighbour"]) == 7  # sample grids: the instance itself
    # pixel features put look-alikes together: most neighbours share the instance's digit
    same = (bank.labels[bank.neighbours] == bank.labels[:, None]).float().mean()
    assert same > 0.5, float(same)


# ----------------------------------------------------------------------------- the training step
def _tiny_bank(n=12, d=6, k=3, n_classes=4):
    g = torch.Generator().manual_seed(7)
    feats = F.normalize(torch.randn(n, d, generator=g), dim=1)
    return IF.InstanceBank(feats, IF.knn_neighbourhoods(feats, k), torch.arange(n) % n_classes, "test")


def _ref_step(G, D, G_ema, oG, oD, bank, x, y, h, o, itr):
    """ic_gan train_fns.GAN_training_function (hinge, no split_D) with the conditionings drawn as
    sample_conditioning_instance_balance (z first, then instances, then a neighbour each; here
    from torch's generator as ganengine does), and BigGAN's utils.ema."""
    cc = o["class_cond"]

    def conditionings(n):
        z = torch.randn(n, G.dim_z) * o["z_var"]
        idx = torch.randint(0, len(bank), (n,))
        pick = torch.randint(0, bank.neighbours.shape[1], (n,))
        return z, (bank.labels[bank.neighbours[idx, pick]] if cc else None), bank.features[idx]

    bs = x.shape[0] // o["num_D_steps"]
    xs, ys, hs = torch.split(x, bs), torch.split(y, bs), torch.split(h, bs)
    _toggle(D, True)
    _toggle(G, False)
    for step in range(o["num_D_steps"]):
        oD.zero_grad()
        z, gy, gf = conditionings(bs)
        with torch.no_grad():
            G_z = G(z, gy, gf)
        d_out = D(torch.cat([G_z, xs[step]]), torch.cat([gy, ys[step]]) if cc else None, torch.cat([gf, hs[step]]))
        D_fake, D_real = torch.split(d_out, [bs, bs])
        loss_real, loss_fake = torch.mean(F.relu(1. - D_real)), torch.mean(F.relu(1. + D_fake))
        (loss_real + loss_fake).backward()
        if o["D_ortho"] > 0:
            _ortho_ref(D, o["D_ortho"])
        oD.step()
    _toggle(D, False)
    _toggle(G, True)
    oG.zero_grad()
    z, gy, gf = conditionings(bs)
    G_loss = -torch.mean(D(G(z, gy, gf), gy, gf))
    G_loss.backward()
    if o["G_ortho"] > 0:
        _ortho_ref(G, o["G_ortho"], blacklist=list(G.shared.parameters()))
    oG.step()
    _ema_ref(G, G_ema, itr, o)
    return {"D_loss_real": loss_real, "D_loss_fake": loss_fake, "G_loss": G_loss}


@pytest.mark.parametrize("class_cond", [False, True], ids=["ic", "cc"])
def test_step_matches_the_reference_step(class_cond):
    from ganengine.models import ICGAN
    from tests import reference_nets_icgan as R

    torch.manual_seed(3)
    o = dict(resolution=32, n_classes=4, G_ch=4, D_ch=4, G_attn="0", D_attn="16", hier=True, dim_z=16, shared_dim=6,
             G_shared_feat=True, shared_dim_feat=5, instance_sz=6, class_cond=class_cond, num_D_steps=2,
             G_ortho=1e-3, D_ortho=1e-3, ema=True, ema_start=2, ema_decay=0.9)
    model = ICGAN(**o)
    model.set_bank(_tiny_bank())
    o = model.options
    arch = dict(G_ch=4, dim_z=16, resolution=32, G_attn="0", n_classes=4, hier=True, shared_dim=6, SN_eps=1e-8,
                class_cond=class_cond, shared_dim_feat=5, feat_in=6)
    G, G_ema = R.Generator(**arch), R.Generator(**arch)
    D = R.Discriminator(D_ch=4, resolution=32, D_attn="16", n_classes=4, SN_eps=1e-8, class_cond=class_cond,
                        instance_sz=6)
    for net, name in ((G, "G"), (D, "D"), (G_ema, "G_ema")):
        net.load_state_dict(getattr(model, name).state_dict())
    opts = model.make_optimizers()
    oG = torch.optim.Adam(G.parameters(), o["G_lr"], betas=(0.0, 0.999), eps=1e-8)
    oD = torch.optim.Adam(D.parameters(), o["D_lr"], betas=(0.0, 0.999), eps=1e-8)
    bank = model.bank
    batch = {"image": torch.rand(4, 3, 32, 32) * 2 - 1, "label": torch.tensor([0, 3, 1, 2]),
             "feature": bank.features[torch.tensor([1, 5, 2, 9])]}
    for itr in (1, 2, 3):
        torch.manual_seed(100 + itr)
        got = model.train_step(batch, opts)
        torch.manual_seed(100 + itr)
        want = _ref_step(G, D, G_ema, oG, oD, bank, batch["image"], batch["label"], batch["feature"], o, itr)
        for k in want:
            torch.testing.assert_close(got[k], want[k].detach(), atol=2e-4 * (1 + abs(float(want[k].detach()))),
                                       rtol=0, msg=f"step {itr}: {k}")
    drift = 3 * 3 * max(o["G_lr"], o["D_lr"])  # Adam steps of +-lr on rounding-noise gradients (see test_sagan_biggan)
    for net, name in ((G, "G"), (D, "D"), (G_ema, "G_ema")):
        got_sd = getattr(model, name).state_dict()
        for k, v in net.state_dict().items():
            torch.testing.assert_close(got_sd[k], v, atol=drift, rtol=1e-3, msg=f"{name}.{k}")
    if not class_cond:
        assert model.G.shared.weight.grad is None  # IC-GAN leaves the class embedding unused


def test_model_checks_the_feature_width():
    from ganengine.models import ICGAN

    model = ICGAN(resolution=32, n_classes=4, G_ch=4, D_ch=4, G_attn="0", D_attn="0", instance_sz=5,
                  shared_dim_feat=5)
    with pytest.raises(ValueError, match="6-dimensional but instance_sz is 5"):
        model.set_bank(_tiny_bank())
    model = ICGAN(resolution=32, n_classes=4, G_ch=4, D_ch=4, G_attn="0", D_attn="0", instance_sz=6)
    with pytest.raises(ValueError, match="shared_dim_feat must be their width 6"):
        model.set_bank(_tiny_bank())


# ----------------------------------------------------------------------------- command line
TINY = ("--G_ch 4 --D_ch 4 --G_attn 0 --D_attn 0 --dim_z 16 --shared_dim 4 --shared_dim_feat 4 --batch_size 2 "
        "--k_nn 3 --ema_start 1 --sample_every 0 --save_every 2 --print_freq 1 --deterministic --no_progress "
        "--tensorboard off")


def test_train_resume_and_sample_from_the_command_line(tmp_path, capsys):
    from PIL import Image

    from ganengine.cli import main

    feats = np.random.RandomState(0).randn(1000, 6).astype(np.float32)
    np.save(tmp_path / "f.npy", feats)

    def train(name, steps, extra=""):
        argv = ["train", "icgan", "--class_cond", "--feature_file", str(tmp_path / "f.npy"), "--checkpoints_dir",
                str(tmp_path), "--name", name, "--max_steps", str(steps)] + TINY.split() + extra.split()
        return main(argv)

    assert train("full", 4) == 0
    assert train("part", 2) == 0 and train("part", 4, "--resume") == 0
    a = torch.load(tmp_path / "full" / "step_00000004.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "step_00000004.pt", weights_only=True)
    assert a["options"]["instance_sz"] == 6 and a["options"]["class_cond"] is True
    for net in ("G", "D", "G_ema"):
        for k, v in a["networks"][net].items():
            torch.testing.assert_close(b["networks"][net][k], v, atol=0, rtol=0, msg=f"{net}.{k}")
    assert main(["sample", "--checkpoint", str(tmp_path / "part"), "--output", str(tmp_path / "g.png"),
                 "--n", "3", "--max_rows", "2"]) == 0
    w, h = Image.open(tmp_path / "g.png").size
    assert w > 3 * 32 and h >= 2 * 32  # 2 rows: the instance, then 2 generated images
    features = os.path.join(os.path.dirname(os.path.abspath(__file__)), "feature_extractor.py")
    out = tmp_path / "m.json"
    assert main(["evaluate", "--checkpoint", str(tmp_path / "part"), "--metrics", "fid,intra_fid", "--num_samples",
                 "20", "--batch_size", "10", "--max_images", "300", "--feature_extractor",
                 f"{features}:SmallFeatureExtractor", "--output", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    assert result["fid"] == result["fid"] and result["fid"] > 0 and result["images"] == 20
    capsys.readouterr()
    assert train("bad", 1, "--instance_sz 5") == 2
    assert "--instance_sz 5 (given, or a sample-data default) does not match the instance features' width 6" in capsys.readouterr().err
    np.save(tmp_path / "short.npy", feats[:10])
    assert main(["train", "icgan", "--feature_file", str(tmp_path / "short.npy"), "--checkpoints_dir",
                 str(tmp_path), "--name", "bad2", "--max_steps", "1"] + TINY.split()) == 2
    assert "has 10 rows but the dataset has 1000 items" in capsys.readouterr().err
    # the feature file moved: sample takes it with --feature_file; a file whose features changed
    # (same width, other values; another width) is said, not sampled from silently
    os.replace(tmp_path / "f.npy", tmp_path / "moved.npy")
    sample = ["sample", "--checkpoint", str(tmp_path / "part"), "--output", str(tmp_path / "g2.png"), "--n", "2"]
    assert main(sample) == 2 and "no such file" in capsys.readouterr().err
    assert main(sample + ["--feature_file", str(tmp_path / "moved.npy")]) == 0
    for changed in (feats[::-1].copy(), np.random.RandomState(1).randn(1000, 8).astype(np.float32)):
        np.save(tmp_path / "moved.npy", changed)
        capsys.readouterr()
        assert main(sample + ["--feature_file", str(tmp_path / "moved.npy")]) == 2
        assert "its features are not those the model was trained with" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(tmp_path / "full"), "--output", str(tmp_path / "g3.png"),
                 "--feature_file", str(tmp_path / "moved.npy")]) == 2  # (still the changed file)


def test_moved_or_old_feature_files_resume_and_evaluate(tmp_path, capsys):
    """A run whose feature file moved resumes and evaluates with --feature_file (the recorded
    digest says the features are the same; resume compared the path); a checkpoint written before
    digests resumes with the same file; a file whose features changed is said as such."""
    import json
    import shutil

    from ganengine.cli import main

    feats = np.random.RandomState(0).randn(1000, 6).astype(np.float32)
    np.save(tmp_path / "f.npy", feats)
    common = ["--checkpoints_dir", str(tmp_path), "--sample_every", "0"] + TINY.split()
    assert main(["train", "icgan", "--feature_file", str(tmp_path / "f.npy"), "--name", "r", "--max_steps", "2"]
                + common) == 0
    ckpt = tmp_path / "r" / "step_00000002.pt"
    os.makedirs(tmp_path / "moved")
    os.replace(tmp_path / "f.npy", tmp_path / "moved" / "f.npy")
    moved = str(tmp_path / "moved" / "f.npy")
    assert main(["train", "icgan", "--feature_file", moved, "--name", "r", "--max_steps", "3", "--resume"]
                + common) == 0, capsys.readouterr().err
    features = os.path.join(os.path.dirname(os.path.abspath(__file__)), "feature_extractor.py")
    out = tmp_path / "m.json"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--metrics", "fid", "--num_samples", "10", "--batch_size",
                 "10", "--max_images", "20", "--feature_extractor", f"{features}:SmallFeatureExtractor",
                 "--feature_file", moved, "--output", str(out)]) == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["images"] == 10
    # a checkpoint from before digests, the same file where it was (moved: nothing to tell it by)
    state = torch.load(ckpt, weights_only=False)
    state["options"].pop("feature_digest")
    state["data"].pop("feature_digest", None)
    torch.save(state, tmp_path / "old.pt")
    shutil.copy(moved, tmp_path / "f.npy")
    assert main(["train", "icgan", "--feature_file", str(tmp_path / "f.npy"), "--name", "old", "--max_steps", "3",
                 "--resume", str(tmp_path / "old.pt")] + common) == 0, capsys.readouterr().err
    # other features in the file: said as such
    np.save(moved, feats[::-1].copy())
    capsys.readouterr()
    assert main(["train", "icgan", "--feature_file", moved, "--name", "r", "--max_steps", "4", "--resume"]
                + common) == 2
    assert "holds other features than the run was trained with" in capsys.readouterr().err
