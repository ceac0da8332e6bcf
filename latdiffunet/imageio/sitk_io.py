"""Reading and writing images through SimpleITK, keeping the geometry.

Internally every image is a numpy array ``(C, Z, Y, X)`` (labels ``(Z, Y, X)``), whatever its
file format: 2D images get ``Z == 1``. Geometry is kept in SimpleITK's own order (x, y, z) in an
:class:`ImageGeometry`, because that is what must be written back for the output to overlay the
input in ITK-SNAP / 3D Slicer. Spacing in *array* order (z, y, x) is what the pipeline computes
with; for 2D images the z spacing is a large placeholder (nnU-Net's 999) so that no algorithm
mistakes the single slice for a thin 3D volume.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from latdiffunet.errors import UserInputError
from latdiffunet.utilities.file_io import atomic_path

SUPPORTED_FILE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NATURAL_IMAGE_ENDINGS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPACING_2D_PLACEHOLDER = 999.0


def file_ending_of(path: str | Path) -> str:
    name = str(path).lower()
    for ending in sorted(SUPPORTED_FILE_ENDINGS, key=len, reverse=True):
        if name.endswith(ending):
            return ending
    return Path(name).suffix


@dataclass(frozen=True)
class ImageGeometry:
    """Physical placement of an image, in SimpleITK order (x, y[, z])."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @property
    def dimension(self) -> int:
        return len(self.size)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Spacing in numpy array order; 2D images get the placeholder z spacing."""
        if self.dimension == 2:
            return (SPACING_2D_PLACEHOLDER, float(self.spacing[1]), float(self.spacing[0]))
        return tuple(float(s) for s in self.spacing[::-1])  # type: ignore[return-value]

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        if self.dimension == 2:
            return (1, int(self.size[1]), int(self.size[0]))
        return tuple(int(s) for s in self.size[::-1])  # type: ignore[return-value]

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ImageGeometry":
        return cls(
            size=tuple(int(x) for x in d["size"]),
            spacing=tuple(float(x) for x in d["spacing"]),
            origin=tuple(float(x) for x in d["origin"]),
            direction=tuple(float(x) for x in d["direction"]),
        )

    @classmethod
    def of(cls, img: sitk.Image) -> "ImageGeometry":
        return cls(
            size=tuple(int(s) for s in img.GetSize()),
            spacing=tuple(float(s) for s in img.GetSpacing()),
            origin=tuple(float(s) for s in img.GetOrigin()),
            direction=tuple(float(s) for s in img.GetDirection()),
        )

    def matches(self, other: "ImageGeometry", tolerance: float = 1e-4) -> list[str]:
        """Names of the geometry fields that differ (empty when they agree)."""
        if self == other:  # the usual case: one tuple comparison instead of three np.allclose per label read
            return []
        problems = []
        if self.size != other.size:
            problems.append(f"shape {list(self.size)} vs {list(other.size)}")
        for field in ("spacing", "origin", "direction"):
            a, b = np.asarray(getattr(self, field)), np.asarray(getattr(other, field))
            if a.shape != b.shape or not np.allclose(a, b, atol=tolerance, rtol=tolerance):
                problems.append(f"{field} {a.round(5).tolist()} vs {b.round(5).tolist()}")
        return problems


def _read_sitk(path: Path) -> sitk.Image:
    if not path.exists():
        raise UserInputError(
            "file not found" + (" (a symbolic link whose target is missing)" if path.is_symlink() else ""), path=path,
            fix="restore the file (or the link's target), or remove the case",
        )
    if path.is_dir():
        raise UserInputError("expected an image file but found a folder", path=path, fix="move the folder out of the image folder")
    if file_ending_of(path) not in SUPPORTED_FILE_ENDINGS:
        raise UserInputError(
            f"unsupported file ending {file_ending_of(path)!r}",
            path=path,
            fix=f"convert the file to one of {', '.join(SUPPORTED_FILE_ENDINGS)}",
        )
    if path.stat().st_size == 0:
        raise UserInputError(
            "file is empty (0 bytes)", path=path,
            fix="re-export or re-copy the file; an interrupted download or copy leaves such files",
        )
    try:
        img = _read_with_known_io(path)
    except RuntimeError as exc:
        # ITK's last line is the most specific, except a trailing "Reason: <stale errno text>"
        # (a truncated .mha says "No such file or directory")
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        while len(lines) > 1 and lines[-1].startswith("Reason:"):
            lines.pop()
        first_line = re.sub(r"\(0x[0-9a-fA-F]+\)", "", lines[-1]) if lines else "unknown reader error"
        raise UserInputError(
            f"cannot be read as an image (corrupt, truncated or wrong format): {first_line}",
            path=path,
            fix="re-export the file from its source; check that the extension matches the content",
        ) from None
    if file_ending_of(path) in (".nii", ".nii.gz"):
        _check_nifti_voxels(path)
    return img


# ITK reader per file ending where naming it saves much of a small file's read time
_IMAGE_IO_BY_ENDING = {".png": "PNGImageIO"}


def _read_with_known_io(path: Path) -> sitk.Image:
    """``sitk.ReadImage``, without asking every ITK reader whether it can read a 16 KB PNG.

    Without a named reader ITK's factory asks the registered ImageIOs in turn, which costs about
    a sixth of reading a 128x128 PNG (measured), on every one of a 2D dataset's thousands of
    files. A file the named reader refuses (damaged, or content not matching its ending: ITK's
    factory reads a BMP named .png) is read as before, so results and error messages stay those
    of the factory's choice.
    """
    io_name = _IMAGE_IO_BY_ENDING.get(file_ending_of(path))
    if io_name is not None:
        try:
            return sitk.ReadImage(str(path), imageIO=io_name)
        except RuntimeError:
            pass
    return sitk.ReadImage(str(path))


# NIfTI datatype codes whose voxels are IEEE floats (complex types: pairs of them), as numpy kinds
_NIFTI_FLOAT_DATATYPES = {16: "f4", 32: "f4", 64: "f8", 1792: "f8"}
_SCAN_CHUNK_BYTES = 1 << 22  # a multiple of every item size, so chunks stay aligned to voxels


@dataclass(frozen=True)
class _NiftiLayout:
    """Where a NIfTI-1/2 file keeps its voxels and what they are, from the header alone."""

    byte_order: str  # "<" or ">"
    vox_offset: int
    voxel_bytes: int
    datatype: int

    @property
    def expected_bytes(self) -> int:
        return self.vox_offset + self.voxel_bytes

    @property
    def float_dtype(self) -> np.dtype | None:
        """Dtype to scan for NaN/inf; None for integer data, which cannot hold them."""
        kind = _NIFTI_FLOAT_DATATYPES.get(self.datatype)
        return None if kind is None else np.dtype(self.byte_order + kind)


def _nifti_layout(header: bytes) -> _NiftiLayout | None:
    """The voxel block of a NIfTI-1/2 header (uncompressed bytes); None if not parseable."""
    for order in ("<", ">"):
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            datatype, bitpix = struct.unpack(order + "2h", header[70:74])
            vox_offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(order + "2h", header[12:16])
            dims = struct.unpack(order + "8q", header[16:80])
            vox_offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0 or vox_offset < struct.unpack(order + "i", header[:4])[0]:
        return None  # a voxel block overlapping the header is not one we can scan
    voxels = int(np.prod([max(1, int(d)) for d in dims[1 : dims[0] + 1]], dtype=np.int64))
    return _NiftiLayout(order, vox_offset, voxels * bitpix // 8, datatype)


def _scan_nifti(path: Path, gzipped: bool, layout: _NiftiLayout, dtype: np.dtype | None) -> tuple[int, int]:
    """(bytes the file holds, NaN/inf voxels among them), decompressing once in bounded chunks.

    Raises ``zlib.error``/``EOFError``/``OSError`` when the compressed stream itself is damaged.
    """
    available, nonfinite = 0, 0
    with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
        available += len(f.read(layout.vox_offset))
        remaining = layout.voxel_bytes
        while chunk := f.read(_SCAN_CHUNK_BYTES):
            available += len(chunk)
            if dtype is not None and remaining > 0:
                block = chunk[: min(remaining, len(chunk) - len(chunk) % dtype.itemsize)]
                nonfinite += int(np.count_nonzero(~np.isfinite(np.frombuffer(block, dtype))))
                remaining -= len(block)
    return available, nonfinite


def _check_nifti_voxels(path: Path) -> None:
    """Refuse what ITK's NIfTI reader hides: a truncated file and NaN/inf voxels.

    ITK pads the voxels missing from a truncated file with zeros, and its NIfTI library replaces
    every NaN/inf of a float image by 0 (in SimpleITK 2.5; .mha and .nrrd keep them), so neither
    can be seen in the array it returns: both are checked on the file's own bytes. Integer images
    cannot hold NaN and only need their length checked, which for .nii.gz the gzip trailer gives
    without decompressing; float images are decompressed once more and scanned.
    """
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    truncated = UserInputError(
        "truncated: the file ends before all voxels its NIfTI header announces",
        path=path,
        fix="re-export or re-copy the file; an interrupted download or copy leaves such files",
    )
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
            header = f.read(348)
            if header[:4] in (struct.pack("<i", 540), struct.pack(">i", 540)):
                header += f.read(192)
    except (OSError, EOFError, zlib.error):
        raise truncated from None
    layout = _nifti_layout(header)
    if layout is None:
        return  # ITK understood a header we do not; trust it
    dtype = layout.float_dtype
    if dtype is None and not gzipped:
        if path.stat().st_size < layout.expected_bytes:
            raise truncated
        return
    if dtype is None:
        with open(path, "rb") as f:  # fast path: gzip's trailer stores the uncompressed size mod 2**32
            f.seek(-4, os.SEEK_END)
            if struct.unpack("<I", f.read(4))[0] == layout.expected_bytes % 2**32:
                return
    try:  # float data, or the slow path (truncated, multi-member or > 4 GiB): decompress and count
        available, nonfinite = _scan_nifti(path, gzipped, layout, dtype)
    except (OSError, EOFError, zlib.error):  # the compressed stream itself is cut short or damaged
        raise truncated from None
    if available < layout.expected_bytes:
        raise truncated
    if nonfinite:
        raise UserInputError(
            f"{nonfinite} voxel(s) are NaN or inf (stored in the file; the NIfTI reader would silently read them as 0)",
            path=path,
            fix="replace them (e.g. with the background value) and save the image again",
        )


def read_image(path: str | Path) -> tuple[np.ndarray, ImageGeometry]:
    """One image file as ``(C, Z, Y, X)`` float32; an RGB file gives ``C == 3``."""
    path = Path(path)
    img = _read_sitk(path)
    dim = img.GetDimension()
    if dim not in (2, 3):
        raise UserInputError(
            f"image has {dim} dimensions; only 2D and 3D images are supported",
            path=path,
            fix="split 4D series into one 3D file per channel (CASE_0000, CASE_0001, ...)",
        )
    arr = sitk.GetArrayFromImage(img)
    components = img.GetNumberOfComponentsPerPixel()
    if components > 1:  # vector pixels: channel is the last numpy axis
        arr = np.moveaxis(arr, -1, 0)
    else:
        arr = arr[None]
    if dim == 2:
        arr = arr[:, None]
    return arr.astype(np.float32, copy=False), ImageGeometry.of(img)


def read_images_as_channels(paths: Sequence[str | Path]) -> tuple[np.ndarray, ImageGeometry]:
    """Stack one file per channel (nnU-Net's ``CASE_0000``, ``CASE_0001``, ...) into ``(C, Z, Y, X)``.

    All channels must share the geometry of the first, otherwise voxels would not correspond.
    """
    arrays, first_geometry = [], None
    for p in paths:
        arr, geometry = read_image(p)
        if first_geometry is None:
            first_geometry = geometry
        else:
            diff = first_geometry.matches(geometry)
            if diff:
                raise UserInputError(
                    f"geometry differs from {Path(paths[0]).name}: {'; '.join(diff)}",
                    path=p,
                    fix="resample all channels of a case onto the same grid",
                )
        arrays.append(arr)
    if first_geometry is None:
        raise ValueError("no image paths given")
    return np.concatenate(arrays, axis=0), first_geometry


def read_label(path: str | Path) -> tuple[np.ndarray, ImageGeometry]:
    """A label map as ``(Z, Y, X)`` int16; refuses multi-component and non-integer labels."""
    path = Path(path)
    arr, geometry = read_image(path)
    if arr.shape[0] != 1:
        raise UserInputError(
            f"label file has {arr.shape[0]} components per pixel (an RGB image?); labels must be single-channel",
            path=path,
            fix="save the label map as a grayscale image with integer class values",
        )
    arr = arr[0]
    if not np.all(np.isfinite(arr)):
        raise UserInputError("label file contains NaN or inf", path=path, fix="labels must be integer class ids; re-export the label map")
    if not np.array_equal(arr, np.round(arr)):
        raise UserInputError(
            "label file contains non-integer values", path=path, fix="labels must be integer class ids"
        )
    return arr.astype(np.int16), geometry


def _to_sitk(array_zyx: np.ndarray, geometry: ImageGeometry, is_vector: bool = False, ending: str = "") -> sitk.Image:
    if ending in (".png", ".jpg", ".jpeg", ".bmp") and geometry.dimension == 3 and geometry.size[2] > 1:
        # ITK would silently write the first slice only
        raise ValueError(f"{ending} holds a single 2D slice; write this {geometry.size[2]}-slice volume as .nii.gz")
    arr = np.asarray(array_zyx)
    if geometry.dimension == 2:
        arr = arr[..., 0, :, :] if not is_vector else arr[:, 0]
    if is_vector:
        arr = np.moveaxis(arr, 0, -1)
    img = sitk.GetImageFromArray(arr, isVector=is_vector)
    img.SetSpacing(geometry.spacing)
    img.SetOrigin(geometry.origin)
    img.SetDirection(geometry.direction)
    return img


def write_segmentation(seg_zyx: np.ndarray, geometry: ImageGeometry, target: str | Path) -> None:
    """Write a label map with the input's geometry, atomically, in the format of ``target``'s ending."""
    target = Path(target)
    ending = file_ending_of(target)
    dtype = np.uint8 if ending in NATURAL_IMAGE_ENDINGS or seg_zyx.max(initial=0) < 256 else np.int16
    if ending in NATURAL_IMAGE_ENDINGS and seg_zyx.max(initial=0) > 255:
        raise ValueError(f"{target}: label values above 255 cannot be stored in {ending}")
    img = _to_sitk(seg_zyx.astype(dtype), geometry, ending=ending)
    with atomic_path(target, suffix=ending) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)


def write_image(array_czyx_or_zyx: np.ndarray, geometry: ImageGeometry, target: str | Path) -> None:
    """Write a float or vector image (e.g. an uncertainty map) with the given geometry, atomically."""
    target = Path(target)
    ending = file_ending_of(target)
    arr = np.asarray(array_czyx_or_zyx)
    is_vector = arr.ndim == 4
    if ending in NATURAL_IMAGE_ENDINGS and arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{target}: {ending} holds uint8/uint16 only; cast or use a 3D format")
    img = _to_sitk(arr, geometry, is_vector=is_vector, ending=ending)
    with atomic_path(target, suffix=ending) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)
