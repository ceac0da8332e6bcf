"""Sampling temperature: how far apart the samples of a trained model should be, chosen on held-back cases.

The starting noise (and random latent) of every sample is scaled by a temperature. At the end of
training :func:`calibrate_noise_scale` scores a few temperatures on the cases the fold held back
from its training part (``held_back.py``; never its validation cases, never test data), picks one
with :func:`choose_noise_scale` and stores it in the checkpoints, where prediction reads it
(``diffusion["noise_scale"]``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from latdiffunet.inference.latent_sampling import DiffusionWindowPredictor
from latdiffunet.inference.sliding_window import sliding_window_predict
from latdiffunet.training.data_loading import load_preprocessed_case
from latdiffunet.training.validation import foreground_dice
from latdiffunet.utilities.checkpoint import load_checkpoint, save_checkpoint


NOISE_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)


def _class_masks(labels: np.ndarray, classes: list[int]) -> list[np.ndarray]:
    """Per foreground class, a stack of binary masks (one per sample or rater)."""
    return [(labels == c) for c in classes]


@torch.no_grad()
def noise_scale_table(
    model: torch.nn.Module,
    folder: Path,
    case_ids: list[str],
    configuration: dict,
    device: torch.device,
    num_samples: int,
    scales: tuple[float, ...] = NOISE_SCALES,
    seed: int = 0,
    ignore_label: int | None = None,
) -> list[dict]:
    """GED, HM-IoU, Dice of one sample and Dice of the mean for each sampling temperature (noise scale).

    The temperature scales the starting noise and the random latent of every sample. GED
    (d = 1 - IoU per foreground class, averaged over classes, against every rater when the case has
    several, else against its label) is a proper score of the *set* of samples: it rewards samples
    that are each close to an annotation and penalises spread the annotations do not show, so the
    scale that minimises it is the one whose spread is honest. Scale 0 makes every sample the same
    (a deterministic segmenter); 1 is the distribution the model was trained to sample.
    The GED here is the unbiased estimate (:func:`unbiased_ged`): the protocol's GED counts the
    identical pairs of the sample-diversity term, which shrinks that term by (M - 1) / M for M
    samples and, with the few samples calibration affords (M = 5: by 20 %), would favour the
    coldest temperatures for a reason that vanishes at the 16 samples a user draws.
    HM-IoU (samples matched one-to-one to the annotations, per class) is reported beside it, not
    chosen on: it falls as the temperature rises wherever the samples' spread is not the raters'
    (LIDC, 64 held-back slices: 0.468 at scale 0, 0.423 at 0.75, 0.333 at 1), which GED alone hides.
    Voxels any annotation marks ``ignore_label`` (unannotated) count in neither GED nor Dice.
    """
    from latdiffunet.evaluation.ambiguity import energy_distance_terms, hungarian_matched_iou

    model.eval()
    num_classes = int(configuration["network"]["num_classes"])
    labels = list(range(num_classes))
    steps = configuration["inference"]["sampling_steps"]
    cases = [load_preprocessed_case(folder, c) for c in case_ids]
    # every scale from one conditioning per window and the same starting noise (common random
    # numbers: the scales differ by temperature only, so their paired differences are less noisy)
    generator = torch.Generator(device=device).manual_seed(seed)
    predictor = DiffusionWindowPredictor(model, configuration["diffusion"], num_samples, steps, generator,
                                         noise_scales=scales)
    per_scale = [{"ged": [], "diversity": [], "hm_iou": [], "single": [], "mean": []} for _ in scales]
    for case in cases:
        all_probs = sliding_window_predict(case["data"], configuration["patch_size"], predictor, num_samples * len(scales),
                                           num_classes, device, windows_per_batch=max(1, 32 // num_samples))
        annotations = case["seg_raters"] if case["seg_raters"] is not None else case["seg"][None]
        annotated = None if ignore_label is None else (annotations != ignore_label).all(0)
        if annotated is not None:
            annotations = np.where(annotated, annotations, 0)
        for k, out in enumerate(per_scale):
            probs = all_probs[k * num_samples:(k + 1) * num_samples]
            samples = probs.argmax(1)
            if annotated is not None:
                samples = np.where(annotated, samples, 0)
            class_sets = list(zip(_class_masks(samples, labels[1:]), _class_masks(annotations, labels[1:])))
            per_class = [unbiased_ged(energy_distance_terms(s, a), len(s), len(a)) for s, a in class_sets]
            out["ged"].append(float(np.mean([g for g, _ in per_class])))
            out["diversity"].append(float(np.mean([d for _, d in per_class])))
            out["hm_iou"].append(float(np.mean([hungarian_matched_iou(s, a) for s, a in class_sets])))
            for pred, dices in ((probs.mean(0).argmax(0), out["mean"]), *((s, out["single"]) for s in samples)):
                dice = foreground_dice(pred, case["seg"], num_classes, ignore_label)
                if dice is not None:
                    dices.append(dice)
    rows = []
    for scale, out in zip(scales, per_scale):
        rows.append({
            "noise_scale": scale, "GED": float(np.mean(out["ged"])), "GED_per_case": [round(g, 6) for g in out["ged"]],
            "sample_diversity": float(np.mean(out["diversity"])),
            "HM_IoU": float(np.mean(out["hm_iou"])), "HM_IoU_per_case": [round(h, 6) for h in out["hm_iou"]],
            "Dice_single_sample": float(np.mean(out["single"])) if out["single"] else float("nan"),
            "Dice_of_mean": float(np.mean(out["mean"])) if out["mean"] else float("nan"),
        })
    return rows


def unbiased_ged(terms: dict[str, float], num_samples: int, num_annotations: int) -> tuple[float, float]:
    """GED and sample diversity with the identical pairs left out of both diversity terms.

    ``terms`` come from :func:`~latdiffunet.evaluation.ambiguity.energy_distance_terms`, whose
    diversities average over all M^2 ordered pairs, the M identical ones (d = 0) included; over
    the M (M - 1) distinct pairs they are M / (M - 1) times larger. A single annotation has no
    distinct pair: its diversity term is 0 either way.
    """
    from latdiffunet.evaluation.ambiguity import distinct_pair_diversity

    def distinct(value: float, n: int) -> float:  # one annotation: no distinct pair, its term stays 0
        return distinct_pair_diversity(value, n) if n > 1 else value

    diversity = distinct(terms["sample_diversity"], num_samples)
    return 2.0 * terms["cross_distance"] - diversity - distinct(terms["rater_diversity"], num_annotations), diversity


# The held-back cases are there to make choices on: calibration scores up to this many of them.
# 12 LIDC slices (5 % of 230 held back) chose 0.75 from a GED table that was noise (0.025 vs 0.078 at
# 0.5); 64 slices of 128 x 128 cost about half a minute on 2 CPU cores.
CALIBRATION_MAX_CASES = 64


def calibration_cases(val_cases: list[str], minimum: int, fraction: float = 0.05) -> list[str]:
    """``max(minimum, fraction of them)`` of the cases (the held-back ones), spread evenly over the list.

    Evenly spaced rather than the first ones: case names sort by patient, so the first 50 LIDC
    slices come from two patients, whose nodules say little about the other 98 % of the fold.
    """
    n = min(len(val_cases), max(minimum, math.ceil(fraction * len(val_cases))))
    if n == 0:
        return []
    picks = np.unique(np.linspace(0, len(val_cases) - 1, n).round().astype(int))
    return [val_cases[i] for i in picks]


def calibration_seconds(
    num_cases: int, seconds_per_case: float, scales: tuple[float, ...] = NOISE_SCALES, conditioning_share: float = 0.0,
) -> float:
    """What :func:`calibrate_noise_scale` will take: every case conditioned once and sampled once per
    temperature, at ``seconds_per_case`` (a periodic validation's, the same sampler on the same kind
    of cases) of which ``conditioning_share`` is the image conditioning (0: none shared, the upper
    bound). A time budget reserves it (``trainer._fit_epochs_to_budget``)."""
    share = min(max(float(conditioning_share), 0.0), 1.0)
    return num_cases * seconds_per_case * (share + len(scales) * (1.0 - share))


SINGLE_SAMPLE_TOLERANCE = 0.01


def choose_noise_scale(rows: list[dict], multi_rater: bool, tolerance: float = SINGLE_SAMPLE_TOLERANCE) -> tuple[float, str]:
    """The sampling temperature to use, and why, from a :func:`noise_scale_table`.

    With several raters per image their disagreement is observed, and GED measures whether the
    samples spread as they do: the lowest GED wins. With one annotation per image the experts'
    disagreement is not observed, so the data cannot say how much spread is honest (GED against a
    single mask keeps rewarding spread the model is unsure about); what the product promises
    there is that every sample is a segmentation as good as the consensus. The largest scale whose
    Dice of one sample is within ``tolerance`` of the best Dice of the mean wins: as much diversity
    as the samples can carry without any of them being worse than the mean.
    """
    if multi_rater:
        return _coldest_scale_as_good_as_the_best_ged(rows)
    target = max(r["Dice_of_mean"] for r in rows)
    ok = [r for r in rows if r["Dice_single_sample"] >= target - tolerance]
    best = max(ok, key=lambda r: r["noise_scale"]) if ok else max(rows, key=lambda r: r["Dice_single_sample"])
    return float(best["noise_scale"]), (
        f"one annotation per image: largest scale whose Dice of one sample is within {tolerance} of the best "
        f"Dice of the mean ({target:.4f})"
    )


# Below this many held-back cases a standard error is no estimate (QUBIQ holds back 2 images): the
# plain lowest GED decides there.
MIN_CASES_FOR_STANDARD_ERROR = 10


def _coldest_scale_as_good_as_the_best_ged(rows: list[dict]) -> tuple[float, str]:
    """Several raters: the lowest GED wins, unless a colder scale is within one standard error of
    it (the one-standard-error rule).

    The difference is paired (same cases, same seeds), so its standard error is that of the
    per-case differences. Why colder: a GED table of a few dozen held-back images often ends in a
    flat stretch (LIDC, 64 slices: 0.1446 at 0.75, 0.1445 at 1, spread 0.59 against 0.72) where
    the lowest mean is noise, and of scales the data cannot tell apart the one with less spread
    makes every sample more accurate at no measurable cost in how the set matches the raters.
    """
    best = min(rows, key=lambda r: r["GED"])
    reason = "several raters: lowest GED (d = 1 - IoU) of the samples against the raters"
    base = best.get("GED_per_case")
    for row in sorted(rows, key=lambda r: r["noise_scale"]):
        if row is best:  # ascending: every colder scale was looked at
            break
        cases = row.get("GED_per_case")
        if not base or not cases or len(cases) != len(base) or len(base) < MIN_CASES_FOR_STANDARD_ERROR:
            break
        diff = np.asarray(cases, dtype=float) - np.asarray(base, dtype=float)
        standard_error = float(diff.std(ddof=1) / math.sqrt(len(diff)))
        if diff.mean() <= standard_error:
            return float(row["noise_scale"]), (
                f"several raters: the coldest scale whose GED (d = 1 - IoU) is within one standard error of the "
                f"lowest ({row['GED']:.4f} vs {best['GED']:.4f} at {best['noise_scale']:g}, paired standard error "
                f"{standard_error:.4f} over {len(diff)} cases)"
            )
    return float(best["noise_scale"]), reason


def calibrate_noise_scale(
    model: torch.nn.Module,
    folder: Path,
    case_ids: list[str],
    configuration: dict,
    device: torch.device,
    num_samples: int,
    multi_rater: bool,
    logger,
    checkpoints: list[Path],
    seed: int = 0,
    ignore_label: int | None = None,
) -> float:
    """Score every scale in ``NOISE_SCALES`` on ``case_ids`` (:func:`noise_scale_table`), pick one
    (:func:`choose_noise_scale`), write the table to ``sampling_calibration.json`` and the log
    through ``logger`` (a :class:`~latdiffunet.training.logger.TrainingLogger`), and store the scale
    in ``checkpoints``' ``diffusion`` settings, which prediction reads."""
    rows = noise_scale_table(model, folder, case_ids, configuration, device, num_samples, seed=seed,
                             ignore_label=ignore_label)
    scale, criterion = choose_noise_scale(rows, multi_rater)
    logger.write_json("sampling_calibration.json", {
        "chosen_noise_scale": scale, "criterion": criterion,
        "cases": case_ids, "checkpoint": checkpoints[0].name, "num_samples": num_samples, "table": rows,
    })
    logger.log("sampling temperature on %d held-back cases: " % len(case_ids) + "; ".join(
        f"scale {r['noise_scale']:g}: GED {r['GED']:.4f}, HM-IoU {r['HM_IoU']:.4f}, spread {r['sample_diversity']:.4f}, "
        f"Dice one sample {r['Dice_single_sample']:.4f}, mean {r['Dice_of_mean']:.4f}" for r in rows) + f" -> {scale:g}")
    store_noise_scale(checkpoints, scale, device)
    return scale


def store_noise_scale(checkpoints: list[Path], scale: float, device: torch.device) -> None:
    """Write ``scale`` into the ``diffusion`` settings of each existing checkpoint (atomically)."""
    for path in dict.fromkeys(checkpoints):
        if path.is_file():
            state = load_checkpoint(path, device)
            state["diffusion"] = dict(state["diffusion"]) | {"noise_scale": scale}
            save_checkpoint(state, path)
