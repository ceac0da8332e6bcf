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
