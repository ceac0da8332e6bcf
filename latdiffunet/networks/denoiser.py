"""Conditional UNet that denoises mask latents, conditioned on image features and timestep.

The input is ``concat(x_t, cond)``: the image features live on the latent grid, so channel
concatenation is the cheapest way to give every latent position its local image evidence. The
timestep (and optionally a per-sample random latent, cDAL-style) enters every ResBlock through
FiLM. What the output *means* (noise, x0 or v) is decided by ``latdiffunet.diffusion``; this
module is deliberately agnostic of it and never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .blocks import (
    Downsample,
    ResBlock,
    SpatialSelfAttention,
    Upsample,
    conv_nd,
    group_norm,
    timestep_embedding,
)
from .shapes import latent_spatial_shape, normalise_strides, stage_channels

__all__ = ["LatentDenoiserConfig", "LatentDenoiser"]


@dataclass
class LatentDenoiserConfig:
    """Architecture of :class:`LatentDenoiser`.

    ``strides`` are the per-axis strides *inside* the latent UNet (empty when the latent is
    already tiny); it has ``len(strides) + 1`` levels, and ``channel_multipliers`` (default
    1, 2, 2, ...) must not be longer than that. ``time_embedding_dim`` defaults to
    ``4 * base_channels``. ``random_latent_dim > 0`` adds an embedded random vector per sample
    to the time embedding (cDAL-style), which lets the model represent several plausible
    segmentations for the same image and noise level.
    """

    dim: int
    latent_channels: int
    cond_channels: int
    base_channels: int = 64
    channel_multipliers: tuple[int, ...] | None = None
    strides: list[list[int]] = field(default_factory=list)
    attention_at_bottleneck: bool = True
    attention_heads: int = 4
    time_embedding_dim: int | None = None
    random_latent_dim: int = 0
    blocks_per_level: int = 1
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.strides = [list(s) for s in normalise_strides(self.strides, self.dim)]
        n_levels = len(self.strides) + 1
        if self.channel_multipliers is not None and len(self.channel_multipliers) > n_levels:
            raise ValueError(
                f"channel_multipliers {tuple(self.channel_multipliers)} has more entries than "
                f"the {n_levels} levels implied by strides {self.strides}"
            )
        if self.time_embedding_dim is None:
            self.time_embedding_dim = 4 * self.base_channels
        if self.random_latent_dim < 0 or self.blocks_per_level < 1:
            raise ValueError("random_latent_dim must be >= 0 and blocks_per_level >= 1")

    @property
    def channels(self) -> list[int]:
        """Channels per level of the latent UNet, latent resolution first."""
        mults = self.channel_multipliers
        if mults is None:
            mults = tuple([1] + [2] * len(self.strides))
        return stage_channels(self.base_channels, len(self.strides) + 1, mults)


class LatentDenoiser(nn.Module):
    """Small conditional UNet: ``(x_t [B,Cz,*L], t [B], cond [B,Cc,*L]) -> [B,Cz,*L]``."""

    def __init__(self, config: LatentDenoiserConfig):
        super().__init__()
        self.config = config
        cfg, ch, temb = config, config.channels, int(config.time_embedding_dim)
        conv = conv_nd(cfg.dim)

        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.base_channels, temb), nn.SiLU(), nn.Linear(temb, temb)
        )
        self.random_mlp = (
            nn.Sequential(nn.Linear(cfg.random_latent_dim, temb), nn.SiLU(), nn.Linear(temb, temb))
            if cfg.random_latent_dim > 0
            else None
        )

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cfg.dim, cin, cout, time_emb_dim=temb, dropout=cfg.dropout)

        self.conv_in = conv(cfg.latent_channels + cfg.cond_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            nn.ModuleList(res(c, c) for _ in range(cfg.blocks_per_level)) for c in ch
        )
        self.downs = nn.ModuleList(
            Downsample(cfg.dim, ch[i], s, out_ch=ch[i + 1]) for i, s in enumerate(cfg.strides)
        )
        self.mid1 = res(ch[-1], ch[-1])
        self.mid_attn = (
            SpatialSelfAttention(cfg.dim, ch[-1], cfg.attention_heads)
            if cfg.attention_at_bottleneck
            else nn.Identity()
        )
        self.mid2 = res(ch[-1], ch[-1])
        # up_blocks[i] serves level i: first block fuses the skip (2*c -> c), then c -> c.
        self.up_blocks = nn.ModuleList(
            nn.ModuleList([res(2 * c, c)] + [res(c, c) for _ in range(cfg.blocks_per_level - 1)])
            for c in ch
        )
        self.ups = nn.ModuleList(
            Upsample(cfg.dim, ch[i + 1], s, out_ch=ch[i]) for i, s in enumerate(cfg.strides)
        )
        self.out = nn.Sequential(
            group_norm(ch[0]), nn.SiLU(), conv(ch[0], cfg.latent_channels, 3, padding=1)
        )
        self._zero_init_output()

    def _zero_init_output(self) -> None:
        """Zero the final conv so the untrained model outputs exactly 0.

        At initialisation the denoiser then predicts the mean of the target distribution
        (zero noise / zero velocity for unit-variance latents) instead of random garbage,
        so early training starts from a sensible, low-loss point and the residual network
        learns corrections on top of it (the same trick as zero-init of ResNet branches;
        used by DDPM/ADM/LDM). Gradients still reach all other weights once this conv moves
        away from zero after the first optimiser step.
        """
        last = self.out[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def embed(
        self,
        t: torch.Tensor,
        batch_size: int,
        random_latent: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Time embedding ``[B, time_embedding_dim]`` (+ embedded random latent if enabled)."""
        t = t.reshape(-1)
        if t.numel() == 1 and batch_size > 1:
            t = t.expand(batch_size)
        if t.numel() != batch_size:
            raise ValueError(f"t has {t.numel()} entries but the batch has {batch_size}")
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels))
        if self.random_mlp is not None:
            if random_latent is None:
                random_latent = torch.randn(
                    (batch_size, self.config.random_latent_dim),
                    generator=generator,
                    device=emb.device,
                    dtype=emb.dtype,
                )
            emb = emb + self.random_mlp(random_latent.to(emb.dtype))
        return emb

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        random_latent: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Predict the diffusion target for noisy latents ``x_t`` at timesteps ``t``.

        ``random_latent`` ``[B, random_latent_dim]`` is drawn from N(0, I) (with ``generator``)
        when not given and ``random_latent_dim > 0``; it is ignored otherwise.
        """
        cfg = self.config
        if x_t.dim() != cfg.dim + 2 or x_t.shape[1] != cfg.latent_channels:
            raise ValueError(f"expected x_t [B, {cfg.latent_channels}, *L], got {list(x_t.shape)}")
        if cond.shape[0] != x_t.shape[0] or cond.shape[2:] != x_t.shape[2:]:
            raise ValueError(
                f"cond {list(cond.shape)} must match x_t {list(x_t.shape)} in batch and "
                "spatial size (image encoder strides must equal the autoencoder's)"
            )
        latent_spatial_shape(x_t.shape[2:], cfg.strides, cfg.dim)  # clear error if indivisible
        emb = self.embed(t, x_t.shape[0], random_latent, generator)

        h = self.conv_in(torch.cat([x_t, cond.to(x_t.dtype)], dim=1))
        skips = []
        for level, blocks in enumerate(self.down_blocks):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            if level < len(self.downs):
                h = self.downs[level](h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for level in reversed(range(len(self.up_blocks))):
            if level < len(self.ups):
                h = self.ups[level](h)
            blocks = self.up_blocks[level]
            h = blocks[0](torch.cat([h, skips[level]], dim=1), emb)
            for block in blocks[1:]:
                h = block(h, emb)
        return self.out(h)
