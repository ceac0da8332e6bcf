"""Planned preprocessing of one case (training and inference share it) and of a whole dataset.

The same :func:`preprocess_case` runs at training and at prediction time, so the network always
sees the intensities and spacing it was trained on; :func:`properties` keep everything needed to
put a prediction back into the original geometry (bounding box, shapes, SimpleITK geometry).
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import numpy as np

from latdiffunet.errors import UserInputError
from latdiffunet.imageio.sitk_io import ImageGeometry, read_images_as_channels, read_label
from latdiffunet.preprocessing.cropping import crop_to_nonzero
from latdiffunet.preprocessing.normalization import normalize_channel
from latdiffunet.preprocessing.resampling import new_shape_for_spacing, resample_image, resample_labels
from latdiffunet.raw_dataset import CaseFiles, DatasetSpec
from latdiffunet.utilities.file_io import save_npz, write_json
from latdiffunet.utilities.parallel import map_with_progress

LOCATIONS_PER_CLASS = 1000

ReadCase = tuple[np.ndarray, np.ndarray, ImageGeometry]
"""What :func:`read_training_case` returns: images ``(C, Z, Y, X)``, labels ``(1 + raters, Z, Y, X)``, geometry."""

KEEP_CASE_MAX_BYTES = 4 << 20
"""Largest read case (images + labels) that :class:`ReadCaseStore` keeps: a 2D slice or a small
volume, whose reading costs about as much as preprocessing it. Large volumes cost far more to
resample than to read and would fill the memory budget with a handful of cases."""

KEEP_CASES_MAX_TOTAL_BYTES = 2 << 30


def _default_store_budget() -> int:
    """2 GiB, or a quarter of the free memory when that is less (1/2 GiB where it is unknown)."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not every platform reports free memory
        return KEEP_CASES_MAX_TOTAL_BYTES // 4
    return int(min(KEEP_CASES_MAX_TOTAL_BYTES, free // 4))


class ReadCaseStore:
    """Training cases already read and checked, held for the next pass over the dataset.

    The integrity check and the fingerprint read and check every training case; preprocessing
    needs the same arrays, for each configuration. For thousands of 2D slices reading (six small
    PNGs per LIDC case) is most of the cost of each pass, so the first pass of a run hands the
    small cases it read to the next ones instead of having them read and checked again. Cases
    larger than :data:`KEEP_CASE_MAX_BYTES` or beyond ``budget_bytes`` in all are not kept; they
    are read again. The arrays are shared, never modified: preprocessing only reads its inputs.
    """

    def __init__(self, budget_bytes: int | None = None) -> None:
        self.budget_bytes = _default_store_budget() if budget_bytes is None else int(budget_bytes)
        self.used_bytes = 0
        self._cases: dict[str, ReadCase] = {}

    @staticmethod
    def worth_keeping(case: ReadCase) -> bool:
        """Whether ``case`` is small enough to keep (decided in the worker that read it, so that
        large volumes are never sent back to the parent)."""
        return case[0].nbytes + case[1].nbytes <= KEEP_CASE_MAX_BYTES

    def add(self, case_id: str, case: ReadCase) -> bool:
        """Keep ``case`` if it is small and fits the budget; return whether it was kept."""
        size = case[0].nbytes + case[1].nbytes
        if not self.worth_keeping(case) or self.used_bytes + size > self.budget_bytes:
            return False
        self._cases[case_id] = case
        self.used_bytes += size
        return True

    def get(self, case_id: str) -> ReadCase | None:
        return self._cases.get(case_id)

    def __len__(self) -> int:
        return len(self._cases)


def target_spacing_for_case(configuration: dict, case_spacing_zyx: tuple[float, ...]) -> list[float]:
    """The 2d configuration resamples in-plane only; the case keeps its own slice spacing."""
    spacing = list(configuration["spacing"])
    if configuration["dimension"] == 2:
        return [float(case_spacing_zyx[0])] + spacing[1:]
    return spacing


def preprocess_case(
    data: np.ndarray,
    seg: np.ndarray | None,
    geometry: ImageGeometry,
    plans: dict,
    configuration_name: str,
    label_values: list[int] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Crop, normalise, resample. ``seg`` may carry extra leading axes (several raters)."""
    cfg = plans["configurations"][configuration_name]
    shape_before_crop = list(data.shape[1:])
    seg_stack = None if seg is None else (seg[None] if seg.ndim == 3 else seg)
    data, seg_stack, mask, box = crop_to_nonzero(data, seg_stack)
    intensity = plans["foreground_intensity_properties_per_channel"]
    normalized = np.empty(data.shape, dtype=np.float32)
    for norm in cfg["normalization"]:
        c = norm["channel"]
        normalized[c] = normalize_channel(
            data[c], norm["scheme"], intensity.get(str(c)), mask if norm["use_mask_for_norm"] else None
        )
    spacing = geometry.spacing_zyx
    target = target_spacing_for_case(cfg, spacing)
    if geometry.dimension == 2:  # a single slice: nothing to resample along z
        target[0] = spacing[0]
    new_shape = new_shape_for_spacing(data.shape[1:], spacing, target)
    separate = cfg["resampling"]["separate_z_axis"]
    if separate is None and cfg["dimension"] == 2 and geometry.dimension == 3:
        separate = 0  # 2d configuration: never interpolate across slices
    out = resample_image(normalized, new_shape, separate)
    out_seg = None
    if seg_stack is not None:
        labels = label_values if label_values is not None else sorted(np.unique(seg_stack).tolist())
        out_seg = np.stack([resample_labels(s, new_shape, separate, labels) for s in seg_stack]).astype(np.int8)
    props = {
        "geometry": geometry.to_dict(),
        "shape_before_crop": shape_before_crop,
        "bbox_used_for_cropping": box,
        "shape_after_crop": list(data.shape[1:]),
        "spacing": list(spacing),
        "target_spacing": [float(t) for t in target],
        "shape_after_resampling": list(out.shape[1:]),
        "separate_z_axis": separate,
    }
    return out, out_seg, props


def sample_class_locations(seg: np.ndarray, classes: list[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random voxel coordinates per foreground class, for foreground-oversampled patch sampling."""
    out = {}
    for c in classes:
        coords = np.argwhere(seg == c)
        if len(coords) > LOCATIONS_PER_CLASS:
            coords = coords[rng.choice(len(coords), LOCATIONS_PER_CLASS, replace=False)]
        out[f"locations_{c}"] = coords.astype(np.int32).reshape(-1, seg.ndim)
    return out


def read_training_case(case: CaseFiles, label_values: list[int], num_channels: int | None = None) -> ReadCase:
    """Images ``(C, Z, Y, X)`` and labels ``(1 + raters, Z, Y, X)`` of one training case.

    Refuses what would otherwise train silently on wrong data (``--verify_dataset_integrity``
    reports the same problems, all at once): NaN/inf voxels, another channel count than
    dataset.json declares, a label on another grid than the image, undeclared label values.
    """
    data, geometry = read_images_as_channels(case.images)
    if num_channels is not None and data.shape[0] != num_channels:
        raise UserInputError(
            f"case {case.case_id} has {data.shape[0]} channel(s) but dataset.json declares {num_channels}",
            path=case.images[0],
            fix="give one file per channel declared in channel_names (RGB photographs: channel_names R, G, B)",
        )
    for c, channel in enumerate(data):
        if not np.all(np.isfinite(channel)):
            raise UserInputError(
                f"{int((~np.isfinite(channel)).sum())} voxel(s) are NaN or inf",
                path=case.images[min(c, len(case.images) - 1)],  # RGB: three channels in one file
                fix="replace them (e.g. with the background value) and export the image again",
            )
    segs = []
    for label_path in [case.label] + list(case.rater_labels):
        seg, label_geometry = read_label(label_path)
        diff = geometry.matches(label_geometry)
        if diff:
            raise UserInputError(
                f"label geometry differs from image {Path(case.images[0]).name}: {'; '.join(diff)}",
                path=label_path,
                fix="the label must lie on the image's grid (same size, spacing, origin, direction); resample or re-export it",
            )
        unexpected = sorted(set(np.unique(seg).tolist()) - set(label_values))
        if unexpected:
            raise UserInputError(
                f"label values {unexpected} are not declared in dataset.json (declared: {sorted(label_values)})",
                path=label_path,
                fix="declare them in dataset.json's 'labels' or correct the label map",
            )
        segs.append(seg)
    return data, np.stack(segs), geometry


def _preprocess_training_case(
    job: tuple[CaseFiles, int],
    read_cases: ReadCaseStore | None,
    labels: list[int],
    ignore_label: int | None,
    num_channels: int,
    plans: dict,
    config_name: str,
    out_dir: Path,
) -> dict:
    """Preprocess and write one case; ``job`` is ``(case, seed)``, ``read_cases`` the parent's
    store as a forked worker inherits it (None under ``spawn``: every case is read then).

    The rest is the same for every case and is bound with ``functools.partial``, so the plans
    travel to a worker once per chunk of cases, not once per case.
    """
    case, seed = job
    read = None if read_cases is None else read_cases.get(case.case_id)
    data, segs, geometry = read if read is not None else read_training_case(case, labels, num_channels)
    data, segs, props = preprocess_case(data, segs, geometry, plans, config_name, labels)
    rng = np.random.default_rng(seed)
    foreground = [v for v in labels if v not in (0, ignore_label)]  # oversampling never centres on unannotated voxels
    locations = sample_class_locations(segs[0], foreground, rng)
    arrays = {"data": data.astype(np.float32), "seg": segs[0]}
    if len(segs) > 1:
        arrays["seg_raters"] = segs[1:]
    save_npz(out_dir / f"{case.case_id}.npz", **arrays, **locations)
    props["case_id"] = case.case_id
    props["class_voxels"] = {str(c): int((segs[0] == c).sum()) for c in labels}
    props["num_locations_per_class"] = {k.split("_")[1]: int(len(v)) for k, v in locations.items()}
    props["arrays"] = "data (C,Z,Y,X) float32, seg (Z,Y,X) int8, seg_raters (R,Z,Y,X) if several raters, locations_<class> (N,3)"
    write_json(props, out_dir / f"{case.case_id}.json")
    return {"case_id": case.case_id, "shape": props["shape_after_resampling"]}


def preprocess_dataset(
    spec: DatasetSpec,
    cases: list[CaseFiles],
    plans: dict,
    configuration_names: list[str],
    output_folder: Path,
    num_processes: int = 2,
    read_cases: ReadCaseStore | None = None,
) -> None:
    """Write ``<output_folder>/<data_identifier>/CASE.npz`` + ``CASE.json`` for every case.

    ``read_cases`` holds cases read and checked earlier in this run (integrity check, fingerprint):
    the same arrays as a new read would give; the others are read from the raw files.
    """
    labels = sorted(spec.labels.values())
    for name in configuration_names:
        out_dir = output_folder / plans["configurations"][name]["data_identifier"]
        out_dir.mkdir(parents=True, exist_ok=True)
        work = partial(
            _preprocess_training_case, labels=labels, ignore_label=spec.ignore_label, num_channels=spec.num_channels,
            plans=plans, config_name=name, out_dir=out_dir,
        )
        jobs = [(c, 1234 + i) for i, c in enumerate(cases)]
        map_with_progress(work, jobs, num_processes, desc=f"preprocessing {name}", inherited=read_cases)
        expected = {f"{c.case_id}.npz" for c in cases} | {f"{c.case_id}.json" for c in cases}
        for stale in os.listdir(out_dir):  # cases removed from the raw folder since the last run
            if stale.endswith((".npz", ".json")) and stale not in expected:
                (out_dir / stale).unlink()
