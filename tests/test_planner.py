"""Planner rules on hand-made fingerprints (no files, no GPU).

The last test (slow, real data) guards the reference plans of the shared 2D multi-rater datasets
(LIDC, QUBIQ) in ``plans/reference``, in the style of the Hippocampus one in
``test_hippocampus_end_to_end.py``; regenerate them on purpose with
``LATDIFF_UPDATE_REFERENCE_PLANS=1 pytest tests/test_planner.py -k reference``.
"""

from __future__ import annotations

import copy

import configparser
import json
import os

import numpy as np
import pytest

from conftest import REPO_ROOT, assert_reference_plans, load_converter, module_folders, shared_dataset
from latdiffunet.errors import UserInputError
from latdiffunet.experiment_planning.fingerprint import _objects, _size_summary, weighted_percentile
from latdiffunet.experiment_planning.latent_choice import cap_for_isotropy, latent_downsampling, strides_from_exponents
from latdiffunet.experiment_planning.planner import (
    PRESETS,
    choose_preset,
    class_weights,
    load_preset,
    plan_experiment,
    target_spacing_3d,
    training_for_batch,
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
    # isotropic voxels: the axis that may not be downsampled (1 mm latent voxels) caps the others,
    # since 2 or 8 mm would be over 1.5x coarser
    assert capped == [0, 0, 0]
    assert [r.startswith("x1: capped") for r in reasons] == [True, False, True]
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
        assert min(cfg["latent"]["smallest_structure"]["extent_latent_voxels"]) >= 2
        assert cfg["network"]["dim"] == cfg["dimension"]
        assert cfg["diffusion"]["parameterization"] in ("x0", "v")


@pytest.mark.parametrize("preset_name", ["tiny", "cpu", "default"])
def test_every_preset_trains_the_image_encoder_with_its_segmentation_head(preset_name):
    """The head is what brought the Dice of one sample level with the mean on Hippocampus, and its
    mask as the denoiser's prior lifted both again; a preset that drops either silently loses that."""
    plans = plan_experiment(fingerprint(), load_preset(preset_name), ["2d"])
    assert plans["configurations"]["2d"]["network"]["segmentation_head"] == {"enabled": True, "condition_denoiser": True}


def test_multi_rater_data_condition_the_denoiser_on_the_head_and_say_why():
    """The head learns the raters' mean; as the denoiser's prior it improved GED and HM-IoU on QUBIQ
    (side by side) and LIDC: multi-rater plans use it too, and their reason names the raters and
    the evidence, not the single-rater one."""
    fp = fingerprint() | {"num_raters": 4}
    cfg = plan_experiment(fp, load_preset("tiny"), ["2d"])["configurations"]["2d"]
    assert cfg["network"]["segmentation_head"] == {"enabled": True, "condition_denoiser": True}
    why = cfg["network_why"]["segmentation_head.condition_denoiser"]
    assert "4 raters" in why and "QUBIQ" in why and "LIDC" in why
    single = plan_experiment(fingerprint(), load_preset("tiny"), ["2d"])["configurations"]["2d"]
    assert "Hippocampus" in single["network_why"]["segmentation_head.condition_denoiser"]


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


def test_presets_have_one_source_shipped_as_package_data():
    """The planner reads the presets in the package, setup.cfg ships exactly those, and no second
    copy exists in the repository to drift from them (``plans/presets`` used to be one)."""
    folder = REPO_ROOT / "latdiffunet" / "experiment_planning" / "presets"
    files = sorted(folder.glob("*.json"))
    assert [f.stem for f in files] == sorted(PRESETS)
    for f in files:
        own = json.loads(f.read_text())
        base = own.pop("inherits_from", None)  # an inheriting preset is its base plus its own (top-level) keys
        assert load_preset(f.stem) == (load_preset(base) if base else {}) | own
    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")
    shipped = setup["options.package_data"]["latdiffunet.experiment_planning"].split()
    assert [f for f in files if not any(f.relative_to(folder.parent).match(g) for g in shipped)] == []
    copies = [p for top in ("plans", "latdiffunet") for p in (REPO_ROOT / top).glob("**/presets") if p != folder]
    assert copies == [] and not os.path.lexists(REPO_ROOT / "plans" / "presets")


# ------------------------------------------------------------------------------------------------
# the device the default plans are sized for (issue 11)
# ------------------------------------------------------------------------------------------------
SIZING_KEYS = ("patch_size", "batch_size", "latent", "network", "diffusion", "inference", "training")


def test_default_plans_are_cpu_sized_without_a_gpu_and_say_why():
    """No --preset: auto picks the CPU when torch sees no GPU; the plans keep the default identifier
    (latdiff_train D 0 finds them) with the tiny preset's sizing, and target/target_why say so."""
    fp = fingerprint(shape=(40, 56, 40))
    cpu, why = choose_preset(None, "auto", dataset="Dataset999_Test", cuda_available=lambda: False)
    plans = plan_experiment(fp, cpu, None, why)
    assert plans["plans_name"] == "latdiffPlans" and plans["target"] == "cpu" and plans["preset"] == "cpu"
    assert "no CUDA GPU" in plans["target_why"] and "-d Dataset999_Test --target gpu" in plans["target_why"]
    # 3d epochs cost ~10x on the CPU and latdiff_train takes 3d when planned: 2d only unless asked for
    assert list(plans["configurations"]) == ["2d"] and "-c 2d 3d" in plans["configurations_why"]
    both = plan_experiment(fp, cpu, ["2d", "3d"], why)
    assert list(both["configurations"]) == ["2d", "3d"] and both["configurations_why"] == "chosen with -c"
    tiny = plan_experiment(fp, load_preset("tiny"))
    for name, cfg in both["configurations"].items():
        assert cfg["data_identifier"] == f"latdiffPlans_{name}"
        assert {k: cfg[k] for k in SIZING_KEYS} == {k: tiny["configurations"][name][k] for k in SIZING_KEYS}
    gpu, gpu_why = choose_preset(None, "auto", cuda_available=lambda: True)
    assert gpu == load_preset("default") and "CUDA GPU is visible" in gpu_why and "--target cpu" in gpu_why
    for target, expected in (("cpu", "cpu"), ("gpu", "default")):  # explicit targets never ask torch
        chosen, _ = choose_preset(None, target, cuda_available=lambda: pytest.fail("asked for a GPU"))
        assert chosen["preset"] == expected and chosen["target"] == target


def test_gpu_memory_budget_means_gpu_plans_and_a_contradiction_is_a_user_error():
    chosen, why = choose_preset(None, "auto", gpu_memory_gb=24, cuda_available=lambda: False)
    assert chosen["target"] == "gpu" and chosen["gpu_memory_budget_gb"] == 24 and "--gpu_memory_gb" in why
    assert choose_preset("tiny", "auto")[0] == load_preset("tiny")  # an explicit preset keeps its sizing
    with pytest.raises(UserInputError, match="sized for the cpu, but --target gpu"):
        choose_preset("tiny", "gpu")


def test_cli_default_target_follows_the_machine(tmp_path, monkeypatch, capsys):
    """``latdiff_plan_and_preprocess -d D`` without --preset/--target writes CPU plans when torch sees
    no GPU and GPU plans when it sees one, into the same latdiffPlans.json."""
    from synthetic import make_synthetic_dataset

    from latdiffunet.experiment_planning import planner
    from latdiffunet.experiment_planning.cli import main

    for key in ("RAW", "PREPROCESSED", "RESULTS"):
        monkeypatch.setenv(f"LATDIFF_{key}", str(tmp_path / key.lower()))
    make_synthetic_dataset(tmp_path / "raw", num_cases=4)
    plans_file = tmp_path / "preprocessed" / "Dataset900_Synth" / "latdiffPlans.json"
    for cuda, target, preset in ((False, "cpu", "cpu"), (True, "gpu", "default")):
        monkeypatch.setattr(planner, "cuda_is_available", lambda: cuda)
        assert main(["-d", "900", "-np", "1", "--no_preprocess"]) == 0
        plans = json.loads(plans_file.read_text())
        assert (plans["target"], plans["preset"]) == (target, preset)
        assert f"plans for the {target}" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# latent factor from the structures that matter, not from specks
# ------------------------------------------------------------------------------------------------
def _square(seg, y, x, size, label):
    seg[0, y : y + size, x : x + size] = label


def _summaries(label_maps: list[np.ndarray], labels=(1, 2), spacing=(999.0, 1.0, 1.0)) -> dict:
    """``object_sizes_per_class`` computed by the fingerprint's own code from label maps."""
    return {
        str(c): _size_summary([(e, n, np.asarray(spacing)) for seg in label_maps for e, n in _objects(seg, c)])
        for c in labels
    }


def _speckled_cases(n=32, shape=(1, 128, 128), small_class_2=None, seed=0) -> list[np.ndarray]:
    """Per image: a real object of class 1 (20x20) and class 2 (24x24), plus 8 specks of class 1
    (1-3 voxels, far apart: 8 of its 9 objects, but < 5 % of its voxels); optionally class 2 made
    of 5x5 objects only."""
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(n):
        seg = np.zeros(shape, np.uint8)
        _square(seg, 10, 10, 20, 1)
        if small_class_2:
            for j in range(4):
                _square(seg, 40 + 12 * j, 90, small_class_2, 2)
        else:
            _square(seg, 60, 60, 24, 2)
        for j in range(8):
            seg[0, 100 + 8 * (j // 4), 8 + 8 * (j % 4) : 8 + 8 * (j % 4) + int(rng.integers(1, 4))] = 1
        maps.append(seg)
    return maps


def _fingerprint_2d(label_maps, n=32, shape=(1, 128, 128)):
    fp = fingerprint(spacing=(999.0, 1.0, 1.0), shape=shape, n=n, is_2d=True)
    fp["object_sizes_per_class"] = _summaries(label_maps)
    return fp


def test_weighted_percentile_is_the_extent_holding_the_smallest_voxels():
    # 90 specks of 1 voxel (90 voxels) and 10 objects of extent 20 (400 voxels each)
    extents = np.array([[1.0]] * 90 + [[20.0]] * 10)
    voxels = np.array([1.0] * 90 + [400.0] * 10)
    assert np.percentile(extents, 5) == 1.0  # the plain percentile is a speck
    assert weighted_percentile(extents, voxels, 5)[0] == 20.0  # specks hold 90 / 4090 = 2 % of the voxels
    assert weighted_percentile(np.array([[5.0]] * 7), np.ones(7), 5)[0] == 5.0


def test_fingerprint_summary_records_weighted_extent_and_specks():
    summary = _summaries(_speckled_cases(n=4))["1"]
    assert summary["num_objects"] == 4 * 9
    assert summary["p05_extent_voxels"][1:] == [1.0, 1.0]  # plain percentile: a speck
    assert summary["p05_volume_weighted_extent_voxels"][1:] == [20.0, 20.0]
    assert summary["num_specks"] == 4 * 8 and summary["specks_fraction_of_voxels"] < 0.05
    assert summary["num_voxels"] == sum(int((m == 1).sum()) for m in _speckled_cases(n=4))


@pytest.mark.parametrize("preset_name", ["tiny", "default"])
def test_specks_do_not_prevent_latent_compression(preset_name):
    preset = load_preset(preset_name)
    cfg = plan_experiment(_fingerprint_2d(_speckled_cases()), preset)["configurations"]["2d"]
    factor = cfg["latent"]["downsampling_factor"]
    assert min(factor) >= min(4, preset["latent"]["max_downsampling_per_axis"]), cfg["latent"]["why_factor"]
    smallest = cfg["latent"]["smallest_structure"]
    assert smallest["statistic"] == "p05_volume_weighted_extent_mm" and smallest["num_specks"] > 0
    assert smallest["unweighted_p05_extent_voxels"] == [1.0, 1.0]
    assert min(smallest["extent_latent_voxels"]) >= preset["latent"]["min_object_extent_in_latent_voxels"]


def test_class_of_only_small_objects_still_limits_the_factor():
    cfg = plan_experiment(_fingerprint_2d(_speckled_cases(small_class_2=5)), load_preset("default"))["configurations"]["2d"]
    assert cfg["latent"]["downsampling_factor"] == [2, 2]  # 5 / 2 >= 2 latent voxels, 5 / 4 < 2
    smallest = cfg["latent"]["smallest_structure"]
    assert smallest["class"] == "2" and smallest["extent_voxels"] == [5.0, 5.0]
    assert "volume-weighted 5th-percentile object of class 2" in cfg["latent"]["why_factor"][0]


def test_old_fingerprint_without_weighted_statistic_still_plans():
    cfg = plan_experiment(fingerprint(), load_preset("default"), ["3d"])["configurations"]["3d"]
    smallest = cfg["latent"]["smallest_structure"]
    assert smallest["statistic"] == "p05_extent_mm" and "--clean" in smallest["statistic_why"]


# ------------------------------------------------------------------------------------------------
# small 2D datasets: whole-image patches and a batch floor
# ------------------------------------------------------------------------------------------------
def test_small_2d_dataset_gets_whole_image_patch_and_batch_floor():
    preset = load_preset("tiny")
    fp = fingerprint(spacing=(999.0, 1.0, 1.0), shape=(1, 128, 128), p05_mm=(999.0, 20.0, 20.0), n=32, is_2d=True)
    cfg = plan_experiment(fp, preset)["configurations"]["2d"]
    assert cfg["patch_size"] == [128, 128]
    assert cfg["batch_size"] >= 8
    why = cfg["patch_and_batch_why"]
    assert why["batch_by_5_percent_of_dataset"] < 8 <= why["batch_floor_for_small_datasets"]
    assert "small-dataset floor 8" in why["batch_why"]
    # the floor never exceeds what memory allows
    preset["gpu_memory_budget_gb"] = 0.05
    small = plan_experiment(fp, preset)["configurations"]["2d"]
    assert small["batch_size"] <= max(small["patch_and_batch_why"]["batch_by_memory"], preset["batch_size"]["min"])


def test_cpu_plans_cap_the_voxels_a_step_trains_on_and_gpu_plans_do_not():
    """CPU presets size the batch by the time a step takes (voxels), GPU presets by memory: a
    Hippocampus-like 3d dataset gets 4 patches of 32^3 from ``tiny`` where memory allowed 12."""
    fp = fingerprint(shape=(36, 50, 35), p05_mm=(11.0, 13.0, 18.0), n=260)
    tiny = load_preset("tiny")
    cfg = plan_experiment(fp, tiny)["configurations"]["3d"]
    why = cfg["patch_and_batch_why"]
    cap = tiny["batch_size"]["max_voxels_per_step"]
    assert cfg["batch_size"] == why["batch_by_voxels_per_step"] == cap // int(np.prod(cfg["patch_size"]))
    assert why["batch_by_memory"] > cfg["batch_size"], "memory alone would have allowed a larger batch"
    assert f"{cap} voxels per step" in why["batch_why"] and why["voxels_per_step_evidence"]
    uncapped = copy.deepcopy(tiny)
    del uncapped["batch_size"]["max_voxels_per_step"]
    assert plan_experiment(fp, uncapped)["configurations"]["3d"]["batch_size"] > cfg["batch_size"]
    for name, gpu_cfg in plan_experiment(fp, load_preset("default"))["configurations"].items():
        assert "batch_by_voxels_per_step" not in gpu_cfg["patch_and_batch_why"], name


def test_cpu_plans_give_the_sample_loss_a_share_of_the_batch_on_single_rater_data_only():
    """The sample loss runs the sampler on ``sample_loss_images`` images per step: the tiny plans
    set it to a share of the batch, at most 8, on single-rater data (on Kvasir-SEG at batch 8 all 8
    images doubled a step), keep the trainer's default on multi-rater data (it learns the raters' spread
    there) and say why in ``training_why``; GPU presets leave it to the trainer."""
    from latdiffunet.training.config import TrainerConfig

    fp = fingerprint(shape=(36, 50, 35), p05_mm=(11.0, 13.0, 18.0), n=260)
    tiny = load_preset("tiny")
    share, cap = tiny["training"]["sample_loss_share_of_batch"], tiny["training"]["sample_loss_max_images"]
    for name, cfg in plan_experiment(fp, tiny)["configurations"].items():
        expected = min(cap, max(1, int(cfg["batch_size"] * share)))
        assert cfg["training"]["sample_loss_images"] == expected, name
        assert "sample_loss_share_of_batch" not in cfg["training"], "the preset's rule is resolved, not copied"
        assert f"= {expected} image" in cfg["training_why"]["sample_loss_images"]
        assert TrainerConfig.from_plans(cfg).sample_loss_images == expected
    rule = {"sample_loss_share_of_batch": 0.5, "sample_loss_max_images": 8}
    assert training_for_batch(rule, 8)[0] == {"sample_loss_images": 4}
    capped, why = training_for_batch(rule, 32)
    assert capped == {"sample_loss_images": 8} and "at most 8 = 8 images" in why["sample_loss_images"]
    assert training_for_batch(rule, 1)[0] == {"sample_loss_images": 1}
    multi = plan_experiment(fp | {"num_raters": 4}, tiny)["configurations"]["2d"]
    assert "sample_loss_images" not in multi["training"]
    assert TrainerConfig.from_plans(multi).sample_loss_images == TrainerConfig().sample_loss_images
    assert "4 raters" in multi["training_why"]["sample_loss_images"]
    for name, gpu_cfg in plan_experiment(fp, load_preset("default"))["configurations"].items():
        assert "sample_loss_images" not in gpu_cfg["training"] and "training_why" not in gpu_cfg, name


def _large_object_cases(size: int, n=16, shape=(1, 256, 256)) -> list[np.ndarray]:
    maps = []
    for _ in range(n):
        seg = np.zeros(shape, np.uint8)
        _square(seg, 60, 60, size, 1)
        _square(seg, 10, 200, 6, 2)
        maps.append(seg)
    return maps


def test_2d_patch_that_cannot_see_its_objects_gets_coarser_spacing():
    """Objects of 110 px in 256 x 256 images, a voxel cap of 128 x 128: the in-plane spacing is
    coarsened until the patch spans two median objects (the image at most), and the plans say why.
    Small objects, or images the patch already covers, keep their spacing; so does 3d."""
    preset = load_preset("tiny")
    big = _fingerprint_2d(_large_object_cases(110), n=16, shape=(1, 256, 256))
    cfg = plan_experiment(big, preset)["configurations"]["2d"]
    factor = cfg["context"]["factor"]
    patch_mm = np.asarray(cfg["patch_size"]) * np.asarray(cfg["spacing"][1:])
    assert 1.5 < factor <= 256 / 128 and cfg["spacing"][1:] == [pytest.approx(factor)] * 2
    assert patch_mm.min() >= 2 * 110 * 0.95 or patch_mm.min() >= 256 * 0.95
    assert "x%g" % factor in cfg["spacing_why"] and cfg["median_image_size_in_voxels"][0] < 256

    small = plan_experiment(_fingerprint_2d(_large_object_cases(30), n=16, shape=(1, 256, 256)), preset)
    assert small["configurations"]["2d"]["context"]["factor"] == 1.0
    assert small["configurations"]["2d"]["spacing"][1:] == [1.0, 1.0]
    covered = plan_experiment(_fingerprint_2d(_speckled_cases()), preset)["configurations"]["2d"]
    assert covered["context"]["factor"] == 1.0 and covered["spacing"][1:] == [1.0, 1.0]

    volume = fingerprint(spacing=(1.0, 1.0, 1.0), shape=(64, 256, 256))
    volume["object_sizes_per_class"] = _summaries([m[[0] * 64] for m in _large_object_cases(110, n=2)], spacing=(1.0, 1.0, 1.0))
    planned = plan_experiment(volume, preset, ["3d"])["configurations"]["3d"]
    assert planned["spacing"] == [1.0, 1.0, 1.0] and "context" not in planned


# ------------------------------------------------------------------------------------------------
# reference plans of the shared 2D datasets (slow, real data)
# ------------------------------------------------------------------------------------------------
REFERENCE_2D = {  # dataset -> (converter, shared folder, dataset id, converter options)
    "Dataset010_KvasirSEG": ("convert_polyps", "Kvasir-SEG", "10", {"dataset": "kvasir"}),
    "Dataset011_CVCClinicDB": ("convert_polyps", "CVC-ClinicDB", "11", {"dataset": "cvc"}),
    "Dataset020_LIDCSlices": ("convert_lidc", "LIDC-IDRI-slices", "20", {}),
    "Dataset030_QUBIQBrainGrowth": ("convert_qubiq", "QUBIQ-brain-growth", "30", {}),
}


@pytest.fixture(scope="module", params=sorted(REFERENCE_2D))
def planned_2d(request, tmp_path_factory):
    dataset = request.param
    converter, folder, dataset_id, options = REFERENCE_2D[dataset]
    source = shared_dataset(folder)
    with module_folders(tmp_path_factory.mktemp(dataset)) as env:
        load_converter(converter).convert(source, env["LATDIFF_RAW"], **options)
        from latdiffunet.experiment_planning.cli import main

        # explicit target and preset: the references must not depend on whether this machine has a GPU
        for sizing in (["--target", "gpu"], ["--preset", "tiny"]):
            assert main(["-d", dataset_id, *sizing, "-np", "2", "--no_preprocess"]) == 0
        yield dataset, env["LATDIFF_PREPROCESSED"] / dataset


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("plans_name", ["latdiffPlans", "latdiffPlans_tiny"])
def test_reference_plans_unchanged_2d_datasets(planned_2d, plans_name):
    dataset, out = planned_2d
    produced = json.loads((out / f"{plans_name}.json").read_text())
    assert_reference_plans(produced, dataset, plans_name)
    cfg = produced["configurations"]["2d"]  # the latent is compressed (the issue: specks chose 1x1)
    assert min(cfg["latent"]["downsampling_factor"]) >= 4
