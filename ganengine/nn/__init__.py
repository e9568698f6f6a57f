"""Drop-in nn.Modules on the fused ops (``import ganengine.nn as gnn``).

Importing a family's module also registers its ``ganengine.fuse`` rules.
"""
from ganengine.nn.norm_act import InstanceNormAct2d
from ganengine.nn.losses import CycleLoss, GANLoss
from ganengine.nn.conv_act import Conv2dAct, Conv2dInstanceNormAct
from ganengine.nn.conv3x3 import Conv3x3
from ganengine.nn.conv import Conv2d, ConvTranspose2d
from ganengine.nn.patch_discriminator import PatchDiscriminator
from ganengine.nn.attention import BigGANSelfAttention2d, SelfAttention2d
from ganengine.nn.spectral_norm import SpectralNorm, SpectralNormGroup, spectral_norm, spectral_norm_group
from ganengine.nn.batch_norm_act import (BatchNormAct1d, BatchNormAct2d, ConditionalBatchNormAct2d, SyncBatchNormAct,
                                        convert_sync_batchnorm)

__all__ = ["InstanceNormAct2d", "GANLoss", "CycleLoss", "Conv2dAct", "Conv2dInstanceNormAct", "Conv3x3",
           "Conv2d", "ConvTranspose2d",
           "PatchDiscriminator", "SelfAttention2d", "BigGANSelfAttention2d",
           "BatchNormAct2d", "BatchNormAct1d", "ConditionalBatchNormAct2d", "SyncBatchNormAct",
           "convert_sync_batchnorm", "SpectralNorm", "SpectralNormGroup", "spectral_norm", "spectral_norm_group"]
