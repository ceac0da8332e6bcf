"""``--verify_dataset_integrity``: read every file once and report *all* problems together.

A user fixing a dataset wants the whole list, not one error per run; every line names the file.
The cases read on the way can be kept (:class:`ReadCaseStore`) for the fingerprint and
preprocessing of the same run, which then neither read nor check them again.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from latdiffunet.errors import DatasetIntegrityError, UserInputError
from latdiffunet.imageio.sitk_io import read_image, read_label
from latdiffunet.preprocessing.preprocessor import ReadCase, ReadCaseStore
from latdiffunet.raw_dataset import CaseFiles, DatasetSpec, list_training_cases
from latdiffunet.utilities.parallel import imap_with_progress


def check_case(
    case: CaseFiles,
    read_cases: ReadCaseStore | None,
    allowed_labels: list[int],
    expected_dim: int | None,
    expected_channels: int,
) -> tuple[list[str], ReadCase | None]:
    """All problems of one case (empty list when it is fine), and, for a parent that keeps a
    :class:`ReadCaseStore` (``read_cases``: the store a forked worker inherits; None without one
    or under ``spawn``), the case as :func:`read_training_case` reads it when it has no problems
    and is small enough to keep."""
    problems: list[str] = []
    first_geometry = None
    first_path = None
    channels = 0
    images, labels = [], []
    for path in case.images:
        try:
            arr, geometry = read_image(path)
        except UserInputError as exc:
            problems.append(str(exc).replace("\n  fix:", " -"))
            continue
        channels += arr.shape[0]
        images.append(arr)
        if expected_dim is not None and geometry.dimension != expected_dim:
            problems.append(f"{path}: image is {geometry.dimension}D but the dataset's file_ending implies {expected_dim}D")
        if not np.all(np.isfinite(arr)):
            n = int((~np.isfinite(arr)).sum())
            problems.append(f"{path}: {n} voxel(s) are NaN or inf; replace them (e.g. with the background value)")
        if first_geometry is None:
            first_geometry, first_path = geometry, path
        else:
            diff = first_geometry.matches(geometry)
            if diff:
                problems.append(f"{path}: geometry differs from {first_path.name}: {'; '.join(diff)}")
    if channels and channels != expected_channels:
        hint = (
            '; for RGB photographs declare channel_names {"0": "R", "1": "G", "2": "B"} with one file per case'
            if channels == 3 * len(case.images) else ""
        )
        problems.append(
            f"{case.images[0]}: case {case.case_id} has {channels} channel(s) but dataset.json declares {expected_channels}{hint}"
        )
    labels_to_check = ([case.label] if case.label is not None else []) + [p for p in case.rater_labels if p.exists()]
    for label_path in labels_to_check:
        try:
            seg, geometry = read_label(label_path)
        except UserInputError as exc:
            problems.append(str(exc).replace("\n  fix:", " -"))
            continue
        if first_geometry is not None:
            diff = first_geometry.matches(geometry)
            if diff:
                problems.append(f"{label_path}: geometry differs from image {first_path.name}: {'; '.join(diff)}")
        unexpected = sorted(set(np.unique(seg).tolist()) - set(allowed_labels))
        if unexpected:
            problems.append(
                f"{label_path}: label values {unexpected} are not declared in dataset.json (allowed: {allowed_labels})"
            )
        labels.append(seg)
    if read_cases is None or problems or len(labels) != 1 + len(case.rater_labels):  # a missing file is listed elsewhere
        return problems, None
    read = (np.concatenate(images, axis=0), np.stack(labels), first_geometry)  # as read_training_case builds them
    return problems, read if ReadCaseStore.worth_keeping(read) else None


def verify_dataset_integrity(
    spec: DatasetSpec, num_processes: int = 2, keep: ReadCaseStore | None = None
) -> list[CaseFiles]:
    """Raise :class:`DatasetIntegrityError` listing every problem; return the cases when all is well.

    ``keep`` receives the cases read without problems, as far as its budget allows.
    """
    cases, problems = list_training_cases(spec)
    allowed = sorted(spec.labels.values())
    expected_dim = 2 if spec.is_2d_format else None
    work = partial(check_case, allowed_labels=allowed, expected_dim=expected_dim, expected_channels=spec.num_channels)
    results = imap_with_progress(work, cases, num_processes, desc="verifying dataset", inherited=keep)
    for i, (case_problems, read) in enumerate(results):  # to its end, so that the bar closes before an error shows
        problems.extend(case_problems)
        if read is not None:  # taken one at a time, so the budget bounds memory
            keep.add(cases[i].case_id, read)
    if problems:
        raise DatasetIntegrityError(problems, spec.folder)
    return cases
