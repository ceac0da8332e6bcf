"""The two-stage latent diffusion trainer.

Stage 1 (``autoencoder``) learns the shape manifold: a mask autoencoder trained with weighted
cross-entropy + Dice (+ a tiny KL). Stage 2 (``diffusion``) freezes it, scales its latents to unit
variance and trains the image encoder + latent denoiser; besides the latent loss, the decoded
x0-estimate is supervised with cross-entropy + Dice so the model is trained for segmentation,
not latent realism (Öttl et al.). Epochs are numbered across both stages, so one checkpoint,
one log and one ``--c`` cover the whole run.

A variant is a subclass that changes :attr:`config_overrides` / :attr:`diffusion_overrides`
(see ``variants.py``); the machinery below stays the same.

The class weights of the plans (rare classes count more) are used where MedSegLatDiff uses them,
in the autoencoder's reconstruction, so small structures survive compression. The decoded
prediction in stage 2 is supervised without them by default: with weights, the first tiny-preset
Hippocampus run over-segmented (validation FP 3x FN) and Dice already balances the classes.

The class is the run's bookkeeping (stages, optimiser, epochs, EMA, checkpoints, resume); its
parts live beside it as mixins: the losses in ``objectives.py``, the wall-clock budget in
``budget.py``, periodic validation in ``validation.py``, the temperature choice and final
validation in ``final_validation.py``.

Several processes (torchrun) train one model data-parallel: see ``distributed.py`` for how the
global batch is split, gradients averaged, and what only rank 0 does.

The hot path never waits for the device: a step's loss parts stay detached device tensors, read
back once every ``loss_readout_every`` steps and once per epoch; batches are checked on the host
and copied through pinned memory without blocking; timesteps are drawn on the host, where their
noise levels are looked up.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from latdiffunet.diffusion import NoiseSchedule, clip_x0_for
from latdiffunet.errors import UserInputError
from latdiffunet.inference.latent_sampling import mirroring_enabled
from latdiffunet.networks import build_model
from latdiffunet.preprocessing.splits import load_case_groups
from latdiffunet.training.budget import TimeBudget
from latdiffunet.training.config import TrainerConfig
from latdiffunet.training.device_fit import GpuPlansOnCpuCheck
from latdiffunet.training.distributed import (
    DistributedContext, local_batch_size, local_foreground_fraction, pooled_std, stream_seed,
)
from latdiffunet.training.final_validation import FinalValidation
from latdiffunet.training.held_back import CONFIG_KEY as HELD_BACK_KEY, HeldBackSelection, choose_held_back
from latdiffunet.training.logger import TrainingLogger
from latdiffunet.training.losses import ExtraLoss, check_label_values, latent_valid_fraction, one_hot, valid_mask
from latdiffunet.training.objectives import TrainingObjectives
from latdiffunet.training.validation import PeriodicValidation
from latdiffunet.training.validation_pacing import ValidationPacer
from latdiffunet.utilities.autocast import autocast_for, needs_grad_scaler
from latdiffunet.utilities.checkpoint import load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from latdiffunet.utilities.file_io import load_json, write_json

class LatentDiffusionTrainer(TrainingObjectives, TimeBudget, PeriodicValidation, FinalValidation):
    config_overrides: dict = {}
    diffusion_overrides: dict = {}

    def __init__(
        self,
        plans: dict,
        configuration_name: str,
        fold: int | str,
        preprocessed_dataset_folder: Path,
        output_folder: Path,
        device: torch.device,
        config: TrainerConfig,
        splits: list[dict],
        raw_dataset_folder: Path | None = None,
        distributed: DistributedContext | None = None,
        held_back: HeldBackSelection | None = None,
    ):
        self.plans = plans
        self.configuration_name = configuration_name
        self.configuration = copy.deepcopy(plans["configurations"][configuration_name])
        self.configuration["diffusion"].update(self.diffusion_overrides)
        # Test-time mirroring only where training mirrored (augmentation mirrors every axis); stored
        # with the fold's sampling settings in its checkpoints, so latdiff_predict follows this fold.
        self.configuration["diffusion"]["test_time_mirroring"] = bool(config.augment and mirroring_enabled(self.configuration))
        self.fold = fold
        self.data_folder = preprocessed_dataset_folder / self.configuration["data_identifier"]
        self.output_folder = output_folder
        self.preprocessed_dataset_folder = preprocessed_dataset_folder
        self.raw_dataset_folder = raw_dataset_folder
        self.device = device
        self.config = config
        self.dist = distributed or DistributedContext()
        self.train_cases, self.val_cases = self._fold_cases(splits)
        # checkpoint_best and the temperature are chosen on these, never on val_cases (held_back.py)
        self.held_back = held_back or choose_held_back(fold, self.train_cases, self.val_cases,
                                                       load_case_groups(preprocessed_dataset_folder, raw_dataset_folder))
        self.train_cases = [c for c in self.train_cases if c not in set(self.held_back.cases)]
        # nothing held back: periodic validation on val_cases only draws the curve, no checkpoint_best
        self.periodic_cases = list(self.held_back.cases) or self.val_cases
        # the global batch (config or plans) split evenly over the processes; one share per process
        self.global_batch_size = config.batch_size or self.configuration["batch_size"]
        self.local_batch_size = local_batch_size(self.global_batch_size, self.dist.world_size)
        torch.manual_seed(config.seed)  # the same initial weights on every rank (and broadcast from rank 0 in run)
        np.random.seed(config.seed)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed patch sizes: the fastest kernels are found once
        self.model = build_model(self.configuration["network"]).to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.schedule = NoiseSchedule.from_plan(self.configuration["diffusion"])
        self.parameterization = self.configuration["diffusion"]["parameterization"]
        self.clip_x0 = clip_x0_for(self.configuration["diffusion"])  # as inference samples (eps: bounded x0_hat)
        self.class_weights = torch.tensor(self.configuration["loss"]["class_weights"], dtype=torch.float32, device=device)
        # dataset.json's "ignore" (unannotated voxels): no loss and no metric anywhere (see losses.py)
        self.ignore_label: int | None = plans.get("labels", {}).get("ignore")
        self.amp = config.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device, self.amp))  # float16 only
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizer_stage: str | None = None
        self.epoch = 0
        self._step_in_epoch = 0  # the training step within the epoch (sample_loss_every counts it)
        self.ema_updates = 0
        self.best_val_dice = -math.inf
        # held-back Dice per case of checkpoint_best's epoch and of the latest validated one (final_validation.py)
        self.best_val_per_case: dict[str, float] = {}
        self.last_val_per_case: dict[str, float] = {}
        self.last_val_epoch = -1
        self.logger = TrainingLogger(output_folder, active=self.dist.is_main)
        self._stream = None
        self._case_cache = None  # decompressed training cases, kept across the per-epoch streams
        # Wall-clock seconds of earlier sessions of this run (restored by load) and per-stage epoch
        # times: a resumed run counts both against --budget-minutes instead of starting afresh.
        self.training_seconds_before = 0.0
        self._run_start: float | None = None
        self._epoch_times: dict[str, list[float]] = {}
        self._short_last_epoch = 0  # steps of a shortened last epoch that fills the budget (0: a whole one)
        self.validation_pacer = ValidationPacer(config.validation_every, config.validation_cases, config.validation_max_time_fraction)
        self.plans_check: GpuPlansOnCpuCheck | None = None  # made by run(); warns when GPU plans train on the CPU

    # ------------------------------------------------------------------ setup
    def _fold_cases(self, splits: list[dict]) -> tuple[list[str], list[str]]:
        if self.fold == "all":
            return sorted({c for s in splits for c in s["train"] + s["val"]}), []
        if not 0 <= int(self.fold) < len(splits):
            raise UserInputError(f"fold {self.fold} does not exist; splits_final.json has {len(splits)} folds (0-{len(splits) - 1} or 'all')")
        return list(splits[int(self.fold)]["train"]), list(splits[int(self.fold)]["val"])

    def _trainable_parameters(self, stage: str) -> list[torch.nn.Parameter]:
        head = self.model.segmentation_head
        if stage == "autoencoder":
            params = list(self.model.autoencoder.parameters())
            if head is not None and self.config.image_pretraining:
                params += list(self.model.image_encoder.parameters()) + list(head.parameters())
            return params
        params = list(self.model.image_encoder.parameters()) + list(self.model.denoiser.parameters())
        if self.model.refinement is not None:
            params += list(self.model.refinement.parameters())
        if head is not None:
            params += list(head.parameters())
        if self.config.joint_finetune:
            params += list(self.model.autoencoder.decoder.parameters())
        return params

    def _setup_stage(self, stage: str) -> None:
        """A fresh optimiser per stage; in stage 2 only what is trained has gradients."""
        if self.optimizer_stage == stage:
            return
        self.model.requires_grad_(False)
        params = self._trainable_parameters(stage)
        for p in params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(params, lr=self._base_lr(stage), weight_decay=self.config.weight_decay)
        self.optimizer_stage = stage

    def _base_lr(self, stage: str) -> float:
        if stage == "autoencoder":
            return self.config.autoencoder_learning_rate or self.config.learning_rate
        return self.config.learning_rate

    def learning_rate(self, epoch: int) -> float:
        """Polynomial decay (nnU-Net's) within each stage, restarting at the stage change."""
        stage = self.config.stage_of(epoch)
        start, length = (0, self.config.autoencoder_epochs) if stage == "autoencoder" else (self.config.autoencoder_epochs, self.config.diffusion_epochs)
        return self._base_lr(stage) * (1 - (epoch - start) / max(length, 1)) ** 0.9

    def batch_stream(self):
        """This epoch's augmented training batches, started lazily (background workers when configured).

        Every epoch gets its own stream, seeded by seed, epoch and rank (:func:`stream_seed`) and
        closed at the epoch's end, so the batches of an epoch do not depend on where an earlier
        session stopped: a resumed run draws exactly the batches an uninterrupted one would, and
        each rank draws other patches. A stream yields this rank's share of the global batch.
        Cases are decompressed once into a cache shared by all epochs, filled before background
        workers fork so they share it.
        """
        if self._stream is None:
            from latdiffunet.training import data_loading as dl

            if self._case_cache is None:
                self._case_cache = dl.CaseCache(self.data_folder)
                if self.config.num_workers > 0:
                    self._case_cache.preload(self.train_cases)
            patch = self.configuration["patch_size"]
            dim = self.configuration["dimension"]
            initial = dl.initial_patch_size(patch, dl.ROTATION_DEGREES, dl.SCALE_RANGE) if self.config.augment else patch
            foreground = local_foreground_fraction(self.global_batch_size, self.config.foreground_oversampling,
                                                   self.dist.rank, self.dist.world_size)
            seed = stream_seed(self.config.seed, self.epoch, self.dist.rank)
            loader = dl.PatchDataLoader(
                self.data_folder, self.train_cases, patch, self.local_batch_size, dim, foreground, seed=seed,
                initial_patch_size=initial, cache=self._case_cache,
            )
            transforms = dl.build_transforms(dim, patch, augment=self.config.augment)
            self._stream = dl.make_batch_stream(loader, transforms, self.config.num_workers, seed)
        return self._stream

    def shutdown(self) -> None:
        if self._stream is not None:
            from latdiffunet.training.data_loading import close_batch_stream

            close_batch_stream(self._stream)
        self._stream = None

    # ------------------------------------------------------------------ steps
    def _to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Host batch -> device tensors, checked on the host (where reading labels costs no wait).

        On CUDA the arrays go through pinned memory with non-blocking copies: the copy is queued
        behind the previous step's kernels instead of stopping the host until the device is idle.
        """
        seg = torch.as_tensor(batch["seg"])
        check_label_values(seg, self.model.config["num_classes"], self.ignore_label)
        return self._copy_to_device(torch.as_tensor(batch["data"], dtype=torch.float32)), self._copy_to_device(seg).long()

    def _copy_to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def train_step(self, batch: dict, stage: str) -> dict[str, torch.Tensor]:
        """One optimiser step on this rank's share of a batch; returns the loss and its parts as
        detached device tensors (reading them would make the host wait for the device)."""
        data, seg = self._to_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_for(self.device, self.amp):
            loss, parts = (self.autoencoder_loss if stage == "autoencoder" else self.diffusion_loss)(data, seg)
        self.scaler.scale(loss).backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.dist.average_gradients(params)  # before unscaling: every rank then sees the same inf/NaN
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._update_ema()
        return parts | self.auxiliary_step(stage) | {"loss": loss.detach()}

    # ------------------------------------------------------------------ hooks for variants (see training/adversarial.py)
    def extra_diffusion_loss(
        self, data: torch.Tensor, z0: torch.Tensor, z_t: torch.Tensor, t_host: torch.Tensor, output: torch.Tensor
    ) -> ExtraLoss | None:
        """Terms a variant adds to a diffusion step, from the step's image, clean and noisy latents,
        timesteps (on the host) and denoiser output; None (the default) adds nothing."""
        return None

    def auxiliary_step(self, stage: str) -> dict[str, torch.Tensor]:
        """A variant's own optimiser step after the model's (a discriminator's); returns its loss
        parts (detached) for the log. Everything it changes goes into :meth:`checkpoint_state` and
        back through :meth:`load_extra_state`, so resume stays exact."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what a variant added to :meth:`checkpoint_state` (called at the end of :meth:`load`)."""

    @torch.no_grad()
    def _update_ema(self) -> None:
        """EMA with warm-up: (1 + n) / (10 + n) caps the decay early on, so a short run's EMA is
        not dominated by its random initial weights. One fused update for all trained tensors
        (a GPU would otherwise launch one small kernel per tensor, every step)."""
        self.ema_updates += 1
        d = min(self.config.ema_decay, (1 + self.ema_updates) / (10 + self.ema_updates))
        pairs = [(e, p) for e, p in zip(self.ema.parameters(), self.model.parameters()) if p.requires_grad]
        if pairs:
            torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1 - d)
        for e, b in zip(self.ema.buffers(), self.model.buffers()):
            e.copy_(b)

    @torch.no_grad()
    def calibrate_latent_scale(self, num_batches: int = 10) -> float:
        """Set latent_scale = 1/std of the training latents: noise schedules assume unit variance.

        Each rank measures ``num_batches`` of its own batches; the standard deviation is pooled
        over all of them, so every rank sets the same scale.
        """
        self.model.eval()
        self.model.latent_scale.fill_(1.0)
        latents = []
        for _ in range(num_batches):
            _, seg = self._to_device(next(self.batch_stream()))
            z = self.model.encode_mask(one_hot(seg, self.model.config["num_classes"], self.ignore_label)).float()
            valid = valid_mask(seg, self.ignore_label)
            if valid is not None:  # latents over unannotated voxels only are never trained on
                z = z[latent_valid_fraction(valid, z.shape).expand_as(z) > 0]
            latents.append(z.flatten())
        z = torch.cat(latents)
        mean = z.mean()
        std = pooled_std(self.dist.gather(torch.stack([z.new_tensor(float(z.numel())), mean, ((z - mean) ** 2).sum()])))
        self.model.latent_scale.fill_(1.0 / max(std, 1e-6))
        self.ema.load_state_dict(self.model.state_dict())  # EMA starts from the finished autoencoder
        self.ema_updates = 0
        self.model.train()
        return 1.0 / max(std, 1e-6)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "optimizer_stage": self.optimizer_stage,
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "ema_updates": self.ema_updates,
            "autoencoder_epochs": self.config.autoencoder_epochs,
            "best_val_dice": self.best_val_dice,
            "best_val_per_case": self.best_val_per_case,
            "last_val_per_case": self.last_val_per_case,
            "last_val_epoch": self.last_val_epoch,
            "training_seconds": self.training_seconds(),
            "epoch_times": self._epoch_times,
            "validation_pacing": self.validation_pacer.state_dict(),
            "rng": rng_state(),
            "trainer": type(self).__name__,
            "plans_name": self.plans["plans_name"],
            "configuration": self.configuration_name,
            "fold": str(self.fold),
            "network": self.configuration["network"],
            "diffusion": self.configuration["diffusion"],
        }

    def save(self, name: str) -> None:
        """Rank 0 writes (every rank holds the same weights)."""
        if self.dist.is_main:
            save_checkpoint(self.checkpoint_state(), self.output_folder / name)

    def load(self, path: Path) -> None:
        state = load_checkpoint(path, self.device)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.epoch = int(state["epoch"])
        self.ema_updates = int(state["ema_updates"])
        self.best_val_dice = float(state["best_val_dice"])
        self.best_val_per_case = {k: float(v) for k, v in state.get("best_val_per_case", {}).items()}
        self.last_val_per_case = {k: float(v) for k, v in state.get("last_val_per_case", {}).items()}
        self.last_val_epoch = int(state.get("last_val_epoch", -1))
        if state["optimizer"] is not None:
            self._setup_stage(state["optimizer_stage"])
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler.is_enabled() and state["scaler"]:  # empty when written without float16 loss scaling
            self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        # checkpoints written before these keys existed: the earlier time is unknown, not counted
        self.training_seconds_before = float(state.get("training_seconds", 0.0))
        self._epoch_times = {k: [float(t) for t in v] for k, v in state.get("epoch_times", {}).items()}
        self.validation_pacer.load_state_dict(state.get("validation_pacing", {}))
        self.load_extra_state(state)

    # ------------------------------------------------------------------ main loop
    def run(self, resume: bool = False) -> dict:
        """Train, then validate; under several processes every rank trains and rank 0 alone
        validates (the others return ``{}``)."""
        self.output_folder.mkdir(parents=True, exist_ok=True)
        if resume:
            self._resume()
        else:
            self.logger.truncate(0)
            self._forget_earlier_choices()
        self.dist.broadcast_module_(self.model)  # the same starting weights on every rank, whatever each built or read
        self.dist.broadcast_module_(self.ema)
        self.logger.write_json("training_config.json", {"trainer": type(self).__name__, "processes": self.dist.world_size}
                               | self.config.to_dict() | {HELD_BACK_KEY: self.held_back.to_dict()})
        if self.dist.is_main:
            self._write_run_files()
        self._run_start = time.time()
        self._plan_epochs = (self.config.autoencoder_epochs, self.config.diffusion_epochs)
        if self.config.time_budget_minutes is not None and self._epoch_times:
            self._fit_epochs_to_budget(self.config.stage_of(self.epoch - 1))  # resumed: fit what is left first
        self.logger.log(
            f"training {type(self).__name__} fold {self.fold} on {self.device}"
            + (f" in {self.dist.world_size} processes (global batch {self.global_batch_size}, {self.local_batch_size} per process)"
               if self.dist.enabled else "")
            + f": {len(self.train_cases)} train / "
            f"{len(self.val_cases)} val cases, epochs {self.epoch}->{self.config.total_epochs} "
            f"({self.config.autoencoder_epochs} autoencoder + {self.config.diffusion_epochs} diffusion)"
        )
        for line in (f"held back for choosing checkpoint_best and the temperature: {self.held_back.reason}",
                     *self.held_back.warnings):
            self.logger.log(line)
        self.plans_check = GpuPlansOnCpuCheck(
            self.plans, self.configuration, self.device.type, self.config.batch_size or self.configuration["batch_size"],
            self.config.iterations_per_epoch, self.config.total_epochs, self.config.stage_of(self.epoch), self.logger.log,
            clock=time.time,  # the clock of `start`
        )
        try:
            while self.epoch < self.config.total_epochs:
                self._run_epoch()
        finally:
            self.shutdown()
        self.save("checkpoint_final.pth")
        if not self.dist.is_main:
            return {}
        self.logger.log(f"training finished; final checkpoint {self.output_folder / 'checkpoint_final.pth'}")
        return self.final_validation()

    def _write_run_files(self) -> None:
        """plans.json + dataset.json beside the folds: prediction needs nothing else."""
        run = self.output_folder.parent
        write_json(self.plans, run / "plans.json")
        write_json(load_json(self.preprocessed_dataset_folder / "dataset.json", "dataset.json"), run / "dataset.json")

    def _forget_earlier_choices(self) -> None:
        """A run that starts from scratch deletes what an earlier run in this folder chose: its best
        checkpoint and its temperature table must not stand in for this run's."""
        if self.dist.is_main:
            for name in ("checkpoint_best.pth", "sampling_calibration.json"):
                (self.output_folder / name).unlink(missing_ok=True)

    def _resume(self) -> None:
        latest = self.output_folder / "checkpoint_latest.pth"
        if not latest.is_file():
            self.logger.log(f"--c given but no checkpoint in {self.output_folder}: starting from scratch")
            self._forget_earlier_choices()
            return
        self.load(latest)
        self.logger.truncate(self.epoch)
        self.logger.log(f"resuming from {latest} at epoch {self.epoch} (best validation Dice so far {self.best_val_dice:.4f}, "
                        f"{self.training_seconds_before / 60:.1f} min trained)")

    def train_iterations(self, stage: str, start: float) -> dict[str, float]:
        """The epoch's training steps; returns each loss part's mean over them and over the ranks.

        The parts stay on the device and are summed there. The host reads them once every
        ``loss_readout_every`` steps (rank 0's progress bar) and once at the end (one all-reduce
        for the log), so it keeps queuing work instead of waiting for the device after each step.
        ``start``: when the epoch began (the CPU-speed check times the first steps from it).
        """
        n = self._iterations_this_epoch()
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}  # a part some steps skip (sample_loss_every) is averaged over the steps that had it
        bar = tqdm(range(n), desc=f"epoch {self.epoch} ({stage})", leave=False, dynamic_ncols=True, disable=not self.dist.is_main)
        for i in bar:
            self._step_in_epoch = i
            parts = self.train_step(next(self.batch_stream()), stage)
            if self.plans_check is not None:
                self.plans_check.iteration_done(i, start)
            for k, v in parts.items():
                sums[k] = sums[k] + v if k in sums else v
                counts[k] = counts.get(k, 0) + 1
            if self.dist.is_main and (i + 1) % self.config.loss_readout_every == 0:
                bar.set_postfix(loss=f"{float(sums['loss']) / (i + 1):.4f}")
        bar.close()
        keys = sorted(sums)
        means = self.dist.mean_over_ranks(torch.stack([sums[k].float() / counts[k] for k in keys]))
        return dict(zip(keys, means.tolist()))

    def _ends_a_stage(self, epochs_done: int) -> bool:
        """Whether a run that has trained ``epochs_done`` epochs has just finished a stage (by the
        current plan, which the budget may change after an epoch)."""
        return epochs_done in (self.config.autoencoder_epochs, self.config.total_epochs)

    def _run_epoch(self) -> None:
        stage = self.config.stage_of(self.epoch)
        # this epoch's noise levels, noise and sampler draws: seeded like its batches, so a resumed
        # run draws what an uninterrupted one would, and each rank draws its own
        torch.manual_seed(stream_seed(self.config.seed, self.epoch, self.dist.rank))
        if stage == "diffusion" and self.optimizer_stage != "diffusion":
            self.logger.log("stage 2: autoencoder frozen; calibrating latent scale")
            if self.dist.is_main:
                self.logger.write_json("autoencoder_reconstruction.json", self.validate("autoencoder", final=True))
            self.dist.barrier()
            scale = self.calibrate_latent_scale()
            self.logger.log(f"latent scale = {scale:.4f}")
        self._setup_stage(stage)
        lr = self.learning_rate(self.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        if self._iterations_this_epoch() < self.config.iterations_per_epoch:
            self.logger.log(f"epoch {self.epoch}: {self._iterations_this_epoch()} of {self.config.iterations_per_epoch} steps, "
                            "a shortened last epoch that fills the time budget")
        start = time.time()
        losses = self.train_iterations(stage, start)
        self.shutdown()  # the next epoch starts its own stream (see batch_stream); no workers during validation
        metrics = {"epoch": self.epoch, "stage": stage, "lr": lr, "train_loss": losses.pop("loss")} | losses
        last_epoch_of_stage = self._ends_a_stage(self.epoch + 1)
        self.validation_pacer.record_training(time.time() - start)
        self._periodic_validation(self.epoch, stage, metrics, last_epoch_of_stage)
        metrics["epoch_time"] = time.time() - start
        self.epoch += 1
        if self.config.time_budget_minutes is not None:
            self._epoch_times.setdefault(stage, []).append(metrics["epoch_time"])
            self._fit_epochs_to_budget(stage)
            if not last_epoch_of_stage and self._ends_a_stage(self.epoch):
                # The budget made this epoch its stage's last only after it ran: validate it as the
                # last of its stage now. Otherwise checkpoint_best stays at an earlier epoch and the
                # epochs after it are never compared (a CVC-ClinicDB run reported its epoch 4 of 7,
                # before any epoch with the sample loss). The same decision on every rank (the
                # budget's is broadcast), so the barrier inside is reached by all.
                last_epoch_of_stage = True
                self._periodic_validation(self.epoch - 1, stage, metrics, last_of_stage=True)
        # history first: a kill between the two loses nothing (resume trims rows past the checkpoint)
        self.logger.record_epoch(metrics)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k not in ("lr",))
        self.logger.log(f"epoch {metrics['epoch']} [{stage}] lr {lr:.2e}: {shown}")
        if metrics.get("new_best"):
            self.save("checkpoint_best.pth")
        if self.epoch % self.config.checkpoint_every == 0 or self.epoch == self.config.total_epochs or last_epoch_of_stage:
            self.save("checkpoint_latest.pth")

