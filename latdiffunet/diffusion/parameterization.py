"""What the network is trained to predict, and how to get x0 and eps back from it.

With ``x_t = alpha x0 + sigma eps`` and ``alpha^2 + sigma^2 = 1`` (variance preserving), any one of
three targets determines the other two given x_t:

* ``"eps"``: the noise (Ho et al. 2020). Recovering x0 divides by alpha, which is ~0 at the
  noisiest timesteps, so few-step sampling from pure noise amplifies the network's error there.
* ``"x0"``: the clean latent. Recovering eps divides by sigma, which is small near t = 0.
* ``"v"``: ``alpha eps - sigma x0`` (Salimans & Ho 2022). Both x0 and eps are recovered without any
  division, which is why it is the safe default for few-step samplers.

Samplers only ever talk to :func:`predict_x0_and_eps`, so adding a parameterisation never touches a
sampler.
"""

from __future__ import annotations

from typing import Literal, Union

import torch

Parameterization = Literal["eps", "x0", "v"]
PARAMETERIZATIONS: tuple[str, ...] = ("eps", "x0", "v")

Coef = Union[torch.Tensor, float]


def check_parameterization(kind: str) -> str:
    """Fail early, with the valid choices, instead of deep inside a sampler loop."""
    if kind not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {kind!r}; expected one of {PARAMETERIZATIONS}")
    return kind


def training_target(
    kind: str, x0: torch.Tensor, noise: torch.Tensor, alpha: Coef, sigma: Coef
) -> torch.Tensor:
    """Regression target for the network at ``x_t = alpha x0 + sigma noise``.

    ``alpha`` and ``sigma`` must already broadcast against ``x0`` (see
    :meth:`NoiseSchedule.alpha_sigma` with ``ndim``).
    """
    check_parameterization(kind)
    if kind == "eps":
        return noise
    if kind == "x0":
        return x0
    return alpha * noise - sigma * x0


def predict_x0_and_eps(
    kind: str,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    alpha: Coef,
    sigma: Coef,
    clip_x0: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ``(x0_hat, eps_hat)`` from a network output and the input it saw.

    ``clip_x0`` clamps x0_hat to ``[-clip_x0, clip_x0]``: latents are scaled to unit variance, so
    values far outside a few units are network error, and letting them through at high noise
    levels derails the whole trajectory. After clamping, eps_hat is recomputed from the clamped
    x0_hat so that the pair still satisfies ``x_t = alpha x0_hat + sigma eps_hat``; a sampler that
    mixes an unclamped eps with a clamped x0 would step off the noise direction it is following.
    """
    check_parameterization(kind)
    if kind == "eps":
        eps_hat = model_output
        x0_hat = (x_t - sigma * eps_hat) / alpha
    elif kind == "x0":
        x0_hat = model_output
        eps_hat = (x_t - alpha * x0_hat) / sigma
    else:  # v: inverse of the rotation (x0, eps) -> (x_t, v), exact because alpha^2 + sigma^2 = 1
        x0_hat = alpha * x_t - sigma * model_output
        eps_hat = sigma * x_t + alpha * model_output
    if clip_x0 is not None:
        if clip_x0 <= 0:
            raise ValueError(f"clip_x0 must be positive, got {clip_x0}")
        x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
        eps_hat = (x_t - alpha * x0_hat) / sigma
    return x0_hat, eps_hat
