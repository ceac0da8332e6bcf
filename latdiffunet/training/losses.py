"""Segmentation losses shared by both training stages.

Weighted cross-entropy keeps small structures alive in the autoencoder (MedSegLatDiff); soft Dice
makes the loss care about overlap rather than voxel counts, which is what segmentation is judged
on.

The ignore label (nnU-Net's sparse annotation: ``dataset.json`` ``"ignore"``, always the highest
value, ``num_classes``) has one convention, here, for every stage: :func:`one_hot` encodes an
ignore voxel as background and :func:`valid_mask` marks it 0; every loss (cross-entropy, Dice,
the latent loss, the energy score) and every validation metric leaves it out, as nnU-Net does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_indices(seg: torch.Tensor, num_classes: int, ignore_label: int | None = None) -> torch.Tensor:
    """``(B, 1, *S)`` label values -> ``(B, *S)`` class indices, ignore voxels as background (0).

    A value that is neither a class nor the ignore label is an error rather than clamped to the
    last class: clamping is how unannotated voxels used to be trained as the last foreground class.
    """
    labels = seg[:, 0].long()
    if ignore_label is not None:
        labels = labels.masked_fill(labels == ignore_label, 0)
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        found = sorted(set(torch.unique(labels).tolist()) - set(range(num_classes)))
        raise ValueError(
            f"label values {found} are neither a class (0..{num_classes - 1}) nor the ignore label ({ignore_label}); "
            "the preprocessed data does not match the plans: rerun latdiff_plan_and_preprocess"
        )
    return labels


def one_hot(seg: torch.Tensor, num_classes: int, ignore_label: int | None = None) -> torch.Tensor:
    """``(B, 1, *S)`` integer labels -> ``(B, K, *S)`` float one-hot; ignore voxels become background.

    Background, not an all-zero vector, because this one-hot is the autoencoder's input and the
    latent the diffusion model learns to produce: it must stay a mask of the kind the encoder
    sees everywhere else. Training hardly reads what it says there: the voxel losses mask those
    voxels with :func:`valid_mask`, and the latent loss weights each latent voxel by its annotated
    share (:func:`latent_valid_fraction`), so only latent voxels at the edge of an annotation
    still carry some of that background.
    """
    return _indices_to_one_hot(class_indices(seg, num_classes, ignore_label), num_classes)


def _indices_to_one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(labels, num_classes).movedim(-1, 1).float()


def valid_mask(seg: torch.Tensor, ignore_label: int | None) -> torch.Tensor | None:
    """``(B, 1, *S)`` float, 1 where annotated and 0 on the ignore label; None without an ignore label."""
    return None if ignore_label is None else (seg != ignore_label).float()


def latent_valid_fraction(valid: torch.Tensor, latent_shape: torch.Size) -> torch.Tensor:
    """``(B, 1, *L)`` fraction of annotated voxels under each latent voxel of ``latent_shape``.

    Weights the latent loss: a latent voxel over unannotated voxels only encodes the background
    that :func:`one_hot` put there, so it must carry no loss; a partly annotated one counts in
    proportion.
    """
    return F.interpolate(valid, size=tuple(latent_shape[2:]), mode="area")


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` weighted by ``weight`` (broadcast to it); the plain mean when None, 0 when all weights are 0."""
    if weight is None:
        return values.mean()
    weight = weight.expand_as(values)
    return (values * weight).sum() / weight.sum().clamp_min(1e-8)


def soft_dice_loss(
    logits: torch.Tensor, target_onehot: torch.Tensor, smooth: float = 1e-5, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """1 - mean soft Dice over foreground classes (batch Dice: sums over batch and space).

    ``valid`` ``(B, 1, *S)`` zeroes prediction and target on unannotated voxels (nnU-Net's masked Dice).
    """
    probs = logits.softmax(1)
    if valid is not None:
        probs, target_onehot = probs * valid, target_onehot * valid
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
    ignore_label: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted cross-entropy + soft Dice over the annotated voxels; returns the loss and its parts for logging.

    The cross-entropy is PyTorch's class-weighted mean (sum of weighted losses / sum of weights)
    restricted to annotated voxels, written out so a patch without any annotated voxel gives 0
    rather than NaN.
    """
    num_classes = logits.shape[1]
    labels = class_indices(seg, num_classes, ignore_label)
    valid = valid_mask(seg, ignore_label)
    per_voxel = F.cross_entropy(logits.float(), labels, weight=class_weights, reduction="none")  # w[y] * loss
    voxel_weight = class_weights[labels] if class_weights is not None else torch.ones_like(per_voxel)
    if valid is not None:
        per_voxel, voxel_weight = per_voxel * valid[:, 0], voxel_weight * valid[:, 0]
    ce = per_voxel.sum() / voxel_weight.sum().clamp_min(1e-8)
    dice = soft_dice_loss(logits.float(), _indices_to_one_hot(labels, num_classes), valid=valid)
    return ce + dice_weight * dice, {"ce": ce.item(), "dice_loss": dice.item()}


def soft_jaccard_distance(
    a: torch.Tensor, b: torch.Tensor, smooth: float = 1.0, roi_only: bool = True, valid: torch.Tensor | None = None
) -> torch.Tensor:
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

    ``valid`` ``(N, 1, *S)`` (broadcastable) leaves unannotated voxels out of both sums.
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
    if valid is not None:
        inter, union = inter * valid, union * valid
    return (1 - (inter.sum(spatial) + smooth) / (union.sum(spatial) + smooth)).mean(1)


def energy_score_loss(
    sample_probs: torch.Tensor, target_onehot: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
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

    ``valid`` ``(N, 1, *S)`` (see :func:`valid_mask`) restricts both terms to the annotated voxels:
    the score stays proper on the part of the image the annotation speaks about, and says
    nothing about the rest.
    """
    n, m = sample_probs.shape[:2]
    if m < 2:
        raise ValueError(f"the energy score needs at least 2 samples per image, got {m}")
    flat = sample_probs.reshape(n * m, *sample_probs.shape[2:])
    target = target_onehot.repeat_interleave(m, 0)
    i, j = torch.triu_indices(m, m, offset=1)
    valid_m, valid_pairs = (None, None) if valid is None else (valid.repeat_interleave(m, 0), valid.repeat_interleave(len(i), 0))
    to_target = soft_jaccard_distance(flat, target, valid=valid_m).view(n, m).mean(1)
    between = soft_jaccard_distance(sample_probs[:, i].flatten(0, 1), sample_probs[:, j].flatten(0, 1), valid=valid_pairs)
    between = between.view(n, -1).mean(1)
    loss = (to_target - 0.5 * between).mean()
    return loss, {"sample_to_label": to_target.mean().item(), "sample_spread": between.mean().item()}
