"""Cross-validation summary, latdiff_ensemble and latdiff_find_best_configuration on fake fold results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from latdiffunet.errors import UserInputError
from latdiffunet.evaluation.cross_validation import accumulate_cross_validation, main as crossval_main
from latdiffunet.evaluation.find_best_configuration import main as find_best_main

DATASET = "Dataset905_Fake"
TRAINER, PLANS = "LatentDiffusionTrainer", "latdiffPlans"
DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 6,
                "file_ending": ".nii.gz"}


def _case(case_id: str, dice_a: float, dice_b: float) -> dict:
    metrics = {c: {"Dice": d, "IoU": d / (2 - d), "HD95": 1.0} for c, d in (("1", dice_a), ("2", dice_b))}
    return {"case_id": case_id, "metrics": metrics, "samples": {c: {"Dice_single_sample": d - 0.1, "Dice_pairwise_samples": 0.9}
                                                              for c, d in (("1", dice_a), ("2", dice_b))}}


def _fold_summary(cases: list[dict], selection: str = "chosen on held-back cases") -> dict:
    from latdiffunet.evaluation.metrics import summarize

    return summarize(cases) | {"labels": [1, 2], "checkpoint": "checkpoint_best.pth", "checkpoint_selection": selection,
                               "selected_on_held_back": True}


def _write_run(results: Path, configuration: str, folds: dict[int, list[dict]]) -> Path:
    run = results / DATASET / f"{TRAINER}__{PLANS}__{configuration}"
    for fold, cases in folds.items():
        (run / f"fold_{fold}" / "validation").mkdir(parents=True)
        (run / f"fold_{fold}" / "validation" / "summary.json").write_text(json.dumps(_fold_summary(cases)))
    (run / "dataset.json").write_text(json.dumps(DATASET_JSON))
    return run


def test_cross_validation_pools_the_cases_of_all_folds(latdiff_folders, capsys):
    """Fold 0: two cases, fold 1: one. The pooled mean is over the three cases (not the mean of
    the fold means), every case keeps its fold, and the per-fold numbers are kept."""
    run = _write_run(latdiff_folders["results"], "2d", {
        0: [_case("a", 0.9, 0.7), _case("b", 0.7, 0.5)], 1: [_case("c", 0.2, 0.3)]})
    summary, target = accumulate_cross_validation(run, [0, 1])
    assert target == run / "crossval_results_folds_0_1" / "summary.json" and json.loads(target.read_text()) == summary
    assert summary["num_cases"] == 3 and [c["fold"] for c in summary["metric_per_case"]] == [0, 0, 1]
    assert summary["mean"]["1"]["Dice"] == pytest.approx((0.9 + 0.7 + 0.2) / 3)
    assert summary["mean"]["2"]["Dice"] == pytest.approx((0.7 + 0.5 + 0.3) / 3)
    assert summary["foreground_mean"]["Dice"] == pytest.approx(((0.9 + 0.7 + 0.2) / 3 + (0.7 + 0.5 + 0.3) / 3) / 2)
    assert summary["folds"]["0"]["foreground_mean_Dice"] == pytest.approx(0.7)
    assert summary["folds"]["1"]["foreground_mean_Dice"] == pytest.approx(0.25)
    assert summary["foreground_dice_over_folds"] == pytest.approx({"mean": 0.475, "std": 0.225})
    assert summary["folds"]["0"]["checkpoint_selection"] == "chosen on held-back cases"
    assert summary["samples"]["mean"]["1"]["Dice_single_sample"] == pytest.approx((0.8 + 0.6 + 0.1) / 3)
    assert crossval_main(["-d", "905", "-c", "2d", "-f", "0", "1"]) == 0
    assert "3 cases: mean foreground Dice 0.5500" in capsys.readouterr().out


def test_missing_fold_and_shared_cases_are_user_errors(latdiff_folders):
    run = _write_run(latdiff_folders["results"], "3d", {0: [_case("a", 1, 1)], 1: [_case("a", 1, 1)]})
    with pytest.raises(UserInputError) as missing:
        accumulate_cross_validation(run, [0, 1, 2])
    assert "fold_2" in str(missing.value) and f"latdiff_train {DATASET} 2 -c 3d -p {PLANS} -tr {TRAINER}" in str(missing.value)
    with pytest.raises(UserInputError, match="case a is in the validation of folds 0 and 1"):
        accumulate_cross_validation(run, [0, 1])


# ----------------------------------------------------------------------------- ensembles
SHAPE = (2, 4, 4)


def _write_nifti(array: np.ndarray, path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8)), str(path))


def _reference(case_index: int) -> np.ndarray:
    ref = np.zeros(SHAPE, np.uint8)
    ref[:, :2, :2] = 1
    ref[:, 2:, 2:] = 2
    ref[0, 0, 3] = case_index % 3  # cases differ a little
    return ref


def _probabilities(ref: np.ndarray, trusted: np.ndarray) -> np.ndarray:
    """Confident (0.8) and right where ``trusted``, slightly (0.4 vs 0.35) wrong elsewhere: two
    models trusted on complementary halves are each wrong on half, their mean is right everywhere."""
    prob = np.zeros((3, *SHAPE), np.float32)
    wrong = (ref + 1) % 3
    for label in range(3):
        prob[label] = np.where(trusted, np.where(ref == label, 0.8, 0.1), np.where(wrong == label, 0.4,
                               np.where(ref == label, 0.35, 0.25)))
    return prob


def _fake_validation(run: Path, fold: int, cases: list[int], half: int) -> None:
    folder = run / f"fold_{fold}" / "validation"
    trusted = np.zeros(SHAPE, bool)
    trusted[:, :, :2] = True
    trusted = trusted if half == 0 else ~trusted
    for i in cases:
        ref = _reference(i)
        prob = _probabilities(ref, trusted)
        _write_nifti(prob.argmax(0), folder / f"case{i}.nii.gz")
        np.savez_compressed(folder / f"case{i}_probabilities.npz", probabilities=prob.astype(np.float16))
    (folder / "prediction_info.json").write_text(json.dumps({"run_folder": str(run)}))


@pytest.fixture
def two_configurations(latdiff_folders):
    """2d and 3d, folds 0-1 with 2 cases each, on fake raw labels; 2d scores higher alone, their
    probabilities' mean is right everywhere."""
    raw = latdiff_folders["raw"] / DATASET
    (raw / "labelsTr").mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps(DATASET_JSON))
    folds = {0: [0, 1], 1: [2, 3]}
    for i in range(4):
        _write_nifti(_reference(i), raw / "labelsTr" / f"case{i}.nii.gz")
    runs = {}
    for configuration, dice, half in (("2d", 0.6, 0), ("3d", 0.5, 1)):
        runs[configuration] = _write_run(latdiff_folders["results"], configuration,
                                         {f: [_case(f"case{i}", dice, dice) for i in cases] for f, cases in folds.items()})
        for fold, cases in folds.items():
            _fake_validation(runs[configuration], fold, cases, half)
    return latdiff_folders["results"] / DATASET, runs


def test_find_best_configuration_picks_the_best_single_configuration_and_writes_the_command(two_configurations):
    results, runs = two_configurations
    assert find_best_main(["-d", "905", "-c", "2d", "3d", "-f", "0", "1", "--disable_ensembling", "-np", "1"]) == 0
    info = json.loads((results / "inference_information.json").read_text())
    assert info["best_model_or_ensemble"]["identifier"] == f"{TRAINER}__{PLANS}__2d"
    assert info["all_results"] == pytest.approx({f"{TRAINER}__{PLANS}__2d": 0.6, f"{TRAINER}__{PLANS}__3d": 0.5})
    text = (results / "inference_instructions.txt").read_text()
    assert (f"latdiff_predict -d {DATASET} -i INPUT_FOLDER -o OUTPUT_FOLDER -c 2d -p {PLANS} -tr {TRAINER} -f 0 1"
            in text.splitlines())
    assert "latdiff_ensemble" not in text and "slightly optimistic" in info["note"]
    # fold 'all' calibrates no temperature: its command takes the median of the folds' choices
    for fold, scale in ((0, 0.25), (1, 0.75)):
        (runs["2d"] / f"fold_{fold}" / "sampling_calibration.json").write_text(json.dumps({"chosen_noise_scale": scale}))
    assert find_best_main(["-d", "905", "-c", "2d", "3d", "-f", "0", "1", "--disable_ensembling", "-np", "1"]) == 0
    assert (f"latdiff_predict -d {DATASET} -i INPUT_FOLDER -o OUTPUT_FOLDER -c 2d -p {PLANS} -tr {TRAINER} -f all --noise_scale 0.5"
            in (results / "inference_instructions.txt").read_text().splitlines())


def test_the_ensemble_wins_when_its_averaged_probabilities_score_best(two_configurations):
    results, runs = two_configurations
    assert find_best_main(["-d", "905", "-c", "2d", "3d", "-f", "0", "1", "-np", "1"]) == 0
    info = json.loads((results / "inference_information.json").read_text())
    best = info["best_model_or_ensemble"]
    assert best["identifier"] == f"ensemble___{TRAINER}__{PLANS}__2d___{TRAINER}__{PLANS}__3d___0_1"
    assert best["result_on_crossval"] == pytest.approx(1.0)
    assert [m["configuration"] for m in best["selected_model_or_models"]] == ["2d", "3d"]
    ensembled = sitk.GetArrayFromImage(sitk.ReadImage(str(results / "ensembles" / best["identifier"] / "case3.nii.gz")))
    np.testing.assert_array_equal(ensembled, _reference(3))
    assert info["commands"] == [
        f"latdiff_predict -d {DATASET} -i INPUT_FOLDER -o OUTPUT_FOLDER_MODEL_1 -c 2d -p {PLANS} -tr {TRAINER} -f 0 1 --save_probabilities",
        f"latdiff_predict -d {DATASET} -i INPUT_FOLDER -o OUTPUT_FOLDER_MODEL_2 -c 3d -p {PLANS} -tr {TRAINER} -f 0 1 --save_probabilities",
        "latdiff_ensemble -i OUTPUT_FOLDER_MODEL_1 OUTPUT_FOLDER_MODEL_2 -o OUTPUT_FOLDER",
    ]


def test_latdiff_ensemble_averages_prediction_folders(two_configurations, tmp_path):
    from latdiffunet.inference.ensemble import main as ensemble_main

    _, runs = two_configurations
    folders = [str(runs[c] / "fold_1" / "validation") for c in ("2d", "3d")]
    assert ensemble_main(["-i", *folders, "-o", str(tmp_path / "out"), "--save_probabilities", "-np", "1"]) == 0
    out = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "case2.nii.gz")))
    np.testing.assert_array_equal(out, _reference(2))
    assert (tmp_path / "out" / "case2_entropy.nii.gz").is_file()
    mean = np.load(tmp_path / "out" / "case2_probabilities.npz")["probabilities"].astype(np.float32)
    assert np.allclose(mean.sum(0), 1, atol=1e-2)
    (runs["3d"] / "fold_1" / "validation" / "case2_probabilities.npz").unlink()
    assert ensemble_main(["-i", *folders, "-o", str(tmp_path / "out2"), "-np", "1"]) == 2  # names the missing file


def test_find_best_configuration_names_the_untrained_fold_and_its_command(two_configurations, capsys):
    results, runs = two_configurations
    (runs["3d"] / "fold_1" / "validation" / "summary.json").unlink()
    assert find_best_main(["-d", "905", "-c", "2d", "3d", "-f", "0", "1"]) == 2
    err = capsys.readouterr().err
    assert "fold_1" in err and f"latdiff_train {DATASET} 1 -c 3d -p {PLANS} -tr {TRAINER}" in err
    assert not (results / "inference_information.json").exists()
    assert not (runs["2d"] / "crossval_results_folds_0_1").exists()  # checked before any work started


def test_a_fold_validated_before_held_back_selection_is_not_called_untouched(two_configurations):
    """The note may say the folds' numbers were not chosen on their cases only when every fold's
    summary says so in its flag; legacy wording that merely mentions held-back selection must not count."""
    results, runs = two_configurations
    assert find_best_main(["-d", "905", "-c", "2d", "3d", "-f", "0", "1", "--disable_ensembling", "-np", "1"]) == 0
    assert "chosen on held-back training cases" in json.loads((results / "inference_information.json").read_text())["note"]
    legacy = runs["3d"] / "fold_1" / "validation" / "summary.json"
    summary = json.loads(legacy.read_text())
    del summary["selected_on_held_back"]
    summary["checkpoint_selection"] = "validated before held-back selection existed"
    legacy.write_text(json.dumps(summary))
    for crossval in results.rglob("crossval_results_folds_*"):
        import shutil
        shutil.rmtree(crossval)
    assert find_best_main(["-d", "905", "-c", "2d", "3d", "-f", "0", "1", "--disable_ensembling", "-np", "1"]) == 0
    assert "chosen on held-back training cases" not in json.loads((results / "inference_information.json").read_text())["note"]
