"""Cases held back from a fold's training part: they choose ``checkpoint_best`` and the sampling temperature.

Why: a choice made on the cases a number is reported on makes that number optimistic. Before
this, ``checkpoint_best`` was the checkpoint with the best periodic Dice on 10 of the fold's
validation cases and the temperature was calibrated on validation cases, and the final
validation then reported on all of them. nnU-Net avoids the problem by reporting
``checkpoint_final``. Here both choices are made on a few cases carved from the fold's *training*
part and removed from training, so the fold's validation cases are used for nothing but the
reported number, and ``checkpoint_best`` can still be used.

What is held back (:func:`choose_held_back`), deterministically (seed ``DEFAULT_SEED`` of the
splits, not the training seed, so every trainer variant and both configurations of a fold train on
the same cases and a 2d + 3d ensemble compares like with like):

- The unit is the group when the dataset has ``case_groups.json`` (LIDC: the patient, CVC: the
  video sequence), else the case: slices of one patient are near duplicates, and a held-back slice
  whose neighbours are trained on measures memory, not generalisation. Groups with cases on both
  sides of the fold's split are never held back (the split then leaks anyway, and the log says so).
- ``min(10, max(2, ceil(5 % of the training units)))`` units: 10 is what periodic validation
  evaluated before (``validation_cases``), so selection costs what it did; 5 % bounds what
  training loses on mid-sized datasets (Hippocampus 2d: 9 of 176 cases); 2 is the fewest that
  averages anything. Large datasets lose at most 10 units (LIDC, grouped by patient: 10 of 240
  patients, 171-230 of ~3,550 slices, 5-7 %, depending on the patients drawn).
- Fewer than 20 training units (2 units would be more than a tenth of them, and a choice among
  checkpoints on one or two cases is mostly noise): nothing is held back, every training case
  trains, ``checkpoint_final`` is reported and the temperature is left at 1 (the distribution the
  model was trained to sample), as nnU-Net reports its final checkpoint. Periodic validation then
  runs on the validation cases, as nnU-Net's does, for the training curve only: no
  ``checkpoint_best.pth`` is saved. Fold ``all`` holds nothing back and has no validation.

Periodic validation takes the first ``validation_cases`` of the list, which is ordered round-robin
over the held-back groups (one case of each group before a second of any), so it sees every group.
The selection is stored in ``training_config.json`` (``"held_back"``) and read back, not recomputed,
by ``--c`` and ``--val-only`` (:func:`resolve_held_back`); a run that began before held-back
selection existed keeps training on all of its cases and reports ``checkpoint_final``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latdiffunet.errors import UserInputError
from latdiffunet.preprocessing.splits import DEFAULT_SEED, CaseGroups
from latdiffunet.utilities.file_io import load_json

MAX_UNITS = 10
MIN_UNITS = 2
FRACTION = 0.05
MIN_TRAINING_UNITS = 20  # below: hold nothing back, report checkpoint_final
CONFIG_KEY = "held_back"


def held_back_size(num_units: int) -> int:
    """Units to hold back from ``num_units`` training units (0: too few, use ``checkpoint_final``)."""
    if num_units < MIN_TRAINING_UNITS:
        return 0
    return min(MAX_UNITS, max(MIN_UNITS, math.ceil(FRACTION * num_units)))


@dataclass(frozen=True)
class HeldBackSelection:
    """The held-back cases of one fold (empty: nothing held back) and why."""

    cases: tuple[str, ...]  # periodic-validation order: round-robin over ``groups``
    groups: tuple[str, ...]  # held-back groups (empty when the dataset has no case_groups.json)
    grouped_by: str | None  # the case_groups.json used, or None
    reason: str
    warnings: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.cases)

    def checkpoint_statement(self, checkpoint_name: str, num_validation_cases: int, temperature_chosen: bool = True) -> str:
        """What the final validation's summary says about how its number was obtained."""
        temperature = ("the sampling temperature" if temperature_chosen else None)
        if self.active and checkpoint_name == "checkpoint_best.pth":
            unit = f"{len(self.cases)} held-back training cases" + (
                f" of {len(self.groups)} groups ({self.grouped_by})" if self.grouped_by else "")
            what = "checkpoint_best.pth and " + temperature + " were" if temperature else "checkpoint_best.pth was"
            return (f"{what} chosen on {unit}, never trained on "
                    f"(listed under 'held_back' in training_config.json); the {num_validation_cases} validation cases "
                    "were used for nothing but this number" + ("" if temperature else "; temperature 1 (not calibrated)"))
        if self.active:
            return (f"{checkpoint_name}: no checkpoint_best.pth was saved (no periodic validation in the diffusion stage); "
                    + (f"the temperature was chosen on {len(self.cases)} held-back training cases" if temperature
                       else "temperature 1 (not calibrated)")
                    + "; the validation cases were used for nothing but this number")
        return (f"{checkpoint_name}, as nnU-Net reports, with the temperature left at the trained distribution's; "
                f"nothing was chosen on the {num_validation_cases} validation cases (periodic validation on them only "
                f"drew the training curve), because nothing was held back: {self.reason}")

    def to_dict(self) -> dict:
        return {"cases": list(self.cases), "groups": list(self.groups), "grouped_by": self.grouped_by,
                "reason": self.reason, "warnings": list(self.warnings)}

    @classmethod
    def from_dict(cls, d: dict) -> "HeldBackSelection":
        return cls(tuple(d["cases"]), tuple(d["groups"]), d.get("grouped_by"), str(d.get("reason", "")),
                   tuple(d.get("warnings", ())))

    @classmethod
    def nothing(cls, reason: str) -> "HeldBackSelection":
        return cls((), (), None, reason)


def _round_robin(groups: list[str], members: dict[str, list[str]]) -> list[str]:
    order, depth = [], 0
    while len(order) < sum(len(members[g]) for g in groups):
        order += [members[g][depth] for g in groups if depth < len(members[g])]
        depth += 1
    return order


def choose_held_back(
    fold: int | str, train_cases: list[str], val_cases: list[str], groups: CaseGroups | None = None, seed: int = DEFAULT_SEED,
) -> HeldBackSelection:
    """The cases of ``train_cases`` to hold back for choosing (see the module docstring); never a
    validation case, nor a case sharing a group with one."""
    if fold == "all":
        return HeldBackSelection.nothing("fold 'all' trains on every case, as nnU-Net's; there is nothing to report on")
    context = f"training part of fold {fold}"
    group_of = (lambda c: groups.group_of(c, context)) if groups is not None else (lambda c: c)
    val_groups = {groups.group_of(c, f"validation part of fold {fold}") for c in val_cases} if groups is not None else set(val_cases)
    members: dict[str, list[str]] = {}
    for case in sorted(set(train_cases)):
        members.setdefault(group_of(case), []).append(case)
    warnings = ()
    straddling = sorted(set(members) & val_groups)
    if straddling and groups is not None:
        warnings = (f"fold {fold}: {len(straddling)} group(s) of {groups.source.name} have cases in both its training and "
                    f"validation part (e.g. {straddling[:3]}): splits_final.json is not split by these groups, so the "
                    "cross-validation number leaks between them",)
    units = sorted(g for g in members if g not in val_groups)
    n = held_back_size(len(units))
    what = "groups" if groups is not None else "cases"
    if n == 0:
        return HeldBackSelection((), (), None, f"fold {fold} has {len(units)} training {what}, fewer than "
                                 f"{MIN_TRAINING_UNITS}: every one trains", warnings)
    order = np.random.RandomState(seed).permutation(len(units))  # a stream numpy keeps stable across versions
    chosen = sorted(units[i] for i in order[:n])
    reason = (f"{n} of the {len(units)} training {what} of fold {fold} (min({MAX_UNITS}, max({MIN_UNITS}, "
              f"ceil({FRACTION:g} x {len(units)}))), seed {seed})")
    return HeldBackSelection(tuple(_round_robin(chosen, members)), tuple(chosen) if groups is not None else (),
                             str(groups.source) if groups is not None else None, reason, warnings)


def resolve_held_back(
    fold_folder: Path, fold: int | str, train_cases: list[str], val_cases: list[str], groups: CaseGroups | None,
    continuing: bool,
) -> HeldBackSelection:
    """The selection of a run in ``fold_folder``: a new one for a new run; for a run that goes on
    (``--c``, ``--val-only``) the one stored in its ``training_config.json``, checked against the
    fold, or none when the run began before held-back selection existed (it trained on every case)."""
    config_file = fold_folder / "training_config.json"
    stored = load_json(config_file, "training_config.json") if continuing and config_file.is_file() else {}
    if CONFIG_KEY in stored:
        selection = HeldBackSelection.from_dict(stored[CONFIG_KEY])
        outside = sorted(set(selection.cases) - set(train_cases))
        inside_val = sorted(set(selection.cases) & set(val_cases))
        if outside or inside_val:
            raise UserInputError(
                f"the held-back cases of this run no longer fit fold {fold} of splits_final.json "
                f"({'not in its training part: ' + str(outside[:3]) if outside else 'in its validation part: ' + str(inside_val[:3])})",
                path=config_file, fix="splits_final.json changed since the run began: train the fold anew (without --c)",
            )
        return selection
    if continuing and any((fold_folder / f).is_file() for f in ("checkpoint_latest.pth", "checkpoint_final.pth")):
        return HeldBackSelection.nothing(
            "this run began before held-back selection existed and trained on every training case of the fold")
    return choose_held_back(fold, train_cases, val_cases, groups)
