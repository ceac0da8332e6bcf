"""What the network is trained to predict, and how to get x0 and eps back from it.

With ``x_t = alpha x0 + sigma eps`` and ``alpha^2 + sigma^2 = 1`` (variance preserving), any one of
three targets determines the other two given x_t:

* ``"eps"``: the noise (Ho et al. 2020). Recovering x0 divides by alpha, which is ~0 at the
  noisiest timesteps (cosine, T = 1000: alpha = 4.9e-5 at t = 999, so an error in eps_hat reaches
  x0_hat 20,000 times larger), so few-step sampling from pure noise amplifies the network's error
  there. It is only usable with :func:`clip_x0_for`'s bound at sampling time and with
  :func:`x0_for_loss` in losses on x0_hat; both leave ``"x0"`` and ``"v"`` untouched.
* ``"x0"``: the clean latent. Recovering eps divides by sigma, which is small near t = 0.
* ``"v"``: ``alpha eps - sigma x0`` (Salimans & Ho 2022). Both x0 and eps are recovered without any
  division, which is why it is the safe default for few-step samplers.

Samplers only ever talk to :func:`predict_x0_and_eps`, so adding a parameterisation never touches a
sampler.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Union

import torch

Parameterization = Literal["eps", "x0", "v"]
PARAMETERIZATIONS: tuple[str, ...] = ("eps", "x0", "v")

Coef = Union[torch.Tensor, float]

# Bound on |x0_hat| for eps-prediction, in units of the latent std (stage 2 scales latents to unit
# std). Measured max |z| of the trained tiny-preset autoencoders: Hippocampus 5.0, QUBIQ 3.5, LIDC
# 10.0 with 0.07 % of its values above 6. A posterior mean E[x0 | x_t] never leaves the data's
# range, so the clip only removes error; tighter is better at t = T - 1 (a clipped first step is
# still a guess at +-bound), looser keeps more of LIDC's rare large latents at the last step.
EPS_CLIP_X0 = 6.0


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


def clip_x0_for(diffusion: Mapping[str, Any]) -> float | None:
    """The ``clip_x0`` bound that samplers should use for a plan's ``diffusion`` settings.

    An explicit ``clip_x0`` in the settings wins (``null``: no clip). Otherwise eps-prediction gets
    :data:`EPS_CLIP_X0`: without it, a 1 % error in eps at the first step from pure noise gives an
    x0_hat hundreds of latent stds off, and every later step starts from it. x0- and v-prediction get none: their x0_hat is the network output
    or a rotation of it (error gain 1 and sigma <= 1), so a clip would only cut real latents.
    """
    if "clip_x0" in diffusion:
        return None if diffusion["clip_x0"] is None else float(diffusion["clip_x0"])
    return EPS_CLIP_X0 if check_parameterization(diffusion["parameterization"]) == "eps" else None


def x0_for_loss(kind: str, model_output: torch.Tensor, x_t: torch.Tensor, alpha: Coef, sigma: Coef,
                clip_x0: float | None = None) -> torch.Tensor:
    """x0_hat for a loss on it (the decoded segmentation), whose gradient is never amplified.

    The value is :func:`predict_x0_and_eps`'s x0_hat. The gradient into ``model_output`` is
    ``d x0_hat / d output`` = 1 (x0), -sigma (v) or -sigma / alpha (eps) times the loss's gradient;
    for eps at uniformly drawn t, half the steps have sigma / alpha > 1 (SNR < 1), up to 20,000 at
    t = T - 1, where a loss on x0_hat would then drown the rest of the batch (and the gradient clip
    would scale the useful steps down to make room for it). For eps the gradient through x0_hat is
    therefore scaled by ``min(1, alpha / sigma)`` = ``min(1, sqrt(SNR))`` per sample, so the
    network receives at most the gradient that x0-prediction would: Min-SNR-style truncation (Hang et
    al. 2023) written for a loss that is not a squared error. x0 and v come back unchanged, bit for
    bit. ``clip_x0`` bounds the value (use :func:`clip_x0_for`), so the decoder sees latents of the
    range it was trained on.
    """
    x0_hat, _ = predict_x0_and_eps(kind, model_output, x_t, alpha, sigma, clip_x0=clip_x0)
    if kind != "eps":
        return x0_hat
    damp = torch.as_tensor(alpha / sigma, dtype=x0_hat.dtype, device=x0_hat.device).clamp(max=1.0)
    detached = x0_hat.detach()
    return detached + damp * (x0_hat - detached)  # value of x0_hat, gradient times damp
