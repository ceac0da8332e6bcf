"""Image corruptions for robustness tests, and corrupted copies of raw cases in nnU-Net's format.

LDSeg claims that a latent diffusion segmenter degrades more gracefully than a deterministic one
under acquisition noise. To test that, validation images are corrupted in their *raw* geometry
(before either method's preprocessing, as a scanner would) at increasing levels. Every corruption
takes a level in [0, 1]; level 0 returns the image unchanged (bit-identical), larger levels
corrupt more. Each channel is corrupted on its own. Exactly:

``gaussian``  x + level * R * n, n ~ N(0, 1) per voxel, where R is the channel's robust range
              (99.5th minus 0.5th percentile of all its voxels; max - min if that is 0; 1 for a
              constant channel). Level 0.1 adds noise with a standard deviation of a tenth of
              the range: visible; 0.4 is severe. No clipping (negative values stay).
``blur``      Gaussian filter (``scipy.ndimage.gaussian_filter``, ``mode="nearest"``) of width
              ``BLUR_SIGMA_AT_LEVEL_1 * level`` voxels along the finest axis; every other axis
              gets the same width in millimetres (fewer voxels along coarse axes, so anisotropic
              3D is blurred isotropically in physical space). Axes of size 1 (a 2D image's z)
              are not blurred.
``contrast``  m + (1 - level) * (x - m), m the channel's mean: a linear contrast reduction (level
              1 = flat image). A per-image z-score normalisation (MRI) undoes it exactly unless
              nonzero masking or the written dtype's rounding changes the statistics; with a
              fixed normalisation (CT) it does not.
``gamma``     lo + (hi - lo) * u ** g, u = (x - lo) / (hi - lo), lo/hi the channel's min/max,
              g = ``GAMMA_AT_LEVEL_1 ** level`` (1 at level 0, 4 at level 1): a non-linear
              contrast change that normalisation cannot undo; dark tissue is compressed.

Random draws (only ``gaussian`` draws) come from a generator keyed by (seed, corruption, case id,
level), so a case at a level is reproducible alone, whatever else is corrupted and in what order.

:func:`write_corrupted_cases` writes the corrupted copies with the original file names, geometry
(size, spacing, origin, direction) and, where the values allow it, the original pixel type:
integer images whose corrupted values are no longer integers become float32 (NIfTI, MHA, NRRD,
TIFF readers take it; nnU-Net's reader too), except in PNG/JPEG/BMP, which hold integers only,
where values are rounded and clipped to the original type's range.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from latdiffunet.errors import UserInputError
from latdiffunet.imageio.sitk_io import ImageGeometry, file_ending_of, read_image
from latdiffunet.utilities.file_io import atomic_path

__all__ = [
    "CORRUPTIONS", "BLUR_SIGMA_AT_LEVEL_1", "GAMMA_AT_LEVEL_1", "corruption_rng", "gaussian_noise", "gaussian_blur",
    "contrast_reduction", "gamma_contrast", "corrupt_image", "describe_level", "check_level", "write_corrupted_case",
    "write_corrupted_cases",
]

CORRUPTIONS = ("gaussian", "blur", "contrast", "gamma")
#: Gaussian blur width (voxels along the finest axis) at level 1.
BLUR_SIGMA_AT_LEVEL_1 = 5.0
#: Gamma exponent at level 1 (g = GAMMA_AT_LEVEL_1 ** level).
GAMMA_AT_LEVEL_1 = 4.0
#: File formats that hold integer pixels only.
INTEGER_ONLY_ENDINGS = (".png", ".jpg", ".jpeg", ".bmp")
_LEVEL_KEY_SCALE = 1_000_000  # levels are keyed to the generator in millionths


def check_level(level: float) -> float:
    """A level as float; refuses anything outside [0, 1] with a message saying what levels mean."""
    try:
        value = float(level)
    except (TypeError, ValueError):
        value = float("nan")
    if not (np.isfinite(value) and 0.0 <= value <= 1.0):
        raise UserInputError(
            f"corruption level {level!r} is not in [0, 1]",
            fix="give levels between 0 (clean image) and 1 (strongest), e.g. --levels 0 0.05 0.1 0.2 0.4",
        )
    return value


def _check_corruption(corruption: str) -> str:
    if corruption not in CORRUPTIONS:
        raise UserInputError(f"unknown corruption {corruption!r}", fix=f"choose from {', '.join(CORRUPTIONS)}")
    return corruption


def corruption_rng(seed: int, corruption: str, case_id: str, level: float) -> np.random.Generator:
    """Generator keyed by (seed, corruption, case id, level) only: independent of call order.

    ``zlib.crc32`` (not ``hash``, which is salted per process) turns the names into integers.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserInputError(f"the corruption seed must be a non-negative integer, got {seed!r}")
    level_key = int(round(check_level(level) * _LEVEL_KEY_SCALE))
    entropy = [int(seed), zlib.crc32(corruption.encode()), zlib.crc32(str(case_id).encode()), level_key]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _as_channels(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 4:
        raise ValueError(f"expected an image (C, Z, Y, X), got shape {arr.shape}")
    return arr


def robust_range(channel: np.ndarray) -> float:
    """99.5th minus 0.5th percentile; max - min when that is 0; 1 for a constant channel."""
    values = np.asarray(channel, dtype=np.float64)
    lo, hi = np.percentile(values, [0.5, 99.5])
    spread = float(hi - lo) or float(values.max() - values.min())
    return spread if spread > 0 else 1.0


def gaussian_noise(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Additive noise, sigma = level x the channel's robust range (see the module docstring)."""
    arr = _as_channels(image)
    level = check_level(level)
    if level == 0:
        return arr.copy()
    out = np.empty(arr.shape, dtype=np.float32)
    for c in range(arr.shape[0]):
        sigma = level * robust_range(arr[c])
        out[c] = arr[c] + sigma * rng.standard_normal(arr.shape[1:])
    return out


def blur_sigmas(level: float, spacing_zyx: Sequence[float], shape_zyx: Sequence[int]) -> tuple[float, ...]:
    """Per-axis sigma in voxels: ``BLUR_SIGMA_AT_LEVEL_1 * level`` along the finest axis, the same
    millimetres along the others; 0 along axes of size 1."""
    level = check_level(level)
    spacing = [float(s) for s in spacing_zyx]
    real = [s for s, n in zip(spacing, shape_zyx) if n > 1]
    if not real:
        return tuple(0.0 for _ in spacing)
    sigma_mm = BLUR_SIGMA_AT_LEVEL_1 * level * min(real)
    return tuple(sigma_mm / s if n > 1 else 0.0 for s, n in zip(spacing, shape_zyx))


def gaussian_blur(image: np.ndarray, level: float, spacing_zyx: Sequence[float]) -> np.ndarray:
    """Gaussian blur of physical width set by ``level`` (see :func:`blur_sigmas`)."""
    from scipy.ndimage import gaussian_filter

    sigmas = blur_sigmas(check_level(level), spacing_zyx, _as_channels(image).shape[1:])
    return _map_channels(image, level, lambda x: gaussian_filter(x, sigmas, mode="nearest"))


def _map_channels(image: np.ndarray, level: float, transform) -> np.ndarray:
    """``transform(channel as float64)`` for every channel, as float32; level 0 returns an exact copy."""
    arr = _as_channels(image)
    if check_level(level) == 0:
        return arr.copy()
    out = np.empty(arr.shape, dtype=np.float32)
    for c in range(arr.shape[0]):
        out[c] = transform(arr[c].astype(np.float64))
    return out


def contrast_reduction(image: np.ndarray, level: float) -> np.ndarray:
    """``m + (1 - level) (x - m)`` per channel, ``m`` its mean."""
    return _map_channels(image, level, lambda x: x.mean() + (1.0 - level) * (x - x.mean()))


def gamma_contrast(image: np.ndarray, level: float) -> np.ndarray:
    """``lo + (hi - lo) u ** g`` with ``g = GAMMA_AT_LEVEL_1 ** level`` per channel (min/max kept)."""
    gamma = GAMMA_AT_LEVEL_1 ** check_level(level)

    def transform(x: np.ndarray) -> np.ndarray:
        lo, hi = x.min(), x.max()
        return x if hi == lo else lo + (hi - lo) * ((x - lo) / (hi - lo)) ** gamma

    return _map_channels(image, level, transform)


def corrupt_image(
    image: np.ndarray, corruption: str, level: float, *, spacing_zyx: Sequence[float], seed: int, case_id: str
) -> np.ndarray:
    """One corruption of an image ``(C, Z, Y, X)``; level 0 returns an equal copy (same dtype)."""
    corruption = _check_corruption(corruption)
    if corruption == "gaussian":
        return gaussian_noise(image, level, corruption_rng(seed, corruption, case_id, level))
    if corruption == "blur":
        return gaussian_blur(image, level, spacing_zyx)
    if corruption == "contrast":
        return contrast_reduction(image, level)
    return gamma_contrast(image, level)


def describe_level(corruption: str, level: float) -> str:
    """The physical meaning of a level, for reports (e.g. ``noise sigma 0.1 x robust range``)."""
    level = check_level(level)
    if _check_corruption(corruption) and level == 0:
        return "clean image"
    if corruption == "gaussian":
        return f"noise sigma {level:g} x robust range"
    if corruption == "blur":
        return f"blur sigma {BLUR_SIGMA_AT_LEVEL_1 * level:g} voxels (finest axis)"
    if corruption == "contrast":
        return f"contrast x {1 - level:g}"
    return f"gamma {GAMMA_AT_LEVEL_1 ** level:.3g}"


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def _stored_dtype(path: Path) -> tuple[np.dtype, int]:
    """Pixel type and components per pixel as stored in the file (header only)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    components = int(reader.GetNumberOfComponents())
    probe = sitk.Image([1, 1], reader.GetPixelID(), components) if components > 1 else sitk.Image([1, 1], reader.GetPixelID())
    return sitk.GetArrayViewFromImage(probe).dtype, components


def output_array(values: np.ndarray, original_dtype: np.dtype, ending: str) -> np.ndarray:
    """Values in the pixel type they are written with (see the module docstring)."""
    dtype = np.dtype(original_dtype)
    if dtype.kind == "f":
        return values.astype(dtype, copy=False)
    info = np.iinfo(dtype)
    if ending in INTEGER_ONLY_ENDINGS:
        return np.clip(np.round(values), info.min, info.max).astype(dtype)
    exact = np.array_equal(values, np.round(values)) and values.min(initial=0) >= info.min and values.max(initial=0) <= info.max
    return values.astype(dtype) if exact else values.astype(np.float32)


def _write(array_czyx: np.ndarray, geometry: ImageGeometry, target: Path) -> None:
    import SimpleITK as sitk

    is_vector = array_czyx.shape[0] > 1
    arr = np.moveaxis(array_czyx, 0, -1) if is_vector else array_czyx[0]  # (Z, Y, X[, C])
    if geometry.dimension == 2:
        arr = arr[0]
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=is_vector)
    img.SetSpacing(geometry.spacing)
    img.SetOrigin(geometry.origin)
    img.SetDirection(geometry.direction)
    ending = file_ending_of(target)
    with atomic_path(target, suffix=ending) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=ending not in (".jpg", ".jpeg"))


def write_corrupted_case(
    files: Sequence[str | Path], output_folder: str | Path, corruption: str, level: float, seed: int, case_id: str
) -> list[Path]:
    """Corrupt one case (its channel files, stacked as read by ``latdiff_predict``) and write each
    file under its own name into ``output_folder``, atomically. Returns the written paths."""
    files = [Path(f) for f in files]
    arrays, geometries, dtypes = [], [], []
    for f in files:
        arr, geometry = read_image(f)
        dtype, _ = _stored_dtype(f)
        if geometries and geometries[0].matches(geometry):
            raise UserInputError(
                f"geometry differs from {files[0].name}", path=f, fix="resample all channels of a case onto the same grid"
            )
        arrays.append(arr)
        geometries.append(geometry)
        dtypes.append(dtype)
    stacked = np.concatenate(arrays, axis=0)
    corrupted = corrupt_image(stacked, corruption, level, spacing_zyx=geometries[0].spacing_zyx, seed=seed, case_id=case_id)
    written, start = [], 0
    out = Path(output_folder)
    for f, arr, geometry, dtype in zip(files, arrays, geometries, dtypes):
        part = corrupted[start : start + arr.shape[0]]
        start += arr.shape[0]
        target = out / f.name
        _write(output_array(part, dtype, file_ending_of(f)), geometry, target)
        written.append(target)
    return written


def write_corrupted_cases(
    cases: dict[str, Sequence[Path]], output_folder: str | Path, corruption: str, level: float, seed: int
) -> Path:
    """Corrupted copies of ``{case id: channel files}`` in ``output_folder`` (nnU-Net raw layout,
    the original file names); returns the folder. Existing files are overwritten."""
    _check_corruption(corruption)
    check_level(level)
    out = Path(output_folder)
    out.mkdir(parents=True, exist_ok=True)
    for case_id, files in cases.items():
        write_corrupted_case(files, out, corruption, level, seed, case_id)
    return out
