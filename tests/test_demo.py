"""The README's main job, end to end on the real Hippocampus copy, with a small budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared_dataset

pytestmark = [pytest.mark.slow, pytest.mark.realdata]


def test_demo_runs_whole_pipeline(tmp_path, monkeypatch, capsys):
    source = shared_dataset("Hippocampus")
    for key, var in (("raw", "LATDIFF_RAW"), ("pre", "LATDIFF_PREPROCESSED"), ("res", "LATDIFF_RESULTS")):
        monkeypatch.setenv(var, str(tmp_path / key))
    from latdiffunet.demo import main

    assert main(["--source", str(source), "--budget-minutes", "1"]) == 0
    out = capsys.readouterr().out
    assert "mean foreground Dice" in out and "uncertainty maps" in out
    fold = tmp_path / "res" / "Dataset004_Hippocampus" / "LatentDiffusionTrainer__latdiffPlans_tiny__2d" / "fold_0"
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert summary["num_cases"] == 44 and summary["space"].startswith("original geometry")
    # Labelling everything hippocampus head (or body) scores a mean foreground Dice of about 0.03
    # on these crops, an empty or constant (untrained) prediction 0; the 2 + 2 epochs this budget
    # gave on an idle 2-core machine reached 0.54; the floor leaves room for a loaded CI machine
    # whose budget buys only 1 + 1 epochs.
    assert summary["foreground_mean"]["Dice"] > 0.1, summary["mean"]
    images = tmp_path / "raw" / "Dataset004_Hippocampus" / "imagesTr"
    non_empty = 0
    for entry in summary["metric_per_case"]:  # every case: a segmentation and 3 maps on the image's grid
        case, image = entry["case_id"], sitk.ReadImage(str(images / f"{entry['case_id']}_0000.nii.gz"))
        for suffix in (".nii.gz", "_entropy.nii.gz", "_mutual_information.nii.gz", "_agreement.nii.gz"):
            out = sitk.ReadImage(str(fold / "validation" / f"{case}{suffix}"))
            assert out.GetSize() == image.GetSize(), (case, suffix)
            np.testing.assert_allclose(out.GetSpacing() + out.GetOrigin() + out.GetDirection(),
                                       image.GetSpacing() + image.GetOrigin() + image.GetDirection(), atol=1e-5)
        labels = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(fold / "validation" / f"{case}.nii.gz")))))
        assert labels <= {0, 1, 2}, (case, labels)
        non_empty += len(labels) > 1
    assert non_empty >= 0.8 * summary["num_cases"], f"only {non_empty} cases have any foreground"
    assert (fold / "progress.png").is_file()
