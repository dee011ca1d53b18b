"""``run --ray``: a batch on a real local Ray cluster of 2 workers.

A worker is killed (SIGKILL) while it analyses a study: that study is retried once and the batch
ends with every study done, with the results of a local run. A study that cannot be read fails
twice and is reported once. A batch interrupted (Ctrl-C) and run again with ``--resume`` reuses
what finished and computes the rest, each study once.
"""

from __future__ import annotations

import csv
import gzip
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray

from corona_ct.data.phantom import make_phantom
from corona_ct.data.writers import write_dicom_series
from corona_ct.pipeline.batch import BatchOutcome, run_batch
from corona_ct.pipeline.cli import main
from corona_ct.pipeline.completion import verify_complete
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.device import set_threads
from corona_ct.pipeline.errors import ConfigError
from corona_ct.pipeline.layout import COMPLETE_NAME
from corona_ct.pipeline.modelset import load_models
from corona_ct.pipeline.ray_batch import RayOptions
from corona_ct.pipeline.threads import THREAD_ENV_VARS

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = {"roi.input_size": 64, "runtime.device": "cpu", "segment.method": "classical"}
SHAPE = {"shape": (12, 96, 96), "spacing_mm": (5.0, 3.2, 3.2)}
SMALL_CLI = ["--set", "roi.input_size=64", "--set", "segment.method=classical", "--device", "cpu"]
N_STUDIES = 6
WAIT_S = 240.0  # a loaded 2-core machine


def _write_unreadable_nifti(path: Path) -> None:
    """A file that is found as a study (by its suffix) and fails when a worker reads it."""
    with gzip.open(path, "wb") as handle:
        handle.write(b"not a NIfTI header" * 40)


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Six phantom DICOM studies (every second one with lesions) and one unreadable NIfTI."""
    root = tmp_path_factory.mktemp("ray-inputs")
    good = []
    for seed in range(N_STUDIES):
        folder = root / f"case{seed}"
        lesions = "mixed" if seed % 2 else "none"
        write_dicom_series(make_phantom(seed=seed, lesions=lesions, **SHAPE), folder, patient_id=f"P{seed}")
        good.append(folder)
    _write_unreadable_nifti(root / "broken.nii.gz")
    return SimpleNamespace(root=root, good=good, broken=root / "broken.nii.gz")


def _rows(output: Path) -> dict[str, dict[str, str]]:
    with (output / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    ids = [row["study_id"] for row in rows]
    assert len(ids) == len(set(ids)), f"a study appears twice in summary.csv: {ids}"
    return {row["study_id"]: row for row in rows}


def _busy_worker_pids() -> list[int]:
    """Process ids of Ray workers analysing a study now (process title ``ray::StudyWorker.run``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if proc.name.isdigit() and title.startswith(b"ray::StudyWorker.run"):
            pids.append(int(proc.name))
    return pids


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_a_killed_worker_costs_one_retry_and_the_results_match_a_local_run(studies, tmp_path, caplog) -> None:
    config = PipelineConfig().replace(SMALL)
    models = load_models(config, allow_untrained=True)
    inputs = [*studies.good, studies.broken]
    output = tmp_path / "ray"
    result: dict[str, BatchOutcome] = {}
    killed: list[int] = []

    def batch() -> None:
        result["ray"] = run_batch(
            inputs,
            output,
            config,
            models,
            show_progress=False,
            study_naming="folder",
            ray=RayOptions(workers=2),
        )

    def killer() -> None:
        # Kill a worker mid-study once the first study has finished (both workers busy then).
        _wait_for(lambda: any(output.glob(f"*/{COMPLETE_NAME}")), "the first finished study")
        _wait_for(lambda: bool(_busy_worker_pids()), "a busy Ray worker")
        pid = _busy_worker_pids()[0]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    caplog.set_level(logging.WARNING, logger="corona_ct")
    runner = threading.Thread(target=batch)
    kill_thread = threading.Thread(target=killer, daemon=True)
    runner.start()
    kill_thread.start()
    runner.join(WAIT_S * 2)
    assert not runner.is_alive(), "the Ray batch did not finish"
    assert killed, "no worker was killed: the test did not test anything"
    assert not ray.is_initialized(), "the local cluster started for the run must be shut down after it"

    outcome = result["ray"]
    rows = _rows(output)
    good_ids = [folder.name for folder in studies.good]
    assert sorted(rows) == sorted([*good_ids, "broken"])
    assert [rows[sid]["status"] for sid in good_ids] == ["ok"] * N_STUDIES
    assert rows["broken"]["status"] == "failed" and rows["broken"]["error"]
    assert [failure.study_id for failure in outcome.failures] == ["broken"]  # reported once, not twice
    messages = [record.getMessage() for record in caplog.records]
    assert any("its Ray worker died" in m and "retrying it once" in m for m in messages), messages
    assert any(m.startswith("broken: failed") and "retrying it once" in m for m in messages), messages
    assert any(m.startswith("broken: failed") and "giving up" in m for m in messages), messages
    for sid in good_ids:  # every study's files are whole and match its completion record
        report, why = verify_complete(output / sid, {})
        assert report is not None, f"{sid}: {why}"

    # The same batch in this process, on 1 thread like each worker, gives the same answers.
    set_threads(1)  # the autouse fixture in conftest restores the session's threads
    local = tmp_path / "local"
    run_batch(studies.good, local, config, models, show_progress=False, study_naming="folder")
    local_rows = _rows(local)
    for sid in good_ids:
        for column in ("case_probability", "corona_score_cm3", "lung_volume_cm3", "n_slices"):
            assert float(rows[sid][column]) == pytest.approx(
                float(local_rows[sid][column]), rel=1e-9, abs=1e-9
            ), (
                sid,
                column,
            )


def _cli(output: Path, inputs: list[Path], *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, **dict.fromkeys(THREAD_ENV_VARS, "1")}
    command = [
        sys.executable,
        str(REPO_ROOT / "run_pipeline.py"),
        "run",
        *map(str, inputs),
        "--output",
        str(output),
    ]
    command += ["--ray", "--ray-workers", "2", "--no-progress", "--study-id", "folder", *SMALL_CLI, *extra]
    # A background shell job ignores SIGINT; give the child Ctrl-C's default handling.
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.mark.slow
def test_an_interrupted_ray_batch_resumes_with_every_study_done_once(studies, tmp_path) -> None:
    output = tmp_path / "out"
    first = _cli(output, studies.good)
    _wait_for(
        lambda: any(output.glob(f"*/{COMPLETE_NAME}")) or first.poll() is not None, "the first finished study"
    )
    first.send_signal(signal.SIGINT)  # Ctrl-C mid-batch
    log_first, _ = first.communicate(timeout=WAIT_S)
    assert first.returncode != 0, log_first
    finished = {path.parent.name: path.stat().st_mtime_ns for path in output.glob(f"*/{COMPLETE_NAME}")}
    assert 0 < len(finished) < N_STUDIES, f"not interrupted mid-batch: {sorted(finished)}\n{log_first}"

    second = _cli(output, studies.good, "--resume")
    log_second, _ = second.communicate(timeout=WAIT_S * 2)
    assert second.returncode == 0, log_second
    rows = _rows(output)
    assert sorted(rows) == sorted(folder.name for folder in studies.good)
    assert {row["status"] for row in rows.values()} == {"ok"}
    assert f"{len(finished)} resumed" in log_second, log_second
    for sid, mtime in finished.items():  # what finished before Ctrl-C was reused, not written again
        assert (output / sid / COMPLETE_NAME).stat().st_mtime_ns == mtime, sid
    computed = [line for line in log_second.splitlines() if line.startswith("study ")]
    assert len(computed) == N_STUDIES - len(finished), log_second


def test_ray_options_are_checked_before_anything_runs() -> None:
    with pytest.raises(ConfigError, match="--ray-workers 0"):
        RayOptions(workers=0)
    with pytest.raises(ConfigError, match="cpus-per-worker"):
        RayOptions(cpus_per_worker=0)


def test_joining_a_cluster_that_is_not_there_says_how_to_start_one(studies, tmp_path) -> None:
    config = PipelineConfig().replace(SMALL)
    models = load_models(config, allow_untrained=True)
    with pytest.raises(ConfigError, match="ray start --head"):
        run_batch(
            studies.good[:1],
            tmp_path / "out",
            config,
            models,
            show_progress=False,
            ray=RayOptions(address="127.0.0.1:1"),
        )


def test_ray_settings_without_ray_are_refused_before_models_load(studies, tmp_path, capsys) -> None:
    code = main(["run", str(studies.good[0]), "--output", str(tmp_path / "out"), "--ray-workers", "2"])
    assert code == 2
    assert "--ray-workers needs --ray" in capsys.readouterr().err
