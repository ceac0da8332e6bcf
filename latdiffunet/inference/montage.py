"""``CASE_montage.png``: one picture of a prediction and its spread, to look at rather than measure.

One row of panels per plane: the image, each rater's annotation (when known), the mean
segmentation, the uncertainty map (``CASE_uncertainty``), then up to :data:`MAX_SAMPLES` diffusion samples. Label
maps are drawn as translucent colour overlays on the image, one colour per class (matplotlib's
``tab10``, the colours of ``CASE_overlay.png``). A 2D case (``Z == 1``) gives one row; a 3D case
gives three rows, the axial, coronal and sagittal planes through the centre of the mean
segmentation's foreground (the volume centre when it is empty).

Arrays are in array order ``(Z, Y, X)``, in the case's original geometry. Drawing uses
matplotlib's Agg canvas directly, not pyplot, so no global backend state changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from latdiffunet.utilities.file_io import atomic_path

__all__ = ["write_montage", "MAX_SAMPLES", "MAX_RATERS", "PANEL_INCHES", "DPI"]

#: Samples drawn; further ones are left out.
MAX_SAMPLES = 8
#: Raters drawn; further ones are left out.
MAX_RATERS = 8
#: Size of one square panel in inches, and the resolution: a panel is ``PANEL_INCHES * DPI`` pixels.
PANEL_INCHES = 2.5
DPI = 80
OVERLAY_ALPHA = 0.45


def _as_zyx(arr: np.ndarray, spatial: tuple[int, ...], name: str) -> np.ndarray:
    if arr.shape == spatial:
        return arr
    if spatial[0] == 1 and arr.shape == spatial[1:]:
        return arr[None]
    raise ValueError(f"{name}: expected shape {spatial} (Z, Y, X) like mean_seg, got {arr.shape}")


def _as_stack(masks, spatial: tuple[int, ...], name: str, limit: int) -> list[np.ndarray]:
    if masks is None:
        return []
    return [_as_zyx(np.asarray(m), spatial, f"{name}[{i}]") for i, m in enumerate(list(masks)[:limit])]


def _image_for_display(image: np.ndarray, spatial: tuple[int, ...]) -> tuple[np.ndarray, bool]:
    """``(Z, Y, X)`` grey in [0, 1], or ``(Z, Y, X, 3)`` RGB in [0, 1] for a 2D three-channel image."""
    img = np.asarray(image, dtype=np.float32)
    if img.shape == spatial or (spatial[0] == 1 and img.shape == spatial[1:]):
        img = _as_zyx(img, spatial, "image")[None]
    elif img.ndim >= 1 and (img.shape[1:] == spatial or (spatial[0] == 1 and img.shape[1:] == spatial[1:])):
        img = img.reshape((img.shape[0],) + spatial)
    else:
        raise ValueError(f"image: expected (C, Z, Y, X) or (Z, Y, X) with (Z, Y, X) = {spatial}, got {img.shape}")
    if not np.isfinite(img).all():
        img = np.nan_to_num(img, nan=0.0, posinf=0.0, neginf=0.0)
    if img.shape[0] == 3 and spatial[0] == 1:  # a photograph; three channels of a volume are modalities
        lo, hi = float(img.min()), float(img.max())
        if lo >= 0 and hi <= 1:
            scale = (0.0, 1.0)
        elif lo >= 0 and hi <= 255:
            scale = (0.0, 255.0)
        else:
            scale = (lo, max(hi, lo + 1e-8))
        return np.clip((np.moveaxis(img, 0, -1) - scale[0]) / (scale[1] - scale[0]), 0, 1), True
    grey = img[0]
    sample = grey.ravel()[:: max(1, grey.size // 1_000_000)]  # percentiles of a large volume from a subsample
    lo, hi = np.percentile(sample, [0.5, 99.5])
    return np.clip((grey - lo) / max(float(hi - lo), 1e-8), 0, 1), False


def _plane_centre(mean_seg: np.ndarray) -> tuple[int, int, int]:
    fg = np.argwhere(mean_seg > 0)
    if fg.size == 0:
        return tuple(s // 2 for s in mean_seg.shape)
    return tuple(int(round(v)) for v in fg.mean(axis=0))


def _planes(spatial: tuple[int, ...], centre: tuple[int, int, int], spacing: Sequence[float] | None) -> list[tuple]:
    """``(name, index into (Z, Y, X[, C]), pixel aspect, origin)`` of the planes to draw."""
    sz, sy, sx = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
    cz, cy, cx = centre
    if spatial[0] == 1:
        return [("", (0, slice(None), slice(None)), sy / sx, "upper")]
    return [  # z drawn upwards in the coronal and sagittal planes
        (f"axial z={cz}", (cz, slice(None), slice(None)), sy / sx, "upper"),
        (f"coronal y={cy}", (slice(None), cy, slice(None)), sz / sx, "lower"),
        (f"sagittal x={cx}", (slice(None), slice(None), cx), sz / sy, "lower"),
    ]


def write_montage(
    image: np.ndarray,
    mean_seg: np.ndarray,
    uncertainty: np.ndarray,
    samples: Sequence[np.ndarray] | np.ndarray,
    out_png: str | Path,
    raters: Sequence[np.ndarray] | np.ndarray | None = None,
    labels: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
) -> tuple[int, int]:
    """Draw image, raters, mean segmentation, uncertainty and samples into one PNG, written atomically.

    Parameters
    ----------
    image : ndarray, shape (C, Z, Y, X) or (Z, Y, X)
        The input image; the first channel is drawn in grey (0.5-99.5 percentile window), except
        a 2D image with three channels, drawn as RGB (values in [0, 1] or [0, 255], else
        rescaled).
    mean_seg : ndarray of int, shape (Z, Y, X)
        The segmentation (label of the mean prediction). ``Z == 1`` is a 2D case; ``(Y, X)``
        arrays are accepted for 2D throughout.
    uncertainty : ndarray of float, shape (Z, Y, X)
        The uncertainty map, drawn from 0 to its maximum over the volume.
    samples : sequence of ndarray (Z, Y, X)
        Sampled label maps; the first :data:`MAX_SAMPLES` are drawn.
    out_png : path
        Target file; written to a hidden temporary name in the same folder, then renamed.
    raters : sequence of ndarray (Z, Y, X), optional
        Annotations of several raters, one panel each (the first :data:`MAX_RATERS`).
    labels : sequence of int, optional
        Classes to colour; default every value > 0 found in the label maps drawn.
    spacing : sequence of float, optional
        Voxel size ``(sz, sy, sx)`` in array order, for the aspect ratio of the planes; default
        isotropic.

    Returns
    -------
    rows, columns : int
        Panels drawn: 1 or 3 rows; ``3 + len(raters) + len(samples)`` columns after the limits.
        The PNG is ``columns * PANEL_INCHES * DPI`` pixels wide and ``rows * PANEL_INCHES * DPI``
        high.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    seg = np.asarray(mean_seg)
    if seg.ndim == 2:
        seg = seg[None]
    if seg.ndim != 3 or 0 in seg.shape:
        raise ValueError(f"mean_seg: expected a non-empty label map (Z, Y, X) or (Y, X), got shape {np.shape(mean_seg)}")
    spatial = seg.shape
    if spacing is not None and len(spacing) != 3:
        raise ValueError(f"spacing: expected (sz, sy, sx), got {spacing}")
    shown, rgb = _image_for_display(image, spatial)
    unc = _as_zyx(np.asarray(uncertainty, dtype=np.float32), spatial, "uncertainty")
    sample_list = _as_stack(samples, spatial, "samples", MAX_SAMPLES)
    rater_list = _as_stack(raters, spatial, "raters", MAX_RATERS)
    if labels is None:
        labels = sorted({int(v) for m in [seg, *sample_list, *rater_list] for v in np.unique(m)} - {0})
    colours = {int(c): colormaps["tab10"](int(c) % 10)[:3] for c in labels}

    columns = [("image", None)] + [(f"rater {i}", r) for i, r in enumerate(rater_list)] + [("mean", seg), ("uncertainty", None)]
    columns += [(f"sample {i}", s) for i, s in enumerate(sample_list)]
    planes = _planes(spatial, _plane_centre(seg), spacing)
    vmax = max(float(np.nanmax(unc)), 1e-6)

    fig = Figure(figsize=(len(columns) * PANEL_INCHES, len(planes) * PANEL_INCHES), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(planes), len(columns), squeeze=False)
    for row, (plane_name, index, aspect, origin) in enumerate(planes):
        background = shown[index]
        for col, (title, labelmap) in enumerate(columns):
            ax = axes[row, col]
            if title == "uncertainty":
                ax.imshow(unc[index], cmap="magma", vmin=0.0, vmax=vmax, aspect=aspect, origin=origin, interpolation="nearest")
            else:
                ax.imshow(background, cmap=None if rgb else "gray", vmin=0.0, vmax=1.0, aspect=aspect, origin=origin,
                          interpolation="nearest")
            if labelmap is not None:
                plane = labelmap[index]
                overlay = np.zeros(plane.shape + (4,), np.float32)
                for c, colour in colours.items():
                    overlay[plane == c] = (*colour, OVERLAY_ALPHA)
                ax.imshow(overlay, aspect=aspect, origin=origin, interpolation="nearest")
            if row == 0:
                ax.set_title(f"uncertainty (max {vmax:.2f})" if title == "uncertainty" else title, fontsize=9)
            if col == 0 and plane_name:
                ax.set_ylabel(plane_name, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    return len(planes), len(columns)
