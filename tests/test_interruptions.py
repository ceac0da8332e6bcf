"""Killed jobs lose nothing: every stage is SIGKILLed at a random moment, then rerun.

Each stage runs as a real subprocess (``python -m latdiffunet.<stage>.cli``) in its own process
group, so pool workers die with it, as when a scheduler kills a job. The kill comes a seeded random
delay after a marker shows that the stage is writing its outputs (the first preprocessed case, the
first checkpoint, the first prediction). Then:

* no file is left half-written under its final name: every ``.json`` parses, every ``.npz`` /
  ``.pth`` / image loads; temporary files may remain, but only under hidden names (``.NAME.*``);
* rerunning completes: preprocessing writes every case again, training resumes (``--c``) from the
  last checkpoint and says so, prediction skips finished cases and its outputs equal those of an
  uninterrupted run.

``LATDIFF_KILL_SEED`` changes the random moments (default 0).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk

from synthetic import make_synthetic_dataset
from test_predict import make_untrained_run

from latdiffunet.experiment_planning.cli import main as plan_main
from latdiffunet.imageio.sitk_io import read_image
from latdiffunet.inference.cli import main as predict_main
from latdiffunet.utilities.checkpoint import load_checkpoint
from latdiffunet.training.cli import main as train_main
from latdiffunet.utilities.file_io import load_npz

SEED = int(os.environ.get("LATDIFF_KILL_SEED", "0"))
NAME = "Dataset900_Synth"
RUN = "LatentDiffusionTrainer__latdiffPlans_tiny__2d"
IMAGE_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")


# ----------------------------------------------------------------------------- helpers (also used by test_concurrency)
def folders(root: Path) -> dict[str, Path]:
    env = {"raw": root / "raw", "pre": root / "pre", "res": root / "res"}
    for p in env.values():
        p.mkdir(parents=True, exist_ok=True)
    return env


def set_folders(monkeypatch, env: dict[str, Path]) -> None:
    for key, var in (("raw", "LATDIFF_RAW"), ("pre", "LATDIFF_PREPROCESSED"), ("res", "LATDIFF_RESULTS")):
        monkeypatch.setenv(var, str(env[key]))


def start_stage(module: str, args: list[str], env: dict[str, Path], log: Path) -> subprocess.Popen:
    """``python -m latdiffunet.<module>`` in its own process group, output to ``log``."""
    environ = dict(os.environ, LATDIFF_RAW=str(env["raw"]), LATDIFF_PREPROCESSED=str(env["pre"]),
                   LATDIFF_RESULTS=str(env["res"]), OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    environ.pop("LATDIFF_DEBUG", None)
    out = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", f"latdiffunet.{module}", *args], env=environ, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_after(proc: subprocess.Popen, marker: Callable[[], bool], delay: float, timeout: float = 240) -> bool:
    """SIGKILL the process group ``delay`` s after ``marker()`` holds; False if it finished first."""
    deadline = time.monotonic() + timeout
    while not marker():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "marker never appeared"
        time.sleep(0.02)
    end = time.monotonic() + delay
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def _arrays_written_since(out: Path, started_ns: int) -> int:
    """Final preprocessed arrays written after ``started_ns``; hidden temporary files are renamed
    away while we look, so they are skipped and a file that vanishes between listing and stat
    does not count."""
    count = 0
    for p in out.glob("latdiffPlans_tiny_*/*.npz"):
        if p.name.startswith("."):
            continue
        try:
            count += p.stat().st_mtime_ns > started_ns
        except FileNotFoundError:
            pass
    return count


def assert_no_partial_files(*roots: Path) -> list[Path]:
    """Every file under a final name is complete; returns the leftover temporary files."""
    temporary = []
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            name = path.name
            if name.startswith("."):
                assert ".tmp" in name, f"unexpected hidden file {path}"
                temporary.append(path)
                continue
            try:
                if name.endswith(".json"):
                    json.loads(path.read_text(encoding="utf-8"))
                elif name.endswith(".npz"):
                    load_npz(path)
                elif name.endswith(".pth"):
                    load_checkpoint(path)
                elif name.endswith(IMAGE_ENDINGS):
                    read_image(path)
                elif name.endswith(".png"):
                    sitk.ReadImage(str(path))
            except Exception as exc:  # noqa: BLE001 - the assertion says which file
                raise AssertionError(f"{path} is half-written or corrupt: {exc}") from None
    return temporary


def check_predictions(out: Path, images: list[Path], reference: Path | None = None) -> None:
    """One segmentation + three uncertainty maps per input, in its geometry, equal to ``reference``."""
    for image in images:
        case = image.name[: -len("_0000.nii.gz")]
        ref = sitk.ReadImage(str(image))
        for name in (f"{case}.nii.gz", f"{case}_uncertainty.nii.gz", f"{case}_entropy.nii.gz", f"{case}_mutual_information.nii.gz",
                     f"{case}_agreement.nii.gz"):
            img = sitk.ReadImage(str(out / name))
            assert img.GetSize() == ref.GetSize(), name
            np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-6)
            if reference is not None:
                a = sitk.GetArrayFromImage(img)
                b = sitk.GetArrayFromImage(sitk.ReadImage(str(reference / name)))
                np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"{name} differs from an uninterrupted run")
    produced = {p.name for p in out.glob("[!.]*.nii.gz") if not p.name.endswith(("_uncertainty.nii.gz", "_entropy.nii.gz", "_mutual_information.nii.gz", "_agreement.nii.gz"))}
    assert produced == {i.name.replace("_0000.nii.gz", ".nii.gz") for i in images}
    json.loads((out / "prediction_info.json").read_text())


@contextmanager
def single_thread():
    """torch with one thread, like the subprocesses (OMP_NUM_THREADS=1): identical float results."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def log_text(log: Path) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-3000:]


# ----------------------------------------------------------------------------- plan and preprocess
@pytest.mark.slow
def test_killed_plan_and_preprocess_reruns_to_complete_outputs(tmp_path, monkeypatch, capsys):
    rng = random.Random(SEED)
    env = folders(tmp_path)
    set_folders(monkeypatch, env)
    num_cases = 30
    make_synthetic_dataset(env["raw"], name=NAME, num_cases=num_cases, seed=1)
    out = env["pre"] / NAME
    args = ["-d", "900", "--preset", "tiny", "-np", "1"]
    killed, moments = 0, []
    for attempt in range(2):  # killed while writing, then killed again while rewriting
        log = tmp_path / f"plan_{attempt}.log"
        started = time.time_ns()
        proc = start_stage("experiment_planning.cli", args, env, log)
        # the random moment: after a random number of the 2 x 30 preprocessed arrays, plus a random delay
        count = rng.randint(1, 40)
        delay = rng.uniform(0.0, 0.05)
        marker = lambda: _arrays_written_since(out, started) >= count  # noqa: E731
        was_killed = kill_after(proc, marker, delay)
        killed += was_killed
        moments.append(f"attempt {attempt}: killed={was_killed} after {count} arrays + {delay:.3f} s")
        if proc.returncode not in (0, -signal.SIGKILL):
            pytest.fail(f"plan_and_preprocess failed:\n{log_text(log)}")
        assert_no_partial_files(out)
    assert killed >= 1, f"the stage always finished before the kill; the test proved nothing ({moments})"
    capsys.readouterr()
    assert plan_main(args) == 0
    leftovers = assert_no_partial_files(out)
    assert not [p for p in leftovers if p.name.endswith(".npz")]  # stale temporary arrays are cleaned up
    cases = sorted(f"synth_{i:03d}" for i in range(num_cases))
    plans = json.loads((out / "latdiffPlans_tiny.json").read_text())
    assert sorted(plans["configurations"]) == ["2d", "3d"]
    for cfg in plans["configurations"].values():
        folder = out / cfg["data_identifier"]
        assert sorted(p.stem for p in folder.glob("*.npz")) == cases
        assert sorted(p.stem for p in folder.glob("*.json")) == cases
        for case in cases[::7]:
            arrays = load_npz(folder / f"{case}.npz")
            props = json.loads((folder / f"{case}.json").read_text())
            assert list(arrays["data"].shape[1:]) == props["shape_after_resampling"] == list(arrays["seg"].shape)
            assert set(np.unique(arrays["seg"]).tolist()) <= {0, 1, 2}
    splits = json.loads((out / "splits_final.json").read_text())
    assert len(splits) == 5 and sorted(c for s in splits for c in s["val"]) == cases
    assert json.loads((out / "dataset_fingerprint.json").read_text())["num_cases"] == num_cases


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    env = folders(tmp_path_factory.mktemp("killed"))
    mp = pytest.MonkeyPatch()
    set_folders(mp, env)
    make_synthetic_dataset(env["raw"], name=NAME, num_cases=6, seed=2)
    assert plan_main(["-d", "900", "--preset", "tiny", "-np", "1", "-c", "2d"]) == 0
    yield env
    mp.undo()


@pytest.mark.slow
def test_killed_training_resumes_from_last_checkpoint(planned, tmp_path, monkeypatch, capsys):
    rng = random.Random(SEED + 1)
    env = dict(planned, res=tmp_path / "res")
    set_folders(monkeypatch, env)
    fold = env["res"] / NAME / RUN / "fold_0"
    args = ["900", "0", "-c", "2d", "-p", "latdiffPlans_tiny", "--epochs", "6", "--iters-per-epoch", "2", "--device", "cpu",
            "--num-workers", "0"]  # 1 autoencoder + 5 diffusion epochs (the tiny plans' ratio)
    log = tmp_path / "train.log"
    proc = start_stage("training.cli", args, env, log)
    # checkpoint_latest.pth is written after the autoencoder stage (epoch 1), at epoch 5 and at the end (6)
    delay = rng.uniform(0.0, 2.0)
    killed = kill_after(proc, lambda: (fold / "checkpoint_latest.pth").is_file(), delay)
    if not killed:
        pytest.fail(f"training finished (or failed) before it could be killed:\n{log_text(log)}")
    assert_no_partial_files(fold.parent)
    saved = load_checkpoint(fold / "checkpoint_latest.pth")
    resumed_at = int(saved["epoch"])
    # 6: killed after the last epoch, before or during the final validation
    assert resumed_at in (1, 5, 6), f"killed {delay:.2f} s after the first checkpoint"
    if resumed_at < 6:
        assert not (fold / "checkpoint_final.pth").exists()

    capsys.readouterr()
    assert train_main(args + ["--c"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"resuming from {fold / 'checkpoint_latest.pth'} at epoch {resumed_at}" in out
    assert f"epochs {resumed_at}->6" in out  # continues, does not restart
    assert f"resuming from {fold / 'checkpoint_latest.pth'} at epoch {resumed_at}" in (fold / "training_log.txt").read_text()
    final = load_checkpoint(fold / "checkpoint_final.pth")
    assert int(final["epoch"]) == 6 and int(final["autoencoder_epochs"]) == 1
    history = json.loads((fold / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == list(range(6))  # every epoch once, none lost or doubled
    # the autoencoder stage was over before the kill: its weights are those of the checkpoint
    for k, v in saved["model"].items():
        if k.startswith("autoencoder."):
            assert (v == final["model"][k]).all(), k
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert "foreground_mean" in summary
    assert_no_partial_files(fold.parent)


# ----------------------------------------------------------------------------- prediction
@pytest.mark.slow
def test_killed_prediction_reruns_to_the_same_outputs(planned, tmp_path, monkeypatch, capsys):
    rng = random.Random(SEED + 2)
    env = dict(planned, res=tmp_path / "res")
    set_folders(monkeypatch, env)
    make_untrained_run(env["res"], env["pre"], NAME, "2d")
    inputs = tmp_path / "imagesTs"
    num_cases = 24  # at least 12 left when killed: more than can finish within the 0.2 s delay
    make_synthetic_dataset(tmp_path / "ts", name=NAME, num_cases=num_cases, seed=5)
    (tmp_path / "ts" / NAME / "imagesTr").rename(inputs)
    images = sorted(inputs.glob("*_0000.nii.gz"))
    out = tmp_path / "pred"
    args = ["-i", str(inputs), "-o", str(out), "-d", "900", "-p", "latdiffPlans_tiny", "--num_samples", "4", "--steps", "4",
            "--device", "cpu"]
    log = tmp_path / "predict.log"
    proc = start_stage("inference.cli", args + ["-np", "1"], env, log)  # with a pool worker writing outputs
    # the random moment: after a random number of finished cases, plus a random part of a case's time
    count, delay = rng.randint(1, num_cases // 2), rng.uniform(0.0, 0.2)
    killed = kill_after(proc, lambda: len(list(out.glob("synth_*[0-9].nii.gz"))) >= count, delay)
    if not killed:
        pytest.fail(f"prediction finished (or failed) before it could be killed:\n{log_text(log)}")
    assert_no_partial_files(out)
    finished = {p.name for p in out.glob("synth_*[0-9].nii.gz")}
    assert 0 < len(finished) < len(images), f"killed {delay:.3f} s after {count} finished cases"

    capsys.readouterr()
    with single_thread():  # as in the subprocess, so that results can be compared bit for bit
        assert predict_main(args + ["-np", "0"]) == 0
        assert f"{len(finished)} case(s) already predicted" in capsys.readouterr().out
        reference = tmp_path / "uninterrupted"
        assert predict_main([*args[:3], str(reference), *args[4:], "-np", "0"]) == 0
    check_predictions(out, images, reference)
    assert_no_partial_files(out)  # the killed run may leave hidden temporary files, nothing else
    assert not assert_no_partial_files(reference)
