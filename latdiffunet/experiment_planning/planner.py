"""From fingerprint + preset to plans: every choice stored next to the inputs that drove it.

The planner needs no GPU: patch and batch size come from an analytic estimate of the training
memory of the planned networks (``latdiffunet.networks.memory``), as nnU-Net does. What is new
compared with nnU-Net is the *latent* plan: how far the mask autoencoder may downsample each axis
is bounded by the smallest structures that matter (the volume-weighted 5th-percentile object
extent, which specks of a few voxels barely move, must still span at least two latent voxels), and
the latent channel count keeps the compression ratio fixed (``latent_choice.py``).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np

from latdiffunet import __version__
from latdiffunet.errors import UserInputError
from latdiffunet.experiment_planning.latent_choice import (
    cap_for_isotropy, denoiser_strides, describe_statistic, latent_channels, latent_downsampling,
    smallest_object_extent_voxels, smallest_structure_record, strides_from_exponents,
)
from latdiffunet.experiment_planning.step_cost import batch_by_step_cost, training_for_batch
from latdiffunet.preprocessing.normalization import scheme_for_channel
from latdiffunet.preprocessing.resampling import ANISOTROPY_THRESHOLD
from latdiffunet.raw_dataset import is_plain_name
from latdiffunet.utilities.file_io import load_json

PRESETS = ("cpu", "default", "tiny")
TARGETS = ("auto", "cpu", "gpu")
# the preset the default invocation (no --preset) plans with, per target device
PRESET_FOR_TARGET = {"gpu": "default", "cpu": "cpu"}
WHAT_TARGET_MEANS = {  # formatted with the chosen preset's numbers
    "cpu": "CPU-sized plans (preset {preset}: small patches and networks, {steps}-step DDIM, {samples} samples), so that "
           "training epochs and prediction take CPU-sized time; GPU-sized plans: latdiff_plan_and_preprocess -d {dataset} "
           "--target gpu [--gpu_memory_gb N]",
    "gpu": "GPU-sized plans (preset {preset}: patch and batch fill a memory budget of {budget:g} GB, {steps}-step DDIM, "
           "{samples} samples); on a CPU an iteration of them takes seconds: plan for the CPU with "
           "latdiff_plan_and_preprocess -d {dataset} --target cpu",
}


def _merged(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` applied; nested objects are merged key by key, so an inheriting
    preset names only what it changes."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def load_preset(name_or_path: str) -> dict:
    """A built-in preset by name, or a JSON file of the same shape.

    ``"inherits_from": "<built-in preset>"`` makes a preset the named one plus its own keys (the
    ``cpu`` preset is ``tiny``'s sizing under the default plans identifier), so the two cannot drift.
    """
    if name_or_path in PRESETS:
        text = resources.files("latdiffunet.experiment_planning").joinpath(f"presets/{name_or_path}.json").read_text()
        preset, path = json.loads(text), None
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise UserInputError(
                f"unknown preset {name_or_path!r}", fix=f"use one of {', '.join(PRESETS)} or the path of a preset JSON file"
            )
        preset = load_json(path, what="preset")
        if not isinstance(preset, dict):
            preset = {}
    base = preset.pop("inherits_from", None)
    if base is not None:
        if base not in PRESETS:
            raise UserInputError(
                f"'inherits_from' must name a built-in preset ({', '.join(PRESETS)}), not {base!r}",
                path=path, fix="name one of them, or write the whole preset out",
            )
        preset = _merged(load_preset(base), preset)
    if not is_plain_name(preset.get("plans_name")):
        raise UserInputError(
            "a preset must be a JSON object whose 'plans_name' is a plain file name (it names the plans file)",
            path=path, fix="start from latdiffunet/experiment_planning/presets/tiny.json",
        )
    return preset


def cuda_is_available() -> bool:
    """Whether torch sees a CUDA GPU; torch is imported only when a plan needs the answer."""
    import torch

    return torch.cuda.is_available()


def choose_preset(
    preset: str | None, target: str = "auto", gpu_memory_gb: float | None = None,
    dataset: str = "DATASET", cuda_available: Callable[[], bool] | None = None,
) -> tuple[dict, str]:
    """The preset to plan with, its ``target`` device set, and why that target (``target_why``).

    Without ``--preset`` the target picks it (``PRESET_FOR_TARGET``), and ``auto`` means the GPU
    when torch sees one, else the CPU: GPU-sized plans on a 2-core machine cost 3 s per training
    iteration and minutes per validation. ``--gpu_memory_gb`` with ``auto`` means the GPU (someone
    planning on a login node for a GPU node). An explicit ``--preset`` keeps its own sizing; a
    ``--target`` that contradicts it is an error rather than silently one or the other.
    ``cuda_available`` replaces :func:`cuda_is_available` (tests).
    """
    if target not in TARGETS:
        raise UserInputError(f"unknown target {target!r}", fix=f"use one of {', '.join(TARGETS)}")
    if preset is not None:
        chosen = load_preset(preset)
        sized_for = chosen.get("target")
        if sized_for is not None and target not in ("auto", sized_for):
            raise UserInputError(
                f"--preset {preset} is sized for the {sized_for}, but --target {target} was given",
                fix="drop --preset (the target picks the preset) or drop --target",
            )
        if sized_for is None:  # a preset file written before presets named their target
            chosen["target"] = "gpu" if target == "auto" else target
            why = f"--preset {preset} names no target; {'--target ' + target if target != 'auto' else 'assumed gpu'}"
        else:
            why = f"--preset {preset}, which is sized for the {sized_for}"
    else:
        if target != "auto":
            why = f"--target {target}"
        elif gpu_memory_gb is not None:
            target, why = "gpu", "--target auto with --gpu_memory_gb given"
        elif (cuda_available or cuda_is_available)():
            target, why = "gpu", "--target auto and a CUDA GPU is visible"
        else:
            target, why = "cpu", "--target auto and no CUDA GPU is visible (torch.cuda.is_available() is False)"
        chosen = load_preset(PRESET_FOR_TARGET[target])
    if gpu_memory_gb is not None:
        chosen["gpu_memory_budget_gb"] = gpu_memory_gb
    if preset is None:
        why += ": " + WHAT_TARGET_MEANS[target].format(
            preset=chosen["preset"], steps=chosen["diffusion"]["sampling_steps"], samples=chosen["inference"]["num_samples"],
            budget=chosen["gpu_memory_budget_gb"], dataset=dataset,
        )
    return chosen, why


MIRRORING_WHY = (
    "training mirrors every axis of a patch, so sample k is drawn on the image mirrored by the k-th combination of axes "
    "(sample 0 on the image itself) and mirrored back: nnU-Net's test-time mirroring at no extra samples. On Hippocampus "
    "fold 0 (44 validation cases, 5 samples, one 15-minute CPU model) it raised the Dice of the mean from 0.812 to 0.822 "
    "and the error AUROC of the entropy from 0.819 to 0.873, one sample 0.809 either way, 0.99 s per case against 0.97; "
    "on LIDC fold 0 (986 slices, 16 samples, the same temperature) GED² 0.413 -> 0.403, HM-IoU 0.343 and Dice of the mean 0.367 / 0.366 either way"
)


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


def capped_patch(median_shape: np.ndarray, spacing: list[float], axes: list[int], max_voxels: int) -> np.ndarray:
    """The median shape, shrunk isotropically (in mm, longest axis first) until under the voxel cap."""
    patch = median_shape.copy()
    while np.prod(patch) > max_voxels:
        mm = patch * np.asarray(spacing)[axes]
        patch[int(np.argmax(mm))] = max(1, np.floor(patch[int(np.argmax(mm))] * 0.9))
    return patch


# A patch should span this many times the median object: the object and its surroundings.
CONTEXT_OBJECTS = 2.0


def context_coarsening(fingerprint: dict, spacing: list[float], axes: list[int], median_shape: np.ndarray,
                       max_voxels: int) -> dict:
    """In-plane coarsening of a 2d configuration whose capped patch cannot see its objects.

    When the voxel cap leaves the patch smaller than the image and the median object (largest
    class, per axis) spans more than half of it, every window sees only part of an object and
    guesses the rest: on Kvasir-SEG (polyps of 110 x 90 px in 256 x 256 images, 128 x 128 patches)
    predictions ended in straight edges at window borders and a 15-minute CPU run reached 0.39 Dice.
    The factor makes the patch span ``CONTEXT_OBJECTS`` median objects, never more than the whole
    median image (beyond that it only loses detail), never below 1. Small structures are safe:
    the factor is set by the median object, and 2D data whose patch already covers the image
    (Hippocampus slices, LIDC and QUBIQ crops) are unchanged. Not for 3d, where coarsening a
    volume costs thin structures their resolution (nnU-Net's cascade is the tool there).
    """
    patch = capped_patch(median_shape, spacing, axes, max_voxels)
    sp = np.asarray(spacing, dtype=float)[axes]
    patch_mm = patch * sp
    extents = [np.asarray(v["median_extent_mm"], dtype=float)[axes]
               for v in fingerprint.get("object_sizes_per_class", {}).values()
               if v.get("num_objects", 0) > 0 and "median_extent_mm" in v]
    if not extents:
        return {"factor": 1.0, "why": "no median object extents in the fingerprint (older fingerprint: rerun with --clean)"}
    extent_mm = np.max(extents, axis=0)
    needed = float(np.max(CONTEXT_OBJECTS * extent_mm / patch_mm))
    whole_image = float(np.max(median_shape / patch))
    factor = round(min(needed, whole_image), 2)
    record = {"median_object_extent_mm": [round(float(e), 2) for e in extent_mm],
              "patch_mm_before": [round(float(p), 2) for p in patch_mm], "context_objects": CONTEXT_OBJECTS}
    if factor <= 1.0:
        why = (f"the patch spans at least {CONTEXT_OBJECTS:g} median objects" if needed <= 1
               else "the patch covers the median image")
        return record | {"factor": 1.0, "why": why}
    return record | {"factor": factor, "why": (
        f"in-plane spacing x{factor:g}: the {'x'.join(str(int(p)) for p in patch)} patch that fits the voxel cap would "
        f"span {float(np.min(patch_mm / extent_mm)):.2f} median objects ({'x'.join(f'{e:g}' for e in extent_mm)} mm); "
        f"coarsened until it spans {CONTEXT_OBJECTS:g} or the whole median image, whichever is less"
    )}


def class_weights(fingerprint: dict, class_labels: list[int], max_weight: float) -> list[float]:
    """sqrt(most frequent / own frequency), clipped: rare small structures count more in the
    autoencoder's cross-entropy (MedSegLatDiff) without letting one rare class dominate."""
    freq = np.asarray([max(fingerprint["class_voxel_frequency"][str(c)], 1e-12) for c in class_labels])
    return np.clip(np.sqrt(freq.max() / freq), 1.0, max_weight).round(4).tolist()


HEAD_PRIOR_WHY = (
    "the segmentation head's mask, encoded to a latent, conditions the denoiser beside the image features: "
    "on Hippocampus 2d fold 0 (15-min CPU budget, same session) the Dice of the mean rose from 0.855 to 0.863, "
    "of one sample from 0.848 to 0.857, HD95 fell from 1.35 to 1.24 mm"
)
HEAD_PRIOR_MULTI_RATER_WHY = (
    "{n} raters per case: the head learns the raters' mean, and its mask conditions the denoiser as on single-rater "
    "data; the samples still spread around it (the energy-score sample loss, the calibrated temperature). QUBIQ brain "
    "growth fold 0 (10-min CPU budget, same session, 16 samples): GED2 0.089 vs 0.093 without it, HM-IoU 0.757 vs "
    "0.750, Dice of one sample 0.879 vs 0.873, of the mean 0.927 vs 0.923, spread 1.04x vs 1.09x the raters'; "
    "LIDC fold 0 (20-min CPU budget, temperature 1, two sessions apart): GED2 0.356 vs 0.368, HM-IoU 0.443 vs 0.403"
)


def head_prior_choice(fingerprint: dict, preset: dict) -> tuple[bool, str]:
    """Whether the segmentation head's mask conditions the denoiser, and why."""
    n = preset["networks"]
    if not (n.get("image_segmentation_head", False) and n.get("head_conditions_denoiser", False)):
        return False, "the preset does not condition the denoiser on the segmentation head's mask"
    raters = int(fingerprint.get("num_raters", 1))
    return True, HEAD_PRIOR_MULTI_RATER_WHY.format(n=raters) if raters > 1 else HEAD_PRIOR_WHY


def network_config(
    dim: int, in_channels: int, num_classes: int, latent_c: int, ae_strides, den_strides, preset: dict,
    head_prior: bool = False,
) -> dict:
    """``head_prior``: the segmentation head's mask conditions the denoiser (:func:`head_prior_choice`)."""
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
        # full-resolution refinement of decoded masks with image detail (networks/refinement.py)
        "refinement": {"enabled": n.get("refinement_channels", 0) > 0, "channels": n.get("refinement_channels") or 16},
        # deep supervision of the image encoder, training only (networks/segmentation_head.py): on
        # Hippocampus 2d fold 0 (15-min CPU budget) it lifted the Dice of the mean from 0.822 to 0.848
        # and of one sample from 0.809 to 0.841 (README, "Results so far")
        "segmentation_head": {
            "enabled": bool(n.get("image_segmentation_head", False)),
            "condition_denoiser": bool(head_prior),  # head_prior_choice requires the head
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
    max_voxels = preset["patch_size"]["max_voxels_2d" if is_2d else "max_voxels_3d"]
    context = None
    if is_2d:
        context = context_coarsening(fingerprint, spacing, axes, median_shape, max_voxels)
        if context["factor"] > 1:
            spacing = [spacing[0]] + [s * context["factor"] for s in spacing[1:]]
            spacing_reason += "; " + context["why"]
            median_shape = _median_shape_at_spacing(fingerprint, spacing, axes)
    p05, decided = smallest_object_extent_voxels(fingerprint, spacing, axes)
    num_classes = len([v for k, v in fingerprint["labels"].items() if k != "ignore"])
    in_channels = fingerprint["num_channels"]
    latent_cfg, budget = preset["latent"], preset["gpu_memory_budget_gb"] * 1024**3
    levels = len(preset["networks"]["denoiser_channel_multipliers"]) - 1
    head_prior, head_prior_why = head_prior_choice(fingerprint, preset)

    patch = capped_patch(median_shape, spacing, axes, max_voxels)
    history = []
    while True:
        ks, latent_reasons = latent_downsampling(p05, patch, latent_cfg, describe_statistic(decided))
        ks = cap_for_isotropy(ks, np.asarray(spacing)[axes], latent_reasons)
        factor = np.asarray([2**k for k in ks])
        den = denoiser_strides(np.ceil(patch / factor), levels, preset["networks"]["denoiser_min_edge"])
        divisor = factor * (np.prod(den, axis=0) if den else 1)
        patch = np.ceil(patch / divisor) * divisor
        while np.prod(patch) > max_voxels and np.any(patch > divisor):  # rounding up broke the voxel cap
            mm = np.where(patch > divisor, patch * np.asarray(spacing)[axes], -np.inf)
            patch[int(np.argmax(mm))] -= divisor[int(np.argmax(mm))]
        latent_c, channels_reason = latent_channels(num_classes, factor, latent_cfg)
        net = network_config(len(axes), in_channels, num_classes, latent_c, strides_from_exponents(ks), den, preset,
                             head_prior=head_prior)
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
    # nnU-Net's 5 % cap leaves a small dataset (32 images of 128x128) 1-3 images per batch; the
    # floor lets it have a few more (at most a quarter of its images), if memory allows
    num_images = int(sum(c["shape_after_crop"][0] for c in fingerprint["cases"])) if is_2d else len(fingerprint["cases"])
    floor = min(bs_cfg["max"], bs_cfg.get("min_for_small_datasets", 0), num_images // 4)
    by_step_cost, step_cost_why = batch_by_step_cost(bs_cfg, patch)
    limits = [by_memory, max(by_dataset, floor), bs_cfg["max"]] + ([by_step_cost] if by_step_cost is not None else [])
    batch = int(np.clip(min(limits), bs_cfg["min"], None))
    batch_why = (
        f"min(memory {by_memory}, preset max {bs_cfg['max']}, {step_cost_why}max(5 % of the dataset's voxels {by_dataset}, "
        f"small-dataset floor {floor})), at least {bs_cfg['min']}; small-dataset floor = min(preset max, "
        f"min_for_small_datasets {bs_cfg.get('min_for_small_datasets', 0)}, {num_images} {'slices' if is_2d else 'images'} "
        "// 4), because nnU-Net's 5 % cap alone leaves a small dataset (32 images) 1-3 images per batch"
    )
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
    training, training_why = training_for_batch(preset["training"], batch, int(fingerprint.get("num_raters", 1)))
    return {
        "data_identifier": f"{plans_name}_{config_name}",
        "dimension": len(axes),
        "spacing": [round(float(s), 6) for s in spacing],
        "spacing_why": spacing_reason,
        **({"context": context} if context is not None else {}),
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
            "batch_floor_for_small_datasets": floor,
            **({"batch_by_voxels_per_step": by_step_cost,
                "voxels_per_step_evidence": bs_cfg.get("max_voxels_per_step_why", "")} if by_step_cost is not None else {}),
            "batch_limits": [bs_cfg["min"], bs_cfg["max"]],
            "batch_why": batch_why,
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
            "smallest_structure": smallest_structure_record(decided, p05, factor),
        },
        "network": net,
        "network_why": {"segmentation_head.condition_denoiser": head_prior_why},
        "diffusion": diffusion,
        "inference": {"num_samples": preset["inference"]["num_samples"], "sampling_steps": diffusion["sampling_steps"],
                      # the evidence behind the preset's steps and samples (latdiff_analyze_sampler runs)
                      "why": preset["inference"].get("why", "the preset's default"),
                      "test_time_mirroring": bool(preset["inference"].get("test_time_mirroring", True)),
                      "test_time_mirroring_why": preset["inference"].get("test_time_mirroring_why", MIRRORING_WHY)},
        "loss": {
            "class_weights": class_weights(fingerprint, class_labels, preset["loss"]["max_class_weight"]),
            "class_weights_why": "clip(sqrt(max class frequency / class frequency), 1, %g)" % preset["loss"]["max_class_weight"],
            **{k: v for k, v in preset["loss"].items() if k != "max_class_weight"},
        },
        "training": training,
        **({"training_why": training_why} if training_why else {}),
    }


def plan_experiment(
    fingerprint: dict, preset: dict, configurations: list[str] | None = None, target_why: str | None = None
) -> dict:
    """Plans for ``configurations``, by default every applicable one (``2d`` always, ``3d`` for
    volumetric data) that the preset's ``default_configurations`` (if any) allows.

    ``target`` records the device the plans are sized for (training warns when it runs elsewhere),
    ``target_why`` how it was chosen (see :func:`choose_preset`), ``configurations_why`` why these.
    """
    available = ["2d"] if fingerprint["is_2d_dataset"] else ["2d", "3d"]
    if configurations:
        wanted, configurations_why = configurations, "chosen with -c"
    else:
        wanted = [c for c in available if c in preset.get("default_configurations", available)] or available
        configurations_why = (
            "every configuration that applies (2d, and 3d for volumetric data)" if wanted == available
            else preset["default_configurations_why"]
        )
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
        "target": preset.get("target", "gpu"),
        "target_why": target_why or f"preset {preset['preset']}, which is sized for the {preset.get('target', 'gpu')}",
        "configurations_why": configurations_why,
        "generated_by": f"latdiffunet {__version__}",
        "labels": fingerprint["labels"],
        "channel_names": fingerprint["channel_names"],
        "original_median_spacing": fingerprint["median_spacing"],
        "original_median_shape_after_crop": fingerprint["median_shape_after_crop"],
        "foreground_intensity_properties_per_channel": fingerprint["foreground_intensity_properties_per_channel"],
        "configurations": {c: plan_configuration(fingerprint, preset, c, plans_name) for c in wanted},
    }
