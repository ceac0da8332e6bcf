"""Cross-validation folds in nnU-Net's ``splits_final.json`` format (a list of train/val dicts).

Seeded and written once: rerunning preprocessing reuses the existing file, so results of
different runs (and of nnU-Net on the same folder) are comparable. A dataset may ship its own
``splits_final.json`` (e.g. LIDC split by patient); it is then copied, after validation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from latdiffunet.errors import UserInputError
from latdiffunet.raw_dataset import is_plain_name
from latdiffunet.utilities.file_io import load_json, write_json

DEFAULT_SEED = 12345


def make_kfold_splits(case_ids: list[str], num_folds: int = 5, seed: int = DEFAULT_SEED) -> list[dict]:
    ids = sorted(case_ids)
    if len(ids) < num_folds:
        raise UserInputError(f"{len(ids)} training cases cannot be split into {num_folds} folds; need at least {num_folds}")
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = np.array_split(order, num_folds)
    splits = []
    for k in range(num_folds):
        val = sorted(ids[i] for i in folds[k])
        splits.append({"train": sorted(set(ids) - set(val)), "val": val})
    return splits


def validate_splits(splits: object, case_ids: list[str], path: Path) -> list[dict]:
    """Check a ``splits_final.json``: a list of folds, each with ``train``/``val`` lists of known case names."""
    known = set(case_ids)
    fix = "delete the file to have new folds made (latdiff_plan_and_preprocess), or correct it"
    if not isinstance(splits, list) or not splits:
        raise UserInputError("splits must be a non-empty list of {\"train\": [...], \"val\": [...]}", path=path, fix=fix)
    for k, fold in enumerate(splits):
        if not isinstance(fold, dict) or not {"train", "val"} <= set(fold) or not all(
            isinstance(fold[key], list) for key in ("train", "val")
        ):
            raise UserInputError(f"fold {k} must be an object with 'train' and 'val' lists", path=path, fix=fix)
        bad = [c for c in fold["train"] + fold["val"] if not is_plain_name(c)]
        if bad:
            raise UserInputError(
                f"fold {k} names {bad[0]!r}, which is not a plain case name (no folders, '..' or absolute paths)",
                path=path, fix=fix,
            )
        unknown = sorted((set(fold["train"]) | set(fold["val"])) - known)
        if unknown:
            raise UserInputError(
                f"fold {k} names {len(unknown)} unknown case(s) (not among the {len(known)} available cases), e.g. {unknown[:3]}",
                path=path,
                fix="rerun latdiff_plan_and_preprocess if the preprocessed data is incomplete; otherwise delete the file "
                "to have new folds made, or correct the case names",
            )
        overlap = set(fold["train"]) & set(fold["val"])
        if overlap:
            raise UserInputError(f"fold {k} has cases in both train and val: {sorted(overlap)[:3]}", path=path, fix=fix)
    return splits


def ensure_splits(preprocessed_dataset: Path, raw_dataset: Path, case_ids: list[str], num_folds: int = 5) -> tuple[list[dict], str]:
    """Existing splits are reused; a dataset's own splits are adopted; otherwise seeded k-fold."""
    target = preprocessed_dataset / "splits_final.json"
    if target.is_file():
        return validate_splits(load_json(target, "splits_final.json"), case_ids, target), "reused"
    shipped = raw_dataset / "splits_final.json"
    if shipped.is_file():
        splits, how = validate_splits(load_json(shipped, "splits_final.json"), case_ids, shipped), f"copied from {shipped}"
    else:
        splits, how = make_kfold_splits(case_ids, num_folds), f"new {num_folds}-fold split (seed {DEFAULT_SEED})"
    write_json(splits, target)
    return splits, how
