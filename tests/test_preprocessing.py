"""Cropping, normalisation, resampling and splits on small synthetic arrays."""

from __future__ import annotations

import numpy as np
import pytest

from latdiffunet.errors import UserInputError
from latdiffunet.preprocessing.cropping import bounding_box, crop_to_nonzero, uncrop
from latdiffunet.preprocessing.normalization import normalize_channel, scheme_for_channel
from latdiffunet.preprocessing.resampling import (
    new_shape_for_spacing,
    resample_image,
    resample_labels,
    resample_probabilities,
    separate_z_axis,
)
from latdiffunet.preprocessing.splits import ensure_splits, make_kfold_splits


def test_crop_to_nonzero_and_uncrop_round_trip():
    data = np.zeros((2, 6, 8, 9), np.float32)
    data[0, 1:4, 2:6, 3:5] = 1
    data[1, 2:5, 2:3, 3:8] = 2  # second channel widens the box
    seg = np.zeros((1, 6, 8, 9), np.int16)
    seg[0, 2, 3, 4] = 1
    cropped, cseg, mask, box = crop_to_nonzero(data, seg)
    assert box == [[1, 5], [2, 6], [3, 8]]
    assert cropped.shape == (2, 4, 4, 5) and cseg.shape == (1, 4, 4, 5) and mask.shape == (4, 4, 5)
    assert cseg.sum() == 1
    restored = uncrop(cropped, box, data.shape[1:])
    np.testing.assert_array_equal(restored, data)


def test_nonzero_mask_fills_holes():
    data = np.zeros((1, 1, 7, 7), np.float32)
    data[0, 0, 1:6, 1:6] = 1
    data[0, 0, 3, 3] = 0  # dark tissue inside the body
    _, _, mask, _ = crop_to_nonzero(data)
    assert mask.all()


def test_bounding_box_of_empty_mask_is_everything():
    assert bounding_box(np.zeros((3, 4), bool)) == [[0, 3], [0, 4]]


def test_normalisation_schemes():
    rng = np.random.default_rng(0)
    img = rng.normal(100, 20, (4, 16, 16)).astype(np.float32)
    z = normalize_channel(img, "ZScoreNormalization")
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-3
    ct = normalize_channel(img, "CTNormalization", {"percentile_00_5": 90.0, "percentile_99_5": 110.0, "mean": 100.0, "std": 5.0})
    assert ct.min() >= -2 - 1e-5 and ct.max() <= 2 + 1e-5
    assert np.allclose(normalize_channel(np.full((2, 2), 255.0), "RGBTo01"), 1)
    mask = np.zeros_like(img, bool)
    mask[:, 4:12, 4:12] = True
    masked = normalize_channel(img, "ZScoreNormalization", mask=mask)
    assert abs(masked[mask].mean()) < 1e-4 and np.all(masked[~mask] == 0)
    with pytest.raises(ValueError):
        normalize_channel(img, "Bogus")
    assert scheme_for_channel("CT", False)[0] == "CTNormalization"
    assert scheme_for_channel("T1", False)[0] == "ZScoreNormalization"
    assert scheme_for_channel("R", True)[0] == "RGBTo01"


def test_resampling_shapes_and_separate_z():
    assert new_shape_for_spacing((10, 20, 20), (5.0, 1.0, 1.0), (2.5, 2.0, 2.0)) == (20, 10, 10)
    assert separate_z_axis((5.0, 1.0, 1.0), (5.0, 1.0, 1.0)) == 0
    assert separate_z_axis((1.0, 1.0, 1.2), (1.0, 1.0, 1.0)) is None
    img = np.random.default_rng(0).random((2, 4, 16, 16)).astype(np.float32)
    out = resample_image(img, (8, 8, 8), separate_axis=0)
    assert out.shape == (2, 8, 8, 8)
    # separate z uses nearest neighbour along z: every output slice equals a resampled input slice
    slice_means = sorted(set(np.round(out[0].mean(axis=(1, 2)), 5)))
    assert len(slice_means) <= 4


def test_label_resampling_keeps_thin_structure_and_values():
    seg = np.zeros((1, 20, 20), np.int16)
    seg[0, 9:12, 2:18] = 2  # a 3-voxel thin bar: nearest neighbour at half resolution may keep 1 row
    seg[0, 2:5, 2:5] = 1
    down = resample_labels(seg, (1, 10, 10), None, [0, 1, 2])
    assert set(np.unique(down)) == {0, 1, 2}
    assert (down == 2).sum() >= 8  # the bar survives at half resolution
    up = resample_labels(down, (1, 20, 20), None, [0, 1, 2])
    assert up.shape == (1, 20, 20)
    assert set(np.unique(up)) == {0, 1, 2}


def test_probability_resampling_sums_to_one():
    p = np.random.default_rng(1).random((3, 1, 8, 8)).astype(np.float32)
    p /= p.sum(0, keepdims=True)
    out = resample_probabilities(p, (1, 13, 11), None)
    assert out.shape == (3, 1, 13, 11)
    np.testing.assert_allclose(out.sum(0), 1, atol=1e-5)


def test_kfold_splits_are_seeded_disjoint_and_complete():
    ids = [f"case_{i:03d}" for i in range(23)]
    a = make_kfold_splits(ids)
    assert a == make_kfold_splits(list(reversed(ids)))
    assert len(a) == 5
    vals = [set(f["val"]) for f in a]
    assert set().union(*vals) == set(ids)
    assert sum(len(v) for v in vals) == len(ids)
    for fold in a:
        assert not set(fold["train"]) & set(fold["val"])
        assert set(fold["train"]) | set(fold["val"]) == set(ids)
    with pytest.raises(UserInputError):
        make_kfold_splits(ids[:3])


def test_splits_are_reused_and_shipped_splits_validated(tmp_path):
    import json

    ids = [f"c{i}" for i in range(10)]
    pre, raw = tmp_path / "pre", tmp_path / "raw"
    raw.mkdir()
    shipped = [{"train": ids[2:], "val": ids[:2]}]
    (raw / "splits_final.json").write_text(json.dumps(shipped))
    splits, how = ensure_splits(pre, raw, ids)
    assert splits == shipped and "copied" in how
    splits, how = ensure_splits(pre, raw, ids)
    assert how == "reused"
    (pre / "splits_final.json").write_text(json.dumps([{"train": ["nope"], "val": ids}]))
    with pytest.raises(UserInputError, match="unknown case"):
        ensure_splits(pre, raw, ids)
