"""Image corruptions (seeded, level 0 = identity, monotone, files keep geometry and type) and the
robustness runner on a toy model (issue 13, LDSeg's robustness claim)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO_ROOT, module_folders
from synthetic import make_synthetic_dataset, oblique_direction

from latdiffunet.errors import UserInputError
from latdiffunet.evaluation.corruptions import (
    CORRUPTIONS,
    blur_sigmas,
    corrupt_image,
    write_corrupted_case,
    write_corrupted_cases,
)

SPACING = (2.5, 0.9, 0.8)  # (z, y, x), anisotropic


def _image(seed: int = 0, channels: int = 2) -> np.ndarray:
    """A (C, Z, Y, X) image with edges and texture, integer-valued like a scanner's uint8 output."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices((6, 12, 14))
    base = np.where((y - 6) ** 2 + (x - 7) ** 2 < 16, 180.0, 40.0) + 20 * (z % 2)
    return np.stack([np.round(base * (1 + c) / 2 + rng.normal(0, 8, base.shape)) for c in range(channels)]).astype(np.float32)


def _corrupt(image, corruption, level, seed=0, case_id="case_a"):
    return corrupt_image(image, corruption, level, spacing_zyx=SPACING, seed=seed, case_id=case_id)


def test_noise_is_reproducible_from_seed_case_and_level_in_any_order():
    img = _image()
    first = _corrupt(img, "gaussian", 0.2, seed=3)
    _corrupt(img, "gaussian", 0.1, seed=3)  # another level drawn in between changes nothing
    _corrupt(img, "gaussian", 0.2, seed=3, case_id="case_b")
    assert np.array_equal(first, _corrupt(img, "gaussian", 0.2, seed=3))
    assert not np.allclose(first, _corrupt(img, "gaussian", 0.2, seed=4))
    assert not np.allclose(first, _corrupt(img, "gaussian", 0.2, seed=3, case_id="case_b"))
    assert not np.allclose(first - img, 2 * (_corrupt(img, "gaussian", 0.1, seed=3) - img))  # levels draw their own noise
    for corruption in ("blur", "contrast", "gamma"):  # deterministic ones ignore the seed
        assert np.array_equal(_corrupt(img, corruption, 0.3, seed=1), _corrupt(img, corruption, 0.3, seed=2))


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_level_zero_is_the_identity(corruption, dtype):
    img = _image().astype(dtype)
    if dtype == np.float64:  # values whose arithmetic round trip is not exact
        img = img / 3 + np.random.default_rng(1).random(img.shape)
    out = _corrupt(img, corruption, 0.0)
    assert out.dtype == img.dtype and np.array_equal(out, img) and out is not img


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_larger_level_deviates_more_from_the_clean_image(corruption):
    img = _image()
    levels = [0.0, 0.05, 0.1, 0.2, 0.4, 0.8]
    deviation = [float(np.abs(_corrupt(img, corruption, lv).astype(np.float64) - img).mean()) for lv in levels]
    assert deviation[0] == 0 and all(b > a for a, b in zip(deviation, deviation[1:])), deviation


def test_noise_scale_and_blur_widths_are_as_documented():
    img = _image(channels=2)
    noise = _corrupt(img, "gaussian", 0.1) - img
    for c in range(2):
        lo, hi = np.percentile(img[c], [0.5, 99.5])
        assert noise[c].std() == pytest.approx(0.1 * (hi - lo), rel=0.1)  # per channel: channel 1 is brighter
    assert blur_sigmas(0.2, SPACING, (6, 12, 14)) == pytest.approx((0.8 / 2.5, 0.8 / 0.9, 1.0))  # 1 voxel = 0.8 mm in x
    assert blur_sigmas(0.2, (999.0, 0.5, 0.7), (1, 12, 14)) == pytest.approx((0.0, 1.0, 0.5 / 0.7))  # 2D: no z, finest is y


def test_levels_outside_zero_one_are_refused():
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(UserInputError, match="not in \\[0, 1\\]"):
            _corrupt(_image(), "gaussian", bad)
    with pytest.raises(UserInputError, match="unknown corruption"):
        _corrupt(_image(), "salt", 0.1)


def _geometry(path: Path):
    img = sitk.ReadImage(str(path))
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection(), img.GetNumberOfComponentsPerPixel()


def _same_geometry(a: Path, b: Path) -> bool:
    return all(np.allclose(x, y, rtol=0, atol=1e-6) for x, y in zip(_geometry(a), _geometry(b)))


def _pixel_type(path: Path) -> str:
    return sitk.ReadImage(str(path)).GetPixelIDTypeAsString()


def test_written_copies_keep_names_geometry_and_type_where_values_allow(tmp_path):
    from latdiffunet.imageio.sitk_io import read_images_as_channels

    oblique = make_synthetic_dataset(tmp_path / "raw", "Dataset911_Obl", num_cases=1, num_channels=2,
                                     direction=oblique_direction(30, 20), origin=(-12.5, 40.25, 7.0))
    rgb = make_synthetic_dataset(tmp_path / "raw", "Dataset912_Rgb", num_cases=1, dim=2, rgb=True)
    # an integer NIfTI, as MSD Hippocampus stores its MRI (uint8)
    src = sitk.ReadImage(str(oblique / "imagesTr" / "synth_000_0000.nii.gz"))
    as_uint8 = sitk.Cast(sitk.Clamp(src, lowerBound=0, upperBound=255), sitk.sitkUInt8)
    (tmp_path / "int").mkdir()
    sitk.WriteImage(as_uint8, str(tmp_path / "int" / "synth_000_0000.nii.gz"), True)

    cases = {
        "float nifti, 2 channels": ([oblique / "imagesTr" / f"synth_000_000{c}.nii.gz" for c in (0, 1)], ["32-bit float"] * 2),
        "uint8 nifti": ([tmp_path / "int" / "synth_000_0000.nii.gz"], ["32-bit float"]),  # noise -> float32
        "rgb png": ([rgb / "imagesTr" / "synth_000_0000.png"], ["vector of 8-bit unsigned integer"]),  # png holds integers only
    }
    for what, (files, noisy_types) in cases.items():
        for level in (0.0, 0.3):
            out = tmp_path / f"out_{what.replace(' ', '_')}_{level}"
            written = write_corrupted_case(files, out, "gaussian", level, seed=5, case_id="synth_000")
            assert [p.name for p in written] == [f.name for f in files], what
            for f, w in zip(files, written):
                assert _same_geometry(w, f), what
                assert _pixel_type(w) == (_pixel_type(f) if level == 0 else noisy_types[files.index(f)]), (what, level)
            clean, _ = read_images_as_channels(files)
            got, _ = read_images_as_channels(written)
            expected = corrupt_image(clean, "gaussian", level, spacing_zyx=(1, 1, 1), seed=5, case_id="synth_000")
            if level == 0:
                assert np.array_equal(got, clean), what  # bit-identical
            elif what == "rgb png":
                assert np.array_equal(got, np.clip(np.round(expected), 0, 255)), what
            else:
                assert np.array_equal(got, expected), what
            assert not list(out.glob(".*")), "a temporary file was left behind"


def test_blurred_anisotropic_volume_keeps_geometry_and_differs(tmp_path):
    folder = make_synthetic_dataset(tmp_path / "raw", "Dataset913_Aniso", num_cases=2)
    files = {f"synth_00{i}": [folder / "imagesTr" / f"synth_00{i}_0000.nii.gz"] for i in range(2)}
    out = write_corrupted_cases(files, tmp_path / "blur", "blur", 0.4, seed=0)
    for case, (f,) in files.items():
        assert _same_geometry(out / f.name, f)
        assert not np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f.name))), sitk.GetArrayFromImage(sitk.ReadImage(str(f))))


# --------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------


def _load_script():
    spec = importlib.util.spec_from_file_location("robustness_script", REPO_ROOT / "benchmarks" / "robustness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A 2D PNG dataset, planned (splits_final.json), with an untrained fold 0 of latdiffPlans_tiny."""
    from test_predict import make_untrained_run

    from latdiffunet.experiment_planning.cli import main as plan_main

    root = tmp_path_factory.mktemp("robust")
    with module_folders(root) as env:
        make_synthetic_dataset(env["LATDIFF_RAW"], name="Dataset914_Robust", num_cases=10, dim=2)
        assert plan_main(["-d", "914", "--preset", "tiny", "-np", "1"]) == 0
        make_untrained_run(env["LATDIFF_RESULTS"], env["LATDIFF_PREPROCESSED"], "Dataset914_Robust", "2d", noise_dependent=True)
        yield env


def test_runner_on_a_toy_model_without_nnunet(toy, tmp_path):
    out = tmp_path / "report"
    with module_folders(Path(toy["LATDIFF_RAW"]).parent):
        code = _load_script().main(["-d", "914", "-c", "2d", "-f", "0", "-p", "latdiffPlans_tiny", "--corrupt", "gaussian", "blur",
                                    "--levels", "0.3", "--max-cases", "2", "--skip-nnunet", "--num-samples", "2", "--steps", "1",
                                    "--device", "cpu", "-np", "0", "-o", str(out)])
    assert code == 0
    report = json.loads((out / "robustness.json").read_text())
    splits = json.loads((Path(toy["LATDIFF_PREPROCESSED"]) / "Dataset914_Robust" / "splits_final.json").read_text())
    assert report["cases"] == sorted(splits[0]["val"])[:2] and report["levels"] == [0.0, 0.3]
    rows = report["rows"]
    mean, one = "latdiffunet (mean of 2 samples)", "latdiffunet (one sample)"
    assert [(r["corruption"], r["level"], r["method"]) for r in rows] == [
        (c, lv, m) for c in ("gaussian", "blur") for lv in (0.0, 0.3) for m in (mean, one)]
    for r in rows:
        assert r["num_cases"] == 2 and set(r["dice_per_class"]) == {"1", "2"} and r["seconds"] > 0
        assert r["dice"] is None or 0 <= r["dice"] <= 1 or np.isnan(r["dice"])
    clean = [r for r in rows if r["level"] == 0]
    assert clean[0]["dice"] == clean[2]["dice"] or np.isnan(clean[0]["dice"])  # level 0 predicted once, shared
    assert set(report["verdicts"]) == {"gaussian", "blur"} and "nnU-Net not run" in report["verdicts"]["blur"]["text"]
    for case in report["cases"]:  # corrupted copies in nnU-Net raw layout, predictions with samples
        assert (out / "images" / "gaussian_0.3" / f"{case}_0000.png").is_file()
        assert (out / "latdiffunet" / "blur_0.3" / f"{case}_samples").is_dir()
    assert "## gaussian" in (out / "robustness.md").read_text() and (out / "robustness.png").stat().st_size > 1000


def test_nnunet_boundary_gets_the_corrupted_inputs_and_is_scored(toy, tmp_path, monkeypatch):
    """nnU-Net itself is too slow here: a stand-in predicts the reference at level 0 and an empty
    mask above, so its Dice and retention are known, and the jobs handed to it are checked."""
    from latdiffunet.evaluation import robustness
    from latdiffunet.imageio.sitk_io import read_label, write_segmentation

    name = "Dataset914_Robust"
    model = (Path(toy["LATDIFF_RESULTS"]) / name / "benchmark_2d_fold0_x" / "nnunet_250it" / "nnUNet_results" / name
             / "nnUNetTrainerTimeBudget__nnUNetPlans__2d")
    (model / "fold_0").mkdir(parents=True)
    (model / "plans.json").write_text("{}")
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"")
    labels = Path(toy["LATDIFF_RAW"]) / name / "labelsTr"
    seen = {}

    def fake_nnunet(model_folder, fold, checkpoint, jobs, work, device):
        seen.update(model=model_folder, fold=fold, device=device, jobs=jobs)
        for job in jobs:
            for inputs, output in zip(job["inputs"], job["outputs"]):
                assert Path(inputs[0]).is_file() and (job["tag"] == "clean" or f"images/{job['tag']}/" in inputs[0])
                case = Path(output).name
                ref, geometry = read_label(labels / f"{case}.png")
                write_segmentation(ref if job["tag"] == "clean" else np.zeros_like(ref), geometry, f"{output}.png")
        return {job["tag"]: 1.5 for job in jobs}

    monkeypatch.setattr(robustness, "run_nnunet", fake_nnunet)
    monkeypatch.setattr(robustness, "nnunet_installed", lambda: True)
    with module_folders(Path(toy["LATDIFF_RAW"]).parent):
        report = robustness.run_robustness(robustness.RobustnessConfig(
            dataset="914", fold=0, plans="latdiffPlans_tiny", corruptions=("contrast",), levels=(0.5,), max_cases=2,
            num_samples=1, steps=1, device="cpu", num_processes=0, output=tmp_path / "r"))
    assert seen["model"] == model.resolve() and seen["fold"] == 0 and [j["tag"] for j in seen["jobs"]] == ["clean", "contrast_0.5"]
    nn = [r for r in report["rows"] if r["method"] == robustness.METHOD_NNUNET]
    assert [(r["level"], r["dice"], r["seconds"]) for r in nn] == [(0.0, 1.0, 1.5), (0.5, 0.0, 1.5)]
    assert report["verdicts"]["contrast"]["retention"][robustness.METHOD_NNUNET] == pytest.approx(0.5)


def test_retention_and_verdict_state_numbers():
    from latdiffunet.evaluation.robustness import METHOD_NNUNET, retention, verdicts

    assert retention([0, 0.5, 1.0], [0.8, 0.8, 0.8]) == pytest.approx(1.0)
    assert retention([0.4, 0, 0.2], [0.0, 0.8, 0.4]) == pytest.approx(0.5)  # any order; linear fall to 0 keeps half
    assert np.isnan(retention([0.1, 0.2], [0.5, 0.4])) and np.isnan(retention([0, 0.2], [0.0, 0.0]))
    ours, one = "latdiffunet (mean of 5 samples)", "latdiffunet (one sample)"
    rows = [{"corruption": "gaussian", "level": lv, "method": m, "dice": d} for m, ds in
            ((ours, (0.8, 0.7, 0.6)), (one, (0.8, 0.6, 0.4)), (METHOD_NNUNET, (0.9, 0.6, 0.3))) for lv, d in zip((0, 0.1, 0.2), ds)]
    v = verdicts(rows, [ours, one, METHOD_NNUNET])["gaussian"]
    assert v["retention"][ours] == pytest.approx(0.875) and v["retention"][METHOD_NNUNET] == pytest.approx(2 / 3)
    assert "degrades more gracefully than nnU-Net (+0.208 retention; one sample +0.083)" in v["text"] and "0.875" in v["text"]
    rows = [dict(r, dice=0.9) if r["method"] == METHOD_NNUNET else r for r in rows]  # nnU-Net now loses nothing
    assert "less gracefully than nnU-Net (-0.125 retention" in verdicts(rows, [ours, one, METHOD_NNUNET])["gaussian"]["text"]


def test_finding_nnunet_models(tmp_path):
    from latdiffunet.evaluation.robustness import find_nnunet_model

    def model(root: Path, finished: bool = True) -> Path:
        folder = root / "nnUNet_results" / "Dataset004_H" / "nnUNetTrainerTimeBudget__nnUNetPlans__2d"
        (folder / "fold_0").mkdir(parents=True)
        (folder / "plans.json").write_text("{}")
        if finished:
            (folder / "fold_0" / "checkpoint_final.pth").write_bytes(b"")
        return folder

    bench = tmp_path / "benchmark_2d_fold0"
    first = model(bench / "nnunet_250it")
    for where in (bench, bench / "nnunet_250it", first):  # the benchmark, its nnU-Net folder or the model itself
        assert find_nnunet_model("Dataset004_H", "2d", 0, [where]) == first.resolve()
    with pytest.raises(UserInputError, match="no trained nnU-Net model"):
        find_nnunet_model("Dataset004_H", "3d", 0, [bench])  # 3d_fullres not trained
    model(bench / "nnunet_250it_0.16GB", finished=False)
    with pytest.raises(UserInputError, match="several nnU-Net models") as err:
        find_nnunet_model("Dataset004_H", "2d", 0, [bench])
    assert "--nnunet-dir" in str(err.value)
    with pytest.raises(UserInputError, match="still training"):
        find_nnunet_model("Dataset004_H", "2d", 0, [bench / "nnunet_250it_0.16GB"])


def test_nnunet_child_finds_the_benchmarks_budget_trainer():
    from latdiffunet.evaluation.nnunet_predict import trainer_lookup

    class FakeTrainer:
        pass

    asked = []
    find = trainer_lookup(lambda name: asked.append(name) or "found by nnU-Net", FakeTrainer)
    budget = find("nnUNetTrainerTimeBudget")
    assert issubclass(budget, FakeTrainer) and asked == []
    assert find("nnUNetTrainer") == "found by nnU-Net" and asked == ["nnUNetTrainer"]
