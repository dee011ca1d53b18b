"""`run`, `explain` and `demo` through the command line entry point."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from corona_ct.data.phantom import make_phantom
from corona_ct.data.writers import write_dicom_series, write_png_slices
from corona_ct.pipeline.cli import main

FAST = ["--set", "roi.input_size=64", "--device", "cpu"]


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=5, shape=(8, 80, 96), spacing_mm=(5.0, 3.5, 3.5), lesions="mixed")


def test_run_refuses_without_weights_in_one_line(tmp_path: Path, phantom, capsys) -> None:
    write_dicom_series(phantom, tmp_path / "study")
    assert main(["run", str(tmp_path / "study"), "--output", str(tmp_path / "out"), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no classifier weights" in err[0] and "--allow-untrained" in err[0]


@pytest.mark.slow
def test_run_exit_code_is_1_when_a_study_fails(tmp_path: Path, phantom, capsys) -> None:
    write_dicom_series(phantom, tmp_path / "in" / "good")
    (tmp_path / "in" / "empty").mkdir()
    code = main(
        [
            "run",
            str(tmp_path / "in" / "good"),
            str(tmp_path / "in" / "empty"),
            "--output",
            str(tmp_path / "out"),
            "--allow-untrained",
            "--no-progress",
            *FAST,
        ]
    )
    assert code == 1
    out = capsys.readouterr().out
    assert "1 ok, 1 failed" in out
    with (tmp_path / "out" / "summary.csv").open() as handle:
        rows = {r["status"]: r for r in csv.DictReader(handle)}
    assert "empty" in rows["failed"]["error"].lower() or "no " in rows["failed"]["error"].lower()


@pytest.mark.slow
def test_run_lists_a_study_without_lungs_as_not_assessable_and_exits_0(
    tmp_path: Path, phantom, capsys
) -> None:
    no_lungs = dataclasses.replace(
        phantom, hu=np.where(phantom.lung_labels > 0, 40, phantom.hu).astype(np.int16)
    )
    write_dicom_series(phantom, tmp_path / "in" / "chest")
    write_dicom_series(no_lungs, tmp_path / "in" / "nolungs")
    code = main(
        ["run", str(tmp_path / "in" / "chest"), str(tmp_path / "in" / "nolungs"),
         "--output", str(tmp_path / "out"), "--allow-untrained", "--no-progress", *FAST]
    )  # fmt: skip
    assert code == 0  # not assessable is an answer, not a failure
    out = capsys.readouterr().out
    assert "1 ok, 0 failed, 1 not assessable, 0 resumed" in out
    table_line = next(line for line in out.splitlines() if line.startswith("nolungs "))
    assert "not-assessable" in table_line and "no lungs found" in table_line
    listed = out.split("NOT ASSESSABLE", 1)[1].splitlines()
    assert listed[1].strip() == "nolungs: no lungs found" and len(listed) == 3  # then the count line
    with (tmp_path / "out" / "summary.csv").open() as handle:
        rows = {r["study_id"]: r for r in csv.DictReader(handle)}
    assert rows["nolungs"]["status"] == "not-assessable" and rows["chest"]["status"] == "ok"


@pytest.mark.slow
def test_explain_writes_maps_at_the_image_size(tmp_path: Path, phantom) -> None:
    files = write_png_slices(phantom, tmp_path / "png")
    picked = [Path(files[len(files) // 2]), Path(files[1])]
    code = main(
        ["explain", *map(str, picked), "--output", str(tmp_path / "explain"), "--allow-untrained", *FAST]
    )
    assert code == 0
    with (tmp_path / "explain" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["file"] for r in rows] == [p.name for p in picked]
    assert rows[0]["roi"] == "lung"  # a mid-chest slice is cropped to its lungs, as in training
    for row, path in zip(rows, picked):
        assert 0.0 <= float(row["probability"]) <= 1.0
        cam = np.load(tmp_path / "explain" / row["cam"])
        height, width = np.asarray(Image.open(path)).shape[:2]
        assert cam.dtype == np.float32 and cam.shape == (height, width)
        assert cam.min() >= 0 and cam.max() <= 1
        assert (tmp_path / "explain" / f"{Path(row['cam']).stem.removesuffix('_cam')}_overlay.png").is_file()


def test_explain_reports_an_unreadable_image_and_goes_on(tmp_path: Path, phantom, capsys) -> None:
    files = write_png_slices(phantom, tmp_path / "png")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    code = main(
        ["explain", str(bad), str(files[3]), "--output", str(tmp_path / "x"), "--allow-untrained", *FAST]
    )
    assert code == 1
    assert "broken.png" in capsys.readouterr().err
    with (tmp_path / "x" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["input"], r["status"]) for r in rows] == [(str(bad), "failed"), (str(files[3]), "ok")]
    assert "not a readable" in rows[0]["error"] and rows[0]["probability"] == rows[0]["cam"] == ""


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_on_two_phantoms(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--output", str(tmp_path / "demo"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "phantom-lesions" in out and "phantom-normal" in out
    summary = (tmp_path / "demo" / "results" / "summary.csv").read_text()
    assert summary.count(",ok,") == 2
    report = json.loads((tmp_path / "demo" / "results" / "phantom-lesions" / "report.json").read_text())
    assert report["severity"]["ggo_percent"] > 0
