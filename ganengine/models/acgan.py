"""AC-GAN (Odena et al. 2017) as eriklindernoren/PyTorch-GAN's ``implementations/acgan`` trains it,
and ADC-GAN (Hou et al. 2022) on the same networks.

AC-GAN, one step in the reference's order: z ~ N(0, 1) and random labels y; G step on
``0.5 * (BCE(D_adv(G(z, y)), 1) + CE(D_aux(G(z, y)), y))``; then the D step on
``((BCE(D_adv(x), 1) + CE(D_aux(x), labels)) / 2 + (BCE(D_adv(G(z, y)), 0) + CE(D_aux(G(z, y)), y)) / 2) / 2``.
As in the reference, D's auxiliary output is a softmax and the cross-entropy is applied to those
probabilities (``CrossEntropyLoss`` on softmax outputs: a softmax of a softmax), BCE to the
sigmoid validity (fp32); Adam(lr 2e-4, betas (0.5, 0.999)). D is frozen during G's backward (no
number changes). ``D_acc`` is the reference's printed accuracy of D's classifier on both batches.

ADC-GAN (``adcgan``): the classifier head has 2K outputs, the discriminative classifier over
(real, y) -> y and (fake, y) -> K + y, trained with D on ``lambda_adc`` times its cross-entropy
(a proper log-softmax of its logits); G is trained to make its samples look like real ones of
their class to it, ``lambda_adc * (CE(C(G(z, y)), y) - CE(C(G(z, y)), K + y))``, i.e. the paper's
``-lambda (log C(y+|x) - log C(y-|x))`` (Hou et al. 2022, eqs. 7-8). The adversarial terms and the
0.5 weights are AC-GAN's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ganengine.models._common import check_finite_nonnegative
from ganengine.models.base import DEFAULT_CONTEXT, StepContext, at_least_fp32
from ganengine.models.dcgan import bce
from ganengine.models.networks_pytorch_gan import ACGANDiscriminator, ACGANGenerator, init_in_reference_order
from ganengine.models.synthesis import EMA_OPTIONS, SynthesisGAN


def _ce(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(at_least_fp32(scores), labels)


class ACGAN(SynthesisGAN):
    """Options: the reference flags ``latent_dim, n_classes, img_size, channels, lr, b1, b2``."""

    MODEL_NAME = "acgan"
    CONDITIONAL = True
    DEFAULTS = dict(latent_dim=100, n_classes=10, img_size=32, channels=1, lr=0.0002, b1=0.5, b2=0.999,
                    fused=True, fused_optimizer=True, **EMA_OPTIONS)

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        self.G = ACGANGenerator(o["latent_dim"], o["n_classes"], o["img_size"], o["channels"], init_type=None,
                                fused=False)
        self.D = self._make_D()
        init_in_reference_order(o["fused"], self.G, self.D)
        self.setup_ema()

    def _make_D(self):
        o = self.options
        return ACGANDiscriminator(o["n_classes"], o["img_size"], o["channels"], init_type=None, fused=False)

    def make_optimizers(self):
        o = self.options
        return {"G": self._adam(self.G.parameters(), o["lr"], o["b1"], o["b2"]),
                "D": self._adam(self.D.parameters(), o["lr"], o["b1"], o["b2"])}

    def generator_inputs(self, z, labels):
        return z, labels

    # the class terms (AC-GAN's; ADC-GAN overrides)
    def _g_class_loss(self, scores, gen_labels):
        return _ce(scores, gen_labels)

    def _d_class_losses(self, real_scores, labels, fake_scores, gen_labels):
        return _ce(real_scores, labels), _ce(fake_scores, gen_labels)

    def _accuracy(self, real_scores, labels, fake_scores, gen_labels):
        pred = torch.cat([real_scores, fake_scores]).argmax(1)
        return (pred == torch.cat([labels, gen_labels])).float().mean()

    def train_step(self, batch: dict, optimizers: dict, ctx: StepContext = DEFAULT_CONTEXT) -> dict:
        def g_loss(out, gen_labels):
            validity, pred_label = out
            g_cls = self._g_class_loss(pred_label, gen_labels)
            return 0.5 * (bce(validity, 1.0) + g_cls), {"G_class": g_cls}

        def d_loss(out_real, labels, out_fake, gen_labels):
            (real_pred, real_aux), (fake_pred, fake_aux) = out_real, out_fake
            real_cls, fake_cls = self._d_class_losses(real_aux, labels, fake_aux, gen_labels)
            d_real_loss = (bce(real_pred, 1.0) + real_cls) / 2
            d_fake_loss = (bce(fake_pred, 0.0) + fake_cls) / 2
            acc = self._accuracy(real_aux.detach(), labels, fake_aux.detach(), gen_labels)
            return (d_real_loss + d_fake_loss) / 2, {"D_class_real": real_cls, "D_acc": acc}

        return self.conditional_step(batch, optimizers, ctx, False, g_loss, d_loss)


class ADCDiscriminator(ACGANDiscriminator):
    """The AC-GAN discriminator with a 2K-way classifier head returning logits: ``forward(img)``
    -> (validity (N, 1) in (0, 1), classifier logits (N, 2 * n_classes)). Keys are those of
    ``ACGANDiscriminator(n_classes=2 * n_classes)``; ``n_classes`` here is the data's K."""

    def __init__(self, n_classes: int = 10, img_size: int = 32, channels: int = 1, init_type="normal",
                 fused: bool = True):
        super().__init__(2 * n_classes, img_size, channels, init_type=init_type, fused=fused)
        self.n_data_classes = n_classes

    def forward(self, img: torch.Tensor):
        out = self.features(img)
        return self.adv_layer(out), self.aux_layer[0](out)  # logits: the softmax is in the loss


class ADCGAN(ACGAN):
    """ADC-GAN on the AC-GAN networks. Options: AC-GAN's plus ``lambda_adc`` (the classifier
    weight, the paper's lambda; 1.0)."""

    MODEL_NAME = "adcgan"
    DEFAULTS = dict(ACGAN.DEFAULTS, lambda_adc=1.0)

    def __init__(self, **options):
        super().__init__(**options)
        check_finite_nonnegative("ADCGAN", "lambda_adc", self.options["lambda_adc"])

    def _make_D(self):
        o = self.options
        return ADCDiscriminator(o["n_classes"], o["img_size"], o["channels"], init_type=None, fused=False)

    def _g_class_loss(self, logits, gen_labels):
        k, lam = self.n_classes, float(self.options["lambda_adc"])
        return lam * (_ce(logits, gen_labels) - _ce(logits, gen_labels + k))

    def _d_class_losses(self, real_logits, labels, fake_logits, gen_labels):
        lam = float(self.options["lambda_adc"])
        return lam * _ce(real_logits, labels), lam * _ce(fake_logits, gen_labels + self.n_classes)

    def _accuracy(self, real_logits, labels, fake_logits, gen_labels):
        k = self.n_classes
        pred = torch.cat([real_logits, fake_logits]).argmax(1)
        return (pred == torch.cat([labels, gen_labels + k])).float().mean()
