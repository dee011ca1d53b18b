"""NIfTI reading into canonical order and writing outputs back on the input's own grid."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, ornt_transform

from corona_ct.data.phantom import Phantom, make_phantom
from corona_ct.pipeline.config import IngestConfig
from corona_ct.pipeline.errors import ConfigError, GeometryError, InputError, UnsupportedInputError
from corona_ct.pipeline.ingest.nifti import read_nifti, write_nifti

CONFIG = IngestConfig()
# Non-square, with distinct sizes per axis, so that any permutation mistake changes the shape.
SHAPE = (10, 40, 48)
MARKER = (3, 7, 30)  # a voxel given a unique value, to follow one voxel through every re-ordering


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom(1, shape=SHAPE, lesions="mixed")


@pytest.fixture(scope="module")
def marked_hu(phantom: Phantom) -> np.ndarray:
    hu = phantom.hu.copy()
    hu[MARKER] = 3000
    return hu


def _lps_image(array_zyx: np.ndarray, phantom: Phantom) -> nib.Nifti1Image:
    """The canonical array stored as (x, y, z) with the phantom's affine: nibabel axis codes L, P, S."""
    return nib.Nifti1Image(array_zyx.transpose(2, 1, 0), phantom.geometry.affine_ras())


def _reoriented(image: nib.Nifti1Image, axcodes: str) -> nib.Nifti1Image:
    """nibabel's own re-orientation (an independent reference) from L, P, S to ``axcodes``."""
    return image.as_reoriented(ornt_transform(axcodes2ornt(("L", "P", "S")), axcodes2ornt(tuple(axcodes))))


def _ras_to_lps(point: np.ndarray) -> np.ndarray:
    return point * np.array([-1.0, -1.0, 1.0])


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "LAS", "RSA", "PIL"])
def test_any_voxel_order_reads_to_the_same_canonical_volume(
    tmp_path: Path, phantom: Phantom, marked_hu: np.ndarray, axcodes: str
) -> None:
    image = _reoriented(_lps_image(marked_hu, phantom), axcodes)
    assert nib.aff2axcodes(image.affine) == tuple(axcodes)
    path = tmp_path / f"ct_{axcodes}.nii.gz"
    nib.save(image, path)

    volume = read_nifti(path, CONFIG, "case")
    assert volume.array.dtype == np.float32 and volume.units == "HU"
    assert np.array_equal(volume.array, marked_hu)
    assert np.allclose(volume.geometry.spacing_mm, phantom.geometry.spacing_mm)
    assert np.allclose(volume.geometry.axes_lps, phantom.geometry.axes_lps)
    assert np.allclose(volume.geometry.origin_lps, phantom.geometry.origin_lps)
    assert volume.meta["source_axcodes"] == axcodes
    assert volume.warnings == ()

    # The marker voxel has the same world position through the file's own affine.
    source_index = np.argwhere(np.asarray(image.dataobj) == 3000)[0]
    world_file = _ras_to_lps((image.affine @ np.append(source_index, 1.0))[:3])
    world_read = (volume.geometry.affine_lps() @ np.append(MARKER, 1.0))[:3]
    assert np.allclose(world_file, world_read)


@pytest.mark.parametrize("axcodes", ["RAS", "LAS", "RSA", "PIL"])
def test_mask_is_written_on_the_inputs_own_grid(
    tmp_path: Path, phantom: Phantom, marked_hu: np.ndarray, axcodes: str
) -> None:
    image = _reoriented(_lps_image(marked_hu, phantom), axcodes)
    path = tmp_path / "ct.nii.gz"
    nib.save(image, path)
    volume = read_nifti(path, CONFIG, "case")

    out = write_nifti(tmp_path / "out" / "lungs.nii.gz", phantom.lung_labels, volume)
    written = nib.load(out)
    assert written.shape == image.shape
    assert np.allclose(written.affine, image.affine)
    assert written.get_data_dtype() == np.uint8
    expected = np.asarray(_reoriented(_lps_image(phantom.lung_labels, phantom), axcodes).dataobj)
    assert np.array_equal(np.asarray(written.dataobj), expected)
    assert written.header["descrip"].item() == b"corona-ct"
    assert int(written.header["sform_code"]) == 1 and int(written.header["qform_code"]) == 1

    heat = np.linspace(0, 1, phantom.hu.size, dtype=np.float32).reshape(SHAPE)
    written_heat = nib.load(write_nifti(tmp_path / "heat.nii", heat, volume))
    assert written_heat.get_data_dtype() == np.float32
    assert np.array_equal(read_nifti(tmp_path / "heat.nii", CONFIG, "h").array, heat)


def test_oblique_affine_keeps_world_positions(
    tmp_path: Path, phantom: Phantom, marked_hu: np.ndarray
) -> None:
    angle = np.deg2rad(12.0)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    image = _reoriented(_lps_image(marked_hu, phantom), "RAS")
    oblique = nib.Nifti1Image(np.asarray(image.dataobj), rotation @ image.affine)
    nib.save(oblique, tmp_path / "oblique.nii.gz")

    volume = read_nifti(tmp_path / "oblique.nii.gz", CONFIG, "case")
    assert np.array_equal(volume.array, marked_hu)
    source_shape = np.array(oblique.shape)
    # Every corner voxel, and the marker, map to the same LPS point through both descriptions.
    corners = np.array(np.meshgrid([0, 1], [0, 1], [0, 1], indexing="ij")).reshape(3, -1).T
    for corner in corners:
        source_index = corner * (source_shape - 1)
        world_file = _ras_to_lps((oblique.affine @ np.append(source_index, 1.0))[:3])
        canonical = np.rint(np.linalg.solve(volume.geometry.affine_lps(), np.append(world_file, 1.0))[:3])
        assert np.all(canonical >= 0) and np.all(canonical < np.array(SHAPE))
        value_file = np.asarray(oblique.dataobj)[tuple(source_index)]
        assert volume.array[tuple(canonical.astype(int))] == value_file
    assert abs(np.dot(volume.geometry.axes_lps[2], (1.0, 0.0, 0.0)) - np.cos(angle)) < 1e-9


def test_volume_without_source_order_writes_the_canonical_ras_affine(
    tmp_path: Path, phantom: Phantom
) -> None:
    volume = phantom.to_volume()
    out = nib.load(write_nifti(tmp_path / "mask.nii.gz", phantom.lesion_mask, volume))
    assert np.allclose(out.affine, phantom.geometry.affine_ras())
    assert np.array_equal(np.asarray(out.dataobj), phantom.lesion_mask.transpose(2, 1, 0).astype(np.uint8))
    assert out.get_data_dtype() == np.uint8


def test_scaling_is_applied(tmp_path: Path, phantom: Phantom) -> None:
    raw = ((phantom.hu.astype(np.int32) + 1024) // 2).astype(np.int16)
    image = nib.Nifti1Image(raw.transpose(2, 1, 0), phantom.geometry.affine_ras())
    image.header.set_slope_inter(2.0, -1024.0)
    nib.save(image, tmp_path / "scaled.nii.gz")
    volume = read_nifti(tmp_path / "scaled.nii.gz", CONFIG, "case")
    assert np.array_equal(volume.array, raw.astype(np.float32) * 2 - 1024)


def test_singleton_fourth_dimension_is_squeezed(tmp_path: Path, phantom: Phantom) -> None:
    data = phantom.hu.transpose(2, 1, 0)[..., None]
    nib.save(nib.Nifti1Image(data, phantom.geometry.affine_ras()), tmp_path / "4d1.nii.gz")
    assert np.array_equal(read_nifti(tmp_path / "4d1.nii.gz", CONFIG, "case").array, phantom.hu)


@pytest.mark.parametrize("shape", [(8, 8, 4, 3), (8, 8)])
def test_true_4d_and_2d_are_refused(tmp_path: Path, shape: tuple[int, ...]) -> None:
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), tmp_path / "bad.nii.gz")
    with pytest.raises(UnsupportedInputError, match=r"bad\.nii\.gz.*3D"):
        read_nifti(tmp_path / "bad.nii.gz", CONFIG, "case")


def test_single_slice_is_refused(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 1), np.int16), np.eye(4)), tmp_path / "one.nii")
    with pytest.raises(UnsupportedInputError, match="single slice"):
        read_nifti(tmp_path / "one.nii", CONFIG, "case")


def test_truncated_and_garbage_files_raise_input_errors(tmp_path: Path, phantom: Phantom) -> None:
    nib.save(_lps_image(phantom.hu, phantom), tmp_path / "ct.nii.gz")
    content = (tmp_path / "ct.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(content[: len(content) // 2])
    with pytest.raises(InputError, match=r"cut\.nii\.gz"):
        read_nifti(tmp_path / "cut.nii.gz", CONFIG, "case")
    # Uncompressed and cut inside the voxel data.
    raw = gzip.decompress(content)
    (tmp_path / "short.nii").write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(InputError, match=r"short\.nii"):
        read_nifti(tmp_path / "short.nii", CONFIG, "case")
    (tmp_path / "junk.nii").write_bytes(b"not a nifti file at all" * 20)
    with pytest.raises(InputError, match=r"junk\.nii"):
        read_nifti(tmp_path / "junk.nii", CONFIG, "case")
    with pytest.raises(InputError, match="not found"):
        read_nifti(tmp_path / "missing.nii.gz", CONFIG, "case")


def test_non_hu_values_are_warned_about(tmp_path: Path, phantom: Phantom) -> None:
    unrescaled = (phantom.hu.astype(np.int32) + 1024).astype(np.uint16)
    nib.save(_lps_image(unrescaled, phantom), tmp_path / "raw.nii.gz")
    volume = read_nifti(tmp_path / "raw.nii.gz", CONFIG, "case")
    assert any("looks unrescaled or windowed" in warning for warning in volume.warnings)

    unit = (phantom.hu.astype(np.float32) + 1000) / 4000
    nib.save(_lps_image(np.clip(unit, 0, 1), phantom), tmp_path / "unit.nii.gz")
    assert any("normalised" in w for w in read_nifti(tmp_path / "unit.nii.gz", CONFIG, "c").warnings)


def test_missing_qform_and_sform_is_warned_about(tmp_path: Path, phantom: Phantom) -> None:
    image = _lps_image(phantom.hu, phantom)
    image.set_sform(None, code=0)
    image.set_qform(None, code=0)
    nib.save(image, tmp_path / "bare.nii.gz")
    volume = read_nifti(tmp_path / "bare.nii.gz", CONFIG, "case")
    assert any("neither qform nor sform" in warning for warning in volume.warnings)


def test_write_checks_shape_values_and_name(tmp_path: Path, phantom: Phantom) -> None:
    volume = phantom.to_volume()
    with pytest.raises(GeometryError, match="differs"):
        write_nifti(tmp_path / "a.nii.gz", np.zeros((2, 2, 2), np.uint8), volume)
    with pytest.raises(ConfigError, match="float32"):
        write_nifti(tmp_path / "b.nii.gz", phantom.hu, volume, dtype=np.uint8)
    with pytest.raises(ConfigError, match=r"\.nii"):
        write_nifti(tmp_path / "c.png", phantom.lung_labels, volume)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
