"""``latdiff_train DATASET FOLD``: train one fold (0-4 or ``all``) of one configuration."""

from __future__ import annotations

import argparse
import sys

from latdiffunet.utilities.cli import friendly_errors, set_cpu_friendly_threading


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latdiff_train", description="Train the latent diffusion segmenter on one fold.")
    p.add_argument("dataset", help="dataset ID or name, e.g. 4 or Dataset004_Hippocampus")
    p.add_argument("fold", help="fold 0-4, or 'all' (train on every case, no validation)")
    p.add_argument("-c", "--configuration", default=None, help="2d or 3d (default: 3d when planned, else 2d)")
    p.add_argument("-p", "--plans", default="latdiffPlans", help="plans identifier (default latdiffPlans; latdiffPlans_tiny for the CPU preset)")
    p.add_argument("-tr", "--trainer", default="LatentDiffusionTrainer", help="trainer class name (variants: see latdiffunet/training/variants.py)")
    p.add_argument("--epochs", type=int, default=None, help="total epochs of both stages; split between them like the plans' ratio")
    p.add_argument("--ae-epochs", type=int, default=None, help="autoencoder epochs (default: from the plans or --epochs)")
    p.add_argument("--iters-per-epoch", type=int, default=None, help="training iterations per epoch")
    p.add_argument("--batch-size", type=int, default=None, help="override the plans' batch size")
    p.add_argument("--budget-minutes", type=float, default=None, help="wall-clock budget: epochs are rescaled to fit it (final validation included)")
    p.add_argument("--device", default=None, choices=["cuda", "cpu", "mps"], help="default: cuda if available, else cpu")
    p.add_argument("--num-workers", type=int, default=None, help="augmentation worker processes (0 = in the main process)")
    p.add_argument("--c", dest="resume", action="store_true", help="continue from checkpoint_latest.pth")
    p.add_argument("--val-only", action="store_true", help="only run the final validation of a trained fold")
    return p


def split_epochs(total: int, plan_ae: int, plan_diffusion: int) -> tuple[int, int]:
    """Keep the plans' ratio; at least one epoch per stage when total >= 2."""
    if total < 2:
        return total, 0
    ae = int(round(total * plan_ae / max(plan_ae + plan_diffusion, 1)))
    ae = min(max(ae, 1), total - 1)
    return ae, total - ae


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_cpu_friendly_threading()
    import torch

    from latdiffunet import paths
    from latdiffunet.errors import UserInputError
    from latdiffunet.experiment_planning.planner import load_plans
    from latdiffunet.preprocessing.splits import validate_splits
    from latdiffunet.raw_dataset import parse_dataset_json, resolve_dataset_name
    from latdiffunet.training.config import TrainerConfig
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
    fold = args.fold if args.fold == "all" else _int_fold(args.fold)
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
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda but no CUDA GPU is visible", fix="use --device cpu")
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
    trainer = trainer_class(plans, configuration, fold, pre, output, device, config, splits, raw if raw.is_dir() else None)
    if args.val_only:
        trainer._write_run_files()
        summary = trainer.final_validation()
    else:
        summary = trainer.run(resume=args.resume)
    if summary:
        print(f"validation mean foreground Dice: {summary['foreground_mean']['Dice']:.4f} -> {output / 'validation' / 'summary.json'}")
    return 0


def _int_fold(text: str) -> int:
    from latdiffunet.errors import UserInputError

    if not text.isdigit():
        raise UserInputError(f"fold must be 0-4 or 'all', got {text!r}", fix="give the fold as a number, e.g. latdiff_train 4 0")
    return int(text)


if __name__ == "__main__":
    sys.exit(main())
