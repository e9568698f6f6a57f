"""gnn.PatchDiscriminator vs the reference NLayerDiscriminator (tests/reference_nets.py)."""
import pytest
import torch
from tests.reference_nets import NLayerDiscriminator, get_norm_layer, init_weights

import ganengine
import ganengine.nn as gnn
from ganengine.backends import strict
from ganengine.ops import _dispatch
from ganengine.ops import conv_act as ops
from tests._norm_bounds import batch_stat_bounds
from tests._model_bounds import assert_normwise, census
from tests._tolerance import assert_below, gamma


def _pair(input_nc, ndf, n_layers, norm, seed=0):
    torch.manual_seed(seed)
    ref = init_weights(NLayerDiscriminator(input_nc, ndf, n_layers, get_norm_layer(norm)), "normal", 0.02)
    ours = gnn.PatchDiscriminator(input_nc, ndf, n_layers, norm=norm)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _nparams(m):
    return sum(p.numel() for p in m.parameters())


def test_reference_parameter_counts():
    # the reference values (NOTES.md): pix2pix D with batch norm, CycleGAN D with instance norm
    assert _nparams(gnn.PatchDiscriminator(6, 64, 3, norm="batch")) == 2_768_705
    assert _nparams(gnn.PatchDiscriminator(3, 64, 3, norm="instance")) == 2_764_737


@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
@pytest.mark.parametrize("n_layers", [0, 1, 2, 3])
def test_keys_shapes_counts_match_reference(norm, n_layers):
    ref = NLayerDiscriminator(3, 8, n_layers, get_norm_layer(norm))
    ours = gnn.PatchDiscriminator(3, 8, n_layers, norm=norm)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    assert _nparams(ours) == _nparams(ref)
    assert [type(m).__name__ for m in ours.model] == [
        "Identity" if type(m).__name__ == "Identity" else type(m).__name__ for m in ref.model]


BACKENDS = [("torch", None), ("cpu", None), ("triton", "igemm"), ("triton", "vendor")]


@pytest.mark.parametrize("backend,impl", BACKENDS, ids=["torch", "cpu", "triton-igemm", "triton-vendor"])
@pytest.mark.parametrize("norm,n_layers", [("instance", 3), ("batch", 2), ("none", 1), ("instance", 1), ("instance", 0), ("batch", 0)])
def test_outputs_and_grads_match_reference(backend, impl, norm, n_layers):
    if not ganengine.backends.available()[backend]:
        pytest.skip(ganengine.backends.status()[backend])
    ref, ours = _pair(3, 4, n_layers, norm)
    # n_layers=3 needs >= 24 pixels for the 4x4 stride-1 tail; keep it tiny for the interpreter
    x = torch.randn(2, 3, 24 if n_layers == 3 else 13, 26 if n_layers == 3 else 15)
    x_ref = x.clone().requires_grad_()
    x_our = x.clone().requires_grad_()
    bn_inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, i=i: bn_inputs.__setitem__(i, a[0].detach()))
             for i, m in enumerate(ref.model) if isinstance(m, torch.nn.BatchNorm2d)]
    with census(ref) as cen:  # n and depth of the normwise bound (tests/_model_bounds.py)
        y_ref = ref(x_ref)
    for h in hooks:
        h.remove()
    _dispatch.last_used.pop("batch_norm_act", None)
    with ganengine.use_backend(backend), strict(), ops.triton_conv_impl(impl or "auto"):
        y = ours(x_our)
        assert _dispatch.last_used["conv2d_act"] == backend
        if norm == "batch" and backend != "torch":  # batch norm + LeakyReLU as one op
            assert _dispatch.last_used["batch_norm_act"] == backend
        g = torch.randn_like(y_ref)
        (y * g).sum().backward()
    (y_ref * g).sum().backward()
    assert y.shape == y_ref.shape and y.is_contiguous()
    # both fp32, each within the normwise network bound of the exact value: apart by twice it
    assert_normwise(y, y_ref, cen, name="y")
    assert_normwise(x_our.grad, x_ref.grad, cen, backward=True, name="dx")
    scale = max(p.grad.abs().max().item() for p in ref.parameters())  # the network's largest gradient
    for (name, p), (_, pr) in zip(ours.named_parameters(), ref.named_parameters()):
        if norm == "instance" and name.endswith("bias") and name != f"model.{len(ref.model) - 1}.bias" \
                and name != "model.0.bias":
            assert torch.equal(p.grad, torch.zeros_like(p))  # cancelled by the norm: exactly zero
            continue
        assert_normwise(p.grad, pr.grad, cen, scale=scale, backward=True, name=name)
    # BatchNorm running statistics updated like the reference: (1 - m) old + m batch statistic,
    # each side within m times the batch statistic's bound (tests/_norm_bounds.batch_stat_bounds)
    # for an input carrying the normwise error of the layers before it
    sd_ref = ref.state_dict()
    for i, c in bn_inputs.items():
        e_c = torch.full_like(c, cen.depth * gamma(cen.n, torch.float32) * c.abs().max().item(), dtype=torch.float64)
        e_mean, e_var = batch_stat_bounds(c, e_c)
        for stat, e in (("running_mean", e_mean), ("running_var", e_var)):
            key = f"model.{i}.{stat}"
            # (+ each side's rounding of the fp32 update itself: half an ulp of the result each)
            rounding = torch.finfo(torch.float32).eps * sd_ref[key].abs().double()
            assert_below(ours.state_dict()[key], sd_ref[key], 2 * ref.model[i].momentum * e + rounding, name=key)
        key = f"model.{i}.num_batches_tracked"
        assert torch.equal(ours.state_dict()[key], sd_ref[key]), key


def test_eval_mode_batch_norm_and_channels_last_off():
    ref, ours = _pair(6, 4, 2, "batch")
    ours.channels_last = False
    x = torch.randn(1, 6, 16, 16)
    with census(ref) as cen:
        ref(x)
    ours(x)  # one training step of running stats on both
    ref.eval(), ours.eval()
    # eval mode reads the running statistics, which carry the training step's errors: one more
    # normwise stage per norm layer (tests/_model_bounds.py)
    n_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in ref.model)
    before = {k: v.clone() for k, v in ours.named_buffers()}
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = ours(xo), ref(xr)
    assert_normwise(y, y_ref, cen, extra_depth=n_norms, name="eval output")
    y.sum().backward(), y_ref.sum().backward()
    assert_normwise(xo.grad, xr.grad, cen, extra_depth=n_norms, backward=True, name="eval input grad")
    for (k, p), (_, pr) in zip(ours.named_parameters(), ref.named_parameters()):
        assert_normwise(p.grad, pr.grad, cen, extra_depth=n_norms, backward=True, name=k)
    for k, v in ours.named_buffers():
        assert torch.equal(v, before[k]), k  # eval: the running statistics stay as they were


def test_fuse_reference_discriminator():
    torch.manual_seed(0)
    ref = init_weights(NLayerDiscriminator(3, 8, 3, get_norm_layer("instance")), "normal", 0.02)
    import ganengine.ops.conv as cv

    # fuse() rewrites a conv only where the conv op has a faster route for it (measured thresholds
    # these tiny convs miss): the GEMM form forced, so that the rewrites and their numbers are checked
    with cv.gemm_policy("always"):
        fused, report = ganengine.fuse(ref, return_report=True)
    # the first block conv -> LeakyReLU; the others conv -> norm -> act as one op
    assert report.get("conv2d+leaky_relu") == 1 and report.get("conv2d+instance_norm+act") == 3, dict(report)
    assert list(fused.state_dict()) == list(ref.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with census(ref) as cen:
        want = ref(x)
    assert_normwise(fused(x), want, cen, name="fused")  # (tests/_model_bounds.py)
    ref_none = NLayerDiscriminator(3, 8, 2, get_norm_layer("none"))
    with cv.gemm_policy("always"):
        fused_none, report = ganengine.fuse(ref_none, return_report=True)
    # Identity between conv and LeakyReLU: those pairs are not adjacent, only the first is fused
    assert report.get("conv2d+leaky_relu") == 1
    with census(ref_none) as cen:
        want = ref_none(x)
    assert_normwise(fused_none(x), want, cen, name="fused, no norm")


def test_bad_arguments():
    with pytest.raises(ValueError, match="norm"):
        gnn.PatchDiscriminator(3, norm="group")
    with pytest.raises(ValueError, match="n_layers"):
        gnn.PatchDiscriminator(3, n_layers=-1)
    with pytest.raises(ValueError, match="n_layers"):
        gnn.PatchDiscriminator(3, n_layers=2.0)
    with pytest.raises(ValueError, match="expected input"):
        gnn.PatchDiscriminator(3, 8, 1)(torch.randn(1, 4, 16, 16))


def test_torch_compile_fullgraph_no_breaks():
    torch.manual_seed(0)
    d = gnn.PatchDiscriminator(3, 8, 2, norm="instance")
    x = torch.randn(2, 3, 32, 32)
    backend = "cpu" if ganengine.backends.available()["cpu"] else "torch"
    with ganengine.use_backend(backend):
        torch._dynamo.reset()
        y = torch.compile(d, fullgraph=True, backend="aot_eager")(x)
        y.sum().backward()
        torch.testing.assert_close(y, d(x))


def test_child_hooks_and_hook_based_spectral_norm_are_honoured():
    """Layers with hooks (their own, or hooks on every module) run as modules: a hook sees its
    call, and torch.nn.utils.spectral_norm's pre-hook (which sets the conv's weight) takes effect."""
    torch.manual_seed(0)
    d = gnn.PatchDiscriminator(3, ndf=8, n_layers=2)
    x = torch.randn(2, 3, 32, 32)
    seen = []
    d.model[0].register_forward_hook(lambda m, i, o: seen.append("conv0"))
    d.model[1].register_forward_hook(lambda m, i, o: seen.append("act0"))
    d(x)
    assert seen == ["conv0", "act0"]

    names = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: names.append(type(m).__name__))
    try:
        gnn.PatchDiscriminator(3, ndf=8, n_layers=2)(x)
    finally:
        handle.remove()
    assert names.count("Conv2d") == 4 and names.count("LeakyReLU") == 3 and names[-1] == "PatchDiscriminator"

    d = gnn.PatchDiscriminator(3, ndf=8, n_layers=2).eval()
    for m in d.model:
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.utils.spectral_norm(m)
    d.train()
    d(x)   # (one power iteration, then compare in eval: the same normalised weights both ways)
    d.eval()
    ref = torch.nn.Sequential(*d.model)   # the same modules, run one by one
    y = d(x)
    torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-5)
    y.sum().backward()
    assert d.model[0].weight_orig.grad is not None and d.model[0].weight_orig.grad.abs().sum() > 0


def test_unfused_patch_discriminator_is_plain_pytorch():
    """fused=False (the plain models the benchmarks time as eager) ran ganengine's conv ops in
    its forward: it is the reference's self.model(x) now, with the fused forward's numbers."""
    import ganengine
    from ganengine.models import build_model

    torch.manual_seed(0)
    PatchDiscriminator = gnn.PatchDiscriminator
    plain = PatchDiscriminator(3, ndf=4, n_layers=2, norm="batch", fused=False)
    fused = PatchDiscriminator(3, ndf=4, n_layers=2, norm="batch")
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.profiler.profile() as prof:
        out = plain(x)
    assert not [e.name for e in prof.events() if "ganengine" in e.name]
    torch.testing.assert_close(out, fused(x), rtol=1e-4, atol=1e-5)
    for name in ("pix2pix", "cyclegan"):
        model = build_model(name, netG="resnet_6blocks", ngf=4, ndf=4, n_layers_D=2, crop_size=32, fused=False)
        d = model.netD if name == "pix2pix" else model.netD_A
        assert type(d) is PatchDiscriminator and not d.fused
        with ganengine.use_backend("torch"), torch.profiler.profile() as prof:
            model.train_step({"A": torch.rand(1, 3, 32, 32), "B": torch.rand(1, 3, 32, 32)}, model.make_optimizers())
        assert not [e.name for e in prof.events() if "ganengine" in e.name], name
