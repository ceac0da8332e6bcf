"""The image encoder's segmentation head (deep supervision, and optionally the denoiser's prior):
absent from models whose config predates it, a dense gradient for the image encoder in both
training stages, its mask never shown as a prediction."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from synthetic import planned_tiny_dataset

from latdiffunet.networks import build_model
from latdiffunet.networks.memory import memory_breakdown
from latdiffunet.training.config import TrainerConfig

BASE = {
    "dim": 2, "in_channels": 1, "num_classes": 3, "latent_channels": 4, "strides": [[2, 2], [2, 2]],
    "autoencoder": {"base_channels": 8}, "image_encoder": {"base_channels": 8},
    "denoiser": {"base_channels": 16, "channel_multipliers": [1, 2], "strides": [[2, 2]], "random_latent_dim": 4},
}


def _with_head(enabled: bool = True) -> dict:
    return copy.deepcopy(BASE) | {"segmentation_head": {"enabled": enabled}}


@pytest.mark.parametrize("dim,strides,shape", [(2, [[2, 2], [2, 2]], (32, 24)), (3, [[1, 2, 2], [2, 2, 2]], (8, 16, 16))])
def test_head_segments_at_the_image_resolution(dim, strides, shape):
    config = _with_head() | {"dim": dim, "strides": strides}
    config["denoiser"] = {"base_channels": 8, "strides": []}
    model = build_model(config)
    features = model.image_encoder(torch.randn(2, 1, *shape))
    assert model.segment_image(features).shape == (2, 3, *shape)


def test_config_without_the_key_builds_the_model_it_was_trained_as():
    model = build_model(copy.deepcopy(BASE))
    assert model.segmentation_head is None
    assert not any(k.startswith("segmentation_head") for k in model.state_dict())
    with pytest.raises(RuntimeError, match="no segmentation head"):
        model.segment_image(model.image_encoder(torch.randn(1, 1, 16, 16)))
    assert build_model(_with_head(False)).segmentation_head is None
    assert any(k.startswith("segmentation_head") for k in build_model(_with_head()).state_dict())


def test_memory_estimate_counts_the_head():
    plain = memory_breakdown(copy.deepcopy(BASE), [32, 32], 4)
    headed = memory_breakdown(_with_head(), [32, 32], 4)
    head_parameters = sum(p.numel() for p in build_model(_with_head()).segmentation_head.parameters())
    assert headed["num_parameters"] - plain["num_parameters"] == head_parameters
    assert headed["activation_bytes"] > plain["activation_bytes"], "the head's training activations are not counted"


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    yield from planned_tiny_dataset(tmp_path_factory.mktemp("seghead"), "Dataset907_SegHead2D", seed=7)


def _trainer(planned, head: bool | dict, **overrides):
    """``head``: on/off, or the whole ``segmentation_head`` section of the network plans."""
    from latdiffunet.training.trainer import LatentDiffusionTrainer

    pre = planned / "pre" / "Dataset907_SegHead2D"
    plans = json.loads((pre / "latdiffPlans_tiny.json").read_text())
    plans["configurations"]["2d"]["network"]["segmentation_head"] = head if isinstance(head, dict) else {"enabled": head}
    splits = json.loads((pre / "splits_final.json").read_text())
    config = TrainerConfig(autoencoder_epochs=1, diffusion_epochs=1, iterations_per_epoch=3, validation_every=100,
                           batch_size=4, num_workers=0, augment=False, calibrate_noise_scale=False,
                           sample_loss_start=0.0, **overrides)
    return LatentDiffusionTrainer(plans, "2d", 0, pre, planned / "res" / "t", torch.device("cpu"), config, splits)


def _step(trainer, stage: str) -> dict:
    trainer._setup_stage(stage)
    trainer.model.train()
    try:
        return trainer.train_step(next(trainer.batch_stream()), stage)
    finally:
        trainer.shutdown()


def _has_gradient(module: torch.nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize("head,pretraining,expected", [(True, True, True), (True, False, False), (False, True, False)])
def test_autoencoder_stage_trains_the_image_encoder_through_the_head_only(planned, head, pretraining, expected):
    """Without the head (or with ``image_pretraining`` off) the image encoder has nothing to learn
    from in the autoencoder stage; with it, the head's CE + Dice reaches every encoder scale."""
    trainer = _trainer(planned, head, image_pretraining=pretraining)
    parts = _step(trainer, "autoencoder")
    assert ("image_seg_loss" in parts) is expected
    assert _has_gradient(trainer.model.image_encoder.conv_in) is expected
    assert _has_gradient(trainer.model.autoencoder)
    if head:
        assert _has_gradient(trainer.model.segmentation_head) is expected


def test_diffusion_stage_adds_the_head_loss_weighted(planned):
    trainer = _trainer(planned, True, image_segmentation_weight=0.0)
    parts = _step(trainer, "diffusion")
    assert not _has_gradient(trainer.model.segmentation_head), "a weight of 0 must switch the head's loss off"
    trainer = _trainer(planned, True)
    parts = _step(trainer, "diffusion")
    assert float(parts["image_seg_loss"]) > 0
    assert _has_gradient(trainer.model.segmentation_head) and _has_gradient(trainer.model.image_encoder.conv_in)


def test_prediction_never_runs_the_head(planned):
    """Without the prior the head is training only: prediction must not pay for it."""
    from latdiffunet.inference.latent_sampling import DiffusionWindowPredictor

    torch.manual_seed(0)
    model = build_model(_with_head()).eval()

    def refuse(*_args, **_kwargs):
        raise AssertionError("prediction ran the segmentation head")

    model.segmentation_head.forward = refuse
    diffusion = {"schedule": "cosine", "training_steps": 100, "parameterization": "x0", "noise_scale": 1.0}
    out = DiffusionWindowPredictor(model, diffusion, 2, 2, torch.Generator().manual_seed(1))(torch.randn(1, 1, 32, 32))
    assert out.shape == (1, 2, 3, 32, 32)


def _with_prior() -> dict:
    return copy.deepcopy(BASE) | {"segmentation_head": {"enabled": True, "condition_denoiser": True}}


def test_head_prior_is_the_heads_mask_encoded_and_reaches_the_denoiser_detached():
    """With ``condition_denoiser`` the denoiser reads the head's mask, encoded by the mask
    autoencoder, beside the image features; the denoiser's loss never trains the head."""
    torch.manual_seed(0)
    model = build_model(_with_prior())
    torch.nn.init.normal_(model.denoiser.out[-1].weight, std=0.1)  # zero-initialised: would hide every input
    plain = build_model(copy.deepcopy(BASE) | {"segmentation_head": {"enabled": True}})
    assert model.denoiser.conv_in.in_channels == plain.denoiser.conv_in.in_channels + 4
    image = torch.randn(2, 1, 32, 32)
    features = model.image_encoder(image)
    cond, _, logits = model.image_conditioning(features)
    assert cond.shape[1] == features[-1].shape[1] + 4
    torch.testing.assert_close(cond[:, -4:], model.encode_mask(logits.softmax(1)))
    assert model.split_image_features(features)[0].shape == cond.shape

    z_t, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        before = model.denoise(z_t, t, cond)
        model.segmentation_head.conv_out.bias.add_(torch.tensor([3.0, -3.0, 0.0]))  # a different head mask
        after = model.denoise(z_t, t, model.split_image_features(features)[0])
    assert (before - after).abs().max() > 1e-4, "the head's mask does not reach the denoiser"

    model.zero_grad()
    model.denoise(z_t, t, model.split_image_features(model.image_encoder(image))[0]).square().mean().backward()
    assert not _has_gradient(model.segmentation_head), "the denoiser's loss trained the head through the prior"
    assert _has_gradient(model.image_encoder.conv_in)


def test_head_prior_needs_the_head():
    config = copy.deepcopy(BASE) | {"segmentation_head": {"enabled": False, "condition_denoiser": True}}
    with pytest.raises(ValueError, match="condition_denoiser needs segmentation_head.enabled"):
        build_model(config)


def test_memory_estimate_counts_the_prior_once(monkeypatch):
    from latdiffunet.networks.segmentation_head import ImageSegmentationHead

    headed = memory_breakdown(_with_head(), [32, 32], 4)
    calls = []
    forward = ImageSegmentationHead.forward
    monkeypatch.setattr(ImageSegmentationHead, "forward", lambda self, f: calls.append(1) or forward(self, f))
    prior = memory_breakdown(_with_prior(), [32, 32], 4)
    extra = 4 * build_model(_with_prior()).denoiser.conv_in.out_channels * 9  # conv_in's 4 new input channels
    assert prior["num_parameters"] - headed["num_parameters"] == extra
    assert len(calls) == 1, "the memory trace ran the head twice (training runs it once)"
    # the prior is computed without gradient (nothing kept for backward), so it adds no training memory
    assert prior["activation_bytes"] == headed["activation_bytes"]


def test_diffusion_step_with_the_prior_runs_the_head_once(planned):
    trainer = _trainer(planned, {"enabled": True, "condition_denoiser": True})
    calls = []
    trainer.model.segmentation_head.register_forward_hook(lambda *_: calls.append(1))
    parts = _step(trainer, "diffusion")
    assert float(parts["image_seg_loss"]) > 0
    assert len(calls) == 1, f"the head ran {len(calls)} times in one diffusion step"
    assert _has_gradient(trainer.model.segmentation_head)


def test_prediction_with_the_prior_runs_the_head_once_per_image_not_per_step():
    """The head's mask is a condition, computed once per image like the image features; every
    step of every sample still denoises, and samples of one image still differ."""
    from latdiffunet.inference.latent_sampling import DiffusionWindowPredictor

    torch.manual_seed(0)
    model = build_model(_with_prior()).eval()
    torch.nn.init.normal_(model.denoiser.out[-1].weight, std=0.1)  # zero-initialised: every sample would be x0 = 0
    calls = []
    model.segmentation_head.register_forward_hook(lambda *_: calls.append(1))
    diffusion = {"schedule": "cosine", "training_steps": 100, "parameterization": "x0", "noise_scale": 1.0}
    out = DiffusionWindowPredictor(model, diffusion, 3, 4, torch.Generator().manual_seed(1))(torch.randn(1, 1, 32, 32))
    assert out.shape == (1, 3, 3, 32, 32)
    assert len(calls) == 1
    assert (out[0, 0] - out[0, 1]).abs().max() > 1e-3, "samples of one image are identical"


@pytest.mark.parametrize("prior", [False, True])
def test_one_pass_gives_the_samples_and_the_heads_probabilities_over_every_mirroring(prior):
    """The uncertainty map's image part (the head's softmax averaged over all 2^dim mirrorings)
    comes from the sliding-window pass that draws the samples; the samples must be exactly those
    of a pass without it, and the head's average must cover every mirroring even when there are
    fewer samples (3) than mirrorings (4)."""
    from latdiffunet.inference.latent_sampling import DiffusionWindowPredictor, mirror_combinations
    from latdiffunet.inference.sliding_window import sliding_window_predict

    torch.manual_seed(0)
    model = build_model(_with_prior() if prior else _with_head()).eval()
    torch.nn.init.normal_(model.denoiser.out[-1].weight, std=0.1)  # zero-initialised: every sample would be x0 = 0
    diffusion = {"schedule": "cosine", "training_steps": 100, "parameterization": "x0", "noise_scale": 1.0}
    volume = torch.randn(1, 1, 40, 44).numpy()  # (C, Z, Y, X): several overlapping 32 x 32 windows
    samples = 3

    def stitched(predictor, outputs):
        with torch.no_grad():
            return sliding_window_predict(volume, [32, 32], predictor, outputs, 3, torch.device("cpu"))

    plain = stitched(DiffusionWindowPredictor(model, diffusion, samples, 2, torch.Generator().manual_seed(1), mirror=True), samples)
    both = stitched(DiffusionWindowPredictor(model, diffusion, samples, 2, torch.Generator().manual_seed(1), mirror=True,
                                             with_image_head=True), samples + 1)

    def head_over_every_mirroring(images, starts=None):
        total = 0
        for axes in mirror_combinations(2):
            flip = [2 + a for a in axes]
            x = images.flip(flip) if axes else images
            probs = model.segment_image(model.image_encoder(x)).softmax(1)
            total = total + (probs.flip(flip) if axes else probs)
        return (total / 4)[:, None]

    assert np.array_equal(both[:samples], plain), "the samples changed when the head's probabilities came along"
    np.testing.assert_allclose(both[samples], stitched(head_over_every_mirroring, 1)[0], atol=1e-6)
    assert (plain[0] - plain[1]).__abs__().max() > 1e-3, "samples of one image are identical"
