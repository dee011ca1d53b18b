"""Human descriptions of DICOM series: what ``inspect`` lists and series selection compares.

``describe_series`` plans a series (``plan.plan_series``) and summarises it as a
``SeriesInfo``; a series that would not load carries the error as ``problem``
instead of raising it. ``series_summary`` is its one-line form for messages.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from corona_ct.pipeline.config import IngestConfig
from corona_ct.pipeline.errors import InputError
from corona_ct.pipeline.ingest.deid import clean_text
from corona_ct.pipeline.ingest.dicom.codecs import transfer_syntax_name
from corona_ct.pipeline.ingest.dicom.header import SliceHeader, orientation_label, series_label, short_uid
from corona_ct.pipeline.ingest.dicom.plan import plan_series

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesInfo:
    """One series as found by the scan, with what loading it would give.

    ``n_slices`` counts the slices that would be stacked (after dropped files);
    ``files`` are in spatial order when the series is usable. ``problem`` is the
    message loading would raise (``problem_type``), or "" when it loads.
    """

    uid: str
    short_uid: str
    modality: str
    image_type: tuple[str, ...]
    n_slices: int
    slice_thickness_mm: float | None
    slice_spacing_mm: float | None
    pixel_spacing_mm: tuple[float, float] | None
    orientation: str  # "axial", "coronal", "sagittal", "oblique" or "unknown"
    transfer_syntax: str  # readable name
    warnings: tuple[str, ...]
    files: tuple[Path, ...]
    transfer_syntax_uid: str = ""
    series_number: int | None = None
    matrix: tuple[int, int] | None = None  # (rows, columns)
    tilt_degrees: float = 0.0
    notes: tuple[str, ...] = ()
    problem: str = ""
    problem_type: type[InputError] | None = None
    headers: tuple[SliceHeader, ...] = field(default=(), repr=False)

    @property
    def usable(self) -> bool:
        """True when this is a CT series that loads (possibly with warnings)."""
        return not self.problem and self.modality == "CT"


def summarise_pydicom_messages(headers: Sequence[SliceHeader]) -> list[str]:
    """One line per distinct pydicom message in a series, with how many files gave it.

    Quoted values are replaced by ``(value)`` (they group the files, and a header value may
    identify the patient); pydicom's link to the standard is dropped.
    """
    files_by_message: dict[str, set[Path]] = {}
    for header in headers:
        for message in header.pydicom_messages:
            text = message.split(" Please see", 1)[0].rstrip(". ")
            key = " ".join(re.sub(r"'[^']*'", "(value)", text).split())[:160]
            files_by_message.setdefault(key, set()).add(header.path)
    return [
        f"{len(files)} of {len(headers)} files: {key} (pydicom header warning, shown once per series; "
        "the images are read normally)"
        for key, files in sorted(files_by_message.items())
    ]


def describe_series(
    headers: Sequence[SliceHeader], config: IngestConfig, root: Path | None = None
) -> SeriesInfo:
    """Summarise one series for listing and choosing; problems become ``problem``, never exceptions."""
    first = headers[0]
    for line in summarise_pydicom_messages(headers):
        log.warning("series %s: %s", series_label(first.series_uid), line)
    modality = Counter(h.modality for h in headers).most_common(1)[0][0]
    image_types = Counter(h.image_type for h in headers if not h.is_localizer) or Counter(
        h.image_type for h in headers
    )
    thickness = Counter(h.slice_thickness for h in headers if h.slice_thickness is not None).most_common(1)
    syntax = Counter(h.transfer_syntax for h in headers).most_common(1)[0][0]
    common: dict[str, Any] = {
        "uid": first.series_uid,
        "short_uid": short_uid(first.series_uid),
        "modality": clean_text(modality) or "unknown",
        "image_type": tuple(clean_text(p) for p in image_types.most_common(1)[0][0]),
        "slice_thickness_mm": thickness[0][0] if thickness else None,
        "transfer_syntax": transfer_syntax_name(syntax),
        "transfer_syntax_uid": syntax,
        "series_number": first.series_number,
        "headers": tuple(headers),
    }
    no_uid = (
        ("files carry no SeriesInstanceUID; grouped by folder and frame of reference",)
        if first.series_uid.startswith("nouid-")
        else ()
    )
    try:
        plan = plan_series(headers, config, root)
    except InputError as error:
        orientation = first.orientation
        label = orientation_label(np.cross(orientation[:3], orientation[3:])) if orientation else "unknown"
        return SeriesInfo(
            n_slices=len(headers),
            slice_spacing_mm=None,
            pixel_spacing_mm=first.pixel_spacing,
            orientation=label,
            warnings=no_uid,
            files=tuple(h.path for h in headers),
            matrix=(first.rows, first.columns),
            problem=str(error),
            problem_type=type(error),
            **common,
        )
    distinct = len(plan.slices) - sum(len(g) - 1 for g in plan.same_position)
    return SeriesInfo(
        n_slices=distinct,
        slice_spacing_mm=plan.spacing_mm[0],
        pixel_spacing_mm=(plan.spacing_mm[1], plan.spacing_mm[2]),
        orientation=orientation_label(plan.normal),
        warnings=no_uid + plan.warnings,
        files=tuple(h.path for h in plan.slices),
        matrix=(plan.slices[0].rows, plan.slices[0].columns),
        tilt_degrees=plan.tilt_degrees,
        notes=plan.notes,
        **common,
    )


def series_summary(info: SeriesInfo) -> str:
    """One line naming a series: label, orientation, modality, image type, slices, thickness."""
    thickness = f", {info.slice_thickness_mm:g} mm" if info.slice_thickness_mm else ""
    kind = "/".join(info.image_type[:2]) or "no image type"
    return f"{series_label(info.uid)} ({info.orientation} {info.modality}, {kind}, {info.n_slices} slices{thickness})"
