"""Final validation of a trained fold: predict its validation cases from the raw images and score them as users would.

It runs exactly ``latdiff_predict`` and ``latdiff_evaluate`` (original geometry). Samples are always
saved, so the summary holds the Dice of one sample next to the Dice of the mean; for a multi-rater
dataset it also holds GED, HM-IoU and the sample and rater diversities. Montages (image, raters,
mean, entropy, samples) of the first ``MONTAGE_CASES`` cases go to ``validation_montages/``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from latdiffunet.evaluation.evaluate_folder import evaluate_folder
from latdiffunet.inference.predict_folder import predict_folder
from latdiffunet.inference.predictor import LatentDiffusionPredictor, PredictionSettings

MONTAGE_CASES = 8  # montages are for looking at, a few cases suffice


def validate_in_original_geometry(
    predictor: LatentDiffusionPredictor,
    settings: PredictionSettings,
    raw: Path,
    val_cases: list[str],
    fold_folder: Path,
    num_processes: int = 2,
) -> dict:
    """Predict ``val_cases`` of the raw dataset ``raw`` into ``fold_folder/validation`` and return the summary."""
    spec = predictor.dataset_spec
    raters_folder = raw / spec.rater_labels_folder if spec.num_raters > 1 and spec.rater_labels_folder else None
    out = fold_folder / "validation"
    start = time.time()
    predict_folder(raw / "imagesTr", out, predictor, settings, overwrite=True, num_processes=num_processes, case_ids=val_cases)
    prediction_seconds = time.time() - start
    summary = evaluate_folder(
        raw / "labelsTr", out, spec.foreground_labels, ignore_label=spec.ignore_label,
        num_processes=max(num_processes, 1), case_ids=val_cases, progress=False,
        raters_folder=raters_folder, num_raters=spec.num_raters if raters_folder else None,
    )
    summary["space"] = "original geometry (latdiff_predict + latdiff_evaluate)"
    summary["prediction_seconds"] = round(prediction_seconds, 1)
    summary["prediction_seconds_per_case"] = round(prediction_seconds / max(len(val_cases), 1), 3)
    summary["prediction_settings"] = {"num_samples": settings.num_samples, "steps": settings.steps}

    montage_cases = sorted(val_cases)[:MONTAGE_CASES]
    raters = None
    if raters_folder is not None:
        raters = {c: [raters_folder / f"{c}_rater{k}{spec.file_ending}" for k in range(spec.num_raters)] for c in montage_cases}
    predict_folder(raw / "imagesTr", fold_folder / "validation_montages", predictor,
                   dataclasses.replace(settings, save_montage=True, save_probabilities=False, save_samples=False),
                   overwrite=True, num_processes=num_processes, case_ids=montage_cases, rater_label_files=raters)
    return summary
