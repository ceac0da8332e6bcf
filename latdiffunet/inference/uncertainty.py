"""Per-voxel uncertainty from a stack of sampled class probabilities (and the image head's).

With samples s = 1..S (diffusion samples, across folds) of probabilities p_s:
- predictive entropy H(mean_s p_s): total uncertainty *as the samples see it*;
- mutual information H(mean p) - mean_s H(p_s): the part due to *disagreement* between samples
  (epistemic / ambiguity), zero when all samples agree even if each is unsure;
- agreement: fraction of samples whose own label equals the final label;
- uncertainty (the map to look at): H(q) + MI, with q the image segmentation head's probabilities.

Why the last one. Total uncertainty splits into what the samples disagree on (MI) and what each
sample is itself unsure of (the expected entropy mean_s H(p_s)). Our samples' own entropy is not
a property of the image: the mask decoder turns a latent into a mask that is sharp to the voxel,
so where all samples put a boundary one voxel off, every one of them is sure and the predictive
entropy is near 0 (on Hippocampus, 13 % of the wrong voxels next to a boundary had entropy below
0.001, and the entropy found errors with AUROC 0.855 where nnU-Net's softmax entropy reached
0.982). The segmentation head reads the image at full resolution and is trained with
cross-entropy, so its softmax is soft where the image is ambiguous (a faint boundary), as
nnU-Net's is. Its entropy takes the place of the decoder's: H(q) + MI reached AUROC 0.985 on the
same cases (README). Models without a head keep the predictive entropy as their uncertainty.
"""

from __future__ import annotations

import numpy as np


def entropy(probs: np.ndarray, axis: int = 0) -> np.ndarray:
    p = np.clip(probs, 1e-8, 1.0)
    return -(p * np.log(p)).sum(axis=axis)


def uncertainty_maps(sample_probs: np.ndarray, image_probs: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``(S, K, *spatial)`` samples (and optionally ``(K, *spatial)`` image-head probabilities) ->
    mean probabilities, label, entropy, mutual information, agreement, uncertainty, sample labels."""
    mean = sample_probs.mean(0)
    label = mean.argmax(0)
    total = entropy(mean, axis=0)
    expected = np.mean([entropy(s, axis=0) for s in sample_probs], axis=0)
    mutual_information = np.maximum(total - expected, 0)
    if image_probs is not None and image_probs.shape != mean.shape:
        raise ValueError(f"image probabilities {image_probs.shape} do not match the samples' {mean.shape}")
    uncertainty = total if image_probs is None else entropy(image_probs, axis=0) + mutual_information
    sample_labels = sample_probs.argmax(1)
    return {
        "probabilities": mean.astype(np.float32),
        "label": label.astype(np.int16),
        "entropy": total.astype(np.float32),
        "mutual_information": mutual_information.astype(np.float32),
        "agreement": (sample_labels == label[None]).mean(0).astype(np.float32),
        "uncertainty": uncertainty.astype(np.float32),
        "sample_labels": sample_labels.astype(np.int16),
    }
