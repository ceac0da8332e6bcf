"""Patch sampling from preprocessed cases and nnU-Net-style data augmentation.

Pipeline (one training batch)::

    PatchDataLoader.generate_train_batch()      # cases from CaseCache, patches of initial_patch_size
      -> build_transforms(...)                  # SpatialTransform crops to patch_size, intensity aug, mirror
      -> make_batch_stream(...)                 # MultiThreadedAugmenter (workers) or single-threaded

Typical use by a trainer::

    ips = initial_patch_size(patch, ROTATION_DEGREES, SCALE_RANGE) if augment else patch
    loader = PatchDataLoader(folder, train_ids, patch, batch_size, dimension, initial_patch_size=ips, seed=s)
    stream = make_batch_stream(loader, build_transforms(dimension, patch, augment), num_workers, seed=s)
    batch = next(stream)          # {"data": float32 (B,C,*patch), "seg": int64 (B,1,*patch), "keys": [...]}
    ...
    stream._finish()              # MultiThreadedAugmenter: stop the workers (see close_batch_stream)

Conventions
-----------
* Arrays on disk are ``data`` (C,Z,Y,X) float32, ``seg`` (Z,Y,X) int8 (the consensus label),
  optional ``seg_raters`` (R,Z,Y,X) int8 and ``locations_<class>`` (N,3) int32 (z,y,x) sampled from
  ``seg`` (see :mod:`latdiffunet.preprocessing.preprocessor`).
* ``dimension == 2`` trains on axial slices: a sample is one index along z and a (y, x) patch.
  2D datasets are stored with Z == 1.
* Spatial axes in a batch follow the array order (z, y, x) / (y, x); batchgenerators' "x, y, z"
  names for angles simply mean "spatial axis 0, 1, 2".
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from batchgenerators.dataloading.data_loader import DataLoader
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.transforms.abstract_transforms import AbstractTransform, Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

from latdiffunet.errors import UserInputError
from latdiffunet.utilities.file_io import load_npz

# Default spatial augmentation (nnU-Net's values for isotropic 3D / 2D data).
ROTATION_DEGREES = 30.0
SCALE_RANGE = (0.7, 1.4)
P_ROTATION = 0.2
P_SCALE = 0.2

__all__ = [
    "ROTATION_DEGREES",
    "SCALE_RANGE",
    "CaseCache",
    "PatchDataLoader",
    "ToTrainingArrays",
    "build_transforms",
    "close_batch_stream",
    "initial_patch_size",
    "load_preprocessed_case",
    "make_batch_stream",
]


# --------------------------------------------------------------------------------------------------
# cases on disk and in memory
# --------------------------------------------------------------------------------------------------


def load_preprocessed_case(folder: Path, case_id: str) -> dict:
    """Decompress ``<folder>/<case_id>.npz``.

    Returns ``{"data": float32 (C,Z,Y,X), "seg": int8 (Z,Y,X), "seg_raters": int8 (R,Z,Y,X) or None,
    "locations": {class (int): int (N,3) array of (z,y,x)}}``.
    """
    path = Path(folder) / f"{case_id}.npz"
    if not path.is_file():
        raise UserInputError(
            f"preprocessed case {case_id!r} not found",
            path=path,
            fix="run latdiff_plan_and_preprocess for this configuration, or check the case ids of the split",
        )
    arrays = load_npz(path)
    for key in ("data", "seg"):
        if key not in arrays:
            raise UserInputError(
                f"preprocessed case has no {key!r} array (keys: {sorted(arrays)})",
                path=path,
                fix="delete the preprocessed folder and preprocess again",
            )
    data = np.asarray(arrays["data"], dtype=np.float32)
    seg = arrays["seg"]
    if data.ndim != 4 or seg.shape != data.shape[1:]:
        raise UserInputError(
            f"expected data (C,Z,Y,X) and seg (Z,Y,X) of the same spatial shape, got {data.shape} and {seg.shape}",
            path=path,
            fix="delete the preprocessed folder and preprocess again",
        )
    raters = arrays.get("seg_raters")
    if raters is not None and (raters.ndim != 4 or raters.shape[1:] != seg.shape or len(raters) == 0):
        raise UserInputError(
            f"seg_raters must be (R,Z,Y,X) with R >= 1 and the shape of seg {seg.shape}, got {raters.shape}",
            path=path,
            fix="delete the preprocessed folder and preprocess again",
        )
    locations = {}
    for key, value in arrays.items():
        if key.startswith("locations_"):
            locations[int(key[len("locations_"):])] = np.asarray(value, dtype=np.int64).reshape(-1, 3)
    return {"data": data, "seg": seg, "seg_raters": raters, "locations": dict(sorted(locations.items()))}


def _case_nbytes(case: dict) -> int:
    total = case["data"].nbytes + case["seg"].nbytes
    if case["seg_raters"] is not None:
        total += case["seg_raters"].nbytes
    return total + sum(v.nbytes for v in case["locations"].values())


class CaseCache:
    """Decompressed cases kept in memory, least recently used evicted beyond ``max_bytes``.

    ``.npz`` decompression costs far more than cutting a patch, and the datasets this pipeline
    trains on (Hippocampus, LIDC crops, QUBIQ) fit in memory many times over, so by default
    (``max_bytes=None``) every case is kept once loaded. A case larger than ``max_bytes`` on its
    own is returned but not kept.

    With background workers each worker process holds its own copy of the cache (the loader is
    forked into it). Call :meth:`preload` in the main process *before* the workers start to load
    every case once and share the arrays copy-on-write with all workers.
    """

    def __init__(self, folder: Path, max_bytes: int | None = None):
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be None or >= 0, got {max_bytes}")
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self._cases: OrderedDict[str, dict] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._cases)

    def __contains__(self, case_id: str) -> bool:
        return case_id in self._cases

    def get(self, case_id: str) -> dict:
        """The case (see :func:`load_preprocessed_case`); treat the arrays as read-only."""
        case = self._cases.get(case_id)
        if case is not None:
            self.hits += 1
            self._cases.move_to_end(case_id)
            return case
        self.misses += 1
        case = load_preprocessed_case(self.folder, case_id)
        size = _case_nbytes(case)
        if self.max_bytes is None or size <= self.max_bytes:
            self._cases[case_id] = case
            self._bytes += size
            while self.max_bytes is not None and self._bytes > self.max_bytes:
                _, old = self._cases.popitem(last=False)
                self._bytes -= _case_nbytes(old)
        return case

    def preload(self, case_ids: Iterable[str]) -> None:
        for case_id in case_ids:
            self.get(case_id)

    def clear(self) -> None:
        self._cases.clear()
        self._bytes = 0


# --------------------------------------------------------------------------------------------------
# patch sampling
# --------------------------------------------------------------------------------------------------


def _limit_worker_threads() -> None:
    """``OMP_NUM_THREADS=1`` for a worker process: its numpy/scipy work must not oversubscribe."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"  # for libraries loaded from now on
    try:  # for libraries already loaded (inherited from the parent by fork)
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1)
    except Exception:  # pragma: no cover - threadpoolctl is a batchgenerators dependency
        pass


class PatchDataLoader(DataLoader):
    """Random training patches from preprocessed cases (nnU-Net's sampling rules).

    Parameters
    ----------
    folder : preprocessed configuration folder (``<preprocessed>/<DatasetXXX>/<data_identifier>``)
    case_ids : cases to sample from (the training split of a fold)
    patch_size : final patch size, ``dimension`` ints
    batch_size : samples per batch
    dimension : 2 (axial slices, (y,x) patches) or 3
    foreground_oversampling : the last ``round(B * fraction)`` samples of every batch (round half
        up) contain foreground: a random foreground class present in the case, a random voxel of it
        (from ``locations_<class>``), and a patch placed at a random offset so that the voxel lies
        inside the *final* patch (the central ``patch_size`` region of the sampled patch, which is
        what the spatial transform keeps when it does not rotate/scale). The other samples are
        uniformly random. Cases without foreground fall back to a random patch.
    sample_rater : for multi-rater cases (``seg_raters``), use a uniformly chosen rater's mask as
        the sample's target (ambiguous-segmentation training). Foreground locations come from the
        consensus label, so a forced-foreground sample may show a rater mask that is empty there
        (that rater's honest "no").
    seed : loader seed; worker ``k`` of a MultiThreadedAugmenter draws from ``(seed, k)``, the
        single-threaded path from ``(seed, 0)``. None: fresh entropy.
    infinite : True: every batch draws its cases with replacement (training). False: one pass over
        ``case_ids`` per epoch, shared among ``num_threads_in_multithreaded`` workers, the last
        batch possibly smaller, then StopIteration (validation).
    initial_patch_size : size of the sampled patch, >= patch_size (default patch_size). With
        spatial augmentation use :func:`initial_patch_size` so rotated/scaled patches sample image
        content rather than padding; the spatial transform crops to ``patch_size``.
    cache : a shared :class:`CaseCache` (default: a new unbounded one on ``folder``).

    Patches extend beyond the image only as far as needed: a case smaller than the (final) patch
    is centred and padded (image 0, seg 0); a larger one is sampled so that the final patch stays
    inside the image while the margin ``initial - final`` may reach outside it.

    ``generate_train_batch()`` returns ``{"data": float32 (B,C,*initial), "seg": int16
    (B,1,*initial), "keys": [case ids]}``.
    """

    def __init__(
        self,
        folder: Path,
        case_ids: Sequence[str],
        patch_size: Sequence[int],
        batch_size: int,
        dimension: int,
        foreground_oversampling: float = 0.33,
        sample_rater: bool = True,
        seed: int | None = None,
        infinite: bool = True,
        num_threads_in_multithreaded: int = 1,
        initial_patch_size: Sequence[int] | None = None,
        cache: CaseCache | None = None,
    ):
        case_ids = list(case_ids)
        if not case_ids:
            raise UserInputError("no cases to sample patches from", path=folder, fix="check the split / case ids")
        if dimension not in (2, 3):
            raise ValueError(f"dimension must be 2 or 3, got {dimension}")
        patch = [int(p) for p in patch_size]
        if len(patch) != dimension or min(patch) < 1:
            raise ValueError(f"patch_size must be {dimension} positive ints for dimension {dimension}, got {patch_size}")
        initial = list(patch) if initial_patch_size is None else [int(p) for p in initial_patch_size]
        if len(initial) != dimension or any(i < p for i, p in zip(initial, patch)):
            raise ValueError(f"initial_patch_size {initial_patch_size} must be {dimension} ints >= patch_size {patch}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= foreground_oversampling <= 1.0:
            raise ValueError(f"foreground_oversampling must be in [0, 1], got {foreground_oversampling}")
        base_seed = int(np.random.SeedSequence().entropy if seed is None else seed)
        super().__init__(
            case_ids,
            batch_size,
            num_threads_in_multithreaded=num_threads_in_multithreaded,
            seed_for_shuffle=base_seed % 2**32,
            return_incomplete=not infinite,
            shuffle=True,
            infinite=infinite,
        )
        self.indices = list(range(len(case_ids)))
        self.folder = Path(folder)
        self.case_ids = case_ids
        self.patch_size = patch
        self.initial_patch_size = initial
        self.dimension = dimension
        self.foreground_oversampling = float(foreground_oversampling)
        self.sample_rater = sample_rater
        self.seed = base_seed
        self.cache = cache if cache is not None else CaseCache(self.folder)
        self._rng = np.random.default_rng([base_seed, 0])

    # called by MultiThreadedAugmenter inside each worker process before its first batch
    def set_thread_id(self, thread_id: int) -> None:
        super().set_thread_id(thread_id)
        self._rng = np.random.default_rng([self.seed, int(thread_id)])
        _limit_worker_threads()

    def num_forced_foreground(self, n: int) -> int:
        """How many of ``n`` samples (the last ones) are forced to contain foreground."""
        return int(np.floor(n * self.foreground_oversampling + 0.5))

    def generate_train_batch(self) -> dict:
        if self.infinite:
            idx = self._rng.integers(len(self.case_ids), size=self.batch_size).tolist()
        else:
            idx = self.get_indices()  # raises StopIteration at the end of the pass
        n = len(idx)
        n_forced = self.num_forced_foreground(n)
        data, seg, keys = [], [], []
        for j, i in enumerate(idx):
            case_id = self.case_ids[i]
            d, s = self._sample(self.cache.get(case_id), force_foreground=j >= n - n_forced)
            data.append(d)
            seg.append(s)
            keys.append(case_id)
        try:
            data_arr = np.stack(data)
        except ValueError:
            raise UserInputError(
                f"cases have different channel counts {sorted({d.shape[0] for d in data})} ({keys})",
                path=self.folder,
                fix="preprocess all cases with the same plans",
            ) from None
        return {"data": data_arr, "seg": np.stack(seg), "keys": keys}

    # ---- one sample --------------------------------------------------------------------------

    def _sample(self, case: dict, force_foreground: bool) -> tuple[np.ndarray, np.ndarray]:
        rng = self._rng
        data, seg = case["data"], case["seg"]
        raters = case["seg_raters"]
        if raters is not None and self.sample_rater:
            seg = raters[rng.integers(len(raters))]
        voxel = None
        if force_foreground:
            classes = [c for c, loc in case["locations"].items() if len(loc) > 0]
            if classes:
                loc = case["locations"][classes[rng.integers(len(classes))]]
                voxel = loc[rng.integers(len(loc))]
        if self.dimension == 2:
            z = int(voxel[0]) if voxel is not None else int(rng.integers(seg.shape[0]))
            data, seg = data[:, z], seg[z]
            if voxel is not None:
                voxel = voxel[1:]
        lbs = []
        for d, (size, p_init, p_final) in enumerate(zip(seg.shape, self.initial_patch_size, self.patch_size)):
            lb_min, lb_max = _lower_bound_range(size, p_init, p_final)
            if voxel is None:
                lb = int(rng.integers(lb_min, lb_max + 1))
            else:
                offset = (p_init - p_final) // 2  # where the final patch starts inside the sampled one
                final_lb = int(voxel[d]) - int(rng.integers(p_final))  # voxel at a random place in it
                lb = int(np.clip(final_lb - offset, lb_min, lb_max))
            lbs.append(lb)
        return (
            _crop_with_padding(data, lbs, self.initial_patch_size, np.float32, leading=True),
            _crop_with_padding(seg, lbs, self.initial_patch_size, np.int16, leading=False)[None],
        )


def _lower_bound_range(size: int, p_init: int, p_final: int) -> tuple[int, int]:
    """Allowed lower corners of an initial patch along one axis (nnU-Net v2's rule).

    The margin ``p_init - p_final`` may lie outside the image, so every final-patch position
    inside the image is reachable; an image smaller than the final patch is centred.
    """
    need = p_init - p_final
    if size + need < p_init:
        need = p_init - size
    return -(need // 2), size + need // 2 + need % 2 - p_init


def _crop_with_padding(arr: np.ndarray, lbs: list[int], shape: list[int], dtype, leading: bool) -> np.ndarray:
    """``arr[..., lb:lb+shape]`` per spatial axis with zero padding outside (channel axis first if leading)."""
    spatial = arr.shape[1:] if leading else arr.shape
    out = np.zeros(((arr.shape[0],) if leading else ()) + tuple(shape), dtype=dtype)
    src, dst = [], []
    for lb, p, s in zip(lbs, shape, spatial):
        lo, hi = max(lb, 0), min(lb + p, s)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - lb, hi - lb))
    head = (slice(None),) if leading else ()
    out[head + tuple(dst)] = arr[head + tuple(src)]
    return out


# --------------------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# batch streams
# --------------------------------------------------------------------------------------------------


class _SeededSingleThreadedAugmenter(SingleThreadedAugmenter):
    """Single-threaded augmenter whose transforms draw from a private, seeded global-RNG state.

    batchgenerators' transforms use ``np.random``'s global state; this swaps a private state in
    around each batch, so results are reproducible and the caller's global RNG is left untouched.
    """

    def __init__(self, data_loader, transform, seed: int):
        super().__init__(data_loader, transform)
        saved = np.random.get_state()
        np.random.seed(int(seed) % 2**32)
        self._state = np.random.get_state()
        np.random.set_state(saved)

    def __next__(self):
        item = next(self.data_loader)
        if self.transform is not None:
            saved = np.random.get_state()
            np.random.set_state(self._state)
            try:
                item = self.transform(**item)
            finally:
                self._state = np.random.get_state()
                np.random.set_state(saved)
        return item

    def _finish(self) -> None:  # same shutdown call as MultiThreadedAugmenter; nothing to stop
        pass


def make_batch_stream(loader: PatchDataLoader, transforms, num_workers: int, seed: int):
    """An iterator of augmented batches.

    ``num_workers > 0``: a ``MultiThreadedAugmenter`` with that many background processes (each
    holds a forked copy of ``loader``; transforms of worker ``k`` use ``np.random`` seeded with
    ``seed + k``; the loader's own sampling uses ``(loader.seed, k)``; each worker limits BLAS/OpenMP
    to one thread). Stop it with :func:`close_batch_stream` (``_finish()``).

    ``num_workers == 0``: everything runs in the calling process, for debugging (breakpoints and
    tracebacks inside transforms work) and for CI, where spawning processes is slow or restricted.
    It is reproducible and leaves the caller's ``np.random`` state alone.

    For a finite (validation) loader, ``loader.number_of_threads_in_multithreaded`` is set to
    ``num_workers`` so the workers split the cases instead of repeating them.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if num_workers == 0:
        return _SeededSingleThreadedAugmenter(loader, transforms, seed)
    if hasattr(loader, "number_of_threads_in_multithreaded"):
        loader.number_of_threads_in_multithreaded = num_workers
    seeds = [(int(seed) + k) % 2**32 for k in range(num_workers)]
    return MultiThreadedAugmenter(
        loader, transforms, num_processes=num_workers, num_cached_per_queue=2, seeds=seeds, pin_memory=False
    )


def close_batch_stream(stream) -> None:
    """Stop a stream from :func:`make_batch_stream` (workers joined); safe on either kind."""
    finish = getattr(stream, "_finish", None)
    if finish is not None:
        finish()
