"""From fingerprint + preset to plans: every choice stored next to the inputs that drove it.

The planner needs no GPU: patch and batch size come from an analytic estimate of the training
memory of the planned networks (``latdiffunet.networks.memory``), as nnU-Net does. What is new
compared with nnU-Net is the *latent* plan: how far the mask autoencoder may downsample each axis
is bounded by the smallest structures (5th-percentile object extent must still span at least two
latent voxels), and the latent channel count keeps the compression ratio fixed.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import numpy as np

from latdiffunet import __version__
from latdiffunet.errors import UserInputError
from latdiffunet.preprocessing.normalization import scheme_for_channel
from latdiffunet.preprocessing.resampling import ANISOTROPY_THRESHOLD
from latdiffunet.raw_dataset import is_plain_name
from latdiffunet.utilities.file_io import load_json

PRESETS = ("default", "tiny")


def load_preset(name_or_path: str) -> dict:
    """A built-in preset by name, or a JSON file of the same shape."""
    if name_or_path in PRESETS:
        text = resources.files("latdiffunet.experiment_planning").joinpath(f"presets/{name_or_path}.json").read_text()
        return json.loads(text)
    path = Path(name_or_path)
    if not path.is_file():
        raise UserInputError(
            f"unknown preset {name_or_path!r}", fix=f"use one of {', '.join(PRESETS)} or the path of a preset JSON file"
        )
    preset = load_json(path, what="preset")
    if not isinstance(preset, dict) or not is_plain_name(preset.get("plans_name")):
        raise UserInputError(
            "a preset must be a JSON object whose 'plans_name' is a plain file name (it names the plans file)",
            path=path, fix="start from latdiffunet/experiment_planning/presets/tiny.json",
        )
    return preset


REQUIRED_CONFIGURATION_KEYS = (
    "data_identifier", "dimension", "spacing", "patch_size", "normalization", "resampling", "network", "diffusion", "inference",
)


def load_plans(path: str | Path, what: str = "plans", fix: str | None = None) -> dict:
    """A plans file as training and prediction use it, checked so that a damaged or hand-edited file
    gives a message naming it instead of a traceback, and so that its ``data_identifier`` (a folder
    name joined to the preprocessed folder) cannot point elsewhere."""
    path = Path(path)
    fix = fix or "rerun latdiff_plan_and_preprocess to write the plans again (or restore the file)"
    plans = load_json(path, what, fix=fix)
    if not isinstance(plans, dict) or not isinstance(plans.get("configurations"), dict) or not plans["configurations"]:
        raise UserInputError(f"{what} must be a JSON object with a non-empty 'configurations' object", path=path, fix=fix)
    for key in ("plans_name", "foreground_intensity_properties_per_channel"):
        if key not in plans:
            raise UserInputError(f"{what} lack the key {key!r}", path=path, fix=fix)
    for name, cfg in plans["configurations"].items():
        if not isinstance(cfg, dict):
            raise UserInputError(f"configuration {name!r} must be an object", path=path, fix=fix)
        missing = [k for k in REQUIRED_CONFIGURATION_KEYS if k not in cfg]
        if missing:
            raise UserInputError(f"configuration {name!r} lacks {missing}", path=path, fix=fix)
        if not is_plain_name(cfg["data_identifier"]):
            raise UserInputError(
                f"configuration {name!r} has data_identifier {cfg['data_identifier']!r}, which is not a plain folder name "
                "(no '/', '\\', '..' or absolute paths)", path=path, fix=fix,
            )
    return plans


def target_spacing_3d(fingerprint: dict) -> tuple[list[float], str]:
    """Median spacing, except for strongly anisotropic data (nnU-Net's rule).

    If one axis is much coarser than the others *and* has few voxels, resampling it to the median
    would interpolate a lot; the 10th percentile keeps more of the thin-slice scans' detail.
    """
    spacings = np.asarray([c["spacing"] for c in fingerprint["cases"]], dtype=float)
    shapes = np.asarray([c["shape_after_crop"] for c in fingerprint["cases"]], dtype=float)
    target = np.median(spacings, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    median_shape = np.median(shapes, axis=0)
    anisotropic = target[worst] > ANISOTROPY_THRESHOLD * max(target[others])
    few_slices = median_shape[worst] * ANISOTROPY_THRESHOLD < min(median_shape[others])
    if anisotropic and few_slices:
        lowres = float(np.percentile(spacings[:, worst], 10))
        target[worst] = max(lowres, max(target[others]) + 1e-5)
        return target.tolist(), f"anisotropic (axis {worst}): 10th percentile of its spacings, median elsewhere"
    return target.tolist(), "median spacing per axis"


def _median_shape_at_spacing(fingerprint: dict, target: list[float], axes: list[int]) -> np.ndarray:
    shapes = np.asarray([c["shape_after_crop"] for c in fingerprint["cases"]], dtype=float)
    spacings = np.asarray([c["spacing"] for c in fingerprint["cases"]], dtype=float)
    resampled = shapes[:, axes] * spacings[:, axes] / np.asarray(target)[axes]
    return np.maximum(1, np.round(np.median(resampled, axis=0)))


def smallest_object_extent_voxels(fingerprint: dict, target: list[float], axes: list[int]) -> tuple[np.ndarray, str | None]:
    """5th-percentile object extent (min over classes) in voxels at the target spacing."""
    best = None
    which = None
    for label, summary in fingerprint["object_sizes_per_class"].items():
        if summary.get("num_objects", 0) == 0:
            continue
        vox = np.asarray(summary["p05_extent_mm"], dtype=float)[axes] / np.asarray(target)[axes]
        if best is None or np.prod(vox) < np.prod(best):
            best, which = vox, label
    return (best if best is not None else np.full(len(axes), np.inf)), which


def latent_downsampling(p05_vox: np.ndarray, patch: np.ndarray, latent_cfg: dict) -> tuple[list[int], list[str]]:
    """Downsampling exponent per axis and, per axis, why it is what it is."""
    max_k = int(math.log2(latent_cfg["max_downsampling_per_axis"]))
    need = latent_cfg["min_object_extent_in_latent_voxels"]
    ks, reasons = [], []
    for extent, size in zip(p05_vox, patch):
        k = 0
        while k < max_k and extent / 2 ** (k + 1) >= need and size / 2 ** (k + 1) >= latent_cfg["min_latent_edge"]:
            k += 1
        if k == max_k:
            reasons.append(f"preset maximum x{2 ** k}")
        elif extent / 2 ** (k + 1) < need:
            if k == 0:
                reasons.append(
                    f"no downsampling: the 5th-percentile object ({extent:.1f} voxels) would span < {need} latent voxels"
                )
            else:
                reasons.append(f"x{2 ** k}: 5th-percentile object of {extent:.1f} voxels keeps >= {need} latent voxels")
        else:
            reasons.append(f"x{2 ** k}: limited by the patch edge ({int(size)} voxels)")
        ks.append(k)
    return ks, reasons


def cap_for_isotropy(ks: list[int], spacing: np.ndarray, reasons: list[str]) -> list[int]:
    """No axis's latent voxel may be over 1.5x coarser (in mm) than the finest latent axis.

    The object rule alone can compress a long axis harder than the others; a lopsided latent
    grid then blurs shapes along that axis, and the denoiser's convolutions see warped anatomy.
    """
    finest = min(sp * 2**k for sp, k in zip(spacing, ks))
    capped = []
    for axis, (sp, k) in enumerate(zip(spacing, ks)):
        new_k = k
        while new_k > 0 and sp * 2**new_k > 1.5 * finest:
            new_k -= 1
        if new_k != k:
            reasons[axis] = f"x{2 ** new_k}: capped so latent voxels stay near-isotropic ({finest:g} mm finest)"
        capped.append(new_k)
    return capped


def strides_from_exponents(ks: list[int]) -> list[list[int]]:
    """Per-stage strides; coarse axes (small exponent) are downsampled in the *last* stages,
    like nnU-Net, so early stages work on roughly isotropic voxels."""
    stages = max(ks) if ks else 0
    return [[2 if stage >= stages - k else 1 for k in ks] for stage in range(stages)]


def denoiser_strides(latent_size: np.ndarray, levels: int, min_edge: int) -> list[list[int]]:
    strides, size = [], latent_size.astype(float).copy()
    for _ in range(levels):
        stride = [2 if s / 2 >= min_edge else 1 for s in size]
        if max(stride) == 1:
            break
        strides.append(stride)
        size = size / np.asarray(stride)
    return strides


def latent_channels(num_classes: int, factor: np.ndarray, latent_cfg: dict) -> tuple[int, str]:
    """Channels so that (classes x voxels) / (channels x latent voxels) ~ the preset's ratio."""
    ideal = num_classes * float(np.prod(factor)) / latent_cfg["compression_ratio"]
    c = int(np.clip(math.ceil(ideal), latent_cfg["min_channels"], latent_cfg["max_channels"]))
    return c, (
        f"{num_classes} classes x {int(np.prod(factor))} voxels per latent voxel / compression ratio "
        f"{latent_cfg['compression_ratio']} = {ideal:.2f}, clipped to [{latent_cfg['min_channels']}, {latent_cfg['max_channels']}]"
    )


def class_weights(fingerprint: dict, class_labels: list[int], max_weight: float) -> list[float]:
    """sqrt(most frequent / own frequency), clipped: rare small structures count more in the
    autoencoder's cross-entropy (MedSegLatDiff) without letting one rare class dominate."""
    freq = np.asarray([max(fingerprint["class_voxel_frequency"][str(c)], 1e-12) for c in class_labels])
    return np.clip(np.sqrt(freq.max() / freq), 1.0, max_weight).round(4).tolist()


def network_config(dim: int, in_channels: int, num_classes: int, latent_c: int, ae_strides, den_strides, preset: dict) -> dict:
    n = preset["networks"]
    return {
        "dim": dim,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "latent_channels": latent_c,
        "strides": ae_strides,
        "autoencoder": {"base_channels": n["autoencoder_base_channels"], "variational": True},
        "image_encoder": {"base_channels": n["image_encoder_base_channels"]},
        "denoiser": {
            "base_channels": n["denoiser_base_channels"],
            "channel_multipliers": n["denoiser_channel_multipliers"][: len(den_strides) + 1],
            "strides": den_strides,
            "attention_at_bottleneck": n["attention_at_bottleneck"],
            "random_latent_dim": n["random_latent_dim"],
        },
    }


def plan_configuration(fingerprint: dict, preset: dict, config_name: str, plans_name: str) -> dict:
    """One configuration (``2d`` or ``3d``) of the plans."""
    from latdiffunet.networks.memory import estimate_training_memory_bytes

    is_2d = config_name == "2d"
    axes = [1, 2] if is_2d else [0, 1, 2]
    if is_2d:
        spacing = np.median([c["spacing"] for c in fingerprint["cases"]], axis=0).tolist()
        spacing_reason = "median in-plane spacing; slices keep their own z spacing"
    else:
        spacing, spacing_reason = target_spacing_3d(fingerprint)
    median_shape = _median_shape_at_spacing(fingerprint, spacing, axes)
    p05, smallest_class = smallest_object_extent_voxels(fingerprint, spacing, axes)
    num_classes = len([v for k, v in fingerprint["labels"].items() if k != "ignore"])
    in_channels = fingerprint["num_channels"]
    latent_cfg, budget = preset["latent"], preset["gpu_memory_budget_gb"] * 1024**3
    max_voxels = preset["patch_size"]["max_voxels_2d" if is_2d else "max_voxels_3d"]
    levels = len(preset["networks"]["denoiser_channel_multipliers"]) - 1

    # start from the median shape, shrunk isotropically (in mm) until under the voxel cap
    patch = median_shape.copy()
    while np.prod(patch) > max_voxels:
        mm = patch * np.asarray(spacing)[axes]
        patch[int(np.argmax(mm))] = max(1, np.floor(patch[int(np.argmax(mm))] * 0.9))
    history = []
    while True:
        ks, latent_reasons = latent_downsampling(p05, patch, latent_cfg)
        ks = cap_for_isotropy(ks, np.asarray(spacing)[axes], latent_reasons)
        factor = np.asarray([2**k for k in ks])
        den = denoiser_strides(np.ceil(patch / factor), levels, preset["networks"]["denoiser_min_edge"])
        divisor = factor * (np.prod(den, axis=0) if den else 1)
        patch = np.ceil(patch / divisor) * divisor
        latent_c, channels_reason = latent_channels(num_classes, factor, latent_cfg)
        net = network_config(len(axes), in_channels, num_classes, latent_c, strides_from_exponents(ks), den, preset)
        per_batch_min = estimate_training_memory_bytes(
            net, patch.astype(int).tolist(), preset["batch_size"]["min"], preset["bytes_per_activation"]
        )
        history.append({"patch_size": patch.astype(int).tolist(), "estimated_bytes": int(per_batch_min)})
        if per_batch_min <= budget or np.all(patch <= divisor):
            break
        ratio = patch / median_shape
        axis = int(np.argmax(ratio if ratio.max() > 1 else patch * np.asarray(spacing)[axes]))
        patch[axis] = max(divisor[axis], patch[axis] - divisor[axis])

    patch_list = patch.astype(int).tolist()
    mem1 = estimate_training_memory_bytes(net, patch_list, 1, preset["bytes_per_activation"])
    mem2 = estimate_training_memory_bytes(net, patch_list, 2, preset["bytes_per_activation"])
    per_sample = max(mem2 - mem1, 1)
    fixed = mem1 - per_sample
    bs_cfg = preset["batch_size"]
    by_memory = int((budget - fixed) // per_sample)
    dataset_voxels = sum(np.prod(np.asarray(c["shape_after_crop"], float)[axes]) for c in fingerprint["cases"])
    if is_2d:  # a 2D batch element is one slice; the dataset holds sum(z) slices
        dataset_voxels = sum(np.prod(np.asarray(c["shape_after_crop"], float)) for c in fingerprint["cases"])
    by_dataset = int(bs_cfg["max_fraction_of_dataset_voxels"] * dataset_voxels / np.prod(patch))
    batch = int(np.clip(min(by_memory, by_dataset, bs_cfg["max"]), bs_cfg["min"], None))
    class_labels = sorted(v for k, v in fingerprint["labels"].items() if k != "ignore")
    is_rgb = fingerprint["is_2d_dataset"] and in_channels == 3
    normalization = []
    for ch, name in sorted(fingerprint["channel_names"].items(), key=lambda kv: int(kv[0])):
        scheme, why = scheme_for_channel(name, is_rgb)
        use_mask = scheme == "ZScoreNormalization" and fingerprint["median_relative_size_after_crop"] < 0.75
        normalization.append({"channel": int(ch), "name": name, "scheme": scheme, "use_mask_for_norm": use_mask, "why": why})
    sp = np.asarray(spacing)
    separate_z = None if is_2d else (int(np.argmax(sp)) if sp.max() / sp.min() > ANISOTROPY_THRESHOLD else None)
    diffusion = dict(preset["diffusion"])
    return {
        "data_identifier": f"{plans_name}_{config_name}",
        "dimension": len(axes),
        "spacing": [round(float(s), 6) for s in spacing],
        "spacing_why": spacing_reason,
        "median_image_size_in_voxels": median_shape.astype(int).tolist(),
        "patch_size": patch_list,
        "batch_size": batch,
        "patch_and_batch_why": {
            "gpu_memory_budget_gb": preset["gpu_memory_budget_gb"],
            "max_patch_voxels": max_voxels,
            "estimated_bytes_at_min_batch": history[-1]["estimated_bytes"],
            "estimated_bytes_per_extra_sample": int(per_sample),
            "batch_by_memory": by_memory,
            "batch_by_5_percent_of_dataset": by_dataset,
            "batch_limits": [bs_cfg["min"], bs_cfg["max"]],
            "patch_search": history,
        },
        "normalization": normalization,
        "resampling": {
            "image_order": 3,
            "label": "one-hot, linear, argmax",
            "separate_z_axis": separate_z,
            "why": "anisotropy ratio %.2f (threshold %.1f)" % (sp.max() / sp.min(), ANISOTROPY_THRESHOLD)
            if not is_2d else "in-plane only",
        },
        "latent": {
            "downsampling_factor": factor.tolist(),
            "size": (patch / factor).astype(int).tolist(),
            "channels": latent_c,
            "why_factor": latent_reasons,
            "why_channels": channels_reason,
            "smallest_structure": {
                "class": smallest_class,
                "p05_extent_voxels": [round(float(x), 2) for x in p05] if np.all(np.isfinite(p05)) else None,
                "p05_extent_latent_voxels": [round(float(x), 2) for x in p05 / factor] if np.all(np.isfinite(p05)) else None,
            },
        },
        "network": net,
        "diffusion": diffusion,
        "inference": {"num_samples": preset["inference"]["num_samples"], "sampling_steps": diffusion["sampling_steps"]},
        "loss": {
            "class_weights": class_weights(fingerprint, class_labels, preset["loss"]["max_class_weight"]),
            "class_weights_why": "clip(sqrt(max class frequency / class frequency), 1, %g)" % preset["loss"]["max_class_weight"],
            **{k: v for k, v in preset["loss"].items() if k != "max_class_weight"},
        },
        "training": dict(preset["training"]),
    }


def plan_experiment(fingerprint: dict, preset: dict, configurations: list[str] | None = None) -> dict:
    """Plans for every applicable configuration: ``2d`` always, ``3d`` for volumetric data."""
    available = ["2d"] if fingerprint["is_2d_dataset"] else ["2d", "3d"]
    wanted = configurations or available
    for c in wanted:
        if c not in available:
            raise UserInputError(
                f"configuration {c!r} is not available for {fingerprint['dataset_name']} (available: {available})"
            )
    plans_name = preset["plans_name"]
    return {
        "dataset_name": fingerprint["dataset_name"],
        "plans_name": plans_name,
        "preset": preset["preset"],
        "generated_by": f"latdiffunet {__version__}",
        "labels": fingerprint["labels"],
        "channel_names": fingerprint["channel_names"],
        "original_median_spacing": fingerprint["median_spacing"],
        "original_median_shape_after_crop": fingerprint["median_shape_after_crop"],
        "foreground_intensity_properties_per_channel": fingerprint["foreground_intensity_properties_per_channel"],
        "configurations": {c: plan_configuration(fingerprint, preset, c, plans_name) for c in wanted},
    }
