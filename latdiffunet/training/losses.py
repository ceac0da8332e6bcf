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
