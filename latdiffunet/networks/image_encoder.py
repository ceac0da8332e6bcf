"""Convolutional pyramid that turns the image into conditioning features for the denoiser.

It uses the *same* stride list as the mask autoencoder, so its deepest feature map lands exactly
on the latent grid and can simply be concatenated with the noisy latent. The coarser-to-finer
intermediate maps are returned too, for denoisers or auxiliary heads that want multi-scale cues.

It is a plain deterministic CNN (no time input): the image is the same at every diffusion step,
so its features are computed once per image and reused across all sampling steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .blocks import Downsample, ResBlock, conv_nd
from .shapes import latent_spatial_shape, normalise_strides, stage_channels

__all__ = ["ImageEncoderConfig", "ImageEncoder"]


@dataclass
class ImageEncoderConfig:
    """Architecture of :class:`ImageEncoder`.

    ``strides`` must equal the mask autoencoder's strides so the last feature map is at latent
    resolution. ``out_channels`` optionally projects the last map to a fixed width (None keeps
    the last level's channel count).
    """

    dim: int
    in_channels: int
    strides: list[list[int]] = field(default_factory=list)
    base_channels: int = 32
    channel_multipliers: tuple[int, ...] | None = None
    max_channels: int = 256
    blocks_per_stage: int = 1
    out_channels: int | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.strides = [list(s) for s in normalise_strides(self.strides, self.dim)]
        if self.in_channels < 1 or self.blocks_per_stage < 1:
            raise ValueError("in_channels and blocks_per_stage must be >= 1")

    @property
    def channels(self) -> list[int]:
        """Channels per level before the optional output projection, full resolution first."""
        return stage_channels(
            self.base_channels, len(self.strides) + 1, self.channel_multipliers, self.max_channels
        )

    @property
    def out_channels_per_scale(self) -> list[int]:
        """Channels of each returned feature map, full resolution first."""
        ch = self.channels
        return ch[:-1] + [self.out_channels or ch[-1]]


class ImageEncoder(nn.Module):
    """Image ``[B, Cin, *S]`` -> list of feature maps, full resolution first, latent last."""

    def __init__(self, config: ImageEncoderConfig):
        super().__init__()
        self.config = config
        ch = config.channels
        conv = conv_nd(config.dim)
        self.conv_in = conv(config.in_channels, ch[0], kernel_size=3, padding=1)

        def blocks(c: int) -> nn.Sequential:
            return nn.Sequential(
                *[
                    ResBlock(config.dim, c, c, dropout=config.dropout)
                    for _ in range(config.blocks_per_stage)
                ]
            )

        self.stem_blocks = blocks(ch[0])
        self.downs = nn.ModuleList(
            Downsample(config.dim, ch[i], s, out_ch=ch[i + 1])
            for i, s in enumerate(config.strides)
        )
        self.stages = nn.ModuleList(blocks(ch[i + 1]) for i in range(len(config.strides)))
        self.out_proj = (
            conv(ch[-1], config.out_channels, kernel_size=1)
            if config.out_channels is not None
            else nn.Identity()
        )

    @property
    def out_channels_per_scale(self) -> list[int]:
        """Channels of each feature map returned by :meth:`forward`."""
        return self.config.out_channels_per_scale

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        cfg = self.config
        if image.dim() != cfg.dim + 2 or image.shape[1] != cfg.in_channels:
            raise ValueError(
                f"expected an image [B, {cfg.in_channels}, *spatial] with {cfg.dim} spatial "
                f"axes, got shape {list(image.shape)}"
            )
        latent_spatial_shape(image.shape[2:], cfg.strides, cfg.dim)  # clear error if indivisible
        h = self.stem_blocks(self.conv_in(image))
        features = [h]
        for down, stage in zip(self.downs, self.stages):
            h = stage(down(h))
            features.append(h)
        features[-1] = self.out_proj(features[-1])
        return features
