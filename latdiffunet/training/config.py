"""Explicit training configuration: plans give the defaults, a trainer variant or the CLI override.

Everything a run depends on is in one dataclass, saved as ``training_config.json`` next to the
checkpoints, so a reader can see exactly how a model was trained without reading code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class TrainerConfig:
    autoencoder_epochs: int = 100
    diffusion_epochs: int = 500
    iterations_per_epoch: int = 250
    validation_every: int = 10
    checkpoint_every: int = 5
    learning_rate: float = 2e-4
    autoencoder_learning_rate: float | None = None  # None: same as learning_rate
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    foreground_oversampling: float = 0.33
    augment: bool = True
    num_workers: int = 2
    seed: int = 12345
    amp: bool = True  # used on CUDA only
    joint_finetune: bool = False  # also train the autoencoder's decoder in stage 2
    latent_loss_weight: float = 1.0
    decoded_supervision_weight: float = 1.0
    decoded_class_weights: bool = False  # class-weighted CE on the decoded prediction (biases towards over-segmentation)
    dice_weight: float = 1.0
    kl_weight: float = 1e-6
    validation_cases: int = 10  # during training; the final validation uses all of the fold's cases
    validation_samples: int | None = None  # None: plans' inference.num_samples
    batch_size: int | None = None  # None: the plans' batch size
    time_budget_minutes: float | None = None  # wall clock for the whole run; epochs are rescaled to fit

    @property
    def total_epochs(self) -> int:
        return self.autoencoder_epochs + self.diffusion_epochs

    def stage_of(self, epoch: int) -> str:
        return "autoencoder" if epoch < self.autoencoder_epochs else "diffusion"

    @classmethod
    def from_plans(cls, configuration: dict, **overrides) -> "TrainerConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in configuration.get("training", {}).items() if k in known}
        loss = configuration.get("loss", {})
        for key in ("dice_weight", "kl_weight", "decoded_supervision_weight"):
            if key in loss:
                values[key] = loss[key]
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown trainer options: {sorted(unknown)}")
        return cls(**values)

    def with_overrides(self, **overrides) -> "TrainerConfig":
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)
