"""Patch sampling from preprocessed cases and batch streams (augmentation: ``augmentation.py``).

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
import random
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from batchgenerators.dataloading.data_loader import DataLoader
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

from latdiffunet.errors import UserInputError
from latdiffunet.training.augmentation import (  # noqa: F401  (re-exported: one import place for trainers)
    ROTATION_DEGREES,
    SCALE_RANGE,
    ToTrainingArrays,
    build_transforms,
    initial_patch_size,
)
from latdiffunet.utilities.file_io import load_npz


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
        # some batchgenerators transforms (noise variance, blur sigma) draw from Python's `random`,
        # which the worker otherwise inherits unseeded from the parent: batches would not repeat
        random.seed(int(np.random.SeedSequence([self.seed, int(thread_id)]).generate_state(1)[0]))
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
# batch streams
# --------------------------------------------------------------------------------------------------


def _swap_global_rng_states(states: tuple) -> tuple:
    """Install ``(numpy, python)`` global RNG states and return the ones they replace."""
    previous = np.random.get_state(), random.getstate()
    np.random.set_state(states[0])
    random.setstate(states[1])
    return previous


class _SeededSingleThreadedAugmenter(SingleThreadedAugmenter):
    """Single-threaded augmenter whose transforms draw from private, seeded global-RNG states.

    batchgenerators' transforms use ``np.random``'s global state, and a few (noise variance, blur
    sigma) Python's ``random``; this swaps private states of both in around each batch, so results
    are reproducible and the caller's global RNGs are left untouched.
    """

    def __init__(self, data_loader, transform, seed: int):
        super().__init__(data_loader, transform)
        saved = np.random.get_state(), random.getstate()
        np.random.seed(int(seed) % 2**32)
        random.seed(int(seed))
        self._state = _swap_global_rng_states(saved)

    def __next__(self):
        item = next(self.data_loader)
        if self.transform is not None:
            saved = _swap_global_rng_states(self._state)
            try:
                item = self.transform(**item)
            finally:
                self._state = _swap_global_rng_states(saved)
        return item

    def _finish(self) -> None:  # same shutdown call as MultiThreadedAugmenter; nothing to stop
        pass


def make_batch_stream(loader: PatchDataLoader, transforms, num_workers: int, seed: int):
    """An iterator of augmented batches.

    ``num_workers > 0``: a ``MultiThreadedAugmenter`` with that many background processes (each
    holds a forked copy of ``loader``; transforms of worker ``k`` use ``np.random`` seeded with
    ``seed + k``; the loader's own sampling and Python's ``random`` use ``(loader.seed, k)``; each
    worker limits BLAS/OpenMP to one thread). Stop it with :func:`close_batch_stream` (``_finish()``).

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
