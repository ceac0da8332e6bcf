"""Medical Segmentation Decathlon Task04 Hippocampus -> ``Dataset004_Hippocampus`` (nnU-Net v2 raw).

Public original: the Medical Segmentation Decathlon, http://medicaldecathlon.com/ ,
``Task04_Hippocampus.tar`` (Simpson et al., "A large annotated medical image dataset for the
development and evaluation of segmentation algorithms", arXiv:1902.09063, 2019; data from
Vanderbilt University Medical Center). Licence CC-BY-SA 4.0. Mono-modal MRI, cropped around the
hippocampus, labels 0 background, 1 anterior, 2 posterior.

Accepted source layouts (``--source``):

* the project's shared copy (``../shared/data/Hippocampus``)::

      images/hippocampus_XXX.nii.gz
      labels/hippocampus_XXX.nii.gz       (same file name as the image)

  All cases go to ``imagesTr``/``labelsTr`` (220 in the shared copy).

* the extracted MSD tarball (``Task04_Hippocampus/`` or the folder holding it)::

      imagesTr/hippocampus_XXX.nii.gz, labelsTr/hippocampus_XXX.nii.gz,
      imagesTs/hippocampus_XXX.nii.gz, dataset.json

  ``imagesTr``/``labelsTr`` -> ``imagesTr``/``labelsTr`` (260 cases), ``imagesTs`` -> ``imagesTs``
  (130 unlabelled cases). The tarball's macOS ``._hippocampus_XXX.nii.gz`` files are skipped.

Output: ``<raw_root>/Dataset004_Hippocampus/`` with ``imagesTr/hippocampus_XXX_0000.nii.gz``,
``labelsTr/hippocampus_XXX.nii.gz`` and ``dataset.json`` (channel ``{"0": "MRI"}``, labels
background 0 / anterior 1 / posterior 2, ``file_ending`` ``.nii.gz``). Images are read with
SimpleITK and written back with the same voxels, dtype, spacing, origin and direction; labels are
checked to hold only 0/1/2 and stored as uint8 on the same grid.

Usage (from the repository root)::

    python dataset_conversion/convert_hippocampus.py --source ../shared/data/Hippocampus [--raw-root DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import SimpleITK as sitk  # noqa: E402

from dataset_conversion.common import (  # noqa: E402
    base_parser,
    check_same_grid,
    cli_run,
    find_child_dir,
    list_files,
    log,
    make_dataset_dirs,
    require_dir,
    resolve_raw_root,
    run_parallel,
    staged_dataset_folder,
    strip_ending,
    to_uint8_label,
    write_dataset_json,
    write_sitk,
)
from latdiffunet.errors import UserInputError  # noqa: E402

DATASET_NAME = "Dataset004_Hippocampus"
FILE_ENDING = ".nii.gz"
LABELS = {"background": 0, "anterior": 1, "posterior": 2}
CHANNEL_NAMES = {"0": "MRI"}


def find_layout(source: Path) -> tuple[Path, Path, Path | None]:
    """``(image_folder, label_folder, test_image_folder or None)`` for either accepted layout."""
    source = require_dir(source, "Hippocampus source folder")
    for root in (source, find_child_dir(source, "Task04_Hippocampus")):
        if root is None:
            continue
        images_tr, labels_tr = find_child_dir(root, "imagesTr"), find_child_dir(root, "labelsTr")
        if images_tr and labels_tr:  # MSD original
            return images_tr, labels_tr, find_child_dir(root, "imagesTs")
        images, labels = find_child_dir(root, "images"), find_child_dir(root, "labels")
        if images and labels:  # shared copy
            return images, labels, None
    raise UserInputError(
        "no Hippocampus data found: expected images/ + labels/ (shared copy) or "
        "imagesTr/ + labelsTr/ (MSD Task04_Hippocampus)",
        path=source,
        fix="point --source at the folder that holds those sub-folders",
    )


def _convert_training_case(job: tuple[str, str, str, str]) -> str:
    case_id, image_path, label_path, out_folder = job
    image = sitk.ReadImage(image_path)
    label = sitk.ReadImage(label_path)
    check_same_grid(image, label, Path(image_path), Path(label_path))
    label = to_uint8_label(label, LABELS.values(), Path(label_path))
    out = Path(out_folder)
    write_sitk(image, out / "imagesTr" / f"{case_id}_0000{FILE_ENDING}")
    write_sitk(label, out / "labelsTr" / f"{case_id}{FILE_ENDING}")
    return case_id


def _convert_test_case(job: tuple[str, str, str]) -> str:
    case_id, image_path, out_folder = job
    write_sitk(sitk.ReadImage(image_path), Path(out_folder) / "imagesTs" / f"{case_id}_0000{FILE_ENDING}")
    return case_id


def convert(
    source: Path,
    raw_root: Path | None = None,
    num_processes: int = 2,
    max_cases: int | None = None,
) -> Path:
    """Convert the Hippocampus data in ``source``; return the dataset folder written."""
    source = Path(source).expanduser()
    image_dir, label_dir, test_dir = find_layout(source)
    images = list_files(image_dir, [FILE_ENDING])
    labels = {strip_ending(p): p for p in list_files(label_dir, [FILE_ENDING])}
    if not images:
        raise UserInputError(f"no *{FILE_ENDING} images found", path=image_dir)
    missing = [strip_ending(p) for p in images if strip_ending(p) not in labels]
    if missing:
        raise UserInputError(
            f"{len(missing)} image(s) without a label of the same name in {label_dir}: {', '.join(missing[:5])}",
            path=image_dir,
        )
    if max_cases is not None:
        images = images[:max_cases]
    test_images = list_files(test_dir, [FILE_ENDING]) if test_dir is not None else []
    if max_cases is not None:
        test_images = test_images[:max_cases]

    root = resolve_raw_root(raw_root)
    with staged_dataset_folder(root, DATASET_NAME) as out:
        make_dataset_dirs(out, "imagesTr", "labelsTr", *(["imagesTs"] if test_images else []))
        jobs = [(strip_ending(p), str(p), str(labels[strip_ending(p)]), str(out)) for p in images]
        cases = run_parallel(_convert_training_case, jobs, num_processes)
        if test_images:
            run_parallel(_convert_test_case, [(strip_ending(p), str(p), str(out)) for p in test_images], num_processes)
        write_dataset_json(
            out,
            channel_names=CHANNEL_NAMES,
            labels=LABELS,
            num_training=len(cases),
            file_ending=FILE_ENDING,
            name="Hippocampus",
            description="Medical Segmentation Decathlon Task04: hippocampus head (anterior) "
            "and body+tail (posterior) in mono-modal MRI crops",
            reference="Medical Segmentation Decathlon, http://medicaldecathlon.com/ (Simpson et al. 2019, "
            "arXiv:1902.09063); Vanderbilt University Medical Center",
            licence="CC-BY-SA 4.0",
            release="1.0",
            source_layout="msd" if image_dir.name == "imagesTr" else "shared-copy",
            numTest=len(test_images),
        )
    dataset = root / DATASET_NAME
    log(f"{DATASET_NAME}: {len(cases)} training case(s), {len(test_images)} test case(s) -> {dataset}")
    return dataset


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--max-cases", type=int, default=None, help="convert only the first N cases (for tests)")
    args = parser.parse_args(argv)
    return cli_run(lambda: convert(args.source, args.raw_root, args.num_processes, args.max_cases))


if __name__ == "__main__":
    sys.exit(main())
