"""Slice images: 16-bit TIFF (COVID-CTset, raw HU + offset), 8-bit PNG/JPEG (pre-windowed) and one DICOM slice.

Folders of slices become volumes (``read_tiff_folder``, ``read_image_folder``);
one image for ``explain`` is read by ``read_slice_image``. Slice images carry no
geometry: slices are ordered by the last number in the file name (natural order,
``IM2`` before ``IM10``), spacing is a nominal 1 mm, and the display convention
(patient's right on the image's left, anterior at the top) is assumed. Every
volume from here says so in ``Volume.warnings``.

Whether a folder holds the slices of one CT at all (or a set of independent 2D
images, or masks) is decided before reading, by
:func:`pipeline.ingest.slice_checks.check_slice_folder`.

The suffixes below are the project's one registry of slice-file suffixes
(ingest, ``explain``, training manifests)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import tifffile
from PIL import Image, UnidentifiedImageError

from corona_ct.pipeline.config import IngestConfig
from corona_ct.pipeline.datamodel import Geometry, Volume
from corona_ct.pipeline.errors import (
    AmbiguousInputError,
    GeometryError,
    InputError,
    NoImageDataError,
    UnsupportedInputError,
)
from corona_ct.pipeline.ingest.deid import clean_text
from corona_ct.pipeline.ingest.dicom.codecs import (
    decode_stored_values,
    require_decoder,
    require_transfer_syntax,
)
from corona_ct.pipeline.ingest.dicom.header import NOT_DICOM, scan_file
from corona_ct.pipeline.ingest.dicom.read import slice_hu
from corona_ct.pipeline.memory import require_memory, slice_bytes_needed, volume_bytes_needed

#: 16-bit TIFF slices (raw values + ``tiff_hu_offset`` = HU); 8-bit TIFFs are windowed images.
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
#: 8-bit windowed slice images, read as [0, 1] grey (colour → BT.601 luminance).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
#: DICOM files named as such (DICOM files without a suffix are found by their header).
DICOM_SUFFIXES = frozenset({".dcm"})
#: Every suffix of a file that holds one 2D slice (``explain`` folders, training class folders).
SLICE_FILE_SUFFIXES = TIFF_SUFFIXES | IMAGE_SUFFIXES | DICOM_SUFFIXES
#: The slice number of a file is the last run of digits in its stem (``..._IM00031.tif`` → 31).
SLICE_NUMBER = re.compile(r"\d+")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as PIL's "L" conversion
_NOMINAL_WARNING = (
    "slice images carry no voxel spacing or orientation: spacing is a nominal 1 mm, so volumes are in "
    "nominal units (1 cm³ = 1000 voxels), slices are ordered by the number at the end of the file name, "
    "and the patient's right is assumed on the image's left"
)


def _slice_files(folder: Path, suffixes: frozenset[str], kind: str) -> list[Path]:
    """Visible files of ``folder`` with one of ``suffixes`` (any case), in slice order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder of {kind} slices")
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
    ]
    if not files:
        raise NoImageDataError(
            f"{folder}: no {kind} slice files ({', '.join(sorted(suffixes))}) found; check the path"
        )
    return sort_by_slice_number(files)


def sort_by_slice_number(files: Sequence[Path]) -> list[Path]:
    """Order files by the last number in their name (``..._IM00031.tif`` → 31), never lexically.

    A name without a number, or two files with the same number (two series
    mixed in one folder), raise, because the slice order would be a guess.
    """
    numbered: dict[int, Path] = {}
    for path in files:
        numbers = SLICE_NUMBER.findall(path.stem)
        if not numbers:
            raise InputError(
                f"{path}: the file name holds no slice number; name slices with a trailing number (IM00001...)"
            )
        number = int(numbers[-1])
        if number in numbered:
            raise AmbiguousInputError(
                f"{path.parent}: {numbered[number].name} and {path.name} share slice number {number}; "
                "the folder seems to mix several series: put each series in its own folder"
            )
        numbered[number] = path
    return [numbered[n] for n in sorted(numbered)]


def _check_sizes(files: Sequence[Path], shapes: Sequence[tuple[int, ...]], folder: Path) -> tuple[int, int]:
    """The common (rows, columns) of all slices; names the first file whose size differs from the majority."""
    majority, count = Counter(shapes).most_common(1)[0]
    for path, shape in zip(files, shapes):
        if shape != majority:
            raise GeometryError(
                f"{path}: slice size {shape[1]}×{shape[0]} differs from the {majority[1]}×{majority[0]} of "
                f"{count} other slices in {folder}; remove it or move it to its own folder"
            )
    return majority[0], majority[1]


def _check_counts(folder: Path, n_slices: int, rows: int, columns: int, config: IngestConfig) -> None:
    """Slice count and size within the ingest limits, and the volume fits in the available memory."""
    if n_slices < config.min_slices:
        raise UnsupportedInputError(
            f"{folder}: {n_slices} slice image(s); a single slice is not a CT volume "
            "(use the explain command for one image)"
        )
    if n_slices > config.max_slices or rows * columns > config.max_pixels_per_slice:
        raise UnsupportedInputError(
            f"{folder}: {n_slices} slices of {columns}×{rows} exceed the ingest limits "
            f"(max_slices {config.max_slices}, max_pixels_per_slice {config.max_pixels_per_slice})"
        )
    require_memory(
        volume_bytes_needed(n_slices * rows * columns),
        str(folder),
        f"{n_slices} slices of {columns}×{rows} pixels",
    )


def _admit_slice(path: Path, rows: int, columns: int) -> None:
    """Refuse one 2D image for ``explain`` that would not fit in the available memory (header only)."""
    require_memory(slice_bytes_needed(rows * columns), str(path), f"{columns}×{rows} pixels")


def _stack(
    files: Sequence[Path], rows: int, columns: int, read: Callable[[Path], np.ndarray]
) -> npt.NDArray[np.float32]:
    volume = np.empty((len(files), rows, columns), dtype=np.float32)
    for index, path in enumerate(files):
        volume[index] = read(path)
    return volume


# ----------------------------------------------------------------------------- 16-bit TIFF


def tiff_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of the first page of a TIFF file, from its header."""
    try:
        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages.first
            return tuple(int(n) for n in page.shape), np.dtype(page.dtype)
    except (OSError, ValueError, IndexError) as error:
        raise InputError(f"{path}: not a readable TIFF image ({error})") from None


def read_tiff(path: Path) -> np.ndarray:
    """The stored values of the first page of a TIFF file."""
    try:
        return np.asarray(tifffile.imread(path, key=0))
    except (OSError, ValueError, IndexError) as error:
        raise InputError(
            f"{path}: TIFF pixel data cannot be read ({error}); the file may be truncated"
        ) from None


def _check_tiff_16bit(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if dtype == np.uint8:
        raise UnsupportedInputError(
            f"{path}: 8-bit TIFF slices hold windowed grey values, not HU; convert them to PNG and "
            "read them as a windowed image folder (the PNG/JPEG path)"
        )
    if dtype not in (np.dtype(np.uint16), np.dtype(np.int16)) or len(shape) != 2:
        raise UnsupportedInputError(
            f"{path}: {dtype} TIFF of shape {shape}; expected one 16-bit grey slice per file (COVID-CTset layout)"
        )


def read_tiff_folder(folder: Path, config: IngestConfig, study_id: str) -> Volume:
    """A folder of 16-bit TIFF slices (COVID-CTset) as HU: raw value + ``config.tiff_hu_offset``.

    Geometry is nominal (1 mm voxels, ``spacing_known=False``).
    """
    folder = Path(folder)
    files = _slice_files(folder, TIFF_SUFFIXES, "TIFF")
    headers = [tiff_header(path) for path in files]
    for path, (shape, dtype) in zip(files, headers):
        _check_tiff_16bit(path, shape, dtype)
    rows, columns = _check_sizes(files, [shape for shape, _ in headers], folder)
    _check_counts(folder, len(files), rows, columns, config)

    hu = _stack(files, rows, columns, read_tiff)
    hu += np.float32(config.tiff_hu_offset)
    warnings = [_NOMINAL_WARNING]
    low, high = float(hu.min()), float(hu.max())
    if low < -1100.0 or high < -200.0:
        warnings.append(
            f"values span [{low:.0f}, {high:.0f}] HU after adding tiff_hu_offset {config.tiff_hu_offset:g}: "
            "air should be near -1000 HU; check ingest.tiff_hu_offset for this data set"
        )
    return Volume(
        array=hu,
        units="HU",
        geometry=Geometry(shape=hu.shape, spacing_mm=(1.0, 1.0, 1.0)),
        study_id=study_id,
        source=str(folder),
        meta={"format": "TIFF slices", "n_files": len(files)},
        warnings=tuple(warnings),
        spacing_known=False,
    )


# ----------------------------------------------------------------------------- 8-bit PNG/JPEG


def _grey_unit(path: Path) -> npt.NDArray[np.float32]:
    """One 8-bit image as grey luminance in [0, 1]: RGB(A) weighted, alpha ignored, palettes expanded."""
    try:
        with Image.open(path) as image:
            mode = image.mode
            if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise UnsupportedInputError(
                    f"{path}: {mode} image with more than 8 bits; windowed slice images must be 8-bit grey or colour"
                )
            if mode in ("L", "LA", "1"):
                pixels = np.asarray(image.convert("L"), dtype=np.float32)
            else:
                rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
                pixels = rgb @ _LUMA
    except (OSError, ValueError, UnidentifiedImageError) as error:
        raise InputError(f"{path}: not a readable PNG/JPEG image ({error})") from None
    return np.clip(pixels / 255.0, 0.0, 1.0).astype(np.float32)


def image_shape(path: Path) -> tuple[int, int]:
    """(rows, columns) of a PNG/JPEG/BMP image, from its header."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, ValueError, UnidentifiedImageError) as error:
        raise InputError(f"{path}: not a readable PNG/JPEG image ({error})") from None


def read_image_folder(folder: Path, config: IngestConfig, study_id: str) -> Volume:
    """A folder of 8-bit PNG/JPEG slices (already windowed) as [0, 1] grey values, units "window".

    Colour images become BT.601 luminance; geometry is nominal (1 mm voxels).
    """
    folder = Path(folder)
    files = _slice_files(folder, IMAGE_SUFFIXES, "PNG/JPEG")
    rows, columns = _check_sizes(files, [image_shape(path) for path in files], folder)
    _check_counts(folder, len(files), rows, columns, config)
    grey = _stack(files, rows, columns, _grey_unit)
    return Volume(
        array=grey,
        units="window",
        geometry=Geometry(shape=grey.shape, spacing_mm=(1.0, 1.0, 1.0)),
        study_id=study_id,
        source=str(folder),
        meta={"format": "windowed slice images", "n_files": len(files)},
        warnings=(_NOMINAL_WARNING,),
        spacing_known=False,
    )


# ----------------------------------------------------------------------------- one image


def _read_dicom_slice(path: Path) -> npt.NDArray[np.float32]:
    """One DICOM CT slice in HU, decoded and rescaled exactly as a slice of a series (``dicom.read.slice_hu``)."""
    header = scan_file(path)
    if isinstance(header, str):
        if header == NOT_DICOM:
            raise InputError(f"{path}: not a PNG, JPEG, TIFF or DICOM image")
        raise InputError(f"{path}: {header}; pass one CT slice image")
    if header.modality and header.modality != "CT":
        raise UnsupportedInputError(
            f"{path}: modality {clean_text(header.modality)}, not CT; Hounsfield units need a CT image"
        )
    _admit_slice(path, header.rows, header.columns)
    if header.n_frames > 1 or header.samples_per_pixel != 1:
        raise UnsupportedInputError(
            f"{path}: multi-frame or colour DICOM; the slice reader needs one grey CT slice"
        )
    require_transfer_syntax(header.transfer_syntax, str(path))
    require_decoder(header.transfer_syntax, str(path))
    hu, _, _ = slice_hu(decode_stored_values(header, path.parent), header)
    return hu.astype(np.float32)


def read_slice_image(path: Path, config: IngestConfig) -> tuple[npt.NDArray[np.float32], str]:
    """One 2D slice for ``explain``: (float32 (y, x) array, units).

    PNG/JPEG → [0, 1] grey, "window"; 16-bit TIFF → raw + ``config.tiff_hu_offset``,
    "HU" (8-bit TIFF → [0, 1], "window"); anything else is read as one DICOM CT
    slice exactly as a slice of a series (stored values masked to BitsStored, rescale, padding
    and fill outside the scan field set to -1000 HU), "HU".
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        _admit_slice(path, *image_shape(path))
        return _grey_unit(path), "window"
    if suffix in TIFF_SUFFIXES:
        shape, dtype = tiff_header(path)
        if len(shape) >= 2:
            _admit_slice(path, shape[0], shape[1])
        if dtype == np.uint8 and len(shape) in (2, 3):
            return _grey_unit(path), "window"
        _check_tiff_16bit(path, shape, dtype)
        hu = read_tiff(path).astype(np.float32) + np.float32(config.tiff_hu_offset)
        return hu, "HU"
    return _read_dicom_slice(path), "HU"
