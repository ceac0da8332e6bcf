"""cDAL's adversarial variant (``LatentDiffusionTrainer_adversarial``): the posterior maths, the
discriminator and its attention map, the random latent, training and resume on synthetic data."""

from __future__ import annotations

import json
import math

import pytest
import torch

from synthetic import make_synthetic_dataset

from latdiffunet.diffusion import NoiseSchedule
from latdiffunet.errors import UserInputError
from latdiffunet.experiment_planning.cli import main as plan_main
from latdiffunet.networks import build_model
from latdiffunet.networks.blocks import ResBlock
from latdiffunet.networks.discriminator import DiscriminatorConfig, LatentPairDiscriminator, attention_weights
from latdiffunet.training.adversarial import LatentDiffusionTrainer_adversarial, adversarial_plans, previous_timesteps
from latdiffunet.training.config import TrainerConfig
from latdiffunet.training.losses import segmentation_loss
from latdiffunet.training.variants import get_trainer_class
from latdiffunet.utilities.checkpoint import load_checkpoint


# ---------------------------------------------------------------------------------------- maths
def test_posterior_is_ddpm_step_ddim_eta1_step_and_x0_at_the_end():
    """q(x_s | x_t, x0): for s = t - 1 the DDPM posterior (ddpm_sample's coefficients), for a long
    jump DDIM's step with eta = 1 (written from DDIM's formula, not the posterior's), and x0 itself
    for s = -1."""
    schedule = NoiseSchedule.cosine(1000)
    abar, betas = schedule.alphas_cumprod, schedule.betas
    t = torch.tensor([999, 500, 10, 1])
    c_x0, c_xt, std = (v.double() for v in schedule.posterior_coefficients(t, t - 1, dtype=torch.float64))
    a_t, a_p, b = abar[t], abar[t - 1], betas[t]
    torch.testing.assert_close(c_x0, a_p.sqrt() * b / (1 - a_t))
    torch.testing.assert_close(c_xt, (1 - b).sqrt() * (1 - a_p) / (1 - a_t))
    torch.testing.assert_close(std, (b * (1 - a_p) / (1 - a_t)).sqrt())

    t, s = torch.tensor([999, 749, 499]), torch.tensor([749, 499, 249])
    c_x0, c_xt, std = schedule.posterior_coefficients(t, s, dtype=torch.float64)
    a_t, a_s = abar[t], abar[s]
    sigma2 = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)  # DDIM eta = 1
    direction = (1 - a_s - sigma2).sqrt()  # times eps_hat = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t)
    torch.testing.assert_close(c_x0, a_s.sqrt() - direction * a_t.sqrt() / (1 - a_t).sqrt())
    torch.testing.assert_close(c_xt, direction / (1 - a_t).sqrt())
    torch.testing.assert_close(std, sigma2.sqrt())

    x0, x_t, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([249, 100, 0])
    torch.testing.assert_close(schedule.posterior_sample(x0, x_t, t, previous_timesteps(t, 250), noise), x0)
    with pytest.raises(ValueError, match="-1 <= s < t"):
        schedule.posterior_coefficients(torch.tensor([5]), torch.tensor([5]))


def test_spatial_weight_reweights_the_segmentation_loss():
    """A uniform weight of 1 is no weight; weight on the badly predicted half raises the loss."""
    torch.manual_seed(0)
    seg = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    seg[:, :, :, :4] = 1
    logits = torch.zeros(2, 2, 8, 8)
    logits[:, 1, :, :4] = 3.0  # left half right (foreground), right half unsure
    plain, _ = segmentation_loss(logits, seg, None)
    ones, _ = segmentation_loss(logits, seg, None, spatial_weight=torch.ones(2, 1, 8, 8))
    torch.testing.assert_close(ones, plain)
    right = torch.ones(2, 1, 8, 8)
    right[..., 4:] = 3.0
    heavier, _ = segmentation_loss(logits, seg, None, spatial_weight=right / right.mean())
    assert heavier > plain + 0.05


# ---------------------------------------------------------------------------------------- networks
@pytest.mark.parametrize("dim, latent, image, strides", [
    (2, (16, 16), (64, 64), [[2, 2], [2, 2]]),
    (2, (7, 5), (28, 20), [[2, 2], [2, 2]]),
    (3, (4, 8, 8), (8, 32, 32), [[1, 2, 2], [2, 2, 2]]),
])
def test_discriminator_depends_on_t_and_image_and_its_attention_reweights(dim, latent, image, strides):
    torch.manual_seed(0)
    d = LatentPairDiscriminator(DiscriminatorConfig(dim, 4, 1, strides, base_channels=16)).eval()
    b = 3
    x_s, x_t, img = torch.randn(b, 4, *latent), torch.randn(b, 4, *latent), torch.randn(b, 1, *image)
    t = torch.tensor([10, 500, 990])
    logits, features = d(x_s, x_t, t, img)
    assert logits.shape[:2] == (b, 1) and torch.isfinite(logits).all()
    assert (d(x_s, x_t, t.roll(1), img)[0] - logits).abs().amax(tuple(range(1, logits.dim()))).min() > 1e-6
    assert (d(x_s, x_t, t, img.roll(1, 0))[0] - logits).abs().amax(tuple(range(1, logits.dim()))).min() > 1e-6
    assert (d(x_s.roll(1, 0), x_t, t, img)[0] - logits).abs().max() > 1e-6

    # a feature map with structure: the attention must follow it, stay positive and average 1
    features = torch.randn_like(features) * 3
    weights = attention_weights(features, image)
    assert weights.shape == (b, 1, *image)
    assert weights.min() > 0
    torch.testing.assert_close(weights.flatten(1).mean(1), torch.ones(b), rtol=1e-4, atol=1e-4)
    assert weights.max() > 1.1 and weights.min() >= 0.5 - 1e-6  # it reweights, within the floor


def test_random_latent_reaches_every_residual_block_and_changes_the_output():
    """The adversarial plans give the denoiser a random latent (also when the plans had none);
    it changes the FiLM of every residual block and the denoiser's output."""
    plans = {"configurations": {"2d": {
        "network": {"dim": 2, "in_channels": 1, "num_classes": 3, "latent_channels": 4, "strides": [[2, 2]],
                    "autoencoder": {"base_channels": 8}, "image_encoder": {"base_channels": 8},
                    "denoiser": {"base_channels": 16, "strides": [[2, 2]], "random_latent_dim": 0}},
        "diffusion": {"sampling_steps": 10}, "inference": {"sampling_steps": 10, "num_samples": 5}}}}
    adapted = adversarial_plans(plans, "2d")
    assert plans["configurations"]["2d"]["network"]["denoiser"]["random_latent_dim"] == 0  # a copy, not the caller's
    assert adapted["configurations"]["2d"]["inference"]["sampling_steps"] == 4
    torch.manual_seed(0)
    model = build_model(adapted["configurations"]["2d"]["network"]).eval()
    assert model.config["denoiser"]["random_latent_dim"] > 0
    torch.nn.init.normal_(model.denoiser.out[-1].weight, std=0.1)  # the zero-initialised output would hide any change
    films: dict[str, list[torch.Tensor]] = {}
    blocks = {name: m for name, m in model.denoiser.named_modules() if isinstance(m, ResBlock)}
    assert len(blocks) >= 5
    hooks = [m.emb_proj.register_forward_hook(lambda _m, _i, out, name=name: films.setdefault(name, []).append(out))
             for name, m in blocks.items()]
    z, cond, t = torch.randn(2, 4, 8, 8), torch.randn(2, model.denoiser.config.cond_channels, 8, 8), torch.tensor([500, 500])
    dim = model.config["denoiser"]["random_latent_dim"]
    with torch.no_grad():
        first = model.denoise(z, t, cond, random_latent=torch.randn(2, dim))
        second = model.denoise(z, t, cond, random_latent=torch.randn(2, dim))
    for h in hooks:
        h.remove()
    assert (first - second).abs().max() > 1e-4
    unchanged = [name for name, (a, b) in films.items() if (a - b).abs().max() < 1e-6]
    assert not unchanged and len(films) == len(blocks), f"random latent does not reach {unchanged}"


# ---------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def planned_2d(tmp_path_factory):
    root = tmp_path_factory.mktemp("adversarial2d")
    env = {k: root / k for k in ("raw", "pre", "res")}
    mp = pytest.MonkeyPatch()
    for key, var in (("raw", "LATDIFF_RAW"), ("pre", "LATDIFF_PREPROCESSED"), ("res", "LATDIFF_RESULTS")):
        mp.setenv(var, str(env[key]))
    make_synthetic_dataset(env["raw"], name="Dataset903_Adv2D", num_cases=6, dim=2, seed=5)
    assert plan_main(["-d", "903", "--preset", "tiny", "-np", "1"]) == 0
    yield env
    mp.undo()


CONFIG = TrainerConfig(autoencoder_epochs=1, diffusion_epochs=3, iterations_per_epoch=3, num_workers=0, batch_size=4,
                       checkpoint_every=1, sample_loss_start=0.5, sample_loss_images=2, augment=False,
                       calibrate_noise_scale=False, adversarial_weight=0.05, adversarial_r1_gamma=0.02)


def _trainer(env, folder: str) -> LatentDiffusionTrainer_adversarial:
    pre = env["pre"] / "Dataset903_Adv2D"
    plans = json.loads((pre / "latdiffPlans_tiny.json").read_text())
    splits = json.loads((pre / "splits_final.json").read_text())
    cases = [{"train": splits[0]["train"] + splits[0]["val"], "val": []}]  # no validation: not what is tested here
    return LatentDiffusionTrainer_adversarial(plans, "2d", 0, pre, env["res"] / folder, torch.device("cpu"), CONFIG, cases)


def test_variant_is_found_by_name_and_listed_for_unknown_names():
    assert get_trainer_class("LatentDiffusionTrainer_adversarial") is LatentDiffusionTrainer_adversarial
    with pytest.raises(UserInputError) as info:
        get_trainer_class("LatentDiffusionTrainer_adversarail")
    assert "LatentDiffusionTrainer_adversarial" in str(info.value.fix)


def test_adversarial_training_moves_both_losses_and_uses_the_attention(planned_2d, monkeypatch):
    """A few diffusion steps: the discriminator's and the generator's adversarial losses are finite
    and change, the discriminator's weights move, and the decoded loss is weighted by the attention
    map, of the mask's shape with mean 1."""
    import latdiffunet.training.objectives as objectives_module  # where the trainer's losses are computed

    used_weights = []
    plain_loss = objectives_module.segmentation_loss

    def recording_loss(*args, spatial_weight=None, **kwargs):
        used_weights.append(spatial_weight)
        return plain_loss(*args, spatial_weight=spatial_weight, **kwargs)

    monkeypatch.setattr(objectives_module, "segmentation_loss", recording_loss)
    trainer = _trainer(planned_2d, "moves")
    trainer.output_folder.mkdir(parents=True)
    trainer.config = trainer.config.with_overrides(autoencoder_epochs=0)
    trainer.epoch = 0
    trainer._setup_stage("diffusion")
    initial = {k: v.clone() for k, v in trainer.discriminator.state_dict().items()}
    seen = []
    hook = trainer.extra_diffusion_loss

    def recording(data, *args):
        extra = hook(data, *args)
        seen.append((data.shape, extra.decoded_spatial_weight))
        return extra

    trainer.extra_diffusion_loss = recording
    parts = [trainer.train_step(next(trainer.batch_stream()), "diffusion") for _ in range(4)]
    trainer.shutdown()
    d_losses = [float(p["adv_d_loss"]) for p in parts]
    g_losses = [float(p["adv_g_loss"]) for p in parts]
    assert all(math.isfinite(v) for v in d_losses + g_losses)
    assert max(d_losses) - min(d_losses) > 1e-4 and max(g_losses) - min(g_losses) > 1e-4, (d_losses, g_losses)
    moved = max(float((v - initial[k]).abs().max()) for k, v in trainer.discriminator.state_dict().items())
    assert moved > 1e-5
    assert not any(p.requires_grad for p in trainer.discriminator.parameters())  # frozen outside its own step
    shape, weight = seen[-1]
    assert used_weights[-1] is weight  # the decoded segmentation loss got the attention map
    assert weight.shape == (shape[0], 1, *shape[2:]) and weight.min() > 0
    torch.testing.assert_close(weight.flatten(1).mean(1), torch.ones(shape[0]), rtol=1e-4, atol=1e-4)


class _Killed(Exception):
    pass


def test_checkpoint_holds_the_discriminator_and_resume_continues_exactly(planned_2d):
    """Killed after 2 epochs and resumed == run in one go: the discriminator's weights and Adam
    moments come back from the checkpoint (weights_only), and the plans of the run folder sample
    with the variant's 4 steps."""
    whole = _trainer(planned_2d, "whole")
    whole.run()
    history = json.loads((whole.output_folder / "metrics.json").read_text())
    diffusion = [h for h in history if h["stage"] == "diffusion"]
    assert all(math.isfinite(h["adv_d_loss"]) and math.isfinite(h["adv_g_loss"]) for h in diffusion)
    assert "adversarial (cDAL)" in (whole.output_folder / "training_log.txt").read_text()
    run_plans = json.loads((whole.output_folder.parent / "plans.json").read_text())
    assert run_plans["configurations"]["2d"]["inference"]["sampling_steps"] == 4

    state = torch.load(whole.output_folder / "checkpoint_final.pth", weights_only=True)
    assert {"discriminator", "discriminator_optimizer"} <= set(state)

    killed = _trainer(planned_2d, "resumed")
    save = killed.save

    def save_then_die(name: str) -> None:
        save(name)
        if name == "checkpoint_latest.pth" and killed.epoch >= 2:
            raise _Killed

    killed.save = save_then_die
    with pytest.raises(_Killed):
        killed.run()
    resumed = _trainer(planned_2d, "resumed")
    before = {k: v.clone() for k, v in resumed.discriminator.state_dict().items()}
    resumed.load(resumed.output_folder / "checkpoint_latest.pth")
    saved = load_checkpoint(resumed.output_folder / "checkpoint_latest.pth")
    for k, v in saved["discriminator"].items():
        torch.testing.assert_close(resumed.discriminator.state_dict()[k], v)
    assert any(not torch.equal(before[k], v) for k, v in saved["discriminator"].items())

    resumed = _trainer(planned_2d, "resumed")
    resumed.run(resume=True)
    for k, v in whole.discriminator.state_dict().items():
        torch.testing.assert_close(resumed.discriminator.state_dict()[k], v, rtol=1e-5, atol=1e-7, msg=k)
    moments = [[s["exp_avg"] for s in t.discriminator_optimizer.state_dict()["state"].values()] for t in (whole, resumed)]
    assert moments[0] and len(moments[0]) == len(moments[1])
    torch.testing.assert_close(moments[1], moments[0], rtol=1e-5, atol=1e-7)
    losses = [[h["adv_d_loss"] for h in json.loads((t.output_folder / "metrics.json").read_text()) if "adv_d_loss" in h]
              for t in (whole, resumed)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
