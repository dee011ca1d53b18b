"""The batch runner: many studies into one output folder, never losing or hiding a result.

``run_batch`` discovers the studies under the inputs, gives each a study id, analyses it
(:func:`pipeline.run.analyze_study`), writes its outputs and keeps ``OUT/summary.csv``.
What it guarantees:

- **One writer per output folder.** ``OUT/.corona-ct.lock`` is held with ``flock`` for the
  whole batch; a second run on the same folder stops with the holder's pid. The kernel
  drops the lock when the holder exits, however it exits (SIGKILL included).
- **Earlier results are never dropped silently.** A run into a folder that holds results
  of an earlier run needs ``resume`` (keep them: rows are merged by study id) or
  ``overwrite`` (summary.csv lists this run's studies only).
- **Study ids follow what the input is.** Each study's input identity (DICOM: series UIDs,
  file names and sizes; NIfTI and slice images: file contents) is kept per id in
  ``OUT/.corona-ct-ids.json``; an input gets back its own id on a later run, and two
  different inputs with one folder name get distinct ids (``name``, ``name-2``, ...).
- **Resume trusts only what it can check.** ``OUT/<id>/.complete.json`` is written last
  and records every output file's size and SHA-256, the config hash, the model checksums,
  the input identity and the corona-ct version; a study is reused only when all of them
  still match, else it is recomputed and the log says why.
- **summary.csv is complete or the previous one.** It is written atomically; with
  ``overwrite`` the previous one stays until the new batch has finished.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tqdm import tqdm

from corona_ct.data.phantom import make_phantom
from corona_ct.data.writers import write_dicom_series
from corona_ct.pipeline import __version__
from corona_ct.pipeline.atomic import remove_stale_temporaries, write_json, write_text
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.datamodel import STATUS_NOT_ASSESSABLE, StudyFailure, Volume
from corona_ct.pipeline.errors import (
    ConfigError,
    CoronaCTError,
    OutputError,
    OutputInUseError,
    StageError,
    one_line,
)
from corona_ct.pipeline.ingest import discover, load_all_series, load_input
from corona_ct.pipeline.ingest.deid import clean_text, hashed_id
from corona_ct.pipeline.ingest.discovery import nifti_stem
from corona_ct.pipeline.ingest.slices import IMAGE_SUFFIXES, TIFF_SUFFIXES
from corona_ct.pipeline.layout import (
    COMPLETE_NAME,
    LOCK_NAME,
    REGISTRY_NAME,
    REPORT_JSON_NAME,
    STUDY_FILES,
    SUMMARY_COLUMNS,
    SUMMARY_NAME,
)
from corona_ct.pipeline.modelset import ModelSet, load_models, models_key
from corona_ct.pipeline.progress import bars_wanted, progress_log, study_line
from corona_ct.pipeline.report import write_study_outputs
from corona_ct.pipeline.run import _stage, analyze_study
from corona_ct.pipeline.summary import summary_cells, summary_row, summary_values

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from corona_ct.pipeline.ingest import StudyInput

log = logging.getLogger(__name__)

#: study id → input identity of every study a batch ever named in this output folder.
#: Written last in a study folder: what a resumed run checks before reusing the study.
RECORD_FORMAT = 1
#: Every file a study folder can hold (stale ones are removed when a study is recomputed).
#: Temporary names of :func:`pipeline.atomic.atomic_path` (left behind only by a killed process).
_CHUNK = 1 << 20

StudyNaming = Literal["deidentified", "folder"]
STUDY_NAMING: tuple[StudyNaming, ...] = ("deidentified", "folder")


# --------------------------------------------------------------------------- outcome


@dataclass
class BatchOutcome:
    """What a batch run did; ``rows`` are this run's summary.csv rows, ``kept`` the earlier ones it kept."""

    rows: list[dict[str, object]] = field(default_factory=list)
    failures: list[StudyFailure] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    kept: list[dict[str, object]] = field(default_factory=list)
    recomputed: dict[str, str] = field(default_factory=dict)  # study id → why it was not reused

    @property
    def not_assessable(self) -> list[dict[str, object]]:
        """Rows of the studies without plausible lungs (resumed ones included)."""
        return [row for row in self.rows if row.get("status") == STATUS_NOT_ASSESSABLE]

    @property
    def exit_code(self) -> int:
        """1 when a study failed; a not-assessable study is an answer, not a failure."""
        return 1 if self.failures else 0


# --------------------------------------------------------------------------- summary.csv


def write_summary(path: Path, rows: Sequence[Mapping[str, object]]) -> None:
    """summary.csv, atomically, one row per study sorted by study id."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: str(r["study_id"])):
        writer.writerow({k: row.get(k, "") for k in SUMMARY_COLUMNS})
    write_text(path, buffer.getvalue())


def read_summary(path: Path) -> dict[str, dict[str, object]]:
    """An existing summary.csv as study id → row (text cells); unknown columns are dropped."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or "study_id" not in reader.fieldnames:
                raise ConfigError(
                    f"{path}: not a corona-ct summary (no study_id column); move it away or pass --overwrite"
                )
            return {
                row["study_id"]: {c: row.get(c) or "" for c in SUMMARY_COLUMNS}
                for row in reader
                if row.get("study_id")
            }
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ConfigError(
            f"{path}: cannot read the earlier summary ({error}); move it away or pass --overwrite"
        ) from error


# --------------------------------------------------------------------------- the output folder


_HELD_LOCKS: dict[Path, list[int]] = {}  # resolved OUT → [fd, depth]


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold ``OUT/.corona-ct.lock`` (``flock``, exclusive) while the block runs; re-entrant in one process.

    Raises :class:`OutputInUseError` naming the holder's pid when another process holds it.
    The kernel releases the lock when the holder's process ends, even by SIGKILL.
    """
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(
            f"{output}: cannot create the output folder ({error.strerror or error}); choose another --output"
        ) from error
    key = output.resolve()
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key][1] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[key][1] -= 1
        return
    if fcntl is None:  # pragma: no cover - not POSIX
        log.warning("%s: no file locking on this system; make sure no other run writes here", output)
        yield
        return
    path = output / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 400, 0).decode("utf-8", "replace").strip() or "pid unknown"
        os.close(fd)
        raise OutputInUseError(
            f"{output} is in use by another corona-ct run ({holder}); wait for it to finish, "
            "or write to another --output folder"
        ) from None
    try:
        os.ftruncate(fd, 0)
        started = datetime.now(UTC).isoformat(timespec="seconds")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode(), 0)
        _HELD_LOCKS[key] = [fd, 1]
        yield
    finally:
        _HELD_LOCKS.pop(key, None)
        os.close(fd)  # releases the lock


def earlier_results(output: Path) -> list[str]:
    """What in ``output`` shows an earlier run (empty when there is none)."""
    if not output.is_dir():
        return []
    found = []
    if (output / SUMMARY_NAME).exists():
        found.append(SUMMARY_NAME)
    studies = sorted(
        p.name for p in output.iterdir() if (p / COMPLETE_NAME).is_file() or (p / REPORT_JSON_NAME).is_file()
    )
    if studies:
        found.append(
            f"{len(studies)} study folder(s) ({', '.join(studies[:3])}{', ...' if len(studies) > 3 else ''})"
        )
    if not found and (output / REGISTRY_NAME).exists():
        found.append(f"{REGISTRY_NAME} (an earlier run started here)")
    return found


def check_output(output: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to run into a folder with earlier results unless ``resume`` or ``overwrite`` says what to do."""
    if resume and overwrite:
        raise ConfigError(
            "--resume and --overwrite exclude each other: keep the earlier results, or replace them"
        )
    if resume or overwrite:
        return
    found = earlier_results(output)
    if found:
        raise ConfigError(
            f"{output} already holds results of an earlier run ({'; '.join(found)}); pass --resume to keep "
            "them (finished studies are reused, summary.csv rows are merged by study id) or --overwrite to "
            "recompute and replace summary.csv with this run's studies only, or choose another --output"
        )


@contextlib.contextmanager
def _writing(output: Path) -> Iterator[None]:
    """Turn an operating-system write failure (disk full, read-only, permissions) into an OutputError.

    Both forms (a raw OSError, or the writers' OutputError) end with how to go on: ``--resume``.
    """
    keep = f"then rerun with --resume (studies finished in {output} are kept)"
    try:
        yield
    except OutputError as error:
        raise OutputError(f"{error}; {keep}") from error
    except OSError as error:
        where = error.filename or output
        raise OutputError(
            f"cannot write {where}: {error.strerror or error}; free space or fix the folder's permissions, {keep}"
        ) from error


# --------------------------------------------------------------------------- input identity


@dataclass(frozen=True)
class InputIdentity:
    """What a study's input is, cheaply: ``key`` names the study, ``fingerprint`` also changes with an edit.

    DICOM: the study's series UIDs and its files' names (relative to the study folder) and
    sizes make the key; their modification times are added to the fingerprint. NIfTI and
    slice images: SHA-256 of the file contents (key and fingerprint alike).
    """

    kind: str
    key: str
    fingerprint: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "key": self.key, "fingerprint": self.fingerprint}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def input_identity(item: StudyInput) -> InputIdentity:
    """The identity of one discovered study (see :class:`InputIdentity`); reads no DICOM pixel data."""
    if item.kind == "dicom":
        root = item.source if item.source.is_dir() else item.source.parent
        files = sorted({f for series in item.series for f in series.files})
        listing, times = [], []
        for path in files:
            stat = path.stat()
            try:
                name = path.relative_to(root).as_posix()
            except ValueError:
                name = path.name
            listing.append([name, stat.st_size])
            times.append(stat.st_mtime_ns)
        key = _digest({"kind": "dicom", "series": sorted(s.uid for s in item.series), "files": listing})
        return InputIdentity("dicom", key, _digest([key, times]))
    if item.kind == "nifti":
        key = _digest({"kind": "nifti", "sha256": _sha256_file(item.source)})
        return InputIdentity("nifti", key, key)

    suffixes = TIFF_SUFFIXES if item.kind == "tiff" else IMAGE_SUFFIXES
    images = sorted(
        p
        for p in item.source.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
    )
    key = _digest({"kind": item.kind, "files": [[p.name, _sha256_file(p)] for p in images]})
    return InputIdentity(item.kind, key, key)


# --------------------------------------------------------------------------- study ids


def _folder_name(item: StudyInput) -> str:
    """The input's own name: the study folder, or a NIfTI file without its suffix."""
    return nifti_stem(item.source) if item.kind == "nifti" else item.source.name


def folder_study_id(item: StudyInput) -> str:
    """``--study-id folder``: the folder (or NIfTI) name as given, made safe as a folder name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", _folder_name(item)).strip("._")
    return name[:80] or "study"


def _load_registry(output: Path) -> dict[str, dict[str, str]]:
    path = output / REGISTRY_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{path}: unreadable ({error}); it maps study ids to inputs. Restore it, or pass a new --output"
        ) from error
    studies = data.get("studies", {}) if isinstance(data, dict) else {}
    return {str(k): dict(v) for k, v in studies.items() if isinstance(v, dict)}


def assign_study_ids(
    items: Sequence[StudyInput],
    identities: Sequence[InputIdentity],
    registry: dict[str, dict[str, str]],
    naming: StudyNaming,
) -> list[str]:
    """One id per study, stable across runs into one output folder; ``registry`` is updated in place.

    An input whose identity is in the registry (under this naming, or with this base name) gets its
    earlier id back; any other
    takes its base name (de-identified id or folder name), or ``name-2``, ``name-3``, ... when that
    name belongs to a different input in this folder or in this run.
    """
    assigned: list[str] = []
    used: set[str] = set()
    for item, identity in zip(items, identities, strict=True):
        base = item.study_id if naming == "deidentified" else folder_study_id(item)
        variant = re.compile(re.escape(base) + r"(-\d+)?")
        earlier = sorted(
            (i for i, entry in registry.items()
             if entry.get("key") == identity.key and i not in used
             and (entry.get("naming") == naming or variant.fullmatch(i))),
            key=lambda i: (len(i), i),
        )  # fmt: skip
        if earlier:
            study_id = earlier[0]
        else:
            study_id, n = base, 2
            while study_id in used or study_id in registry:
                study_id, n = f"{base}-{n}", n + 1
            registry[study_id] = {"key": identity.key, "kind": identity.kind, "naming": naming}
        used.add(study_id)
        assigned.append(study_id)
    return assigned


def write_ids_file(path: Path, entries: Sequence[tuple[str, StudyInput]]) -> None:
    """CSV study_id,input,name,kind for the user's own records; rows of other ids in the file are kept."""
    rows: dict[str, dict[str, str]] = {}
    if path.is_file():
        with contextlib.suppress(OSError, csv.Error, UnicodeDecodeError), path.open(newline="") as handle:
            rows = {r["study_id"]: r for r in csv.DictReader(handle) if r.get("study_id")}
    for study_id, item in entries:
        rows[study_id] = {
            "study_id": study_id,
            "input": str(item.source.resolve()),
            "name": _folder_name(item),
            "kind": item.kind,
        }
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["study_id", "input", "name", "kind"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows[k] for k in sorted(rows))
    write_text(path, buffer.getvalue())


def check_ids_file(ids_file: Path, output: Path, *, inside_output_ok: bool) -> None:
    """Refuse an ids file inside the output folder (which gets shared) unless explicitly allowed."""
    if inside_output_ok:
        return
    if ids_file.resolve().is_relative_to(output.resolve()):
        raise ConfigError(
            f"--ids-file {ids_file} is inside the output folder {output}, which is meant to be shared; it links "
            "study ids to input paths. Keep it elsewhere, or pass --ids-file-in-output if you mean it"
        )


# --------------------------------------------------------------------------- completion record


def expected_record(
    config: PipelineConfig,
    models: ModelSet,
    identity: InputIdentity,
    series_uid: str | None,
    all_series: bool,
) -> dict[str, object]:
    """The fields of a completion record that must equal this run's for a study to be reused."""
    return {
        "corona_ct_version": __version__,
        "config_hash": config.hash(),
        "models_key": models_key(models),
        "input": {**identity.to_dict(), "series_option": series_uid, "all_series": all_series},
    }


def write_completion_record(study_dir: Path, expected: Mapping[str, object], files: Sequence[str]) -> None:
    """``.complete.json``, written last: the expected fields plus every output's size and SHA-256."""
    record = {
        "format": RECORD_FORMAT,
        **expected,
        "files": {
            name: {"size": (study_dir / name).stat().st_size, "sha256": _sha256_file(study_dir / name)}
            for name in files
        },
    }
    write_json(study_dir / COMPLETE_NAME, record, sort_keys=True)


_WHAT_CHANGED = {
    "corona_ct_version": "it was made by another corona-ct version",
    "config_hash": "the config changed",
    "models_key": "the model weights changed",
    "input": "its input changed (or another series was chosen)",
    "dicom_out": "--dicom-out was not given when it was written",
}


def verify_complete(study_dir: Path, expected: Mapping[str, object]) -> tuple[dict[str, object] | None, str]:
    """(report.json, "") when the study's completion record matches ``expected`` and every file it lists.

    Otherwise (None, why it must be recomputed); the reason is "" when the folder does not exist.
    """
    record_path = study_dir / COMPLETE_NAME
    if not record_path.is_file():
        return None, "it did not finish (no completion record)" if study_dir.is_dir() else ""
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, "its completion record is unreadable"
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return None, "its completion record has another format"
    for key, value in expected.items():
        if record.get(key) != value:
            return None, _WHAT_CHANGED.get(key, f"{key} changed")
    files = record.get("files")
    if not isinstance(files, dict) or REPORT_JSON_NAME not in files:
        return None, "its completion record lists no files"
    for name, meta in files.items():
        path = study_dir / name
        if not isinstance(meta, dict):
            return None, "its completion record is damaged"
        if not path.is_file():
            return None, f"{name} is missing"
        if path.stat().st_size != meta.get("size"):
            return None, f"{name} has {path.stat().st_size} bytes, {meta.get('size')} were written"
        if _sha256_file(path) != meta.get("sha256"):
            return None, f"{name} changed since it was written"
    try:
        report = json.loads((study_dir / REPORT_JSON_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, "report.json is unreadable"
    if not isinstance(report, dict) or not isinstance(report.get("summary"), dict):
        return None, "report.json has no summary"
    return report, ""


# --------------------------------------------------------------------------- the batch


def run_batch(
    inputs: Sequence[str | Path],
    output: Path,
    config: PipelineConfig,
    models: ModelSet,
    *,
    resume: bool = False,
    overwrite: bool = False,
    series_uid: str | None = None,
    all_series: bool = False,
    show_progress: bool | None = None,
    study_naming: StudyNaming = "deidentified",
    ids_file: Path | None = None,
    ids_file_in_output: bool = False,
    dicom_out: bool = False,
) -> BatchOutcome:
    """Analyse every study found under ``inputs``; write per-study outputs and summary.csv.

    Failures are isolated per study (status=failed, one-line error); a study without
    plausible lungs gets status=not-assessable and a ``reason``. ``output`` is locked for
    the whole run. A folder with earlier results needs ``resume`` (reuse every study whose
    completion record still matches; keep earlier summary rows, merged by study id) or
    ``overwrite`` (recompute; summary.csv is replaced, once this batch has finished). Without
    either, summary.csv is rewritten atomically after every study. With ``all_series`` every
    usable series of a study is its own row (study id suffixed with the short series UID).
    A failure to write (disk full, permissions) stops the batch with an :class:`OutputError`.
    ``dicom_out``: also a DICOM SEG and SR per study (:mod:`pipeline.dicom_out`; DICOM inputs only).
    """
    if study_naming not in STUDY_NAMING:
        raise ConfigError(f"--study-id {study_naming!r}: use one of {', '.join(STUDY_NAMING)}")
    if ids_file is not None:
        check_ids_file(ids_file, output, inside_output_ok=ids_file_in_output)
    with output_lock(output):
        check_output(output, resume=resume, overwrite=overwrite)
        return _run_locked(
            inputs, output, config, models, resume=resume, overwrite=overwrite, series_uid=series_uid,
            all_series=all_series, show_progress=show_progress, study_naming=study_naming, ids_file=ids_file,
            dicom_out=dicom_out,
        )  # fmt: skip


def _run_locked(
    inputs: Sequence[str | Path],
    output: Path,
    config: PipelineConfig,
    models: ModelSet,
    *,
    resume: bool,
    overwrite: bool,
    series_uid: str | None,
    all_series: bool,
    show_progress: bool | None,
    study_naming: StudyNaming,
    ids_file: Path | None,
    dicom_out: bool = False,
) -> BatchOutcome:
    summary_path = output / SUMMARY_NAME
    remove_stale_temporaries(output)  # a killed run's; we hold the lock
    earlier = read_summary(summary_path) if resume and summary_path.is_file() else {}
    outcome = BatchOutcome()
    items, discovery_failures = _discover_each(inputs, config)
    if dicom_out:  # before anything is written; highdicom (optional extra) loads only when asked for
        from corona_ct.pipeline.dicom_out import refuse_inputs_without_instances

        refuse_inputs_without_instances(items)
    identities = [input_identity(item) for item in items]
    registry = _load_registry(output)
    study_ids = assign_study_ids(items, identities, registry, study_naming)
    items = [dataclasses.replace(item, study_id=sid) for item, sid in zip(items, study_ids, strict=True)]
    with _writing(output):
        write_json(output / REGISTRY_NAME, {"studies": registry}, sort_keys=True)
        if ids_file is not None:
            write_ids_file(ids_file, [(item.study_id, item) for item in items])
    for failure in discovery_failures:
        outcome.failures.append(failure)
        outcome.rows.append(summary_row(failure.study_id, failure.source, error=failure.message))

    def save_summary(final: bool = False) -> None:
        """Rewrite summary.csv: after every study, except with overwrite (only once the batch is done)."""
        if overwrite and not final:
            return
        ours = {str(row["study_id"]): row for row in outcome.rows}
        kept = [row for sid, row in earlier.items() if sid not in ours]
        outcome.kept = kept
        with _writing(output):
            write_summary(summary_path, [*kept, *ours.values()])

    disable = not bars_wanted(show_progress)  # bars on a terminal; else one log line per study
    for number, (item, identity) in enumerate(
        tqdm(list(zip(items, identities, strict=True)), desc="studies", unit="study", disable=disable),
        start=1,
    ):
        source = _display_source(item)
        expected = expected_record(config, models, identity, series_uid, all_series)
        expected.update({"dicom_out": True} if dicom_out else {})
        if not all_series and _resumed(output / item.study_id, expected, resume, outcome):
            save_summary()
            continue
        timings: dict[str, float] = {}
        try:
            with _stage("ingest", item.study_id, timings):
                volumes = (
                    load_all_series(item, config.ingest)
                    if all_series
                    else [load_input(item, config.ingest, series_uid=series_uid)]
                )
        except CoronaCTError as error:
            _record_failure(outcome, item.study_id, source, error)
            volumes = []
        for volume in volumes:
            if all_series and _resumed(output / volume.study_id, expected, resume, outcome):
                continue
            try:
                outcome.rows.append(
                    _analyze_and_write(
                        volume,
                        source,
                        output,
                        models,
                        config,
                        expected,
                        timings,
                        disable,
                        f"{number}/{len(items)}",
                        item if dicom_out else None,
                    )
                )
            except OutputError:
                raise
            except CoronaCTError as error:
                _record_failure(outcome, volume.study_id, source, error)
        save_summary()
    if earlier:
        ours = {str(row["study_id"]) for row in outcome.rows}
        kept = [sid for sid in earlier if sid not in ours]
        if kept:
            log.warning(
                "%s: kept %d earlier row(s) of studies not among these inputs: %s",
                summary_path, len(kept), ", ".join(kept[:5]) + (", ..." if len(kept) > 5 else ""),
            )  # fmt: skip
    save_summary(final=True)
    return outcome


def _resumed(study_dir: Path, expected: Mapping[str, object], resume: bool, outcome: BatchOutcome) -> bool:
    """With resume: reuse a verified study's summary row instead of recomputing; log why when not."""
    if not resume:
        return False
    report, why = verify_complete(study_dir, expected)
    if report is None:
        if why:
            log.warning("%s: recomputing: %s", study_dir.name, why)
            outcome.recomputed[study_dir.name] = why
        return False
    summary = report["summary"]
    assert isinstance(summary, dict)
    outcome.rows.append(summary_cells(summary))
    outcome.skipped.append(study_dir.name)
    return True


def _analyze_and_write(
    volume: Volume,
    source: str,
    output: Path,
    models: ModelSet,
    config: PipelineConfig,
    expected: Mapping[str, object],
    ingest_timings: dict[str, float],
    disable_progress: bool,
    position: str = "",
    dicom_source: StudyInput | None = None,
) -> dict[str, object]:
    """Analyse one loaded series, write its outputs and then its completion record; returns its summary row.

    Without progress bars it logs one line: ``study 3/12 P002: ok, p=0.91, score 34.2 cm3, 61.3 s``.
    """
    study_id = volume.study_id
    study_dir = output / study_id
    with tqdm(
        total=volume.n_slices, desc=study_id, unit="slice", leave=False, disable=disable_progress
    ) as bar:
        result = analyze_study(volume, models, config, progress=bar.update)
    result.timings_s.update(ingest_timings)
    values = summary_values(study_id, source, result, threshold=config.classify.positive_threshold)
    with _writing(output):
        (study_dir / COMPLETE_NAME).unlink(missing_ok=True)  # not complete until the new record is written
        try:
            report = write_study_outputs(study_dir, result, models, config, values)
        except (OSError, CoronaCTError):
            raise
        except Exception as error:
            raise StageError("report", study_id, f"{type(error).__name__}: {error}") from error
        files = [*report["files"], REPORT_JSON_NAME]
        if dicom_source is not None:  # --dicom-out
            from corona_ct.pipeline.dicom_out import write_dicom_outputs  # optional dependency: highdicom

            files += write_dicom_outputs(study_dir, result, config, dicom_source)
        for stale in set(STUDY_FILES) - set(files):
            (study_dir / stale).unlink(missing_ok=True)
        write_completion_record(study_dir, expected, files)
    if disable_progress:
        score = result.severity.corona_score_cm3 if result.severity is not None else None
        seconds = sum(result.timings_s.values())
        progress_log.info(
            study_line(position, study_id, result.status, result.case_probability, score, seconds)
        )
    return summary_cells(values)


def _record_failure(outcome: BatchOutcome, study_id: str, source: str, error: CoronaCTError) -> None:
    stage = getattr(error, "stage", "run")
    message = one_line(str(error))
    outcome.failures.append(StudyFailure(study_id, source, stage, type(error).__name__, message))
    outcome.rows.append(summary_row(study_id, source, error=message))
    log.warning("%s: failed: %s", study_id, message)


def _discover_each(
    inputs: Sequence[str | Path], config: PipelineConfig
) -> tuple[list[StudyInput], list[StudyFailure]]:
    """Discover studies input by input, so that one unreadable input does not stop the others.

    Study ids are made unique later, by :func:`assign_study_ids`.
    """
    items: list[StudyInput] = []
    failures: list[StudyFailure] = []
    for path in inputs:
        try:
            items.extend(discover([path], config.ingest))
        except CoronaCTError as error:
            study_id = hashed_id(str(Path(path).resolve()), prefix="input")
            failures.append(
                StudyFailure(
                    study_id,
                    clean_text(Path(path).name),
                    "discover",
                    type(error).__name__,
                    one_line(str(error)),
                )
            )
    return items, failures


def _display_source(item: StudyInput) -> str:
    """The input's kind and file or folder name, cleaned; never a header string.

    A DICOM folder's name is shown only when the study id was derived from it, i.e.
    when it was judged free of patient identifiers; otherwise it is withheld.
    """
    kind, name, study_id = item.kind, Path(item.source).name, item.study_id
    if kind == "dicom" and study_id != name and not re.fullmatch(re.escape(name) + r"-\d+", study_id):
        return "dicom:(folder name withheld)"
    return f"{kind}:{clean_text(name, 80)}"


# --------------------------------------------------------------------------- demo


def _num(value: object, digits: int) -> str:
    """A summary cell as a fixed-precision number ("—" when empty)."""
    try:
        return f"{float(str(value)):.{digits}f}"
    except ValueError:
        return "—"


def run_demo(output: Path, config: PipelineConfig, *, cls_weights: Path | None = None) -> int:
    """Write two phantom studies (with and without lesions) as DICOM and run the pipeline on them."""
    inputs = output / "inputs"
    phantoms = {
        "phantom-lesions": make_phantom(seed=1, lesions="mixed"),
        "phantom-normal": make_phantom(seed=2, lesions="none"),
    }
    for number, (name, phantom) in enumerate(phantoms.items(), start=1):
        # patient strings that the folder names do not contain, so the ids stay readable
        write_dicom_series(
            phantom, inputs / name, patient_name=f"Anonymous^{number}", patient_id=f"DEMO-{number}"
        )
    print(f"wrote {len(phantoms)} phantom DICOM studies under {inputs}")
    models = load_models(config, cls_weights, allow_untrained=True)
    if models.untrained:
        print(
            "NOTE: no trained classifier weights are installed (models/weights/ is empty), so the demo runs with "
            "UNTRAINED random weights: probabilities and Corona scores below are meaningless; lung volumes and "
            "HU measures are real.",
            file=sys.stderr,
        )
    # the demo's own folder: a rerun replaces its results
    outcome = run_batch(
        [inputs / name for name in phantoms], output / "results", config, models, overwrite=True
    )
    print(
        f"{'study':<16} {'status':<14} {'p(case)':>8} {'score cm3':>10} {'lesions cm3 (true)':>18} "
        f"{'lung cm3':>9} {'lung cm3 (true)':>15} {'GGO %':>6} {'consol. %':>9}"
    )
    for row in outcome.rows:
        truth = phantoms.get(str(row["study_id"]))
        true_lesion = truth.lesion_volume_ml if truth is not None else math.nan
        true_lung = truth.lung_volume_ml if truth is not None else math.nan
        print(
            f"{row['study_id']!s:<16} {row['status']!s:<14} {_num(row['case_probability'], 3):>8} "
            f"{_num(row['corona_score_cm3'], 1):>10} {true_lesion:>18.1f} {_num(row['lung_volume_cm3'], 1):>9} "
            f"{true_lung:>15.1f} {_num(row['ggo_percent'], 2):>6} {_num(row['consolidation_percent'], 2):>9} "
            f"{row['error'] or row['reason']}"
        )
    print(f"reports: {output / 'results'}/<study>/report.html; summary: {output / 'results' / SUMMARY_NAME}")
    return outcome.exit_code
