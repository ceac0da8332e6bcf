"""Tests of the dataset converters in ``dataset_conversion/``.

Synthetic tests (no data needed) cover the majority vote, the patient-grouped split and the
public-original layouts; the real-data tests use ``../shared/data`` and skip with a reason when
it is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO_ROOT = Path(__file__).absolute().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from dataset_conversion import convert_hippocampus, convert_lidc, convert_polyps, convert_qubiq  # noqa: E402
from dataset_conversion.common import (  # noqa: E402
    binarize_mask,
    grouped_kfold_splits,
    majority_vote,
    natural_key,
)
from latdiffunet.errors import UserInputError  # noqa: E402

SHARED_DATA = Path(__file__).absolute().parents[2] / "shared" / "data"
REQUIRED_DATASET_KEYS = {"channel_names", "labels", "numTraining", "file_ending", "name", "description", "reference", "licence"}


def needs_data(folder: str):
    """Skip marker for tests that read ``../shared/data/<folder>``."""
    path = SHARED_DATA / folder
    return pytest.mark.skipif(not path.is_dir(), reason=f"real data not available: {path} is absent")


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def load_dataset_json(folder: Path) -> dict:
    data = json.loads((folder / "dataset.json").read_text())
    assert REQUIRED_DATASET_KEYS <= set(data)
    assert data["labels"]["background"] == 0
    return data


def no_leftovers(raw_root: Path) -> None:
    """No staging folders and no temporary files anywhere below ``raw_root``."""
    assert not [p for p in raw_root.iterdir() if p.name.startswith(".")]
    assert not [p for p in raw_root.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


# ----------------------------------------------------------------------------------------------
# synthetic: majority vote, split, mask binarisation
# ----------------------------------------------------------------------------------------------
def test_majority_vote_four_raters_half_counts():
    masks = np.zeros((4, 1, 5), np.uint8)
    for pixel, votes in enumerate([0, 1, 2, 3, 4]):
        masks[:votes, 0, pixel] = 1
    assert majority_vote(masks).tolist() == [[0, 0, 1, 1, 1]]  # >= 2 of 4
    assert majority_vote(masks, min_votes=3).tolist() == [[0, 0, 0, 1, 1]]
    assert majority_vote(masks * 255).tolist() == [[0, 0, 1, 1, 1]]  # any non-zero value is a vote
    assert majority_vote(masks).dtype == np.uint8


def test_majority_vote_seven_raters_needs_four():
    masks = np.zeros((7, 8), np.uint8)
    for pixel in range(8):
        masks[:pixel, pixel] = 1
    assert majority_vote(masks).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_majority_vote_rejects_bad_arguments():
    with pytest.raises(ValueError):
        majority_vote(np.zeros((4, 3, 3)), min_votes=5)
    with pytest.raises(ValueError):
        majority_vote(np.zeros((4, 3, 3)), min_votes=0)
    with pytest.raises(ValueError):
        majority_vote(np.zeros(3))


def _synthetic_cases(n_patients: int = 13) -> list[str]:
    rng = np.random.RandomState(0)
    return [f"P{p:03d}_s{s}" for p in range(n_patients) for s in range(rng.randint(1, 9))]


def test_grouped_split_keeps_patients_together():
    cases = _synthetic_cases()
    group = lambda c: c.split("_")[0]  # noqa: E731
    splits = grouped_kfold_splits(cases, group, n_folds=5, seed=12345)
    assert len(splits) == 5
    seen_val = []
    for fold in splits:
        train_patients = {group(c) for c in fold["train"]}
        val_patients = {group(c) for c in fold["val"]}
        assert not train_patients & val_patients
        assert sorted(fold["train"] + fold["val"], key=natural_key) == sorted(cases, key=natural_key)
        seen_val += fold["val"]
    assert sorted(seen_val) == sorted(cases)  # every case is validated exactly once
    patients_per_fold = [len({group(c) for c in f["val"]}) for f in splits]
    assert max(patients_per_fold) - min(patients_per_fold) <= 1
    # deterministic, order of the input does not matter, the seed does
    assert grouped_kfold_splits(list(reversed(cases)), group, 5, 12345) == splits
    assert grouped_kfold_splits(cases, group, 5, 1) != splits


def test_grouped_split_few_groups():
    warnings = []
    splits = grouped_kfold_splits(["a_1", "a_2", "b_1", "c_1"], lambda c: c[0], 5, warn=warnings.append)
    assert len(splits) == 3 and warnings
    with pytest.raises(ValueError):
        grouped_kfold_splits(["a_1", "a_2"], lambda c: c[0])


def test_binarize_mask():
    assert binarize_mask(np.array([0, 255, 255]), "x").tolist() == [0, 1, 1]
    assert binarize_mask(np.array([0, 1]), "x").tolist() == [0, 1]
    assert binarize_mask(np.array([0, 3, 127, 128, 250]), "x", threshold=128).tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(UserInputError):
        binarize_mask(np.array([0, 3, 255]), "x")


# ----------------------------------------------------------------------------------------------
# synthetic: public-original layouts, atomicity, CLI errors
# ----------------------------------------------------------------------------------------------
def _write_nifti(arr: np.ndarray, path: Path, spacing=(1.5, 0.7, 2.0), origin=(10.0, -5.0, 3.25)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if arr.ndim == 3:
        img.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return img


def _make_msd(root: Path, bad_label: bool = False) -> Path:
    task = root / "Task04_Hippocampus"
    rng = np.random.RandomState(1)
    for i in (1, 3):
        _write_nifti(rng.rand(4, 5, 6).astype(np.float32) * 1000, task / "imagesTr" / f"hippocampus_{i:03d}.nii.gz")
        label = rng.randint(0, 3, (4, 5, 6)).astype(np.int16)
        if bad_label and i == 3:
            label[0, 0, 0] = 7
        _write_nifti(label, task / "labelsTr" / f"hippocampus_{i:03d}.nii.gz")
        (task / "imagesTr" / f"._hippocampus_{i:03d}.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    _write_nifti(rng.rand(4, 5, 6).astype(np.float32), task / "imagesTs" / "hippocampus_002.nii.gz")
    (task / "dataset.json").write_text("{}")
    return task


def test_hippocampus_msd_layout_keeps_geometry_and_dtype(tmp_path):
    task = _make_msd(tmp_path / "src")
    out = convert_hippocampus.convert(tmp_path / "src", tmp_path / "raw", num_processes=1)
    assert out == tmp_path / "raw" / "Dataset004_Hippocampus"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [
        "hippocampus_001_0000.nii.gz",
        "hippocampus_003_0000.nii.gz",
    ]
    assert [p.name for p in (out / "imagesTs").iterdir()] == ["hippocampus_002_0000.nii.gz"]
    src = sitk.ReadImage(str(task / "imagesTr" / "hippocampus_003.nii.gz"))
    dst = sitk.ReadImage(str(out / "imagesTr" / "hippocampus_003_0000.nii.gz"))
    assert dst.GetPixelID() == sitk.sitkFloat32
    assert (dst.GetSpacing(), dst.GetOrigin(), dst.GetDirection()) == (src.GetSpacing(), src.GetOrigin(), src.GetDirection())
    assert np.array_equal(sitk.GetArrayFromImage(src), sitk.GetArrayFromImage(dst))
    lab = sitk.ReadImage(str(out / "labelsTr" / "hippocampus_003.nii.gz"))
    assert lab.GetPixelID() == sitk.sitkUInt8 and lab.GetOrigin() == src.GetOrigin()
    assert load_dataset_json(out)["numTraining"] == 2
    no_leftovers(tmp_path / "raw")


def test_failed_conversion_leaves_previous_dataset(tmp_path):
    out = convert_hippocampus.convert(_make_msd(tmp_path / "good"), tmp_path / "raw", num_processes=1)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(UserInputError, match="not declared labels"):
        convert_hippocampus.convert(_make_msd(tmp_path / "bad", bad_label=True), tmp_path / "raw", num_processes=2)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    no_leftovers(tmp_path / "raw")


def test_cli_reports_user_errors(tmp_path, capsys):
    assert convert_hippocampus.main(["--source", str(tmp_path / "nowhere"), "--raw-root", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


def test_cvc_original_tiff_layout(tmp_path):
    src = tmp_path / "CVC-ClinicDB"
    (src / "Original").mkdir(parents=True)
    (src / "Ground Truth").mkdir()
    rng = np.random.RandomState(2)
    for frame in (1, 2, 30):
        rgb = rng.randint(0, 256, (6, 7, 3)).astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(src / "Original" / f"{frame}.tif"))
        mask = np.zeros((6, 7), np.uint8)
        mask[2:4, 1:5] = 255
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(src / "Ground Truth" / f"{frame}.tif"))
    (src / "Original" / "._1.tif").write_bytes(b"junk")
    out = convert_polyps.convert(src, tmp_path / "raw", dataset="cvc", num_processes=1)
    assert out.name == "Dataset011_CVCClinicDB"
    img = sitk.ReadImage(str(out / "imagesTr" / "cvc_0030_0000.png"))
    assert img.GetNumberOfComponentsPerPixel() == 3
    assert np.array_equal(sitk.GetArrayFromImage(img), read(src / "Original" / "30.tif"))
    assert np.array_equal(read(out / "labelsTr" / "cvc_0030.png"), read(src / "Ground Truth" / "30.tif") // 255)
    splits = json.loads((out / "splits_final.json").read_text())  # frames 1, 2 -> sequence 1; 30 -> 2
    assert sorted(sorted(f["val"]) for f in splits) == [["cvc_0001", "cvc_0002"], ["cvc_0030"]]
    assert convert_polyps.cvc_sequence_of_frame(25) == 1 and convert_polyps.cvc_sequence_of_frame(612) == 29


def test_qubiq_challenge_nifti_layout(tmp_path):
    train = tmp_path / "release" / "brain-growth" / "Training"
    rng = np.random.RandomState(3)
    for case in ("case01", "case02"):
        image = _write_nifti(rng.rand(9, 8).astype(np.float32), train / case / "image.nii.gz", (0.5, 0.5), (1.0, 2.0))
        for k in range(1, 8):
            seg = sitk.GetImageFromArray((rng.rand(9, 8) > 0.5).astype(np.uint8))
            seg.CopyInformation(image)
            sitk.WriteImage(seg, str(train / case / f"task01_seg{k:02d}.nii.gz"))
    (train / "case01" / "._task01_seg01.nii.gz").write_bytes(b"junk")
    out = convert_qubiq.convert(tmp_path / "release", tmp_path / "raw", num_processes=1)
    data = load_dataset_json(out)
    assert data["num_raters"] == 7 and data["majority_vote_min_raters"] == 4 and data["numTraining"] == 2
    raters = np.stack([read(train / "case02" / f"task01_seg{k:02d}.nii.gz") for k in range(1, 8)])
    for k in range(7):
        assert np.array_equal(read(out / "labelsTr_raters" / f"case02_rater{k}.nii.gz"), raters[k])
    label = sitk.ReadImage(str(out / "labelsTr" / "case02.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(label), (raters.sum(0) >= 4).astype(np.uint8))
    assert label.GetSpacing() == (0.5, 0.5) and label.GetOrigin() == (1.0, 2.0)
    assert read(out / "imagesTr" / "case01_0000.nii.gz").dtype == np.float32


# ----------------------------------------------------------------------------------------------
# real data
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hippocampus_dataset(tmp_path_factory) -> Path:
    """The documented command, run exactly as a user would (from the repository root)."""
    raw = tmp_path_factory.mktemp("raw")
    result = subprocess.run(
        [sys.executable, "dataset_conversion/convert_hippocampus.py", "--source", "../shared/data/Hippocampus"],
        cwd=REPO_ROOT,
        env={**os.environ, "LATDIFF_RAW": str(raw)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return raw / "Dataset004_Hippocampus"


@pytest.mark.realdata
@needs_data("Hippocampus")
def test_hippocampus_real(hippocampus_dataset):
    src = SHARED_DATA / "Hippocampus"
    data = load_dataset_json(hippocampus_dataset)
    assert data["numTraining"] == 220
    assert data["channel_names"] == {"0": "MRI"}
    assert data["labels"] == {"background": 0, "anterior": 1, "posterior": 2}
    assert data["file_ending"] == ".nii.gz"
    images = sorted((hippocampus_dataset / "imagesTr").iterdir())
    labels = sorted((hippocampus_dataset / "labelsTr").iterdir())
    assert len(images) == len(labels) == 220
    assert all(p.name.endswith("_0000.nii.gz") for p in images)
    for case in ("hippocampus_001", "hippocampus_204", "hippocampus_394"):
        for src_file, dst_file in (
            (src / "images" / f"{case}.nii.gz", hippocampus_dataset / "imagesTr" / f"{case}_0000.nii.gz"),
            (src / "labels" / f"{case}.nii.gz", hippocampus_dataset / "labelsTr" / f"{case}.nii.gz"),
        ):
            a, b = sitk.ReadImage(str(src_file)), sitk.ReadImage(str(dst_file))
            assert a.GetSpacing() == b.GetSpacing()
            assert a.GetOrigin() == b.GetOrigin()
            assert a.GetDirection() == b.GetDirection()
            assert a.GetPixelID() == b.GetPixelID()
            assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert set(np.unique(read(labels[0]))) <= {0, 1, 2}
    no_leftovers(hippocampus_dataset.parent)


@pytest.mark.realdata
@needs_data("Hippocampus")
def test_hippocampus_real_passes_the_pipeline_reader(hippocampus_dataset):
    raw_dataset = pytest.importorskip("latdiffunet.raw_dataset")
    spec = raw_dataset.load_dataset(hippocampus_dataset)
    cases, problems = raw_dataset.list_training_cases(spec)
    assert problems == [] and len(cases) == 220


@pytest.mark.realdata
@needs_data("LIDC-IDRI-slices")
def test_lidc_real_subset(tmp_path):
    src = SHARED_DATA / "LIDC-IDRI-slices"
    out = convert_lidc.convert(src, tmp_path, max_patients=3)
    data = load_dataset_json(out)
    assert data["num_raters"] == 4 and data["rater_labels_folder"] == "labelsTr_raters"
    assert data["majority_vote_min_raters"] == 2 and data["file_ending"] == ".png"
    patients = sorted(p.name for p in src.iterdir() if p.name.startswith("LIDC-IDRI-"))[:3]
    expected = sum(
        len(list((nod / "images").glob("slice-*.png"))) for p in patients for nod in (src / p).glob("nodule-*")
    )
    cases = sorted(p.name[: -len(".png")] for p in (out / "labelsTr").iterdir())
    assert len(cases) == expected == data["numTraining"]
    assert len(list((out / "labelsTr_raters").iterdir())) == 4 * expected
    assert {c.split("_")[0] for c in cases} == {"LIDC" + p.split("-")[-1] for p in patients}

    # rater files = source masks, label = >= 2 of 4; check cases with disagreement first
    checked = disagreements = 0
    for case in cases:
        patient, nodule, slice_ = case.split("_")
        folder = src / f"LIDC-IDRI-{patient[4:]}" / f"nodule-{nodule[1:]}"
        source_masks = np.stack([read(folder / f"mask-{k}" / f"slice-{slice_[1:]}.png") for k in range(4)]) // 255
        raters = np.stack([read(out / "labelsTr_raters" / f"{case}_rater{k}.png") for k in range(4)])
        assert np.array_equal(raters, source_masks)
        label = read(out / "labelsTr" / f"{case}.png")
        assert label.dtype == np.uint8
        assert np.array_equal(label, (source_masks.sum(0) >= 2).astype(np.uint8))
        assert np.array_equal(read(out / "imagesTr" / f"{case}_0000.png"), read(folder / "images" / f"slice-{slice_[1:]}.png"))
        votes = source_masks.sum(0)
        disagreements += int(((votes > 0) & (votes < 4)).any())
        checked += 1
        if checked >= 25:
            break
    assert disagreements > 0, "the subset should contain rater disagreement"

    splits = json.loads((out / "splits_final.json").read_text())
    assert len(splits) == 3  # 3 patients -> one fold per patient
    all_val = []
    for fold in splits:
        assert set(fold) == {"train", "val"}
        train_p = {c.split("_")[0] for c in fold["train"]}
        val_p = {c.split("_")[0] for c in fold["val"]}
        assert train_p.isdisjoint(val_p)
        assert sorted(fold["train"] + fold["val"]) == cases
        all_val += fold["val"]
    assert sorted(all_val) == cases
    # deterministic
    again = convert_lidc.convert(src, tmp_path / "again", max_patients=3, num_processes=1)
    assert json.loads((again / "splits_final.json").read_text()) == splits


@pytest.mark.realdata
@pytest.mark.parametrize(
    "dataset, folder, name",
    [("kvasir", "Kvasir-SEG", "Dataset010_KvasirSEG"), ("cvc", "CVC-ClinicDB", "Dataset011_CVCClinicDB")],
)
def test_polyps_real_subset(tmp_path, dataset, folder, name):
    src = SHARED_DATA / folder
    if not src.is_dir():
        pytest.skip(f"real data not available: {src} is absent")
    out = convert_polyps.convert(src, tmp_path, dataset=dataset, max_cases=6)
    assert out.name == name
    data = load_dataset_json(out)
    assert data["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    assert data["labels"] == {"background": 0, "polyp": 1} and data["file_ending"] == ".png"
    assert data["numTraining"] == 6
    images = sorted((out / "imagesTr").iterdir())
    assert len(images) == 6 and all(p.name.endswith("_0000.png") for p in images)
    first_src = sorted((src / "images").glob("*.jpg"), key=lambda p: natural_key(p.name))[0]
    for img_path in images:
        img = sitk.ReadImage(str(img_path))
        assert img.GetNumberOfComponentsPerPixel() == 3
        assert img.GetPixelID() == sitk.sitkVectorUInt8
        case = img_path.name[: -len("_0000.png")]
        mask = read(out / "labelsTr" / f"{case}.png")
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        assert mask.shape == sitk.GetArrayFromImage(img).shape[:2]
        assert mask.any()
    first_case = convert_polyps.case_id_for(dataset, first_src.stem)
    assert np.array_equal(read(out / "imagesTr" / f"{first_case}_0000.png"), read(first_src))  # lossless
    src_mask = read(src / "masks" / first_src.name).astype(float).mean(-1)
    assert np.array_equal(read(out / "labelsTr" / f"{first_case}.png"), (src_mask >= 128).astype(np.uint8))


@pytest.mark.realdata
@needs_data("QUBIQ-brain-growth")
def test_qubiq_real_subset(tmp_path):
    src = SHARED_DATA / "QUBIQ-brain-growth"
    out = convert_qubiq.convert(src, tmp_path, max_cases=3)
    data = load_dataset_json(out)
    assert data["num_raters"] == 7 and data["majority_vote_min_raters"] == 4 and data["numTraining"] == 3
    assert data["rater_labels_folder"] == "labelsTr_raters"
    for npz in sorted(src.glob("case*.npz"))[:3]:
        with np.load(npz, allow_pickle=False) as f:
            image, masks = f["image"], f["masks"]
        case = npz.stem
        assert np.array_equal(read(out / "imagesTr" / f"{case}_0000.nii.gz"), image)
        for k in range(7):
            assert np.array_equal(read(out / "labelsTr_raters" / f"{case}_rater{k}.nii.gz"), masks[k])
        label = read(out / "labelsTr" / f"{case}.nii.gz")
        assert label.dtype == np.uint8
        assert np.array_equal(label, (masks.sum(0) >= 4).astype(np.uint8))
