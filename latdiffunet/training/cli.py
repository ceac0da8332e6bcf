"""``latdiff_train DATASET FOLD [FOLD ...]``: train folds (0-4 or ``all``) of one configuration.

``all`` means what it means in nnU-Net: one model trained on every case, no validation, no
cross-validation number; the model to deploy once cross-validation has chosen the configuration.
Several folds (``latdiff_train 4 0 1 2 3 4``) are trained one after the other in this process; with
``--c`` a fold that already finished (``checkpoint_final.pth`` and ``validation/summary.json``) is
skipped, so a killed loop is restarted with the same command. When two or more cross-validation
folds are done, their summaries are merged into
``crossval_results_folds_<folds>/summary.json`` (``evaluation/cross_validation.py``). On several
GPUs, one fold per GPU in parallel is faster: see the README.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from latdiffunet.training.config import TrainerConfig
from latdiffunet.utilities.cli import friendly_errors, set_cpu_friendly_threading

if TYPE_CHECKING:
    import torch

    from latdiffunet.training.distributed import DistributedContext
    from latdiffunet.training.held_back import HeldBackSelection


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latdiff_train", description="Train the latent diffusion segmenter on one or more folds.")
    p.add_argument("dataset", help="dataset ID or name, e.g. 4 or Dataset004_Hippocampus")
    p.add_argument("folds", nargs="+", metavar="fold",
                   help="fold 0-4, or 'all' (train on every case, no validation, as nnU-Net's 'all'); several folds, "
                        "e.g. 0 1 2 3 4, are trained one after the other (--budget-minutes applies to each), then their "
                        "validation summaries are merged into the cross-validation summary")
    p.add_argument("-c", "--configuration", default=None, help="2d or 3d (default: 3d when planned, else 2d)")
    p.add_argument("-p", "--plans", default="latdiffPlans", help="plans identifier (default latdiffPlans: sized for the CPU or the GPU, see latdiff_plan_and_preprocess --target; latdiffPlans_tiny for the tiny preset)")
    p.add_argument("-tr", "--trainer", default="LatentDiffusionTrainer", help="trainer class name (variants: see latdiffunet/training/variants.py)")
    p.add_argument("--epochs", type=int, default=None, help="total epochs of both stages; split between them like the plans' ratio")
    p.add_argument("--ae-epochs", type=int, default=None, help="autoencoder epochs (default: from the plans or --epochs)")
    p.add_argument("--iters-per-epoch", type=int, default=None, help="training iterations per epoch")
    p.add_argument("--batch-size", type=int, default=None, help="override the plans' batch size")
    p.add_argument("--budget-minutes", type=float, default=None, help="wall-clock budget: epochs are rescaled to fit it (final validation included)")
    p.add_argument("--device", default=None, choices=["cuda", "cpu", "mps"], help="default: cuda if available, else cpu")
    p.add_argument("--num-workers", type=int, default=None, help="augmentation worker processes (0 = in the main process)")
    p.add_argument("--c", dest="resume", action="store_true",
                   help="continue from checkpoint_latest.pth; with several folds, finished folds are skipped")
    p.add_argument("--val-only", action="store_true", help="only run the final validation of a trained fold")
    p.add_argument("--nproc", "--num-gpus", dest="nproc", type=int, default=1, metavar="N",
                   help="train data-parallel in N processes on this machine, one per GPU (on the CPU: gloo), started "
                        "through torchrun; the plans' batch size is the global batch and N must divide it. Several "
                        "machines: start torchrun yourself (README, 'Many GPUs / a cluster')")
    return p


def split_epochs(total: int, plan_ae: int, plan_diffusion: int) -> tuple[int, int]:
    """Keep the plans' ratio; at least one epoch per stage when total >= 2."""
    if total < 2:
        return total, 0
    ae = int(round(total * plan_ae / max(plan_ae + plan_diffusion, 1)))
    ae = min(max(ae, 1), total - 1)
    return ae, total - ae


@dataclass
class TrainingRun:
    """Everything ``latdiff_train`` resolved from its arguments, before any process trains."""

    trainer_class: type
    plans: dict
    configuration: str
    fold: int | str
    preprocessed: Path
    output: Path
    config: TrainerConfig
    splits: list[dict]
    raw: Path | None
    held_back: HeldBackSelection  # the cases that choose checkpoint_best and the temperature
    resumed: bool = False  # --c

    def finished(self) -> bool:
        """Trained and validated (fold ``all``: trained)."""
        done = (self.output / "checkpoint_final.pth").is_file()
        return done and (self.fold == "all" or (self.output / "validation" / "summary.json").is_file())


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    set_cpu_friendly_threading()
    import torch

    from latdiffunet.errors import UserInputError
    from latdiffunet.training.distributed import DistributedContext, destroy_process_group, init_process_group, launch_torchrun

    context = DistributedContext.from_environment()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    folds = _fold_list(args.folds)
    # user errors of every fold are reported here, once, before any process starts or any fold trains
    runs = [resolve_run(argparse.Namespace(**(vars(args) | {"fold": fold})), device) for fold in folds]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda but no CUDA GPU is visible", fix="use --device cpu")
    if not args.val_only:  # validation runs in one process anyway
        run = runs[0]
        _check_processes(args.nproc, context, device, run.config.batch_size or run.plans["configurations"][run.configuration]["batch_size"])
        if args.nproc > 1 and not context.enabled:
            return launch_torchrun(args.nproc, "latdiffunet.training.cli", argv_without_nproc(argv))

    if context.enabled:
        device = context.device(device.type)
        init_process_group(context, device)
    try:
        for run in runs:
            if len(runs) > 1 and args.resume and not args.val_only and run.finished():
                if context.is_main:
                    print(f"fold {run.fold} already finished ({run.output}); skipped")
                continue
            _train_or_validate(run, args.val_only, device, context)
    finally:
        destroy_process_group()
    cv_folds = [run.fold for run in runs if run.fold != "all"]
    if len(cv_folds) > 1 and context.is_main:
        _merge_cross_validation(runs[0].output.parent, cv_folds)
    return 0


def _train_or_validate(run: TrainingRun, val_only: bool, device: "torch.device", context: "DistributedContext") -> None:
    """Train one fold (or, with ``val_only``, only validate it) and print its validation Dice."""
    trainer = run.trainer_class(run.plans, run.configuration, run.fold, run.preprocessed, run.output, device, run.config,
                                run.splits, run.raw, distributed=context, held_back=run.held_back)
    if val_only:
        summary = {}
        if context.is_main:  # the other processes have nothing to do
            trainer._write_run_files()
            summary = trainer.final_validation()
    else:
        summary = trainer.run(resume=run.resumed)
    if summary:
        print(f"fold {run.fold}: validation mean foreground Dice {summary['foreground_mean']['Dice']:.4f} "
              f"({summary['checkpoint']}) -> {run.output / 'validation' / 'summary.json'}")


def _merge_cross_validation(run_folder: Path, folds: list[int]) -> None:
    """The cross-validation summary of ``folds`` when every one of them has a validation summary."""
    from latdiffunet.evaluation.cross_validation import accumulate_cross_validation, missing_folds

    if missing_folds(run_folder, folds):
        return
    summary, target = accumulate_cross_validation(run_folder, folds)
    print(f"cross-validation ({len(folds)} folds, {summary['num_cases']} cases): mean foreground Dice "
          f"{summary['foreground_mean']['Dice']:.4f} -> {target}")


def _fold_list(folds: list[str]) -> list[int | str]:
    """Each fold once, as an int or 'all', in the order given."""
    from latdiffunet.errors import UserInputError

    parsed = [fold if fold == "all" else _int_fold(fold) for fold in folds]
    repeated = sorted({str(f) for f in parsed if parsed.count(f) > 1})
    if repeated:
        raise UserInputError(f"fold(s) {', '.join(repeated)} given more than once", fix="name each fold once, e.g. 0 1 2 3 4")
    return parsed


def argv_without_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--num-gpus N`` (any spelling argparse accepted) for the
    processes torchrun starts: torchrun parses the arguments it passes on as well and stops at
    ``--nproc``, an ambiguous abbreviation of its own ``--nproc-per-node``."""
    kept, skip_value = [], False
    for token in argv:
        if skip_value:
            skip_value = False
            continue
        name = token.split("=", 1)[0]
        if len(name) > 2 and name.startswith("--") and ("--nproc".startswith(name) or "--num-gpus".startswith(name)):
            skip_value = "=" not in token
            continue
        kept.append(token)
    return kept


def _check_processes(nproc: int, context: "DistributedContext", device: "torch.device", global_batch: int) -> None:
    """Refuse process counts that cannot work, before torchrun starts any (``context`` holds
    several processes when this one already runs inside torchrun)."""
    import torch

    from latdiffunet.errors import UserInputError
    from latdiffunet.training.distributed import local_batch_size

    if nproc < 1:
        raise UserInputError(f"--nproc must be >= 1, got {nproc}")
    if context.enabled and nproc not in (1, context.world_size):
        raise UserInputError(f"--nproc {nproc} inside torchrun's {context.world_size} processes",
                             fix="leave --nproc out when starting torchrun yourself")
    processes = context.world_size if context.enabled else nproc
    if processes == 1:
        return
    if device.type == "mps":
        raise UserInputError("several processes need CUDA (NCCL) or the CPU (gloo), not MPS", fix="use --device cpu")
    if device.type == "cuda" and not context.enabled and nproc > torch.cuda.device_count():
        raise UserInputError(f"--nproc {nproc} but {torch.cuda.device_count()} CUDA device(s) visible",
                             fix=f"use --nproc {torch.cuda.device_count()} or fewer (one process per GPU)")
    local_batch_size(global_batch, processes)


def resolve_run(args: argparse.Namespace, device: "torch.device") -> TrainingRun:
    """Dataset, plans, configuration, fold, splits and trainer options from the arguments; every
    problem a user can fix is a :class:`UserInputError` naming the file."""
    from latdiffunet import paths
    from latdiffunet.errors import UserInputError
    from latdiffunet.experiment_planning.planner import load_plans
    from latdiffunet.preprocessing.splits import load_case_groups, validate_splits
    from latdiffunet.raw_dataset import parse_dataset_json, resolve_dataset_name
    from latdiffunet.training.held_back import resolve_held_back
    from latdiffunet.training.variants import get_trainer_class
    from latdiffunet.utilities.file_io import load_json

    name = resolve_dataset_name(args.dataset, paths.preprocessed_root(), paths.raw_root())
    pre = paths.preprocessed_root() / name
    plans_file = pre / f"{args.plans}.json"
    if not plans_file.is_file():
        raise UserInputError(
            "plans not found", path=plans_file,
            fix=f"run latdiff_plan_and_preprocess -d {args.dataset}" + (" --preset tiny" if args.plans.endswith("_tiny") else ""),
        )
    plans = load_plans(plans_file, "plans")
    configuration = args.configuration or ("3d" if "3d" in plans["configurations"] else "2d")
    if configuration not in plans["configurations"]:
        raise UserInputError(
            f"configuration {configuration!r} is not in the plans (has {sorted(plans['configurations'])})", path=plans_file,
            fix=f"choose one of them with -c, or plan it: latdiff_plan_and_preprocess -d {args.dataset} -c {configuration}",
        )
    fold = args.fold if args.fold == "all" else _int_fold(str(args.fold))
    rerun = f"run latdiff_plan_and_preprocess -d {args.dataset} -c {configuration}" + (" --preset tiny" if args.plans.endswith("_tiny") else "")
    data_folder = pre / plans["configurations"][configuration]["data_identifier"]
    if not data_folder.is_dir():
        raise UserInputError("preprocessed data not found", path=data_folder, fix=rerun)
    load_json(pre / "dataset.json", "dataset.json", fix=rerun)  # written by preprocessing; prediction needs it
    parse_dataset_json(pre / "dataset.json")
    splits_file = pre / "splits_final.json"
    # a case counts when both of its files are there (preprocessing writes CASE.npz, then CASE.json)
    preprocessed = sorted(p.stem for p in data_folder.glob("*.npz") if p.with_suffix(".json").is_file())
    splits = validate_splits(load_json(splits_file, "splits_final.json", fix=rerun), preprocessed, splits_file)
    if fold != "all" and fold >= len(splits):
        raise UserInputError(
            f"fold {fold} does not exist; this file has {len(splits)} folds", path=splits_file,
            fix=f"choose a fold 0-{len(splits) - 1} or 'all'",
        )
    trainer_class = get_trainer_class(args.trainer)
    config = TrainerConfig.from_plans(plans["configurations"][configuration], **trainer_class.config_overrides)
    if args.epochs is not None:
        ae, diff = split_epochs(args.epochs, config.autoencoder_epochs, config.diffusion_epochs)
        config = config.with_overrides(autoencoder_epochs=ae, diffusion_epochs=diff)
    workers = args.num_workers if args.num_workers is not None else (4 if device.type == "cuda" else 1)
    config = config.with_overrides(
        autoencoder_epochs=args.ae_epochs, iterations_per_epoch=args.iters_per_epoch, batch_size=args.batch_size, num_workers=workers,
        time_budget_minutes=args.budget_minutes,
    )
    run_folder = paths.results_root() / name / f"{args.trainer}__{args.plans}__{configuration}"
    output = run_folder / (f"fold_{fold}")
    if args.resume and (output / "checkpoint_latest.pth").is_file():
        from latdiffunet.utilities.checkpoint import load_checkpoint

        saved = load_checkpoint(output / "checkpoint_latest.pth", required=("epoch", "autoencoder_epochs", "model", "ema", "rng"))
        if args.ae_epochs is None and int(saved["autoencoder_epochs"]) != config.autoencoder_epochs and int(saved["epoch"]) >= int(saved["autoencoder_epochs"]):
            # stage 1 is over: keep its length so epochs stay numbered consistently
            diff_total = config.total_epochs - int(saved["autoencoder_epochs"])
            config = config.with_overrides(autoencoder_epochs=int(saved["autoencoder_epochs"]), diffusion_epochs=max(diff_total, 0))
    raw = paths.raw_root() / name
    raw = raw if raw.is_dir() else None
    fold_train, fold_val = (preprocessed, []) if fold == "all" else (splits[fold]["train"], splits[fold]["val"])
    held_back = resolve_held_back(output, fold, fold_train, fold_val, load_case_groups(pre, raw),
                                  continuing=args.resume or args.val_only)
    return TrainingRun(trainer_class, plans, configuration, fold, pre, output, config, splits, raw, held_back, bool(args.resume))


def _int_fold(text: str) -> int:
    from latdiffunet.errors import UserInputError

    if not text.isdigit():
        raise UserInputError(f"fold must be 0-4 or 'all', got {text!r}", fix="give the fold as a number, e.g. latdiff_train 4 0")
    return int(text)


if __name__ == "__main__":
    sys.exit(main())
