"""Phantom → DICOM / NIfTI / TIFF / PNG → readers: exact HU and geometry back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from corona_ct.data.phantom import Phantom, make_phantom
from corona_ct.data.writers import (
    window_to_uint8,
    write_dicom_series,
    write_nifti,
    write_png_slices,
    write_tiff_slices,
)
from corona_ct.pipeline.config import IngestConfig
from corona_ct.pipeline.errors import ConfigError
from corona_ct.pipeline.ingest import load_study
from corona_ct.pipeline.ingest.nifti import read_nifti
from corona_ct.pipeline.ingest.slices import read_image_folder, read_tiff_folder

CONFIG = IngestConfig()
SHAPE = (12, 64, 56)


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom(2, shape=SHAPE, lesions="mixed")


def _same_geometry(volume_geometry: object, phantom: Phantom) -> None:
    geometry = phantom.geometry
    assert volume_geometry.shape == geometry.shape  # type: ignore[attr-defined]
    assert np.allclose(volume_geometry.spacing_mm, geometry.spacing_mm)  # type: ignore[attr-defined]
    assert np.allclose(volume_geometry.origin_lps, geometry.origin_lps, atol=1e-6)  # type: ignore[attr-defined]
    assert np.allclose(volume_geometry.axes_lps, geometry.axes_lps)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("intercept", "slope", "shuffle"), [(-1024.0, 1.0, False), (0.0, 1.0, True), (-1000.0, 0.5, True)]
)
def test_dicom_series_round_trip_through_load_study(
    tmp_path: Path, phantom: Phantom, intercept: float, slope: float, shuffle: bool
) -> None:
    write_dicom_series(
        phantom,
        tmp_path / "series",
        rescale_intercept=intercept,
        rescale_slope=slope,
        shuffle_names=shuffle,
        seed=3,
    )
    volume = load_study(tmp_path / "series", CONFIG)
    assert volume.units == "HU" and volume.spacing_known
    assert np.array_equal(volume.array, phantom.hu.astype(np.float32))
    _same_geometry(volume.geometry, phantom)


def test_dicom_files_are_valid_ct_with_exact_stored_values(tmp_path: Path, phantom: Phantom) -> None:
    paths = write_dicom_series(phantom, tmp_path, shuffle_names=True, seed=4)
    assert len(paths) == SHAPE[0] and len({p.name for p in paths}) == SHAPE[0]
    assert [p.name for p in paths] != sorted(p.name for p in paths)  # names do not follow slice order
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    series_uids, study_uids = set(), set()
    for index, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.Modality == "CT" and list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.SamplesPerPixel == 1
        assert ds.BitsAllocated == 16 and ds.BitsStored == 12 and ds.HighBit == 11
        assert ds.PixelRepresentation == 0 and ds.RescaleType == "HU"
        assert (ds.Rows, ds.Columns) == SHAPE[1:]
        stored = ds.pixel_array
        assert stored.min() >= 0 and stored.max() <= 4095
        hu = stored.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.array_equal(hu, phantom.hu[index])
        assert np.allclose([float(v) for v in ds.PixelSpacing], phantom.geometry.spacing_mm[1:])
        assert np.allclose([float(v) for v in ds.ImageOrientationPatient], [1, 0, 0, 0, 1, 0])
        expected_position = phantom.geometry.affine_lps() @ np.array([index, 0, 0, 1.0])
        assert np.allclose([float(v) for v in ds.ImagePositionPatient], expected_position[:3])
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == 5.0
        assert ds.InstanceNumber == index + 1
        assert ds.PatientName == "PHANTOM^DEMO" and ds.PatientID == "PHANTOM-0"
        series_uids.add(ds.SeriesInstanceUID)
        study_uids.add(ds.StudyInstanceUID)
    assert len(series_uids) == len(study_uids) == 1


def test_dicom_signed_storage_and_deterministic_uids(tmp_path: Path, phantom: Phantom) -> None:
    first = write_dicom_series(phantom, tmp_path / "a", rescale_intercept=0.0, seed=1)
    again = write_dicom_series(phantom, tmp_path / "b", rescale_intercept=0.0, seed=1)
    other = write_dicom_series(phantom, tmp_path / "c", rescale_intercept=0.0, seed=2)
    a, b, c = (pydicom.dcmread(paths[0]) for paths in (first, again, other))
    assert a.PixelRepresentation == 1 and a.BitsStored == 16
    assert np.array_equal(a.pixel_array, phantom.hu[0])
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    assert a.StudyInstanceUID != c.StudyInstanceUID and a.SOPInstanceUID != c.SOPInstanceUID
    assert (tmp_path / "a" / first[0].name).read_bytes() == (tmp_path / "b" / again[0].name).read_bytes()
    with pytest.raises(ConfigError, match="not exactly representable"):
        write_dicom_series(phantom, tmp_path / "d", rescale_slope=3.0)


def test_nifti_round_trip(tmp_path: Path, phantom: Phantom) -> None:
    path = write_nifti(phantom, tmp_path / "ct.nii.gz")
    for volume in (read_nifti(path, CONFIG, "case"), load_study(path, CONFIG)):
        assert np.array_equal(volume.array, phantom.hu)
        _same_geometry(volume.geometry, phantom)


def test_tiff_round_trip(tmp_path: Path, phantom: Phantom) -> None:
    paths = write_tiff_slices(phantom, tmp_path / "P001")
    assert paths[0].name == "P001_patient1_SR_1_IM00001.tif"
    for volume in (
        read_tiff_folder(tmp_path / "P001", CONFIG, "case"),
        load_study(tmp_path / "P001", CONFIG),
    ):
        assert volume.units == "HU" and not volume.spacing_known
        assert np.array_equal(volume.array, phantom.hu)
        assert volume.geometry.shape == SHAPE and volume.geometry.spacing_mm == (1.0, 1.0, 1.0)


def test_png_round_trip_within_one_grey_level(tmp_path: Path, phantom: Phantom) -> None:
    paths = write_png_slices(phantom, tmp_path / "png", window=(-1000.0, 0.0))
    assert paths[9].name == "phantom_slice_10.png"  # unpadded numbers: natural order matters
    windowed = np.clip((phantom.hu.astype(np.float64) + 1000.0) / 1000.0, 0.0, 1.0)
    for volume in (read_image_folder(tmp_path / "png", CONFIG, "case"), load_study(tmp_path / "png", CONFIG)):
        assert volume.units == "window" and volume.array.shape == SHAPE
        assert np.abs(volume.array - windowed).max() <= 1.0 / 255.0
    assert np.array_equal(window_to_uint8(np.array([-1000, -500, 0, 400]), (-1000, 0)), [0, 128, 255, 255])


def test_writers_are_deterministic(tmp_path: Path) -> None:
    small = make_phantom(0, shape=(4, 32, 32), lesions="ggo")
    contents = []
    for run in ("first", "second"):
        folder = tmp_path / run
        write_nifti(small, folder / "ct.nii.gz")
        write_tiff_slices(small, folder / "tiff")
        write_png_slices(small, folder / "png")
        write_dicom_series(small, folder / "dicom")
        contents.append({p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()})
    assert len(contents[0]) == 1 + 3 * 4 and contents[0] == contents[1]
