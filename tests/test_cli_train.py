"""`ganengine train | translate | sample` end to end on the built-in sample data (tiny networks),
bad-input errors, and DDP with gloo on 2 processes."""
import csv
import os
import subprocess
import sys

import pytest
import torch

from ganengine.cli import main
from tests._train_utils import TINY_FLAGS, one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(model, tmp_path, extra="", steps=2):
    argv = (["train", model] + TINY_FLAGS.get(model, "").split() + ["--checkpoints_dir", str(tmp_path), "--name", "run",
            "--max_steps", str(steps), "--no_progress", "--tensorboard", "off"] + extra.split())
    return main(argv)


@pytest.mark.parametrize("model", ["pix2pix", "cyclegan", "stargan", "stackgan"])
def test_train_from_command_line(model, tmp_path, capsys):
    assert _train(model, tmp_path, "--sample_every 2 --save_every 1 --print_freq 1") == 0
    run = tmp_path / "run"
    assert sorted(f for f in os.listdir(run) if f.endswith(".pt")) == ["step_00000001.pt", "step_00000002.pt"]
    assert os.listdir(run / "samples") == ["step_00000002.png"]
    with open(run / "loss_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(float(v) == float(v) for v in rows[-1].values() if v)
    err = capsys.readouterr().err
    assert "built-in sample data" in err and "checkpoint:" in err


def test_translate_and_sample_commands(tmp_path):
    sample = os.path.join(ROOT, "ganengine", "data", "sample")
    assert _train("pix2pix", tmp_path / "p") == 0
    out = tmp_path / "out"
    assert main(["translate", "--checkpoint", str(tmp_path / "p" / "run"), "--aligned",
                 "--input", os.path.join(sample, "photos_paired", "val"), "--output", str(out)]) == 0
    from PIL import Image

    files = sorted(os.listdir(out))
    assert len(files) == 20 and Image.open(out / files[0]).size == (32, 32)
    assert main(["sample", "--checkpoint", str(tmp_path / "p" / "run"), "--output", str(tmp_path / "g.png"),
                 "--n", "5"]) == 0
    assert Image.open(tmp_path / "g.png").size[0] > Image.open(tmp_path / "g.png").size[1]

    assert _train("stargan", tmp_path / "s") == 0
    img = os.path.join(sample, "digits", "images", "0000.png")
    assert main(["translate", "--checkpoint", str(tmp_path / "s" / "run"), "--input", img,
                 "--output", str(tmp_path / "s_out"), "--target_attrs", "Two"]) == 0
    assert Image.open(tmp_path / "s_out" / "0000.png").size == (32, 32)
    assert main(["translate", "--checkpoint", str(tmp_path / "s" / "run"), "--input", img,
                 "--output", str(tmp_path / "s_all")]) == 0  # a row: input + every domain
    assert Image.open(tmp_path / "s_all" / "0000.png").size[0] > 4 * 32
    assert main(["translate", "--checkpoint", str(tmp_path / "s" / "run"), "--input", img,
                 "--output", str(tmp_path / "x"), "--target_attrs", "Blond_Hair"]) == 2

    assert _train("stackgan", tmp_path / "k") == 0
    caps = tmp_path / "caps.txt"
    caps.write_text("a handwritten digit seven\nthe number 3 written by hand\n")
    assert main(["translate", "--checkpoint", str(tmp_path / "k" / "run"), "--captions", str(caps),
                 "--output", str(tmp_path / "k_out"), "--n_per_caption", "2"]) == 0
    assert len([f for f in os.listdir(tmp_path / "k_out") if f.endswith(".png")]) == 4


def test_real_subprocess(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "ganengine", "train", "cyclegan"] + TINY_FLAGS["cyclegan"].split() + [
        "--checkpoints_dir", str(tmp_path), "--max_steps", "2", "--sample_every", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained cyclegan to step 2" in proc.stderr
    assert os.path.isfile(tmp_path / "cyclegan_sample" / "step_00000002.pt")
    assert len(os.listdir(tmp_path / "cyclegan_sample" / "samples")) == 2


def test_help_says_batch_size_is_per_process(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "cyclegan", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "PER PROCESS" in out and "--lambda_identity" in out and "--amp {off,bf16,fp16}" in out
    assert "--lambda_L1" not in out  # pix2pix's option is not offered for CycleGAN


# ------------------------------------------------------------------ bad input: each names the problem
@pytest.mark.parametrize("argv, message", [
    (["train", "cyclegan", "--batch_size", "0"], "--batch_size: expected a positive integer"),
    (["train", "cyclegan", "--amp", "fp8"], "invalid choice: 'fp8'"),
    (["train", "gan"], "invalid choice: 'gan'"),
    (["train", "pix2pix", "--ngf", "many"], "--ngf: invalid int value"),
])
def test_bad_arguments_exit_with_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("model, extra, message", [
    ("pix2pix", "--load_size 16 --crop_size 32", "--crop_size (32) must not exceed --load_size (16)"),
    ("cyclegan", "--dataroot /nonexistent/data", "'/nonexistent/data/trainA' does not exist"),
    ("stargan", "--selected_attrs Zero Bald", "--selected_attrs ['Bald'] not in"),
    ("stargan", "--c_dim 7", "--c_dim 7 does not match the data: 3 labels"),
    ("cyclegan", "--resume", "no checkpoint in"),
    ("cyclegan", "--netG resnet_5blocks", "netG"),
])
def test_bad_values_give_clear_errors(model, extra, message, tmp_path, capsys):
    assert _train(model, tmp_path, extra) == 2
    assert message in capsys.readouterr().err


# channel counts the data cannot give: one line naming the option and what the data has, before
# training (the pix2pix/CycleGAN ones were a conv2d traceback or "PatchDiscriminator: expected (N, 5,
# H, W)"; the synthesis ones said "channels=4" without the option)
@pytest.mark.parametrize("model, extra, message", [
    ("pix2pix", "--input_nc 4", "--input_nc 4: the pix2pix images are read as 3-channel RGB"),
    ("pix2pix", "--output_nc 2", "--output_nc 2: the pix2pix images are read as 3-channel RGB"),
    ("pix2pix", "--direction BtoA --output_nc 4", "--output_nc 4"),
    ("cyclegan", "--input_nc 4 --output_nc 4", "--input_nc 4: the CycleGAN images are read as 3-channel RGB"),
    ("dcgan", "--nc 4 --ngf 4 --ndf 4 --batch_size 2", "--nc 4: the images are read as 3-channel RGB"),
    ("wgan", "--channels 2 --img_size 8 --latent_dim 4 --batch_size 2", "--channels 2: the images are read as"),
    ("cgan", "--channels 4 --img_size 8 --latent_dim 4 --batch_size 2", "--channels 4"),
])
def test_channel_count_the_data_cannot_give(model, extra, message, tmp_path, capsys):
    assert _train(model, tmp_path, extra, steps=1) == 2
    err = capsys.readouterr().err
    assert message in err and "use --" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # reported before the run folder is touched


def test_grayscale_channels_train(tmp_path):
    # the reference's grayscale path (input_nc == 1) stays available
    assert _train("pix2pix", tmp_path, "--input_nc 1", steps=1) == 0
    state = torch.load(tmp_path / "run" / "step_00000001.pt", weights_only=True)
    assert state["options"]["input_nc"] == 1


# numeric model options: a clear line naming the option (was torch's "Invalid learning rate: -1.0",
# "Invalid beta parameter at index 0", or a RuntimeError traceback from a layer constructor)
@pytest.mark.parametrize("model, extra, message", [
    ("pix2pix", "--lr -1", "--lr (a learning rate) must be a number >= 0, got -1.0"),
    ("pix2pix", "--beta1 1.5", "--beta1 (an Adam beta) must be in [0, 1), got 1.5"),
    ("pix2pix", "--lambda_L1 nan", "--lambda_L1 must be a finite number, got nan"),
    ("pix2pix", "--init_gain -0.02", "--init_gain must be a number >= 0"),
    ("stargan", "--g_lr -0.1", "--g_lr (a learning rate) must be"),
    ("wgan", "--lr -1", "--lr (a learning rate) must be"),
    ("biggan", "--G_ch -1", "--G_ch must be a whole number >= 1, got -1"),
    ("biggan", "--dim_z 0", "--dim_z must be a whole number >= 1, got 0"),
    ("biggan", "--BN_eps=-1e-5", "--BN_eps must be a number > 0"),
    ("dcgan", "--ema true --ema_decay 1.5", "--ema_decay must be in [0, 1)"),
    # a misspelt 'SN' trained G without spectral norm; hier with fewer z entries than chunks failed
    # in the SN kernel; SAGAN's errors named the constructors' arguments (conv_dim, image_size)
    ("biggan", "--G_param sn", "--G_param must be 'SN' (spectral norm) or 'None' (plain layers), got 'sn'"),
    ("biggan", "--G_shared --hier --dim_z 3", "--dim_z 3 is smaller than the 4 chunks --hier splits z into"),
    ("sagan", "--g_conv_dim 4", "--g_conv_dim must be >= 8"),
    ("sagan", "--d_conv_dim 4", "--d_conv_dim must be >= 8"),
    ("sagan", "--imsize 32", "--imsize / --image_size must be 64 for SAGAN"),
])
def test_numeric_options_name_the_option(model, extra, message, tmp_path, capsys):
    assert _train(model, tmp_path, extra, steps=1) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "Invalid" not in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ DDP (gloo, 2 processes)
def _ddp_worker(rank, world, port, runs, out_dir):
    """One process of the group: several trainings in one process group (one spawn: fast)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from ganengine.cli import build_parser
    from ganengine.cli.train import make_config
    from ganengine.train import Trainer

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for tag, argv in runs:
            cfg, _ = make_config(build_parser().parse_args(argv))
            trainer = Trainer(cfg)
            steps = []  # this rank's own losses per step (the log averages them over the ranks)

            def recording(*a, _step=trainer.model.train_step, **k):
                out = _step(*a, **k)
                steps.append({n: float(v) for n, v in out.items()})
                return out
            trainer.model.train_step = recording
            trainer.train()
            # parameters only: running statistics are rank-local buffers (broadcast_buffers=False)
            torch.save({n: {k: v.detach().clone() for k, v in net.named_parameters()}
                        for n, net in trainer.networks.items()}, os.path.join(out_dir, f"{tag}_rank{rank}.pt"))
            torch.save(steps, os.path.join(out_dir, f"{tag}_losses_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same(a, b):
    return all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])


def test_ddp_gloo_two_processes_stay_in_sync_and_resume(tmp_path):
    common = ["--checkpoints_dir", str(tmp_path), "--no_progress", "--tensorboard", "off", "--deterministic",
              "--print_freq", "1"]
    sg = ["train", "stargan"] + TINY_FLAGS["stargan"].split() + common + ["--sample_every", "0"]
    px = ["train", "pix2pix"] + TINY_FLAGS["pix2pix"].split() + common + ["--sample_every", "2"]
    cg = ["train", "cyclegan"] + TINY_FLAGS["cyclegan"].split() + common + ["--sample_every", "0", "--pool_size", "1"]
    runs = [("full", sg + ["--name", "full", "--max_steps", "4"]),
            ("part", sg + ["--name", "part", "--max_steps", "2"]),
            ("resumed", sg + ["--name", "part", "--max_steps", "4", "--resume"]),
            ("bn", px + ["--name", "bn", "--max_steps", "2"]),
            # SAGAN's separate gradient-penalty step (its backward reaches no bias: averaged by hand)
            # and U-Net GAN's D (a layer the reference never calls): they crashed under DDP
            ("sagan_gp", ["train", "sagan", "--batch_size", "4", "--g_conv_dim", "8", "--d_conv_dim", "8", "--z_dim",
                          "16", "--adv_loss", "wgan-gp", "--max_steps", "2", "--name", "sagan_gp",
                          "--sample_every", "0"] + common),
            ("unetgan", ["train", "unetgan", "--batch_size", "2", "--G_ch", "4", "--D_ch", "4", "--dim_z", "8",
                         "--shared_dim", "8", "--max_steps", "1", "--name", "unetgan", "--sample_every", "0"] + common),
            # CycleGAN's image pools: each process draws and pools its own (they were seeded alike, and a
            # resume gave every process rank 0's pools)
            ("cg_full", cg + ["--name", "cg_full", "--max_steps", "4"]),
            ("cg_part", cg + ["--name", "cg_part", "--max_steps", "2"]),
            ("cg_resumed", cg + ["--name", "cg_part", "--max_steps", "4", "--resume"])]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), runs, str(tmp_path)), nprocs=2, join=True)
    r = {tag: [torch.load(tmp_path / f"{tag}_rank{k}.pt", weights_only=True) for k in range(2)] for tag, _ in runs}
    # the gradient all-reduce keeps ranks identical, with StarGAN's gradient penalty (autograd.grad
    # inside the process) and with pix2pix's BatchNorm discriminator called on fakes and reals
    for tag in r:
        assert _same(*r[tag]), tag
    assert not _same(r["part"][0], r["full"][0])
    assert _same(r["resumed"][0], r["full"][0])  # resuming a 2-process run is exact
    state = torch.load(tmp_path / "full" / "step_00000004.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]["per_rank"]) == 2
    assert os.listdir(tmp_path / "bn" / "samples") == ["step_00000002.png"]  # rank 0 alone writes
    assert _same(r["cg_resumed"][0], r["cg_full"][0])
    # the logged losses are the mean over the two processes (they were rank 0's own), row by row
    for tag in ("full", "cg_full"):
        per_rank = [torch.load(tmp_path / f"{tag}_losses_rank{k}.pt") for k in range(2)]
        with open(tmp_path / tag / "loss_log.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 4 and per_rank[0] != per_rank[1]
        for row, a, b in zip(rows, *per_rank):
            for name in a:
                assert float(row[name]) == pytest.approx((a[name] + b[name]) / 2, rel=1e-5, abs=1e-7), (tag, name)
    pools = torch.load(tmp_path / "cg_full" / "step_00000004.pt", weights_only=True)["extra_per_rank"]
    assert len(pools) == 2 and pools[0]["fake_A_pool"]["rng"] != pools[1]["fake_A_pool"]["rng"]
    assert pools[0]["fake_A_pool"]["rng"] != pools[0]["fake_B_pool"]["rng"]


def test_sync_bn_needs_cuda():
    from ganengine.train import distributed as D

    info = D.DistInfo(rank=0, world_size=2, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="--sync_bn needs CUDA"):
        D.wrap(torch.nn.BatchNorm2d(3), info, sync_bn=True)
    # one process: refused too (it was silently ignored there)
    with pytest.raises(ValueError, match="--sync_bn needs CUDA"):
        D.wrap(torch.nn.BatchNorm2d(3), D.DistInfo(rank=0, world_size=1, device=torch.device("cpu")), sync_bn=True)
    # BigGAN's own batch norms are not what SyncBatchNorm converts: said, not ignored
    from ganengine.models import build_network

    g = build_network("biggan_G", G_ch=2, resolution=32, G_attn="0", n_classes=3)
    with pytest.raises(ValueError, match=r"--sync_bn converts torch's BatchNorm layers; .*\(bn, ccbn"):
        D.wrap(g, info, sync_bn=True)


@pytest.mark.parametrize("arch", ["dcgan_G", "dcgan_D", "wgan_gp_G", "acgan_D"])
def test_sync_bn_conversion_keeps_the_fused_norms_activations(arch):
    """torch's convert_sync_batchnorm turns a BatchNormAct (a BatchNorm subclass that also
    activates; its activation layer is an Identity) into a plain SyncBatchNorm: every ReLU /
    LeakyReLU of the fused batch norms was lost under --sync_bn. ganengine's conversion keeps
    them: the same outputs (one process: SyncBatchNorm normalises as BatchNorm), same keys."""
    import copy

    from ganengine.models import build_network
    from ganengine.nn import SyncBatchNormAct, convert_sync_batchnorm  # (public, docs/batch_norm_act.md)

    torch.manual_seed(0)
    kw = {"dcgan_G": dict(ngf=4, nz=8), "dcgan_D": dict(ndf=4), "wgan_gp_G": dict(latent_dim=8, img_size=8),
          "acgan_D": dict(img_size=16, channels=3)}[arch]
    net = build_network(arch, **kw)
    x = {"dcgan_G": torch.randn(3, 8, 1, 1), "dcgan_D": torch.randn(3, 3, 64, 64), "wgan_gp_G": torch.randn(3, 8),
         "acgan_D": torch.randn(3, 3, 16, 16)}[arch]
    synced = convert_sync_batchnorm(copy.deepcopy(net))
    assert any(isinstance(m, SyncBatchNormAct) for m in synced.modules())
    assert list(synced.state_dict()) == list(net.state_dict())
    for mode in ("train", "eval"):
        getattr(net, mode)(), getattr(synced, mode)()
        torch.manual_seed(1)
        want = net(x)
        torch.manual_seed(1)
        got = synced(x)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_stackgan_batch_of_one_is_one_clear_line(tmp_path, capsys):
    """StackGAN's reference networks batch-normalise over the batch (BatchNorm1d after the text
    projection), so a batch of one cannot train: one line saying so and what to pass, not torch's
    "Expected more than 1 value per channel" (issue 16)."""
    flags = TINY_FLAGS["stackgan"].replace("--batch_size 4", "").split()
    argv = (["train", "stackgan"] + flags + ["--batch_size", "1", "--checkpoints_dir", str(tmp_path), "--name", "b1",
            "--max_steps", "2", "--no_progress", "--tensorboard", "off"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "at least 2 images" in err and "--batch_size 2" in err and "Traceback" not in err
    # refused before anything was written: the fresh --name leaves no folder behind (it held a .lock)
    assert not (tmp_path / "b1").exists()
    argv[argv.index("--checkpoints_dir") + 1] = str(tmp_path / "fresh" / "ck")  # nor a fresh --checkpoints_dir
    assert main(argv) == 2
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("model, flags", [("wgan", "--img_size 8 --latent_dim 4"), ("stackgan", None)])
def test_batch_of_one_refused_before_an_earlier_run_is_moved(model, flags, tmp_path, capsys):
    """A batch size the models cannot train was refused at the first step, after the earlier run in
    the folder had been moved to previous/ (its checkpoints then out of --resume's and sample's
    reach): now refused before the folder is touched."""
    flags = (TINY_FLAGS[model].replace("--batch_size 4", "") if flags is None else flags).split()
    base = ["train", model] + flags + ["--checkpoints_dir", str(tmp_path), "--name", "r", "--no_progress",
                                        "--tensorboard", "off", "--max_steps", "1"]
    assert main(base + ["--batch_size", "2"]) == 0
    before = sorted(os.listdir(tmp_path / "r"))
    assert main(base + ["--batch_size", "1"]) == 2
    assert "at least 2 images" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "r")) == before and "previous" not in before


@pytest.mark.slow
def test_train_with_compile_on_cpu(tmp_path):
    """--compile: every network under torch.compile with the fused ops inside (fake impls and
    registered autograd); the step runs and the losses stay finite (issue 16)."""
    assert _train("pix2pix", tmp_path, "--compile --print_freq 1") == 0
    with open(tmp_path / "run" / "loss_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(float(v) == float(v) for v in rows[-1].values() if v)


def test_cuda_graphs_needs_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert _train("pix2pix", tmp_path, "--cuda_graphs") == 2
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and "Traceback" not in err


# ------------------------------------------------------------------ option aliases and reference spellings
def _config(*argv):
    from ganengine.cli import build_parser
    from ganengine.cli.train import make_config

    args = build_parser().parse_args(["train", *argv])
    return args, make_config(args)[0]


def test_size_alias_default_never_counts_as_given(tmp_path, capsys):
    # --imsize / --resolution alone set the image size; the other spelling's default is not "given"
    with pytest.raises(ValueError, match="--imsize / --image_size must be 64 for SAGAN"):  # (its own limit, said)
        _config("sagan", "--imsize", "32")
    _, cfg = _config("biggan", "--resolution", "64")  # the sample data's default is 32
    assert cfg.model_options["resolution"] == 64 and cfg.data_options["image_size"] == 64
    _, cfg = _config("biggan", "--image_size", "16")
    assert cfg.model_options["resolution"] == 16
    for argv in (["--imsize", "32", "--image_size", "64"], ["--image_size", "64", "--imsize", "32"]):
        with pytest.raises(ValueError, match="--imsize 32 and --image_size 64 disagree"):
            _config("sagan", *argv)  # both given, different: still an error, in either order
    # end to end: the model's own limit, not a disagreement with a default
    assert main(["train", "sagan", "--imsize", "32", "--checkpoints_dir", str(tmp_path), "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert "image_size must be 64" in err and "disagree" not in err


def test_reference_spellings_of_engine_options(tmp_path):
    args, cfg = _config("sagan", "--total_step", "7")
    assert cfg.max_steps == 7
    args, cfg = _config("pix2pix", "--continue_train", "--epoch", "latest")
    assert cfg.resume == "latest"
    # the reference's train_pix2pix.sh passes --pool_size 0 (its pix2pix has no pool): accepted; any
    # other size is refused (it would do nothing)
    _, cfg = _config("pix2pix", "--pool_size", "0")
    assert "pool_size" not in cfg.model_options
    with pytest.raises(SystemExit):
        _config("pix2pix", "--pool_size", "50")
    _, cfg = _config("stargan", "--rafd_crop_size", "40", "--num_iters_decay", "5", "--lr_update_step", "2")
    assert cfg.data_options["rafd_crop_size"] == 40
    assert (cfg.model_options["num_iters_decay"], cfg.model_options["lr_update_step"]) == (5, 2)
    assert cfg.model_options["lr_schedule"] == "iterations"  # (the sample data's --max_steps)
    _, cfg = _config("stargan", "--max_steps", "9", "--lr_schedule", "epochs")
    assert cfg.model_options["lr_schedule"] == "epochs"
    _, cfg = _config("cyclegan", "--lr_policy", "step", "--lr_decay_iters", "3")
    assert (cfg.model_options["lr_policy"], cfg.model_options["lr_decay_iters"]) == ("step", 3)


def test_synthesis_flips_as_their_references():
    """SAGAN / BigGAN / BigGAN-deep: no flips unless --flip (BigGAN's --augment), as heykeetae's SAGAN
    and BigGAN-PyTorch; the PyTorch-GAN family likewise; --serial_batches for pix2pix too."""
    for model in ("sagan", "biggan", "biggan_deep", "dcgan"):
        _, cfg = _config(model)
        assert cfg.data_options["no_flip"] is True, model
    _, cfg = _config("biggan", "--augment")
    assert cfg.data_options["no_flip"] is False
    _, cfg = _config("sagan", "--flip")
    assert cfg.data_options["no_flip"] is False
    _, cfg = _config("pix2pix", "--serial_batches")
    assert cfg.data_options["serial_batches"] is True


@pytest.mark.parametrize("argv, message", [
    (["train", "pix2pix", "--epoch", "5"], "ganengine checkpoints by step, not by epoch"),
    (["train", "cyclegan", "--lr_policy"], "expected one argument"),
])
def test_reference_spellings_that_cannot_map_say_so(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_continue_train_resumes_the_newest_checkpoint(tmp_path, capsys):
    assert _train("cyclegan", tmp_path, "--save_every 1 --sample_every 0 --print_freq 1", steps=2) == 0
    assert _train("cyclegan", tmp_path, "--continue_train --epoch latest --sample_every 0 --print_freq 1", steps=3) == 0
    with open(tmp_path / "run" / "loss_log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3]
    state = torch.load(tmp_path / "run" / "step_00000003.pt", weights_only=True)
    assert state["step"] == 3
    assert _train("pix2pix", tmp_path, "--lr_policy plateau") == 2
    assert "lr_policy 'plateau' is not supported" in capsys.readouterr().err


def test_resume_iters_and_max_dataset_size(tmp_path, capsys):
    """StarGAN's --resume_iters N resumes the run's step-N checkpoint (a missing one, or both it and
    --resume, is an error naming the option); junyanz's --max_dataset_size reaches the data."""
    assert _train("stargan", tmp_path, "--save_every 1 --sample_every 0 --print_freq 1", steps=2) == 0
    assert _train("stargan", tmp_path, "--resume_iters 1 --sample_every 0 --print_freq 1", steps=3) == 0
    assert torch.load(tmp_path / "run" / "step_00000003.pt", weights_only=True)["step"] == 3
    with open(tmp_path / "run" / "loss_log.csv") as f:  # (the log continues from step 1)
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3]
    capsys.readouterr()
    assert _train("stargan", tmp_path, "--resume_iters 9") == 2
    assert "--resume_iters 9" in capsys.readouterr().err
    assert _train("stargan", tmp_path, "--resume_iters 1 --resume") == 2
    assert "--resume or --resume_iters, not both" in capsys.readouterr().err
    _, cfg = _config("cyclegan", "--max_dataset_size", "5")
    assert cfg.data_options["max_dataset_size"] == 5


def test_stargan_num_iters_decays_by_iterations(tmp_path):
    # --num_iters 4 --num_iters_decay 8 --lr_update_step 2: drops of 1e-4 * 2 / 8 after steps 2 and 4
    assert _train("stargan", tmp_path, "--num_iters_decay 8 --lr_update_step 2 --sample_every 0", steps=4) == 0
    state = torch.load(tmp_path / "run" / "step_00000004.pt", weights_only=True)
    assert [o["param_groups"][0]["lr"] for o in state["optimizers"].values()] == pytest.approx([5e-5, 5e-5])


@pytest.mark.parametrize("model,extra", [("stargan", ""), ("wgan_gp", ""), ("sagan", "--adv_loss wgan-gp"),
                                         ("biggan", "--latent_optimisation")])
def test_compile_refuses_a_double_backward_up_front(model, extra, tmp_path, capsys):
    """--compile with a step that differentiates a gradient (AOTAutograd has no double backward):
    one line naming --compile and why, before any step (it crashed with a traceback mid-step)."""
    argv = (["train", model, "--checkpoints_dir", str(tmp_path), "--name", "run", "--max_steps", "1",
             "--no_progress", "--tensorboard", "off", "--compile"] + TINY_FLAGS.get(model, "").split() + extra.split())
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--compile:" in err and "double backward" in err and "Traceback" not in err


def test_loss_log_leaves_losses_a_step_did_not_compute_empty(tmp_path):
    """StarGAN with --n_critic 2: the generator's losses exist every other step; the rows between
    have empty cells (as the rows written before the column appeared), never "nan", which a plot or
    a divergence check reads as a failure."""
    assert _train("stargan", tmp_path, "--sample_every 0 --print_freq 1", steps=4) == 0
    with open(tmp_path / "run" / "loss_log.csv") as f:
        rows = list(csv.DictReader(f))
    g_cols = [c for c in rows[0] if c.startswith("G/")]
    assert g_cols and [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert all(v != "nan" for v in r.values()), r
        assert all((r[c] == "") == (int(r["step"]) % 2 == 1) for c in g_cols), r


def test_stackgan_stage2_builds_on_a_ganengine_stage1_checkpoint(tmp_path, capsys):
    """--stage1_g takes the Stage-I checkpoint ganengine wrote (it wanted a reference state dict),
    and --stage 2 defaults to Stage II's 256 pixels (Stage I's default 64 was applied)."""
    from ganengine.train.checkpoint import load_model

    assert _train("stackgan", tmp_path, "--save_every 1 --sample_every 0", steps=1) == 0
    stage1 = str(tmp_path / "run" / "step_00000001.pt")
    rc = main(["train", "stackgan", "--stage", "2", "--stage1_g", stage1, "--checkpoints_dir", str(tmp_path),
               "--name", "s2", "--no_progress", "--tensorboard", "off", "--max_steps", "1", "--sample_every", "0",
               "--r_num", "1"] + TINY_FLAGS["stackgan"].split())
    assert rc == 0, capsys.readouterr().err
    s1, _ = load_model(stage1)
    s2, state = load_model(str(tmp_path / "s2" / "step_00000001.pt"))
    assert state["data"]["image_size"] == 256
    # its parameters frozen (its batch norms' running statistics move in training mode, as the reference's)
    for (k, v), w in zip(s1.netG.named_parameters(), s2.netG.STAGE1_G.parameters()):
        assert torch.equal(w, v), k


def test_hdf5_dataroot_trains_at_its_own_image_size(tmp_path):
    """BigGAN's reference trains at its HDF5 file's size; the 128 default resampled a 16 px file
    silently. Without --image_size the file's size is taken (and said; a size the networks do not
    take keeps the default); given, it is kept."""
    h5py = pytest.importorskip("h5py")
    import numpy as np

    path = tmp_path / "tiny.hdf5"
    with h5py.File(path, "w") as f:
        f["imgs"] = np.random.default_rng(0).integers(0, 256, (6, 3, 64, 64), dtype=np.uint8)
        f["labels"] = np.array([0, 1, 0, 1, 0, 1])
    _, cfg = _config("biggan", "--dataroot", str(path))
    assert cfg.data_options["image_size"] == 64 and cfg.model_options["resolution"] == 64
    _, cfg = _config("biggan", "--dataroot", str(path), "--image_size", "32")
    assert cfg.data_options["image_size"] == 32
