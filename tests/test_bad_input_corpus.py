"""A corpus of messy inputs, each built on the fly from a clean synthetic dataset.

Every defect goes through the real command-line entry points (``main(argv)`` of
``latdiff_plan_and_preprocess``, ``latdiff_train`` and ``latdiff_predict``), in-process. A user
error must give exit code 2 and exactly one ``error:`` message on stderr that names the offending
file (or the folder / JSON file for folder-level defects) and says how to fix it (a ``fix:``
line), never a traceback.

Some "defects" are legitimate inputs and must work; their test ids start with ``accepted-``:

* non-ASCII characters and spaces in folders and case names;
* symlinked image / label files (links into another folder);
* hidden files such as ``.DS_Store`` or macOS ``._CASE_0000.nii.gz`` resource forks (ignored);
* a label map without foreground (nnU-Net allows cases without the structure);
* a constant image (every voxel equal, e.g. an all-zero "empty" scan): it carries no information,
  but a blank scan can be real and the normalisation copes (std is clamped), so the run proceeds
  and prints one ``warning:`` line naming the file. A zero-byte or unreadable file is an error.

Notes on the choices:

* NaN/inf: SimpleITK's NIfTI reader turns NaN and inf into 0, so they are looked for in the voxel
  bytes of float ``.nii`` / ``.nii.gz`` files; ``.mha`` / ``.nrrd`` readers keep them in the array.
* Duplicate case names: on Linux two files can only collide by name when they differ in case
  (``synth_001`` vs ``SYNTH_001``, which are one file on macOS/Windows and whose outputs would
  overwrite each other there) or when the same case is present under two endings
  (``synth_001_0000.nii`` beside ``synth_001_0000.nii.gz``); both are refused, naming the files.
* Content defects (label values, NaN, geometry) are caught with and without
  ``--verify_dataset_integrity``: without it, fingerprinting reads every case and refuses the
  first one, so nothing is ever trained on silently wrong data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk

from synthetic import make_synthetic_dataset
from test_predict import make_untrained_run

from latdiffunet.experiment_planning.cli import main as plan_main
from latdiffunet.inference.cli import main as predict_main
from latdiffunet.training.cli import main as train_main

NAME = "Dataset900_Synth"
PLAN_ARGS = ["-d", "900", "--preset", "tiny", "-np", "1", "-c", "2d"]
ERROR_LINE = re.compile(r"(?:^|[\r\n])error: ")


def run_cli(main, argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, names: list[str]) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(ERROR_LINE.findall(err)) == 1, err
    message = err[ERROR_LINE.search(err).start():]
    for name in names:
        assert name in message, f"{name!r} not named in:\n{message}"
    assert "\n  fix: " in message, message


def assert_success(code: int, err: str) -> None:
    assert code == 0, err
    assert not ERROR_LINE.search(err) and "Traceback" not in err, err


# ----------------------------------------------------------------------------- building defects
def img_path(folder: Path, i: int, channel: int = 0, ending: str = ".nii.gz") -> Path:
    return folder / "imagesTr" / f"synth_{i:03d}_{channel:04d}{ending}"


def lab_path(folder: Path, i: int, ending: str = ".nii.gz") -> Path:
    return folder / "labelsTr" / f"synth_{i:03d}{ending}"


def rewrite(path: Path, change=None, dtype=None, **geometry) -> None:
    """Rewrite an image with its array and/or geometry changed (spacing=, origin=, direction=)."""
    img = sitk.ReadImage(str(path))
    if change is not None or dtype is not None:
        arr = sitk.GetArrayFromImage(img)
        arr = change(arr) if change is not None else arr
        new = sitk.GetImageFromArray(arr.astype(dtype) if dtype else arr)
        new.CopyInformation(img)
        img = new
    for key, value in geometry.items():
        getattr(img, "Set" + key.capitalize())(value)
    sitk.WriteImage(img, str(path), True)


def edit_dataset_json(folder: Path, **changes) -> None:
    path = folder / "dataset.json"
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


def _set(value):
    def change(arr):
        arr = arr.astype(np.float32) if isinstance(value, float) else arr.copy()
        arr[3, 4, 5] = value
        return arr
    return change


def d_missing_label(f):
    lab_path(f, 1).unlink()
    return ["synth_001.nii.gz", "missing label"]


def d_label_without_image(f):
    img_path(f, 1).unlink()
    return [str(lab_path(f, 1)), "label without image"]


def d_missing_channel(f):
    img_path(f, 2, 1).unlink()
    return ["synth_002_0001.nii.gz", "missing channel"]


def d_extra_channel(f):
    shutil.copy(img_path(f, 1), img_path(f, 1, 1))
    return ["synth_001_0001.nii.gz", "unexpected channel"]


def d_bad_file_name(f):
    img_path(f, 1).rename(f / "imagesTr" / "synth_001.nii.gz")
    return [str(f / "imagesTr" / "synth_001.nii.gz"), "CASE_XXXX"]


def d_wrong_extension(f):
    sitk.WriteImage(sitk.ReadImage(str(img_path(f, 1))), str(img_path(f, 1, ending=".nii")))
    img_path(f, 1).unlink()
    return ["synth_001_0000.nii: file ending"]


def d_duplicate_case_two_endings(f):
    sitk.WriteImage(sitk.ReadImage(str(img_path(f, 1))), str(img_path(f, 1, ending=".nii")))
    return ["synth_001_0000.nii: file ending"]


def d_duplicate_case_differing_in_case(f):
    shutil.copy(img_path(f, 1), f / "imagesTr" / "SYNTH_001_0000.nii.gz")
    shutil.copy(lab_path(f, 1), f / "labelsTr" / "SYNTH_001.nii.gz")
    edit_dataset_json(f, numTraining=6)
    return ["SYNTH_001", "synth_001", "upper/lower case"]


def d_undeclared_label_value(f):
    rewrite(lab_path(f, 1), _set(5))
    return ["synth_001.nii.gz", "[5]", "not declared"]


def d_non_integer_label(f):
    rewrite(lab_path(f, 1), _set(1.5), dtype=np.float32)
    return ["synth_001.nii.gz", "non-integer"]


def d_label_shape_mismatch(f):
    img = sitk.ReadImage(str(lab_path(f, 1)))
    small = sitk.GetImageFromArray(sitk.GetArrayFromImage(img)[:, :-2])
    small.SetSpacing(img.GetSpacing())
    sitk.WriteImage(small, str(lab_path(f, 1)), True)
    return ["synth_001.nii.gz", "shape"]


def d_label_spacing_mismatch(f):
    rewrite(lab_path(f, 1), spacing=(1.0, 1.0, 1.0))
    return ["synth_001.nii.gz", "spacing"]


def d_label_origin_mismatch(f):
    rewrite(lab_path(f, 1), origin=(0.0, 0.0, 12.0))
    return ["synth_001.nii.gz", "origin"]


def d_label_direction_mismatch(f):
    rewrite(lab_path(f, 1), direction=(0, 1, 0, 1, 0, 0, 0, 0, 1))
    return ["synth_001.nii.gz", "direction"]


def d_channel_geometry_mismatch(f):
    rewrite(img_path(f, 1, 1), spacing=(0.8, 0.9, 3.0))
    return ["synth_001_0001.nii.gz", "spacing"]


def d_nan_in_image(f):
    rewrite(img_path(f, 1, ending=".mha"), _set(np.nan))
    return ["synth_001_0000.mha", "NaN"]


def d_inf_in_image(f):
    rewrite(img_path(f, 1, ending=".nrrd"), _set(np.inf))
    return ["synth_001_0000.nrrd", "inf"]


def d_nan_in_image_nifti(f):
    rewrite(img_path(f, 1), _set(np.nan))
    return ["synth_001_0000.nii.gz", "NaN"]


def d_inf_in_image_nii(f):
    rewrite(img_path(f, 1, ending=".nii"), _set(np.inf), dtype=np.float64)
    return ["synth_001_0000.nii", "inf"]


def d_nan_in_label(f):
    rewrite(lab_path(f, 1, ".mha"), _set(np.nan), dtype=np.float32)
    return ["synth_001.mha", "NaN"]


def d_image_4d(f):
    img = sitk.ReadImage(str(img_path(f, 1)))
    sitk.WriteImage(sitk.JoinSeries([img, img]), str(img_path(f, 1)), True)
    return ["synth_001_0000.nii.gz", "4 dimensions"]


def d_image_2d_in_3d_dataset(f):
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(img_path(f, 1))))
    sitk.WriteImage(sitk.GetImageFromArray(arr[0]), str(img_path(f, 1)), True)
    return ["synth_001", "differs"]


def d_corrupt_file(f):
    img_path(f, 1).write_bytes(os.urandom(3000))
    return ["synth_001_0000.nii.gz", "cannot be read"]


def d_truncated_file(f):
    data = img_path(f, 1).read_bytes()
    img_path(f, 1).write_bytes(data[: len(data) // 2])
    return ["synth_001_0000.nii.gz"]


def d_zero_byte_file(f):
    img_path(f, 1).write_bytes(b"")
    return ["synth_001_0000.nii.gz", "empty (0 bytes)"]


def d_folder_instead_of_file(f):
    img_path(f, 1).unlink()
    img_path(f, 1).mkdir()
    return ["synth_001_0000.nii.gz", "folder"]


def d_dangling_symlink(f):
    target = f.parent / "moved_away.nii.gz"
    img_path(f, 1).rename(target)
    img_path(f, 1).symlink_to(target)
    target.unlink()
    return ["synth_001_0000.nii.gz", "symbolic link"]


def d_dataset_json_syntax_error(f):
    path = f / "dataset.json"
    path.write_text(path.read_text().replace('"labels":', '"labels"', 1))
    return ["dataset.json", "not valid JSON"]


def d_dataset_json_missing_key(f):
    edit_dataset_json(f, labels=None)
    return ["dataset.json", "'labels'"]


def d_dataset_json_wrong_types(f):
    edit_dataset_json(f, numTraining="five", labels={"background": 0, "blob": 1, "box": 3})
    return ["dataset.json", "numTraining", "consecutive"]


def d_dataset_json_missing(f):
    (f / "dataset.json").unlink()
    return [str(f / "dataset.json"), "not found"]


def d_dataset_json_not_an_object(f):
    (f / "dataset.json").write_text("[1, 2, 3]")
    return ["dataset.json", "JSON object"]


def d_num_training_mismatch(f):
    edit_dataset_json(f, numTraining=7)
    return ["dataset.json", "numTraining is 7"]


def d_unsupported_file_ending(f):
    edit_dataset_json(f, file_ending=".jp2")
    return ["dataset.json", ".jp2"]


def d_json_path_escape(f):
    edit_dataset_json(f, num_raters=2, rater_labels_folder="../../outside")
    return ["dataset.json", "../../outside", "plain folder name"]


def d_shipped_splits_path_escape(f):
    (f / "splits_final.json").write_text(json.dumps([{"train": ["../../x"], "val": ["synth_000"]}] * 5))
    return [str(f / "splits_final.json"), "../../x", "plain case name"]


def d_empty_folders(f):
    for sub in ("imagesTr", "labelsTr"):
        shutil.rmtree(f / sub)
        (f / sub).mkdir()
    return [str(f / "imagesTr"), "no training images"]


def d_missing_labels_folder(f):
    shutil.rmtree(f / "labelsTr")
    return [str(f / "labelsTr"), "folder not found"]


def _preprocessed(f: Path) -> Path:
    folder = f.parent.parent / "preprocessed" / NAME  # latdiff_folders: <tmp>/raw/NAME -> <tmp>/preprocessed/NAME
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def d_fingerprint_edited(f):
    path = _preprocessed(f) / "dataset_fingerprint.json"
    path.write_text('{"cases": []}')
    return [str(path), "--clean"]


def d_reused_splits_name_unknown_case(f):
    path = _preprocessed(f) / "splits_final.json"
    path.write_text(json.dumps([{"train": ["synth_000", "ghost_case"], "val": ["synth_001"]}]))
    return [str(path), "ghost_case"]


@dataclass
class Defect:
    id: str
    make: Callable[[Path], list[str]]
    verify: bool = False
    dataset: dict = field(default_factory=dict)


TWO_CHANNELS = {"num_channels": 2}
MHA, NRRD = {"file_ending": ".mha"}, {"file_ending": ".nrrd"}
PLAN_DEFECTS = [
    Defect("missing-label", d_missing_label),
    Defect("missing-label-verify", d_missing_label, verify=True),
    Defect("label-without-image", d_label_without_image),
    Defect("missing-channel", d_missing_channel, dataset=TWO_CHANNELS),
    Defect("extra-channel", d_extra_channel),
    Defect("extra-channel-verify", d_extra_channel, verify=True),
    Defect("bad-file-name", d_bad_file_name),
    Defect("wrong-extension", d_wrong_extension),
    Defect("duplicate-case-two-endings", d_duplicate_case_two_endings),
    Defect("duplicate-case-differing-in-case", d_duplicate_case_differing_in_case),
    Defect("undeclared-label-value", d_undeclared_label_value),
    Defect("undeclared-label-value-verify", d_undeclared_label_value, verify=True),
    Defect("non-integer-label", d_non_integer_label),
    Defect("label-shape-mismatch", d_label_shape_mismatch),
    Defect("label-shape-mismatch-verify", d_label_shape_mismatch, verify=True),
    Defect("label-spacing-mismatch", d_label_spacing_mismatch),
    Defect("label-spacing-mismatch-verify", d_label_spacing_mismatch, verify=True),
    Defect("label-origin-mismatch", d_label_origin_mismatch),
    Defect("label-direction-mismatch", d_label_direction_mismatch),
    Defect("channel-geometry-mismatch", d_channel_geometry_mismatch, dataset=TWO_CHANNELS),
    Defect("nan-in-image-mha", d_nan_in_image, dataset=MHA),
    Defect("nan-in-image-mha-verify", d_nan_in_image, verify=True, dataset=MHA),
    Defect("inf-in-image-nrrd", d_inf_in_image, dataset=NRRD),
    Defect("nan-in-image-nii-gz", d_nan_in_image_nifti),
    Defect("nan-in-image-nii-gz-verify", d_nan_in_image_nifti, verify=True),
    Defect("inf-in-image-nii-float64", d_inf_in_image_nii, dataset={"file_ending": ".nii"}),
    Defect("nan-in-label-mha", d_nan_in_label, dataset=MHA),
    Defect("4d-image", d_image_4d),
    Defect("4d-image-verify", d_image_4d, verify=True),
    Defect("2d-image-in-3d-dataset", d_image_2d_in_3d_dataset),
    Defect("corrupt-file", d_corrupt_file),
    Defect("truncated-file", d_truncated_file),
    Defect("truncated-file-verify", d_truncated_file, verify=True),
    Defect("zero-byte-file", d_zero_byte_file),
    Defect("folder-instead-of-file", d_folder_instead_of_file),
    Defect("dangling-symlink", d_dangling_symlink),
    Defect("dataset-json-syntax-error", d_dataset_json_syntax_error),
    Defect("dataset-json-missing-key", d_dataset_json_missing_key),
    Defect("dataset-json-wrong-types", d_dataset_json_wrong_types),
    Defect("dataset-json-missing", d_dataset_json_missing),
    Defect("dataset-json-not-an-object", d_dataset_json_not_an_object),
    Defect("dataset-json-numTraining-mismatch", d_num_training_mismatch),
    Defect("dataset-json-unsupported-file-ending", d_unsupported_file_ending),
    Defect("dataset-json-path-escape", d_json_path_escape),
    Defect("shipped-splits-path-escape", d_shipped_splits_path_escape),
    Defect("fingerprint-edited", d_fingerprint_edited),
    Defect("reused-splits-name-unknown-case", d_reused_splits_name_unknown_case),
    Defect("empty-folders", d_empty_folders),
    Defect("missing-labels-folder", d_missing_labels_folder),
]


def _case_sensitive(folder: Path) -> bool:
    (folder / "probe_a").touch()
    return not (folder / "PROBE_A").exists()


@pytest.mark.parametrize("defect", PLAN_DEFECTS, ids=[d.id for d in PLAN_DEFECTS])
def test_plan_and_preprocess_refuses(defect, latdiff_folders, capsys):
    folder = make_synthetic_dataset(latdiff_folders["raw"], name=NAME, num_cases=5, **defect.dataset)
    if defect.id == "duplicate-case-differing-in-case" and not _case_sensitive(latdiff_folders["raw"]):
        pytest.skip("case-insensitive file system: such files cannot exist side by side")
    names = defect.make(folder)
    code, _, err = run_cli(plan_main, PLAN_ARGS + (["--verify_dataset_integrity"] if defect.verify else []), capsys)
    assert_user_error(code, err, names)
    assert not list(latdiff_folders["preprocessed"].rglob("*.npz"))  # refused before anything was preprocessed


def test_plan_unknown_dataset_id(latdiff_folders, capsys):
    make_synthetic_dataset(latdiff_folders["raw"], name=NAME, num_cases=5)
    code, _, err = run_cli(plan_main, ["-d", "901", "--preset", "tiny"], capsys)
    assert_user_error(code, err, ["901", str(latdiff_folders["raw"])])


# ----------------------------------------------------------------------------- accepted inputs
def _plan_ok(capsys, pre: Path, expected_cases: list[str]) -> str:
    code, _, err = run_cli(plan_main, PLAN_ARGS, capsys)
    assert_success(code, err)
    data = pre / NAME / "latdiffPlans_tiny_2d"
    assert sorted(p.stem for p in data.glob("*.npz")) == sorted(expected_cases)
    for case in expected_cases:
        with np.load(data / f"{case}.npz", allow_pickle=False) as f:
            assert np.isfinite(f["data"]).all() and f["data"].shape[1:] == f["seg"].shape
        assert json.loads((data / f"{case}.json").read_text())["case_id"] == case
    splits = json.loads((pre / NAME / "splits_final.json").read_text())
    assert sorted(splits[0]["train"] + splits[0]["val"]) == sorted(expected_cases)
    return err


CASES = [f"synth_{i:03d}" for i in range(5)]


def test_accepted_non_ascii_and_spaces_in_paths(tmp_path, monkeypatch, capsys):
    root = tmp_path / "Patiënten daten ü"
    for key, var in (("raw", "LATDIFF_RAW"), ("pre", "LATDIFF_PREPROCESSED"), ("res", "LATDIFF_RESULTS")):
        monkeypatch.setenv(var, str(root / f"{key} ørdner"))
    folder = make_synthetic_dataset(root / "raw ørdner", name=NAME, num_cases=5)
    img_path(folder, 1).rename(folder / "imagesTr" / "fäll 01_0000.nii.gz")
    lab_path(folder, 1).rename(folder / "labelsTr" / "fäll 01.nii.gz")
    _plan_ok(capsys, root / "pre ørdner", [c for c in CASES if c != "synth_001"] + ["fäll 01"])


def test_accepted_symlinked_files(latdiff_folders, capsys):
    folder = make_synthetic_dataset(latdiff_folders["raw"], name=NAME, num_cases=5)
    elsewhere = latdiff_folders["raw"].parent / "elsewhere"
    elsewhere.mkdir()
    for src in (img_path(folder, 2), lab_path(folder, 2)):
        src.rename(elsewhere / src.name)
        src.symlink_to(elsewhere / src.name)
    _plan_ok(capsys, latdiff_folders["preprocessed"], CASES)


def test_accepted_hidden_junk_files_are_ignored(latdiff_folders, capsys):
    folder = make_synthetic_dataset(latdiff_folders["raw"], name=NAME, num_cases=5)
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub / ".DS_Store").write_bytes(b"\0junk")
    (folder / "imagesTr" / "._synth_000_0000.nii.gz").write_bytes(b"\0\5\26\7 resource fork")
    _plan_ok(capsys, latdiff_folders["preprocessed"], CASES)


@pytest.mark.parametrize("value", [0.0, 50.0], ids=["accepted-empty-all-zero-image-warns", "accepted-constant-image-warns"])
def test_accepted_constant_image_warns_and_proceeds(value, latdiff_folders, capsys):
    folder = make_synthetic_dataset(latdiff_folders["raw"], name=NAME, num_cases=5)
    rewrite(img_path(folder, 3), lambda a: np.full_like(a, value))
    err = _plan_ok(capsys, latdiff_folders["preprocessed"], CASES)
    warnings = re.findall(r"warning: .*", err)
    assert len(warnings) == 1 and "synth_003_0000.nii.gz" in warnings[0] and "constant" in warnings[0], err


def test_accepted_label_without_foreground(latdiff_folders, capsys):
    folder = make_synthetic_dataset(latdiff_folders["raw"], name=NAME, num_cases=5)
    rewrite(lab_path(folder, 4), np.zeros_like)
    _plan_ok(capsys, latdiff_folders["preprocessed"], CASES)


# ----------------------------------------------------------------------------- training and prediction
@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A planned + preprocessed 2d dataset and an untrained fold 0 (geometry is all prediction checks)."""
    root = tmp_path_factory.mktemp("corpus")
    env = {k: root / k for k in ("raw", "pre", "res")}
    mp = pytest.MonkeyPatch()
    for key, var in (("raw", "LATDIFF_RAW"), ("pre", "LATDIFF_PREPROCESSED"), ("res", "LATDIFF_RESULTS")):
        mp.setenv(var, str(env[key]))
    make_synthetic_dataset(env["raw"], name=NAME, num_cases=5)
    assert plan_main(PLAN_ARGS) == 0
    make_untrained_run(env["res"], env["pre"], NAME, "2d")
    yield env
    mp.undo()


@pytest.fixture
def own_copy(planned, tmp_path, monkeypatch):
    """Preprocessed and results folders copied for one test to damage."""
    env = dict(planned)
    for key, var in (("pre", "LATDIFF_PREPROCESSED"), ("res", "LATDIFF_RESULTS")):
        env[key] = tmp_path / key
        shutil.copytree(planned[key], env[key], symlinks=True)
        monkeypatch.setenv(var, str(env[key]))
    return env


TRAIN_ARGS = ["900", "0", "-c", "2d", "-p", "latdiffPlans_tiny", "--epochs", "2", "--iters-per-epoch", "1", "--device", "cpu",
              "--num-workers", "0"]


def _json_edit(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def t_missing_preprocessed_data(env):
    shutil.rmtree(env["pre"] / NAME / "latdiffPlans_tiny_2d")
    return [str(env["pre"] / NAME / "latdiffPlans_tiny_2d"), "latdiff_plan_and_preprocess"]


def t_missing_plans(env):
    (env["pre"] / NAME / "latdiffPlans_tiny.json").unlink()
    return ["latdiffPlans_tiny.json", "not found"]


def t_corrupt_plans(env):
    path = env["pre"] / NAME / "latdiffPlans_tiny.json"
    path.write_text(path.read_text()[:500])
    return ["latdiffPlans_tiny.json", "not valid JSON"]


def t_plans_without_configurations(env):
    _json_edit(env["pre"] / NAME / "latdiffPlans_tiny.json", lambda p: {k: v for k, v in p.items() if k != "configurations"})
    return ["latdiffPlans_tiny.json", "configurations"]


def t_plans_data_identifier_escape(env):
    def edit(p):
        p["configurations"]["2d"]["data_identifier"] = "../../outside"
        return p
    _json_edit(env["pre"] / NAME / "latdiffPlans_tiny.json", edit)
    return ["latdiffPlans_tiny.json", "../../outside", "plain folder name"]


def t_unplanned_configuration(env):
    return ["latdiffPlans_tiny.json", "'3d'"]


def t_missing_splits(env):
    (env["pre"] / NAME / "splits_final.json").unlink()
    return ["splits_final.json", "not found", "latdiff_plan_and_preprocess"]


def t_corrupt_splits(env):
    path = env["pre"] / NAME / "splits_final.json"
    path.write_text(path.read_text()[:40])
    return ["splits_final.json", "not valid JSON"]


def t_splits_wrong_structure(env):
    (env["pre"] / NAME / "splits_final.json").write_text(json.dumps({"train": ["synth_000"], "val": ["synth_001"]}))
    return ["splits_final.json", "non-empty list"]


def t_splits_case_path_escape(env):
    _json_edit(env["pre"] / NAME / "splits_final.json", lambda s: [{"train": f["train"] + ["../x"], "val": f["val"]} for f in s])
    return ["splits_final.json", "'../x'", "plain case name"]


def t_splits_absolute_path(env):
    _json_edit(env["pre"] / NAME / "splits_final.json", lambda s: [{"train": f["train"], "val": ["/etc/passwd"]} for f in s])
    return ["splits_final.json", "'/etc/passwd'", "plain case name"]


def t_splits_case_not_preprocessed(env):
    (env["pre"] / NAME / "latdiffPlans_tiny_2d" / "synth_002.json").unlink()  # as if preprocessing was killed
    return ["splits_final.json", "synth_002", "latdiff_plan_and_preprocess"]


def t_missing_preprocessed_dataset_json(env):
    (env["pre"] / NAME / "dataset.json").unlink()
    return [str(env["pre"] / NAME / "dataset.json"), "not found"]


def t_fold_out_of_range(env):
    return ["splits_final.json", "fold 7"]


def t_fold_not_a_number(env):
    return ["'x'", "fold"]


def t_corrupt_checkpoint_on_resume(env):
    ckpt = env["res"] / NAME / "LatentDiffusionTrainer__latdiffPlans_tiny__2d" / "fold_0" / "checkpoint_latest.pth"
    ckpt.write_bytes(os.urandom(2000))
    return [str(ckpt), "cannot load checkpoint"]


TRAIN_DEFECTS = [
    ("missing-preprocessed-data", t_missing_preprocessed_data, []),
    ("missing-plans", t_missing_plans, []),
    ("corrupt-plans", t_corrupt_plans, []),
    ("plans-without-configurations", t_plans_without_configurations, []),
    ("plans-data-identifier-path-escape", t_plans_data_identifier_escape, []),
    ("unplanned-configuration", t_unplanned_configuration, ["-c", "3d"]),
    ("missing-splits", t_missing_splits, []),
    ("corrupt-splits", t_corrupt_splits, []),
    ("splits-wrong-structure", t_splits_wrong_structure, []),
    ("splits-case-path-escape", t_splits_case_path_escape, []),
    ("splits-absolute-path", t_splits_absolute_path, []),
    ("splits-case-not-preprocessed", t_splits_case_not_preprocessed, []),
    ("missing-preprocessed-dataset-json", t_missing_preprocessed_dataset_json, []),
    ("fold-out-of-range", t_fold_out_of_range, ["FOLD=7"]),
    ("fold-not-a-number", t_fold_not_a_number, ["FOLD=x"]),
    ("corrupt-checkpoint-on-resume", t_corrupt_checkpoint_on_resume, ["--c"]),
]


@pytest.mark.parametrize("make,extra", [d[1:] for d in TRAIN_DEFECTS], ids=[d[0] for d in TRAIN_DEFECTS])
def test_train_refuses(make, extra, own_copy, capsys):
    names = make(own_copy)
    argv = list(TRAIN_ARGS)
    for e in extra:
        if e.startswith("FOLD="):
            argv[1] = e[len("FOLD="):]
        else:
            argv.append(e)
    code, _, err = run_cli(train_main, argv, capsys)
    assert_user_error(code, err, names)
    # nothing was trained
    fold = own_copy["res"] / NAME / "LatentDiffusionTrainer__latdiffPlans_tiny__2d" / "fold_0"
    assert not (fold / "training_log.txt").exists()


RUN_FOLDER = "LatentDiffusionTrainer__latdiffPlans_tiny__2d"
PREDICT_ARGS = ["-d", "900", "-p", "latdiffPlans_tiny", "--num_samples", "1", "--steps", "1", "--device", "cpu", "-np", "0"]


def _source(env, i: int = 0) -> Path:
    return img_path(env["raw"] / NAME, i)


def p_wrong_channel_count(env, inp):
    shutil.copy(_source(env), inp / "caseA_0000.nii.gz")
    shutil.copy(_source(env, 1), inp / "caseA_0001.nii.gz")
    return ["caseA_0001.nii.gz", "unexpected channel"]


def p_vector_image(env, inp):
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(_source(env))))
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([arr] * 3, -1), isVector=True), str(inp / "caseA_0000.nii.gz"))
    return ["caseA_0000.nii.gz", "3 channel(s) but the model was trained on 1"]


def p_wrong_extension(env, inp):
    sitk.WriteImage(sitk.ReadImage(str(_source(env))), str(inp / "caseA_0000.nii"))
    return ["caseA_0000.nii: file ending"]


def p_non_matching_names(env, inp):
    shutil.copy(_source(env), inp / "caseA.nii.gz")
    return ["caseA.nii.gz", "CASE_XXXX"]


def p_case_differing_in_case(env, inp):
    if not _case_sensitive(inp.parent):
        pytest.skip("case-insensitive file system")
    shutil.copy(_source(env), inp / "caseA_0000.nii.gz")
    shutil.copy(_source(env), inp / "CASEA_0000.nii.gz")
    return ["CASEA", "caseA", "upper/lower case"]


def p_empty_input_folder(env, inp):
    return [str(inp), "no input images"]


def p_missing_input_folder(env, inp):
    inp.rmdir()
    return [str(inp), "not found"]


def p_image_4d(env, inp):
    img = sitk.ReadImage(str(_source(env)))
    sitk.WriteImage(sitk.JoinSeries([img, img]), str(inp / "caseA_0000.nii.gz"))
    return ["caseA_0000.nii.gz", "4 dimensions"]


def p_corrupt_image(env, inp):
    data = _source(env).read_bytes()
    (inp / "caseA_0000.nii.gz").write_bytes(data[: len(data) // 3])
    return ["caseA_0000.nii.gz"]


def p_missing_trained_model(env, inp):
    shutil.copy(_source(env), inp / "caseA_0000.nii.gz")
    return [str(env["res"] / NAME), "OtherTrainer__latdiffPlans_tiny"]


def p_missing_checkpoint(env, inp):
    shutil.copy(_source(env), inp / "caseA_0000.nii.gz")
    (env["res"] / NAME / RUN_FOLDER / "fold_0" / "checkpoint_final.pth").unlink()
    return [str(env["res"] / NAME / RUN_FOLDER / "fold_0"), "no trained checkpoint"]


def p_corrupt_checkpoint(env, inp):
    shutil.copy(_source(env), inp / "caseA_0000.nii.gz")
    ckpt = env["res"] / NAME / RUN_FOLDER / "fold_0" / "checkpoint_final.pth"
    ckpt.write_bytes(ckpt.read_bytes()[:3000])
    return [str(ckpt), "cannot load checkpoint"]


def p_model_plans_corrupt(env, inp):
    shutil.copy(_source(env), inp / "caseA_0000.nii.gz")
    (env["res"] / NAME / RUN_FOLDER / "plans.json").write_text('{"configurations": {"2d": ')
    return [str(env["res"] / NAME / RUN_FOLDER / "plans.json"), "not valid JSON"]


def p_model_dataset_json_invalid(env, inp):
    shutil.copy(_source(env), inp / "caseA_0000.nii.gz")
    _json_edit(env["res"] / NAME / RUN_FOLDER / "dataset.json", lambda d: {k: v for k, v in d.items() if k != "file_ending"})
    return [str(env["res"] / NAME / RUN_FOLDER / "dataset.json"), "file_ending"]


def p_fold_path_escape(env, inp):
    shutil.copy(_source(env), inp / "caseA_0000.nii.gz")
    return [str(env["res"] / NAME / RUN_FOLDER), "'../../x'"]


def p_bad_part_id(env, inp):
    shutil.copy(_source(env), inp / "caseA_0000.nii.gz")
    return ["--part_id"]


PREDICT_DEFECTS = [
    ("wrong-channel-count", p_wrong_channel_count, []),
    ("channels-in-one-file-do-not-match-plan", p_vector_image, []),
    ("wrong-extension", p_wrong_extension, []),
    ("non-matching-names", p_non_matching_names, []),
    ("duplicate-case-differing-in-case", p_case_differing_in_case, []),
    ("empty-input-folder", p_empty_input_folder, []),
    ("missing-input-folder", p_missing_input_folder, []),
    ("4d-image", p_image_4d, []),
    ("truncated-image", p_corrupt_image, []),
    ("missing-trained-model", p_missing_trained_model, ["-tr", "OtherTrainer"]),
    ("missing-checkpoint", p_missing_checkpoint, []),
    ("corrupt-checkpoint", p_corrupt_checkpoint, []),
    ("model-plans-corrupt", p_model_plans_corrupt, []),
    ("model-dataset-json-invalid", p_model_dataset_json_invalid, []),
    ("fold-path-escape", p_fold_path_escape, ["-f", "../../x"]),
    ("bad-part-id", p_bad_part_id, ["--num_parts", "2", "--part_id", "2"]),
]


@pytest.mark.parametrize("make,extra", [d[1:] for d in PREDICT_DEFECTS], ids=[d[0] for d in PREDICT_DEFECTS])
def test_predict_refuses(make, extra, own_copy, tmp_path, capsys):
    inp, out = tmp_path / "input", tmp_path / "output"
    inp.mkdir()
    names = make(own_copy, inp)
    code, _, err = run_cli(predict_main, ["-i", str(inp), "-o", str(out)] + PREDICT_ARGS + extra, capsys)
    assert_user_error(code, err, names)
    assert not out.is_dir() or not list(out.glob("*.nii.gz"))  # no prediction written


def test_accepted_predict_non_ascii_spaces_and_symlinked_input(planned, tmp_path, capsys):
    inp, out = tmp_path / "Eingabe ü ñ", tmp_path / "Ausgabe ø" / "prédiction s"
    inp.mkdir()
    shutil.copy(_source(planned), inp / "fäll A_0000.nii.gz")
    (inp / "linked case_0000.nii.gz").symlink_to(_source(planned, 1))
    code, _, err = run_cli(predict_main, ["-i", str(inp), "-o", str(out)] + PREDICT_ARGS, capsys)
    assert_success(code, err)
    for case, src in (("fäll A", _source(planned)), ("linked case", _source(planned, 1))):
        seg, ref = sitk.ReadImage(str(out / f"{case}.nii.gz")), sitk.ReadImage(str(src))
        assert seg.GetSize() == ref.GetSize()
        np.testing.assert_allclose(seg.GetSpacing(), ref.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(seg.GetOrigin(), ref.GetOrigin(), atol=1e-6)
        assert set(np.unique(sitk.GetArrayFromImage(seg)).tolist()) <= {0, 1, 2}
        assert (out / f"{case}_entropy.nii.gz").is_file()


@pytest.mark.parametrize("workers", ["0", "2"], ids=["in-process", "worker-pool"])
def test_predict_writes_every_good_case_and_reports_each_bad_one(workers, planned, tmp_path, capsys):
    """500 cases and one bad file should give 499 segmentations and one message naming the file."""
    inp, out = tmp_path / "input", tmp_path / "output"
    inp.mkdir()
    for case, source in (("caseA", 0), ("caseC", 2), ("caseE", 3)):
        shutil.copy(_source(planned, source), inp / f"{case}_0000.nii.gz")
    data = _source(planned, 1).read_bytes()
    (inp / "caseB_0000.nii.gz").write_bytes(data[: len(data) // 3])
    shutil.copy(_source(planned, 4), inp / "caseD_0000.nii.gz")
    rewrite(inp / "caseD_0000.nii.gz", _set(np.nan))  # read as 0 by SimpleITK, so only the bytes tell
    argv = ["-i", str(inp), "-o", str(out)] + PREDICT_ARGS + ["-np", workers]
    code, _, err = run_cli(predict_main, argv, capsys)
    assert_user_error(code, err, ["2 case(s) could not be predicted", "caseB_0000.nii.gz", "truncated", "caseD_0000.nii.gz", "NaN"])
    assert sorted(p.name for p in out.glob("case?.nii.gz")) == ["caseA.nii.gz", "caseC.nii.gz", "caseE.nii.gz"]
    (inp / "caseB_0000.nii.gz").unlink()
    (inp / "caseD_0000.nii.gz").unlink()
    code, out_text, err = run_cli(predict_main, argv, capsys)  # fixed: the rerun finds nothing left to do
    assert_success(code, err)
    assert "3 case(s) already predicted" in out_text


@pytest.mark.parametrize("inside", [False, True], ids=["output-is-a-file", "output-inside-a-file"])
def test_predict_refuses_output_that_is_a_file(inside, planned, tmp_path, capsys):
    inp, notes = tmp_path / "input", tmp_path / "notes.txt"
    inp.mkdir()
    shutil.copy(_source(planned), inp / "caseA_0000.nii.gz")
    notes.write_text("keep me")
    out = notes / "pred" if inside else notes
    code, _, err = run_cli(predict_main, ["-i", str(inp), "-o", str(out)] + PREDICT_ARGS, capsys)
    assert_user_error(code, err, [f"{notes}: is a file, not a folder", "-o"])
    assert notes.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["input", "notes.txt"]
