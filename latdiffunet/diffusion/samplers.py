"""Samplers: short functions that drive a denoiser from noise to a clean latent.

A sampler only sees ``denoise(x_t, t) -> model_output``, where ``t`` is a LongTensor of shape [B].
The network, its conditioning (the image to segment), guidance or test-time augmentation are all
closed over by the caller, so the same sampler serves every network and can be tested against
closed-form oracles. The sampler turns whatever the denoiser predicts into ``(x0_hat, eps_hat)``
through :func:`predict_x0_and_eps` and never reasons about parameterisations itself.

Step-wise coefficients come from the float64 schedule as Python floats, so the update arithmetic
loses no precision beyond the latent's own dtype.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from latdiffunet.diffusion.parameterization import check_parameterization, predict_x0_and_eps
from latdiffunet.diffusion.schedules import NoiseSchedule, inference_timesteps

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# on_step(step_index, t, x0_hat, x_next): told after each step of a sampler what it estimated.
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def _initial_latent(
    shape: Sequence[int],
    generator: torch.Generator | None,
    device: torch.device | str | None,
    dtype: torch.dtype,
    x_T: torch.Tensor | None,
) -> torch.Tensor:
    """x_T: the caller's (for reproducing a trajectory) or fresh N(0, I) from ``generator``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1:
        raise ValueError("shape must start with a batch dimension")
    if x_T is not None:
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
        return x_T.to(device=x_T.device if device is None else device, dtype=dtype)
    if device is None and generator is not None:
        device = generator.device  # randn refuses a generator on another device
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _predict(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    x: torch.Tensor,
    t: int,
    parameterization: str,
    clip_x0: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One denoiser call at a single timestep shared by the whole batch."""
    t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    out = denoise(x, t_batch)
    if out.shape != x.shape:
        raise ValueError(f"denoiser returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
    # abar is looked up for a host copy of t: reading t_batch back would make the host wait for the device every step
    alpha, sigma = (v.to(x.device, non_blocking=True)
                    for v in schedule.alpha_sigma(torch.full((x.shape[0],), t, dtype=torch.long), ndim=x.ndim, dtype=x.dtype))
    return predict_x0_and_eps(parameterization, out.to(x.dtype), x, alpha, sigma, clip_x0=clip_x0)


def ddim_sample(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    num_steps: int,
    parameterization: str,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    x_T: torch.Tensor | None = None,
    clip_x0: float | None = None,
    dtype: torch.dtype = torch.float32,
    differentiable: bool = False,
    grad_steps: int | None = None,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) over ``inference_timesteps(T, num_steps)``; returns x0_hat.

    Each step re-noises the current x0 estimate to the next timestep along the predicted noise
    direction, so the step count is free at inference time and independent of training. ``eta``
    sets how much of that direction is replaced by fresh noise: 0 gives a deterministic map from
    x_T (what makes repeated samples differ only through x_T, useful for uncertainty estimates),
    1 gives the ancestral DDPM posterior on the chosen sub-sequence. The last step returns its
    x0 prediction directly rather than re-noising to some t < last timestep.

    ``differentiable=True`` keeps the autograd graph through every step, so a loss on the returned
    sample trains the whole few-step chain that inference runs (a sample-based loss such as the
    energy score; cDAL trains its 2-4 step sampler the same way). ``grad_steps`` limits the graph to
    the last that many steps (the earlier ones run without it): cheaper, and the loss then trains
    the steps that turn the chain's state into the final mask. By default no graph is built.

    ``on_step(i, t, x0_hat, x_next)``, when given, is called after each step ``i = 0 .. num_steps - 1``
    with its timestep ``t``, the x0 estimate made there and the chain's next state (at the last
    step, the returned sample, which is ``x0_hat``): what a per-step analysis needs to ask how good
    a k-step sample would have been without running k separate chains. It only observes (the
    tensors are the loop's own; do not modify them in place), so the samples are the same with or
    without it.
    """
    grad = differentiable and torch.is_grad_enabled()
    with torch.set_grad_enabled(grad):
        return _ddim_loop(denoise, schedule, shape, num_steps, parameterization, eta, generator, device, x_T, clip_x0,
                          dtype, grad, grad_steps, on_step)


def _ddim_loop(denoise, schedule, shape, num_steps, parameterization, eta, generator, device, x_T, clip_x0, dtype,
               grad=False, grad_steps=None, on_step=None):
    check_parameterization(parameterization)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    timesteps = inference_timesteps(schedule.num_timesteps, num_steps)
    abar = schedule.alphas_cumprod.tolist()
    x = _initial_latent(shape, generator, device, dtype, x_T)
    first_with_grad = 0 if grad_steps is None else len(timesteps) - grad_steps
    for i, t in enumerate(timesteps):
        with torch.set_grad_enabled(grad and i >= first_with_grad):
            x0_hat, eps_hat = _predict(denoise, schedule, x, t, parameterization, clip_x0)
        if i == len(timesteps) - 1:
            if on_step is not None:
                on_step(i, t, x0_hat, x0_hat)
            return x0_hat
        a_t, a_prev = abar[t], abar[timesteps[i + 1]]
        noise_std = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        dir_coef = math.sqrt(max(1 - a_prev - noise_std**2, 0.0))
        x = math.sqrt(a_prev) * x0_hat + dir_coef * eps_hat
        if noise_std > 0:
            x = x + noise_std * _noise_like(x, generator)
        if on_step is not None:
            on_step(i, t, x0_hat, x)
    raise AssertionError("unreachable: inference_timesteps is never empty")


@torch.no_grad()
def ddpm_sample(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    parameterization: str,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    x_T: torch.Tensor | None = None,
    clip_x0: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Ancestral DDPM (Ho et al. 2020) over all T steps; the reference the fast sampler is checked against.

    Each step draws from the true posterior q(x_{t-1} | x_t, x0 = x0_hat), with its own variance
    ``beta_t (1 - abar_{t-1}) / (1 - abar_t)``. It is written from the posterior formulas rather
    than as DDIM with eta = 1 so that the two implementations can check each other. At t = 0 the
    posterior mean is x0_hat itself, which is what is returned.
    """
    check_parameterization(parameterization)
    abar = schedule.alphas_cumprod.tolist()
    betas = schedule.betas.tolist()
    x = _initial_latent(shape, generator, device, dtype, x_T)
    for t in range(schedule.num_timesteps - 1, -1, -1):
        x0_hat, _ = _predict(denoise, schedule, x, t, parameterization, clip_x0)
        if t == 0:
            return x0_hat
        a_t, a_prev, beta = abar[t], abar[t - 1], betas[t]
        coef_x0 = math.sqrt(a_prev) * beta / (1 - a_t)
        coef_xt = math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)
        std = math.sqrt(beta * (1 - a_prev) / (1 - a_t))
        x = coef_x0 * x0_hat + coef_xt * x + std * _noise_like(x, generator)
    raise AssertionError("unreachable: a schedule has at least one timestep")
