"""The dataset fingerprint: what the planner needs to know about the data, as readable JSON.

Spacings and shapes decide the target spacing and patch size; foreground intensities decide CT
normalisation; class frequencies decide the loss weights; and the sizes of the *smallest*
structures decide how far the mask autoencoder may compress, because an object that shrinks below
two latent voxels cannot be reconstructed from the latent.

Object sizes are summarised per class twice: the plain 5th percentile over connected components
(every component counts once, so a label littered with 1-3 voxel specks reports a speck), and the
*volume-weighted* 5th percentile (every component counts with its voxel count: the extent of the
objects that hold the smallest 5 % of the class's foreground voxels). Specks hold almost no voxels
and barely move the weighted statistic, while a class whose objects are all small still reports
them; the planner uses the weighted one.
"""

from __future__ import annotations

import sys
from functools import partial

import numpy as np
from scipy import ndimage

from latdiffunet.errors import UserInputError
from latdiffunet.preprocessing.cropping import crop_to_nonzero
from latdiffunet.preprocessing.preprocessor import ReadCaseStore, read_training_case
from latdiffunet.raw_dataset import CaseFiles, DatasetSpec, list_training_cases
from latdiffunet.utilities.parallel import imap_with_progress

INTENSITY_SAMPLES_PER_CASE = 10_000
FINGERPRINT_VERSION = 1


def _objects(seg: np.ndarray, label: int) -> list[tuple[list[int], int]]:
    """``(extent, voxels)`` of each connected component of ``label``: its bounding-box extent (voxels
    per axis, array order) and its voxel count."""
    components, n = ndimage.label(seg == label, structure=ndimage.generate_binary_structure(seg.ndim, seg.ndim))
    if n == 0:
        return []
    counts = np.bincount(components.ravel(), minlength=n + 1)[1:]
    return [([s.stop - s.start for s in box], int(c)) for box, c in zip(ndimage.find_objects(components), counts)]


def case_fingerprint(
    job: tuple[CaseFiles, int],
    read_cases: ReadCaseStore | None,
    class_labels: list[int],
    declared_labels: list[int],
    num_channels: int,
) -> dict:
    """Statistics of one case; intensities are a random sample of foreground voxels (seeded).
    ``job`` is ``(case, seed)``; ``read_cases`` is the parent's :class:`ReadCaseStore` as a forked
    worker inherits it (None without a store, or under ``spawn``).

    The case is checked on the way (:func:`read_training_case`): NaN/inf, label grid, undeclared
    label values, channel count, unless ``read_cases`` holds it (read and checked already). A
    constant image is allowed (a blank scan may be real, and the normalisation copes) but reported
    as a warning, because it is more often an export error. With a store, a case read here and
    small enough to keep comes back as ``"_read_case"``, so that preprocessing need not read and
    check it again.
    """
    case, seed = job
    read = None if read_cases is None else read_cases.get(case.case_id)
    send_back = read_cases is not None and read is None
    if read is None:
        read = read_training_case(case, declared_labels, num_channels)
    data, segs, geometry = read
    seg = segs[0]
    warnings = [
        f"{case.images[min(c, len(case.images) - 1)]}: image is constant (every voxel {float(channel.flat[0]):g}); "
        "it is used, but check the export if this is not intended"
        for c, channel in enumerate(data) if channel.size and channel.min() == channel.max()
    ]
    shape_before = data.shape[1:]
    data, seg, _, _ = crop_to_nonzero(data, seg[None])
    seg = seg[0]
    rng = np.random.default_rng(seed)
    foreground = seg > 0
    intensities = []
    for channel in data:
        values = channel[foreground]
        if values.size > INTENSITY_SAMPLES_PER_CASE:
            values = rng.choice(values, INTENSITY_SAMPLES_PER_CASE, replace=False)
        intensities.append(values.astype(np.float32))
    return {
        "case_id": case.case_id,
        "spacing": list(geometry.spacing_zyx),
        "shape_before_crop": list(shape_before),
        "shape_after_crop": list(data.shape[1:]),
        "class_voxels": {str(c): int((seg == c).sum()) for c in class_labels},
        "_objects": {str(c): _objects(seg, c) for c in class_labels if c != 0},
        "_intensities": intensities,
        "_channel_minmax": [[float(c.min()), float(c.max())] for c in data],
        "_warnings": warnings,
        "_read_case": read if send_back and ReadCaseStore.worth_keeping(read) else None,
    }


def _intensity_statistics(values: np.ndarray, minmax: np.ndarray) -> dict:
    if values.size == 0:
        return {k: float("nan") for k in ("mean", "std", "median", "percentile_00_5", "percentile_99_5")} | {
            "min": float(minmax[:, 0].min()),
            "max": float(minmax[:, 1].max()),
        }
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "median": float(np.median(values)),
        "percentile_00_5": float(np.percentile(values, 0.5)),
        "percentile_99_5": float(np.percentile(values, 99.5)),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def weighted_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> np.ndarray:
    """Per column of ``values`` (objects x axes): the smallest value whose objects, together with
    all smaller ones, hold at least ``q`` % of the total weight (inverted-CDF definition, so the
    result is always an observed extent)."""
    values = np.asarray(values, dtype=float)
    weights = np.asarray(weights, dtype=float)
    out = []
    for column in values.T:
        order = np.argsort(column, kind="stable")
        cumulative = np.cumsum(weights[order])
        index = int(np.searchsorted(cumulative, q / 100.0 * cumulative[-1], side="left"))
        out.append(column[order][min(index, len(column) - 1)])
    return np.asarray(out)


def _size_summary(objects: list[tuple[list[int], int, np.ndarray]]) -> dict:
    """Median and 5th-percentile object extent per axis, in voxels and millimetres, plain and
    volume-weighted, and how many components the weighting outweighs as specks.

    ``objects`` holds ``(extent in voxels, voxel count, case spacing)`` per connected component.
    Extents are measured per object in that object's own case spacing, so the mm values are right
    even when spacings vary between cases. A *speck* is a component whose bounding box (in mm^3) is
    smaller than the box of the volume-weighted 5th percentile: the components the plain
    percentile would have been decided by.
    """
    if not objects:
        return {"num_objects": 0, "num_voxels": 0}
    vox = np.asarray([e for e, _, _ in objects], dtype=float)
    voxels = np.asarray([n for _, n, _ in objects], dtype=float)
    mm = np.asarray([np.asarray(e) * s for e, _, s in objects], dtype=float)
    weighted_vox = weighted_percentile(vox, voxels, 5)
    weighted_mm = weighted_percentile(mm, voxels, 5)
    specks = np.prod(mm, axis=1) < np.prod(weighted_mm) * (1 - 1e-9)
    return {
        "num_objects": int(len(vox)),
        "num_voxels": int(voxels.sum()),
        "median_extent_voxels": np.median(vox, axis=0).round(2).tolist(),
        "p05_extent_voxels": np.percentile(vox, 5, axis=0).round(2).tolist(),
        "median_extent_mm": np.median(mm, axis=0).round(3).tolist(),
        "p05_extent_mm": np.percentile(mm, 5, axis=0).round(3).tolist(),
        "p05_volume_weighted_extent_voxels": weighted_vox.round(2).tolist(),
        "p05_volume_weighted_extent_mm": weighted_mm.round(3).tolist(),
        "num_specks": int(specks.sum()),
        "specks_fraction_of_objects": round(float(specks.mean()), 4),
        "specks_fraction_of_voxels": round(float(voxels[specks].sum() / voxels.sum()), 6),
    }


def extract_fingerprint(
    spec: DatasetSpec, num_processes: int = 2, seed: int = 1234, keep: ReadCaseStore | None = None
) -> dict:
    """Fingerprint of all training cases of ``spec`` (reads every case once, in parallel).

    ``keep`` receives the cases read, as far as its budget allows, for preprocessing to reuse;
    cases it holds already (read by the integrity check) are not read again.
    """
    cases, problems = list_training_cases(spec)
    if problems:
        raise UserInputError(
            "cannot fingerprint the dataset:\n" + "\n".join(f"  - {p}" for p in problems[:20])
            + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""),
            path=spec.folder,
            fix="run with --verify_dataset_integrity for a full report, fix the files, run again",
        )
    labels = spec.class_labels
    declared = sorted(spec.labels.values())
    work = partial(case_fingerprint, class_labels=labels, declared_labels=declared, num_channels=spec.num_channels)
    per_case = []
    jobs = [(c, seed + i) for i, c in enumerate(cases)]
    for pc in imap_with_progress(work, jobs, num_processes, desc="fingerprint", inherited=keep):
        read = pc.pop("_read_case")
        if read is not None:  # taken one at a time, so the budget bounds memory
            keep.add(pc["case_id"], read)
        per_case.append(pc)
    for pc in per_case:
        for warning in pc["_warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
    num_channels = len(per_case[0]["_intensities"])
    intensity_properties = {}
    for ch in range(num_channels):
        values = np.concatenate([c["_intensities"][ch] for c in per_case])
        minmax = np.asarray([c["_channel_minmax"][ch] for c in per_case])
        intensity_properties[str(ch)] = _intensity_statistics(values, minmax)
    total = {str(c): sum(pc["class_voxels"][str(c)] for pc in per_case) for c in labels}
    all_voxels = max(1, sum(total.values()))
    objects = {}
    for c in spec.foreground_labels:
        found = [(e, n, np.asarray(pc["spacing"])) for pc in per_case for e, n in pc["_objects"][str(c)]]
        objects[str(c)] = _size_summary(found)
    shapes_after = np.asarray([pc["shape_after_crop"] for pc in per_case])
    shapes_before = np.asarray([pc["shape_before_crop"] for pc in per_case])
    return {
        "fingerprint_version": FINGERPRINT_VERSION,
        "dataset_name": spec.name,
        "num_cases": len(per_case),
        "num_channels": num_channels,
        "channel_names": {str(k): v for k, v in spec.channel_names.items()},
        "labels": spec.labels,
        # several annotations per case (dataset.json "num_raters"): the planner keeps the head's
        # mask out of the denoiser's conditioning for such data (planner.head_prior_choice)
        "num_raters": int(spec.num_raters),
        "is_2d_dataset": bool(all(pc["shape_before_crop"][0] == 1 for pc in per_case)),
        "axis_order": "z, y, x (numpy array order); 2D images have z = 1 and z spacing 999",
        "median_spacing": np.median([pc["spacing"] for pc in per_case], axis=0).tolist(),
        "median_shape_after_crop": np.median(shapes_after, axis=0).tolist(),
        "median_relative_size_after_crop": float(
            np.median(np.prod(shapes_after, axis=1) / np.prod(shapes_before, axis=1))
        ),
        "foreground_intensity_properties_per_channel": intensity_properties,
        "class_voxel_frequency": {c: v / all_voxels for c, v in total.items()},
        "object_sizes_per_class": objects,
        "cases": [
            {k: v for k, v in pc.items() if not k.startswith("_")}
            | {"num_objects": {c: len(v) for c, v in pc["_objects"].items()}}
            for pc in per_case
        ],
    }
