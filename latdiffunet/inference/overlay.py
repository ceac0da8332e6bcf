"""A PNG to look at for 2D inputs: image, segmentation contour, uncertainty heat map."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from latdiffunet.utilities.file_io import atomic_path


def write_overlay(image_chw: np.ndarray, seg: np.ndarray, uncertainty: np.ndarray, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if image_chw.shape[0] == 3:
        shown = np.moveaxis(image_chw, 0, -1)
        shown = (shown - shown.min()) / max(float(np.ptp(shown)), 1e-8)
        cmap = None
    else:
        shown, cmap = image_chw[0], "gray"
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    axes[0].imshow(shown, cmap=cmap)
    axes[0].set_title("image")
    axes[1].imshow(shown, cmap=cmap)
    for value in sorted(set(np.unique(seg).tolist()) - {0}):
        axes[1].contour(seg == value, levels=[0.5], colors=[plt.cm.tab10(int(value) % 10)], linewidths=1.2)
    axes[1].set_title("segmentation")
    im = axes[2].imshow(uncertainty, cmap="magma")
    axes[2].set_title("uncertainty")
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
