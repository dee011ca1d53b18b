"""``corona-ct inspect PATH...``: list the studies and series found, and which series would be analysed.

Reads headers only (pixel data only of slice images: one per slice-image folder, every one where they
look like masks), so it is quick and safe on large folders.
Exit code 0 when every study has a series to analyse; otherwise the tables are
printed first and the first problem is raised (one line, exit code 2).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from corona_ct.pipeline.errors import ConfigError, InputError, UnsupportedInputError

if TYPE_CHECKING:
    from corona_ct.pipeline.ingest import SeriesInfo, StudyInput


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="list studies and series under PATH and the series that would be analysed",
        description=(
            "List every study and series found under PATH (DICOM folders searched recursively, NIfTI files, "
            "TIFF/PNG/JPEG slice folders) with modality, image type, slices, thickness, spacing, orientation, "
            "transfer syntax and warnings, and say which series the pipeline would choose and why. "
            "Slice-image folders that are no CT volume (independent 2D images: use explain; masks) are named. "
            "Reads headers only (and the pixels of one image per slice-image folder, all where they look like masks)."
        ),
    )
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="DICOM folder or file, NIfTI file, slice folder"
    )
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument(
        "--series", metavar="UID", help="series to analyse: full UID, short UID or unique prefix"
    )
    choice.add_argument("--all-series", action="store_true", help="analyse every usable CT series of a study")
    parser.set_defaults(handler=run_inspect)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _series_rows(series: tuple[SeriesInfo, ...]) -> list[str]:
    from corona_ct.pipeline.ingest.dicom.header import series_label

    header = (
        "series",
        "modality",
        "image type",
        "slices",
        "thick mm",
        "spacing mm",
        "pixel mm",
        "orient",
        "syntax",
    )
    rows = [header]
    for info in series:
        pixel = "-" if info.pixel_spacing_mm is None else "×".join(_fmt(v) for v in info.pixel_spacing_mm)
        rows.append(
            (
                series_label(info.uid),
                info.modality,
                "/".join(info.image_type[:3]) or "-",
                str(info.n_slices),
                _fmt(info.slice_thickness_mm),
                _fmt(info.slice_spacing_mm),
                pixel,
                info.orientation,
                info.transfer_syntax,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    for info in series:
        label = series_label(info.uid)
        lines.extend(f"    {label} warning: {text}" for text in info.warnings)
        if info.problem:
            lines.append(f"    {label} cannot be analysed: {info.problem}")
    return lines


def _study_block(
    item: StudyInput, series_uid: str | None, all_series: bool
) -> tuple[list[str], InputError | None]:
    from corona_ct.pipeline.ingest import choose_series
    from corona_ct.pipeline.ingest.dicom.header import series_label

    lines = [f"study {item.study_id}  ({item.kind})  {item.source}"]
    if item.problem:  # a slice set (for explain) or a mask folder, not a volume
        lines.append(f"  cannot be analysed: {item.problem}")
        return lines, UnsupportedInputError(item.problem)
    if item.kind != "dicom":
        reader = "NIfTI reader" if item.kind == "nifti" else "slice-folder reader"
        lines.append(f"  one volume, read by the {reader} (no series to choose)")
        lines.extend(f"  note: {note}" for note in item.notes)
        return lines, None
    lines.extend(_series_rows(item.series))
    lines.extend(f"  note: {note}" for note in item.notes)
    problem: InputError | None = None
    try:
        if all_series:
            usable = [s for s in item.series if s.usable]
            if not usable:
                choose_series(item)  # raises why nothing is usable
            lines.append(
                f"  chosen: all {len(usable)} usable CT series: {', '.join(series_label(s.uid) for s in usable)}"
            )
        else:
            chosen, reason = choose_series(item, series_uid)
            lines.append(f"  chosen: {series_label(chosen.uid)} ({chosen.n_slices} slices): {reason}")
            if chosen.problem:
                lines.append(f"  but it cannot be analysed: {chosen.problem}")
                problem = (chosen.problem_type or InputError)(chosen.problem)
    except InputError as error:
        lines.append(f"  chosen: none: {error}")
        problem = error
    return lines, problem


def run_inspect(args: argparse.Namespace) -> int:
    from corona_ct.pipeline.ingest import discover, find_studies_holding
    from corona_ct.pipeline.ingest.select import series_listing

    studies = discover(args.paths)
    target = None
    if args.series:
        holders = find_studies_holding(studies, args.series)
        if len(holders) != 1:
            raise ConfigError(
                f"--series {args.series!r} matches {'no' if not holders else 'more than one'} study; "
                f"series found: {series_listing(studies) or 'none'}"
            )
        target = holders[0]
    problems: list[tuple[str, InputError]] = []
    for index, study in enumerate(studies):
        if index:
            print()
        lines, problem = _study_block(study, args.series if study is target else None, args.all_series)
        print("\n".join(lines))
        if problem is not None:
            problems.append((study.study_id, problem))
    print()
    print(
        f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'} found; {len(studies) - len(problems)} can be analysed"
    )
    if problems:
        study_id, first = problems[0]
        others = f" (and {len(problems) - 1} more studies)" if len(problems) > 1 else ""
        raise type(first)(f"study {study_id}: {first}{others}")
    return 0
