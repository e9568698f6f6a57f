"""SAGAN, BigGAN and BigGAN-deep networks against compact re-writes of their references
(tests/reference_nets_attention.py): module trees, initialisation, outputs and the in-place
spectral-norm / batch-norm buffer updates in train and eval mode, reference checkpoints both
ways, and the errors for what the references cannot run.

Tolerances: the reference composition (``fused=False``) is the reference's arithmetic op for op,
so it must agree bit for bit. The fused networks differ by fp32 rounding only (reassociated
sums: the shortcut conv before the upsampling, the attention's output conv before the
attention, the fused norms); their outputs are compared at 2e-4 of the output's scale: tens of
layers, each adding at most ~n u with reduction lengths n <= 2^10 and u = 2^-24 (~6e-5 each in
the worst case, far less in practice). Gradients are compared in eval mode, where no batch
statistic of a 2-sample batch amplifies rounding.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import ganengine.models as gm
from tests._train_utils import one_thread  # noqa: F401 (fixture)
from ganengine.models import (CheckpointMismatchError, build_network, load_reference_checkpoint,
                              save_reference_checkpoint)
from ganengine.models import biggan_ops
from tests import reference_nets_attention as R


def _labels(n, k):
    return torch.randint(0, k, (n,))


def _g_inputs(ref, n_classes, n=2):
    def make():
        z = torch.randn(n, ref.dim_z if hasattr(ref, "dim_z") else ref.linear.in_features - ref.shared.embedding_dim)
        y = _labels(n, n_classes)
        return z, (ref.shared(y).detach() if isinstance(ref.shared, torch.nn.Embedding) else y)
    return make


# (arch, kwargs, reference factory, inputs factory(ref))
CASES = [
    ("sagan_G", dict(batch_size=2, image_size=64, z_dim=8, conv_dim=8), lambda: R.SAGANGenerator(2, 64, 8, 8),
     lambda ref: lambda: (torch.randn(2, 8),)),
    ("sagan_D", dict(batch_size=2, image_size=64, conv_dim=8), lambda: R.SAGANDiscriminator(2, 64, 8),
     lambda ref: lambda: (torch.randn(2, 3, 64, 64),)),
    ("biggan_G", dict(G_ch=8, dim_z=20, resolution=32, G_attn="16", n_classes=5, hier=True, shared_dim=6),
     lambda: R.BigGANGenerator(G_ch=8, dim_z=20, resolution=32, G_attn="16", n_classes=5, hier=True, shared_dim=6),
     lambda ref: _g_inputs(ref, 5)),
    ("biggan_G", dict(G_ch=4, dim_z=8, resolution=32, G_attn="0", n_classes=3, G_shared=False, num_G_SVs=2,
                      num_G_SV_itrs=2, SN_eps=1e-6),
     lambda: R.BigGANGenerator(G_ch=4, dim_z=8, resolution=32, G_attn="0", n_classes=3, G_shared=False, num_G_SVs=2,
                               num_G_SV_itrs=2, SN_eps=1e-6),
     lambda ref: _g_inputs(ref, 3)),
    ("biggan_D", dict(D_ch=8, resolution=32, D_attn="16", n_classes=5),
     lambda: R.BigGANDiscriminator(D_ch=8, resolution=32, D_attn="16", n_classes=5),
     lambda ref: lambda: (torch.randn(2, 3, 32, 32), _labels(2, 5))),
    ("biggan_D", dict(D_ch=2, resolution=64, D_attn="8", n_classes=4, num_D_SVs=2, num_D_SV_itrs=2, D_wide=False,
                      output_dim=2),
     lambda: R.BigGANDiscriminator(D_ch=2, resolution=64, D_attn="8", n_classes=4, num_D_SVs=2, num_D_SV_itrs=2,
                                   D_wide=False, output_dim=2),
     lambda ref: lambda: (torch.randn(2, 3, 64, 64), _labels(2, 4))),
    ("biggan_deep_G", dict(G_ch=16, dim_z=16, resolution=32, G_attn="16", n_classes=5, hier=True, shared_dim=8),
     lambda: R.BigGANDeepGenerator(G_ch=16, dim_z=16, resolution=32, G_attn="16", n_classes=5, shared_dim=8),
     lambda ref: _g_inputs(ref, 5)),
    ("biggan_deep_D", dict(D_ch=16, resolution=32, D_attn="16", n_classes=5, D_depth=1),
     lambda: R.BigGANDeepDiscriminator(D_ch=16, D_depth=1, resolution=32, D_attn="16", n_classes=5),
     lambda ref: lambda: (torch.randn(2, 3, 32, 32), _labels(2, 5))),
]
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]


def _randomize(net):
    """Trained-looking state: gamma != 0, running statistics away from 0/1, weights moved off
    the orthogonal init (where every sigma is exactly 1)."""
    with torch.no_grad():
        for k, v in net.state_dict().items():
            if not v.is_floating_point():
                continue
            if k.endswith(("stored_var", "running_var")):
                v.copy_(torch.rand_like(v) + 0.5)
            elif k.endswith(("stored_mean", "running_mean")):
                v.copy_(torch.randn_like(v) * 0.1)
            elif k.endswith("gamma"):
                v.copy_(torch.randn_like(v) * 0.5)
            elif v.dim() >= 2 and not k.endswith(("_u", "_v")) and v.numel() > 1:
                v.add_(torch.randn_like(v) * 0.1 * v.std())
    return net


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


# The checks of a network family against its reference re-write, shared with tests/test_icgan_networks.py.
def check_tree_count_and_initialisation(arch, kwargs, make_ref):
    torch.manual_seed(1)
    ref = make_ref()
    torch.manual_seed(1)
    ours = build_network(arch, **kwargs)
    rsd, osd = ref.state_dict(), ours.state_dict()
    assert list(osd) == list(rsd)
    for k in rsd:
        torch.testing.assert_close(osd[k], rsd[k], atol=0, rtol=0, msg=f"initial value of {k}")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def check_outputs_and_buffer_updates(arch, kwargs, make_ref, make_inputs, fused):
    ref = _randomize(make_ref())
    sd0 = copy.deepcopy(ref.state_dict())
    inputs = make_inputs(ref)
    exact = dict(atol=0, rtol=0)
    for mode in (True, False):
        ref.load_state_dict(sd0)
        ours = load_reference_checkpoint(sd0, arch, fused=fused, **kwargs)
        assert not ours.training
        ref.train(mode)
        ours.train(mode)
        for step in range(2):  # the second step sees the first one's u / v / running statistics
            torch.manual_seed(10 + step)
            x = inputs()
            want, got = _tuple(ref(*x)), _tuple(ours(*x))
            for w, g in zip(want, got):
                tol = exact if not fused else dict(atol=2e-4 * float(w.detach().abs().max()), rtol=0)
                torch.testing.assert_close(g, w, **tol, msg=f"{'train' if mode else 'eval'} step {step}")
            got_sd = ours.state_dict()
            for k, v in ref.state_dict().items():
                tol = exact if not fused or not v.is_floating_point() else dict(atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(got_sd[k], v, **tol, msg=f"{k} after step {step}")


def check_fused_gradients(arch, kwargs, make_ref, make_inputs, unused_grad_is_none=False):
    """``unused_grad_is_none``: a parameter the reference's output does not reach has no gradient
    at all (else: none, or zeros)."""
    ref = _randomize(make_ref()).eval()
    ours = load_reference_checkpoint(ref.state_dict(), arch, **kwargs)
    x = make_inputs(ref)()
    want, got = _tuple(ref(*x))[0], _tuple(ours(*x))[0]
    torch.manual_seed(5)
    weights = torch.randn_like(want)
    (want * weights).sum().backward()
    (got * weights).sum().backward()
    ref_grads = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for k, p in ours.named_parameters():
        if k in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[k], atol=2e-4 * scale, rtol=1e-3, msg=k)
        elif unused_grad_is_none:
            assert p.grad is None, k
        else:
            assert p.grad is None or not p.grad.any(), k


def check_save_reference_checkpoint(tmp_path, arch, kwargs, make_ref):
    """Saved by ganengine, loaded strictly by the reference re-write and back by ganengine: the same
    tensors."""
    ours = _randomize(build_network(arch, **kwargs))
    path = tmp_path / "net.pth"
    save_reference_checkpoint(ours, path, arch)
    ref = make_ref()
    ref.load_state_dict(torch.load(path, weights_only=True))  # strict
    back = load_reference_checkpoint(str(path), arch, **kwargs)
    ref_sd, back_sd = ref.state_dict(), back.state_dict()
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(ref_sd[k], v, atol=0, rtol=0)
        torch.testing.assert_close(back_sd[k], v, atol=0, rtol=0)


@pytest.mark.parametrize("arch,kwargs,make_ref,make_inputs", CASES, ids=IDS)
def test_same_tree_count_and_initialisation(arch, kwargs, make_ref, make_inputs):
    check_tree_count_and_initialisation(arch, kwargs, make_ref)


@pytest.mark.parametrize("fused", [False, True], ids=["reference-ops", "fused"])
@pytest.mark.parametrize("arch,kwargs,make_ref,make_inputs", CASES, ids=IDS)
def test_outputs_and_buffer_updates_equal_the_reference(arch, kwargs, make_ref, make_inputs, fused):
    check_outputs_and_buffer_updates(arch, kwargs, make_ref, make_inputs, fused)


@pytest.mark.parametrize("arch,kwargs,make_ref,make_inputs", CASES, ids=IDS)
def test_fused_gradients_equal_the_reference(arch, kwargs, make_ref, make_inputs):
    check_fused_gradients(arch, kwargs, make_ref, make_inputs)


@pytest.mark.parametrize("arch,kwargs,make_ref,make_inputs", CASES, ids=IDS)
def test_save_reference_checkpoint_loads_in_the_reference(tmp_path, arch, kwargs, make_ref, make_inputs):
    if arch.startswith("sagan_"):
        # the reference SAGAN hard-codes its attention widths for conv_dim=64: saved at 64 (the
        # re-write's widths are the reference's there), refused at the case's conv_dim
        with pytest.raises(ValueError, match="conv_dim=64"):
            save_reference_checkpoint(build_network(arch, **kwargs), tmp_path / "small.pth", arch)
        other = "dcgan_G" if arch == "sagan_G" else "dcgan_D"  # another arch's network: named as such
        with pytest.raises(ValueError, match=f"is an arch='{other}' network"):
            save_reference_checkpoint(build_network(other), tmp_path / "other.pth", arch)
        kwargs = dict(kwargs, conv_dim=64)
        make_ref = {"sagan_G": lambda: R.SAGANGenerator(2, 64, kwargs["z_dim"] if "z_dim" in kwargs else 8, 64),
                    "sagan_D": lambda: R.SAGANDiscriminator(2, 64, 64)}[arch]
    check_save_reference_checkpoint(tmp_path, arch, kwargs, make_ref)



def test_biggan_spectral_norm_semantics():
    """Eval runs the power iteration but writes nothing; train writes u0 and sv0; the fused
    weight's custom backward equals autograd through the reference's power iteration."""
    torch.manual_seed(0)
    conv = gm.layers_biggan.SNConv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(3)
    u0 = conv.u0.clone()
    conv.eval()
    w_eval = conv.W_()
    assert torch.equal(conv.u0, u0) and float(conv.sv0) == 1.0
    conv.train()
    w_train = conv.W_()
    assert not torch.equal(conv.u0, u0) and float(conv.sv0) != 1.0
    torch.testing.assert_close(w_eval, w_train)  # same sigma from the same u
    sigma = float(conv.sv0)
    torch.testing.assert_close(torch.linalg.matrix_norm(w_train.detach().view(6, -1), 2), torch.tensor(1.0),
                               atol=0.2, rtol=0)  # one iteration from randn: roughly normalised
    assert sigma > 0

    w = torch.randn(5, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    for transpose in (False, True):
        u = torch.randn(1, 12 if transpose else 5, dtype=torch.float64)
        sv = torch.ones(1, dtype=torch.float64)

        def fused(weight):
            return biggan_ops.sn_weight(weight, [u.clone()], [sv.clone()], True, 1e-12, 1, transpose, fused=True)

        def ref(weight):
            return biggan_ops.sn_weight(weight, [u.clone()], [sv.clone()], True, 1e-12, 1, transpose, fused=False)

        torch.testing.assert_close(fused(w), ref(w))
        g = torch.randn_like(w)
        ga, = torch.autograd.grad((fused(w) * g).sum(), w)
        gb, = torch.autograd.grad((ref(w) * g).sum(), w)
        torch.testing.assert_close(ga, gb)  # (no gradcheck: u and v are constants by design)


def test_sagan_spectral_norm_updates_in_eval_and_attention_maps():
    torch.manual_seed(0)
    net = build_network("sagan_D", conv_dim=8).eval()
    u = net.l1[0].module.weight_u.clone()
    x = torch.randn(2, 3, 64, 64)
    out, p1, p2 = net(x)
    assert out.shape == (2,) and p1.shape == (2, 64, 64) and p2.shape == (2, 16, 16)
    assert not torch.equal(net.l1[0].module.weight_u, u)  # the reference writes u in eval too
    torch.testing.assert_close(p1.sum(-1), torch.ones(2, 64))
    net.return_attention = False
    out2, q1, q2 = net(x)
    assert q1 is None and q2 is None and out2.shape == (2,)
    # u/v are Parameters that do not require grad (they count in parameters(), as in the reference)
    names = {k for k, p in net.named_parameters() if not p.requires_grad}
    assert "l1.0.module.weight_u" in names and "l1.0.module.weight_v" in names


def test_reference_default_parameter_counts():
    """Counts of the reference code at its defaults (BigGAN 128x128 G_ch=D_ch=64; the launch
    scripts' G_ch=96 / BigGAN-deep G_ch=128 configurations; SAGAN 64x64)."""
    want = [("biggan_G", {}, 33_550_980), ("biggan_D", {}, 39_448_258),
            ("biggan_G", dict(G_ch=96, dim_z=120, shared_dim=128, hier=True), 70_433_988),
            ("biggan_D", dict(D_ch=96), 87_982_370),
            ("biggan_deep_G", dict(G_ch=128, dim_z=128, shared_dim=128, hier=True), 50_244_484),
            ("biggan_deep_D", dict(D_ch=128), 34_590_210),
            ("sagan_G", {}, 3_619_865), ("sagan_D", {}, 3_183_475)]
    for arch, kwargs, count in want:
        with torch.device("meta"):
            net = build_network(arch, init_type=None, **kwargs)
        assert sum(p.numel() for p in net.parameters()) == count, (arch, kwargs)


def test_biggan_accepts_the_reference_config_keys():
    # the reference constructors take **kwargs (they are called with the whole training config)
    net = load_reference_checkpoint(build_network("biggan_D", D_ch=8, resolution=32, D_attn="0", n_classes=3)
                                    .state_dict(), "biggan_D", D_ch=8, resolution=32, D_attn="0", n_classes=3,
                                    dataset="I128_hdf5", G_ch=96, num_epochs=100)
    assert net.n_classes == 3


def test_mismatch_names_a_fitting_call():
    ref = R.BigGANGenerator(G_ch=8, dim_z=20, resolution=32, G_attn="16", n_classes=5, hier=True, shared_dim=6)
    with pytest.raises(CheckpointMismatchError) as info:
        load_reference_checkpoint(ref.state_dict(), "biggan_G", G_ch=8, resolution=32, n_classes=5)
    msg = str(info.value)
    for part in ("shared.weight", "shared_dim=6", "hier=True", "G_attn='16'"):
        assert part in msg, msg


@pytest.mark.parametrize("call,match", [
    (lambda: build_network("sagan_G", image_size=32), "image_size must be 64"),
    (lambda: build_network("sagan_D", conv_dim=4), "conv_dim must be >= 8"),
    (lambda: build_network("biggan_G", resolution=48), "resolution must be one of"),
    (lambda: build_network("biggan_D", resolution=512), "resolution must be one of"),
    (lambda: build_network("biggan_deep_G", hier=False), "hier=True"),  # (the arch's default: True)
    (lambda: build_network("biggan_G", G_param="sn", G_ch=2, resolution=32), "G_param must be 'SN'"),
    (lambda: build_network("biggan_G", hier=True, dim_z=3, G_ch=2, resolution=32), "smaller than the 4 chunks"),
    (lambda: build_network("icgan_G", hier=True, dim_z=3, G_ch=2, resolution=32), "smaller than the 4 chunks"),
    (lambda: build_network("biggan_deep_G", hier=True, G_depth=1, G_ch=8, resolution=64), "G_depth=1"),
    (lambda: build_network("biggan_G", G_ch=1, resolution=32, G_attn="16"), "at least 8 channels"),
    (lambda: build_network("biggan_G", G_attn="sixty-four"), "joined by '_'"),
    (lambda: build_network("biggan_G", cross_replica=True, G_ch=2, resolution=32), "cross_replica"),
    (lambda: build_network("biggan_D", D_param="none"), "D_param must be 'SN'"),
    (lambda: build_network("biggan_G", num_G_SV_itrs=0, G_ch=2, resolution=32), "num_itrs must be an int >= 1"),
    (lambda: build_network("biggan_D", D_ch=8, resolution=32, D_attn="0", n_classes=3)(torch.randn(1, 3, 32, 32)),
     "y \\(class labels"),
])
def test_bad_arguments_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ============================================================================ training steps
def _ortho_ref(model, strength, blacklist=()):
    # BigGAN-PyTorch utils.ortho, as written there
    with torch.no_grad():
        for param in model.parameters():
            if len(param.shape) < 2 or any(param is item for item in blacklist):
                continue
            w = param.view(param.shape[0], -1)
            grad = 2 * torch.mm(torch.mm(w, w.t()) * (1. - torch.eye(w.shape[0])), w)
            param.grad.data += strength * grad.view(param.shape)


def _toggle(net, flag):
    for p in net.parameters():
        p.requires_grad = flag


def _ema_ref(G, G_ema, itr, o):
    """BigGAN-PyTorch's utils.ema update (IC-GAN's is the same): every state entry, from ema_start."""
    decay = 0.0 if itr < o["ema_start"] else o["ema_decay"]
    with torch.no_grad():
        src, tgt = G.state_dict(), G_ema.state_dict()
        for key in src:
            tgt[key].copy_(tgt[key] * decay + src[key] * (1 - decay))


def _biggan_ref_step(G, D, G_ema, oG, oD, x, y, o, itr):
    """BigGAN-PyTorch train_fns.GAN_training_function (hinge, no split_D) and utils.ema."""
    k = o["num_D_steps"] * o["num_D_accumulations"]
    bs = x.shape[0] // k
    xs, ys = torch.split(x, bs), torch.split(y, bs)
    _toggle(D, True)
    _toggle(G, False)
    counter = 0
    for _ in range(o["num_D_steps"]):
        oD.zero_grad()
        for _ in range(o["num_D_accumulations"]):
            z = torch.randn(bs, G.dim_z) * o["z_var"]
            gy = torch.randint(0, o["n_classes"], (bs,))
            with torch.no_grad():
                G_z = G(z, G.shared(gy))
            d_out = D(torch.cat([G_z, xs[counter]]), torch.cat([gy, ys[counter]]))
            D_fake, D_real = torch.split(d_out, [bs, bs])
            loss_real, loss_fake = torch.mean(F.relu(1. - D_real)), torch.mean(F.relu(1. + D_fake))
            ((loss_real + loss_fake) / o["num_D_accumulations"]).backward()
            counter += 1
        if o["D_ortho"] > 0:
            _ortho_ref(D, o["D_ortho"])
        oD.step()
    _toggle(D, False)
    _toggle(G, True)
    oG.zero_grad()
    gbs = max(o["G_batch_size"], bs)  # (train.py: G_batch_size = max(G_batch_size, batch_size))
    for _ in range(o["num_G_accumulations"]):
        z = torch.randn(gbs, G.dim_z) * o["z_var"]
        gy = torch.randint(0, o["n_classes"], (gbs,))
        G_loss = -torch.mean(D(G(z, G.shared(gy)), gy)) / float(o["num_G_accumulations"])
        G_loss.backward()
    if o["G_ortho"] > 0:
        _ortho_ref(G, o["G_ortho"], blacklist=list(G.shared.parameters()))
    oG.step()
    _ema_ref(G, G_ema, itr, o)
    return {"D_loss_real": loss_real, "D_loss_fake": loss_fake, "G_loss": G_loss}


@pytest.mark.parametrize("g_batch", [dict(), dict(G_batch_size=1, num_G_accumulations=2), dict(G_batch_size=3)],
                         ids=["default", "G_batch_below_chunk-2_accumulations", "G_batch_above_chunk"])
def test_biggan_step_matches_the_reference_step(g_batch):
    """Losses (the logged G_loss as the reference's train() reports it), weights and the EMA; the G
    batch is max(G_batch_size, the chunk size), as the reference's train.py sizes it."""
    from ganengine.models import BigGAN

    torch.manual_seed(3)
    o = dict(resolution=32, n_classes=5, G_ch=8, D_ch=8, G_attn="16", D_attn="16", G_shared=True, hier=True,
             dim_z=20, shared_dim=6, num_D_steps=2, G_ortho=1e-3, D_ortho=1e-3, ema=True, ema_start=2,
             ema_decay=0.9, **g_batch)
    model = BigGAN(**o)
    o = model.options
    arch = dict(G_ch=8, dim_z=20, resolution=32, G_attn="16", n_classes=5, hier=True, shared_dim=6, SN_eps=1e-8)
    G, G_ema = R.BigGANGenerator(**arch), R.BigGANGenerator(**arch)
    D = R.BigGANDiscriminator(D_ch=8, resolution=32, D_attn="16", n_classes=5, SN_eps=1e-8)
    for net, name in ((G, "G"), (D, "D"), (G_ema, "G_ema")):
        net.load_state_dict(getattr(model, name).state_dict())
    opts = model.make_optimizers()
    oG = torch.optim.Adam(G.parameters(), o["G_lr"], betas=(0.0, 0.999), eps=1e-8)
    oD = torch.optim.Adam(D.parameters(), o["D_lr"], betas=(0.0, 0.999), eps=1e-8)
    batch = {"image": torch.rand(4, 3, 32, 32) * 2 - 1, "label": torch.tensor([0, 3, 1, 4])}
    for itr in (1, 2, 3):
        torch.manual_seed(100 + itr)
        got = model.train_step(batch, opts)
        torch.manual_seed(100 + itr)
        want = _biggan_ref_step(G, D, G_ema, oG, oD, batch["image"], batch["label"], o, itr)
        for k in want:
            torch.testing.assert_close(got[k], want[k].detach(), atol=2e-4 * (1 + abs(float(want[k].detach()))), rtol=0,
                                       msg=f"step {itr}: {k}")
    # Adam turns gradients that are zero in exact arithmetic (a conv bias in front of batch
    # norm) into steps of +-lr from either side's rounding noise: weights agree to 3 steps x lr
    drift = 3 * 3 * max(o["G_lr"], o["D_lr"])
    for net, name in ((G, "G"), (D, "D"), (G_ema, "G_ema")):
        got_sd = getattr(model, name).state_dict()
        for k, v in net.state_dict().items():
            torch.testing.assert_close(got_sd[k], v, atol=drift, rtol=1e-3, msg=f"{name}.{k}")


def _sagan_ref_step(G, D, oG, oD, real, z_dim):
    """heykeetae trainer.py's step with adv_loss='hinge'."""
    d_out_real, _, _ = D(real)
    d_loss_real = F.relu(1.0 - d_out_real).mean()
    z = torch.randn(real.size(0), z_dim)
    fake, _, _ = G(z)
    d_out_fake, _, _ = D(fake)
    d_loss_fake = F.relu(1.0 + d_out_fake).mean()
    oD.zero_grad()
    oG.zero_grad()
    (d_loss_real + d_loss_fake).backward()
    oD.step()
    z = torch.randn(real.size(0), z_dim)
    fake, _, _ = G(z)
    g_out_fake, _, _ = D(fake)
    g_loss_fake = -g_out_fake.mean()
    oD.zero_grad()
    oG.zero_grad()
    g_loss_fake.backward()
    oG.step()
    return {"D/loss_real": d_loss_real, "D/loss_fake": d_loss_fake, "G/loss_fake": g_loss_fake}


def test_sagan_step_matches_the_reference_step():
    from ganengine.models import SAGAN

    torch.manual_seed(4)
    model = SAGAN(g_conv_dim=8, d_conv_dim=8, z_dim=8)
    G, D = R.SAGANGenerator(2, 64, 8, 8), R.SAGANDiscriminator(2, 64, 8)
    G.load_state_dict(model.G.state_dict())
    D.load_state_dict(model.D.state_dict())
    opts = model.make_optimizers()
    oG = torch.optim.Adam([p for p in G.parameters() if p.requires_grad], 1e-4, betas=(0.0, 0.9))
    oD = torch.optim.Adam([p for p in D.parameters() if p.requires_grad], 4e-4, betas=(0.0, 0.9))
    real = torch.rand(2, 3, 64, 64) * 2 - 1
    for step in range(2):
        torch.manual_seed(50 + step)
        got = model.train_step({"image": real}, opts)
        torch.manual_seed(50 + step)
        want = _sagan_ref_step(G, D, oG, oD, real, 8)
        for k in want:
            torch.testing.assert_close(got[k], want[k].detach(), atol=2e-4 * (1 + abs(float(want[k].detach()))), rtol=0,
                                       msg=f"step {step}: {k}")
    got_sd = model.D.state_dict()
    for k, v in D.state_dict().items():
        torch.testing.assert_close(got_sd[k], v, atol=1e-4, rtol=1e-3, msg=k)


def test_sagan_reference_backward_reads_the_last_u_and_v():
    """Two D passes then one backward: the reference's sigma gradient uses the u and v of the
    last pass for both (its Parameters' .data is replaced); ours reproduces it."""
    torch.manual_seed(0)
    ref = _randomize(R.SAGANDiscriminator(2, 64, 8))
    ours = load_reference_checkpoint(ref.state_dict(), "sagan_D", conv_dim=8, fused=False).train()
    x1, x2 = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    (ref(x1)[0].sum() - ref(x2)[0].sum()).backward()
    (ours(x1)[0].sum() - ours(x2)[0].sum()).backward()
    for k, p in ours.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, dict(ref.named_parameters())[k].grad, atol=1e-6, rtol=1e-4, msg=k)


def test_latent_optimisation_is_the_natural_gradient_step():
    from ganengine.models.synthesis_tools import latent_optimise

    w = torch.tensor([[0.5, -1.0, 2.0]])
    z = torch.tensor([[0.1, 0.2, -0.3], [0.0, 0.5, 0.5]])
    out = latent_optimise(z, lambda zz: zz @ w.t(), rate=1.0, alpha=0.9, beta=5.0, steps=1, differentiable=False)
    g = w.expand(2, 3)
    want = torch.clamp(z + 0.9 * g / (5.0 + (g ** 2).sum(1, keepdim=True)), -1, 1)
    torch.testing.assert_close(out, want)
    same = latent_optimise(z, lambda zz: zz @ w.t(), rate=0.0, alpha=0.9, beta=5.0, steps=1, differentiable=False)
    torch.testing.assert_close(same, z)


def test_biggan_and_sagan_resume_exactly(tmp_path):
    from ganengine.train import TrainConfig, train

    def cfg(model, opts, run, steps, **kw):
        return TrainConfig(model=model, model_options=opts, data_options=dict(image_size=opts.get("resolution", 64)),
                           run_dir=str(run), batch_size=2, max_steps=steps, sample_every=0, save_every=0,
                           print_freq=1, progress=False, tensorboard="off", seed=0, deterministic=True, **kw)

    for model, opts in (("biggan", dict(resolution=32, n_classes=10, G_ch=4, D_ch=4, G_attn="0", D_attn="16",
                                       G_shared=True, hier=True, dim_z=16, num_D_steps=1, ema=True, ema_start=2)),
                        ("sagan", dict(g_conv_dim=8, d_conv_dim=8, z_dim=8))):
        full = train(cfg(model, opts, tmp_path / model / "full", 4))
        train(cfg(model, opts, tmp_path / model / "part", 2))
        resumed = train(cfg(model, opts, tmp_path / model / "part", 4, resume="latest"))
        a, b = (torch.load(r["checkpoint"], weights_only=True) for r in (full, resumed))
        for net in a["networks"]:
            for k, v in a["networks"][net].items():
                torch.testing.assert_close(b["networks"][net][k], v, atol=0, rtol=0, msg=f"{model} {net}.{k}")
        assert b["extra"] == a["extra"]


@pytest.mark.parametrize("name,options", [
    ("sagan", dict(g_conv_dim=8, d_conv_dim=8, z_dim=8)),
    ("biggan", dict(resolution=32, n_classes=3, G_ch=4, D_ch=4, G_attn="16", D_attn="16", dim_z=8, G_ortho=1e-3,
                    D_ortho=1e-3)),
    ("biggan_deep", dict(resolution=32, n_classes=3, G_ch=4, D_ch=4, G_attn="0", D_attn="0", dim_z=8)),
    ("unetgan", dict(resolution=32, n_classes=3, G_ch=4, D_ch=4, G_attn="0", D_attn="0", dim_z=16)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_channels_last_models_train_as_contiguous_ones(name, options, one_thread):
    """`--channels_last` (the engine's model.to(memory_format=channels_last)) on the spectral-norm
    models: their weights are no longer contiguous, which the SN power iterations and BigGAN's
    orthogonal regulariser used to .view() (a crash at the first step). One step in either
    layout from the same state: the same losses and weights, to the reference step's bounds."""
    from ganengine.models import build_model

    torch.manual_seed(7)
    nchw = build_model(name, **options)
    nhwc = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    assert any(p.dim() == 4 and not p.is_contiguous() for p in nhwc.G.parameters())
    size = 64 if name == "sagan" else 32
    image = torch.rand(2, 3, size, size) * 2 - 1
    batches = [{"image": image, "label": torch.tensor([0, 2])},
               {"image": image.contiguous(memory_format=torch.channels_last), "label": torch.tensor([0, 2])}]
    results = []
    for model, batch in zip((nchw, nhwc), batches):
        opts = model.make_optimizers()
        torch.manual_seed(11)
        results.append(model.train_step(batch, opts))
    for k, want in results[0].items():
        torch.testing.assert_close(results[1][k], want, atol=2e-4 * (1 + abs(float(want))), rtol=0, msg=k)
    drift = 3 * max(v for k, v in nchw.options.items() if k.endswith("lr") and isinstance(v, float))
    for net in nchw.network_names:
        got = getattr(nhwc, net).state_dict()
        for k, v in getattr(nchw, net).state_dict().items():
            torch.testing.assert_close(got[k], v, atol=drift, rtol=1e-3, msg=f"{net}.{k}")


@pytest.mark.parametrize("name", ["biggan", "unetgan"])
def test_orthogonal_regularisation_adds_to_unscaled_gradients(name, one_thread):
    """--amp fp16's GradScaler: G_ortho / D_ortho add BigGAN's term to the gradients after they
    are unscaled (torch's AMP rule for editing .grad), so the step equals the unscaled run's. Was:
    added to gradients still multiplied by the scale, then divided by it: the term scale (2**16)
    times too weak. Autocast is off in both runs: the scaler alone differs (power-of-two scaling
    is exact), so the weights after one step agree to Adam's rounding."""
    import contextlib

    from ganengine.models import build_model
    from ganengine.train.context import AmpContext

    torch.manual_seed(5)
    plain = build_model(name, resolution=32, n_classes=3, G_ch=4, D_ch=4, G_attn="0", D_attn="0", dim_z=16,
                        G_ortho=0.5, D_ortho=0.5)
    scaled = copy.deepcopy(plain)
    ctx = AmpContext("fp16", "cpu", ["G", "D"])
    ctx.autocast = contextlib.nullcontext
    batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1, "label": torch.tensor([0, 2])}
    for model, c in ((plain, None), (scaled, ctx)):
        opts = model.make_optimizers()
        torch.manual_seed(9)
        model.train_step(batch, opts) if c is None else model.train_step(batch, opts, c)
    assert all(s.get_scale() == 2.0 ** 16 for s in ctx.scalers.values())  # (no step skipped)
    lr = max(plain.options["G_lr"], plain.options["D_lr"])
    for net in ("G", "D"):
        got = getattr(scaled, net).state_dict()
        for k, v in getattr(plain, net).state_dict().items():
            # Adam's first step moves each weight by ~lr: its rounding, a few ulps of lr
            torch.testing.assert_close(got[k], v, atol=1e-3 * lr, rtol=1e-6, msg=f"{net}.{k}")
