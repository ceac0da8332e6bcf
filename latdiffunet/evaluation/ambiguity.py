"""Metrics for ambiguous segmentation with several raters (LIDC, QUBIQ) on plain numpy arrays.

A set of sampled masks is compared with the set of rater masks: GED rewards matching the raters'
spread as well as their mean; Hungarian-matched IoU pairs each sample with one rater.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

def _mask_set(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim < 2:
        raise ValueError(
            f"{name}: expected a stack of masks of shape (n, *spatial), got shape {arr.shape}"
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one mask, got an empty stack")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{name}: expected bool or integer masks, got dtype {arr.dtype}")
    return (arr > 0).reshape(arr.shape[0], -1)


def _pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every row of ``a`` with every row of ``b`` (flattened bool masks); empty-empty = 1."""
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.float64)
    size_a = a.sum(axis=1)
    size_b = b.sum(axis=1)
    for i in range(a.shape[0]):
        inter = np.count_nonzero(a[i] & b, axis=1)
        union = size_a[i] + size_b - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            out[i] = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    return out


def _check_set_shapes(s: np.ndarray, r: np.ndarray, s_shape: tuple, r_shape: tuple) -> None:
    if s_shape[1:] != r_shape[1:]:
        raise ValueError(
            f"samples and raters must share the spatial shape, got samples {s_shape} "
            f"(S, *spatial) and raters {r_shape} (R, *spatial)"
        )


def generalized_energy_distance(samples: np.ndarray, raters: np.ndarray) -> float:
    """Squared generalised energy distance between predicted samples and rater annotations.

    ``GED = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')]`` with ``d(a, b) = 1 - IoU(a > 0, b > 0)``
    (two empty masks have IoU 1, so d = 0). It rewards a model whose samples spread like the
    raters do: matching the mean is not enough, the diversity terms must match too. Every
    expectation runs over *all* ordered pairs, identical pairs ``i == j`` included (d = 0
    there), so GED is 0 when samples and raters are the same set.

    Parameters
    ----------
    samples : ndarray, shape (S, *spatial)
        Predicted masks (bool or label maps; foreground = ``label > 0``).
    raters : ndarray, shape (R, *spatial)
        Annotations, same spatial shape.

    Returns
    -------
    float
        In [0, 2].
    """
    s_arr, r_arr = np.asarray(samples), np.asarray(raters)
    s = _mask_set(s_arr, "samples")
    r = _mask_set(r_arr, "raters")
    _check_set_shapes(s, r, s_arr.shape, r_arr.shape)
    d_sy = 1.0 - _pairwise_iou(s, r)
    d_ss = 1.0 - _pairwise_iou(s, s)
    d_yy = 1.0 - _pairwise_iou(r, r)
    return float(2.0 * d_sy.mean() - d_ss.mean() - d_yy.mean())


def hungarian_matched_iou(samples: np.ndarray, raters: np.ndarray) -> float:
    """Mean IoU of an optimal one-to-one matching between samples and raters.

    Unlike GED, each annotation must be covered by its own sample, so a model that always
    outputs the consensus scores low when raters disagree. Sets of different size are tiled to
    ``N = lcm(S, R)`` members (samples repeated ``N/S`` times, raters ``N/R`` times) so each
    original member carries equal weight; the matching minimises ``1 - IoU`` with
    :func:`scipy.optimize.linear_sum_assignment`. Foreground is ``label > 0``; two empty masks
    have IoU 1.

    Parameters
    ----------
    samples : ndarray, shape (S, *spatial)
    raters : ndarray, shape (R, *spatial)

    Returns
    -------
    float
        In [0, 1].
    """
    s_arr, r_arr = np.asarray(samples), np.asarray(raters)
    s = _mask_set(s_arr, "samples")
    r = _mask_set(r_arr, "raters")
    _check_set_shapes(s, r, s_arr.shape, r_arr.shape)
    n = math.lcm(s.shape[0], r.shape[0])
    # Tile the small IoU matrix rather than the masks: same result, no copies of volumes.
    iou_sr = _pairwise_iou(s, r)
    iou_tiled = np.tile(iou_sr, (n // s.shape[0], n // r.shape[0]))
    rows, cols = linear_sum_assignment(1.0 - iou_tiled)
    return float(iou_tiled[rows, cols].mean())
