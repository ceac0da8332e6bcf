"""QUBIQ brain-growth (seven raters) -> ``Dataset030_QUBIQBrainGrowth`` (nnU-Net v2 raw, multi-rater).

Public original: QUBIQ 2021, "Quantification of Uncertainties in Biomedical Image Quantification"
challenge (MICCAI 2020/2021), https://qubiq21.grand-challenge.org/ (data via the challenge page,
research use). The brain-growth task: 2D neonatal brain MRI slices, each outlined by seven raters.

Accepted source layouts (``--source``):

* the project's shared copy (``../shared/data/QUBIQ-brain-growth``): ``caseNN.npz`` with ``image``
  (uint8, H x W) and ``masks`` (uint8 0/1, R x H x W, R = 7). Loaded with
  ``np.load(allow_pickle=False)``: no pickled objects are ever executed.
* the challenge release: ``brain-growth/{Training,Validation}/caseNN/image.nii.gz`` and
  ``task01_seg01.nii.gz`` .. ``task01_seg07.nii.gz`` (``--source`` may point at the release root,
  at ``brain-growth/`` or at ``Training/``). Geometry (spacing, origin, direction) and the image
  dtype are kept; Validation cases, which also carry the seven segmentations, join the training
  set (a clashing id gets the prefix ``val_``).

Case id: ``caseNN``. macOS ``._`` files are skipped. Output (``file_ending`` ``.nii.gz``, which
keeps the original's non-uint8 intensities and geometry; 2D images are 2D NIfTI files, unit
spacing for the npz copy): ``imagesTr/caseNN_0000.nii.gz`` (channel ``{"0": "MRI"}``, image
unchanged), labels ``{"background": 0, "brain": 1}``.

Multi-rater storage (same design as LIDC, see ``dataset_conversion/README.md``):

* ``labelsTr/caseNN.nii.gz``: majority vote, foreground where at least 4 of the 7 raters marked it
  (>= half, ``ceil(R / 2)``), so the folder is a valid nnU-Net dataset;
* ``labelsTr_raters/caseNN_rater0.nii.gz`` .. ``caseNN_rater6.nii.gz``: each rater's mask, uint8
  {0, 1} (rater k = ``masks[k]`` / ``task01_seg{k+1:02d}``);
* ``dataset.json``: ``"num_raters": 7``, ``"rater_labels_folder": "labelsTr_raters"``,
  ``"majority_vote_min_raters": 4``.

Every case is a different subject, so no ``splits_final.json`` is written (nnU-Net's default
random 5-fold split is already patient-disjoint).

Usage (from the repository root)::

    python dataset_conversion/convert_qubiq.py --source ../shared/data/QUBIQ-brain-growth [--max-cases N]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from dataset_conversion.common import (  # noqa: E402
    RATER_LABELS_FOLDER,
    base_parser,
    binarize_mask,
    check_same_grid,
    cli_run,
    default_min_votes,
    find_child_dir,
    list_dirs,
    list_files,
    log,
    make_dataset_dirs,
    rater_dataset_json_fields,
    require_dir,
    resolve_raw_root,
    run_parallel,
    staged_dataset_folder,
    strip_ending,
    write_dataset_json,
    write_rater_case,
    write_sitk,
)
from latdiffunet.errors import UserInputError  # noqa: E402

DATASET_NAME = "Dataset030_QUBIQBrainGrowth"
FILE_ENDING = ".nii.gz"
LABELS = {"background": 0, "brain": 1}
CHANNEL_NAMES = {"0": "MRI"}
SEG_FILE = re.compile(r"^task01_seg(\d+)\.nii(\.gz)?$", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------
# layout detection: a list of jobs ("npz", case_id, path) or ("nifti", case_id, case_folder)
# ----------------------------------------------------------------------------------------------
def _nifti_case_dirs(folder: Path) -> list[Path]:
    return [d for d in list_dirs(folder, r"case\d+") if (d / "image.nii.gz").is_file() or (d / "image.nii").is_file()]


def find_cases(source: Path) -> tuple[str, list[tuple[str, Path]]]:
    """``("npz" | "nifti", [(case_id, path), ...])``."""
    source = require_dir(source, "QUBIQ source folder")
    npz = list_files(source, [".npz"])
    if npz:
        return "npz", [(strip_ending(p), p) for p in npz]
    root = find_child_dir(source, "brain-growth") or source
    split_dirs = [d for d in (find_child_dir(root, "Training"), find_child_dir(root, "Validation")) if d]
    folders = split_dirs or [root]
    cases: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for folder in folders:
        for d in _nifti_case_dirs(folder):
            cid = d.name if d.name not in seen else f"val_{d.name}"
            seen.add(cid)
            cases.append((cid, d))
    if cases:
        return "nifti", cases
    raise UserInputError(
        "no QUBIQ brain-growth cases found: expected caseNN.npz files (shared copy) or "
        "brain-growth/Training/caseNN/{image.nii.gz, task01_segXX.nii.gz} (challenge release)",
        path=source,
    )


# ----------------------------------------------------------------------------------------------
# per-case conversion
# ----------------------------------------------------------------------------------------------
def _load_npz_case(path: Path) -> tuple[sitk.Image, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        missing = {"image", "masks"} - set(f.files)
        if missing:
            raise UserInputError(f"npz lacks array(s) {sorted(missing)} (has {f.files})", path=path)
        image, masks = f["image"], f["masks"]
    if image.ndim != 2 or masks.ndim != 3 or masks.shape[1:] != image.shape:
        raise UserInputError(
            f"expected image (H, W) and masks (R, H, W), got {image.shape} and {masks.shape}", path=path
        )
    raters = np.stack([binarize_mask(m, f"{path}[masks][{k}]") for k, m in enumerate(masks)])
    return sitk.GetImageFromArray(image), raters


def _load_nifti_case(folder: Path) -> tuple[sitk.Image, np.ndarray]:
    image_path = folder / "image.nii.gz" if (folder / "image.nii.gz").is_file() else folder / "image.nii"
    image = sitk.ReadImage(str(image_path))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UserInputError("expected a single-channel image", path=image_path)
    segs = sorted(
        (int(m.group(1)), p) for p in folder.iterdir() if not p.name.startswith(".") and (m := SEG_FILE.match(p.name))
    )
    if not segs:
        raise UserInputError("no task01_segXX.nii.gz rater segmentations", path=folder)
    if [k for k, _ in segs] != list(range(1, len(segs) + 1)):
        raise UserInputError(f"rater files are not task01_seg01..{len(segs):02d}: {[p.name for _, p in segs]}", path=folder)
    raters = []
    for _, p in segs:
        seg = sitk.ReadImage(str(p))
        check_same_grid(image, seg, image_path, p)
        raters.append(binarize_mask(sitk.GetArrayFromImage(seg), p))
    return image, np.stack(raters)


def _convert_case(job: tuple[str, str, str, str]) -> tuple[str, int]:
    kind, cid, path, out_folder = job
    image, raters = _load_npz_case(Path(path)) if kind == "npz" else _load_nifti_case(Path(path))
    out = Path(out_folder)
    write_sitk(image, out / "imagesTr" / f"{cid}_0000{FILE_ENDING}")
    write_rater_case(out, cid, raters, FILE_ENDING, reference=image)
    return cid, int(raters.shape[0])


def convert(
    source: Path,
    raw_root: Path | None = None,
    num_processes: int = 2,
    max_cases: int | None = None,
) -> Path:
    """Convert QUBIQ brain-growth in ``source``; return the dataset folder written."""
    kind, cases = find_cases(Path(source).expanduser())
    if max_cases is not None:
        cases = cases[:max_cases]
    root = resolve_raw_root(raw_root)
    with staged_dataset_folder(root, DATASET_NAME) as out:
        make_dataset_dirs(out, "imagesTr", "labelsTr", RATER_LABELS_FOLDER)
        results = run_parallel(_convert_case, [(kind, c, str(p), str(out)) for c, p in cases], num_processes)
        rater_counts = {n for _, n in results}
        if len(rater_counts) != 1:
            per_case = {c: n for c, n in results}
            raise UserInputError(f"cases have different numbers of raters: {per_case}", path=Path(source))
        num_raters = rater_counts.pop()
        write_dataset_json(
            out,
            channel_names=CHANNEL_NAMES,
            labels=LABELS,
            num_training=len(results),
            file_ending=FILE_ENDING,
            name="QUBIQBrainGrowth",
            description=f"QUBIQ brain-growth: 2D neonatal brain MRI, each outlined by {num_raters} raters; "
            f"labelsTr = majority vote (>= {default_min_votes(num_raters)} of {num_raters}), "
            f"per-rater masks in {RATER_LABELS_FOLDER}/",
            reference="QUBIQ: Quantification of Uncertainties in Biomedical Image Quantification challenge "
            "(MICCAI 2021), https://qubiq21.grand-challenge.org/",
            licence="research use, see the QUBIQ challenge terms",
            **rater_dataset_json_fields(num_raters),
            source_layout=kind,
        )
    folder = root / DATASET_NAME
    log(f"{DATASET_NAME}: {len(results)} case(s), {num_raters} raters -> {folder}")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--max-cases", type=int, default=None, help="convert only the first N cases")
    args = parser.parse_args(argv)
    return cli_run(lambda: convert(args.source, args.raw_root, args.num_processes, args.max_cases))


if __name__ == "__main__":
    sys.exit(main())
