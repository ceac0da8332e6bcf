"""Shape and channel bookkeeping shared by the networks, the model builder and the planner.

Kept separate from the modules so the experiment planner can reason about latent sizes and
channel counts without instantiating any network.
"""

from __future__ import annotations

from collections.abc import Sequence

from .blocks import as_stride

__all__ = ["normalise_strides", "total_stride", "latent_spatial_shape", "stage_channels"]


def normalise_strides(strides: Sequence[Sequence[int]], dim: int) -> list[tuple[int, ...]]:
    """Validate a list of per-axis strides (one per stage) and return it as tuples."""
    return [as_stride(s, dim) for s in strides]


def total_stride(strides: Sequence[Sequence[int]], dim: int) -> tuple[int, ...]:
    """Per-axis product of all stage strides, i.e. the overall downsampling factor."""
    out = [1] * dim
    for s in normalise_strides(strides, dim):
        out = [a * b for a, b in zip(out, s)]
    return tuple(out)


def latent_spatial_shape(
    spatial: Sequence[int], strides: Sequence[Sequence[int]], dim: int
) -> tuple[int, ...]:
    """Spatial shape after all strides; raises if ``spatial`` is not divisible.

    Divisibility is required (not just convenient): otherwise the decoder cannot restore the
    input size and logits would not align with the mask voxel-for-voxel.
    """
    spatial = tuple(int(s) for s in spatial)
    if len(spatial) != dim:
        raise ValueError(f"spatial shape {list(spatial)} has {len(spatial)} axes but dim={dim}")
    factor = total_stride(strides, dim)
    if any(s % f for s, f in zip(spatial, factor)):
        raise ValueError(
            f"spatial shape {list(spatial)} is not divisible by the total stride {list(factor)} "
            f"(strides {[list(s) for s in strides]}); choose a patch size that is a multiple of it"
        )
    return tuple(s // f for s, f in zip(spatial, factor))


def stage_channels(
    base_channels: int,
    num_levels: int,
    channel_multipliers: Sequence[int] | None = None,
    max_channels: int | None = None,
) -> list[int]:
    """Channel count of each resolution level (level 0 = full resolution).

    ``channel_multipliers`` defaults to doubling per level (1, 2, 4, ...), the usual trade-off
    of keeping compute roughly constant as resolution drops; a shorter tuple is padded with its
    last value. ``max_channels`` caps the growth, as nnU-Net does, to bound 3D memory.
    """
    if num_levels < 1:
        raise ValueError("num_levels must be >= 1")
    if channel_multipliers is None or len(channel_multipliers) == 0:
        mults = [2**i for i in range(num_levels)]
    else:
        mults = [int(m) for m in channel_multipliers][:num_levels]
        mults += [mults[-1]] * (num_levels - len(mults))
    chans = [base_channels * m for m in mults]
    if max_channels is not None:
        chans = [min(c, max_channels) for c in chans]
    if any(c < 1 for c in chans):
        raise ValueError(f"channel counts must be positive, got {chans}")
    return chans
