"""pydicom's per-file warnings become one line per series (issue 11).

COVID-CT-MD's StudyInstanceUID/SeriesInstanceUID are UUID strings, not valid DICOM
UIDs: pydicom logs a warning for every file (266 stderr lines for one 133-slice study
before this change).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import REPO_ROOT


@pytest.fixture(scope="module")
def covid_ct_md(shared_data: Path) -> Path:
    folder = shared_data / "covid-ct-md" / "P002"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    return folder


@pytest.mark.realdata
def test_inspect_prints_one_line_per_series_not_per_file(covid_ct_md: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run_pipeline.py"), "inspect", str(covid_ct_md)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=dict(os.environ),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines[:5]
    assert "133 of 133 files: Invalid value for VR UI: (value)" in lines[0]
    assert "pydicom header warning, shown once per series" in lines[0]
    assert "09bc8aea" not in done.stderr  # header values are not echoed


@pytest.mark.realdata
@pytest.mark.slow
def test_reading_the_series_logs_nothing_more(covid_ct_md: Path, caplog: pytest.LogCaptureFixture) -> None:
    from corona_ct.pipeline.ingest import load_study

    with caplog.at_level(logging.WARNING):
        volume = load_study(covid_ct_md)
    assert volume.array.shape[0] == 133
    assert [r for r in caplog.records if r.name.startswith("pydicom")] == []
    summaries = [r.getMessage() for r in caplog.records if "pydicom header warning" in r.getMessage()]
    assert len(summaries) == 1
