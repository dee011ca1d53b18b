"""Corona score against a hand computation; severity measures on the phantom's known truth."""

from __future__ import annotations

import numpy as np
import pytest

from data.phantom import LESION_CODE, VESSEL, make_phantom
from pipeline.config import PipelineConfig
from pipeline.datamodel import CamStack, LungMask, SliceScores
from pipeline.errors import GeometryError
from pipeline.severity import corona_score, severity


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
    lungs = phantom.lung_labels > 0
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
    # HU measures from the phantom's own tissue truth: GGO lesions; consolidation lesions and vessels
    n_lung = np.count_nonzero(lungs)
    ggo_truth = 100.0 * np.count_nonzero(phantom.lesion_kind == LESION_CODE["ggo"]) / n_lung
    dense = (phantom.lesion_kind == LESION_CODE["consolidation"]) | ((phantom.tissue == VESSEL) & lungs)
    assert result.ggo_percent == pytest.approx(ggo_truth)
    assert result.consolidation_percent == pytest.approx(100.0 * np.count_nonzero(dense) / n_lung)
    for side in ("right", "left"):
        values = getattr(result, side)
        assert values["lung_volume_cm3"] == pytest.approx(phantom.lung_volume_by_side_mm3[side] / 1000.0)
        assert values["corona_score_cm3"] == pytest.approx(
            0.8 * phantom.lesion_volume_by_side_mm3[side] / 1000.0, rel=1e-6
        )
    assert result.right["corona_score_cm3"] + result.left["corona_score_cm3"] == pytest.approx(
        result.corona_score_in_lung_cm3, rel=1e-6
    )


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
