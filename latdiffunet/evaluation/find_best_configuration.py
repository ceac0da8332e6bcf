"""``latdiff_find_best_configuration -d DATASET``: pick 2d, 3d or their ensemble by cross-validation Dice.

As ``nnUNetv2_find_best_configuration``: for each configuration, the five folds' final
validations are merged into ``crossval_results_folds_0_1_2_3_4/summary.json``
(:mod:`~latdiffunet.evaluation.cross_validation`); for each pair of configurations their
cross-validation predictions are ensembled (the mean of the two models' class probabilities,
which every final validation saves as ``CASE_probabilities.npz``; ``inference/ensemble.py``) into
``<results>/<dataset>/ensembles/ensemble___<A>___<B>___<folds>/`` and scored with
``latdiff_evaluate``. The highest mean foreground Dice wins (on a tie the simpler candidate, a
single configuration before an ensemble), and ``<results>/<dataset>/inference_information.json``
and ``inference_instructions.txt`` give the ``latdiff_predict`` command(s), plus
``latdiff_ensemble`` when an ensemble won.

The folds' own numbers were not chosen on their validation cases (``training/held_back.py``), but
picking the best of several candidates on the same cases is a choice: the winner's
cross-validation Dice is slightly optimistic, by about the spread between close candidates. The
information file says so. nnU-Net's post-processing (keeping the largest component) is not
determined here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from latdiffunet.utilities.cli import friendly_errors, set_cpu_friendly_threading
from latdiffunet.utilities.file_io import atomic_path

ENSEMBLE_PREFIX = "ensemble___"


def model_identifier(trainer: str, plans: str, configuration: str) -> str:
    return f"{trainer}__{plans}__{configuration}"


def ensemble_identifier(first: str, second: str, folds: Sequence[int]) -> str:
    """nnU-Net's name: ``ensemble___<A>___<B>___0_1_2_3_4``."""
    return f"{ENSEMBLE_PREFIX}{first}___{second}___{'_'.join(str(f) for f in folds)}"


def check_trained(run_folder: Path, folds: Sequence[int]) -> None:
    """Every fold of ``run_folder`` has a final validation; else name the first missing fold folder and the command."""
    from latdiffunet.errors import UserInputError
    from latdiffunet.evaluation.cross_validation import fold_summary_file, missing_folds, produce_fold_command

    missing = missing_folds(run_folder, folds)
    if missing:
        others = f" (also missing: folds {missing[1:]})" if len(missing) > 1 else ""
        raise UserInputError(
            f"{run_folder.name}: fold {missing[0]} has no final validation{others}", path=fold_summary_file(run_folder, missing[0]).parent.parent,
            fix=f"run {produce_fold_command(run_folder, missing[0])}" + (" (and the other folds)" if others else "")
            + f", or leave configuration {run_folder.name.split('__')[-1]} out with -c",
        )


def ensemble_cross_validation(run_folders: Sequence[Path], output: Path, folds: Sequence[int], raw: Path,
                              num_processes: int = 2) -> dict:
    """Average the saved validation probabilities of ``run_folders`` fold by fold into ``output``
    and score them against ``raw/labelsTr``; returns the summary (also ``output/summary.json``)."""
    from latdiffunet.errors import UserInputError
    from latdiffunet.evaluation.evaluate_folder import evaluate_folder
    from latdiffunet.inference.ensemble import ensemble_folders, probability_cases
    from latdiffunet.raw_dataset import parse_dataset_json

    labels = raw / "labelsTr"
    if not labels.is_dir():
        raise UserInputError("reference labels not found (needed to score the ensemble)", path=labels,
                             fix="set LATDIFF_RAW to the folder holding the raw dataset, or pass --disable_ensembling")
    cases: list[str] = []
    for fold in folds:
        folders = [r / f"fold_{fold}" / "validation" for r in run_folders]
        for folder in folders:
            if not probability_cases(folder):
                raise UserInputError(
                    "no CASE_probabilities.npz: this fold's final validation did not save probabilities", path=folder,
                    fix=f"validate it again: latdiff_train ... {fold} --val-only (it saves them), or pass --disable_ensembling",
                )
        cases += ensemble_folders(folders, output, num_processes=num_processes, dataset_json=run_folders[0] / "dataset.json")
    spec = parse_dataset_json(run_folders[0] / "dataset.json")
    return evaluate_folder(labels, output, spec.foreground_labels, ignore_label=spec.ignore_label,
                           num_processes=max(num_processes, 1), case_ids=cases, file_ending=spec.file_ending, progress=False)


def predict_command(dataset: str, model: dict, folds: Sequence[int | str], output: str, save_probabilities: bool = False,
                    noise_scale: float | None = None) -> str:
    return (f"latdiff_predict -d {dataset} -i INPUT_FOLDER -o {output} -c {model['configuration']} -p {model['plans_identifier']} "
            f"-tr {model['trainer']} -f {' '.join(str(f) for f in folds)}" + (" --save_probabilities" if save_probabilities else "")
            + (f" --noise_scale {noise_scale:g}" if noise_scale is not None else ""))


def folds_temperature(run_folder: Path, folds: Sequence[int]) -> float | None:
    """The median of the sampling temperatures the folds chose (``sampling_calibration.json``, chosen
    on their held-back cases), or None when a fold chose none. Fold ``all`` holds nothing back and
    calibrates nothing, so its predict command takes this value."""
    import statistics

    from latdiffunet.utilities.file_io import load_json

    files = [run_folder / f"fold_{f}" / "sampling_calibration.json" for f in folds]
    if not all(f.is_file() for f in files):
        return None
    return float(statistics.median(float(load_json(f)["chosen_noise_scale"]) for f in files))


def winner_commands(info: dict) -> tuple[list[str], list[str]]:
    """The commands that predict with the winner on new images, and (single model only) the
    alternative with a model trained on every case (fold ``all``)."""
    best = info["best_model_or_ensemble"]
    models, dataset, folds = best["selected_model_or_models"], info["dataset"], info["folds"]
    if len(models) > 1:
        outputs = [f"OUTPUT_FOLDER_MODEL_{i + 1}" for i in range(len(models))]
        return ([predict_command(dataset, m, folds, o, save_probabilities=True) for m, o in zip(models, outputs)]
                + [f"latdiff_ensemble -i {' '.join(outputs)} -o OUTPUT_FOLDER"]), []
    model = models[0]
    temperature = info["fold_temperatures"].get(best["identifier"])
    return [predict_command(dataset, model, folds, "OUTPUT_FOLDER")], [
        f"latdiff_train {dataset} all -c {model['configuration']} -p {model['plans_identifier']} -tr {model['trainer']}",
        predict_command(dataset, model, ["all"], "OUTPUT_FOLDER", noise_scale=temperature)]


def inference_instructions(info: dict) -> str:
    """The text of ``inference_instructions.txt``: the commands that predict with the winner."""
    best = info["best_model_or_ensemble"]
    commands, fold_all = winner_commands(info)
    lines = [f"Best by cross-validation (folds {', '.join(map(str, info['folds']))}): {best['identifier']}, "
             f"mean foreground Dice {best['result_on_crossval']:.4f}", ""]
    if fold_all:
        temperature = info["fold_temperatures"].get(best["identifier"])
        lines += ["Run inference like this:", "", *commands, "",
                  "Or, with a model trained on every case (nnU-Net's fold 'all', no cross-validation number of its own"
                  + (", sampling at the median temperature the folds chose" if temperature is not None else
                     "; it samples at temperature 1, as it calibrates none") + "):", *fold_all]
    else:
        lines += ["An ensemble won. Predict with each member, keeping the probabilities:", "", *commands[:-1], "",
                  "then average them:", "", commands[-1]]
    lines += ["", f"Note: {info['note']}"]
    return "\n".join(lines) + "\n"


def find_best_configuration(
    dataset: str, configurations: Sequence[str] | None = None, plans: str = "latdiffPlans",
    trainer: str = "LatentDiffusionTrainer", folds: Sequence[int] = (0, 1, 2, 3, 4), allow_ensembling: bool = True,
    num_processes: int = 2,
) -> dict:
    """Cross-validate every configuration (and pair), pick the best, write the inference files; returns their content."""
    from latdiffunet import paths
    from latdiffunet.errors import UserInputError
    from latdiffunet.evaluation.cross_validation import accumulate_cross_validation
    from latdiffunet.raw_dataset import resolve_dataset_name
    from latdiffunet.utilities.file_io import load_json, write_json

    name = resolve_dataset_name(dataset, paths.results_root(), paths.preprocessed_root(), paths.raw_root())
    results = paths.results_root() / name
    folds = list(folds)
    if configurations is None:
        plans_file = paths.preprocessed_root() / name / f"{plans}.json"
        trained = sorted(p.name.split("__")[-1] for p in results.glob(f"{trainer}__{plans}__*") if p.is_dir())
        configurations = list(load_json(plans_file, "plans")["configurations"]) if plans_file.is_file() else trained
        if not configurations:
            raise UserInputError(f"no trained model {model_identifier(trainer, plans, '*')}", path=results,
                                 fix=f"train the folds: latdiff_train {dataset} 0 1 2 3 4 -c 2d -p {plans} -tr {trainer}")
    if len(set(configurations)) != len(configurations):
        raise UserInputError(f"configurations {list(configurations)} name one twice", fix="name each once, e.g. -c 2d 3d")
    models = [{"configuration": c, "trainer": trainer, "plans_identifier": plans} for c in configurations]
    run_folders = {}
    for m in models:
        identifier = model_identifier(trainer, plans, m["configuration"])
        folder = results / identifier
        if not folder.is_dir():
            raise UserInputError(
                f"configuration {m['configuration']} is not trained (no {identifier})", path=folder,
                fix=f"train it: latdiff_train {name} {' '.join(map(str, folds))} -c {m['configuration']} -p {plans} -tr {trainer}, "
                    "or leave it out with -c",
            )
        check_trained(folder, folds)  # every configuration before the long work starts
        run_folders[identifier] = folder

    all_results, sources, selection, temperatures, untouched = {}, {}, {}, {}, []
    for identifier, folder in run_folders.items():
        summary, target = accumulate_cross_validation(folder, folds)
        temperatures[identifier] = folds_temperature(folder, folds)
        all_results[identifier], sources[identifier] = summary["foreground_mean"]["Dice"], str(target)
        selection[identifier] = sorted({f["checkpoint_selection"] for f in summary["folds"].values()})
        untouched += [bool(f.get("selected_on_held_back")) for f in summary["folds"].values()]
        print(f"{identifier}: cross-validation mean foreground Dice {all_results[identifier]:.4f}")
    identifiers = list(run_folders)
    if allow_ensembling:
        for i, first in enumerate(identifiers):
            for second in identifiers[i + 1:]:
                identifier = ensemble_identifier(first, second, folds)
                output = results / "ensembles" / identifier
                summary = ensemble_cross_validation([run_folders[first], run_folders[second]], output, folds,
                                                    paths.raw_root() / name, num_processes)
                all_results[identifier], sources[identifier] = summary["foreground_mean"]["Dice"], str(output / "summary.json")
                print(f"{identifier}: cross-validation mean foreground Dice {all_results[identifier]:.4f}")

    best = max(all_results, key=lambda k: all_results[k])  # max keeps the first on a tie: single models come first
    chosen = ([m for m in models if model_identifier(trainer, plans, m["configuration"]) in best.split("___")]
              if best.startswith(ENSEMBLE_PREFIX) else [m for m in models if model_identifier(trainer, plans, m["configuration"]) == best])
    held_back = bool(untouched) and all(untouched)
    how = ("each fold's checkpoint and temperature were chosen on held-back training cases, not on these" if held_back else
           "how each fold's checkpoint and temperature were chosen: see checkpoint_selection")
    info = {
        "dataset": name,
        "folds": folds,
        "considered_models": models,
        "ensembling_allowed": allow_ensembling,
        "all_results": all_results,
        "sources": sources,
        "checkpoint_selection": selection,
        "fold_temperatures": {k: v for k, v in temperatures.items() if v is not None},
        "best_model_or_ensemble": {"identifier": best, "result_on_crossval": all_results[best],
                                   "selected_model_or_models": chosen},
        "note": (f"the winner is the best of {len(all_results)} candidates on the same cross-validation cases, so its Dice "
                 f"is slightly optimistic for it; {how}" if len(all_results) > 1 else f"one candidate, nothing chosen between models; {how}"),
    }
    info["commands"], info["fold_all_commands"] = winner_commands(info)
    text = inference_instructions(info)
    write_json(info, results / "inference_information.json")
    with atomic_path(results / "inference_instructions.txt") as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(f"\nbest: {best} ({all_results[best]:.4f})\n\n{text}\nwritten to {results / 'inference_instructions.txt'}")
    return info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latdiff_find_best_configuration",
                                description="Choose 2d, 3d or their ensemble by cross-validation Dice and write the predict command.")
    p.add_argument("-d", "--dataset", required=True, help="dataset ID or name")
    p.add_argument("-c", "--configurations", nargs="+", default=None,
                   help="configurations to compare (default: every one in the plans; each must be trained on every fold)")
    p.add_argument("-p", "--plans", default="latdiffPlans", help="plans identifier (default latdiffPlans)")
    p.add_argument("-tr", "--trainer", default="LatentDiffusionTrainer", help="trainer name used in training")
    p.add_argument("-f", "--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="folds (default 0 1 2 3 4)")
    p.add_argument("--disable_ensembling", action="store_true", help="compare single configurations only")
    p.add_argument("-np", "--num_processes", type=int, default=2, help="worker processes for ensembling and scoring")
    return p


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_cpu_friendly_threading()
    find_best_configuration(args.dataset, args.configurations, args.plans, args.trainer, args.folds,
                            not args.disable_ensembling, args.num_processes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
