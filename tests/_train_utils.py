"""Tiny configurations shared by the training tests (fast on a 2-core CPU)."""
import pytest
import torch

from ganengine.train import TrainConfig


@pytest.fixture(autouse=False)
def one_thread():
    """Tiny networks run fastest on one thread, and a busy machine makes two OpenMP threads
    spin-wait on each other (measured here: 35x slower under load); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

DIGITS = ["Zero", "One", "Two"]

TINY = {
    "pix2pix": (dict(netG="resnet_6blocks", ngf=4, ndf=4, n_layers_D=2, crop_size=32),
                dict(load_size=36, crop_size=32)),
    "cyclegan": (dict(netG="resnet_6blocks", ngf=4, ndf=4, n_layers_D=2, crop_size=32),
                 dict(load_size=36, crop_size=32)),
    "stargan": (dict(image_size=32, g_conv_dim=4, d_conv_dim=4, g_repeat_num=1, d_repeat_num=5, c_dim=3,
                     n_critic=2),
                dict(crop_size=32, image_size=32, selected_attrs=DIGITS)),
    "stackgan": (dict(gf_dim=8, df_dim=4, condition_dim=8, z_dim=8, text_dim=1024), dict(image_size=64)),
}

# CLI flags for the same tiny networks
TINY_FLAGS = {
    "pix2pix": "--netG resnet_6blocks --ngf 4 --ndf 4 --n_layers_D 2 --load_size 36 --crop_size 32 --batch_size 2",
    "cyclegan": "--netG resnet_6blocks --ngf 4 --ndf 4 --n_layers_D 2 --load_size 36 --crop_size 32 --batch_size 2",
    "stargan": "--g_conv_dim 4 --d_conv_dim 4 --g_repeat_num 1 --d_repeat_num 5 --n_critic 2 --batch_size 4 "
               "--selected_attrs Zero One Two",
    "stackgan": "--gf_dim 8 --df_dim 4 --condition_dim 8 --z_dim 8 --batch_size 4",
}


def tiny_config(model, run_dir, **kw):
    model_opts, data_opts = TINY[model]
    base = dict(model=model, model_options=dict(model_opts), data_options=dict(data_opts), run_dir=str(run_dir),
                batch_size=2 if model in ("pix2pix", "cyclegan") else 4, max_steps=4, sample_every=0,
                save_every=0, print_freq=1, progress=False, tensorboard="off", seed=0, deterministic=True)
    base.update(kw)
    return TrainConfig(**base)


def cli_error(capsys, argv, *words):
    """Run ``ganengine <argv>``: exit code 2 and one error line holding ``words`` (no traceback);
    returns that line."""
    from ganengine.cli import main

    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err
    line = err.splitlines()[-1]
    assert line.startswith(f"ganengine {argv[0]}: error:"), err
    for word in words:
        assert word in line, (word, line)
    return line


def float64_step(model, batch):
    """One training step of ``model`` with its networks in float64 (noise drawn in float64 too)."""
    for name in model.network_names:
        getattr(model, name).double()
    opts = model.make_optimizers()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return model.train_step(batch, opts)
    finally:
        torch.set_default_dtype(old)
