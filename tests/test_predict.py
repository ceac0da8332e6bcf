"""latdiff_predict: outputs in the input's exact geometry, uncertainty maps, shards, restarts.

Geometry does not depend on what the model learned, so these tests use freshly initialised
weights: fast, and still a real end-to-end run of preprocessing, sliding-window sampling,
resampling back, un-cropping and writing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from synthetic import make_synthetic_dataset, oblique_direction

from latdiffunet.experiment_planning.cli import main as plan_main
from latdiffunet.inference.cli import main as predict_main
from latdiffunet.inference.predict_folder import predict_folder
from latdiffunet.inference.predictor import LatentDiffusionPredictor, PredictionSettings
from latdiffunet.networks import build_model
from latdiffunet.utilities.checkpoint import save_checkpoint

RUN = "LatentDiffusionTrainer__latdiffPlans_tiny__{}"


def make_untrained_run(results: Path, preprocessed: Path, dataset: str, configuration: str, folds=(0,),
                       noise_dependent: bool = False) -> Path:
    """A results folder laid out like latdiff_train's, holding untrained weights.

    The untrained denoiser's output layer is zero-initialised, so its x0-estimate is 0 whatever the
    noise and every sample (every seed) is the same mask. ``noise_dependent`` gives that layer
    random weights, so samples depend on the starting noise and the image as a trained model's do:
    tests of seeds, sample spread and mutual information need it.
    """
    plans = json.loads((preprocessed / dataset / "latdiffPlans_tiny.json").read_text())
    run = results / dataset / RUN.format(configuration)
    run.mkdir(parents=True, exist_ok=True)
    shutil.copy(preprocessed / dataset / "latdiffPlans_tiny.json", run / "plans.json")
    shutil.copy(preprocessed / dataset / "dataset.json", run / "dataset.json")
    cfg = plans["configurations"][configuration]
    for fold in folds:
        torch.manual_seed(fold)
        model = build_model(cfg["network"])
        if noise_dependent:
            torch.nn.init.normal_(model.denoiser.out[-1].weight, std=0.5)
        save_checkpoint({"network": cfg["network"], "diffusion": cfg["diffusion"], "ema": model.state_dict()},
                        run / f"fold_{fold}" / "checkpoint_final.pth")
    return run


@pytest.fixture(scope="module")
def oblique_3d(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict3d")
    env = {k: root / k for k in ("raw", "pre", "res")}
    mp = pytest.MonkeyPatch()
    for key, var in (("raw", "LATDIFF_RAW"), ("pre", "LATDIFF_PREPROCESSED"), ("res", "LATDIFF_RESULTS")):
        mp.setenv(var, str(env[key]))
    make_synthetic_dataset(
        env["raw"], name="Dataset902_Oblique", num_cases=5, direction=oblique_direction(30, 20),
        origin=(-12.5, 40.25, 7.0), spacing=(0.8, 0.9, 2.5),
    )
    assert plan_main(["-d", "902", "--preset", "tiny", "-np", "1"]) == 0
    make_untrained_run(env["res"], env["pre"], "Dataset902_Oblique", "3d", folds=(0, 1), noise_dependent=True)
    yield env
    mp.undo()


def _geometry(path: Path):
    img = sitk.ReadImage(str(path))
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def test_outputs_keep_exact_input_geometry(oblique_3d, tmp_path):
    out = tmp_path / "pred"
    images = oblique_3d["raw"] / "Dataset902_Oblique" / "imagesTr"
    code = predict_main(["-i", str(images), "-o", str(out), "-d", "902", "-p", "latdiffPlans_tiny", "-c", "3d",
                         "--num_samples", "2", "--steps", "2", "--save_samples", "--save_probabilities", "--device", "cpu", "-np", "1"])
    assert code == 0
    for image in sorted(images.glob("*_0000.nii.gz")):
        case = image.name[: -len("_0000.nii.gz")]
        reference = _geometry(image)
        assert reference[3] != (1, 0, 0, 0, 1, 0, 0, 0, 1)  # the test data really is oblique
        for name in (f"{case}.nii.gz", f"{case}_uncertainty.nii.gz", f"{case}_entropy.nii.gz", f"{case}_mutual_information.nii.gz",
                     f"{case}_agreement.nii.gz", f"{case}_samples/sample_00.nii.gz", f"{case}_samples/sample_03.nii.gz"):
            size, spacing, origin, direction = _geometry(out / name)
            assert size == reference[0], name
            np.testing.assert_allclose(spacing, reference[1], atol=1e-6)
            np.testing.assert_allclose(origin, reference[2], atol=1e-6)
            np.testing.assert_allclose(direction, reference[3], atol=1e-6)
        entropy = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}_entropy.nii.gz")))
        agreement = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}_agreement.nii.gz")))
        mi = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}_mutual_information.nii.gz")))
        assert entropy.min() >= 0 and entropy.max() <= np.log(3) + 1e-4
        assert agreement.min() >= 0 and agreement.max() <= 1
        assert np.all(mi <= entropy + 1e-5) and mi.max() > 1e-3  # samples disagree somewhere
        uncertainty = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}_uncertainty.nii.gz")))
        # the head's entropy plus the disagreement: never below the disagreement, and not the entropy
        assert np.all(uncertainty >= mi - 1e-5) and uncertainty.max() <= 2 * np.log(3) + 1e-4
        assert np.abs(uncertainty - entropy).max() > 1e-3, "the uncertainty map is the samples' entropy: no head used"
        with np.load(out / f"{case}_probabilities.npz", allow_pickle=False) as f:
            probs = f["probabilities"].astype(np.float32)
        assert probs.shape == (3,) + entropy.shape
        np.testing.assert_allclose(probs.sum(0), 1, atol=2e-2)
    info = json.loads((out / "prediction_info.json").read_text())
    assert len(info["checkpoints"]) == 2  # both folds ensembled


def test_restart_skips_finished_cases_and_shards_cover_everything(oblique_3d, tmp_path):
    run = oblique_3d["res"] / "Dataset902_Oblique" / RUN.format("3d")
    predictor = LatentDiffusionPredictor(run, ["0"], torch.device("cpu"))
    settings = PredictionSettings(num_samples=1, steps=1)
    images = oblique_3d["raw"] / "Dataset902_Oblique" / "imagesTr"
    out = tmp_path / "sharded"
    first = predict_folder(images, out, predictor, settings, num_parts=2, part_id=0, num_processes=0)
    second = predict_folder(images, out, predictor, settings, num_parts=2, part_id=1, num_processes=0)
    assert not set(first) & set(second) and len(first) + len(second) == 5
    assert len(list(out.glob("synth_*[0-9].nii.gz"))) == 5
    (out / f"{first[0]}.nii.gz").unlink()  # as if killed before the last write
    redone = predict_folder(images, out, predictor, settings, num_processes=0)
    assert redone == [first[0]]
    assert len(predict_folder(images, out, predictor, settings, overwrite=True, num_processes=0)) == 5


def test_same_seed_same_prediction(oblique_3d):
    """Same seed, same samples; another seed, other samples. The fixture's denoiser depends on its
    noise (an untrained one outputs 0, so every seed would give the same masks and the first
    check could not fail for a sampler that ignores the seed)."""
    run = oblique_3d["res"] / "Dataset902_Oblique" / RUN.format("3d")
    predictor = LatentDiffusionPredictor(run, ["0"], torch.device("cpu"))
    images = oblique_3d["raw"] / "Dataset902_Oblique" / "imagesTr"
    from latdiffunet.imageio.sitk_io import read_images_as_channels

    data, geometry = read_images_as_channels([images / "synth_000_0000.nii.gz"])
    pre, _ = predictor.preprocess(data, geometry)
    a = predictor.sample_probabilities(pre, PredictionSettings(num_samples=3, steps=2, seed=7))
    b = predictor.sample_probabilities(pre, PredictionSettings(num_samples=3, steps=2, seed=7))
    c = predictor.sample_probabilities(pre, PredictionSettings(num_samples=3, steps=2, seed=8))
    assert a.shape[0] == 3 and np.array_equal(a, b)
    # the model's samples depend on the noise: another seed, other samples; within a seed they differ too
    assert np.abs(a - c).max() > 1e-2 and np.abs(a[0] - a[1]).max() > 1e-2


def test_each_case_has_its_own_noise_whatever_the_order(oblique_3d, tmp_path):
    """Two cases with the same image get different samples (the noise is seeded by case id, so a
    1-sample prediction of a dataset is not one noise draw repeated), and a case predicted alone
    gets exactly the samples it gets inside a folder."""
    run = oblique_3d["res"] / "Dataset902_Oblique" / RUN.format("3d")
    predictor = LatentDiffusionPredictor(run, ["0"], torch.device("cpu"))
    images = oblique_3d["raw"] / "Dataset902_Oblique" / "imagesTr"
    from latdiffunet.imageio.sitk_io import read_images_as_channels

    data, geometry = read_images_as_channels([images / "synth_000_0000.nii.gz"])
    pre, _ = predictor.preprocess(data, geometry)
    settings = PredictionSettings(num_samples=2, steps=2, seed=7)
    a = predictor.sample_probabilities(pre, settings, case_id="synth_000")
    twin = predictor.sample_probabilities(pre, settings, case_id="synth_000_copy")
    assert np.array_equal(a, predictor.sample_probabilities(pre, settings, case_id="synth_000"))
    assert np.abs(a - twin).max() > 1e-2

    saving = PredictionSettings(num_samples=2, steps=2, seed=7, save_samples=True)
    predict_folder(images, tmp_path / "all", predictor, saving, num_processes=0)
    predict_folder(images, tmp_path / "one", predictor, saving, num_processes=0, case_ids=["synth_003"])
    for k in range(2):
        together = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "all" / "synth_003_samples" / f"sample_0{k}.nii.gz")))
        alone = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "one" / "synth_003_samples" / f"sample_0{k}.nii.gz")))
        assert np.array_equal(together, alone)


def test_wrong_channel_count_names_the_file(oblique_3d, tmp_path, capsys):
    bad = tmp_path / "bad_in"
    bad.mkdir()
    src = oblique_3d["raw"] / "Dataset902_Oblique" / "imagesTr" / "synth_000_0000.nii.gz"
    shutil.copy(src, bad / "caseA_0000.nii.gz")
    shutil.copy(src, bad / "caseA_0001.nii.gz")
    code = predict_main(["-i", str(bad), "-o", str(tmp_path / "o"), "-d", "902", "-p", "latdiffPlans_tiny", "-c", "3d", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "caseA" in err and "Traceback" not in err


def test_2d_rgb_png_round_trip_with_overlay(tmp_path, monkeypatch):
    for key, var in (("raw", "LATDIFF_RAW"), ("pre", "LATDIFF_PREPROCESSED"), ("res", "LATDIFF_RESULTS")):
        monkeypatch.setenv(var, str(tmp_path / key))
    make_synthetic_dataset(tmp_path / "raw", name="Dataset903_Rgb", num_cases=5, dim=2, rgb=True)
    assert plan_main(["-d", "903", "--preset", "tiny", "-np", "1"]) == 0
    make_untrained_run(tmp_path / "res", tmp_path / "pre", "Dataset903_Rgb", "2d")
    images = tmp_path / "raw" / "Dataset903_Rgb" / "imagesTr"
    out = tmp_path / "pred"
    assert predict_main(["-i", str(images), "-o", str(out), "-d", "903", "-p", "latdiffPlans_tiny", "--num_samples", "2",
                         "--steps", "1", "--device", "cpu", "-np", "0"]) == 0
    for image in images.glob("*_0000.png"):
        case = image.name[: -len("_0000.png")]
        seg = sitk.ReadImage(str(out / f"{case}.png"))
        src = sitk.ReadImage(str(image))
        assert seg.GetSize() == src.GetSize() and seg.GetNumberOfComponentsPerPixel() == 1
        assert (out / f"{case}_overlay.png").stat().st_size > 1000
        assert sitk.ReadImage(str(out / f"{case}_entropy.nii.gz")).GetSize() == src.GetSize()


def test_cases_sampled_before_a_crash_are_still_written(oblique_3d, tmp_path, monkeypatch):
    """A crash (a bug, Ctrl-C) at one case never cancels the pending exports of the cases before it."""
    run = oblique_3d["res"] / "Dataset902_Oblique" / RUN.format("3d")
    predictor = LatentDiffusionPredictor(run, ["0"], torch.device("cpu"))
    sample, calls = predictor.sample_and_image_probabilities, []

    def crash_at_third_case(data, settings, **kwargs):
        calls.append(len(calls))
        if len(calls) == 3:
            raise RuntimeError("crash at the third case")
        return sample(data, settings, **kwargs)

    monkeypatch.setattr(predictor, "sample_and_image_probabilities", crash_at_third_case)
    out = tmp_path / "pred"
    with pytest.raises(RuntimeError, match="third case"):
        predict_folder(oblique_3d["raw"] / "Dataset902_Oblique" / "imagesTr", out, predictor, PredictionSettings(1, 1),
                       num_processes=2)
    assert sorted(p.name for p in out.glob("synth_*[0-9].nii.gz")) == ["synth_000.nii.gz", "synth_001.nii.gz"]


def test_workers_are_spawned_once_cuda_is_initialised(oblique_3d, tmp_path, monkeypatch):
    """A worker forked from a process holding a CUDA context can die or hang; spawned ones cannot."""
    import latdiffunet.inference.predict_folder as predict_folder_module
    from latdiffunet.utilities import parallel

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # as after predicting on a GPU
    chosen = []

    def recording_context():
        chosen.append(parallel.worker_context())
        return chosen[-1]

    monkeypatch.setattr(predict_folder_module, "worker_context", recording_context)
    run = oblique_3d["res"] / "Dataset902_Oblique" / RUN.format("3d")
    predictor = LatentDiffusionPredictor(run, ["0"], torch.device("cpu"))
    out = tmp_path / "pred"
    predicted = predict_folder(oblique_3d["raw"] / "Dataset902_Oblique" / "imagesTr", out, predictor, PredictionSettings(1, 1),
                               num_processes=1, case_ids=["synth_000", "synth_001"])
    assert [c.get_start_method() for c in chosen] == ["spawn"]
    assert predicted == ["synth_000", "synth_001"] and (out / "synth_001.nii.gz").is_file()


def test_each_fold_samples_with_its_own_diffusion_settings(oblique_3d, tmp_path, monkeypatch):
    """Folds ensembled together keep their own calibrated temperature (and variant settings): a
    predictor that kept one fold's ``diffusion`` for all would sample fold 0 at fold 1's scale."""
    import latdiffunet.inference.predictor as predictor_module
    from latdiffunet.utilities.checkpoint import load_checkpoint

    source = oblique_3d["res"] / "Dataset902_Oblique" / RUN.format("3d")
    run = tmp_path / RUN.format("3d")
    shutil.copytree(source, run)
    for fold, scale in (("0", 0.25), ("1", 0.75)):
        path = run / f"fold_{fold}" / "checkpoint_final.pth"
        state = load_checkpoint(path, torch.device("cpu"))
        state["diffusion"] = state["diffusion"] | {"noise_scale": scale}
        save_checkpoint(state, path)
    seen = []
    real = predictor_module.DiffusionWindowPredictor

    class Recording(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.noise_scale)

    monkeypatch.setattr(predictor_module, "DiffusionWindowPredictor", Recording)
    predictor = LatentDiffusionPredictor(run, ["0", "1"], torch.device("cpu"))
    pre = np.zeros((1, 4, 6, 5), dtype=np.float32)
    predictor.sample_probabilities(pre, PredictionSettings(num_samples=1, steps=1, seed=0))
    assert seen == [0.25, 0.75]
    seen.clear()
    predictor.sample_probabilities(pre, PredictionSettings(num_samples=1, steps=1, seed=0, noise_scale=1.0))
    assert seen == [1.0, 1.0]  # --noise_scale overrides every fold
