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
    # CE + Dice of the image encoder's own segmentation head (plans: network.segmentation_head), a
    # dense gradient for the image pathway (networks/segmentation_head.py); ignored without a head.
    image_segmentation_weight: float = 1.0
    # Train the image encoder and its head during the autoencoder stage too (it is idle otherwise).
    image_pretraining: bool = True
    # The decoded x0-estimate is supervised only where abar_t >= this (0: at every noise level).
    # At high noise the x0-estimate can only be a posterior mean, but the sampler's first steps
    # decode it. The one run with 0.5 (SNR >= 1 only) on Hippocampus 2d, which also had the sample
    # loss from the start, was at 0.10 periodic validation Dice after 5 diffusion epochs (0.70 with
    # the defaults): the two changes were not separated.
    decoded_loss_min_signal: float = 0.0
    # Energy score of sampled masks (the few-step sampler inference runs) against the (randomly
    # chosen rater's) label: trains single samples to be plausible masks and their spread to match
    # the annotations'. 0 disables it.
    sample_loss_weight: float = 1.0
    sample_loss_samples: int = 2  # samples per image (>= 2: the score compares samples with each other)
    sample_loss_images: int = 8  # images of each batch that get the sample loss (bounds its cost)
    sample_loss_grad_steps: int | None = 1  # sampler steps with gradients, the last ones (None: all)
    # Backpropagate the sample loss through every sampler step (overrides sample_loss_grad_steps).
    # With the last step only, the energy score cannot reach the first steps, where a 4-step chain
    # from pure noise decides whether and where there is an object (on LIDC the samples of the
    # last-step model show a nodule on ~65 % of the slices whether 1, 2 or 3 of the 4 raters drew one).
    sample_loss_whole_chain: bool = False
    sample_loss_start: float = 0.25
    # Run the sample loss on every k-th training step only, weighted k times (the same expected
    # gradient): it runs the whole sampler and made a Hippocampus diffusion epoch 27 s instead of
    # 14 s on 2 CPU cores, so at a fixed budget k = 2 buys more epochs. 1: every step.
    sample_loss_every: int = 1
    calibrate_noise_scale: bool = True  # pick the sampling temperature on validation cases (sampling_calibration.py)
    sample_loss_steps: int | None = None  # None: the plans' sampling steps
    # cDAL's discriminator: used by LatentDiffusionTrainer_adversarial only (training/adversarial.py),
    # set in the plans' "training" like the rest. Weight of the generator's adversarial loss (a first
    # guess: the non-saturating loss starts at 0.69, the decoded CE + Dice near 1; 0 keeps only the
    # attention weighting), the discriminator's learning rate (None: learning_rate), its R1 penalty
    # on real samples (DDGAN's 0.02; 0: none) and its width.
    adversarial_weight: float = 0.05
    adversarial_learning_rate: float | None = None
    adversarial_r1_gamma: float = 0.02
    discriminator_channels: int = 32
    kl_weight: float = 1e-6
    # steps between reads of the running loss for the progress bar: each read makes the host wait for the GPU
    loss_readout_every: int = 25
    validation_cases: int = 10  # during training; the final validation uses all of the fold's cases
    # periodic validation's share of the time at most (validation_pacing.py); 1 validates every validation_every epochs
    validation_max_time_fraction: float = 0.1
    validation_samples: int | None = None  # None: plans' inference.num_samples
    batch_size: int | None = None  # None: the plans' batch size; the global batch, split evenly over data-parallel processes
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
