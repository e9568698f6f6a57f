"""The fused ops as functions (``import ganengine.functional as GF``)."""
from ganengine.ops.norm_act import instance_norm_act
from ganengine.ops.losses import cycle_loss, cycle_synthesized_loss, discriminator_loss, gan_loss, gradient_penalty
from ganengine.ops.conv_act import conv2d_act, conv2d_instance_norm_act
from ganengine.ops.conv import conv2d, conv_transpose2d
from ganengine.ops.conv3x3 import conv3x3
from ganengine.ops.attention import self_attention2d
from ganengine.ops.spectral_norm import spectral_norm_weight
from ganengine.ops.batch_norm_act import batch_norm_act, conditional_batch_norm_act

__all__ = ["instance_norm_act", "gan_loss", "discriminator_loss", "cycle_loss", "cycle_synthesized_loss", "gradient_penalty",
           "conv2d_act", "conv2d_instance_norm_act", "conv3x3", "conv2d", "conv_transpose2d", "self_attention2d",
           "batch_norm_act", "conditional_batch_norm_act", "spectral_norm_weight"]
