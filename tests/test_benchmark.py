"""latdiff_benchmark's report and its message when nnU-Net is missing (no training here)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from latdiffunet.evaluation.benchmark import main, write_report


def _row(name, dice):
    per_class = {"1": {"Dice": dice, "IoU": dice - 0.1, "HD95": 2.0}, "2": {"Dice": dice - 0.05, "IoU": 0.6, "HD95": 3.0}}
    return {"method": name, "mean_per_class": per_class, "foreground_mean": {"Dice": dice - 0.025, "IoU": 0.65, "HD95": 2.5},
            "calibration_mean": {"ECE_all": 0.01, "ECE_roi": 0.05, "uncertainty_error_AUROC": 0.9},
            "training_seconds": 1200.0, "inference_seconds_per_case": 1.5, "peak_rss_mib": 900.0}


def test_report_files(tmp_path):
    report = {"dataset": "Dataset004_Hippocampus", "configuration": "2d", "fold": 0, "budget_minutes": 20, "num_validation_cases": 44,
              "seed": 12345, "machine": {"device": "CPU", "cpu_count": 2, "torch": "2.13.0"},
              "methods": [_row("latdiffunet (x)", 0.8), _row("nnU-Net v2 (y)", 0.85)], "notes": ["same split"]}
    write_report(report, tmp_path)
    md = (tmp_path / "benchmark.md").read_text()
    assert "| latdiffunet (x) | 0.8000 | 0.7500 | 0.7750 |" in md and "nnU-Net v2 (y)" in md
    assert json.loads((tmp_path / "benchmark.json").read_text())["methods"][1]["foreground_mean"]["Dice"] == 0.825
    assert (tmp_path / "benchmark.png").stat().st_size > 1000


@pytest.mark.skipif(importlib.util.find_spec("nnunetv2") is not None, reason="nnunetv2 is installed here")
def test_missing_nnunet_is_explained(tmp_path, monkeypatch, capsys):
    from synthetic import make_synthetic_dataset

    monkeypatch.setenv("LATDIFF_RAW", str(tmp_path / "raw"))
    monkeypatch.setenv("LATDIFF_PREPROCESSED", str(tmp_path / "pre"))
    monkeypatch.setenv("LATDIFF_RESULTS", str(tmp_path / "res"))
    make_synthetic_dataset(tmp_path / "raw", name="Dataset904_Bench")
    assert main(["-d", "904", "--budget-minutes", "1"]) == 2
    err = capsys.readouterr().err
    assert "nnunetv2 is not installed" in err and ".[benchmark]" in err and "Traceback" not in err
