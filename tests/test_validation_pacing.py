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
    assert pacer.validation_seconds <= 0.1 * (pacer.training_seconds + pacer.validation_seconds) + 1e-9
    assert len(done) >= 3, "pacing must not starve validation"
    for stage_cases in pacer.cases.values():  # every validation of a stage uses the same cases
        assert stage_cases >= 1
    diffusion = [n for epoch, n in done if epoch >= 40]
    assert len(set(diffusion)) == 1


def test_cheap_validation_keeps_the_plans_schedule_and_all_cases():
    _, done = simulate(50, epoch_seconds=30.0, case_seconds=0.1, every=5)
    assert done == [(e, 10) for e in range(4, 50, 5)]


def test_expensive_first_validation_is_shrunk_and_later_ones_skipped_with_a_reason():
    pacer = ValidationPacer(every=1, max_cases=10)
    pacer.record_training(16.0)
    first = pacer.plan(0, "diffusion", last_of_stage=False)
    assert first.num_cases == 10 and first.time_limit == pytest.approx(16.0 / 9)
    pacer.record_validation("diffusion", 17.0, 1)  # the first case already used up the limit
    pacer.record_training(16.0)
    second = pacer.plan(1, "diffusion", last_of_stage=True)
    assert second.num_cases == 0 and "skipped" in second.note and "limit 10 %" in second.note
    assert pacer.plan(2, "autoencoder", last_of_stage=False).time_limit is not None  # each stage measures its own cost


def test_state_survives_a_checkpoint():
    pacer = ValidationPacer(every=1, max_cases=10)
    pacer.record_training(100.0)
    pacer.record_validation("diffusion", 5.0, 3)
    resumed = ValidationPacer(every=1, max_cases=10)
    resumed.load_state_dict(pacer.state_dict())
    resumed.record_training(100.0)
    assert resumed.plan(5, "diffusion", False).num_cases == 3  # the same cases as before the interruption
    fresh = ValidationPacer(every=1, max_cases=10)
    fresh.load_state_dict({})  # checkpoints written before pacing
    assert fresh.state_dict() == ValidationPacer(every=1, max_cases=10).state_dict()


def test_fraction_one_validates_on_the_plans_schedule():
    pacer = ValidationPacer(every=2, max_cases=10, max_fraction=1.0)
    assert pacer.plan(0, "diffusion", False) is None
    assert pacer.plan(1, "diffusion", False).num_cases == 10 and pacer.plan(1, "diffusion", False).time_limit is None
