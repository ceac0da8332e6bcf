"""The full-resolution refinement head: identity until trained, used by training and by every
prediction path, absent from models whose config predates it."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from synthetic import planned_tiny_dataset

from latdiffunet.inference.latent_sampling import DiffusionWindowPredictor
from latdiffunet.networks import build_model
from latdiffunet.networks.memory import memory_breakdown
from latdiffunet.training.config import TrainerConfig

BASE = {
    "dim": 2, "in_channels": 1, "num_classes": 3, "latent_channels": 4, "strides": [[2, 2], [2, 2]],
    "autoencoder": {"base_channels": 8}, "image_encoder": {"base_channels": 8},
    "denoiser": {"base_channels": 16, "channel_multipliers": [1, 2], "strides": [[2, 2]], "random_latent_dim": 4},
}


def _with_head(enabled: bool = True) -> dict:
    return copy.deepcopy(BASE) | {"refinement": {"enabled": enabled, "channels": 8, "blocks": 1}}


def _randomise_head(model) -> None:
    torch.nn.init.normal_(model.refinement.conv_out.weight, std=0.5)
    torch.nn.init.normal_(model.refinement.conv_out.bias, std=0.5)


def test_untrained_head_is_the_identity_and_a_trained_one_reads_the_image():
    torch.manual_seed(0)
    model = build_model(_with_head()).eval()
    image, z = torch.randn(2, 1, 32, 32), torch.randn(2, 4, 8, 8)
    cond, detail = model.condition_and_detail(image)
    assert cond.shape[2:] == (8, 8) and detail.shape[2:] == (32, 32)
    with torch.no_grad():
        assert torch.equal(model.decode_latent(z, detail), model.decode_latent(z))
        _randomise_head(model)
        refined = model.decode_latent(z, detail)
        other_image = model.condition_and_detail(torch.randn(2, 1, 32, 32))[1]
    assert (refined - model.decode_latent(z)).abs().max() > 1e-3, "the head changed nothing"
    assert (refined - model.decode_latent(z, other_image)).abs().max() > 1e-3, "the head ignores the image"


def test_config_without_the_key_builds_the_model_it_was_trained_as():
    model = build_model(copy.deepcopy(BASE))
    assert model.refinement is None and model.condition_and_detail(torch.randn(1, 1, 16, 16))[1] is None
    assert not any(k.startswith("refinement") for k in model.state_dict())
    assert build_model(_with_head(False)).refinement is None
    assert any(k.startswith("refinement") for k in build_model(_with_head()).state_dict())


def test_window_predictor_refines_every_sample():
    torch.manual_seed(1)
    model = build_model(_with_head()).eval()
    _randomise_head(model)
    diffusion = {"schedule": "cosine", "training_steps": 100, "parameterization": "x0", "noise_scale": 1.0}
    images = torch.randn(2, 1, 32, 32)

    def predict(m) -> torch.Tensor:
        return DiffusionWindowPredictor(m, diffusion, 3, 2, torch.Generator().manual_seed(5))(images)

    with_head = predict(model)
    head = model.refinement
    model.refinement = None
    without = predict(model)
    model.refinement = head
    assert with_head.shape == without.shape == (2, 3, 3, 32, 32)
    assert (with_head - without).abs().max() > 1e-3, "prediction decoded without the refinement head"


def test_memory_estimate_counts_the_head():
    plain = memory_breakdown(copy.deepcopy(BASE), [32, 32], 4)
    headed = memory_breakdown(_with_head(), [32, 32], 4)
    assert headed["num_parameters"] > plain["num_parameters"]
    assert headed["activation_bytes"] > plain["activation_bytes"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    yield from planned_tiny_dataset(tmp_path_factory.mktemp("refine"), "Dataset905_Refine2D", seed=4)


def test_head_trains_in_the_diffusion_stage_only(planned):
    from latdiffunet.training.trainer import LatentDiffusionTrainer

    pre = planned / "pre" / "Dataset905_Refine2D"
    plans = json.loads((pre / "latdiffPlans_tiny.json").read_text())
    network = plans["configurations"]["2d"]["network"]
    assert network["refinement"] == {"enabled": False, "channels": 16}, "the tiny preset's head is off (not yet measured)"
    network["refinement"] = {"enabled": True, "channels": 8}  # as a plans file that switches it on
    splits = json.loads((pre / "splits_final.json").read_text())
    config = TrainerConfig(autoencoder_epochs=1, diffusion_epochs=1, iterations_per_epoch=3, validation_every=100,
                           batch_size=4, num_workers=0, augment=False, calibrate_noise_scale=False, sample_loss_start=0.0)
    trainer = LatentDiffusionTrainer(plans, "2d", 0, pre, planned / "res" / "t", torch.device("cpu"), config, splits)
    head = trainer.model.refinement
    assert head is not None
    ae_params = {id(p) for p in trainer._trainable_parameters("autoencoder")}
    assert not any(id(p) in ae_params for p in head.parameters())
    before = head.conv_out.weight.detach().clone()
    batches = trainer.batch_stream()
    trainer._setup_stage("diffusion")
    trainer.model.train()
    for _ in range(2):
        trainer.train_step(next(batches), "diffusion")
    trainer.shutdown()
    assert (head.conv_out.weight - before).abs().max() > 0, "the diffusion stage did not train the head"
