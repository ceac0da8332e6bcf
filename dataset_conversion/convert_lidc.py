"""LIDC-IDRI four-rater 128x128 nodule crops -> ``Dataset020_LIDCSlices`` (nnU-Net v2 raw, multi-rater).

Public original: LIDC-IDRI, The Cancer Imaging Archive (TCIA),
https://www.cancerimagingarchive.net/collection/lidc-idri/ (Armato et al., Medical Physics 38(2),
2011; licence CC BY 3.0). The 2D 128x128 crops around nodules, each slice outlined independently
by four radiologists, are the benchmark popularised by the Probabilistic U-Net (Kohl et al.,
NeurIPS 2018) and distributed as ``data_lidc.pickle`` (Probabilistic-Unet-Pytorch) and as a PNG
export with the layout below. Some rater masks are empty: that rater saw no nodule in the slice.

Accepted source layout (``--source``; the shared copy ``../shared/data/LIDC-IDRI-slices`` and the
PNG export are the same; a single wrapping folder is looked through)::

    LIDC-IDRI-XXXX/nodule-Y/images/slice-N.png                 grey CT crop (uint8)
    LIDC-IDRI-XXXX/nodule-Y/mask-0 .. mask-3/slice-N.png       one binary mask per rater (0/255)

The pickle form is not read: unpickling executes code from the file. Export it to PNGs first.

Case ids: ``LIDC<XXXX>_n<Y>_s<N>``, e.g. ``LIDC0001_n0_s3`` for
``LIDC-IDRI-0001/nodule-0/images/slice-3.png`` (underscores only between the parts, so
``<case>_0000.png`` parses unambiguously). The patient is the part before the first underscore.

Multi-rater storage (the same for QUBIQ, see ``dataset_conversion/README.md``):

* ``labelsTr/CASE.png``: the majority vote, foreground where at least half of the raters marked it
  (>= 2 of 4; a 2:2 tie counts as foreground). It keeps the folder a valid nnU-Net dataset.
* ``labelsTr_raters/CASE_rater0.png`` .. ``CASE_rater3.png``: each rater's own mask, uint8 {0, 1},
  rater k = source folder ``mask-k``.
* ``dataset.json``: ``"num_raters": 4``, ``"rater_labels_folder": "labelsTr_raters"``,
  ``"majority_vote_min_raters": 2``.

``imagesTr/CASE_0000.png`` holds the crop unchanged; labels ``{"background": 0, "nodule": 1}``,
channel ``{"0": "CT"}``, ``file_ending`` ``.png``.

``splits_final.json`` (nnU-Net format, a list of ``{"train": [...], "val": [...]}``): 5 folds split
BY PATIENT, never by slice or nodule (slices of one nodule are nearly identical), patients shuffled
with seed 12345, deterministic. With fewer than 5 patients (``--max-patients``) there is one fold
per patient.

Usage (from the repository root)::

    python dataset_conversion/convert_lidc.py --source ../shared/data/LIDC-IDRI-slices [--max-patients N]
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
    DEFAULT_NUM_FOLDS,
    DEFAULT_SPLIT_SEED,
    RATER_LABELS_FOLDER,
    base_parser,
    binarize_mask,
    cli_run,
    default_min_votes,
    grouped_kfold_splits,
    list_dirs,
    list_files,
    log,
    make_dataset_dirs,
    rater_dataset_json_fields,
    require_dir,
    resolve_raw_root,
    run_parallel,
    staged_dataset_folder,
    write_dataset_json,
    write_rater_case,
    write_sitk,
    write_splits,
)
from latdiffunet.errors import UserInputError  # noqa: E402

DATASET_NAME = "Dataset020_LIDCSlices"
FILE_ENDING = ".png"
LABELS = {"background": 0, "nodule": 1}
CHANNEL_NAMES = {"0": "CT"}
EXPECTED_RATERS = 4
PATIENT_DIR = r"LIDC-IDRI-(\d+)"
NODULE_DIR = r"nodule-(\d+)"
MASK_DIR = r"mask-(\d+)"
SLICE_FILE = re.compile(r"^slice-(\d+)\.png$", re.IGNORECASE)


def case_id(patient_number: str, nodule: int, slice_index: int) -> str:
    return f"LIDC{patient_number}_n{nodule}_s{slice_index}"


def patient_of_case(case: str) -> str:
    """``LIDC0001_n0_s3`` -> ``LIDC0001``."""
    return case.split("_", 1)[0]


def find_patient_root(source: Path) -> Path:
    source = require_dir(source, "LIDC source folder")
    if list_dirs(source, PATIENT_DIR):
        return source
    children = list_dirs(source)
    for child in children:
        if list_dirs(child, PATIENT_DIR):
            return child
    raise UserInputError(
        "no LIDC-IDRI-XXXX patient folders found",
        path=source,
        fix="point --source at the folder holding LIDC-IDRI-XXXX/nodule-Y/{images,mask-0..mask-3}/",
    )


def _nodule_job(patient_dir: Path, nodule_dir: Path) -> tuple:
    patient_number = re.fullmatch(PATIENT_DIR, patient_dir.name).group(1)
    nodule = int(re.fullmatch(NODULE_DIR, nodule_dir.name).group(1))
    images_dir = nodule_dir / "images"
    if not images_dir.is_dir():
        raise UserInputError("nodule folder without images/", path=nodule_dir)
    mask_dirs = list_dirs(nodule_dir, MASK_DIR)
    raters = sorted(int(re.fullmatch(MASK_DIR, d.name).group(1)) for d in mask_dirs)
    if raters != list(range(EXPECTED_RATERS)):
        raise UserInputError(
            f"expected rater folders mask-0..mask-{EXPECTED_RATERS - 1}, found {[d.name for d in mask_dirs]}",
            path=nodule_dir,
        )
    slices = []
    for img in list_files(images_dir, [".png"]):
        m = SLICE_FILE.match(img.name)
        if not m:
            raise UserInputError("image name is not slice-N.png", path=img)
        masks = [nodule_dir / f"mask-{r}" / img.name for r in range(EXPECTED_RATERS)]
        absent = [str(p) for p in masks if not p.is_file()]
        if absent:
            raise UserInputError(f"missing rater mask(s): {', '.join(absent)}", path=img)
        slices.append((case_id(patient_number, nodule, int(m.group(1))), str(img), [str(p) for p in masks]))
    return slices


def _read_slice(path: str) -> sitk.Image:
    img = sitk.ReadImage(path)
    if img.GetNumberOfComponentsPerPixel() != 1 or img.GetDimension() != 2:
        raise UserInputError(
            f"expected a 2D grey image, got {img.GetDimension()}D with {img.GetNumberOfComponentsPerPixel()} components",
            path=path,
        )
    return img


def _convert_nodule(job: tuple[list, str]) -> list[str]:
    slices, out_folder = job
    out = Path(out_folder)
    done = []
    for cid, image_path, mask_paths in slices:
        image = _read_slice(image_path)
        shape = tuple(reversed(image.GetSize()))
        masks = []
        for mp in mask_paths:
            arr = sitk.GetArrayFromImage(_read_slice(mp))
            if arr.shape != shape:
                raise UserInputError(f"mask shape {arr.shape} differs from image shape {shape}", path=mp)
            masks.append(binarize_mask(arr, mp))
        write_sitk(image, out / "imagesTr" / f"{cid}_0000{FILE_ENDING}")
        write_rater_case(out, cid, np.stack(masks), FILE_ENDING)
        done.append(cid)
    return done


def convert(
    source: Path,
    raw_root: Path | None = None,
    num_processes: int = 2,
    max_patients: int | None = None,
    n_folds: int = DEFAULT_NUM_FOLDS,
    seed: int = DEFAULT_SPLIT_SEED,
) -> Path:
    """Convert the LIDC crops in ``source``; return the dataset folder written."""
    patient_root = find_patient_root(Path(source).expanduser())
    patients = list_dirs(patient_root, PATIENT_DIR)
    if max_patients is not None:
        patients = patients[:max_patients]
    jobs = []
    for patient in patients:
        for nodule in list_dirs(patient, NODULE_DIR):
            slices = _nodule_job(patient, nodule)
            if slices:
                jobs.append(slices)
    if not jobs:
        raise UserInputError("no slices found", path=patient_root)

    root = resolve_raw_root(raw_root)
    with staged_dataset_folder(root, DATASET_NAME) as out:
        make_dataset_dirs(out, "imagesTr", "labelsTr", RATER_LABELS_FOLDER)
        results = run_parallel(_convert_nodule, [(slices, str(out)) for slices in jobs], num_processes)
        cases = [c for r in results for c in r]
        if len(set(cases)) != len(cases):
            raise UserInputError("two slices map to the same case id", path=patient_root)
        num_patients = len({patient_of_case(c) for c in cases})
        if num_patients >= 2:
            write_splits(out, grouped_kfold_splits(cases, patient_of_case, n_folds, seed, warn=log),
                         groups={c: patient_of_case(c) for c in cases})
        else:
            log("only one patient: no splits_final.json written")
        write_dataset_json(
            out,
            channel_names=CHANNEL_NAMES,
            labels=LABELS,
            num_training=len(cases),
            file_ending=FILE_ENDING,
            name="LIDCSlices",
            description="LIDC-IDRI lung nodule CT crops, 128x128, each slice outlined by 4 radiologists "
            f"independently; labelsTr = majority vote (>= {default_min_votes(EXPECTED_RATERS)} of "
            f"{EXPECTED_RATERS}), per-rater masks in {RATER_LABELS_FOLDER}/",
            reference="Armato et al., The Lung Image Database Consortium (LIDC) and Image Database Resource "
            "Initiative (IDRI), Medical Physics 38(2), 2011, TCIA https://doi.org/10.7937/K9/TCIA.2015.LO9QL9SX; "
            "crops as in Kohl et al., A Probabilistic U-Net for Segmentation of Ambiguous Images, NeurIPS 2018",
            licence="CC BY 3.0 (TCIA LIDC-IDRI)",
            **rater_dataset_json_fields(EXPECTED_RATERS),
            case_id_pattern="LIDC<patient>_n<nodule>_s<slice>",
            num_patients=num_patients,
            splits="splits_final.json: folds grouped by patient (part of the case id before the first '_'), "
            f"seed {seed}",
        )
    folder = root / DATASET_NAME
    log(f"{DATASET_NAME}: {len(cases)} slices of {num_patients} patient(s) -> {folder}")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--max-patients", type=int, default=None, help="convert only the first N patients")
    parser.add_argument("--folds", type=int, default=DEFAULT_NUM_FOLDS, help="cross-validation folds (default 5)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SPLIT_SEED, help="split seed (default 12345)")
    args = parser.parse_args(argv)
    return cli_run(
        lambda: convert(args.source, args.raw_root, args.num_processes, args.max_patients, args.folds, args.seed)
    )


if __name__ == "__main__":
    sys.exit(main())
