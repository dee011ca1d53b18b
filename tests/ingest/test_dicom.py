"""DICOM ingestion on synthetic series: exact HU, geometry, ordering, compression (series choice: test_select.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from corona_ct.pipeline.config import IngestConfig
from corona_ct.pipeline.ingest import discover, load_input, load_study
from corona_ct.pipeline.ingest.dicom.codecs import stored_values
from corona_ct.pipeline.ingest.dicom.read import canonical_reorder
from tests.ingest.dicom_factory import AXIAL, CORONAL, SAGITTAL, phantom_hu, world_of, write_series

SPACING = (2.5, 0.7, 0.8)
ORIGIN = (-11.2, -12.8, -100.0)


def test_round_trip_reproduces_hu_and_geometry(tmp_path: Path) -> None:
    hu = phantom_hu()
    write_series(tmp_path / "case", hu, spacing=SPACING, origin=ORIGIN)
    volume = load_study(tmp_path / "case")
    np.testing.assert_array_equal(volume.hu, hu.astype(np.float32))
    assert volume.array.dtype == np.float32 and volume.units == "HU"
    assert volume.geometry.spacing_mm == pytest.approx(SPACING)
    assert volume.geometry.origin_lps == pytest.approx(ORIGIN)
    np.testing.assert_allclose(volume.geometry.axes_lps, [(0, 0, 1), (0, 1, 0), (1, 0, 0)], atol=1e-9)
    assert volume.warnings == ()
    assert volume.study_id == "case"


def test_meta_is_whitelisted_and_identity_free(tmp_path: Path) -> None:
    write_series(tmp_path / "Doe_Jane", phantom_hu(), spacing=SPACING, origin=ORIGIN)
    volume = load_study(tmp_path / "Doe_Jane")
    allowed = {
        "Modality", "SeriesInstanceUID", "SliceThickness", "ConvolutionKernel", "Manufacturer",
        "ManufacturerModelName", "KVP", "TransferSyntaxUID", "ImageType", "PixelSpacing",
        "SpacingBetweenSlices", "NumberOfSlices",
    }  # fmt: skip
    assert set(volume.meta) <= allowed
    assert volume.meta["NumberOfSlices"] == 6 and volume.meta["SpacingBetweenSlices"] == pytest.approx(2.5)
    assert volume.meta["ImageType"] == "ORIGINAL\\PRIMARY\\AXIAL"
    text = " ".join(map(str, volume.meta.values())) + volume.study_id
    for identifier in ("Doe", "Jane", "PAT-0001", "ACC123456", "19500101"):
        assert identifier not in text
    assert volume.study_id.startswith("study-")  # folder name holds the patient's name: hashed


def test_shuffled_names_and_instance_numbers_sort_by_position(tmp_path: Path) -> None:
    hu = phantom_hu(seed=3)
    rng = np.random.default_rng(1)
    names = [f"IM{n:04d}" for n in rng.permutation(6)]  # no extension, random order
    numbers = [int(n) for n in rng.permutation(6) + 1]
    write_series(tmp_path / "s", hu, spacing=SPACING, origin=ORIGIN, names=names, instance_numbers=numbers)
    volume = load_study(tmp_path / "s")
    np.testing.assert_array_equal(volume.hu, hu.astype(np.float32))
    assert any("InstanceNumber order contradicts" in w for w in volume.warnings)


def test_slices_written_head_to_feet_are_reordered(tmp_path: Path) -> None:
    hu = phantom_hu(seed=4)
    # Slice k written at decreasing z: the file order runs head to feet.
    write_series(tmp_path / "s", hu, spacing=SPACING, origin=ORIGIN, z_offsets=[-2.5 * k for k in range(6)])
    volume = load_study(tmp_path / "s")
    np.testing.assert_array_equal(volume.hu, hu[::-1].astype(np.float32))
    assert volume.geometry.origin_lps[2] == pytest.approx(ORIGIN[2] - 12.5)


@pytest.mark.parametrize(
    "orientation",
    [AXIAL, (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0), CORONAL, SAGITTAL, (0.0, 0.0, 1.0, 1.0, 0.0, 0.0)],
    ids=["axial", "axial-rotated", "coronal", "sagittal", "axial-transposed"],
)
def test_every_voxel_keeps_its_world_position(tmp_path: Path, orientation: tuple[float, ...]) -> None:
    hu = phantom_hu(seed=5)
    write_series(tmp_path / "s", hu, spacing=SPACING, origin=ORIGIN, orientation=orientation)
    volume = load_study(tmp_path / "s")
    geometry = volume.geometry
    # Canonical: array axes point to +S, +P, +L (each the closest main direction).
    axes = np.asarray(geometry.axes_lps)
    np.testing.assert_allclose(axes, [(0, 0, 1), (0, 1, 0), (1, 0, 0)], atol=1e-9)
    affine = geometry.affine_lps()
    rng = np.random.default_rng(0)
    for _ in range(20):
        written = (int(rng.integers(6)), int(rng.integers(32)), int(rng.integers(32)))
        expected_world = world_of(written, spacing=SPACING, origin=ORIGIN, orientation=orientation)
        index = np.linalg.solve(affine[:3, :3], expected_world - affine[:3, 3])
        k, r, c = np.rint(index).astype(int)
        np.testing.assert_allclose(index, [k, r, c], atol=1e-6)
        assert volume.hu[k, r, c] == hu[written]


def test_canonical_reorder_is_permutation_and_flip_only() -> None:
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    axes = [(0.0, 0.0, -1.0), (1.0, 0.0, 0.0), (0.0, -1.0, 0.0)]  # z→I, rows→L, columns→A
    reordered, geometry = canonical_reorder(array, (3.0, 2.0, 1.0), (10.0, 20.0, 30.0), axes)
    assert reordered.shape == (2, 4, 3) and geometry.spacing_mm == (3.0, 1.0, 2.0)
    np.testing.assert_array_equal(reordered, np.flip(array.transpose(0, 2, 1), axis=(0, 1)))
    np.testing.assert_allclose(geometry.axes_lps, [(0, 0, 1), (0, 1, 0), (1, 0, 0)])
    # The voxel now at (0, 0, 0) was (1, 0, 3): its world position is the new origin.
    assert geometry.origin_lps == pytest.approx((10.0, 20.0 - 3 * 1.0, 30.0 - 1 * 3.0))


def test_per_slice_rescale_and_fractional_slope(tmp_path: Path) -> None:
    hu = phantom_hu(seed=6) // 2 * 2  # even values: exact with slope 0.5 and 2
    slopes = [1.0, 0.5, 2.0, 1.0, 0.5, 2.0]
    intercepts = [-1024.0, -1000.0, -2048.0, 0.0, -1024.0, -3000.0]
    write_series(tmp_path / "s", hu, spacing=SPACING, origin=ORIGIN, slope=slopes, intercept=intercepts)
    study = discover([tmp_path / "s"])[0]
    assert any("rescaled with its own" in note for note in study.notes)
    np.testing.assert_array_equal(load_input(study).hu, hu.astype(np.float32))


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k"])
def test_compressed_series_decode_exactly(tmp_path: Path, syntax: str) -> None:
    if not pydicom.pixels.get_encoder(syntax).is_available:
        pytest.skip(f"no pydicom encoder for {syntax}")
    hu = phantom_hu(seed=7)
    files = write_series(tmp_path / "s", hu, spacing=SPACING, origin=ORIGIN, transfer_syntax=syntax)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == syntax
    study = discover([tmp_path / "s"])[0]
    assert study.series[0].transfer_syntax_uid == syntax
    volume = load_input(study)
    np.testing.assert_array_equal(volume.hu, hu.astype(np.float32))
    assert volume.meta["TransferSyntaxUID"] == syntax


def test_stored_values_masks_high_bits_and_sign_extends() -> None:
    garbage = np.array([0xF000 | 0x0FFF, 0xA000 | 0x0800, 0x5000 | 0x07FF, 0x0001], dtype=np.uint16)
    np.testing.assert_array_equal(stored_values(garbage, 12, signed=False), [4095, 2048, 2047, 1])
    np.testing.assert_array_equal(stored_values(garbage, 12, signed=True), [-1, -2048, 2047, 1])
    already_signed = np.array([-2000, -1, 5], dtype=np.int16)
    np.testing.assert_array_equal(stored_values(already_signed, 16, signed=True), [-2000, -1, 5])


def test_discover_kinds_order_and_unique_ids(tmp_path: Path) -> None:
    write_series(tmp_path / "b" / "case", phantom_hu(), study_uid="1.2.3.10", series_uid="1.2.3.10.1")
    write_series(tmp_path / "a" / "case", phantom_hu(), study_uid="1.2.3.20", series_uid="1.2.3.20.1")
    (tmp_path / "vol.nii.gz").write_bytes(b"\x00")
    (tmp_path / "tiffs").mkdir()
    (tmp_path / "tiffs" / "001.tif").write_bytes(b"\x00")
    (tmp_path / "pngs").mkdir()
    (tmp_path / "pngs" / "001.png").write_bytes(b"\x00")
    studies = discover([tmp_path])
    kinds = {s.kind for s in studies}
    assert kinds == {"dicom", "nifti", "tiff", "images"}
    assert [str(s.source) for s in studies] == sorted(str(s.source) for s in studies)
    dicom_ids = [s.study_id for s in studies if s.kind == "dicom"]
    assert dicom_ids == ["case", "case-2"]
    assert len({s.study_id for s in studies}) == len(studies)
    assert next(s for s in studies if s.kind == "nifti").study_id == "vol"
    assert discover([tmp_path]) == studies  # deterministic


def test_dicomdir_layout_is_read(tmp_path: Path) -> None:
    from pydicom.fileset import FileSet

    hu = phantom_hu(seed=8)
    staging = tmp_path / "staging"
    files = write_series(staging, hu, spacing=SPACING, origin=ORIGIN)
    fileset = FileSet()
    for path in files:
        fileset.add(pydicom.dcmread(path))
    media = tmp_path / "media"
    fileset.write(media)
    assert (media / "DICOMDIR").is_file()
    (study,) = discover([media])
    assert any("DICOMDIR" in note for note in study.notes)
    np.testing.assert_array_equal(load_input(study).hu, hu.astype(np.float32))


def test_spacing_tolerance_is_configurable(tmp_path: Path) -> None:
    offsets = [0.0, 2.5, 5.0, 7.6, 10.1, 12.6]  # one gap 4 % too long
    write_series(tmp_path / "s", phantom_hu(), spacing=SPACING, origin=ORIGIN, z_offsets=offsets)
    assert not any("uneven" in w for w in load_study(tmp_path / "s").warnings)
    strict = IngestConfig(spacing_tolerance=0.01)
    assert any("uneven slice spacing" in w for w in load_study(tmp_path / "s", strict).warnings)
