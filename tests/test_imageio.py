"""Image reading/writing keeps geometry exactly and turns every bad file into a UserInputError."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import SimpleITK as sitk

import latdiffunet.imageio.sitk_io as sitk_io
from latdiffunet.errors import UserInputError
from latdiffunet.imageio.sitk_io import (
    ImageGeometry,
    read_image,
    read_images_as_channels,
    read_label,
    write_image,
    write_segmentation,
)


def _oblique() -> tuple[float, ...]:
    """Rotation about z by 30 deg, then about x by 20 deg (row-major, SimpleITK order)."""
    a, b = math.radians(30), math.radians(20)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return tuple(float(v) for v in (rx @ rz).ravel())


# values exactly representable in float32, since NIfTI stores spacing and origin as float32
GEOMETRY_3D = ImageGeometry(
    size=(7, 6, 5), spacing=(0.75, 1.25, 3.5), origin=(-120.5, 33.25, 7.125), direction=_oblique()
)


def _assert_geometry_equal(a: ImageGeometry, b: ImageGeometry) -> None:
    assert a.size == b.size
    for field in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=0, atol=1e-6, err_msg=field)


def _no_temp_files(folder) -> None:
    leftovers = [n for n in os.listdir(folder) if n.startswith(".") or ".tmp" in n]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def test_oblique_direction_is_not_trivial():
    direction = np.asarray(GEOMETRY_3D.direction).reshape(3, 3)
    assert not np.allclose(direction, np.eye(3))
    np.testing.assert_allclose(direction @ direction.T, np.eye(3), atol=1e-12)


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd", ".mha"])
def test_3d_round_trip_keeps_geometry_and_values(tmp_path, ending):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 5, 6, 7)).astype(np.float32)
    seg = rng.integers(0, 4, size=(5, 6, 7)).astype(np.int16)

    write_image(image, GEOMETRY_3D, tmp_path / f"image{ending}")
    write_image(image[0], GEOMETRY_3D, tmp_path / f"image_zyx{ending}")  # (Z, Y, X) accepted too
    write_segmentation(seg, GEOMETRY_3D, tmp_path / f"seg{ending}")

    for name in (f"image{ending}", f"image_zyx{ending}"):
        arr, geometry = read_image(tmp_path / name)
        assert arr.shape == (1, 5, 6, 7) and arr.dtype == np.float32
        np.testing.assert_array_equal(arr, image)
        _assert_geometry_equal(geometry, GEOMETRY_3D)
        assert geometry.spacing_zyx == (3.5, 1.25, 0.75)
        assert geometry.shape_zyx == (5, 6, 7)

    labels, geometry = read_label(tmp_path / f"seg{ending}")
    assert labels.dtype == np.int16 and labels.shape == (5, 6, 7)
    np.testing.assert_array_equal(labels, seg)
    _assert_geometry_equal(geometry, GEOMETRY_3D)

    # geometry read back can be written again unchanged (output overlays input in a viewer)
    write_segmentation(labels, geometry, tmp_path / f"seg_again{ending}")
    _, geometry_again = read_label(tmp_path / f"seg_again{ending}")
    _assert_geometry_equal(geometry_again, GEOMETRY_3D)
    _no_temp_files(tmp_path)


def test_large_label_values_survive(tmp_path):
    seg = np.zeros((5, 6, 7), np.int16)
    seg[0, 0, 0] = 300  # does not fit uint8
    write_segmentation(seg, GEOMETRY_3D, tmp_path / "seg.nii.gz")
    labels, _ = read_label(tmp_path / "seg.nii.gz")
    assert labels[0, 0, 0] == 300 and labels.sum() == 300


def _geometry_2d(h: int, w: int) -> ImageGeometry:
    return ImageGeometry(size=(w, h), spacing=(1.0, 1.0), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0))


def test_png_grayscale_round_trip(tmp_path):
    h, w = 9, 13
    image = np.random.default_rng(1).integers(0, 256, size=(1, h, w)).astype(np.uint8)
    write_image(image, _geometry_2d(h, w), tmp_path / "gray.png")
    arr, geometry = read_image(tmp_path / "gray.png")
    assert arr.shape == (1, 1, h, w)
    np.testing.assert_array_equal(arr[0], image)
    assert geometry.dimension == 2 and geometry.size == (w, h)
    assert geometry.shape_zyx == (1, h, w)
    assert geometry.spacing_zyx[0] == sitk_io.SPACING_2D_PLACEHOLDER

    seg = (image[0] > 128).astype(np.int16)[None]
    write_segmentation(seg, geometry, tmp_path / "seg.png")
    labels, _ = read_label(tmp_path / "seg.png")
    assert labels.shape == (1, h, w)
    np.testing.assert_array_equal(labels, seg)
    _no_temp_files(tmp_path)


def test_png_rgb_gives_three_channels(tmp_path):
    h, w = 8, 11
    rgb = np.random.default_rng(2).integers(0, 256, size=(3, 1, h, w)).astype(np.uint8)
    write_image(rgb, _geometry_2d(h, w), tmp_path / "rgb.png")
    written = sitk.ReadImage(str(tmp_path / "rgb.png"))
    assert written.GetNumberOfComponentsPerPixel() == 3 and written.GetSize() == (w, h)

    arr, geometry = read_image(tmp_path / "rgb.png")
    assert arr.shape == (3, 1, h, w)
    np.testing.assert_array_equal(arr, rgb)
    assert geometry.dimension == 2

    with pytest.raises(UserInputError, match="3 components") as info:
        read_label(tmp_path / "rgb.png")
    assert "rgb.png" in str(info.value)


def test_png_refuses_float_and_3d_volumes(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_image(np.zeros((1, 4, 4), np.float32), _geometry_2d(4, 4), tmp_path / "f.png")
    with pytest.raises(ValueError, match="255"):
        write_segmentation(np.full((1, 4, 4), 300, np.int16), _geometry_2d(4, 4), tmp_path / "s.png")
    # a 5-slice volume would silently lose 4 slices in a PNG
    with pytest.raises(ValueError, match="slice"):
        write_segmentation(np.ones((5, 6, 7), np.int16), GEOMETRY_3D, tmp_path / "vol.png")
    assert os.listdir(tmp_path) == []


def test_read_images_as_channels_stacks_matching_channels(tmp_path):
    a = np.full((1, 5, 6, 7), 1.0, np.float32)
    b = np.full((1, 5, 6, 7), 2.0, np.float32)
    write_image(a, GEOMETRY_3D, tmp_path / "case_0000.nii.gz")
    write_image(b, GEOMETRY_3D, tmp_path / "case_0001.nii.gz")
    arr, geometry = read_images_as_channels([tmp_path / "case_0000.nii.gz", tmp_path / "case_0001.nii.gz"])
    assert arr.shape == (2, 5, 6, 7)
    assert arr[0].max() == 1 and arr[1].min() == 2
    _assert_geometry_equal(geometry, GEOMETRY_3D)


@pytest.mark.parametrize(
    "change",
    [
        {"spacing": (0.75, 1.25, 2.0)},
        {"origin": (-120.5, 33.25, 9.0)},
        {"direction": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)},
    ],
)
def test_read_images_as_channels_refuses_different_geometry(tmp_path, change):
    first = tmp_path / "case_0000.nii.gz"
    second = tmp_path / "case_0001.nii.gz"
    arr = np.zeros((1, 5, 6, 7), np.float32)
    write_image(arr, GEOMETRY_3D, first)
    other = ImageGeometry.from_dict(GEOMETRY_3D.to_dict() | {k: list(v) for k, v in change.items()})
    write_image(arr, other, second)
    with pytest.raises(UserInputError) as info:
        read_images_as_channels([first, second])
    message = str(info.value)
    assert info.value.path == str(second)
    assert "case_0001.nii.gz" in message and "case_0000.nii.gz" in message
    assert next(iter(change)) in message


def test_read_images_as_channels_refuses_different_shape(tmp_path):
    write_image(np.zeros((1, 5, 6, 7), np.float32), GEOMETRY_3D, tmp_path / "c_0000.mha")
    smaller = ImageGeometry.from_dict(GEOMETRY_3D.to_dict() | {"size": [7, 6, 4]})
    write_image(np.zeros((1, 4, 6, 7), np.float32), smaller, tmp_path / "c_0001.mha")
    with pytest.raises(UserInputError, match="shape") as info:
        read_images_as_channels([tmp_path / "c_0000.mha", tmp_path / "c_0001.mha"])
    assert "c_0001.mha" in str(info.value)


def test_4d_image_refused(tmp_path):
    path = tmp_path / "series.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.float32), isVector=False), str(path))
    assert sitk.ReadImage(str(path)).GetDimension() == 4
    with pytest.raises(UserInputError, match="4 dimensions") as info:
        read_image(path)
    assert "series.nii.gz" in str(info.value)
    with pytest.raises(UserInputError, match="4 dimensions"):
        read_label(path)


def test_truncated_nifti_refused(tmp_path):
    path = tmp_path / "cut.nii.gz"
    image = np.random.default_rng(3).normal(size=(1, 5, 6, 7)).astype(np.float32)
    write_image(image, GEOMETRY_3D, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError) as info:
        read_image(path)
    assert "cut.nii.gz" in str(info.value) and info.value.path == str(path)
    assert "truncated" in str(info.value)


def test_truncated_uncompressed_nifti_refused(tmp_path):
    path = tmp_path / "cut.nii"
    write_image(np.ones((1, 5, 6, 7), np.float32), GEOMETRY_3D, path)
    path.write_bytes(path.read_bytes()[:-20])  # only the last few voxels missing
    with pytest.raises(UserInputError, match="truncated") as info:
        read_image(path)
    assert "cut.nii" in str(info.value)


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_and_inf_in_nifti_refused_although_the_reader_hides_them(tmp_path, monkeypatch, ending, dtype):
    monkeypatch.setattr(sitk_io, "_SCAN_CHUNK_BYTES", 64)  # many chunks: a value on a chunk border counts once
    image = np.random.default_rng(5).normal(size=(1, 5, 6, 7)).astype(dtype)
    image[0, 0, 0, 0], image[0, 1, 2, 3], image[0, 4, 5, 6] = -np.inf, np.nan, np.inf
    path = tmp_path / f"scan{ending}"
    write_image(image, GEOMETRY_3D, path)
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all()  # SimpleITK reads them as 0
    with pytest.raises(UserInputError, match=r"3 voxel\(s\) are NaN or inf") as info:
        read_image(path)
    assert info.value.path == str(path) and info.value.fix


def test_integer_nifti_is_not_decompressed_a_second_time(tmp_path, monkeypatch):
    """Only float voxels can be NaN: an integer .nii.gz is checked by its gzip trailer alone."""
    path = tmp_path / "scan.nii.gz"
    write_image(np.arange(210, dtype=np.int16).reshape(1, 5, 6, 7), GEOMETRY_3D, path)
    monkeypatch.setattr(sitk_io, "_scan_nifti", lambda *args: pytest.fail("integer voxels were scanned"))
    assert read_image(path)[0].max() == 209


@pytest.mark.parametrize("ending", [".nrrd", ".mha"])
def test_truncated_other_formats_refused(tmp_path, ending):
    path = tmp_path / f"cut{ending}"
    write_image(np.random.default_rng(4).normal(size=(1, 5, 6, 7)).astype(np.float32), GEOMETRY_3D, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError) as info:
        read_image(path)
    assert f"cut{ending}" in str(info.value)


def test_text_file_named_nifti_refused(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("this is not an image\n")
    with pytest.raises(UserInputError, match="cannot be read as an image") as info:
        read_image(path)
    assert "notes.nii.gz" in str(info.value)
    assert info.value.fix  # tells the user what to do


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(UserInputError, match="not found") as info:
        read_image(tmp_path / "absent.nii.gz")
    assert "absent.nii.gz" in str(info.value)
    (tmp_path / "folder.nii.gz").mkdir()
    with pytest.raises(UserInputError, match="folder"):
        read_image(tmp_path / "folder.nii.gz")


def test_unsupported_ending(tmp_path):
    path = tmp_path / "scan.dcm"
    path.write_bytes(b"\0" * 200)
    with pytest.raises(UserInputError, match="unsupported file ending") as info:
        read_image(path)
    assert "scan.dcm" in str(info.value) and ".nii.gz" in info.value.fix


def test_atomic_writes_leave_no_temp_files(tmp_path):
    image = np.zeros((1, 5, 6, 7), np.float32)
    seg = np.zeros((5, 6, 7), np.int16)
    for ending in (".nii.gz", ".nrrd", ".mha"):
        write_image(image, GEOMETRY_3D, tmp_path / f"img{ending}")
        write_segmentation(seg, GEOMETRY_3D, tmp_path / f"seg{ending}")
        write_segmentation(seg + 1, GEOMETRY_3D, tmp_path / f"seg{ending}")  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == sorted(
        f"{kind}{e}" for kind in ("img", "seg") for e in (".nii.gz", ".nrrd", ".mha")
    )
    assert read_label(tmp_path / "seg.mha")[0].min() == 1


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "seg.nii.gz"
    seg = np.ones((5, 6, 7), np.int16)
    write_segmentation(seg, GEOMETRY_3D, target)

    def half_write_then_fail(image, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk_io.sitk, "WriteImage", half_write_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_segmentation(seg * 2, GEOMETRY_3D, target)
    with pytest.raises(RuntimeError):
        write_image(np.zeros((1, 5, 6, 7), np.float32), GEOMETRY_3D, tmp_path / "new.nrrd")
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["seg.nii.gz"]
    np.testing.assert_array_equal(read_label(target)[0], seg)


def test_geometry_dict_round_trip():
    d = GEOMETRY_3D.to_dict()
    assert set(d) == {"size", "spacing", "origin", "direction"}
    assert all(isinstance(v, list) for v in d.values())
    restored = ImageGeometry.from_dict(json.loads(json.dumps(d)))  # survives JSON
    assert restored == GEOMETRY_3D
    assert restored.dimension == 3
    assert GEOMETRY_3D.matches(restored) == []


def test_geometry_matches_reports_each_difference():
    g = GEOMETRY_3D
    assert g.matches(g) == []
    # below the tolerance is not a difference
    nearly = ImageGeometry(g.size, tuple(s + 1e-6 for s in g.spacing), g.origin, g.direction)
    assert g.matches(nearly) == []

    spacing = ImageGeometry(g.size, (0.75, 1.25, 3.0), g.origin, g.direction)
    problems = g.matches(spacing)
    assert len(problems) == 1 and problems[0].startswith("spacing") and "3.5" in problems[0] and "3.0" in problems[0]

    many = ImageGeometry((7, 6, 4), g.spacing, (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    problems = g.matches(many)
    assert [p.split()[0] for p in problems] == ["shape", "origin", "direction"]
    assert "[7, 6, 5] vs [7, 6, 4]" in problems[0]

    flat = ImageGeometry((7, 6), (0.75, 1.25), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    assert [p.split()[0] for p in g.matches(flat)] == ["shape", "spacing", "origin", "direction"]
