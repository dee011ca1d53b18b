"""Build small synthetic CT DICOM series with pydicom, with every knob the ingest tests need.

Geometry is explicit: slice ``k`` of a series lies at ``origin + k * spacing_z * normal
(+ k * shear)`` where ``normal = row_direction × column_direction``. ``world_of`` gives
the LPS position of a voxel (k, row, column) of what was written, an oracle
independent of the reader.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from corona_ct.data.writers import ct_image_dataset

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)

Mutator = Callable[[int, Dataset], None]


def phantom_hu(shape: tuple[int, int, int] = (6, 32, 32), seed: int = 0) -> npt.NDArray[np.int64]:
    """Integer HU: air background, a soft-tissue body, lung-like inside, random noise, a marker."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    cy, cx = (shape[1] - 1) / 2, (shape[2] - 1) / 2
    radius = np.hypot((y - cy) / (shape[1] / 2), (x - cx) / (shape[2] / 2))
    hu = np.where(radius < 0.8, 40, -1000) + np.where(radius < 0.5, -850, 0)
    hu = hu + rng.integers(-20, 21, size=shape) + 3 * z
    return hu.astype(np.int64)


def ct_slice(
    stored: npt.NDArray[Any],
    *,
    position: Sequence[float],
    orientation: Sequence[float] = AXIAL,
    pixel_spacing: tuple[float, float] = (0.7, 0.7),
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    study_uid: str = "1.2.826.0.1.3680043.8.498.1",
    series_uid: str = "1.2.826.0.1.3680043.8.498.1.1",
    instance_number: int = 1,
    modality: str = "CT",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    patient_id: str = "PAT-0001",
    patient_name: str = "Doe^Jane",
    thickness: float = 2.5,
    bits_stored: int = 16,
    signed: bool = True,
    sop_class: str = CT_STORAGE,
) -> Dataset:
    """One single-frame CT image (``data.writers.ct_image_dataset``) with identifying headers
    a de-identification test can look for."""
    return ct_image_dataset(
        np.asarray(stored),
        position_mm=position,
        orientation=orientation,
        pixel_spacing_mm=pixel_spacing,
        thickness_mm=thickness,
        study_uid=study_uid,
        series_uid=series_uid,
        instance_number=instance_number,
        bits_stored=bits_stored,
        signed=signed,
        slope=slope,
        intercept=intercept,
        sop_class=sop_class,
        attributes={
            "Modality": modality,
            "ImageType": list(image_type),
            "Manufacturer": "Factory",
            "ManufacturerModelName": "Synthetic-1",
            "PatientName": patient_name,
            "PatientID": patient_id,
            "PatientBirthDate": "19500101",
            "AccessionNumber": "ACC123456",
            "StudyDate": "20200301",
            "StudyTime": "120000",
            "StudyID": "1",
            "KVP": 120,
            "ConvolutionKernel": "B30f",
        },
    )


def slice_positions(
    n: int,
    origin: Sequence[float],
    spacing_z: float,
    orientation: Sequence[float] = AXIAL,
    shear: Sequence[float] = (0.0, 0.0, 0.0),
    z_offsets: Sequence[float] | None = None,
) -> npt.NDArray[np.float64]:
    """(n, 3) LPS positions: along the normal by ``spacing_z`` (or explicit offsets), plus ``k * shear``."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    along = np.arange(n) * spacing_z if z_offsets is None else np.asarray(z_offsets, float)
    return (
        np.asarray(origin, float) + along[:, None] * normal + np.arange(n)[:, None] * np.asarray(shear, float)
    )


def write_series(
    folder: Path,
    hu: npt.NDArray[Any],
    *,
    spacing: tuple[float, float, float] = (2.5, 0.7, 0.7),
    origin: Sequence[float] = (-11.2, -11.2, -100.0),
    orientation: Sequence[float] = AXIAL,
    shear: Sequence[float] = (0.0, 0.0, 0.0),
    z_offsets: Sequence[float] | None = None,
    slope: float | Sequence[float] = 1.0,
    intercept: float | Sequence[float] = -1024.0,
    names: Sequence[str] | None = None,
    instance_numbers: Sequence[int] | None = None,
    mutate: Mutator | None = None,
    transfer_syntax: str | None = None,
    **slice_kwargs: object,
) -> list[Path]:
    """Write ``hu`` (z, rows, columns) as one series; slice k at ``slice_positions(...)[k]``.

    Stored values are ``round((hu - intercept) / slope)``; ``slope`` and ``intercept``
    may be per slice. ``mutate(k, ds)`` edits a slice before it is written;
    ``transfer_syntax`` compresses it with pydicom's encoders.
    """
    folder.mkdir(parents=True, exist_ok=True)
    n = hu.shape[0]
    positions = slice_positions(n, origin, spacing[0], orientation, shear, z_offsets)
    slopes = np.broadcast_to(np.asarray(slope, float), (n,))
    intercepts = np.broadcast_to(np.asarray(intercept, float), (n,))
    paths = []
    for k in range(n):
        stored = np.rint((hu[k] - intercepts[k]) / slopes[k]).astype(np.int64)
        ds = ct_slice(
            stored,
            position=positions[k],
            orientation=orientation,
            pixel_spacing=(spacing[1], spacing[2]),
            slope=float(slopes[k]),
            intercept=float(intercepts[k]),
            instance_number=instance_numbers[k] if instance_numbers is not None else k + 1,
            **slice_kwargs,  # type: ignore[arg-type]
        )
        if mutate is not None:
            mutate(k, ds)
        if transfer_syntax is not None:
            ds.compress(UID(transfer_syntax))
        path = folder / (names[k] if names is not None else f"slice{k:03d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def world_of(
    index: tuple[int, int, int],
    *,
    spacing: tuple[float, float, float],
    origin: Sequence[float],
    orientation: Sequence[float] = AXIAL,
) -> npt.NDArray[np.float64]:
    """LPS position (mm) of written voxel (slice k, row r, column c) for an unsheared series."""
    k, r, c = index
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    return np.asarray(origin, float) + k * spacing[0] * normal + r * spacing[1] * col + c * spacing[2] * row


def read_back(path: Path) -> Dataset:
    """Re-read a written file (test convenience)."""
    return pydicom.dcmread(path)
