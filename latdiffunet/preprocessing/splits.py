"""Cross-validation folds in nnU-Net's ``splits_final.json`` format (a list of train/val dicts).

Seeded and written once: rerunning preprocessing reuses the existing file, so results of
different runs (and of nnU-Net on the same folder) are comparable. A dataset may ship its own
``splits_final.json`` (e.g. LIDC split by patient); it is then copied, after validation.

A dataset whose cases come in groups that must never be separated (slices of one patient, frames
of one video) may also ship ``case_groups.json``, ``{"CASE": "GROUP", ...}``. The folds say which
cases were kept together, but not which cases of one fold belong together; the training uses the
groups to hold back whole groups from a fold's training part for choosing the checkpoint
(``training/held_back.py``). It is copied next to ``splits_final.json`` like the splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latdiffunet.errors import UserInputError
from latdiffunet.raw_dataset import is_plain_name
from latdiffunet.utilities.file_io import load_json, write_json

DEFAULT_SEED = 12345
CASE_GROUPS_FILE = "case_groups.json"


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
    """Existing splits are reused; a dataset's own splits are adopted; otherwise seeded k-fold.
    A shipped ``case_groups.json`` is copied alongside (:func:`copy_case_groups`)."""
    copy_case_groups(preprocessed_dataset, raw_dataset)
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


def copy_case_groups(preprocessed_dataset: Path, raw_dataset: Path) -> bool:
    """Copy a shipped ``case_groups.json`` next to the splits (validated; an existing copy is kept,
    as the splits are). Returns whether the preprocessed folder now has one."""
    target = preprocessed_dataset / CASE_GROUPS_FILE
    shipped = raw_dataset / CASE_GROUPS_FILE
    if not target.is_file() and shipped.is_file():
        write_json(load_case_groups(raw_dataset).groups, target)
    return target.is_file()


@dataclass(frozen=True)
class CaseGroups:
    """Which group (patient, video) each case belongs to, and the file that said so."""

    groups: dict[str, str]
    source: Path

    def group_of(self, case: str, context: str) -> str:
        """The group of ``case``; a case the file does not list is a :class:`UserInputError`."""
        if case not in self.groups:
            raise UserInputError(
                f"case {case!r} ({context}) has no group", path=self.source,
                fix="list every case of splits_final.json in it, or delete it to treat each case as its own group",
            )
        return self.groups[case]


def load_case_groups(*folders: Path | None) -> CaseGroups | None:
    """``case_groups.json`` of the first of ``folders`` that has one (preprocessed, then raw), or None."""
    for folder in folders:
        if folder is None or not (Path(folder) / CASE_GROUPS_FILE).is_file():
            continue
        path = Path(folder) / CASE_GROUPS_FILE
        raw = load_json(path, CASE_GROUPS_FILE)
        fix = 'write it as {"CASE": "GROUP", ...} (e.g. the patient of each slice), or delete it'
        if not isinstance(raw, dict) or not raw:
            raise UserInputError("must be a non-empty object mapping case names to group names", path=path, fix=fix)
        bad = next(((c, g) for c, g in raw.items() if not isinstance(g, (str, int)) or isinstance(g, bool)), None)
        if bad is not None:
            raise UserInputError(f"case {bad[0]!r} has group {bad[1]!r}; a group is a name or a number", path=path, fix=fix)
        return CaseGroups({str(c): str(g) for c, g in raw.items()}, path)
    return None
