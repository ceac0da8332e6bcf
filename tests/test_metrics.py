"""Metrics against values computed by hand on tiny arrays (the derivations are in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from latdiffunet.evaluation.ambiguity import (
    energy_distance_terms,
    frequency_map_agreement,
    sample_dice_scores,
    set_diversity,
)
from latdiffunet.evaluation.metrics import (
    aggregate,
    confusion_counts,
    dice,
    evaluate_case,
    expected_calibration_error,
    generalized_energy_distance,
    hd95,
    hungarian_matched_iou,
    iou,
    region_of_interest,
    summarize,
    surface_distances,
    uncertainty_error_auroc,
)

# ------------------------------------------------------------------ Dice / IoU / counts

# pred          ref
# 1 1 0 0       0 1 1 0
# 1 1 0 0       0 1 1 0
# 0 0 0 0       0 0 0 0
# 0 0 0 0       0 0 0 0
# tp = 2 (column 1), fp = 2 (column 0), fn = 2 (column 2), tn = 16 - 6 = 10
PRED = np.zeros((4, 4), bool)
PRED[0:2, 0:2] = True
REF = np.zeros((4, 4), bool)
REF[0:2, 1:3] = True


def test_confusion_counts_known_case():
    assert confusion_counts(PRED, REF) == (2, 2, 2, 10)


def test_dice_iou_known_case():
    assert dice(PRED, REF) == pytest.approx(0.5)  # 2*2 / (2*2 + 2 + 2)
    assert iou(PRED, REF) == pytest.approx(1 / 3)  # 2 / (2 + 2 + 2)
    assert dice(REF, REF) == 1.0 and iou(REF, REF) == 1.0


def test_both_empty_is_nan_one_empty_is_zero():
    empty = np.zeros((4, 4), bool)
    assert math.isnan(dice(empty, empty))
    assert math.isnan(iou(empty, empty))
    assert dice(empty, REF) == 0.0 and dice(PRED, empty) == 0.0
    assert iou(empty, REF) == 0.0 and iou(PRED, empty) == 0.0


def test_ignore_mask_removes_voxels_from_all_counts():
    # ignoring column 0 removes the 2 false positives and 4 voxels in total:
    # tp = 2, fp = 0, fn = 2, tn = 12 - 4 = 8
    ignore = np.zeros((4, 4), bool)
    ignore[:, 0] = True
    assert confusion_counts(PRED, REF, ignore) == (2, 0, 2, 8)
    assert dice(PRED, REF, ignore_mask=ignore) == pytest.approx(2 / 3)  # 4 / 6
    assert iou(PRED, REF, ignore_mask=ignore) == pytest.approx(0.5)  # 2 / 4


def test_ignore_mask_can_make_a_class_absent():
    ignore = PRED | REF
    assert math.isnan(dice(PRED, REF, ignore_mask=ignore))


def test_label_maps_are_refused_as_masks():
    with pytest.raises(ValueError, match="boolean mask"):
        dice(PRED.astype(int) * 2, REF)
    with pytest.raises(ValueError, match="same shape"):
        dice(PRED, REF[:3])
    with pytest.raises(ValueError, match="ignore_mask"):
        confusion_counts(PRED, REF, np.zeros((3, 3), bool))


def test_zero_one_integer_masks_are_accepted():
    assert dice(PRED.astype(np.uint8), REF.astype(int)) == pytest.approx(0.5)


# ------------------------------------------------------------------ HD95

def _squares(shift_axis: int) -> tuple[np.ndarray, np.ndarray]:
    # 4x4 squares, B = A shifted by 2 voxels along shift_axis, away from the array border.
    a = np.zeros((12, 12), bool)
    a[3:7, 3:7] = True
    b = np.roll(a, 2, axis=shift_axis)
    return a, b


def test_surface_distances_by_hand():
    # A = rows 3..6, B = rows 5..8 (cols 3..6), spacing 3 mm along rows, 1 mm along columns.
    # A surface -> nearest B surface:
    #   row 3 (4 voxels): B surface starts at row 5 -> 2 rows * 3 mm = 6
    #   row 4, cols 3 and 6: (5, c) is B surface -> 3
    #   row 5, cols 3 and 6: on B surface -> 0
    #   row 6, cols 3 and 6: on B's side walls -> 0; cols 4, 5: side wall 1 column away -> 1
    # B -> A is the mirror image, same multiset.
    a, b = _squares(0)
    d_ab, d_ba = surface_distances(a, b, spacing=(3.0, 1.0))
    expected = sorted([6.0] * 4 + [3.0] * 2 + [0.0] * 4 + [1.0] * 2)
    np.testing.assert_allclose(np.sort(d_ab), expected)
    np.testing.assert_allclose(np.sort(d_ba), expected)


def test_hd95_shifted_squares_anisotropic_spacing():
    # pooled 24 distances: 0 x8, 1 x4, 3 x4, 6 x8; 95th percentile index 0.95*23 = 21.85 -> 6
    a, b = _squares(0)
    assert hd95(a, b, spacing=(3.0, 1.0)) == pytest.approx(6.0)  # 2 voxels * 3 mm
    # same shift along the 1 mm axis: 2 mm; catches a reversed spacing order
    a, b = _squares(1)
    assert hd95(a, b, spacing=(3.0, 1.0)) == pytest.approx(2.0)
    assert hd95(a, a, spacing=(3.0, 1.0)) == 0.0


def test_hd95_interpolates_percentile_of_pooled_distances():
    # pred = ref plus one voxel left of it; all pred voxels are surface voxels.
    # pred->ref: the extra voxel is 1 mm from ref, the other 4 are on ref -> [1, 0, 0, 0, 0]
    # ref->pred: all 0 (4 values). Pooled 9 values [0 x8, 1]: index 0.95*8 = 7.6 -> 0.6
    ref = np.zeros((5, 5), bool)
    ref[1:3, 2:4] = True
    pred = ref.copy()
    pred[1, 1] = True
    assert hd95(pred, ref) == pytest.approx(0.6)


def test_hd95_empty_masks():
    a, _ = _squares(0)
    empty = np.zeros_like(a)
    assert math.isnan(hd95(empty, empty, spacing=(1.0, 1.0)))
    assert math.isnan(hd95(a, empty, spacing=(1.0, 1.0)))
    assert hd95(empty, a, spacing=(1.0, 1.0), empty_value=373.0) == 373.0
    # both empty stays NaN whatever the penalty: the class is absent, nothing to penalise
    assert math.isnan(hd95(empty, empty, empty_value=373.0))


def test_hd95_spacing_validation():
    a, b = _squares(0)
    with pytest.raises(ValueError, match="one voxel size per array axis"):
        hd95(a, b, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        hd95(a, b, spacing=(0.0, 1.0))


# ------------------------------------------------------------------ ECE

def _two_class_probs(p_class1: list[float]) -> np.ndarray:
    p1 = np.asarray(p_class1, dtype=np.float64)
    return np.stack([1.0 - p1, p1])  # (C=2, N)


def test_ece_two_filled_bins_by_hand():
    # voxels 0-3: p = (0.9, 0.1) -> predict 0, confidence 0.9 (bin (13/15, 14/15]);
    #   labels 0, 0, 0, 1 -> accuracy 3/4, gap |0.75 - 0.9| = 0.15
    # voxels 4-5: p = (0.3, 0.7) -> predict 1, confidence 0.7 (bin (10/15, 11/15]);
    #   labels 1, 0 -> accuracy 1/2, gap |0.5 - 0.7| = 0.2
    # ECE = 4/6 * 0.15 + 2/6 * 0.2 = 0.1 + 0.0667 = 1/6
    probs = _two_class_probs([0.1, 0.1, 0.1, 0.1, 0.7, 0.7])
    labels = np.array([0, 0, 0, 1, 1, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(1 / 6)


def test_ece_mask_restricts_voxels():
    # dropping voxel 3 (the wrong one of the first group): gaps 0.1 (3 voxels) and 0.2 (2 voxels)
    # ECE = (3 * 0.1 + 2 * 0.2) / 5 = 0.14
    probs = _two_class_probs([0.1, 0.1, 0.1, 0.1, 0.7, 0.7])
    labels = np.array([0, 0, 0, 1, 1, 0])
    mask = np.array([1, 1, 1, 0, 1, 1], bool)
    assert expected_calibration_error(probs, labels, mask=mask) == pytest.approx(0.14)
    assert math.isnan(expected_calibration_error(probs, labels, mask=np.zeros(6, bool)))


def test_ece_binning_matters():
    # conf 0.9 x2 both right (gap 0.1), conf 0.7 x2 one right (gap 0.2)
    # 15 bins: (2*0.1 + 2*0.2)/4 = 0.15; one bin: |3/4 - 0.8| = 0.05
    probs = _two_class_probs([0.1, 0.1, 0.7, 0.7])
    labels = np.array([0, 0, 1, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.15)
    assert expected_calibration_error(probs, labels, n_bins=1) == pytest.approx(0.05)


def test_ece_zero_when_perfectly_calibrated():
    # 3 classes, 2x3 image. Four voxels with confidence 0.75, three of them right;
    # two voxels with confidence 1.0, both right.
    probs = np.zeros((3, 2, 3))
    probs[:, 0, 0] = probs[:, 0, 1] = probs[:, 0, 2] = probs[:, 1, 0] = (0.75, 0.25, 0.0)
    probs[:, 1, 1] = probs[:, 1, 2] = (0.0, 0.0, 1.0)
    labels = np.array([[0, 0, 0], [1, 2, 2]])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_validation():
    probs = _two_class_probs([0.1, 0.7, 0.4])
    labels = np.array([0, 1, 0])
    with pytest.raises(ValueError, match="sum to 1"):
        expected_calibration_error(probs * 0.5, labels)
    with pytest.raises(ValueError, match="spatial shape"):
        expected_calibration_error(probs.T, labels)  # channels last
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(probs, labels, n_bins=0)
    with pytest.raises(ValueError, match="integer labels"):
        expected_calibration_error(probs, labels + 0.5)


def test_region_of_interest():
    ref = np.zeros((7, 7), int)
    ref[3, 3] = 2
    pred = np.zeros((7, 7), int)
    assert region_of_interest(ref, pred, 0).sum() == 1
    roi = region_of_interest(ref, pred, 1)
    assert roi.sum() == 9 and roi[2:5, 2:5].all()  # full connectivity: 3x3 box
    assert region_of_interest(ref, pred, 2).sum() == 25
    pred[0, 0] = 1  # corner: its 3x3 box is clipped to 2x2
    assert region_of_interest(ref, pred, 1).sum() == 13
    assert not region_of_interest(np.zeros((3, 3)), np.zeros((3, 3)), 2).any()
    with pytest.raises(ValueError, match="margin_voxels"):
        region_of_interest(ref, pred, -1)


# ------------------------------------------------------------------ uncertainty AUROC

AUC_PRED = np.array([0, 1, 1, 0, 2, 2])
AUC_REF = np.array([0, 0, 1, 0, 1, 2])  # errors at voxels 1 and 4


def test_auroc_perfect_and_reversed():
    unc = np.array([0.1, 0.9, 0.2, 0.1, 0.8, 0.3])
    assert uncertainty_error_auroc(unc, AUC_PRED, AUC_REF) == pytest.approx(1.0)
    assert uncertainty_error_auroc(-unc, AUC_PRED, AUC_REF) == pytest.approx(0.0)


def test_auroc_by_hand_and_ties():
    # errors have 0.5 and 0.9; right voxels 0.1, 0.2, 0.6, 0.3.
    # 0.5 beats 3 of 4, 0.9 beats 4 of 4 -> AUROC = 7/8
    unc = np.array([0.1, 0.5, 0.2, 0.6, 0.9, 0.3])
    assert uncertainty_error_auroc(unc, AUC_PRED, AUC_REF) == pytest.approx(0.875)
    # constant uncertainty: every pair tied -> exactly 0.5
    assert uncertainty_error_auroc(np.ones(6), AUC_PRED, AUC_REF) == pytest.approx(0.5)
    # one error at 0.5 vs right voxels 0.5 (tie, 1/2) and 0.1 (win, 1) -> 1.5 / 2 = 0.75
    assert uncertainty_error_auroc(
        np.array([0.5, 0.5, 0.1]), np.array([1, 0, 0]), np.array([0, 0, 0])
    ) == pytest.approx(0.75)


def test_auroc_undefined_without_both_classes():
    unc = np.arange(6, dtype=float)
    assert math.isnan(uncertainty_error_auroc(unc, AUC_REF, AUC_REF))  # no errors
    assert math.isnan(uncertainty_error_auroc(unc, AUC_REF + 1, AUC_REF))  # all wrong
    # mask leaving only right voxels -> NaN as well
    mask = np.array([1, 0, 1, 1, 0, 1], bool)
    assert math.isnan(uncertainty_error_auroc(unc, AUC_PRED, AUC_REF, mask=mask))


def test_auroc_mask_and_validation():
    # without voxel 3 (unc 0.6) the error at 0.5 beats all 3 right voxels -> 1.0
    unc = np.array([0.1, 0.5, 0.2, 0.6, 0.9, 0.3])
    mask = np.array([1, 1, 1, 0, 1, 1], bool)
    assert uncertainty_error_auroc(unc, AUC_PRED, AUC_REF, mask=mask) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same shape"):
        uncertainty_error_auroc(unc[:5], AUC_PRED, AUC_REF)
    with pytest.raises(ValueError, match="finite"):
        uncertainty_error_auroc(np.full(6, np.nan), AUC_PRED, AUC_REF)


# ------------------------------------------------------------------ multi-rater

# A = rows 0-1, cols 0-1; B = rows 0-1, cols 1-2: intersection 2, union 6,
# IoU(A, B) = 1/3, d(A, B) = 2/3
MA = np.zeros((4, 4), bool)
MA[0:2, 0:2] = True
MB = np.zeros((4, 4), bool)
MB[0:2, 1:3] = True
D_AB = 2 / 3


def test_ged_identical_sets_is_zero():
    # every expectation is over the 4 ordered pairs (0, d, d, 0) -> d/2; 2*d/2 - d/2 - d/2 = 0
    s = np.stack([MA, MB])
    assert generalized_energy_distance(s, s) == pytest.approx(0.0)
    assert generalized_energy_distance(s, s[::-1]) == pytest.approx(0.0)


def test_ged_single_sample_single_rater():
    # 2 d(A, B) - 0 - 0
    assert generalized_energy_distance(MA[None], MB[None]) == pytest.approx(2 * D_AB)


def test_ged_includes_identical_pairs():
    # S = {A}, Y = {A, B}: E[d(S,Y)] = d/2, E[d(S,S')] = 0, E[d(Y,Y')] = (0+d+d+0)/4 = d/2
    # GED = d - 0 - d/2 = d/2 = 1/3 (excluding i == j would give d - d = 0)
    assert generalized_energy_distance(MA[None], np.stack([MA, MB])) == pytest.approx(D_AB / 2)


def test_ged_empty_masks_and_label_maps():
    empty = np.zeros((1, 4, 4), int)
    assert generalized_energy_distance(empty, empty) == 0.0  # IoU(empty, empty) = 1
    assert generalized_energy_distance(empty, MA[None]) == pytest.approx(2.0)
    # label maps: foreground is label > 0, so class 2 counts like class 1
    assert generalized_energy_distance(MA[None] * 2, MB[None].astype(int)) == pytest.approx(
        2 * D_AB
    )
    with pytest.raises(ValueError, match="spatial shape"):
        generalized_energy_distance(MA[None], np.zeros((1, 3, 4)))


def _row_mask(cols: slice) -> np.ndarray:
    m = np.zeros((1, 12), bool)
    m[0, cols] = True
    return m


def test_hm_iou_permuted_raters_is_one():
    s = np.stack([MA, MB, ~MA])
    assert hungarian_matched_iou(s, s[[2, 0, 1]]) == pytest.approx(1.0)


def test_hm_iou_is_one_to_one():
    # samples {A, A}, raters {A, B}: each rater needs its own sample -> (1 + 1/3) / 2
    assert hungarian_matched_iou(np.stack([MA, MA]), np.stack([MA, MB])) == pytest.approx(2 / 3)


def test_hm_iou_tiles_to_lcm():
    # A = cols 0-1 (disjoint from B, C); B = cols 4-7; C = cols 4-5 -> IoU(B, C) = 2/4.
    # S = 2 {A, B} tiled x2 -> {A, B, A, B}; R = 4 {A, A, B, C}.
    # best: A-A, A-A, B-B, B-C -> (1 + 1 + 1 + 0.5) / 4 = 0.875
    a, b, c = _row_mask(slice(0, 2)), _row_mask(slice(4, 8)), _row_mask(slice(4, 6))
    assert hungarian_matched_iou(np.stack([a, b]), np.stack([a, a, b, c])) == pytest.approx(0.875)
    # S = 2, R = 3 -> N = 6; samples {B, C} x3, raters {B, C, A} x2:
    # B-B x2, C-C x2, then A (x2) against the remaining (B, C) -> IoU 0 -> 4/6
    assert hungarian_matched_iou(np.stack([b, c]), np.stack([b, c, a])) == pytest.approx(4 / 6)


def test_diversities_are_the_terms_of_ged():
    # S = {A}, Y = {A, B}: E d(S,Y) = d/2, E d(S,S') = 0, E d(Y,Y') = (0 + d + d + 0) / 4 = d/2
    assert set_diversity(np.stack([MA, MB])) == pytest.approx(D_AB / 2)
    assert set_diversity(MA[None]) == 0.0
    t = energy_distance_terms(MA[None], np.stack([MA, MB]))
    assert t["cross_distance"] == pytest.approx(D_AB / 2)
    assert (t["sample_diversity"], t["rater_diversity"]) == (0.0, pytest.approx(D_AB / 2))
    assert t["GED"] == pytest.approx(2 * t["cross_distance"] - t["sample_diversity"] - t["rater_diversity"])
    assert t["GED"] == generalized_energy_distance(MA[None], np.stack([MA, MB]))
    assert t["diversity_ratio"] == 0.0  # collapsed samples
    s = np.stack([MA, MB])
    assert energy_distance_terms(s, s[::-1])["diversity_ratio"] == pytest.approx(1.0)
    assert math.isnan(energy_distance_terms(s, np.stack([MA, MA]))["diversity_ratio"])  # raters agree
    with pytest.raises(ValueError, match="spatial shape"):
        energy_distance_terms(MA[None], np.zeros((1, 3, 4)))


def test_distinct_pair_diversities_compare_sets_of_different_sizes():
    """Samples and raters drawn from the same distribution of masks spread alike: averaged over
    many draws, the ratio of the distinct-pair diversities is 1 for 16 samples against 4 raters,
    while the all-pairs ratio is (15/16) / (3/4) = 1.25."""
    rng = np.random.default_rng(0)
    masks = np.stack([MA, MB])
    terms = [energy_distance_terms(masks[rng.integers(0, 2, 16)], masks[rng.integers(0, 2, 4)]) for _ in range(3000)]
    mean = {k: np.mean([t[k] for t in terms]) for k in terms[0]}
    assert mean["sample_diversity_distinct_pairs"] / mean["rater_diversity_distinct_pairs"] == pytest.approx(1.0, abs=0.03)
    assert mean["sample_diversity"] / mean["rater_diversity"] == pytest.approx(1.25, abs=0.04)
    t = energy_distance_terms(masks[[0, 1, 0, 1]], masks[[0, 1, 0, 1]])
    assert t["rater_diversity_distinct_pairs"] == pytest.approx(D_AB * 8 / 12)  # 8 of the 12 distinct pairs differ
    assert math.isnan(energy_distance_terms(MA[None], masks)["sample_diversity_distinct_pairs"])  # one sample: no pair


def test_frequency_map_agreement_by_hand():
    # samples {A, A}, raters {A, B}; union = rows 0-1, cols 0-2 (6 voxels)
    # p (samples): col0 1, col1 1, col2 0;  q (raters): col0 0.5, col1 1, col2 0.5
    # L1 = (2 * 0.5 + 0 + 2 * 0.5) / 6 = 1/3
    # soft Dice = 2 * (2 * 0.5 + 2 * 1) / (4 * 1 + (2 * 0.25 + 2 * 1 + 2 * 0.25)) = 6 / 7
    f = frequency_map_agreement(np.stack([MA, MA]), np.stack([MA, MB]))
    assert f["frequency_map_L1"] == pytest.approx(1 / 3)
    assert f["frequency_map_soft_dice"] == pytest.approx(6 / 7)
    same = frequency_map_agreement(np.stack([MA, MB]), np.stack([MB, MA]))
    assert same == {"frequency_map_L1": 0.0, "frequency_map_soft_dice": pytest.approx(1.0)}
    empty = np.zeros((2, 4, 4), int)
    assert frequency_map_agreement(empty, empty[:1]) == {"frequency_map_L1": 0.0, "frequency_map_soft_dice": 1.0}
    # label maps: foreground is label > 0
    assert frequency_map_agreement(MA[None] * 2, MA[None].astype(int))["frequency_map_L1"] == 0.0


def test_sample_dice_scores_by_hand():
    # reference row x 0..3; sample 0 exact (Dice 1), sample 1 shifted to x 2..5 (TP 2, FP 2, FN 2: Dice 0.5)
    ref = np.zeros((2, 8), int)
    ref[0, 0:4] = 1
    s0, s1 = ref.copy(), np.zeros_like(ref)
    s1[0, 2:6] = 1
    s1[1, 7] = 2  # class 2 absent from the reference: a false positive of sample 1 only
    out = sample_dice_scores(np.stack([s0, s1]), ref, [1, 2])
    assert out["1"]["Dice_single_sample"] == pytest.approx(0.75)
    assert out["1"]["Dice_pairwise_samples"] == pytest.approx(0.5)  # s0 vs s1 is the same overlap
    # class 2: sample 0 and reference both empty (NaN, skipped), sample 1 scores 0
    assert out["2"] == {"Dice_single_sample": 0.0, "Dice_pairwise_samples": 0.0}
    # unannotated voxels x 4..5 remove sample 1's false positives: TP 2, FN 2 -> Dice 2/3
    ignore = np.zeros_like(ref, bool)
    ignore[0, 4:6] = True
    assert sample_dice_scores(np.stack([s0, s1]), ref, [1], ignore)["1"]["Dice_single_sample"] == pytest.approx((1 + 2 / 3) / 2)
    one = sample_dice_scores(s0[None], ref, [1, 2])
    assert one["1"]["Dice_single_sample"] == 1.0 and math.isnan(one["1"]["Dice_pairwise_samples"])
    assert math.isnan(one["2"]["Dice_single_sample"])  # class absent everywhere
    with pytest.raises(ValueError, match="shaped like the reference"):
        sample_dice_scores(np.stack([s0, s1]), ref[:, :4], [1])


# ------------------------------------------------------------------ per case and summary

# ref                 pred            (3 = ignore label in the reference)
# 0 1 1 0 2 2         1 1 1 0 0 0
# 0 1 1 0 2 2         0 1 1 0 0 0
# 0 0 0 0 0 0         0 0 0 0 0 0
# 3 3 0 0 0 0         1 1 0 0 0 0
CASE_REF = np.array(
    [[0, 1, 1, 0, 2, 2], [0, 1, 1, 0, 2, 2], [0, 0, 0, 0, 0, 0], [3, 3, 0, 0, 0, 0]]
)
CASE_PRED = np.array(
    [[1, 1, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
)


def test_evaluate_case_with_ignore_label():
    res = evaluate_case(CASE_PRED, CASE_REF, [1, 2], spacing=(1.0, 1.0), ignore_label=3)
    assert set(res) == {"1", "2"}
    c1 = res["1"]
    # class 1: 22 valid voxels; pred 5 valid voxels, ref 4, tp 4, fp 1 ((0,0)), fn 0, tn 17
    assert (c1["TP"], c1["FP"], c1["FN"], c1["TN"]) == (4, 1, 0, 17)
    assert (c1["n_pred"], c1["n_ref"]) == (5, 4)
    assert c1["Dice"] == pytest.approx(8 / 9) and c1["IoU"] == pytest.approx(4 / 5)
    # pred->ref [1, 0, 0, 0, 0], ref->pred [0, 0, 0, 0]; pooled p95 = 0.6 (ignored row gone)
    assert c1["HD95"] == pytest.approx(0.6)
    c2 = res["2"]
    # class 2 missed: tp 0, fp 0, fn 4, tn 18; Dice 0, HD95 undefined -> NaN
    assert (c2["TP"], c2["FP"], c2["FN"], c2["TN"]) == (0, 0, 4, 18)
    assert c2["Dice"] == 0.0 and c2["IoU"] == 0.0 and math.isnan(c2["HD95"])

    no_ignore = evaluate_case(CASE_PRED, CASE_REF, [1, 2], spacing=(1.0, 1.0))
    assert no_ignore["1"]["FP"] == 3 and no_ignore["1"]["Dice"] == pytest.approx(8 / 11)


def test_evaluate_case_validation():
    with pytest.raises(ValueError, match="ignore_label"):
        evaluate_case(CASE_PRED, CASE_REF, [1, 3], spacing=None, ignore_label=3)
    with pytest.raises(ValueError, match="same shape"):
        evaluate_case(CASE_PRED, CASE_REF[:3], [1], spacing=None)
    with pytest.raises(ValueError, match="spacing"):
        evaluate_case(CASE_PRED, CASE_REF, [1], spacing=(1.0, 1.0, 1.0))


def test_aggregate_nanmean_over_cases_plain_mean_over_classes():
    case1 = evaluate_case(CASE_PRED, CASE_REF, [1, 2], spacing=(1.0, 1.0), ignore_label=3)
    # case 2: class 1 perfect single voxel, class 2 absent from both -> NaN
    ref2 = np.zeros((3, 3), int)
    ref2[1, 1] = 1
    case2 = evaluate_case(ref2, ref2, [1, 2], spacing=(1.0, 1.0))
    assert math.isnan(case2["2"]["Dice"])

    mean, fg = aggregate([case1, case2])
    assert mean["1"]["Dice"] == pytest.approx((8 / 9 + 1) / 2)  # 17/18
    assert mean["2"]["Dice"] == 0.0  # nanmean skips the absent case
    assert fg["Dice"] == pytest.approx(17 / 36)
    assert mean["1"]["HD95"] == pytest.approx(0.3)
    assert math.isnan(mean["2"]["HD95"]) and math.isnan(fg["HD95"])  # plain mean, like nnU-Net
    assert mean["1"]["TP"] == pytest.approx((4 + 1) / 2)

    # nnU-Net's metric_per_case entries ({"metrics": ...}) give the same numbers
    wrapped = [{"metrics": case1, "reference_file": "a"}, {"metrics": case2}]
    mean_w, fg_w = aggregate(wrapped)
    assert mean_w["1"]["Dice"] == mean["1"]["Dice"] and fg_w["Dice"] == fg["Dice"]

    summary = summarize(wrapped)
    assert set(summary) == {"metric_per_case", "mean", "foreground_mean"}


def test_aggregate_excludes_background_from_foreground_mean():
    case = evaluate_case(CASE_PRED, CASE_REF, [0, 1], spacing=None, ignore_label=3)
    mean, fg = aggregate([case])
    assert fg["Dice"] == pytest.approx(mean["1"]["Dice"])


def test_aggregate_validation():
    with pytest.raises(ValueError, match="at least one case"):
        aggregate([])
    a = evaluate_case(CASE_PRED, CASE_REF, [1], spacing=None)
    b = evaluate_case(CASE_PRED, CASE_REF, [1, 2], spacing=None)
    with pytest.raises(ValueError, match="classes"):
        aggregate([a, b])
