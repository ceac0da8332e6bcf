"""Stage 1 on the real MSD Hippocampus data: convert, verify, fingerprint, plan, preprocess.

Also guards the reference plans in ``plans/reference``: if the planner's output for the real data
changes, this test fails until the references are regenerated *on purpose* with
``LATDIFF_UPDATE_REFERENCE_PLANS=1 pytest tests/test_hippocampus_end_to_end.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import assert_reference_plans, load_converter, module_folders, shared_dataset

pytestmark = [pytest.mark.slow, pytest.mark.realdata]
DATASET = "Dataset004_Hippocampus"
VOLATILE_KEYS = {"generated_by"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    source = shared_dataset("Hippocampus")
    with module_folders(tmp_path_factory.mktemp("hippo")) as env:
        load_converter("convert_hippocampus").convert(source, env["LATDIFF_RAW"])
        from latdiffunet.experiment_planning.cli import main

        # explicit target and preset: the references must not depend on whether this machine has a GPU
        for sizing in (["--target", "gpu"], ["--preset", "tiny"]):
            assert main(["-d", "4", "--verify_dataset_integrity", *sizing, "-np", "2"]) == 0
        yield env


def test_outputs_exist_and_are_consistent(prepared):
    out = prepared["LATDIFF_PREPROCESSED"] / DATASET
    fp = json.loads((out / "dataset_fingerprint.json").read_text())
    assert fp["num_cases"] == 220 and fp["num_channels"] == 1
    assert set(fp["object_sizes_per_class"]) == {"1", "2"}
    splits = json.loads((out / "splits_final.json").read_text())
    assert len(splits) == 5 and sum(len(s["val"]) for s in splits) == 220
    plans = json.loads((out / "latdiffPlans.json").read_text())
    assert set(plans["configurations"]) == {"2d", "3d"}
    for cfg in plans["configurations"].values():
        folder = out / cfg["data_identifier"]
        assert len(list(folder.glob("*.npz"))) == 220 and len(list(folder.glob("*.json"))) == 220
    props = json.loads((out / "latdiffPlans_3d" / "hippocampus_001.json").read_text())
    with np.load(out / "latdiffPlans_3d" / "hippocampus_001.npz", allow_pickle=False) as f:
        data, seg = f["data"], f["seg"]
        assert data.shape[1:] == seg.shape == tuple(props["shape_after_resampling"])
        assert abs(float(data.mean())) < 0.2 and set(np.unique(seg)) <= {0, 1, 2}
        assert len(f["locations_1"]) > 0 and np.all(seg[tuple(f["locations_1"].T)] == 1)


@pytest.mark.parametrize("plans_name", ["latdiffPlans", "latdiffPlans_tiny"])
def test_reference_plans_unchanged(prepared, plans_name):
    produced = json.loads((prepared["LATDIFF_PREPROCESSED"] / DATASET / f"{plans_name}.json").read_text())
    assert_reference_plans(produced, DATASET, plans_name, tuple(VOLATILE_KEYS))


def test_predictions_match_input_geometry_on_real_validation_cases(prepared, tmp_path):
    """Geometry does not depend on training: untrained tiny weights, real images, fold-0 val cases."""
    import SimpleITK as sitk
    import torch

    from latdiffunet.inference.predict_folder import predict_folder
    from latdiffunet.inference.predictor import LatentDiffusionPredictor, PredictionSettings
    from test_predict import make_untrained_run

    pre, res, raw = prepared["LATDIFF_PREPROCESSED"], prepared["LATDIFF_RESULTS"], prepared["LATDIFF_RAW"]
    run = make_untrained_run(res, pre, DATASET, "3d")
    val = json.loads((pre / DATASET / "splits_final.json").read_text())[0]["val"][:4]
    predictor = LatentDiffusionPredictor(run, ["0"], torch.device("cpu"))
    out = tmp_path / "pred"
    predict_folder(raw / DATASET / "imagesTr", out, predictor, PredictionSettings(num_samples=2, steps=1), num_processes=0, case_ids=val)
    for case in val:
        src = sitk.ReadImage(str(raw / DATASET / "imagesTr" / f"{case}_0000.nii.gz"))
        for name in (f"{case}.nii.gz", f"{case}_entropy.nii.gz"):
            img = sitk.ReadImage(str(out / name))
            assert img.GetSize() == src.GetSize()
            assert img.GetSpacing() == src.GetSpacing() and img.GetOrigin() == src.GetOrigin()
            assert img.GetDirection() == src.GetDirection()
