"""Memory admission (issue 11): a study or image whose header declares more data than the machine
can hold is refused from its header, before any pixel is read, as a per-study failure."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from corona_ct.data.phantom import make_phantom
from corona_ct.data.writers import write_dicom_series, write_nifti
from corona_ct.pipeline.cli import main
from corona_ct.pipeline.config import IngestConfig
from corona_ct.pipeline.errors import InsufficientMemoryError
from corona_ct.pipeline.ingest import load_study
from corona_ct.pipeline.ingest.nifti import read_nifti
from corona_ct.pipeline.ingest.slices import read_slice_image
from corona_ct.pipeline.memory import (
    AVAILABLE_OVERRIDE_ENV,
    VOLUME_WORKING_FACTOR,
    available_memory_bytes,
)

GB = 10**9


def _huge_nifti(path: Path, shape: tuple[int, int, int]) -> Path:
    """A NIfTI whose header declares ``shape`` int16 voxels, with (almost) no data behind it."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_zooms((0.7, 0.7, 1.0))
    header.set_qform(np.diag([0.7, 0.7, 1.0, 1.0]), code=1)
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 1024)  # vox_offset 352, then 1 KB
    return path


def _numbers_gb(message: str) -> list[float]:
    return [float(n) for n in re.findall(r"(\d+(?:\.\d+)?) GB", message)]


def test_available_memory_is_measured() -> None:
    available = available_memory_bytes()
    assert available is not None and available > 0
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemTotal:"))
    assert available <= total


def test_a_nifti_declaring_10_gb_is_refused_from_its_header(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(AVAILABLE_OVERRIDE_ENV, str(8 * GB))
    path = _huge_nifti(tmp_path / "huge.nii", (2048, 2048, 600))  # 2.5 G voxels: 10 GB as float32
    assert path.stat().st_size < 2000
    with pytest.raises(InsufficientMemoryError) as raised:
        read_nifti(path, IngestConfig(), "huge")
    message = str(raised.value)
    assert str(path) in message and "2048×2048×600 voxels" in message
    needed, available = _numbers_gb(message)
    assert needed == pytest.approx(2048 * 2048 * 600 * 4 * VOLUME_WORKING_FACTOR / GB, rel=0.01)
    assert available == pytest.approx(8.0)


def test_the_machines_own_memory_is_the_default_limit(tmp_path: Path, monkeypatch) -> None:
    """Without an override the detected memory applies: 4096² × 5000 voxels (petabytes) never fit."""
    monkeypatch.delenv(AVAILABLE_OVERRIDE_ENV, raising=False)
    path = _huge_nifti(tmp_path / "absurd.nii", (4096, 4096, 5000))
    with pytest.raises(
        InsufficientMemoryError, match=r"GB of memory to analyse, but only [\d.]+ GB is available"
    ):
        read_nifti(path, IngestConfig(), "absurd")


def test_a_study_that_fits_is_read(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(AVAILABLE_OVERRIDE_ENV, str(1 * GB))
    phantom = make_phantom(seed=1, shape=(6, 64, 64))
    volume = read_nifti(write_nifti(phantom, tmp_path / "ct.nii.gz"), IngestConfig(), "ct")
    assert volume.array.shape == (6, 64, 64)


def test_a_dicom_series_is_refused_from_rows_columns_and_file_count(tmp_path: Path, monkeypatch) -> None:
    write_dicom_series(make_phantom(seed=1, shape=(6, 64, 64)), tmp_path / "study")
    monkeypatch.setenv(AVAILABLE_OVERRIDE_ENV, str(100_000))  # 0.1 MB
    with pytest.raises(InsufficientMemoryError, match=r"series …\w+ .*6 slices of 64×64 pixels.*0\.0 GB"):
        load_study(tmp_path / "study")
    monkeypatch.setenv(AVAILABLE_OVERRIDE_ENV, str(1 * GB))
    assert load_study(tmp_path / "study").array.shape[0] == 6


def test_a_9000_pixel_png_is_refused_from_its_header(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(AVAILABLE_OVERRIDE_ENV, str(4 * GB))
    path = tmp_path / "big.png"
    Image.new("1", (9000, 9000)).save(path)  # a few KB on disk, 81 M pixels
    with pytest.raises(InsufficientMemoryError) as raised:
        read_slice_image(path, IngestConfig())
    message = str(raised.value)
    assert "big.png" in message and "9000×9000 pixels" in message
    needed, available = _numbers_gb(message)
    assert needed > available == pytest.approx(4.0)


def test_explain_fails_only_the_oversized_image(tmp_path: Path, monkeypatch, capsys) -> None:
    """Before: the 9000×9000 image aborted the whole explain batch with a MemoryError."""
    monkeypatch.setenv(AVAILABLE_OVERRIDE_ENV, str(4 * GB))
    big = tmp_path / "big.png"
    Image.new("1", (9000, 9000)).save(big)
    small = tmp_path / "small.png"
    Image.fromarray((np.random.default_rng(0).random((96, 96)) * 255).astype(np.uint8)).save(small)
    out = tmp_path / "out"
    code = main(["explain", str(big), str(small), "--output", str(out), "--allow-untrained",
                 "--set", "roi.input_size=64", "--device", "cpu"])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert re.search(r"failed: \S*big\.png: .*9000×9000 pixels.*GB.*only 4\.0 GB is available", err)
    with (out / "predictions.csv").open() as handle:
        statuses = {row["file"]: row["status"] for row in csv.DictReader(handle)}
    assert statuses == {"big.png": "failed", "small.png": "ok"}  # every image has its row


def test_a_run_fails_only_the_oversized_study(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(AVAILABLE_OVERRIDE_ENV, str(8 * GB))
    inputs = tmp_path / "in"
    (inputs / "huge").mkdir(parents=True)
    _huge_nifti(inputs / "huge" / "huge.nii", (2048, 2048, 600))
    write_dicom_series(make_phantom(seed=5, shape=(8, 80, 96), spacing_mm=(5.0, 3.5, 3.5)), inputs / "chest")
    code = main(["run", str(inputs), "--output", str(tmp_path / "out"), "--allow-untrained", "--no-progress",
                 "--set", "roi.input_size=64", "--device", "cpu"])  # fmt: skip
    assert code == 1
    with (tmp_path / "out" / "summary.csv").open() as handle:
        rows = {row["status"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"ok", "failed"}
    assert rows["failed"]["study_id"] == "huge" and "only 8.0 GB is available" in rows["failed"]["error"]


def test_an_address_space_limit_counts(tmp_path: Path) -> None:
    """``ulimit -v`` (common on clusters) caps what is available, in a real limited process."""
    import os
    import resource
    import subprocess
    import sys

    limit = 6 * GB

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {k: v for k, v in os.environ.items() if k != AVAILABLE_OVERRIDE_ENV}
    done = subprocess.run(
        [sys.executable, "-c", "from corona_ct.pipeline.memory import available_memory_bytes as a; print(a())"],
        capture_output=True, text=True, preexec_fn=limited, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert 0 < int(done.stdout) < limit
