"""Writers of CT as files: DICOM series, NIfTI, COVID-CTset TIFF and 8-bit PNG slices.

:func:`ct_image_dataset` is the project's one builder of a CT Image Storage instance;
the phantom writer (:func:`write_dicom_series`) and the ingest tests' factory both use it.
Every file is written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import tifffile
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from corona_ct.pipeline.atomic import atomic_path
from corona_ct.pipeline.errors import ConfigError
from corona_ct.pipeline.ingest.nifti import write_nifti as write_nifti_array

if TYPE_CHECKING:
    from corona_ct.data.phantom import Phantom

IntArray = npt.NDArray[np.int16]


def ct_image_dataset(
    stored: npt.NDArray[np.generic],
    *,
    position_mm: Sequence[float],
    orientation: Sequence[float],
    pixel_spacing_mm: tuple[float, float],
    thickness_mm: float,
    study_uid: str,
    series_uid: str,
    sop_uid: str | None = None,
    instance_number: int = 1,
    bits_stored: int = 16,
    signed: bool = True,
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    sop_class: str = CTImageStorage,
    attributes: Mapping[str, object] | None = None,
) -> FileDataset:
    """One single-frame CT image of ``stored`` (rows, columns) pixels, Explicit VR Little Endian.

    ``position_mm``/``orientation`` are ImagePositionPatient/ImageOrientationPatient (LPS);
    ``slope``/``intercept`` None leave the rescale attributes out (a malformed file on
    purpose); ``attributes`` sets any further element by keyword (patient, study,
    acquisition) and may override the defaults set here.
    """
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = UID(sop_uid)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "frame of reference"])
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [_ds(v) for v in position_mm]
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    ds.PixelSpacing = [_ds(v) for v in pixel_spacing_mm]
    ds.SliceThickness = _ds(thickness_mm)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(n) for n in stored.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if slope is not None:
        ds.RescaleSlope = _ds(slope)
    if intercept is not None:
        ds.RescaleIntercept = _ds(intercept)
    for keyword, value in (attributes or {}).items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(stored).astype("<i2" if signed else "<u2").tobytes()
    return ds


def _ds(value: float) -> str:
    """A decimal string (DS) of at most 16 characters, as precise as DICOM allows."""
    return str(format_number_as_ds(float(value)))


def _stored_values(hu: IntArray, intercept: float, slope: float) -> tuple[np.ndarray, int, int]:
    """Stored pixel values for ``HU = stored × slope + intercept``, exact, with (PixelRepresentation, BitsStored)."""
    if slope == 0:
        raise ConfigError("rescale_slope must not be 0")
    stored = np.rint((hu.astype(np.float64) - intercept) / slope)
    if not np.array_equal(stored * slope + intercept, hu.astype(np.float64)):
        raise ConfigError(
            f"HU values are not exactly representable with RescaleSlope {slope} and RescaleIntercept {intercept}"
        )
    low, high = float(stored.min()), float(stored.max())
    if low >= 0 and high <= 65535:
        bits_stored = 12 if high <= 4095 else 16
        return stored.astype("<u2"), 0, bits_stored
    if low >= -32768 and high <= 32767:
        return stored.astype("<i2"), 1, 16
    raise ConfigError(
        f"stored values [{low:.0f}, {high:.0f}] do not fit 16 bits; change the rescale intercept"
    )


def write_dicom_series(
    phantom: Phantom,
    folder: Path,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_name: str = "PHANTOM^DEMO",
    patient_id: str = "PHANTOM-0",
    rescale_intercept: float = -1024.0,
    rescale_slope: float = 1.0,
    shuffle_names: bool = False,
    seed: int = 0,
) -> list[Path]:
    """Write the phantom as one CT Image Storage series (Explicit VR Little Endian), one file per slice.

    Stored value = (HU − intercept) / slope, exactly; PixelRepresentation and
    BitsStored follow the stored range. UIDs derive deterministically from
    ``seed`` unless given. ``shuffle_names`` gives file names unrelated to slice
    order (readers must sort by position). Returns the paths in slice order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entropy = ["corona-ct phantom", str(seed), str(phantom.seed)]
    study_uid = study_uid or generate_uid(entropy_srcs=[*entropy, "study"])
    series_uid = series_uid or generate_uid(entropy_srcs=[*entropy, study_uid, "series"])
    stored, pixel_representation, bits_stored = _stored_values(phantom.hu, rescale_intercept, rescale_slope)

    geometry = phantom.geometry
    n_slices = geometry.shape[0]
    row_direction, column_direction = geometry.axes_lps[2], geometry.axes_lps[1]
    normal = np.asarray(geometry.axes_lps[0])
    numbers = np.arange(1, n_slices + 1)
    if shuffle_names:
        numbers = np.random.default_rng(seed).permutation(numbers)
    identity = {
        "PositionReferenceIndicator": "",
        "PatientName": patient_name,
        "PatientID": patient_id,
        "PatientBirthDate": "",
        "PatientSex": "O",
        "StudyDate": "20200401",
        "SeriesDate": "20200401",
        "ContentDate": "20200401",
        "StudyTime": "120000",
        "SeriesTime": "120000",
        "ContentTime": "120000",
        "StudyID": "1",
        "AccessionNumber": "",
        "ReferringPhysicianName": "",
        "Manufacturer": "corona-ct phantom",
        "AcquisitionNumber": 1,
        "BodyPartExamined": "CHEST",
        "PatientPosition": "HFS",
        "KVP": "120",
        "ConvolutionKernel": "STANDARD",
        "SpacingBetweenSlices": _ds(geometry.spacing_mm[0]),
        "RescaleType": "HU",
        "WindowCenter": "-600",
        "WindowWidth": "1500",
    }
    affine_lps = geometry.affine_lps()
    paths = []
    for index in range(n_slices):
        position = (affine_lps @ np.array([index, 0.0, 0.0, 1.0]))[:3]
        ds = ct_image_dataset(
            stored[index],
            position_mm=position,
            orientation=(*row_direction, *column_direction),
            pixel_spacing_mm=(geometry.spacing_mm[1], geometry.spacing_mm[2]),
            thickness_mm=geometry.spacing_mm[0],
            study_uid=study_uid,
            series_uid=series_uid,
            sop_uid=generate_uid(entropy_srcs=[*entropy, series_uid, str(index)]),
            instance_number=index + 1,
            bits_stored=bits_stored,
            signed=bool(pixel_representation),
            slope=rescale_slope,
            intercept=rescale_intercept,
            attributes={**identity, "SliceLocation": _ds(float(np.dot(position, normal)))},
        )
        path = folder / f"IM{int(numbers[index]):05d}.dcm"
        with atomic_path(path) as temporary:
            ds.save_as(temporary, enforce_file_format=True)
        paths.append(path)
    return paths


def write_nifti(phantom: Phantom, path: Path) -> Path:
    """Write the phantom's int16 HU as NIfTI with the RAS affine ``geometry.affine_ras()`` (array as x, y, z)."""
    return write_nifti_array(Path(path), phantom.hu, phantom.to_volume(), dtype=np.int16)


def write_tiff_slices(
    phantom: Phantom, folder: Path, hu_offset: float = -1024.0, name_prefix: str = "P001_patient1_SR_1_"
) -> list[Path]:
    """COVID-CTset style 16-bit TIFF slices (raw = HU − ``hu_offset``, uint16), ``..._IM00001.tif`` upwards."""
    raw = phantom.hu.astype(np.float64) - hu_offset
    if raw.min() < 0 or raw.max() > 65535 or not np.array_equal(raw, np.rint(raw)):
        raise ConfigError(f"HU − {hu_offset} does not fit unsigned 16-bit integers; change hu_offset")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, raw_slice in enumerate(raw.astype(np.uint16)):
        path = folder / f"{name_prefix}IM{index + 1:05d}.tif"
        with atomic_path(path) as temporary:
            tifffile.imwrite(temporary, raw_slice, photometric="minisblack")
        paths.append(path)
    return paths


def window_to_uint8(hu: np.ndarray, window: tuple[float, float]) -> npt.NDArray[np.uint8]:
    """HU mapped linearly from ``window`` = (low, high) to 0..255, clipped and rounded."""
    low, high = window
    if high <= low:
        raise ConfigError(f"window {window} must be (low, high) with high > low")
    scaled = np.clip((hu.astype(np.float64) - low) / (high - low), 0.0, 1.0)
    return np.rint(scaled * 255.0).astype(np.uint8)


def write_png_slices(
    phantom: Phantom,
    folder: Path,
    window: tuple[float, float] = (-1000.0, 0.0),
    name_prefix: str = "phantom_slice_",
) -> list[Path]:
    """8-bit grey PNG slices windowed to ``window`` HU, named ``<prefix><n>.png`` with n = 1, 2, ... (unpadded)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, grey in enumerate(window_to_uint8(phantom.hu, window)):
        path = folder / f"{name_prefix}{index + 1}.png"
        with atomic_path(path) as temporary:
            Image.fromarray(grey).save(temporary, format="PNG")
        paths.append(path)
    return paths
