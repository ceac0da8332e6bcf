"""Calibration and uncertainty quality on plain numpy arrays.

A model's confidence should match how often it is right (ECE), and its uncertainty should point at
the voxels it gets wrong (AUROC of uncertainty for errors); both judge the uncertainty maps that
latdiffunet sells, not just the segmentation.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

from latdiffunet.evaluation.array_checks import _as_binary, _as_label_map, _check_same_shape

#: Tolerance on ``sum_c p_c == 1`` in :func:`expected_calibration_error` (allows float16 softmax).
PROBABILITY_SUM_ATOL = 1e-3


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
