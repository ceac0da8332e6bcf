"""``latdiff_analyze_sampler -d DATASET -c CONFIG -f FOLD``: sample quality after every DDIM step, and
how many steps (and samples) a dataset needs.

The number of sampling steps and of samples per image are what every prediction pays for, and the
plans' defaults are guesses until measured. Following the analysis of diffusion segmentation, the
sampler is judged by what a user gets, on cases the model never trained on: the labelling
accuracy of one sample and of the mean of the samples, the calibration of the mean probabilities
and, where several raters annotated each image, how well the samples spread like the raters.

**What is run.** The cases the fold held back from training to make its choices on
(``training_config.json``; ``--cases validation``: the fold's validation cases instead, to
measure; never test data), or ``--max-cases`` of them spread evenly over the sorted list, are
read from the raw images and preprocessed exactly as ``latdiff_predict`` does. For each total
step count S of ``--steps`` (the plans' own count is always added) every case is sampled with S
DDIM steps with ``latdiff_predict``'s seed handling, so every S starts from the *same* noise, and
the fold's calibrated temperature. The x0 estimate after each step i = 1..S is decoded
(:meth:`~latdiffunet.inference.predictor.LatentDiffusionPredictor.sample_probabilities` with
``every_step``): row i says how good the segmentation held by an S-step chain after i steps is.
That is not an i-step chain (its timesteps differ): the row ``S = i, step i`` is that.

**Where it is scored.** In the original geometry, as ``latdiff_predict`` + ``latdiff_evaluate``
score it: the mean probabilities of each step go back to the image's grid and their argmax is the
label, each sample's label map is resampled as ``--save_samples`` writes it, and the raw labels
(and rater files) are the reference. The last row of S = the plans' steps therefore equals
``latdiff_predict --seed SEED --save_samples`` followed by ``latdiff_evaluate`` (tests check the
Dice of the mean and of one sample, and GED, to 1e-6). The ECE here is computed from float32
probabilities; ``latdiff_evaluate`` reads them as stored (float16), which moves ECE by ~1e-3.
Averages follow ``latdiff_evaluate``'s summary: per class over cases (cases without the class
skipped), then over the foreground classes; ECE and the rater metrics over cases.

**Columns.** ``Dice_of_mean`` (``latdiff_evaluate``'s foreground mean Dice), ``Dice_single_sample``
(mean over samples of one sample's Dice), ``Dice_pairwise_samples`` (Dice between two samples: 1
when they all agree), ``ECE_all`` / ``ECE_roi`` (expected calibration error over all voxels / near
the structures) and, with several raters, ``GED`` (the squared generalised energy distance of
``latdiff_evaluate``, d = 1 - IoU), ``HM_IoU`` and ``sample_diversity``. Per S also the sampling
time per case (``sampling_seconds_per_case``: ``latdiff_predict``'s sampling alone, without the
per-step decoding, measured on the first ``TIMING_CASES`` cases once the model is warm) and, at
the final step, the Dice of the mean of the first n samples (``by_num_samples``), which says how
many samples the mean needs.

**Output** (``-o``, default ``$LATDIFF_RESULTS/<dataset>/<trainer>__<plans>__<config>/fold_<k>/
sampler_analysis``): ``sampler_analysis.json`` (per model and S the per-step rows, and a
``recommendation``: the smallest S whose final Dice of the mean is within ``MEAN_DICE_TOLERANCE``
of the best and whose Dice of one sample is within ``SINGLE_DICE_TOLERANCE`` of the best, with the
reasoning as text; the same for the number of samples) and ``sampler_analysis.png``. Several
``-tr`` (e.g. ``LatentDiffusionTrainer LatentDiffusionTrainer_vpred LatentDiffusionTrainer_epspred``:
x0, v and eps prediction) go into the same JSON and plot; the top-level recommendation is the
first trainer's.

Memory: a case's probabilities for S steps x N samples are held at once (S x N x classes x voxels
float32); for large 3D cases lower ``--num-samples`` or leave the largest S out of ``--steps``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from latdiffunet.utilities.cli import friendly_errors, set_cpu_friendly_threading

DEFAULT_STEPS = (1, 2, 4, 8, 16)
#: A step count is good enough when its final Dice of the mean is within this of the best ...
MEAN_DICE_TOLERANCE = 0.005
#: ... and its Dice of one sample within this of the best (what a user opening one sample sees).
SINGLE_DICE_TOLERANCE = 0.01
#: Cases whose plain sampling (no per-step decoding) is timed for ``sampling_seconds_per_case``.
TIMING_CASES = 3
#: latdiff_evaluate's default --roi-margin (voxels around the structures for ECE_roi).
ROI_MARGIN = 5
CLASS_METRICS = {"Dice": "Dice_of_mean", "Dice_single_sample": "Dice_single_sample",
                 "Dice_pairwise_samples": "Dice_pairwise_samples"}
CASE_METRICS = ("ECE_all", "ECE_roi", "GED", "HM_IoU", "sample_diversity")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="latdiff_analyze_sampler",
        description=(
            "Score the samples after every DDIM step for several total step counts on the cases a fold held back "
            "(or, with --cases validation, its validation cases) "
            "(Dice of one sample and of the mean, ECE, GED with several raters, time per case) and recommend the "
            "number of steps and samples. Writes sampler_analysis.json and sampler_analysis.png."
        ),
    )
    p.add_argument("-d", "--dataset", required=True, help="dataset ID or name the model was trained on")
    p.add_argument("-c", "--configuration", default=None, help="2d or 3d (default: the one that was trained; 3d preferred)")
    p.add_argument("-f", "--fold", required=True, help="the trained fold whose validation cases are analysed (0-4)")
    p.add_argument("-p", "--plans", default="latdiffPlans", help="plans identifier (default latdiffPlans)")
    p.add_argument("-tr", "--trainer", nargs="+", default=["LatentDiffusionTrainer"],
                   help="trainer name(s); several (e.g. LatentDiffusionTrainer LatentDiffusionTrainer_vpred "
                        "LatentDiffusionTrainer_epspred) are compared in one JSON and plot")
    p.add_argument("--steps", type=int, nargs="+", default=list(DEFAULT_STEPS),
                   help="total DDIM step counts to try (default 1 2 4 8 16; the plans' count is always added)")
    p.add_argument("--num-samples", type=int, default=None, help="samples per case (default: the plans')")
    p.add_argument("--max-cases", type=int, default=None,
                   help="analyse this many validation cases, spread evenly over the sorted list (default: all)")
    p.add_argument("--cases", choices=["held_back", "validation"], default="held_back",
                   help="held_back (default): the cases the fold held back from training to make its choices on, so a "
                        "recommendation taken from here leaves the validation number untouched (falls back to the "
                        "validation cases when the run held nothing back); validation: the fold's validation cases, "
                        "to measure rather than to choose")
    p.add_argument("--checkpoint", default=None, help="best or final (default: best when it exists, as latdiff_predict)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, as latdiff_predict --seed (default 0)")
    p.add_argument("--device", default=None, choices=["cuda", "cpu", "mps"], help="default: cuda if available")
    p.add_argument("-o", "--output", default=None,
                   help="output folder (default: <first trainer's run folder>/fold_<k>/sampler_analysis)")
    return p


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationCase:
    """One validation case of the raw dataset: its image files, label file and rater files."""

    case_id: str
    images: tuple[Path, ...]
    label: Path
    raters: tuple[Path, ...] = ()


def spread_cases(case_ids: Sequence[str], n: int | None) -> list[str]:
    """``n`` of the sorted ``case_ids``, evenly spaced (all when ``n`` is None or larger).

    Not the first n: case names sort by patient, so the first few are a few patients' slices.
    """
    ids = sorted(case_ids)
    if n is None or n >= len(ids):
        return ids
    picks = np.unique(np.linspace(0, len(ids) - 1, max(n, 1)).round().astype(int))
    return [ids[i] for i in picks]


def validation_cases(raw: Path, spec, case_ids: Sequence[str]) -> list[ValidationCase]:
    """The raw files of ``case_ids``; a missing image, label or rater file is an error naming it."""
    from latdiffunet.errors import UserInputError
    from latdiffunet.inference.predict_folder import list_input_cases

    images = list_input_cases(raw / "imagesTr", spec)
    ending = spec.file_ending
    raters_folder = raw / spec.rater_labels_folder if spec.num_raters > 1 and spec.rater_labels_folder else None
    cases = []
    for c in case_ids:
        if c not in images:
            raise UserInputError(f"validation case {c} has no image", path=raw / "imagesTr" / f"{c}_0000{ending}",
                                 fix="the raw dataset must hold every case of splits_final.json")
        label = raw / "labelsTr" / f"{c}{ending}"
        raters = tuple(raters_folder / f"{c}_rater{k}{ending}" for k in range(spec.num_raters)) if raters_folder else ()
        for f in (label, *raters):
            if not f.is_file():
                raise UserInputError(f"reference of validation case {c} not found", path=f,
                                     fix="the analysis scores against the raw labels (and rater files); restore them")
        cases.append(ValidationCase(c, tuple(images[c]), label, raters))
    return cases


# --------------------------------------------------------------------------------------------
# scoring one step of one case (original geometry, as latdiff_predict + latdiff_evaluate)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """A case's reference in the original geometry and what scoring against it needs."""

    label: np.ndarray  # (Z, Y, X)
    raters: np.ndarray | None  # (R, Z, Y, X) with several raters
    labels: tuple[int, ...]  # classes scored (the foreground labels)
    label_values: tuple[int, ...]  # class index -> label value
    ignore_label: int | None = None

    @property
    def valid(self) -> np.ndarray | None:
        return None if self.ignore_label is None else self.label != self.ignore_label


def to_original(sample_probs: np.ndarray, props: dict, label_values: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(N, K, *preprocessed)`` -> mean probabilities ``(K, *original)``, label ``(*original)``, sample labels
    ``(N, *original)``, computed as ``latdiff_predict`` writes them (CASE_probabilities, CASE, CASE_samples)."""
    from latdiffunet.inference.export import labels_to_original, probabilities_to_original
    from latdiffunet.inference.uncertainty import uncertainty_maps

    maps = uncertainty_maps(sample_probs)
    values = np.asarray(label_values)
    probs = probabilities_to_original(maps["probabilities"], props)
    seg = values[probs.argmax(0)]
    indices = list(range(len(values)))
    samples = np.stack([values[labels_to_original(s, props, indices)] for s in maps["sample_labels"]])
    return probs, seg, samples


def _check_shape(props: dict, reference: Reference, case: ValidationCase) -> None:
    """The prediction goes back to the image's grid (``shape_before_crop``): the label must share it."""
    from latdiffunet.errors import UserInputError

    shape = tuple(int(v) for v in props["shape_before_crop"])
    if shape != reference.label.shape:
        raise UserInputError(
            f"the label's shape {reference.label.shape} differs from its image's {shape}", path=case.label,
            fix="image and label of a case must share their geometry (latdiff_plan_and_preprocess --verify_dataset_integrity)",
        )


def mean_dice(seg: np.ndarray, reference: Reference) -> dict[str, float]:
    """Per class, Dice of the label of the mean (``latdiff_evaluate``'s ``Dice``)."""
    from latdiffunet.evaluation.metrics import dice

    valid = reference.valid
    ignore = None if valid is None else ~valid
    return {str(c): dice(seg == c, reference.label == c, ignore) for c in reference.labels}


def rater_metrics(samples: np.ndarray, raters: np.ndarray) -> dict[str, float]:
    """GED (``latdiff_evaluate``'s), Hungarian-matched IoU and the samples' diversity against the raters."""
    from latdiffunet.evaluation.ambiguity import energy_distance_terms, hungarian_matched_iou

    terms = energy_distance_terms(samples, raters)
    return {"GED": terms["GED"], "HM_IoU": hungarian_matched_iou(samples, raters), "sample_diversity": terms["sample_diversity"]}


def score_step(sample_probs: np.ndarray, props: dict, reference: Reference) -> tuple[dict[str, Any], np.ndarray]:
    """Every metric of one step of one case, and the sample labels in the original geometry."""
    from latdiffunet.evaluation.ambiguity import sample_dice_scores
    from latdiffunet.evaluation.calibration import expected_calibration_error, region_of_interest
    from latdiffunet.evaluation.evaluate_folder import ECE_BINS

    probs, seg, samples = to_original(sample_probs, props, reference.label_values)
    valid = reference.valid
    ref = reference.label
    entry: dict[str, Any] = {"Dice": mean_dice(seg, reference)}
    per_class = sample_dice_scores(samples, ref, reference.labels, None if valid is None else ~valid)
    for name in ("Dice_single_sample", "Dice_pairwise_samples"):
        entry[name] = {c: m[name] for c, m in per_class.items()}
    roi = region_of_interest(ref if valid is None else np.where(valid, ref, 0), seg, ROI_MARGIN)
    if valid is not None:
        roi &= valid
    entry["ECE_all"] = expected_calibration_error(probs, ref, ECE_BINS, mask=valid)
    entry["ECE_roi"] = expected_calibration_error(probs, ref, ECE_BINS, mask=roi)
    if reference.raters is not None:
        entry.update(rater_metrics(samples, reference.raters))
    return entry, samples


def mean_label(sample_probs: np.ndarray, props: dict, label_values: Sequence[int]) -> np.ndarray:
    """The label of the mean of ``sample_probs`` in the original geometry (``latdiff_predict``'s CASE file)."""
    from latdiffunet.inference.export import probabilities_to_original

    mean = sample_probs.mean(0).astype(np.float32)  # as uncertainty_maps
    return np.asarray(label_values)[probabilities_to_original(mean, props).argmax(0)]


def sample_count_entries(sample_probs: np.ndarray, samples: np.ndarray, props: dict, reference: Reference,
                         counts: Sequence[int]) -> dict[int, dict[str, Any]]:
    """At one step, for each n in ``counts`` below the number of samples: Dice of the mean of the first
    n samples and, with raters, their GED, HM-IoU and diversity (``samples``: all sample labels, original geometry)."""
    out = {}
    for n in counts:
        if n >= len(sample_probs):
            continue
        entry: dict[str, Any] = {"Dice": mean_dice(mean_label(sample_probs[:n], props, reference.label_values), reference)}
        if reference.raters is not None:
            entry.update(rater_metrics(samples[:n], reference.raters))
        out[n] = entry
    return out


def sample_counts(num_samples: int) -> list[int]:
    """1, 2, 4, ... below ``num_samples``, and ``num_samples``."""
    return sorted({2**k for k in range(int(math.log2(max(num_samples, 1))) + 1) if 2**k < num_samples} | {num_samples})


# --------------------------------------------------------------------------------------------
# averaging over cases (as latdiff_evaluate's summary)
# --------------------------------------------------------------------------------------------


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def average_entries(entries: Sequence[dict[str, Any]], labels: Sequence[int]) -> dict[str, Any]:
    """One row from per-case entries: per class ``nanmean`` over cases, then the plain mean over the
    (foreground) classes, like ``foreground_mean`` of ``latdiff_evaluate``; case-level metrics ``nanmean``."""
    row: dict[str, Any] = {}
    classes = [str(int(c)) for c in labels]
    for name, key in CLASS_METRICS.items():
        if not any(name in e for e in entries):
            continue
        per_class = {c: _nanmean([e[name][c] for e in entries if name in e]) for c in classes}
        fg = [v for c, v in per_class.items() if c != "0"]
        row[key] = float(np.mean(fg)) if fg else float("nan")
        row[f"{key}_per_class"] = per_class
    for name in CASE_METRICS:
        values = [e[name] for e in entries if name in e]
        if values:
            row[name] = _nanmean(values)
    return row


# --------------------------------------------------------------------------------------------
# recommendation
# --------------------------------------------------------------------------------------------


def _fmt(x: float | None) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _steps(n: int | None) -> str:
    return f"{n} step" + ("" if n == 1 else "s")


def recommend_steps(final_rows: dict[int, dict], plans_steps: int, seconds: dict[int, float] | None = None,
                    mean_tolerance: float = MEAN_DICE_TOLERANCE, single_tolerance: float = SINGLE_DICE_TOLERANCE) -> dict:
    """The smallest step count whose final Dice of the mean is within ``mean_tolerance`` of the best and
    whose Dice of one sample is within ``single_tolerance`` of the best, with the reasoning as text.

    ``final_rows`` maps each step count to the row of its last step. More steps cost time on every
    prediction, so the smallest count that loses nothing measurable wins; a count that needs both
    tolerances met keeps single samples usable, not only their mean.
    """
    rows = {s: r for s, r in sorted(final_rows.items()) if not math.isnan(r.get("Dice_of_mean", float("nan")))}
    if not rows:
        return {"steps": None, "reason": "no step count has a Dice of the mean (no foreground in reference or prediction)"}
    best_mean_s = max(rows, key=lambda s: rows[s]["Dice_of_mean"])
    best_mean = rows[best_mean_s]["Dice_of_mean"]
    singles = {s: r.get("Dice_single_sample", float("nan")) for s, r in rows.items()}
    finite = {s: v for s, v in singles.items() if not math.isnan(v)}
    best_single_s = max(finite, key=finite.get) if finite else None
    best_single = finite[best_single_s] if finite else float("nan")

    def good(s: int) -> bool:
        mean_ok = rows[s]["Dice_of_mean"] >= best_mean - mean_tolerance
        single_ok = best_single_s is None or (not math.isnan(singles[s]) and singles[s] >= best_single - single_tolerance)
        return mean_ok and single_ok

    ok = [s for s in rows if good(s)]
    criterion = (f"smallest step count whose final Dice of the mean is within {mean_tolerance} of the best "
                 f"({_fmt(best_mean)} at {_steps(best_mean_s)}) and whose Dice of one sample is within {single_tolerance} "
                 f"of the best ({_fmt(best_single)} at {_steps(best_single_s)})")
    if ok:
        chosen = min(ok)
        fewer = [s for s in rows if s < chosen]
        why = f"{_steps(chosen)}: the {criterion}. At {_steps(chosen)}: Dice of the mean " \
              f"{_fmt(rows[chosen]['Dice_of_mean'])}, of one sample {_fmt(singles[chosen])}."
        if fewer:
            why += " Fewer steps lose more: " + "; ".join(
                f"{_steps(s)}: mean {_fmt(rows[s]['Dice_of_mean'])}, one sample {_fmt(singles[s])}" for s in fewer) + "."
    else:
        chosen = best_mean_s
        why = f"{_steps(chosen)}: no step count meets the {criterion}; the best Dice of the mean wins."
    # not in the criterion, for judgement: spread and calibration also change with the step count
    why += " Outside the criterion:"
    for key, what, best in (("GED", "GED", min), ("ECE_roi", "ECE in the ROI", min)):
        values = {s: r[key] for s, r in rows.items() if key in r and not math.isnan(r[key])}
        if chosen in values:
            s_best = best(values, key=values.get)
            why += f" {what} {_fmt(values[chosen])} at {_steps(chosen)} (lowest {_fmt(values[s_best])} at {_steps(s_best)});"
    pairwise = {s: r.get("Dice_pairwise_samples", float("nan")) for s, r in rows.items()}
    why += (" Dice between two samples (1: all samples alike) " + ", ".join(f"{_fmt(v)} at {_steps(s)}" for s, v in pairwise.items())
            + ".")
    if seconds and chosen in seconds:
        why += f" Sampling takes {seconds[chosen]:.3g} s per case at {_steps(chosen)}" + (
            f", {seconds[plans_steps]:.3g} s at the plans' {plans_steps}." if plans_steps in seconds and plans_steps != chosen else ".")
    if chosen != plans_steps:
        why += f" The plans use {_steps(plans_steps)}."
    return {"steps": int(chosen), "criterion": criterion, "reason": why}


def recommend_samples(by_num_samples: list[dict], mean_tolerance: float = MEAN_DICE_TOLERANCE) -> dict:
    """The smallest number of samples whose Dice of the mean is within ``mean_tolerance`` of that of all of them."""
    rows = [r for r in by_num_samples if not math.isnan(r.get("Dice_of_mean", float("nan")))]
    if not rows:
        return {"num_samples": None, "reason": "no Dice of the mean to compare"}
    full = rows[-1]
    ok = [r for r in rows if r["Dice_of_mean"] >= full["Dice_of_mean"] - mean_tolerance]
    chosen = ok[0]
    why = (f"{chosen['num_samples']} sample{'s' if chosen['num_samples'] > 1 else ''}: the smallest number whose Dice of the mean ({_fmt(chosen['Dice_of_mean'])}) is "
           f"within {mean_tolerance} of that of all {full['num_samples']} ({_fmt(full['Dice_of_mean'])}). "
           + ", ".join(f"{r['num_samples']}: {_fmt(r['Dice_of_mean'])}" for r in rows) + ".")
    if chosen is full and len(rows) > 1:
        why += " The mean still improves at the largest count tried: more samples may help (rerun with a larger --num-samples)."
    if "HM_IoU" in full:
        why += " With several raters more samples also cover more of their modes (HM_IoU: " + ", ".join(
            f"{r['num_samples']}: {_fmt(r.get('HM_IoU'))}" for r in rows) + ")."
    return {"num_samples": int(chosen["num_samples"]), "reason": why}


# --------------------------------------------------------------------------------------------
# one model
# --------------------------------------------------------------------------------------------


def analyse_model(predictor, cases: list[ValidationCase], steps: Sequence[int], num_samples: int, seed: int,
                  plans_steps: int, progress: bool = True, desc: str = "") -> dict:
    """Per-step rows for every step count, time per case and recommendations of one trained fold.

    ``predictor`` is a :class:`~latdiffunet.inference.predictor.LatentDiffusionPredictor` of one fold.
    """
    from tqdm import tqdm

    from latdiffunet.diffusion import NoiseSchedule, inference_timesteps
    from latdiffunet.imageio.sitk_io import read_images_as_channels, read_label
    from latdiffunet.inference.predictor import PredictionSettings

    spec = predictor.dataset_spec
    diffusion = predictor.diffusions[0]
    num_timesteps = NoiseSchedule.from_plan(diffusion).num_timesteps
    counts = sample_counts(num_samples)
    per_step: dict[int, list[list[dict]]] = {s: [[] for _ in range(s)] for s in steps}
    per_count: dict[int, dict[int, list[dict]]] = {s: {n: [] for n in counts} for s in steps}
    seconds: dict[int, list[float]] = {s: [] for s in steps}
    max_difference: dict[int, float] = {}
    start = time.perf_counter()
    bar = tqdm(cases, desc=desc or "cases", dynamic_ncols=True, disable=not progress)
    for index, case in enumerate(bar):
        data, geometry = read_images_as_channels(case.images)
        pre, props = predictor.preprocess(data, geometry)
        raters = np.stack([read_label(f)[0] for f in case.raters]) if len(case.raters) > 1 else None
        reference = Reference(read_label(case.label)[0], raters, tuple(spec.foreground_labels), tuple(spec.class_labels),
                              spec.ignore_label)
        _check_shape(props, reference, case)
        for s in steps:
            bar.set_postfix_str(f"{case.case_id}, {_steps(s)}")
            settings = PredictionSettings(num_samples=num_samples, steps=s, seed=seed)
            probs = predictor.sample_probabilities(pre, settings, every_step=True, case_id=case.case_id)  # (S, N, K, *pre)
            for i in range(s):
                entry, samples = score_step(probs[i], props, reference)
                per_step[s][i].append(entry)
            counted = sample_count_entries(probs[-1], samples, props, reference, counts)
            counted[num_samples] = {k: v for k, v in entry.items() if k in ("Dice", "GED", "HM_IoU", "sample_diversity")}
            for n, e in counted.items():
                per_count[s][n].append(e)
            if index < TIMING_CASES:  # latdiff_predict's sampling alone, model warm from the pass above
                t0 = time.perf_counter()
                plain = predictor.sample_probabilities(pre, settings, case_id=case.case_id)
                seconds[s].append(time.perf_counter() - t0)
                max_difference[s] = max(max_difference.get(s, 0.0), float(np.abs(plain - probs[-1]).max()))
    labels = spec.foreground_labels
    by_steps = {}
    for s in steps:
        timesteps = inference_timesteps(num_timesteps, s)
        rows = [{"step": i + 1, "t": int(timesteps[i]), **average_entries(per_step[s][i], labels)} for i in range(s)]
        by_count = [{"num_samples": n, **average_entries(per_count[s][n], labels)} for n in counts]
        by_steps[s] = {
            "sampling_seconds_per_case": float(np.mean(seconds[s])) if seconds[s] else None,
            "timed_cases": len(seconds[s]),
            "last_step_max_difference_to_plain_sampling": max_difference.get(s),
            "rows": rows,
            "by_num_samples": by_count,
        }
    finals = {s: by_steps[s]["rows"][-1] for s in steps}
    step_choice = recommend_steps(finals, plans_steps, {s: v["sampling_seconds_per_case"] for s, v in by_steps.items()
                                                        if v["sampling_seconds_per_case"] is not None})
    chosen = step_choice["steps"] if step_choice["steps"] is not None else plans_steps
    return {
        "run_folder": str(predictor.run_folder),
        "checkpoint": predictor.checkpoints[0],
        "parameterization": diffusion.get("parameterization"),
        "noise_scale": float(diffusion.get("noise_scale", 1.0)),
        "eta": float(diffusion.get("eta", 0.0)),
        "analysis_seconds": round(time.perf_counter() - start, 1),
        "recommendation": {
            **step_choice,
            "samples": recommend_samples(by_steps[chosen]["by_num_samples"]) | {"at_steps": int(chosen)},
        },
        "by_steps": {str(s): v for s, v in by_steps.items()},
    }


# --------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------


def write_plot(result: dict, target: Path) -> None:
    """Per model: Dice of the mean (solid) and of one sample (dashed) after each step, one colour per
    step count; then, for every model against the step count: the final Dice (recommendation
    dotted), the final ECE (and GED), and the sampling time per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    from latdiffunet.utilities.file_io import atomic_path

    models = result["models"]
    ncols = len(models) + 3
    fig, axes = plt.subplots(1, ncols, figsize=(4.4 * ncols, 4), squeeze=False)
    axes = axes[0]
    cmap = plt.get_cmap("viridis")
    counts = result["steps"]

    def log2_axis(ax, ticks, xlabel):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)

    for ax, (name, model) in zip(axes, models.items()):
        for j, s in enumerate(counts):
            rows = model["by_steps"][str(s)]["rows"]
            colour = cmap(j / max(len(counts) - 1, 1))
            steps = [r["step"] for r in rows]
            ax.plot(steps, [r["Dice_of_mean"] for r in rows], "-o", color=colour, ms=4, label=f"S = {s}")
            ax.plot(steps, [r["Dice_single_sample"] for r in rows], "--", color=colour, lw=1)
        log2_axis(ax, list(range(1, max(counts) + 1)) if max(counts) <= 4 else counts, "step i of an S-step chain")
        ax.set_ylabel("foreground Dice (solid: mean, dashed: one sample)")
        ax.set_title(f"{name} ({model['parameterization']})", fontsize=9)
        ax.legend(fontsize=7)
    dice_ax, other_ax, time_ax = axes[-3:]
    for k, (trainer, model) in enumerate(models.items()):
        finals = [model["by_steps"][str(s)]["rows"][-1] for s in counts]
        variant = trainer.removeprefix("LatentDiffusionTrainer").lstrip("_") or "default"
        colour, p = f"C{k}", f"{variant} ({model['parameterization']})"  # two trainers may share a parameterisation
        dice_ax.plot(counts, [r["Dice_of_mean"] for r in finals], "-o", color=colour, label=f"{p}: mean")
        dice_ax.plot(counts, [r["Dice_single_sample"] for r in finals], "--s", color=colour, label=f"{p}: one sample")
        if model["recommendation"]["steps"] is not None:
            dice_ax.axvline(model["recommendation"]["steps"], color=colour, ls=":", lw=1)
        other_ax.plot(counts, [r["ECE_roi"] for r in finals], "-o", color=colour, label=f"{p}: ECE (ROI)")
        if "GED" in finals[0]:
            other_ax.plot(counts, [r["GED"] for r in finals], "--s", color=colour, label=f"{p}: GED")
        seconds = [model["by_steps"][str(s)]["sampling_seconds_per_case"] for s in counts]
        time_ax.plot(counts, [float("nan") if v is None else v for v in seconds], "-o", color=colour, label=p)
    for ax, ylabel in ((dice_ax, "final foreground Dice (dotted: recommended S)"), (other_ax, "final ECE in the ROI / GED"),
                       (time_ax, "sampling time per case (s)")):
        log2_axis(ax, counts, "total sampling steps S")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['dataset']} {result['configuration']} fold {result['fold']}: {result['num_cases']} validation cases, "
                 f"{result['num_samples']} samples, seed {result['seed']}", fontsize=10)
    fig.tight_layout()
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def _fold_folder(results_dataset: Path, trainer: str, plans: str, configuration: str | None, fold: str) -> Path:
    """``<trainer>__<plans>__<config>/fold_<k>``, or an error naming the folder that is missing."""
    from latdiffunet.errors import UserInputError
    from latdiffunet.inference.cli import find_run_folder

    run = find_run_folder(results_dataset, trainer, plans, configuration)
    folder = run / f"fold_{fold}"
    if not folder.is_dir():
        raise UserInputError(
            f"fold {fold} of {run.name} was not trained", path=folder,
            fix=f"train it: latdiff_train {results_dataset.name} {fold} -c {run.name.split('__')[-1]} -p {plans} -tr {trainer}",
        )
    return folder


def _held_back_cases(fold_folder: Path) -> list[str]:
    """The cases the run held back from training (``training_config.json``), or [] if none."""
    from latdiffunet.utilities.file_io import load_json

    config = fold_folder / "training_config.json"
    if not config.is_file():
        return []
    return list((load_json(config, "training_config.json").get("held_back") or {}).get("cases") or [])


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_cpu_friendly_threading()
    import torch

    from latdiffunet import paths
    from latdiffunet.diffusion import NoiseSchedule
    from latdiffunet.errors import UserInputError
    from latdiffunet.inference.predictor import LatentDiffusionPredictor
    from latdiffunet.raw_dataset import resolve_dataset_name
    from latdiffunet.utilities.file_io import load_json, write_json

    if not args.fold.isdigit():
        raise UserInputError(f"fold must be a number (0-4), got {args.fold!r}", fix="fold 'all' has no validation cases; give -f 0")
    if any(s < 1 for s in args.steps) or (args.num_samples is not None and args.num_samples < 1) or (
            args.max_cases is not None and args.max_cases < 1):
        raise UserInputError("--steps, --num-samples and --max-cases must be positive")
    name = resolve_dataset_name(args.dataset, paths.results_root(), paths.preprocessed_root(), paths.raw_root())
    results = paths.results_root() / name
    configuration = args.configuration
    folders = []
    for trainer in dict.fromkeys(args.trainer):
        folder = _fold_folder(results, trainer, args.plans, configuration, args.fold)
        configuration = configuration or folder.parent.name.split("__")[-1]  # every trainer the same configuration
        folders.append((trainer, folder))
    splits_file = paths.preprocessed_root() / name / "splits_final.json"
    splits = load_json(splits_file, "splits_final.json", fix=f"run latdiff_plan_and_preprocess -d {args.dataset}")
    fold = int(args.fold)
    if not isinstance(splits, list) or fold >= len(splits) or not splits[fold].get("val"):
        raise UserInputError(f"fold {fold} has no validation cases in this file", path=splits_file, fix="choose another fold with -f")
    raw = paths.raw_root() / name
    if not (raw / "imagesTr").is_dir() or not (raw / "labelsTr").is_dir():
        raise UserInputError(
            "raw dataset (imagesTr, labelsTr) not found", path=raw,
            fix="the analysis predicts the validation cases from the raw images and scores them against the raw labels, "
                "as latdiff_predict + latdiff_evaluate do: set LATDIFF_RAW to the folder holding the dataset",
        )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    held_back = _held_back_cases(folders[0][1]) if args.cases == "held_back" else []
    cases_from = "held_back" if held_back else "validation"
    case_ids = spread_cases(held_back or splits[fold]["val"], args.max_cases)
    out = Path(args.output) if args.output else folders[0][1] / "sampler_analysis"

    result: dict[str, Any] = {"dataset": name, "configuration": configuration, "plans": args.plans, "fold": fold}
    models = {}
    for trainer, folder in folders:
        predictor = LatentDiffusionPredictor(folder.parent, [args.fold], device, args.checkpoint)
        inference = predictor.configuration["inference"]
        if not models:
            plans_steps, num_samples = int(inference["sampling_steps"]), args.num_samples or int(inference["num_samples"])
            cases = validation_cases(raw, predictor.dataset_spec, case_ids)
            steps = sorted(set(args.steps) | {plans_steps})
            result.update({
                "space": "original geometry (as latdiff_predict + latdiff_evaluate)",
                "cases_from": cases_from, "cases": case_ids, "num_cases": len(case_ids),
                "num_validation_cases": len(splits[fold]["val"]),
                "num_samples": num_samples, "plans_num_samples": int(inference["num_samples"]), "plans_steps": plans_steps,
                "steps": steps, "seed": args.seed, "device": str(device),
                "multi_rater": bool(cases and len(cases[0].raters) > 1),
                "tolerances": {"Dice_of_mean": MEAN_DICE_TOLERANCE, "Dice_single_sample": SINGLE_DICE_TOLERANCE},
            })
        num_timesteps = NoiseSchedule.from_plan(predictor.diffusions[0]).num_timesteps
        if max(steps) > num_timesteps:
            raise UserInputError(f"--steps {max(steps)} exceeds the {num_timesteps} timesteps {trainer} was trained with",
                                 fix=f"give step counts from 1 to {num_timesteps}")
        models[trainer] = analyse_model(predictor, cases, steps, num_samples, args.seed, plans_steps, desc=trainer)
        result["models"] = models
        result["recommendation"] = models[folders[0][0]]["recommendation"] | {"trainer": folders[0][0]}
        write_json(result, out / "sampler_analysis.json")  # after each model: a long run keeps what it has
    write_plot(result, out / "sampler_analysis.png")
    for trainer, model in models.items():
        rec = model["recommendation"]
        print(f"{trainer} ({model['parameterization']}): " + "; ".join(
            f"{_steps(int(s))}: mean {_fmt(v['rows'][-1]['Dice_of_mean'])}, one sample {_fmt(v['rows'][-1]['Dice_single_sample'])}"
            for s, v in model["by_steps"].items()))
        print(f"  recommendation: {rec['reason']} {rec['samples']['reason']}")
    print(f"written {out / 'sampler_analysis.json'} and {out / 'sampler_analysis.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
