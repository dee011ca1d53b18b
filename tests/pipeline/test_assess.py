"""The not-assessable gate: phantoms with and without lungs, each rule at its threshold, real CT."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from corona_ct.data.phantom import make_phantom
from corona_ct.pipeline.assess import (
    MAX_LUNG_MEDIAN_HU,
    MIN_LUNG_AREA_CM2,
    MIN_LUNG_SLICES,
    MIN_SLICES_FOR_EXTENT_RULE,
    NO_LUNGS_REASON,
    assess_lungs,
    check_lungs,
)
from corona_ct.pipeline.config import PipelineConfig, SegmentConfig, WindowConfig
from corona_ct.pipeline.datamodel import LungMask, Volume
from corona_ct.pipeline.preprocess import window
from corona_ct.pipeline.segment import segment_lungs


@pytest.fixture(scope="module")
def phantom():
    # 16 slices so that the extent rule applies; 3.2 mm pixels: a 307 mm field of view, an adult chest
    return make_phantom(seed=4, shape=(16, 96, 96), spacing_mm=(5.0, 3.2, 3.2), lesions="mixed")


def _no_lung_volume(phantom) -> Volume:  # type: ignore[no-untyped-def]
    hu = phantom.hu.astype(np.float32)
    hu[phantom.lung_labels > 0] = 40.0  # lungs filled with soft tissue: no lungs in view
    return dataclasses.replace(phantom.to_volume(), array=hu)


def _mask(labels: np.ndarray) -> LungMask:
    return LungMask(labels=np.asarray(labels, dtype=np.uint8), method="test")


def _area_cm2(volume: Volume, px: int) -> float:
    _, dy, dx = volume.geometry.spacing_mm
    return px * dy * dx / 100.0


def test_a_phantom_chest_is_assessable(phantom) -> None:  # type: ignore[no-untyped-def]
    volume = phantom.to_volume()
    mask = segment_lungs(volume, SegmentConfig(), WindowConfig())
    check = check_lungs(volume, mask)
    assert check.assessable and check.reason is None and assess_lungs(volume, mask) is None
    assert check.largest_area_cm2 is not None and check.largest_area_cm2 > 2 * MIN_LUNG_AREA_CM2
    assert check.median_hu is not None and check.median_hu < -700
    assert check.lung_slices >= MIN_LUNG_SLICES


def test_a_phantom_without_lungs_is_not_assessable(phantom) -> None:  # type: ignore[no-untyped-def]
    volume = _no_lung_volume(phantom)
    mask = segment_lungs(volume, SegmentConfig(), WindowConfig())
    assert assess_lungs(volume, mask) == NO_LUNGS_REASON


def test_a_mask_on_soft_tissue_is_not_lung(phantom) -> None:  # type: ignore[no-untyped-def]
    """The true lung outline, but filled with soft tissue: the HU rule alone fires."""
    volume = _no_lung_volume(phantom)
    reason = assess_lungs(volume, _mask(phantom.lung_labels))
    assert reason is not None and "HU" in reason and "cross-section" not in reason
    lungs = phantom.lung_labels > 0

    def reason_with_lungs_at(value: float) -> str | None:
        hu = np.asarray(volume.array).copy()  # a Volume makes its array read-only
        hu[lungs] = value
        return assess_lungs(dataclasses.replace(volume, array=hu), _mask(phantom.lung_labels))

    assert "HU" in str(reason_with_lungs_at(-100.0))  # fat
    assert "HU" in str(reason_with_lungs_at(MAX_LUNG_MEDIAN_HU + 20))
    # a median just below the limit passes: dense pneumonia is still lung
    assert reason_with_lungs_at(MAX_LUNG_MEDIAN_HU - 20) is None


def test_small_false_lungs_are_not_a_chest(phantom) -> None:  # type: ignore[no-untyped-def]
    """A U-Net on an abdomen draws lung-dense specks of a few cm² per slice: the area rule fires."""
    volume = phantom.to_volume()
    lungs = np.asarray(phantom.lung_labels)

    def blob_of(area_cm2: float) -> np.ndarray:
        labels = np.zeros_like(lungs)
        for z in range(lungs.shape[0]):
            px = np.flatnonzero(lungs[z] > 0)
            keep = px[: int(area_cm2 / _area_cm2(volume, 1))]
            labels[z].flat[keep] = lungs[z].flat[keep]
        return labels

    small = check_lungs(volume, _mask(blob_of(0.8 * MIN_LUNG_AREA_CM2)))
    assert small.reason is not None and "cross-section" in small.reason
    assert small.largest_area_cm2 is not None and small.largest_area_cm2 < MIN_LUNG_AREA_CM2
    assert check_lungs(volume, _mask(blob_of(1.2 * MIN_LUNG_AREA_CM2))).assessable


def test_lungs_on_few_slices_of_a_long_series(phantom) -> None:  # type: ignore[no-untyped-def]
    volume = phantom.to_volume()
    lungs = np.asarray(phantom.lung_labels)
    assert volume.n_slices >= MIN_SLICES_FOR_EXTENT_RULE
    middle = volume.n_slices // 2
    few = np.zeros_like(lungs)
    few[middle : middle + MIN_LUNG_SLICES - 1] = lungs[middle : middle + MIN_LUNG_SLICES - 1]
    reason = assess_lungs(volume, _mask(few))
    assert reason is not None and f"on only {MIN_LUNG_SLICES - 1} of {volume.n_slices} slices" in reason
    enough = np.zeros_like(lungs)
    enough[middle : middle + MIN_LUNG_SLICES] = lungs[middle : middle + MIN_LUNG_SLICES]
    assert assess_lungs(volume, _mask(enough)) is None
    # a short series (a slab, single slices) is exempt
    short = dataclasses.replace(
        volume,
        array=np.ascontiguousarray(volume.array[middle - 2 : middle + 3]),
        geometry=dataclasses.replace(volume.geometry, shape=(5, *volume.geometry.shape[1:])),
    )
    assert assess_lungs(short, _mask(few[middle - 2 : middle + 3])) is None


def test_without_spacing_the_lung_share_of_the_body_decides(phantom) -> None:  # type: ignore[no-untyped-def]
    """Slice images in nominal 1 mm pixels: cm² mean nothing, the lung / body area ratio does."""
    base = phantom.to_volume()
    windowed = dataclasses.replace(
        base, array=window(base.array, "HU", WindowConfig()), units="window", spacing_known=False
    )
    lungs = np.asarray(phantom.lung_labels)
    full = check_lungs(windowed, _mask(lungs))
    assert full.assessable and full.largest_area_cm2 is None and full.median_hu is None
    assert full.largest_body_fraction is not None and full.largest_body_fraction > 0.15
    speck = np.zeros_like(lungs)
    speck[:, 40:44, 30:34] = 1  # 16 px per slice: < 1 % of the body
    reason = assess_lungs(windowed, _mask(speck))
    assert reason is not None and "% of the body" in reason


def test_lung_check_is_json_ready(phantom) -> None:  # type: ignore[no-untyped-def]
    volume = _no_lung_volume(phantom)
    payload = check_lungs(volume, _mask(phantom.lung_labels)).to_dict()
    assert payload["assessable"] is False and "HU" in str(payload["reason"])
    assert payload["rules"]["min_lung_area_cm2"] == MIN_LUNG_AREA_CM2
    json.dumps(payload, allow_nan=False)


@pytest.mark.realdata
@pytest.mark.shipped_weights
@pytest.mark.slow
def test_the_unet_on_an_abdomen_is_not_assessable_and_a_chest_slab_is(
    shared_data: Path, tmp_path: Path
) -> None:
    """The shipped U-Net draws ~18 cm³ of "lungs" on the abdomen-j2k series (bowel gas, fat);
    without the gate that series was called COVID positive."""
    from corona_ct.pipeline.batch import run_batch
    from corona_ct.pipeline.modelset import load_models

    config = PipelineConfig().replace({"runtime.device": "cpu"})
    models = load_models(config)
    assert models.segmenter is not None  # the U-Net, not the classical segmenter, is under test
    dicom = shared_data / "dicom"
    outcome = run_batch(
        [dicom / "abdomen-j2k", dicom / "LIDC-IDRI-0002"], tmp_path, config, models, show_progress=False
    )
    assert outcome.exit_code == 0 and not outcome.failures
    with (tmp_path / "summary.csv").open() as handle:
        rows = {row["source"]: row for row in csv.DictReader(handle)}

    abdomen = rows["dicom:abdomen-j2k"]
    assert abdomen["status"] == "not-assessable"
    assert "too small for a chest" in abdomen["reason"] and not abdomen["error"]
    assert abdomen["case_probability"] == "" and abdomen["corona_score_cm3"] == ""
    report = json.loads((tmp_path / abdomen["study_id"] / "report.json").read_text())
    assert report["status"] == "not-assessable" and report["not_assessable_reason"] == abdomen["reason"]
    assert report["case"] is None and report["severity"] is None
    assert report["lung_check"]["largest_area_cm2"] < MIN_LUNG_AREA_CM2
    assert all(s["probability"] is None and not s["evaluated"] for s in report["slices"])
    html = (tmp_path / abdomen["study_id"] / "report.html").read_text()
    assert "NOT ASSESSABLE" in html

    (chest,) = (row for source, row in rows.items() if source != "dicom:abdomen-j2k")
    assert chest["status"] == "ok" and chest["reason"] == ""
    report = json.loads((tmp_path / chest["study_id"] / "report.json").read_text())
    assert report["status"] == "ok" and report["not_assessable_reason"] is None
    assert report["lung_check"]["largest_area_cm2"] > 3 * MIN_LUNG_AREA_CM2
    assert int(chest["slices_evaluated"]) > 0 and chest["case_probability"] != ""
