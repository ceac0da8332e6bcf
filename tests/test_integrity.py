"""``--verify_dataset_integrity``: every defect of a dataset reported at once, each naming its file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from synthetic import case_id, make_synthetic_dataset, oblique_direction

from latdiffunet.errors import DatasetIntegrityError
from latdiffunet.experiment_planning import cli
from latdiffunet.experiment_planning.integrity import verify_dataset_integrity
from latdiffunet.raw_dataset import load_dataset


def _rewrite(path: Path, change_array=None, **geometry) -> None:
    """Rewrite an image file with its array and/or geometry changed."""
    img = sitk.ReadImage(str(path))
    if change_array is not None:
        arr = sitk.GetArrayFromImage(img)
        new = sitk.GetImageFromArray(change_array(arr))
        new.CopyInformation(img)
        img = new
    if "spacing" in geometry:
        img.SetSpacing(geometry["spacing"])
    if "origin" in geometry:
        img.SetOrigin(geometry["origin"])
    sitk.WriteImage(img, str(path), True)


def _break_dataset(folder: Path, ending: str = ".mha") -> dict[str, Path]:
    """Six defects in six cases; returns the file each one must be reported against."""
    images, labels = folder / "imagesTr", folder / "labelsTr"
    image = lambda i: images / f"{case_id(i)}_0000{ending}"  # noqa: E731
    label = lambda i: labels / f"{case_id(i)}{ending}"  # noqa: E731

    def add_label_5(arr):
        arr = arr.copy()
        arr[0, 0, 0] = 5
        return arr

    def add_nan(arr):
        arr = arr.copy()
        arr[2, 3, 4] = np.nan
        return arr

    _rewrite(label(0), add_label_5)
    _rewrite(image(1), add_nan)
    _rewrite(label(2), spacing=(0.8, 0.9, 3.0))
    _rewrite(label(3), origin=(0.0, 0.0, 12.0))
    data = image(4).read_bytes()
    image(4).write_bytes(data[: len(data) // 2])
    label(5).unlink()
    return {
        "undeclared label value": label(0),
        "NaN": image(1),
        "label spacing": label(2),
        "label origin": label(3),
        "corrupt image": image(4),
        "missing label": label(5),
    }


def test_clean_dataset_passes(tmp_path):
    folder = make_synthetic_dataset(tmp_path / "raw")
    cases = verify_dataset_integrity(load_dataset(folder), num_processes=1)
    assert [c.case_id for c in cases] == [case_id(i) for i in range(6)]
    assert all(c.label is not None and len(c.images) == 1 for c in cases)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dim=3, num_channels=2, num_cases=3, direction=oblique_direction(), origin=(-10.5, 4.0, 2.0)),
        dict(dim=2, num_cases=3),
        dict(dim=2, rgb=True, num_cases=3),
    ],
    ids=["3d-two-channels-oblique", "2d-gray", "2d-rgb"],
)
def test_other_clean_datasets_pass(tmp_path, kwargs):
    folder = make_synthetic_dataset(tmp_path / "raw", **kwargs)
    spec = load_dataset(folder)
    cases = verify_dataset_integrity(spec, num_processes=1)
    assert len(cases) == 3
    assert len(cases[0].images) == (2 if kwargs.get("num_channels") == 2 else 1)


@pytest.mark.parametrize("ending", [".mha", ".nii.gz"])
def test_every_defect_reported_once_naming_its_file(tmp_path, ending):
    folder = make_synthetic_dataset(tmp_path / "raw", file_ending=ending)
    defects = _break_dataset(folder, ending)  # .nii.gz: the NaN is read as 0, only the file's bytes show it
    with pytest.raises(DatasetIntegrityError) as info:
        verify_dataset_integrity(load_dataset(folder), num_processes=1)
    problems = info.value.problems
    assert len(problems) == len(defects), "\n".join(problems)
    for what, path in defects.items():
        hits = [p for p in problems if str(path) in p]
        assert len(hits) == 1, (what, path, problems)
    by_file = {what: next(p for p in problems if str(path) in p) for what, path in defects.items()}
    assert "[5]" in by_file["undeclared label value"] and "not declared" in by_file["undeclared label value"]
    assert "NaN" in by_file["NaN"] and "1 voxel" in by_file["NaN"]
    assert "spacing" in by_file["label spacing"] and "origin" not in by_file["label spacing"]
    assert "origin" in by_file["label origin"] and "spacing" not in by_file["label origin"]
    assert ("truncated" if ending == ".nii.gz" else "cannot be read") in by_file["corrupt image"]
    assert "No such file" not in by_file["corrupt image"]  # ITK's stale errno text is dropped
    assert "missing label" in by_file["missing label"]
    message = str(info.value)
    assert f"found {len(defects)} problem(s)" in message and str(folder) in message and "nothing was written" in message


def test_parallel_check_gives_the_same_problems(tmp_path):
    folder = make_synthetic_dataset(tmp_path / "raw", file_ending=".mha")
    _break_dataset(folder)
    spec = load_dataset(folder)
    with pytest.raises(DatasetIntegrityError) as serial:
        verify_dataset_integrity(spec, num_processes=1)
    with pytest.raises(DatasetIntegrityError) as parallel:
        verify_dataset_integrity(spec, num_processes=2)
    assert parallel.value.problems == serial.value.problems


def test_cli_reports_problems_without_traceback_and_writes_nothing(tmp_path, monkeypatch, capsys):
    raw, preprocessed, results = (tmp_path / k for k in ("raw", "preprocessed", "results"))
    for folder, var in ((raw, "LATDIFF_RAW"), (preprocessed, "LATDIFF_PREPROCESSED"), (results, "LATDIFF_RESULTS")):
        folder.mkdir()
        monkeypatch.setenv(var, str(folder))
    monkeypatch.delenv("LATDIFF_DEBUG", raising=False)
    folder = make_synthetic_dataset(raw, file_ending=".mha")
    defects = _break_dataset(folder)

    code = cli.main(["-d", "900", "--verify_dataset_integrity"])

    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert "error:" in captured.err and "dataset integrity check found 6 problem(s)" in captured.err
    for path in defects.values():
        assert path.name in captured.err
    assert list(preprocessed.rglob("*")) == []
    assert list(results.rglob("*")) == []


def test_cli_unknown_dataset_is_a_user_error(tmp_path, monkeypatch, capsys):
    for kind, var in (("raw", "LATDIFF_RAW"), ("preprocessed", "LATDIFF_PREPROCESSED"), ("results", "LATDIFF_RESULTS")):
        (tmp_path / kind).mkdir()
        monkeypatch.setenv(var, str(tmp_path / kind))
    monkeypatch.delenv("LATDIFF_DEBUG", raising=False)
    assert cli.main(["-d", "901", "--verify_dataset_integrity"]) == 2
    err = capsys.readouterr().err
    assert "no dataset with ID 901" in err and "Traceback" not in err


def test_rgb_declared_as_one_channel_explains_rgb(tmp_path):
    folder = make_synthetic_dataset(tmp_path / "raw", dim=2, rgb=True, num_cases=2)
    dataset_json = folder / "dataset.json"
    data = json.loads(dataset_json.read_text())
    data["channel_names"] = {"0": "photo"}
    dataset_json.write_text(json.dumps(data))
    with pytest.raises(DatasetIntegrityError) as info:
        verify_dataset_integrity(load_dataset(folder), num_processes=1)
    problems = info.value.problems
    assert len(problems) == 2
    for i, problem in enumerate(problems):
        assert f"{case_id(i)}_0000.png" in problem
        assert "3 channel(s)" in problem and "declares 1" in problem
        assert '"R"' in problem and '"G"' in problem and '"B"' in problem


def test_wrong_channel_count_without_rgb_hint(tmp_path):
    folder = make_synthetic_dataset(tmp_path / "raw", num_cases=2, num_channels=2)
    dataset_json = folder / "dataset.json"
    data = json.loads(dataset_json.read_text())
    data["channel_names"] = {"0": "MRI", "1": "MRI_1", "2": "MRI_2"}
    dataset_json.write_text(json.dumps(data))
    with pytest.raises(DatasetIntegrityError) as info:
        verify_dataset_integrity(load_dataset(folder), num_processes=1)
    # each case misses its third channel file: reported while listing, before any file is read
    assert len(info.value.problems) == 2
    assert all("missing channel" in p and "_0002.nii.gz" in p for p in info.value.problems)
