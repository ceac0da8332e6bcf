"""What the trainer minimises: the losses of both stages, as a mixin of :class:`LatentDiffusionTrainer`.

Stage 1 reconstructs masks (class-weighted CE + Dice + a tiny KL), with the image encoder's
segmentation head trained beside it. Stage 2 trains the denoiser in the frozen autoencoder's
latent space: the plans' latent loss at every noise level, CE + Dice of the decoded x0-estimate,
the head's CE + Dice, and the energy score of masks drawn by the inference sampler itself (so a
single sample is trained to be a plausible mask, and on multi-rater data the spread to match the
raters'). Kept apart from the run's bookkeeping (epochs, budget, checkpoints) in ``trainer.py``.

The mixin reads the trainer's ``model``, ``config``, ``configuration``, ``schedule``,
``parameterization``, ``clip_x0``, ``class_weights``, ``ignore_label``, ``dist``, ``device``,
``epoch`` and ``_step_in_epoch``, and calls its ``extra_diffusion_loss`` hook (variants).
"""

from __future__ import annotations

import math

import torch

from latdiffunet.diffusion import ddim_sample, training_target, x0_for_loss
from latdiffunet.networks import kl_divergence
from latdiffunet.training.losses import (
    energy_score_loss, latent_valid_fraction, one_hot, segmentation_loss, valid_mask, weighted_mean,
)


class TrainingObjectives:
    def autoencoder_loss(self, data: torch.Tensor, seg: torch.Tensor) -> tuple[torch.Tensor, dict]:
        out = self.model.autoencoder(one_hot(seg, self.model.config["num_classes"], self.ignore_label))
        loss, parts = segmentation_loss(out["logits"], seg, self.class_weights, self.config.dice_weight, self.ignore_label,
                                        batch_sum=self.dist.batch_sum)
        kl = kl_divergence(out["mu"], out["logvar"])  # a mean over equal shares: no batch sum needed
        loss, parts = loss + self.config.kl_weight * kl, parts | {"kl": kl.detach()}
        if self.model.segmentation_head is not None and self.config.image_pretraining:
            loss, parts = self._add_image_segmentation_loss(loss, parts, self.model.image_encoder(data), seg)
        return loss, parts

    def _add_image_segmentation_loss(
        self, loss: torch.Tensor, parts: dict, features: list[torch.Tensor], seg: torch.Tensor,
        head_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """``loss`` plus the weighted CE + Dice of the image encoder's segmentation head
        (unweighted classes, as the decoded loss): the image pathway's direct gradient.
        ``head_logits``: the head's output when the conditioning already computed it."""
        if head_logits is None:
            head_logits = self.model.segment_image(features)
        head_loss, _ = segmentation_loss(head_logits, seg, None, self.config.dice_weight,
                                         self.ignore_label, batch_sum=self.dist.batch_sum)
        return loss + self.config.image_segmentation_weight * head_loss, parts | {"image_seg_loss": head_loss.detach()}

    def diffusion_loss(self, data: torch.Tensor, seg: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Latent loss + decoded CE/Dice at low noise + energy score of sampled masks.

        The latent loss (the plans' parameterisation) trains the denoiser at every noise level.
        The decoded supervision applies only to images whose noise level leaves the mask readable
        (``decoded_loss_min_signal``; the others get weight 0, so every rank runs the same
        computation whatever its noise levels); its x0-estimate comes from :func:`x0_for_loss`, clipped and
        with a gradient no larger than x0-prediction's, since eps-prediction's x0 = (z_t - sigma
        eps) / alpha would otherwise feed the loss 20,000x the network's error at t = T - 1 and
        the ``_epspred`` comparison would measure that. The sample loss runs the inference sampler
        itself on a few images of the batch, M samples each, and scores them with the energy score
        (:func:`energy_score_loss`), so a single sample, not only the mean of many, is trained
        to be a plausible mask, and on multi-rater data the spread is trained to match the raters'.
        """
        num_classes = self.model.config["num_classes"]
        target_onehot, valid = one_hot(seg, num_classes, self.ignore_label), valid_mask(seg, self.ignore_label)
        with torch.no_grad():
            z0 = self.model.encode_mask(target_onehot)
        t_host, noise, random_latent = self.draw_diffusion_noise(z0)
        alpha_host, sigma_host = self.schedule.alpha_sigma(t_host, ndim=z0.ndim)
        t, alpha, sigma = (v.to(self.device, non_blocking=True) for v in (t_host, alpha_host, sigma_host))
        z_t = alpha * z0 + sigma * noise
        features = self.model.image_encoder(data)
        cond, detail, head_logits = self.model.image_conditioning(features)
        output = self.model.denoise(z_t, t, cond, random_latent=random_latent).float()
        target = training_target(self.parameterization, z0, noise, alpha, sigma)
        latent_weight = None if valid is None else latent_valid_fraction(valid, z0.shape)
        latent_loss = weighted_mean((output - target) ** 2, latent_weight, batch_sum=self.dist.batch_sum)
        loss = self.config.latent_loss_weight * latent_loss
        parts = {"latent_loss": latent_loss.detach()}
        if self.model.segmentation_head is not None:
            loss, parts = self._add_image_segmentation_loss(loss, parts, features, seg, head_logits)
        extra = self.extra_diffusion_loss(data, z0, z_t, t_host, output)  # a variant's terms (adversarial.py), or None
        if extra is not None:
            loss, parts = loss + extra.loss, parts | extra.parts

        if self.config.decoded_supervision_weight > 0:
            readable = None  # every noise level (the default)
            if self.config.decoded_loss_min_signal > 0:
                readable = (alpha_host.flatten() ** 2 >= self.config.decoded_loss_min_signal).to(self.device, non_blocking=True)
            x0_hat = x0_for_loss(self.parameterization, output, z_t, alpha, sigma, clip_x0=self.clip_x0)
            weights = self.class_weights if self.config.decoded_class_weights else None
            decoded_loss, seg_parts = segmentation_loss(
                self.model.decode_latent(x0_hat, detail), seg, weights, self.config.dice_weight, self.ignore_label,
                image_weight=readable, batch_sum=self.dist.batch_sum,
                spatial_weight=None if extra is None else extra.decoded_spatial_weight,
            )
            loss = loss + self.config.decoded_supervision_weight * decoded_loss
            parts |= seg_parts | {"decoded_loss": decoded_loss.detach()}

        every = max(1, int(self.config.sample_loss_every))
        if self.config.sample_loss_weight > 0 and self._sample_loss_active() and self._step_in_epoch % every == 0:
            sample_loss, sample_parts = self.sample_loss(cond, target_onehot, valid, detail)
            loss = loss + self.config.sample_loss_weight * every * sample_loss
            parts |= sample_parts | {"sample_loss": sample_loss.detach()}
        return loss, parts

    def draw_diffusion_noise(self, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Every random draw of a diffusion step, one per image: the timestep, on the host (its
        noise level is looked up there, so t is never read back from the device), the noise and
        the denoiser's random latent (None when it has none), on the device."""
        t = torch.randint(0, self.schedule.num_timesteps, (z0.shape[0],))
        random_dim = self.model.config["denoiser"]["random_latent_dim"]
        random_latent = torch.randn((z0.shape[0], random_dim), device=z0.device) if random_dim > 0 else None
        return t, torch.randn_like(z0), random_latent

    def _sample_loss_active(self) -> bool:
        """After ``sample_loss_start`` of the diffusion stage: the sampler's samples must be worth
        scoring first. A Hippocampus run with the loss from the start (and the decoded loss at low
        noise only) was at 0.10 periodic validation Dice after 5 diffusion epochs (0.70 with the
        defaults), its two samples as far from each other (0.64) as from the label (0.68)."""
        into_stage = self.epoch - self.config.autoencoder_epochs
        return into_stage >= self.config.sample_loss_start * self.config.diffusion_epochs

    def sample_loss(
        self, cond: torch.Tensor, target_onehot: torch.Tensor, valid: torch.Tensor | None = None,
        detail: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Energy score of M sampled masks per image for the first ``sample_loss_images`` images.

        Every sample keeps one random latent for all its steps and starts from its own x_T, as at
        inference; gradients flow through the last ``sample_loss_grad_steps`` steps of the chain.
        ``sample_loss_images`` counts images of the global batch: each of N ranks scores
        ceil(that / N) of its own.
        """
        n = min(math.ceil(self.config.sample_loss_images / self.dist.world_size), cond.shape[0])
        m = self.config.sample_loss_samples
        steps = self.config.sample_loss_steps or self.configuration["inference"]["sampling_steps"]
        cond_m = cond[:n].repeat_interleave(m, 0)
        latent_shape = (n * m, self.model.config["latent_channels"]) + tuple(cond.shape[2:])
        random_dim = self.model.config["denoiser"]["random_latent_dim"]
        random_latent = torch.randn((n * m, random_dim), device=self.device) if random_dim > 0 else None

        def denoise(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.model.denoise(z, t, cond_m, random_latent=random_latent).float()

        z0 = ddim_sample(
            denoise, self.schedule, latent_shape, steps, self.parameterization,
            eta=float(self.configuration["diffusion"].get("eta", 0.0)), device=self.device, clip_x0=self.clip_x0,
            differentiable=True,
            grad_steps=None if self.config.sample_loss_whole_chain else self.config.sample_loss_grad_steps,
        )
        detail_m = None if detail is None else detail[:n].repeat_interleave(m, 0)
        probs = self.model.decode_latent(z0, detail_m).float().softmax(1)
        return energy_score_loss(probs.view(n, m, *probs.shape[1:]), target_onehot[:n], None if valid is None else valid[:n])
