"""The raw dataset format (nnU-Net v2's) and how a dataset is named on the command line.

A raw dataset is ``DatasetXXX_Name/`` with ``imagesTr/CASE_0000.ext`` (one file per channel),
``labelsTr/CASE.ext``, optional ``imagesTs/`` and ``dataset.json``. Anything prepared for nnU-Net
works unchanged. Multi-rater datasets (see ``dataset_conversion/README.md``) add
``labelsTr_raters/CASE_raterK.ext`` and ``"num_raters"`` in ``dataset.json``; ``labelsTr`` still
holds one consensus label so the folder stays valid for nnU-Net.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from latdiffunet.errors import UserInputError
from latdiffunet.imageio.sitk_io import SUPPORTED_FILE_ENDINGS
from latdiffunet.utilities.file_io import load_json

DATASET_NAME_PATTERN = re.compile(r"^Dataset(\d{3})_([A-Za-z0-9_\-]+)$")
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class DatasetSpec:
    """A validated ``dataset.json``."""

    folder: Path
    channel_names: dict[int, str]
    labels: dict[str, int]
    num_training: int
    file_ending: str
    ignore_label: int | None = None
    num_raters: int = 1
    rater_labels_folder: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def class_labels(self) -> list[int]:
        """All trainable classes, background included, sorted; the ignore label is not one."""
        return sorted(v for k, v in self.labels.items() if v != self.ignore_label)

    @property
    def foreground_labels(self) -> list[int]:
        return [v for v in self.class_labels if v != 0]

    @property
    def is_rgb(self) -> bool:
        names = [self.channel_names[i].strip().lower() for i in sorted(self.channel_names)]
        return self.is_2d_format and names in (["r", "g", "b"], ["red", "green", "blue"])

    @property
    def files_per_case(self) -> int:
        """RGB photographs carry three channels in one file (nnU-Net's natural-image convention)."""
        return 1 if self.is_rgb else self.num_channels

    @property
    def num_classes(self) -> int:
        return len(self.class_labels)

    @property
    def is_2d_format(self) -> bool:
        return self.file_ending.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

    def to_dict(self) -> dict:
        return {
            "channel_names": {str(k): v for k, v in self.channel_names.items()},
            "labels": self.labels,
            "numTraining": self.num_training,
            "file_ending": self.file_ending,
            **({"num_raters": self.num_raters, "rater_labels_folder": self.rater_labels_folder} if self.num_raters > 1 else {}),
        }


def parse_dataset_json(path: Path) -> DatasetSpec:
    """Validate ``dataset.json`` and report *every* problem in one error."""
    fix = "see the README section 'Dataset format' for a valid dataset.json"
    data = load_json(path, what="dataset.json", fix=fix)
    problems: list[str] = []
    if not isinstance(data, dict):
        raise UserInputError("dataset.json must hold a JSON object", path=path, fix=fix)
    for key in ("channel_names", "labels", "numTraining", "file_ending"):
        if key not in data:
            problems.append(f"missing key {key!r}")
    if "modality" in data and "channel_names" not in data:
        problems.append("this is an nnU-Net v1 dataset.json ('modality'); rename it to 'channel_names'")
    channel_names: dict[int, str] = {}
    raw_channels = data.get("channel_names", {})
    if not isinstance(raw_channels, dict) or not raw_channels:
        if "channel_names" in data:
            problems.append("'channel_names' must be a non-empty object like {\"0\": \"CT\"}")
    else:
        for k, v in raw_channels.items():
            if not str(k).isdigit():
                problems.append(f"channel_names key {k!r} is not a channel index")
                continue
            channel_names[int(k)] = str(v)
        if channel_names and sorted(channel_names) != list(range(len(channel_names))):
            problems.append(f"channel_names keys must be 0..{len(channel_names) - 1}, got {sorted(channel_names)}")
    labels: dict[str, int] = {}
    ignore_label = None
    raw_labels = data.get("labels", {})
    if not isinstance(raw_labels, dict) or not raw_labels:
        if "labels" in data:
            problems.append("'labels' must be a non-empty object like {\"background\": 0, \"tumor\": 1}")
    else:
        for name, value in raw_labels.items():
            if isinstance(value, (list, tuple)):
                problems.append(f"label {name!r} is a region (list of labels); region-based training is not supported")
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                problems.append(f"label {name!r} must be a non-negative integer, got {value!r}")
                continue
            labels[str(name)] = int(value)
        if labels:
            if labels.get("background") != 0:
                problems.append("labels must contain \"background\": 0")
            values = list(labels.values())
            if len(set(values)) != len(values):
                problems.append("two label names share one value")
            ignore_label = labels.get("ignore")
            trainable = sorted(v for k, v in labels.items() if k != "ignore")
            if trainable and trainable != list(range(len(trainable))):
                problems.append(f"label values must be consecutive 0..N-1 (ignore excluded), got {trainable}")
            if ignore_label is not None and trainable and ignore_label != max(trainable) + 1:
                problems.append(f"the ignore label must be the highest value ({max(trainable) + 1}), got {ignore_label}")
    num_training = data.get("numTraining")
    if "numTraining" in data and (isinstance(num_training, bool) or not isinstance(num_training, int) or num_training < 1):
        problems.append(f"'numTraining' must be a positive integer, got {num_training!r}")
    file_ending = data.get("file_ending")
    if "file_ending" in data and file_ending not in SUPPORTED_FILE_ENDINGS:
        problems.append(f"'file_ending' {file_ending!r} is not one of {', '.join(SUPPORTED_FILE_ENDINGS)}")
    num_raters = data.get("num_raters", 1)
    if isinstance(num_raters, bool) or not isinstance(num_raters, int) or num_raters < 1:
        problems.append(f"'num_raters' must be a positive integer, got {num_raters!r}")
        num_raters = 1
    rater_folder = data.get("rater_labels_folder")
    if rater_folder is not None and (not is_plain_name(rater_folder)):
        problems.append(f"'rater_labels_folder' must be a plain folder name inside the dataset, got {rater_folder!r}")
        rater_folder = None
    if problems:
        raise UserInputError(
            "dataset.json is invalid:\n" + "\n".join(f"  - {p}" for p in problems), path=path, fix=fix
        )
    known = {"channel_names", "labels", "numTraining", "file_ending", "num_raters", "rater_labels_folder"}
    return DatasetSpec(
        folder=path.parent,
        channel_names=channel_names,
        labels=labels,
        num_training=int(num_training),
        file_ending=str(file_ending),
        ignore_label=ignore_label,
        num_raters=int(num_raters),
        rater_labels_folder=rater_folder,
        extra={k: v for k, v in data.items() if k not in known},
    )


def is_plain_name(name: object) -> bool:
    """A single path component: names from JSON (folders, case ids, data identifiers) are joined to
    folders and may never point outside them (no '/', '\\', '..', absolute paths)."""
    return (
        isinstance(name, str) and name not in ("", ".", "..")
        and not any(c in name for c in "/\\\0") and not Path(name).is_absolute()
    )


def load_dataset(folder: str | Path) -> DatasetSpec:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError("dataset folder not found", path=folder, fix="check the path and LATDIFF_RAW")
    return parse_dataset_json(folder / "dataset.json")


@dataclass
class CaseFiles:
    case_id: str
    images: list[Path]
    label: Path | None
    rater_labels: list[Path] = field(default_factory=list)


def find_cases(image_folder: Path, file_ending: str, num_files: int) -> tuple[dict[str, list[Path]], list[str]]:
    """Group ``CASE_XXXX<ending>`` files into cases; return cases and the problems seen.

    A file that does not follow the naming or a case with missing/extra channels is a problem,
    never silently skipped, because a silently smaller training set is worse than an error.
    """
    problems: list[str] = []
    cases: dict[str, dict[int, Path]] = {}
    if not image_folder.is_dir():
        return {}, [f"{image_folder}: folder not found"]
    for p in sorted(image_folder.iterdir()):
        if p.name.startswith("."):
            continue
        if not p.name.endswith(file_ending):
            problems.append(f"{p}: file ending is not {file_ending!r} as declared in dataset.json")
            continue
        stem = p.name[: -len(file_ending)]
        m = CHANNEL_SUFFIX.match(stem)
        if not m:
            problems.append(f"{p}: name must be CASE_XXXX{file_ending} (XXXX = 4-digit channel index)")
            continue
        cases.setdefault(m["case"], {})[int(m["channel"])] = p
    by_folded: dict[str, list[str]] = {}
    for case_id in cases:
        by_folded.setdefault(case_id.casefold(), []).append(case_id)
    for same in by_folded.values():
        if len(same) > 1:  # one file on macOS/Windows; outputs named after them would overwrite each other
            same.sort()
            problems.append(
                f"{image_folder / same[1]}_0000{file_ending}: case names {same} differ only in upper/lower case; "
                "rename one (on case-insensitive file systems they are the same file, and their outputs would overwrite each other)"
            )
    result: dict[str, list[Path]] = {}
    for case_id, channels in sorted(cases.items()):
        expected = list(range(num_files))
        if sorted(channels) != expected:
            missing = [c for c in expected if c not in channels]
            extra = [c for c in channels if c not in expected]
            desc = []
            if missing:
                desc.append("missing channel(s) " + ", ".join(f"{case_id}_{c:04d}{file_ending}" for c in missing))
            if extra:
                desc.append("unexpected channel(s) " + ", ".join(f"{case_id}_{c:04d}{file_ending}" for c in extra))
            problems.append(
                f"{image_folder / case_id}: {'; '.join(desc)} (expected {num_files} file(s) per case from dataset.json's channel_names)"
            )
            continue
        result[case_id] = [channels[c] for c in expected]
    return result, problems


def list_training_cases(spec: DatasetSpec) -> tuple[list[CaseFiles], list[str]]:
    """All training cases with their files, plus every problem found while listing them."""
    images, problems = find_cases(spec.folder / "imagesTr", spec.file_ending, spec.files_per_case)
    label_folder = spec.folder / "labelsTr"
    cases = []
    if not label_folder.is_dir():
        problems.append(f"{label_folder}: folder not found")
    for case_id, image_paths in images.items():
        label = label_folder / f"{case_id}{spec.file_ending}"
        if not label.exists():
            problems.append(f"{label}: missing label for case {case_id}")
            label = None
        raters = []
        if spec.num_raters > 1 and spec.rater_labels_folder:
            for r in range(spec.num_raters):
                rp = spec.folder / spec.rater_labels_folder / f"{case_id}_rater{r}{spec.file_ending}"
                if not rp.exists():
                    problems.append(f"{rp}: missing rater {r} label for case {case_id}")
                raters.append(rp)
        cases.append(CaseFiles(case_id, image_paths, label, raters))
    if label_folder.is_dir():
        # cases with image files at all; one with a missing channel is already reported above
        image_folder = spec.folder / "imagesTr"
        named_cases = {
            m["case"]
            for p in (image_folder.iterdir() if image_folder.is_dir() else ())
            if p.name.endswith(spec.file_ending) and (m := CHANNEL_SUFFIX.match(p.name[: -len(spec.file_ending)]))
        }
        for p in sorted(label_folder.iterdir()):
            if p.name.startswith(".") or not p.name.endswith(spec.file_ending):
                continue
            if p.name[: -len(spec.file_ending)] not in named_cases:
                problems.append(f"{p}: label without image (expected {spec.folder / 'imagesTr'}/{p.name[: -len(spec.file_ending)]}_0000{spec.file_ending})")
    if not images and not problems:
        problems.append(f"{spec.folder / 'imagesTr'}: no training images found")
    if images and len(images) != spec.num_training:
        problems.append(
            f"{spec.folder / 'dataset.json'}: numTraining is {spec.num_training} but {len(images)} cases were found in imagesTr"
        )
    return cases, problems


def resolve_dataset_name(identifier: str | int, *roots: Path) -> str:
    """``4``, ``"004"`` or ``"Dataset004_Hippocampus"`` -> ``"Dataset004_Hippocampus"``.

    Looks in each root (raw, preprocessed, results) for a folder with that ID; two datasets with
    the same ID is an error because nnU-Net users rely on IDs being unique.
    """
    text = str(identifier).strip()
    if DATASET_NAME_PATTERN.match(text):
        return text
    if not text.isdigit():
        raise UserInputError(
            f"dataset {text!r} is neither an ID (e.g. 4) nor a name like Dataset004_Hippocampus",
            fix="give the dataset's ID (-d 4) or its folder name (Dataset004_Hippocampus)",
        )
    prefix = f"Dataset{int(text):03d}_"
    found = set()
    for root in roots:
        if root.is_dir():
            found |= {p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix)}
    if not found:
        searched = ", ".join(str(r) for r in roots)
        raise UserInputError(
            f"no dataset with ID {int(text)} (a folder {prefix}*) in {searched}",
            fix="convert the dataset first (see dataset_conversion/) or check LATDIFF_RAW",
        )
    if len(found) > 1:
        raise UserInputError(f"several datasets share ID {int(text)}: {sorted(found)}", fix="give the full name")
    return found.pop()
