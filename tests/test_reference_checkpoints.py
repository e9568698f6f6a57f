"""Reference checkpoints: load what the reference code saves, save what it can load.

Checkpoints here are written by the reference copies in tests/reference_nets.py exactly as the
reference code writes them (``torch.save(net.state_dict(), path)``).
"""
import pickle

import pytest
import torch

from tests import reference_nets as R
from tests._model_bounds import assert_normwise, census
from ganengine.models import (ARCHS, CheckpointMismatchError, build_network, load_reference_checkpoint,
                              save_reference_checkpoint)

# (arch, arch kwargs, reference network, inputs)
CASES = [
    ("resnet_6blocks", dict(ngf=8), lambda: R.define_G(3, 3, 8, "resnet_6blocks", "instance"),
     lambda: (torch.randn(1, 3, 16, 16),)),
    ("unet_128", dict(ngf=2, use_dropout=True), lambda: R.define_G(3, 3, 2, "unet_128", "batch", True),
     lambda: (torch.randn(1, 3, 128, 128),)),
    ("patchgan", dict(input_nc=6, ndf=4, norm="batch"), lambda: R.define_D(6, 4, "basic", norm="batch"),
     lambda: (torch.randn(2, 6, 32, 32),)),
    ("pixel", dict(ndf=4), lambda: R.define_D(3, 4, "pixel", norm="instance"), lambda: (torch.randn(1, 3, 8, 8),)),
    ("stargan_G", dict(conv_dim=4, c_dim=3, repeat_num=1), lambda: R.StarGenerator(4, 3, 1),
     lambda: (torch.randn(2, 3, 16, 16), torch.eye(3)[:2])),
    ("stargan_D", dict(image_size=16, conv_dim=4, c_dim=3, repeat_num=2), lambda: R.StarDiscriminator(16, 4, 3, 2),
     lambda: (torch.randn(2, 3, 16, 16),)),
    ("stackgan_stage1_G", dict(gf_dim=4, condition_dim=4, text_dim=12, z_dim=6),
     lambda: R.STAGE1_G(4, 4, 12, 6), lambda: (torch.randn(2, 12), torch.randn(2, 6))),
    ("stackgan_stage1_D", dict(df_dim=4, condition_dim=4), lambda: R.STAGE1_D(4, 4), lambda: (torch.randn(2, 3, 64, 64),)),
    ("stackgan_stage2_G", dict(gf_dim=8, condition_dim=4, text_dim=12, z_dim=6, r_num=1),
     lambda: R.STAGE2_G(R.STAGE1_G(8, 4, 12, 6), 8, 4, 12, 6, 1), lambda: (torch.randn(1, 12), torch.randn(1, 6))),
    ("stackgan_stage2_D", dict(df_dim=2, condition_dim=4), lambda: R.STAGE2_D(2, 4), lambda: (torch.randn(1, 3, 256, 256),)),
]


def _outputs(net, inputs):
    torch.manual_seed(3)
    with torch.no_grad():
        out = net(*inputs)
    return [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]


def _randomize(net):
    # trained-looking weights and running statistics, so the check is not at a special point
    with torch.no_grad():
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.rand_like(v) * 0.5 + 0.5 if "running_var" in k else torch.randn_like(v) * 0.1)
    return net


def test_every_arch_is_covered():
    from tests.test_sagan_biggan import CASES as ATTENTION_CASES  # SAGAN / BigGAN archs: tested there
    from tests.test_synthesis_models import NETS as SYNTHESIS_CASES  # DCGAN / PyTorch-GAN archs: tested there
    from tests.test_icgan_networks import CASES as ICGAN_CASES  # icgan_G / icgan_D: tested there

    covered = CASES + ATTENTION_CASES + SYNTHESIS_CASES + ICGAN_CASES
    assert {c[0] for c in covered} | {"resnet_9blocks", "unet_256"} == set(ARCHS)


@pytest.mark.parametrize("arch,kwargs,make_ref,make_inputs", CASES, ids=[c[0] for c in CASES])
def test_load_reference_checkpoint_gives_reference_outputs(tmp_path, arch, kwargs, make_ref, make_inputs):
    torch.manual_seed(0)
    ref = _randomize(make_ref()).eval()
    path = tmp_path / "latest_net_G.pth"
    torch.save(ref.state_dict(), path)
    net = load_reference_checkpoint(str(path), arch, **kwargs)
    assert not net.training
    inputs = make_inputs()
    with census(ref, winograd=True) as cen:  # normwise network bound (tests/_model_bounds.py)
        wants = _outputs(ref, inputs)
    for got, want in zip(_outputs(net, inputs), wants):
        assert_normwise(got, want, cen)

    # round trip: ganengine -> reference file -> the reference code loads it strictly
    out = tmp_path / "back.pth"
    save_reference_checkpoint(net, out, arch)
    sd = torch.load(out, weights_only=True)
    fresh = make_ref()
    fresh.load_state_dict(sd)  # strict
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(sd[k], v, atol=0, rtol=0)
    again = load_reference_checkpoint(out, arch, **kwargs)
    for got, want in zip(_outputs(again, inputs), _outputs(ref.eval(), inputs)):
        assert_normwise(got, want, cen)


def test_old_checkpoint_with_instance_norm_running_stats(tmp_path):
    # before PyTorch 0.4 / in older reference versions InstanceNorm2d tracked running stats: their
    # checkpoints carry running_mean/running_var (and later num_batches_tracked) for every norm
    ref = _randomize(R.define_G(3, 3, 8, "resnet_6blocks", "instance")).eval()
    sd = dict(ref.state_dict())
    old = {}
    for k, v in sd.items():
        old[k] = v
        if k.endswith("model.1.weight") or ".conv_block.1.weight" in k:
            prefix = k[: -len("1.weight")] + "2."
            c = v.shape[0]
            old[prefix + "running_mean"] = torch.randn(c)
            old[prefix + "running_var"] = torch.rand(c) + 0.5
            old[prefix + "num_batches_tracked"] = torch.tensor(7)
    assert len(old) > len(sd)
    # DataParallel checkpoints on top
    path = tmp_path / "old.pth"
    torch.save({"module." + k: v for k, v in old.items()}, path)
    net = load_reference_checkpoint(path, "resnet_6blocks", ngf=8)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        with census(ref, winograd=True) as cen:
            want = ref(x)
        assert_normwise(net(x), want, cen)  # normwise network bound (tests/_model_bounds.py)


def test_stargan_checkpoint_without_num_batches_tracked():
    ref = _randomize(R.StarGenerator(4, 3, 1)).eval()
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    net = load_reference_checkpoint(sd, "stargan_G", conv_dim=4, c_dim=3, repeat_num=1)
    x, c = torch.randn(1, 3, 16, 16), torch.eye(3)[:1]
    with torch.no_grad():
        with census(ref, winograd=True) as cen:
            want = ref(x, c)
        assert_normwise(net(x, c), want, cen)  # normwise network bound (tests/_model_bounds.py)


@pytest.mark.parametrize("arch,given,ckpt,expect", [
    # a resnet_6blocks with ngf=8 loaded as the default resnet_9blocks
    ("resnet_9blocks", {}, lambda: R.define_G(3, 3, 8, "resnet_6blocks", "instance"),
     ["model.1.weight", "(8, 3, 7, 7)", "(64, 3, 7, 7)", "'resnet_6blocks'", "ngf=8"]),
    # a batch-norm U-Net loaded with instance norm
    ("unet_128", dict(ngf=2, norm="instance"), lambda: R.define_G(3, 3, 2, "unet_128", "batch"), ["norm='batch'"]),
    ("stargan_G", dict(conv_dim=4, repeat_num=1), lambda: R.StarGenerator(4, 3, 1), ["main.0.weight", "c_dim=3"]),
    ("stargan_D", dict(conv_dim=4, c_dim=3, repeat_num=2), lambda: R.StarDiscriminator(16, 4, 3, 2),
     ["conv2.weight", "image_size=16"]),
    ("stackgan_stage1_G", dict(gf_dim=4, condition_dim=4, z_dim=6), lambda: R.STAGE1_G(4, 4, 12, 6),
     ["ca_net.fc.weight", "text_dim=12"]),
    ("patchgan", dict(ndf=4), lambda: R.define_D(3, 4, "n_layers", 2, norm="instance"), ["n_layers=2"]),
])
def test_mismatched_arguments_name_the_key_and_a_fitting_call(arch, given, ckpt, expect):
    sd = ckpt().state_dict()
    with pytest.raises(CheckpointMismatchError) as info:
        load_reference_checkpoint(sd, arch, **given)
    msg = str(info.value)
    for part in expect:
        assert part in msg, f"{part!r} not in: {msg}"


def test_unknown_arguments_and_arch():
    with pytest.raises(TypeError, match="conv_dim"):
        load_reference_checkpoint({}, "resnet_9blocks", conv_dim=4)
    with pytest.raises(ValueError, match="arch must be one of"):
        build_network("resnet_12blocks")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoints_are_read_without_running_code(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model.1.weight": _Evil()}, f)
    with pytest.raises(ValueError, match="weights_only"):
        load_reference_checkpoint(path, "resnet_9blocks")
    assert "must never run" not in capsys.readouterr().out
    with pytest.raises(FileNotFoundError):
        load_reference_checkpoint(tmp_path / "missing.pth", "resnet_9blocks")


def test_save_refuses_networks_the_reference_cannot_load(tmp_path):
    net = build_network("stargan_D", image_size=16, conv_dim=4, c_dim=3, repeat_num=2)
    with pytest.raises(ValueError, match="arch='stargan_G'|stargan_G"):
        save_reference_checkpoint(net, tmp_path / "x.pth", "stargan_G")
