"""Test-time mirroring as samples: sample s is drawn on the image mirrored by the (s mod M)-th
combination of axes and mirrored back, with its noise mirrored with the window, so it stays one
coherent hypothesis; with one sample, or switched off, nothing changes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from latdiffunet.inference.latent_sampling import (
    CaseNoise,
    DiffusionWindowPredictor,
    mirror_combinations,
    mirroring_enabled,
)
from latdiffunet.inference.sliding_window import sliding_window_predict
from latdiffunet.networks import build_model

from test_sample_coherence import DIFFUSION, NoiseEchoSegmenter

MODEL = {
    "dim": 2, "in_channels": 1, "num_classes": 3, "latent_channels": 4, "strides": [[2, 2], [2, 2]],
    "autoencoder": {"base_channels": 8}, "image_encoder": {"base_channels": 8},
    "denoiser": {"base_channels": 16, "channel_multipliers": [1, 2], "strides": [[2, 2]], "random_latent_dim": 4},
}
DIFF = {"schedule": "cosine", "training_steps": 100, "parameterization": "x0", "noise_scale": 1.0}


def test_combinations_start_with_the_image_itself():
    assert mirror_combinations(2) == [(), (0,), (1,), (0, 1)]
    assert len(mirror_combinations(3)) == 8 and mirror_combinations(3)[0] == ()


def test_plans_switch_it_and_a_trained_fold_overrules_them():
    assert mirroring_enabled({}) and mirroring_enabled({"inference": {}})
    assert not mirroring_enabled({"inference": {"test_time_mirroring": False}})
    # a fold trained without augmentation never saw a mirrored image: its checkpoint says no
    assert not mirroring_enabled({"inference": {"test_time_mirroring": True}}, {"test_time_mirroring": False})
    assert not mirroring_enabled({"diffusion": {"test_time_mirroring": False}})
    assert mirroring_enabled({"inference": {}}, {"noise_scale": 0.5})  # older checkpoints: the plans decide


def test_trainer_records_whether_its_training_mirrored(tmp_path, monkeypatch):
    from test_ambiguity_training import _synthetic_trainer

    augmented, _, _ = _synthetic_trainer(tmp_path / "a", monkeypatch, 908, None)
    plain, _, _ = _synthetic_trainer(tmp_path / "b", monkeypatch, 909, None, augment=False)
    assert augmented.configuration["diffusion"]["test_time_mirroring"] is True
    assert plain.configuration["diffusion"]["test_time_mirroring"] is False


@pytest.mark.parametrize("refinement", [False, True])
def test_each_sample_is_the_mirrored_prediction_of_the_mirrored_image(refinement):
    """Sample s of the mirroring predictor = mirror(plain prediction of mirror(image) from mirror(noise s))."""
    torch.manual_seed(0)
    cfg = copy.deepcopy(MODEL) | ({"refinement": {"enabled": True, "channels": 8, "blocks": 1}} if refinement else {})
    model = build_model(cfg).eval()
    if refinement:
        torch.nn.init.normal_(model.refinement.conv_out.weight, std=0.5)
    image = torch.randn(1, 1, 32, 32)
    samples = 6  # more samples than the 4 combinations: samples 4 and 5 reuse () and (0,)
    mirrored = DiffusionWindowPredictor(model, DIFF, samples, 2, torch.Generator().manual_seed(3), mirror=True)
    mirrored.begin_case((32, 32), torch.device("cpu"))
    noise = mirrored.noise
    with torch.no_grad():
        got = mirrored(image, [(0, 0)])[0]  # (S, K, 32, 32)
        for s in range(samples):
            axes = mirror_combinations(2)[s % 4]
            plain = DiffusionWindowPredictor(model, DIFF, 1, 2, torch.Generator().manual_seed(0))
            x_T = noise.x_T[s : s + 1].flip([2 + a for a in axes]) if axes else noise.x_T[s : s + 1]
            plain.noise = CaseNoise(x_T, noise.random_latent[s : s + 1], noise.factor)
            flipped = image.flip([2 + a for a in axes]) if axes else image
            expected = plain(flipped, [(0, 0)])[0, 0]
            expected = expected.flip([1 + a for a in axes]) if axes else expected
            torch.testing.assert_close(got[s], expected, atol=1e-5, rtol=1e-5)
    # mirroring must change something for a network that is not mirror-equivariant
    with torch.no_grad():
        unmirrored = DiffusionWindowPredictor(model, DIFF, samples, 2, torch.Generator().manual_seed(3))
        unmirrored.begin_case((32, 32), torch.device("cpu"))
        assert (unmirrored(image, [(0, 0)])[0, 1:4] - got[1:4]).abs().max() > 1e-4


def test_one_sample_or_switched_off_changes_nothing():
    torch.manual_seed(1)
    model = build_model(copy.deepcopy(MODEL)).eval()
    image = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        for samples in (1,):
            a = DiffusionWindowPredictor(model, DIFF, samples, 2, torch.Generator().manual_seed(5), mirror=True)(image)
            b = DiffusionWindowPredictor(model, DIFF, samples, 2, torch.Generator().manual_seed(5))(image)
            assert torch.equal(a, b)


@pytest.mark.parametrize("dim,volume_shape,patch", [(2, (1, 3, 16, 48), [16, 16]), (3, (1, 16, 16, 24), [8, 8, 8])])
def test_mirrored_samples_stay_coherent_across_windows_and_slices(dim, volume_shape, patch):
    """The noise is mirrored with the window: overlapping windows of a mirrored sample still see the
    same noise at the same place (a noise-echo model gives crisp stitched masks, identical slices),
    which fails if the noise crop is not mirrored with the image."""
    model = NoiseEchoSegmenter(dim, 4)
    predictor = DiffusionWindowPredictor(model, DIFFUSION, 4, 2, torch.Generator().manual_seed(0), mirror=True)
    probs = sliding_window_predict(np.ones(volume_shape, np.float32), patch, predictor, 4, 2, torch.device("cpu"),
                                   windows_per_batch=3)
    p = probs[:, 1]
    assert np.mean((p < 0.01) | (p > 0.99)) > 0.999, "overlapping windows of a mirrored sample blended different noise"
    if dim == 2:
        fg = p > 0.5
        assert all(np.array_equal(fg[s, z], fg[s, 0]) for s in range(4) for z in range(fg.shape[1]))
