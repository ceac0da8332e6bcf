"""Trainers selectable by name (``-tr NAME``). A variant is a few lines: a subclass that
overrides training options or diffusion choices. Register it with :func:`register`."""

from __future__ import annotations

from latdiffunet.errors import UserInputError
from latdiffunet.training.trainer import LatentDiffusionTrainer

TRAINERS: dict[str, type[LatentDiffusionTrainer]] = {}


def register(cls: type[LatentDiffusionTrainer]) -> type[LatentDiffusionTrainer]:
    TRAINERS[cls.__name__] = cls
    return cls


def get_trainer_class(name: str) -> type[LatentDiffusionTrainer]:
    if name not in TRAINERS:
        raise UserInputError(f"unknown trainer {name!r}", fix=f"choose one of: {', '.join(sorted(TRAINERS))}")
    return TRAINERS[name]


register(LatentDiffusionTrainer)


@register
class LatentDiffusionTrainer_5epochs(LatentDiffusionTrainer):
    """Smoke-test length: 2 autoencoder + 3 diffusion epochs."""

    config_overrides = {"autoencoder_epochs": 2, "diffusion_epochs": 3}


@register
class LatentDiffusionTrainer_vpred(LatentDiffusionTrainer):
    """v-prediction instead of the plans' parameterisation."""

    diffusion_overrides = {"parameterization": "v"}


@register
class LatentDiffusionTrainer_epspred(LatentDiffusionTrainer):
    """eps-prediction, for the comparison the analysis paper made (expected to be worse).

    Sampling clips x0_hat to ``EPS_CLIP_X0`` and the decoded loss caps the gradient of its
    x0-estimate (see ``diffusion.parameterization``): without both, the comparison measured the
    20,000x error amplification of x0 = (x_t - sigma eps) / alpha at t = T - 1, not the target.
    """

    diffusion_overrides = {"parameterization": "eps"}


@register
class LatentDiffusionTrainer_joint(LatentDiffusionTrainer):
    """Stage 2 also fine-tunes the autoencoder's decoder."""

    config_overrides = {"joint_finetune": True}


@register
class LatentDiffusionTrainer_noDecodedLoss(LatentDiffusionTrainer):
    """Ablation: latent loss only, no supervision of the decoded segmentation."""

    config_overrides = {"decoded_supervision_weight": 0.0}


@register
class LatentDiffusionTrainer_weightedDecoded(LatentDiffusionTrainer):
    """Class-weighted cross-entropy on the decoded prediction too (the first tiny Hippocampus run)."""

    config_overrides = {"decoded_class_weights": True}


@register
class LatentDiffusionTrainer_wholeChain(LatentDiffusionTrainer):
    """The energy-score sample loss trains every step of the few-step sampler, not only the last.

    The first steps from pure noise decide whether and where a sample shows an object; trained
    through the last step only, the spread of presence cannot learn the raters' (LIDC).
    """

    config_overrides = {"sample_loss_whole_chain": True}


@register
class LatentDiffusionTrainer_sampleLossEvery2(LatentDiffusionTrainer):
    """The energy-score sample loss on every other step, weighted twice: the same expected
    gradient for about half its cost, so a fixed budget buys more epochs."""

    config_overrides = {"sample_loss_every": 2}


# cDAL's discriminator, attention-weighted decoded loss and 4-step sampling; the logic is in adversarial.py
from latdiffunet.training.adversarial import LatentDiffusionTrainer_adversarial  # noqa: E402

register(LatentDiffusionTrainer_adversarial)
