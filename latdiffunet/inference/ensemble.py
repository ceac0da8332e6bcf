"""``latdiff_ensemble -i PRED_2D PRED_3D -o OUT``: average the class probabilities of several predictions.

``latdiff_predict`` ensembles the folds of one configuration (its samples are pooled). Two
configurations (2d and 3d) are ensembled afterwards, as nnU-Net's ``nnUNetv2_ensemble`` does: each
is predicted with ``--save_probabilities``, then their ``CASE_probabilities.npz`` (mean class
probabilities in the input's geometry) are averaged with equal weight per configuration and the
label is the argmax. Written per case: ``CASE<ending>`` and ``CASE_entropy.nii.gz`` (entropy of
the averaged probabilities); ``--save_probabilities`` keeps the averaged probabilities. Mutual
information, agreement and samples need the samples of both models and are not merged.

Cross-validation uses the same function on the folds' ``validation/`` folders
(``evaluation/find_best_configuration.py``), since final validation saves the probabilities.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latdiffunet.utilities.cli import friendly_errors, set_cpu_friendly_threading

PROBABILITIES_SUFFIX = "_probabilities.npz"


@dataclass(frozen=True)
class EnsembleCase:
    """One case to ensemble (pickled to a worker): its probability files and where it goes."""

    case_id: str
    probability_files: tuple[Path, ...]
    geometry_file: Path  # a segmentation in the case's original geometry (the first model's)
    out_base: Path  # output folder / case id
    ending: str
    label_values: tuple[int, ...]
    save_probabilities: bool = False


def _probabilities(path: Path, shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    from latdiffunet.errors import UserInputError
    from latdiffunet.utilities.file_io import load_npz

    arrays = load_npz(path)
    prob = arrays.get("probabilities")
    if prob is None or prob.shape != (num_classes, *shape):
        raise UserInputError(
            f"expected 'probabilities' of shape {(num_classes, *shape)} (classes, then the case's Z, Y, X), got "
            f"{None if prob is None else prob.shape}", path=path,
            fix="ensemble predictions of models trained on the same dataset, written by latdiff_predict --save_probabilities",
        )
    return prob.astype(np.float32)


def ensemble_case(case: EnsembleCase) -> str:
    """Average the case's probabilities, write its label (last: it marks the case finished) and entropy."""
    from latdiffunet.imageio.sitk_io import read_label, write_image, write_segmentation
    from latdiffunet.inference.uncertainty import entropy
    from latdiffunet.utilities.file_io import save_npz

    reference, geometry = read_label(case.geometry_file)
    shape = reference.shape
    mean = np.mean([_probabilities(f, shape, len(case.label_values)) for f in case.probability_files], axis=0)
    mean /= mean.sum(0, keepdims=True)  # float16 storage rounds each class a little
    if case.save_probabilities:
        save_npz(f"{case.out_base}{PROBABILITIES_SUFFIX}", probabilities=mean.astype(np.float16))
    write_image(entropy(mean, axis=0).astype(np.float32), geometry, f"{case.out_base}_entropy.nii.gz")
    write_segmentation(np.asarray(case.label_values)[mean.argmax(0)], geometry, f"{case.out_base}{case.ending}")
    return case.case_id


def probability_cases(folder: Path) -> list[str]:
    """Case ids with a ``CASE_probabilities.npz`` in ``folder``."""
    return sorted(p.name[: -len(PROBABILITIES_SUFFIX)] for p in folder.glob(f"*{PROBABILITIES_SUFFIX}"))


def run_dataset_json(prediction_folder: Path) -> Path:
    """The ``dataset.json`` of the model that wrote ``prediction_folder`` (named in its ``prediction_info.json``)."""
    from latdiffunet.utilities.file_io import load_json

    info = load_json(prediction_folder / "prediction_info.json", "prediction_info.json",
                     fix="give folders written by latdiff_predict (or a fold's validation/ folder)")
    return Path(info["run_folder"]) / "dataset.json"


def ensemble_folders(
    folders: list[Path], output: Path, save_probabilities: bool = False, num_processes: int = 2,
    dataset_json: Path | None = None,
) -> list[str]:
    """Ensemble the cases of ``folders`` (each must have the probabilities of every one) into
    ``output``; returns them. Labels and file ending come from ``dataset_json``, by default from
    the ``dataset.json`` of each folder's model (``prediction_info.json``), which must agree."""
    from latdiffunet.errors import UserInputError
    from latdiffunet.raw_dataset import parse_dataset_json
    from latdiffunet.utilities.file_io import write_json
    from latdiffunet.utilities.parallel import map_with_progress

    if len(folders) < 2:
        raise UserInputError("ensembling needs at least two prediction folders", fix="give -i PRED_A PRED_B ...")
    specs = [parse_dataset_json(dataset_json or run_dataset_json(f)) for f in folders]
    for folder, spec in zip(folders[1:], specs[1:]):
        if (spec.class_labels, spec.file_ending) != (specs[0].class_labels, specs[0].file_ending):
            raise UserInputError(
                f"its model's labels {spec.class_labels} / file ending {spec.file_ending!r} differ from those of {folders[0]} "
                f"({specs[0].class_labels} / {specs[0].file_ending!r})", path=folder,
                fix="ensemble predictions of models trained on the same dataset",
            )
    per_folder = [set(probability_cases(f)) for f in folders]
    cases = sorted(set.union(*per_folder))
    for folder, found in zip(folders, per_folder):
        missing = sorted(set(cases) - found)
        if missing:
            raise UserInputError(
                f"no {missing[0]}{PROBABILITIES_SUFFIX} ({len(missing)} case(s) missing, e.g. {missing[:3]}); every folder "
                "needs the probabilities of every case", path=folder,
                fix="predict again with latdiff_predict --save_probabilities",
            )
    if not cases:
        raise UserInputError(f"no *{PROBABILITIES_SUFFIX} files", path=folders[0],
                             fix="predict with latdiff_predict --save_probabilities")
    output.mkdir(parents=True, exist_ok=True)
    spec = specs[0]
    jobs = [EnsembleCase(c, tuple(f / f"{c}{PROBABILITIES_SUFFIX}" for f in folders), folders[0] / f"{c}{spec.file_ending}",
                         output / c, spec.file_ending, tuple(spec.class_labels), save_probabilities) for c in cases]
    write_json({"ensembled_folders": [str(f) for f in folders], "weights": "equal, one per folder",
                "run_folder": str((dataset_json or run_dataset_json(folders[0])).parent)}, output / "prediction_info.json")
    return map_with_progress(ensemble_case, jobs, num_processes, desc="ensembling")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latdiff_ensemble",
                                description="Average the class probabilities of predictions of several configurations.")
    p.add_argument("-i", "--input", nargs="+", required=True,
                   help="latdiff_predict output folders, each written with --save_probabilities")
    p.add_argument("-o", "--output", required=True, help="output folder (created)")
    p.add_argument("--save_probabilities", action="store_true", help="also write the averaged probabilities (.npz)")
    p.add_argument("-np", "--num_processes", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--dataset_json", default=None,
                   help="dataset.json giving labels and file ending (default: that of the model named in each folder's "
                        "prediction_info.json)")
    return p


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_cpu_friendly_threading()
    done = ensemble_folders([Path(f) for f in args.input], Path(args.output), args.save_probabilities, args.num_processes,
                            Path(args.dataset_json) if args.dataset_json else None)
    print(f"ensembled {len(done)} case(s) of {len(args.input)} predictions -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
