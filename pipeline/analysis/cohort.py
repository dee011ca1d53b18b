"""The studies of one or more ``corona-ct run`` outputs, and their match with a labels/groups table.

A cohort merges the ``summary.csv`` of each output folder. Studies that ``run`` found
not assessable (no plausible lungs, no call made) are left out and listed, unless kept
with ``include_not_assessable``; failed studies are listed with their error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from corona_ct.pipeline.analysis import DEFAULT_SCORE
from corona_ct.pipeline.analysis.tables import read_csv
from corona_ct.pipeline.datamodel import STATUS_NOT_ASSESSABLE, STATUS_OK
from corona_ct.pipeline.errors import ConfigError, InputError
from corona_ct.pipeline.layout import SUMMARY_COLUMNS, SUMMARY_NAME

#: summary.csv's numeric columns (read as float, NaN where empty).
NUMERIC_COLUMNS = tuple(
    c for c in SUMMARY_COLUMNS if c not in {"study_id", "status", "source", "reason", "error"}
)
#: Why not-assessable studies are left out, and how to keep them.
NOT_ASSESSABLE_NOTE = (
    "not assessable in `corona-ct run`: no plausible lungs, no call made; --include-not-assessable keeps them"
)


@dataclass
class Cohort:
    """Studies merged from the summary.csv of several run outputs."""

    studies: dict[str, dict[str, Any]]  # study_id -> row with numeric columns as float (NaN if empty)
    failed: dict[str, str]  # study_id -> error text of the run
    folder_of: dict[str, Path]  # study_id -> run output folder
    raw_id: dict[str, str]  # study_id -> id as written by run (differs with prefix_ids)
    columns: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    not_assessable: dict[str, str] = field(default_factory=dict)  # study_id -> reason; left out
    included_not_assessable: list[str] = field(default_factory=list)  # kept by include_not_assessable
    include_not_assessable: bool = False  # whether not-assessable studies were kept

    def numeric_columns(self) -> list[str]:
        """The numeric summary.csv columns these summaries have."""
        return [c for c in self.columns if c in NUMERIC_COLUMNS]


def _to_float(text: str | None) -> float:
    if text is None or text.strip() == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        return math.nan


def load_cohort(
    results: Sequence[Path], *, prefix_ids: bool = False, include_not_assessable: bool = False
) -> Cohort:
    """Merge the summaries of several run outputs; duplicate study_ids are an error unless prefixed.

    ``results`` are run output folders (or their summary.csv). With ``prefix_ids`` every study
    is renamed '<folder name>/<study_id>'. Not-assessable studies go to
    ``Cohort.not_assessable`` (left out), or with ``include_not_assessable`` among the studies
    like successful ones.
    """
    cohort = Cohort(
        studies={}, failed={}, folder_of={}, raw_id={}, include_not_assessable=include_not_assessable
    )
    folder_names: dict[str, Path] = {}
    for given in results:
        folder = given.parent if given.name == SUMMARY_NAME else given
        summary = folder / SUMMARY_NAME
        if not summary.is_file():
            hint = "" if folder.is_dir() else " (the folder does not exist)"
            if (folder / "results" / SUMMARY_NAME).is_file():  # `corona-ct demo` nests its run output
                hint = f" (did you mean {folder / 'results'}?)"
            raise InputError(
                f"{summary}: not found{hint}; --results expects output folders of `corona-ct run`"
            )
        rows = read_csv(summary, ("study_id", "status"), "run summary")
        if prefix_ids:
            if folder.name in folder_names and folder_names[folder.name] != folder:
                raise InputError(
                    f"--prefix-ids: two result folders are both named {folder.name!r} "
                    f"({folder_names[folder.name]} and {folder}); rename one"
                )
            folder_names[folder.name] = folder
        for header in rows[:1]:
            cohort.columns.extend(c for c in header if c not in cohort.columns)
        cohort.sources.append(str(folder))
        for row in rows:
            raw = row["study_id"]
            study_id = f"{folder.name}/{raw}" if prefix_ids else raw
            if study_id in cohort.folder_of:
                raise InputError(
                    f"study_id {study_id!r} appears in both {cohort.folder_of[study_id]} and {folder}; "
                    "remove one, or pass --prefix-ids to keep both as '<folder>/<study_id>'"
                )
            cohort.folder_of[study_id] = folder
            cohort.raw_id[study_id] = raw
            status = row["status"].lower()
            if status == STATUS_NOT_ASSESSABLE and not include_not_assessable:
                cohort.not_assessable[study_id] = row.get("reason", "") or status
            elif status in (STATUS_OK, STATUS_NOT_ASSESSABLE):
                cohort.studies[study_id] = {c: _to_float(row.get(c)) for c in NUMERIC_COLUMNS} | {
                    "study_id": study_id
                }
                if status == STATUS_NOT_ASSESSABLE:
                    cohort.included_not_assessable.append(study_id)
            else:
                cohort.failed[study_id] = row.get("error", "") or row["status"]
    if not cohort.folder_of:
        raise InputError(
            f"empty cohort: the summaries in {', '.join(map(str, results))} list no studies; "
            "run `corona-ct run` on some studies first"
        )
    if not cohort.studies:
        raise InputError(
            f"empty cohort: of the {len(cohort.folder_of)} studies in the results {len(cohort.failed)} failed "
            f"in `corona-ct run` (see the error column of summary.csv) and {len(cohort.not_assessable)} were "
            "not assessable (no plausible lungs; see the reason column, or pass --include-not-assessable)"
        )
    return cohort


def select_scores(cohort: Cohort, scores: Sequence[str] | None) -> list[str]:
    """The score columns to analyse (default ``DEFAULT_SCORE``), once each; ``ConfigError`` for unknown ones."""
    chosen = list(dict.fromkeys(scores or [DEFAULT_SCORE]))
    available = cohort.numeric_columns()
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise ConfigError(
            f"unknown --score column {', '.join(unknown)}; the summaries have: {', '.join(available)}"
        )
    return chosen


@dataclass
class Matched:
    """Studies usable for an analysis and those left out, with the reason."""

    study_ids: list[str]
    values: dict[str, npt.NDArray[np.float64]]  # score -> values in study_ids order
    missing_from_results: list[str]
    failed_in_run: dict[str, str]
    not_in_table: list[str]
    missing_score: dict[str, list[str]]  # study_id -> scores without a value
    not_assessable: dict[str, str] = field(default_factory=dict)  # study_id -> reason, left out

    def excluded_json(self, table_name: str) -> dict[str, Any]:
        """The studies left out, by reason, as written to the JSON output."""
        return {
            f"in_{table_name}_not_in_results": self.missing_from_results,
            "failed_in_run": [{"study_id": s, "error": e} for s, e in self.failed_in_run.items()],
            "not_assessable": [{"study_id": s, "reason": r} for s, r in self.not_assessable.items()],
            f"in_results_not_in_{table_name}": self.not_in_table,
            "missing_score": [{"study_id": s, "scores": v} for s, v in self.missing_score.items()],
        }

    def excluded_markdown(self, table_file: str) -> list[str]:
        """The studies left out, one Markdown bullet per reason (``- none`` when none was)."""
        lines = []
        if self.missing_from_results:
            lines.append(f"- in {table_file} but not in the results: {_id_list(self.missing_from_results)}")
        if self.failed_in_run:
            lines.append(f"- failed in `corona-ct run`: {_id_list(list(self.failed_in_run))}")
        if self.not_assessable:
            lines.append(f"- {NOT_ASSESSABLE_NOTE}: {_id_list(list(self.not_assessable))}")
            lines += [f"  - `{s}`: {r}" for s, r in list(self.not_assessable.items())[:30]]
        if self.not_in_table:
            lines.append(f"- in the results but not in {table_file}: {_id_list(self.not_in_table)}")
        if self.missing_score:
            lines.append(f"- no value for the score: {_id_list(list(self.missing_score))}")
        return lines or ["- none"]


def _id_list(ids: Sequence[str], limit: int = 30) -> str:
    shown = ", ".join(f"`{i}`" for i in ids[:limit])
    return f"{len(ids)} ({shown}{', …' if len(ids) > limit else ''})"


def match_studies(cohort: Cohort, table: Mapping[str, Any], scores: Sequence[str]) -> Matched:
    """Studies in both the table and the successful results with every score present."""
    usable, missing_score = [], {}
    for study_id in table:
        row = cohort.studies.get(study_id)
        if row is None:
            continue
        absent = [s for s in scores if not math.isfinite(row[s])]
        if absent:
            missing_score[study_id] = absent
        else:
            usable.append(study_id)
    return Matched(
        study_ids=usable,
        values={s: np.array([cohort.studies[i][s] for i in usable], dtype=np.float64) for s in scores},
        missing_from_results=[s for s in table if s not in cohort.folder_of],
        failed_in_run=dict(cohort.failed),  # every failed study, labelled or not
        not_in_table=[s for s in cohort.studies if s not in table],
        missing_score=missing_score,
        not_assessable=dict(cohort.not_assessable),  # every one left out, labelled or not
    )


def require_matches(matched: Matched, table: Path, n_listed: int, what: str, cohort: Cohort) -> None:
    """``InputError`` when no study of the table (``n_listed`` of ``what``) matched a usable result."""
    if not matched.study_ids:
        raise InputError(
            f"empty cohort: no study is both in {table} ({n_listed} {what}) and among the "
            f"{len(cohort.studies)} successful studies of the results with a value for "
            f"{', '.join(matched.values)}; check that the study_id values match"
        )
