"""``benchmarks/gpu_check.py``: a clear stop without a GPU, and its CPU smoke run end to end."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import REPO_ROOT
from synthetic import make_synthetic_dataset


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_stops_with_a_message(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_gpu_check().main([]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU is visible" in err and "--device cpu" in err


def test_cpu_smoke_run_reports_speed_memory_estimate_and_inference(tmp_path, monkeypatch, capsys):
    for key in ("LATDIFF_PREPROCESSED", "LATDIFF_RESULTS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LATDIFF_RAW", str(tmp_path / "raw"))
    monkeypatch.chdir(tmp_path)
    make_synthetic_dataset(tmp_path / "raw", name="Dataset907_Check", num_cases=10, dim=3, seed=2)
    work = tmp_path / "work"
    args = ["-d", "907", "-c", "3d", "--device", "cpu", "--iterations", "1", "--warmup", "0", "--cases", "1",
            "--workdir", str(work), "-np", "1"]
    assert load_gpu_check().main(args) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["target"] == "cpu" and [r["configuration"] for r in result["configurations"]] == ["3d"]
    row = result["configurations"][0]
    assert set(row["stages"]) == {"autoencoder", "diffusion"} and row["planner_estimate_bytes"] > 0
    assert row["stages"]["diffusion"]["seconds_per_iteration"] > 0 and row["inference"]["seconds_per_case"] > 0
    out = capsys.readouterr().out
    assert "s/iteration" in out and "planner's memory estimate" in out and "s per case" in out
    assert not (tmp_path / "raw" / "Dataset907_Check" / "latdiffPlans.json").exists()  # its own folders only
