"""Full-resolution refinement of decoded masks with image detail.

The mask decoder turns a latent that is 4x (or more) coarser than the image into a mask; it never
sees the image, so where a boundary falls between two latent voxels it can only guess from the
shape prior. nnU-Net decides boundaries from full-resolution image features (its highest skip
connection). This head gives every decoded mask, sample by sample, the same chance: it reads the
image encoder's full-resolution feature map (computed anyway for the conditioning pyramid and
otherwise thrown away) next to the decoded class probabilities and adds a residual to the
decoded logits.

It is a residual with a zero-initialised output layer, so an untrained head is the identity and a
model whose plans have no head decodes exactly as before. It works per sample: the refined
sample is still that sample's hypothesis (the head sees the sample's own probabilities), only
its boundary is moved towards what the image shows. It is trained in the diffusion stage, by the
losses on the decoded x0-estimate and on sampled masks, never in the autoencoder stage, so the
autoencoder stays a pure shape model and the latent keeps meaning "this mask".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import ResBlock, conv_nd

__all__ = ["RefinementHeadConfig", "RefinementHead"]


@dataclass
class RefinementHeadConfig:
    """``detail_channels``: channels of the image encoder's full-resolution map."""

    dim: int
    num_classes: int
    detail_channels: int
    channels: int = 16
    blocks: int = 2

    def __post_init__(self) -> None:
        if self.channels < 1 or self.blocks < 1 or self.detail_channels < 1:
            raise ValueError("refinement channels, blocks and detail_channels must be >= 1")


class RefinementHead(nn.Module):
    """(decoded logits ``[B, K, *S]``, image detail ``[B, C, *S]``) -> refined logits ``[B, K, *S]``."""

    def __init__(self, config: RefinementHeadConfig):
        super().__init__()
        self.config = config
        conv = conv_nd(config.dim)
        self.conv_in = conv(config.detail_channels + config.num_classes, config.channels, kernel_size=3, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(config.dim, config.channels, config.channels) for _ in range(config.blocks)])
        self.conv_out = conv(config.channels, config.num_classes, kernel_size=1)
        nn.init.zeros_(self.conv_out.weight)  # starts as the identity: decoded logits unchanged
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, logits: torch.Tensor, detail: torch.Tensor) -> torch.Tensor:
        if detail.shape[0] != logits.shape[0] or detail.shape[2:] != logits.shape[2:]:
            raise ValueError(f"image detail {list(detail.shape)} does not match decoded logits {list(logits.shape)}")
        probs = logits.float().softmax(1).to(detail.dtype)
        h = self.blocks(self.conv_in(torch.cat([detail, probs], dim=1)))
        return logits + self.conv_out(h).to(logits.dtype)
