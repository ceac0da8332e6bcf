"""Periodic validation costs at most its share of the time (issue 11), checked with made-up durations."""

from __future__ import annotations

import pytest

from latdiffunet.training.validation_pacing import ValidationPacer


def simulate(epochs: int, epoch_seconds: float, case_seconds: float, every: int = 5, cases: int = 10,
             stage_change: int | None = None) -> tuple[ValidationPacer, list[tuple[int, int]]]:
    """Run the pacer over ``epochs`` epochs; a validation of n cases takes n * ``case_seconds`` and,
    like ``evaluate_model_on_cases``, stops after the case that uses up its time limit."""
    pacer, done = ValidationPacer(every, cases), []
    for epoch in range(epochs):
        stage = "autoencoder" if stage_change is not None and epoch < stage_change else "diffusion"
        pacer.record_training(epoch_seconds)
        last = epoch + 1 in (stage_change, epochs)
        call = pacer.plan(epoch, stage, last)
        if call is None or not call.num_cases:
            continue
        n = call.num_cases
        if call.time_limit is not None:
            n = min(n, max(1, -(-call.time_limit // case_seconds)))  # cases until the limit is reached
        pacer.record_validation(stage, n * case_seconds, int(n))
        done.append((epoch, int(n)))
    return pacer, done


@pytest.mark.parametrize("epoch_seconds, case_seconds", [
    (9.0, 0.64),    # CPU plans on 2 CPU cores (Hippocampus 2d: 9 s epochs, 6.4 s for 10 cases): 12 % unpaced
    (800.0, 17.0),  # GPU plans on 2 CPU cores: 250 iterations of 3.2 s, 170 s for 10 cases
    (16.0, 17.0),   # the same with --iters-per-epoch 5: unpaced, validation is most of the run
    (30.0, 0.3),    # a GPU: validation is cheap
])
def test_validation_stays_within_a_tenth_of_the_time(epoch_seconds, case_seconds):
    pacer, done = simulate(200, epoch_seconds, case_seconds, stage_change=40)
    last_of_stages = sum(n * case_seconds for epoch, n in done if epoch + 1 in (40, 200))  # validated whatever the share
    assert pacer.validation_seconds - last_of_stages <= 0.1 * (pacer.training_seconds + pacer.validation_seconds) + 1e-9
    assert (39, pacer.cases["autoencoder"]) in done and (199, pacer.cases["diffusion"]) in done
    assert len(done) >= 3, "pacing must not starve validation"
    for stage_cases in pacer.cases.values():  # every validation of a stage uses the same cases
        assert stage_cases >= 1
    diffusion = [n for epoch, n in done if epoch >= 40]
    assert len(set(diffusion)) == 1


def test_cheap_validation_keeps_the_plans_schedule_and_all_cases():
    _, done = simulate(50, epoch_seconds=30.0, case_seconds=0.1, every=5)
    assert done == [(e, 10) for e in range(4, 50, 5)]


def test_expensive_first_validation_is_shrunk_and_later_ones_skipped_but_never_a_stages_last():
    pacer = ValidationPacer(every=1, max_cases=10)
    pacer.record_training(16.0)
    first = pacer.plan(0, "diffusion", last_of_stage=False)
    assert first.num_cases == 10 and first.time_limit == pytest.approx(16.0 / 9)
    pacer.record_validation("diffusion", 17.0, 1)  # the first case already used up the limit
    pacer.record_training(16.0)
    second = pacer.plan(1, "diffusion", last_of_stage=False)
    assert second.num_cases == 0 and "skipped" in second.note and "limit 10 %" in second.note
    assert pacer.plan(1, "diffusion", last_of_stage=True).num_cases == 1, "the stage's last epoch must be validated"
    assert pacer.plan(2, "autoencoder", last_of_stage=False).time_limit is not None  # each stage measures its own cost


def test_state_survives_a_checkpoint():
    pacer = ValidationPacer(every=1, max_cases=10)
    pacer.record_training(100.0)
    pacer.record_validation("diffusion", 5.0, 3, conditioning_share=0.4)
    resumed = ValidationPacer(every=1, max_cases=10)
    resumed.load_state_dict(pacer.state_dict())
    resumed.record_training(100.0)
    assert resumed.plan(5, "diffusion", False).num_cases == 3  # the same cases as before the interruption
    assert resumed.conditioning_share == {"diffusion": 0.4}  # what the temperature choice's reserve uses
    fresh = ValidationPacer(every=1, max_cases=10)
    fresh.load_state_dict({})  # checkpoints written before pacing
    assert fresh.state_dict() == ValidationPacer(every=1, max_cases=10).state_dict()


def test_fraction_one_validates_on_the_plans_schedule():
    pacer = ValidationPacer(every=2, max_cases=10, max_fraction=1.0)
    assert pacer.plan(0, "diffusion", False) is None
    assert pacer.plan(1, "diffusion", False).num_cases == 10 and pacer.plan(1, "diffusion", False).time_limit is None


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    from synthetic import planned_tiny_dataset

    yield from planned_tiny_dataset(tmp_path_factory.mktemp("pacing"), "Dataset908_Pacing2D", seed=8)


def test_an_epoch_the_budget_makes_last_after_it_ran_is_validated(planned, monkeypatch):
    """The budget decides after an epoch that it was the last: that epoch is still its stage's
    last, so it is validated. Otherwise checkpoint_best stays at an earlier epoch and the epochs
    after it are never compared (a CVC-ClinicDB run reported epoch 4 of 7 so)."""
    import json

    import torch

    from latdiffunet.training.config import TrainerConfig
    from latdiffunet.training.trainer import LatentDiffusionTrainer

    pre = planned / "pre" / "Dataset908_Pacing2D"
    plans = json.loads((pre / "latdiffPlans_tiny.json").read_text())
    splits = json.loads((pre / "splits_final.json").read_text())
    config = TrainerConfig(autoencoder_epochs=1, diffusion_epochs=4, iterations_per_epoch=2, validation_every=100,
                           validation_max_time_fraction=1.0, batch_size=4, num_workers=0, augment=False,
                           calibrate_noise_scale=False, time_budget_minutes=60)
    trainer = LatentDiffusionTrainer(plans, "2d", 0, pre, planned / "res" / "pacing", torch.device("cpu"), config, splits)

    def budget_runs_out_after_epoch_2(stage):  # epochs 0 (autoencoder), 1, 2 (diffusion) fit, not 3 and 4
        if trainer.epoch == 3:
            trainer.config = trainer.config.with_overrides(diffusion_epochs=2)

    monkeypatch.setattr(trainer, "_fit_epochs_to_budget", budget_runs_out_after_epoch_2)
    monkeypatch.setattr(trainer, "final_validation", lambda: {})
    trainer.run()
    rows = json.loads((planned / "res" / "pacing" / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert "val_dice" in rows[2], "the last epoch trained, cut by the budget, was never validated"
    assert "val_dice" not in rows[1], "only stage ends are candidates with validation_every=100"


def test_the_budget_leaves_time_for_choosing_the_temperature(planned):
    """Choosing the temperature after training samples every held-back case at 5 temperatures;
    the budget must cover it (a 15-minute Hippocampus 3d run spent 200 s on it after its training
    had used the budget). Its cost is estimated from the last diffusion validation's time per case."""
    import json

    import torch

    from latdiffunet.training.config import TrainerConfig
    from latdiffunet.training.held_back import HeldBackSelection
    from latdiffunet.training.sampling_calibration import NOISE_SCALES
    from latdiffunet.training.trainer import LatentDiffusionTrainer

    pre = planned / "pre" / "Dataset908_Pacing2D"
    plans = json.loads((pre / "latdiffPlans_tiny.json").read_text())
    splits = json.loads((pre / "splits_final.json").read_text())

    def diffusion_epochs_fitted(calibrate: bool) -> int:
        config = TrainerConfig(autoencoder_epochs=1, diffusion_epochs=100, iterations_per_epoch=2, batch_size=4,
                               num_workers=0, augment=False, calibrate_noise_scale=calibrate, time_budget_minutes=10)
        held_back = HeldBackSelection(cases=tuple(splits[0]["train"][:2]), groups=(), grouped_by=None, reason="test")
        trainer = LatentDiffusionTrainer(plans, "2d", 0, pre, planned / "res" / f"budget{calibrate}", torch.device("cpu"),
                                         config, splits, held_back=held_back)
        assert trainer.held_back.active
        assert trainer._expected_calibration_seconds() == 0.0  # nothing measured yet
        trainer.validation_pacer.record_validation("diffusion", 6.0, 2)  # 3 s per case
        expected = len(NOISE_SCALES) * len(trainer._calibration_cases()) * 3.0
        assert trainer._expected_calibration_seconds() == pytest.approx(expected if calibrate else 0.0)
        # half of a validation conditions on the image, which the sweep does once for all temperatures
        trainer.validation_pacer.record_validation("diffusion", 6.0, 2, conditioning_share=0.5)
        shared = len(trainer._calibration_cases()) * 3.0 * (0.5 + len(NOISE_SCALES) * 0.5)
        assert trainer._expected_calibration_seconds() == pytest.approx(shared if calibrate else 0.0)
        trainer.epoch = 2
        trainer._epoch_times = {"autoencoder": [10.0], "diffusion": [10.0]}
        trainer._plan_epochs = (1, 100)
        trainer.training_seconds = lambda: 20.0
        trainer._fit_epochs_to_budget("diffusion")
        return trainer.config.diffusion_epochs

    with_calibration, without = diffusion_epochs_fitted(True), diffusion_epochs_fitted(False)
    assert without - with_calibration >= 1, "the budget ignored the time the temperature choice takes"


def test_a_remainder_of_the_budget_becomes_a_shortened_epoch_when_it_is_worth_one():
    from latdiffunet.training.budget import short_last_epoch_iterations

    # 3 whole epochs of 80 s leave 50 s; 10 s of them validate it: 40 s = half an epoch of 50 steps
    assert short_last_epoch_iterations(290.0, 3, 80.0, 10.0, 50) == 25
    assert short_last_epoch_iterations(240.0 + 10.0 + 15.0, 3, 80.0, 10.0, 50) == 0  # under a quarter of an epoch
    assert short_last_epoch_iterations(240.0 + 10.0 + 79.9, 3, 80.0, 10.0, 50) == 49  # never a whole one
    assert short_last_epoch_iterations(100.0, 3, 80.0, 10.0, 50) == 0  # the whole epochs do not fit either


def test_the_budget_ends_on_a_shortened_epoch_instead_of_leaving_time_unused(planned, monkeypatch):
    """nnU-Net's budgeted runner fills its budget; whole epochs alone left 100 s of a 15-minute
    Hippocampus 3d run unused. After a timed diffusion epoch the trainer adds one epoch of as many
    steps as the remainder pays for, and runs that many in it."""
    import json

    import torch

    from latdiffunet.training.config import TrainerConfig
    from latdiffunet.training.trainer import LatentDiffusionTrainer

    pre = planned / "pre" / "Dataset908_Pacing2D"
    plans = json.loads((pre / "latdiffPlans_tiny.json").read_text())
    splits = json.loads((pre / "splits_final.json").read_text())
    config = TrainerConfig(autoencoder_epochs=1, diffusion_epochs=100, iterations_per_epoch=8, batch_size=4,
                           num_workers=0, augment=False, calibrate_noise_scale=False, time_budget_minutes=10)
    trainer = LatentDiffusionTrainer(plans, "2d", 0, pre, planned / "res" / "short", torch.device("cpu"), config, splits)
    trainer.epoch, trainer._plan_epochs = 2, (1, 100)
    trainer._epoch_times = {"autoencoder": [10.0], "diffusion": [40.0]}
    trainer.validation_pacer.record_validation("diffusion", 4.0, 2)
    # 540 s (90 % of 10 min) - 336 s trained = 204 s: 5 whole epochs of 40 s, 4 s left -> no short epoch
    trainer.training_seconds = lambda: 336.0
    trainer._fit_epochs_to_budget("diffusion")
    assert (trainer.config.diffusion_epochs, trainer._iterations_this_epoch()) == (1 + 5, 8)
    # 540 - 320 = 220 s: 5 whole epochs, 20 s left, 4 s of them the validation: 16 s = 40 % of 8 steps
    trainer.training_seconds = lambda: 320.0
    trainer._fit_epochs_to_budget("diffusion")
    assert trainer.config.diffusion_epochs == 1 + 5 + 1, "the remainder did not become an epoch"
    trainer.epoch = trainer.config.total_epochs - 1
    steps = []
    monkeypatch.setattr(trainer, "batch_stream", lambda: iter([None]))
    monkeypatch.setattr(trainer, "train_step", lambda batch, stage: steps.append(1) or {"loss": torch.tensor(1.0)})
    trainer.train_iterations("diffusion", 0.0)
    assert len(steps) == 3, "the shortened last epoch must run the steps its time pays for (int(0.4 * 8))"
    trainer.epoch -= 1
    assert trainer._iterations_this_epoch() == 8, "only the last epoch is shortened"
