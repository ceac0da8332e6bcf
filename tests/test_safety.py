"""Safety: no pickle anywhere, checkpoints load with ``weights_only=True``, JSON inputs validated,
and names taken from JSON can never point outside their folders."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from latdiffunet.errors import UserInputError
from latdiffunet.experiment_planning.planner import load_plans, load_preset
from latdiffunet.preprocessing.splits import validate_splits
from latdiffunet.raw_dataset import is_plain_name
from latdiffunet.utilities.checkpoint import load_checkpoint, save_checkpoint
from latdiffunet.utilities.file_io import load_npz, save_npz

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("latdiffunet", "dataset_conversion") for p in (REPO / folder).rglob("*.py"))
FORBIDDEN = {
    "import pickle": re.compile(r"^\s*(import\s+(c?pickle|dill|cloudpickle|joblib)\b|from\s+(c?pickle|dill|cloudpickle|joblib)\s+import)", re.M),
    "pickle.load": re.compile(r"\bpickle\.loads?\("),
    "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "weights_only=False": re.compile(r"weights_only\s*=\s*False"),
}


def test_sources_found():
    assert len(SOURCES) > 20 and any(p.name == "checkpoint.py" for p in SOURCES)


@pytest.mark.parametrize("what", list(FORBIDDEN))
def test_no_pickle_in_package_sources(what):
    hits = [f"{p.relative_to(REPO)}:{text[:m.start()].count(chr(10)) + 1}"
            for p in SOURCES for text in [p.read_text(encoding="utf-8")] for m in FORBIDDEN[what].finditer(text)]
    assert not hits, f"{what} found in {hits}"


def _calls(module: str, attribute: str):
    """Every ``module.attribute(...)`` call in the package sources, as (file:line, ast.Call)."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attribute
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == module):
                yield f"{path.relative_to(REPO)}:{node.lineno}", node


def _keyword_is(call: ast.Call, name: str, value: bool) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def test_every_torch_load_passes_weights_only_true():
    calls = list(_calls("torch", "load"))
    assert calls, "expected torch.load in utilities/checkpoint.py"
    bad = [where for where, call in calls if not _keyword_is(call, "weights_only", True)]
    assert not bad, f"torch.load without weights_only=True at {bad}"


def test_every_np_load_passes_allow_pickle_false():
    calls = list(_calls("np", "load")) + list(_calls("numpy", "load"))
    assert calls
    bad = [where for where, call in calls if not _keyword_is(call, "allow_pickle", False)]
    assert not bad, f"np.load without allow_pickle=False at {bad}"


def _touch(path: str) -> None:  # what unpickling the object below would run
    Path(path).touch()


class CodeOnLoad:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return _touch, (self.marker,)


def test_checkpoint_with_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"ema": {}, "x": CodeOnLoad(marker)}, path)
    with pytest.raises(UserInputError, match="cannot load checkpoint") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and info.value.fix
    assert not marker.exists()


def test_checkpoint_round_trip_and_foreign_content(tmp_path):
    good = {"epoch": 3, "model": {"w": torch.ones(2)}, "rng": {"python": [3, [1, 2], None]}}
    save_checkpoint(good, tmp_path / "c.pth")
    loaded = load_checkpoint(tmp_path / "c.pth", required=("epoch", "model"))
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.ones(2))
    with pytest.raises(UserInputError, match=r"lacks \['ema'\]"):
        load_checkpoint(tmp_path / "c.pth", required=("ema",))
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(UserInputError, match="holds a Tensor"):
        load_checkpoint(tmp_path / "tensor.pth")


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", data=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UserInputError, match="obj.npz"):
        load_npz(tmp_path / "obj.npz")
    save_npz(tmp_path / "ok.npz", data=np.arange(4, dtype=np.float32))
    assert load_npz(tmp_path / "ok.npz")["data"].tolist() == [0, 1, 2, 3]


BAD_NAMES = ["../x", "..", ".", "", "/etc/passwd", "a/b", "a\\b", "sub/../../x", "x\0y", 3, None, ["a"]]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_names_from_json_must_be_plain(name):
    assert not is_plain_name(name)


@pytest.mark.parametrize("name", ["case_001", "fäll 01", "a.b", "..x", "x..", "CT-scan (1)"])
def test_plain_names_accepted(name):
    assert is_plain_name(name)


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_splits_with_escaping_case_ids_are_refused(name, tmp_path):
    path = tmp_path / "splits_final.json"
    splits = [{"train": ["a", name], "val": ["b"]}]
    with pytest.raises(UserInputError, match="not a plain case name") as info:
        validate_splits(splits, ["a", "b"], path)
    assert str(path) in str(info.value) and info.value.fix


@pytest.mark.parametrize("splits", [{}, [], [[]], [{"train": "a", "val": []}], [{"train": ["a"]}], None, "x"])
def test_malformed_splits_are_refused(splits, tmp_path):
    with pytest.raises(UserInputError, match="splits_final.json"):
        validate_splits(splits, ["a"], tmp_path / "splits_final.json")


def _plans(data_identifier) -> dict:
    cfg = {k: {} for k in ("dimension", "spacing", "patch_size", "normalization", "resampling", "network", "diffusion", "inference")}
    return {"plans_name": "p", "foreground_intensity_properties_per_channel": {},
            "configurations": {"2d": cfg | {"data_identifier": data_identifier}}}


@pytest.mark.parametrize("name", ["../../outside", "/abs/path", "a/b", "..", 7], ids=repr)
def test_plans_data_identifier_cannot_escape(name, tmp_path):
    path = tmp_path / "latdiffPlans.json"
    path.write_text(json.dumps(_plans(name)))
    with pytest.raises(UserInputError, match="data_identifier") as info:
        load_plans(path)
    assert str(path) in str(info.value)
    path.write_text(json.dumps(_plans("latdiffPlans_2d")))
    assert load_plans(path)["configurations"]["2d"]["data_identifier"] == "latdiffPlans_2d"


@pytest.mark.parametrize("content", ["[]", "{}", '{"configurations": {}}', '{"configurations": {"2d": 1}}', "{"])
def test_malformed_plans_are_refused(content, tmp_path):
    path = tmp_path / "plans.json"
    path.write_text(content)
    with pytest.raises(UserInputError) as info:
        load_plans(path)
    assert str(path) in str(info.value) and info.value.fix


def test_preset_plans_name_cannot_escape(tmp_path):
    preset = load_preset("tiny") | {"plans_name": "../../elsewhere"}
    path = tmp_path / "preset.json"
    path.write_text(json.dumps(preset))
    with pytest.raises(UserInputError, match="plans_name"):
        load_preset(str(path))
