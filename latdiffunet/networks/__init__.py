"""Networks of the latent-diffusion segmenter; 2D and 3D share all code (``dim`` selects).

* :class:`MaskAutoencoder` compresses one-hot masks to a latent grid and decodes it back.
* :class:`ImageEncoder` turns the image into features on the same latent grid.
* :class:`LatentDenoiser` is the conditional UNet the diffusion process trains.
* :class:`LatentDiffusionSegmenter` bundles them; :func:`build_model` builds it from plans.
* :class:`LatentPairDiscriminator` judges reverse steps for the adversarial trainer variant (cDAL).
* :func:`estimate_training_memory_bytes` sizes a configuration without a GPU.

Nothing here imports ``latdiffunet.diffusion``: the networks do not know what their output means.
"""

from .blocks import (
    Downsample,
    ResBlock,
    SpatialSelfAttention,
    Upsample,
    conv_nd,
    conv_transpose_nd,
    timestep_embedding,
)
from .denoiser import LatentDenoiser, LatentDenoiserConfig
from .discriminator import DiscriminatorConfig, LatentPairDiscriminator, attention_weights
from .image_encoder import ImageEncoder, ImageEncoderConfig
from .mask_autoencoder import MaskAutoencoder, MaskAutoencoderConfig, kl_divergence
from .memory import estimate_training_memory_bytes, memory_breakdown
from .model import MODEL_DEFAULTS, LatentDiffusionSegmenter, build_model, resolve_model_config
from .shapes import latent_spatial_shape, stage_channels, total_stride

__all__ = [
    "conv_nd",
    "conv_transpose_nd",
    "ResBlock",
    "Downsample",
    "Upsample",
    "SpatialSelfAttention",
    "timestep_embedding",
    "MaskAutoencoderConfig",
    "MaskAutoencoder",
    "kl_divergence",
    "ImageEncoderConfig",
    "ImageEncoder",
    "LatentDenoiserConfig",
    "LatentDenoiser",
    "LatentDiffusionSegmenter",
    "DiscriminatorConfig",
    "LatentPairDiscriminator",
    "attention_weights",
    "build_model",
    "resolve_model_config",
    "MODEL_DEFAULTS",
    "estimate_training_memory_bytes",
    "memory_breakdown",
    "latent_spatial_shape",
    "stage_channels",
    "total_stride",
]
