"""One study of a batch, start to finish: read it, analyse it, write its outputs, then its completion record.

:func:`run_study_job` is the unit of work of both batch runners: the local loop of
:mod:`pipeline.batch` calls it in-process, a Ray worker (:mod:`pipeline.ray_batch`) calls it on
its node. It never raises for a study that cannot be analysed (that becomes a failed row); it
raises :class:`OutputError` only when the output folder cannot be written, which stops a batch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from corona_ct.pipeline.completion import verify_complete, write_completion_record
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.datamodel import StudyFailure, Volume
from corona_ct.pipeline.errors import CoronaCTError, OutputError, StageError, one_line
from corona_ct.pipeline.ingest import StudyInput, load_all_series, load_input
from corona_ct.pipeline.layout import COMPLETE_NAME, REPORT_JSON_NAME, STUDY_FILES
from corona_ct.pipeline.modelset import ModelSet
from corona_ct.pipeline.output_folder import writing
from corona_ct.pipeline.progress import study_line
from corona_ct.pipeline.report import write_study_outputs
from corona_ct.pipeline.run import _stage, analyze_study
from corona_ct.pipeline.summary import summary_cells, summary_row, summary_values

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyJob:
    """One input study of a batch, with what its completion record must hold."""

    item: StudyInput  # its study id already assigned
    source: str  # how summary.csv names the input (no identifiers)
    expected: Mapping[str, object]  # completion-record fields (config hash, models, input identity)
    position: str = ""  # "3/12", for the log line


@dataclass(frozen=True)
class JobOptions:
    """The batch-wide settings a study job needs (the same for every study of a batch)."""

    output: Path
    series_uid: str | None = None
    all_series: bool = False
    resume: bool = False
    dicom_out: bool = False
    slice_bars: bool = False  # a per-slice progress bar (only on a terminal, local runs)


@dataclass
class JobOutcome:
    """What one or more study jobs did: summary rows, failures, reused and recomputed studies."""

    rows: list[dict[str, object]] = field(default_factory=list)
    failures: list[StudyFailure] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # study ids reused from an earlier run
    recomputed: dict[str, str] = field(default_factory=dict)  # study id → why it was not reused
    lines: list[str] = field(default_factory=list)  # one ``study 3/12 P002: ok, …`` line per analysed study

    def merge(self, other: JobOutcome) -> None:
        """Add another job's outcome to this one."""
        self.rows.extend(other.rows)
        self.failures.extend(other.failures)
        self.skipped.extend(other.skipped)
        self.recomputed.update(other.recomputed)
        self.lines.extend(other.lines)


def run_study_job(job: StudyJob, models: ModelSet, config: PipelineConfig, options: JobOptions) -> JobOutcome:
    """Read, analyse and write one study (every usable series of it with ``all_series``).

    A study that cannot be read or analysed becomes a failed row with a one-line reason;
    an :class:`OutputError` (the output folder cannot be written) propagates.
    """
    outcome = JobOutcome()
    item = job.item
    timings: dict[str, float] = {}
    try:
        with _stage("ingest", item.study_id, timings):
            volumes = (
                load_all_series(item, config.ingest)
                if options.all_series
                else [load_input(item, config.ingest, series_uid=options.series_uid)]
            )
    except CoronaCTError as error:
        record_failure(outcome, item.study_id, job.source, error)
        return outcome
    for volume in volumes:
        if options.all_series and reuse_finished(
            options.output / volume.study_id, job.expected, options.resume, outcome
        ):
            continue
        try:
            row, line = _analyze_and_write(volume, job, models, config, options, timings)
        except OutputError:
            raise
        except CoronaCTError as error:
            record_failure(outcome, volume.study_id, job.source, error)
            continue
        outcome.rows.append(row)
        outcome.lines.append(line)
    return outcome


def reuse_finished(
    study_dir: Path, expected: Mapping[str, object], resume: bool, outcome: JobOutcome
) -> bool:
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


def record_failure(outcome: JobOutcome, study_id: str, source: str, error: CoronaCTError) -> None:
    """A failed row with the error's one-line message (and its stage in ``failures``)."""
    stage = getattr(error, "stage", "run")
    message = one_line(str(error))
    outcome.failures.append(StudyFailure(study_id, source, stage, type(error).__name__, message))
    outcome.rows.append(summary_row(study_id, source, error=message))
    log.warning("%s: failed: %s", study_id, message)


def _analyze_and_write(
    volume: Volume,
    job: StudyJob,
    models: ModelSet,
    config: PipelineConfig,
    options: JobOptions,
    ingest_timings: dict[str, float],
) -> tuple[dict[str, object], str]:
    """Analyse one loaded series, write its outputs and then its completion record.

    Returns its summary row and its log line (``study 3/12 P002: ok, p=0.91, score 34.2 cm3, 61.3 s``).
    """
    study_id = volume.study_id
    study_dir = options.output / study_id
    with tqdm(
        total=volume.n_slices, desc=study_id, unit="slice", leave=False, disable=not options.slice_bars
    ) as bar:
        result = analyze_study(volume, models, config, progress=bar.update)
    result.timings_s.update(ingest_timings)
    values = summary_values(study_id, job.source, result, threshold=config.classify.positive_threshold)
    with writing(options.output):
        (study_dir / COMPLETE_NAME).unlink(missing_ok=True)  # not complete until the new record is written
        try:
            report = write_study_outputs(study_dir, result, models, config, values)
        except (OSError, CoronaCTError):
            raise
        except Exception as error:
            raise StageError("report", study_id, f"{type(error).__name__}: {error}") from error
        files = [*report["files"], REPORT_JSON_NAME]
        if options.dicom_out:
            from corona_ct.pipeline.dicom_out import write_dicom_outputs  # optional dependency: highdicom

            files += write_dicom_outputs(study_dir, result, config, job.item)
        for stale in set(STUDY_FILES) - set(files):
            (study_dir / stale).unlink(missing_ok=True)
        write_completion_record(study_dir, job.expected, files)
    score = result.severity.corona_score_cm3 if result.severity is not None else None
    seconds = sum(result.timings_s.values())
    line = study_line(job.position, study_id, result.status, result.case_probability, score, seconds)
    return summary_cells(values), line
