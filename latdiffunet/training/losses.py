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



def soft_jaccard_distance(a: torch.Tensor, b: torch.Tensor, smooth: float = 1.0, roi_only: bool = True) -> torch.Tensor:
    """Soergel distance ``1 - sum(min) / sum(max)`` per foreground class, averaged over classes.

    ``a``, ``b``: ``(N, K, *S)`` class probabilities or one-hot masks (broadcastable); returns
    ``(N,)``. On binary masks it is exactly GED's ``1 - IoU``. ``smooth`` (voxels) gives two empty
    masks distance 0, as GED's d(∅, ∅) = 0.

    ``roi_only`` sums only over the voxels that either argmax mask calls this class: a sample the
    user sees is the argmax of its probabilities, and over a whole 128 x 128 slice the faint
    probability every background voxel keeps would otherwise outweigh a nodule (the first LIDC run
    scoring whole soft maps sat at a sample-to-label distance of 0.73 and a spread of 0.71 after 18
    diffusion epochs; Hippocampus, 56 x 40 patches: 0.26 and 0.23). Inside that region the
    probabilities keep their exact gradient, so a mask still grows or shrinks at its border.
    """
    a, b = a[:, 1:], b[:, 1:]
    spatial = tuple(range(2, a.ndim))
    inter, union = torch.minimum(a, b), torch.maximum(a, b)
    if roi_only:
        k = a.shape[1] + 1

        def is_argmax(x: torch.Tensor) -> torch.Tensor:  # x without background: argmax over all classes
            full = torch.cat([1 - x.sum(1, keepdim=True), x], 1)
            return F.one_hot(full.argmax(1), k).movedim(-1, 1)[:, 1:].bool()

        roi = (is_argmax(a.detach()) | is_argmax(b.detach())).to(a.dtype)
        inter, union = inter * roi, union * roi
    return (1 - (inter.sum(spatial) + smooth) / (union.sum(spatial) + smooth)).mean(1)


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
    unbiased estimator averages the M*(M-1) ordered pairs of distinct samples. (Scoring the argmax
    masks with a straight-through gradient was tried on LIDC: the spread collapsed from 0.70 to
    0.04 while the loss rose from 0.39 to 0.67, the tie gradients of min/max at the many voxels
    both masks leave empty pointing nowhere useful.)
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
