"""Shared test fixtures: the real-data location and isolated LATDIFF_* folders."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def shared_dataset(name: str) -> Path:
    """Path of a real dataset in ../shared/data, or skip the test saying why."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data not available: {path} is absent (tests on real data need ../shared/data)")
    return path


@pytest.fixture
def latdiff_folders(tmp_path, monkeypatch):
    """Point LATDIFF_RAW/PREPROCESSED/RESULTS into a temporary folder."""
    folders = {k: tmp_path / k for k in ("raw", "preprocessed", "results")}
    for key, var in (("raw", "LATDIFF_RAW"), ("preprocessed", "LATDIFF_PREPROCESSED"), ("results", "LATDIFF_RESULTS")):
        folders[key].mkdir()
        monkeypatch.setenv(var, str(folders[key]))
    return folders


def assert_reference_plans(produced: dict, dataset: str, plans_name: str, volatile: tuple[str, ...] = ("generated_by",)) -> None:
    """The planner's output equals ``plans/reference/<dataset>/<plans_name>.json``.

    ``LATDIFF_UPDATE_REFERENCE_PLANS=1`` rewrites the reference instead (a deliberate planner change).
    """
    import json
    import os

    produced = {k: v for k, v in produced.items() if k not in volatile}
    reference_file = REPO_ROOT / "plans" / "reference" / dataset / f"{plans_name}.json"
    if os.environ.get("LATDIFF_UPDATE_REFERENCE_PLANS") == "1":
        reference_file.parent.mkdir(parents=True, exist_ok=True)
        reference_file.write_text(json.dumps(produced, indent=2) + "\n")
    reference = json.loads(reference_file.read_text())
    assert json.loads(json.dumps(produced)) == reference, (
        f"the planner's output for {dataset} changed; if intended, regenerate {reference_file} with "
        "LATDIFF_UPDATE_REFERENCE_PLANS=1 pytest tests/test_planner.py tests/test_hippocampus_end_to_end.py -k reference"
    )


@contextlib.contextmanager
def module_folders(root: Path):
    """Point LATDIFF_RAW / _PREPROCESSED / _RESULTS at ``root/{raw,pre,res}``; restore them afterwards."""
    env = {"LATDIFF_RAW": root / "raw", "LATDIFF_PREPROCESSED": root / "pre", "LATDIFF_RESULTS": root / "res"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_converter(name: str):
    """``dataset_conversion/<name>.py`` as a module (the converters are scripts, not package modules)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "dataset_conversion" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
