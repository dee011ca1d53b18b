"""One DICOM file's header: ``scan_file`` reads it (no pixel data) into a ``SliceHeader``.

A file that is no CT image slice (not DICOM, a DICOMDIR, a report, a screenshot...)
gives the reason it is skipped instead. Also the labels every message uses for a
series (``series_label``) and for a slice orientation (``orientation_label``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import (
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    LegacyConvertedEnhancedCTImageStorage,
    MediaStorageDirectoryStorage,
)

from corona_ct.pipeline.ingest.deid import clean_text, display_path
from corona_ct.pipeline.ingest.dicom.codecs import READ_ERRORS, native_size_known, pydicom_log_captured

#: Multi-frame CT SOP classes, which corona-ct does not read (converted to single frames first).
MULTI_FRAME_CT_STORAGE = (EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage)

#: ``scan_file``'s reason for a file that is no DICOM at all.
NOT_DICOM = "not a DICOM file"

_LOCALIZER_TYPES = {"LOCALIZER", "SCOUT", "TOPOGRAM", "SURVEY", "SCANOGRAM"}
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


def _raw(ds: Any, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except READ_ERRORS:
        return None


def _text(ds: Any, keyword: str) -> str:
    value = _raw(ds, keyword)
    if value is None:
        return ""
    try:
        if isinstance(value, MultiValue | list | tuple):
            return "\\".join(str(v) for v in value).strip()
        return str(value).strip()
    except READ_ERRORS:
        return ""


def _numbers(ds: Any, keyword: str, count: int) -> tuple[float, ...] | None:
    value = _raw(ds, keyword)
    if value is None or value == "":
        return None
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    try:
        numbers = tuple(float(v) for v in items)
    except READ_ERRORS:
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
    except READ_ERRORS:
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
        return str(ImplicitVRLittleEndian)
    return str(ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _skip_reason(ds: Any, sop_class: str) -> str | None:
    if sop_class == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds:
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


def scan_file(path: Path) -> SliceHeader | str:
    """Read one file's header; return it, or the reason the file is skipped.

    pydicom's log messages (e.g. COVID-CT-MD's UIDs are not valid DICOM UIDs) are kept
    in ``SliceHeader.pydicom_messages`` for one summary line per series, not printed per file.
    """
    with warnings.catch_warnings(), pydicom_log_captured() as messages:
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
        return NOT_DICOM
    except READ_ERRORS as error:
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
    truncated = at_end or (native_size_known(transfer_syntax) and size < pixel_offset + expected_bytes)
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


# --------------------------------------------------------------------------- labels


def short_uid(uid: str) -> str:
    """Last 12 characters of a UID (UIDs share their organisation root, the end tells them apart)."""
    return clean_text(uid[-12:] if len(uid) > 12 else uid)


def orientation_label(normal: npt.ArrayLike) -> str:
    """axial / coronal / sagittal by the dominant LPS component of the slice normal, else oblique."""
    components = np.abs(np.asarray(normal, dtype=np.float64))
    if components.max() < 0.8:  # more than about 37 degrees off every main plane
        return "oblique"
    return ("sagittal", "coronal", "axial")[int(components.argmax())]


def unit_vector(vector: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """``vector`` scaled to length 1 (a zero vector is returned as it is)."""
    array = np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(array))
    return array / norm if norm > 0 else array


def name_files(headers: Iterable[SliceHeader], root: Path | None, limit: int = 3) -> str:
    """The first ``limit`` file names (safe to print, relative to ``root``) and how many more."""
    names = [display_path(h.path, root) for h in headers]
    extra = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + extra


def series_label(uid: str) -> str:
    """How messages name a series: ``…`` plus the short UID, or the whole UID when short."""
    return "…" + short_uid(uid) if len(uid) > 12 else clean_text(uid)
