"""Segmentation metrics on plain numpy arrays (calibration: ``calibration.py``; raters: ``ambiguity.py``).

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

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from latdiffunet.evaluation.array_checks import _as_binary, _as_label_map, _check_same_shape, _check_spacing, _valid_mask

__all__ = [
    "PROBABILITY_SUM_ATOL",
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


# Calibration and multi-rater metrics live in their own modules; re-exported so that
# ``from latdiffunet.evaluation.metrics import ...`` keeps one import place for every metric.
from latdiffunet.evaluation.ambiguity import generalized_energy_distance, hungarian_matched_iou  # noqa: E402
from latdiffunet.evaluation.calibration import (  # noqa: E402
    PROBABILITY_SUM_ATOL,  # noqa: F401
    expected_calibration_error,
    region_of_interest,
    uncertainty_error_auroc,
)
