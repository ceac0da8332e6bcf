"""Window predictors: what to run on one batch of image patches.

:class:`DiffusionWindowPredictor` wires a model to a sampler from ``latdiffunet.diffusion`` with
a closure, so the sampler stays ignorant of the network. Each window's N samples run as one batch.

**One sample is one hypothesis for the whole case.** With the deterministic DDIM sampler
(``eta = 0``) a sample is a function of its starting noise ``x_T`` and its random latent (cDAL).
Both are drawn once per case and sample (:class:`CaseNoise`): the random latent is one vector per
sample, and ``x_T`` is one field on the latent grid of the whole (padded) case, from which every
window crops the part under it. Overlapping windows of one sample therefore see the same noise
where they overlap and stitch into one coherent mask instead of a mosaic of independent draws.
The 2d configuration applied to a 3D volume uses one 2D noise field for all slices of a sample
(the noise is constant along z), so neighbouring slices, whose images differ little, are asked
the same question and answer alike: a sample is a stack of consistent slices, not of unrelated
2D draws.

**Test-time mirroring as samples** (``mirror=True``). Training mirrors every spatial axis of a
patch (``training/augmentation.py``), so the model is as right on a mirrored image as on the
original. nnU-Net averages its softmax over all mirrorings; here sample ``s`` is drawn on the
image mirrored by the ``s mod M``-th of the ``M = 2^dim`` combinations of axes (sample 0 on the
image itself) and mirrored back, so mirroring costs one extra image-encoder pass per combination,
not extra samples. A sample stays one hypothesis for the whole case: its noise field is cropped in
the case's own coordinates and mirrored with the window, so overlapping windows of that sample
still see the same noise at the same place, and its mirroring is the same in every window and
slice.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from latdiffunet.diffusion import NoiseSchedule, clip_x0_for, ddim_sample
from latdiffunet.utilities.autocast import autocast_for


@dataclass
class CaseNoise:
    """Starting noise of ``S`` samples for one case: ``x_T`` (S, Cz, *grid) and random latents (S, D).

    ``grid`` is the latent grid of the padded case (``ceil(size / factor)`` per axis, in-plane only
    for the 2d configuration). :meth:`crop` cuts the part under each window.
    """

    x_T: torch.Tensor
    random_latent: torch.Tensor | None
    factor: tuple[int, ...]

    @classmethod
    def draw(
        cls,
        num_samples: int,
        latent_channels: int,
        spatial_shape: Sequence[int],
        factor: Sequence[int],
        random_latent_dim: int,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> "CaseNoise":
        """Standard normal draws (temperature 1); the predictor multiplies them by its temperature."""
        grid = tuple(-(-int(s) // int(f)) for s, f in zip(spatial_shape, factor))
        x_T = torch.randn((num_samples, latent_channels) + grid, generator=generator, device=device)
        random_latent = None
        if random_latent_dim > 0:
            random_latent = torch.randn((num_samples, random_latent_dim), generator=generator, device=device)
        return cls(x_T, random_latent, tuple(int(f) for f in factor))

    def crop(self, starts: Sequence[Sequence[int]], latent_shape: Sequence[int]) -> torch.Tensor:
        """``(len(starts) * S, Cz, *latent_shape)``: each window's samples, window-major."""
        grid = self.x_T.shape[2:]
        crops = []
        for start in starts:
            lo = [min(int(s) // f, g - l) for s, f, g, l in zip(start, self.factor, grid, latent_shape)]
            crops.append(self.x_T[(slice(None), slice(None)) + tuple(slice(a, a + l) for a, l in zip(lo, latent_shape))])
        return torch.cat(crops, 0)


def mirroring_enabled(configuration: dict, diffusion: dict | None = None) -> bool:
    """Whether to sample on mirrored images: a trained fold's sampling settings (``diffusion``, from
    its checkpoint) say it when they have ``test_time_mirroring`` (off for a fold trained without
    augmentation, which never saw a mirrored image), else the plans' ``inference.test_time_mirroring``,
    on when absent, as nnU-Net mirrors unless told not to."""
    if diffusion is not None and "test_time_mirroring" in diffusion:
        return bool(diffusion["test_time_mirroring"])
    plans_choice = configuration.get("inference", {}).get("test_time_mirroring", True)
    return bool(configuration.get("diffusion", {}).get("test_time_mirroring", plans_choice))


def mirror_combinations(dim: int) -> list[tuple[int, ...]]:
    """All subsets of the ``dim`` spatial axes, the empty one (no mirroring) first, fewest axes first."""
    return [c for k in range(dim + 1) for c in itertools.combinations(range(dim), k)]


def _mirror_per_sample(x: torch.Tensor, combos: list[tuple[int, ...]], num_samples: int) -> torch.Tensor:
    """Mirror ``(B * S, C, *spatial)`` window-major entries: sample ``s`` along ``combos[s % M]``.
    Mirroring is its own inverse, so the same call maps back."""
    b = x.shape[0] // num_samples
    view = x.reshape(b, num_samples, *x.shape[1:])
    out = view.clone()
    for i, axes in enumerate(combos):
        if not axes:
            continue
        chosen = list(range(i, num_samples, len(combos)))  # combos has at most num_samples entries: never empty
        out[:, chosen] = view[:, chosen].flip([3 + a for a in axes])
    return out.reshape(x.shape)


class DiffusionWindowPredictor:
    """``(B, C, *P)`` images at window starts -> ``(B, S, K, *P)`` class probabilities of S samples.

    Call :meth:`begin_case` with the padded spatial shape of a case before its windows (the
    sliding window does this); without it every call draws fresh noise (a single patch).

    ``every_step=True`` returns the decoded x0 estimate after *each* of the ``T = num_steps``
    steps instead, as ``(B, T * S, K, *P)``, step-major (entry ``i * S + s`` is sample ``s`` after
    step ``i``; the last ``S`` entries are exactly what ``every_step=False`` returns): the sliding
    window stitches them like samples, and a caller reshapes the result to ``(T, S, K, ...)``. Each
    step's probabilities go to host memory at once, so the device holds no more than usual.

    ``mirror``: test-time mirroring as samples (module docstring); None (the default) takes the
    ``test_time_mirroring`` of the sampling settings ``diffusion`` (the trainer writes it; off when
    absent). With one sample it changes nothing.

    ``noise_scales`` (several sampling temperatures from one conditioning, for the temperature
    choice of ``training/sampling_calibration.py``): each of the S samples is drawn once per scale
    from the same starting noise and random latent multiplied by that scale, and the output is
    ``(B, len(noise_scales) * S, K, *P)``, scale-major. The image encoder runs once for all of them:
    on Hippocampus 3d it was 56 % of a window's time (2.0 of 3.6 s for a case), so five
    temperatures cost about 2.5 single passes instead of 5. Scale ``c`` gives exactly the samples
    a predictor with ``noise_scale=c`` and the same generator gives (with ``eta = 0``).
    ``seconds`` counts the host time spent conditioning (image encoder) and in all (what a
    temperature sweep can share; on CUDA, without synchronising, conditioning is undercounted).

    ``with_image_head=True`` appends one more entry, ``(B, S + 1, K, *P)``: the segmentation
    head's class probabilities, averaged over every mirroring when ``mirror`` (as nnU-Net averages
    its softmax), for the image part of the uncertainty map. The
    head reads the encoder features the samples are conditioned on (and with the head prior it has
    already run for the conditioning), so one sliding-window pass gives both instead of a second
    pass over the case.
    """

    def __init__(self, model: torch.nn.Module, diffusion: dict, num_samples: int, num_steps: int,
                 generator: torch.Generator | None = None, eta: float | None = None, amp: bool = False,
                 noise_scale: float | None = None, every_step: bool = False, mirror: bool | None = None,
                 with_image_head: bool = False, noise_scales: Sequence[float] | None = None):
        if with_image_head and (every_step or getattr(model, "segmentation_head", None) is None):
            raise ValueError("with_image_head needs a model with a segmentation head and every_step=False")
        if noise_scales is not None and (every_step or with_image_head or not noise_scales):
            raise ValueError("noise_scales needs at least one scale, every_step=False and with_image_head=False")
        self.model = model
        self.with_image_head = with_image_head
        self.mirror = bool(diffusion.get("test_time_mirroring", False) if mirror is None else mirror)
        self.every_step = every_step
        # Scale of the starting noise and random latent (sampling temperature), chosen on the
        # fold's held-back cases at the end of training (training/sampling_calibration.py).
        self.noise_scale = float(diffusion.get("noise_scale", 1.0) if noise_scale is None else noise_scale)
        self.noise_scales = tuple(float(c) for c in noise_scales) if noise_scales is not None else (self.noise_scale,)
        self.seconds = {"conditioning": 0.0, "total": 0.0}
        self.diffusion = diffusion
        self.schedule = NoiseSchedule.from_plan(diffusion)
        self.eta = float(diffusion.get("eta", 0.0) if eta is None else eta)
        self.clip_x0 = clip_x0_for(diffusion)  # eps-prediction: x0_hat bounded, else step 1 derails
        self.num_samples = num_samples
        self.num_steps = num_steps
        self.generator = generator
        self.amp = amp
        self.latent_channels = int(model.config["latent_channels"])
        self.random_dim = int(model.config["denoiser"]["random_latent_dim"])
        strides = model.config["strides"]
        dim = int(model.config["dim"])
        self.factor = tuple(math.prod(s[axis] for s in strides) for axis in range(dim))  # image voxels per latent voxel
        self.noise: CaseNoise | None = None

    def begin_case(self, spatial_shape: Sequence[int], device: torch.device) -> None:
        """Draw this case's noise; ``spatial_shape`` is the padded (Y, X) or (Z, Y, X) of the windows."""
        self.noise = CaseNoise.draw(self.num_samples, self.latent_channels, spatial_shape, self.factor,
                                    self.random_dim, self.generator, device)  # temperature 1; scaled per sample run

    def __call__(self, images: torch.Tensor, starts: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        start = time.perf_counter()
        b, s = images.shape[0], self.num_samples
        combos = mirror_combinations(images.ndim - 2)[:s] if self.mirror else [()]
        cond, detail, head_probs = self._condition(images, combos)
        self.seconds["conditioning"] += time.perf_counter() - start
        latent_shape = tuple(cond.shape[2:])
        if self.noise is not None and starts is not None:
            x_T = self.noise.crop(starts, latent_shape).to(images.device)
            random_latent = None if self.noise.random_latent is None else self.noise.random_latent.repeat(b, 1)
        else:  # a lone patch: fresh noise for every sample of every image
            fresh = CaseNoise.draw(b * s, self.latent_channels, latent_shape, (1,) * len(latent_shape), self.random_dim,
                                   self.generator, images.device)
            x_T, random_latent = fresh.x_T, fresh.random_latent
        if len(combos) > 1:  # the noise of a mirrored sample is mirrored with its window (module docstring)
            x_T = _mirror_per_sample(x_T, combos, s)
        probs = torch.cat([
            self._sample(images, cond, detail, combos, scale * x_T, None if random_latent is None else scale * random_latent)
            for scale in self.noise_scales
        ], 1)
        if head_probs is not None:
            probs = torch.cat([probs, head_probs[:, None]], 1)
        self.seconds["total"] += time.perf_counter() - start
        return probs

    def _sample(
        self, images: torch.Tensor, cond: torch.Tensor, detail: torch.Tensor | None, combos: list[tuple[int, ...]],
        x_T: torch.Tensor, random_latent: torch.Tensor | None,
    ) -> torch.Tensor:
        """``(B, S, K, *P)`` probabilities of the samples starting at ``x_T`` (``(B, T * S, ...)`` with ``every_step``)."""
        b, s = images.shape[0], self.num_samples

        def denoise(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with autocast_for(images.device, self.amp):
                return self.model.denoise(z, t, cond, random_latent=random_latent).float()

        def decode(z: torch.Tensor) -> torch.Tensor:
            with autocast_for(images.device, self.amp):
                probs = self.model.decode_latent(z, detail).float().softmax(1)
            return _mirror_per_sample(probs, combos, s) if len(combos) > 1 else probs

        steps: list[torch.Tensor] = []

        def keep_step(i: int, t: int, x0_hat: torch.Tensor, x_next: torch.Tensor) -> None:
            steps.append(decode(x0_hat).cpu())

        z0 = ddim_sample(
            denoise, self.schedule, x_T.shape, self.num_steps, self.diffusion["parameterization"], eta=self.eta,
            generator=self.generator, device=images.device, x_T=x_T, clip_x0=self.clip_x0,
            on_step=keep_step if self.every_step else None,
        )
        if self.every_step:  # (B * S, K, *P) per step -> (B, T * S, K, *P), step-major
            per_step = torch.stack([p.view(b, s, *p.shape[1:]) for p in steps], 1)
            return per_step.flatten(1, 2)
        probs = decode(z0)
        return probs.view(b, s, *probs.shape[1:])

    def _condition(
        self, images: torch.Tensor, combos: list[tuple[int, ...]]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Image features of every sample, window-major ``(B * S, ...)``: sample ``s`` gets those of
        its window mirrored along ``combos[s % M]`` (one encoder pass per combination); and with
        ``with_image_head`` the head's probabilities ``(B, K, *P)``, mirrored back and averaged over
        every combination of axes when mirroring (the samples' combinations are among them)."""
        b, s = images.shape[0], self.num_samples
        passes = combos
        if self.with_image_head and self.mirror:
            passes = mirror_combinations(images.ndim - 2)  # combos is their first len(combos): the same passes first
        per_combo, head_total = [], None
        with autocast_for(images.device, self.amp):
            for axes in passes:
                flip = [2 + a for a in axes]
                flipped = images.flip(flip) if axes else images
                if not self.with_image_head:
                    per_combo.append(self.model.condition_and_detail(flipped))
                    continue
                features = self.model.image_encoder(flipped)
                cond, detail, logits = self.model.image_conditioning(features)  # logits: the prior's, else None
                per_combo.append((cond, detail))
                head = (self.model.segment_image(features) if logits is None else logits).float().softmax(1)
                head = head.flip(flip) if axes else head
                head_total = head if head_total is None else head_total + head
        head_probs = None if head_total is None else head_total / len(passes)
        per_combo = per_combo[: len(combos)]
        index = torch.tensor([k % len(combos) for k in range(s)], device=images.device)

        def gather(features: list[torch.Tensor]) -> torch.Tensor:  # (M, B, ...) -> (B * S, ...)
            stacked = torch.stack(features, 1)  # (B, M, ...)
            return stacked.index_select(1, index).flatten(0, 1)

        cond = gather([c for c, _ in per_combo])
        detail = None if per_combo[0][1] is None else gather([d for _, d in per_combo])  # the refinement head's input
        return cond, detail, head_probs


def reconstruction_window_predictor(model: torch.nn.Module):
    """``(B, K, *P)`` one-hot masks -> ``(B, 1, K, *P)`` autoencoder reconstructions (via mu)."""

    def predict(onehot: torch.Tensor, starts=None) -> torch.Tensor:
        mu, _ = model.autoencoder.encode(onehot)
        return model.autoencoder.decode(mu).float().softmax(1)[:, None]

    return predict
