"""ganengine.models networks and models against the reference implementations (tests/reference_nets.py).

Per network (small widths): parameter count and state_dict shapes equal to the reference, the same
initial weights from the same seed, eval outputs equal to the reference with the same weights,
and fused ops (every CPU backend) equal to the torch backend. Per model: one full train_step gives
the same losses on every CPU backend as on the torch backend from the same seed.
"""
import contextlib
import copy
import io

import pytest
import torch

import ganengine
from tests import reference_nets as R
from ganengine import backends
from ganengine.models import (CycleGAN, Pix2Pix, StackGAN, StarGAN, build_model, build_network)
from tests._backends import on_backend
from tests._model_bounds import assert_losses_close, assert_normwise, census
from tests._tolerance import assert_below

CPU_BACKENDS = [b for b in ("cpu", "triton") if backends.available()[b]]


def _has_patch():
    import ganengine.nn as gnn

    return hasattr(gnn, "PatchDiscriminator")


needs_patch = pytest.mark.skipif(not _has_patch(), reason="ganengine.nn.PatchDiscriminator not available yet")


def nparams(m):
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------------------- reference parameter counts
# (computed by running the reference code at its defaults; see docs/models.md)
DEFAULT_COUNTS = [
    ("resnet_9blocks", dict(norm="instance"), 11_378_179),
    ("unet_256", dict(norm="batch", use_dropout=True), 54_413_955),
    ("patchgan", dict(input_nc=6, norm="batch"), 2_768_705),
    ("patchgan", dict(input_nc=3, norm="instance"), 2_764_737),
    ("stargan_G", {}, 8_430_528),
    ("stargan_D", {}, 44_762_048),
    ("stackgan_stage1_G", {}, 10_301_248),
    ("stackgan_stage1_D", {}, 5_715_713),
    ("stackgan_stage2_G", {}, 36_591_328),
    ("stackgan_stage2_D", {}, 71_269_122),
]


@pytest.mark.parametrize("arch,kwargs,count", DEFAULT_COUNTS, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(DEFAULT_COUNTS)])
def test_parameter_count_at_default_size(arch, kwargs, count):
    if arch == "patchgan" and not _has_patch():
        pytest.skip("ganengine.nn.PatchDiscriminator not available yet")
    with torch.device("meta"):  # shapes only: no memory, no init cost
        net = build_network(arch, **kwargs)
    assert nparams(net) == count


# ---------------------------------------------------------------------------- small networks vs reference
def _ref_resnet(n_blocks, norm, dropout, ngf=8):
    def build():
        return R.define_G(3, 3, ngf, f"resnet_{n_blocks}blocks", norm, dropout)
    return build


def _stack_g1():
    net = R.STAGE1_G(gf_dim=8, condition_dim=8, text_dim=16, z_dim=10)
    return net.apply(R.stackgan_weights_init)


def _stack_g2():
    net = R.STAGE2_G(R.STAGE1_G(gf_dim=8, condition_dim=8, text_dim=16, z_dim=10), gf_dim=8, condition_dim=8,
                     text_dim=16, z_dim=10, r_num=2)
    return net.apply(R.stackgan_weights_init)


# (name, arch, arch kwargs, reference builder, input maker)
def _img(n, c, s):
    return lambda: (torch.randn(n, c, s, s),)


def _star_in():
    return torch.randn(2, 3, 32, 32), torch.tensor([[1., 0, 0, 1, 0], [0, 1, 0, 0, 1]])


def _text(z=10):
    return lambda: (torch.randn(2, 16), torch.randn(2, z))


NETS = [
    ("resnet9_instance", "resnet_9blocks", dict(ngf=4, norm="instance"), _ref_resnet(9, "instance", False, 4), _img(2, 3, 16)),
    ("resnet6_batch_dropout", "resnet_6blocks", dict(ngf=8, norm="batch", use_dropout=True),
     _ref_resnet(6, "batch", True), _img(2, 3, 32)),
    ("resnet6_none", "resnet_6blocks", dict(ngf=8, norm="none"), _ref_resnet(6, "none", False), _img(1, 3, 32)),
    ("unet128_batch", "unet_128", dict(ngf=4, norm="batch", use_dropout=True),
     lambda: R.define_G(3, 3, 4, "unet_128", "batch", True), _img(2, 3, 128)),
    ("unet256_instance", "unet_256", dict(ngf=2, norm="instance"),
     lambda: R.define_G(3, 3, 2, "unet_256", "instance", False), _img(1, 3, 256)),
    ("patchgan_instance", "patchgan", dict(input_nc=3, ndf=8, norm="instance"),
     lambda: R.define_D(3, 8, "basic", norm="instance"), _img(2, 3, 32)),
    ("patchgan_batch_n2", "patchgan", dict(input_nc=6, ndf=8, n_layers=2, norm="batch"),
     lambda: R.define_D(6, 8, "n_layers", 2, norm="batch"), _img(2, 6, 32)),
    ("pixel_instance", "pixel", dict(input_nc=3, ndf=8, norm="instance"),
     lambda: R.define_D(3, 8, "pixel", norm="instance"), _img(2, 3, 16)),
    ("stargan_G", "stargan_G", dict(conv_dim=8, c_dim=5, repeat_num=2), lambda: R.StarGenerator(8, 5, 2), _star_in),
    ("stargan_D", "stargan_D", dict(image_size=32, conv_dim=8, c_dim=5, repeat_num=3),
     lambda: R.StarDiscriminator(32, 8, 5, 3), _img(2, 3, 32)),
    ("stackgan_stage1_G", "stackgan_stage1_G", dict(gf_dim=8, condition_dim=8, text_dim=16, z_dim=10), _stack_g1, _text()),
    ("stackgan_stage1_D", "stackgan_stage1_D", dict(df_dim=8, condition_dim=8),
     lambda: R.STAGE1_D(8, 8).apply(R.stackgan_weights_init), _img(2, 3, 64)),
    ("stackgan_stage2_G", "stackgan_stage2_G", dict(gf_dim=8, condition_dim=8, text_dim=16, z_dim=10, r_num=2),
     _stack_g2, _text()),
    ("stackgan_stage2_D", "stackgan_stage2_D", dict(df_dim=4, condition_dim=8),
     lambda: R.STAGE2_D(4, 8).apply(R.stackgan_weights_init), _img(2, 3, 256)),
]
NET_IDS = [n[0] for n in NETS]
# the networks made mostly of fused ops, small enough for the Triton interpreter
TRITON_NETS = tuple(n[0] for n in NETS if n[0] != "stackgan_stage2_D")  # that one: ~20 s, slow-marked


def _skip_missing(arch):
    if arch == "patchgan" and not _has_patch():
        pytest.skip("ganengine.nn.PatchDiscriminator not available yet")


def _run(net, inputs, seed=1):
    torch.manual_seed(seed)  # StackGAN's conditioning augmentation draws noise
    with torch.no_grad():
        out = net(*inputs)
    if isinstance(out, tuple):
        return [o for o in out if o is not None]
    return [out]


def _close(a, b, cen):
    """Each output within the normwise network bound (tests/_model_bounds.py), both sides fp32."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert_normwise(x, y, cen)


@pytest.mark.parametrize("name,arch,kwargs,ref_builder,make_inputs", NETS, ids=NET_IDS)
def test_network_matches_reference(name, arch, kwargs, ref_builder, make_inputs):
    _skip_missing(arch)
    torch.manual_seed(123)
    ref = ref_builder()
    torch.manual_seed(123)
    net = build_network(arch, **kwargs)
    # same tree: keys, shapes, parameter count; same init from the same seed
    ref_sd, sd = ref.state_dict(), net.state_dict()
    assert list(sd) == list(ref_sd)
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    assert nparams(net) == nparams(ref)
    for k in sd:
        torch.testing.assert_close(sd[k], ref_sd[k], atol=0, rtol=0, msg=f"initial value of {k}")
    # same function (eval mode): ganengine (fused, default backend) vs the reference
    ref.eval()
    net.eval()
    torch.manual_seed(7)
    inputs = make_inputs()
    with census(ref, winograd=True) as cen:  # (the default backend may run 4x4 convs as Winograd)
        want = _run(ref, inputs)
    _close(_run(net, inputs), want, cen)


def _net_backend_params():
    out = []
    for backend in CPU_BACKENDS:
        for net in NETS:
            slow = backend == "triton" and net[0] not in TRITON_NETS
            out.append(pytest.param(*net, backend, id=f"{net[0]}-{backend}", marks=[pytest.mark.slow] if slow else []))
    return out


@pytest.mark.parametrize("name,arch,kwargs,ref_builder,make_inputs,backend", _net_backend_params())
def test_fused_backends_match_torch_backend(name, arch, kwargs, ref_builder, make_inputs, backend):
    _skip_missing(arch)
    net = build_network(arch, **kwargs)
    torch.manual_seed(7)
    inputs = make_inputs()
    for mode in ("eval", "train"):
        getattr(net, mode)()
        if mode == "train" and ("dropout" in name):
            continue  # dropout draws: compared in eval mode only
        state = copy.deepcopy(net.state_dict())
        with ganengine.use_backend("torch"), census(net, winograd=backend == "cpu") as cen:
            want = _run(net, inputs)
        net.load_state_dict(state)  # undo running-stat updates of train mode
        with on_backend(backend):  # strict: a silent fallback to torch fails the test
            got = _run(net, inputs)
        _close(got, want, cen)


def test_fuse_actually_rewrites_instance_norm_pairs():
    net = build_network("resnet_9blocks", ngf=8)
    kinds = {type(m).__name__ for m in net.modules()}
    assert "InstanceNormAct2d" in kinds
    # every instance norm runs fused: the pairs with their ReLU, the residual blocks' second norm alone
    assert not any(type(m) is torch.nn.InstanceNorm2d for m in net.modules())
    plain = build_network("resnet_9blocks", ngf=8, fused=False)
    assert "InstanceNormAct2d" not in {type(m).__name__ for m in plain.modules()}
    assert list(plain.state_dict()) == list(net.state_dict())


def test_unet_skip_structure_and_dropout_semantics():
    net = build_network("unet_256", ngf=2, use_dropout=True, fused=False)
    keys = list(net.state_dict())
    # outermost block: downconv (0), submodule (1), ReLU, upconv (3); nested blocks' submodule is index 3
    assert keys[0] == "model.model.0.weight"
    assert "model.model.1.model.3.model.3.model.1.weight" in keys
    drops = [m for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 8 - 5 and all(d.p == 0.5 for d in drops)
    x = torch.randn(1, 3, 256, 256)
    net.train()
    torch.manual_seed(0)
    a = net(x)
    torch.manual_seed(1)
    b = net(x)
    assert not torch.allclose(a, b)  # dropout active in training mode (the reference's test mode)
    net.eval()
    torch.testing.assert_close(net(x), net(x))


def _unet_pair(use_dropout, attention_scale):
    """(reference-design network, ganengine's fused U-Net) with the same weights."""
    from ganengine.models import UnetGenerator

    torch.manual_seed(11)  # 6 downsamplings (64x64 input): one dropout block, as unet_256 has three
    if attention_scale is None:
        ref = R.init_weights(R.UnetGenerator(3, 3, 6, 2, use_dropout=use_dropout), "normal", 0.02)
    else:  # the reference rewrite has no attention: ganengine's own unfused tree is the reference
        ref = UnetGenerator(3, 3, 6, 2, use_dropout=use_dropout, attention_scale=attention_scale, fused=False)
    net = UnetGenerator(3, 3, 6, 2, use_dropout=use_dropout, attention_scale=attention_scale)
    net.load_state_dict(ref.state_dict())
    return ref, net


@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("triton", marks=pytest.mark.slow)])
@pytest.mark.parametrize("use_dropout,attention_scale", [(True, None), (False, 8)], ids=["dropout", "attn"])
def test_unet_fused_batch_norm_matches_reference(backend, use_dropout, attention_scale):
    """Every batch norm of the U-Net runs fused with the activation after it (the next block's
    in-place LeakyReLU, the parent's ReLU on the skip concatenation): outputs, input and parameter
    gradients, running statistics and batch counts equal the reference, over two training steps
    (dropout on: same draws) and in eval mode (dropout off, running statistics)."""
    from ganengine.ops import _dispatch

    if not backends.available()[backend]:
        pytest.skip(backends.status()[backend])
    ref, net = _unet_pair(use_dropout, attention_scale)
    if attention_scale is not None:
        gamma = [m.gamma for m in net.modules() if hasattr(m, "gamma")] + \
                [m.gamma for m in ref.modules() if hasattr(m, "gamma")]
        with torch.no_grad():
            for g in gamma:
                g.fill_(0.5)  # attention on (it starts at 0)
    torch.manual_seed(3)
    x = torch.randn(2, 3, 64, 64)
    n_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in ref.modules())
    for step, mode in enumerate(("train", "train", "eval")):
        getattr(ref, mode)()
        getattr(net, mode)()
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(100 + step)
        with census(ref) as cen:  # n and depth of the normwise bound (tests/_model_bounds.py)
            yr = ref(xr)
        _dispatch.last_used.pop("batch_norm_act", None)
        torch.manual_seed(100 + step)
        with on_backend(backend):
            yo = net(xo)
            assert _dispatch.last_used.get("batch_norm_act", "torch") == backend
            g = torch.randn_like(yr)
            (yo * g).sum().backward()
        (yr * g).sum().backward()
        # eval mode reads the running statistics, which carry the training steps' errors: one more
        # normwise stage per norm layer
        extra = n_norms if mode == "eval" else 0
        assert_normwise(yo, yr, cen, extra_depth=extra, name=f"{mode} {step}: output")
        assert_normwise(xo.grad, xr.grad, cen, extra_depth=extra, backward=True, name=f"{mode} {step}: input grad")
        scale = max(pr.grad.abs().max().item() for pr in ref.parameters())  # gradients that cancel: noise
        for (k, p), (_, pr) in zip(net.named_parameters(), ref.named_parameters()):
            assert_normwise(p.grad, pr.grad, cen, scale=scale, extra_depth=extra, backward=True, name=f"{mode} {step}: {k}")
        for (k, b), (_, br) in zip(net.named_buffers(), ref.named_buffers()):
            if k.endswith("num_batches_tracked"):
                assert torch.equal(b, br), f"{mode} {step}: {k}"
            else:  # statistics of activations that carry the network's normwise error, both steps
                assert_normwise(b, br, cen, scale=max(1.0, br.abs().max().item()), extra_depth=2,
                                name=f"{mode} {step}: {k}")
        net.zero_grad(), ref.zero_grad()


def test_unet_fused_batch_norm_paths():
    """The fused U-Net issues one batch_norm_act per batch norm and no separate activation for
    them; a hook on a norm (or fused=False) keeps the reference's module-by-module forward."""
    from torch.profiler import profile

    def ops(net, x):
        with profile() as prof:
            net(x)
        names = [e.name for e in prof.events()]
        return {k: names.count(k) for k in ("aten::batch_norm", "aten::leaky_relu_", "aten::relu_")}

    x = torch.randn(1, 3, 64, 64)
    _, net = _unet_pair(True, None)
    # (fuse()'s lone-norm rule made them activation-free BatchNormAct2d: same parameters and rules)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 9  # 4 downnorms, 5 upnorms
    with ganengine.use_backend("torch"):  # the composition: countable aten ops
        # the activations left follow a conv, not a norm: the outermost downconv's LeakyReLU and
        # the innermost downconv's ReLU
        got = ops(net, x)
        assert got["aten::batch_norm"] == 9 and got["aten::leaky_relu_"] == 1 and got["aten::relu_"] == 1, got
        norms[0].register_forward_hook(lambda *a: None)  # this norm now runs as its module
        got = ops(net, x)
        assert got["aten::batch_norm"] == 9 and got["aten::leaky_relu_"] == 2, got
        net.fused_batch_norm = False
        assert ops(net, x)["aten::leaky_relu_"] == 5


def test_stargan_instance_norm_is_affine_with_running_stats():
    net = build_network("stargan_G", conv_dim=8, repeat_num=1)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    assert norms and all(m.affine and m.track_running_stats for m in norms)
    before = norms[0].running_mean.clone()
    net.train()
    net(torch.randn(2, 3, 16, 16), torch.zeros(2, 5))
    assert not torch.equal(before, norms[0].running_mean)


def test_stage2_generator_holds_frozen_stage1():
    net = build_network("stackgan_stage2_G", gf_dim=8, condition_dim=8, text_dim=16, z_dim=10, r_num=1)
    assert type(net.STAGE1_G).__name__ == "Stage1Generator"
    assert all(not p.requires_grad for p in net.STAGE1_G.parameters())
    assert any(k.startswith("STAGE1_G.ca_net.fc.") for k in net.state_dict())


def test_conditioning_augmentation():
    from ganengine.models import CANet

    ca = CANet(text_dim=6, condition_dim=3)
    t = torch.randn(4, 6)
    torch.manual_seed(0)
    c, mu, logvar = ca(t)
    x = torch.relu(ca.fc(t))
    torch.testing.assert_close(mu, x[:, :3])
    torch.testing.assert_close(logvar, x[:, 3:])
    torch.manual_seed(0)
    eps = torch.randn(4, 3)
    torch.testing.assert_close(c, mu + eps * torch.exp(0.5 * logvar))
    with pytest.raises(ValueError, match="text_dim"):
        ca(torch.randn(4, 5))


@pytest.mark.parametrize("arch,kwargs,scale,size", [
    ("resnet_6blocks", dict(ngf=8), 4, 32), ("unet_128", dict(ngf=4), 8, 128)])
def test_attention_option_extends_reference_keys(arch, kwargs, scale, size):
    import ganengine.nn as gnn

    if not hasattr(gnn, "SelfAttention2d"):
        pytest.skip("ganengine.nn.SelfAttention2d not available yet")
    plain = build_network(arch, **kwargs)
    ctor = {"resnet_6blocks": lambda: ganengine.models.ResnetGenerator(3, 3, n_blocks=6, attention_scale=scale, **kwargs),
            "unet_128": lambda: ganengine.models.UnetGenerator(3, 3, 7, attention_scale=scale, **kwargs)}[arch]
    net = ctor()
    extra = [k for k in net.state_dict() if k not in plain.state_dict()]
    assert set(plain.state_dict()) <= set(net.state_dict())
    assert extra and all(".attn." in k or k.startswith("attn.") for k in extra)
    # gamma starts at 0: the attention block is the identity at init, so outputs equal the plain net's
    net.load_state_dict({**net.state_dict(), **plain.state_dict()})
    net.eval()
    plain.eval()
    x = torch.randn(1, 3, size, size)
    with census(plain, winograd=True) as cen:
        want = plain(x)
    assert_normwise(net(x), want, cen)  # normwise network bound (tests/_model_bounds.py)
    with pytest.raises(ValueError, match="attention_scale"):
        ganengine.models.ResnetGenerator(3, 3, ngf=8, attention_scale=8)


# ---------------------------------------------------------------------------- models: one training step
def _pix2pix():
    return Pix2Pix(ngf=4, ndf=4, netG="unet_128", crop_size=128), \
        {"A": torch.rand(1, 3, 128, 128) * 2 - 1, "B": torch.rand(1, 3, 128, 128) * 2 - 1}


def _cyclegan():
    return CycleGAN(ngf=4, ndf=4, netG="resnet_6blocks", netD="n_layers", n_layers_D=2, crop_size=16), \
        {"A": torch.rand(1, 3, 16, 16) * 2 - 1, "B": torch.rand(1, 3, 16, 16) * 2 - 1}


def _stargan_celeba():
    return StarGAN(g_conv_dim=4, d_conv_dim=4, g_repeat_num=1, d_repeat_num=2, image_size=16, n_critic=1), \
        {"image": torch.rand(2, 3, 16, 16) * 2 - 1, "label": torch.tensor([[1., 0, 0, 1, 0], [0, 1, 0, 0, 1]])}


def _stargan_rafd():
    return StarGAN(dataset="RaFD", c_dim=3, g_conv_dim=4, d_conv_dim=4, g_repeat_num=1, d_repeat_num=2,
                   image_size=16, n_critic=1), \
        {"image": torch.rand(3, 3, 16, 16) * 2 - 1, "label": torch.tensor([0, 2, 1])}


def _stackgan1():
    return StackGAN(gf_dim=8, df_dim=4, condition_dim=8, text_dim=16, z_dim=10), \
        {"image": torch.rand(3, 3, 64, 64) * 2 - 1, "embedding": torch.randn(3, 16)}


def _stackgan2():
    return StackGAN(stage=2, gf_dim=8, df_dim=2, condition_dim=8, text_dim=16, z_dim=10, r_num=1), \
        {"image": torch.rand(2, 3, 256, 256) * 2 - 1, "embedding": torch.randn(2, 16)}


MODELS = [("pix2pix", _pix2pix), ("cyclegan", _cyclegan), ("stargan_celeba", _stargan_celeba),
          ("stargan_rafd", _stargan_rafd), ("stackgan_stage1", _stackgan1), ("stackgan_stage2", _stackgan2)]
# Under the Triton interpreter the batch-norm models' steps (larger images, few fused ops) take
# 10-90 s on 2 cores: slow-marked (run with -m slow). CycleGAN and StarGAN, built mostly of fused
# ops, run on triton in CI.
def _slow_step(name, backend):
    return backend == "triton" and name in ("pix2pix", "stackgan_stage1", "stackgan_stage2")


def _model_params():
    out = []
    for backend in CPU_BACKENDS:
        for name, make in MODELS:
            marks = [pytest.mark.slow] if _slow_step(name, backend) else []
            out.append(pytest.param(name, make, backend, id=f"{name}-{backend}", marks=marks))
    return out


def _one_step(make, backend, seed=5, cen=None):
    """One training step; ``cen``: also take the networks' census (tests/_model_bounds.py)."""
    torch.manual_seed(seed)
    model, batch = make()
    opts = model.make_optimizers()
    torch.manual_seed(seed + 1)
    nets = [getattr(model, n) for n in model.network_names]
    with on_backend(backend), (census(*nets, winograd=cen == "cpu") if cen else contextlib.nullcontext()) as c:
        losses = model.train_step(batch, opts)
    return (model, losses, c) if cen else (model, losses)


@pytest.mark.parametrize("name,make,backend", _model_params())
def test_train_step_backends_agree(name, make, backend):
    ref_model, want, cen = _one_step(make, "torch", cen=backend)
    model, got = _one_step(make, backend)
    assert set(got) == set(want) and len(got) >= 4
    for k in want:
        assert got[k].requires_grad is False and got[k].dim() == 0
        assert torch.isfinite(got[k]), k
    assert_losses_close(got, want, cen)  # normwise over the step's losses (tests/_model_bounds.py)
    # every network got the same gradients (compared rather than the updated weights: Adam's first
    # step is ~lr * sign(grad), which flips on gradients that are 0 up to rounding, e.g. the conv
    # biases in front of an instance norm)
    grads = {k: p.grad for k, p in ref_model.named_parameters() if p.grad is not None}
    assert grads
    # tolerance relative to the network's largest gradient: gradients that are 0 in exact
    # arithmetic (conv bias before an instance norm) are rounding noise on both sides
    scale = {}
    for k, g in grads.items():
        net = k.split(".")[0]
        scale[net] = max(scale.get(net, 0.0), g.abs().max().item())
    for k, p in model.named_parameters():
        if k in grads:
            assert_normwise(p.grad, grads[k], cen, scale=scale[k.split(".")[0]], backward=True, name=k)


def test_train_step_updates_all_networks():
    model, batch = _cyclegan()
    before = copy.deepcopy(model.state_dict())
    losses = model.train_step(batch, model.make_optimizers())
    assert {"D_A", "G_A", "cycle_A", "idt_A", "D_B", "G_B", "cycle_B", "idt_B"} == set(losses)
    for name in model.network_names:
        net = getattr(model, name)
        changed = any(not torch.equal(v, before[f"{name}.{k}"]) for k, v in net.state_dict().items())
        assert changed, name
    assert len(model.fake_A_pool) == 1 and len(model.fake_B_pool) == 1
    # translate: images in [-1, 1] of the input's shape
    out = model.translate(batch)
    assert out.shape == batch["A"].shape and out.abs().max() <= 1


def test_stargan_n_critic_and_extra_state():
    model, batch = _stargan_celeba()
    model.options["n_critic"] = 2
    opts = model.make_optimizers()
    first = model.train_step(batch, opts)
    second = model.train_step(batch, opts)
    assert not any(k.startswith("G/") for k in first)
    assert {"G/loss_fake", "G/loss_rec", "G/loss_cls"} <= set(second)
    assert model.extra_state() == {"num_steps": 2}
    out = model.translate({"image": batch["image"], "label": batch["label"]})
    assert out.shape == batch["image"].shape


def test_cyclegan_pool_state_roundtrip():
    model, batch = _cyclegan()
    model.train_step(batch, model.make_optimizers())
    buf = io.BytesIO()
    torch.save(model.extra_state(), buf)  # checkpoints are read back with weights_only=True
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other, _ = _cyclegan()
    other.load_extra_state(state)
    x = torch.randn(1, 3, 16, 16)
    for _ in range(60):  # past the pool size: both pools draw the same way
        torch.testing.assert_close(model.fake_A_pool.query(x), other.fake_A_pool.query(x))
        x = torch.randn(1, 3, 16, 16)


@pytest.mark.parametrize("name,make", [("pix2pix", _pix2pix), ("stargan_celeba", _stargan_celeba)])
def test_fused_optimizer_is_the_reference_adam(name, make):
    """fused_optimizer=True (default) runs torch's fused Adam: the first update equals the
    reference's per-parameter Adam to fp32 rounding (later steps only as closely as Adam's
    normalisation of rounding-noise gradients allows: compared through the losses)."""
    params, losses, grads = {}, {}, {}
    for fused_opt in (True, False):
        torch.manual_seed(5)
        model, batch = make()
        model.options["fused_optimizer"] = fused_opt
        model.options["n_critic"] = 1
        opts = model.make_optimizers()
        assert all(bool(o.defaults.get("fused")) == fused_opt for o in opts.values())
        groups = {id(p): g for o in opts.values() for g in o.param_groups for p in g["params"]}
        losses[fused_opt] = []
        # the gradient each parameter was stepped with, read when its optimizer steps (a model may
        # clear a network's gradients with set_to_none after its step: StarGAN's D)
        stepped = {}

        def snapshot(opt, args, kwargs):
            for g in opt.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        stepped[id(p)] = p.grad.detach().clone()

        handles = [o.register_step_pre_hook(snapshot) for o in opts.values()]
        for i in range(3):
            torch.manual_seed(100 + i)
            nets = [getattr(model, n) for n in model.network_names]
            with census(*nets, winograd=True) as c:
                losses[fused_opt].append(model.train_step(batch, opts))
            if i == 0:
                for h in handles:
                    h.remove()
                cen = c
                params[fused_opt] = {k: v.detach().clone() for k, v in model.named_parameters()}
                grads[fused_opt] = {k: (stepped.get(id(v)), groups.get(id(v))) for k, v in model.named_parameters()}
    # Adam's first step moves p by lr g / (|g| + eps) (m^ = g, sqrt(v^) = |g|) with a few ulps of
    # rounding (16 u lr); the two runs' gradients may differ by their normwise bound E_g (both
    # within it of the exact value, tests/_model_bounds.py): where |g| <= 2 E_g the direction is
    # rounding noise and the two updates may be anything up to lr each (2 lr apart); elsewhere
    # they move by lr eps 2 E_g / (|g| - 2 E_g + eps)^2 at most. Plus each side's u |p|.
    from tests._tolerance import gamma_prob, unit_roundoff

    u = unit_roundoff(torch.float32)
    scale = {}
    for k, (g, _) in grads[False].items():
        if g is not None:
            scale[k.split(".")[0]] = max(scale.get(k.split(".")[0], 0.0), g.abs().max().item())
    for k, v in params[False].items():
        g, group = grads[False][k]
        if g is None or group is None:
            torch.testing.assert_close(params[True][k], v, atol=0, rtol=0)  # not trained: unchanged
            continue
        lr, eps = group["lr"], group["eps"]
        e_g = 2 * 2 * cen.depth * gamma_prob(cen.n, torch.float32) * scale[k.split(".")[0]]
        g = g.double().abs()
        steady = lr * (16 * u + eps * 2 * e_g / ((g - 2 * e_g).clamp_min(0) + eps) ** 2)
        allowed = torch.where(g <= 2 * e_g, 2 * lr, steady.clamp_max(2 * lr)) + u * v.double().abs()
        assert_below(params[True][k], v, allowed, name=k)
    for i, (got, want) in enumerate(zip(losses[True], losses[False])):
        assert_losses_close(got, want, cen, steps=i + 1, msg=f"step {i}: ")


def test_schedulers_follow_reference_linear_rule():
    model, _ = _cyclegan()
    opts = model.make_optimizers()
    scheds = model.make_schedulers(opts, n_epochs=2, n_epochs_decay=2, steps_per_epoch=3)
    lrs = []
    for _ in range(12):
        lrs.append(opts["G"].param_groups[0]["lr"])
        opts["G"].step()  # (no gradients: a no-op that keeps the scheduler's order check quiet)
        scheds["G"].step()
    # the reference's train.py steps the scheduler at the beginning of each epoch: the k-th epoch
    # (k = 1, 2, ...) trains at 1 - max(0, k + 1 - 2) / 3
    want = [2e-4] * 3 + [2e-4 * (1 - 1 / 3)] * 3 + [2e-4 * (1 - 2 / 3)] * 3 + [0.0] * 3
    assert lrs == pytest.approx(want)


def _lrs(model, steps, name="G", **schedule):
    """The learning rate each of ``steps`` iterations runs at, the schedulers stepped per iteration."""
    opts = model.make_optimizers()
    scheds = model.make_schedulers(opts, **schedule)
    lrs = []
    for _ in range(steps):
        lrs.append(opts[name].param_groups[0]["lr"])
        opts[name].step()
        if name in scheds:
            scheds[name].step()
    return lrs


def test_linear_schedule_never_goes_below_zero_past_the_scheduled_epochs():
    # --max_steps past n_epochs + n_epochs_decay: the reference rule held at 0 (it used to reach
    # -1.33e-4 here: gradient ascent), for pix2pix / CycleGAN / CSGAN and the synthesis models' decay
    for model in (_cyclegan()[0], build_model("csgan", ngf=4, ndf=4, netG="resnet_6blocks", n_layers_D=2),
                  build_model("pix2pix", ngf=4, ndf=4, netG="unet_128")):
        lrs = _lrs(model, 10, n_epochs=1, n_epochs_decay=2, steps_per_epoch=2, max_steps=10)
        assert lrs == pytest.approx([2e-4 * 2 / 3] * 2 + [2e-4 / 3] * 2 + [0.0] * 6)  # (reference timing)
    dcgan = build_model("dcgan", nc=1, ngf=4, ndf=4)
    lrs = _lrs(dcgan, 8, n_epochs=1, n_epochs_decay=1, steps_per_epoch=2)
    assert min(lrs) == 0.0 and lrs[-1] == 0.0


def test_sagan_keeps_constant_rates_for_any_total_step():
    # the reference (heykeetae) never changes its rates; with n_epochs_decay 0 the linear rule used
    # to drop them to 0 (and below) after n_epochs when --total_step ran past them
    sagan = build_model("sagan", imsize=64, z_dim=8, g_conv_dim=8, d_conv_dim=8)
    opts = sagan.make_optimizers()
    assert sagan.make_schedulers(opts, n_epochs=1, n_epochs_decay=0, steps_per_epoch=2, max_steps=10) == {}
    assert _lrs(sagan, 4, n_epochs=1, n_epochs_decay=2, steps_per_epoch=1)[-1] == 0.0


def test_lr_policies_follow_the_reference_get_scheduler():
    # junyanz networks.get_scheduler, its schedulers stepped once per epoch (3 iterations each), at
    # the beginning of the epoch (the reference's train.py since 2020)
    def reference(make, epochs):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-4)
        sch = make(opt)
        out = []
        for _ in range(epochs):
            opt.step()
            sch.step()
            out += [opt.param_groups[0]["lr"]] * 3
        return out

    step = build_model("cyclegan", ngf=4, ndf=4, netG="resnet_6blocks", n_layers_D=2, lr_policy="step",
                       lr_decay_iters=2)
    assert _lrs(step, 21, n_epochs=3, n_epochs_decay=4, steps_per_epoch=3) == pytest.approx(
        reference(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.1), 7))
    cosine = build_model("pix2pix", ngf=4, ndf=4, netG="unet_128", lr_policy="cosine")
    got = _lrs(cosine, 21, n_epochs=4, n_epochs_decay=3, steps_per_epoch=3)
    want = reference(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4, eta_min=0), 4)
    assert got[:12] == pytest.approx(want, abs=1e-12)
    assert got[9:] == pytest.approx([0.0] * 12, abs=1e-12)  # held at 0 (the reference's climbs back up)
    with pytest.raises(ValueError, match="plateau.*not supported"):
        build_model("pix2pix", lr_policy="plateau")
    with pytest.raises(ValueError, match="lr_policy must be one of"):
        build_model("cyclegan", lr_policy="exp")
    with pytest.raises(ValueError, match="lr_decay_iters must be a positive int"):
        build_model("csgan", lr_policy="step", lr_decay_iters=0)


def _stargan_reference_rates(lr, num_iters, num_iters_decay, lr_update_step):
    """yunjey/stargan solver.train()'s loop, the rate each iteration i runs at; each drop is
    lr * lr_update_step / num_iters_decay (the paper's decay to 0; the code's lr / num_iters_decay
    would only take 0.1% off in all)."""
    g_lr, out = lr, []
    for i in range(num_iters):
        out.append(g_lr)
        if (i + 1) % lr_update_step == 0 and (i + 1) > (num_iters - num_iters_decay):
            g_lr = max(0.0, g_lr - lr * lr_update_step / float(num_iters_decay))  # (never below 0)
    return out


@pytest.mark.parametrize("num_iters, decay, every", [(40, 20, 5), (40, 20, 3), (30, 100, 4), (12, 12, 1)])
def test_stargan_iteration_schedule_with_num_iters(num_iters, decay, every):
    model, _ = _stargan_celeba()
    model = StarGAN(**{**model.options, "num_iters_decay": decay, "lr_update_step": every,
                       "lr_schedule": "iterations"})
    for name, lr in (("G", 1e-4), ("D", 1e-4)):
        got = _lrs(model, num_iters, name, n_epochs=1, n_epochs_decay=1, steps_per_epoch=7, max_steps=num_iters)
        assert got == pytest.approx(_stargan_reference_rates(lr, num_iters, decay, every), abs=1e-15)
        assert min(got) >= 0.0
    # past num_iters (more steps than the schedule was made for): never below 0
    longer = _lrs(model, 3 * num_iters, n_epochs=1, n_epochs_decay=1, steps_per_epoch=7, max_steps=num_iters)
    assert min(longer) == 0.0 if decay <= num_iters else min(longer) > 0.0
    assert StarGAN.DEFAULTS["num_iters_decay"] == 100000 and StarGAN.DEFAULTS["lr_update_step"] == 1000


def test_stargan_epoch_schedule_without_num_iters():
    model, _ = _stargan_celeba()
    lrs = _lrs(model, 12, n_epochs=1, n_epochs_decay=1, steps_per_epoch=3)
    assert lrs == pytest.approx([1e-4] * 3 + [5e-5] * 3 + [0.0] * 6)
    with pytest.raises(ValueError, match="lr_update_step must be an int >= 1"):
        StarGAN(lr_update_step=0)
    # the default ("epochs", what checkpoints before the option trained with) keeps the epoch rule
    # whatever max_steps; "iterations" needs it
    assert _lrs(model, 12, n_epochs=1, n_epochs_decay=1, steps_per_epoch=3, max_steps=12) == lrs
    with pytest.raises(ValueError, match="lr_schedule='iterations' decays over"):
        _lrs(StarGAN(**{**model.options, "lr_schedule": "iterations"}), 3, n_epochs=1, n_epochs_decay=1,
             steps_per_epoch=3)


def test_options_are_reference_named_and_checked():
    m = build_model("pix2pix", ngf=4, ndf=4, netG="unet_128")
    assert m.options["lambda_L1"] == 100.0 and m.options["gan_mode"] == "vanilla" and m.options["use_dropout"]
    assert CycleGAN.DEFAULTS["lambda_identity"] == 0.5 and CycleGAN.DEFAULTS["pool_size"] == 50
    assert StarGAN.DEFAULTS["n_critic"] == 5 and StarGAN.DEFAULTS["lambda_gp"] == 10.0
    import json

    json.dumps(m.options)
    with pytest.raises(TypeError, match="lambda_l1"):
        build_model("pix2pix", lambda_l1=10)
    with pytest.raises(ValueError, match="gan_mode"):
        Pix2Pix(gan_mode="wasserstein", ngf=4, ndf=4, netG="unet_128")
    with pytest.raises(ValueError, match="model name"):
        build_model("no_such_gan")


# ---------------------------------------------------------------------------- models vs the reference step
def _ref_nets_pix2pix(model):
    G = R.define_G(3, 3, 4, "unet_128", "batch", True)
    D = R.define_D(6, 4, "basic", norm="batch")
    return [G, D]


def _ref_nets_cyclegan(model):
    return [R.define_G(3, 3, 4, "resnet_6blocks", "instance"), R.define_G(3, 3, 4, "resnet_6blocks", "instance"),
            R.define_D(3, 4, "n_layers", 2, norm="instance"), R.define_D(3, 4, "n_layers", 2, norm="instance")]


def _ref_nets_stargan(model):
    o = model.options
    return [R.StarGenerator(o["g_conv_dim"], o["c_dim"], o["g_repeat_num"]),
            R.StarDiscriminator(o["image_size"], o["d_conv_dim"], o["c_dim"], o["d_repeat_num"])]


def _ref_nets_stackgan(model):
    o = model.options
    g = dict(gf_dim=o["gf_dim"], condition_dim=o["condition_dim"], text_dim=o["text_dim"], z_dim=o["z_dim"])
    if o["stage"] == 1:
        return [R.STAGE1_G(**g), R.STAGE1_D(o["df_dim"], o["condition_dim"])]
    return [R.STAGE2_G(R.STAGE1_G(**g), r_num=o["r_num"], **g), R.STAGE2_D(o["df_dim"], o["condition_dim"])]


def _ref_step(name, nets, opts, batch, i, model):
    o = model.options
    if name == "pix2pix":
        return R.pix2pix_step(*nets, *opts, batch["A"], batch["B"])
    if name == "cyclegan":
        return R.cyclegan_step(*nets, *opts, batch["A"], batch["B"])
    if name.startswith("stargan"):
        return R.stargan_step(*nets, *opts, batch["image"], batch["label"], i, dataset=o["dataset"], c_dim=o["c_dim"],
                              n_critic=o["n_critic"])
    return R.stackgan_step(*nets, *opts, batch["image"], batch["embedding"], o["z_dim"])


def _ref_opts(name, nets, model):
    if name == "pix2pix":
        return [R.adam(nets[0].parameters(), 2e-4), R.adam(nets[1].parameters(), 2e-4)]
    if name == "cyclegan":
        return [R.adam(R.chain(nets[0], nets[1]), 2e-4), R.adam(R.chain(nets[2], nets[3]), 2e-4)]
    if name.startswith("stargan"):
        return [R.adam(nets[0].parameters(), 1e-4), R.adam(nets[1].parameters(), 1e-4)]
    return [R.adam([p for p in nets[0].parameters() if p.requires_grad], 2e-4), R.adam(nets[1].parameters(), 2e-4)]


REF_STEP_MODELS = [("pix2pix", _pix2pix, _ref_nets_pix2pix, 2), ("cyclegan", _cyclegan, _ref_nets_cyclegan, 2),
                   ("stargan_celeba", _stargan_celeba, _ref_nets_stargan, 2),
                   ("stargan_rafd", _stargan_rafd, _ref_nets_stargan, 2),
                   ("stackgan_stage1", _stackgan1, _ref_nets_stackgan, 2),
                   ("stackgan_stage2", _stackgan2, _ref_nets_stackgan, 1)]


@pytest.mark.parametrize("name,make,make_ref,steps", REF_STEP_MODELS, ids=[m[0] for m in REF_STEP_MODELS])
def test_train_step_matches_reference_training_step(name, make, make_ref, steps):
    """ganengine's fused model and the reference's own update code give the same losses, step
    after step (so the same update order, losses, optimisers and weights)."""
    torch.manual_seed(5)
    model, batch = make()
    if name.startswith("stargan"):
        model.options["n_critic"] = 2  # the second step also trains G
    ref_nets = make_ref(model)
    for net, net_name in zip(ref_nets, model.network_names):
        net.load_state_dict(getattr(model, net_name).state_dict())
        net.train()
    opts, ref_opts = model.make_optimizers(), _ref_opts(name, ref_nets, model)
    for i in range(steps):
        torch.manual_seed(100 + i)
        with census(*[getattr(model, n) for n in model.network_names], winograd=True) as cen:
            got = model.train_step(batch, opts)
        torch.manual_seed(100 + i)
        want = _ref_step(name, ref_nets, ref_opts, batch, i, model)
        assert set(got) == set(want), (sorted(got), sorted(want))
        assert_losses_close(got, want, cen, steps=i + 1, msg=f"step {i}: ")


def test_stargan_with_attention_trains_through_the_gradient_penalty():
    import ganengine.nn as gnn

    if not hasattr(gnn, "SelfAttention2d"):
        pytest.skip("ganengine.nn.SelfAttention2d not available yet")
    torch.manual_seed(0)
    model = StarGAN(g_conv_dim=8, d_conv_dim=8, g_repeat_num=1, d_repeat_num=2, image_size=16, n_critic=1,
                    attention_resolution=4)
    assert isinstance(model.G.attn, gnn.SelfAttention2d) and isinstance(model.D.attn, gnn.SelfAttention2d)
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1, "label": torch.tensor([[1., 0, 0, 1, 0], [0, 1, 0, 0, 1]])}
    opts = model.make_optimizers()
    losses = model.train_step(batch, opts)
    assert all(torch.isfinite(v) for v in losses.values())
    # gamma starts at 0; a step moves it, so the attention blocks are in both graphs
    assert model.D.attn.gamma.abs().item() > 0 and model.G.attn.gamma.abs().item() > 0


@pytest.mark.parametrize("model_cls,opts", [(Pix2Pix, dict(netG="unet_128", ngf=4, ndf=4)),
                                            (CycleGAN, dict(netG="resnet_6blocks", ngf=4, ndf=4, norm="batch"))])
def test_translate_does_not_mix_the_images_of_a_batch(model_cls, opts):
    """The references test G in training mode at batch size 1: batch norm's statistics are each
    image's own. translate (and evaluate, sample) give an image the same output whatever batch it
    is in: image by image, with the same dropout draws as one call per image."""
    torch.manual_seed(0)
    model = model_cls(**opts)
    x = torch.randn(3, 3, 32 if model_cls is CycleGAN else 128, 32 if model_cls is CycleGAN else 128)
    torch.manual_seed(5)
    together = model.translate({"A": x, "B": x})
    torch.manual_seed(5)
    alone = torch.cat([model.translate({"A": x[i:i + 1], "B": x[i:i + 1]}) for i in range(3)])
    assert torch.equal(together, alone)
