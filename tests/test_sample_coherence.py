"""One sample = one hypothesis for the whole case: noise coherence across windows and slices.

A stub segmenter whose sample is a pure function of its starting noise makes the property
visible: if every window (or slice) of a sample drew its own noise, the stitched sample would be
a mosaic. These tests fail for per-window or per-slice noise.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from latdiffunet.inference.latent_sampling import CaseNoise, DiffusionWindowPredictor
from latdiffunet.inference.sliding_window import sliding_window_predict

DIFFUSION = {"schedule": "cosine", "training_steps": 1000, "parameterization": "x0", "eta": 0.0}


class NoiseEchoSegmenter(nn.Module):
    """x0-prediction = the noisy latent itself, so a sample is sign(x_T) upsampled: all noise, no image."""

    def __init__(self, dim: int, factor: int, random_latent_dim: int = 3):
        super().__init__()
        self.factor = factor
        self.config = {
            "dim": dim, "latent_channels": 2, "strides": [[2] * dim] * int(np.log2(factor)),
            "denoiser": {"random_latent_dim": random_latent_dim},
        }

    def condition(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(images, self.factor) if images.ndim == 4 else nn.functional.avg_pool3d(images, self.factor)

    def condition_and_detail(self, images: torch.Tensor):
        return self.condition(images), None  # no refinement head

    def denoise(self, z, t, cond, random_latent=None, generator=None):
        assert random_latent is not None and random_latent.shape[0] == z.shape[0]
        return z + 0.0 * cond.mean() + random_latent[:, :1].reshape(-1, *([1] * (z.ndim - 1))).sign() * 0.0

    def decode_latent(self, z, detail=None):
        logit = z[:, :1].sign() * 50
        up = nn.functional.interpolate(logit, scale_factor=self.factor, mode="nearest")
        return torch.cat([-up, up], 1)


def _predict(volume, patch, samples=4, seed=0, dim=2, factor=4):
    model = NoiseEchoSegmenter(dim, factor)
    gen = torch.Generator().manual_seed(seed)
    predictor = DiffusionWindowPredictor(model, DIFFUSION, samples, 2, gen)
    return sliding_window_predict(volume, patch, predictor, samples, 2, torch.device("cpu"), windows_per_batch=3)


def test_2d_configuration_on_a_volume_gives_slice_coherent_samples():
    """Identical slices must give identical slices within each sample, yet samples must differ."""
    volume = np.ones((1, 6, 16, 16), np.float32)
    probs = _predict(volume, [16, 16])
    fg = probs[:, 1] > 0.5  # (S, Z, Y, X)
    for s in range(fg.shape[0]):
        for z in range(1, fg.shape[1]):
            assert np.array_equal(fg[s, z], fg[s, 0]), f"sample {s}: slice {z} differs from slice 0 (per-slice noise)"
    assert not np.array_equal(fg[0], fg[1]), "samples must differ (the noise must still vary between samples)"


def test_overlapping_windows_of_one_sample_agree():
    """Stitching windows of one sample that share their noise gives a crisp mask, not a blend."""
    volume = np.ones((1, 1, 16, 48), np.float32)
    probs = _predict(volume, [16, 16])  # 16 x 48 with 50 % overlap: 5 windows along x
    p = probs[:, 1]
    crisp = np.mean((p < 0.01) | (p > 0.99))
    assert crisp > 0.999, f"only {crisp:.3f} of the voxels are crisp: overlapping windows blended different draws"


def test_3d_windows_crop_one_noise_volume():
    volume = np.ones((1, 16, 16, 24), np.float32)
    probs = _predict(volume, [8, 8, 8], samples=2, dim=3, factor=4)
    p = probs[:, 1]
    assert np.mean((p < 0.01) | (p > 0.99)) > 0.999


def test_case_noise_crop_is_the_field_under_the_window():
    gen = torch.Generator().manual_seed(1)
    noise = CaseNoise.draw(3, 2, (16, 24), (4, 4), 5, gen, torch.device("cpu"))
    assert noise.x_T.shape == (3, 2, 4, 6) and noise.random_latent.shape == (3, 5)
    crop = noise.crop([(0, 8), (0, 0)], (4, 4))
    assert torch.equal(crop[:3], noise.x_T[:, :, :, 2:6]) and torch.equal(crop[3:], noise.x_T[:, :, :, 0:4])


def test_same_seed_same_samples_and_other_seed_other_samples():
    volume = np.ones((1, 2, 16, 16), np.float32)
    a, b, c = _predict(volume, [16, 16], seed=3), _predict(volume, [16, 16], seed=3), _predict(volume, [16, 16], seed=4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
