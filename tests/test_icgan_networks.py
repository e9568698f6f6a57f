"""IC-GAN / cc-IC-GAN networks (``icgan_G``, ``icgan_D``) against a compact re-write of
facebookresearch/ic_gan's BigGAN.py (tests/reference_nets_icgan.py): module trees and the
initialisation drawn from a seed, outputs and spectral-norm / batch-norm buffer updates in train
and eval mode (bit for bit on the reference ops; the fused ops to rounding), gradients, and
reference checkpoints both ways.

Tolerances as tests/test_sagan_biggan.py: fused outputs at 2e-4 of the output's scale (tens of
layers, each adding at most ~n u with reduction lengths n <= 2^10, u = 2^-24), gradients at 2e-4
of the largest reference gradient, compared in eval mode.
"""

import pytest
import torch

from ganengine.models import CheckpointMismatchError, build_network, load_reference_checkpoint
from tests import reference_nets_icgan as R
from tests._train_utils import one_thread  # noqa: F401 (fixture)
from tests.test_sagan_biggan import (check_fused_gradients, check_outputs_and_buffer_updates,
                                     check_save_reference_checkpoint, check_tree_count_and_initialisation)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks; two spinning OpenMP threads are 10x slower under load


def _g_case(class_cond, **extra):
    kw = dict(G_ch=8, dim_z=20, resolution=32, G_attn="16", n_classes=5, hier=True, shared_dim=6,
              class_cond=class_cond, shared_dim_feat=7, **extra)
    ref_kw = {k: v for k, v in kw.items() if k != "instance_sz"}
    feat_in = extra.get("instance_sz", 2048) if kw.get("G_shared_feat", True) else kw["shared_dim_feat"]

    def inputs(ref):
        def make():
            z, y = torch.randn(2, ref.dim_z), torch.randint(0, 5, (2,))
            f = torch.nn.functional.normalize(torch.randn(2, feat_in), dim=1)
            return (z, y if class_cond else None, f)
        return make
    return ("icgan_G", kw, lambda: R.Generator(**ref_kw, feat_in=feat_in), inputs)


def _d_case(class_cond, **extra):
    kw = dict(D_ch=8, resolution=32, D_attn="16", n_classes=5, class_cond=class_cond, instance_sz=9, **extra)

    def inputs(ref):
        return lambda: (torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,)) if class_cond else None,
                        torch.nn.functional.normalize(torch.randn(2, 9), dim=1))
    return ("icgan_D", kw, lambda: R.Discriminator(**kw), inputs)


CASES = [
    _g_case(False, instance_sz=12),                                   # IC-GAN
    _g_case(True, instance_sz=12),                                    # cc-IC-GAN
    _g_case(False, G_shared_feat=False, num_G_SVs=2, num_G_SV_itrs=2),  # features straight into the norms
    _d_case(False),
    _d_case(True, D_wide=False, num_D_SVs=2),
]
IDS = ["G-ic", "G-cc", "G-noshared-feat", "D-ic", "D-cc"]




# the checks every reference network family gets (tests/test_sagan_biggan.py)
@pytest.mark.parametrize("arch,kwargs,make_ref,make_inputs", CASES, ids=IDS)
def test_tree_and_initialisation_are_the_references(arch, kwargs, make_ref, make_inputs):
    check_tree_count_and_initialisation(arch, kwargs, make_ref)


@pytest.mark.parametrize("fused", [False, True], ids=["reference-ops", "fused"])
@pytest.mark.parametrize("arch,kwargs,make_ref,make_inputs", CASES, ids=IDS)
def test_outputs_and_buffer_updates_equal_the_reference(arch, kwargs, make_ref, make_inputs, fused):
    check_outputs_and_buffer_updates(arch, kwargs, make_ref, make_inputs, fused)


@pytest.mark.parametrize("arch,kwargs,make_ref,make_inputs", CASES, ids=IDS)
def test_fused_gradients_equal_the_reference(arch, kwargs, make_ref, make_inputs):
    # IC-GAN's G builds the class embedding ``shared`` it never uses: no gradient at all
    check_fused_gradients(arch, kwargs, make_ref, make_inputs, unused_grad_is_none=True)


@pytest.mark.parametrize("arch,kwargs,make_ref,make_inputs", CASES, ids=IDS)
def test_save_reference_checkpoint_loads_in_the_reference(tmp_path, arch, kwargs, make_ref, make_inputs):
    check_save_reference_checkpoint(tmp_path, arch, kwargs, make_ref)


def test_reference_default_parameter_counts():
    """IC-GAN at 64x64 (the reference's icgan_res64 config: G_ch = D_ch = 64, hier, shared_dim 128,
    shared_dim_feat 512, attention at 32, 2048-d features), counted from the re-write."""
    cfg = dict(resolution=64, hier=True, shared_dim=128, shared_dim_feat=512, G_attn="32")
    for cc in (False, True):
        with torch.device("meta"):
            ours = build_network("icgan_G", class_cond=cc, dim_z=120, **cfg)
            ref = R.Generator(class_cond=cc, dim_z=120, **cfg)
            d_ours = build_network("icgan_D", resolution=64, D_attn="32", class_cond=cc)
            d_ref = R.Discriminator(resolution=64, D_attn="32", class_cond=cc)
        for a, b in ((ours, ref), (d_ours, d_ref)):
            assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())
            assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_mismatch_names_a_fitting_call():
    ref = R.Discriminator(D_ch=4, resolution=32, D_attn="0", n_classes=5, class_cond=True, instance_sz=9)
    with pytest.raises(CheckpointMismatchError, match=r"icgan_D.*instance_sz=9"):
        load_reference_checkpoint(ref.state_dict(), "icgan_D", D_ch=4, resolution=32, D_attn="0", n_classes=5)


@pytest.mark.parametrize("call,match", [
    (lambda: build_network("icgan_G", class_cond=False, instance_cond=False), "both False"),
    (lambda: build_network("icgan_G", G_shared=False, G_ch=2, resolution=32), "G_shared=False"),
    (lambda: build_network("icgan_D", instance_sz=0, D_ch=2, resolution=32), "instance_sz must be a positive int"),
    (lambda: build_network("icgan_G", G_ch=4, resolution=32, G_attn="0", n_classes=3, class_cond=False,
                           shared_dim_feat=4, instance_sz=6)(torch.randn(2, 128), None, torch.randn(2, 5)),
     r"feats must be \(N, 6\)"),
    (lambda: build_network("icgan_G", G_ch=4, resolution=32, G_attn="0", n_classes=3, class_cond=False,
                           shared_dim_feat=4, instance_sz=6)(torch.randn(2, 128), torch.zeros(2).long(),
                                                            torch.randn(2, 6)), "takes no label and feats"),
    (lambda: build_network("icgan_D", D_ch=4, resolution=32, D_attn="0", class_cond=False, instance_sz=3)(
        torch.randn(1, 3, 32, 32), torch.zeros(1).long(), torch.randn(1, 3)), "no class embedding"),
])
def test_bad_arguments_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
