"""Per-voxel uncertainty from a stack of sampled class probabilities.

With samples s = 1..S (diffusion samples, across folds) of probabilities p_s:
- predictive entropy H(mean_s p_s): total uncertainty;
- mutual information H(mean p) - mean_s H(p_s): the part due to *disagreement* between samples
  (epistemic / ambiguity), zero when all samples agree even if each is unsure;
- agreement: fraction of samples whose own label equals the final label.
"""

from __future__ import annotations

import numpy as np


def entropy(probs: np.ndarray, axis: int = 0) -> np.ndarray:
    p = np.clip(probs, 1e-8, 1.0)
    return -(p * np.log(p)).sum(axis=axis)


def uncertainty_maps(sample_probs: np.ndarray) -> dict[str, np.ndarray]:
    """``(S, K, *spatial)`` -> mean probabilities, label, entropy, mutual information, agreement."""
    mean = sample_probs.mean(0)
    label = mean.argmax(0)
    total = entropy(mean, axis=0)
    expected = np.mean([entropy(s, axis=0) for s in sample_probs], axis=0)
    sample_labels = sample_probs.argmax(1)
    return {
        "probabilities": mean.astype(np.float32),
        "label": label.astype(np.int16),
        "entropy": total.astype(np.float32),
        "mutual_information": np.maximum(total - expected, 0).astype(np.float32),
        "agreement": (sample_labels == label[None]).mean(0).astype(np.float32),
        "sample_labels": sample_labels.astype(np.int16),
    }
