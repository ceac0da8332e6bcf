"""What a training step costs on the CPU, and the plans' choices that follow from it.

A GPU runs a larger batch in nearly the same time, so GPU plans fill memory; a CPU runs it
proportionally slower, so under a wall-clock budget the CPU presets bound what one step does: the
voxels it trains on (``max_voxels_per_step`` -> batch size) and how many images the sample loss
samples and decodes (``sample_loss_share_of_batch`` -> ``training.sample_loss_images``). Each
choice comes back with the sentence the plans store as its reason.
"""

from __future__ import annotations

import numpy as np


# Why CPU plans cap the voxels per step (tiny preset: 131072 = 4 patches of 32^3 or 8 of 128 x 128).
VOXELS_PER_STEP_WHY = (
    "on a CPU a step's time grows with the voxels it trains on, so under a wall-clock budget a larger batch buys "
    "fewer optimiser steps, not faster learning"
)


def batch_by_step_cost(batch_config: dict, patch: np.ndarray) -> tuple[int | None, str]:
    """The batch allowed by the preset's ``max_voxels_per_step`` (CPU presets), and the term it adds
    to ``batch_why``; None (and no term) for presets without the key.

    A GPU batch is sized to fill memory because a GPU runs a larger batch in nearly the same time;
    a CPU runs it proportionally slower, so memory is the wrong measure there.
    """
    cap = batch_config.get("max_voxels_per_step")
    if not cap:
        return None, ""
    patch_voxels = int(np.prod(patch))
    by_cost = max(1, cap // patch_voxels)
    return by_cost, f"{cap} voxels per step / patch {patch_voxels} = {by_cost} ({VOXELS_PER_STEP_WHY}), "


# Why CPU plans bound the sample loss by the batch (tiny preset: half of it, at most 8, single-rater data).
SAMPLE_LOSS_SHARE_WHY = (
    "the sample loss runs the sampler and decodes M = 2 samples per image at full resolution, so with the trainer's "
    "default of 8 images it scored 16 samples per step on a batch of 8 and doubled a Kvasir-SEG diffusion step"
)
SAMPLE_LOSS_MULTI_RATER_WHY = (
    "{n} raters: the trainer's default of 8 images per step, because on multi-rater data the sample loss is what "
    "learns the raters' spread, and on LIDC (fold 0, 20-minute CPU budget, one run each) 4 of 8 slices per step "
    "were not a clear gain: GED 0.487 against 0.517 but HM-IoU 0.386 against 0.440 and a spread of 1.42 against "
    "0.98 times the raters' on the 986 validation slices"
)


def training_for_batch(training: dict, batch: int, num_raters: int = 1) -> tuple[dict, dict]:
    """The preset's ``training`` section for one configuration, and why its batch-dependent values.

    ``sample_loss_share_of_batch`` (CPU presets) becomes ``sample_loss_images`` = that share of the
    batch, at least 1 and at most ``sample_loss_max_images``, on single-rater data: the sample loss
    then costs a bounded share of a step whatever the batch. There it trains one sample to be a
    plausible mask, which a few images per step do; on multi-rater data it learns the raters'
    spread and keeps the trainer's default.
    Presets without the key leave the default (8 images per step) everywhere.
    """
    training = dict(training)
    share = training.pop("sample_loss_share_of_batch", None)
    evidence = training.pop("sample_loss_share_of_batch_why", "")
    cap = training.pop("sample_loss_max_images", None)
    if not share:
        return training, {}
    if num_raters > 1:
        return training, {"sample_loss_images": SAMPLE_LOSS_MULTI_RATER_WHY.format(n=num_raters)}
    by_share = max(1, int(batch * share))
    images = by_share if cap is None else min(by_share, int(cap))
    training["sample_loss_images"] = images
    rule = f"{share:g} x batch {batch}" + (f", at most {images}" if images < by_share else "")
    why = (f"{rule} = {images} image{'s' * (images != 1)} per step (at least 1): "
           f"{SAMPLE_LOSS_SHARE_WHY}. {evidence}").strip()
    return training, {"sample_loss_images": why}
