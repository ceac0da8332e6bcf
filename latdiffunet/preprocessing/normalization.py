"""Per-channel intensity normalisation schemes, chosen by the planner from the channel name.

CT intensities are physical (Hounsfield units), so one clip window and one mean/std for the
whole dataset are right; MRI intensities are arbitrary per scan, so each image is z-scored on
its own; RGB photographs are already on a fixed 0-255 scale.
"""

from __future__ import annotations

import numpy as np

SCHEMES = ("CTNormalization", "ZScoreNormalization", "RGBTo01", "NoNormalization")


def scheme_for_channel(channel_name: str, is_2d_rgb: bool) -> tuple[str, str]:
    """(scheme, reason) for a channel, from its name in dataset.json."""
    name = channel_name.strip().lower()
    if name == "ct":
        return "CTNormalization", "channel named CT: clip to the dataset's foreground 0.5-99.5 percentiles, then z-score with its mean/std"
    if name in ("noNorm".lower(), "none"):
        return "NoNormalization", f"channel named {channel_name!r}: left as is"
    if is_2d_rgb and name in ("r", "g", "b", "red", "green", "blue", "rgb"):
        return "RGBTo01", "RGB photograph channel: divided by 255"
    return "ZScoreNormalization", f"channel {channel_name!r} has no physical scale: per-image z-score"


def normalize_channel(
    image: np.ndarray,
    scheme: str,
    properties: dict | None = None,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Normalise one channel. ``properties`` are the fingerprint's foreground statistics (CT only);
    ``mask`` restricts the z-score statistics to the body (nnU-Net's use_mask_for_norm)."""
    image = image.astype(np.float32, copy=True)
    if scheme == "CTNormalization":
        if properties is None:
            raise ValueError("CTNormalization needs the fingerprint's intensity properties")
        lo, hi = properties["percentile_00_5"], properties["percentile_99_5"]
        np.clip(image, lo, hi, out=image)
        return (image - properties["mean"]) / max(properties["std"], 1e-8)
    if scheme == "ZScoreNormalization":
        values = image[mask] if mask is not None and mask.any() else image
        mean, std = float(values.mean()), float(values.std())
        out = (image - mean) / max(std, 1e-8)
        if mask is not None and mask.any():
            out[~mask] = 0
        return out
    if scheme == "RGBTo01":
        return image / 255.0
    if scheme == "NoNormalization":
        return image
    raise ValueError(f"unknown normalisation scheme {scheme!r}; known: {SCHEMES}")
