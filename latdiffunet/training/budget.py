"""How many epochs fit a wall-clock budget (``latdiff_train --budget-minutes``)."""

from __future__ import annotations

import numpy as np

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
