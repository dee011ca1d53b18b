"""Corona score against a hand computation; severity's figures against the phantom's known truth
and the reference functions."""

from __future__ import annotations

import numpy as np
import pytest

from corona_ct.data.phantom import make_phantom
from corona_ct.data.phantom_anatomy import VESSEL
from corona_ct.data.phantom_lesions import LESION_CODE
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.datamodel import CamStack, LungMask, SliceScores
from corona_ct.pipeline.errors import GeometryError
from corona_ct.pipeline.hu_maps import hu_maps, raw_hu_fractions
from corona_ct.pipeline.severity import corona_score, severity


def test_corona_score_equals_hand_computation() -> None:
    maps = np.zeros((3, 2, 2), dtype=np.float32)
    maps[0] = [[0.5, 0.7], [1.0, 0.6]]  # counted: 0.7 + 1.0 (0.6 is not > 0.6)
    maps[1] = [[0.9, 0.9], [0.9, 0.9]]  # slice not positive
    maps[2] = [[0.65, 0.0], [0.0, 0.8]]  # counted: 0.65 + 0.8
    positive = np.array([True, False, True])
    voxel_mm3 = 2.0 * 0.5 * 0.5
    expected = (0.7 + 1.0 + 0.65 + 0.8) * voxel_mm3 / 1000.0
    assert corona_score(maps, positive, voxel_mm3, 0.6) == pytest.approx(expected, rel=1e-6)
    within = np.zeros(maps.shape, dtype=bool)
    within[0, 1, 0] = True  # only the 1.0 voxel
    assert corona_score(maps, positive, voxel_mm3, 0.6, within=within) == pytest.approx(voxel_mm3 / 1000.0)
    assert corona_score(maps, positive, voxel_mm3, threshold=0.95) == pytest.approx(voxel_mm3 / 1000.0)


def test_corona_score_rejects_mismatched_shapes() -> None:
    with pytest.raises(GeometryError):
        corona_score(np.zeros((3, 2, 2)), np.zeros(2, dtype=bool), 1.0, 0.6)


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
        assert values.lung_volume_cm3 == pytest.approx(phantom.lung_volume_by_side_mm3[side] / 1000.0)
        assert values.corona_score_cm3 == pytest.approx(
            0.8 * phantom.lesion_volume_by_side_mm3[side] / 1000.0, rel=1e-6
        )
    assert result.right.corona_score_cm3 + result.left.corona_score_cm3 == pytest.approx(
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
        assert side.corona_score_cm3 == pytest.approx(score(labels == label), rel=1e-12)
        assert side.lung_volume_cm3 == pytest.approx(np.count_nonzero(labels == label) * voxel / 1000.0)
        assert (side.ggo_percent, side.consolidation_percent) == maps_hu.percent(labels == label)


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
    assert result.right.ggo_percent is None and result.left.consolidation_percent is None


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
            assert getattr(result, side).ggo_percent == pytest.approx(
                maps.percent(phantom.lung_labels == label)[0]
            )
