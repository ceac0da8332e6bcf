"""Autoencoder that compresses one-hot segmentation masks into a small continuous latent.

Diffusion runs in this latent space instead of on voxels: a latent that is 4-8x smaller per axis
makes 3D diffusion affordable (64-512x fewer positions) and gives the denoiser a smooth,
continuous target instead of a discrete label map. The decoder turns denoised latents back into
per-class logits; sampling several latents and decoding them yields the per-voxel uncertainty.

The optional variational bottleneck (small KL weight, as in Stable Diffusion's KL-f autoencoder)
keeps the latent space smooth so that slightly-off denoised latents still decode to plausible masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .blocks import Downsample, ResBlock, Upsample, conv_nd, group_norm
from .shapes import latent_spatial_shape, normalise_strides, stage_channels

__all__ = ["MaskAutoencoderConfig", "MaskAutoencoder", "kl_divergence"]

_LOGVAR_RANGE = (-30.0, 20.0)


@dataclass
class MaskAutoencoderConfig:
    """Architecture of :class:`MaskAutoencoder`.

    ``strides`` holds one per-axis stride per downsampling stage, e.g. ``[[2, 2], [2, 2]]``
    (factor 4 in 2D) or ``[[1, 2, 2], [2, 2, 2]]`` (anisotropic 3D: factor (2, 4, 4)). An empty
    list means no downsampling. Level ``i`` has ``stage_channels(...)[i]`` channels.
    """

    dim: int
    num_classes: int
    latent_channels: int
    strides: list[list[int]] = field(default_factory=list)
    base_channels: int = 32
    channel_multipliers: tuple[int, ...] | None = None
    max_channels: int = 256
    blocks_per_stage: int = 1
    variational: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.strides = [list(s) for s in normalise_strides(self.strides, self.dim)]
        if self.num_classes < 2:
            raise ValueError("num_classes must be >= 2 (background + at least one label)")
        if self.latent_channels < 1 or self.blocks_per_stage < 1:
            raise ValueError("latent_channels and blocks_per_stage must be >= 1")

    @property
    def channels(self) -> list[int]:
        """Channels per resolution level, full resolution first."""
        return stage_channels(
            self.base_channels, len(self.strides) + 1, self.channel_multipliers, self.max_channels
        )

    def latent_shape(self, spatial: list[int] | tuple[int, ...]) -> tuple[int, ...]:
        """Latent spatial shape for an input of spatial shape ``spatial``."""
        return latent_spatial_shape(spatial, self.strides, self.dim)


class MaskEncoder(nn.Module):
    """One-hot mask ``[B, K, *S]`` -> latent statistics ``[B, 2*Cz or Cz, *S/stride]``."""

    def __init__(self, cfg: MaskAutoencoderConfig):
        super().__init__()
        ch = cfg.channels
        conv = conv_nd(cfg.dim)
        self.conv_in = conv(cfg.num_classes, ch[0], kernel_size=3, padding=1)
        layers: list[nn.Module] = []
        for i, stride in enumerate(cfg.strides):
            layers += [
                ResBlock(cfg.dim, ch[i], ch[i], dropout=cfg.dropout)
                for _ in range(cfg.blocks_per_stage)
            ]
            layers.append(Downsample(cfg.dim, ch[i], stride, out_ch=ch[i + 1]))
        layers += [
            ResBlock(cfg.dim, ch[-1], ch[-1], dropout=cfg.dropout)
            for _ in range(cfg.blocks_per_stage)
        ]
        self.body = nn.Sequential(*layers)
        out_ch = cfg.latent_channels * (2 if cfg.variational else 1)
        self.out = nn.Sequential(
            group_norm(ch[-1]), nn.SiLU(), conv(ch[-1], out_ch, kernel_size=3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(self.conv_in(x)))


class MaskDecoder(nn.Module):
    """Latent ``[B, Cz, *L]`` -> class logits ``[B, K, *L*stride]`` (mirror of the encoder)."""

    def __init__(self, cfg: MaskAutoencoderConfig):
        super().__init__()
        ch = cfg.channels
        conv = conv_nd(cfg.dim)
        self.conv_in = conv(cfg.latent_channels, ch[-1], kernel_size=3, padding=1)
        layers: list[nn.Module] = [
            ResBlock(cfg.dim, ch[-1], ch[-1], dropout=cfg.dropout)
            for _ in range(cfg.blocks_per_stage)
        ]
        for i in reversed(range(len(cfg.strides))):
            layers.append(Upsample(cfg.dim, ch[i + 1], cfg.strides[i], out_ch=ch[i]))
            layers += [
                ResBlock(cfg.dim, ch[i], ch[i], dropout=cfg.dropout)
                for _ in range(cfg.blocks_per_stage)
            ]
        self.body = nn.Sequential(*layers)
        self.out = nn.Sequential(
            group_norm(ch[0]), nn.SiLU(), conv(ch[0], cfg.num_classes, kernel_size=3, padding=1)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(self.conv_in(z)))


class MaskAutoencoder(nn.Module):
    """(Variational) autoencoder for one-hot masks; see the module docstring for the why."""

    def __init__(self, config: MaskAutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = MaskEncoder(config)
        self.decoder = MaskDecoder(config)

    def _check_input(self, onehot: torch.Tensor) -> None:
        cfg = self.config
        if onehot.dim() != cfg.dim + 2 or onehot.shape[1] != cfg.num_classes:
            raise ValueError(
                f"expected a one-hot mask [B, {cfg.num_classes}, *spatial] with {cfg.dim} "
                f"spatial axes, got shape {list(onehot.shape)}"
            )
        cfg.latent_shape(onehot.shape[2:])  # raises with a clear message if not divisible

    def encode(self, onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(mu, logvar)`` at latent resolution; ``logvar`` is None if not variational.

        ``logvar`` is clamped so ``exp`` can neither overflow under AMP nor collapse to 0.
        """
        self._check_input(onehot)
        h = self.encoder(onehot)
        if not self.config.variational:
            return h, None
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar.clamp(*_LOGVAR_RANGE)

    @staticmethod
    def sample_latent(
        mu: torch.Tensor,
        logvar: torch.Tensor | None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Reparameterised sample ``mu + sigma * eps``; returns ``mu`` when ``logvar`` is None."""
        if logvar is None:
            return mu
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``[B, Cz, *L]`` -> logits ``[B, K, *S]``."""
        if z.dim() != self.config.dim + 2 or z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"expected a latent [B, {self.config.latent_channels}, *L], got {list(z.shape)}"
            )
        return self.decoder(z)

    def forward(
        self,
        onehot: torch.Tensor,
        sample: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Encode, (sample,) decode. Returns ``dict(logits, mu, logvar, z)``.

        ``sample`` defaults to ``self.training``: the noisy latent regularises training, while
        evaluation should be deterministic.
        """
        mu, logvar = self.encode(onehot)
        sample = self.training if sample is None else sample
        z = self.sample_latent(mu, logvar, generator) if sample else mu
        return {"logits": self.decode(z), "mu": mu, "logvar": logvar, "z": z}


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor | None) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)), averaged over all elements (0 if not variational).

    A per-element mean (rather than a sum) keeps the KL weight independent of patch size and
    latent channel count, so one weight works for every plan.
    """
    if logvar is None:
        return mu.new_zeros(())
    return 0.5 * torch.mean(mu.pow(2) + logvar.exp() - 1.0 - logvar)
