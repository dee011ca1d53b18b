"""The synthetic chest CT phantom: reproducibility, anatomy, HU ranges and exact lesion truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from corona_ct.data.phantom import Phantom, lesion_specs_for_volume, make_phantom
from corona_ct.data.phantom_anatomy import AIR, AIRWAY, BONE, FAT, LESION, LUNG, SOFT_TISSUE, TABLE, VESSEL
from corona_ct.data.phantom_lesions import LESION_CODE, LesionSpec
from corona_ct.pipeline.datamodel import LEFT_LUNG, RIGHT_LUNG
from corona_ct.pipeline.errors import ConfigError

SMALL = (12, 64, 64)
# A coarse grid with the default field of view: realistic lung volume at a fraction of the voxels.
COARSE = {"shape": (16, 96, 96), "spacing_mm": (10.0, 3.2, 3.2)}


@pytest.fixture(scope="module")
def mixed() -> list[Phantom]:
    return [make_phantom(seed, shape=SMALL, lesions="mixed") for seed in range(4)]


def test_same_seed_same_phantom_and_different_seed_differs() -> None:
    first = make_phantom(7, shape=SMALL, lesions="mixed")
    again = make_phantom(7, shape=SMALL, lesions="mixed")
    other = make_phantom(8, shape=SMALL, lesions="mixed")
    for name in ("hu", "lung_labels", "lesion_mask", "lesion_kind", "tissue"):
        assert np.array_equal(getattr(first, name), getattr(again, name)), name
    assert first.lesion_specs == again.lesion_specs
    assert not np.array_equal(first.hu, other.hu)
    assert not np.array_equal(first.lesion_mask, other.lesion_mask)


def test_arrays_are_int16_hu_read_only_and_canonical() -> None:
    phantom = make_phantom(0, shape=SMALL)
    assert phantom.hu.dtype == np.int16 and phantom.hu.shape == SMALL
    assert phantom.lung_labels.dtype == np.uint8 and phantom.lesion_kind.dtype == np.uint8
    assert phantom.lesion_mask.dtype == np.bool_
    with pytest.raises(ValueError):
        phantom.hu[0, 0, 0] = 0
    geometry = phantom.geometry
    assert geometry.shape == SMALL and geometry.spacing_mm == (5.0, 1.6, 1.6)
    assert np.allclose(geometry.axes_lps, np.eye(3)[::-1])  # rows +S, +P, +L
    # Isocentre in the middle of the grid.
    centre = geometry.affine_lps() @ np.array([(SMALL[0] - 1) / 2, (SMALL[1] - 1) / 2, (SMALL[2] - 1) / 2, 1])
    assert np.allclose(centre[:3], 0.0)


def test_tissue_hu_values() -> None:
    phantom = make_phantom(3, shape=SMALL, lesions="mixed")
    hu, tissue = phantom.hu, phantom.tissue
    assert np.all(hu[tissue == AIR] == -1000)
    assert np.all(hu[tissue == AIRWAY] == -1000)
    assert np.all(hu[tissue == FAT] == -100)
    assert np.all(hu[tissue == SOFT_TISSUE] == 40)
    assert np.all(hu[tissue == VESSEL] == 40)
    bone = hu[tissue == BONE]
    assert bone.min() >= 400 and bone.max() <= 700 and np.any(bone == 700)
    assert np.all(hu[tissue == TABLE] >= 300)
    parenchyma = hu[tissue == LUNG]
    assert parenchyma.min() >= -920 and parenchyma.max() <= -780
    assert abs(float(np.median(parenchyma)) + 850) < 20
    assert parenchyma.std() > 3  # seeded noise is present
    # The corners of the grid are outside the body.
    assert np.all(hu[:, 0, 0] == -1000) and np.all(hu[:, 0, -1] == -1000)


def test_anatomy_layout() -> None:
    phantom = make_phantom(2, shape=(16, 96, 96))
    labels, tissue = phantom.lung_labels, phantom.tissue
    nz, _, nx = labels.shape
    _, _, x = np.nonzero(labels == RIGHT_LUNG)
    _, _, x_left = np.nonzero(labels == LEFT_LUNG)
    # Patient's right lung sits at low column indices, the left one at high.
    assert x.max() < nx / 2 < x_left.min()
    # Two separate lungs with mediastinum between them on every slice.
    assert not labels[:, :, nx // 2 - 2 : nx // 2 + 2].any()
    # Lungs narrow towards the apex: cross-section shrinks over the upper slices.
    area = np.count_nonzero(labels, axis=(1, 2))
    top = np.flatnonzero(area)[-1]
    assert area[top] < 0.5 * area.max()
    assert np.all(np.diff(area[nz // 2 + 2 : top + 1]) <= 0)
    # Table: non-air, below (posterior to) the body, and not connected to it.
    components, _ = ndimage.label(tissue != AIR)
    table_ids = set(np.unique(components[tissue == TABLE]))
    body_ids = set(np.unique(components[(tissue == FAT) | (tissue == SOFT_TISSUE)]))
    assert table_ids and not table_ids & body_ids
    assert np.nonzero(tissue == TABLE)[1].min() > np.nonzero(tissue == FAT)[1].max()
    # Trachea: one airway in the midline at the top, two main bronchi lower down.
    top_airway, n_top = ndimage.label(tissue[-1] == AIRWAY)
    assert n_top == 1 and abs(np.nonzero(top_airway)[1].mean() - nx / 2) < 3
    assert any(ndimage.label(tissue[k] == AIRWAY)[1] == 2 for k in range(nz))
    assert not np.any(labels[tissue == AIRWAY])
    # Vessels inside the lungs; spine posterior in the midline.
    assert np.all(labels[tissue == VESSEL] > 0) and np.any(tissue == VESSEL)
    spine_rows = np.nonzero((tissue == BONE) & (np.abs(np.arange(nx) - nx / 2) < 3))[1]
    assert np.median(spine_rows) > labels.shape[1] / 2


def test_lesions_lie_inside_the_lungs(mixed: list[Phantom]) -> None:
    for phantom in mixed:
        assert phantom.lesion_mask.any()
        assert np.all(phantom.lung_labels[phantom.lesion_mask] > 0)
        assert np.array_equal(phantom.lesion_mask, phantom.lesion_kind > 0)
        assert np.array_equal(phantom.lesion_mask, phantom.tissue == LESION)


def test_lesion_hu_ranges_by_kind(mixed: list[Phantom]) -> None:
    ggo = np.concatenate([p.hu[p.lesion_kind == LESION_CODE["ggo"]] for p in mixed])
    consolidation = np.concatenate([p.hu[p.lesion_kind == LESION_CODE["consolidation"]] for p in mixed])
    assert ggo.size and consolidation.size
    assert ggo.min() >= -750 and ggo.max() <= -300
    assert consolidation.min() >= -100 and consolidation.max() <= 50


def test_volumes_are_exact_voxel_counts(mixed: list[Phantom]) -> None:
    for phantom in mixed:
        voxel_mm3 = 5.0 * 1.6 * 1.6
        assert phantom.lesion_volume_mm3 == np.count_nonzero(phantom.lesion_mask) * voxel_mm3
        assert phantom.lung_volume_mm3 == np.count_nonzero(phantom.lung_labels) * voxel_mm3
        by_kind = phantom.lesion_volume_by_kind_mm3
        assert by_kind["ggo"] == np.count_nonzero(phantom.lesion_kind == 1) * voxel_mm3
        assert by_kind["ggo"] + by_kind["consolidation"] == pytest.approx(phantom.lesion_volume_mm3)
        by_side = phantom.lesion_volume_by_side_mm3
        assert (
            by_side["right"] == np.count_nonzero(phantom.lesion_mask & (phantom.lung_labels == 1)) * voxel_mm3
        )
        assert by_side["right"] + by_side["left"] == pytest.approx(phantom.lesion_volume_mm3)
        assert phantom.affected_percent == pytest.approx(
            100 * phantom.lesion_mask.sum() / (phantom.lung_labels > 0).sum()
        )


def test_lesions_favour_the_lung_periphery() -> None:
    depths, lung_depths = [], []
    for seed in range(6):
        phantom = make_phantom(seed, **COARSE, lesions="mixed", n_lesions=4)
        depth = ndimage.distance_transform_edt(phantom.lung_labels > 0, sampling=phantom.geometry.spacing_mm)
        to_index = np.linalg.inv(phantom.geometry.affine_lps())
        for spec in phantom.lesion_specs:
            index = tuple(np.rint(to_index @ np.append(spec.center_lps_mm, 1))[:3].astype(int))
            depths.append(depth[index])
        lung_depths.append(depth[phantom.lung_labels > 0])
    assert np.median(depths) < 0.6 * np.median(np.concatenate(lung_depths))


@pytest.mark.parametrize("target_ml", [2.0, 60.0, 300.0])
def test_target_lesion_volume_is_met(target_ml: float) -> None:
    phantom = make_phantom(5, **COARSE, lesions="mixed", lesion_volume_ml=target_ml)
    assert phantom.lesion_volume_ml == pytest.approx(target_ml, rel=0.02, abs=phantom.geometry.voxel_ml)
    assert phantom.lesion_volume_by_kind_mm3["ggo"] > 0
    # The specs reproduce the same phantom on their own.
    specs = lesion_specs_for_volume(target_ml, 5, **COARSE)
    assert specs == phantom.lesion_specs
    rebuilt = make_phantom(5, **COARSE, lesions=specs)
    assert np.array_equal(rebuilt.hu, phantom.hu)


def test_zero_lesion_volume_and_no_lesions() -> None:
    empty = make_phantom(1, shape=SMALL, lesions="ggo", lesion_volume_ml=0.0)
    plain = make_phantom(1, shape=SMALL)
    assert not empty.lesion_mask.any() and empty.lesion_volume_mm3 == 0.0
    assert np.array_equal(empty.hu, plain.hu)


def test_lesions_do_not_change_the_anatomy() -> None:
    plain = make_phantom(4, shape=SMALL)
    sick = make_phantom(4, shape=SMALL, lesions="consolidation")
    outside = ~sick.lesion_mask
    assert np.array_equal(plain.hu[outside], sick.hu[outside])
    assert np.array_equal(plain.lung_labels, sick.lung_labels)
    assert set(np.unique(sick.lesion_kind)) == {0, LESION_CODE["consolidation"]}


def test_explicit_lesion_spec() -> None:
    plain = make_phantom(0, shape=SMALL)
    index = np.array([6, 32, 16])  # middle slice, middle row, right lung
    assert plain.lung_labels[tuple(index)] == RIGHT_LUNG
    centre = (plain.geometry.affine_lps() @ np.append(index, 1.0))[:3]
    spec = LesionSpec("consolidation", tuple(centre), (6.0, 6.0, 6.0), hu_center=30.0, hu_edge=-80.0)
    phantom = make_phantom(0, shape=SMALL, lesions=[spec])
    assert phantom.lesion_kind[tuple(index)] == LESION_CODE["consolidation"]
    assert phantom.hu[tuple(index)] > 0  # near the centre the value approaches hu_center
    assert np.all(phantom.lung_labels[phantom.lesion_mask] == RIGHT_LUNG)
    # A 6 mm blob on a 5 × 1.6 × 1.6 mm grid: roughly (4/3)π·6³ ≈ 0.9 ml, lobulated and clipped.
    assert 0.3 < phantom.lesion_volume_ml < 1.5

    outside = (plain.geometry.affine_lps() @ np.array([6, 2, 2, 1.0]))[:3]
    with pytest.raises(ConfigError, match="outside the lungs"):
        make_phantom(0, shape=SMALL, lesions=[LesionSpec("ggo", tuple(outside), (5, 5, 5), -500, -700)])
    with pytest.raises(ConfigError, match="outside"):
        LesionSpec("ggo", tuple(centre), (5, 5, 5), hu_center=-100, hu_edge=-700)


def test_invalid_arguments_raise_config_errors() -> None:
    with pytest.raises(ConfigError):
        make_phantom(0, shape=(12, 8, 8))
    with pytest.raises(ConfigError):
        make_phantom(0, shape=SMALL, lesions="many")
    with pytest.raises(ConfigError):
        make_phantom(0, shape=SMALL, lesion_volume_ml=10.0)
    with pytest.raises(ConfigError, match="exceeds"):
        make_phantom(0, shape=SMALL, lesions="mixed", lesion_volume_ml=5000.0)


def test_to_volume() -> None:
    phantom = make_phantom(0, shape=SMALL)
    volume = phantom.to_volume("case-1")
    assert volume.units == "HU" and volume.study_id == "case-1"
    assert volume.array.dtype == np.float32 and np.array_equal(volume.array, phantom.hu)
    assert volume.geometry == phantom.geometry and volume.spacing_known
