"""A warning, once per run, when plans sized for a GPU train on the CPU.

GPU-sized plans (batch 64 of 56x40 slices for Hippocampus 2d, 250 iterations an epoch) train on
2 CPU cores at 3.2 s per iteration: 13 minutes an epoch, days for the plans' 600 epochs. Nothing
fails, so without a word a user only sees a progress bar that hardly moves. The trainer times the
first iterations of the run and says what an epoch and the run will take, and which flag gives
CPU-sized plans, before the user has waited for a whole epoch.
"""

from __future__ import annotations

import time
from typing import Callable

TIMED_ITERATIONS = 2  # after the first, which also starts the data stream and so is not timed


def plans_target(plans: dict) -> str:
    """The device (``cpu`` or ``gpu``) the plans are sized for. Plans written before they named it:
    the ``tiny`` (and ``cpu``) presets are CPU-sized, every other preset was the GPU-sized default."""
    return plans.get("target") or ("cpu" if plans.get("preset") in ("tiny", "cpu") else "gpu")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class GpuPlansOnCpuCheck:
    """Call :meth:`iteration_done` after each training iteration; it warns once, after iteration
    ``TIMED_ITERATIONS`` of the first epoch (earlier when epochs are shorter), and then costs nothing.

    ``stage`` is the stage of the first epoch (timed); ``log`` receives the warning (the trainer's
    logger: console and ``training_log.txt``); ``clock`` is replaceable for tests.
    """

    def __init__(
        self, plans: dict, configuration: dict, device_type: str, batch_size: int, iterations_per_epoch: int,
        total_epochs: int, stage: str, log: Callable[[str], None], clock: Callable[[], float] = time.time,
    ):
        self.armed = device_type == "cpu" and plans_target(plans) == "gpu"
        self.plans, self.configuration = plans, configuration
        self.batch_size, self.iterations_per_epoch, self.total_epochs = batch_size, iterations_per_epoch, total_epochs
        self.stage = stage  # of the timed iterations: the autoencoder's are the cheapest
        self.log, self.clock = log, clock
        self._after_first: float | None = None

    def iteration_done(self, index: int, epoch_start: float) -> None:
        """``index``: 0-based iteration within the epoch; ``epoch_start``: ``clock()`` before it began."""
        if not self.armed:
            return
        now = self.clock()
        if index == 0:
            self._after_first = now
        last = min(TIMED_ITERATIONS, self.iterations_per_epoch - 1)
        if index < last:
            return
        per_iteration = (now - self._after_first) / index if index > 0 else now - epoch_start
        self.armed = False
        self.log(self.message(per_iteration))

    def message(self, per_iteration: float) -> str:
        epoch = per_iteration * self.iterations_per_epoch
        patch = "x".join(str(p) for p in self.configuration["patch_size"])
        dataset = self.plans.get("dataset_name", "DATASET")
        # measured on 2 CPU cores, Hippocampus: a diffusion iteration costs 1.2-1.3x an autoencoder one
        # (GPU plans 2d: 1.4 s vs 1.1 s), 1.6x (2d) to 2.5x (3d) once the sample loss is on
        more = ", and the diffusion stage's iterations cost 1.2-2.5x as much" if self.stage == "autoencoder" else ""
        return (
            f"WARNING: plans {self.plans.get('plans_name')} are sized for a GPU (batch {self.batch_size} of {patch} patches), "
            f"but training runs on the CPU: {per_iteration:.2f} s per {self.stage} iteration, so an epoch of "
            f"{self.iterations_per_epoch} iterations takes about {_duration(epoch)} and the {self.total_epochs} epochs at "
            f"least {_duration(epoch * self.total_epochs)} (validation not counted{more}). For CPU-sized plans run "
            f"`latdiff_plan_and_preprocess -d {dataset} --target cpu` (it rewrites them) and train again; or shorten "
            "this run with --iters-per-epoch, --batch-size, --epochs or --budget-minutes."
        )
