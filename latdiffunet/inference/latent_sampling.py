"""Window predictors: what to run on one batch of image patches.

:func:`diffusion_window_predictor` wires a model to a sampler from ``latdiffunet.diffusion`` with
a closure, so the sampler stays ignorant of the network. Each window's N samples run as one
batch; each sample keeps one random latent (cDAL) for all its steps, so a sample is one coherent
hypothesis rather than a fresh draw per step.
"""

from __future__ import annotations

import contextlib

import torch

from latdiffunet.diffusion import NoiseSchedule, ddim_sample


def schedule_from_plan(diffusion: dict) -> NoiseSchedule:
    return NoiseSchedule.from_name(diffusion["schedule"], int(diffusion["training_steps"]))


def autocast_for(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def diffusion_window_predictor(
    model: torch.nn.Module,
    diffusion: dict,
    num_samples: int,
    num_steps: int,
    generator: torch.Generator | None = None,
    eta: float | None = None,
    amp: bool = False,
):
    """``(B, C, *P)`` images -> ``(B, S, K, *P)`` class probabilities of S diffusion samples."""
    schedule = schedule_from_plan(diffusion)
    eta = float(diffusion.get("eta", 0.0) if eta is None else eta)
    latent_channels = int(model.config["latent_channels"])
    random_dim = int(model.config["denoiser"]["random_latent_dim"])

    def predict(images: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        with autocast_for(images.device, amp):
            cond = model.condition(images).repeat_interleave(num_samples, 0)
        shape = (b * num_samples, latent_channels) + tuple(cond.shape[2:])
        random_latent = None
        if random_dim > 0:
            random_latent = torch.randn(
                (shape[0], random_dim), generator=generator, device=images.device
            )

        def denoise(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with autocast_for(images.device, amp):
                return model.denoise(z, t, cond, random_latent=random_latent).float()

        z0 = ddim_sample(
            denoise, schedule, shape, num_steps, diffusion["parameterization"], eta=eta,
            generator=generator, device=images.device,
        )
        with autocast_for(images.device, amp):
            probs = model.decode_latent(z0).float().softmax(1)
        return probs.view(b, num_samples, *probs.shape[1:])

    return predict


def reconstruction_window_predictor(model: torch.nn.Module):
    """``(B, K, *P)`` one-hot masks -> ``(B, 1, K, *P)`` autoencoder reconstructions (via mu)."""

    def predict(onehot: torch.Tensor) -> torch.Tensor:
        mu, _ = model.autoencoder.encode(onehot)
        return model.autoencoder.decode(mu).float().softmax(1)[:, None]

    return predict
