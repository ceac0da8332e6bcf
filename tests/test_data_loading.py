"""Patch sampling, augmentation and batch streams on a tiny preprocessed folder built on the fly."""

from __future__ import annotations

import random

import numpy as np
import pytest

from latdiffunet.errors import UserInputError
from latdiffunet.training.data_loading import (
    SCALE_RANGE,
    CaseCache,
    PatchDataLoader,
    build_transforms,
    close_batch_stream,
    initial_patch_size,
    load_preprocessed_case,
    make_batch_stream,
)
from latdiffunet.utilities.file_io import save_npz

SHAPE_3D = (12, 40, 36)  # (Z, Y, X)
SHAPE_2D = (1, 30, 30)
CASES_3D = ["c3d_0", "c3d_1", "c3d_2"]


def _write_case(folder, case_id, seg, image=None, raters=None, classes=(1,), rng=None):
    rng = rng or np.random.default_rng(0)
    data = (seg * 100.0 if image is None else image).astype(np.float32)[None]
    arrays = {"data": data, "seg": seg.astype(np.int8)}
    if raters is not None:
        arrays["seg_raters"] = raters.astype(np.int8)
    for c in classes:
        coords = np.argwhere(seg == c)
        if len(coords) > 50:
            coords = coords[rng.choice(len(coords), 50, replace=False)]
        arrays[f"locations_{c}"] = coords.astype(np.int32).reshape(-1, 3)
    save_npz(folder / f"{case_id}.npz", **arrays)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 small 3D cases with one small blob each (class 1; case 1 also has class 2), one 2D case,
    one 3D case with 3 raters, one case without foreground."""
    root = tmp_path_factory.mktemp("preprocessed") / "Dataset999_T" / "cfg"
    root.mkdir(parents=True)
    rng = np.random.default_rng(42)
    for i, cid in enumerate(CASES_3D):
        seg = np.zeros(SHAPE_3D, np.int8)
        z, y, x = 2 + 3 * i, 5 + 10 * i, 4 + 9 * i  # blobs in different corners, ~1 % of voxels
        seg[z : z + 3, y : y + 5, x : x + 5] = 1
        classes = (1,)
        if i == 1:
            seg[9:11, 30:34, 2:5] = 2
            classes = (1, 2)
        _write_case(root, cid, seg, classes=classes, rng=rng)
    seg2 = np.zeros(SHAPE_2D, np.int8)
    seg2[0, 20:24, 3:7] = 1
    _write_case(root, "c2d", seg2, rng=rng)
    # multi-rater: consensus = rater 0; raters differ by their blob position
    raters = np.zeros((3,) + SHAPE_3D, np.int8)
    for r in range(3):
        raters[r, 5:8, 10 + 8 * r : 14 + 8 * r, 10:14] = 1
    _write_case(root, "rater", raters[0], raters=raters, rng=rng)
    _write_case(root, "empty", np.zeros(SHAPE_3D, np.int8), image=rng.normal(size=SHAPE_3D), classes=(1,), rng=rng)
    big = np.zeros(SHAPE_3D, np.int8)  # an asymmetric L: a flip or a shift of one array shows
    big[2:10, 8:30, 6:20] = 1
    big[2:10, 8:18, 13:20] = 0
    _write_case(root, "big", big, rng=rng)
    return root


def test_load_case_and_cache(folder):
    case = load_preprocessed_case(folder, "c3d_1")
    assert case["data"].shape == (1,) + SHAPE_3D and case["data"].dtype == np.float32
    assert case["seg"].shape == SHAPE_3D and case["seg_raters"] is None
    assert sorted(case["locations"]) == [1, 2] and case["locations"][2].shape[1] == 3
    assert load_preprocessed_case(folder, "rater")["seg_raters"].shape == (3,) + SHAPE_3D
    assert load_preprocessed_case(folder, "empty")["locations"][1].shape == (0, 3)
    with pytest.raises(UserInputError):
        load_preprocessed_case(folder, "missing")

    cache = CaseCache(folder)
    a = cache.get("c3d_0")
    assert cache.get("c3d_0") is a and (cache.hits, cache.misses) == (1, 1)
    one_case = cache.nbytes
    bounded = CaseCache(folder, max_bytes=int(one_case * 2.5))  # room for two cases: LRU evicts
    for cid in ["c3d_0", "c3d_1", "c3d_0", "c3d_2"]:
        bounded.get(cid)
    assert "c3d_0" in bounded and "c3d_2" in bounded and "c3d_1" not in bounded
    assert bounded.nbytes <= bounded.max_bytes


@pytest.mark.parametrize(
    "dimension, patch, cases",
    [(3, (8, 24, 24), CASES_3D + ["rater"]), (2, (24, 20), CASES_3D), (2, (24, 20), ["c2d"])],
)
def test_batch_shapes(folder, dimension, patch, cases):
    loader = PatchDataLoader(folder, cases, patch, batch_size=4, dimension=dimension, seed=1)
    batch = loader.generate_train_batch()
    assert batch["data"].shape == (4, 1) + patch and batch["data"].dtype == np.float32
    assert batch["seg"].shape == (4, 1) + patch
    assert len(batch["keys"]) == 4 and set(batch["keys"]) <= set(cases)
    out = build_transforms(dimension, patch, augment=False)(**batch)
    assert out["seg"].dtype == np.int64 and out["data"].flags.c_contiguous


@pytest.mark.parametrize("dimension, patch", [(3, (8, 16, 16)), (2, (16, 16))])
def test_forced_foreground(folder, dimension, patch):
    cases = CASES_3D + ["empty"] if dimension == 3 else CASES_3D
    loader = PatchDataLoader(folder, CASES_3D, patch, 4, dimension, foreground_oversampling=1.0, seed=3)
    for _ in range(10):
        seg = loader.generate_train_batch()["seg"]
        assert all((s > 0).any() for s in seg)
    # B=3, fg=0.33: round(0.99) = 1 forced sample, the last one; over many batches the others miss
    loader = PatchDataLoader(folder, cases, patch, 3, dimension, foreground_oversampling=0.33, seed=4)
    assert loader.num_forced_foreground(3) == 1
    first_has_fg = []
    for _ in range(15):
        batch = loader.generate_train_batch()
        if batch["keys"][-1] != "empty":
            assert (batch["seg"][-1] > 0).any()
        first_has_fg.append(bool((batch["seg"][0] > 0).any()))
    assert not all(first_has_fg)


def test_forced_foreground_with_larger_initial_patch(folder):
    """The chosen voxel lies in the central (final) region of the sampled patch."""
    patch, initial = (8, 16, 16), (12, 30, 26)
    loader = PatchDataLoader(folder, CASES_3D, patch, 4, 3, foreground_oversampling=1.0, initial_patch_size=initial)
    crop = build_transforms(3, patch, augment=False)  # centre crop to the final patch
    for _ in range(5):
        batch = loader.generate_train_batch()
        assert batch["seg"].shape == (4, 1) + initial
        assert all((s > 0).any() for s in crop(**batch)["seg"])


def test_padding_when_case_smaller_than_patch(folder):
    patch = (16, 48, 44)  # larger than (12, 40, 36) on every axis
    loader = PatchDataLoader(folder, ["c3d_0"], patch, 2, 3, foreground_oversampling=0.0, seed=5)
    batch = loader.generate_train_batch()
    seg, data = batch["seg"][0, 0], batch["data"][0, 0]
    # the whole case is centred inside the patch: its blob is complete, the border is padding
    assert (seg == 1).sum() == 3 * 5 * 5
    assert (data == 100).sum() == 3 * 5 * 5 and (data[:2] == 0).all() and (data[-2:] == 0).all()
    assert (data[:, :4] == 0).all() and (data[:, :, :4] == 0).all()
    patch2d = (40, 36)  # 2D case (1, 30, 30)
    batch = PatchDataLoader(folder, ["c2d"], patch2d, 2, 2, seed=6).generate_train_batch()
    assert batch["data"].shape == (2, 1, 40, 36) and (batch["seg"] == 1).sum() == 2 * 16
    assert (batch["data"][:, :, :5] == 0).all() and (batch["data"][:, :, :, :3] == 0).all()


def test_rater_sampling(folder):
    loader = PatchDataLoader(folder, ["rater"], (12, 40, 36), 4, 3, foreground_oversampling=0.0, seed=7)
    seen = set()
    for _ in range(8):
        for s in loader.generate_train_batch()["seg"][:, 0]:
            ys = np.nonzero(s.any(axis=(0, 2)))[0]
            seen.add(int(ys.min()))  # each rater's blob starts at a different y
    assert seen == {10, 18, 26}
    fixed = PatchDataLoader(folder, ["rater"], (12, 40, 36), 4, 3, sample_rater=False, seed=7)
    seg = fixed.generate_train_batch()["seg"][:, 0]
    assert all(np.nonzero(s.any(axis=(0, 2)))[0].min() == 10 for s in seg)


@pytest.mark.parametrize("dimension, patch", [(3, (8, 24, 24)), (2, (24, 24))])
def test_augmentation_keeps_data_and_seg_aligned(folder, dimension, patch):
    ips = initial_patch_size(patch, 30, SCALE_RANGE)
    loader = PatchDataLoader(folder, ["big"], patch, 4, dimension, foreground_oversampling=1.0, initial_patch_size=ips)
    transforms = build_transforms(dimension, patch, augment=True)
    spatial = transforms.transforms[0]
    spatial.p_rot_per_sample = spatial.p_scale_per_sample = 1.0  # always rotate and scale here
    stream = make_batch_stream(loader, transforms, num_workers=0, seed=8)
    state_before = np.random.get_state()[1].copy()
    for _ in range(4):
        batch = next(stream)
        assert batch["data"].shape == (4, 1) + patch and batch["seg"].dtype == np.int64
        bright, fg = batch["data"] > 50, batch["seg"] == 1
        assert (bright == fg).mean() >= 0.95
        assert 2 * (bright & fg).sum() / (bright.sum() + fg.sum()) >= 0.9  # also on the object alone
    assert (np.random.get_state()[1] == state_before).all()  # caller's global RNG untouched


def test_multithreaded_stream(folder):
    patch = (16, 16)
    loader = PatchDataLoader(folder, CASES_3D, patch, 2, 2, seed=9, initial_patch_size=initial_patch_size(patch, 30, SCALE_RANGE))
    stream = make_batch_stream(loader, build_transforms(2, patch), num_workers=1, seed=9)
    try:
        batch = next(stream)
        assert batch["data"].shape == (2, 1, 16, 16) and batch["seg"].dtype == np.int64
    finally:
        close_batch_stream(stream)
    assert not stream._processes and not stream.was_initialized


@pytest.mark.parametrize("num_workers", [0, 1])
def test_same_seeds_same_augmented_batches(folder, num_workers):
    """A stream is a function of its seeds. Gaussian noise and blur draw from Python's ``random``,
    whose state differs in every process: it must neither leak into the batches nor be changed."""

    def batches(python_seed: int) -> list[np.ndarray]:
        random.seed(python_seed)
        patch = (16, 16)
        loader = PatchDataLoader(folder, CASES_3D, patch, 4, 2, seed=11, initial_patch_size=initial_patch_size(patch, 30, SCALE_RANGE))
        transforms = build_transforms(2, patch)
        for t in transforms.transforms:
            if type(t).__name__ in ("GaussianNoiseTransform", "GaussianBlurTransform"):
                t.p_per_sample = 1.0
        stream = make_batch_stream(loader, transforms, num_workers=num_workers, seed=11)
        try:
            return [next(stream)["data"] for _ in range(3)]
        finally:
            close_batch_stream(stream)

    first, second = batches(1), batches(2)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert random.getstate() == random.Random(2).getstate()  # the caller's `random` has not moved


def test_finite_loader_covers_every_case_once(folder):
    loader = PatchDataLoader(folder, CASES_3D + ["c2d"], (16, 16), 3, 2, infinite=False, seed=10)
    keys = []
    with pytest.raises(StopIteration):
        for _ in range(5):
            keys += loader.generate_train_batch()["keys"]
    assert sorted(keys) == sorted(CASES_3D + ["c2d"])


def test_initial_patch_size():
    for patch in ([40, 56, 40], [64, 48]):
        none = initial_patch_size(patch, 0, (1.0, 1.0))
        assert none == patch
        small, large = initial_patch_size(patch, 10, (1.0, 1.0)), initial_patch_size(patch, 30, (1.0, 1.0))
        assert all(p <= s <= l for p, s, l in zip(patch, small, large)) and small != large
        scaled = initial_patch_size(patch, 30, SCALE_RANGE)
        assert all(s >= (l - 2) * 1.4 for s, l in zip(scaled, large))  # l: ceil + parity of the extent
        assert all((s - p) % 2 == 0 for s, p in zip(scaled, patch))
    assert initial_patch_size([64, 64], 45, (1, 1)) == [92, 92]  # 64 * sqrt(2) = 90.5 -> even margin
