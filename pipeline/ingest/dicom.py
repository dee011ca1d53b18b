"""DICOM CT series: header scan, series planning with guardrails, pixel decoding to HU.

Three steps, each usable alone:

1. ``scan_file`` reads one file's header (no pixel data) into a ``SliceHeader``
   or says why the file is skipped (not DICOM, DICOMDIR, report, screenshot...).
2. ``plan_series`` checks one series from headers only (modality, localizers,
   matrix, orientation, duplicates, spacing, gantry tilt, size limits, decoder)
   and returns the ordered slices, or raises the error a user can act on.
3. ``read_series`` decodes the planned slices (``decode_stored_values`` per file,
   so a thread pool can be added later) and returns a ``Volume`` in HU, in the
   canonical (+S, +P, +L) array orientation.

pydicom does all reading; SimpleITK's series reader is not used because it
silently stacks stray slices, ignores gantry tilt, missing rescale and pixel
padding (see docs/ingest.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import logging
import re
import struct
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID

from corona_ct.pipeline.config import IngestConfig
from corona_ct.pipeline.datamodel import Geometry, Volume
from corona_ct.pipeline.errors import (
    DecoderMissingError,
    GeometryError,
    InputError,
    UnsupportedInputError,
)
from corona_ct.pipeline.ingest.deid import clean_text
from corona_ct.pipeline.memory import require_memory, volume_bytes_needed

log = logging.getLogger(__name__)

#: HU written where the scanner marked pixels as padding (outside the field of view): air.
PADDING_HU = -1000.0
#: Without padding tags, values below this are not tissue or air but the scanner's fill value.
IMPLAUSIBLE_HU = -1500.0
#: Slice positions closer than this (mm) are the same position.
SAME_POSITION_MM = 0.01

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
DICOMDIR_STORAGE = "1.2.840.10008.1.3.10"

_LOCALIZER_TYPES = {"LOCALIZER", "SCOUT", "TOPOGRAM", "SURVEY", "SCANOGRAM"}
_MODALITY_NAMES = {
    "CR": "computed radiography (X-ray)",
    "DX": "digital X-ray",
    "MG": "mammography",
    "MR": "magnetic resonance",
    "PT": "PET",
    "NM": "nuclear medicine",
    "US": "ultrasound",
    "XA": "X-ray angiography",
    "RF": "fluoroscopy",
    "OT": "other",
    "SC": "secondary capture",
}
# SOP class prefixes of objects that are not acquired slices: (prefix, what to call them).
_NON_IMAGE_SOP_CLASSES = (
    ("1.2.840.10008.5.1.4.1.1.88.", "structured report"),
    ("1.2.840.10008.5.1.4.1.1.7", "secondary capture image (a screenshot, not an acquired slice)"),
    ("1.2.840.10008.5.1.4.1.1.11.", "presentation state"),
    ("1.2.840.10008.5.1.4.1.1.481.", "radiotherapy object"),
    ("1.2.840.10008.5.1.4.1.1.66", "segmentation or registration object"),
    ("1.2.840.10008.5.1.4.1.1.104.", "encapsulated document"),
    ("1.2.840.10008.5.1.4.1.1.9.", "waveform"),
)
# Decoder package to install per compressed transfer syntax (pydicom's plugin names).
_OPENJPEG = "pylibjpeg-openjpeg"
_LIBJPEG = "pylibjpeg-libjpeg"
_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.90": _OPENJPEG,
    "1.2.840.10008.1.2.4.91": _OPENJPEG,
    "1.2.840.10008.1.2.4.201": _OPENJPEG,
    "1.2.840.10008.1.2.4.202": _OPENJPEG,
    "1.2.840.10008.1.2.4.203": _OPENJPEG,
    "1.2.840.10008.1.2.4.50": _LIBJPEG,
    "1.2.840.10008.1.2.4.51": _LIBJPEG,
    "1.2.840.10008.1.2.4.57": _LIBJPEG,
    "1.2.840.10008.1.2.4.70": _LIBJPEG,
    "1.2.840.10008.1.2.4.80": _LIBJPEG,
    "1.2.840.10008.1.2.4.81": _LIBJPEG,
    "1.2.840.10008.1.2.5": "pylibjpeg-rle",
}
_LOSSY_SYNTAXES = {
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.203",
}
# Everything pydicom or numpy may raise on a damaged or hostile file.
_READ_ERRORS = (
    InvalidDicomError,
    OSError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    NotImplementedError,
    RuntimeError,
    struct.error,
)

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class SliceHeader:
    """What the scan keeps of one image file's header (positions in LPS mm).

    Patient identity fields are kept only to group files and to keep identifiers
    out of study ids; they are excluded from ``repr`` and never written anywhere.
    """

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    modality: str
    study_uid: str
    series_uid: str  # "nouid-..." when the file carries none
    series_number: int | None
    image_type: tuple[str, ...]
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) mm
    rows: int
    columns: int
    n_frames: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    slope: float | None
    intercept: float | None
    padding_value: int | None
    padding_limit: int | None
    instance_number: int | None
    slice_thickness: float | None
    transfer_syntax: str
    gantry_tilt: float | None
    kernel: str
    manufacturer: str
    model: str
    kvp: float | None
    truncated: bool
    patient_id: str = field(default="", repr=False)
    patient_name: str = field(default="", repr=False)
    birth_date: str = field(default="", repr=False)
    accession: str = field(default="", repr=False)
    #: What pydicom logged while reading this header (e.g. invalid UID values), summarised per series.
    pydicom_messages: tuple[str, ...] = field(default=(), repr=False)

    @property
    def is_localizer(self) -> bool:
        return any(part.upper() in _LOCALIZER_TYPES for part in self.image_type)

    @property
    def identifiers(self) -> tuple[str, ...]:
        """Patient identifiers that must never appear in a study id."""
        return (self.patient_name, self.patient_id, self.accession, self.birth_date)


@dataclass(frozen=True)
class SeriesInfo:
    """One series as found by the scan, with what loading it would give.

    ``n_slices`` counts the slices that would be stacked (after dropped files);
    ``files`` are in spatial order when the series is usable. ``problem`` is the
    message loading would raise (``problem_type``), or "" when it loads.
    """

    uid: str
    short_uid: str
    modality: str
    image_type: tuple[str, ...]
    n_slices: int
    slice_thickness_mm: float | None
    slice_spacing_mm: float | None
    pixel_spacing_mm: tuple[float, float] | None
    orientation: str  # "axial", "coronal", "sagittal", "oblique" or "unknown"
    transfer_syntax: str  # readable name
    warnings: tuple[str, ...]
    files: tuple[Path, ...]
    transfer_syntax_uid: str = ""
    series_number: int | None = None
    matrix: tuple[int, int] | None = None  # (rows, columns)
    tilt_degrees: float = 0.0
    notes: tuple[str, ...] = ()
    problem: str = ""
    problem_type: type[InputError] | None = None
    headers: tuple[SliceHeader, ...] = field(default=(), repr=False)

    @property
    def usable(self) -> bool:
        """True when this is a CT series that loads (possibly with warnings)."""
        return not self.problem and self.modality == "CT"


@dataclass(frozen=True)
class SeriesPlan:
    """A checked series: slices in increasing position along ``normal``."""

    slices: tuple[SliceHeader, ...]
    positions_mm: tuple[float, ...]  # along the slice normal, increasing
    spacing_mm: tuple[float, float, float]  # (slice, row, column)
    row_direction: tuple[float, float, float]  # LPS direction of increasing column index
    column_direction: tuple[float, float, float]  # LPS direction of increasing row index
    normal: tuple[float, float, float]
    tilt_degrees: float
    inplane_offsets_mm: tuple[tuple[float, float], ...]  # per slice (along rows, along columns)
    same_position: tuple[tuple[int, ...], ...]  # groups of slice indices at one position
    warnings: tuple[str, ...]
    notes: tuple[str, ...]


# --------------------------------------------------------------------------- header scan


def display_path(path: Path, root: Path | None = None) -> str:
    """A file name safe to print: relative to ``root`` when possible, each part cleaned."""
    try:
        parts = path.relative_to(root).parts if root is not None else (path.name,)
    except ValueError:
        parts = (path.name,)
    return "/".join(clean_text(part, max_length=80) or "_" for part in parts) or "_"


def _raw(ds: Any, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except _READ_ERRORS:
        return None


def _text(ds: Any, keyword: str) -> str:
    value = _raw(ds, keyword)
    if value is None:
        return ""
    try:
        if isinstance(value, MultiValue | list | tuple):
            return "\\".join(str(v) for v in value).strip()
        return str(value).strip()
    except _READ_ERRORS:
        return ""


def _numbers(ds: Any, keyword: str, count: int) -> tuple[float, ...] | None:
    value = _raw(ds, keyword)
    if value is None or value == "":
        return None
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    try:
        numbers = tuple(float(v) for v in items)
    except _READ_ERRORS:
        return None
    if len(numbers) != count or not all(np.isfinite(numbers)):
        return None
    return numbers


def _number(ds: Any, keyword: str) -> float | None:
    value = _raw(ds, keyword)
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except _READ_ERRORS:
        return None
    return number if np.isfinite(number) else None


def _integer(ds: Any, keyword: str) -> int | None:
    number = _number(ds, keyword)
    return int(number) if number is not None and abs(number) < 2**63 else None


def _looks_like_raw_dicom(head: bytes) -> bool:
    """True for a DICOM data set written without the 128-byte preamble (old exports)."""
    if len(head) < 8:
        return False
    group, element = struct.unpack("<HH", head[:4])
    return group in (0x0002, 0x0008) and element < 0x0100


def _transfer_syntax(ds: Any) -> str:
    uid = _text(getattr(ds, "file_meta", None) or {}, "TransferSyntaxUID")
    if uid:
        return uid
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit:
        return "1.2.840.10008.1.2"
    return "1.2.840.10008.1.2.1" if little else "1.2.840.10008.1.2.2"


def _skip_reason(ds: Any, sop_class: str) -> str | None:
    if sop_class == DICOMDIR_STORAGE or "DirectoryRecordSequence" in ds:
        return "DICOMDIR index (ignored: the images it lists are read from the folder itself)"
    for prefix, what in _NON_IMAGE_SOP_CLASSES:
        if sop_class.startswith(prefix) or sop_class == prefix.rstrip("."):
            return f"{what}, not a CT slice"
    if _raw(ds, "Rows") is None or _raw(ds, "Columns") is None:
        return "DICOM object without an image"
    return None


def _read_header(fp: BinaryIO) -> Any:
    try:
        return pydicom.dcmread(fp, stop_before_pixels=True)
    except InvalidDicomError:
        fp.seek(0)
        if not _looks_like_raw_dicom(fp.read(8)):
            raise
        fp.seek(0)
        return pydicom.dcmread(fp, stop_before_pixels=True, force=True)


class _CollectRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _pydicom_log_captured() -> Iterator[list[str]]:
    """Collect what pydicom logs (instead of one stderr line per file); yields the messages' list."""
    logger = logging.getLogger("pydicom")
    handler = _CollectRecords()
    saved_handlers, saved_propagate = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [handler], False
    try:
        yield handler.messages
    finally:
        logger.handlers, logger.propagate = saved_handlers, saved_propagate


def summarise_pydicom_messages(headers: Sequence[SliceHeader]) -> list[str]:
    """One line per distinct pydicom message in a series, with how many files gave it.

    Quoted values are replaced by ``(value)`` (they group the files, and a header value may
    identify the patient); pydicom's link to the standard is dropped.
    """
    files_by_message: dict[str, set[Path]] = {}
    for header in headers:
        for message in header.pydicom_messages:
            text = message.split(" Please see", 1)[0].rstrip(". ")
            key = " ".join(re.sub(r"'[^']*'", "(value)", text).split())[:160]
            files_by_message.setdefault(key, set()).add(header.path)
    return [
        f"{len(files)} of {len(headers)} files: {key} (pydicom header warning, shown once per series; "
        "the images are read normally)"
        for key, files in sorted(files_by_message.items())
    ]


def scan_file(path: Path) -> SliceHeader | str:
    """Read one file's header; return it, or the reason the file is skipped.

    pydicom's log messages (e.g. COVID-CT-MD's UIDs are not valid DICOM UIDs) are kept
    in ``SliceHeader.pydicom_messages`` for one summary line per series, not printed per file.
    """
    with warnings.catch_warnings(), _pydicom_log_captured() as messages:
        # Wrong character sets and invalid VR values only affect text that is cleaned anyway.
        warnings.simplefilter("ignore")
        result = _scan_file(path)
    if messages and not isinstance(result, str):
        result = dataclasses.replace(result, pydicom_messages=tuple(dict.fromkeys(messages)))
    return result


def _scan_file(path: Path) -> SliceHeader | str:
    try:
        size = path.stat().st_size
        with path.open("rb") as fp:
            ds = _read_header(fp)
            # stop_before_pixels leaves the file at the start of the Pixel Data element.
            pixel_offset = fp.tell()
    except InvalidDicomError:
        return "not a DICOM file"
    except _READ_ERRORS as error:
        return f"unreadable DICOM header ({clean_text(type(error).__name__)})"
    meta = getattr(ds, "file_meta", None) or {}
    sop_class = _text(ds, "SOPClassUID") or _text(meta, "MediaStorageSOPClassUID")
    reason = _skip_reason(ds, sop_class)
    if reason is not None:
        return reason

    rows, columns = _integer(ds, "Rows") or 0, _integer(ds, "Columns") or 0
    n_frames = _integer(ds, "NumberOfFrames") or 1
    samples = _integer(ds, "SamplesPerPixel") or 1
    bits_allocated = _integer(ds, "BitsAllocated") or 16
    bits_stored = _integer(ds, "BitsStored") or bits_allocated
    if bits_allocated not in (8, 16, 32) or not 1 <= bits_stored <= bits_allocated:
        return f"unsupported pixel format (BitsAllocated {bits_allocated}, BitsStored {bits_stored})"
    transfer_syntax = _transfer_syntax(ds)
    expected_bytes = rows * columns * n_frames * samples * bits_allocated // 8
    at_end = pixel_offset >= size
    truncated = at_end or (
        not UID(transfer_syntax).is_compressed
        and transfer_syntax != "1.2.840.10008.1.2.1.99"  # deflated: size unknown before inflating
        and size < pixel_offset + expected_bytes
    )
    position = _numbers(ds, "ImagePositionPatient", 3)
    orientation = _numbers(ds, "ImageOrientationPatient", 6)
    spacing = _numbers(ds, "PixelSpacing", 2)
    study_uid = _text(ds, "StudyInstanceUID")
    series_uid = _text(ds, "SeriesInstanceUID")
    series_number = _integer(ds, "SeriesNumber")
    if not series_uid:
        # No UID: group what shares a folder, frame of reference and series number.
        key = f"{path.parent.resolve()}|{_text(ds, 'FrameOfReferenceUID')}|{series_number}"
        series_uid = "nouid-" + hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()[:12]
    padding_limit = _integer(ds, "PixelPaddingRangeLimit")
    return SliceHeader(
        path=path,
        sop_class_uid=sop_class,
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        modality=_text(ds, "Modality").upper(),
        study_uid=study_uid,
        series_uid=series_uid,
        series_number=series_number,
        image_type=tuple(part for part in _text(ds, "ImageType").upper().split("\\") if part),
        position=position,  # type: ignore[arg-type]
        orientation=orientation,  # type: ignore[arg-type]
        pixel_spacing=spacing,  # type: ignore[arg-type]
        rows=rows,
        columns=columns,
        n_frames=n_frames,
        samples_per_pixel=samples,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        signed=_integer(ds, "PixelRepresentation") == 1,
        slope=_number(ds, "RescaleSlope"),
        intercept=_number(ds, "RescaleIntercept"),
        padding_value=_integer(ds, "PixelPaddingValue"),
        padding_limit=padding_limit,
        instance_number=_integer(ds, "InstanceNumber"),
        slice_thickness=_number(ds, "SliceThickness"),
        transfer_syntax=transfer_syntax,
        gantry_tilt=_number(ds, "GantryDetectorTilt"),
        kernel=_text(ds, "ConvolutionKernel"),
        manufacturer=_text(ds, "Manufacturer"),
        model=_text(ds, "ManufacturerModelName"),
        kvp=_number(ds, "KVP"),
        truncated=truncated,
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        birth_date=_text(ds, "PatientBirthDate"),
        accession=_text(ds, "AccessionNumber"),
    )


# --------------------------------------------------------------------------- decoders


def transfer_syntax_name(uid: str) -> str:
    """Readable name of a transfer syntax UID (the cleaned UID when unknown)."""
    name = UID(uid).name if uid else ""
    return clean_text(name if name and name != uid else uid or "unknown", max_length=80)


def decoder_available(transfer_syntax_uid: str) -> bool:
    """True when pydicom has a working decoder (pylibjpeg plugin, GDCM, Pillow) for the syntax."""
    uid = UID(transfer_syntax_uid)
    if not uid.is_transfer_syntax:
        return False
    if not uid.is_compressed or uid == "1.2.840.10008.1.2.1.99":
        return True
    try:
        return bool(pydicom.pixels.get_decoder(uid).is_available)
    except NotImplementedError:
        return False


def require_decoder(transfer_syntax_uid: str, series_label: str) -> None:
    """Raise ``DecoderMissingError`` naming the package to install when no decoder is present."""
    if decoder_available(transfer_syntax_uid):
        return
    name = transfer_syntax_name(transfer_syntax_uid)
    package = _DECODER_PACKAGES.get(transfer_syntax_uid)
    if package is None:
        raise DecoderMissingError(
            f"series {series_label}: pixel data use the transfer syntax {name}, which no installed "
            "decoder reads; convert the series to uncompressed DICOM (e.g. dcmdjpeg/gdcmconv) first"
        )
    raise DecoderMissingError(
        f"series {series_label}: pixel data are compressed as {name} and no decoder is installed; "
        f"install one: pip install pylibjpeg {package} (or pip install python-gdcm)"
    )


# --------------------------------------------------------------------------- planning


def short_uid(uid: str) -> str:
    """Last 12 characters of a UID (UIDs share their organisation root, the end tells them apart)."""
    return clean_text(uid[-12:] if len(uid) > 12 else uid)


def orientation_label(normal: npt.ArrayLike) -> str:
    """axial / coronal / sagittal by the dominant LPS component of the slice normal, else oblique."""
    components = np.abs(np.asarray(normal, dtype=np.float64))
    if components.max() < 0.8:  # more than about 37 degrees off every main plane
        return "oblique"
    return ("sagittal", "coronal", "axial")[int(components.argmax())]


def _unit(vector: npt.ArrayLike) -> npt.NDArray[np.float64]:
    array = np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(array))
    return array / norm if norm > 0 else array


def _name_files(headers: Iterable[SliceHeader], root: Path | None, limit: int = 3) -> str:
    names = [display_path(h.path, root) for h in headers]
    extra = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + extra


def series_label(uid: str) -> str:
    return "…" + short_uid(uid) if len(uid) > 12 else clean_text(uid)


def plan_series(headers: Sequence[SliceHeader], config: IngestConfig, root: Path | None = None) -> SeriesPlan:
    """Check one series from its headers and order its slices; raise what a user must fix.

    Drops (with a warning or note naming the files) what can be dropped safely:
    localizers, truncated files, files without geometry, a minority matrix or
    pixel spacing, copies of the same instance. Raises ``UnsupportedInputError``
    (not CT, multi-frame, colour, one slice, absurd size), ``GeometryError``
    (mixed orientations, gaps beyond ``max_gap_factor``) or ``DecoderMissingError``.
    """
    label = series_label(headers[0].series_uid) if headers else "?"
    warn: list[str] = []
    notes: list[str] = []

    def drop(
        selected: list[SliceHeader], bad: Callable[[SliceHeader], bool], why: str, as_warning: bool
    ) -> list[SliceHeader]:
        removed = [h for h in selected if bad(h)]
        if removed:
            text = f"{len(removed)} file(s) skipped, {why}: {_name_files(removed, root)}"
            (warn if as_warning else notes).append(text)
        return [h for h in selected if not bad(h)]

    slices = drop(list(headers), lambda h: h.is_localizer, "localizer/scout images", as_warning=False)
    if not slices:
        raise UnsupportedInputError(
            f"series {label} holds only localizer/scout images; choose the axial CT series instead"
        )
    modality = Counter(h.modality for h in slices).most_common(1)[0][0]
    if modality != "CT":
        what = _MODALITY_NAMES.get(modality, "not CT")
        raise UnsupportedInputError(
            f"series {label} is modality {clean_text(modality) or 'unknown'} ({what}); "
            "corona-ct analyses CT only: pass a chest CT series"
        )
    multi_frame = [
        h
        for h in slices
        if h.n_frames > 1 or h.sop_class_uid in (ENHANCED_CT_STORAGE, LEGACY_ENHANCED_CT_STORAGE)
    ]
    if multi_frame:
        raise UnsupportedInputError(
            f"series {label}: {_name_files(multi_frame, root)} is an Enhanced/multi-frame CT object, which "
            "corona-ct does not read; convert it to single-frame CT images or NIfTI (e.g. dcm2niix) and pass that"
        )
    colour = [h for h in slices if h.samples_per_pixel != 1]
    if colour:
        raise UnsupportedInputError(
            f"series {label}: {_name_files(colour, root)} holds colour pixels ({colour[0].samples_per_pixel} "
            "samples per pixel), not CT values; pass the original greyscale CT series"
        )
    # Refuse absurd declared sizes from the header alone, before any pixel data are read.
    limit = config.max_pixels_per_slice
    oversized = [h for h in slices if h.rows * h.columns > limit or h.rows < 1 or h.columns < 1]
    if len(oversized) == len(slices):
        raise UnsupportedInputError(
            f"series {label}: header of {_name_files(oversized, root)} declares {oversized[0].rows}×"
            f"{oversized[0].columns} pixels per slice, over ingest.max_pixels_per_slice={limit} (or zero); "
            "the file is damaged or not a CT slice (raise the limit only if the size is genuine)"
        )
    slices = drop(
        slices, lambda h: h in oversized, f"declared matrix over {limit} pixels or empty", as_warning=True
    )
    slices = drop(slices, lambda h: h.truncated, "truncated (pixel data incomplete)", as_warning=True)
    slices = drop(
        slices,
        lambda h: h.position is None or h.orientation is None or h.pixel_spacing is None,
        "no ImagePositionPatient/ImageOrientationPatient/PixelSpacing",
        as_warning=True,
    )
    if not slices:
        raise GeometryError(
            f"series {label}: no file carries complete position, orientation and pixel spacing "
            "(or all are truncated); re-export the series from the scanner or PACS"
        )

    # Copies of one instance (same SOPInstanceUID under another name) add nothing.
    seen: dict[str, SliceHeader] = {}
    copies: list[SliceHeader] = []
    for header in slices:
        if header.sop_instance_uid and header.sop_instance_uid in seen:
            copies.append(header)
        elif header.sop_instance_uid:
            seen[header.sop_instance_uid] = header
    if copies:
        notes.append(
            f"{len(copies)} duplicate file(s) of the same instance skipped: {_name_files(copies, root)}"
        )
        slices = [h for h in slices if h not in copies]

    # One matrix and pixel spacing per volume: keep the majority, drop stray slices loudly.
    def matrix_key(h: SliceHeader) -> tuple[int, int, float, float]:
        row_mm, col_mm = h.pixel_spacing or (0.0, 0.0)
        return (h.rows, h.columns, round(row_mm, 4), round(col_mm, 4))

    majority = Counter(matrix_key(h) for h in slices).most_common(1)[0][0]
    slices = drop(
        slices,
        lambda h: matrix_key(h) != majority,
        f"matrix or pixel spacing differs from the series' {majority[0]}×{majority[1]}, "
        f"{majority[2]}×{majority[3]} mm",
        as_warning=True,
    )
    if len(slices) > config.max_slices:
        raise UnsupportedInputError(
            f"series {label} has {len(slices)} slices, over ingest.max_slices={config.max_slices}; "
            "pass a smaller series or raise the limit"
        )

    orientations = Counter(tuple(np.round(h.orientation or (), 3)) for h in slices)
    if len(orientations) > 1:
        groups = []
        for orient, count in orientations.most_common():
            members = [h for h in slices if tuple(np.round(h.orientation or (), 3)) == orient]
            normal = np.cross(orient[:3], orient[3:])
            groups.append(f"{count} {orientation_label(normal)} ({_name_files(members, root, 2)})")
        raise GeometryError(
            f"series {label} mixes slice orientations: {'; '.join(groups)}; remove the stray files or "
            "export one orientation per series"
        )
    orientation = np.asarray(slices[0].orientation, dtype=np.float64)
    row_dir, col_dir = _unit(orientation[:3]), _unit(orientation[3:])
    if abs(float(np.dot(row_dir, col_dir))) > 1e-3 or np.linalg.norm(orientation[:3]) == 0:
        raise GeometryError(
            f"series {label}: ImageOrientationPatient {orientation.tolist()} is not two orthogonal directions; "
            "the header is damaged"
        )
    normal = _unit(np.cross(row_dir, col_dir))

    positions = np.asarray([h.position for h in slices], dtype=np.float64)
    along = positions @ normal
    order = np.lexsort((np.arange(len(slices)), along))
    slices = [slices[i] for i in order]
    positions, along = positions[order], along[order]

    # Slices at one position: identical copies are dropped at decode time, different images refused.
    same_groups: list[tuple[int, ...]] = []
    start = 0
    for index in range(1, len(slices) + 1):
        if index == len(slices) or along[index] - along[start] > SAME_POSITION_MM:
            if index - start > 1:
                same_groups.append(tuple(range(start, index)))
            start = index
    if same_groups:
        examples = "; ".join(
            f"z={along[g[0]]:.2f}: {_name_files([slices[i] for i in g], root, 2)}" for g in same_groups[:3]
        )
        warn.append(
            f"{sum(len(g) - 1 for g in same_groups)} slice(s) share a position with another ({examples}); "
            "identical copies are dropped, different images at one position stop the load"
        )
    unique_index = [0, *[i for i in range(1, len(slices)) if along[i] - along[i - 1] > SAME_POSITION_MM]]
    unique_along = along[unique_index]
    if len(unique_index) < max(config.min_slices, 2):
        raise UnsupportedInputError(
            f"series {label} has {len(unique_index)} slice(s) at distinct positions; a CT volume needs at least "
            f"{max(config.min_slices, 2)}: pass the whole series, not a single image"
        )

    gaps = np.diff(unique_along)
    nominal = float(np.median(gaps))
    deviation = np.abs(gaps - nominal) / nominal
    if np.any(deviation > config.spacing_tolerance):
        odd = np.flatnonzero(deviation > config.spacing_tolerance)
        where = ", ".join(
            f"{gaps[i]:.2f} mm between z={unique_along[i]:.2f} and {unique_along[i + 1]:.2f}" for i in odd[:5]
        )
        too_large = np.flatnonzero(gaps > config.max_gap_factor * nominal)
        if too_large.size:
            i = int(too_large[0])
            raise GeometryError(
                f"series {label}: gap of {gaps[i]:.2f} mm between slices at z={unique_along[i]:.2f} and "
                f"z={unique_along[i + 1]:.2f} mm, over {config.max_gap_factor:g}× the usual {nominal:.2f} mm; "
                "slices are missing: re-export the complete series (or raise ingest.max_gap_factor)"
            )
        warn.append(
            f"uneven slice spacing (usual {nominal:.2f} mm): {where}"
            f"{' …' if odd.size > 5 else ''}; slices may be missing, so lengths and volumes along z are approximate"
        )

    numbers = [slices[i].instance_number for i in unique_index]
    if all(n is not None for n in numbers) and len(set(numbers)) == len(numbers):
        steps = np.diff(np.asarray(numbers, dtype=np.int64))
        if not (np.all(steps > 0) or np.all(steps < 0)):
            warn.append(
                "InstanceNumber order contradicts the slice positions; slices are ordered by "
                "ImagePositionPatient, not InstanceNumber"
            )

    # Gantry tilt: positions advance off the slice normal; shear each slice back onto one column.
    travel = positions[-1] - positions[0]
    tilt = 0.0
    if np.linalg.norm(travel) > 0:
        cos_tilt = abs(float(np.dot(_unit(travel), normal)))
        tilt = float(np.degrees(np.arccos(min(1.0, cos_tilt))))
    offsets = positions - positions[0] - np.outer(along - along[0], normal)
    if tilt > config.max_tilt_degrees:
        stated = slices[0].gantry_tilt
        stated_text = f", GantryDetectorTilt {stated:g}°" if stated is not None else ""
        warn.append(
            f"gantry tilt of {tilt:.1f}°{stated_text}: slices resampled by shear onto an orthogonal grid "
            "(linear interpolation, -1000 HU outside)"
        )
        inplane = tuple((float(o @ col_dir), float(o @ row_dir)) for o in offsets)
    else:
        inplane = tuple((0.0, 0.0) for _ in slices)

    missing_rescale = [h for h in slices if h.slope is None or h.intercept is None]
    if missing_rescale:
        warn.append(
            f"RescaleSlope/RescaleIntercept missing in {len(missing_rescale)} of {len(slices)} files (CT Image "
            "Storage requires them): assumed slope 1 and intercept 0, i.e. stored values taken as HU"
        )
    if len({(h.slope, h.intercept) for h in slices}) > 1 and not missing_rescale:
        notes.append("rescale slope/intercept differ between slices; each slice is rescaled with its own")
    syntaxes = sorted({h.transfer_syntax for h in slices})
    if len(syntaxes) > 1:
        notes.append(
            f"files use {len(syntaxes)} transfer syntaxes: {', '.join(transfer_syntax_name(s) for s in syntaxes)}"
        )
    if any(s in _LOSSY_SYNTAXES for s in syntaxes):
        warn.append("lossy compression: HU values are approximate")
    for syntax in syntaxes:
        require_decoder(syntax, label)

    spacing_row, spacing_col = slices[0].pixel_spacing or (1.0, 1.0)
    return SeriesPlan(
        slices=tuple(slices),
        positions_mm=tuple(float(a) for a in along),
        spacing_mm=(nominal, float(spacing_row), float(spacing_col)),
        row_direction=tuple(row_dir.tolist()),
        column_direction=tuple(col_dir.tolist()),
        normal=tuple(normal.tolist()),
        tilt_degrees=tilt,
        inplane_offsets_mm=inplane,
        same_position=tuple(same_groups),
        warnings=tuple(warn),
        notes=tuple(notes),
    )


def describe_series(
    headers: Sequence[SliceHeader], config: IngestConfig, root: Path | None = None
) -> SeriesInfo:
    """Summarise one series for listing and choosing; problems become ``problem``, never exceptions."""
    first = headers[0]
    for line in summarise_pydicom_messages(headers):
        log.warning("series %s: %s", series_label(first.series_uid), line)
    modality = Counter(h.modality for h in headers).most_common(1)[0][0]
    image_types = Counter(h.image_type for h in headers if not h.is_localizer) or Counter(
        h.image_type for h in headers
    )
    thickness = Counter(h.slice_thickness for h in headers if h.slice_thickness is not None).most_common(1)
    syntax = Counter(h.transfer_syntax for h in headers).most_common(1)[0][0]
    common: dict[str, Any] = {
        "uid": first.series_uid,
        "short_uid": short_uid(first.series_uid),
        "modality": clean_text(modality) or "unknown",
        "image_type": tuple(clean_text(p) for p in image_types.most_common(1)[0][0]),
        "slice_thickness_mm": thickness[0][0] if thickness else None,
        "transfer_syntax": transfer_syntax_name(syntax),
        "transfer_syntax_uid": syntax,
        "series_number": first.series_number,
        "headers": tuple(headers),
    }
    no_uid = (
        ("files carry no SeriesInstanceUID; grouped by folder and frame of reference",)
        if first.series_uid.startswith("nouid-")
        else ()
    )
    try:
        plan = plan_series(headers, config, root)
    except InputError as error:
        orientation = first.orientation
        label = orientation_label(np.cross(orientation[:3], orientation[3:])) if orientation else "unknown"
        return SeriesInfo(
            n_slices=len(headers),
            slice_spacing_mm=None,
            pixel_spacing_mm=first.pixel_spacing,
            orientation=label,
            warnings=no_uid,
            files=tuple(h.path for h in headers),
            matrix=(first.rows, first.columns),
            problem=str(error),
            problem_type=type(error),
            **common,
        )
    distinct = len(plan.slices) - sum(len(g) - 1 for g in plan.same_position)
    return SeriesInfo(
        n_slices=distinct,
        slice_spacing_mm=plan.spacing_mm[0],
        pixel_spacing_mm=(plan.spacing_mm[1], plan.spacing_mm[2]),
        orientation=orientation_label(plan.normal),
        warnings=no_uid + plan.warnings,
        files=tuple(h.path for h in plan.slices),
        matrix=(plan.slices[0].rows, plan.slices[0].columns),
        tilt_degrees=plan.tilt_degrees,
        notes=plan.notes,
        **common,
    )


# --------------------------------------------------------------------------- pixels


def stored_values(raw: npt.NDArray[Any], bits_stored: int, signed: bool) -> npt.NDArray[np.int64]:
    """Stored pixel values with the unused high bits masked off and, if signed, sign-extended."""
    values = raw.astype(np.int64) & ((1 << bits_stored) - 1)
    if signed:
        sign_bit = 1 << (bits_stored - 1)
        values = (values ^ sign_bit) - sign_bit
    return values


def decode_stored_values(header: SliceHeader, root: Path | None = None) -> npt.NDArray[np.int64]:
    """Decode one file's pixels to (rows, columns) stored values (masked, sign-extended).

    Raises ``InputError`` naming the file when the pixel data are missing, short or undecodable.
    """
    name = display_path(header.path, root)
    expected = header.rows * header.columns
    try:
        with warnings.catch_warnings(), _pydicom_log_captured():
            # pydicom's header warnings were summarised once per series when it was described.
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(header.path, force=True)
            if "PixelData" not in ds:
                raise InputError(f"{name}: no pixel data (file truncated); skip or replace the file")
            if (
                UID(header.transfer_syntax).is_compressed
                and header.transfer_syntax != "1.2.840.10008.1.2.1.99"
            ):
                raw = np.asarray(ds.pixel_array)
            else:
                byte_order = ">" if header.transfer_syntax == "1.2.840.10008.1.2.2" else "<"
                dtype = np.dtype(f"{byte_order}u{header.bits_allocated // 8}")
                data = ds.PixelData
                if len(data) < expected * dtype.itemsize:
                    raise InputError(
                        f"{name}: pixel data hold {len(data)} bytes, {expected * dtype.itemsize} expected "
                        "(file truncated); replace the file"
                    )
                raw = np.frombuffer(data, dtype=dtype, count=expected)
    except InputError:
        raise
    except _READ_ERRORS as error:
        raise InputError(
            f"{name}: pixel data cannot be decoded ({clean_text(type(error).__name__)}: "
            f"{clean_text(error, 120)}); the file is damaged, replace or remove it"
        ) from None
    if raw.size != expected:
        raise InputError(f"{name}: decoded {raw.size} pixels, header declares {header.rows}×{header.columns}")
    return stored_values(raw.reshape(header.rows, header.columns), header.bits_stored, header.signed)


def padding_mask(stored: npt.NDArray[np.int64], header: SliceHeader) -> npt.NDArray[np.bool_] | None:
    """Pixels the scanner marked as padding (PixelPaddingValue, optionally a range), or None."""
    if header.padding_value is None:
        return None
    bounds = stored_values(
        np.asarray(
            [
                header.padding_value,
                header.padding_limit if header.padding_limit is not None else header.padding_value,
            ]
        ),
        header.bits_stored,
        header.signed,
    )
    low, high = int(bounds.min()), int(bounds.max())
    return (stored >= low) & (stored <= high)


def _deshear(
    hu: FloatArray, offsets_mm: Sequence[tuple[float, float]], pixel_mm: tuple[float, float]
) -> None:
    """Shift each slice in plane by its tilt offset so all slices share slice 0's columns (in place)."""
    from scipy import ndimage

    for index, (along_rows, along_columns) in enumerate(offsets_mm):
        if along_rows or along_columns:
            shift = (along_rows / pixel_mm[0], along_columns / pixel_mm[1])
            hu[index] = ndimage.shift(hu[index], shift, order=1, mode="constant", cval=PADDING_HU)


def canonical_reorder(
    array: npt.NDArray[Any],
    spacing_mm: Sequence[float],
    origin_lps: npt.ArrayLike,
    axes_lps: npt.ArrayLike,
) -> tuple[npt.NDArray[Any], Geometry]:
    """Permute and flip (never resample) a (z, y, x) array so its axes point to +S, +P, +L.

    ``axes_lps`` rows are the LPS unit vectors of the array axes in array order.
    Returns the re-ordered array and its geometry.
    """
    axes = np.asarray(axes_lps, dtype=np.float64)
    targets = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    perm = max(
        itertools.permutations(range(3)),
        key=lambda p: sum(abs(float(axes[p[i]] @ targets[i])) for i in range(3)),
    )
    new_axes = axes[list(perm)]
    flips = [i for i in range(3) if float(new_axes[i] @ targets[i]) < 0]
    shape = [array.shape[p] for p in perm]
    spacing = [float(spacing_mm[p]) for p in perm]
    origin = np.asarray(origin_lps, dtype=np.float64).copy()
    for i in flips:
        origin += (shape[i] - 1) * spacing[i] * new_axes[i]
        new_axes[i] = -new_axes[i]
    reordered = np.ascontiguousarray(
        np.flip(array.transpose(perm), axis=tuple(flips)) if flips else array.transpose(perm)
    )
    geometry = Geometry(
        shape=(shape[0], shape[1], shape[2]),
        spacing_mm=(spacing[0], spacing[1], spacing[2]),
        origin_lps=(float(origin[0]), float(origin[1]), float(origin[2])),
        axes_lps=tuple((float(row[0]), float(row[1]), float(row[2])) for row in new_axes),
    )
    return reordered, geometry


def _meta(plan: SeriesPlan, info: SeriesInfo, n_slices: int) -> dict[str, str | int | float]:
    first = plan.slices[0]

    def joined(value: str) -> str:
        return "\\".join(clean_text(part) for part in value.split("\\") if part)

    meta: dict[str, str | int | float] = {
        "Modality": "CT",
        "SeriesInstanceUID": clean_text(info.uid, max_length=80),
        "TransferSyntaxUID": clean_text(first.transfer_syntax, max_length=80),
        "ImageType": "\\".join(info.image_type),
        "PixelSpacing": f"{plan.spacing_mm[1]:.10g}\\{plan.spacing_mm[2]:.10g}",
        "SpacingBetweenSlices": round(plan.spacing_mm[0], 6),
        "NumberOfSlices": n_slices,
    }
    if first.slice_thickness is not None:
        meta["SliceThickness"] = first.slice_thickness
    if first.kvp is not None:
        meta["KVP"] = first.kvp
    for key, value in (
        ("ConvolutionKernel", first.kernel),
        ("Manufacturer", first.manufacturer),
        ("ManufacturerModelName", first.model),
    ):
        if value:
            meta[key] = joined(value)
    return meta


def read_series(
    info: SeriesInfo,
    config: IngestConfig,
    study_id: str,
    source: str,
    root: Path | None = None,
    extra_warnings: Sequence[str] = (),
    decode: Callable[[SliceHeader, Path | None], npt.NDArray[np.int64]] = decode_stored_values,
) -> Volume:
    """Decode a described series into a canonical HU ``Volume`` (float32, z, y, x).

    Rescale is applied per slice, padding pixels become -1000 HU, a gantry tilt is
    sheared out, unreadable files are skipped with a warning when the rest still
    forms a volume.
    """
    plan = plan_series(info.headers, config, root)
    label = series_label(info.uid)
    rows, columns = plan.slices[0].rows, plan.slices[0].columns
    require_memory(
        volume_bytes_needed(len(plan.slices) * rows * columns),
        f"series {label} ({source})",
        f"{len(plan.slices)} slices of {columns}×{rows} pixels",
    )
    warn = list(plan.warnings) + list(extra_warnings)
    hu = np.empty((len(plan.slices), plan.slices[0].rows, plan.slices[0].columns), dtype=np.float32)
    stored_by_slice: dict[int, npt.NDArray[np.int64]] = {}
    failed: list[int] = []
    padded = implausible = 0
    for index, header in enumerate(plan.slices):
        try:
            stored = decode(header, root)
        except InputError as error:
            warn.append(f"skipped: {error}")
            failed.append(index)
            continue
        if any(index in group for group in plan.same_position):
            stored_by_slice[index] = stored
        slope = 1.0 if header.slope is None else header.slope
        intercept = 0.0 if header.intercept is None else header.intercept
        slice_hu = stored * slope + intercept  # float64, exact for integer slopes
        padding = padding_mask(stored, header)
        if padding is not None:
            padded += int(padding.sum())
            slice_hu[padding] = PADDING_HU
        # Scanners also fill outside the field of view with values the padding tag does not name.
        fill = slice_hu < IMPLAUSIBLE_HU
        implausible += int(fill.sum())
        slice_hu[fill] = PADDING_HU
        hu[index] = slice_hu

    keep = [i for i in range(len(plan.slices)) if i not in failed]
    for group in plan.same_position:
        present = [i for i in group if i not in failed]
        for other in present[1:]:
            if not np.array_equal(stored_by_slice[present[0]], stored_by_slice[other]):
                files = _name_files([plan.slices[i] for i in group], root)
                raise GeometryError(
                    f"series {label}: different images at the same position z={plan.positions_mm[group[0]]:.2f} mm "
                    f"({files}); the series mixes acquisitions: remove one set of files or choose another series"
                )
            keep.remove(other)
        if len(present) > 1:
            warn.append(
                f"{len(present) - 1} identical duplicate slice(s) at z={plan.positions_mm[group[0]]:.2f} dropped: "
                f"{_name_files([plan.slices[i] for i in present[1:]], root)}"
            )
    if failed:
        kept_positions = np.asarray([plan.positions_mm[i] for i in keep])
        if kept_positions.size < max(config.min_slices, 2):
            raise InputError(
                f"series {label}: too few readable slices ({kept_positions.size}); see the files named above"
            )
        gaps = np.diff(kept_positions)
        if gaps.size and gaps.max() > config.max_gap_factor * plan.spacing_mm[0]:
            raise GeometryError(
                f"series {label}: unreadable files leave a {gaps.max():.2f} mm gap (usual {plan.spacing_mm[0]:.2f} mm); "
                f"replace the damaged files: {_name_files([plan.slices[i] for i in failed], root)}"
            )
    if padded:
        warn.append(f"{padded} pixels marked by PixelPaddingValue set to {PADDING_HU:g} HU (air)")
    if implausible:
        warn.append(
            f"{implausible} pixels below {IMPLAUSIBLE_HU:g} HU (not tissue or air; not named by PixelPaddingValue) "
            f"treated as fill outside the scan field and set to {PADDING_HU:g} HU"
        )
    if len(keep) < len(plan.slices):
        hu = hu[keep]
    offsets = [plan.inplane_offsets_mm[i] for i in keep]
    if plan.tilt_degrees > config.max_tilt_degrees:
        _deshear(hu, offsets, (plan.spacing_mm[1], plan.spacing_mm[2]))

    kept_positions = np.asarray([plan.positions_mm[i] for i in keep])
    spacing_z = float(np.median(np.diff(kept_positions))) if len(keep) > 1 else plan.spacing_mm[0]
    origin = np.asarray(plan.slices[keep[0]].position, dtype=np.float64)
    if plan.tilt_degrees > config.max_tilt_degrees:
        # After the shear every slice shares slice 0's in-plane position; move the origin along the normal only.
        origin = np.asarray(plan.slices[0].position) + (
            kept_positions[0] - plan.positions_mm[0]
        ) * np.asarray(plan.normal)
    axes = np.asarray([plan.normal, plan.column_direction, plan.row_direction])
    array, geometry = canonical_reorder(hu, (spacing_z, plan.spacing_mm[1], plan.spacing_mm[2]), origin, axes)
    meta = _meta(plan, info, len(keep))
    meta["SpacingBetweenSlices"] = round(spacing_z, 6)
    return Volume(
        array=array.astype(np.float32, copy=False),
        units="HU",
        geometry=geometry,
        study_id=study_id,
        source=source,
        meta=meta,
        warnings=tuple(warn),
    )
