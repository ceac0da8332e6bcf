"""Segmentation, calibration and multi-rater metrics on plain numpy arrays.

Conventions, chosen so that numbers can be compared with nnU-Net's ``summary.json``:

* Overlap metrics are computed per case and per class on the binary masks ``pred == c`` and
  ``ref == c``. When both masks are empty the class is absent from the case and there is nothing
  to get right or wrong, so Dice/IoU are NaN (not 1, not 0); averages over cases use ``nanmean``
  and therefore skip such cases, as nnU-Net does.
* Voxels that carry the ignore label in the reference (nnU-Net's sparse-annotation "ignore"
  label) are excluded from every count, in prediction and reference alike.
* Distances are in millimetres: ``spacing`` is the voxel size in *array axis order* (for a
  volume indexed ``[z, y, x]`` pass ``(sz, sy, sx)``), not ITK's (x, y, z) order.

All functions validate their inputs and raise :class:`ValueError` saying what was expected,
because a silently broadcast or mis-ordered array yields a plausible but wrong number.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.stats import rankdata

__all__ = [
    "confusion_counts",
    "dice",
    "iou",
    "surface_distances",
    "hd95",
    "expected_calibration_error",
    "region_of_interest",
    "uncertainty_error_auroc",
    "generalized_energy_distance",
    "hungarian_matched_iou",
    "evaluate_case",
    "aggregate",
    "summarize",
]

#: Metric names of one class in :func:`evaluate_case`, nnU-Net's names plus ``HD95``.
CASE_METRICS = ("Dice", "IoU", "HD95", "TP", "FP", "FN", "TN", "n_pred", "n_ref")

#: Tolerance on ``sum_c p_c == 1`` in :func:`expected_calibration_error` (allows float16 softmax).
PROBABILITY_SUM_ATOL = 1e-3


# --------------------------------------------------------------------------------------------
# input validation helpers
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# overlap
# --------------------------------------------------------------------------------------------


def confusion_counts(
    pred_mask: np.ndarray, ref_mask: np.ndarray, ignore_mask: np.ndarray | None = None
) -> tuple[int, int, int, int]:
    """Voxel counts ``(tp, fp, fn, tn)`` of a binary prediction against a binary reference.

    Parameters
    ----------
    pred_mask, ref_mask : ndarray of bool, same shape
        Foreground of one class in the prediction and in the reference.
    ignore_mask : ndarray of bool, same shape, optional
        True where the reference is unannotated (nnU-Net's ignore label). Those voxels count
        for nothing, so a model is neither rewarded nor punished where no truth exists.

    Returns
    -------
    tp, fp, fn, tn : int
        Numbers of voxels (not millimetres).
    """
    pred = _as_binary(pred_mask, "pred_mask")
    ref = _as_binary(ref_mask, "ref_mask")
    _check_same_shape(pred, ref, "pred_mask", "ref_mask")
    valid = _valid_mask(ignore_mask, pred.shape)
    if valid is not None:
        pred = pred & valid
        ref = ref & valid
        n_total = int(np.count_nonzero(valid))
    else:
        n_total = int(pred.size)
    tp = int(np.count_nonzero(pred & ref))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(ref)) - tp
    tn = n_total - tp - fp - fn
    return tp, fp, fn, tn


def _dice_from_counts(tp: int, fp: int, fn: int) -> float:
    denom = 2 * tp + fp + fn
    return float("nan") if denom == 0 else 2.0 * tp / denom


def _iou_from_counts(tp: int, fp: int, fn: int) -> float:
    denom = tp + fp + fn
    return float("nan") if denom == 0 else tp / denom


def dice(
    pred_mask: np.ndarray, ref_mask: np.ndarray, ignore_mask: np.ndarray | None = None
) -> float:
    """Dice coefficient ``2 TP / (2 TP + FP + FN)`` in [0, 1].

    NaN when both masks are empty (after removing ignored voxels): the class is absent from the
    case, and NaN lets a ``nanmean`` over cases skip it instead of counting a free 1 or an
    unearned 0 (nnU-Net's convention). Exactly one empty mask gives 0.

    Parameters
    ----------
    pred_mask, ref_mask : ndarray of bool, same shape
    ignore_mask : ndarray of bool, optional
        Voxels to leave out, see :func:`confusion_counts`.
    """
    tp, fp, fn, _ = confusion_counts(pred_mask, ref_mask, ignore_mask)
    return _dice_from_counts(tp, fp, fn)


def iou(
    pred_mask: np.ndarray, ref_mask: np.ndarray, ignore_mask: np.ndarray | None = None
) -> float:
    """Intersection over union (Jaccard) ``TP / (TP + FP + FN)`` in [0, 1].

    Same empty-mask convention as :func:`dice` (both empty -> NaN, one empty -> 0).
    """
    tp, fp, fn, _ = confusion_counts(pred_mask, ref_mask, ignore_mask)
    return _iou_from_counts(tp, fp, fn)


# --------------------------------------------------------------------------------------------
# surface distance
# --------------------------------------------------------------------------------------------


def _surface(mask: np.ndarray) -> np.ndarray:
    # Full connectivity: a voxel touching the background even by a corner is on the surface,
    # so diagonal staircases have a closed surface. Voxels on the array border count as surface
    # (erosion pads with background), which closes objects cut by the field of view.
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    return mask ^ ndimage.binary_erosion(mask, structure=structure)


def surface_distances(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in millimetres, prediction->reference and reference->prediction.

    Exposed separately from :func:`hd95` so that other summaries (maximum Hausdorff, average
    symmetric surface distance, another percentile) use exactly the same surfaces.

    Parameters
    ----------
    pred_mask, ref_mask : ndarray of bool, same shape, both non-empty
    spacing : sequence of float, optional
        Voxel size in mm in array axis order (e.g. (z, y, x)); default 1 mm per axis.

    Returns
    -------
    d_pred_to_ref : ndarray of float, shape (n_pred_surface_voxels,)
        For each surface voxel of the prediction, the distance to the nearest reference surface
        voxel (voxel centre to voxel centre).
    d_ref_to_pred : ndarray of float, shape (n_ref_surface_voxels,)
    """
    pred = _as_binary(pred_mask, "pred_mask")
    ref = _as_binary(ref_mask, "ref_mask")
    _check_same_shape(pred, ref, "pred_mask", "ref_mask")
    if pred.ndim == 0:
        raise ValueError("masks must have at least one axis, got 0-d arrays")
    sp = _check_spacing(spacing, pred.ndim)
    if not pred.any() or not ref.any():
        raise ValueError(
            "surface distances need two non-empty masks, got "
            f"{'an empty' if not pred.any() else 'a non-empty'} pred_mask and "
            f"{'an empty' if not ref.any() else 'a non-empty'} ref_mask"
        )
    pred_surface = _surface(pred)
    ref_surface = _surface(ref)
    dist_to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=sp)
    dist_to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sp)
    return dist_to_ref[pred_surface], dist_to_pred[ref_surface]


def hd95(
    pred_mask: np.ndarray,
    ref_mask: np.ndarray,
    spacing: Sequence[float] | None = None,
    empty_value: float = float("nan"),
) -> float:
    """95th-percentile symmetric Hausdorff distance in millimetres.

    *Symmetric* here means **pooled**: both directed distance sets of
    :func:`surface_distances` are concatenated and the 95th percentile (numpy's linear
    interpolation) is taken of the union, as MedPy's ``hd95`` does. The alternative,
    ``max(p95(pred->ref), p95(ref->pred))`` (MONAI's), is never smaller up to percentile
    interpolation; the two agree when both directions have the same distance distribution.
    The 95th percentile rather than the maximum keeps a few stray voxels from dominating.

    Parameters
    ----------
    pred_mask, ref_mask : ndarray of bool, same shape
    spacing : sequence of float, optional
        Voxel size in mm in array axis order (e.g. (z, y, x)); default 1 mm per axis.
    empty_value : float, default NaN
        Returned when exactly one of the masks is empty. A distance to nothing is undefined;
        NaN keeps such cases out of a ``nanmean`` instead of inventing a number, but it also
        hides a missed structure or a false-positive object, so report Dice next to it (which is
        0 there) or pass a penalty such as the image diagonal in mm.

    Returns
    -------
    float
        Distance in mm; NaN when both masks are empty (class absent), ``empty_value`` when
        exactly one is empty.
    """
    pred = _as_binary(pred_mask, "pred_mask")
    ref = _as_binary(ref_mask, "ref_mask")
    _check_same_shape(pred, ref, "pred_mask", "ref_mask")
    _check_spacing(spacing, pred.ndim)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return float("nan")
    if not has_pred or not has_ref:
        return float(empty_value)
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    return float(np.percentile(np.concatenate([d_pr, d_rp]), 95))


# --------------------------------------------------------------------------------------------
# calibration and uncertainty
# --------------------------------------------------------------------------------------------


def expected_calibration_error(
    probabilities: np.ndarray,
    labels: np.ndarray,
    n_bins: int = 15,
    mask: np.ndarray | None = None,
) -> float:
    """Expected calibration error of the top-class confidence, in [0, 1].

    ``ECE = sum_b (n_b / N) * |acc_b - conf_b|`` over ``n_bins`` equal-width confidence bins on
    [0, 1] (bin ``b`` holds confidences in ``(b/n_bins, (b+1)/n_bins]``), where confidence is the
    largest class probability and the prediction its argmax (first class on ties). It answers
    "when the model says 90 %, is it right 90 % of the time?"; in segmentation the background
    dominates N, so pass ``mask`` (e.g. :func:`region_of_interest`) to measure it where the
    decisions are hard.

    Parameters
    ----------
    probabilities : ndarray of float, shape (C, *spatial)
        Class probabilities, non-negative and summing to 1 over axis 0 (to within
        ``PROBABILITY_SUM_ATOL``).
    labels : ndarray of int, shape (*spatial)
        Reference class index per voxel.
    n_bins : int, default 15
    mask : ndarray of bool, shape (*spatial), optional
        Voxels to include; default all.

    Returns
    -------
    float
        NaN when no voxel is selected.
    """
    prob = np.asarray(probabilities)
    if not np.issubdtype(prob.dtype, np.floating):
        raise ValueError(f"probabilities: expected a float array, got dtype {prob.dtype}")
    if prob.ndim < 2:
        raise ValueError(
            f"probabilities: expected shape (C, *spatial) with at least one spatial axis, "
            f"got shape {prob.shape}"
        )
    lab = _as_label_map(labels, "labels")
    if prob.shape[1:] != lab.shape:
        raise ValueError(
            f"labels must have the spatial shape of probabilities {prob.shape[1:]} "
            f"(probabilities are (C, *spatial)), got {lab.shape}"
        )
    if not isinstance(n_bins, (int, np.integer)) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    if not np.isfinite(prob).all() or (prob < 0).any():
        raise ValueError("probabilities must be finite and non-negative")
    sums = prob.sum(axis=0, dtype=np.float64)
    if not np.allclose(sums, 1.0, rtol=0.0, atol=PROBABILITY_SUM_ATOL):
        worst = float(np.max(np.abs(sums - 1.0)))
        raise ValueError(
            "probabilities must sum to 1 over axis 0 (classes first, shape (C, *spatial)); "
            f"largest deviation is {worst:.3g}. Apply softmax, or move the class axis first"
        )
    if mask is not None:
        sel = _as_binary(mask, "mask")
        if sel.shape != lab.shape:
            raise ValueError(f"mask must have the spatial shape {lab.shape}, got {sel.shape}")
    else:
        sel = np.ones(lab.shape, dtype=bool)
    n = int(np.count_nonzero(sel))
    if n == 0:
        return float("nan")
    p = prob[:, sel].astype(np.float64)  # (C, N)
    confidence = p.max(axis=0)
    correct = (p.argmax(axis=0) == lab[sel]).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" puts a confidence equal to an edge into the bin that edge closes (right-closed).
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    sum_conf = np.bincount(bins, weights=confidence, minlength=n_bins)
    sum_acc = np.bincount(bins, weights=correct, minlength=n_bins)
    # n_b/N * |acc_b - conf_b| == |sum_acc_b - sum_conf_b| / N
    return float(np.abs(sum_acc - sum_conf).sum() / n)


def region_of_interest(
    reference: np.ndarray, prediction: np.ndarray, margin_voxels: int
) -> np.ndarray:
    """Foreground of reference or prediction, grown by ``margin_voxels`` in every direction.

    Restricting calibration metrics to this region measures them where the model has to decide;
    otherwise millions of trivially confident background voxels push ECE towards 0.

    Parameters
    ----------
    reference, prediction : ndarray of int or bool, same shape
        Label maps; foreground is ``label > 0``.
    margin_voxels : int
        Dilation in voxels with full connectivity (a box of side ``2 * margin + 1``, i.e. a
        Chebyshev distance of at most ``margin_voxels``). 0 gives the union itself.

    Returns
    -------
    ndarray of bool
        Empty if both inputs have no foreground.
    """
    ref = np.asarray(reference)
    pred = np.asarray(prediction)
    _check_same_shape(ref, pred, "reference", "prediction")
    if not isinstance(margin_voxels, (int, np.integer)) or isinstance(margin_voxels, bool):
        raise ValueError(
            f"margin_voxels must be an integer number of voxels, got {margin_voxels!r}"
        )
    if margin_voxels < 0:
        raise ValueError(f"margin_voxels must be >= 0, got {margin_voxels}")
    roi = (ref > 0) | (pred > 0)
    if margin_voxels == 0 or not roi.any():
        return roi  # binary_dilation(iterations=0) would dilate until nothing changes
    structure = ndimage.generate_binary_structure(roi.ndim, roi.ndim)
    return ndimage.binary_dilation(roi, structure=structure, iterations=int(margin_voxels))


def uncertainty_error_auroc(
    uncertainty: np.ndarray,
    pred: np.ndarray,
    ref: np.ndarray,
    mask: np.ndarray | None = None,
) -> float:
    """AUROC of a per-voxel uncertainty score as a detector of wrongly labelled voxels.

    The probability that a randomly chosen wrong voxel (``pred != ref``) has a higher
    uncertainty than a randomly chosen right one, ties counting one half: 1 means the
    uncertainty map points exactly at the errors, 0.5 that it carries no information. Computed
    from average ranks (Mann-Whitney U), which handles ties exactly and needs no thresholds.

    Parameters
    ----------
    uncertainty : ndarray of float, shape (*spatial)
        Higher means less sure (entropy, sample variance, ...). Must be finite.
    pred, ref : ndarray of int, shape (*spatial)
        Predicted and reference label maps.
    mask : ndarray of bool, shape (*spatial), optional
        Voxels to include; default all.

    Returns
    -------
    float
        NaN when the selected voxels are all right or all wrong (one class of the detection
        problem is missing, so AUROC is undefined).
    """
    unc = np.asarray(uncertainty)
    p = _as_label_map(pred, "pred")
    r = _as_label_map(ref, "ref")
    _check_same_shape(p, r, "pred", "ref")
    _check_same_shape(unc, p, "uncertainty", "pred")
    if not (np.issubdtype(unc.dtype, np.number) or unc.dtype == bool):
        raise ValueError(f"uncertainty: expected a numeric array, got dtype {unc.dtype}")
    if mask is not None:
        sel = _as_binary(mask, "mask")
        _check_same_shape(sel, p, "mask", "pred")
    else:
        sel = np.ones(p.shape, dtype=bool)
    u = unc[sel].astype(np.float64)
    if not np.isfinite(u).all():
        raise ValueError("uncertainty must be finite in the selected voxels")
    wrong = p[sel] != r[sel]
    n_pos = int(np.count_nonzero(wrong))
    n_neg = int(wrong.size) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(u, method="average")
    u_stat = ranks[wrong].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u_stat / (float(n_pos) * float(n_neg)))


# --------------------------------------------------------------------------------------------
# multi-rater / ambiguous segmentation
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# per case and summary (nnU-Net's summary.json layout)
# --------------------------------------------------------------------------------------------


def evaluate_case(
    pred: np.ndarray,
    ref: np.ndarray,
    labels: Sequence[int],
    spacing: Sequence[float] | None,
    ignore_label: int | None = None,
) -> dict[str, dict[str, float | int]]:
    """All per-class metrics of one case, keyed like nnU-Net's ``metrics`` entry.

    Parameters
    ----------
    pred, ref : ndarray of int, same shape
        Predicted and reference label maps.
    labels : sequence of int
        Classes to evaluate (usually the foreground labels; 0 may be included).
    spacing : sequence of float or None
        Voxel size in mm in array axis order, for HD95 (None: 1 mm).
    ignore_label : int, optional
        Reference label marking unannotated voxels; they are excluded from all counts and the
        prediction is blanked there before HD95, so no metric sees them.

    Returns
    -------
    dict
        ``{"1": {"Dice", "IoU", "HD95", "TP", "FP", "FN", "TN", "n_pred", "n_ref"}, ...}``;
        class keys are strings so the dict round-trips through JSON unchanged. ``n_pred`` /
        ``n_ref`` are voxel counts of the class after removing ignored voxels.
    """
    p = _as_label_map(pred, "pred")
    r = _as_label_map(ref, "ref")
    _check_same_shape(p, r, "pred", "ref")
    sp = _check_spacing(spacing, p.ndim)
    labels = list(labels)
    if not labels:
        raise ValueError("labels: expected at least one class to evaluate, got none")
    for c in labels:
        if not isinstance(c, (int, np.integer)) or isinstance(c, bool):
            raise ValueError(f"labels must be integers, got {c!r}")
    if len(set(int(c) for c in labels)) != len(labels):
        raise ValueError(f"labels must not repeat, got {labels}")
    if ignore_label is not None and ignore_label in labels:
        raise ValueError(f"ignore_label {ignore_label} cannot also be evaluated as a class")

    ignore = None if ignore_label is None else (r == ignore_label)
    valid = None if ignore is None else ~ignore
    out: dict[str, dict[str, float | int]] = {}
    for c in labels:
        pred_c = p == c
        ref_c = r == c
        tp, fp, fn, tn = confusion_counts(pred_c, ref_c, ignore)
        pred_for_hd = pred_c if valid is None else pred_c & valid
        out[str(int(c))] = {
            "Dice": _dice_from_counts(tp, fp, fn),
            "IoU": _iou_from_counts(tp, fp, fn),
            "HD95": hd95(pred_for_hd, ref_c, sp),
            "TP": tp,
            "FP": fp,
            "FN": fn,
            "TN": tn,
            "n_pred": tp + fp,
            "n_ref": tp + fn,
        }
    return out


def _case_metrics(case: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
    # Accept both evaluate_case()'s output and nnU-Net's {"metrics": ..., "reference_file": ...}.
    if "metrics" in case and isinstance(case["metrics"], Mapping):
        return case["metrics"]
    return case


def aggregate(
    per_case: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Mean of every metric per class over cases, and the mean over foreground classes.

    Per class, cases are averaged with ``nanmean`` so cases where the class is absent (NaN)
    do not count; a class absent from every case gets NaN. ``foreground_mean`` averages the
    per-class means over all classes except ``"0"`` with a plain mean, as nnU-Net does, so one
    all-NaN class makes it NaN rather than silently dropping that class.

    Parameters
    ----------
    per_case : sequence of dict
        Outputs of :func:`evaluate_case`, or nnU-Net ``metric_per_case`` entries (dicts with a
        ``"metrics"`` key). All cases must hold the same classes and metrics.

    Returns
    -------
    mean : dict
        ``{class_key: {metric: value}}`` (summary.json's ``mean``).
    foreground_mean : dict
        ``{metric: value}`` (summary.json's ``foreground_mean``).
    """
    cases = [_case_metrics(c) for c in per_case]
    if not cases:
        raise ValueError("per_case: expected at least one case, got none")
    classes = list(cases[0].keys())
    if not classes:
        raise ValueError("per_case: the first case holds no classes")
    metric_names = list(cases[0][classes[0]].keys())
    for i, c in enumerate(cases):
        if list(c.keys()) != classes:
            raise ValueError(
                f"per_case[{i}] has classes {list(c.keys())}, expected {classes} like case 0"
            )
        for k in classes:
            if set(c[k].keys()) != set(metric_names):
                raise ValueError(
                    f"per_case[{i}] class {k} has metrics {sorted(c[k].keys())}, expected "
                    f"{sorted(metric_names)}"
                )
    mean: dict[str, dict[str, float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all-NaN slice -> NaN, fine
        for k in classes:
            mean[str(k)] = {
                m: float(np.nanmean(np.array([c[k][m] for c in cases], dtype=np.float64)))
                for m in metric_names
            }
    fg = [k for k in mean if k != "0"]
    foreground_mean = {
        m: (float(np.mean([mean[k][m] for k in fg])) if fg else float("nan")) for m in metric_names
    }
    return mean, foreground_mean


def summarize(per_case: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"metric_per_case", "mean", "foreground_mean"}``, the layout of nnU-Net's summary.json.

    Keeping the layout lets the same scripts read our results and nnU-Net's.
    """
    mean, foreground_mean = aggregate(per_case)
    return {"metric_per_case": list(per_case), "mean": mean, "foreground_mean": foreground_mean}
