"""eps-, x0- and v-prediction compared fairly: bounded x0 estimates in the decoded loss and at sampling.

eps-prediction recovers x0 = (x_t - sigma eps) / alpha; on the cosine schedule alpha = 4.9e-5 at
t = 999, so a network error of 1e-5 in eps is an error of 0.2 in x0 there and 1e-3 is 20. These
tests hold the training loss and the inference sampler to "x0_hat stays in the latent range and
its gradient is not amplified", and check that x0- and v-prediction are left exactly as they were.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import REPO_ROOT
from latdiffunet.diffusion import (
    EPS_CLIP_X0,
    PARAMETERIZATIONS,
    NoiseSchedule,
    clip_x0_for,
    predict_x0_and_eps,
    training_target,
    x0_for_loss,
)
from latdiffunet.inference.latent_sampling import DiffusionWindowPredictor
from latdiffunet.training.config import TrainerConfig
from latdiffunet.training.variants import get_trainer_class

COSINE = NoiseSchedule.cosine(1000)
NOISIEST = NoiseSchedule(COSINE.alphas_cumprod[-1:])  # t = 999 of the cosine schedule as the only timestep


def _exact_outputs(kind: str, t: torch.Tensor):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(len(t), 2, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    alpha, sigma = COSINE.alpha_sigma(t, ndim=x0.ndim, dtype=torch.float64)
    out = training_target(kind, x0, noise, alpha, sigma).clone().requires_grad_(True)  # a leaf of its own
    return x0, alpha * x0 + sigma * noise, alpha, sigma, out


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
def test_x0_for_loss_is_exact_with_a_gradient_no_larger_than_x0_predictions(kind):
    """An exact network gives the same x0 in all three parameterisations, at every noise level,
    and d x0_hat / d output never exceeds 1 (x0-prediction's): before, eps had 20,000 at t = 999."""
    t = torch.tensor([0, 250, 500, 750, 990, 999])
    x0, x_t, alpha, sigma, out = _exact_outputs(kind, t)
    x0_hat = x0_for_loss(kind, out, x_t, alpha, sigma)
    torch.testing.assert_close(x0_hat, x0, atol=1e-9, rtol=0)
    x0_hat.sum().backward()
    assert float(out.grad.abs().max()) <= 1 + 1e-12, out.grad.abs().amax((1, 2, 3))


@pytest.mark.parametrize("kind", ["x0", "v"])
def test_x0_for_loss_leaves_x0_and_v_prediction_bit_identical(kind):
    t = torch.tensor([0, 500, 999])
    _, x_t, alpha, sigma, out = _exact_outputs(kind, t)
    out = out.detach() + 0.3  # an imperfect network
    a_out, b_out = out.clone().requires_grad_(True), out.clone().requires_grad_(True)
    a = x0_for_loss(kind, a_out, x_t, alpha, sigma)
    b, _ = predict_x0_and_eps(kind, b_out, x_t, alpha, sigma)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    (a ** 2).sum().backward()
    (b ** 2).sum().backward()
    torch.testing.assert_close(a_out.grad, b_out.grad, atol=0, rtol=0)


def test_clip_x0_for_plans():
    assert clip_x0_for({"parameterization": "eps"}) == EPS_CLIP_X0
    assert clip_x0_for({"parameterization": "x0"}) is None  # the default stays numerically unchanged
    assert clip_x0_for({"parameterization": "v"}) is None
    assert clip_x0_for({"parameterization": "eps", "clip_x0": None}) is None  # a plan can switch it off
    assert clip_x0_for({"parameterization": "x0", "clip_x0": 3}) == 3.0
    with pytest.raises(ValueError, match="eps"):
        clip_x0_for({"parameterization": "noise"})


# ----------------------------------------------------------------------------- inference


class EchoSegmenter(nn.Module):
    """Denoiser output = ``gain`` * noisy latent; records every latent it is asked to decode.

    At t = 999 the true eps is ~x_t, so ``gain`` = 1.01 is an eps-model with a 1 % error.
    """

    def __init__(self, gain: float):
        super().__init__()
        self.gain = gain
        self.decoded: list[torch.Tensor] = []
        self.config = {"dim": 2, "latent_channels": 2, "strides": [[2, 2]], "denoiser": {"random_latent_dim": 0}}

    def condition(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(images, 2)

    def condition_and_detail(self, images: torch.Tensor):
        return self.condition(images), None  # no refinement head

    def denoise(self, z, t, cond, random_latent=None):
        return self.gain * z

    def decode_latent(self, z, detail=None):
        self.decoded.append(z.detach())
        up = nn.functional.interpolate(z[:, :1], scale_factor=2)
        return torch.cat([-up, up], 1)


@pytest.mark.parametrize(
    "diffusion, gain, bound",
    [
        ({"parameterization": "eps"}, 1.01, EPS_CLIP_X0),  # clipped: unclipped it is ~200 |x_T|
        ({"parameterization": "eps", "clip_x0": 2.0}, 1.01, 2.0),  # the plan's bound wins
        ({"parameterization": "x0"}, 50.0, None),  # x0-prediction: the network's x0, unclipped
    ],
)
def test_window_predictor_passes_the_plans_clip_to_the_sampler(diffusion, gain, bound):
    model = EchoSegmenter(gain)
    settings = {"schedule": "cosine", "training_steps": 1000, "eta": 0.0} | diffusion
    predictor = DiffusionWindowPredictor(model, settings, num_samples=3, num_steps=1, generator=torch.Generator().manual_seed(0))
    predictor(torch.zeros(2, 1, 8, 8))
    largest = float(model.decoded[0].abs().max())
    if bound is None:
        assert largest > 10 * EPS_CLIP_X0, "x0-prediction must not be clipped"
    else:
        assert largest <= bound + 1e-6, f"the sampler's x0 reached {largest:.1f}: clip_x0 was not passed"


# ----------------------------------------------------------------------------- training


def _eps_trainer(tmp_path, **config):
    plans = json.loads((REPO_ROOT / "plans" / "reference" / "Dataset004_Hippocampus" / "latdiffPlans_tiny.json").read_text())
    config = TrainerConfig(amp=False, num_workers=0, latent_loss_weight=0.0, sample_loss_weight=0.0, **config)
    trainer = get_trainer_class("LatentDiffusionTrainer_epspred")(
        plans, "2d", 0, tmp_path, tmp_path / "out", torch.device("cpu"), config, [{"train": ["a"], "val": []}]
    )
    trainer.schedule = NOISIEST  # every drawn t is the cosine schedule's t = 999 (alpha = 4.9e-5)
    return trainer


def _record_decoded(model) -> list[torch.Tensor]:
    """Keep every latent handed to the decoder, with its gradient (= d loss / d x0_hat)."""
    seen, decode = [], model.decode_latent

    def recording_decode(z, detail=None):
        if z.requires_grad:
            z.retain_grad()
        seen.append(z)
        return decode(z, detail)

    model.decode_latent = recording_decode
    return seen


@pytest.mark.parametrize("eps_error", [1e-5, 1e-3])
def test_eps_decoded_loss_is_bounded_at_the_noisiest_step(tmp_path, eps_error):
    """An eps-network off by ``eps_error`` at t = 999: the decoded loss's x0 stays inside the clip
    and the gradient on the network output is at most d loss / d x0, as for x0-prediction. Before,
    x0_hat was 0.2 (1e-5) or 20 (1e-3) off and the gradient 20,000x d loss / d x0."""
    trainer = _eps_trainer(tmp_path)
    model = trainer.model
    encode, seen_z0, outputs = model.encode_mask, [], []
    model.encode_mask = lambda onehot: seen_z0.append(encode(onehot)) or seen_z0[-1]

    def eps_network(z_t, t, cond, random_latent=None):
        alpha, sigma = trainer.schedule.alpha_sigma(t, ndim=z_t.ndim)
        outputs.append(((z_t - alpha * seen_z0[-1]) / sigma + eps_error).requires_grad_(True))
        return outputs[-1]

    model.denoise = eps_network
    decoded = _record_decoded(model)
    g = torch.Generator().manual_seed(0)
    seg = torch.randint(0, 3, (2, 1, 16, 16), generator=g)
    loss, _ = trainer.diffusion_loss(torch.randn(2, 1, 16, 16, generator=g), seg)
    loss.backward()
    (x0_hat,) = decoded
    assert float(x0_hat.detach().abs().max()) <= EPS_CLIP_X0
    assert float(x0_hat.grad.abs().max()) > 0, "the test needs a decoded loss with a gradient"
    ratio = float(outputs[0].grad.abs().max() / x0_hat.grad.abs().max())
    assert ratio <= 1 + 1e-4, f"gradient on the eps output is {ratio:.0f}x d loss / d x0"
    if eps_error < 1e-4:  # x0_hat 0.2 off, inside the clip: the gradient cap alone must bound it
        assert ratio > 0.99


def test_eps_sample_loss_clips_its_sampler(tmp_path):
    trainer = _eps_trainer(tmp_path, sample_loss_steps=1, sample_loss_images=1, sample_loss_samples=2)
    trainer.model.denoise = lambda z, t, cond, random_latent=None: 1.01 * z  # eps-model with a 1 % error
    decoded = _record_decoded(trainer.model)
    cond = torch.zeros(1, trainer.model.config["latent_channels"], 4, 4)
    trainer.sample_loss(cond, torch.nn.functional.one_hot(torch.zeros(1, 16, 16).long(), 3).movedim(-1, 1).float())
    assert float(decoded[0].abs().max()) <= EPS_CLIP_X0
