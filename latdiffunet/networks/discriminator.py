"""Time-step- and image-conditioned discriminator over pairs of latents (cDAL / DDGAN).

It tells a real reverse step ``(x_s, x_t)`` (x_s drawn from q(x_s | x_t, x0) with the true latent)
from a generated one (the same with the denoiser's x0 estimate) at noise level ``t``, given the
image. What x_s and t mean is the trainer's business (``training/adversarial.py``); this module,
like every network here, knows no diffusion maths.

Kept small on purpose: it runs three times per training step (once for the generator's loss, twice
for its own) and must fit a 2-core CPU budget. So it works on the latent grid, not on decoded
masks, and sees the image through its own strided stem (one convolution per stage of the
autoencoder's strides, a few channels): independent of the denoiser's image encoder, so training
the discriminator never moves the generator's features, and cheaper than decoding. No
normalisation layers (DDGAN's discriminator has none: a batch statistic would let it compare the
real and fake halves of a batch instead of judging each sample), LeakyReLU, the time embedding
added as a per-channel bias in every block.

It returns a logit *map* (PatchGAN-style: one verdict per region of the latent grid, averaged by
the loss) and a spatial attention map from its last features, which the trainer uses to weight
the segmentation loss where the discriminator looks (cDAL's attention). The map is the sigmoid of
the channel mean of those features, upsampled to the mask's size and normalised to mean 1 per
image, then mixed with a uniform floor (:data:`ATTENTION_FLOOR`): it reweights the loss without
changing its scale, and no region loses its supervision entirely.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import conv_nd, timestep_embedding
from .shapes import normalise_strides

__all__ = ["ATTENTION_FLOOR", "DiscriminatorConfig", "LatentPairDiscriminator", "attention_weights"]

# Share of the loss weight every voxel keeps whatever the discriminator attends to: weight =
# floor + (1 - floor) * a / mean(a). Without it a sharp map (sigmoid near 0 over most of the patch)
# would leave most voxels almost unsupervised, and the mean-1 normalisation would put up to N times
# the weight on a few.
ATTENTION_FLOOR = 0.5
_SLOPE = 0.2  # LeakyReLU slope of GAN discriminators (DCGAN, StyleGAN, DDGAN)


@dataclass
class DiscriminatorConfig:
    """Architecture of :class:`LatentPairDiscriminator`.

    ``image_strides``: the strides from the image to the latent grid (the autoencoder's); the image
    stem applies one convolution per entry. ``base_channels``: width at the latent grid; the one
    downsampling block doubles it. ``image_channels``: width of the first stem convolution (doubling
    per stage, capped at ``base_channels``).
    """

    dim: int
    latent_channels: int
    image_in_channels: int
    image_strides: list[list[int]] = field(default_factory=list)
    base_channels: int = 32
    image_channels: int = 8

    def __post_init__(self) -> None:
        self.image_strides = [list(s) for s in normalise_strides(self.image_strides, self.dim)]
        if min(self.latent_channels, self.image_in_channels, self.base_channels, self.image_channels) < 1:
            raise ValueError("discriminator channel counts must be >= 1")


class LatentPairDiscriminator(nn.Module):
    """``(x_s [B,Cz,*L], x_t [B,Cz,*L], t [B], image [B,Cin,*S]) -> (logits [B,1,*L'], features [B,C,*L'])``."""

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        self.config = config
        cfg, c = config, config.base_channels
        conv = conv_nd(cfg.dim)
        stem, cin = [], cfg.image_in_channels
        for i, stride in enumerate(cfg.image_strides):
            cout = min(cfg.image_channels * 2**i, c)
            stem += [conv(cin, cout, 3, stride=tuple(stride), padding=1), nn.LeakyReLU(_SLOPE)]
            cin = cout
        self.image_stem = nn.Sequential(*stem)
        self.latent_in = conv(2 * cfg.latent_channels, c, 3, padding=1)
        self.fuse = conv(c + cin, c, 3, padding=1)
        self.down = conv(c, 2 * c, 3, padding=1)  # its weights; the stride is chosen per latent size in forward
        self.refine = conv(2 * c, 2 * c, 3, padding=1)
        self.head = conv(2 * c, 1, 3, padding=1)
        self.time_mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.LeakyReLU(_SLOPE), nn.Linear(2 * c, 2 * c))
        self.time_to_fuse = nn.Linear(2 * c, c)
        self.time_to_down = nn.Linear(2 * c, 2 * c)
        self.time_to_refine = nn.Linear(2 * c, 2 * c)

    @staticmethod
    def _down_stride(spatial: Sequence[int]) -> tuple[int, ...]:
        """2 on axes of at least 8 latent voxels, 1 on smaller ones (a 3-voxel axis has no regions left to judge)."""
        return tuple(2 if s >= 8 else 1 for s in spatial)

    def forward(
        self, x_s: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        if x_s.shape != x_t.shape or x_s.dim() != cfg.dim + 2 or x_s.shape[1] != cfg.latent_channels:
            raise ValueError(f"expected x_s and x_t [B, {cfg.latent_channels}, *L] of equal shape, "
                             f"got {list(x_s.shape)} and {list(x_t.shape)}")
        img = self.image_stem(image.to(x_s.dtype))
        if img.shape[2:] != x_s.shape[2:]:
            raise ValueError(f"the image stem gives {list(img.shape[2:])}, the latents are {list(x_s.shape[2:])}: "
                             "image_strides must be the autoencoder's strides")
        view = (x_s.shape[0], -1) + (1,) * cfg.dim
        emb = self.time_mlp(timestep_embedding(t, cfg.base_channels).to(x_s.dtype))
        act = lambda h: F.leaky_relu(h, _SLOPE)  # noqa: E731
        h = act(self.latent_in(torch.cat([x_s, x_t], 1)))
        h = act(self.fuse(torch.cat([h, img], 1)) + self.time_to_fuse(emb).view(view))
        conv = F.conv2d if cfg.dim == 2 else F.conv3d
        h = conv(h, self.down.weight, self.down.bias, self._down_stride(h.shape[2:]), 1)
        h = act(h + self.time_to_down(emb).view(view))
        features = act(self.refine(h) + self.time_to_refine(emb).view(view))
        return self.head(features), features


def attention_weights(features: torch.Tensor, size: Sequence[int], floor: float = ATTENTION_FLOOR) -> torch.Tensor:
    """``(B, 1, *size)`` loss weights from discriminator features ``(B, C, *L')``: positive, mean 1 per image.

    ``sigmoid(mean over channels)``, upsampled (linear) to ``size``, divided by its mean, mixed with
    ``floor`` (see :data:`ATTENTION_FLOOR`). Detached: the weights steer the loss, they are not trained.
    """
    if not 0 <= floor <= 1:
        raise ValueError(f"floor must lie in [0, 1], got {floor}")
    a = torch.sigmoid(features.detach().float().mean(1, keepdim=True))
    mode = "bilinear" if features.dim() == 4 else "trilinear"
    a = F.interpolate(a, size=tuple(int(s) for s in size), mode=mode, align_corners=False)
    a = a / a.flatten(1).mean(1).clamp_min(1e-8).view(-1, *([1] * (a.dim() - 1)))
    return floor + (1 - floor) * a
