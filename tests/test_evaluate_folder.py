"""Folder evaluation (``latdiff_evaluate``) on tiny hand-made label files with known answers.

Files are written with SimpleITK directly, not through the library under test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from latdiffunet.errors import UserInputError
from latdiffunet.evaluation.cli import main as cli_main
from latdiffunet.evaluation.evaluate_folder import evaluate_folder

SHAPE = (4, 5, 6)  # (Z, Y, X)
SPACING_XYZ = (0.5, 1.0, 2.0)  # SimpleITK order: x spacing 0.5 mm, z spacing 2 mm


def write(path: Path, arr: np.ndarray, spacing=SPACING_XYZ, dtype=np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(np.asarray(arr).astype(dtype))
    img.SetSpacing(tuple(float(s) for s in spacing))
    sitk.WriteImage(img, str(path), True)
    return path


def toy_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Three cases with hand-computable Dice.

    case_a: class 1 is a row of 4 voxels in ref (x 0..3) and pred (x 2..5): TP 2, FP 2, FN 2,
            Dice 0.5, IoU 1/3; surface distances along x are {0,0,1,2} both ways -> HD95 = 2
            voxels = 1.0 mm (x spacing 0.5). Class 2 is predicted exactly (Dice 1, HD95 0).
    case_b: class 1 exact (Dice 1), class 2 absent from both (NaN).
    case_c: empty in both (all NaN).
    Means over cases (NaN skipped): class 1 (0.5 + 1) / 2 = 0.75, class 2 1.0; foreground 0.875.
    """
    ref_a, pred_a = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    ref_a[0, 0, 0:4] = 1
    pred_a[0, 0, 2:6] = 1
    ref_a[2, 2, 0:2] = 2
    pred_a[2, 2, 0:2] = 2
    ref_b, pred_b = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    ref_b[1, 1:3, 0:3] = 1
    pred_b[1, 1:3, 0:3] = 1
    zeros = np.zeros(SHAPE, np.uint8)
    return {"case_a": (ref_a, pred_a), "case_b": (ref_b, pred_b), "case_c": (zeros, zeros.copy())}


@pytest.fixture
def toy(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    for cid, (r, p) in toy_cases().items():
        write(ref / f"{cid}.nii.gz", r)
        write(pred / f"{cid}.nii.gz", p)
    write(pred / "unreferenced.nii.gz", np.ones(SHAPE))  # a prediction without reference: ignored
    return ref, pred


def test_overlap_metrics_per_case_and_mean(toy):
    ref, pred = toy
    summary = evaluate_folder(ref, pred, None, num_processes=1, progress=False)
    assert summary["labels"] == [1, 2]  # union of reference values, background excluded
    assert summary["num_cases"] == 3
    by_case = {Path(c["reference_file"]).name: c for c in summary["metric_per_case"]}
    assert sorted(by_case) == ["case_a.nii.gz", "case_b.nii.gz", "case_c.nii.gz"]
    a = by_case["case_a.nii.gz"]
    assert a["prediction_file"] == str(pred / "case_a.nii.gz")
    m1 = a["metrics"]["1"]
    assert (m1["TP"], m1["FP"], m1["FN"], m1["n_ref"], m1["n_pred"]) == (2, 2, 2, 4, 4)
    assert m1["Dice"] == pytest.approx(0.5)
    assert m1["IoU"] == pytest.approx(1 / 3)
    assert m1["HD95"] == pytest.approx(1.0)  # 2 voxels along x at 0.5 mm: spacing order is (z, y, x)
    assert a["metrics"]["2"]["Dice"] == pytest.approx(1.0)
    assert a["metrics"]["2"]["HD95"] == pytest.approx(0.0)
    b = by_case["case_b.nii.gz"]["metrics"]
    assert b["1"]["Dice"] == pytest.approx(1.0) and math.isnan(b["2"]["Dice"])
    c = by_case["case_c.nii.gz"]["metrics"]
    assert math.isnan(c["1"]["Dice"]) and math.isnan(c["2"]["Dice"]) and math.isnan(c["1"]["HD95"])
    assert summary["mean"]["1"]["Dice"] == pytest.approx(0.75)  # empty-both case_c excluded
    assert summary["mean"]["2"]["Dice"] == pytest.approx(1.0)
    assert summary["foreground_mean"]["Dice"] == pytest.approx(0.875)
    assert summary["missing_cases"] == []
    assert "calibration_mean" not in summary and "ambiguity" not in summary

    on_disk = json.loads((pred / "summary.json").read_text())
    for key in ("metric_per_case", "mean", "foreground_mean", "labels", "num_cases"):
        assert key in on_disk
    assert on_disk["mean"]["1"]["Dice"] == pytest.approx(0.75)
    assert on_disk["foreground_mean"]["Dice"] == pytest.approx(0.875)
    assert math.isnan(on_disk["metric_per_case"][2]["metrics"]["1"]["Dice"])
    assert not [p for p in pred.iterdir() if p.name.endswith(".tmp")]


def test_explicit_labels_and_process_pool_agree(toy):
    ref, pred = toy
    serial = evaluate_folder(ref, pred, [1], num_processes=1, progress=False)
    parallel = evaluate_folder(ref, pred, [1], num_processes=2, progress=False)
    assert serial["labels"] == [1] and list(serial["mean"]) == ["1"]
    assert parallel["mean"]["1"]["Dice"] == pytest.approx(serial["mean"]["1"]["Dice"]) == pytest.approx(0.75)
    assert [c["reference_file"] for c in parallel["metric_per_case"]] == [c["reference_file"] for c in serial["metric_per_case"]]


def test_ignore_label_voxels_do_not_count(tmp_path):
    ref, pred = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    ref[0, 0, 0:2] = 1
    pred[0, 0, 0:4] = 1  # two extra voxels, but those are unannotated (3) in the reference
    ref[0, 0, 2:4] = 3
    write(tmp_path / "r" / "x.nii.gz", ref)
    write(tmp_path / "p" / "x.nii.gz", pred)
    write(tmp_path / "p" / "x_samples" / "sample_00.nii.gz", pred)  # the same extra voxels: not counted either
    summary = evaluate_folder(tmp_path / "r", tmp_path / "p", None, ignore_label=3, num_processes=1, progress=False)
    assert summary["labels"] == [1]
    m = summary["metric_per_case"][0]["metrics"]["1"]
    assert m["Dice"] == pytest.approx(1.0) and m["FP"] == 0
    assert summary["metric_per_case"][0]["samples"]["1"]["Dice_single_sample"] == pytest.approx(1.0)
    with pytest.raises(UserInputError, match="ignore label"):
        evaluate_folder(tmp_path / "r", tmp_path / "p", [1, 3], ignore_label=3, num_processes=1, progress=False)


def test_calibration_from_probabilities_and_uncertainty_maps(toy):
    ref, pred = toy
    r_b, p_b = toy_cases()["case_b"]
    onehot = (np.arange(3)[:, None, None, None] == p_b[None]).astype(np.float16)  # confident and right
    np.savez_compressed(pred / "case_b_probabilities.npz", probabilities=onehot)
    r_a, p_a = toy_cases()["case_a"]
    error = (r_a != p_a).astype(np.float32)
    write(pred / "case_a_entropy.nii.gz", error, dtype=np.float32)  # points exactly at the errors
    write(pred / "case_a_mutual_information.nii.gz", 1.0 - error, dtype=np.float32)  # exactly wrong
    write(pred / "case_a_agreement.nii.gz", 1.0 - error, dtype=np.float32)  # not a case, not a metric

    summary = evaluate_folder(ref, pred, None, num_processes=1, progress=False)
    assert summary["num_cases"] == 3  # the _entropy etc. files are not cases
    by_case = {c["case_id"]: c for c in summary["metric_per_case"]}
    cal_b = by_case["case_b"]["calibration"]
    assert set(cal_b) == {"ECE_all", "ECE_roi"}
    assert cal_b["ECE_all"] == pytest.approx(0.0, abs=1e-6)
    assert cal_b["ECE_roi"] == pytest.approx(0.0, abs=1e-6)
    cal_a = by_case["case_a"]["calibration"]
    assert cal_a["uncertainty_error_AUROC"] == pytest.approx(1.0)
    assert cal_a["mi_error_AUROC"] == pytest.approx(0.0)
    assert "calibration" not in by_case["case_c"]
    assert summary["calibration_mean"]["ECE_all"] == pytest.approx(0.0, abs=1e-6)
    assert summary["calibration_mean"]["uncertainty_error_AUROC"] == pytest.approx(1.0)
    assert summary["calibration_num_cases"] == {
        "ECE_all": 1, "ECE_roi": 1, "uncertainty_error_AUROC": 1, "entropy_error_AUROC": 1, "mi_error_AUROC": 1}
    assert cal_a["entropy_error_AUROC"] == pytest.approx(1.0)  # without an uncertainty map: the entropy, as for nnU-Net

    # latdiff_predict's uncertainty map, where present, is the one uncertainty_error_AUROC scores
    write(pred / "case_a_uncertainty.nii.gz", 1.0 - error, dtype=np.float32)
    summary = evaluate_folder(ref, pred, None, num_processes=1, progress=False)
    assert summary["num_cases"] == 3  # nor is the _uncertainty file a case
    cal_a = {c["case_id"]: c for c in summary["metric_per_case"]}["case_a"]["calibration"]
    assert cal_a["uncertainty_error_AUROC"] == pytest.approx(0.0)
    assert cal_a["entropy_error_AUROC"] == pytest.approx(1.0)
    (pred / "case_a_uncertainty.nii.gz").unlink()

    # an over-confident wrong voxel shows in ECE: case_a with one-hot probabilities of its prediction
    onehot_a = (np.arange(3)[:, None, None, None] == p_a[None]).astype(np.float32)
    np.savez_compressed(pred / "case_a_probabilities.npz", probabilities=onehot_a)
    summary = evaluate_folder(ref, pred, None, num_processes=1, progress=False, roi_margin=0)
    cal_a = {c["case_id"]: c for c in summary["metric_per_case"]}["case_a"]["calibration"]
    n_wrong = int(error.sum())
    assert n_wrong == 4
    assert cal_a["ECE_all"] == pytest.approx(n_wrong / error.size)
    # margin 0: the ROI is the union of foregrounds, row x 0..5 plus the 2 class-2 voxels = 8 voxels
    assert cal_a["ECE_roi"] == pytest.approx(4 / 8)
    assert summary["calibration_mean"]["ECE_all"] == pytest.approx(n_wrong / error.size / 2)

    np.savez_compressed(pred / "case_a_probabilities.npz", probabilities=onehot_a[:, :2])
    with pytest.raises(UserInputError, match="case_a_probabilities.npz"):
        evaluate_folder(ref, pred, None, num_processes=1, progress=False)


def _multi_rater_toy(tmp_path: Path, samples: tuple[str, ...] = ("r1", "r0")) -> tuple[Path, Path, Path]:
    """One lesion drawn by two raters, and diffusion samples that are copies of the named raters.

    r0 is 2x3x3 = 18 voxels, r1 2x3x4 = 24 voxels, overlapping in 2x2x2 = 8: union 34,
    IoU(r0, r1) = 8/34, d(r0, r1) = 1 - 8/34 = 13/17. The reference is r0 | r1 (34 voxels).
    """
    ref, pred, raters = tmp_path / "ref", tmp_path / "pred", tmp_path / "raters"
    r0, r1 = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    r0[1:3, 1:4, 1:4] = 1
    r1[1:3, 2:5, 2:6] = 1
    write(ref / "lesion.nii.gz", r0 | r1)
    write(pred / "lesion.nii.gz", r0)
    write(raters / "lesion_rater0.nii.gz", r0)
    write(raters / "lesion_rater1.nii.gz", r1)
    for i, name in enumerate(samples):
        write(pred / "lesion_samples" / f"sample_{i:02d}.nii.gz", {"r0": r0, "r1": r1}[name])
    return ref, pred, raters


D_R0_R1 = 13 / 17


def test_multi_rater_samples_identical_to_raters(tmp_path):
    ref, pred, raters = _multi_rater_toy(tmp_path)
    summary = evaluate_folder(ref, pred, [1], raters_folder=raters, num_processes=1, progress=False)
    amb = summary["metric_per_case"][0]["ambiguity"]
    assert amb["GED"] == pytest.approx(0.0, abs=1e-12)
    assert amb["HM_IoU"] == pytest.approx(1.0)
    assert (amb["num_samples"], amb["num_raters"]) == (2, 2)
    # ordered pairs (0, d, d, 0) in both sets
    assert amb["sample_diversity"] == pytest.approx(D_R0_R1 / 2) and amb["rater_diversity"] == pytest.approx(D_R0_R1 / 2)
    assert amb["diversity_ratio"] == pytest.approx(1.0)
    assert amb["frequency_map_L1"] == 0.0 and amb["frequency_map_soft_dice"] == pytest.approx(1.0)
    assert summary["ambiguity"] == {
        "GED": pytest.approx(0.0, abs=1e-12), "HM_IoU": pytest.approx(1.0),
        "sample_diversity": pytest.approx(D_R0_R1 / 2), "rater_diversity": pytest.approx(D_R0_R1 / 2),
        "diversity_ratio": pytest.approx(1.0), "diversity_ratio_of_means": pytest.approx(1.0),
        "frequency_map_L1": 0.0, "frequency_map_soft_dice": pytest.approx(1.0),
        "sample_diversity_distinct_pairs": pytest.approx(D_R0_R1), "rater_diversity_distinct_pairs": pytest.approx(D_R0_R1),
        "diversity_ratio_distinct_pairs": pytest.approx(1.0),
    }
    assert set(summary["ambiguity_num_cases"].values()) == {1}
    # single-sample Dice against the reference r0 | r1 (34 voxels): r1 2*24/58, r0 2*18/52; the pair 2*8/42
    s = summary["metric_per_case"][0]["samples"]
    assert s["num_samples"] == 2
    assert s["1"]["Dice_single_sample"] == pytest.approx((48 / 58 + 36 / 52) / 2)
    assert s["1"]["Dice_pairwise_samples"] == pytest.approx(16 / 42)
    # without raters there is nothing to compare the samples with, but the sample Dice remains
    no_raters = evaluate_folder(ref, pred, [1], num_processes=1, progress=False)
    assert "ambiguity" not in no_raters and "ambiguity" not in no_raters["metric_per_case"][0]
    assert no_raters["samples"]["mean"]["1"]["Dice_single_sample"] == pytest.approx((48 / 58 + 36 / 52) / 2)


def test_collapsed_samples_have_no_diversity_and_positive_ged(tmp_path):
    ref, pred, raters = _multi_rater_toy(tmp_path, samples=("r0", "r0", "r0"))
    summary = evaluate_folder(ref, pred, [1], raters_folder=raters, num_processes=1, progress=False)
    amb = summary["metric_per_case"][0]["ambiguity"]
    d = D_R0_R1
    # E d(S,Y) = (0 + d) / 2, E d(S,S') = 0, E d(Y,Y') = d/2 -> GED = d - 0 - d/2 = d/2 = 13/34
    assert amb["sample_diversity"] == 0.0 and amb["rater_diversity"] == pytest.approx(d / 2)
    assert amb["GED"] == pytest.approx(13 / 34)
    assert amb["diversity_ratio"] == 0.0
    # tiled to lcm(3, 2) = 6: three r0-r0 matches (IoU 1), three r0-r1 (IoU 8/34)
    assert amb["HM_IoU"] == pytest.approx((1 + 8 / 34) / 2)
    # p = 1 on r0; q = 1 on the 8 shared voxels, 0.5 on r0 only (10) and r1 only (16); union 34
    # L1 = 0.5 * 26 / 34; soft Dice = 2 (8 + 0.5 * 10) / (18 + (8 + 0.25 * 26)) = 26 / 32.5
    assert amb["frequency_map_L1"] == pytest.approx(13 / 34)
    assert amb["frequency_map_soft_dice"] == pytest.approx(0.8)
    assert summary["ambiguity"]["diversity_ratio_of_means"] == 0.0
    # identical samples: pairwise Dice 1
    assert summary["samples"]["foreground_mean"]["Dice_pairwise_samples"] == pytest.approx(1.0)


def test_single_sample_dice_vs_dice_of_the_mean(toy, capsys):
    """case_b gets two samples: one exact, one with class 1 shifted and class 2 missed.

    case_b's class 1 is z 1, y 1..2, x 0..2 (6 voxels). Sample 1 shifts it to x 1..3: TP 4,
    FP 2, FN 2, Dice 8/12 = 2/3; sample 0 is exact (Dice 1) -> single-sample Dice 5/6, and the
    pair is the same overlap -> pairwise 2/3. Class 2 is added at z 3, y 4, x 5 to the
    reference, the mean prediction and sample 0, but not to sample 1: Dice 1 and 0 -> 0.5,
    pairwise 0 (one empty). Foreground: single (5/6 + 1/2) / 2 = 2/3, pairwise (2/3 + 0) / 2 = 1/3.
    """
    ref, pred = toy
    r_b, _ = toy_cases()["case_b"]
    r_b = r_b.copy()
    r_b[3, 4, 5] = 2
    write(ref / "case_b.nii.gz", r_b)
    write(pred / "case_b.nii.gz", r_b)
    shifted = np.zeros(SHAPE, np.uint8)
    shifted[1, 1:3, 1:4] = 1
    write(pred / "case_b_samples" / "sample_00.nii.gz", r_b)
    write(pred / "case_b_samples" / "sample_01.nii.gz", shifted)
    write(pred / "case_b_samples" / ".sample_02.nii.gz.tmp.nii.gz", shifted)  # an unfinished write: not a sample

    summary = evaluate_folder(ref, pred, [1, 2], num_processes=1, progress=False)
    by_case = {c["case_id"]: c for c in summary["metric_per_case"]}
    s = by_case["case_b"]["samples"]
    assert s["num_samples"] == 2
    assert s["1"] == {"Dice_single_sample": pytest.approx(5 / 6), "Dice_pairwise_samples": pytest.approx(2 / 3)}
    assert s["2"] == {"Dice_single_sample": pytest.approx(0.5), "Dice_pairwise_samples": 0.0}
    assert s["foreground_mean"] == {"Dice_single_sample": pytest.approx(2 / 3), "Dice_pairwise_samples": pytest.approx(1 / 3)}
    assert "samples" not in by_case["case_a"] and "ambiguity" not in by_case["case_b"]
    assert summary["samples_num_cases"] == 1
    assert summary["samples"]["mean"]["1"]["Dice_single_sample"] == pytest.approx(5 / 6)
    assert summary["samples"]["foreground_mean"] == {
        "Dice_single_sample": pytest.approx(2 / 3), "Dice_pairwise_samples": pytest.approx(1 / 3),
    }
    # nnU-Net's keys still score the mean prediction over all cases: class 1 (0.5 + 1) / 2, class 2 (1 + 1) / 2
    assert summary["mean"]["1"]["Dice"] == pytest.approx(0.75) and summary["foreground_mean"]["Dice"] == pytest.approx(0.875)
    on_disk = json.loads((pred / "summary.json").read_text())
    assert on_disk["samples"]["foreground_mean"]["Dice_single_sample"] == pytest.approx(2 / 3)

    assert cli_main(["-ref", str(ref), "-pred", str(pred), "-np", "1"]) == 0
    assert "Dice of one sample 0.6667 vs Dice of the mean 0.8750" in capsys.readouterr().out


def test_cli_with_dataset_json_raters(tmp_path, capsys):
    ref, pred, raters = _multi_rater_toy(tmp_path)
    dataset = tmp_path / "Dataset950_Toy"
    dataset.mkdir()
    raters.rename(dataset / "labelsTr_raters")
    (dataset / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1}, "numTraining": 1,
        "file_ending": ".nii.gz", "num_raters": 2, "rater_labels_folder": "labelsTr_raters",
    }))
    assert cli_main(["-ref", str(ref), "-pred", str(pred), "-d", str(dataset), "-np", "1"]) == 0
    out = capsys.readouterr().out
    assert "foreground mean Dice" in out and "1: " in out
    assert "ambiguity: GED 0.0000, HM_IoU 1.0000, sample_diversity 0.3824, rater_diversity 0.3824" in out
    assert "Dice of one sample" in out
    summary = json.loads((pred / "summary.json").read_text())
    assert summary["labels"] == [1]
    assert summary["ambiguity"]["HM_IoU"] == pytest.approx(1.0)
    # dataset.json promises two raters per case: a missing one is an error naming the file
    (dataset / "labelsTr_raters" / "lesion_rater1.nii.gz").unlink()
    assert cli_main(["-ref", str(ref), "-pred", str(pred), "-d", str(dataset), "-np", "1"]) == 2
    assert "lesion_rater1.nii.gz" in capsys.readouterr().err


def test_missing_prediction(toy, capsys):
    ref, pred = toy
    (pred / "case_b.nii.gz").unlink()
    with pytest.raises(UserInputError, match="case_b.nii.gz") as info:
        evaluate_folder(ref, pred, None, num_processes=1, progress=False)
    assert "--allow-missing" in str(info.value)
    summary = evaluate_folder(ref, pred, None, num_processes=1, progress=False, allow_missing=True)
    assert summary["missing_cases"] == ["case_b"] and summary["num_cases"] == 2
    assert summary["mean"]["1"]["Dice"] == pytest.approx(0.5)

    assert cli_main(["-ref", str(ref), "-pred", str(pred)]) == 2
    captured = capsys.readouterr()
    assert "error:" in captured.err and "case_b.nii.gz" in captured.err
    assert "Traceback" not in captured.err + captured.out


def test_console_script_exit_code_without_traceback(toy):
    ref, pred = toy
    (pred / "case_c.nii.gz").unlink()
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    env.pop("LATDIFF_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "latdiffunet.evaluation.cli", "-ref", str(ref), "-pred", str(pred), "-np", "1"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert proc.returncode == 2
    assert "case_c.nii.gz" in proc.stderr and "Traceback" not in proc.stderr


def test_geometry_and_shape_mismatch(tmp_path):
    ref_arr = np.zeros(SHAPE, np.uint8)
    ref_arr[1, 1, 1] = 1
    write(tmp_path / "r" / "x.nii.gz", ref_arr)
    write(tmp_path / "p" / "x.nii.gz", ref_arr, spacing=(1.0, 1.0, 2.0))
    with pytest.raises(UserInputError) as info:
        evaluate_folder(tmp_path / "r", tmp_path / "p", [1], num_processes=1, progress=False)
    assert str(tmp_path / "r" / "x.nii.gz") in str(info.value)
    assert str(tmp_path / "p" / "x.nii.gz") in str(info.value) and "spacing" in str(info.value)

    write(tmp_path / "p" / "x.nii.gz", np.zeros((4, 5, 7)))
    with pytest.raises(UserInputError, match="shape") as info:
        evaluate_folder(tmp_path / "r", tmp_path / "p", [1], num_processes=1, progress=False)
    assert str(tmp_path / "r" / "x.nii.gz") in str(info.value) and str(tmp_path / "p" / "x.nii.gz") in str(info.value)

    # and through a worker process: the error still names both files
    write(tmp_path / "r" / "y.nii.gz", ref_arr)
    write(tmp_path / "p" / "y.nii.gz", ref_arr)
    with pytest.raises(UserInputError, match="x.nii.gz"):
        evaluate_folder(tmp_path / "r", tmp_path / "p", [1], num_processes=2, progress=False)


def test_2d_png_hd95_in_plane(tmp_path):
    ref, pred = np.zeros((10, 11), np.uint8), np.zeros((10, 11), np.uint8)
    ref[1:9, 1:9] = 1  # an 8x8 square
    pred[1:9, 1:9] = 1
    pred[2:8, 2:8] = 0  # its one-pixel outline: the same surface, so HD95 is 0 in-plane
    write(tmp_path / "r" / "img.png", ref, spacing=(1.0, 1.0))
    write(tmp_path / "p" / "img.png", pred, spacing=(1.0, 1.0))
    summary = evaluate_folder(tmp_path / "r", tmp_path / "p", [1], num_processes=1, progress=False)
    m = summary["metric_per_case"][0]["metrics"]["1"]
    assert summary["file_ending"] == ".png"
    assert m["Dice"] == pytest.approx(2 * 28 / (28 + 64))
    # treated as a one-slice volume every pixel would be surface and the interior 3 px away
    assert m["HD95"] == pytest.approx(0.0)
