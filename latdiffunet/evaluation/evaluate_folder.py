"""Evaluate a folder of predictions against a folder of reference labels -> ``summary.json``.

Pairs every reference ``REF/CASE<ending>`` with ``PRED/CASE<ending>`` (predictions without a
reference are ignored, as are ``latdiff_predict``'s extra outputs) and writes nnU-Net's layout
(``metric_per_case``, ``mean``, ``foreground_mean``) to ``PRED/summary.json``, so scripts written
for nnU-Net read it unchanged. Where ``latdiff_predict`` left more than a label map, more is
measured, per case:

* ``CASE_probabilities.npz`` (``probabilities``: ``(K, Z, Y, X)`` mean class probabilities):
  expected calibration error with 15 bins over all voxels (``ECE_all``) and inside
  :func:`~latdiffunet.evaluation.metrics.region_of_interest` (``ECE_roi``);
* ``CASE_uncertainty.nii.gz`` / ``CASE_entropy.nii.gz`` / ``CASE_mutual_information.nii.gz``: AUROC
  of the map as a detector of wrong voxels (``uncertainty_error_AUROC``, from the entropy map when
  there is no uncertainty map, as for nnU-Net's softmax entropy / ``entropy_error_AUROC`` /
  ``mi_error_AUROC``);
* ``CASE_samples/sample_XX<ending>`` (``--save_samples``): per class, the mean Dice of a single
  sample against the reference and the mean Dice between pairs of samples
  (``Dice_single_sample`` / ``Dice_pairwise_samples``, see
  :func:`~latdiffunet.evaluation.ambiguity.sample_dice_scores`). ``mean`` and
  ``foreground_mean`` always score ``CASE<ending>``, the label of the *mean* prediction.
* the samples together with several rater annotations: generalised energy distance and
  Hungarian-matched IoU of samples vs raters (``GED`` / ``HM_IoU``), the two diversity terms of
  GED and their ratio (``sample_diversity`` / ``rater_diversity`` / ``diversity_ratio``; the
  ``*_distinct_pairs`` diversities leave out the identical pairs, which shrink the all-pairs terms by
  (n - 1) / n, so they are the ones to compare between 16 samples and 4 raters), and the
  agreement of the samples' foreground frequency with the raters'
  (``frequency_map_L1`` / ``frequency_map_soft_dice``). Foreground is any label > 0 here, see
  :mod:`~latdiffunet.evaluation.ambiguity`.

These go under ``"calibration"``, ``"samples"`` and ``"ambiguity"`` of the case's entry. In the
summary, their means over cases (NaN skipped) are ``"calibration_mean"``, ``"ambiguity"`` (with
``diversity_ratio_of_means``, steadier than the mean of per-case ratios) and ``"samples"`` as
``{"mean": {class: ...}, "foreground_mean": ...}``, averaged like nnU-Net's ``mean`` /
``foreground_mean``; ``*_num_cases`` count the cases behind them. Voxels that carry the ignore label in the reference are left out
of every metric except the multi-rater ones, which compare samples with raters, not with the
reference.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from latdiffunet.errors import UserInputError
from latdiffunet.evaluation.ambiguity import energy_distance_terms, frequency_map_agreement, sample_dice_scores
from latdiffunet.evaluation.metrics import (
    evaluate_case,
    expected_calibration_error,
    hungarian_matched_iou,
    region_of_interest,
    summarize,
    uncertainty_error_auroc,
)
from latdiffunet.imageio.sitk_io import SUPPORTED_FILE_ENDINGS, ImageGeometry, file_ending_of, read_image, read_label
from latdiffunet.utilities.file_io import load_npz, write_json
from latdiffunet.utilities.parallel import map_with_progress

__all__ = [
    "evaluate_folder",
    "list_reference_cases",
    "ECE_BINS",
    "AUXILIARY_SUFFIXES",
    "CALIBRATION_METRICS",
    "AMBIGUITY_METRICS",
    "SAMPLE_METRICS",
]

#: Confidence bins of the expected calibration error.
ECE_BINS = 15
#: Stems of ``latdiff_predict``'s per-case extra files; such files are never cases themselves.
AUXILIARY_SUFFIXES = ("_uncertainty", "_entropy", "_mutual_information", "_agreement", "_probabilities")
CALIBRATION_METRICS = ("ECE_all", "ECE_roi", "uncertainty_error_AUROC", "entropy_error_AUROC", "mi_error_AUROC")
#: Which map each AUROC scores, first existing file wins: a folder without ``_uncertainty`` maps
#: (nnU-Net's, or predictions by models without a segmentation head) scores its entropy.
AUROC_MAPS = {
    "uncertainty_error_AUROC": ("_uncertainty", "_entropy"),
    "entropy_error_AUROC": ("_entropy",),
    "mi_error_AUROC": ("_mutual_information",),
}
AMBIGUITY_METRICS = (
    "GED", "HM_IoU", "sample_diversity", "rater_diversity", "diversity_ratio", "frequency_map_L1", "frequency_map_soft_dice",
    "sample_diversity_distinct_pairs", "rater_diversity_distinct_pairs",
)
SAMPLE_METRICS = ("Dice_single_sample", "Dice_pairwise_samples")
#: ``float16`` storage of probabilities rounds each class by up to ~5e-4; renormalise within this.
PROBABILITY_SUM_TOLERANCE = 1e-2


# --------------------------------------------------------------------------------------------
# finding the cases
# --------------------------------------------------------------------------------------------


def _is_case_file(path: Path, ending: str) -> bool:
    if path.name.startswith(".") or not path.is_file() or not path.name.endswith(ending):
        return False
    stem = path.name[: -len(ending)]
    return bool(stem) and not stem.endswith(AUXILIARY_SUFFIXES)


def _detect_ending(ref_folder: Path) -> str:
    endings: dict[str, int] = {}
    for p in ref_folder.iterdir():
        if p.name.startswith(".") or not p.is_file():
            continue
        ending = file_ending_of(p)
        if ending in SUPPORTED_FILE_ENDINGS:
            endings[ending] = endings.get(ending, 0) + 1
    if not endings:
        raise UserInputError(
            f"no reference label files ({', '.join(SUPPORTED_FILE_ENDINGS)}) in the reference folder",
            path=ref_folder,
            fix="point -ref at the folder holding CASE.nii.gz (or .png, ...) label files, e.g. labelsTr",
        )
    if len(endings) > 1:
        found = ", ".join(f"{n} x {e}" for e, n in sorted(endings.items()))
        raise UserInputError(
            f"reference folder holds label files with several file endings ({found})",
            path=ref_folder,
            fix="keep one file format per folder, or pass -d DATASET so dataset.json's file_ending is used",
        )
    return next(iter(endings))


def list_reference_cases(ref_folder: str | Path, file_ending: str | None = None) -> tuple[list[str], str]:
    """Case ids of the reference label files in ``ref_folder`` (sorted) and their file ending."""
    ref_folder = Path(ref_folder)
    if not ref_folder.is_dir():
        raise UserInputError("reference folder not found", path=ref_folder)
    ending = file_ending or _detect_ending(ref_folder)
    cases = sorted(p.name[: -len(ending)] for p in ref_folder.iterdir() if _is_case_file(p, ending))
    if not cases:
        raise UserInputError(
            f"no reference label files ending in {ending!r}", path=ref_folder,
            fix="check -ref and the file ending (dataset.json's file_ending when -d is given)",
        )
    return cases, ending


def _rater_files(case_id: str, ending: str, raters_folder: Path | None, num_raters: int | None) -> list[Path]:
    """The rater annotations of one case (empty when there are none)."""
    if raters_folder is None:
        return []
    if num_raters is not None:  # declared by dataset.json: every file must be there
        return [raters_folder / f"{case_id}_rater{k}{ending}" for k in range(num_raters)]
    pattern = re.compile(rf"^{re.escape(case_id)}_rater(\d+){re.escape(ending)}$")
    found = []
    for p in raters_folder.iterdir():
        m = pattern.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


# --------------------------------------------------------------------------------------------
# one case (runs in a worker process)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CaseJob:
    case_id: str
    ref_file: Path
    pred_file: Path
    ending: str
    labels: tuple[int, ...]
    ignore_label: int | None
    roi_margin: int
    rater_files: tuple[Path, ...]


def _check_geometry(reference: Path, ref_geometry: ImageGeometry, other: Path, other_geometry: ImageGeometry, what: str) -> None:
    problems = ref_geometry.matches(other_geometry)
    if problems:
        raise UserInputError(
            f"{what} does not match its reference {reference} ({'; '.join(problems)})",
            path=other,
            fix="evaluate predictions in the geometry of the reference labels (latdiff_predict writes them so)",
        )


def _read_map(path: Path, ref_file: Path, geometry: ImageGeometry, shape: tuple[int, ...]) -> np.ndarray:
    arr, geo = read_image(path)
    if arr.shape[0] != 1:
        raise UserInputError(f"expected a single-channel map, got {arr.shape[0]} components", path=path)
    _check_geometry(ref_file, geometry, path, geo, "uncertainty map")
    arr = arr[0].reshape(shape)
    if not np.isfinite(arr).all():
        raise UserInputError("map contains NaN or inf", path=path, fix="re-run latdiff_predict for this case")
    return arr


def _read_probabilities(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    try:
        arrays = load_npz(path)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"cannot be read as .npz ({exc})", path=path) from None
    if "probabilities" not in arrays:
        raise UserInputError(f"has no array 'probabilities' (found {sorted(arrays)})", path=path)
    prob = np.asarray(arrays["probabilities"])
    if not np.issubdtype(prob.dtype, np.floating):
        raise UserInputError(f"'probabilities' must be float, got {prob.dtype}", path=path)
    prob = prob.astype(np.float32)
    if prob.ndim != 4 or prob.shape[1:] != shape:
        raise UserInputError(
            f"'probabilities' has shape {prob.shape}, expected (K, {', '.join(map(str, shape))}) "
            "(classes first, then the reference's (Z, Y, X))",
            path=path,
        )
    if not np.isfinite(prob).all() or (prob < 0).any():
        raise UserInputError("'probabilities' must be finite and non-negative", path=path)
    sums = prob.sum(axis=0, dtype=np.float64)
    if not np.allclose(sums, 1.0, rtol=0.0, atol=PROBABILITY_SUM_TOLERANCE):
        raise UserInputError(
            f"'probabilities' do not sum to 1 over the class axis (largest deviation {np.max(np.abs(sums - 1)):.3g})",
            path=path,
        )
    return (prob / sums[None]).astype(np.float32)  # undo float16 rounding


def _read_label_set(files: Sequence[Path], ref_file: Path, geometry: ImageGeometry, what: str) -> np.ndarray:
    arrays = []
    for f in files:
        arr, geo = read_label(f)
        _check_geometry(ref_file, geometry, f, geo, what)
        arrays.append(arr)
    return np.stack(arrays)


def _evaluate_one(job: _CaseJob) -> dict[str, Any]:
    ref, ref_geo = read_label(job.ref_file)
    pred, pred_geo = read_label(job.pred_file)
    _check_geometry(job.ref_file, ref_geo, job.pred_file, pred_geo, "prediction")
    if pred.shape != ref.shape:  # same size but e.g. a different dimension
        raise UserInputError(f"prediction shape {pred.shape} differs from reference {job.ref_file} {ref.shape}", path=job.pred_file)
    spacing = ref_geo.spacing_zyx
    if ref.shape[0] == 1:
        # A single slice: compute surfaces in-plane. In 3D every voxel of a one-slice mask would
        # touch the (padded) background above and below and count as surface.
        metrics = evaluate_case(pred[0], ref[0], list(job.labels), spacing[1:], job.ignore_label)
    else:
        metrics = evaluate_case(pred, ref, list(job.labels), spacing, job.ignore_label)
    entry: dict[str, Any] = {
        "case_id": job.case_id,
        "reference_file": str(job.ref_file),
        "prediction_file": str(job.pred_file),
        "metrics": metrics,
    }

    valid = None if job.ignore_label is None else ref != job.ignore_label
    folder = job.pred_file.parent
    calibration: dict[str, float] = {}
    prob_file = folder / f"{job.case_id}_probabilities.npz"
    if prob_file.is_file():
        prob = _read_probabilities(prob_file, ref.shape)
        ref_fg = ref if valid is None else np.where(valid, ref, 0)
        roi = region_of_interest(ref_fg, pred, int(job.roi_margin))
        if valid is not None:
            roi &= valid
        calibration["ECE_all"] = expected_calibration_error(prob, ref, ECE_BINS, mask=valid)
        calibration["ECE_roi"] = expected_calibration_error(prob, ref, ECE_BINS, mask=roi)
    for key, suffixes in AUROC_MAPS.items():
        map_file = next((f for f in (folder / f"{job.case_id}{s}.nii.gz" for s in suffixes) if f.is_file()), None)
        if map_file is not None:
            unc = _read_map(map_file, job.ref_file, ref_geo, ref.shape)
            calibration[key] = uncertainty_error_auroc(unc, pred, ref, mask=valid)
    if calibration:
        entry["calibration"] = calibration

    samples_dir = folder / f"{job.case_id}_samples"
    sample_files = []
    if samples_dir.is_dir():
        sample_files = sorted(p for p in samples_dir.iterdir() if p.name.startswith("sample_") and p.name.endswith(job.ending))
    if sample_files:
        samples = _read_label_set(sample_files, job.ref_file, ref_geo, "diffusion sample")
        entry["samples"] = _sample_entry(samples, ref, job.labels, None if valid is None else ~valid)
        if job.rater_files:
            for r in job.rater_files:
                if not r.is_file():
                    raise UserInputError(
                        f"rater annotation of case {job.case_id} not found", path=r,
                        fix="check dataset.json's num_raters / rater_labels_folder or --raters-folder",
                    )
            raters = _read_label_set(job.rater_files, job.ref_file, ref_geo, "rater annotation")
            terms = energy_distance_terms(samples, raters)
            entry["ambiguity"] = {
                "GED": terms["GED"],
                "HM_IoU": hungarian_matched_iou(samples, raters),
                "sample_diversity": terms["sample_diversity"],
                "rater_diversity": terms["rater_diversity"],
                "diversity_ratio": terms["diversity_ratio"],
                "sample_diversity_distinct_pairs": terms["sample_diversity_distinct_pairs"],
                "rater_diversity_distinct_pairs": terms["rater_diversity_distinct_pairs"],
                **frequency_map_agreement(samples, raters),
                "num_samples": len(sample_files),
                "num_raters": len(job.rater_files),
            }
    return entry


def _sample_entry(samples: np.ndarray, ref: np.ndarray, labels: Sequence[int], ignore: np.ndarray | None) -> dict[str, Any]:
    """``{class: {Dice_single_sample, Dice_pairwise_samples}, "foreground_mean": ..., "num_samples": S}``.

    The case's foreground mean skips classes absent from the case (NaN), as the class means
    over cases skip such cases.
    """
    per_class: dict[str, Any] = sample_dice_scores(samples, ref, labels, ignore)
    fg = [m for c, m in per_class.items() if c != "0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all-NaN -> NaN, fine
        per_class["foreground_mean"] = {
            name: float(np.nanmean([m[name] for m in fg])) if fg else float("nan") for name in SAMPLE_METRICS
        }
    per_class["num_samples"] = int(samples.shape[0])
    return per_class


def _reference_values(ref_file: Path) -> np.ndarray:
    return np.unique(read_label(ref_file)[0])


# --------------------------------------------------------------------------------------------
# the folder
# --------------------------------------------------------------------------------------------


def _extras_mean(per_case: list[dict], key: str, names: Sequence[str]) -> tuple[dict[str, float], dict[str, int]]:
    means, counts = {}, {}
    for name in names:
        values = np.array([c[key][name] for c in per_case if key in c and name in c[key]], dtype=np.float64)
        if values.size == 0:
            continue
        finite = values[~np.isnan(values)]
        means[name] = float(finite.mean()) if finite.size else float("nan")
        counts[name] = int(finite.size)
    return means, counts


def _samples_summary(per_case: list[dict], labels: Sequence[int]) -> dict[str, Any] | None:
    """Means of the single-sample and pairwise Dice, laid out and averaged like ``mean`` / ``foreground_mean``.

    Per class a ``nanmean`` over the cases that have samples; the foreground mean is the plain
    mean of the per-class means over classes other than 0, as in
    :func:`~latdiffunet.evaluation.metrics.aggregate`, so it compares with ``foreground_mean``.
    """
    entries = [c["samples"] for c in per_case if "samples" in c]
    if not entries:
        return None
    mean: dict[str, dict[str, float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all-NaN slice -> NaN, fine
        for c in (str(int(v)) for v in labels):
            mean[c] = {name: float(np.nanmean([e[c][name] for e in entries])) for name in SAMPLE_METRICS}
    fg = [k for k in mean if k != "0"]
    foreground_mean = {name: float(np.mean([mean[k][name] for k in fg])) if fg else float("nan") for name in SAMPLE_METRICS}
    return {"mean": mean, "foreground_mean": foreground_mean}


def _check_labels(labels: Sequence[int], ignore_label: int | None) -> list[int]:
    out = []
    for c in labels:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0:
            raise UserInputError(f"labels must be non-negative integers, got {c!r}")
        out.append(int(c))
    if not out:
        raise UserInputError("no labels to evaluate", fix="pass -l 1 2 ... or -d DATASET")
    if len(set(out)) != len(out):
        raise UserInputError(f"labels repeat: {out}")
    if ignore_label is not None and ignore_label in out:
        raise UserInputError(f"the ignore label {ignore_label} cannot also be evaluated as a class (labels {out})")
    return sorted(out)


def evaluate_folder(
    ref: str | Path,
    pred: str | Path,
    labels: Sequence[int] | None,
    ignore_label: int | None = None,
    num_processes: int = 2,
    raters_folder: str | Path | None = None,
    roi_margin: int = 5,
    allow_missing: bool = False,
    *,
    num_raters: int | None = None,
    case_ids: Sequence[str] | None = None,
    file_ending: str | None = None,
    output_file: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``pred`` against ``ref``, write ``summary.json`` and return its content.

    Parameters
    ----------
    ref, pred : path
        Folder of reference label maps ``CASE<ending>`` and ``latdiff_predict``'s output folder.
    labels : sequence of int or None
        Classes to evaluate; None: every value found in the references except 0 and the ignore
        label.
    ignore_label : int, optional
        Reference value marking unannotated voxels, left out of every metric.
    num_processes : int
        Worker processes (fork) for reading and evaluating; 1 runs in this process.
    raters_folder : path, optional
        Folder with ``CASE_rater{k}<ending>``; with ``CASE_samples/`` in ``pred`` this adds GED,
        HM-IoU, the diversities and the frequency-map agreement (cases with fewer than two
        raters are skipped).
    roi_margin : int
        Dilation in voxels of the union of reference and predicted foreground for ``ECE_roi``.
    allow_missing : bool
        A reference without prediction is listed under ``missing_cases`` instead of an error.
    num_raters : int, optional
        Raters every case must have in ``raters_folder`` (dataset.json's ``num_raters``); a
        missing file is then an error rather than a skipped case.
    case_ids : sequence of str, optional
        Evaluate only these references (e.g. one fold's validation cases out of ``labelsTr``).
    file_ending : str, optional
        Ending of the label files; default: the one ending found in ``ref``.
    output_file : path, optional
        Where to write the summary; default ``pred/summary.json``.
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    dict
        ``metric_per_case``, ``mean``, ``foreground_mean``, ``labels``, ``num_cases``,
        ``ignore_label``, ``missing_cases`` and, when measured, ``calibration_mean``,
        ``ambiguity`` and ``samples`` (with the number of contributing cases in
        ``calibration_num_cases``, ``ambiguity_num_cases``, ``samples_num_cases``).
    """
    ref_folder, pred_folder = Path(ref).absolute(), Path(pred).absolute()
    if not pred_folder.is_dir():
        raise UserInputError("prediction folder not found", path=pred_folder)
    all_cases, ending = list_reference_cases(ref_folder, file_ending)
    if case_ids is not None:
        unknown = sorted(set(case_ids) - set(all_cases))
        if unknown:
            raise UserInputError(
                f"{len(unknown)} requested case(s) have no reference label: "
                + ", ".join(f"{c}{ending}" for c in unknown[:10]),
                path=ref_folder,
            )
        all_cases = sorted(set(case_ids))
    if isinstance(roi_margin, bool) or not isinstance(roi_margin, (int, np.integer)) or roi_margin < 0:
        raise UserInputError(f"the ROI margin must be a non-negative number of voxels, got {roi_margin!r}")
    rater_dir = None if raters_folder is None else Path(raters_folder).absolute()
    if rater_dir is not None and not rater_dir.is_dir():
        raise UserInputError("raters folder not found", path=rater_dir)

    missing = [c for c in all_cases if not (pred_folder / f"{c}{ending}").is_file()]
    if missing and not allow_missing:
        also = f" (and {len(missing) - 1} more: {', '.join(missing[1:6])}{', ...' if len(missing) > 6 else ''})" if len(missing) > 1 else ""
        raise UserInputError(
            f"no prediction for reference {ref_folder / (missing[0] + ending)}{also}",
            path=pred_folder / f"{missing[0]}{ending}",
            fix="predict the missing cases (latdiff_predict), or pass --allow-missing to evaluate the others",
        )
    cases = [c for c in all_cases if c not in set(missing)]
    if not cases:
        raise UserInputError(f"none of the {len(all_cases)} references has a prediction", path=pred_folder)

    if labels is None:
        values = map_with_progress(
            _reference_values, [ref_folder / f"{c}{ending}" for c in cases], num_processes,
            desc="reading labels", disable=not progress,
        )
        found = set(int(v) for arr in values for v in arr)
        labels = sorted(found - {0} - ({ignore_label} if ignore_label is not None else set()))
        if not labels:
            raise UserInputError(
                "the references hold no foreground label, so there is nothing to evaluate", path=ref_folder,
                fix="pass the classes with -l 1 2 ... or the dataset with -d",
            )
    labels = _check_labels(labels, ignore_label)

    jobs = []
    for c in cases:
        raters = _rater_files(c, ending, rater_dir, num_raters)
        jobs.append(_CaseJob(
            case_id=c,
            ref_file=ref_folder / f"{c}{ending}",
            pred_file=pred_folder / f"{c}{ending}",
            ending=ending,
            labels=tuple(labels),
            ignore_label=None if ignore_label is None else int(ignore_label),
            roi_margin=int(roi_margin),
            rater_files=tuple(raters) if len(raters) > 1 else (),
        ))
    per_case = map_with_progress(_evaluate_one, jobs, num_processes, desc="evaluating", disable=not progress)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        summary = summarize(per_case)
    summary["labels"] = labels
    summary["num_cases"] = len(per_case)
    summary["ignore_label"] = ignore_label
    summary["missing_cases"] = missing
    summary["reference_folder"] = str(ref_folder)
    summary["prediction_folder"] = str(pred_folder)
    summary["file_ending"] = ending
    means, counts = _extras_mean(per_case, "calibration", CALIBRATION_METRICS)
    if means:
        summary["calibration_mean"] = means
        summary["calibration_num_cases"] = counts
    means, counts = _extras_mean(per_case, "ambiguity", AMBIGUITY_METRICS)
    if means:
        # a ratio of means: cases where the raters (nearly) agree cannot blow it up
        ratio = means["sample_diversity"] / means["rater_diversity"] if means["rater_diversity"] > 0 else float("nan")
        # the same ratio from the distinct-pair terms: the one to read when samples and raters differ in number
        distinct = means.get("sample_diversity_distinct_pairs", float("nan"))
        distinct_ratio = distinct / means["rater_diversity_distinct_pairs"] if means["rater_diversity_distinct_pairs"] > 0 else float("nan")
        summary["ambiguity"] = {**means, "diversity_ratio_of_means": ratio, "diversity_ratio_distinct_pairs": distinct_ratio}
        summary["ambiguity_num_cases"] = {**counts, "diversity_ratio_of_means": counts["rater_diversity"],
                                          "diversity_ratio_distinct_pairs": counts["rater_diversity"]}
    samples = _samples_summary(per_case, labels)
    if samples is not None:
        summary["samples"] = samples
        summary["samples_num_cases"] = sum("samples" in c for c in per_case)
    write_json(summary, output_file if output_file is not None else pred_folder / "summary.json")
    return summary
