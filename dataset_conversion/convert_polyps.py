"""Colonoscopy polyp datasets -> ``Dataset010_KvasirSEG`` / ``Dataset011_CVCClinicDB`` (nnU-Net v2 raw).

Public originals:

* **Kvasir-SEG** (``--dataset kvasir``), Simula Research Laboratory,
  https://datasets.simula.no/kvasir-seg/ (``kvasir-seg.zip``): 1000 polyp images with masks.
  Jha et al., "Kvasir-SEG: A Segmented Polyp Dataset", MMM 2020. Research and educational use.
* **CVC-ClinicDB** (``--dataset cvc``), Computer Vision Center / Hospital Clinic Barcelona,
  https://polyp.grand-challenge.org/CVCClinicDB/ : 612 frames from 29 colonoscopy sequences.
  Bernal et al., "WM-DOVA maps for accurate polyp highlighting in colonoscopy", CMIG 2015.
  Research and educational use only, no commercial use.

Accepted source layouts (``--source``):

* Kvasir-SEG, shared copy and Simula original alike: ``images/<id>.jpg``, ``masks/<id>.jpg``
  (same name; ``kavsir_bboxes.json`` is not needed). Case id = ``<id>``.
* CVC-ClinicDB, shared copy: ``images/<n>.jpg``, ``masks/<n>.jpg``;
  original: ``Original/<n>.tif`` + ``Ground Truth/<n>.tif`` (also ``TIF/...`` and the PNG release
  ``PNG/Original/<n>.png`` + ``PNG/Ground Truth/<n>.png``). Case id = ``cvc_<nnnn>`` (frame number,
  zero padded) or the file stem when it is not a number.

macOS ``._`` files are skipped. Output per case: ``imagesTr/CASE_0000.png``, ONE RGB PNG holding all
three colour channels (nnU-Net v2's natural-image convention, ``channel_names``
``{"0": "R", "1": "G", "2": "B"}``), written losslessly from the decoded JPEG/TIFF pixels (grey
sources are replicated to RGB, an alpha channel is dropped); ``labelsTr/CASE.png``, uint8 {0, 1}:
the (JPEG-compressed) mask averaged over its colour channels and thresholded at 128 (foreground
where value >= 128 of 255; a mask that already holds only {0, 1} is kept as it is). Labels
``{"background": 0, "polyp": 1}``, ``file_ending`` ``.png``.

CVC-ClinicDB frames of one video sequence are near duplicates, so a random split would leak. When
every case is a frame number, ``splits_final.json`` (5 folds, seed 12345) is written with the
frame -> sequence table of the CVC-ClinicDB README, grouping folds by sequence. Kvasir-SEG has no
grouping information; nnU-Net's default random split applies.

Usage (from the repository root)::

    python dataset_conversion/convert_polyps.py --dataset kvasir --source ../shared/data/Kvasir-SEG
    python dataset_conversion/convert_polyps.py --dataset cvc --source ../shared/data/CVC-ClinicDB [--max-cases N]
"""

from __future__ import annotations

import bisect
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from dataset_conversion.common import (  # noqa: E402
    base_parser,
    binarize_mask,
    cli_run,
    find_child_dir,
    grouped_kfold_splits,
    label_image_from_array,
    list_files,
    log,
    make_dataset_dirs,
    require_dir,
    resolve_raw_root,
    run_parallel,
    staged_dataset_folder,
    strip_ending,
    write_dataset_json,
    write_sitk,
    write_splits,
)
from latdiffunet.errors import UserInputError  # noqa: E402

FILE_ENDING = ".png"
LABELS = {"background": 0, "polyp": 1}
CHANNEL_NAMES = {"0": "R", "1": "G", "2": "B"}
MASK_THRESHOLD = 128
IMAGE_ENDINGS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")

DATASETS = {
    "kvasir": {
        "folder": "Dataset010_KvasirSEG",
        "name": "KvasirSEG",
        "description": "Kvasir-SEG: RGB colonoscopy images with manually segmented polyps",
        "reference": "Jha et al., Kvasir-SEG: A Segmented Polyp Dataset, MMM 2020; "
        "https://datasets.simula.no/kvasir-seg/ (Simula Research Laboratory)",
        "licence": "research and educational use (see https://datasets.simula.no/kvasir-seg/)",
        "layouts": [("images", "masks")],
    },
    "cvc": {
        "folder": "Dataset011_CVCClinicDB",
        "name": "CVCClinicDB",
        "description": "CVC-ClinicDB: RGB colonoscopy frames from 29 sequences with polyp masks",
        "reference": "Bernal et al., WM-DOVA maps for accurate polyp highlighting in colonoscopy, CMIG 2015; "
        "https://polyp.grand-challenge.org/CVCClinicDB/ (Computer Vision Center, Hospital Clinic Barcelona)",
        "licence": "research and educational use only, commercial use forbidden",
        "layouts": [
            ("images", "masks"),
            ("Original", "Ground Truth"),
            ("TIF/Original", "TIF/Ground Truth"),
            ("PNG/Original", "PNG/Ground Truth"),
        ],
    },
}

# Last frame of each of the 29 CVC-ClinicDB video sequences (README.txt of the dataset).
CVC_SEQUENCE_LAST_FRAME = [
    25, 50, 67, 78, 103, 126, 151, 177, 199, 205, 227, 252, 277, 297, 317,
    342, 363, 383, 408, 428, 447, 466, 478, 503, 528, 546, 571, 591, 612,
]  # fmt: skip


def cvc_sequence_of_frame(frame: int) -> int:
    """1-based CVC-ClinicDB sequence of a 1-based frame number."""
    if not 1 <= frame <= CVC_SEQUENCE_LAST_FRAME[-1]:
        raise ValueError(f"frame {frame} is outside 1..{CVC_SEQUENCE_LAST_FRAME[-1]}")
    return bisect.bisect_left(CVC_SEQUENCE_LAST_FRAME, frame) + 1


def _sub(root: Path, rel: str) -> Path | None:
    folder: Path | None = root
    for part in rel.split("/"):
        folder = find_child_dir(folder, part) if folder is not None else None
    return folder


def find_layout(source: Path, dataset: str) -> tuple[Path, Path]:
    source = require_dir(source, f"{dataset} source folder")
    candidates = [source] + [p for p in (find_child_dir(source, "Kvasir-SEG", "CVC-ClinicDB"),) if p]
    for root in candidates:
        for img_rel, mask_rel in DATASETS[dataset]["layouts"]:
            images, masks = _sub(root, img_rel), _sub(root, mask_rel)
            if images is not None and masks is not None:
                return images, masks
    expected = " or ".join(f"'{a}/' + '{b}/'" for a, b in DATASETS[dataset]["layouts"])
    raise UserInputError(f"no {dataset} image/mask folders found: expected {expected}", path=source)


def case_id_for(dataset: str, stem: str) -> str:
    if dataset == "cvc" and stem.isdigit():
        return f"cvc_{int(stem):04d}"
    return stem


def _as_rgb(image: sitk.Image, path: str) -> sitk.Image:
    n = image.GetNumberOfComponentsPerPixel()
    if image.GetDimension() != 2:
        raise UserInputError(f"expected a 2D image, got {image.GetDimension()}D", path=path)
    arr = sitk.GetArrayFromImage(image)  # (H, W) or (H, W, C)
    if arr.dtype != np.uint8:
        raise UserInputError(f"expected 8-bit colour image, got {image.GetPixelIDTypeAsString()}", path=path)
    if n == 1:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    elif n == 4:
        arr = arr[..., :3]
    elif n != 3:
        raise UserInputError(f"expected an RGB image, got {n} components per pixel", path=path)
    return sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=True)


def _read_mask(path: str) -> np.ndarray:
    mask = sitk.ReadImage(path)
    arr = sitk.GetArrayFromImage(mask)
    if mask.GetNumberOfComponentsPerPixel() > 1:
        arr = arr[..., :3].mean(axis=-1)  # JPEG masks come as (near-)grey RGB
    return binarize_mask(arr, path, threshold=MASK_THRESHOLD)


def _convert_case(job: tuple[str, str, str, str]) -> str:
    case_id, image_path, mask_path, out_folder = job
    image = _as_rgb(sitk.ReadImage(image_path), image_path)
    mask = _read_mask(mask_path)
    if mask.shape != tuple(reversed(image.GetSize())):
        raise UserInputError(
            f"mask {mask_path} has shape {mask.shape}, image has {tuple(reversed(image.GetSize()))}", path=image_path
        )
    out = Path(out_folder)
    write_sitk(image, out / "imagesTr" / f"{case_id}_0000{FILE_ENDING}")
    write_sitk(label_image_from_array(mask), out / "labelsTr" / f"{case_id}{FILE_ENDING}")
    return case_id


def convert(
    source: Path,
    raw_root: Path | None = None,
    dataset: str = "kvasir",
    num_processes: int = 2,
    max_cases: int | None = None,
) -> Path:
    """Convert Kvasir-SEG (``dataset='kvasir'``) or CVC-ClinicDB (``'cvc'``); return the dataset folder."""
    dataset = dataset.lower()
    if dataset not in DATASETS:
        raise UserInputError(f"unknown polyp dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    meta = DATASETS[dataset]
    image_dir, mask_dir = find_layout(Path(source).expanduser(), dataset)
    images = list_files(image_dir, IMAGE_ENDINGS)
    masks = {strip_ending(p): p for p in list_files(mask_dir, IMAGE_ENDINGS)}
    if not images:
        raise UserInputError("no images found", path=image_dir)
    missing = [p.name for p in images if strip_ending(p) not in masks]
    if missing:
        raise UserInputError(f"{len(missing)} image(s) without a mask in {mask_dir}: {', '.join(missing[:5])}", path=image_dir)
    if max_cases is not None:
        images = images[:max_cases]
    jobs_meta = [(case_id_for(dataset, strip_ending(p)), p, masks[strip_ending(p)]) for p in images]
    ids = [c for c, _, _ in jobs_meta]
    if len(set(ids)) != len(ids):
        raise UserInputError("two images map to the same case id (e.g. 1.tif and 1.png)", path=image_dir)

    root = resolve_raw_root(raw_root)
    with staged_dataset_folder(root, meta["folder"]) as out:
        make_dataset_dirs(out, "imagesTr", "labelsTr")
        cases = run_parallel(_convert_case, [(c, str(i), str(m), str(out)) for c, i, m in jobs_meta], num_processes)
        extra = {}
        if dataset == "cvc":
            frames = {c: int(strip_ending(i)) for c, i, _ in jobs_meta if strip_ending(i).isdigit()}
            if len(frames) == len(cases) and all(1 <= f <= CVC_SEQUENCE_LAST_FRAME[-1] for f in frames.values()):
                groups = {c: f"seq{cvc_sequence_of_frame(frames[c]):02d}" for c in cases}
                try:
                    splits = grouped_kfold_splits(cases, groups.__getitem__, warn=log)
                except ValueError as exc:
                    log(f"no splits_final.json: {exc}")
                else:
                    write_splits(out, splits, groups=groups)
                    extra["splits"] = "splits_final.json: 5 folds grouped by video sequence (seed 12345)"
            else:
                log("file names are not CVC frame numbers: no sequence-grouped splits_final.json written")
        write_dataset_json(
            out,
            channel_names=CHANNEL_NAMES,
            labels=LABELS,
            num_training=len(cases),
            file_ending=FILE_ENDING,
            name=meta["name"],
            description=meta["description"],
            reference=meta["reference"],
            licence=meta["licence"],
            mask_threshold=MASK_THRESHOLD,
            **extra,
        )
    folder = root / meta["folder"]
    log(f"{meta['folder']}: {len(cases)} case(s) -> {folder}")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True, help="kvasir or cvc")
    parser.add_argument("--max-cases", type=int, default=None, help="convert only the first N cases")
    args = parser.parse_args(argv)
    return cli_run(lambda: convert(args.source, args.raw_root, args.dataset, args.num_processes, args.max_cases))


if __name__ == "__main__":
    sys.exit(main())
