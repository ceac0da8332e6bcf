"""Shared test fixtures: the real-data location and isolated LATDIFF_* folders."""

from __future__ import annotations

import os
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
