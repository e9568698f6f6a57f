"""pix2pix, CycleGAN, StarGAN, StackGAN and the synthesis models (DCGAN ... BigGAN, U-Net GAN,
IC-GAN): the reference architectures on ganengine's fused ops.

Networks keep the reference implementations' module trees (identical state_dict keys, parameter
counts, initialisation), so reference checkpoints load with ``load_reference_checkpoint`` and
ganengine weights go back with ``save_reference_checkpoint``. See docs/models.md.
"""
from ganengine.models.base import GANModel, StepContext, set_requires_grad
from ganengine.models.checkpoints import (ARCHS, CheckpointMismatchError, build_network, load_reference_checkpoint,
                                          save_reference_checkpoint)
from ganengine.models.biggan import BigGAN, BigGANDeep
from ganengine.models.icgan import ICGAN
from ganengine.models.acgan import ACGAN, ADCGAN
from ganengine.models.cgan import CGAN
from ganengine.models.csgan import CSGAN
from ganengine.models.dcgan import DCGAN
from ganengine.models.infogan import InfoGAN
from ganengine.models.synthesis import SynthesisGAN
from ganengine.models.wgan import WGAN, WGANGP
from ganengine.models.cyclegan import CycleGAN
from ganengine.models.image_pool import ImagePool
from ganengine.models.networks_cyclegan import (PixelDiscriminator, ResnetBlock, ResnetGenerator, UnetGenerator,
                                                UnetSkipConnectionBlock, define_D, define_G, get_norm_layer,
                                                init_weights, patch_discriminator)
from ganengine.models.networks_stackgan import (CANet, Stage1Discriminator, Stage1Generator, Stage2Discriminator,
                                                Stage2Generator)
from ganengine.models.networks_stargan import StarGANDiscriminator, StarGANGenerator
from ganengine.models.pix2pix import Pix2Pix
from ganengine.models.sagan import SAGAN
from ganengine.models.stackgan import StackGAN
from ganengine.models.stargan import StarGAN
from ganengine.models.unetgan import UNetGAN
from ganengine.nn import PatchDiscriminator  # the reference NLayerDiscriminator, on fused conv ops
# the synthesis models' networks (docs/synthesis.md, docs/synthesis_attention.md name them)
from ganengine.models.acgan import ADCDiscriminator
from ganengine.models.icgan_networks import ICGANDiscriminator, ICGANGenerator
from ganengine.models.networks_biggan import BigGANDiscriminator, BigGANGenerator
from ganengine.models.networks_biggan_deep import BigGANDeepDiscriminator, BigGANDeepGenerator
from ganengine.models.networks_dcgan import DCGANDiscriminator, DCGANGenerator
from ganengine.models.networks_pytorch_gan import (ACGANDiscriminator, ACGANGenerator, CGANDiscriminator,
                                                   CGANGenerator, InfoGANDiscriminator, InfoGANGenerator,
                                                   WGANGPDiscriminator, WGANGPGenerator)
from ganengine.models.networks_sagan import SAGANDiscriminator, SAGANGenerator
from ganengine.models.networks_unetgan import UNetDiscriminator

MODELS = {"pix2pix": Pix2Pix, "cyclegan": CycleGAN, "stargan": StarGAN, "stackgan": StackGAN}
MODELS.update(dcgan=DCGAN, wgan=WGAN, wgan_gp=WGANGP, cgan=CGAN, acgan=ACGAN, adcgan=ADCGAN, infogan=InfoGAN)
MODELS.update(csgan=CSGAN, sagan=SAGAN, biggan=BigGAN, biggan_deep=BigGANDeep, unetgan=UNetGAN)
MODELS.update(icgan=ICGAN)


def build_model(name: str, **options) -> GANModel:
    """A model by name (see MODELS: the image-to-image and the synthesis models) with reference-named options."""
    if name not in MODELS:
        raise ValueError(f"model name must be one of {tuple(MODELS)}, got {name!r}")
    return MODELS[name](**options)


__all__ = ["SynthesisGAN", "DCGAN", "WGAN", "WGANGP", "CGAN", "ACGAN", "ADCGAN", "InfoGAN", "GANModel", "StepContext", "set_requires_grad", "ARCHS", "CheckpointMismatchError", "build_network",
           "load_reference_checkpoint", "save_reference_checkpoint", "CSGAN", "SAGAN", "BigGAN", "BigGANDeep", "UNetGAN", "CycleGAN", "Pix2Pix", "StarGAN", "StackGAN",
           "ImagePool", "ResnetGenerator", "ResnetBlock", "UnetGenerator", "UnetSkipConnectionBlock",
           "PatchDiscriminator", "PixelDiscriminator", "define_G", "define_D", "get_norm_layer", "init_weights",
           "patch_discriminator", "StarGANGenerator", "StarGANDiscriminator", "Stage1Generator",
           "Stage1Discriminator", "Stage2Generator", "Stage2Discriminator", "CANet", "MODELS", "build_model",
           "ICGAN", "DCGANGenerator", "DCGANDiscriminator", "WGANGPGenerator", "WGANGPDiscriminator", "CGANGenerator",
           "CGANDiscriminator", "ACGANGenerator", "ACGANDiscriminator", "ADCDiscriminator", "InfoGANGenerator",
           "InfoGANDiscriminator", "SAGANGenerator", "SAGANDiscriminator", "BigGANGenerator", "BigGANDiscriminator",
           "BigGANDeepGenerator", "BigGANDeepDiscriminator", "UNetDiscriminator", "ICGANGenerator",
           "ICGANDiscriminator"]
