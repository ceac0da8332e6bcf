"""Data-parallel training (torchrun; gloo on the CPU, two processes).

* Two processes, each on its half of a global batch, end with the weights (and EMA) of one
  process on the whole batch, in both stages: the losses that are not means over images (batch
  soft Dice, class-weighted cross-entropy, means masked by an ignore label or by the decoded
  loss's noise threshold) sum their statistics over the processes, and gradients are averaged.
  Per-process batch Dice or per-process denominators make this test fail.
* ``latdiff_train ... --nproc 2`` on real Hippocampus writes one run (one log, one history, one
  set of checkpoints) and ``--c`` resumes it.
* The small rules: batch split, foreground share per rank, seeds, pooled standard deviation,
  torchrun's environment.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, load_converter, module_folders, shared_dataset

from latdiffunet.errors import UserInputError
from latdiffunet.training.config import TrainerConfig
from latdiffunet.training.distributed import (
    DistributedContext, destroy_process_group, init_process_group, local_batch_size, local_foreground_fraction,
    pooled_std, stream_seed,
)
from latdiffunet.training.trainer import LatentDiffusionTrainer

PLANS = REPO_ROOT / "plans" / "reference" / "Dataset004_Hippocampus" / "latdiffPlans_tiny.json"
GLOBAL_BATCH = 4
STEPS = 3
IGNORE = 3  # the Hippocampus plans have 3 classes; 3 becomes their ignore label here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- 2 processes == 1 process
def global_batch(step: int) -> dict:
    """A disc (1) and a box (2) per image, different in every image, and unannotated (ignore)
    stripes in two of the four images: the two halves differ in class and annotated voxel counts."""
    rng = np.random.default_rng(step)
    yy, xx = np.mgrid[:56, :40]
    seg = np.zeros((GLOBAL_BATCH, 1, 56, 40), np.int64)
    for b in range(GLOBAL_BATCH):
        cy, cx, r = rng.integers(12, 40), rng.integers(8, 30), rng.integers(3, 8)
        seg[b, 0][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
        seg[b, 0, cy - 10: cy - 10 + rng.integers(3, 10), cx: cx + rng.integers(3, 9)] = 2
    seg[1, 0, :, :6] = IGNORE
    seg[2, 0, 40:] = IGNORE
    data = (np.where(seg == IGNORE, 0, seg) * 1.0 + rng.normal(0, 0.3, seg.shape)).astype(np.float32)
    return {"data": data, "seg": seg}


def make_trainer(context: DistributedContext, folder: Path) -> LatentDiffusionTrainer:
    """The Hippocampus tiny 2d trainer, global batch 4, with an ignore label and the decoded loss
    only above a signal threshold; deterministic autoencoder (no per-image latent noise)."""
    plans = json.loads(PLANS.read_text())
    plans["configurations"]["2d"]["network"]["autoencoder"]["variational"] = False
    config = TrainerConfig(num_workers=0, amp=False, batch_size=GLOBAL_BATCH, sample_loss_weight=0.0,
                           decoded_loss_min_signal=0.3, learning_rate=1e-3,
                           grad_clip=1e6)  # clipping to norm 1 would hide a wrong gradient scale
    trainer = LatentDiffusionTrainer(plans, "2d", 0, folder, folder / "fold_0", torch.device("cpu"), config,
                                     [{"train": ["x"], "val": []}], distributed=context)
    trainer.ignore_label = IGNORE
    return trainer


def weights(trainer: LatentDiffusionTrainer) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items()} | {
        f"ema.{k}": v.clone() for k, v in trainer.ema.state_dict().items()}


def gradients(trainer: LatentDiffusionTrainer, stage: str) -> dict[str, torch.Tensor]:
    """A step's (averaged) gradients: AdamW cannot see a wrong gradient scale, these can."""
    return {f"grad.{stage}.{n}": p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def train_on_global_batches(context: DistributedContext, folder: Path) -> dict[str, torch.Tensor]:
    """``STEPS`` autoencoder + ``STEPS`` diffusion steps on this rank's share of fixed global
    batches, with noise drawn for the global batch and sliced; returns the model and EMA weights
    and each stage's first gradients."""
    trainer = make_trainer(context, folder)
    grads = {}
    share = slice(context.rank * trainer.local_batch_size, (context.rank + 1) * trainer.local_batch_size)
    for stage in ("autoencoder", "diffusion"):
        trainer._setup_stage(stage)
        for step in range(STEPS):
            def draws(z0: torch.Tensor, step: int = step) -> tuple[torch.Tensor, ...]:
                g = torch.Generator().manual_seed(1000 + step)
                t = torch.randint(0, trainer.schedule.num_timesteps, (GLOBAL_BATCH,), generator=g)
                noise = torch.randn((GLOBAL_BATCH,) + tuple(z0.shape[1:]), generator=g)
                random_latent = torch.randn((GLOBAL_BATCH, trainer.model.config["denoiser"]["random_latent_dim"]), generator=g)
                return t[share], noise[share], random_latent[share]

            trainer.draw_diffusion_noise = draws
            trainer.train_step({k: v[share] for k, v in global_batch(step).items()}, stage)
            if step == 0:  # the weights are still equal everywhere: the gradients must be too
                grads |= gradients(trainer, stage)
    return weights(trainer) | grads


def epoch_plan_with_uneven_times(trainer: LatentDiffusionTrainer, times_of_rank: int) -> torch.Tensor:
    """``--budget-minutes`` after 3 autoencoder epochs that took 2.5 s on rank 0 and 5 s on rank
    1: the (autoencoder, diffusion) epochs this rank then plans (rank 0 alone: 28 + 123)."""
    trainer.config = trainer.config.with_overrides(time_budget_minutes=10.3, autoencoder_epochs=100, diffusion_epochs=500)
    trainer._plan_epochs, trainer.epoch, trainer._run_start = (100, 500), 3, time.time()
    trainer._epoch_times = {"autoencoder": [2.5 * (1 + times_of_rank)] * 3}
    trainer._fit_epochs_to_budget("autoencoder")
    return torch.tensor([trainer.config.autoencoder_epochs, trainer.config.diffusion_epochs])


def _worker(rank: int, world_size: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    context = DistributedContext.from_environment()
    init_process_group(context, torch.device("cpu"))
    try:
        weights = train_on_global_batches(context, Path(folder) / f"rank{rank}")
        weights["epoch_plan"] = epoch_plan_with_uneven_times(make_trainer(context, Path(folder) / f"plan{rank}"), rank)
    finally:
        destroy_process_group()
    torch.save(weights, Path(folder) / f"weights_rank{rank}.pt")


def test_two_processes_on_halves_train_like_one_process_on_the_whole_batch(tmp_path):
    """Same gradients (first step of each stage), same weights and EMA after 3 + 3 steps, same
    epoch plan under a time budget although the ranks measured different epoch times."""
    torch.multiprocessing.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"weights_rank{r}.pt", weights_only=True) for r in range(2)]
    single = train_on_global_batches(DistributedContext(), tmp_path / "single")
    # ranks that planned different numbers of epochs would wait for each other for ever
    alone = [epoch_plan_with_uneven_times(make_trainer(DistributedContext(), tmp_path / "plan"), r).tolist() for r in (0, 1)]
    assert ranks[0]["epoch_plan"].tolist() == ranks[1]["epoch_plan"].tolist() == alone[0] == [28, 123] != alone[1]
    for name in single:
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between the ranks"
    # Elementwise closeness is too strict for AdamW: it divides by the gradient's own size, so the
    # rounding of a gradient that is almost 0 can become a step of up to the learning rate (a
    # handful of the 1.9 million weights here, by < 1e-4). A wrong reduction moves most weights.
    grads = {n for n in single if n.startswith("grad.")}
    assert {n.split(".")[1] for n in grads} == {"autoencoder", "diffusion"}
    for name in grads:
        scale = float(single[name].abs().max())
        torch.testing.assert_close(ranks[0][name], single[name], rtol=1e-3, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")
    differences = {n: (ranks[0][n] - v).abs() for n, v in single.items() if v.is_floating_point() and n not in grads}
    off = {n: int((d > 1e-5).sum()) for n, d in differences.items()}
    total = sum(d.numel() for d in differences.values())
    worst = sorted(((c, n) for n, c in off.items() if c), reverse=True)[:3]
    assert sum(off.values()) < 1e-4 * total, f"{sum(off.values())} of {total} weights differ by > 1e-5, e.g. {worst}"
    assert max(float(d.max()) for d in differences.values()) < 5e-4
    initial = weights(make_trainer(DistributedContext(), tmp_path / "initial"))
    for part in ("model.autoencoder.", "model.image_encoder.", "model.denoiser.", "ema.denoiser."):
        assert any(not torch.equal(v, initial[n]) for n, v in single.items() if n.startswith(part)), f"{part} never trained"


# ----------------------------------------------------------------------------- real data, through latdiff_train
@pytest.mark.slow
@pytest.mark.realdata
def test_two_process_training_on_hippocampus_writes_one_run_and_resumes(tmp_path):
    """``latdiff_train --nproc 2`` (torchrun, gloo) on 10 real Hippocampus cases: one log, one
    history, one set of checkpoints, rank 0's validation; ``--c`` continues from the checkpoint."""
    source = shared_dataset("Hippocampus")
    with module_folders(tmp_path) as env:
        load_converter("convert_hippocampus").convert(source, env["LATDIFF_RAW"], num_processes=1, max_cases=10)
        from latdiffunet.experiment_planning.cli import main as plan_main

        assert plan_main(["-d", "4", "--preset", "tiny", "-c", "2d", "-np", "1"]) == 0
        common = ["4", "0", "-c", "2d", "-p", "latdiffPlans_tiny", "--device", "cpu", "--num-workers", "0",
                  "--iters-per-epoch", "2", "--batch-size", "4", "--nproc", "2"]
        environ = os.environ | {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}

        def train(*extra: str) -> str:
            done = subprocess.run([sys.executable, "-m", "latdiffunet.training.cli", *common, *extra], env=environ,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            return done.stdout + done.stderr

        train("--epochs", "2")
        fold = env["LATDIFF_RESULTS"] / "Dataset004_Hippocampus" / "LatentDiffusionTrainer__latdiffPlans_tiny__2d" / "fold_0"
        log = (fold / "training_log.txt").read_text()
        assert log.count("training LatentDiffusionTrainer fold 0") == 1, log  # rank 0 logs, once
        assert "in 2 processes (global batch 4, 2 per process)" in log
        assert [h["epoch"] for h in json.loads((fold / "metrics.json").read_text())] == [0, 1]
        assert json.loads((fold / "training_config.json").read_text())["processes"] == 2
        from latdiffunet.utilities.checkpoint import load_checkpoint

        assert load_checkpoint(fold / "checkpoint_latest.pth")["epoch"] == 2
        assert (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()
        written = {p.name for p in fold.iterdir()}
        assert {"checkpoint_final.pth", "checkpoint_latest.pth"} <= written <= {
            "checkpoint_best.pth", "checkpoint_final.pth", "checkpoint_latest.pth", "training_log.txt", "metrics.json",
            "progress.png", "training_config.json", "autoencoder_reconstruction.json", "sampling_calibration.json",
            "validation", "validation_montages"}, written  # one set of files, none per rank, no temporary ones left

        train("--epochs", "3", "--c")
        log = (fold / "training_log.txt").read_text()
        assert log.count("resuming from") == 1 and "epochs 2->3" in log, log
        assert [h["epoch"] for h in json.loads((fold / "metrics.json").read_text())] == [0, 1, 2]
        assert load_checkpoint(fold / "checkpoint_latest.pth")["epoch"] == 3


# ----------------------------------------------------------------------------- the rules
def test_the_global_batch_splits_evenly_or_is_refused_with_a_fix():
    assert local_batch_size(32, 4) == 8 and local_batch_size(5, 1) == 5
    with pytest.raises(UserInputError, match="--batch-size 33 or 30"):
        local_batch_size(32, 3)


@pytest.mark.parametrize("batch,world", [(8, 2), (32, 4), (12, 3), (15, 5), (4, 4), (6, 1)])
def test_ranks_force_as_many_foreground_patches_as_one_process_would(batch, world):
    """One process forces the last round(B * 0.33) patches; the ranks force exactly those of
    their global positions, the last rank's first."""
    from latdiffunet.training.data_loading import PatchDataLoader

    forced_one_process = int(np.floor(batch * 0.33 + 0.5))
    local = batch // world
    per_rank = [PatchDataLoader(Path("unused"), ["x"], [8, 8], local, 2, local_foreground_fraction(batch, 0.33, r, world))
                .num_forced_foreground(local) for r in range(world)]
    assert sum(per_rank) == forced_one_process
    expected = [min(max((r + 1) * local - (batch - forced_one_process), 0), local) for r in range(world)]
    assert per_rank == expected


def test_every_epoch_and_rank_draws_from_its_own_seed():
    seeds = {stream_seed(12345, e, r) for e in range(50) for r in range(8)}
    assert len(seeds) == 400 and stream_seed(12345, 3, 1) == stream_seed(12345, 3, 1)


def test_pooled_std_of_groups_equals_the_std_of_all_values():
    values = torch.randn(1000, dtype=torch.float64) * 2 + 5
    groups = [values[:137], values[137:600], values[600:]]
    rows = torch.stack([torch.stack([torch.tensor(float(g.numel()), dtype=torch.float64), g.mean(), ((g - g.mean()) ** 2).sum()])
                        for g in groups])
    assert pooled_std(rows) == pytest.approx(float(values.std()), rel=1e-12)


def test_torchrun_environment_is_read_and_checked():
    assert DistributedContext.from_environment({}) == DistributedContext(1, 0, 0)
    ctx = DistributedContext.from_environment({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"})
    assert ctx.enabled and not ctx.is_main and ctx.device("cpu") == torch.device("cpu")
    for bad in ({"WORLD_SIZE": "2", "RANK": "2"}, {"WORLD_SIZE": "two"}):
        with pytest.raises(UserInputError):
            DistributedContext.from_environment(bad)


def test_the_processes_torchrun_starts_do_not_get_nproc():
    """torchrun would stop at ``--nproc`` (ambiguous with its ``--nproc-per-node``)."""
    from latdiffunet.training.cli import argv_without_nproc

    for nproc in (["--nproc", "2"], ["--nproc=2"], ["--num-gpus", "2"], ["--npro", "2"], ["--num-g=2"]):
        assert argv_without_nproc(["4", "0", *nproc, "-c", "2d", "--num-workers", "2"]) == ["4", "0", "-c", "2d", "--num-workers", "2"]


def test_process_counts_that_cannot_work_are_refused_before_anything_starts():
    from latdiffunet.training.cli import _check_processes

    one = DistributedContext()
    _check_processes(1, one, torch.device("cpu"), 5)
    _check_processes(2, one, torch.device("cpu"), 8)
    with pytest.raises(UserInputError, match="cannot be split evenly"):
        _check_processes(3, one, torch.device("cpu"), 8)
    with pytest.raises(UserInputError, match="not MPS"):
        _check_processes(2, one, torch.device("mps"), 8)
    with pytest.raises(UserInputError, match="leave --nproc out"):
        _check_processes(4, DistributedContext(2, 0, 0), torch.device("cpu"), 8)
