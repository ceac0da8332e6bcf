"""Small synthetic raw datasets in nnU-Net v2 format, for tests that need real files on disk.

``make_synthetic_dataset`` writes ``<root>/<name>/{imagesTr,labelsTr,dataset.json}`` with, per
case, a bright spherical blob labelled 1 and a dimmer box labelled 2 on a noisy background. Cases
differ (object positions, noise) but are reproducible from ``seed``. 3D datasets are ``.nii.gz``;
2D datasets are ``.png`` (uint8), optionally RGB (three channels in one file, channel_names R/G/B,
nnU-Net's natural-image convention). Files are written with SimpleITK directly, not through the
library under test.

Usage::

    from synthetic import make_synthetic_dataset
    folder = make_synthetic_dataset(tmp_path / "raw")              # Dataset900_Synth, 6 cases, 3D
    folder = make_synthetic_dataset(raw, dim=2, rgb=True)           # 2D RGB photographs
    folder = make_synthetic_dataset(raw, direction=oblique(30, 20), origin=(-10.5, 4.0, 2.0))
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SHAPE_3D = (10, 16, 20)  # (Z, Y, X): tiny so that a whole dataset is read in well under a second
SHAPE_2D = (32, 40)  # (Y, X)
LABELS = {"background": 0, "blob": 1, "box": 2}


def oblique_direction(angle_z_deg: float = 30.0, angle_x_deg: float = 20.0) -> tuple[float, ...]:
    """A proper rotation (row-major 3x3, SimpleITK order): rotation about z, then about x."""
    a, b = math.radians(angle_z_deg), math.radians(angle_x_deg)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return tuple(float(v) for v in (rx @ rz).ravel())


def case_id(index: int) -> str:
    return f"synth_{index:03d}"


def _objects(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Label map with a ball/disc (1) and a box (2) that never overlap."""
    grid = np.indices(shape).astype(np.float32)
    seg = np.zeros(shape, np.uint8)
    # blob in the first half of the last axis, box in the second half
    radius = max(2.0, min(shape[-2:]) / 6)
    center = [rng.uniform(radius + 0.5, s - radius - 1.5) if s > 2 * radius + 2 else (s - 1) / 2 for s in shape[:-1]]
    center.append(rng.uniform(radius + 0.5, shape[-1] / 2 - radius))
    if len(shape) == 3 and shape[0] <= 2 * radius + 2:
        center[0] = (shape[0] - 1) / 2
    dist2 = sum((g - c) ** 2 for g, c in zip(grid, center))
    seg[dist2 <= radius**2] = 1
    lo = [int(rng.integers(1, max(2, s // 3))) for s in shape[:-1]] + [int(rng.integers(shape[-1] // 2 + 1, shape[-1] * 3 // 4))]
    box = tuple(slice(l, min(l + max(2, s // 4), s - 1)) for l, s in zip(lo, shape))
    seg[box] = 2
    return seg


def _sitk_image(arr: np.ndarray, spacing, origin, direction, is_vector: bool = False) -> sitk.Image:
    img = sitk.GetImageFromArray(arr, isVector=is_vector)
    if spacing is not None:
        img.SetSpacing(tuple(float(s) for s in spacing))
    if origin is not None:
        img.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        img.SetDirection(tuple(float(d) for d in direction))
    return img


def make_synthetic_dataset(
    root: Path,
    name: str = "Dataset900_Synth",
    num_cases: int = 6,
    dim: int = 3,
    num_channels: int = 1,
    rgb: bool = False,
    direction=None,
    origin=None,
    spacing=None,
    seed: int = 0,
    file_ending: str | None = None,
) -> Path:
    """Write a raw nnU-Net v2 dataset under ``root/name`` and return that folder.

    ``direction``/``origin``/``spacing`` are in SimpleITK order (x, y[, z]) and applied to every
    image and label; defaults are identity, zero and (for 3D) an anisotropic ``(0.8, 0.9, 2.5)``.
    ``num_channels`` files per case are written (``CASE_0000``, ``CASE_0001``, ...) unless ``rgb``,
    which writes one 3-component PNG per case and declares channel_names R, G, B.
    ``file_ending`` defaults to ``.nii.gz`` (3D) / ``.png`` (2D); ``.mha`` or ``.nrrd`` keep NaN
    voxels, which SimpleITK's NIfTI reader silently turns into 0.
    """
    if dim not in (2, 3):
        raise ValueError("dim must be 2 or 3")
    if rgb and dim != 2:
        raise ValueError("rgb datasets are 2D (.png)")
    root = Path(root)
    folder = root / name
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    ending = file_ending or (".nii.gz" if dim == 3 else ".png")
    if dim == 3 and spacing is None:
        spacing = (0.8, 0.9, 2.5)
    rng = np.random.default_rng(seed)
    shape = SHAPE_3D if dim == 3 else SHAPE_2D
    for i in range(num_cases):
        cid = case_id(i)
        seg = _objects(shape, rng)
        if rgb:
            rgb_arr = np.empty(shape + (3,), np.uint8)
            for c, (bg, v1, v2) in enumerate(((20, 230, 90), (30, 200, 160), (10, 60, 220))):
                base = np.where(seg == 1, v1, np.where(seg == 2, v2, bg)).astype(np.float32)
                rgb_arr[..., c] = np.clip(base + rng.normal(0, 5, shape), 0, 255).astype(np.uint8)
            img = _sitk_image(rgb_arr, spacing, origin, direction, is_vector=True)
            sitk.WriteImage(img, str(folder / "imagesTr" / f"{cid}_0000{ending}"))
        else:
            for c in range(num_channels):
                scale = 1.0 + 0.5 * c
                base = np.where(seg == 1, 200.0, np.where(seg == 2, 100.0, 20.0)) * scale
                arr = base + rng.normal(0, 5, shape)
                arr = np.clip(arr, 0, 255).astype(np.uint8) if dim == 2 else arr.astype(np.float32)
                img = _sitk_image(arr, spacing, origin, direction)
                sitk.WriteImage(img, str(folder / "imagesTr" / f"{cid}_{c:04d}{ending}"), True)
        lab = _sitk_image(seg, spacing, origin, direction)
        sitk.WriteImage(lab, str(folder / "labelsTr" / f"{cid}{ending}"), True)
    if rgb:
        channel_names = {"0": "R", "1": "G", "2": "B"}
    else:
        channel_names = {str(c): ("MRI" if c == 0 else f"MRI_{c}") for c in range(num_channels)}
    dataset_json = {
        "channel_names": channel_names,
        "labels": dict(LABELS),
        "numTraining": num_cases,
        "file_ending": ending,
        "name": name.split("_", 1)[-1],
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n", encoding="utf-8")
    return folder


def planned_tiny_dataset(root: Path, name: str, seed: int, num_cases: int = 6, dim: int = 2):
    """Generator for a module fixture: ``LATDIFF_RAW/PREPROCESSED/RESULTS`` under ``root``, a
    synthetic dataset ``name`` (``DatasetNNN_...``) written, planned and preprocessed with the
    ``tiny`` preset; yields ``root`` and restores the environment after."""
    import pytest

    from latdiffunet.experiment_planning.cli import main as plan_main

    mp = pytest.MonkeyPatch()
    for variable, folder in (("LATDIFF_RAW", "raw"), ("LATDIFF_PREPROCESSED", "pre"), ("LATDIFF_RESULTS", "res")):
        mp.setenv(variable, str(root / folder))
    try:
        make_synthetic_dataset(root / "raw", name=name, num_cases=num_cases, dim=dim, seed=seed)
        assert plan_main(["-d", str(int(name[7:10])), "--preset", "tiny", "-np", "1"]) == 0
        yield root
    finally:
        mp.undo()
