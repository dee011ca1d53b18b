"""Classical lung segmentation on the synthetic phantom: overlap, sides, lesions, no-lung series."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from corona_ct.data.phantom import make_phantom
from corona_ct.data.phantom_anatomy import LUNG, VESSEL
from corona_ct.pipeline.config import SegmentConfig, WindowConfig
from corona_ct.pipeline.datamodel import LEFT_LUNG, RIGHT_LUNG, Volume
from corona_ct.pipeline.errors import ModelError
from corona_ct.pipeline.morphology import INPLANE_4, erode_rows, fill_holes_in_plane
from corona_ct.pipeline.preprocess import window
from corona_ct.pipeline.segment import NO_LUNGS_WARNING, segment_lungs
from corona_ct.pipeline.segment.cleanup import (
    _diamond_rows,
    clean_lung_mask,
    keep_plausible_lung,
    median_sign,
    trim_dense_rim,
)
from corona_ct.pipeline.segment.regions import low_density
from corona_ct.pipeline.segment.sides import split_sides


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


@pytest.fixture(scope="module")
def phantom():  # type: ignore[no-untyped-def]
    return make_phantom(seed=0, lesions="mixed")


@pytest.fixture(scope="module")
def hu_mask(phantom):  # type: ignore[no-untyped-def]
    return segment_lungs(phantom.to_volume(), SegmentConfig(), WindowConfig())


def _windowed(volume: Volume) -> Volume:
    return dataclasses.replace(volume, array=window(volume.array, "HU", WindowConfig()), units="window")


def test_classical_matches_phantom_lungs_with_lesions(phantom, hu_mask) -> None:  # type: ignore[no-untyped-def]
    labels = hu_mask.labels
    assert hu_mask.method == "classical" and hu_mask.warnings == ()
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, RIGHT_LUNG, LEFT_LUNG}
    truth = phantom.lung_labels
    assert dice(labels > 0, truth > 0) >= 0.95
    # sides not swapped: right lung (label 1) at low column index in both
    assert dice(labels == RIGHT_LUNG, truth == RIGHT_LUNG) >= 0.93
    assert dice(labels == LEFT_LUNG, truth == LEFT_LUNG) >= 0.93
    # the key property: dense lesions (GGO and consolidation) stay inside the mask
    assert phantom.lesion_mask.sum() > 0
    assert (labels > 0)[phantom.lesion_mask].mean() >= 0.95
    # vessels are closed into the mask too
    assert (labels > 0)[(phantom.tissue == VESSEL) & (truth > 0)].mean() >= 0.95


def test_mask_does_not_leak_into_body_wall(phantom, hu_mask) -> None:  # type: ignore[no-untyped-def]
    outside_lungs = (phantom.lung_labels == 0) & (phantom.tissue != LUNG)
    leaked = np.count_nonzero((hu_mask.labels > 0) & outside_lungs)
    assert leaked <= 0.06 * np.count_nonzero(phantom.lung_labels)


def test_windowed_stack_gives_the_same_lungs(phantom, hu_mask) -> None:  # type: ignore[no-untyped-def]
    windowed = _windowed(phantom.to_volume())
    mask = segment_lungs(windowed, SegmentConfig(), WindowConfig())
    assert mask.method == "classical"
    assert dice(mask.labels > 0, phantom.lung_labels > 0) >= 0.95
    assert dice(mask.labels == RIGHT_LUNG, hu_mask.labels == RIGHT_LUNG) >= 0.98


def test_no_lungs_gives_empty_mask_and_warning(phantom) -> None:  # type: ignore[no-untyped-def]
    hu = phantom.hu.astype(np.float32)
    hu[phantom.lung_labels > 0] = 40.0  # lungs filled with soft tissue: an abdomen-like series
    volume = dataclasses.replace(phantom.to_volume(), array=hu)
    mask = segment_lungs(volume, SegmentConfig(), WindowConfig())
    assert not mask.labels.any()
    assert mask.warnings == (NO_LUNGS_WARNING,)


def test_pure_gas_is_not_lung(phantom) -> None:  # type: ignore[no-untyped-def]
    hu = phantom.hu.astype(np.float32)
    hu[phantom.lung_labels > 0] = -1000.0  # gas-filled cavities of lung size, no parenchyma
    volume = dataclasses.replace(phantom.to_volume(), array=hu)
    assert segment_lungs(volume, SegmentConfig(), WindowConfig()).warnings == (NO_LUNGS_WARNING,)


def test_unet_method_without_model_is_a_model_error(phantom) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelError, match="weights"):
        segment_lungs(phantom.to_volume(), SegmentConfig(method="unet"), WindowConfig())


def test_split_sides_separates_joined_lungs_along_the_junction() -> None:
    lungs = np.zeros((4, 60, 80), dtype=bool)
    lungs[:, 10:50, 8:38] = True
    lungs[:, 10:50, 42:72] = True
    lungs[:, 28:32, 38:42] = True  # thin bridge joins them into one component
    intensity = np.where(lungs, -850.0, 40.0).astype(np.float32)
    labels = split_sides(lungs, intensity)
    assert (labels[:, 10:50, 8:38] == RIGHT_LUNG).all()
    assert (labels[:, 10:50, 42:72] == LEFT_LUNG).all()
    assert not labels[~lungs].any()


def test_fill_holes_in_plane_fills_every_slice_independently() -> None:
    ring = np.zeros((3, 9, 9), dtype=bool)
    ring[:, 2:7, 2:7] = True
    ring[:, 4, 4] = False
    ring[1, 4, 0:5] = False  # slice 1: the hole opens to the border, so it is no hole
    filled = fill_holes_in_plane(ring)
    assert filled[0, 4, 4] and filled[2, 4, 4] and not filled[1, 4, 4]


def test_clean_lung_mask_closes_a_subpleural_bite_and_keeps_sides() -> None:
    labels = np.zeros((6, 80, 100), dtype=np.uint8)
    yy, xx = np.mgrid[0:80, 0:100]
    right = ((yy - 40) / 30.0) ** 2 + ((xx - 25) / 18.0) ** 2 <= 1
    left = ((yy - 40) / 30.0) ** 2 + ((xx - 75) / 18.0) ** 2 <= 1
    labels[:, right] = RIGHT_LUNG
    labels[:, left] = LEFT_LUNG
    bite = right & (xx < 14) & (np.abs(yy - 40) < 8)  # dense lesion against the lateral chest wall
    labels[2:4][:, bite] = 0
    cleaned = clean_lung_mask(labels, (5.0, 1.0, 1.0), SegmentConfig(closing_radius_mm=3.0))
    assert (cleaned[2:4][:, bite] == RIGHT_LUNG).all()
    assert (cleaned[:, left] == LEFT_LUNG).all()
    assert not cleaned[:, (xx > 44) & (xx < 56)].any()  # nothing bridged across the midline


def test_trim_dense_rim_removes_only_dense_edge_pixels() -> None:

    yy, xx = np.mgrid[:40, :40]
    radius = np.hypot(yy - 20, xx - 20)
    labels = (radius < 15).astype(np.uint8)[None]  # one slice, label 1
    low = (radius < 13)[None]  # aerated lung; the outer 2 px ring of the mask is soft tissue
    low[0, 18:23, 18:23] = False  # a dense lesion deep inside the lung
    trimmed = trim_dense_rim(labels, low, rim_px=2)
    ring = (radius >= 13) & (radius < 15)
    assert not trimmed[0][ring & (radius >= 13.5)].any()  # the blurred edge is gone
    assert trimmed[0, 18:23, 18:23].all()  # the inner lesion stays
    assert (trimmed[0][radius < 13] == 1).all()
    np.testing.assert_array_equal(trim_dense_rim(labels, low, rim_px=0), labels)


def test_unet_labels_outside_the_chest_wall_or_on_gas_or_fat_are_dropped() -> None:
    """keep_plausible_lung: the pad under the back, stomach gas and fat are not lung; the lungs stay."""
    from corona_ct.pipeline.config import SegmentConfig

    rng = np.random.default_rng(0)
    hu = np.full((6, 96, 96), -1000.0, np.float32)  # air around the body
    yy, xx = np.mgrid[:96, :96]
    body = ((yy - 44) / 34) ** 2 + ((xx - 48) / 42) ** 2 <= 1
    hu[:, body] = 40.0
    right = ((yy - 44) / 16) ** 2 + ((xx - 30) / 11) ** 2 <= 1
    left = ((yy - 44) / 16) ** 2 + ((xx - 66) / 11) ** 2 <= 1
    hu[:, right | left] = -850.0 + 20 * rng.standard_normal((6, int((right | left).sum())))
    pad = (yy >= 80) & (yy <= 86) & (np.abs(xx - 48) < 30)  # foam under the back, below the body
    hu[:, pad] = -900.0
    gas = ((yy - 66) / 4) ** 2 + ((xx - 48) / 5) ** 2 <= 1  # stomach bubble between the lungs
    hu[:, gas] = -1000.0
    labels = np.zeros(hu.shape, np.uint8)
    labels[:, right] = 1
    labels[:, left | gas] = 2
    labels[:, pad] = 2
    fat = (yy >= 12) & (yy <= 14) & (np.abs(xx - 48) < 8)  # a sliver labelled on fat
    hu[:, fat] = -100.0
    labels[:, fat] = 1
    kept = keep_plausible_lung(labels, hu, "HU", (5.0, 1.5, 1.5), low_density(hu, "HU", SegmentConfig()))
    assert (kept[:, right] == 1).all() and (kept[:, left] == 2).all()
    assert not kept[:, pad].any() and not kept[:, gas].any() and not kept[:, fat].any()


def test_median_sign_matches_ndimage_median_with_ties_at_the_threshold() -> None:
    rng = np.random.default_rng(7)
    components = rng.integers(0, 60, size=(4, 30, 30))  # 59 components, sizes odd and even
    values = rng.integers(-1000, 200, size=components.shape).astype(np.float32)
    values[components % 3 == 0] = rng.choice([-401.0, -400.0, -399.0], size=int((components % 3 == 0).sum()))
    # even-sized components whose two middle values straddle -400: the mean decides
    components[0, 0, :6] = [60, 60, 61, 61, 62, 62]
    values[0, 0, :6] = [-401.0, -399.0, -401.0, -398.0, -402.0, -399.0]
    index = np.arange(1, 63)
    for threshold in (-400.0, -960.0, 0.0):
        expected = np.sign(np.asarray(ndimage.median(values, components, index)) - np.float32(threshold))
        assert np.array_equal(median_sign(values, components, 62, threshold), expected)


@pytest.mark.parametrize("radius_px", [1, 4, 7])
def test_the_chest_wall_diamond_is_the_iterated_4_neighbour_erosion(radius_px: int) -> None:
    rng = np.random.default_rng(radius_px)
    body = ndimage.gaussian_filter(rng.normal(size=(3, 50, 44)), (0, 3, 3)) > -0.2  # touches the edges
    expected = ndimage.binary_erosion(body, structure=INPLANE_4, iterations=radius_px)
    np.testing.assert_array_equal(erode_rows(body, _diamond_rows(radius_px)), expected)
