"""Resampling to the planned spacing.

Images use third-order splines; labels are resampled as one-hot maps with linear interpolation
and re-labelled by argmax, which keeps thin structures better than nearest neighbour. For
anisotropic data (one axis much coarser) the coarse axis is resampled separately with
nearest-neighbour interpolation ("separate z"), because interpolating across thick slices
invents anatomy that was never imaged.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

ANISOTROPY_THRESHOLD = 3.0


def new_shape_for_spacing(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> tuple[int, ...]:
    return tuple(max(1, int(round(s * sp / t))) for s, sp, t in zip(shape, spacing, target))


def separate_z_axis(spacing: tuple[float, ...], target: tuple[float, ...]) -> int | None:
    """The axis to resample separately, or None for isotropic-enough data."""
    for sp in (spacing, target):
        if max(sp) / min(sp) > ANISOTROPY_THRESHOLD:
            axis = int(np.argmax(sp))
            return axis
    return None


def _zoom(volume: np.ndarray, new_shape: tuple[int, ...], order: int) -> np.ndarray:
    if tuple(volume.shape) == tuple(new_shape):
        return volume
    factors = [n / o for n, o in zip(new_shape, volume.shape)]
    out = ndimage.zoom(volume, factors, order=order, mode="nearest", grid_mode=True)
    if out.shape != tuple(new_shape):  # zoom can be off by one through rounding
        pad = [(0, max(0, n - o)) for n, o in zip(new_shape, out.shape)]
        out = np.pad(out, pad, mode="edge")[tuple(slice(0, n) for n in new_shape)]
    return out


def resample_volume(volume: np.ndarray, new_shape: tuple[int, ...], order: int, separate_axis: int | None) -> np.ndarray:
    """Resample one 3D array, optionally with the coarse axis done by nearest neighbour."""
    if tuple(volume.shape) == tuple(new_shape):
        return volume
    if separate_axis is None:
        return _zoom(volume, new_shape, order)
    in_plane_shape = tuple(n if a != separate_axis else volume.shape[a] for a, n in enumerate(new_shape))
    moved = np.moveaxis(volume, separate_axis, 0)
    plane_target = tuple(s for a, s in enumerate(in_plane_shape) if a != separate_axis)
    slices = np.stack([_zoom(s, plane_target, order) for s in moved])
    stage = np.moveaxis(slices, 0, separate_axis)
    return _zoom(stage, tuple(new_shape), 0)


def resample_image(data: np.ndarray, new_shape: tuple[int, ...], separate_axis: int | None, order: int = 3) -> np.ndarray:
    """``(C, Z, Y, X)`` float image to ``new_shape`` (Z, Y, X)."""
    return np.stack([resample_volume(c.astype(np.float32), new_shape, order, separate_axis) for c in data])


def resample_labels(seg: np.ndarray, new_shape: tuple[int, ...], separate_axis: int | None, labels: list[int]) -> np.ndarray:
    """Label map via one-hot linear interpolation + argmax (labels must list every value present)."""
    if tuple(seg.shape) == tuple(new_shape):
        return seg
    best = np.full(new_shape, -1.0, dtype=np.float32)
    out = np.zeros(new_shape, dtype=seg.dtype)
    for value in labels:
        channel = resample_volume((seg == value).astype(np.float32), new_shape, 1, separate_axis)
        better = channel > best
        out[better] = value
        best[better] = channel[better]
    return out


def resample_probabilities(probs: np.ndarray, new_shape: tuple[int, ...], separate_axis: int | None) -> np.ndarray:
    """``(K, Z, Y, X)`` class probabilities, linear, renormalised to sum to one."""
    out = np.stack([resample_volume(p.astype(np.float32), new_shape, 1, separate_axis) for p in probs])
    out = np.clip(out, 0, None)
    return out / np.maximum(out.sum(0, keepdims=True), 1e-8)
