"""Input validation shared by the metric modules: say what was expected, never broadcast silently."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

def _as_binary(mask: Any, name: str) -> np.ndarray:
    """Return ``mask`` as a bool array, refusing label maps.

    Casting a label map with ``astype(bool)`` would merge all classes into one without warning,
    so non-boolean input is only accepted when it holds nothing but 0 and 1.
    """
    arr = np.asarray(mask)
    if arr.dtype == bool:
        return arr
    if arr.size and not (np.issubdtype(arr.dtype, np.number)):
        raise ValueError(f"{name}: expected a boolean mask, got an array of dtype {arr.dtype}")
    if arr.size and not np.isin(arr, (0, 1)).all():
        found = np.unique(arr)[:10]
        raise ValueError(
            f"{name}: expected a boolean mask (or 0/1 values), got values {found.tolist()}; "
            f"for one class of a label map pass (labels == c)"
        )
    return arr.astype(bool)


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}"
        )


def _as_label_map(labels: Any, name: str) -> np.ndarray:
    arr = np.asarray(labels)
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
            raise ValueError(f"{name}: expected integer labels, got non-integral float values")
        return arr.astype(np.int64)
    raise ValueError(f"{name}: expected an integer label array, got dtype {arr.dtype}")


def _valid_mask(ignore_mask: Any | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if ignore_mask is None:
        return None
    ign = _as_binary(ignore_mask, "ignore_mask")
    if ign.shape != shape:
        raise ValueError(f"ignore_mask must have shape {shape} (the masks' shape), got {ign.shape}")
    return ~ign


def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    sp = tuple(float(s) for s in np.atleast_1d(np.asarray(spacing, dtype=float)))
    if len(sp) != ndim:
        raise ValueError(
            f"spacing must give one voxel size per array axis ({ndim} values in array order, "
            f"e.g. (z, y, x)), got {len(sp)}: {sp}"
        )
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be positive finite millimetres, got {sp}")
    return sp
