"""Validation in preprocessed space: periodic on the held-back cases (``held_back.py``), final on
the fold's validation cases when the raw dataset is absent (never test data).

Stage 1 measures the autoencoder's reconstruction Dice: it caps what the whole model can reach.
Stage 2 measures the Dice of *sampled* predictions (mean of N diffusion samples), which is what
selects the best checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from latdiffunet.evaluation.metrics import evaluate_case, summarize
from latdiffunet.inference.latent_sampling import DiffusionWindowPredictor, reconstruction_window_predictor
from latdiffunet.inference.sliding_window import sliding_window_predict
from latdiffunet.training.data_loading import load_preprocessed_case
from latdiffunet.training.losses import one_hot
from latdiffunet.utilities.file_io import load_json


def foreground_dice(pred: np.ndarray, ref: np.ndarray, num_classes: int, ignore_label: int | None = None) -> float | None:
    """Mean Dice over the foreground classes present in either mask (None if none is).

    Voxels the reference marks ``ignore_label`` (unannotated) count for no class, predicted or not.
    """
    valid = True if ignore_label is None else ref != ignore_label
    scores = []
    for c in range(1, num_classes):
        p, r = (pred == c) & valid, ref == c
        total = int(p.sum()) + int(r.sum())
        if total:
            scores.append(2 * int((p & r).sum()) / total)
    return float(np.mean(scores)) if scores else None


def _onehot(seg: np.ndarray, num_classes: int, ignore_label: int | None) -> np.ndarray:
    """``(Z, Y, X)`` labels -> ``(K, Z, Y, X)``: the autoencoder's input, encoded as in training (:func:`one_hot`)."""
    return one_hot(torch.from_numpy(seg.astype(np.int64))[None, None], num_classes, ignore_label)[0].numpy()


@torch.no_grad()
def evaluate_model_on_cases(
    model: torch.nn.Module,
    folder: Path,
    case_ids: list[str],
    configuration: dict,
    device: torch.device,
    mode: str,
    num_samples: int = 1,
    num_steps: int | None = None,
    seed: int = 0,
    amp: bool = False,
    ignore_label: int | None = None,
    time_limit: float | None = None,
) -> dict:
    """nnU-Net-style summary (``metric_per_case``, ``mean``, ``foreground_mean``) of one model.

    ``mode`` is ``"reconstruction"`` (autoencoder on the reference masks) or ``"sampling"``
    (full image -> diffusion samples -> mean probabilities -> argmax). When sampling, the summary
    also holds ``single_sample_foreground_dice``: the mean foreground Dice of each sample on its
    own, the number a user opening one sample sees, next to the Dice of the mean. Voxels labelled
    ``ignore_label`` (unannotated) count in no metric. With ``time_limit`` (seconds) the cases are
    evaluated in order until the one that uses it up (at least one): the validation pacer measures
    what a case costs this way without paying for all of them.
    """
    start = time.perf_counter()
    model.eval()
    num_classes = int(configuration["network"]["num_classes"])
    labels = list(range(num_classes))
    generator = torch.Generator(device=device).manual_seed(seed)
    if mode == "reconstruction":
        predictor, samples = reconstruction_window_predictor(model), 1
    elif mode == "sampling":
        steps = num_steps or configuration["inference"]["sampling_steps"]
        predictor = DiffusionWindowPredictor(model, configuration["diffusion"], num_samples, steps, generator, amp=amp)
        samples = num_samples
    else:
        raise ValueError(f"unknown validation mode {mode!r}")
    per_case, single = [], []
    for case_id in case_ids:
        case = load_preprocessed_case(folder, case_id)
        data, seg, props = case["data"], case["seg"], load_json(folder / f"{case_id}.json")
        inputs = _onehot(seg, num_classes, ignore_label) if mode == "reconstruction" else data
        probs = sliding_window_predict(
            inputs, configuration["patch_size"], predictor, samples, num_classes, device,
            windows_per_batch=max(1, 32 // samples),
        )
        pred = probs.mean(0).argmax(0)
        metrics = evaluate_case(pred, seg, labels, props["target_spacing"], ignore_label)
        per_case.append({"case_id": case_id, "metrics": metrics})
        if mode == "sampling":
            dices = (foreground_dice(s, seg, num_classes, ignore_label) for s in probs.argmax(1))
            single += [d for d in dices if d is not None]
        if time_limit is not None and time.perf_counter() - start >= time_limit:
            break
    summary = summarize(per_case)
    if single:
        summary["single_sample_foreground_dice"] = float(np.mean(single))
    if mode == "sampling" and predictor.seconds["total"] > 0:
        summary["conditioning_share"] = predictor.seconds["conditioning"] / predictor.seconds["total"]
    return summary



def foreground_dice_per_case(summary: dict) -> dict[str, float]:
    """``{case_id: mean foreground Dice}`` of an :func:`evaluate_model_on_cases` summary (cases
    whose classes are all absent from prediction and reference are left out)."""
    out = {}
    for entry in summary.get("metric_per_case", []):
        if "case_id" not in entry:
            continue
        values = [m["Dice"] for label, m in entry.get("metrics", {}).items()
                  if str(label) != "0" and m.get("Dice") is not None and not np.isnan(m["Dice"])]
        if values:
            out[entry["case_id"]] = float(np.mean(values))
    return out


def best_beats_final(best: dict[str, float], final: dict[str, float]) -> tuple[bool, str]:
    """Whether ``checkpoint_best`` should stand in for the final weights: only when its held-back
    Dice beats the final epoch's on the same cases by more than one standard error of the paired
    per-case difference (the one-standard-error rule the temperature choice uses too).

    A best epoch picked on ten held-back cases can be noise: on CVC-ClinicDB (held-back frames from
    two video sequences) a 15-minute run kept its first diffusion epoch (0.371 against 0.346 for the
    last on those frames) and scored 0.212 on the validation frames, where its final weights
    scored 0.325. Without per-case values for both (older checkpoints) the best is kept.
    """
    cases = sorted(set(best) & set(final))
    if len(cases) < 2:
        return True, "no per-case held-back Dice of both epochs to compare: checkpoint_best kept"
    diff = np.asarray([best[c] - final[c] for c in cases])
    if not diff.any():
        return False, f"checkpoint_best is the final epoch (the same held-back Dice on all {len(cases)} cases): the final weights"
    mean, se = float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(cases)))
    verdict = mean > se
    return verdict, (
        f"held-back Dice of checkpoint_best minus the final epoch's on {len(cases)} cases: {mean:+.4f} "
        f"(standard error {se:.4f}): " + ("checkpoint_best kept" if verdict else
                                           "not more than one standard error, so the final weights are used")
    )


class PeriodicValidation:
    """Validation during training, a mixin of :class:`~latdiffunet.training.trainer.LatentDiffusionTrainer`:
    the held-back cases after the epochs its :class:`~latdiffunet.training.validation_pacing.ValidationPacer`
    chooses, which also decides ``checkpoint_best``."""

    def validate(self, stage: str, final: bool = False, num_cases: int | None = None, time_limit: float | None = None) -> dict:
        """Periodic validation on the first ``num_cases`` (default ``validation_cases``) held-back
        cases (validation cases when nothing is held back: then it only draws the curve), stopping
        after ``time_limit`` seconds (see ``validation_pacing``); with ``final``, all of the fold's
        validation cases."""
        cases = self.val_cases if final else self.periodic_cases[: num_cases or self.config.validation_cases]
        if not cases:
            return {}
        samples = self.config.validation_samples or self.configuration["inference"]["num_samples"]
        mode = "reconstruction" if stage == "autoencoder" else "sampling"
        model = self.model if stage == "autoencoder" else self.ema
        summary = evaluate_model_on_cases(
            model, self.data_folder, cases, self.configuration, self.device, mode, num_samples=samples,
            seed=self.config.seed, amp=self.amp, ignore_label=self.ignore_label, time_limit=time_limit,
        )
        self.model.train()
        return summary

    def _record_validation(self, stage: str, seconds: float, num_cases: int, conditioning_share: float | None = None) -> None:
        """Tell the pacer; when the first validation of a stage stopped early, say that the later
        ones use the same, fewer cases."""
        first = stage not in self.validation_pacer.cases
        self.validation_pacer.record_validation(stage, seconds, num_cases, conditioning_share)
        wanted = min(self.config.validation_cases, len(self.periodic_cases))
        if first and num_cases < wanted:
            self.logger.log(
                f"periodic validation ({stage}) on {num_cases} of {wanted} cases: {seconds:.1f} s, the most that keeps it "
                f"within {100 * self.config.validation_max_time_fraction:.0f} % of the time; later ones use the same cases"
            )

    def _periodic_validation(self, epoch: int, stage: str, metrics: dict, last_of_stage: bool) -> None:
        """Validate the model after ``epoch`` on the periodic cases when the pacer says so (never
        twice for one epoch), recording into ``metrics``; every rank reaches the barrier, where the
        others wait for rank 0's validation instead of inside the next all-reduce."""
        candidate = self.periodic_cases and self.dist.is_main and "validation_time" not in metrics
        call = self.validation_pacer.plan(epoch, stage, last_of_stage) if candidate else None
        if call is not None and call.note:
            self.logger.log(call.note)
        if call is not None and call.num_cases:
            validation_start = time.time()
            summary = self.validate(stage, num_cases=call.num_cases, time_limit=call.time_limit)
            metrics["validation_time"] = time.time() - validation_start
            self._record_validation(stage, metrics["validation_time"], len(summary["metric_per_case"]),
                                    summary.get("conditioning_share"))
            dice = summary["foreground_mean"]["Dice"]
            metrics["val_reconstruction_dice" if stage == "autoencoder" else "val_dice"] = dice
            if "single_sample_foreground_dice" in summary:
                metrics["val_dice_one_sample"] = summary["single_sample_foreground_dice"]
            if stage == "diffusion":
                self.last_val_per_case, self.last_val_epoch = foreground_dice_per_case(summary), epoch
            if stage == "diffusion" and dice > self.best_val_dice and self.held_back.active:
                self.best_val_dice = dice
                self.best_val_per_case = self.last_val_per_case
                metrics["new_best"] = True
        self.dist.barrier()
