"""cDAL's adversarial few-step training (Hejrati et al., MICCAI 2024), as a trainer variant.

The denoiser is the generator of DDGAN (Xiao et al. 2022), which cDAL builds on. At each diffusion
step of training, for the step's noisy latent x_t and timestep t:

* **fake**: x_s ~ q(x_s | x_t, x0_hat), the posterior with the denoiser's x0 estimate (drawn with
  its random latent) and fresh noise: the reverse step a few-step sampler takes;
* **real**: x_s ~ q(x_s | x_t, x0), the same with the true latent;
* a discriminator conditioned on t and on the image (``networks/discriminator.py``) tells them
  apart (non-saturating GAN loss, optional R1 penalty on the real samples), and the generator gets
  its non-saturating loss with weight ``adversarial_weight`` on top of the usual latent, decoded
  and sample losses;
* the discriminator's attention map (from its features on the fake sample) weights the decoded
  segmentation loss per voxel, so the segmentation is supervised hardest where the discriminator
  sees the generated mask give itself away.

The jump is s = t - T / K, with K the variant's sampling steps (4): with trailing spacing those
are the transitions a K-step sampler makes (999 -> 749 -> 499 -> 249 -> x0; exactly when K divides
T, else within one timestep); s = -1 means
x0 itself, the last step, where the pair is (x0_hat, x_t) against (x0, x_t). Because the posterior
is a fixed kernel around x0, matching the step distributions means the *distribution* of x0_hat
given x_t must match q(x0 | x_t): the latent loss alone (a squared error) makes x0_hat the
posterior mean, and a multimodal posterior at few steps then gives a blurred mean. The random
latent, added to the time embedding that reaches every residual block of the denoiser, is what
lets the generator draw from that posterior instead: the adversarial loss is its reason to be
used. The same argument holds for the deterministic DDIM sampler inference runs (eta = 0), whose
step is an affine map of x0_hat given x_t.

The discriminator and its optimiser live next to the model (not in it: prediction never needs
them); its own step runs in float32 (a tiny network: no loss scaling to get right for the R1
gradient), while the generator's adversarial term runs under the trainer's autocast; both go into
every checkpoint, so ``--c`` resumes the GAN exactly. Only the trainer knows networks; the maths
(``NoiseSchedule.posterior_sample``) stays in ``diffusion/``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from latdiffunet.diffusion import x0_for_loss
from latdiffunet.networks.discriminator import DiscriminatorConfig, LatentPairDiscriminator, attention_weights
from latdiffunet.training.losses import ExtraLoss
from latdiffunet.training.trainer import LatentDiffusionTrainer

SAMPLING_STEPS = 4  # cDAL samples with 2-4 steps; see LatentDiffusionTrainer_adversarial
RANDOM_LATENT_DIM = 8  # used when the plans have none (the tiny and cpu presets' value)
DISCRIMINATOR_BETAS = (0.5, 0.9)  # Adam's betas for GAN discriminators (DDGAN); the default 0.999 lags a moving target


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``E softplus(-D(fake))`` = -log sigmoid(D(fake)), over images and regions."""
    return F.softplus(-fake_logits.float()).mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``E softplus(-D(real)) + E softplus(D(fake))``: binary cross-entropy, real = 1, fake = 0."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def r1_penalty(real_logits: torch.Tensor, real_input: torch.Tensor) -> torch.Tensor:
    """``E ||grad_x D(x)||^2`` at real samples (Mescheder et al. 2018), D(x) the mean over the
    logit map; ``real_input`` must require grad. Keeps the discriminator smooth where the data is."""
    (grad,) = torch.autograd.grad(real_logits.flatten(1).mean(1).sum(), real_input, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def previous_timesteps(t: torch.Tensor, jump: int) -> torch.Tensor:
    """``s = t - jump``, with -1 (x0 itself) for the steps that land at or below 0."""
    return (t - jump).clamp_min(-1)


@dataclass
class AdversarialBatch:
    """What the discriminator's step needs from the generator's forward, detached."""

    image: torch.Tensor
    t: torch.Tensor
    x_t: torch.Tensor
    real: torch.Tensor
    fake: torch.Tensor


def adversarial_plans(plans: dict, configuration_name: str, steps: int = SAMPLING_STEPS) -> dict:
    """A copy of ``plans`` whose configuration samples with ``steps`` steps and has a random latent.

    It is what the run folder's ``plans.json`` then says, so ``latdiff_predict`` uses the variant's
    steps by default (``--steps`` still chooses others)."""
    plans = copy.deepcopy(plans)
    configuration = plans["configurations"][configuration_name]
    configuration["inference"]["sampling_steps"] = steps
    configuration["diffusion"]["sampling_steps"] = steps
    denoiser = configuration["network"].setdefault("denoiser", {})
    if int(denoiser.get("random_latent_dim", 0)) <= 0:
        denoiser["random_latent_dim"] = RANDOM_LATENT_DIM
    return plans


class LatentDiffusionTrainer_adversarial(LatentDiffusionTrainer):
    """cDAL: a time-step- and image-conditioned discriminator at every step, its attention map on
    the decoded loss, and the random latent in every residual block (module docstring).

    Samples with 4 steps (``adversarial_plans``), whatever the plans say: cDAL samples with 2 to 4,
    and 4 is the step count whose transitions the discriminator is trained on (the jump is
    T / 4), so the default sampler takes exactly the steps the generator learnt to make realistic;
    the tiny and cpu presets already sample with 4, so there the comparison with the default
    trainer changes only the training. Fewer steps (``latdiff_predict --steps 1|2``) remain valid:
    the loss trains the distribution of x0_hat, which every step count uses. eta stays the plans'
    (0), so a comparison measures the adversarial training, not a change of sampler.

    Its options (``adversarial_weight``, ``adversarial_learning_rate``, ``adversarial_r1_gamma``,
    ``discriminator_channels``) are ``TrainerConfig``'s (``config.py``), so the plans' ``"training"`` sets them.
    """

    def __init__(self, plans: dict, configuration_name: str, *args, **kwargs):
        super().__init__(adversarial_plans(plans, configuration_name), configuration_name, *args, **kwargs)
        if self.config.adversarial_weight < 0 or self.config.adversarial_r1_gamma < 0:
            raise ValueError("adversarial_weight and adversarial_r1_gamma must be >= 0, got "
                             f"{self.config.adversarial_weight} and {self.config.adversarial_r1_gamma}")
        network = self.model.config
        self.discriminator = LatentPairDiscriminator(DiscriminatorConfig(
            dim=int(network["dim"]), latent_channels=int(network["latent_channels"]),
            image_in_channels=int(network["in_channels"]), image_strides=network["strides"],
            base_channels=self.config.discriminator_channels,
        )).to(self.device).requires_grad_(False)  # trainable only inside its own step
        self.discriminator_optimizer = torch.optim.Adam(
            self.discriminator.parameters(), lr=self._discriminator_base_lr(), betas=DISCRIMINATOR_BETAS,
        )
        self.jump = max(self.schedule.num_timesteps // int(self.configuration["inference"]["sampling_steps"]), 1)
        self._pending: AdversarialBatch | None = None

    def _discriminator_base_lr(self) -> float:
        lr = self.config.adversarial_learning_rate
        return self.config.learning_rate if lr is None else lr

    def run(self, resume: bool = False) -> dict:
        self.output_folder.mkdir(parents=True, exist_ok=True)
        self.dist.broadcast_module_(self.discriminator)
        n = sum(p.numel() for p in self.discriminator.parameters())
        self.logger.log(
            f"adversarial (cDAL): discriminator of {n} parameters, jump {self.jump} of {self.schedule.num_timesteps} steps "
            f"({self.configuration['inference']['sampling_steps']}-step sampling), weight {self.config.adversarial_weight}, "
            f"R1 {self.config.adversarial_r1_gamma}, random latent of {self.model.config['denoiser']['random_latent_dim']}"
        )
        return super().run(resume)

    # ------------------------------------------------------------------ generator side
    def extra_diffusion_loss(self, data, z0, z_t, t_host, output) -> ExtraLoss:
        """Fake and real reverse steps from this diffusion step; the generator's loss and the
        attention weights; the pair is kept (detached) for the discriminator's step."""
        alpha, sigma = (v.to(self.device, non_blocking=True) for v in self.schedule.alpha_sigma(t_host, ndim=z0.ndim))
        x0_hat = x0_for_loss(self.parameterization, output, z_t, alpha, sigma, clip_x0=self.clip_x0)
        s_host = previous_timesteps(t_host, self.jump)
        z0, z_t = z0.float(), z_t.float()
        real = self.schedule.posterior_sample(z0, z_t, t_host, s_host, torch.randn_like(z0))
        fake = self.schedule.posterior_sample(x0_hat.float(), z_t, t_host, s_host, torch.randn_like(z0))
        t = t_host.to(self.device, non_blocking=True)
        fake_logits, features = self.discriminator(fake, z_t, t, data)
        g_loss = generator_loss(fake_logits)
        self._pending = AdversarialBatch(data.detach(), t, z_t.detach(), real.detach(), fake.detach())
        return ExtraLoss(self.config.adversarial_weight * g_loss, {"adv_g_loss": g_loss.detach()},
                         attention_weights(features, data.shape[2:]))

    # ------------------------------------------------------------------ discriminator side
    def auxiliary_step(self, stage: str) -> dict[str, torch.Tensor]:
        """One discriminator step on the pair of the generator's step (simultaneous updates: both
        used the other's weights of before this step). Its learning rate follows the model's decay."""
        batch, self._pending = self._pending, None
        if stage != "diffusion" or batch is None:
            return {}
        lr = self._discriminator_base_lr() * self.optimizer.param_groups[0]["lr"] / self._base_lr("diffusion")
        for group in self.discriminator_optimizer.param_groups:
            group["lr"] = lr
        d = self.discriminator.requires_grad_(True)
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        gamma = self.config.adversarial_r1_gamma
        real = batch.real.requires_grad_(gamma > 0)
        real_logits, _ = d(real, batch.x_t, batch.t, batch.image)
        fake_logits, _ = d(batch.fake, batch.x_t, batch.t, batch.image)
        d_loss = discriminator_loss(real_logits, fake_logits)
        parts = {"adv_d_loss": d_loss.detach(), "adv_d_real": torch.sigmoid(real_logits.detach()).mean(),
                 "adv_d_fake": torch.sigmoid(fake_logits.detach()).mean()}
        loss = d_loss
        if gamma > 0:
            penalty = r1_penalty(real_logits, real)
            loss = loss + 0.5 * gamma * penalty
            parts["adv_r1"] = penalty.detach()
        loss.backward()
        params = list(d.parameters())
        self.dist.average_gradients(params)
        self.discriminator_optimizer.step()
        d.requires_grad_(False)
        return parts

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict:
        return super().checkpoint_state() | {
            "discriminator": self.discriminator.state_dict(),
            "discriminator_optimizer": self.discriminator_optimizer.state_dict(),
        }

    def load_extra_state(self, state: dict) -> None:
        if "discriminator" not in state:
            self.logger.log("the checkpoint has no discriminator (another trainer wrote it): the discriminator starts afresh")
            return
        self.discriminator.load_state_dict(state["discriminator"])
        self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])

