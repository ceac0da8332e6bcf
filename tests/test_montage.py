"""CASE_montage.png (``latdiff_predict --save_montage``): panel layout, atomic writing, wiring into predict_folder."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from test_predict import RUN, oblique_3d  # noqa: F401  (module fixture: a planned tiny 3D dataset with untrained folds)

from latdiffunet.errors import UserInputError
from latdiffunet.inference import montage, predict_folder as predict_folder_module
from latdiffunet.inference.cli import build_parser
from latdiffunet.inference.montage import DPI, PANEL_INCHES, write_montage
from latdiffunet.inference.predict_folder import predict_folder
from latdiffunet.inference.predictor import LatentDiffusionPredictor, PredictionSettings

PANEL_PX = round(PANEL_INCHES * DPI)


def _labels(shape: tuple[int, ...], shift: int = 0) -> np.ndarray:
    seg = np.zeros(shape, np.int16)
    seg[..., 4:12, 6 + shift:16 + shift] = 1
    seg[..., 14:18, 20:26] = 2
    return seg


def _png_shape(path: Path) -> tuple[int, int]:
    pixels = mpimg.imread(path)  # fails on anything but a valid PNG
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    assert pixels[..., :3].std() > 0.05  # something was drawn
    return pixels.shape[:2]


def test_2d_grey_and_rgb_layout(tmp_path):
    rng = np.random.default_rng(0)
    shape = (24, 32)
    seg = _labels(shape)
    samples = [_labels(shape, s) for s in range(3)]
    raters = [_labels(shape, 1), _labels(shape, -1)]
    # image, 2 raters, mean, entropy, 3 samples
    out = tmp_path / "grey_montage.png"
    assert write_montage(rng.normal(size=(1, 1) + shape), seg, rng.random(shape), samples, out, raters=raters) == (1, 8)
    assert _png_shape(out) == (PANEL_PX, 8 * PANEL_PX)
    rgb = rng.integers(0, 256, size=(3,) + shape).astype(np.float32)  # (C, Y, X) of a photograph
    out = tmp_path / "rgb_montage.png"
    assert write_montage(rgb, seg[None], rng.random((1,) + shape), np.stack(samples)[:, None], out) == (1, 6)
    assert _png_shape(out) == (PANEL_PX, 6 * PANEL_PX)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey_montage.png", "rgb_montage.png"]  # no temporary left


def test_3d_three_planes_and_at_most_eight_samples(tmp_path):
    rng = np.random.default_rng(1)
    shape = (10, 24, 32)
    seg = _labels(shape)
    samples = np.stack([_labels(shape, s % 3) for s in range(11)])
    out = tmp_path / "vol_montage.png"
    rows, cols = write_montage(rng.normal(size=(2,) + shape), seg, rng.random(shape), samples, out,
                               raters=[seg, _labels(shape, 2)], spacing=(2.5, 0.8, 0.8))
    assert (rows, cols) == (3, 1 + 2 + 1 + 1 + 8)  # axial, coronal, sagittal; samples cut at 8
    assert _png_shape(out) == (3 * PANEL_PX, 13 * PANEL_PX)


def test_planes_cross_the_foreground():
    seg = np.zeros((10, 20, 30), np.int16)
    seg[7:9, 2:4, 25:29] = 1
    assert montage._plane_centre(seg) == (8, 2, 26)  # centroid (7.5, 2.5, 26.5) rounded half to even
    assert montage._plane_centre(np.zeros((10, 20, 30), np.int16)) == (5, 10, 15)


def test_bad_shapes_and_failed_writes_leave_the_old_file(tmp_path, monkeypatch):
    shape = (6, 8)
    seg = _labels((6, 8))
    out = tmp_path / "case_montage.png"
    out.write_bytes(b"old")
    with pytest.raises(ValueError, match=r"samples\[1\]"):
        write_montage(np.zeros(shape), seg, np.zeros(shape), [seg, np.zeros((6, 9))], out)
    with pytest.raises(ValueError, match="image"):
        write_montage(np.zeros((5, 8)), seg, np.zeros(shape), [seg], out)

    def broken_savefig(self, fname, *args, **kwargs):  # dies half-way through the file
        Path(fname).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        write_montage(np.zeros(shape), seg, np.zeros(shape), [seg], out)
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["case_montage.png"]


def test_cli_flag():
    args = build_parser().parse_args(["-i", "in", "-o", "out", "-d", "1", "--save_montage"])
    assert args.save_montage is True
    assert build_parser().parse_args(["-i", "in", "-o", "out", "-d", "1"]).save_montage is False


def test_predict_folder_writes_montage_before_the_segmentation(oblique_3d, tmp_path, monkeypatch):  # noqa: F811
    dataset = oblique_3d["raw"] / "Dataset902_Oblique"
    predictor = LatentDiffusionPredictor(oblique_3d["res"] / "Dataset902_Oblique" / RUN.format("3d"), ["0"], torch.device("cpu"))
    case, out = "synth_000", tmp_path / "pred"
    raters = [dataset / "labelsTr" / "synth_000.nii.gz", dataset / "labelsTr" / "synth_001.nii.gz"]

    written = []
    real_write = predict_folder_module.write_segmentation

    def recording_write(seg, geometry, target):
        if Path(target) == out / f"{case}.nii.gz":  # the last file of the case: the montage must be there
            written.append((out / f"{case}_montage.png").is_file())
        real_write(seg, geometry, target)

    monkeypatch.setattr(predict_folder_module, "write_segmentation", recording_write)
    settings = PredictionSettings(num_samples=3, steps=1, save_montage=True)  # samples not saved, still drawn
    assert predict_folder(dataset / "imagesTr", out, predictor, settings, num_processes=0, case_ids=[case],
                          rater_label_files={case: raters}) == [case]
    assert written == [True]
    assert not (out / f"{case}_samples").exists()
    # 3D: three planes of image, 2 raters, mean, entropy, 3 samples
    assert _png_shape(out / f"{case}_montage.png") == (3 * PANEL_PX, 8 * PANEL_PX)

    bad = tmp_path / "bad_rater.nii.gz"
    sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkUInt8), str(bad))
    with pytest.raises(UserInputError, match="geometry"):
        predict_folder(dataset / "imagesTr", out, predictor, settings, num_processes=0, case_ids=[case], overwrite=True,
                       rater_label_files={case: [bad]})
