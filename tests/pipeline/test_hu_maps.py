"""HU measures (pipeline.hu_maps) on synthetic lungs: noise, vessels, ground glass, consolidation, and
every SeverityConfig field acting; the wide Gaussian through matrices equals ndimage's."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from scipy import ndimage

from corona_ct.pipeline.config import SeverityConfig
from corona_ct.pipeline.errors import GeometryError
from corona_ct.pipeline.hu_maps import (
    HU_MEASURE_CAVEAT,
    MATMUL_MIN_RADIUS_PX,
    _gaussian_by_matrices,
    _gaussian_radius,
    _smooth_within,
    hu_maps,
    raw_hu_fractions,
)


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


def test_caveat_names_the_measured_auc() -> None:
    assert "AUC" in HU_MEASURE_CAVEAT and "tools/hu_measures.py" in HU_MEASURE_CAVEAT
