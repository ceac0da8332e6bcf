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


def test_nnunet_time_budget_trains_for_its_whole_budget(monkeypatch):
    """nnU-Net's budgeted loop on a fake clock: epochs of 115 s against a 900-s training deadline
    (a 1000-s budget keeps a tenth for validation). Rounding the epochs that fit down stopped it at
    805 s (LIDC: 983 of 1200 s) while ours trains to the deadline; the last epoch is now cut there."""
    import itertools

    from latdiffunet.evaluation import nnunet_baseline

    clock = [0.0]
    monkeypatch.setattr(nnunet_baseline.time, "time", lambda: clock[0])

    class Scheduler:
        max_steps = 1000

    class FakeNnUNetTrainer:
        num_epochs, current_epoch = 1000, 0
        num_iterations_per_epoch, num_val_iterations_per_epoch = 10, 5
        dataloader_train = dataloader_val = itertools.repeat(None)
        lr_scheduler = Scheduler()

        def train_step(self, batch):
            clock[0] += 11.0
            return {}

        def validation_step(self, batch):
            clock[0] += 1.0
            return {}

        def on_epoch_end(self):
            self.current_epoch += 1

        def __getattr__(self, name):  # the other on_* hooks do nothing here
            if name.startswith("on_"):
                return lambda *args: None
            raise AttributeError(name)

    trainer = nnunet_baseline.make_budget_trainer(FakeNnUNetTrainer)()
    trainer.budget_seconds = 1000.0
    trainer.run_training()
    assert 900.0 <= clock[0] <= 900.0 + 11.0 + 1.0, clock[0]  # trained up to the deadline, not one epoch short
    assert trainer.current_epoch == 8 and trainer.iterations_done == 7 * 10 + 9
