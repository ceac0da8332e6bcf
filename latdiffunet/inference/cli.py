"""``latdiff_predict -i IN -o OUT -d DATASET``: segmentations + uncertainty maps for a folder."""

from __future__ import annotations

import argparse
import sys

from latdiffunet.utilities.cli import friendly_errors, set_cpu_friendly_threading


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latdiff_predict", description="Predict segmentations and uncertainty maps with trained folds.")
    p.add_argument("-i", "--input", required=True, help="folder of images named CASE_0000.ext (one file per channel)")
    p.add_argument("-o", "--output", required=True,
                   help="output folder (created). A case whose input is bad is skipped and reported at the end, "
                        "after every other case is written; the exit code is then 2")
    p.add_argument("-d", "--dataset", required=True, help="dataset ID or name the model was trained on")
    p.add_argument("-c", "--configuration", default=None, help="2d or 3d (default: the one that was trained; 3d preferred)")
    p.add_argument("-p", "--plans", default="latdiffPlans", help="plans identifier (default latdiffPlans)")
    p.add_argument("-tr", "--trainer", default="LatentDiffusionTrainer", help="trainer name used in training")
    p.add_argument("-f", "--folds", nargs="+", default=None, help="folds to ensemble (default: every trained fold)")
    p.add_argument("--checkpoint", default=None, help="best or final (default: best when it exists)")
    p.add_argument("--num_samples", type=int, default=None, help="diffusion samples per fold (default from the plans)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default from the plans)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (predictions are reproducible)")
    p.add_argument("--save_samples", action="store_true", help="also write every sample as a label image")
    p.add_argument("--save_probabilities", action="store_true", help="also write mean class probabilities (.npz)")
    p.add_argument("--noise_scale", type=float, default=None,
                   help="sampling temperature: scale of the starting noise (default: the value calibrated at the end of "
                        "training, see sampling_calibration.json; 0 = every sample the same, 1 = the trained distribution)")
    p.add_argument("--disable_tta", action="store_true",
                   help="no test-time mirroring (by default sample k is drawn on the image mirrored by the k-th "
                        "combination of axes and mirrored back, as the plans' inference.test_time_mirroring says)")
    p.add_argument("--save_montage", action="store_true",
                   help="also write CASE_montage.png: image, raters when known, mean, entropy and up to 8 samples")
    p.add_argument("--device", default=None, choices=["cuda", "cpu", "mps"], help="default: cuda if available")
    p.add_argument("--num_parts", type=int, default=1, help="split the cases into this many shards")
    p.add_argument("--part_id", type=int, default=0, help="which shard this process predicts (0-based)")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose segmentation already exists")
    p.add_argument("-np", "--num_processes", type=int, default=2, help="processes for reading/writing (0 = none)")
    return p


def find_run_folder(results_dataset, trainer: str, plans: str, configuration: str | None):
    from latdiffunet.errors import UserInputError

    candidates = [configuration] if configuration else ["3d", "2d"]
    for c in candidates:
        folder = results_dataset / f"{trainer}__{plans}__{c}"
        if folder.is_dir():
            return folder
    raise UserInputError(
        f"no trained model {trainer}__{plans}__{configuration or '(3d|2d)'}", path=results_dataset,
        fix="train it with latdiff_train, or give -tr/-p/-c matching a trained model",
    )


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_cpu_friendly_threading()
    from pathlib import Path

    import torch

    from latdiffunet import paths
    from latdiffunet.errors import UserInputError
    from latdiffunet.inference.predict_folder import check_output_folder, predict_folder
    from latdiffunet.inference.predictor import LatentDiffusionPredictor, PredictionSettings
    from latdiffunet.raw_dataset import resolve_dataset_name

    check_output_folder(Path(args.output))  # before the model is loaded: a wrong -o fails at once
    name = resolve_dataset_name(args.dataset, paths.results_root(), paths.preprocessed_root(), paths.raw_root())
    run_folder = find_run_folder(paths.results_root() / name, args.trainer, args.plans, args.configuration)
    folds = args.folds or sorted(p.name[len("fold_"):] for p in run_folder.glob("fold_*") if p.is_dir())
    for fold in folds:  # joined to the run folder as fold_<f>: a number or 'all', nothing else
        if not (fold.isdigit() or fold == "all"):
            raise UserInputError(f"fold {fold!r} is not a fold number or 'all'", path=run_folder, fix="give folds like -f 0 1 2")
    if not folds:
        raise UserInputError("no fold_* folders", path=run_folder, fix="train at least one fold")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    predictor = LatentDiffusionPredictor(run_folder, folds, device, args.checkpoint)
    inference = predictor.configuration["inference"]
    settings = PredictionSettings(
        num_samples=args.num_samples or inference["num_samples"], steps=args.steps or inference["sampling_steps"],
        seed=args.seed, save_samples=args.save_samples, save_probabilities=args.save_probabilities,
        save_montage=args.save_montage, noise_scale=args.noise_scale, mirror=False if args.disable_tta else None,
    )
    done = predict_folder(
        Path(args.input), Path(args.output), predictor, settings, args.num_parts, args.part_id, args.overwrite, args.num_processes
    )
    print(
        f"predicted {len(done)} case(s) with folds {folds} ({settings.num_samples} samples x {settings.steps} steps each) -> {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
