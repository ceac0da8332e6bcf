"""Sliding-window prediction over a preprocessed volume with Gaussian weighting (nnU-Net style).

The window predictor returns *several outputs per window* (diffusion samples), so stitching keeps
a ``(S, K, Z, Y, X)`` array: per-sample class probabilities, from which the mean, the entropy and
the mutual information are computed later. Windows are batched to keep the device busy; the
2d configuration on 3D data treats each slice as a 2D image.
"""

from __future__ import annotations

import itertools
from typing import Callable

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

# (B, C, *P) patches + their spatial starts in the padded case -> (B, S, K, *P) probabilities.
# A predictor with a ``begin_case(spatial_shape, device)`` method is told the padded case shape first
# (diffusion predictors draw one noise field per sample for the whole case there).
WindowPredictor = Callable[[torch.Tensor, list], torch.Tensor]


def window_starts(size: int, patch: int, step_fraction: float) -> list[int]:
    """Evenly spaced starts covering ``size`` with overlap >= 1 - step_fraction."""
    if size <= patch:
        return [0]
    n = int(np.ceil((size - patch) / (patch * step_fraction))) + 1
    return [int(round(i * (size - patch) / (n - 1))) for i in range(n)]


def gaussian_importance(patch: tuple[int, ...], sigma_scale: float = 1 / 8) -> np.ndarray:
    """Centre-weighted map: window borders see less context and get less say."""
    centre = np.zeros(patch, np.float32)
    centre[tuple(p // 2 for p in patch)] = 1
    g = gaussian_filter(centre, [p * sigma_scale for p in patch], mode="constant")
    g /= g.max()
    return np.maximum(g, g[g > 0].min()).astype(np.float32)


def sliding_window_predict(
    volume: np.ndarray,
    patch_size: list[int],
    predictor: WindowPredictor,
    num_samples: int,
    num_classes: int,
    device: torch.device,
    step_fraction: float = 0.5,
    windows_per_batch: int = 8,
) -> np.ndarray:
    """Stitch per-window predictions of ``volume`` (C, Z, Y, X) into (S, K, Z, Y, X) probabilities."""
    dim = len(patch_size)
    c, z, y, x = volume.shape
    spatial = (y, x) if dim == 2 else (z, y, x)
    padded = [max(s, p) for s, p in zip(spatial, patch_size)]
    pad = [(0, 0)] * (4 - dim) + [((p - s) // 2, p - s - (p - s) // 2) for s, p in zip(spatial, padded)]
    vol = np.pad(volume, pad, mode="constant")
    out = np.zeros((num_samples, num_classes) + vol.shape[1:], np.float32)
    weight = np.zeros(vol.shape[1:], np.float32)
    importance = gaussian_importance(tuple(patch_size))
    starts = [window_starts(s, p, step_fraction) for s, p in zip(padded, patch_size)]
    if dim == 2:
        windows = [(zi,) + s for zi in range(vol.shape[1]) for s in itertools.product(*starts)]
    else:
        windows = list(itertools.product(*starts))

    begin_case = getattr(predictor, "begin_case", None)
    if begin_case is not None:
        begin_case(tuple(vol.shape[2:] if dim == 2 else vol.shape[1:]), device)

    def slicer(w):
        if dim == 2:
            return (w[0], slice(w[1], w[1] + patch_size[0]), slice(w[2], w[2] + patch_size[1]))
        return tuple(slice(s, s + p) for s, p in zip(w, patch_size))

    for i in range(0, len(windows), windows_per_batch):
        batch_windows = windows[i : i + windows_per_batch]
        patches = np.stack([vol[(slice(None),) + slicer(w)] for w in batch_windows])
        with torch.no_grad():
            origins = [tuple(w[1:]) if dim == 2 else tuple(w) for w in batch_windows]  # 2d: in-plane, shared by slices
            probs = predictor(torch.from_numpy(patches).to(device), origins).float().cpu().numpy()
        for w, p in zip(batch_windows, probs):
            sl = slicer(w)
            out[(slice(None), slice(None)) + sl] += p * importance
            weight[sl] += importance
    # every voxel lies in at least one window, whose importance there is >= its minimum (exp(-24)
    # at a 3d window's corner): no floor is needed, and one (1e-8 was) would scale such voxels down
    out /= weight
    crop = tuple(slice(a, a + s) for (a, _), s in zip(pad[1:], (z, y, x)))
    return out[(slice(None), slice(None)) + crop]
