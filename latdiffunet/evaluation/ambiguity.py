"""Metrics for ambiguous segmentation with several raters (LIDC, QUBIQ) on plain numpy arrays.

A set of sampled masks is compared with the set of rater masks: GED rewards matching the raters'
spread as well as their mean; Hungarian-matched IoU pairs each sample with one rater; the
diversities and the diversity ratio say whether the samples spread as much as the raters; the
frequency-map agreement compares the voxel-wise fraction of samples with the fraction of raters
that mark foreground. :func:`sample_dice_scores` needs no raters: it compares single samples with
the one reference and with each other.

Set metrics use ``foreground = label > 0`` and the distance ``d(a, b) = 1 - IoU(a, b)`` with
``IoU(empty, empty) = 1``. Expectations over pairs of one set run over *all* ordered pairs,
identical pairs included (d = 0 there), so a set compared with itself gives GED 0.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "set_diversity",
    "distinct_pair_diversity",
    "energy_distance_terms",
    "generalized_energy_distance",
    "hungarian_matched_iou",
    "frequency_map_agreement",
    "sample_dice_scores",
]


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


def _mean_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``E d(A, B)`` over all ordered pairs of rows of ``a`` and ``b`` (flattened bool masks)."""
    return float((1.0 - _pairwise_iou(a, b)).mean())


def _sample_and_rater_sets(samples: Any, raters: Any) -> tuple[np.ndarray, np.ndarray]:
    s_arr, r_arr = np.asarray(samples), np.asarray(raters)
    s = _mask_set(s_arr, "samples")
    r = _mask_set(r_arr, "raters")
    _check_set_shapes(s, r, s_arr.shape, r_arr.shape)
    return s, r


def set_diversity(masks: np.ndarray) -> float:
    """Mean distance ``E d(M, M')`` between members of one set of masks.

    The diversity term of :func:`generalized_energy_distance`: all ordered pairs, identical ones
    included, with ``d = 1 - IoU`` (two empty masks: d = 0). Applied to diffusion samples it is
    the *sample diversity*, applied to annotations the *rater diversity*; a model whose samples
    all collapse onto one mask has sample diversity 0.

    Parameters
    ----------
    masks : ndarray, shape (n, *spatial)
        Bool masks or label maps (foreground = ``label > 0``).

    Returns
    -------
    float
        In [0, (n - 1) / n]: identical pairs contribute 0.
    """
    m = _mask_set(masks, "masks")
    return _mean_distance(m, m)


def energy_distance_terms(samples: np.ndarray, raters: np.ndarray) -> dict[str, float]:
    """The expectations that make up GED, GED itself and the diversity ratio, in one pass.

    Returns
    -------
    dict
        ``cross_distance`` ``E d(S, Y)``; ``sample_diversity`` ``E d(S, S')`` and
        ``rater_diversity`` ``E d(Y, Y')`` (see :func:`set_diversity`);
        ``GED = 2 cross_distance - sample_diversity - rater_diversity``; ``diversity_ratio =
        sample_diversity / rater_diversity`` (1: samples spread like the raters, < 1: too
        little, NaN when the raters agree perfectly); ``sample_diversity_distinct_pairs`` and
        ``rater_diversity_distinct_pairs`` (:func:`distinct_pair_diversity`), the terms to
        compare when the two sets differ in size.
    """
    s, r = _sample_and_rater_sets(samples, raters)
    cross, div_s, div_r = _mean_distance(s, r), _mean_distance(s, s), _mean_distance(r, r)
    return {
        "GED": 2.0 * cross - div_s - div_r,
        "cross_distance": cross,
        "sample_diversity": div_s,
        "rater_diversity": div_r,
        "diversity_ratio": div_s / div_r if div_r > 0 else float("nan"),
        "sample_diversity_distinct_pairs": distinct_pair_diversity(div_s, len(s)),
        "rater_diversity_distinct_pairs": distinct_pair_diversity(div_r, len(r)),
    }


def distinct_pair_diversity(all_pairs_diversity: float, n: int) -> float:
    """``E d(M, M')`` over the n (n - 1) ordered pairs of *distinct* members (NaN for one member).

    The unbiased estimate of the distance between two independent draws: the all-pairs mean of
    :func:`set_diversity` counts n identical pairs at d = 0 and so shrinks by (n - 1) / n, which
    depends on the set size: by 25 % for 4 LIDC raters and 6 % for 16 samples. Comparing the spread
    of 16 samples with that of 4 raters therefore needs these, not the all-pairs terms that GED
    (by its protocol) uses.
    """
    return all_pairs_diversity * n / (n - 1) if n > 1 else float("nan")


def generalized_energy_distance(samples: np.ndarray, raters: np.ndarray) -> float:
    """Squared generalised energy distance between predicted samples and rater annotations.

    ``GED = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')]`` with ``d(a, b) = 1 - IoU(a > 0, b > 0)``
    (two empty masks have IoU 1, so d = 0). It rewards a model whose samples spread like the
    raters do: matching the mean is not enough, the diversity terms must match too. Every
    expectation runs over *all* ordered pairs, identical pairs ``i == j`` included (d = 0
    there), so GED is 0 when samples and raters are the same set. The separate terms come from
    :func:`energy_distance_terms`.

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
    return energy_distance_terms(samples, raters)["GED"]


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
    s, r = _sample_and_rater_sets(samples, raters)
    n = math.lcm(s.shape[0], r.shape[0])
    # Tile the small IoU matrix rather than the masks: same result, no copies of volumes.
    iou_sr = _pairwise_iou(s, r)
    iou_tiled = np.tile(iou_sr, (n // s.shape[0], n // r.shape[0]))
    rows, cols = linear_sum_assignment(1.0 - iou_tiled)
    return float(iou_tiled[rows, cols].mean())


def frequency_map_agreement(samples: np.ndarray, raters: np.ndarray) -> dict[str, float]:
    """How well the samples' foreground frequency reproduces the raters' frequency map.

    ``p`` is the fraction of samples and ``q`` the fraction of raters marking a voxel as
    foreground (``label > 0``); ``q`` is the raters' soft label (e.g. 0.5 where two of four
    raters drew the lesion). Both measures look only at the union ``U`` of voxels that any
    sample or any rater marks, so the background of a large volume does not dilute them.

    Parameters
    ----------
    samples : ndarray, shape (S, *spatial)
    raters : ndarray, shape (R, *spatial)
        Bool masks or label maps with the same spatial shape.

    Returns
    -------
    dict
        ``frequency_map_L1``: ``mean_U |p - q|`` in [0, 1], 0 is perfect; 0 when ``U`` is empty
        (nothing drawn by anyone: nothing to disagree on).
        ``frequency_map_soft_dice``: ``2 sum(p q) / (sum(p^2) + sum(q^2))`` in [0, 1], 1 is
        perfect and reached only for ``p == q``, since ``1 - soft Dice = sum((p - q)^2) /
        (sum(p^2) + sum(q^2))``; 1 when both maps are empty. For binary maps it is the Dice
        coefficient.
    """
    s, r = _sample_and_rater_sets(samples, raters)
    union = s.any(axis=0) | r.any(axis=0)
    if not union.any():
        return {"frequency_map_L1": 0.0, "frequency_map_soft_dice": 1.0}
    p = s[:, union].mean(axis=0, dtype=np.float64)
    q = r[:, union].mean(axis=0, dtype=np.float64)
    return {
        "frequency_map_L1": float(np.abs(p - q).mean()),
        "frequency_map_soft_dice": float(2.0 * np.dot(p, q) / (np.dot(p, p) + np.dot(q, q))),
    }


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def sample_dice_scores(
    samples: np.ndarray,
    reference: np.ndarray,
    labels: Sequence[int],
    ignore_mask: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """Per class, how good one sample is and how much samples differ, in Dice.

    ``Dice_single_sample`` is the mean over samples of ``Dice(sample == c, reference == c)``:
    what a user gets from drawing one sample, to compare with the Dice of the mean prediction.
    ``Dice_pairwise_samples`` is the mean over unordered pairs ``i < j`` of ``Dice(sample_i ==
    c, sample_j == c)``: 1 when every sample is the same, lower the more they differ. Dice follows
    :func:`~latdiffunet.evaluation.metrics.dice`: NaN when both masks are empty, 0 when one is;
    NaN terms are left out of the means (a sample that, like the reference, does not contain
    the class is not scored), and a mean with no term left is NaN (e.g. pairwise with one
    sample).

    Parameters
    ----------
    samples : ndarray of int, shape (S, *spatial)
        Sampled label maps.
    reference : ndarray of int, shape (*spatial)
        The reference label map.
    labels : sequence of int
        Classes to score.
    ignore_mask : ndarray of bool, shape (*spatial), optional
        True where the reference is unannotated; those voxels count in no Dice, pairwise
        included, as in :func:`~latdiffunet.evaluation.metrics.evaluate_case`.

    Returns
    -------
    dict
        ``{"1": {"Dice_single_sample": float, "Dice_pairwise_samples": float}, ...}``.
    """
    # metrics.py re-exports this module's functions at its end, so import it here, not at the top
    from latdiffunet.evaluation.metrics import dice

    s, ref = np.asarray(samples), np.asarray(reference)
    if s.ndim < 2 or s.shape[0] == 0 or s.shape[1:] != ref.shape:
        raise ValueError(
            f"samples must be a non-empty stack (S, *spatial) of label maps shaped like the reference "
            f"{ref.shape}, got shape {s.shape}"
        )
    valid = None
    if ignore_mask is not None:
        ignore = np.asarray(ignore_mask)
        if ignore.shape != ref.shape or ignore.dtype != bool:
            raise ValueError(f"ignore_mask must be bool with the reference's shape {ref.shape}, got {ignore.dtype} {ignore.shape}")
        valid = ~ignore
    out: dict[str, dict[str, float]] = {}
    for c in labels:
        sample_c, ref_c = s == c, ref == c
        keep = ref_c | sample_c.any(axis=0)  # voxels outside change no count: drop them
        if valid is not None:
            keep &= valid
        sample_c, ref_c = sample_c[:, keep], ref_c[keep]
        pairs = itertools.combinations(range(len(sample_c)), 2)
        out[str(int(c))] = {
            "Dice_single_sample": _nanmean([dice(m, ref_c) for m in sample_c]),
            "Dice_pairwise_samples": _nanmean([dice(sample_c[i], sample_c[j]) for i, j in pairs]),
        }
    return out
