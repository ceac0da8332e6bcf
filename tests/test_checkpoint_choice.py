"""checkpoint_best stands in for the final weights only when the held-back cases say it is better
by more than their noise (training/validation.py ``best_beats_final``, final_validation.py).

A best epoch picked on a few held-back cases can be luck: on CVC-ClinicDB a 15-minute run kept its
first diffusion epoch and scored 0.212 on the validation frames where its final weights scored 0.325.
"""

from __future__ import annotations

import json

import pytest
import torch

from latdiffunet.training.validation import best_beats_final, foreground_dice_per_case


def test_best_is_kept_only_when_it_beats_the_final_weights_by_more_than_a_standard_error():
    final = {"a": 0.60, "b": 0.70, "c": 0.50, "d": 0.65}
    clearly_better = {k: v + 0.05 + 0.01 * i for i, (k, v) in enumerate(final.items())}
    keep, why = best_beats_final(clearly_better, final)
    assert keep and "checkpoint_best kept" in why
    within_noise = {"a": 0.70, "b": 0.62, "c": 0.58, "d": 0.60}  # mean +0.0125, differences +-0.1
    keep, why = best_beats_final(within_noise, final)
    assert not keep and "final weights" in why and "4 cases" in why
    keep, why = best_beats_final(final, final)
    assert not keep and "is the final epoch" in why, "the final epoch as its own best: nothing to prefer, and say so"
    # nothing to compare (a checkpoint from before per-case values were kept): the best stays
    assert best_beats_final({}, final)[0] and best_beats_final({"a": 0.9}, {"a": 0.1})[0]


def test_per_case_dice_reads_an_evaluation_summary():
    summary = {"metric_per_case": [
        {"case_id": "x", "metrics": {"1": {"Dice": 0.5}, "2": {"Dice": 1.0}}},
        {"case_id": "y", "metrics": {"1": {"Dice": float("nan")}}},  # class absent from both: no value
        {},  # an entry without a case (stubs in other tests write these)
    ]}
    assert foreground_dice_per_case(summary) == {"x": 0.75}


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    from synthetic import planned_tiny_dataset

    yield from planned_tiny_dataset(tmp_path_factory.mktemp("choice"), "Dataset909_Choice2D", seed=9, num_cases=26)


def _trained(planned, folder: str):
    """1 autoencoder + 2 diffusion epochs of one step, every epoch validated on the held-back cases."""
    from latdiffunet.training.config import TrainerConfig
    from latdiffunet.training.trainer import LatentDiffusionTrainer

    pre = planned / "pre" / "Dataset909_Choice2D"
    plans = json.loads((pre / "latdiffPlans_tiny.json").read_text())
    splits = json.loads((pre / "splits_final.json").read_text())
    config = TrainerConfig(autoencoder_epochs=1, diffusion_epochs=2, iterations_per_epoch=1, batch_size=2, num_workers=0,
                           validation_every=1, validation_max_time_fraction=1.0, validation_cases=4, validation_samples=2,
                           augment=False, sample_loss_weight=0.0, calibrate_noise_scale=False)
    trainer = LatentDiffusionTrainer(plans, "2d", 0, pre, planned / "res" / folder, torch.device("cpu"), config, splits)
    final_validation = trainer.final_validation
    trainer.final_validation = lambda: {}
    trainer.run()
    trainer.final_validation = final_validation
    trainer.validate = lambda stage, final=False, **kwargs: {"foreground_mean": {"Dice": 0.5}, "mean": {}, "metric_per_case": []}
    trainer.raw_dataset_folder = None  # final validation in preprocessed space (stubbed above)
    return trainer


def _an_earlier_epoch(trainer) -> None:
    """Write checkpoint_best.pth with EMA weights other than the final ones."""
    with torch.no_grad():
        next(trainer.ema.parameters()).add_(1.0)
    trainer.save("checkpoint_best.pth")


def _same_weights(a, b) -> bool:
    """Whether two checkpoints hold the same EMA weights (the temperature written into one of them
    changes its bytes, not its weights)."""
    ema_a, ema_b = (torch.load(p, weights_only=True)["ema"] for p in (a, b))
    return ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_final_validation_uses_the_final_weights_when_the_best_epoch_is_within_noise(planned):
    trainer = _trained(planned, "within_noise")
    last = trainer.last_val_per_case
    assert trainer.last_val_epoch == trainer.config.total_epochs - 1 and len(last) >= 2
    assert set(last) <= set(trainer.held_back.cases)
    state = torch.load(trainer.output_folder / "checkpoint_final.pth", weights_only=True)
    assert state["last_val_per_case"] == last and state["last_val_epoch"] == trainer.last_val_epoch

    best, final = (trainer.output_folder / name for name in ("checkpoint_best.pth", "checkpoint_final.pth"))
    _an_earlier_epoch(trainer)
    assert not _same_weights(best, final)
    trainer.best_val_per_case = {c: v + (0.1 if i % 2 else -0.09) for i, (c, v) in enumerate(sorted(last.items()))}
    summary = trainer.final_validation()
    assert _same_weights(best, final), "latdiff_predict reads checkpoint_best: it must hold the weights this number describes"
    assert summary["checkpoint"] == "checkpoint_best.pth" and "final weights" in summary["checkpoint_choice"]

    trainer.best_val_per_case = {c: v + 0.2 for c, v in last.items()}  # clearly better: kept
    _an_earlier_epoch(trainer)
    summary = trainer.final_validation()
    assert not _same_weights(best, final) and "checkpoint_best kept" in summary["checkpoint_choice"]
