"""Public names the contract (ARCHITECTURE.md) and README promise: GANLoss(mode=...), and the
strict-mode error importable from the public modules."""
import pytest
import torch

import ganengine
from ganengine import nn as gnn


@pytest.mark.parametrize("mode", ["vanilla", "lsgan", "wgangp", "hinge"])
def test_ganloss_mode_keyword_is_gan_mode(mode):
    pred = torch.randn(2, 1, 5, 5)
    a, b = gnn.GANLoss(mode=mode), gnn.GANLoss(gan_mode=mode)
    assert a.gan_mode == b.gan_mode == mode
    for real in (True, False):
        torch.testing.assert_close(a(pred, real), b(pred, real), rtol=0, atol=0)


def test_ganloss_mode_and_gan_mode_disagreeing_is_an_error():
    for gan_mode, mode in (("vanilla", "hinge"), ("lsgan", "vanilla")):  # lsgan is the default's value
        with pytest.raises(TypeError, match="gan_mode or mode"):
            gnn.GANLoss(gan_mode=gan_mode, mode=mode)
    assert gnn.GANLoss("HINGE", mode="hinge").gan_mode == "hinge"  # the same mode twice, any case
    assert gnn.GANLoss().gan_mode == "lsgan"
    with pytest.raises(ValueError, match="^mode must be one of"):
        gnn.GANLoss(mode="bogus")
    with pytest.raises(ValueError, match="^gan_mode must be one of"):
        gnn.GANLoss("bogus")


def test_backend_fallback_error_is_public():
    from ganengine.ops import _dispatch
    assert ganengine.BackendFallbackError is ganengine.backends.BackendFallbackError is _dispatch.BackendFallbackError
    assert issubclass(ganengine.BackendFallbackError, RuntimeError)
    assert "BackendFallbackError" in ganengine.__all__


@pytest.mark.parametrize("model, option", [("stargan", "--c_dim"), ("acgan", "--n_classes"),
                                           ("biggan", "--n_classes"), ("stackgan", "--text_dim")])
def test_train_help_gives_one_default_for_options_from_the_data(model, option, capsys):
    """An option whose value comes from the data says so once (no second, contradicting default)."""
    import re

    from ganengine.cli import main
    with pytest.raises(SystemExit):
        main(["train", model, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    text = out[out.rindex(f"{option} {option[2:].upper()}"):][:200]
    assert "from the data; the reference's:" in text
    assert len(re.findall(r"default:", text.split(" --", 1)[0])) == 1, text
