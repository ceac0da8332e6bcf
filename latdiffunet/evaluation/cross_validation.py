"""Cross-validation summary: the folds' final validations merged into one ``summary.json``.

Written to ``<results>/<dataset>/<trainer>__<plans>__<config>/crossval_results_folds_0_1_2_3_4/summary.json``,
where nnU-Net writes its own. nnU-Net copies every fold's validation predictions into that folder
and evaluates them again; here every fold was already scored by the same evaluator
(``latdiff_evaluate``, run by the final validation in the original geometry), so the per-case
entries of the folds' ``validation/summary.json`` are pooled instead: the same numbers without
copying every prediction. The summary keeps nnU-Net's layout (``metric_per_case`` with a ``fold``
per case, ``mean``, ``foreground_mean``: the mean over all cases of all folds) and adds:

- ``folds``: per fold its number of cases, per-class and foreground Dice, the checkpoint used and
  how it was chosen (``checkpoint_selection``, see ``training/held_back.py``);
- ``foreground_dice_over_folds``: mean and standard deviation of the folds' foreground Dice (how
  much the number moves with the split);
- the calibration, sample and multi-rater means over all cases, averaged as ``latdiff_evaluate``
  averages them within a fold.

``python -m latdiffunet.evaluation.cross_validation -d 4 -c 2d`` writes it; ``latdiff_train D 0 1 2 3 4``
and ``latdiff_find_best_configuration`` write it too.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

from latdiffunet.utilities.cli import friendly_errors

DEFAULT_FOLDS = (0, 1, 2, 3, 4)
LEGACY_SELECTION = ("not recorded: validated before held-back selection existed, when the sampling temperature (and "
                    "checkpoint_best, where used) was chosen on these validation cases, so this fold's number is optimistic")


def crossval_folder(run_folder: Path, folds: Sequence[int]) -> Path:
    """``run_folder/crossval_results_folds_0_1_2_3_4`` (nnU-Net's name)."""
    return run_folder / f"crossval_results_folds_{'_'.join(str(f) for f in folds)}"


def fold_summary_file(run_folder: Path, fold: int | str) -> Path:
    return run_folder / f"fold_{fold}" / "validation" / "summary.json"


def missing_folds(run_folder: Path, folds: Sequence[int]) -> list[int]:
    """The folds of ``folds`` without a final validation summary."""
    return [f for f in folds if not fold_summary_file(run_folder, f).is_file()]


def produce_fold_command(run_folder: Path, fold: int) -> str:
    """The ``latdiff_train`` command that writes the fold's summary (``--val-only`` when it is trained)."""
    trainer, plans, configuration = run_folder.name.split("__")
    dataset = run_folder.parent.name
    trained = (run_folder / f"fold_{fold}" / "checkpoint_final.pth").is_file()
    return f"latdiff_train {dataset} {fold} -c {configuration} -p {plans} -tr {trainer}" + (" --val-only" if trained else "")


def load_fold_summaries(run_folder: Path, folds: Sequence[int]) -> dict[int, dict]:
    """Each fold's ``validation/summary.json``; a missing one names the fold folder and the command."""
    from latdiffunet.errors import UserInputError
    from latdiffunet.utilities.file_io import load_json

    if not folds:
        raise UserInputError("no folds to merge", fix="give folds, e.g. -f 0 1 2 3 4")
    if len(set(folds)) != len(folds):
        raise UserInputError(f"folds {list(folds)} name a fold twice", fix="name each fold once, e.g. -f 0 1 2 3 4")
    missing = missing_folds(run_folder, folds)
    if missing:
        first = missing[0]
        raise UserInputError(
            f"fold {first} has no final validation summary{f' (nor folds {missing[1:]})' if len(missing) > 1 else ''}",
            path=fold_summary_file(run_folder, first),
            fix=f"run: {produce_fold_command(run_folder, first)}" + (", and likewise for the other folds" if len(missing) > 1 else ""),
        )
    return {f: load_json(fold_summary_file(run_folder, f), "validation summary.json") for f in folds}


def merge_fold_summaries(summaries: dict[int, dict], run_folder: Path | None = None) -> dict:
    """One summary over all cases of all folds (see the module docstring); the folds must not share
    a case and must have been scored on the same classes in the same space."""
    from latdiffunet.errors import UserInputError
    from latdiffunet.evaluation.evaluate_folder import (  # the evaluator's own averaging, so both agree
        AMBIGUITY_METRICS, CALIBRATION_METRICS, _extras_mean, _samples_summary,
    )
    from latdiffunet.evaluation.metrics import summarize

    where = (lambda f: fold_summary_file(run_folder, f)) if run_folder is not None else (lambda f: None)
    per_case, owner, folds = [], {}, {}
    first_fold = next(iter(summaries))
    classes = sorted(summaries[first_fold]["mean"])
    for fold, summary in summaries.items():
        if sorted(summary["mean"]) != classes:
            raise UserInputError(
                f"fold {fold} was scored on classes {sorted(summary['mean'])}, fold {first_fold} on {classes} "
                f"(space: {summary.get('space', '?')!r} vs {summaries[first_fold].get('space', '?')!r})", path=where(fold),
                fix="validate every fold the same way: latdiff_train ... --val-only with LATDIFF_RAW pointing at the raw dataset",
            )
        for entry in summary["metric_per_case"]:
            case = entry["case_id"]
            if case in owner:
                raise UserInputError(
                    f"case {case} is in the validation of folds {owner[case]} and {fold}; cross-validation folds must not "
                    "share cases", path=where(fold), fix="merge the folds of one splits_final.json",
                )
            owner[case] = fold
            per_case.append({"fold": fold} | entry)
        folds[str(fold)] = {
            "num_cases": len(summary["metric_per_case"]),
            "mean_Dice": {c: m["Dice"] for c, m in summary["mean"].items()},
            "foreground_mean_Dice": summary["foreground_mean"]["Dice"],
            "checkpoint": summary.get("checkpoint"),
            "checkpoint_selection": summary.get("checkpoint_selection", LEGACY_SELECTION),
            # written by final validation since held-back selection exists; a missing key means it was not
            "selected_on_held_back": bool(summary.get("selected_on_held_back", False)),
            "space": summary.get("space"),
        }
    merged = summarize(per_case)
    fold_dice = [v["foreground_mean_Dice"] for v in folds.values()]
    merged |= {
        "num_cases": len(per_case),
        "folds": folds,
        "foreground_dice_over_folds": {
            "mean": sum(fold_dice) / len(fold_dice),
            "std": math.sqrt(sum((d - sum(fold_dice) / len(fold_dice)) ** 2 for d in fold_dice) / len(fold_dice)),
        },
        "pooled_from": "metric_per_case of each fold's validation/summary.json (scored by latdiff_evaluate)",
    }
    for key in ("labels", "ignore_label", "file_ending"):
        if key in summaries[first_fold]:
            merged[key] = summaries[first_fold][key]
    means, counts = _extras_mean(per_case, "calibration", CALIBRATION_METRICS)
    if means:
        merged["calibration_mean"], merged["calibration_num_cases"] = means, counts
    means, counts = _extras_mean(per_case, "ambiguity", AMBIGUITY_METRICS)
    if means:
        ratio = means["sample_diversity"] / means["rater_diversity"] if means.get("rater_diversity", 0) > 0 else float("nan")
        merged["ambiguity"] = means | {"diversity_ratio_of_means": ratio}
        merged["ambiguity_num_cases"] = counts
    labels = [int(c) for c in classes]
    samples = _samples_summary(per_case, labels)
    if samples is not None:
        merged["samples"] = samples
        merged["samples_num_cases"] = sum("samples" in c for c in per_case)
    return merged


def accumulate_cross_validation(run_folder: Path, folds: Sequence[int] = DEFAULT_FOLDS) -> tuple[dict, Path]:
    """Merge the folds of ``run_folder`` and write ``crossval_results_folds_.../summary.json``."""
    from latdiffunet.utilities.file_io import write_json

    summary = merge_fold_summaries(load_fold_summaries(run_folder, list(folds)), run_folder)
    target = crossval_folder(run_folder, folds) / "summary.json"
    write_json(summary, target)
    return summary, target


def find_run_folder(dataset: str, trainer: str, plans: str, configuration: str) -> Path:
    """``<results>/<dataset>/<trainer>__<plans>__<configuration>``, which must exist (the lookup
    ``latdiff_predict`` uses, with ``dataset`` resolved from an ID or name)."""
    from latdiffunet import paths
    from latdiffunet.inference.cli import find_run_folder as find_trained_run
    from latdiffunet.raw_dataset import resolve_dataset_name

    name = resolve_dataset_name(dataset, paths.results_root(), paths.preprocessed_root(), paths.raw_root())
    return find_trained_run(paths.results_root() / name, trainer, plans, configuration)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latdiff_crossval", description="Merge the folds' validation summaries into one.")
    p.add_argument("-d", "--dataset", required=True, help="dataset ID or name")
    p.add_argument("-c", "--configuration", default="2d", help="2d or 3d (default 2d)")
    p.add_argument("-p", "--plans", default="latdiffPlans", help="plans identifier (default latdiffPlans)")
    p.add_argument("-tr", "--trainer", default="LatentDiffusionTrainer", help="trainer name used in training")
    p.add_argument("-f", "--folds", nargs="+", type=int, default=list(DEFAULT_FOLDS), help="folds to merge (default 0 1 2 3 4)")
    return p


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_folder = find_run_folder(args.dataset, args.trainer, args.plans, args.configuration)
    summary, target = accumulate_cross_validation(run_folder, args.folds)
    for fold, info in summary["folds"].items():
        print(f"fold {fold}: {info['num_cases']} cases, foreground Dice {info['foreground_mean_Dice']:.4f} ({info['checkpoint']})")
    spread = summary["foreground_dice_over_folds"]
    print(f"cross-validation, {summary['num_cases']} cases: mean foreground Dice {summary['foreground_mean']['Dice']:.4f} "
          f"(folds: {spread['mean']:.4f} +- {spread['std']:.4f}) -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
