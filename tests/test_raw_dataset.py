"""dataset.json validation, dataset names on the command line, and listing training cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from latdiffunet.errors import UserInputError
from latdiffunet.raw_dataset import (
    list_training_cases,
    load_dataset,
    parse_dataset_json,
    resolve_dataset_name,
)

VALID = {
    "channel_names": {"0": "T1", "1": "FLAIR"},
    "labels": {"background": 0, "edema": 1, "tumor": 2},
    "numTraining": 3,
    "file_ending": ".nii.gz",
    "name": "Brains",
    "licence": "CC-BY",
}


def _write_json(folder: Path, data, name: str = "dataset.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def _invalid_message(path: Path) -> str:
    with pytest.raises(UserInputError) as info:
        parse_dataset_json(path)
    assert info.value.path == str(path)
    return str(info.value)


def test_valid_dataset_json(tmp_path):
    path = _write_json(tmp_path / "Dataset001_Brains", VALID)
    spec = parse_dataset_json(path)
    assert spec.folder == path.parent and spec.name == "Dataset001_Brains"
    assert spec.channel_names == {0: "T1", 1: "FLAIR"} and spec.num_channels == 2 and spec.files_per_case == 2
    assert spec.labels == VALID["labels"]
    assert spec.class_labels == [0, 1, 2] and spec.foreground_labels == [1, 2] and spec.num_classes == 3
    assert spec.num_training == 3 and spec.file_ending == ".nii.gz"
    assert spec.ignore_label is None and spec.num_raters == 1 and not spec.is_2d_format and not spec.is_rgb
    assert spec.extra == {"name": "Brains", "licence": "CC-BY"}  # unknown keys kept, not refused
    assert spec.to_dict() == {k: VALID[k] for k in ("channel_names", "labels", "numTraining", "file_ending")}
    assert load_dataset(path.parent).labels == spec.labels


def test_ignore_label_and_rgb(tmp_path):
    data = {
        "channel_names": {"0": "R", "1": "G", "2": "B"},
        "labels": {"background": 0, "polyp": 1, "ignore": 2},
        "numTraining": 1,
        "file_ending": ".png",
    }
    spec = parse_dataset_json(_write_json(tmp_path / "Dataset002_Polyps", data))
    assert spec.ignore_label == 2 and spec.class_labels == [0, 1] and spec.foreground_labels == [1]
    assert spec.is_2d_format and spec.is_rgb and spec.num_channels == 3 and spec.files_per_case == 1


def test_every_problem_reported_at_once(tmp_path):
    data = {
        "channel_names": {"0": "CT"},
        "labels": {"liver": 1, "tumor": 3},  # no background, values not consecutive
        "file_ending": ".nii.gz",
        # numTraining missing
    }
    message = _invalid_message(_write_json(tmp_path / "Dataset003_Liver", data))
    assert "'numTraining'" in message
    assert '"background": 0' in message
    assert "consecutive" in message and "[1, 3]" in message
    assert message.count("\n  - ") == 3, message  # exactly those three, in one error
    assert "dataset.json" in message


def test_more_problems_in_one_error(tmp_path):
    data = {
        "channel_names": {"0": "CT", "2": "PET", "x": "junk"},
        "labels": {"background": 0, "a": 1, "b": 1, "c": -1},
        "numTraining": 0,
        "file_ending": ".dcm",
        "num_raters": "three",
    }
    message = _invalid_message(_write_json(tmp_path / "Dataset005_Bad", data))
    for expected in ("'x'", "0..1", "share one value", "'c'", "'numTraining'", "'.dcm'", "'num_raters'"):
        assert expected in message, (expected, message)


def test_nnunet_v1_dataset_json_explained(tmp_path):
    data = {"modality": {"0": "CT"}, "labels": {"background": 0, "x": 1}, "numTraining": 1, "file_ending": ".nii.gz"}
    message = _invalid_message(_write_json(tmp_path / "Dataset006_Old", data))
    assert "nnU-Net v1" in message and "channel_names" in message


def test_malformed_json_syntax(tmp_path):
    path = _write_json(tmp_path / "Dataset007_Broken", '{"channel_names": {"0": "CT"},, "labels": }')
    with pytest.raises(UserInputError, match="not valid JSON") as info:
        parse_dataset_json(path)
    assert str(path) in str(info.value) and "line 1" in str(info.value)


def test_json_that_is_not_an_object(tmp_path):
    path = _write_json(tmp_path / "Dataset008_List", "[1, 2, 3]")
    assert "JSON object" in _invalid_message(path)


def test_missing_dataset_json_and_folder(tmp_path):
    (tmp_path / "Dataset009_Empty").mkdir()
    with pytest.raises(UserInputError, match="not found") as info:
        load_dataset(tmp_path / "Dataset009_Empty")
    assert "dataset.json" in str(info.value)
    with pytest.raises(UserInputError, match="dataset folder not found"):
        load_dataset(tmp_path / "Dataset010_Absent")


def test_region_labels_refused(tmp_path):
    data = dict(VALID, labels={"background": 0, "whole_tumor": [1, 2, 3], "core": [2, 3], "enhancing": 3})
    message = _invalid_message(_write_json(tmp_path / "Dataset011_Regions", data))
    assert "region" in message and "'whole_tumor'" in message and "'core'" in message


@pytest.mark.parametrize("folder", ["../outside", "..", "labels/../../etc", "/etc", "a\\..\\b", ""])
def test_rater_labels_folder_must_stay_inside(tmp_path, folder):
    data = dict(VALID, num_raters=2, rater_labels_folder=folder)
    message = _invalid_message(_write_json(tmp_path / "Dataset012_Raters", data))
    assert "rater_labels_folder" in message


def test_rater_labels_folder_plain_name_accepted(tmp_path):
    data = dict(VALID, num_raters=3, rater_labels_folder="labelsTr_raters")
    spec = parse_dataset_json(_write_json(tmp_path / "Dataset013_Raters", data))
    assert spec.num_raters == 3 and spec.rater_labels_folder == "labelsTr_raters"
    assert spec.to_dict()["num_raters"] == 3


def _make_roots(tmp_path: Path, **folders: list[str]) -> dict[str, Path]:
    roots = {}
    for kind in ("raw", "preprocessed", "results"):
        roots[kind] = tmp_path / kind
        roots[kind].mkdir(parents=True)
        for name in folders.get(kind, []):
            (roots[kind] / name).mkdir()
    return roots


def test_resolve_dataset_name(tmp_path):
    roots = _make_roots(tmp_path, raw=["Dataset004_X", "Dataset040_Y"], preprocessed=["Dataset004_X"])
    search = (roots["raw"], roots["preprocessed"], roots["results"])
    assert resolve_dataset_name(4, *search) == "Dataset004_X"
    assert resolve_dataset_name("4", *search) == "Dataset004_X"
    assert resolve_dataset_name("004", *search) == "Dataset004_X"
    assert resolve_dataset_name(" 40 ", *search) == "Dataset040_Y"
    assert resolve_dataset_name("Dataset004_X", *search) == "Dataset004_X"
    # a full name is taken as given (a later stage reports a missing folder with its path)
    assert resolve_dataset_name("Dataset123_NotYet", *search) == "Dataset123_NotYet"
    # found in a later root only
    (roots["results"] / "Dataset077_Trained").mkdir()
    assert resolve_dataset_name(77, *search) == "Dataset077_Trained"
    # files are not datasets
    (roots["raw"] / "Dataset088_file.txt").write_text("")
    with pytest.raises(UserInputError, match="no dataset with ID 88"):
        resolve_dataset_name(88, *search)


def test_resolve_unknown_id(tmp_path):
    roots = _make_roots(tmp_path, raw=["Dataset004_X"])
    with pytest.raises(UserInputError) as info:
        resolve_dataset_name(7, roots["raw"], roots["preprocessed"], tmp_path / "does_not_exist")
    message = str(info.value)
    assert "no dataset with ID 7" in message and "Dataset007_" in message and str(roots["raw"]) in message
    assert info.value.fix


@pytest.mark.parametrize("bad", ["Hippocampus", "Dataset4_X", "-3", "4.0", ""])
def test_resolve_refuses_non_ids(tmp_path, bad):
    with pytest.raises(UserInputError):
        resolve_dataset_name(bad, tmp_path)


def test_resolve_duplicate_ids(tmp_path):
    roots = _make_roots(tmp_path, raw=["Dataset005_A", "Dataset005_B"])
    with pytest.raises(UserInputError, match="several datasets share ID 5") as info:
        resolve_dataset_name("005", roots["raw"])
    assert "Dataset005_A" in str(info.value) and "Dataset005_B" in str(info.value)
    # the same ID with different names in two roots is also ambiguous
    roots = _make_roots(tmp_path / "other", raw=["Dataset006_A"], preprocessed=["Dataset006_B"])
    with pytest.raises(UserInputError, match="several datasets share ID 6"):
        resolve_dataset_name(6, roots["raw"], roots["preprocessed"])
    assert resolve_dataset_name("Dataset006_A", roots["raw"], roots["preprocessed"]) == "Dataset006_A"


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_list_training_cases_reports_every_problem(tmp_path):
    folder = tmp_path / "Dataset014_Messy"
    _write_json(folder, dict(VALID, numTraining=5))  # 2 channels per case
    images, labels = folder / "imagesTr", folder / "labelsTr"
    for name in ("good_0000", "good_0001", "nolabel_0000", "nolabel_0001", "onechannel_0000"):
        _touch(images / f"{name}.nii.gz")
    _touch(images / "noindex.nii.gz")  # badly named: no _XXXX channel suffix
    _touch(images / "wrongext_0000.nrrd")  # not the declared file ending
    _touch(images / ".DS_Store")  # hidden files are ignored
    for name in ("good", "onechannel", "orphan"):
        _touch(labels / f"{name}.nii.gz")

    cases, problems = list_training_cases(load_dataset(folder))

    assert [c.case_id for c in cases] == ["good", "nolabel"]
    assert cases[0].images == [images / "good_0000.nii.gz", images / "good_0001.nii.gz"]
    assert cases[0].label == labels / "good.nii.gz" and cases[1].label is None

    def one_problem_naming(fragment: str) -> str:
        hits = [p for p in problems if fragment in p]
        assert len(hits) == 1, (fragment, problems)
        return hits[0]

    assert "missing label" in one_problem_naming(str(labels / "nolabel.nii.gz"))
    assert "label without image" in one_problem_naming(str(labels / "orphan.nii.gz"))
    assert "missing channel" in one_problem_naming("onechannel_0001.nii.gz")
    assert "CASE_XXXX" in one_problem_naming(str(images / "noindex.nii.gz"))
    assert "file ending" in one_problem_naming(str(images / "wrongext_0000.nrrd"))
    mismatch = one_problem_naming(str(folder / "dataset.json"))
    assert "numTraining is 5" in mismatch and "2 cases" in mismatch
    assert len(problems) == 6, problems


def test_list_training_cases_extra_channel_and_missing_folders(tmp_path):
    folder = tmp_path / "Dataset015_Extra"
    _write_json(folder, dict(VALID, channel_names={"0": "CT"}, numTraining=1))
    for name in ("a_0000", "a_0001"):
        _touch(folder / "imagesTr" / f"{name}.nii.gz")
    cases, problems = list_training_cases(load_dataset(folder))
    assert cases == []
    assert any("unexpected channel" in p and "a_0001.nii.gz" in p for p in problems)
    assert any(str(folder / "labelsTr") in p and "folder not found" in p for p in problems)

    empty = tmp_path / "Dataset016_Empty"
    _write_json(empty, VALID)
    cases, problems = list_training_cases(load_dataset(empty))
    assert cases == [] and problems == [f"{empty / 'imagesTr'}: folder not found", f"{empty / 'labelsTr'}: folder not found"]


def test_list_training_cases_rater_labels(tmp_path):
    folder = tmp_path / "Dataset017_Raters"
    _write_json(folder, dict(VALID, channel_names={"0": "CT"}, numTraining=1, num_raters=2, rater_labels_folder="labelsTr_raters"))
    _touch(folder / "imagesTr" / "c_0000.nii.gz")
    _touch(folder / "labelsTr" / "c.nii.gz")
    _touch(folder / "labelsTr_raters" / "c_rater0.nii.gz")
    cases, problems = list_training_cases(load_dataset(folder))
    assert len(cases) == 1 and len(cases[0].rater_labels) == 2
    assert len(problems) == 1 and "c_rater1.nii.gz" in problems[0] and "rater 1" in problems[0]
