"""The full latent-diffusion segmenter and its builder from a plain (JSON-able) dict.

Config-dict schema accepted by :func:`build_model` (this is what the plans store)::

    {
      "dim": 2 | 3,                       # required
      "in_channels": int,                 # required, image modalities
      "num_classes": int,                 # required, incl. background
      "latent_channels": int,             # default 4
      "strides": [[int]*dim, ...],        # default []; per-stage per-axis strides shared by
                                          # autoencoder and image encoder (latent = S / prod)
      "autoencoder": {                    # all optional
        "base_channels": 32, "channel_multipliers": null, "max_channels": 256,
        "blocks_per_stage": 1, "variational": true, "dropout": 0.0
      },
      "image_encoder": {                  # all optional
        "base_channels": 32, "channel_multipliers": null, "max_channels": 256,
        "blocks_per_stage": 1, "out_channels": null, "dropout": 0.0
      },
      "denoiser": {                       # all optional
        "base_channels": 64, "channel_multipliers": null, "strides": [],
        "attention_at_bottleneck": true, "attention_heads": 4,
        "time_embedding_dim": null, "random_latent_dim": 0,
        "blocks_per_level": 1, "dropout": 0.0
      },
      "refinement": {                     # all optional; off unless the plans switch it on
        "enabled": false, "channels": 16, "blocks": 2
      },
      "segmentation_head": {              # deep supervision of the image encoder
        "enabled": false,
        "condition_denoiser": false       # its mask, encoded to a latent, also conditions the denoiser
      }
    }

``channel_multipliers: null`` means doubling per level (autoencoder, image encoder) or
``(1, 2, 2, ...)`` (denoiser). ``time_embedding_dim: null`` means ``4 * base_channels``. The
denoiser's ``cond_channels`` is not a key: it is derived from the image encoder so the two can
never disagree. Unknown keys are rejected (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .denoiser import LatentDenoiser, LatentDenoiserConfig
from .image_encoder import ImageEncoder, ImageEncoderConfig
from .mask_autoencoder import MaskAutoencoder, MaskAutoencoderConfig
from .refinement import RefinementHead, RefinementHeadConfig
from .segmentation_head import ImageSegmentationHead, ImageSegmentationHeadConfig

__all__ = ["LatentDiffusionSegmenter", "build_model", "resolve_model_config", "MODEL_DEFAULTS"]

MODEL_DEFAULTS: dict[str, Any] = {
    "latent_channels": 4,
    "strides": [],
    "autoencoder": {
        "base_channels": 32,
        "channel_multipliers": None,
        "max_channels": 256,
        "blocks_per_stage": 1,
        "variational": True,
        "dropout": 0.0,
    },
    "image_encoder": {
        "base_channels": 32,
        "channel_multipliers": None,
        "max_channels": 256,
        "blocks_per_stage": 1,
        "out_channels": None,
        "dropout": 0.0,
    },
    "denoiser": {
        "base_channels": 64,
        "channel_multipliers": None,
        "strides": [],
        "attention_at_bottleneck": True,
        "attention_heads": 4,
        "time_embedding_dim": None,
        "random_latent_dim": 0,
        "blocks_per_level": 1,
        "dropout": 0.0,
    },
    # Off by default so that a checkpoint whose stored config predates the head rebuilds as it was.
    "refinement": {"enabled": False, "channels": 16, "blocks": 2},
    # Off by default for the same reason (networks/segmentation_head.py: a training loss, and optionally the
    # denoiser's prior).
    "segmentation_head": {"enabled": False, "condition_denoiser": False},
}
_REQUIRED = ("dim", "in_channels", "num_classes")
_SECTIONS = ("autoencoder", "image_encoder", "denoiser", "refinement", "segmentation_head")


def resolve_model_config(config: dict[str, Any]) -> dict[str, Any]:
    """Return a full copy of ``config`` with every default filled in; validate keys.

    Storing the resolved dict (not the minimal one) in checkpoints makes a model rebuildable
    even if defaults change later.
    """
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise ValueError(f"model config is missing required key(s) {missing}")
    allowed_top = set(_REQUIRED) | set(MODEL_DEFAULTS)
    unknown = sorted(set(config) - allowed_top)
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown}; allowed: {sorted(allowed_top)}")
    out = copy.deepcopy(MODEL_DEFAULTS)
    for key, value in config.items():
        if key in _SECTIONS:
            value = value or {}
            bad = sorted(set(value) - set(MODEL_DEFAULTS[key]))
            if bad:
                raise ValueError(
                    f"unknown key(s) {bad} in model config section '{key}'; "
                    f"allowed: {sorted(MODEL_DEFAULTS[key])}"
                )
            out[key].update(copy.deepcopy(value))
        else:
            out[key] = copy.deepcopy(value)
    return out


def _tuple_or_none(value: Any) -> tuple[int, ...] | None:
    return None if value is None else tuple(int(v) for v in value)


class LatentDiffusionSegmenter(nn.Module):
    """Mask autoencoder + image encoder + latent denoiser (+ optional refinement head), plus the
    latent scale.

    With a refinement head (:mod:`.refinement`), decoded masks are refined with the image
    encoder's full-resolution features: callers get them from :meth:`condition_and_detail` and
    pass them to :meth:`decode_latent` as ``detail``. Without ``detail`` the plain decoder's
    logits come back (the autoencoder's own reconstruction, the planner's memory trace).

    ``latent_scale`` is a buffer (saved in the state dict, moved with ``.to()``, not trained):
    the trainer sets it to ``1 / std`` of the encoded training latents so the diffusion process
    sees unit-variance data, which the standard noise schedules assume.
    """

    latent_scale: torch.Tensor

    def __init__(
        self,
        autoencoder: MaskAutoencoder,
        image_encoder: ImageEncoder,
        denoiser: LatentDenoiser,
        config: dict[str, Any] | None = None,
        refinement: RefinementHead | None = None,
        segmentation_head: ImageSegmentationHead | None = None,
    ):
        super().__init__()
        self.autoencoder = autoencoder
        self.image_encoder = image_encoder
        self.denoiser = denoiser
        self.refinement = refinement
        self.segmentation_head = segmentation_head
        self.config = config  # resolved build_model dict, if built from one
        self.register_buffer("latent_scale", torch.tensor(1.0))

    def encode_mask(self, onehot: torch.Tensor) -> torch.Tensor:
        """One-hot mask -> scaled latent (the deterministic mean ``mu``, times latent_scale)."""
        mu, _ = self.autoencoder.encode(onehot)
        return mu * self.latent_scale.to(mu.dtype)

    def decode_latent(self, z_scaled: torch.Tensor, detail: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled latent -> class logits (undoes latent_scale before decoding), refined with the
        image ``detail`` of the same images when the model has a refinement head."""
        logits = self.autoencoder.decode(z_scaled / self.latent_scale.to(z_scaled.dtype))
        if self.refinement is not None and detail is not None:
            logits = self.refinement(logits, detail)
        return logits

    def condition(self, image: torch.Tensor) -> torch.Tensor:
        """Image -> conditioning feature at latent resolution (the encoder's last scale)."""
        return self.image_encoder(image)[-1]

    def condition_and_detail(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image -> (conditioning feature at latent resolution, full-resolution feature for the
        refinement head, or None without one). One pass of the image encoder for both."""
        return self.split_image_features(self.image_encoder(image))

    def split_image_features(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image encoder's pyramid -> (conditioning, refinement detail or None)."""
        cond, detail, _ = self.image_conditioning(features)
        return cond, detail

    def image_conditioning(
        self, features: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The image encoder's pyramid -> (conditioning, refinement detail or None, the
        segmentation head's logits when they were needed for the conditioning, else None).

        With ``segmentation_head.condition_denoiser`` the conditioning is the encoder's latent-
        resolution map *and* the head's mask encoded by the mask autoencoder (see
        :meth:`head_prior`); the logits come back so that training scores them without running
        the head twice.
        """
        detail = features[0] if self.refinement is not None else None
        if not self.conditions_on_head:
            return features[-1], detail, None
        logits = self.segment_image(features)
        return torch.cat([features[-1], self.head_prior(logits)], dim=1), detail, logits

    @property
    def conditions_on_head(self) -> bool:
        return self.segmentation_head is not None and bool(
            (self.config or {}).get("segmentation_head", {}).get("condition_denoiser", False)
        )

    def head_prior(self, head_logits: torch.Tensor) -> torch.Tensor:
        """The head's class probabilities, encoded to a (scaled) latent by the mask autoencoder.

        Why: the denoiser sees the image only at latent resolution (4x coarser or more), so where
        a boundary falls between two latent voxels it must guess; the head decides it at full
        resolution from the encoder's skip features, as nnU-Net does. Encoded by the autoencoder,
        that decision arrives in the denoiser's own language (a latent of a mask), which the
        autoencoder can represent to sub-voxel precision. Without gradient: the head stays a plain
        segmentation trained by its own loss, never bent into a message for the denoiser; the
        diffusion still draws every sample (on multi-rater data the prior is the raters' mean
        and the samples must spread around it).
        """
        with torch.no_grad():  # a constant for the denoiser: no graph, no activations kept for backward
            return self.encode_mask(head_logits.float().softmax(1).to(head_logits.dtype))

    def segment_image(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The image encoder's pyramid -> the segmentation head's logits (a training loss, and the
        denoiser's prior when ``condition_denoiser``; never a mask shown to the user)."""
        if self.segmentation_head is None:
            raise RuntimeError("this model has no segmentation head (plans: network.segmentation_head.enabled)")
        return self.segmentation_head(features)

    def denoise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        random_latent: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Denoiser output for scaled noisy latents ``x_t`` at timesteps ``t``."""
        return self.denoiser(x_t, t, cond, random_latent=random_latent, generator=generator)


def build_model(config: dict[str, Any]) -> LatentDiffusionSegmenter:
    """Build a :class:`LatentDiffusionSegmenter` from the dict schema in the module docstring."""
    cfg = resolve_model_config(config)
    dim, strides = int(cfg["dim"]), [list(s) for s in cfg["strides"]]
    head_conditions_denoiser = bool(cfg["segmentation_head"]["condition_denoiser"])
    if head_conditions_denoiser and not cfg["segmentation_head"]["enabled"]:
        raise ValueError("segmentation_head.condition_denoiser needs segmentation_head.enabled: true")
    ae, ie, dn = cfg["autoencoder"], cfg["image_encoder"], cfg["denoiser"]

    autoencoder = MaskAutoencoder(
        MaskAutoencoderConfig(
            dim=dim,
            num_classes=int(cfg["num_classes"]),
            latent_channels=int(cfg["latent_channels"]),
            strides=strides,
            base_channels=int(ae["base_channels"]),
            channel_multipliers=_tuple_or_none(ae["channel_multipliers"]),
            max_channels=int(ae["max_channels"]),
            blocks_per_stage=int(ae["blocks_per_stage"]),
            variational=bool(ae["variational"]),
            dropout=float(ae["dropout"]),
        )
    )
    image_encoder = ImageEncoder(
        ImageEncoderConfig(
            dim=dim,
            in_channels=int(cfg["in_channels"]),
            strides=strides,
            base_channels=int(ie["base_channels"]),
            channel_multipliers=_tuple_or_none(ie["channel_multipliers"]),
            max_channels=int(ie["max_channels"]),
            blocks_per_stage=int(ie["blocks_per_stage"]),
            out_channels=None if ie["out_channels"] is None else int(ie["out_channels"]),
            dropout=float(ie["dropout"]),
        )
    )
    denoiser = LatentDenoiser(
        LatentDenoiserConfig(
            dim=dim,
            latent_channels=int(cfg["latent_channels"]),
            cond_channels=image_encoder.out_channels_per_scale[-1]
            + (int(cfg["latent_channels"]) if head_conditions_denoiser else 0),
            base_channels=int(dn["base_channels"]),
            channel_multipliers=_tuple_or_none(dn["channel_multipliers"]),
            strides=[list(s) for s in dn["strides"]],
            attention_at_bottleneck=bool(dn["attention_at_bottleneck"]),
            attention_heads=int(dn["attention_heads"]),
            time_embedding_dim=(
                None if dn["time_embedding_dim"] is None else int(dn["time_embedding_dim"])
            ),
            random_latent_dim=int(dn["random_latent_dim"]),
            blocks_per_level=int(dn["blocks_per_level"]),
            dropout=float(dn["dropout"]),
        )
    )
    rf = cfg["refinement"]
    refinement = (
        RefinementHead(
            RefinementHeadConfig(
                dim=dim,
                num_classes=int(cfg["num_classes"]),
                detail_channels=image_encoder.out_channels_per_scale[0],
                channels=int(rf["channels"]),
                blocks=int(rf["blocks"]),
            )
        )
        if rf["enabled"]
        else None
    )
    segmentation_head = (
        ImageSegmentationHead(
            ImageSegmentationHeadConfig(
                dim=dim,
                num_classes=int(cfg["num_classes"]),
                channels_per_scale=list(image_encoder.out_channels_per_scale),
                strides=strides,
            )
        )
        if cfg["segmentation_head"]["enabled"]
        else None
    )
    return LatentDiffusionSegmenter(
        autoencoder, image_encoder, denoiser, config=cfg, refinement=refinement, segmentation_head=segmentation_head
    )
