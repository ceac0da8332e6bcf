"""The latent plan: how far the mask autoencoder may downsample each axis, and how many channels.

What is new compared with nnU-Net's planner. The downsampling per axis is bounded by the smallest
structures that matter: the volume-weighted 5th-percentile object extent (which specks of a few
voxels barely move) must still span ``min_object_extent_in_latent_voxels`` latent voxels; latent
voxels stay near-isotropic in mm; the channel count keeps the preset's compression ratio. Every
function returns its reasons, which the plans store beside the numbers.
"""

from __future__ import annotations

import math

import numpy as np

WEIGHTED_STATISTIC = "p05_volume_weighted_extent_mm"
PLAIN_STATISTIC = "p05_extent_mm"


def smallest_object_extent_voxels(fingerprint: dict, target: list[float], axes: list[int]) -> tuple[np.ndarray, dict | None]:
    """Extent of the smallest structures that matter (min over classes), in voxels at the target spacing.

    Per class, the volume-weighted 5th percentile of the object extent (the objects that hold the
    smallest 5 % of the class's foreground voxels): specks of a few voxels hold almost none of the
    voxels, so they cannot veto compression, but a class whose objects are all small still limits
    it. Fingerprints written before that statistic existed (no ``p05_volume_weighted_extent_mm``)
    still plan, with the plain 5th percentile of the objects, and the plans say so; rerunning
    ``latdiff_plan_and_preprocess --clean`` recomputes the fingerprint.

    Returns the extent (``inf`` when no class has objects) and what decided it (``None`` then).
    """
    best, decided = None, None
    for label, summary in fingerprint["object_sizes_per_class"].items():
        if summary.get("num_objects", 0) == 0:
            continue
        statistic = WEIGHTED_STATISTIC if WEIGHTED_STATISTIC in summary else PLAIN_STATISTIC
        vox = np.asarray(summary[statistic], dtype=float)[axes] / np.asarray(target)[axes]
        if best is None or np.prod(vox) < np.prod(best):
            plain = np.asarray(summary.get(PLAIN_STATISTIC, summary[statistic]), dtype=float)[axes] / np.asarray(target)[axes]
            best, decided = vox, {"class": label, "statistic": statistic, "summary": summary, "plain": plain}
    return (best if best is not None else np.full(len(axes), np.inf)), decided


def describe_statistic(decided: dict | None) -> str:
    """Short name of the deciding statistic, used in ``why_factor``."""
    if decided is None:
        return "5th-percentile object"
    weighted = "volume-weighted " if decided["statistic"] == WEIGHTED_STATISTIC else ""
    return f"{weighted}5th-percentile object of class {decided['class']}"


def smallest_structure_record(decided: dict | None, extent: np.ndarray, factor: np.ndarray) -> dict:
    """``latent.smallest_structure``: which statistic of which class decided, with its numbers."""
    finite = bool(np.all(np.isfinite(extent)))
    record = {
        "class": None if decided is None else decided["class"],
        "statistic": None if decided is None else decided["statistic"],
        "extent_voxels": [round(float(x), 2) for x in extent] if finite else None,
        "extent_latent_voxels": [round(float(x), 2) for x in extent / factor] if finite else None,
    }
    if decided is None:
        record["statistic_why"] = "no foreground objects in the fingerprint: only the preset and the patch limit the factor"
        return record
    summary = decided["summary"]
    record["unweighted_p05_extent_voxels"] = [round(float(x), 2) for x in decided["plain"]]
    record["num_objects"] = summary.get("num_objects")
    if decided["statistic"] == WEIGHTED_STATISTIC:
        record["num_specks"] = summary.get("num_specks")
        record["specks_fraction_of_voxels"] = summary.get("specks_fraction_of_voxels")
        record["statistic_why"] = (
            "volume-weighted 5th percentile of the class's object extents: the objects holding the smallest 5 % of its "
            f"foreground voxels; {summary.get('num_specks')} of {summary.get('num_objects')} objects are smaller (specks), "
            f"together {100 * summary.get('specks_fraction_of_voxels', 0):.2g} % of the voxels, so they cannot decide it"
        )
    else:
        record["statistic_why"] = (
            "plain 5th percentile of the object extents (every connected component counts once, specks included): "
            "the fingerprint predates the volume-weighted statistic; rerun latdiff_plan_and_preprocess with --clean"
        )
    return record


def latent_downsampling(
    p05_vox: np.ndarray, patch: np.ndarray, latent_cfg: dict, what: str = "5th-percentile object"
) -> tuple[list[int], list[str]]:
    """Downsampling exponent per axis and, per axis, why it is what it is.

    ``p05_vox`` is the extent (voxels per axis) of the smallest structure that matters; ``what``
    names it in the reasons.
    """
    max_k = int(math.log2(latent_cfg["max_downsampling_per_axis"]))
    need = latent_cfg["min_object_extent_in_latent_voxels"]
    ks, reasons = [], []
    for extent, size in zip(p05_vox, patch):
        k = 0
        while k < max_k and extent / 2 ** (k + 1) >= need and size / 2 ** (k + 1) >= latent_cfg["min_latent_edge"]:
            k += 1
        if k == max_k:
            spans = f" (the {what}, {extent:.1f} voxels, spans {extent / 2 ** k:.1f} latent voxels)" if np.isfinite(extent) else ""
            reasons.append(f"preset maximum x{2 ** k}{spans}")
        elif extent / 2 ** (k + 1) < need:
            if k == 0:
                reasons.append(f"no downsampling: the {what} ({extent:.1f} voxels) would span < {need} latent voxels")
            else:
                reasons.append(f"x{2 ** k}: the {what} ({extent:.1f} voxels) keeps >= {need} latent voxels")
        else:
            reasons.append(f"x{2 ** k}: limited by the patch edge ({int(size)} voxels)")
        ks.append(k)
    return ks, reasons


def cap_for_isotropy(ks: list[int], spacing: np.ndarray, reasons: list[str]) -> list[int]:
    """No axis's latent voxel may be over 1.5x coarser (in mm) than the finest latent axis.

    The object rule alone can compress a long axis harder than the others; a lopsided latent
    grid then blurs shapes along that axis, and the denoiser's convolutions see warped anatomy.
    """
    finest = min(sp * 2**k for sp, k in zip(spacing, ks))
    capped = []
    for axis, (sp, k) in enumerate(zip(spacing, ks)):
        new_k = k
        while new_k > 0 and sp * 2**new_k > 1.5 * finest:
            new_k -= 1
        if new_k != k:
            reasons[axis] = f"x{2 ** new_k}: capped so latent voxels stay near-isotropic ({finest:g} mm finest)"
        capped.append(new_k)
    return capped


def strides_from_exponents(ks: list[int]) -> list[list[int]]:
    """Per-stage strides; coarse axes (small exponent) are downsampled in the *last* stages,
    like nnU-Net, so early stages work on roughly isotropic voxels."""
    stages = max(ks) if ks else 0
    return [[2 if stage >= stages - k else 1 for k in ks] for stage in range(stages)]


def denoiser_strides(latent_size: np.ndarray, levels: int, min_edge: int) -> list[list[int]]:
    strides, size = [], latent_size.astype(float).copy()
    for _ in range(levels):
        stride = [2 if s / 2 >= min_edge else 1 for s in size]
        if max(stride) == 1:
            break
        strides.append(stride)
        size = size / np.asarray(stride)
    return strides


def latent_channels(num_classes: int, factor: np.ndarray, latent_cfg: dict) -> tuple[int, str]:
    """Channels so that (classes x voxels) / (channels x latent voxels) ~ the preset's ratio."""
    ideal = num_classes * float(np.prod(factor)) / latent_cfg["compression_ratio"]
    c = int(np.clip(math.ceil(ideal), latent_cfg["min_channels"], latent_cfg["max_channels"]))
    return c, (
        f"{num_classes} classes x {int(np.prod(factor))} voxels per latent voxel / compression ratio "
        f"{latent_cfg['compression_ratio']} = {ideal:.2f}, clipped to [{latent_cfg['min_channels']}, {latent_cfg['max_channels']}]"
    )
