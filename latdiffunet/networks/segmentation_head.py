"""A direct segmentation head on the image encoder: deep supervision, and the denoiser's prior.

The image encoder learns, without this head, only through the denoiser: its features reach a
loss after the denoiser has mixed them with a noisy latent, and at low noise levels the denoiser
hardly needs them (the latent already says where the mask is). nnU-Net's encoder, in contrast,
gets a dense segmentation gradient at every step. This head gives ours the same: a light U-Net
decoder over the encoder's pyramid (upsample, add the skip feature of that scale, one residual
block), ending in class logits at the image's resolution, trained with the same CE + Dice as
every decoded mask. It also lets the image encoder learn during the autoencoder stage, when it
otherwise sits idle.

With ``segmentation_head.condition_denoiser`` (on in the presets) its mask, encoded by the mask
autoencoder, is also part of the denoiser's conditioning
(:meth:`~latdiffunet.networks.model.LatentDiffusionSegmenter.head_prior`): the one place where
the image is read at full resolution now informs every sample. Either way the head's own mask is
never shown to a user: every mask they see comes from a diffusion sample. A model whose plans have
no head builds exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .blocks import ResBlock, Upsample, conv_nd
from .shapes import normalise_strides

__all__ = ["ImageSegmentationHeadConfig", "ImageSegmentationHead"]


@dataclass
class ImageSegmentationHeadConfig:
    """``channels_per_scale``: the image encoder's feature channels, full resolution first;
    ``strides``: the encoder's strides between those scales."""

    dim: int
    num_classes: int
    channels_per_scale: list[int]
    strides: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.strides = [list(s) for s in normalise_strides(self.strides, self.dim)]
        if len(self.channels_per_scale) != len(self.strides) + 1:
            raise ValueError(
                f"{len(self.channels_per_scale)} feature scales need {len(self.channels_per_scale) - 1} strides, "
                f"got {len(self.strides)}"
            )


class ImageSegmentationHead(nn.Module):
    """Encoder features (full resolution first) -> class logits ``[B, K, *S]`` at full resolution."""

    def __init__(self, config: ImageSegmentationHeadConfig):
        super().__init__()
        self.config = config
        ch = config.channels_per_scale
        self.ups = nn.ModuleList(
            Upsample(config.dim, ch[i + 1], s, out_ch=ch[i]) for i, s in enumerate(config.strides)
        )
        self.blocks = nn.ModuleList(ResBlock(config.dim, ch[i], ch[i]) for i in range(len(config.strides)))
        self.conv_out = conv_nd(config.dim)(ch[0], config.num_classes, kernel_size=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.config.channels_per_scale):
            raise ValueError(f"expected {len(self.config.channels_per_scale)} feature maps, got {len(features)}")
        h = features[-1]
        for i in reversed(range(len(self.ups))):
            h = self.blocks[i](self.ups[i](h) + features[i])
        return self.conv_out(h)
