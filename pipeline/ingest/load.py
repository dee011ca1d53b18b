"""Loading discovered studies as ``Volume``s: one study, its chosen series, or every usable series.

``load_input`` reads one ``StudyInput`` (DICOM: the series ``choose_series`` picks),
``load_all_series`` every usable CT series of a DICOM study, and ``load_study(path)``
discovers, chooses and reads in one call.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from corona_ct.pipeline.config import IngestConfig
from corona_ct.pipeline.datamodel import Volume
from corona_ct.pipeline.errors import AmbiguousInputError, ConfigError, InputError, UnsupportedInputError
from corona_ct.pipeline.ingest.deid import clean_text
from corona_ct.pipeline.ingest.dicom.describe import SeriesInfo
from corona_ct.pipeline.ingest.dicom.header import series_label
from corona_ct.pipeline.ingest.dicom.read import read_series
from corona_ct.pipeline.ingest.discovery import StudyInput, discover
from corona_ct.pipeline.ingest.select import choose_series, find_studies_holding, series_listing
from corona_ct.pipeline.ingest.slices import read_image_folder, read_tiff_folder

log = logging.getLogger(__name__)


def _load_series(
    item: StudyInput, info: SeriesInfo, config: IngestConfig, study_id: str, extra: Sequence[str]
) -> Volume:
    root = item.source if item.source.is_dir() else item.source.parent
    return read_series(info, config, study_id, str(item.source), root, extra_warnings=extra)


def load_input(item: StudyInput, config: IngestConfig | None = None, series_uid: str | None = None) -> Volume:
    """Read one discovered study as a ``Volume`` (DICOM: the chosen series)."""
    config = config or IngestConfig()
    if item.problem:
        raise UnsupportedInputError(item.problem)
    if item.kind == "nifti":
        # nibabel loads only when a NIfTI is read, so importing ``ingest`` (preflight, inspect) stays quick.
        from corona_ct.pipeline.ingest.nifti import read_nifti

        return read_nifti(item.source, config, item.study_id)
    if item.kind == "tiff":
        return read_tiff_folder(item.source, config, item.study_id)
    if item.kind == "images":
        return read_image_folder(item.source, config, item.study_id)
    chosen, reason = choose_series(item, series_uid)
    extra = []
    if sum(s.usable for s in item.series) > 1 and not series_uid:
        extra.append(f"study has several CT series; analysed {series_label(chosen.uid)}: {reason}")
    return _load_series(item, chosen, config, item.study_id, extra)


def load_all_series(item: StudyInput, config: IngestConfig | None = None) -> list[Volume]:
    """Every usable CT series of a DICOM study (study ids suffixed with the short series UID).

    Non-DICOM inputs give their one volume. Raises the first series' error when none loads.
    """
    config = config or IngestConfig()
    if item.kind != "dicom":
        return [load_input(item, config)]
    usable = [s for s in item.series if s.usable]
    if not usable:
        choose_series(item)  # raises the reason nothing is usable
    volumes: list[Volume] = []
    failures: list[InputError] = []
    for info in usable:
        try:
            volumes.append(_load_series(item, info, config, f"{item.study_id}-{info.short_uid}", ()))
        except InputError as error:
            failures.append(error)
            log.warning("study %s: %s", item.study_id, error)
    if not volumes:
        raise failures[0]
    return volumes


def load_study(path: str | Path, config: IngestConfig | None = None, series_uid: str | None = None) -> Volume:
    """Load the one study under ``path`` (with ``series_uid``: the study holding that series).

    Raises ``AmbiguousInputError`` listing the study ids when ``path`` holds several.
    """
    config = config or IngestConfig()
    studies = discover([path], config)
    if series_uid:
        holders = find_studies_holding(studies, series_uid)
        if len(holders) == 1:
            return load_input(holders[0], config, series_uid)
        if not holders:
            raise ConfigError(
                f"{path}: no series matches {clean_text(series_uid)!r}; series found: {series_listing(studies)}"
            )
        studies = holders
    if len(studies) != 1:
        listing = ", ".join(s.study_id for s in studies)
        raise AmbiguousInputError(
            f"{path} holds {len(studies)} studies ({listing}), never merged; pass one study's folder, "
            "choose a series with --series UID, or run the batch command over all of them"
        )
    return load_input(studies[0], config, series_uid)
