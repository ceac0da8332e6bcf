"""Back from preprocessed space to the input's geometry: resample, un-crop, write.

Probabilities are resampled (linear) to the cropped original grid and placed into the full
image with background outside the crop; the label is their argmax there, so the segmentation
is decided at the original resolution rather than upsampled as a label map.
"""

from __future__ import annotations

import numpy as np

from latdiffunet.preprocessing.cropping import uncrop
from latdiffunet.preprocessing.resampling import resample_labels, resample_probabilities, resample_volume


def probabilities_to_original(probs: np.ndarray, props: dict) -> np.ndarray:
    """``(K, *preprocessed)`` -> ``(K, *original)`` (background = 1 outside the crop)."""
    cropped = resample_probabilities(probs, tuple(props["shape_after_crop"]), props["separate_z_axis"])
    full = uncrop(cropped, props["bbox_used_for_cropping"], tuple(props["shape_before_crop"]), fill=0.0)
    outside = np.ones(tuple(props["shape_before_crop"]), bool)
    outside[tuple(slice(a, b) for a, b in props["bbox_used_for_cropping"])] = False
    full[0][outside] = 1.0
    return full


def map_to_original(volume: np.ndarray, props: dict, fill: float = 0.0) -> np.ndarray:
    """A float map (e.g. entropy) resampled linearly and un-cropped."""
    cropped = resample_volume(volume.astype(np.float32), tuple(props["shape_after_crop"]), 1, props["separate_z_axis"])
    return uncrop(cropped, props["bbox_used_for_cropping"], tuple(props["shape_before_crop"]), fill=fill)


def labels_to_original(labels: np.ndarray, props: dict, label_values: list[int]) -> np.ndarray:
    """A label map (e.g. one diffusion sample) resampled via one-hot and un-cropped."""
    cropped = resample_labels(labels, tuple(props["shape_after_crop"]), props["separate_z_axis"], label_values)
    return uncrop(cropped, props["bbox_used_for_cropping"], tuple(props["shape_before_crop"]), fill=0)
