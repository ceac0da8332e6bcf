"""Two ``latdiff_predict`` shards (``--num_parts 2 --part_id 0/1``) started at the same moment into
one output folder: together they write every case exactly once, nothing is clobbered, and the
shared ``prediction_info.json`` stays valid JSON (it is written atomically by both)."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from synthetic import make_synthetic_dataset
from test_interruptions import (
    NAME, assert_no_partial_files, check_predictions, folders, log_text, set_folders, single_thread, start_stage,
)
from test_predict import make_untrained_run

from latdiffunet.experiment_planning.cli import main as plan_main
from latdiffunet.inference.cli import main as predict_main


@pytest.mark.slow
def test_two_shards_into_one_folder_give_the_complete_set(tmp_path, monkeypatch, capsys):
    env = folders(tmp_path)
    set_folders(monkeypatch, env)
    make_synthetic_dataset(env["raw"], name=NAME, num_cases=5, seed=2)
    assert plan_main(["-d", "900", "--preset", "tiny", "-np", "1", "-c", "2d"]) == 0
    make_untrained_run(env["res"], env["pre"], NAME, "2d")
    inputs = tmp_path / "imagesTs"
    make_synthetic_dataset(tmp_path / "ts", name=NAME, num_cases=7, seed=9)
    (tmp_path / "ts" / NAME / "imagesTr").rename(inputs)
    images = sorted(inputs.glob("*_0000.nii.gz"))
    out = tmp_path / "shared_output"
    common = ["-i", str(inputs), "-o", str(out), "-d", "900", "-p", "latdiffPlans_tiny", "--num_samples", "2", "--steps", "2",
              "--device", "cpu", "-np", "0", "--num_parts", "2"]
    logs = [tmp_path / f"part{k}.log" for k in range(2)]
    procs = [start_stage("inference.cli", common + ["--part_id", str(k)], env, logs[k]) for k in range(2)]
    deadline = time.monotonic() + 300
    for proc, log in zip(procs, logs):
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"shard did not finish:\n{log_text(log)}")
        assert proc.returncode == 0, log_text(log)
    counts = [int(re.search(r"predicted (\d+) case\(s\)", log_text(log)).group(1)) for log in logs]
    assert sorted(counts) == [3, 4]  # disjoint shards: 7 cases split 4 + 3, none predicted twice

    assert not assert_no_partial_files(out)  # complete, readable, and no temporary files left behind
    info = json.loads((out / "prediction_info.json").read_text())
    assert info["configuration"] == "2d" and len(info["checkpoints"]) == 1
    reference = tmp_path / "single_process"
    with single_thread():
        assert predict_main([*common[:3], str(reference), *common[4:-2]]) == 0
    check_predictions(out, images, reference)  # every case equals a one-process run: nothing clobbered
