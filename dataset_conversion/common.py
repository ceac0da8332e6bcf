"""Helpers shared by the dataset converters in this folder.

Every converter writes one nnU-Net v2 raw dataset, ``<raw_root>/DatasetXXX_Name/``. Two levels of
atomicity protect it from an interrupted run:

* each file is written under a hidden temporary name in its final folder and renamed into place
  (:func:`latdiffunet.utilities.file_io.atomic_path`), so no file is ever half written;
* the whole dataset is assembled in a hidden staging folder ``<raw_root>/.DatasetXXX_Name.staging-PID``
  and only renamed to ``DatasetXXX_Name`` once every case, ``dataset.json`` and ``splits_final.json``
  are written (:func:`staged_dataset_folder`). A re-run therefore never mixes cases of an older
  conversion (e.g. one made with ``--max-cases``) with new ones, and a killed run leaves the
  previous dataset untouched.

Multi-rater datasets (LIDC, QUBIQ) share :func:`majority_vote` and :func:`write_rater_case`; the
storage layout is described in ``dataset_conversion/README.md``.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import SimpleITK as sitk

from latdiffunet.errors import UserInputError
from latdiffunet.utilities.file_io import atomic_path, write_json

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_SPLIT_SEED = 12345
DEFAULT_NUM_FOLDS = 5
RATER_LABELS_FOLDER = "labelsTr_raters"

# Files from tempfile.mkstemp (used by atomic_path) are created 0600; datasets are meant to be read
# by other users and containers, so written files get the mode a plain open() would give them.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK

# Longest first, so that ".nii.gz" wins over ".gz".
_KNOWN_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------------
# file listing
# ----------------------------------------------------------------------------------------------
def natural_key(text: str) -> list:
    """Sort key that orders ``slice-2`` before ``slice-10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def is_junk_file(path: Path) -> bool:
    """macOS resource forks (``._name``), ``.DS_Store`` and other hidden files."""
    return path.name.startswith(".")


def file_ending(path: str | Path) -> str:
    name = str(path).lower()
    for ending in _KNOWN_ENDINGS:
        if name.endswith(ending):
            return ending
    return Path(name).suffix


def strip_ending(path: Path) -> str:
    """File name without its (possibly double) ending: ``a.nii.gz`` -> ``a``."""
    ending = file_ending(path)
    return path.name[: len(path.name) - len(ending)] if ending else path.name


def list_files(folder: Path, endings: Sequence[str]) -> list[Path]:
    """Visible files in ``folder`` whose name ends with one of ``endings`` (case-insensitive),
    naturally sorted. macOS ``._`` files and other hidden files are skipped."""
    endings = tuple(e.lower() for e in endings)
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and not is_junk_file(p) and p.name.lower().endswith(endings)
    ]
    return sorted(files, key=lambda p: natural_key(p.name))


def list_dirs(folder: Path, pattern: str | None = None) -> list[Path]:
    """Visible sub-folders (optionally matching the regular expression ``pattern``), naturally sorted."""
    rx = re.compile(pattern) if pattern else None
    dirs = [p for p in folder.iterdir() if p.is_dir() and not is_junk_file(p) and (rx is None or rx.fullmatch(p.name))]
    return sorted(dirs, key=lambda p: natural_key(p.name))


def find_child_dir(folder: Path, *names: str) -> Path | None:
    """First existing sub-folder among ``names`` (matched case-insensitively), else ``None``."""
    if not folder.is_dir():
        return None
    children = {p.name.lower(): p for p in folder.iterdir() if p.is_dir() and not is_junk_file(p)}
    for name in names:
        hit = children.get(name.lower())
        if hit is not None:
            return hit
    return None


def require_dir(path: Path, what: str, fix: str | None = None) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserInputError(f"{what} not found (not a folder)", path=path, fix=fix)
    return path


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def write_sitk(image: sitk.Image, target: Path, compress: bool = True) -> None:
    """Write ``image`` atomically; the temporary file carries the target's ending so that
    SimpleITK picks the right writer (NIfTI, PNG, ...)."""
    with atomic_path(target, suffix=file_ending(target)) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
        os.chmod(tmp, FILE_MODE)


def write_json_file(obj: Any, target: Path) -> None:
    """:func:`latdiffunet.utilities.file_io.write_json` (atomic), readable like any plain file."""
    write_json(obj, target)
    os.chmod(target, FILE_MODE)


def label_image_from_array(array: np.ndarray, reference: sitk.Image | None = None) -> sitk.Image:
    """uint8 label image from a numpy array, with the geometry of ``reference`` if given."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8))
    if reference is not None:
        img.CopyInformation(reference)
    return img


def to_uint8_label(label: sitk.Image, allowed: Iterable[int], source: Path) -> sitk.Image:
    """Check that a label image holds only ``allowed`` integer values and return it as uint8,
    geometry unchanged."""
    if label.GetNumberOfComponentsPerPixel() != 1:
        raise UserInputError("label image has several components per pixel; expected a scalar label map", path=source)
    allowed = sorted(int(a) for a in allowed)
    arr = sitk.GetArrayViewFromImage(label)
    values = np.unique(arr)
    if not np.all(np.mod(values, 1) == 0):
        raise UserInputError(f"label image holds non-integer values {values[:10].tolist()}", path=source)
    bad = sorted(set(values.astype(np.int64).tolist()) - set(allowed))
    if bad:
        raise UserInputError(
            f"label image holds values {bad} that are not declared labels {allowed}", path=source
        )
    if label.GetPixelID() == sitk.sitkUInt8:
        return label
    return sitk.Cast(label, sitk.sitkUInt8)


def binarize_mask(array: np.ndarray, source: Path | str, threshold: int | None = None) -> np.ndarray:
    """A rater/consensus mask as uint8 {0, 1}.

    With ``threshold`` (lossy sources such as JPEG masks): foreground where value >= threshold,
    unless the mask is already {0, 1}. Without it (lossless PNG/NIfTI/npz sources) the mask must
    be exactly {0, 1} or {0, 255}; anything else is an error rather than a silent guess.
    """
    values = np.unique(array)
    if set(values.tolist()) <= {0, 1}:
        return (array != 0).astype(np.uint8)
    if threshold is not None:
        return (array >= threshold).astype(np.uint8)
    if set(values.tolist()) <= {0, 255}:
        return (array != 0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating) and values.min() >= 0 and values.max() <= 1:
        # soft masks (some QUBIQ releases): a rater's vote counts where it is >= 0.5
        return (array >= 0.5).astype(np.uint8)
    raise UserInputError(
        f"mask is not binary: values {values[:10].tolist()}{' ...' if len(values) > 10 else ''} "
        "(expected {0, 1} or {0, 255})",
        path=source,
    )


def check_same_grid(image: sitk.Image, label: sitk.Image, image_path: Path, label_path: Path) -> None:
    """Image and label must share size and (to within rounding) spacing, origin and direction."""
    problems = []
    if image.GetSize() != label.GetSize():
        problems.append(f"size {image.GetSize()} vs {label.GetSize()}")
    for what, a, b in (
        ("spacing", image.GetSpacing(), label.GetSpacing()),
        ("origin", image.GetOrigin(), label.GetOrigin()),
        ("direction", image.GetDirection(), label.GetDirection()),
    ):
        if len(a) != len(b) or not np.allclose(a, b, rtol=1e-5, atol=1e-4):
            problems.append(f"{what} {tuple(a)} vs {tuple(b)}")
    if problems:
        raise UserInputError(
            f"image and label do not share one grid ({'; '.join(problems)}); label: {label_path}",
            path=image_path,
            fix="use the label file that belongs to this image",
        )


def write_dataset_json(
    folder: Path,
    *,
    channel_names: Mapping[int | str, str],
    labels: Mapping[str, int],
    num_training: int,
    file_ending: str,
    name: str,
    description: str,
    reference: str,
    licence: str,
    **extra: Any,
) -> dict:
    """Write nnU-Net v2's ``dataset.json`` (atomically) and return it.

    Required by nnU-Net v2: ``channel_names``, ``labels`` (must hold ``"background": 0``),
    ``numTraining``, ``file_ending``. ``extra`` holds dataset-specific keys (``num_raters``,
    ``rater_labels_folder``, ...), which nnU-Net ignores.
    """
    if labels.get("background") != 0:
        raise ValueError("labels must contain 'background': 0")
    values = sorted(labels.values())
    if values != list(range(len(values))):
        raise ValueError(f"label values must be consecutive 0..N-1, got {values}")
    channels = {str(k): str(v) for k, v in channel_names.items()}
    if sorted(int(k) for k in channels) != list(range(len(channels))):
        raise ValueError(f"channel_names keys must be 0..N-1, got {sorted(channels)}")
    if num_training < 1:
        raise ValueError("numTraining must be >= 1")
    data = {
        "channel_names": channels,
        "labels": {str(k): int(v) for k, v in labels.items()},
        "numTraining": int(num_training),
        "file_ending": file_ending,
        "name": name,
        "description": description,
        "reference": reference,
        "licence": licence,
        **extra,
    }
    write_json_file(data, folder / "dataset.json")
    return data


def write_splits(folder: Path, splits: list[dict[str, list[str]]], groups: dict[str, str] | None = None) -> Path:
    """``splits_final.json`` in nnU-Net's format: ``[{"train": [...], "val": [...]}, ...]``, and, for
    splits grouped by patient or video, ``case_groups.json`` (``{"CASE": "GROUP"}``): training then
    holds back whole groups, never single slices of a patient it trains on, to choose its checkpoint."""
    target = folder / "splits_final.json"
    write_json_file(splits, target)
    if groups is not None:
        write_json_file(dict(sorted(groups.items())), folder / "case_groups.json")
    return target


# ----------------------------------------------------------------------------------------------
# multi-rater labels
# ----------------------------------------------------------------------------------------------
def default_min_votes(num_raters: int) -> int:
    """At least half of the raters: 2 of 4 (LIDC), 4 of 7 (QUBIQ), 2 of 3, 1 of 1."""
    if num_raters < 1:
        raise ValueError("need at least one rater")
    return math.ceil(num_raters / 2)


def majority_vote(rater_masks: np.ndarray | Sequence[np.ndarray], min_votes: int | None = None) -> np.ndarray:
    """Consensus of binary rater masks: foreground where at least ``min_votes`` raters marked it.

    ``rater_masks`` has shape ``(R, ...)``; any non-zero value is a foreground vote. The default
    ``min_votes`` is ``ceil(R / 2)`` (>= 50 % of the raters), so for 4 raters a tie of 2 vs 2 counts
    as foreground (the LIDC convention of the Probabilistic U-Net literature), for 7 raters 4 votes
    are needed. Returns uint8 {0, 1} with shape ``rater_masks.shape[1:]``.
    """
    masks = np.asarray(rater_masks)
    if masks.ndim < 2 or masks.shape[0] < 1:
        raise ValueError(f"expected rater masks of shape (R, ...) with R >= 1, got {masks.shape}")
    num_raters = masks.shape[0]
    if min_votes is None:
        min_votes = default_min_votes(num_raters)
    if not 1 <= min_votes <= num_raters:
        raise ValueError(f"min_votes must be in 1..{num_raters}, got {min_votes}")
    votes = np.count_nonzero(masks, axis=0)
    return (votes >= min_votes).astype(np.uint8)


def rater_label_path(dataset_folder: Path, case_id: str, rater: int, ending: str) -> Path:
    return dataset_folder / RATER_LABELS_FOLDER / f"{case_id}_rater{rater}{ending}"


def write_rater_case(
    dataset_folder: Path,
    case_id: str,
    rater_masks: np.ndarray,
    ending: str,
    reference: sitk.Image | None = None,
    min_votes: int | None = None,
) -> np.ndarray:
    """Write ``labelsTr/CASE`` (majority vote) and ``labelsTr_raters/CASE_raterK`` (one per rater).

    ``rater_masks``: uint8 {0, 1}, shape ``(R, *array_shape)``. Returns the majority label.
    """
    consensus = majority_vote(rater_masks, min_votes)
    for r, mask in enumerate(rater_masks):
        write_sitk(label_image_from_array(mask, reference), rater_label_path(dataset_folder, case_id, r, ending))
    write_sitk(label_image_from_array(consensus, reference), dataset_folder / "labelsTr" / f"{case_id}{ending}")
    return consensus


def rater_dataset_json_fields(num_raters: int, min_votes: int | None = None) -> dict:
    min_votes = default_min_votes(num_raters) if min_votes is None else min_votes
    return {
        "num_raters": int(num_raters),
        "rater_labels_folder": RATER_LABELS_FOLDER,
        "majority_vote_min_raters": int(min_votes),
        "rater_label_pattern": "{case}_rater{k}{file_ending}",
    }


# ----------------------------------------------------------------------------------------------
# splits
# ----------------------------------------------------------------------------------------------
def grouped_kfold_splits(
    case_ids: Iterable[str],
    group_of: Callable[[str], str] | Mapping[str, str],
    n_folds: int = DEFAULT_NUM_FOLDS,
    seed: int = DEFAULT_SPLIT_SEED,
    warn: Callable[[str], None] | None = None,
) -> list[dict[str, list[str]]]:
    """k-fold cross-validation splits that never separate the cases of one group (patient).

    Groups are sorted, shuffled with ``numpy.random.RandomState(seed)`` (a stream numpy keeps
    stable across versions) and dealt into ``n_folds`` folds of near-equal group count with
    ``numpy.array_split``. Fold ``k``'s ``val`` holds every case of the groups in fold ``k``,
    ``train`` all other cases; both lists are naturally sorted. Same input and seed, same splits.

    With fewer groups than ``n_folds`` the number of folds drops to the number of groups (reported
    through ``warn``); fewer than two groups cannot be split and raise ``ValueError``.
    """
    cases = sorted(set(case_ids), key=natural_key)
    lookup = group_of.__getitem__ if isinstance(group_of, Mapping) else group_of
    groups_of_case = {c: str(lookup(c)) for c in cases}
    groups = sorted(set(groups_of_case.values()), key=natural_key)
    if len(groups) < 2:
        raise ValueError(f"need at least 2 groups (patients) to split, got {len(groups)}")
    if n_folds < 2:
        raise ValueError("n_folds must be >= 2")
    if len(groups) < n_folds:
        if warn is not None:
            warn(f"only {len(groups)} groups (patients): writing {len(groups)} folds instead of {n_folds}")
        n_folds = len(groups)
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(groups))
    shuffled = [groups[i] for i in order]
    splits = []
    for val_groups in np.array_split(np.array(shuffled, dtype=object), n_folds):
        val_set = set(val_groups.tolist())
        splits.append(
            {
                "train": [c for c in cases if groups_of_case[c] not in val_set],
                "val": [c for c in cases if groups_of_case[c] in val_set],
            }
        )
    return splits


# ----------------------------------------------------------------------------------------------
# dataset folder staging
# ----------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_staging(raw_root: Path, dataset_name: str) -> None:
    """Remove staging/old folders left by killed conversions of this dataset (their PID is gone)."""
    rx = re.compile(rf"^\.{re.escape(dataset_name)}\.(staging|old)-(\d+)$")
    for p in raw_root.iterdir():
        m = rx.match(p.name)
        if m and p.is_dir() and not _pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)


@contextmanager
def staged_dataset_folder(raw_root: Path, dataset_name: str) -> Iterator[Path]:
    """Yield an empty hidden staging folder; on success it replaces ``raw_root/dataset_name``.

    On an exception the staging folder is deleted and an existing dataset stays as it was.
    """
    raw_root = Path(raw_root).expanduser()
    raw_root.mkdir(parents=True, exist_ok=True)
    _remove_dead_staging(raw_root, dataset_name)
    pid = os.getpid()
    final = raw_root / dataset_name
    staging = raw_root / f".{dataset_name}.staging-{pid}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if final.exists() or final.is_symlink():
        old = raw_root / f".{dataset_name}.old-{pid}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def make_dataset_dirs(folder: Path, *names: str) -> None:
    for n in names:
        (folder / n).mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------
def run_parallel(fn: Callable[[T], R], jobs: Sequence[T], num_processes: int = 2) -> list[R]:
    """``[fn(j) for j in jobs]``, in a ``multiprocessing.Pool`` when ``num_processes > 1``.

    ``fn`` must be a module-level function. Results keep the order of ``jobs``; the first
    exception raised by a worker is re-raised here.
    """
    jobs = list(jobs)
    if num_processes <= 1 or len(jobs) < 2:
        return [fn(j) for j in jobs]
    n = min(num_processes, len(jobs))
    chunksize = max(1, len(jobs) // (n * 8))
    with multiprocessing.get_context().Pool(n) as pool:
        return pool.map(fn, jobs, chunksize=chunksize)


def resolve_raw_root(raw_root: Path | str | None) -> Path:
    if raw_root is not None:
        return Path(raw_root).expanduser()
    from latdiffunet.paths import raw_root as default_raw_root

    return default_raw_root()


def log(msg: str) -> None:
    print(f"[dataset_conversion] {msg}", flush=True)


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="folder holding the downloaded dataset")
    parser.add_argument(
        "--raw-root",
        type=Path,
        default=None,
        help="where DatasetXXX_Name/ is written (default: $LATDIFF_RAW)",
    )
    parser.add_argument("--num-processes", type=int, default=2, help="worker processes (default 2; 1 = no pool)")
    return parser


def cli_run(fn: Callable[[], Path]) -> int:
    """Run a converter's ``main`` body: user errors become one message and exit code 2."""
    start = time.perf_counter()
    try:
        out = fn()
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log(f"done in {time.perf_counter() - start:.1f} s: {out}")
    return 0
