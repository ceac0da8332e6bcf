"""Training fits its device (issue 11): a warning when GPU-sized plans train on the CPU, and periodic
validation paced to a tenth of the time. The trainer runs for real (data, checkpoints, logs), its
training step and validation are stand-ins on a made-up clock, so durations are exact and the tests
take seconds."""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch

from synthetic import make_synthetic_dataset

from latdiffunet.experiment_planning.cli import main as plan_main
from latdiffunet.training import budget as budget_module
from latdiffunet.training import trainer as trainer_module
from latdiffunet.training import validation as validation_module
from latdiffunet.training.config import TrainerConfig
from latdiffunet.training.device_fit import plans_target

SECONDS_PER_ITERATION = 1.0
SECONDS_PER_VALIDATION_CASE = 2.0


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    root = tmp_path_factory.mktemp("devicefit")
    mp = pytest.MonkeyPatch()
    for key, sub in (("RAW", "raw"), ("PREPROCESSED", "pre"), ("RESULTS", "res")):
        mp.setenv(f"LATDIFF_{key}", str(root / sub))
    make_synthetic_dataset(root / "raw", name="Dataset906_Fit2D", num_cases=8, dim=2, seed=5)
    assert plan_main(["-d", "906", "--preset", "tiny", "-np", "1", "-c", "2d"]) == 0
    yield root / "pre" / "Dataset906_Fit2D"
    mp.undo()


class FakeClock:
    """time.time() for the trainer module: real time plus what the stand-ins pretend to spend."""

    def __init__(self):
        self.offset = 0.0

    def time(self) -> float:
        import time

        return time.time() + self.offset


def stub_trainer(pre, tmp_path, monkeypatch, config: TrainerConfig, target: str):
    """A trainer whose steps and validations only advance the clock (1 s per iteration, 2 s per case)."""
    plans = copy.deepcopy(json.loads((pre / "latdiffPlans_tiny.json").read_text())) | {"target": target}
    splits = json.loads((pre / "splits_final.json").read_text())
    clock = FakeClock()
    for module in (trainer_module, budget_module, validation_module):  # every part of the trainer that reads the clock
        monkeypatch.setattr(module, "time", types.SimpleNamespace(time=clock.time))
    trainer = trainer_module.LatentDiffusionTrainer(plans, "2d", 0, pre, tmp_path / "fold_0", torch.device("cpu"), config, splits)

    def train_step(batch, stage):
        clock.offset += SECONDS_PER_ITERATION
        return {"loss": torch.tensor(0.5)}  # the trainer sums the parts on the device

    def validate(stage, final=False, num_cases=None, time_limit=None):
        cases = trainer.val_cases if final else trainer.val_cases[: num_cases or config.validation_cases]
        done = len(cases) if time_limit is None else min(len(cases), max(1, -(-time_limit // SECONDS_PER_VALIDATION_CASE)))
        clock.offset += 0 if final else SECONDS_PER_VALIDATION_CASE * done
        return {"metric_per_case": [{}] * int(done), "foreground_mean": {"Dice": 0.5}, "mean": {}}

    trainer.train_step, trainer.validate = train_step, validate
    return trainer


def config(**overrides) -> TrainerConfig:
    return TrainerConfig(**{
        "autoencoder_epochs": 2, "diffusion_epochs": 28, "iterations_per_epoch": 5, "validation_every": 2,
        "validation_cases": 4, "num_workers": 0, "batch_size": 2, "augment": False, "calibrate_noise_scale": False,
        "checkpoint_every": 1000,
    } | overrides)


def test_gpu_plans_on_the_cpu_warn_once_with_the_epoch_time_and_the_flag(planned, tmp_path, monkeypatch):
    trainer = stub_trainer(planned, tmp_path, monkeypatch, config(autoencoder_epochs=1, diffusion_epochs=1), "gpu")
    trainer.run()
    log = (tmp_path / "fold_0" / "training_log.txt").read_text()
    assert log.count("WARNING: plans latdiffPlans_tiny are sized for a GPU") == 1
    assert "1.00 s per autoencoder iteration" in log and "an epoch of 5 iterations takes about 5 s" in log
    assert "latdiff_plan_and_preprocess -d Dataset906_Fit2D --target cpu" in log


def test_cpu_plans_on_the_cpu_do_not_warn(planned, tmp_path, monkeypatch):
    trainer = stub_trainer(planned, tmp_path, monkeypatch, config(autoencoder_epochs=1, diffusion_epochs=1), "cpu")
    trainer.run()
    assert "WARNING" not in (tmp_path / "fold_0" / "training_log.txt").read_text()


def test_plans_without_a_target_are_gpu_plans_unless_tiny():
    assert plans_target({"preset": "default"}) == "gpu" and plans_target({"preset": "tiny"}) == "cpu"
    assert plans_target({"preset": "tiny", "target": "gpu"}) == "gpu"


def test_periodic_validation_takes_at_most_a_tenth_of_the_time(planned, tmp_path, monkeypatch):
    """Unpaced, validating 4 cases (8 s) every 2 epochs of 5 s would be 44 % of the run."""
    trainer = stub_trainer(planned, tmp_path, monkeypatch, config(), "cpu")
    trainer.run()
    history = json.loads((tmp_path / "fold_0" / "metrics.json").read_text())
    validation = sum(h.get("validation_time", 0.0) for h in history)
    total = sum(h["epoch_time"] for h in history)
    assert validation <= 0.105 * total, (validation, total)
    validated = [h["epoch"] for h in history if "val_dice" in h]
    assert len(validated) >= 3, validated
    assert "periodic validation skipped" in (tmp_path / "fold_0" / "training_log.txt").read_text()
