"""nnU-Net-style data augmentation as batchgenerators transforms.

Spatial transforms (rotation, scaling) run on a patch sampled *larger* than the training patch
(:func:`initial_patch_size`), so rotated corners hold real image rather than padding; the spatial
transform then crops to the training patch. Intensity transforms and mirroring follow.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from batchgenerators.transforms.abstract_transforms import AbstractTransform, Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

# Default spatial augmentation (nnU-Net's values for isotropic 3D / 2D data).
ROTATION_DEGREES = 30.0
SCALE_RANGE = (0.7, 1.4)
P_ROTATION = 0.2
P_SCALE = 0.2


def _rotation_matrices(angles_rad: Sequence[float], dim: int, steps: int) -> np.ndarray:
    """Rotation matrices on a grid of angles in [-a, a] per axis (batchgenerators' convention)."""
    grids = [np.unique(np.concatenate([np.linspace(-a, a, steps), [-a, 0.0, a]])) for a in angles_rad]
    if dim == 2:
        t = grids[0]
        c, s = np.cos(t), np.sin(t)
        return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    ax, ay, az = np.meshgrid(*grids, indexing="ij")
    ax, ay, az = ax.ravel(), ay.ravel(), az.ravel()
    one, zero = np.ones_like(ax), np.zeros_like(ax)

    def mat(rows):
        return np.stack([np.stack(r, -1) for r in rows], -2)

    rx = mat([[one, zero, zero], [zero, np.cos(ax), -np.sin(ax)], [zero, np.sin(ax), np.cos(ax)]])
    ry = mat([[np.cos(ay), zero, np.sin(ay)], [zero, one, zero], [-np.sin(ay), zero, np.cos(ay)]])
    rz = mat([[np.cos(az), -np.sin(az), zero], [np.sin(az), np.cos(az), zero], [zero, zero, one]])
    return rx @ ry @ rz


def initial_patch_size(
    patch_size: Sequence[int],
    rotation_degrees: float | Sequence[float],
    scale_range: Sequence[float],
) -> list[int]:
    """Size of the patch to sample so that a rotated + scaled ``patch_size`` stays inside it.

    The bounding box of the final patch rotated by any angle in ``[-rotation_degrees,
    +rotation_degrees]`` (per axis in 3D, a scalar or 3 values; in-plane for 2D patches) and
    scaled by the largest factor of ``scale_range`` (batchgenerators multiplies the sampling
    coordinates by the drawn factor, so a factor > 1 reads a larger region). Each entry is at
    least ``patch_size`` and differs from it by an even number, so the spatial transform's centre
    crop lands on whole voxels (an odd difference would resample everything half a voxel off).
    """
    patch = np.asarray([int(p) for p in patch_size], dtype=float)
    dim = len(patch)
    if dim not in (2, 3):
        raise ValueError(f"patch_size must have 2 or 3 entries, got {patch_size}")
    n_angles = 1 if dim == 2 else 3
    angles = np.broadcast_to(np.abs(np.asarray(rotation_degrees, dtype=float)), (n_angles,)).copy()
    angles = np.deg2rad(np.minimum(angles, 180.0))
    rot = _rotation_matrices(angles, dim, steps=181 if dim == 2 else 37)
    # new coordinate i = sum_j c_j R[j, i]: its extent is sum_j |R[j, i]| * P_j
    extent = (np.abs(rot) * patch[None, :, None]).sum(axis=1).max(axis=0)
    extent = np.maximum(extent, patch) * max(1.0, float(max(scale_range)))
    out = np.ceil(extent - 1e-6).astype(int)
    out += (out - patch.astype(int)) % 2  # same parity as the final patch
    return [int(v) for v in out]


class ToTrainingArrays(AbstractTransform):
    """Last transform: contiguous float32 ``data`` and int64 ``seg`` (torch.from_numpy-ready).

    With ``patch_size`` given, a larger input is centre-cropped to it (the no-augmentation path
    when the loader still samples an initial patch larger than the final one).
    """

    def __init__(self, patch_size: Sequence[int] | None = None):
        self.patch_size = None if patch_size is None else [int(p) for p in patch_size]

    def _crop(self, arr: np.ndarray) -> np.ndarray:
        if self.patch_size is None or list(arr.shape[2:]) == self.patch_size:
            return arr
        if len(arr.shape) - 2 != len(self.patch_size) or any(
            s < p for s, p in zip(arr.shape[2:], self.patch_size)
        ):
            raise ValueError(f"batch spatial shape {arr.shape[2:]} cannot be cropped to patch_size {self.patch_size}")
        lbs = [(s - p) // 2 for s, p in zip(arr.shape[2:], self.patch_size)]
        return arr[(slice(None), slice(None)) + tuple(slice(lb, lb + p) for lb, p in zip(lbs, self.patch_size))]

    def __call__(self, **data_dict):
        data_dict["data"] = np.ascontiguousarray(self._crop(data_dict["data"]), dtype=np.float32)
        seg = data_dict.get("seg")
        if seg is not None:
            seg = self._crop(seg)
            if np.issubdtype(seg.dtype, np.floating):
                seg = np.rint(seg)
            data_dict["seg"] = np.ascontiguousarray(seg, dtype=np.int64)
        return data_dict


def build_transforms(
    dimension: int,
    patch_size: Sequence[int],
    augment: bool = True,
    mirror_axes: Sequence[int] | None = None,
) -> Compose:
    """nnU-Net-like augmentation ending in :class:`ToTrainingArrays`; ``augment=False``: conversion only.

    Spatial: rotation ±``ROTATION_DEGREES`` (in-plane for 2D patches, each axis in 3D) with p 0.2,
    isotropic scaling ``SCALE_RANGE`` with p 0.2, no elastic deformation, constant-0 border,
    cubic data / linear (per-label argmax) seg interpolation, centre crop of the loader's
    ``initial_patch_size`` batch to ``patch_size``. Intensity: Gaussian noise (p 0.1), Gaussian
    blur (p 0.2), multiplicative brightness (p 0.15), contrast (p 0.15), gamma (p 0.3). Mirroring
    along every spatial axis (or ``mirror_axes``, indices of spatial axes), each with p 0.5.
    """
    if dimension not in (2, 3):
        raise ValueError(f"dimension must be 2 or 3, got {dimension}")
    patch = [int(p) for p in patch_size]
    if len(patch) != dimension:
        raise ValueError(f"patch_size must have {dimension} entries, got {patch_size}")
    if not augment:
        return Compose([ToTrainingArrays(patch)])
    a = np.deg2rad(ROTATION_DEGREES)
    angle = (-a, a)
    axes = tuple(range(dimension)) if mirror_axes is None else tuple(int(x) for x in mirror_axes)
    if any(not 0 <= x < dimension for x in axes):
        raise ValueError(f"mirror_axes must be spatial axis indices in [0, {dimension}), got {mirror_axes}")
    transforms: list[AbstractTransform] = [
        SpatialTransform(
            patch,
            patch_center_dist_from_border=None,
            do_elastic_deform=False,
            do_rotation=True,
            angle_x=angle,
            angle_y=angle if dimension == 3 else (0.0, 0.0),
            angle_z=angle if dimension == 3 else (0.0, 0.0),
            p_rot_per_axis=1,
            do_scale=True,
            scale=SCALE_RANGE,
            border_mode_data="constant",
            border_cval_data=0,
            order_data=3,
            border_mode_seg="constant",
            border_cval_seg=0,
            order_seg=1,
            random_crop=False,
            p_el_per_sample=0,
            p_scale_per_sample=P_SCALE,
            p_rot_per_sample=P_ROTATION,
            independent_scale_for_each_axis=False,
        ),
        GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_sample=0.1),
        GaussianBlurTransform((0.5, 1.0), different_sigma_per_channel=True, p_per_sample=0.2, p_per_channel=0.5),
        BrightnessMultiplicativeTransform(multiplier_range=(0.75, 1.25), p_per_sample=0.15),
        ContrastAugmentationTransform(p_per_sample=0.15),
        GammaTransform((0.7, 1.5), invert_image=False, per_channel=True, retain_stats=True, p_per_sample=0.3),
    ]
    if axes:
        transforms.append(MirrorTransform(axes))
    transforms.append(ToTrainingArrays(patch))
    return Compose(transforms)
