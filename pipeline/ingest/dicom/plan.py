"""Series planning: check one series from its headers alone and order its slices.

``plan_series`` runs a short pipeline of named checks. The first ones each take
the slices still in play and return those to keep (dropping, with a warning or
note naming the files, what can be dropped safely) or raise the error a user can
act on; the last ones check the stack they form (spacing, order, gantry tilt,
rescale, transfer syntax). No pixel data are read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from corona_ct.pipeline.config import IngestConfig
from corona_ct.pipeline.errors import GeometryError, UnsupportedInputError
from corona_ct.pipeline.ingest.deid import clean_text
from corona_ct.pipeline.ingest.dicom.codecs import (
    is_lossy,
    require_decoder,
    require_transfer_syntax,
    transfer_syntax_name,
)
from corona_ct.pipeline.ingest.dicom.header import (
    MULTI_FRAME_CT_STORAGE,
    SliceHeader,
    name_files,
    orientation_label,
    series_label,
    unit_vector,
)

#: Slice positions closer than this (mm) are the same position.
SAME_POSITION_MM = 0.01

_MODALITY_NAMES = {
    "CR": "computed radiography (X-ray)",
    "DX": "digital X-ray",
    "MG": "mammography",
    "MR": "magnetic resonance",
    "PT": "PET",
    "NM": "nuclear medicine",
    "US": "ultrasound",
    "XA": "X-ray angiography",
    "RF": "fluoroscopy",
    "OT": "other",
    "SC": "secondary capture",
}


@dataclass(frozen=True)
class SeriesPlan:
    """A checked series: slices in increasing position along ``normal``."""

    slices: tuple[SliceHeader, ...]
    positions_mm: tuple[float, ...]  # along the slice normal, increasing
    spacing_mm: tuple[float, float, float]  # (slice, row, column)
    row_direction: tuple[float, float, float]  # LPS direction of increasing column index
    column_direction: tuple[float, float, float]  # LPS direction of increasing row index
    normal: tuple[float, float, float]
    tilt_degrees: float
    inplane_offsets_mm: tuple[tuple[float, float], ...]  # per slice (along rows, along columns)
    same_position: tuple[tuple[int, ...], ...]  # groups of slice indices at one position
    warnings: tuple[str, ...]
    notes: tuple[str, ...]


@dataclass
class _Findings:
    """What the checks of one series share: its label, the limits, and the warnings and notes so far."""

    label: str
    config: IngestConfig
    root: Path | None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def files(self, headers: Sequence[SliceHeader], limit: int = 3) -> str:
        """The files' names for a message (``header.name_files``)."""
        return name_files(headers, self.root, limit)

    def drop(
        self, slices: list[SliceHeader], bad: Callable[[SliceHeader], bool], why: str, as_warning: bool
    ) -> list[SliceHeader]:
        """``slices`` without the ``bad`` ones, which one warning (or note) names."""
        removed = [h for h in slices if bad(h)]
        if removed:
            text = f"{len(removed)} file(s) skipped, {why}: {self.files(removed)}"
            (self.warnings if as_warning else self.notes).append(text)
        return [h for h in slices if not bad(h)]


@dataclass(frozen=True)
class _Stack:
    """Slices ordered along their normal, with the geometry the later checks need (LPS mm)."""

    slices: list[SliceHeader]
    positions: npt.NDArray[np.float64]  # (n, 3)
    along: npt.NDArray[np.float64]  # (n,) position along the normal, increasing
    row_direction: npt.NDArray[np.float64]
    column_direction: npt.NDArray[np.float64]
    normal: npt.NDArray[np.float64]


# --------------------------------------------------------------------------- checks on the files


def _drop_localizers(slices: list[SliceHeader], found: _Findings) -> list[SliceHeader]:
    slices = found.drop(slices, lambda h: h.is_localizer, "localizer/scout images", as_warning=False)
    if not slices:
        raise UnsupportedInputError(
            f"series {found.label} holds only localizer/scout images; choose the axial CT series instead"
        )
    return slices


def _require_ct(slices: list[SliceHeader], found: _Findings) -> list[SliceHeader]:
    modality = Counter(h.modality for h in slices).most_common(1)[0][0]
    if modality != "CT":
        what = _MODALITY_NAMES.get(modality, "not CT")
        raise UnsupportedInputError(
            f"series {found.label} is modality {clean_text(modality) or 'unknown'} ({what}); "
            "corona-ct analyses CT only: pass a chest CT series"
        )
    return slices


def _require_single_frame_grey(slices: list[SliceHeader], found: _Findings) -> list[SliceHeader]:
    multi_frame = [h for h in slices if h.n_frames > 1 or h.sop_class_uid in MULTI_FRAME_CT_STORAGE]
    if multi_frame:
        raise UnsupportedInputError(
            f"series {found.label}: {found.files(multi_frame)} is an Enhanced/multi-frame CT object, which "
            "corona-ct does not read; convert it to single-frame CT images or NIfTI (e.g. dcm2niix) and pass that"
        )
    colour = [h for h in slices if h.samples_per_pixel != 1]
    if colour:
        raise UnsupportedInputError(
            f"series {found.label}: {found.files(colour)} holds colour pixels ({colour[0].samples_per_pixel} "
            "samples per pixel), not CT values; pass the original greyscale CT series"
        )
    return slices


def _drop_oversized(slices: list[SliceHeader], found: _Findings) -> list[SliceHeader]:
    """Refuse absurd declared sizes from the header alone, before any pixel data are read."""
    limit = found.config.max_pixels_per_slice
    oversized = [h for h in slices if h.rows * h.columns > limit or h.rows < 1 or h.columns < 1]
    if len(oversized) == len(slices):
        raise UnsupportedInputError(
            f"series {found.label}: header of {found.files(oversized)} declares {oversized[0].rows}×"
            f"{oversized[0].columns} pixels per slice, over ingest.max_pixels_per_slice={limit} (or zero); "
            "the file is damaged or not a CT slice (raise the limit only if the size is genuine)"
        )
    return found.drop(
        slices, lambda h: h in oversized, f"declared matrix over {limit} pixels or empty", as_warning=True
    )


def _drop_incomplete(slices: list[SliceHeader], found: _Findings) -> list[SliceHeader]:
    """Drop truncated files and files without position, orientation or pixel spacing."""
    slices = found.drop(slices, lambda h: h.truncated, "truncated (pixel data incomplete)", as_warning=True)
    slices = found.drop(
        slices,
        lambda h: h.position is None or h.orientation is None or h.pixel_spacing is None,
        "no ImagePositionPatient/ImageOrientationPatient/PixelSpacing",
        as_warning=True,
    )
    if not slices:
        raise GeometryError(
            f"series {found.label}: no file carries complete position, orientation and pixel spacing "
            "(or all are truncated); re-export the series from the scanner or PACS"
        )
    return slices


def _drop_instance_copies(slices: list[SliceHeader], found: _Findings) -> list[SliceHeader]:
    """Copies of one instance (same SOPInstanceUID under another name) add nothing."""
    seen: set[str] = set()
    copies: list[SliceHeader] = []
    for header in slices:
        if header.sop_instance_uid and header.sop_instance_uid in seen:
            copies.append(header)
        elif header.sop_instance_uid:
            seen.add(header.sop_instance_uid)
    if copies:
        found.notes.append(
            f"{len(copies)} duplicate file(s) of the same instance skipped: {found.files(copies)}"
        )
    return [h for h in slices if h not in copies]


def _keep_majority_matrix(slices: list[SliceHeader], found: _Findings) -> list[SliceHeader]:
    """One matrix and pixel spacing per volume: keep the majority, drop stray slices loudly."""

    def matrix_key(h: SliceHeader) -> tuple[int, int, float, float]:
        row_mm, col_mm = h.pixel_spacing or (0.0, 0.0)
        return (h.rows, h.columns, round(row_mm, 4), round(col_mm, 4))

    majority = Counter(matrix_key(h) for h in slices).most_common(1)[0][0]
    slices = found.drop(
        slices,
        lambda h: matrix_key(h) != majority,
        f"matrix or pixel spacing differs from the series' {majority[0]}×{majority[1]}, "
        f"{majority[2]}×{majority[3]} mm",
        as_warning=True,
    )
    if len(slices) > found.config.max_slices:
        raise UnsupportedInputError(
            f"series {found.label} has {len(slices)} slices, over ingest.max_slices={found.config.max_slices}; "
            "pass a smaller series or raise the limit"
        )
    return slices


_FILE_CHECKS: tuple[Callable[[list[SliceHeader], _Findings], list[SliceHeader]], ...] = (
    _drop_localizers,
    _require_ct,
    _require_single_frame_grey,
    _drop_oversized,
    _drop_incomplete,
    _drop_instance_copies,
    _keep_majority_matrix,
)


# --------------------------------------------------------------------------- checks on the stack


def _order_along_normal(slices: list[SliceHeader], found: _Findings) -> _Stack:
    """Require one orthogonal orientation and sort the slices by position along its normal."""
    orientations = Counter(tuple(np.round(h.orientation or (), 3)) for h in slices)
    if len(orientations) > 1:
        groups = []
        for orient, count in orientations.most_common():
            members = [h for h in slices if tuple(np.round(h.orientation or (), 3)) == orient]
            normal = np.cross(orient[:3], orient[3:])
            groups.append(f"{count} {orientation_label(normal)} ({found.files(members, 2)})")
        raise GeometryError(
            f"series {found.label} mixes slice orientations: {'; '.join(groups)}; remove the stray files or "
            "export one orientation per series"
        )
    orientation = np.asarray(slices[0].orientation, dtype=np.float64)
    row_dir, col_dir = unit_vector(orientation[:3]), unit_vector(orientation[3:])
    if abs(float(np.dot(row_dir, col_dir))) > 1e-3 or np.linalg.norm(orientation[:3]) == 0:
        raise GeometryError(
            f"series {found.label}: ImageOrientationPatient {orientation.tolist()} is not two orthogonal "
            "directions; the header is damaged"
        )
    normal = unit_vector(np.cross(row_dir, col_dir))
    positions = np.asarray([h.position for h in slices], dtype=np.float64)
    along = positions @ normal
    order = np.lexsort((np.arange(len(slices)), along))
    return _Stack([slices[i] for i in order], positions[order], along[order], row_dir, col_dir, normal)


def _same_position_groups(stack: _Stack, found: _Findings) -> list[tuple[int, ...]]:
    """Slices at one position: identical copies are dropped at decode time, different images refused."""
    along, slices = stack.along, stack.slices
    groups: list[tuple[int, ...]] = []
    start = 0
    for index in range(1, len(slices) + 1):
        if index == len(slices) or along[index] - along[start] > SAME_POSITION_MM:
            if index - start > 1:
                groups.append(tuple(range(start, index)))
            start = index
    if groups:
        examples = "; ".join(
            f"z={along[g[0]]:.2f}: {found.files([slices[i] for i in g], 2)}" for g in groups[:3]
        )
        found.warnings.append(
            f"{sum(len(g) - 1 for g in groups)} slice(s) share a position with another ({examples}); "
            "identical copies are dropped, different images at one position stop the load"
        )
    return groups


def _distinct_positions(stack: _Stack) -> list[int]:
    """Index of the first slice at each distinct position."""
    along = stack.along
    return [0, *[i for i in range(1, len(along)) if along[i] - along[i - 1] > SAME_POSITION_MM]]


def _check_spacing(stack: _Stack, found: _Findings) -> float:
    """The usual slice spacing (mm); too few slices or a gap past ``max_gap_factor`` raise, uneven spacing warns."""
    config = found.config
    unique_along = stack.along[_distinct_positions(stack)]
    if len(unique_along) < max(config.min_slices, 2):
        raise UnsupportedInputError(
            f"series {found.label} has {len(unique_along)} slice(s) at distinct positions; a CT volume needs at "
            f"least {max(config.min_slices, 2)}: pass the whole series, not a single image"
        )
    gaps = np.diff(unique_along)
    nominal = float(np.median(gaps))
    deviation = np.abs(gaps - nominal) / nominal
    if np.any(deviation > config.spacing_tolerance):
        odd = np.flatnonzero(deviation > config.spacing_tolerance)
        where = ", ".join(
            f"{gaps[i]:.2f} mm between z={unique_along[i]:.2f} and {unique_along[i + 1]:.2f}" for i in odd[:5]
        )
        too_large = np.flatnonzero(gaps > config.max_gap_factor * nominal)
        if too_large.size:
            i = int(too_large[0])
            raise GeometryError(
                f"series {found.label}: gap of {gaps[i]:.2f} mm between slices at z={unique_along[i]:.2f} and "
                f"z={unique_along[i + 1]:.2f} mm, over {config.max_gap_factor:g}× the usual {nominal:.2f} mm; "
                "slices are missing: re-export the complete series (or raise ingest.max_gap_factor)"
            )
        found.warnings.append(
            f"uneven slice spacing (usual {nominal:.2f} mm): {where}"
            f"{' …' if odd.size > 5 else ''}; slices may be missing, so lengths and volumes along z are approximate"
        )
    return nominal


def _check_instance_order(stack: _Stack, found: _Findings) -> None:
    """Warn when InstanceNumber disagrees with the positions (positions win)."""
    numbers = [stack.slices[i].instance_number for i in _distinct_positions(stack)]
    if all(n is not None for n in numbers) and len(set(numbers)) == len(numbers):
        steps = np.diff(np.asarray(numbers, dtype=np.int64))
        if not (np.all(steps > 0) or np.all(steps < 0)):
            found.warnings.append(
                "InstanceNumber order contradicts the slice positions; slices are ordered by "
                "ImagePositionPatient, not InstanceNumber"
            )


def _gantry_tilt(stack: _Stack, found: _Findings) -> tuple[float, tuple[tuple[float, float], ...]]:
    """Tilt (degrees) and per-slice in-plane offsets (mm, along rows and columns) to shear out.

    With a gantry tilt positions advance off the slice normal; past ``max_tilt_degrees`` each
    slice is later shifted back onto slice 0's columns, otherwise the offsets are zero.
    """
    positions, along, normal = stack.positions, stack.along, stack.normal
    travel = positions[-1] - positions[0]
    tilt = 0.0
    if np.linalg.norm(travel) > 0:
        cos_tilt = abs(float(np.dot(unit_vector(travel), normal)))
        tilt = float(np.degrees(np.arccos(min(1.0, cos_tilt))))
    if tilt <= found.config.max_tilt_degrees:
        return tilt, tuple((0.0, 0.0) for _ in stack.slices)
    stated = stack.slices[0].gantry_tilt
    stated_text = f", GantryDetectorTilt {stated:g}°" if stated is not None else ""
    found.warnings.append(
        f"gantry tilt of {tilt:.1f}°{stated_text}: slices resampled by shear onto an orthogonal grid "
        "(linear interpolation, -1000 HU outside)"
    )
    offsets = positions - positions[0] - np.outer(along - along[0], normal)
    return tilt, tuple((float(o @ stack.column_direction), float(o @ stack.row_direction)) for o in offsets)


def _check_rescale(slices: Sequence[SliceHeader], found: _Findings) -> None:
    """Warn about missing RescaleSlope/Intercept (assumed 1 and 0); note per-slice values."""
    missing_rescale = [h for h in slices if h.slope is None or h.intercept is None]
    if missing_rescale:
        found.warnings.append(
            f"RescaleSlope/RescaleIntercept missing in {len(missing_rescale)} of {len(slices)} files (CT Image "
            "Storage requires them): assumed slope 1 and intercept 0, i.e. stored values taken as HU"
        )
    if len({(h.slope, h.intercept) for h in slices}) > 1 and not missing_rescale:
        found.notes.append(
            "rescale slope/intercept differ between slices; each slice is rescaled with its own"
        )


def _check_transfer_syntaxes(slices: Sequence[SliceHeader], found: _Findings) -> None:
    """Refuse invalid transfer syntaxes and missing decoders; note mixed and lossy syntaxes."""
    syntaxes = sorted({h.transfer_syntax for h in slices})
    for syntax in syntaxes:
        files = found.files([h for h in slices if h.transfer_syntax == syntax])
        require_transfer_syntax(syntax, f"series {found.label}: {files}")
    if len(syntaxes) > 1:
        found.notes.append(
            f"files use {len(syntaxes)} transfer syntaxes: {', '.join(transfer_syntax_name(s) for s in syntaxes)}"
        )
    if any(is_lossy(s) for s in syntaxes):
        found.warnings.append("lossy compression: HU values are approximate")
    for syntax in syntaxes:
        require_decoder(syntax, f"series {found.label}")


# --------------------------------------------------------------------------- the plan


def plan_series(headers: Sequence[SliceHeader], config: IngestConfig, root: Path | None = None) -> SeriesPlan:
    """Check one series from its headers and order its slices; raise what a user must fix.

    Drops (with a warning or note naming the files) what can be dropped safely:
    localizers, truncated files, files without geometry, a minority matrix or
    pixel spacing, copies of the same instance. Raises ``UnsupportedInputError``
    (not CT, multi-frame, colour, one slice, absurd size), ``GeometryError``
    (mixed orientations, gaps beyond ``max_gap_factor``), ``DecoderMissingError``
    or ``InputError`` (a TransferSyntaxUID that is no transfer syntax).
    """
    found = _Findings(series_label(headers[0].series_uid) if headers else "?", config, root)
    slices = list(headers)
    for check in _FILE_CHECKS:
        slices = check(slices, found)
    stack = _order_along_normal(slices, found)
    same_position = _same_position_groups(stack, found)
    nominal = _check_spacing(stack, found)
    _check_instance_order(stack, found)
    tilt, inplane = _gantry_tilt(stack, found)
    _check_rescale(stack.slices, found)
    _check_transfer_syntaxes(stack.slices, found)

    spacing_row, spacing_col = stack.slices[0].pixel_spacing or (1.0, 1.0)
    return SeriesPlan(
        slices=tuple(stack.slices),
        positions_mm=tuple(float(a) for a in stack.along),
        spacing_mm=(nominal, float(spacing_row), float(spacing_col)),
        row_direction=tuple(stack.row_direction.tolist()),
        column_direction=tuple(stack.column_direction.tolist()),
        normal=tuple(stack.normal.tolist()),
        tilt_degrees=tilt,
        inplane_offsets_mm=inplane,
        same_position=tuple(same_position),
        warnings=tuple(found.warnings),
        notes=tuple(found.notes),
    )
