"""latdiff_analyze_sampler: one row per sampling step, the same numbers as latdiff_predict + latdiff_evaluate.

The toy model is the untrained run of ``test_predict`` with a noise-dependent denoiser (its samples
differ with the noise and from step to step, as a trained model's do); what is checked here is
bookkeeping and exactness, which do not depend on what the model learned. The dataset is 3D with
an oblique direction and two raters per case, so the original-geometry export and the multi-rater
metrics are exercised.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import module_folders
from synthetic import make_synthetic_dataset, oblique_direction
from test_predict import RUN, make_untrained_run

from latdiffunet.diffusion import NoiseSchedule, ddim_sample, inference_timesteps
from latdiffunet.evaluation.cli import main as evaluate_main
from latdiffunet.evaluation.sampler_analysis import (
    average_entries,
    main as analysis_main,
    recommend_samples,
    recommend_steps,
    spread_cases,
)
from latdiffunet.experiment_planning.cli import main as plan_main
from latdiffunet.inference.cli import main as predict_main
from latdiffunet.utilities.checkpoint import load_checkpoint, save_checkpoint

DATASET = "Dataset906_Steps"
SEED = 5
NUM_SAMPLES = 3
PLANS_STEPS = 4  # the tiny preset's sampling steps
VALIDATION_CASES = ("synth_003", "synth_004")  # fold 0 of the 6 cases (splits seed 12345)


# ----------------------------------------------------------------------------- the sampler's callback


def _wobbly_denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A made-up x0-predictor whose output depends non-linearly on x and t."""
    return torch.tanh(1.3 * x + 0.001 * t.view(-1, *([1] * (x.ndim - 1))).float())


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_step_callback_sees_every_step_and_changes_no_sample(eta):
    """Same samples bit for bit with and without ``on_step`` (eta > 0 draws fresh noise each step: a
    callback that consumed the generator would shift every later draw), one call per step with the
    sampler's timesteps, ``x_next`` is the state the next step denoises, and the last call holds the
    returned sample."""
    schedule = NoiseSchedule.cosine(1000)
    shape = (3, 2, 5, 4)
    inputs = []

    def denoise(x, t):
        inputs.append(x.clone())
        return _wobbly_denoiser(x, t)

    def sample(on_step=None):
        inputs.clear()
        return ddim_sample(denoise, schedule, shape, 5, "x0", eta=eta, generator=torch.Generator().manual_seed(11),
                           on_step=on_step)

    calls = []
    plain = sample()
    watched = sample(lambda i, t, x0_hat, x_next: calls.append((i, t, x0_hat.clone(), x_next.clone())))
    assert torch.equal(plain, watched)
    assert [c[0] for c in calls] == list(range(5)) and [c[1] for c in calls] == inference_timesteps(1000, 5)
    for (_, _, _, x_next), next_input in zip(calls[:-1], inputs[1:]):
        assert torch.equal(x_next, next_input)
    assert torch.equal(calls[-1][2], plain) and torch.equal(calls[-1][3], plain)
    assert not torch.equal(calls[0][2], plain)  # the estimates really change from step to step


# ----------------------------------------------------------------------------- the toy model and its analysis


def _respace(dataset, case: str, spacing) -> None:
    """Give one case another voxel size: planned at the others' (median) spacing, it is resampled for
    the network and back for the export, so scoring in the original geometry is really exercised."""
    for path in (dataset / "imagesTr" / f"{case}_0000.nii.gz", dataset / "labelsTr" / f"{case}.nii.gz"):
        image = sitk.ReadImage(str(path))
        image.SetSpacing(spacing)
        sitk.WriteImage(image, str(path), True)


def _add_raters(dataset) -> None:
    """Two raters per case: rater 0 drew the label, rater 1 left the box (class 2) out."""
    folder = dataset / "labelsTr_raters"
    folder.mkdir()
    for label in sorted((dataset / "labelsTr").glob("*.nii.gz")):
        case = label.name[: -len(".nii.gz")]
        image = sitk.ReadImage(str(label))
        arr = sitk.GetArrayFromImage(image)
        for k, rater in enumerate((arr, np.where(arr == 2, 0, arr).astype(arr.dtype))):
            out = sitk.GetImageFromArray(rater)
            out.CopyInformation(image)
            sitk.WriteImage(out, str(folder / f"{case}_rater{k}.nii.gz"), True)
    spec = json.loads((dataset / "dataset.json").read_text())
    spec.update({"num_raters": 2, "rater_labels_folder": "labelsTr_raters"})
    (dataset / "dataset.json").write_text(json.dumps(spec, indent=2))


def _v_prediction_copy(results, configuration: str) -> None:
    """The same untrained weights under the v-prediction trainer's name, sampled as v-prediction."""
    source = results / DATASET / RUN.format(configuration)
    target = results / DATASET / RUN.format(configuration).replace("LatentDiffusionTrainer", "LatentDiffusionTrainer_vpred")
    shutil.copytree(source, target)
    path = target / "fold_0" / "checkpoint_final.pth"
    state = load_checkpoint(path, torch.device("cpu"))
    state["diffusion"] = dict(state["diffusion"]) | {"parameterization": "v"}
    save_checkpoint(state, path)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampler_analysis")
    with module_folders(root) as env:
        dataset = make_synthetic_dataset(root / "raw", name=DATASET, num_cases=6, direction=oblique_direction(30, 20),
                                         origin=(-12.5, 40.25, 7.0), spacing=(0.8, 0.9, 2.5), seed=4)
        for case in VALIDATION_CASES:
            _respace(dataset, case, (0.6, 0.7, 1.9))
        _add_raters(dataset)
        assert plan_main(["-d", "906", "--preset", "tiny", "-np", "1", "-c", "3d"]) == 0
        make_untrained_run(root / "res", root / "pre", DATASET, "3d", noise_dependent=True)
        _v_prediction_copy(root / "res", "3d")
        out = root / "analysis"
        code = analysis_main(["-d", "906", "-c", "3d", "-f", "0", "-p", "latdiffPlans_tiny", "-tr", "LatentDiffusionTrainer",
                              "LatentDiffusionTrainer_vpred", "--steps", "1", "2", "--num-samples", str(NUM_SAMPLES),
                              "--seed", str(SEED), "--device", "cpu", "-o", str(out)])
        assert code == 0
        yield {"root": root, "env": env, "out": out, "result": json.loads((out / "sampler_analysis.json").read_text())}


def test_one_row_per_step_for_each_step_count(analysed):
    result = analysed["result"]
    assert result["steps"] == [1, 2, PLANS_STEPS]  # the plans' count is always added
    assert result["multi_rater"] and result["cases"] == list(VALIDATION_CASES) and result["space"].startswith("original geometry")
    assert list(result["models"]) == ["LatentDiffusionTrainer", "LatentDiffusionTrainer_vpred"]
    assert [m["parameterization"] for m in result["models"].values()] == ["x0", "v"]
    for model in result["models"].values():
        assert sorted(model["by_steps"], key=int) == ["1", "2", str(PLANS_STEPS)]
        for s, entry in model["by_steps"].items():
            rows = entry["rows"]
            assert [r["step"] for r in rows] == list(range(1, int(s) + 1))
            assert [r["t"] for r in rows] == inference_timesteps(1000, int(s))
            for r in rows:
                for key in ("Dice_of_mean", "Dice_single_sample", "Dice_pairwise_samples", "ECE_all", "ECE_roi", "GED", "HM_IoU"):
                    assert isinstance(r[key], float) and not math.isnan(r[key]), (s, r["step"], key)
            assert [r["num_samples"] for r in entry["by_num_samples"]] == [1, 2, NUM_SAMPLES]
            assert entry["by_num_samples"][-1]["Dice_of_mean"] == rows[-1]["Dice_of_mean"]
            assert entry["sampling_seconds_per_case"] > 0 and entry["timed_cases"] == 2
            # the per-step pass and latdiff_predict's plain sampling hold the same last step
            assert entry["last_step_max_difference_to_plain_sampling"] == 0.0
        # the intermediate estimates differ from the final one: rows are not copies of each other
        rows = model["by_steps"][str(PLANS_STEPS)]["rows"]
        assert len({round(r["Dice_single_sample"], 9) for r in rows} | {round(r["GED"], 9) for r in rows}) > 2
        assert model["recommendation"]["steps"] in (1, 2, PLANS_STEPS) and model["recommendation"]["reason"]
        assert model["recommendation"]["samples"]["num_samples"] in (1, 2, NUM_SAMPLES)
    assert result["recommendation"]["trainer"] == "LatentDiffusionTrainer"
    png = analysed["out"] / "sampler_analysis.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not [p.name for p in analysed["out"].iterdir() if p.name.startswith(".")]  # no temporary files left


def test_last_row_equals_latdiff_predict_and_latdiff_evaluate(analysed, tmp_path):
    """The final step at the plans' step count is what a user gets from ``latdiff_predict --seed`` and
    ``latdiff_evaluate`` on the same cases, in the original geometry, to 1e-6."""
    root, result = analysed["root"], analysed["result"]
    with module_folders(root):
        images = tmp_path / "images"
        images.mkdir()
        for case in result["cases"]:
            shutil.copy(root / "raw" / DATASET / "imagesTr" / f"{case}_0000.nii.gz", images)
        pred = tmp_path / "pred"
        assert predict_main(["-i", str(images), "-o", str(pred), "-d", "906", "-c", "3d", "-p", "latdiffPlans_tiny", "-f", "0",
                             "--num_samples", str(NUM_SAMPLES), "--seed", str(SEED), "--save_samples", "--save_probabilities",
                             "--device", "cpu", "-np", "0"]) == 0
        assert evaluate_main(["-ref", str(root / "raw" / DATASET / "labelsTr"), "-pred", str(pred), "-d", "906",
                              "--allow-missing", "-np", "1"]) == 0
    summary = json.loads((pred / "summary.json").read_text())
    assert summary["num_cases"] == 2
    last = result["models"]["LatentDiffusionTrainer"]["by_steps"][str(PLANS_STEPS)]["rows"][-1]
    assert last["Dice_of_mean"] == pytest.approx(summary["foreground_mean"]["Dice"], abs=1e-6)
    for c, m in summary["mean"].items():
        assert last["Dice_of_mean_per_class"][c] == pytest.approx(m["Dice"], abs=1e-6, nan_ok=True)
    samples = summary["samples"]["foreground_mean"]
    assert last["Dice_single_sample"] == pytest.approx(samples["Dice_single_sample"], abs=1e-6)
    assert last["Dice_pairwise_samples"] == pytest.approx(samples["Dice_pairwise_samples"], abs=1e-6)
    for key in ("GED", "HM_IoU", "sample_diversity"):
        assert last[key] == pytest.approx(summary["ambiguity"][key], abs=1e-6), key
    for key in ("ECE_all", "ECE_roi"):  # latdiff_evaluate reads the probabilities as stored, in float16
        assert last[key] == pytest.approx(summary["calibration_mean"][key], abs=2e-3), key
    assert 0 < last["Dice_of_mean"] < 1  # a real comparison, not of two NaNs or two perfect scores


def test_json_is_written_atomically(analysed, tmp_path, monkeypatch):
    """A run killed while writing leaves the previous sampler_analysis.json whole (and no temporary file)."""
    import latdiffunet.utilities.file_io as file_io

    out = tmp_path / "analysis"
    out.mkdir()
    (out / "sampler_analysis.json").write_text('{"previous": true}\n')

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(file_io.os, "replace", killed)
    with module_folders(analysed["root"]):
        code = analysis_main(["-d", "906", "-c", "3d", "-f", "0", "-p", "latdiffPlans_tiny", "--steps", "1", "--num-samples", "2",
                              "--max-cases", "1", "--device", "cpu", "-o", str(out)])
    assert code == 130
    assert json.loads((out / "sampler_analysis.json").read_text()) == {"previous": True}
    assert [p.name for p in out.iterdir()] == ["sampler_analysis.json"]


def test_by_default_the_cases_held_back_for_choices_are_analysed(analysed, tmp_path):
    """A recommendation taken from the analysis is a choice: by default it is made on the cases the
    fold held back from training, not on the validation cases that give the reported number."""
    held_back_case = sorted(p.name.split("_0000")[0] for p in (analysed["root"] / "raw" / DATASET / "imagesTr").iterdir()
                            if not any(p.name.startswith(v) for v in VALIDATION_CASES))[0]
    fold = analysed["root"] / "res" / DATASET / RUN.format("3d") / "fold_0"
    (fold / "training_config.json").write_text(json.dumps({"held_back": {"cases": [held_back_case]}}))
    try:
        with module_folders(analysed["root"]):
            for flag, expected_from, expected in (([], "held_back", [held_back_case]),
                                                  (["--cases", "validation"], "validation", list(VALIDATION_CASES))):
                out = tmp_path / expected_from
                assert analysis_main(["-d", "906", "-c", "3d", "-f", "0", "-p", "latdiffPlans_tiny", "--steps", "1",
                                      "--num-samples", "2", "--device", "cpu", "-o", str(out), *flag]) == 0
                result = json.loads((out / "sampler_analysis.json").read_text())
                assert (result["cases_from"], result["cases"]) == (expected_from, expected)
    finally:
        (fold / "training_config.json").unlink()


def test_untrained_fold_or_trainer_names_the_missing_folder(analysed, capsys):
    with module_folders(analysed["root"]):
        code = analysis_main(["-d", "906", "-c", "3d", "-f", "1", "-p", "latdiffPlans_tiny", "--device", "cpu"])
        err = capsys.readouterr().err
        assert code == 2 and f"{RUN.format('3d')}/fold_1" in err and "latdiff_train" in err and "Traceback" not in err
        code = analysis_main(["-d", "906", "-c", "3d", "-f", "0", "-p", "latdiffPlans_tiny", "-tr", "LatentDiffusionTrainer",
                              "LatentDiffusionTrainer_epspred", "--device", "cpu"])
        err = capsys.readouterr().err
        assert code == 2 and "LatentDiffusionTrainer_epspred__latdiffPlans_tiny__3d" in err


# ----------------------------------------------------------------------------- the recommendation


def test_recommendation_is_the_smallest_step_count_within_both_tolerances():
    rows = {1: {"Dice_of_mean": 0.80, "Dice_single_sample": 0.70}, 2: {"Dice_of_mean": 0.845, "Dice_single_sample": 0.835},
            4: {"Dice_of_mean": 0.850, "Dice_single_sample": 0.825}, 8: {"Dice_of_mean": 0.851, "Dice_single_sample": 0.835},
            16: {"Dice_of_mean": 0.849, "Dice_single_sample": 0.84}}
    # 2 misses the mean (0.845 < 0.851 - 0.005); 4 misses one sample (0.825 < 0.84 - 0.01); 8 meets both
    choice = recommend_steps(rows, plans_steps=4, seconds={4: 0.5, 8: 1.0})
    assert choice["steps"] == 8 and "0.8510" in choice["reason"] and "plans use 4" in choice["reason"]
    rows[4]["Dice_single_sample"] = 0.831
    assert recommend_steps(rows, plans_steps=4)["steps"] == 4
    nothing = {s: {"Dice_of_mean": float("nan"), "Dice_single_sample": float("nan")} for s in (1, 2)}
    assert recommend_steps(nothing, plans_steps=2)["steps"] is None


def test_samples_recommendation_and_case_spread():
    table = [{"num_samples": 1, "Dice_of_mean": 0.80}, {"num_samples": 2, "Dice_of_mean": 0.844},
             {"num_samples": 4, "Dice_of_mean": 0.846}, {"num_samples": 5, "Dice_of_mean": 0.848}]
    assert recommend_samples(table)["num_samples"] == 2
    table[1]["Dice_of_mean"] = 0.842  # below 0.848 - 0.005
    assert recommend_samples(table)["num_samples"] == 4
    assert spread_cases([f"c{i:02d}" for i in range(10)], 3) == ["c00", "c04", "c09"]
    assert spread_cases(["b", "a"], None) == ["a", "b"]


def test_rows_average_cases_like_latdiff_evaluate():
    """Per class over the cases that have it, then over the classes (not per case first): with a class
    absent from a case (NaN) the two orders differ, and latdiff_evaluate's summary takes this one."""
    from latdiffunet.evaluation.metrics import aggregate

    nan = float("nan")
    dice = [{"1": 0.9, "2": nan}, {"1": 0.5, "2": 0.2}, {"1": 0.7, "2": 0.4}]
    entries = [{"Dice": d, "ECE_all": e} for d, e in zip(dice, (0.1, nan, 0.3))]
    row = average_entries(entries, [1, 2])
    mean, foreground_mean = aggregate([{c: {"Dice": v} for c, v in d.items()} for d in dice])
    assert row["Dice_of_mean"] == pytest.approx(foreground_mean["Dice"]) == pytest.approx((0.7 + 0.3) / 2)
    assert row["Dice_of_mean_per_class"] == pytest.approx({c: m["Dice"] for c, m in mean.items()})
    assert row["ECE_all"] == pytest.approx(0.2)
