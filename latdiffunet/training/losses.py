"""Segmentation losses shared by both training stages.

Weighted cross-entropy keeps small structures alive in the autoencoder (MedSegLatDiff); soft Dice
makes the loss care about overlap rather than voxel counts, which is what segmentation is judged
on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def one_hot(seg: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, 1, *S)`` integer labels -> ``(B, K, *S)`` float one-hot."""
    labels = seg[:, 0].long().clamp(0, num_classes - 1)
    return F.one_hot(labels, num_classes).movedim(-1, 1).float()


def soft_dice_loss(logits: torch.Tensor, target_onehot: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice over foreground classes (batch Dice: sums over batch and space)."""
    probs = logits.softmax(1)
    axes = [0] + list(range(2, logits.ndim))
    intersect = (probs * target_onehot).sum(axes)
    denom = probs.sum(axes) + target_onehot.sum(axes)
    dice = (2 * intersect + smooth) / (denom + smooth)
    return 1 - dice[1:].mean() if dice.numel() > 1 else 1 - dice.mean()


def segmentation_loss(
    logits: torch.Tensor,
    seg: torch.Tensor,
    class_weights: torch.Tensor | None,
    dice_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted cross-entropy + soft Dice; returns the loss and its parts for logging."""
    num_classes = logits.shape[1]
    target = seg[:, 0].long().clamp(0, num_classes - 1)
    ce = F.cross_entropy(logits.float(), target, weight=class_weights)
    dice = soft_dice_loss(logits.float(), one_hot(seg, num_classes))
    return ce + dice_weight * dice, {"ce": ce.item(), "dice_loss": dice.item()}



def soft_jaccard_distance(a: torch.Tensor, b: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soergel distance ``1 - sum(min) / sum(max)`` per foreground class, averaged over classes.

    ``a``, ``b``: ``(N, K, *S)`` class probabilities or one-hot masks (broadcastable); returns
    ``(N,)``. On binary masks it is exactly GED's ``1 - IoU``, and on non-negative maps it is still
    a metric, which keeps the energy score built on it a proper scoring rule. ``smooth`` (voxels)
    gives two empty masks distance 0, as GED's d(∅, ∅) = 0.
    """
    a, b = a[:, 1:], b[:, 1:]
    spatial = tuple(range(2, a.ndim))
    inter = torch.minimum(a, b).sum(spatial)
    union = torch.maximum(a, b).sum(spatial)
    return (1 - (inter + smooth) / (union + smooth)).mean(1)


def energy_score_loss(sample_probs: torch.Tensor, target_onehot: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Energy score of M samples per image against one annotation: ``E d(S, Y) - E d(S, S') / 2``.

    ``sample_probs`` ``(N, M, K, *S)`` decoded class probabilities of M >= 2 samples of each of N
    images (drawn with the few-step sampler that inference uses); ``target_onehot`` ``(N, K, *S)``,
    one annotation per image (a randomly chosen rater on multi-rater data). This is the expected
    GED with the annotation term, which does not depend on the model, left out: it is a proper
    scoring rule, minimised in expectation only when the samples are distributed as the
    annotations are. On single-rater data that means every sample close to the label (no spread
    where the image is clear); on multi-rater data it means samples that spread like the raters.
    Plain cross-entropy on each sample would instead pull every sample to the rater mean. The
    unbiased estimator averages the M*(M-1) ordered pairs of distinct samples.
    """
    n, m = sample_probs.shape[:2]
    if m < 2:
        raise ValueError(f"the energy score needs at least 2 samples per image, got {m}")
    flat = sample_probs.reshape(n * m, *sample_probs.shape[2:])
    target = target_onehot.repeat_interleave(m, 0)
    to_target = soft_jaccard_distance(flat, target).view(n, m).mean(1)
    i, j = torch.triu_indices(m, m, offset=1)
    between = soft_jaccard_distance(sample_probs[:, i].flatten(0, 1), sample_probs[:, j].flatten(0, 1)).view(n, -1).mean(1)
    loss = (to_target - 0.5 * between).mean()
    return loss, {"sample_to_label": to_target.mean().item(), "sample_spread": between.mean().item()}
