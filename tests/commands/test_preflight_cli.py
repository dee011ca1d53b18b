"""Errors before work (issue 11): bad inputs and outputs fail fast, signals, missing packages, caches,
and outputs inside the input tree, through the real command line (subprocesses where timing,
exit codes, signals or the environment are the point)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from corona_ct.data.phantom import make_phantom
from corona_ct.data.writers import write_dicom_series, write_png_slices
from corona_ct.pipeline.atomic import atomic_path
from corona_ct.pipeline.cli import main
from corona_ct.pipeline.layout import OUTPUT_MARKER

from ..conftest import REPO_ROOT

FAST = ["--set", "roi.input_size=64", "--device", "cpu"]
#: A bad input must be refused before the models load (~8 s here); 4 s leaves room for the
#: interpreter start and imports on a busy machine.
FAST_FAIL_S = 4.0
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, str, str, float]:
    """Run ``python run_pipeline.py ARGS``; returns (exit code, stdout, stderr, wall seconds)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run_pipeline.py"), *args],
        capture_output=True,
        text=True,
        env=env if env is not None else dict(os.environ),
        timeout=timeout,
        cwd=REPO_ROOT,
    )
    return done.returncode, done.stdout, done.stderr, time.perf_counter() - start


@pytest.fixture(scope="module")
def series_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("inputs") / "study"
    phantom = make_phantom(seed=5, shape=(8, 80, 96), spacing_mm=(5.0, 3.5, 3.5), lesions="mixed")
    write_dicom_series(phantom, folder)
    return folder


def _bad_input(kind: str, tmp_path: Path, series_folder: Path) -> Path:
    one_file = sorted(series_folder.iterdir())[0]
    if kind == "missing":
        return tmp_path / "no-such-folder"
    if kind == "zip":
        archive = tmp_path / "study.zip"
        with zipfile.ZipFile(archive, "w") as handle:
            for path in sorted(series_folder.iterdir()):
                handle.write(path, path.name)
        return archive
    if kind == "single-dicom":
        return one_file
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "no such file or folder"),
        ("zip", "ZIP archive"),
        ("single-dicom", "single DICOM file holds one slice"),
        ("empty", "the folder is empty"),
    ],
)
def test_a_bad_input_fails_in_seconds_with_exit_2_and_no_output(
    kind: str, message: str, tmp_path: Path, series_folder: Path
) -> None:
    source = _bad_input(kind, tmp_path, series_folder)
    out = tmp_path / "out"
    code, _, err, wall = _cli("run", str(source), "--output", str(out), "--device", "cpu")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(source) in lines[0]
    assert wall < FAST_FAIL_S, f"took {wall:.1f} s: the models were loaded before the input was checked"
    assert not out.exists()


def test_explain_refuses_a_missing_image_before_loading_models(tmp_path: Path) -> None:
    code, _, err, wall = _cli("explain", str(tmp_path / "nope.png"), "--output", str(tmp_path / "out"))
    assert code == 2 and "nope.png: no such file" in err
    assert wall < FAST_FAIL_S and not (tmp_path / "out").exists()


def test_an_empty_folder_among_good_inputs_is_a_failed_row_not_a_refusal(tmp_path: Path) -> None:
    """Only inputs that are certainly wrong refuse the whole batch; an empty folder among others is
    listed as failed (exit 1), as before."""
    from corona_ct.pipeline.preflight import check_volume_inputs

    good = tmp_path / "good"
    write_dicom_series(make_phantom(seed=1, shape=(4, 40, 40)), good)
    (tmp_path / "empty").mkdir()
    check_volume_inputs([good, tmp_path / "empty"])  # no exception
    with pytest.raises(Exception, match="empty"):
        check_volume_inputs([tmp_path / "empty"])


# ----------------------------------------------------------------------------- output folder


def test_an_output_that_is_a_file_is_refused_naming_it(tmp_path: Path, series_folder: Path) -> None:
    target = tmp_path / "results.csv"
    target.write_text("keep me\n")
    code, _, err, wall = _cli("run", str(series_folder), "--output", str(target), "--device", "cpu")
    assert code == 2 and f"--output {target} is a file" in err and "internal error" not in err
    assert wall < FAST_FAIL_S
    assert target.read_text() == "keep me\n"


@pytest.mark.skipif(IS_ROOT, reason="root ignores folder permissions; the read-only mount test covers root")
def test_a_read_only_output_folder_is_refused_naming_it(tmp_path: Path, series_folder: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err, _ = _cli("run", str(series_folder), "--output", str(locked / "out"), "--device", "cpu")
    finally:
        locked.chmod(0o755)
    assert code == 2 and str(locked) in err and "ermission denied" in err
    assert list(locked.iterdir()) == []


def _mount_tmpfs(folder: Path, options: str) -> None:
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not permitted'})")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 256 KB file system (tmpfs); needs root, else skipped."""
    if not IS_ROOT:
        pytest.skip("mounting a small file system needs root")
    folder = tmp_path / "small"
    _mount_tmpfs(folder, "size=256k")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


@pytest.fixture
def read_only_disk(tmp_path: Path):
    if not IS_ROOT:
        pytest.skip("mounting a read-only file system needs root")
    folder = tmp_path / "ro"
    _mount_tmpfs(folder, "size=1m,ro")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def test_a_read_only_file_system_is_refused_naming_the_folder(
    read_only_disk: Path, series_folder: Path
) -> None:
    code, _, err, wall = _cli(
        "run", str(series_folder), "--output", str(read_only_disk / "out"), "--device", "cpu"
    )
    assert code == 2 and str(read_only_disk) in err and "Read-only file system" in err, err
    assert wall < FAST_FAIL_S


def test_a_full_disk_is_refused_at_the_start(small_disk: Path, series_folder: Path) -> None:
    code, _, err, wall = _cli(
        "run", str(series_folder), "--output", str(small_disk / "out"), "--device", "cpu"
    )
    assert code == 2 and str(small_disk / "out") in err and "MB free" in err, err
    assert wall < FAST_FAIL_S and not (small_disk / "out").exists()


def test_a_write_that_fills_the_disk_is_an_output_error_and_leaves_nothing(small_disk: Path) -> None:
    from corona_ct.pipeline.atomic import write_bytes
    from corona_ct.pipeline.errors import OutputError

    target = small_disk / "study" / "heatmap.nii.gz"
    with pytest.raises(OutputError, match="No space left on device; free space") as raised:
        write_bytes(target, os.urandom(1024 * 1024))
    assert str(target) in str(raised.value)
    assert list((small_disk / "study").iterdir()) == []  # no temporary, no partial target


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path: Path) -> None:
    """A real process killed (SIGKILL) inside ``atomic_path`` leaves its temporary; the cleanup finds it."""
    script = (
        "import os, signal, sys\n"
        "from corona_ct.pipeline.atomic import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    target = tmp_path / "study" / "heatmap.nii.gz"
    done = subprocess.run([sys.executable, "-c", script, str(target)], env=dict(os.environ), cwd=REPO_ROOT)
    assert done.returncode == -signal.SIGKILL
    left = [p.name for p in target.parent.iterdir()]
    assert len(left) == 1 and left[0].startswith(".heatmap.") and left[0].endswith(".tmp.nii.gz")
    (tmp_path / OUTPUT_MARKER).write_text("{}")
    (tmp_path / ".keep.me").write_text("not ours")
    from corona_ct.pipeline.atomic import remove_stale_temporaries

    assert remove_stale_temporaries(tmp_path) == 1
    assert list(target.parent.iterdir()) == []
    assert (tmp_path / OUTPUT_MARKER).is_file() and (tmp_path / ".keep.me").is_file()
    with atomic_path(tmp_path / "a.json") as tmp:  # names atomic_path makes are the ones removed
        tmp.write_text("{}")
        assert remove_stale_temporaries(tmp_path) == 1 and not tmp.exists()
        tmp.write_text("{}")


# ----------------------------------------------------------------------------- outputs are never inputs


@pytest.mark.slow
def test_an_output_inside_the_input_is_never_analysed(tmp_path: Path, capsys, caplog) -> None:
    inputs = tmp_path / "in"
    write_dicom_series(make_phantom(seed=5, shape=(8, 80, 96), spacing_mm=(5.0, 3.5, 3.5)), inputs / "chest")
    out = inputs / "results"
    args = ["run", str(inputs), "--output", str(out), "--allow-untrained", "--no-progress", *FAST]
    assert main(args) == 0
    assert (out / OUTPUT_MARKER).is_file()
    (study_dir,) = [p for p in out.iterdir() if p.is_dir()]
    stale = study_dir / ".heatmap.0123456789ab.tmp.nii.gz"
    stale.write_bytes(b"left by a killed run")
    capsys.readouterr()
    caplog.clear()
    assert main([*args, "--overwrite"]) == 0  # the folder holds the first run's results
    captured = capsys.readouterr()
    with (out / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["status"] for row in rows] == ["ok"] and len(rows) == 1  # no lung_mask / heatmap "studies"
    assert "1 ok, 0 failed, 0 not assessable" in captured.out
    skipped = [r.getMessage() for r in caplog.records if "output folder of corona-ct" in r.getMessage()]
    assert skipped == [
        f"{out}: skipped, it is an output folder of corona-ct (results are never read as input)"
    ]
    assert not stale.exists()


def test_an_older_output_folder_without_marker_is_recognised(tmp_path: Path) -> None:
    from corona_ct.data.writers import write_nifti
    from corona_ct.pipeline.ingest import discover

    phantom = make_phantom(seed=2, shape=(4, 40, 40))
    write_nifti(phantom, tmp_path / "ct.nii.gz")
    old = tmp_path / "old-results"
    (old / "ct").mkdir(parents=True)
    (old / "summary.csv").write_text("study_id,status\nct,ok\n")
    (old / "ct" / "report.json").write_text("{}")
    write_nifti(phantom, old / "ct" / "lung_mask.nii.gz")
    assert [s.source for s in discover([tmp_path])] == [tmp_path / "ct.nii.gz"]


# ----------------------------------------------------------------------------- signals, packages, caches


@pytest.mark.slow
def test_sigterm_stops_a_run_like_ctrl_c_and_keeps_finished_results(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    for seed in range(4):
        write_dicom_series(make_phantom(seed=seed, shape=(24, 128, 128)), inputs / f"p{seed}")
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "run_pipeline.py"), "run", str(inputs), "--output", str(out),
         "--allow-untrained", "--no-progress", *FAST],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not (out / "summary.csv").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be terminated"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "terminated (SIGTERM); finished results are kept" in err
    assert "Traceback" not in err
    with (out / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) < 4 and all(row["status"] == "ok" for row in rows)


BLOCKER = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r} or name.startswith({module!r} + "."):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Blocker())
from corona_ct.pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("module", "package"), [("torch", "'torch'"), ("skimage", "'scikit-image'")])
@pytest.mark.slow
def test_a_missing_package_is_named_with_the_install_command(
    module: str, package: str, tmp_path: Path, series_folder: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", BLOCKER.format(module=module), "run", str(series_folder),
         "--output", str(tmp_path / "out"), "--allow-untrained", *FAST],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert package in done.stderr and "make venv" in done.stderr
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_nothing_is_written_under_home(tmp_path: Path) -> None:
    """matplotlib and torch caches go to a temporary folder of the run, removed at exit."""
    home, scratch = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    scratch.mkdir()
    image = write_png_slices(make_phantom(seed=3, shape=(6, 80, 96)), tmp_path / "png")[3]
    env = {k: v for k, v in os.environ.items() if k not in {"MPLCONFIGDIR", "TORCH_HOME", "XDG_CACHE_HOME",
                                                            "XDG_CONFIG_HOME"}}  # fmt: skip
    env.update(HOME=str(home), TMPDIR=str(scratch))
    code, _, err, _ = _cli(
        "explain", str(image), "--output", str(tmp_path / "out"), "--allow-untrained", *FAST, env=env
    )
    assert code == 0, err
    assert (tmp_path / "out" / "predictions.csv").is_file()
    assert list(home.rglob("*")) == []
    assert list(scratch.rglob("*")) == []  # the run's cache folder is removed too
