"""One study's summary: report.json's ``summary`` (numbers as numbers) and its summary.csv row (text).

``summary_values`` reads a :class:`~pipeline.datamodel.StudyResult` (or a failure) into
``SUMMARY_COLUMNS``; ``summary_cells`` writes those values as summary.csv text. The batch
(:mod:`pipeline.batch`) writes the rows with :func:`write_summary` and, on ``--resume``, reads the
earlier ones back with :func:`read_summary`; ``corona-ct analyze`` reads them too.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from corona_ct.pipeline.atomic import write_text
from corona_ct.pipeline.config import ClassifyConfig
from corona_ct.pipeline.datamodel import STATUS_FAILED, StudyResult, empty_map_positive_slices
from corona_ct.pipeline.errors import ConfigError
from corona_ct.pipeline.layout import SUMMARY_COLUMNS


def summary_values(
    study_id: str,
    source: str,
    result: StudyResult | None = None,
    error: str = "",
    *,
    threshold: float | None = None,
) -> dict[str, object]:
    """One study's summary with numbers as numbers: None where summary.csv has an empty cell.

    This is report.json's ``summary``; :func:`summary_cells` formats it for summary.csv.
    Numeric fields are None for failed studies. A not-assessable study gets its ``reason``
    and only the numbers that are not a call: slice counts and the volume of the lung mask
    that failed the gate. ``threshold`` (default ``classify.positive_threshold``'s default)
    decides which slices count as positive for ``empty_cam_positive_slices``.
    """
    row: dict[str, object] = dict.fromkeys(SUMMARY_COLUMNS)
    row.update(study_id=study_id, source=source, status=STATUS_FAILED, reason="", error=error)
    if result is None:
        return row
    row["status"] = result.status
    sev = result.severity
    if sev is None or result.case_probability is None:
        row.update(
            reason=result.not_assessable_reason or "",
            n_slices=result.volume.n_slices,
            slices_evaluated=int(result.scores.evaluated.sum()),
            lung_volume_cm3=_finite_or_none(result.lung_check.lung_volume_cm3),
        )
    else:
        limit = ClassifyConfig().positive_threshold if threshold is None else threshold
        row.update(
            n_slices=result.volume.n_slices,
            slices_evaluated=int(result.scores.evaluated.sum()),
            positive_slices=sev.positive_slices,
            empty_cam_positive_slices=int(empty_map_positive_slices(result, limit).sum()),
            case_probability=_finite_or_none(result.case_probability),
            corona_score_cm3=_finite_or_none(sev.corona_score_cm3),
            corona_score_in_lung_cm3=_finite_or_none(sev.corona_score_in_lung_cm3),
            lung_volume_cm3=_finite_or_none(sev.lung_volume_cm3),
            affected_percent=_finite_or_none(sev.affected_percent),
            ggo_percent=_finite_or_none(sev.ggo_percent),
            consolidation_percent=_finite_or_none(sev.consolidation_percent),
        )
    return row


def summary_cells(values: Mapping[str, object]) -> dict[str, object]:
    """A summary as summary.csv writes it: numbers as text (6 significant digits), None as empty.

    Text passes through, so a row read back from an older report (all text) is unchanged.
    """
    return {column: _cell_text(values.get(column)) for column in SUMMARY_COLUMNS}


def summary_row(
    study_id: str,
    source: str,
    result: StudyResult | None = None,
    error: str = "",
    *,
    threshold: float | None = None,
) -> dict[str, object]:
    """One summary.csv row (text cells); numeric fields empty for failed studies (see :func:`summary_values`)."""
    return summary_cells(summary_values(study_id, source, result, error, threshold=threshold))


def _finite_or_none(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _cell_text(value: object) -> str:
    """summary.csv text of one value: empty for None and NaN, ``true``/``false``, 6 significant digits."""
    if value is None or isinstance(value, bool):
        return "" if value is None else str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


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
