"""Run nnU-Net v2 as the baseline, in its own process, on our data, split and time budget.

Run as ``python -m latdiffunet.evaluation.nnunet_baseline ...`` by ``latdiff_benchmark``; never
imported by the core package (nnunetv2 is an optional extra: ``pip install -e .[benchmark]``).

- nnU-Net reads our raw folder unchanged (``nnUNet_raw`` = ``LATDIFF_RAW``): the formats are one.
- Our ``splits_final.json`` is copied into nnU-Net's preprocessed folder before training, so both
  methods train and validate on exactly the same cases.
- :class:`nnUNetTrainerTimeBudget` is nnU-Net's default trainer with one change: after the first
  epoch it sets the number of epochs (and the poly learning-rate schedule's length) to what fits
  the wall-clock budget, keeping a tenth of it for the final validation.
- Validation uses nnU-Net's own ``perform_actual_validation(save_probabilities=True)``, whose
  segmentations and probabilities (original geometry) our evaluator then scores.

nnunetv2 2.8 imports every trainer module when it looks one up; its Primus trainers need
torchvision, which does not import beside the CPU build of torch. An empty stand-in module for
them is registered first (only the Primus trainers are lost).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import time
import types
from pathlib import Path

PRIMUS_MODULE = "nnunetv2.training.nnUNetTrainer.primus.primus_trainers"
CONFIGURATION_NAMES = {"2d": "2d", "3d": "3d_fullres"}


def _prepare_environment(raw: Path, workdir: Path, num_processes: int) -> None:
    os.environ["nnUNet_raw"] = str(raw)
    os.environ["nnUNet_preprocessed"] = str(workdir / "nnUNet_preprocessed")
    os.environ["nnUNet_results"] = str(workdir / "nnUNet_results")
    os.environ.setdefault("nnUNet_n_proc_DA", str(num_processes))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for key in ("nnUNet_preprocessed", "nnUNet_results"):
        Path(os.environ[key]).mkdir(parents=True, exist_ok=True)
    sys.modules.setdefault(PRIMUS_MODULE, types.ModuleType(PRIMUS_MODULE))


def make_budget_trainer(base):
    class nnUNetTrainerTimeBudget(base):
        """nnU-Net's training loop with a wall-clock budget checked after every iteration.

        Epochs are nnU-Net's (250 iterations unless told otherwise); after each epoch the number of
        epochs and the poly schedule's length are set to what fits the budget, the last one partly. When the budget runs
        out inside an epoch, that epoch ends early (its validation step is skipped) and training
        ends as nnU-Net's would, so a plan whose single epoch exceeds the budget still stops on time.
        """

        budget_seconds: float = 1200.0

        def run_training(self):
            import torch

            self.on_train_start()
            start = time.time()
            deadline = start + 0.9 * self.budget_seconds
            out_of_time = False
            while self.current_epoch < self.num_epochs and not out_of_time:
                epoch_start = time.time()
                self.on_epoch_start()
                self.on_train_epoch_start()
                outputs = []
                for _ in range(self.num_iterations_per_epoch):
                    outputs.append(self.train_step(next(self.dataloader_train)))
                    if time.time() > deadline:
                        out_of_time = True
                        break
                self.on_train_epoch_end(outputs)
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    n_val = 1 if out_of_time else self.num_val_iterations_per_epoch
                    val = [self.validation_step(next(self.dataloader_val)) for _ in range(n_val)]
                    self.on_validation_epoch_end(val)
                self.on_epoch_end()
                self.iterations_done = getattr(self, "iterations_done", 0) + len(outputs)
                epoch_time = time.time() - epoch_start
                # rounded up: the last epoch is cut at the deadline by the check above, so the run
                # trains for its whole budget (rounding down left up to an epoch unused: on LIDC
                # 983 of 1200 s) as ours does
                fits = math.ceil(max(deadline - time.time(), 0) / epoch_time)
                self.num_epochs = max(self.current_epoch, min(self.current_epoch + fits, 1000))
                self.lr_scheduler.max_steps = max(self.num_epochs, 1)
            self.on_train_end()

    return nnUNetTrainerTimeBudget


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="DatasetXXX_Name")
    p.add_argument("--configuration", default="2d", choices=sorted(CONFIGURATION_NAMES))
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--raw", required=True, type=Path)
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--splits", required=True, type=Path, help="our splits_final.json")
    p.add_argument("--budget-minutes", type=float, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--iterations-per-epoch", type=int, default=None, help="default nnU-Net's 250")
    p.add_argument("--gpu-memory-gb", type=float, default=None, help="nnU-Net planner's memory target (default its 8 GB)")
    p.add_argument("--stats", required=True, type=Path, help="where to write timings as JSON")
    args = p.parse_args(argv)
    _prepare_environment(args.raw, args.workdir, args.num_processes)

    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    dataset_id = int(args.dataset[len("Dataset"):len("Dataset") + 3])
    configuration = CONFIGURATION_NAMES[args.configuration]
    pre = Path(os.environ["nnUNet_preprocessed"]) / args.dataset
    t0 = time.time()
    if not (pre / "nnUNetPlans.json").is_file():
        extract_fingerprints([dataset_id], num_processes=args.num_processes, check_dataset_integrity=False)
        plan_experiments([dataset_id], gpu_memory_target_in_gb=args.gpu_memory_gb)
    if not (pre / f"nnUNetPlans_{configuration}").is_dir():
        preprocess([dataset_id], configurations=(configuration,), num_processes=(args.num_processes,))
    shutil.copy(args.splits, pre / "splits_final.json")
    t_plan = time.time() - t0

    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    plans["continue_training"] = False  # nnunetv2 2.8's run_training adds this key before constructing a trainer
    trainer_class = make_budget_trainer(nnUNetTrainer)
    trainer = trainer_class(plans, configuration, args.fold, dataset_json, device=torch.device(args.device))
    trainer.budget_seconds = args.budget_minutes * 60
    if args.iterations_per_epoch:
        trainer.num_iterations_per_epoch = args.iterations_per_epoch
        trainer.num_val_iterations_per_epoch = max(1, args.iterations_per_epoch // 5)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t1 = time.time()
    trainer.run_training()
    t_train = time.time() - t1
    t2 = time.time()
    trainer.perform_actual_validation(save_probabilities=True)
    t_val = time.time() - t2
    cfg = plans["configurations"][configuration]
    stats = {
        "method": "nnU-Net v2 (nnUNetTrainer, ExperimentPlanner plans"
        + (f" for {args.gpu_memory_gb:g} GB" if args.gpu_memory_gb else "")
        + f", {trainer.num_iterations_per_epoch} it/epoch, time-budgeted)",
        "nnunetv2_version": __import__("importlib.metadata").metadata.version("nnunetv2"),
        "planning_and_preprocessing_seconds": round(t_plan, 1),
        "training_seconds": round(t_train, 1),
        "validation_prediction_seconds": round(t_val, 1),
        "epochs": int(trainer.current_epoch),
        "iterations_per_epoch": int(trainer.num_iterations_per_epoch),
        "iterations_done": int(getattr(trainer, "iterations_done", 0)),
        "batch_size": cfg["batch_size"],
        "patch_size": cfg["patch_size"],
        "validation_folder": str(Path(trainer.output_folder) / "validation"),
        "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if args.device == "cuda" else None,
        "peak_rss_mib": round(max(resource.getrusage(r).ru_maxrss for r in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024, 1),
    }
    args.stats.parent.mkdir(parents=True, exist_ok=True)
    args.stats.write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
