"""Crop to the nonzero region, as nnU-Net does, so that air/padding costs neither memory nor time."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """Voxels where any channel is nonzero, holes filled (dark tissue inside the body stays in)."""
    mask = np.any(data != 0, axis=0)
    if mask.ndim == 3 and mask.shape[0] == 1:
        return ndimage.binary_fill_holes(mask[0])[None]
    return ndimage.binary_fill_holes(mask)


def bounding_box(mask: np.ndarray) -> list[list[int]]:
    """``[[start, stop), ...]`` per axis of the True voxels; the whole array when none are True."""
    if not mask.any():
        return [[0, s] for s in mask.shape]
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append([int(hits[0]), int(hits[-1]) + 1])
    return box


def crop(array: np.ndarray, box: list[list[int]]) -> np.ndarray:
    """Crop the trailing ``len(box)`` axes of ``array``."""
    lead = (slice(None),) * (array.ndim - len(box))
    return array[lead + tuple(slice(a, b) for a, b in box)]


def crop_to_nonzero(data: np.ndarray, seg: np.ndarray | None = None):
    """Return ``(data, seg, mask, box)`` cropped to the nonzero bounding box of ``data`` (C, Z, Y, X)."""
    mask = nonzero_mask(data)
    box = bounding_box(mask)
    return crop(data, box), (None if seg is None else crop(seg, box)), crop(mask, box), box


def uncrop(cropped: np.ndarray, box: list[list[int]], full_shape: tuple[int, ...], fill: float = 0) -> np.ndarray:
    """Put a cropped array (trailing axes) back into an array of ``full_shape`` filled with ``fill``."""
    lead = cropped.shape[: cropped.ndim - len(box)]
    out = np.full(tuple(lead) + tuple(full_shape), fill, dtype=cropped.dtype)
    out[(slice(None),) * len(lead) + tuple(slice(a, b) for a, b in box)] = cropped
    return out
