"""Series selection: which series of a DICOM study is analysed, and which study holds a given series.

``choose_series`` applies the documented rule (``SELECTION_RULE``: axial first,
then ORIGINAL/PRIMARY, then most slices, then thinnest slices) or the user's
``--series``; ``find_series`` resolves a full UID, its short form or a unique
prefix/suffix; ``find_studies_holding`` finds the studies that hold such a series.
"""

from __future__ import annotations

from collections.abc import Sequence

from corona_ct.pipeline.errors import ConfigError, InputError, UnsupportedInputError
from corona_ct.pipeline.ingest.deid import clean_text
from corona_ct.pipeline.ingest.dicom.describe import SeriesInfo, series_summary
from corona_ct.pipeline.ingest.dicom.header import series_label
from corona_ct.pipeline.ingest.discovery import StudyInput

#: Series selection rule, in order of precedence (see docs/ingest.md).
SELECTION_RULE = ("axial", "ORIGINAL/PRIMARY", "most slices", "thinnest slices")


def _series_key(info: SeriesInfo) -> tuple[bool, bool, int, float]:
    """Sort key of ``SELECTION_RULE``, one element per criterion (larger is better)."""
    thickness = info.slice_thickness_mm or info.slice_spacing_mm or float("inf")
    return (
        info.orientation == "axial",
        "ORIGINAL" in info.image_type and "PRIMARY" in info.image_type,
        info.n_slices,
        -thickness,
    )


def find_series(item: StudyInput, query: str) -> SeriesInfo:
    """The series of ``item`` that ``query`` names: its full or short UID, else a unique prefix or suffix.

    Raises ``ConfigError`` listing the study's series when none or several match.
    """
    wanted = query.strip().lstrip("…").lstrip(".")
    series = item.series
    for test in (
        lambda s: wanted in (s.uid, s.short_uid),
        lambda s: s.uid.startswith(wanted),
        lambda s: s.uid.endswith(wanted),
    ):
        matches = [s for s in series if wanted and test(s)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            break
    options = "; ".join(series_summary(s) for s in series) or "none"
    raise ConfigError(
        f"study {item.study_id}: series {clean_text(query)!r} not found or not unique; "
        f"series there: {options}; pass a full UID or a unique part of one"
    )


def choose_series(item: StudyInput, series_uid: str | None = None) -> tuple[SeriesInfo, str]:
    """The series to analyse and why.

    With ``series_uid`` (full UID, its short form, or a unique prefix/suffix) that
    series; otherwise the best usable CT series by the rule: axial first, then
    ORIGINAL/PRIMARY, then most slices, then thinnest slices.
    """
    if item.kind != "dicom":
        raise ConfigError(f"study {item.study_id} is {item.kind} input, which has no DICOM series to choose")
    if series_uid:
        chosen = find_series(item, series_uid)
        return chosen, f"chosen with --series {series_label(chosen.uid)}"
    usable = sorted((s for s in item.series if s.usable), key=_series_key, reverse=True)
    if not item.series:
        raise UnsupportedInputError(
            f"study {item.study_id} holds no image series ({'; '.join(item.notes) or 'no images'}); "
            "pass the folder with the axial CT series"
        )
    if not usable:
        ct = [s for s in item.series if s.modality == "CT" and s.problem]
        if ct:
            best = max(ct, key=lambda s: s.n_slices)
            raise (best.problem_type or InputError)(best.problem)
        found = ", ".join(sorted({s.modality for s in item.series})) or "no images"
        problems = [s.problem for s in item.series if s.problem]
        raise UnsupportedInputError(
            problems[0]
            if len(item.series) == 1 and problems
            else f"study {item.study_id} holds no CT series (found {found}); corona-ct analyses chest CT only"
        )
    chosen = usable[0]
    if len(usable) == 1:
        others = len(item.series) - 1
        suffix = f"; {others} other series not usable" if others else ""
        return chosen, f"the only usable CT series{suffix}"
    runner_up = usable[1]
    best_key, next_key = _series_key(chosen), _series_key(runner_up)
    deciding = next((i for i in range(4) if best_key[i] != next_key[i]), 3)
    return chosen, (
        f"best of {len(usable)} CT series by the rule {' > '.join(SELECTION_RULE)} "
        f"(decided by: {SELECTION_RULE[deciding]}); others: {', '.join(series_summary(s) for s in usable[1:])}; "
        "use --series UID to pick another or --all-series for all"
    )


def find_studies_holding(studies: Sequence[StudyInput], query: str) -> list[StudyInput]:
    """The DICOM studies among ``studies`` in which ``query`` names exactly one series (``find_series``)."""
    holders = []
    for study in studies:
        if study.kind != "dicom":
            continue
        try:
            find_series(study, query)
        except ConfigError:
            continue
        holders.append(study)
    return holders


def series_listing(studies: Sequence[StudyInput]) -> str:
    """Every study with its series labels, for messages: ``study-a: …uid1, …uid2; study-b: …``."""
    return "; ".join(f"{s.study_id}: {', '.join(series_label(i.uid) for i in s.series)}" for s in studies)
