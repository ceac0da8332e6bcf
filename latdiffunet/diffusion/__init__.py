"""Diffusion maths: noise schedules, prediction targets and samplers.

Pure tensor arithmetic with no knowledge of any network: samplers drive a ``denoise(x_t, t)``
callable that the caller builds around a model and its conditioning.
"""

from latdiffunet.diffusion.parameterization import (
    EPS_CLIP_X0,
    PARAMETERIZATIONS,
    Parameterization,
    check_parameterization,
    clip_x0_for,
    predict_x0_and_eps,
    training_target,
    x0_for_loss,
)
from latdiffunet.diffusion.samplers import Denoiser, StepCallback, ddim_sample, ddpm_sample
from latdiffunet.diffusion.schedules import (
    SCHEDULE_NAMES,
    NoiseSchedule,
    broadcast_to,
    inference_timesteps,
)

__all__ = [
    "EPS_CLIP_X0",
    "PARAMETERIZATIONS",
    "SCHEDULE_NAMES",
    "Denoiser",
    "NoiseSchedule",
    "Parameterization",
    "StepCallback",
    "broadcast_to",
    "check_parameterization",
    "clip_x0_for",
    "ddim_sample",
    "ddpm_sample",
    "inference_timesteps",
    "predict_x0_and_eps",
    "training_target",
    "x0_for_loss",
]
