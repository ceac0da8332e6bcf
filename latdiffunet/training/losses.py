"""Segmentation losses shared by both training stages.

Weighted cross-entropy keeps small structures alive in the autoencoder (MedSegLatDiff); soft Dice
makes the loss care about overlap rather than voxel counts, which is what segmentation is judged
on.

The ignore label (nnU-Net's sparse annotation: ``dataset.json`` ``"ignore"``, always the highest
value, ``num_classes``) has one convention, here, for every stage: :func:`one_hot` encodes an
ignore voxel as background and :func:`valid_mask` marks it 0; every loss (cross-entropy, Dice,
the latent loss, the energy score) and every validation metric leaves it out, as nnU-Net does.

Losses that are not a mean over images (batch soft Dice, the class-weighted cross-entropy, masked
means: their denominators depend on the whole batch) take a ``batch_sum``: it sums a statistic
over every process that holds part of the batch (an all-reduce that autograd differentiates, see
``distributed.py``), so that data-parallel training optimises the loss of the global batch, not
the mean of per-process losses. In one process it is the identity. Plain means over images need
none: every process holds an equal share of the batch.

No value is read back to the host here (no ``.item()``): the parts for logging are detached
tensors, which the trainer reads once every few steps, so a GPU never waits for the CPU.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

BatchSum = Callable[[torch.Tensor], torch.Tensor]
DICE_SMOOTH = 1e-5  # keeps Dice defined for a class absent from prediction and target


class ExtraLoss(NamedTuple):
    """What a trainer variant adds to one diffusion step (``LatentDiffusionTrainer.extra_diffusion_loss``):
    a weighted loss term, its parts for the log (detached), and an optional ``(B, 1, *S)`` weight
    map for the decoded segmentation loss (``segmentation_loss``'s ``spatial_weight``)."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    decoded_spatial_weight: torch.Tensor | None = None


def single_process_sum(statistic: torch.Tensor) -> torch.Tensor:
    """The :data:`BatchSum` of one process: it holds the whole batch."""
    return statistic


def check_label_values(seg: torch.Tensor, num_classes: int, ignore_label: int | None = None) -> None:
    """Refuse label values that are neither a class (0..num_classes-1) nor the ignore label.

    Reads the values, so call it where they are on the host (the trainer checks every batch
    before copying it to the device: there it costs no wait for the device). One pass over the
    batch when all values are allowed: the ignore label is the highest value, ``num_classes``.
    """
    if seg.numel() == 0:
        return
    lowest, highest = (int(v) for v in torch.aminmax(seg))
    if lowest >= 0 and highest <= (num_classes if ignore_label == num_classes else num_classes - 1):
        return
    labels = seg.long()
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_label is not None:
        bad &= labels != ignore_label
    if bool(bad.any()):
        found = sorted(set(torch.unique(labels[bad]).tolist()))
        raise ValueError(
            f"label values {found} are neither a class (0..{num_classes - 1}) nor the ignore label ({ignore_label}); "
            "the preprocessed data does not match the plans: rerun latdiff_plan_and_preprocess"
        )


def class_indices(seg: torch.Tensor, num_classes: int, ignore_label: int | None = None) -> torch.Tensor:
    """``(B, 1, *S)`` label values -> ``(B, *S)`` class indices, ignore voxels as background (0).

    A value that is neither a class nor the ignore label is an error rather than clamped to the
    last class: clamping is how unannotated voxels used to be trained as the last foreground class.
    The check (:func:`check_label_values`) runs on CPU tensors only: on an accelerator it would
    make the host wait for the device at every call, so the trainer checks each batch on the host.
    """
    if seg.device.type == "cpu":
        check_label_values(seg, num_classes, ignore_label)
    labels = seg[:, 0].long()
    if ignore_label is not None:
        labels = labels.masked_fill(labels == ignore_label, 0)
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


def weighted_mean(
    values: torch.Tensor, weight: torch.Tensor | None, batch_sum: BatchSum = single_process_sum
) -> torch.Tensor:
    """Mean of ``values`` weighted by ``weight`` (broadcast to it); the plain mean when None, 0 when all weights are 0.

    With a weight, numerator and denominator are summed over the whole batch (``batch_sum``);
    the plain mean is a mean over equal shares and needs no sum.
    """
    if weight is None:
        return values.mean()
    weight = weight.expand_as(values)
    totals = batch_sum(torch.stack([(values * weight).sum(), weight.sum()]))
    return totals[0] / totals[1].clamp_min(1e-8)


def _dice_statistics(
    logits: torch.Tensor, target_onehot: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft Dice's statistics per class, summed over batch and space (batch Dice):
    ``(intersection, |prediction| + |target|)``.

    ``valid`` ``(B, 1, *S)`` zeroes prediction and target on unannotated voxels (nnU-Net's masked
    Dice). Batch Dice is kept under data parallelism (rather than per-image Dice, which would
    change what one process optimises): the caller sums these over the global batch.
    """
    probs = logits.softmax(1)
    if valid is not None:
        probs, target_onehot = probs * valid, target_onehot * valid
    axes = [0] + list(range(2, logits.ndim))
    return (probs * target_onehot).sum(axes), probs.sum(axes) + target_onehot.sum(axes)


def _dice_loss_from_statistics(intersect: torch.Tensor, denom: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes (over all classes when there is only one)."""
    dice = (2 * intersect + smooth) / (denom + smooth)
    return 1 - dice[1:].mean() if dice.numel() > 1 else 1 - dice.mean()


def segmentation_loss(
    logits: torch.Tensor,
    seg: torch.Tensor,
    class_weights: torch.Tensor | None,
    dice_weight: float = 1.0,
    ignore_label: int | None = None,
    image_weight: torch.Tensor | None = None,
    batch_sum: BatchSum = single_process_sum,
    spatial_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted cross-entropy + soft Dice over the annotated voxels; returns the loss and its parts
    (detached tensors) for logging.

    The cross-entropy is PyTorch's class-weighted mean (sum of weighted losses / sum of weights)
    restricted to annotated voxels, written out so a patch without any annotated voxel gives 0
    rather than NaN. ``image_weight`` ``(B,)`` 0/1 leaves whole images out (as if unannotated):
    a mask rather than an index, so nothing depends on how many are left. Both terms sum over
    the whole batch (``batch_sum``), in one reduction. ``spatial_weight`` ``(B, 1, *S)`` (positive,
    e.g. cDAL's attention map, ``training/adversarial.py``) weights each voxel in both terms, as
    ``valid`` does: a weighted mean for the cross-entropy, weighted sums in the Dice.
    """
    num_classes = logits.shape[1]
    labels = class_indices(seg, num_classes, ignore_label)
    valid = valid_mask(seg, ignore_label)
    if image_weight is not None:
        per_image = image_weight.to(logits.device, torch.float32).view(-1, *([1] * (seg.ndim - 1)))
        valid = per_image.expand(seg.shape) if valid is None else valid * per_image
    if spatial_weight is not None:
        weight = spatial_weight.to(logits.device, torch.float32)
        valid = weight.expand(seg.shape) if valid is None else valid * weight
    per_voxel = F.cross_entropy(logits.float(), labels, weight=class_weights, reduction="none")  # w[y] * loss
    voxel_weight = class_weights[labels] if class_weights is not None else torch.ones_like(per_voxel)
    if valid is not None:
        per_voxel, voxel_weight = per_voxel * valid[:, 0], voxel_weight * valid[:, 0]
    intersect, denom = _dice_statistics(logits.float(), _indices_to_one_hot(labels, num_classes), valid)
    totals = batch_sum(torch.cat([per_voxel.sum()[None], voxel_weight.sum()[None], intersect, denom]))
    ce = totals[0] / totals[1].clamp_min(1e-8)
    dice = _dice_loss_from_statistics(totals[2:2 + num_classes], totals[2 + num_classes:])
    return ce + dice_weight * dice, {"ce": ce.detach(), "dice_loss": dice.detach()}


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
    return loss, {"sample_to_label": to_target.mean().detach(), "sample_spread": between.mean().detach()}
