"""``latdiff_evaluate -ref REF -pred PRED``: Dice/IoU/HD95 (+ calibration, ambiguity) -> PRED/summary.json."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from latdiffunet.utilities.cli import friendly_errors, set_cpu_friendly_threading


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="latdiff_evaluate",
        description=(
            "Evaluate a folder of predictions against reference labels and write PRED/summary.json "
            "(nnU-Net's layout). Probability, entropy and mutual-information files and diffusion "
            "samples written by latdiff_predict add calibration and multi-rater metrics."
        ),
    )
    p.add_argument("-ref", "--reference", required=True, help="folder of reference label maps CASE<ending> (e.g. labelsTr)")
    p.add_argument("-pred", "--prediction", required=True, help="folder of predictions (latdiff_predict's output)")
    p.add_argument("-d", "--dataset", default=None,
                   help="dataset ID, name (in LATDIFF_RAW) or folder: its dataset.json gives labels, ignore label, file ending and raters")
    p.add_argument("-l", "--labels", type=int, nargs="+", default=None,
                   help="classes to evaluate (default: dataset.json's foreground labels, else every non-zero value in the references)")
    p.add_argument("--ignore-label", type=int, default=None, help="reference value of unannotated voxels (default: dataset.json's 'ignore')")
    p.add_argument("-np", "--num-processes", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--raters-folder", default=None, help="folder with CASE_rater{k}<ending> annotations (overrides the dataset's)")
    p.add_argument("--roi-margin", type=int, default=5, help="margin in voxels around the foreground for ECE_roi (default 5)")
    p.add_argument("--allow-missing", action="store_true", help="list references without prediction under missing_cases instead of failing")
    return p


def _load_spec(identifier: str):
    from latdiffunet import paths
    from latdiffunet.raw_dataset import load_dataset, resolve_dataset_name

    folder = Path(identifier).expanduser()
    if (folder / "dataset.json").is_file():
        return load_dataset(folder)
    name = resolve_dataset_name(identifier, paths.raw_root())
    return load_dataset(paths.raw_root() / name)


def _fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_cpu_friendly_threading()
    from latdiffunet.evaluation.evaluate_folder import evaluate_folder

    labels, ignore_label, raters_folder, num_raters, file_ending = args.labels, args.ignore_label, None, None, None
    if args.dataset is not None:
        spec = _load_spec(args.dataset)
        if labels is None:
            labels = spec.foreground_labels
        if ignore_label is None:
            ignore_label = spec.ignore_label
        if spec.num_raters > 1 and spec.rater_labels_folder:
            raters_folder, num_raters = spec.folder / spec.rater_labels_folder, spec.num_raters
        file_ending = spec.file_ending
    if args.raters_folder is not None:
        raters_folder, num_raters = Path(args.raters_folder), None
    summary = evaluate_folder(
        args.reference,
        args.prediction,
        labels,
        ignore_label=ignore_label,
        num_processes=max(1, args.num_processes),
        raters_folder=raters_folder,
        roi_margin=args.roi_margin,
        allow_missing=args.allow_missing,
        num_raters=num_raters,
        file_ending=file_ending,
    )
    if summary["missing_cases"]:
        print(f"{len(summary['missing_cases'])} reference(s) without prediction skipped: {', '.join(summary['missing_cases'])}")
    print(f"{summary['num_cases']} cases evaluated")
    for key in ("calibration_mean", "ambiguity"):
        if key in summary:
            print(f"{key}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in summary[key].items()))
    print("Dice per class: " + ", ".join(f"{c}: {_fmt(m['Dice'])}" for c, m in summary["mean"].items()))
    print(f"foreground mean Dice: {_fmt(summary['foreground_mean']['Dice'])}")
    if "samples" in summary:
        fg = summary["samples"]["foreground_mean"]
        print(
            f"Dice of one sample {_fmt(fg['Dice_single_sample'])} vs Dice of the mean {_fmt(summary['foreground_mean']['Dice'])} "
            f"(foreground; Dice between two samples {_fmt(fg['Dice_pairwise_samples'])}, {summary['samples_num_cases']} case(s) with samples)"
        )
    print(f"summary written to {Path(args.prediction) / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
