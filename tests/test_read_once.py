"""Throughput on many small cases (issue 11): each raw file is read once per run, outputs unchanged.

LIDC has 4,441 cases of six 128x128 PNGs each (image, majority label, four raters). Reading them
was most of the cost of the integrity check, the fingerprint and preprocessing alike, so the first
of them that reads a case hands it to the later ones (``ReadCaseStore``), and PNGs are read with a
named ITK reader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from synthetic import make_synthetic_dataset

import latdiffunet.experiment_planning.fingerprint as fingerprint_module
import latdiffunet.preprocessing.preprocessor as preprocessor
from latdiffunet.experiment_planning.fingerprint import extract_fingerprint
from latdiffunet.imageio import sitk_io
from latdiffunet.imageio.sitk_io import read_image
from latdiffunet.preprocessing.preprocessor import KEEP_CASE_MAX_BYTES, ReadCaseStore, preprocess_dataset
from latdiffunet.raw_dataset import list_training_cases, load_dataset
from latdiffunet.utilities.parallel import imap_with_progress

NUM_RATERS = 3


def _multi_rater_ct_slices(raw: Path, num_cases: int = 5) -> Path:
    """A small LIDC-like dataset: 2D CT PNGs, a consensus label and ``NUM_RATERS`` rater labels."""
    folder = make_synthetic_dataset(raw, name="Dataset901_Slices", num_cases=num_cases, dim=2)
    (folder / "labelsTr_raters").mkdir()
    for label in sorted((folder / "labelsTr").glob("*.png")):
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(label)))
        for k in range(NUM_RATERS):  # raters disagree by a shift
            rater = folder / "labelsTr_raters" / f"{label.stem}_rater{k}.png"
            sitk.WriteImage(sitk.GetImageFromArray(np.roll(seg, k, axis=1)), str(rater))
    meta = json.loads((folder / "dataset.json").read_text())
    meta |= {"channel_names": {"0": "CT"}, "num_raters": NUM_RATERS, "rater_labels_folder": "labelsTr_raters"}
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


def _volumes_of_two_spacings(raw: Path) -> Path:
    """3D cases, half of them on a coarser grid, so that preprocessing resamples every case."""
    folder = make_synthetic_dataset(raw, num_cases=4)
    for path in sorted(folder.rglob("synth_00[01]*.nii.gz")):
        img = sitk.ReadImage(str(path))
        img.SetSpacing(tuple(1.3 * s for s in img.GetSpacing()))
        sitk.WriteImage(img, str(path))
    return folder


def _plans(fingerprint: dict, configurations: list[str]) -> dict:
    from latdiffunet.experiment_planning.planner import load_preset, plan_experiment

    return plan_experiment(fingerprint, load_preset("tiny"), configurations)


def _outputs(folder: Path) -> dict[str, object]:
    """Every JSON's text and every npz's arrays under ``folder``, by relative path."""
    out: dict[str, object] = {}
    for p in sorted(folder.rglob("*")):
        if p.suffix == ".json":
            out[str(p.relative_to(folder))] = p.read_text()
        elif p.suffix == ".npz":
            with np.load(p) as z:
                out[str(p.relative_to(folder))] = {k: z[k] for k in z.files}
    return out


def _assert_same_outputs(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        if isinstance(value, str):
            assert value == b[name], name
        else:
            assert value.keys() == b[name].keys(), name
            for k, arr in value.items():
                assert arr.dtype == b[name][k].dtype and np.array_equal(arr, b[name][k]), f"{name}:{k}"


@pytest.mark.parametrize(
    "kind, num_processes", [("slices", 0), ("slices", 2), ("volumes", 0)],
    ids=["2d-slices-in-process", "2d-slices-two-workers", "3d-volumes-2d-and-3d-configurations"],
)
def test_preprocessing_reuses_the_cases_the_fingerprint_read(tmp_path, monkeypatch, kind, num_processes):
    """Same outputs; with two configurations (resampling included) the shared arrays stay unmodified."""
    if kind == "slices":
        folder, configurations = _multi_rater_ct_slices(tmp_path / "raw"), ["2d"]
    else:
        folder, configurations = _volumes_of_two_spacings(tmp_path / "raw"), ["2d", "3d"]
    spec = load_dataset(folder)
    cases, _ = list_training_cases(spec)
    plain = extract_fingerprint(spec, num_processes)
    plans = _plans(plain, configurations)
    preprocess_dataset(spec, cases, plans, configurations, tmp_path / "read_again", num_processes)

    store = ReadCaseStore()
    assert extract_fingerprint(spec, num_processes, keep=store) == plain
    assert len(store) == len(cases) and store.used_bytes > 0

    def no_second_read(*args, **kwargs):
        raise AssertionError("preprocessing read a case the fingerprint had read")

    monkeypatch.setattr(preprocessor, "read_training_case", no_second_read)  # forked workers inherit it
    preprocess_dataset(spec, cases, plans, configurations, tmp_path / "reused", num_processes, store)
    reused = _outputs(tmp_path / "reused")
    assert len(reused) == 2 * len(cases) * len(configurations)
    properties = [json.loads(v) for k, v in reused.items() if k.endswith(".json") and "synth_00" in k]
    assert kind == "slices" or all(p["shape_after_crop"] != p["shape_after_resampling"] for p in properties)
    assert kind == "volumes" or any("seg_raters" in v for v in reused.values() if isinstance(v, dict))
    _assert_same_outputs(_outputs(tmp_path / "read_again"), reused)


def test_spawned_workers_read_the_cases_themselves(tmp_path, monkeypatch):
    """Under ``spawn`` (CUDA initialised, or no fork) no store reaches the workers: nothing is sent
    back or handed over, and every case is read from its files, with the same results."""
    import torch

    spec = load_dataset(_multi_rater_ct_slices(tmp_path / "raw", num_cases=4))
    cases, _ = list_training_cases(spec)
    plain = extract_fingerprint(spec, 0)
    plans = _plans(plain, ["2d"])
    preprocess_dataset(spec, cases, plans, ["2d"], tmp_path / "in_process", 0)
    filled = ReadCaseStore()
    extract_fingerprint(spec, 0, keep=filled)

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # the pools spawn now
    store = ReadCaseStore()
    assert extract_fingerprint(spec, 2, keep=store) == plain and len(store) == 0
    preprocess_dataset(spec, cases, plans, ["2d"], tmp_path / "spawned", 2, filled)
    _assert_same_outputs(_outputs(tmp_path / "in_process"), _outputs(tmp_path / "spawned"))


def _where_inherited(item: int, inherited: object) -> tuple[int, int | None]:
    return item, None if inherited is None else id(inherited)


@pytest.mark.parametrize("cuda", [False, True], ids=["forked", "spawned"])
def test_inherited_object_reaches_forked_workers_uncopied_and_spawned_ones_as_none(cuda, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: cuda)
    big = np.zeros(1 << 20, np.uint8)  # a copy (pickled) would sit at another address
    seen = list(imap_with_progress(_where_inherited, [1, 2, 3], 2, desc="test", disable=True, inherited=big))
    assert seen == [(i, None if cuda else id(big)) for i in (1, 2, 3)]
    assert list(imap_with_progress(_where_inherited, [4, 5], 0, desc="test", disable=True, inherited=big)) == [(4, id(big)), (5, id(big))]


def test_store_keeps_small_cases_within_its_budget():
    geometry = sitk_io.ImageGeometry((4, 4), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    small = (np.zeros((1, 1, 4, 4), np.float32), np.zeros((1, 1, 4, 4), np.int16), geometry)  # 96 bytes
    store = ReadCaseStore(budget_bytes=200)
    assert store.add("a", small) and store.add("b", small)
    assert not store.add("c", small)  # over the budget: read again by preprocessing
    assert store.get("a") is small and store.get("c") is None and store.used_bytes == 192
    large = (np.zeros(KEEP_CASE_MAX_BYTES // 4 + 1, np.float32), np.zeros(1, np.int16), geometry)
    assert not ReadCaseStore.worth_keeping(large) and not ReadCaseStore(budget_bytes=1 << 40).add("big", large)


def test_a_large_case_is_not_sent_back_by_the_fingerprint_worker(tmp_path, monkeypatch):
    spec = load_dataset(_multi_rater_ct_slices(tmp_path / "raw", num_cases=2))
    monkeypatch.setattr(preprocessor, "KEEP_CASE_MAX_BYTES", 16)  # every case is "large" now
    sent = []
    real = fingerprint_module.case_fingerprint

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        sent.append(result["_read_case"])
        return result

    monkeypatch.setattr(fingerprint_module, "case_fingerprint", spy)
    store = ReadCaseStore()
    extract_fingerprint(spec, 0, keep=store)
    assert sent == [None, None] and len(store) == 0


@pytest.mark.parametrize("verify", [False, True], ids=["plain", "verify-integrity"])
def test_plan_and_preprocess_reads_each_file_once(latdiff_folders, monkeypatch, verify):
    from latdiffunet.experiment_planning.cli import main

    folder = _multi_rater_ct_slices(latdiff_folders["raw"], num_cases=5)
    reads = []
    real = sitk_io._read_sitk

    def counting(path):
        reads.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(sitk_io, "_read_sitk", counting)
    argv = ["-d", "901", "--preset", "tiny", "-c", "2d", "-np", "0"] + (["--verify_dataset_integrity"] if verify else [])
    assert main(argv) == 0
    raw_files = sorted(p.name for p in folder.rglob("*.png"))
    assert len(raw_files) == 5 * (2 + NUM_RATERS) and sorted(reads) == raw_files  # each once: image, label, raters
    assert len(list((latdiff_folders["preprocessed"] / "Dataset901_Slices" / "latdiffPlans_tiny_2d").glob("*.npz"))) == 5


def test_fingerprint_of_cases_the_integrity_check_read_is_unchanged(tmp_path, monkeypatch):
    from latdiffunet.experiment_planning.integrity import verify_dataset_integrity

    spec = load_dataset(_multi_rater_ct_slices(tmp_path / "raw"))
    plain = extract_fingerprint(spec, 0)
    store = ReadCaseStore()
    cases = verify_dataset_integrity(spec, 2, keep=store)
    assert len(store) == 5
    for case in cases:  # what the integrity check keeps is what the fingerprint would have read
        kept, read = store.get(case.case_id), preprocessor.read_training_case(case, sorted(spec.labels.values()), 1)
        assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(kept[:2], read[:2])) and kept[2] == read[2]

    def no_second_read(*args, **kwargs):
        raise AssertionError("the fingerprint read a case the integrity check had read")

    monkeypatch.setattr(fingerprint_module, "read_training_case", no_second_read)
    assert extract_fingerprint(spec, 0, keep=store) == plain


def test_png_is_read_with_the_named_reader(tmp_path, monkeypatch):
    make_synthetic_dataset(tmp_path, num_cases=1, dim=2)
    png = next((tmp_path / "Dataset900_Synth" / "imagesTr").glob("*.png"))
    calls = []
    real = sitk.ReadImage

    def spy(path, *args, **kwargs):
        calls.append(kwargs.get("imageIO", ""))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(sitk_io.sitk, "ReadImage", spy)
    arr, _ = read_image(png)
    assert calls == ["PNGImageIO"]
    np.testing.assert_array_equal(arr[0, 0], sitk.GetArrayFromImage(real(str(png))))


def test_png_named_file_with_other_content_reads_as_before(tmp_path):
    """ITK's factory reads a BMP saved as .png by its content; the named PNG reader refuses it."""
    pixels = np.arange(120, dtype=np.uint8).reshape(10, 12)
    sitk.WriteImage(sitk.GetImageFromArray(pixels), str(tmp_path / "really.bmp"))
    shutil.copy(tmp_path / "really.bmp", tmp_path / "mislabelled.png")
    arr, geometry = read_image(tmp_path / "mislabelled.png")
    np.testing.assert_array_equal(arr[0, 0], pixels)
    assert geometry.size == (12, 10)


def test_imap_with_progress_yields_in_order_one_at_a_time():
    results = imap_with_progress(abs, [-3, 1, -2], num_processes=2, desc="test", disable=True)
    assert next(results) == 3  # a generator: the caller can drop each result before the next arrives
    assert list(results) == [1, 2]
    assert list(imap_with_progress(abs, [-1, -5], num_processes=0, desc="test", disable=True)) == [1, 5]
