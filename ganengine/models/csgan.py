"""CSGAN (Kancharagunta & Dubey 2019, "Cyclic-Synthesized Generative Adversarial Networks for
Image-to-Image Transformation"; reference: KishanKancharagunta/CSGAN ``csgan.py``, built on the
CycleGAN code): CycleGAN's networks, losses and step, plus the cycle-synthesized L1 terms

    CS_A = lambda_CS * L1(G_B(real_B), stopgrad(G_B(G_A(real_A))))   synthesised vs cycled A
    CS_B = lambda_CS * L1(G_A(real_A), stopgrad(G_A(G_B(real_B))))   synthesised vs cycled B

added to the generators' loss (the reference detaches the cycled images and fixes the weight at
``k = 30``). All L1 terms (cycle, identity, CS) run in one fused pass
(``GF.cycle_synthesized_loss``). Logged as ``CS_A`` / ``CS_B`` beside CycleGAN's losses.
"""
from __future__ import annotations

from ganengine.models._common import check_finite_nonnegative
from ganengine.models.cyclegan import CycleGAN


class CSGAN(CycleGAN):
    """Options: CycleGAN's (same defaults) plus ``lambda_CS`` (30, the reference's k)."""

    MODEL_NAME = "csgan"
    DEFAULTS = dict(CycleGAN.DEFAULTS, lambda_CS=30.0)
    EXTRA_LOSS_TERMS = {"cs_a": "CS_A", "cs_b": "CS_B"}

    def __init__(self, **options):
        super().__init__(**options)
        check_finite_nonnegative("CSGAN", "lambda_CS", self.options["lambda_CS"])

    def _l1_losses(self, real_A, rec_A, real_B, rec_B, fake_A, fake_B, idt_A, idt_B):
        o = self.options
        return self.losses.cycle_synthesized_loss(real_A, rec_A, real_B, rec_B, fake_A, fake_B, idt_A, idt_B,
                                         lambda_a=o["lambda_A"], lambda_b=o["lambda_B"],
                                         lambda_identity=o["lambda_identity"], lambda_cs=o["lambda_CS"])
