"""Corona score against a hand computation; HU measures on synthetic lungs and the phantom's known truth."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from scipy import ndimage

from corona_ct.data.phantom import make_phantom
from corona_ct.data.phantom_anatomy import VESSEL
from corona_ct.data.phantom_lesions import LESION_CODE
from corona_ct.pipeline.config import PipelineConfig, SeverityConfig
from corona_ct.pipeline.datamodel import CamStack, LungMask, SliceScores
from corona_ct.pipeline.errors import GeometryError
from corona_ct.pipeline.severity import (
    HU_MEASURE_CAVEAT,
    MATMUL_MIN_RADIUS_PX,
    _gaussian_by_matrices,
    _gaussian_radius,
    _smooth_within,
    corona_score,
    hu_maps,
    raw_hu_fractions,
    severity,
)


def test_corona_score_equals_hand_computation() -> None:
    maps = np.zeros((3, 2, 2), dtype=np.float32)
    maps[0] = [[0.5, 0.7], [1.0, 0.6]]  # counted: 0.7 + 1.0 (0.6 is not > 0.6)
    maps[1] = [[0.9, 0.9], [0.9, 0.9]]  # slice not positive
    maps[2] = [[0.65, 0.0], [0.0, 0.8]]  # counted: 0.65 + 0.8
    positive = np.array([True, False, True])
    voxel_mm3 = 2.0 * 0.5 * 0.5
    expected = (0.7 + 1.0 + 0.65 + 0.8) * voxel_mm3 / 1000.0
    assert corona_score(maps, positive, voxel_mm3) == pytest.approx(expected, rel=1e-6)
    within = np.zeros(maps.shape, dtype=bool)
    within[0, 1, 0] = True  # only the 1.0 voxel
    assert corona_score(maps, positive, voxel_mm3, within=within) == pytest.approx(voxel_mm3 / 1000.0)
    assert corona_score(maps, positive, voxel_mm3, threshold=0.95) == pytest.approx(voxel_mm3 / 1000.0)


def test_corona_score_rejects_mismatched_shapes() -> None:
    with pytest.raises(GeometryError):
        corona_score(np.zeros((3, 2, 2)), np.zeros(2, dtype=bool), 1.0)


def test_severity_on_phantom_matches_known_truth() -> None:
    phantom = make_phantom(seed=3, shape=(12, 64, 64), lesions="mixed")
    volume = phantom.to_volume()
    config = PipelineConfig()
    # CAM = 0.8 exactly on the lesions, 0.3 elsewhere; every slice positive
    maps = np.where(phantom.lesion_mask, 0.8, 0.3).astype(np.float32)
    n = volume.n_slices
    scores = SliceScores(probs=np.full(n, 0.9, dtype=np.float32), evaluated=np.ones(n, dtype=bool))
    result = severity(
        volume, LungMask(phantom.lung_labels.copy(), "truth"), CamStack(maps, ("layer2",)), scores, config
    )

    lesion_cm3 = phantom.lesion_volume_mm3 / 1000.0
    assert result.corona_score_cm3 == pytest.approx(0.8 * lesion_cm3, rel=1e-6)
    assert result.corona_score_in_lung_cm3 == pytest.approx(0.8 * lesion_cm3, rel=1e-6)
    assert result.lung_volume_cm3 == pytest.approx(phantom.lung_volume_mm3 / 1000.0)
    assert result.affected_percent == pytest.approx(0.8 * phantom.affected_percent, rel=1e-6)
    assert result.positive_slices == n
    # HU measures: per side they add up to the whole (both are % of the assessed lung)
    assert result.ggo_percent is not None and result.consolidation_percent is not None
    for side in ("right", "left"):
        values = getattr(result, side)
        assert values["lung_volume_cm3"] == pytest.approx(phantom.lung_volume_by_side_mm3[side] / 1000.0)
        assert values["corona_score_cm3"] == pytest.approx(
            0.8 * phantom.lesion_volume_by_side_mm3[side] / 1000.0, rel=1e-6
        )
    assert result.right["corona_score_cm3"] + result.left["corona_score_cm3"] == pytest.approx(
        result.corona_score_in_lung_cm3, rel=1e-6
    )


def test_severity_splits_the_counted_voxels_as_the_reference_functions_do() -> None:
    """Per side, in the lungs and overall, severity() equals corona_score(within=...) and
    HuMaps.percent(region), with maps hot outside the lungs and some slices negative."""
    phantom = make_phantom(seed=5, shape=(10, 64, 64), lesions="mixed")
    volume = phantom.to_volume()
    config = PipelineConfig()
    rng = np.random.default_rng(0)
    maps = rng.random(volume.array.shape).astype(np.float32)
    probs = rng.random(volume.n_slices).astype(np.float32)
    evaluated = np.ones(volume.n_slices, dtype=bool)
    evaluated[0] = False
    labels = phantom.lung_labels.copy()
    result = severity(
        volume, LungMask(labels, "truth"), CamStack(maps, ("layer2",)), SliceScores(probs, evaluated), config
    )
    positive = evaluated & (probs >= config.classify.positive_threshold)
    assert 0 < positive.sum() < volume.n_slices
    voxel = volume.geometry.voxel_volume_mm3

    def score(within: np.ndarray | None) -> float:
        return corona_score(maps, positive, voxel, config.cam.activation_threshold, within=within)

    assert result.corona_score_cm3 == pytest.approx(score(None), rel=1e-12)
    assert result.corona_score_in_lung_cm3 == pytest.approx(score(labels > 0), rel=1e-12)
    assert result.corona_score_cm3 > result.corona_score_in_lung_cm3 > 0  # hot voxels outside the lungs
    maps_hu = hu_maps(volume.hu, labels > 0, volume.geometry.spacing_mm, config.severity)
    assert (result.ggo_percent, result.consolidation_percent) == maps_hu.percent()
    for name, label in (("right", 1), ("left", 2)):
        side = getattr(result, name)
        assert side["corona_score_cm3"] == pytest.approx(score(labels == label), rel=1e-12)
        assert side["lung_volume_cm3"] == pytest.approx(np.count_nonzero(labels == label) * voxel / 1000.0)
        assert (side["ggo_percent"], side["consolidation_percent"]) == maps_hu.percent(labels == label)


@pytest.mark.parametrize("sigma_mm", [0.7, 8.0, 25.0])
def test_smoothing_by_matrices_is_the_gaussian_filter(sigma_mm: float) -> None:
    """Wide kernels go through two matrix products: the same normalised smoothing as ndimage's."""
    rng = np.random.default_rng(1)
    hu = rng.normal(-800.0, 60.0, size=(3, 90, 70)).astype(np.float32)
    support = ndimage.gaussian_filter(rng.normal(size=hu.shape), (0, 4, 4)) > 0
    spacing = (0.6, 0.75)
    sigma_px = (sigma_mm / spacing[0], sigma_mm / spacing[1])
    expected = ndimage.gaussian_filter(hu, (0, *sigma_px), mode="constant")
    np.testing.assert_allclose(_gaussian_by_matrices(hu, sigma_px), expected, rtol=1e-5, atol=1e-3)
    weight = support.astype(np.float32)
    numerator = ndimage.gaussian_filter(hu * weight, (0, *sigma_px), mode="constant")
    denominator = ndimage.gaussian_filter(weight, (0, *sigma_px), mode="constant")
    reference = np.where(denominator > 1e-3, numerator / np.maximum(denominator, 1e-12), 0.0)
    smoothed = _smooth_within(hu, support, sigma_mm, spacing)
    np.testing.assert_allclose(smoothed[support], reference[support], rtol=1e-4, atol=1e-2)
    assert (_gaussian_radius(min(sigma_px)) >= MATMUL_MIN_RADIUS_PX) == (sigma_mm > 5)  # both paths ran


def test_severity_without_lungs_or_hu() -> None:
    phantom = make_phantom(seed=1, shape=(8, 48, 48), lesions="none")
    hu_volume = phantom.to_volume()
    windowed = hu_volume.__class__(
        array=np.clip((hu_volume.array + 1000.0) / 1000.0, 0, 1).astype(np.float32),
        units="window",
        geometry=hu_volume.geometry,
        study_id="w",
        source="windowed phantom",
    )
    n = windowed.n_slices
    scores = SliceScores(probs=np.full(n, np.nan, dtype=np.float32), evaluated=np.zeros(n, dtype=bool))
    maps = np.ones(windowed.array.shape, dtype=np.float32)
    empty = LungMask(np.zeros(windowed.array.shape, dtype=np.uint8), "classical")
    result = severity(windowed, empty, CamStack(maps, ("layer2",)), scores, PipelineConfig())
    assert result.lung_volume_cm3 == 0.0 and result.affected_percent == 0.0
    assert result.corona_score_cm3 == 0.0 and result.positive_slices == 0
    assert result.ggo_percent is None and result.consolidation_percent is None
    assert "ggo_percent" not in result.right


def test_raw_hu_fractions_keep_the_old_bounds() -> None:
    hu = np.array([[[-751.0, -750.0, -300.0, -299.0, 50.0, 51.0]]])
    ggo, consolidation = raw_hu_fractions(hu, np.ones(hu.shape, dtype=bool), SeverityConfig())
    assert ggo == pytest.approx(100.0 * 2 / 6) and consolidation == pytest.approx(100.0 * 2 / 6)


# --- HU measures on synthetic lungs with known truth ---

SPACING = (2.0, 0.7, 0.7)  # mm (z, y, x): low-dose thin slices, sharp in-plane
LUNG_HU = -850.0
INNER = slice(1, -1)  # the first and last slices are the lung's through-plane rim (edge_margin_slices)


def _noisy_lung(noise_sd: float = 60.0, shape: tuple[int, int, int] = (5, 180, 180)) -> tuple[Any, Any]:
    """(HU, lungs): an elliptic lung at −850 HU in soft tissue (+40 HU) plus noise of ``noise_sd`` HU.

    The first and last slices (of several) hold a smaller ellipse: the lung's top and bottom. The
    noise is lightly correlated (Gaussian 0.5 px, like a sharp kernel), then scaled to ``noise_sd``.
    """
    _, ny, nx = shape
    y, x = np.ogrid[:ny, :nx]

    def ellipse(scale: float) -> np.ndarray:
        return ((y - ny / 2) / (0.42 * scale * ny)) ** 2 + ((x - nx / 2) / (0.45 * scale * nx)) ** 2 <= 1.0

    lungs = np.broadcast_to(ellipse(1.0), shape).copy()
    if shape[0] > 2:
        lungs[0] = lungs[-1] = ellipse(0.8)
    noise = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal(shape), (0, 0.5, 0.5))
    hu = np.where(lungs, LUNG_HU, 40.0) + noise * (noise_sd / noise.std())
    return hu.astype(np.float32), lungs


def _add_vessels(hu: np.ndarray, lungs: np.ndarray, vessel_hu: float = 40.0) -> np.ndarray:
    """Thin vessels of ``vessel_hu``: in-plane tubes 1.4–3.5 mm wide and through-plane dots 2–3.5 mm,
    blurred into the lung (partial volume). Returns the (unblurred) vessel mask."""
    _, ny, nx = hu.shape
    y, x = np.mgrid[:ny, :nx]
    vessels = np.zeros(hu.shape[1:], dtype=bool)
    for angle, offset, half_width_px in ((0.3, -30, 1.0), (1.2, 10, 1.5), (2.2, 25, 2.5), (-0.7, 0, 1.0)):
        vessels |= (
            np.abs((x - nx / 2) * np.sin(angle) - (y - ny / 2) * np.cos(angle) - offset) <= half_width_px
        )
    for cy, cx, radius in ((60, 60, 2.0), (120, 70, 2.5), (80, 130, 1.5), (110, 120, 2.5)):
        vessels |= (y - cy) ** 2 + (x - cx) ** 2 <= radius**2
    mask = np.broadcast_to(vessels, hu.shape) & lungs
    blurred = ndimage.gaussian_filter(np.where(mask, vessel_hu, LUNG_HU), (0, 0.7, 0.7))
    hu[lungs] += (blurred - LUNG_HU)[lungs]
    return mask


def _disk(shape: tuple[int, ...], center: tuple[float, float], radius_mm: float) -> np.ndarray:
    _, ny, nx = shape
    y, x = np.ogrid[:ny, :nx]
    disk = ((y - center[0]) ** 2 + (x - center[1]) ** 2) * SPACING[1] ** 2 <= radius_mm**2
    return np.broadcast_to(disk, shape).copy()


def test_noisy_lung_with_thin_vessels_reads_almost_no_opacity() -> None:
    hu, lungs = _noisy_lung(noise_sd=60.0)
    vessels = _add_vessels(hu, lungs)
    config = SeverityConfig()
    raw_ggo, raw_consolidation = raw_hu_fractions(hu, lungs, config)
    assert raw_ggo + raw_consolidation > 8.0  # what the raw thresholds made of this clean lung
    maps = hu_maps(hu, lungs, SPACING, config)
    ggo, consolidation = maps.percent()
    assert ggo < 0.3 and consolidation < 0.3
    assert not (maps.assessed & vessels).any()
    assert np.count_nonzero(maps.assessed) > 0.6 * np.count_nonzero(lungs)  # most of the lung is assessed
    # per slice: noise found at its true level, then smoothed below the target
    assert np.all(np.abs(maps.noise_sd_hu[INNER] - 60.0) < 12.0)
    assert np.all(maps.smoothing_mm[INNER] > 0)
    assert np.all(maps.residual_noise_hu[INNER] <= config.noise_target_hu)
    assert maps.aerated_level_hu == pytest.approx(LUNG_HU, abs=25.0)


def test_broad_ground_glass_patch_is_counted_at_its_true_area() -> None:
    hu, lungs = _noisy_lung(noise_sd=60.0)
    _add_vessels(hu, lungs)
    patch = _disk(hu.shape, (90, 60), radius_mm=15.0)  # 30 mm across, clear of the rim and the vessels' ends
    hu[patch] += -500.0 - LUNG_HU
    maps = hu_maps(hu, lungs, SPACING, SeverityConfig())
    true_area = np.count_nonzero(patch[INNER] & maps.assessed[INNER])
    assert np.count_nonzero(maps.ggo[INNER]) == pytest.approx(true_area, rel=0.1)
    assert np.count_nonzero(maps.ggo & ~patch) < 0.05 * true_area
    assert np.count_nonzero(maps.consolidation) < 0.02 * true_area
    ggo = maps.percent()[0]
    assert ggo == pytest.approx(
        100.0 * np.count_nonzero(patch & maps.assessed) / np.count_nonzero(maps.assessed), rel=0.1
    )


def test_dense_lung_does_not_read_as_ground_glass() -> None:
    """A whole lung at −720 HU (expiration, thick slices) is above −750 HU everywhere, yet not ground glass."""
    hu, lungs = _noisy_lung(noise_sd=40.0)
    hu[lungs] += 130.0
    patch = _disk(hu.shape, (90, 60), radius_mm=15.0)
    hu[patch] += -450.0 - (LUNG_HU + 130.0)
    maps = hu_maps(hu, lungs, SPACING, SeverityConfig())
    assert maps.ggo_floor_hu == pytest.approx(maps.aerated_level_hu + 150.0)
    assert np.count_nonzero(maps.ggo & ~patch) < 0.05 * np.count_nonzero(patch & maps.assessed)
    assert np.count_nonzero(maps.ggo & patch) > 0.9 * np.count_nonzero(patch & maps.assessed)
    absolute = hu_maps(hu, lungs, SPACING, dataclasses.replace(SeverityConfig(), ggo_contrast_hu=0.0))
    assert absolute.percent()[0] > 50.0  # the absolute range alone takes the whole lung


def test_enclosed_consolidation_counts_but_a_mask_leak_does_not() -> None:
    hu, lungs = _noisy_lung(noise_sd=40.0)
    lesion = _disk(hu.shape, (90, 60), radius_mm=9.0)  # 18 mm across, surrounded by aerated lung
    hu[lesion] += 10.0 - LUNG_HU
    leak = _disk(hu.shape, (90, 172), radius_mm=12.0) & ~lungs  # the mask takes in chest wall at one side
    leaky = lungs | leak
    maps = hu_maps(hu, leaky, SPACING, SeverityConfig())
    true_area = np.count_nonzero(lesion[INNER] & maps.assessed[INNER])
    assert np.count_nonzero(maps.consolidation[INNER] & lesion[INNER]) == pytest.approx(true_area, rel=0.05)
    assert np.count_nonzero(maps.ggo & lesion) == 0
    assert np.count_nonzero(maps.consolidation & leak) < 0.05 * np.count_nonzero(leak)
    off = hu_maps(hu, leaky, SPACING, dataclasses.replace(SeverityConfig(), consolidation_reach_mm=0.0))
    assert np.count_nonzero(off.consolidation & leak) > 0.3 * np.count_nonzero(leak)


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """Noisy lung with bright and dim vessels, a ground-glass patch, a consolidation and a mask leak."""
    hu, lungs = _noisy_lung(noise_sd=60.0)
    _add_vessels(hu, lungs)
    dim = np.zeros(hu.shape, dtype=bool)
    dim[:, 40:140, 118:121] = True  # a 2 mm vessel in partial volume: −550 HU
    hu[dim & lungs] = -550.0
    hu[_disk(hu.shape, (70, 55), radius_mm=12.0)] += -500.0 - LUNG_HU
    hu[_disk(hu.shape, (125, 60), radius_mm=7.0)] += 20.0 - LUNG_HU
    return hu, lungs | (_disk(hu.shape, (90, 172), radius_mm=12.0) & ~lungs)


#: (field, other value, what must change and how) for every SeverityConfig field
FIELD_EFFECTS = [
    ("ggo_hu", (-450.0, -300.0), "ggo", "less"),
    ("consolidation_hu", (-300.0, -100.0), "consolidation", "less"),
    ("ggo_contrast_hu", 450.0, "ggo", "less"),
    ("edge_margin_mm", 6.0, "assessed", "less"),
    ("edge_margin_slices", 0, "assessed", "more"),
    ("vessel_hu", 200.0, "consolidation", "less"),
    ("vessel_smoothing_mm", 2.5, "excluded", "less"),
    ("vessel_width_mm", 0.0, "consolidation", "more"),
    ("vessel_contrast_hu", 0.0, "excluded", "less"),
    ("vessel_margin_mm", 0.0, "excluded", "less"),
    ("consolidation_reach_mm", 0.0, "consolidation", "more"),
    ("noise_target_hu", 90.0, "smoothing_mm", "less"),
    ("max_smoothing_mm", 0.0, "smoothing_mm", "less"),
]


def test_every_severity_field_is_listed() -> None:
    assert {f.name for f in dataclasses.fields(SeverityConfig)} == {name for name, *_ in FIELD_EFFECTS}


@pytest.mark.parametrize(("field", "value", "measure", "direction"), FIELD_EFFECTS)
def test_each_severity_field_acts(field: str, value: Any, measure: str, direction: str) -> None:
    hu, lungs = _scene()

    def amount(config: SeverityConfig) -> float:
        maps = hu_maps(hu, lungs, SPACING, config)
        return float(np.nansum(getattr(maps, measure)))

    default, changed = (
        amount(SeverityConfig()),
        amount(dataclasses.replace(SeverityConfig(), **{field: value})),
    )
    assert (changed < default) if direction == "less" else (changed > default), (default, changed)


def test_single_slice_and_empty_lungs() -> None:
    hu, lungs = _noisy_lung(noise_sd=40.0, shape=(1, 180, 180))
    maps = hu_maps(hu, lungs, (1.0, *SPACING[1:]), SeverityConfig())
    assert maps.assessed.any()  # one slice has no through-plane rim to leave out
    nothing = hu_maps(hu, np.zeros(hu.shape, dtype=bool), SPACING, SeverityConfig())
    assert nothing.percent() == (0.0, 0.0) and np.isnan(nothing.noise_sd_hu).all()
    with pytest.raises(GeometryError):
        hu_maps(hu, lungs[0], SPACING, SeverityConfig())


def test_severity_hu_measures_on_the_phantom() -> None:
    """Default-size phantom (1.6 mm pixels): ground glass found at its true extent, thin vessels left out."""
    config = PipelineConfig()
    for lesions in ("ggo", "none"):
        phantom = make_phantom(seed=3, lesions=lesions)
        volume = phantom.to_volume()
        n = volume.n_slices
        scores = SliceScores(probs=np.zeros(n, dtype=np.float32), evaluated=np.ones(n, dtype=bool))
        cams = CamStack(np.zeros(volume.array.shape, dtype=np.float32), ("layer2",))
        result = severity(volume, LungMask(phantom.lung_labels.copy(), "truth"), cams, scores, config)
        maps = hu_maps(volume.hu, phantom.lung_labels > 0, volume.geometry.spacing_mm, config.severity)
        assert (result.ggo_percent, result.consolidation_percent) == maps.percent()
        truth = 100.0 * np.count_nonzero((phantom.lesion_kind == LESION_CODE["ggo"]) & maps.assessed)
        truth /= np.count_nonzero(maps.assessed)
        assert result.ggo_percent == pytest.approx(truth, rel=0.15, abs=0.05)
        if lesions == "none":  # thin vessels are left out; only the hilar ones, wider than 5 mm, remain
            vessels = (phantom.tissue == VESSEL) & (phantom.lung_labels > 0)
            raw_consolidation = raw_hu_fractions(volume.hu, phantom.lung_labels > 0, config.severity)[1]
            assert result.ggo_percent is not None and result.consolidation_percent is not None
            assert result.ggo_percent < 0.05 and result.consolidation_percent < 0.6 * raw_consolidation
            assert np.count_nonzero(maps.excluded & vessels) > 0.5 * np.count_nonzero(vessels)
        for side, label in (("right", 1), ("left", 2)):
            assert getattr(result, side)["ggo_percent"] == pytest.approx(
                maps.percent(phantom.lung_labels == label)[0]
            )


def test_caveat_names_the_measured_auc() -> None:
    assert "AUC" in HU_MEASURE_CAVEAT and "tools/hu_measures.py" in HU_MEASURE_CAVEAT
