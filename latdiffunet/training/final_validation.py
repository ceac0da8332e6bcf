"""Final validation of a trained fold: predict its validation cases from the raw images and score them as users would.

It runs exactly ``latdiff_predict`` and ``latdiff_evaluate`` (original geometry). Samples are always
saved, so the summary holds the Dice of one sample next to the Dice of the mean; for a multi-rater
dataset it also holds GED, HM-IoU and the sample and rater diversities. Montages (image, raters,
mean, entropy, samples) of the first ``MONTAGE_CASES`` cases go to ``validation_montages/``.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from latdiffunet.evaluation.evaluate_folder import evaluate_folder
from latdiffunet.inference.predict_folder import predict_folder
from latdiffunet.inference.predictor import LatentDiffusionPredictor, PredictionSettings
from latdiffunet.training.sampling_calibration import calibrate_noise_scale, store_noise_scale
from latdiffunet.training.validation import best_beats_final
from latdiffunet.utilities.checkpoint import load_checkpoint
from latdiffunet.utilities.file_io import atomic_path, load_json

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


class FinalValidation:
    """The trainer's last act, a mixin of :class:`~latdiffunet.training.trainer.LatentDiffusionTrainer`:
    choose the sampling temperature on the held-back cases, then predict and score the fold's
    validation cases with :func:`validate_in_original_geometry`."""

    def final_validation(self) -> dict:
        """All of the fold's validation cases with the EMA weights of ``checkpoint_best`` (chosen on
        the held-back cases), or of ``checkpoint_final`` when nothing was held back (``held_back.py``).

        Prediction and evaluation are exactly what users run (``latdiff_predict`` /
        ``latdiff_evaluate``): raw images in, segmentations in the original geometry out, compared
        with the raw labels. Without the raw folder it falls back to preprocessed space, and says so.
        """
        if not self.val_cases:
            self.logger.log("fold 'all' has no validation cases: no summary.json")
            return {}
        best = self.output_folder / "checkpoint_best.pth"
        chosen = best if self.held_back.active and best.is_file() else self.output_folder / "checkpoint_final.pth"
        choice = None
        if chosen == best:
            # the final weights' held-back Dice, when the last validation was of the last epoch
            final_per_case = self.last_val_per_case if self.last_val_epoch == self.config.total_epochs - 1 else {}
            keep, choice = best_beats_final(self.best_val_per_case, final_per_case)
            self.logger.log(f"checkpoint choice: {choice}")
            if not keep and self.dist.is_main:  # checkpoint_best becomes the final weights: latdiff_predict uses it
                with atomic_path(best) as partial:
                    shutil.copyfile(self.output_folder / "checkpoint_final.pth", partial)
        calibrated = self.config.calibrate_noise_scale and self.held_back.active
        if calibrated:
            self.calibrate_noise_scale(chosen)
        else:  # nothing chosen here: sample the trained distribution, whatever an older run stored
            store_noise_scale([chosen], 1.0, self.device)
            if self.held_back.active is False and best.is_file() and self.dist.is_main:
                self.logger.log(f"warning: {best.name} of an earlier run (chosen on the validation cases) is still in "
                                f"{self.output_folder}; this number is {chosen.name}'s, and latdiff_predict would use "
                                f"{best.name}: delete it to predict with the checkpoint this number describes")
        start = time.time()
        raw = self.raw_dataset_folder
        if raw is not None and (raw / "imagesTr").is_dir() and (raw / "labelsTr").is_dir():
            summary = self._validate_in_original_geometry(chosen, raw)
        else:
            self.ema.load_state_dict(load_checkpoint(chosen, self.device)["ema"])
            summary = self.validate("diffusion", final=True)
            summary["space"] = "preprocessed (raw dataset not found, so no export to the original geometry)"
        summary["checkpoint"] = chosen.name
        if choice is not None:
            summary["checkpoint_choice"] = choice
        summary["checkpoint_selection"] = self.held_back.checkpoint_statement(chosen.name, len(self.val_cases), calibrated)
        # machine-readable: find_best_configuration reports a CV number as untouched only when every fold says so
        summary["selected_on_held_back"] = bool(self.held_back.active)
        summary["seconds"] = round(time.time() - start, 1)
        self.logger.write_json("validation/summary.json", summary)
        fg = summary["foreground_mean"]
        self.logger.log(
            f"final validation ({len(self.val_cases)} cases, {chosen.name}): mean foreground Dice {fg['Dice']:.4f}, "
            + ", ".join(f"class {c}: {m['Dice']:.4f}" for c, m in summary["mean"].items())
        )
        return summary

    def calibrate_noise_scale(self, checkpoint: Path) -> float:
        """Pick the sampling temperature on the held-back cases and store it in ``checkpoint`` (and
        the final checkpoint); see :func:`~latdiffunet.training.sampling_calibration.calibrate_noise_scale`."""
        self.ema.load_state_dict(load_checkpoint(checkpoint, self.device)["ema"])
        multi_rater = load_json(self.preprocessed_dataset_folder / "dataset.json", "dataset.json").get("num_raters", 1) > 1
        scale = calibrate_noise_scale(
            self.ema, self.data_folder,
            self._calibration_cases(), self.configuration, self.device,
            num_samples=max(self.config.validation_samples or self.configuration["inference"]["num_samples"], 2),
            multi_rater=multi_rater, logger=self.logger, checkpoints=[checkpoint, self.output_folder / "checkpoint_final.pth"],
            seed=self.config.seed, ignore_label=self.ignore_label,
        )
        self.configuration["diffusion"]["noise_scale"] = scale
        return scale

    def _validate_in_original_geometry(self, checkpoint: Path, raw: Path) -> dict:
        predictor = LatentDiffusionPredictor(self.output_folder.parent, [str(self.fold)], self.device, checkpoint.name)
        inference = self.configuration["inference"]
        settings = PredictionSettings(
            num_samples=self.config.validation_samples or inference["num_samples"], steps=inference["sampling_steps"],
            seed=self.config.seed, save_probabilities=True, save_samples=True,
        )
        return validate_in_original_geometry(predictor, settings, raw, self.val_cases, self.output_folder,
                                             num_processes=min(2, self.config.num_workers))
