"""The batch runner: many studies into one output folder, never losing or hiding a result.

``run_batch`` discovers the studies under the inputs, gives each a study id, analyses it
(:func:`pipeline.run.analyze_study`), writes its outputs and keeps ``OUT/summary.csv``.
What it guarantees:

- **One writer per output folder.** ``OUT/.corona-ct.lock`` is held with ``flock`` for the
  whole batch (:func:`pipeline.output_folder.output_lock`); a second run on the same folder
  stops with the holder's pid.
- **Earlier results are never dropped silently.** A run into a folder that holds results
  of an earlier run needs ``resume`` (keep them: rows are merged by study id) or
  ``overwrite`` (summary.csv lists this run's studies only); see
  :func:`pipeline.output_folder.check_output`.
- **Study ids follow what the input is** (:mod:`pipeline.study_ids`): an input gets back its
  own id on a later run, and two different inputs with one folder name get distinct ids.
- **Resume trusts only what it can check** (:mod:`pipeline.completion`): a study is reused
  only when its completion record, written last, still matches every output file, the
  config, the models and the input; else it is recomputed and the log says why.
- **summary.csv is complete or the previous one.** It is written atomically; with
  ``overwrite`` the previous one stays until the new batch has finished.

One study's outputs and its completion record are written by :func:`pipeline.study_job.run_study_job`,
in this process or, with ``ray``, on the workers of a Ray cluster (:mod:`pipeline.ray_batch`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from corona_ct.pipeline.atomic import remove_stale_temporaries
from corona_ct.pipeline.completion import expected_record
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.datamodel import STATUS_NOT_ASSESSABLE, StudyFailure
from corona_ct.pipeline.errors import ConfigError, CoronaCTError, one_line
from corona_ct.pipeline.ingest import StudyInput, discover
from corona_ct.pipeline.ingest.deid import clean_text, hashed_id
from corona_ct.pipeline.layout import SUMMARY_NAME
from corona_ct.pipeline.modelset import ModelSet
from corona_ct.pipeline.output_folder import check_ids_file, check_output, output_lock, writing
from corona_ct.pipeline.progress import bars_wanted, progress_log
from corona_ct.pipeline.ray_batch import RayOptions, run_on_ray
from corona_ct.pipeline.study_ids import (
    STUDY_NAMING,
    StudyNaming,
    assign_study_ids,
    display_source,
    input_identity,
    load_registry,
    write_ids_file,
    write_registry,
)
from corona_ct.pipeline.study_job import JobOptions, JobOutcome, StudyJob, reuse_finished, run_study_job
from corona_ct.pipeline.summary import read_summary, summary_row, write_summary

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- outcome


@dataclass
class BatchOutcome(JobOutcome):
    """What a batch run did; ``rows`` are this run's summary.csv rows, ``kept`` the earlier ones it kept."""

    kept: list[dict[str, object]] = field(default_factory=list)

    @property
    def not_assessable(self) -> list[dict[str, object]]:
        """Rows of the studies without plausible lungs (resumed ones included)."""
        return [row for row in self.rows if row.get("status") == STATUS_NOT_ASSESSABLE]

    @property
    def exit_code(self) -> int:
        """1 when a study failed; a not-assessable study is an answer, not a failure."""
        return 1 if self.failures else 0


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
    ray: RayOptions | None = None,
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
    ``ray``: spread the studies over a Ray cluster (:mod:`pipeline.ray_batch`), same guarantees.
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
            dicom_out=dicom_out, ray=ray,
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
    ray: RayOptions | None = None,
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
    registry = load_registry(output)
    study_ids = assign_study_ids(items, identities, registry, study_naming)
    items = [dataclasses.replace(item, study_id=sid) for item, sid in zip(items, study_ids, strict=True)]
    with writing(output):
        write_registry(output, registry)
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
        with writing(output):
            write_summary(summary_path, [*kept, *ours.values()])

    bars = bars_wanted(show_progress)  # bars on a terminal; else one log line per study
    jobs: list[StudyJob] = []
    for number, (item, identity) in enumerate(zip(items, identities, strict=True), start=1):
        expected = expected_record(config, models, identity, series_uid, all_series)
        expected.update({"dicom_out": True} if dicom_out else {})
        if not all_series and reuse_finished(output / item.study_id, expected, resume, outcome):
            continue
        jobs.append(StudyJob(item, display_source(item), expected, f"{number}/{len(items)}"))
    if outcome.rows:
        save_summary()
    options = JobOptions(
        output=output,
        series_uid=series_uid,
        all_series=all_series,
        resume=resume,
        dicom_out=dicom_out,
        slice_bars=bars and ray is None,  # Ray workers have no terminal
    )
    finished = (
        run_on_ray(jobs, models, config, options, ray, allow_untrained=models.untrained)
        if ray is not None
        else (run_study_job(job, models, config, options) for job in jobs)
    )
    for job_outcome in tqdm(finished, total=len(jobs), desc="studies", unit="study", disable=not bars):
        outcome.merge(job_outcome)
        for line in job_outcome.lines if not bars else ():
            progress_log.info(line)
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
