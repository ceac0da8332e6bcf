"""When periodic validation runs, and on how many cases, so that it costs at most a set share of the time.

Periodic validation samples the first held-back cases (``held_back.py``; the validation cases when
nothing is held back) with the inference sampler; it selects ``checkpoint_best.pth`` and draws the
validation curve. Its cost relative to training depends on
the device and the plans: with GPU-sized plans on 2 CPU cores one validation of 10 cases took
170 s, longer than a shortened epoch, while on a GPU it is a few seconds. A fixed schedule
(every N epochs) therefore costs anything from 1 % to most of a run. The pacer keeps it under
``max_fraction`` of the time (training + validation) from measured durations:

- An epoch is a candidate when the schedule says so (every ``every`` epochs, and the last epoch of
  each stage); the pacer never validates more often than that.
- The first validation of each stage (reconstruction and sampling differ in cost) may use what the
  share allows of the training time so far and stops after the case that uses it up, at least
  one case. The number of cases it reached is kept for every later validation of that stage, so
  their Dice values stay comparable (the best checkpoint is chosen by them).
- Later candidates run only if, with the last validation's duration added, validation stays within
  the share of all the time so far; otherwise they are skipped, and the log says why.
- The last epoch of a stage is validated whatever the share: it is the epoch the schedule leads
  to (lowest learning rate), and unvalidated it can never become ``checkpoint_best``. A 15-minute
  Hippocampus 3d run skipped its last diffusion epoch at 11 % and reported the one before. That is
  one validation per stage beyond the share, at most.

Durations are passed in, never read from a clock here, so the rules can be tested with made-up
times; the state goes into the checkpoints, so a resumed run keeps its case counts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ValidationCall:
    """What to do at a candidate epoch: ``num_cases`` > 0 validates them, stopping early after
    ``time_limit`` seconds (first validation of a stage only); 0 skips it, and ``note`` says why."""

    num_cases: int
    time_limit: float | None = None
    note: str | None = None


class ValidationPacer:
    def __init__(self, every: int, max_cases: int, max_fraction: float = 0.1):
        self.every = max(int(every), 1)
        self.max_cases = int(max_cases)
        self.max_fraction = float(max_fraction)
        self.training_seconds = 0.0
        self.validation_seconds = 0.0
        self.last_seconds: dict[str, float] = {}  # per stage: duration of its latest validation
        self.cases: dict[str, int] = {}  # per stage: cases its validations use (fixed by the first)
        # per stage: the share of its latest validation spent on image conditioning, which a
        # temperature sweep computes once for all temperatures (sampling_calibration.calibration_seconds)
        self.conditioning_share: dict[str, float] = {}

    def record_training(self, seconds: float) -> None:
        self.training_seconds += seconds

    def record_validation(self, stage: str, seconds: float, num_cases: int, conditioning_share: float | None = None) -> None:
        self.validation_seconds += seconds
        self.last_seconds[stage] = seconds
        self.cases.setdefault(stage, num_cases)
        if conditioning_share is not None:
            self.conditioning_share[stage] = float(conditioning_share)

    def seconds_per_case(self, stage: str) -> float | None:
        """The latest validation of ``stage``'s duration per case, None before one."""
        seconds, cases = self.last_seconds.get(stage), self.cases.get(stage)
        return seconds / cases if seconds and cases else None

    def share_with(self, seconds: float) -> float:
        """Validation's share of all the time so far if a validation of ``seconds`` were added."""
        validation = self.validation_seconds + seconds
        return validation / max(self.training_seconds + validation, 1e-9)

    def plan(self, epoch: int, stage: str, last_of_stage: bool) -> ValidationCall | None:
        """``None`` when ``epoch`` (0-based) is not a candidate, else what to validate."""
        if not ((epoch + 1) % self.every == 0 or last_of_stage) or self.max_cases <= 0:
            return None
        if self.max_fraction >= 1:
            return ValidationCall(self.cases.get(stage, self.max_cases))
        if stage not in self.last_seconds:  # the first of its stage: its cost is measured as it runs
            allowed = self.max_fraction / (1 - self.max_fraction) * self.training_seconds - self.validation_seconds
            return ValidationCall(self.max_cases, time_limit=max(allowed, 0.0))
        expected = self.last_seconds[stage]
        share = self.share_with(expected)
        if share <= self.max_fraction or last_of_stage:
            return ValidationCall(self.cases[stage])
        return ValidationCall(0, note=(
            f"periodic validation skipped at epoch {epoch}: the last one took {expected:.1f} s, so validation would take "
            f"{100 * share:.0f} % of the time so far (limit {100 * self.max_fraction:.0f} %)"
        ))

    def state_dict(self) -> dict:
        return {"training_seconds": self.training_seconds, "validation_seconds": self.validation_seconds,
                "last_seconds": dict(self.last_seconds), "cases": dict(self.cases),
                "conditioning_share": dict(self.conditioning_share)}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict`; an empty ``state`` (checkpoints before pacing) changes nothing."""
        self.training_seconds = float(state.get("training_seconds", 0.0))
        self.validation_seconds = float(state.get("validation_seconds", 0.0))
        self.last_seconds = {k: float(v) for k, v in state.get("last_seconds", {}).items()}
        self.cases = {k: int(v) for k, v in state.get("cases", {}).items()}
        self.conditioning_share = {k: float(v) for k, v in state.get("conditioning_share", {}).items()}
