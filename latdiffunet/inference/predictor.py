"""Trained folds -> segmentations + uncertainty maps in the input's geometry.

:class:`LatentDiffusionPredictor` loads the EMA weights of one or more folds and predicts a
case as a stack of samples: ``num_samples`` diffusion samples from every fold, each window's
samples run as one batch. Mean probabilities give the label; the spread gives the uncertainty.
"""

from __future__ import annotations

import hashlib

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from latdiffunet.errors import UserInputError
from latdiffunet.experiment_planning.planner import load_plans
from latdiffunet.imageio.sitk_io import ImageGeometry
from latdiffunet.inference.latent_sampling import DiffusionWindowPredictor, mirroring_enabled
from latdiffunet.inference.sliding_window import sliding_window_predict
from latdiffunet.networks import build_model
from latdiffunet.preprocessing.preprocessor import preprocess_case
from latdiffunet.raw_dataset import parse_dataset_json
from latdiffunet.utilities.checkpoint import load_checkpoint
from latdiffunet.utilities.file_io import load_json


def case_seed(seed: int, case_id: str | None) -> int:
    """The sampling seed of one case: ``seed`` plus a stable hash of its id (not Python's
    ``hash``, which changes between processes), below 2**62 so that ``+ 1000 * fold`` stays valid."""
    if case_id is None:
        return int(seed)
    digest = int.from_bytes(hashlib.sha256(case_id.encode("utf-8")).digest()[:7], "big")
    return int(seed) + digest


@dataclass(frozen=True)
class PredictionSettings:
    num_samples: int
    steps: int
    seed: int = 0
    save_samples: bool = False
    save_probabilities: bool = False
    save_montage: bool = False  # CASE_montage.png: image, raters when known, mean, entropy, samples
    noise_scale: float | None = None  # sampling temperature; None: each fold's calibrated value
    mirror: bool | None = None  # test-time mirroring as samples; None: the plans' inference.test_time_mirroring
    windows_per_batch: int = 8
    amp: bool = True


def choose_checkpoint(fold_folder: Path, name: str | None) -> Path:
    """``best`` (chosen on the cases the fold held back from training) when it exists, else ``final``."""
    if name:
        path = fold_folder / (name if name.endswith(".pth") else f"checkpoint_{name}.pth")
        if not path.is_file():
            raise UserInputError("checkpoint not found", path=path, fix="train the fold or choose another --checkpoint")
        return path
    for candidate in ("checkpoint_best.pth", "checkpoint_final.pth"):
        if (fold_folder / candidate).is_file():
            return fold_folder / candidate
    raise UserInputError(
        "no trained checkpoint (checkpoint_best.pth / checkpoint_final.pth)", path=fold_folder,
        fix="train this fold first with latdiff_train, or choose other folds with -f",
    )


class LatentDiffusionPredictor:
    def __init__(self, run_folder: Path, folds: list[str], device: torch.device, checkpoint: str | None = None):
        self.run_folder = run_folder
        copied = "latdiff_train writes it into the run folder; copy it back from the training machine or retrain"
        self.plans = load_plans(run_folder / "plans.json", "plans.json of the trained model", fix=copied)
        self.dataset_json = load_json(run_folder / "dataset.json", "dataset.json of the trained model", fix=copied)
        self.dataset_spec = parse_dataset_json(run_folder / "dataset.json")  # its labels and file ending drive the outputs
        self.configuration_name = run_folder.name.split("__")[-1]
        if self.configuration_name not in self.plans["configurations"]:
            raise UserInputError(
                f"configuration {self.configuration_name!r} of this run is not in the plans", path=run_folder / "plans.json",
                fix=copied,
            )
        self.configuration = self.plans["configurations"][self.configuration_name]
        self.device = device
        self.models: list[torch.nn.Module] = []
        self.diffusions: list[dict] = []
        self.checkpoints: list[str] = []
        for fold in folds:
            path = choose_checkpoint(run_folder / f"fold_{fold}", checkpoint)
            state = load_checkpoint(path, device, required=("network", "diffusion", "ema"))
            model = build_model(state["network"]).to(device).eval()
            model.load_state_dict(state["ema"])
            self.models.append(model)
            self.checkpoints.append(str(path))
            self.diffusions.append(state["diffusion"])  # per fold: variants and calibrated temperatures differ
        self.label_values = self.dataset_spec.class_labels

    @property
    def num_classes(self) -> int:
        return len(self.label_values)

    def preprocess(self, data: np.ndarray, geometry: ImageGeometry) -> tuple[np.ndarray, dict]:
        pre, _, props = preprocess_case(data, None, geometry, self.plans, self.configuration_name)
        return pre, props

    @torch.no_grad()
    def sample_probabilities(
        self, data: np.ndarray, settings: PredictionSettings, every_step: bool = False, case_id: str | None = None
    ) -> np.ndarray:
        """``(F * S, K, *preprocessed)`` sampled class probabilities of all folds.

        The noise comes from ``case_seed(settings.seed, case_id)``: reproducible for a case whatever
        the order or sharding of a folder, and independent between cases. (With one seed for every
        case, sample k of every case started from the same noise, so a 1-sample prediction of a
        dataset was one noise draw repeated: on LIDC its GED² was 1.081 where one sample averages
        0.931.) Without ``case_id`` the seed is ``settings.seed`` itself.

        ``every_step=True``: ``(T, F * S, K, *preprocessed)``, the decoded x0 estimate of every
        sample after each of the ``T = settings.steps`` sampling steps (same noise, same windows);
        its last entry equals what ``every_step=False`` returns. For the per-step analysis of the
        sampler (``latdiffunet.evaluation.sampler_analysis``); it holds T times the memory.
        """
        return self._sample(data, settings, every_step, case_id, with_image_head=False)[0]

    @torch.no_grad()
    def sample_and_image_probabilities(
        self, data: np.ndarray, settings: PredictionSettings, case_id: str | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`sample_probabilities` and, in the same sliding-window pass, ``(K, *preprocessed)``
        the segmentation heads' class probabilities averaged over folds and mirrorings (the image
        part of the uncertainty map, :func:`~latdiffunet.inference.uncertainty.uncertainty_maps`);
        None when a fold's model has no head (trained before it existed), so its map stays the entropy.

        The head reads the encoder features the samples are conditioned on, so it costs one head
        pass per window and mirroring, not a second pass over the case (Hippocampus 2d: 0.2 s of
        1.0 s per case went to that second pass)."""
        with_head = all(model.segmentation_head is not None for model in self.models)
        return self._sample(data, settings, False, case_id, with_image_head=with_head)

    def _sample(
        self, data: np.ndarray, settings: PredictionSettings, every_step: bool, case_id: str | None, with_image_head: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        stacks, head_total = [], None
        per_window = settings.steps if every_step else 1
        outputs = per_window * settings.num_samples + int(with_image_head)
        for i, (model, diffusion) in enumerate(zip(self.models, self.diffusions)):
            generator = torch.Generator(device=self.device).manual_seed(case_seed(settings.seed, case_id) + 1000 * i)
            predictor = DiffusionWindowPredictor(
                model, diffusion, settings.num_samples, settings.steps, generator,
                amp=settings.amp and self.device.type == "cuda", noise_scale=settings.noise_scale, every_step=every_step,
                mirror=mirroring_enabled(self.configuration, diffusion) if settings.mirror is None else settings.mirror,
                with_image_head=with_image_head,
            )
            probs = sliding_window_predict(
                data, self.configuration["patch_size"], predictor, outputs, self.num_classes,
                self.device, windows_per_batch=settings.windows_per_batch,
            )
            if with_image_head:
                head_total = probs[-1] if head_total is None else head_total + probs[-1]
                probs = probs[:-1]
            stacks.append(probs.reshape(settings.steps, settings.num_samples, *probs.shape[1:]) if every_step else probs)
        samples = np.concatenate(stacks, axis=1 if every_step else 0)
        return samples, None if head_total is None else head_total / len(self.models)
