"""Folders of slice images: 16-bit TIFF (COVID-CTset, raw HU + offset) and 8-bit PNG/JPEG (pre-windowed).

Slice images carry no geometry: slices are ordered by the last number in the
file name (natural order, ``IM2`` before ``IM10``), spacing is a nominal 1 mm,
and the display convention (patient's right on the image's left, anterior at
the top) is assumed. Every volume from here says so in ``Volume.warnings``.

A folder of slice images is one of three things, told apart by
:func:`check_slice_folder` before anything is stacked: the slices of one CT
(one size, names with one stem and a slice number), a *slice set* of
independent 2D images (figure crops, slices of many scans: sizes or name stems
differ), or a folder of segmentation *masks* (every image binary). Only the
first is a volume; a slice set is for ``explain``, masks are refused.

The suffixes below are the project's one registry of slice-file suffixes
(ingest, ``explain``, training manifests).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
_NUMBER = re.compile(r"\d+")
#: A slice-image folder with more than this share of its images off the most common size,
#: or three or more sizes, is a set of independent images, not one CT with a stray file.
SLICE_SET_ODD_SIZE_SHARE = 0.1
#: Shorter sides than this (pixels) are not a CT slice (icons, line plots, thumbnails).
MIN_SLICE_SIDE_PX = 32
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
        numbers = _NUMBER.findall(path.stem)
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


def _tiff_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages.first
            return tuple(int(n) for n in page.shape), np.dtype(page.dtype)
    except (OSError, ValueError, IndexError) as error:
        raise InputError(f"{path}: not a readable TIFF image ({error})") from None


def _read_tiff(path: Path) -> np.ndarray:
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
    headers = [_tiff_header(path) for path in files]
    for path, (shape, dtype) in zip(files, headers):
        _check_tiff_16bit(path, shape, dtype)
    rows, columns = _check_sizes(files, [shape for shape, _ in headers], folder)
    _check_counts(folder, len(files), rows, columns, config)

    hu = _stack(files, rows, columns, _read_tiff)
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


def _image_shape(path: Path) -> tuple[int, int]:
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
    rows, columns = _check_sizes(files, [_image_shape(path) for path in files], folder)
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
        _admit_slice(path, *_image_shape(path))
        return _grey_unit(path), "window"
    if suffix in TIFF_SUFFIXES:
        shape, dtype = _tiff_header(path)
        if len(shape) >= 2:
            _admit_slice(path, shape[0], shape[1])
        if dtype == np.uint8 and len(shape) in (2, 3):
            return _grey_unit(path), "window"
        _check_tiff_16bit(path, shape, dtype)
        hu = _read_tiff(path).astype(np.float32) + np.float32(config.tiff_hu_offset)
        return hu, "HU"
    return _read_dicom_slice(path), "HU"


# ----------------------------------------------------------------------------- slice sets and masks


@dataclass(frozen=True)
class SliceFolderCheck:
    """What a folder of slice images holds, from :func:`check_slice_folder`.

    ``verdict``: ``"volume"`` (the slices of one CT), ``"slice-set"`` (independent 2D
    images) or ``"masks"`` (binary images); ``evidence`` says why, for messages.
    """

    folder: Path
    kind: str  # "TIFF" or "PNG/JPEG"
    n_images: int
    verdict: Literal["volume", "slice-set", "masks"]
    evidence: str

    @property
    def problem(self) -> str | None:
        """One-line reason this folder is not a CT volume, with what to do; None for a volume."""
        if self.verdict == "masks":
            return (
                f"{self.folder}: looks like a mask folder, not CT slices: {self.evidence}; "
                "masks are labels, not images: pass the folder of the CT slices themselves"
            )
        if self.verdict == "slice-set":
            images = "image" if self.n_images == 1 else "images"
            return (
                f"{self.folder}: {self.n_images} independent 2D {self.kind} {images}, not one CT volume "
                f"({self.evidence}); run `corona-ct explain {self.folder}` for a probability and map per image"
            )
        return None


def _folder_images(folder: Path, suffixes: frozenset[str]) -> list[Path]:
    """Visible files of ``folder`` (not below it) with one of ``suffixes``, sorted by name."""
    return sorted(
        p
        for p in Path(folder).iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
    )


def distinct_grey_values(path: Path, limit: int = 3) -> list[int]:
    """The sorted distinct stored grey values of one image file, at most ``limit`` of them.

    Colour images are converted to 8-bit luminance first; 16-bit TIFF/PNG values are
    taken as stored. Raises ``InputError`` naming an unreadable file.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            pixels = _read_tiff(path)
        else:
            with Image.open(path) as image:
                if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                    pixels = np.asarray(image)
                else:
                    pixels = np.asarray(image.convert("L"))
    except (OSError, ValueError, UnidentifiedImageError) as error:
        raise InputError(f"{path}: not a readable image ({error})") from None
    values = np.unique(pixels)
    return [int(v) for v in values[:limit]]


def _values_text(values: set[int]) -> str:
    ordered = sorted(values)
    if len(ordered) == 1:
        return f"value {ordered[0]}"
    return f"values {', '.join(map(str, ordered[:-1]))} and {ordered[-1]}"


def mask_evidence(files: Sequence[Path]) -> str | None:
    """ "all N images are binary (values 0 and 255)" when every readable image holds at most 2 grey values.

    Stops at the first image with more values, so a folder of CT slices costs one decode.
    """
    seen: set[int] = set()
    readable = 0
    for path in files:
        try:
            values = distinct_grey_values(path)
        except Exception:  # unreadable or refused (e.g. PIL's decompression-bomb guard): the reader names it
            continue
        if len(values) > 2:
            return None
        seen.update(values)
        readable += 1
    if not readable:
        return None
    every = f"all {readable} images are" if readable > 1 else "its only image is"
    return f"{every} {'binary' if len(seen) == 2 else 'blank'} ({_values_text(seen)})"


def _size_evidence(files: Sequence[Path], shapes: Sequence[tuple[int, int] | None]) -> str | None:
    """Why the image sizes rule out one volume (three or more sizes, or many odd-sized images)."""
    sizes = Counter(shape for shape in shapes if shape is not None)
    if len(sizes) < 2:
        return None
    (rows, columns), common = sizes.most_common(1)[0]
    odd = sum(sizes.values()) - common
    if len(sizes) < 3 and odd <= max(1, SLICE_SET_ODD_SIZE_SHARE * len(files)):
        return None  # one CT with a stray file: the reader names the odd one
    if common == 1:
        return f"{len(sizes)} different sizes, no two images alike"
    return f"{len(sizes)} different sizes, the most common {columns}×{rows} shared by {common}"


def _name_evidence(files: Sequence[Path]) -> str | None:
    """Why the file names are not one numbered sequence (no numbers, several name stems)."""
    unnumbered = [p.name for p in files if not _NUMBER.search(p.stem)]
    stems: dict[str, str] = {}  # case-folded stem → the stem as first seen
    for path in files:
        numbers = list(_NUMBER.finditer(path.stem))
        if numbers:
            stem = path.stem[: numbers[-1].start()]
            stems.setdefault(stem.lower(), stem)
    reasons = []
    if unnumbered:
        reasons.append(f"{len(unnumbered)} with no slice number in the name, e.g. {unnumbered[0]!r}")
    if len(stems) > 1:
        shown = list(dict.fromkeys(stem[:32] for stem in stems.values()))[:2]  # two that look different
        examples = ", ".join(repr(stem + "…") for stem in shown)
        reasons.append(f"{len(stems)} different name stems before the slice number, e.g. {examples}")
    return "; ".join(reasons) or None


def check_slice_folder(
    folder: Path, kind: Literal["tiff", "images"], config: IngestConfig
) -> SliceFolderCheck:
    """Tell the slices of one CT from a set of independent 2D images or a folder of masks.

    Reads image headers (sizes) and the pixels of the first image; every image only when
    all so far are binary. Masks: every image holds at most 2 grey values. Slice set:
    fewer than ``config.min_slices`` images, three or more sizes (or more than 10 % of
    images off the common size), or names that are not one stem with a slice number.
    Unreadable files are left out here; the folder reader names them.
    """
    folder = Path(folder)
    suffixes = TIFF_SUFFIXES if kind == "tiff" else IMAGE_SUFFIXES
    label = "TIFF" if kind == "tiff" else "PNG/JPEG"
    files = _folder_images(folder, suffixes)
    if not files:
        raise NoImageDataError(f"{folder}: no {label} slice files ({', '.join(sorted(suffixes))}) found")
    masks = mask_evidence(files)
    if masks:
        return SliceFolderCheck(folder, label, len(files), "masks", masks)
    if len(files) < config.min_slices:
        evidence = f"a CT volume needs at least {config.min_slices} slices"
        return SliceFolderCheck(folder, label, len(files), "slice-set", evidence)
    shapes: list[tuple[int, int] | None] = []
    for path in files:
        try:
            shape = _tiff_header(path)[0] if kind == "tiff" else _image_shape(path)
            shapes.append((int(shape[0]), int(shape[1])))
        except Exception:  # unreadable or refused: left out here, the folder reader names it
            shapes.append(None)
    reasons = [r for r in (_size_evidence(files, shapes), _name_evidence(files)) if r]
    if reasons:
        return SliceFolderCheck(folder, label, len(files), "slice-set", "; ".join(reasons))
    sizes = Counter(shape for shape in shapes if shape is not None)
    size = "×".join(map(str, sizes.most_common(1)[0][0][::-1])) if sizes else "unreadable"
    ordered = sort_by_slice_number(files) if len({_slice_number(p) for p in files}) == len(files) else files
    evidence = f"{len(files)} {label} slices of {size}, {ordered[0].name} … {ordered[-1].name}"
    return SliceFolderCheck(folder, label, len(files), "volume", evidence)


def _slice_number(path: Path) -> int:
    return int(_NUMBER.findall(path.stem)[-1])


def slice_image_problem(image: np.ndarray, units: str) -> str | None:
    """Why one decoded 2D slice (from :func:`read_slice_image`) is no CT slice: too small, blank or binary.

    Values are reported as stored: 0-255 for windowed ("window") images, HU otherwise.
    None when it may be a CT slice.
    """
    rows, columns = image.shape[:2]
    if min(rows, columns) < MIN_SLICE_SIDE_PX:
        return f"image of {columns}×{rows} pixels is too small for a CT slice (at least {MIN_SLICE_SIDE_PX} per side)"
    values = np.unique(image)
    if values.size > 2:
        return None
    scale = 255.0 if units == "window" else 1.0
    shown = {round(float(v) * scale) for v in values}
    if values.size == 1:
        return f"blank image ({_values_text(shown)} everywhere): no CT slice"
    return f"binary image ({_values_text(shown)} only): looks like a mask, not a CT slice"
