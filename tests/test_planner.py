"""Planner rules on hand-made fingerprints (no files, no GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from latdiffunet.errors import UserInputError
from latdiffunet.experiment_planning.planner import (
    cap_for_isotropy,
    class_weights,
    latent_downsampling,
    load_preset,
    plan_experiment,
    strides_from_exponents,
    target_spacing_3d,
)


def fingerprint(spacing=(1.0, 1.0, 1.0), shape=(40, 64, 64), p05_mm=(10.0, 12.0, 12.0), n=10, is_2d=False, channels=("MRI",)):
    cases = [
        {"case_id": f"c{i}", "spacing": list(spacing), "shape_before_crop": list(shape), "shape_after_crop": list(shape)}
        for i in range(n)
    ]
    return {
        "dataset_name": "Dataset999_Test",
        "num_cases": n,
        "num_channels": len(channels),
        "channel_names": {str(i): c for i, c in enumerate(channels)},
        "labels": {"background": 0, "a": 1, "b": 2},
        "is_2d_dataset": is_2d,
        "median_spacing": list(spacing),
        "median_shape_after_crop": list(shape),
        "median_relative_size_after_crop": 1.0,
        "foreground_intensity_properties_per_channel": {
            str(i): {"mean": 0, "std": 1, "median": 0, "percentile_00_5": -1, "percentile_99_5": 1, "min": -2, "max": 2}
            for i in range(len(channels))
        },
        "class_voxel_frequency": {"0": 0.96, "1": 0.03, "2": 0.01},
        "object_sizes_per_class": {
            "1": {"num_objects": n, "p05_extent_mm": list(p05_mm)},
            "2": {"num_objects": n, "p05_extent_mm": [x * 2 for x in p05_mm]},
        },
        "cases": cases,
    }


def test_anisotropic_target_spacing_uses_10th_percentile():
    fp = fingerprint(spacing=(5.0, 0.8, 0.8), shape=(20, 256, 256))
    for i, c in enumerate(fp["cases"]):
        c["spacing"] = [3.0 + i * 0.5, 0.8, 0.8]
    spacing, why = target_spacing_3d(fp)
    assert "anisotropic" in why
    assert spacing[0] == pytest.approx(np.percentile([3.0 + i * 0.5 for i in range(10)], 10))
    spacing_iso, why_iso = target_spacing_3d(fingerprint())
    assert spacing_iso == [1.0, 1.0, 1.0] and why_iso == "median spacing per axis"


def test_latent_factor_respects_smallest_structure():
    cfg = load_preset("default")["latent"]
    ks, reasons = latent_downsampling(np.array([9.0, 3.0, 40.0]), np.array([64, 64, 64]), cfg)
    assert ks == [2, 0, 3]  # 9/4 >= 2 but 9/8 < 2; 3/2 < 2; 40 -> preset max 8
    assert "no downsampling" in reasons[1]
    capped = cap_for_isotropy(ks, np.array([1.0, 1.0, 1.0]), reasons)
    assert capped == [0, 0, 0] or max(capped) - min(capped) <= 1
    assert strides_from_exponents([1, 2]) == [[1, 2], [2, 2]]


def test_isotropy_cap_allows_coarse_axis_of_anisotropic_data():
    reasons = ["", "", ""]
    assert cap_for_isotropy([0, 2, 2], np.array([5.0, 1.0, 1.0]), reasons) == [0, 2, 2]


def test_class_weights_favour_rare_classes():
    w = class_weights(fingerprint(), [0, 1, 2], max_weight=10)
    assert w[0] == 1.0 and 1 < w[1] < w[2] <= 10
    assert w[2] == pytest.approx(np.sqrt(0.96 / 0.01), rel=1e-3)


def test_plan_3d_dataset_has_2d_and_3d_and_fits_budget():
    preset = load_preset("default")
    plans = plan_experiment(fingerprint(), preset)
    assert set(plans["configurations"]) == {"2d", "3d"}
    for name, cfg in plans["configurations"].items():
        factor = np.asarray(cfg["latent"]["downsampling_factor"])
        assert np.all(np.asarray(cfg["patch_size"]) % factor == 0)
        assert np.all(np.asarray(cfg["latent"]["size"]) * factor == np.asarray(cfg["patch_size"]))
        assert cfg["batch_size"] >= 2
        assert cfg["patch_and_batch_why"]["estimated_bytes_at_min_batch"] <= preset["gpu_memory_budget_gb"] * 1024**3
        # the smallest structure still spans >= 2 latent voxels on every axis
        assert min(cfg["latent"]["smallest_structure"]["p05_extent_latent_voxels"]) >= 2
        assert cfg["network"]["dim"] == cfg["dimension"]
        assert cfg["diffusion"]["parameterization"] in ("x0", "v")


def test_smaller_memory_budget_gives_smaller_patch_or_batch():
    big = load_preset("default")
    small = load_preset("default")
    small["gpu_memory_budget_gb"] = 0.15
    fp = fingerprint(shape=(96, 160, 160))
    a = plan_experiment(fp, big, ["3d"])["configurations"]["3d"]
    b = plan_experiment(fp, small, ["3d"])["configurations"]["3d"]
    assert np.prod(b["patch_size"]) * b["batch_size"] < np.prod(a["patch_size"]) * a["batch_size"]
    assert np.prod(b["patch_size"]) <= np.prod(a["patch_size"])


def test_2d_dataset_gets_only_2d_and_rgb_normalisation():
    fp = fingerprint(spacing=(999.0, 1.0, 1.0), shape=(1, 256, 256), p05_mm=(999.0, 20.0, 20.0), is_2d=True, channels=("R", "G", "B"))
    plans = plan_experiment(fp, load_preset("tiny"))
    assert list(plans["configurations"]) == ["2d"]
    cfg = plans["configurations"]["2d"]
    assert [n["scheme"] for n in cfg["normalization"]] == ["RGBTo01"] * 3
    assert np.prod(cfg["patch_size"]) <= load_preset("tiny")["patch_size"]["max_voxels_2d"]
    with pytest.raises(UserInputError, match="not available"):
        plan_experiment(fp, load_preset("tiny"), ["3d"])


def test_unknown_preset_is_a_user_error():
    with pytest.raises(UserInputError, match="unknown preset"):
        load_preset("nonexistent")
