"""Dimension-agnostic building blocks shared by every network in the package.

Every block takes ``dim`` (2 or 3) and picks ``Conv2d``/``Conv3d`` etc. from it, so the 2D and 3D
models are the *same* code: a bug fixed once is fixed for both, and the experiment planner can
switch dimensionality by changing one number in the plans.

Strides are always per-axis tuples because medical volumes are often anisotropic (e.g. 5 mm
slices with 0.8 mm in-plane spacing); such data is downsampled in-plane only until the spacing is
roughly isotropic, exactly as nnU-Net does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "conv_nd",
    "conv_transpose_nd",
    "group_norm",
    "num_groups_for",
    "as_stride",
    "ResBlock",
    "Downsample",
    "Upsample",
    "SpatialSelfAttention",
    "timestep_embedding",
]


def _check_dim(dim: int) -> None:
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim!r}")


def conv_nd(dim: int) -> type[nn.Module]:
    """Return ``nn.Conv2d`` or ``nn.Conv3d`` for ``dim``."""
    _check_dim(dim)
    return nn.Conv2d if dim == 2 else nn.Conv3d


def conv_transpose_nd(dim: int) -> type[nn.Module]:
    """Return ``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d`` for ``dim``."""
    _check_dim(dim)
    return nn.ConvTranspose2d if dim == 2 else nn.ConvTranspose3d


def num_groups_for(channels: int, max_groups: int = 8) -> int:
    """Largest group count ``<= max_groups`` that divides ``channels``.

    GroupNorm (not BatchNorm) because patch-based medical training runs with batch sizes of 2-4,
    where batch statistics are too noisy; groups must divide the channel count, so tiny test
    networks (e.g. 4 or 6 channels) still get a valid norm.
    """
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with ``num_groups_for(channels)`` groups."""
    return nn.GroupNorm(num_groups_for(channels), channels, eps=1e-5)


def as_stride(stride: int | Sequence[int], dim: int) -> tuple[int, ...]:
    """Normalise an int or per-axis sequence to a ``dim``-tuple, validating its length."""
    if isinstance(stride, int):
        return (stride,) * dim
    out = tuple(int(s) for s in stride)
    if len(out) != dim:
        raise ValueError(f"stride {list(out)} has {len(out)} entries but dim={dim}")
    if any(s < 1 for s in out):
        raise ValueError(f"stride entries must be >= 1, got {list(out)}")
    return out


class ResBlock(nn.Module):
    """Pre-activation residual block: (GN, SiLU, conv) x 2 with optional FiLM conditioning.

    When ``time_emb_dim`` is given the embedding is mapped to a per-channel (scale, shift) and
    applied after the second norm (FiLM). Scale-shift conditions more strongly than a plain
    additive bias because it can also gate channels, which matters for diffusion denoisers whose
    behaviour must change a lot between high and low noise levels. The residual path keeps
    gradients healthy in deep encoders; a 1x1 conv matches channels when ``in_ch != out_ch``.
    """

    def __init__(
        self,
        dim: int,
        in_ch: int,
        out_ch: int,
        time_emb_dim: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        conv = conv_nd(dim)
        self.norm1 = group_norm(in_ch)
        self.conv1 = conv(in_ch, out_ch, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv(out_ch, out_ch, kernel_size=3, padding=1)
        self.act = nn.SiLU()
        self.emb_proj = (
            nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, 2 * out_ch))
            if time_emb_dim is not None
            else None
        )
        self.skip = conv(in_ch, out_ch, kernel_size=1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.norm2(h)
        if self.emb_proj is not None:
            if emb is None:
                raise ValueError("this ResBlock was built with time_emb_dim; pass an embedding")
            scale, shift = self.emb_proj(emb).chunk(2, dim=1)
            view = (*scale.shape, *([1] * (h.dim() - 2)))
            h = h * (1 + scale.view(view)) + shift.view(view)
        h = self.conv2(self.dropout(self.act(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Strided 3x3(x3) convolution; stride is per axis (1 on axes that must not shrink).

    A learned strided conv rather than pooling so the network decides what to keep; with
    kernel 3 / padding 1 an axis of size ``S`` becomes ``ceil(S / s)``, i.e. exactly ``S / s``
    for the divisible patch sizes the planner produces.
    """

    def __init__(self, dim: int, ch: int, stride: int | Sequence[int], out_ch: int | None = None):
        super().__init__()
        self.stride = as_stride(stride, dim)
        self.conv = conv_nd(dim)(ch, out_ch or ch, kernel_size=3, stride=self.stride, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling by a per-axis stride followed by a 3x3(x3) conv.

    Nearest + conv instead of a transposed conv avoids checkerboard artefacts, which would
    otherwise show up as grid patterns in decoded masks.
    """

    def __init__(self, dim: int, ch: int, stride: int | Sequence[int], out_ch: int | None = None):
        super().__init__()
        self.stride = as_stride(stride, dim)
        self.conv = conv_nd(dim)(ch, out_ch or ch, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s > 1 for s in self.stride):
            x = nn.functional.interpolate(x, scale_factor=self.stride, mode="nearest")
        return self.conv(x)


class SpatialSelfAttention(nn.Module):
    """Multi-head self-attention over all spatial positions, with a residual connection.

    Cost is quadratic in the number of positions, so it is only used at the lowest latent
    resolution, where it gives every position a global receptive field (useful for
    consistent labelling of organs that span the whole patch).
    """

    def __init__(self, dim: int, ch: int, heads: int = 4):
        super().__init__()
        _check_dim(dim)
        heads = max(1, min(heads, ch))
        while ch % heads:  # MultiheadAttention needs heads | ch
            heads -= 1
        self.heads = heads
        self.norm = group_norm(ch)
        self.attn = nn.MultiheadAttention(ch, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        h = self.norm(x).reshape(b, c, -1).transpose(1, 2)  # [B, N, C]
        h, _ = self.attn(h, h, h, need_weights=False)
        return x + h.transpose(1, 2).reshape(b, c, *spatial)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[B] -> [B, dim]`` of (integer or continuous) timesteps.

    Same construction as transformer position encodings: geometrically spaced frequencies let
    the MLP that follows resolve both coarse and fine differences in noise level.
    """
    t = t.reshape(-1).float()
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb
