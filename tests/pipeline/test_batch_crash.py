"""Crash consistency of ``corona-ct run``: after any fault and a ``--resume``, OUT is byte for byte
what an uninterrupted run writes.

Real processes, real signals: the batch runs as ``python run_pipeline.py run`` in a subprocess.
Faults are placed at exact points by a ``sitecustomize`` that this module writes into a temporary
folder and puts first on the child's PYTHONPATH (nothing in the project knows about it): it pauses
the child at a chosen ``os.replace`` (the rename that publishes an output file) and writes a marker
file, so that the test kills it there; or it makes every file opened for writing under OUT, from
the N-th on, fail with ENOSPC.

Compared byte for byte: every file under OUT (summary.csv, the id registry, NIfTI masks and maps,
features.npz, the completion records), except three time-dependent things, which are left out
explicitly: report.json's ``created`` and ``timings_s`` fields, the ``created`` time in report.html,
and (following from those two) the two report files' checksums in ``.complete.json``; each record
is checked against its own files instead. The lock file holds the pid of its last holder and is
not compared.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corona_ct.data.phantom import make_phantom
from corona_ct.data.writers import write_dicom_series, write_nifti
from corona_ct.pipeline.cli import main
from corona_ct.pipeline.completion import verify_complete
from corona_ct.pipeline.layout import COMPLETE_NAME, LOCK_NAME
from corona_ct.pipeline.threads import THREAD_ENV_VARS
from tests.conftest import SESSION_THREADS

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
SHAPE = {"shape": (8, 64, 64), "spacing_mm": (6.0, 4.8, 4.8)}  # small: the module runs 8 CLI processes
WAIT_S = 300.0  # a child run on a loaded 2-core machine

SITECUSTOMIZE = '''
"""Test-only fault injection for tests/pipeline/test_batch_crash.py (loaded via PYTHONPATH)."""
import os

_PLAN = os.environ.get("CORONA_CT_TEST_FAULT")
if _PLAN:
    import builtins
    import errno
    import io
    import json
    import time

    _plan = json.loads(_PLAN)
    _count = [0]

    def _pause():
        with open(_plan["marker"] + ".tmp", "w") as handle:
            handle.write(str(os.getpid()))
        os.rename(_plan["marker"] + ".tmp", _plan["marker"])
        while not os.path.exists(_plan.get("release", "/nonexistent/release")):
            time.sleep(0.02)

    if _plan["kind"] == "pause":
        _real_replace = os.replace

        def _replace(src, dst, *args, **kwargs):
            hit = os.path.basename(os.fspath(dst)) == _plan["name"]
            if hit:
                _count[0] += 1
                hit = _count[0] == _plan["nth"]
            if hit and _plan["when"] == "before":
                _pause()
            result = _real_replace(src, dst, *args, **kwargs)
            if hit and _plan["when"] == "after":
                _pause()
            return result

        os.replace = _replace

    elif _plan["kind"] == "enospc":
        _under = os.path.realpath(_plan["under"]) + os.sep
        _real_open = io.open

        class _FullDisk(io.FileIO):
            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)

        def _open(file, mode="r", buffering=-1, encoding=None, errors=None, newline=None, closefd=True, opener=None):
            if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
                if os.path.realpath(os.fsdecode(file)).startswith(_under):
                    _count[0] += 1
                    if _count[0] >= _plan["nth"]:
                        raw = _FullDisk(os.fsdecode(file), mode.replace("b", "").replace("t", ""))
                        buffered = io.BufferedWriter(raw)
                        if "b" in mode:
                            return buffered
                        return io.TextIOWrapper(buffered, encoding=encoding or "utf-8", newline=newline)
            return _real_open(file, mode, buffering, encoding, errors, newline, closefd, opener)

        builtins.open = io.open = _open
'''


class World:
    """Inputs, weights and the uninterrupted run's output, shared by the module's tests."""

    def __init__(self, root: Path) -> None:
        import torch

        from corona_ct.models.checkpoint import save_checkpoint
        from corona_ct.models.classifier import build_classifier

        self.root = root
        inputs = root / "inputs"
        # A and B: two patients whose series sit in folders of one name ("DICOM"); C: a NIfTI file
        self.a = inputs / "a" / "patA" / "DICOM"
        self.b = inputs / "b" / "patB" / "DICOM"
        self.c = inputs / "c.nii.gz"
        write_dicom_series(make_phantom(seed=3, lesions="mixed", **SHAPE), self.a, patient_id="A-1")
        write_dicom_series(make_phantom(seed=4, lesions="none", **SHAPE), self.b, patient_id="B-1")
        write_nifti(make_phantom(seed=5, lesions="mixed", **SHAPE), self.c)
        torch.manual_seed(0)
        self.weights = save_checkpoint(
            build_classifier("resnet50"),
            root / "cls.safetensors",
            {
                "architecture": "classifier/resnet50",
                "task": "covid-vs-normal slice classification (test: random weights)",
                "input": {"size": 64, "channels": 3, "window": [-1000, 0], "roi": "lung-bbox"},
            },
            half=True,
        )
        self.hooks = root / "hooks"
        self.hooks.mkdir()
        (self.hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
        self.baseline = root / "baseline"

    def args(self, output: Path, *inputs: Path, extra: tuple[str, ...] = ()) -> list[str]:
        """`run` arguments: the explicit checkpoint and the classical segmenter (no default weights used)."""
        chosen = inputs or (self.a, self.b, self.c)
        return [
            "run", *map(str, chosen), "--output", str(output), "--cls-weights", str(self.weights),
            "--set", "segment.method=classical", "--device", "cpu", "--no-progress", *extra,
        ]  # fmt: skip

    def start(self, args: list[str], fault: dict[str, object] | None = None) -> subprocess.Popen[str]:
        """The real CLI in a child process (with a fault plan for the sitecustomize hook)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.hooks), env.get("PYTHONPATH", "")) if p)
        # The same threads as this process (tests/conftest.py), so the same floats.
        env.update(dict.fromkeys(THREAD_ENV_VARS, str(SESSION_THREADS)))
        env.pop("CORONA_CT_TEST_FAULT", None)
        if fault is not None:
            env["CORONA_CT_TEST_FAULT"] = json.dumps(fault)
        return subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "run_pipeline.py"), *args],
            env=env,
            cwd=self.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # A shell's background job (`make test &`, nohup) ignores SIGINT, and children inherit
            # that: give the child Ctrl-C's default so that the SIGINT test sends what a user would.
            preexec_fn=_default_sigint,
        )

    def pause_plan(self, name: str, nth: int, when: str, tag: str) -> dict[str, object]:
        return {
            "kind": "pause", "name": name, "nth": nth, "when": when,
            "marker": str(self.root / f"{tag}.paused"), "release": str(self.root / f"{tag}.release"),
        }  # fmt: skip


def _wait_for(marker: Path, child: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not marker.exists():
        if child.poll() is not None:
            out, err = child.communicate()
            pytest.fail(f"the child exited ({child.returncode}) before reaching {marker.name}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"the child never reached {marker.name}")
        time.sleep(0.05)


def _finish(child: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = child.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        child.kill()  # a child stuck at a fault-plan pause must not outlive the failed test
        child.communicate()
        raise
    return child.returncode, out, err


def _normalised(path: Path) -> bytes:
    """A file's bytes, with the time-dependent fields named in the module docstring left out."""
    data = path.read_bytes()
    if path.name == "report.json":
        report = json.loads(data)
        report.pop("created")
        report.pop("timings_s")
        return json.dumps(report, sort_keys=True).encode()
    if path.name == "report.html":
        return re.sub(rb"created \d{4}-\d\d-\d\dT[0-9:]+\+00:00", b"created <time>", data)
    if path.name == COMPLETE_NAME:
        record = json.loads(data)
        for name in ("report.json", "report.html"):
            record["files"].pop(name)
        return json.dumps(record, sort_keys=True).encode()
    return data


def _snapshot(output: Path) -> dict[str, bytes]:
    """Every file under ``output`` (the lock file excepted), normalised; completion records verified."""
    files = {}
    for path in sorted(output.rglob("*")):
        if path.is_file() and path.name != LOCK_NAME:
            files[path.relative_to(output).as_posix()] = _normalised(path)
            if path.name == COMPLETE_NAME:
                record = json.loads(path.read_text())
                expected = {k: record[k] for k in ("corona_ct_version", "config_hash", "models_key", "input")}
                report, why = verify_complete(path.parent, expected)
                assert report is not None, f"{path}: {why}"
    return files


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _assert_same_as_baseline(world: World, output: Path) -> None:
    expected, got = _snapshot(world.baseline), _snapshot(output)
    assert sorted(got) == sorted(expected), "different files"
    differing = [name for name in expected if got[name] != expected[name]]
    assert not differing, f"{output.name}: differs from the uninterrupted run in {differing}"


def _summary_lines(output: Path) -> list[str]:
    return (output / "summary.csv").read_text().splitlines()


def _resume(world: World, output: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """``run --resume`` through the CLI's own entry point, in this process (no fault is injected here)."""
    capsys.readouterr()
    assert main(world.args(output, extra=("--resume",))) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("crash"))


@pytest.fixture(scope="module")
def killed_between_studies(world: World) -> Path:
    """Phase 1, two children at once: the uninterrupted baseline, and a plain run SIGKILLed right after
    summary.csv was rewritten for its second study (between studies 2 and 3).

    Returns that killed run's OUT as it was left; tests work on copies."""
    out = world.root / "killed-between"
    baseline = world.start(world.args(world.baseline))
    plan = world.pause_plan("summary.csv", 2, "after", "between")
    child = world.start(world.args(out), plan)
    _wait_for(Path(str(plan["marker"])), child)
    child.send_signal(signal.SIGKILL)
    assert _finish(child)[0] == -signal.SIGKILL
    code, stdout, stderr = _finish(baseline)
    assert code == 0, stderr
    assert "3 ok, 0 failed" in stdout
    return out


def test_sigkill_between_studies_keeps_both_finished_rows(killed_between_studies, world, capsys) -> None:
    out = world.root / "between"
    shutil.copytree(killed_between_studies, out)
    baseline_rows = _summary_lines(world.baseline)
    assert [r.split(",")[0] for r in baseline_rows[1:]] == ["DICOM", "DICOM-2", "c"]
    assert _summary_lines(out) == baseline_rows[:3]  # header + the two finished rows, exactly
    assert not (out / "c").exists()
    stdout = _resume(world, out, capsys)
    assert "2 resumed" in stdout
    _assert_same_as_baseline(world, out)


@pytest.fixture(scope="module")
def faulted(world: World, killed_between_studies: Path) -> dict[str, tuple[Path, int, str]]:
    """Phase 2: six children at once, each resuming a copy of the killed batch, faulted in study 3."""
    plans = {
        "sigkill-in-study": ("pause", "lung_mask.nii.gz", "after", signal.SIGKILL),
        "sigkill-mid-write": ("pause", "heatmap.nii.gz", "before", signal.SIGKILL),
        "sigint": ("pause", "features.npz", "before", signal.SIGINT),
        "sigterm": ("pause", "report.html", "before", signal.SIGTERM),
        "concurrent": ("pause", "report.json", "before", None),
        "enospc": ("enospc", "", "", None),
    }
    children = {}
    for tag, (kind, name, when, _sig) in plans.items():
        out = world.root / tag
        shutil.copytree(killed_between_studies, out)
        if kind == "pause":
            plan = world.pause_plan(name, 1, when, tag)
        else:  # the 1st write is the id registry, the 2nd study 3's lung mask: the disk is full from there
            plan = {"kind": "enospc", "under": str(out), "nth": 2}
        children[tag] = (out, plan, world.start(world.args(out, extra=("--resume",)), plan))
    results = {}
    try:
        for tag, (out, plan, child) in children.items():
            signum = plans[tag][3]
            if plans[tag][0] == "pause":
                _wait_for(Path(str(plan["marker"])), child)
            if tag == "concurrent":  # a second run on the same OUT while the first holds it
                second = world.start(world.args(out, extra=("--resume",)))
                code, _, stderr = _finish(second)
                assert code == 2, stderr
                assert f"{out} is in use by another corona-ct run (pid {child.pid} " in stderr
                Path(str(plan["release"])).touch()
            elif signum is not None:
                child.send_signal(signum)
            code, _, stderr = _finish(child)
            results[tag] = (out, code, stderr)
    finally:  # on a failure, children still paused at their fault would wait for ever
        for _, _, child in children.values():
            if child.poll() is None:
                child.kill()
                child.communicate()
    return results


def test_sigkill_during_a_study_leaves_it_unfinished_and_resume_completes_it(faulted, world, capsys) -> None:
    out, code, _ = faulted["sigkill-in-study"]
    assert code == -signal.SIGKILL
    assert (out / "c" / "lung_mask.nii.gz").is_file() and not (out / "c" / COMPLETE_NAME).exists()
    assert _summary_lines(out) == _summary_lines(world.baseline)[:3]
    _resume(world, out, capsys)
    _assert_same_as_baseline(world, out)


def test_sigkill_mid_write_leaves_only_a_temporary_file(faulted, world, capsys) -> None:
    out, code, _ = faulted["sigkill-mid-write"]
    assert code == -signal.SIGKILL
    assert not (out / "c" / "heatmap.nii.gz").exists()
    assert [p.name for p in (out / "c").glob(".heatmap.*.tmp.nii.gz")], "the half-published file"
    _resume(world, out, capsys)
    _assert_same_as_baseline(world, out)  # the stale temporary file is gone too


@pytest.mark.parametrize(("tag", "exit_code"), [("sigint", 130), ("sigterm", 143)])
def test_sigint_and_sigterm_stop_cleanly_and_resume_completes(faulted, world, capsys, tag, exit_code) -> None:
    out, code, stderr = faulted[tag]
    assert code == exit_code, stderr
    how = "terminated (SIGTERM)" if tag == "sigterm" else "interrupted"
    assert f"corona-ct: {how}; finished results are kept" in stderr
    assert not list(out.rglob("*.tmp*")), "an interrupted writer removes its temporary file"
    assert _summary_lines(out) == _summary_lines(world.baseline)[:3]
    _resume(world, out, capsys)
    _assert_same_as_baseline(world, out)


def test_a_full_disk_stops_the_batch_with_a_remedy_and_resume_completes(faulted, world, capsys) -> None:
    out, code, stderr = faulted["enospc"]
    assert code == 2, stderr
    assert "No space left on device" in stderr and "--resume" in stderr
    assert _summary_lines(out) == _summary_lines(world.baseline)[:3]
    assert not (out / "c" / COMPLETE_NAME).exists()
    _resume(world, out, capsys)
    _assert_same_as_baseline(world, out)


def test_a_concurrent_writer_is_refused_and_the_holder_finishes(faulted, world, capsys) -> None:
    out, code, stderr = faulted["concurrent"]
    assert code == 0, stderr
    _assert_same_as_baseline(world, out)
    assert "3 resumed" in _resume(world, out, capsys)  # nothing left to do
    _assert_same_as_baseline(world, out)


def test_two_patients_with_one_folder_name_in_two_runs(world, capsys) -> None:
    """Patient A's run, then B (also in a folder named DICOM) resumed into the same OUT: B is analysed
    as DICOM-2, A's row stays, and OUT equals the run of both at once."""
    out = world.root / "same-name"
    capsys.readouterr()
    assert main(world.args(out, world.a, world.c)) == 0
    assert main(world.args(out, world.b, extra=("--resume",))) == 0
    stdout = capsys.readouterr().out
    assert "DICOM-2" in stdout and "0 resumed, 2 earlier rows kept" in stdout
    _assert_same_as_baseline(world, out)
