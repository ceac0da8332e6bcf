"""How many epochs fit a wall-clock budget (``latdiff_train --budget-minutes``).

The arithmetic is in plain functions (tested on their own); :class:`TimeBudget` is the trainer's
use of them, a mixin of :class:`~latdiffunet.training.trainer.LatentDiffusionTrainer` that reads its
epoch times, validation pacer, held-back cases and configuration.
"""

from __future__ import annotations

import time

import numpy as np

from latdiffunet.training.sampling_calibration import CALIBRATION_MAX_CASES, calibration_cases, calibration_seconds

DIFFUSION_TO_AUTOENCODER_EPOCH_COST = 1.6  # measured on Hippocampus 2d; used until a diffusion epoch is seen


def epochs_within_budget(
    epoch_times: dict[str, list[float]],
    stage: str,
    epochs_done: int,
    plan_epochs: tuple[int, int],
    autoencoder_epochs: int,
    seconds_left: float,
) -> tuple[int, int]:
    """``(autoencoder_epochs, diffusion_epochs)`` that fit in ``seconds_left`` after ``epochs_done``.

    The time left is divided using the mean epoch time of each stage so far (validation epochs
    included); a diffusion epoch is assumed to cost 1.6x an autoencoder epoch until one has been
    seen. While the autoencoder trains (``stage``), its stage keeps the plans' share
    (``plan_epochs``) and can only get shorter than ``autoencoder_epochs``; the diffusion stage takes
    whatever is left, at least one epoch.
    """
    ae_time = float(np.mean(epoch_times.get("autoencoder", epoch_times.get("diffusion"))))
    diff_time = (float(np.mean(epoch_times["diffusion"])) if "diffusion" in epoch_times
                 else DIFFUSION_TO_AUTOENCODER_EPOCH_COST * ae_time)
    left = max(seconds_left, 0.0)
    new_ae = autoencoder_epochs
    if stage == "autoencoder":
        ae_share = plan_epochs[0] / max(sum(plan_epochs), 1)
        ae_left = int(round(left / (ae_share * ae_time + (1 - ae_share) * diff_time) * ae_share))
        new_ae = max(epochs_done, min(epochs_done + ae_left, autoencoder_epochs))
        left -= (new_ae - epochs_done) * ae_time
    done_diffusion = max(epochs_done - new_ae, 0)
    return new_ae, max(done_diffusion + int(left / diff_time), done_diffusion, 1)


# A remainder worth less than this share of an epoch's steps is left unused: the shortened epoch
# would still pay a whole validation and checkpoint for a few steps.
MIN_SHORT_EPOCH_FRACTION = 0.25


def short_last_epoch_iterations(
    seconds_left: float,
    epochs_left: int,
    epoch_seconds: float,
    validation_seconds: float,
    iterations_per_epoch: int,
    min_fraction: float = MIN_SHORT_EPOCH_FRACTION,
) -> int:
    """Steps of one more, shortened epoch that fills what ``epochs_left`` whole epochs of
    ``epoch_seconds`` leave of ``seconds_left``; 0 when that is less than ``min_fraction`` of an epoch.

    nnU-Net's budgeted runner ends on a shortened epoch; whole epochs alone leave up to one epoch
    of the budget unused (a 15-minute Hippocampus 3d run stopped 100 s early, a diffusion epoch
    being 85 s). The shortened epoch is validated like every stage's last, so ``validation_seconds``
    (the last periodic validation's) comes off its time first; ``epoch_seconds`` (a mean over
    epochs, validated ones included) makes the step estimate err on the short side.
    """
    spare = seconds_left - max(epochs_left, 0) * epoch_seconds - validation_seconds
    if epoch_seconds <= 0 or spare <= 0:
        return 0
    steps = min(int(spare / epoch_seconds * iterations_per_epoch), iterations_per_epoch - 1)
    return steps if steps >= min_fraction * iterations_per_epoch else 0


class TimeBudget:
    """The trainer's wall clock: seconds trained (earlier sessions of a resumed run included), the
    epochs that fit what is left, a shortened last epoch, and the time reserved after training
    for choosing the sampling temperature."""

    def training_seconds(self) -> float:
        """Wall-clock seconds this run has trained, earlier sessions of a resumed run included."""
        current = time.time() - self._run_start if self._run_start is not None else 0.0
        return self.training_seconds_before + current

    def _fit_epochs_to_budget(self, stage: str) -> None:
        """Rescale the remaining epochs so the run (and its final validation) fits the budget
        (:func:`~latdiffunet.training.budget.epochs_within_budget`); ``stage`` is that of the last
        epoch trained, and the time and epoch times of earlier sessions of a resumed run count too.
        Once a diffusion epoch has been timed, what the whole epochs leave goes to one more,
        shortened epoch (:func:`~latdiffunet.training.budget.short_last_epoch_iterations`), as
        nnU-Net's budgeted runner ends."""
        seconds_left = (self.config.time_budget_minutes * 60 * 0.9 - self.training_seconds()
                        - self._expected_calibration_seconds())
        new_ae, new_diff = epochs_within_budget(
            self._epoch_times, stage, self.epoch, self._plan_epochs, self.config.autoencoder_epochs, seconds_left,
        )
        short = 0
        if stage == "diffusion":
            short = short_last_epoch_iterations(
                seconds_left, new_ae + new_diff - self.epoch, float(np.mean(self._epoch_times["diffusion"])),
                self.validation_pacer.last_seconds.get("diffusion", 0.0), self.config.iterations_per_epoch,
            )
        # rank 0's decision everywhere: ranks measure different times, and ranks that disagree on
        # the number of epochs (or steps) wait for each other forever
        plan = self.dist.broadcast_from_main({"autoencoder_epochs": new_ae, "diffusion_epochs": new_diff + (short > 0),
                                              "short_last_epoch": short})
        self._short_last_epoch = plan.pop("short_last_epoch")
        self.config = self.config.with_overrides(**plan)

    def _iterations_this_epoch(self) -> int:
        """The plans' steps per epoch, fewer in a shortened last epoch (:meth:`_fit_epochs_to_budget`)."""
        if self._short_last_epoch and self.epoch == self.config.total_epochs - 1:
            return self._short_last_epoch
        return self.config.iterations_per_epoch

    def _expected_calibration_seconds(self) -> float:
        """How long choosing the temperature after training will take, from the seconds per case of
        the last diffusion validation (the same sampler on the same held-back cases), 0 before one.

        The budget covers it, so a budgeted run stops training early enough: a 15-minute
        Hippocampus 3d run (9 held-back cases, 5 temperatures) spent 200 s on it after its
        training had used the budget, and trained 989 s against nnU-Net's 813 s. The image
        conditioning, shared by all temperatures, counts once (its share of that validation).
        """
        per_case = self.validation_pacer.seconds_per_case("diffusion")
        if not (self.config.calibrate_noise_scale and self.held_back.active and per_case):
            return 0.0
        return calibration_seconds(len(self._calibration_cases()), per_case,
                                   conditioning_share=self.validation_pacer.conditioning_share.get("diffusion", 0.0))

    def _calibration_cases(self) -> list[str]:
        return calibration_cases(list(self.held_back.cases), max(self.config.validation_cases, CALIBRATION_MAX_CASES),
                                 fraction=0.0)
