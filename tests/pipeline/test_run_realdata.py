"""`run` on the real CT in ../shared/data: LIDC chest slabs, a JPEG 2000 abdomen, broken copies."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pydicom
import pytest

from corona_ct.pipeline.batch import run_batch
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.modelset import load_models

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def outcome(shared_data: Path, tmp_path_factory):
    dicom = shared_data / "dicom"
    mixed = tmp_path_factory.mktemp("mixed")
    shutil.copytree(dicom / "LIDC-IDRI-0002", mixed / "good")
    broken = mixed / "broken"
    broken.mkdir()
    for source in sorted((dicom / "LIDC-IDRI-0002").iterdir())[:4]:
        (broken / source.name).write_bytes(source.read_bytes()[:2000])  # truncated files
    mr = mixed / "mr"
    mr.mkdir()
    for source in sorted((dicom / "LIDC-IDRI-0002").iterdir())[:3]:
        ds = pydicom.dcmread(source)
        ds.Modality = "MR"
        ds.StudyInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["mr-copy"])
        ds.save_as(mr / source.name)
    config = PipelineConfig().replace({"runtime.device": "cpu"})
    models = load_models(config, allow_untrained=True)
    output = tmp_path_factory.mktemp("out")
    inputs = [dicom / "LIDC-IDRI-0001", dicom / "abdomen-j2k", mixed]
    result = run_batch(inputs, output, config, models, show_progress=False)
    with (output / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return result, output, rows


def _report(output: Path, row: dict[str, str]) -> dict:
    return json.loads((output / row["study_id"] / "report.json").read_text())


def test_good_studies_finish_and_broken_ones_fail_alone(outcome) -> None:
    result, _, rows = outcome
    by_status: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_status.setdefault(row["status"], []).append(row)
    assert len(by_status["ok"]) == 2  # LIDC-0001, copy of LIDC-0002
    assert [row["source"] for row in by_status["not-assessable"]] == ["dicom:abdomen-j2k"]
    assert len(by_status["failed"]) >= 1
    assert all(row["error"] and "Traceback" not in row["error"] for row in by_status["failed"])
    assert result.exit_code == 1


def test_lidc_lung_volumes_are_plausible_for_the_slab(outcome) -> None:
    _, output, rows = outcome
    lidc = [r for r in rows if r["status"] == "ok" and int(r["slices_evaluated"]) > 0]
    assert len(lidc) == 2
    for row in lidc:
        report = _report(output, row)
        slab_cm = report["input"]["shape_zyx"][0] * report["input"]["spacing_mm_zyx"][0] / 10
        mean_area_cm2 = float(row["lung_volume_cm3"]) / slab_cm
        # both lungs of an adult cut axially cover roughly 100-450 cm² per slice
        assert 100 < mean_area_cm2 < 450, (row["study_id"], mean_area_cm2)
        right = report["severity"]["right"]["lung_volume_cm3"]
        left = report["severity"]["left"]["lung_volume_cm3"]
        # both lungs found, neither replaced by air trapped between the back and the table
        assert 0.3 < right / (right + left) < 0.7, (row["study_id"], right, left)
        assert report["segmenter"] == "classical"


def test_the_abdomen_is_not_assessable_instead_of_scored(outcome) -> None:
    _, output, rows = outcome
    row = next(r for r in rows if r["source"] == "dicom:abdomen-j2k")
    assert row["status"] == "not-assessable" and row["reason"] == "no lungs found"
    assert row["slices_evaluated"] == "0" and float(row["lung_volume_cm3"]) == 0
    assert row["corona_score_cm3"] == "" and row["case_probability"] == ""  # no call, not a score of 0
    report = _report(output, row)
    assert report["status"] == "not-assessable" and report["not_assessable_reason"] == "no lungs found"
    assert any("no lungs" in warning for warning in report["warnings"])
    assert all(not s["evaluated"] and s["probability"] is None for s in report["slices"])
