"""The README's main job, end to end on the real Hippocampus copy, with a small budget."""

from __future__ import annotations

import json

import pytest

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
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0
    case = summary["metric_per_case"][0]["case_id"]
    for suffix in (".nii.gz", "_entropy.nii.gz", "_mutual_information.nii.gz", "_agreement.nii.gz"):
        assert (fold / "validation" / f"{case}{suffix}").is_file()
    assert (fold / "progress.png").is_file()
