"""Discovery: walk input paths, recognise what each file is, and group them into studies.

``discover(paths)`` returns one ``StudyInput`` per study: a NIfTI file, a folder of
TIFF or PNG/JPEG slices, or one (PatientID, StudyInstanceUID) of DICOM files found
anywhere below a folder, each DICOM series described (``dicom.describe``).
Slice-file suffixes come from the one registry in ``slices``; files with
``NEVER_DICOM_SUFFIXES`` are skipped unread, anything else is tried as DICOM. Folders corona-ct wrote (``OUTPUT_MARKER``) are never read as input.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from corona_ct.pipeline.config import IngestConfig
from corona_ct.pipeline.errors import InputError, NoImageDataError, UnsupportedInputError
from corona_ct.pipeline.ingest.deid import derive_study_id, display_path
from corona_ct.pipeline.ingest.dicom.describe import SeriesInfo, describe_series
from corona_ct.pipeline.ingest.dicom.header import SliceHeader, scan_file, series_label
from corona_ct.pipeline.ingest.slice_checks import check_slice_folder
from corona_ct.pipeline.ingest.slices import IMAGE_SUFFIXES, TIFF_SUFFIXES
from corona_ct.pipeline.layout import OUTPUT_MARKER, REPORT_JSON_NAME, SUMMARY_NAME

log = logging.getLogger(__name__)

InputKind = Literal["dicom", "nifti", "tiff", "images"]
SliceKind = Literal["tiff", "images"]

#: Files that are certainly not DICOM; skipped without trying to parse them.
NEVER_DICOM_SUFFIXES = frozenset(
    {".txt", ".md", ".csv", ".json", ".xml", ".html", ".pdf", ".zip", ".gz", ".py", ".log", ".ini"}
)
_ARCHIVES = {".zip": "ZIP", ".tar": "tar", ".tgz": "tar", ".gz": "gzip", ".bz2": "bzip2", ".xz": "xz",
             ".7z": "7-Zip", ".rar": "RAR"}  # fmt: skip
#: Suffixes of NIfTI files (any letter case); ``nifti.read_nifti`` reads them.
NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: Hidden file that marks a folder as written by corona-ct; discovery never reads such a folder as input.


@dataclass(frozen=True)
class StudyInput:
    """One study found by ``discover``: what it is, where, and (DICOM) its series.

    ``study_id`` is de-identified and unique within one ``discover`` result;
    ``notes`` say which files were skipped and why. ``problem`` (slice-image
    folders only) says why the folder is no CT volume: a set of independent
    2D images or a folder of masks; ``load_input`` raises it.
    """

    kind: InputKind
    study_id: str
    source: Path
    series: tuple[SeriesInfo, ...] = ()
    notes: tuple[str, ...] = ()
    problem: str | None = None


def is_nifti(path: Path) -> bool:
    """True for a file named as NIfTI (``.nii`` or ``.nii.gz``, any case)."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """The file name without its NIfTI suffix (``ct.nii.gz`` -> ``ct``)."""
    name = path.name
    suffix = next((s for s in NIFTI_SUFFIXES if name.lower().endswith(s)), "")
    return name[: len(name) - len(suffix)]


def is_output_folder(folder: Path) -> bool:
    """True for a folder corona-ct wrote: it holds ``OUTPUT_MARKER``, or (older runs) summary.csv
    beside study folders with a report.json."""
    if (folder / OUTPUT_MARKER).is_file():
        return True
    if not (folder / SUMMARY_NAME).is_file():
        return False
    try:
        return any((child / REPORT_JSON_NAME).is_file() for child in folder.iterdir() if child.is_dir())
    except OSError:
        return False


def _skip_output_folder(folder: Path, report: bool) -> bool:
    """True when ``folder`` is a corona-ct output folder; with ``report`` one log line says so."""
    if not is_output_folder(folder):
        return False
    if report:
        log.warning(
            "%s: skipped, it is an output folder of corona-ct (results are never read as input)", folder
        )
    return True


def _iter_files(folder: Path, report: bool = True) -> Iterator[Path]:
    """Every non-hidden file below ``folder``, sorted, symlinked folders and output folders not followed."""
    for current, dirs, files in os.walk(folder):
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and not _skip_output_folder(Path(current) / d, report)
        )
        yield from (Path(current) / f for f in sorted(files) if not f.startswith("."))


def walk_files(folder: Path, report: bool = True) -> list[Path]:
    """Every file discovery considers below ``folder`` (output folders skipped, with one log line each if ``report``)."""
    return list(_iter_files(folder, report))


def _archive_kind(path: Path) -> str | None:
    if is_nifti(path):
        return None
    return _ARCHIVES.get(path.suffix.lower())


def input_path_problem(path: Path) -> InputError | None:
    """What makes ``path`` unusable as a study input on its own, judged from the path alone, or None.

    A missing path, an archive, a single slice image, or a corona-ct output folder.
    """
    if not path.exists():
        return NoImageDataError(f"{path}: no such file or folder; check the path")
    if path.is_dir():
        if is_output_folder(path):
            return NoImageDataError(
                f"{path}: an output folder of corona-ct (results, not CT input); pass the folder with the CT data"
            )
        return None
    kind = _archive_kind(path)
    if kind is not None:
        return UnsupportedInputError(
            f"{path}: a {kind} archive; corona-ct does not read archives: unpack it and pass the unpacked folder"
        )
    if slice_kind(path) is not None:
        return UnsupportedInputError(
            f"{path}: a single slice image is not a CT volume; pass the folder that holds all slices, "
            f"or run `corona-ct explain {path}` for this slice alone"
        )
    return None


def first_image_file(folder: Path) -> Path | None:
    """The first file below ``folder`` that discovery would use (NIfTI, slice image or DICOM), else None.

    Stops at the first hit, so it is quick on large folders; ``discover`` gives the detailed reasons.
    """
    for path in _iter_files(folder, report=False):  # discovery itself reports skipped output folders
        suffix = path.suffix.lower()
        if is_nifti(path) or slice_kind(path) is not None:
            return path
        if suffix not in NEVER_DICOM_SUFFIXES and not isinstance(scan_file(path), str):
            return path
    return None


def _summarise_skipped(skipped: dict[str, list[Path]], root: Path) -> list[str]:
    notes = []
    for reason, files in sorted(skipped.items()):
        names = ", ".join(display_path(f, root) for f in files[:3])
        more = f" and {len(files) - 3} more" if len(files) > 3 else ""
        notes.append(f"{len(files)} file(s) ignored, {reason}: {names}{more}")
    return notes


def _dicom_studies(
    headers: list[SliceHeader], root: Path, notes: list[str], config: IngestConfig
) -> list[StudyInput]:
    """Group headers by (PatientID, StudyInstanceUID), then by series; never merges patients."""
    by_study: dict[tuple[str, str], list[SliceHeader]] = defaultdict(list)
    for header in headers:
        study_key = header.study_uid or f"nouid:{header.path.parent}"
        by_study[(header.patient_id, study_key)].append(header)
    studies = []
    for (_, study_key), members in sorted(
        by_study.items(), key=lambda item: str(min(h.path for h in item[1]))
    ):
        common = Path(os.path.commonpath([str(h.path) for h in members]))
        folder = root if len(by_study) == 1 and root.is_dir() else common
        if not folder.is_dir():
            folder = folder.parent
        identifiers = [i for h in members[:1] for i in h.identifiers]
        study_id = derive_study_id(folder.name, study_key, identifiers)
        by_series: dict[str, list[SliceHeader]] = defaultdict(list)
        for header in members:
            by_series[header.series_uid].append(header)
        study_notes = list(notes)
        for uid, group in sorted(by_series.items()):
            if all(h.is_localizer for h in group):
                # A scout series is no candidate; list it as a note, not as a series.
                del by_series[uid]
                names = ", ".join(display_path(h.path, root) for h in group[:3])
                study_notes.append(
                    f"series {series_label(uid)}: {len(group)} localizer/scout image(s) ignored: {names}"
                )
        series = tuple(
            describe_series(sorted(group, key=lambda h: h.path), config, root)
            for _, group in sorted(
                by_series.items(), key=lambda item: (item[1][0].series_number or 0, item[0])
            )
        )
        series_notes = [f"series {series_label(s.uid)}: {note}" for s in series for note in s.notes]
        studies.append(StudyInput("dicom", study_id, folder, series, tuple(study_notes + series_notes)))
    return studies


def slice_kind(path: Path) -> SliceKind | None:
    """The kind of a slice-image file by its suffix (``slices`` registry): "tiff", "images" or None."""
    suffix = path.suffix.lower()
    return "tiff" if suffix in TIFF_SUFFIXES else "images" if suffix in IMAGE_SUFFIXES else None


def _slice_study(folder: Path, kind: SliceKind, config: IngestConfig) -> StudyInput:
    """A slice-image folder as a study; a slice set or mask folder carries its ``problem``."""
    check = check_slice_folder(folder, kind, config)
    note = check.evidence if check.verdict == "volume" else None
    return StudyInput(
        kind,
        derive_study_id(folder.name, str(folder)),
        folder,
        notes=(note,) if note else (),
        problem=check.problem,
    )


def _discover_folder(folder: Path, config: IngestConfig) -> list[StudyInput]:
    files = walk_files(folder)
    found: list[StudyInput] = []
    slice_folders: set[tuple[Path, SliceKind]] = set()
    skipped: dict[str, list[Path]] = defaultdict(list)
    headers: list[SliceHeader] = []
    for path in files:
        suffix = path.suffix.lower()
        kind = slice_kind(path)
        if is_nifti(path):
            found.append(StudyInput("nifti", derive_study_id(nifti_stem(path), str(path)), path))
        elif kind is not None:
            slice_folders.add((path.parent, kind))
        elif suffix in NEVER_DICOM_SUFFIXES:
            skipped["not image data"].append(path)
        else:
            result = scan_file(path)
            if isinstance(result, str):
                skipped[result].append(path)
            else:
                headers.append(result)
    found.extend(_slice_study(slice_folder, kind, config) for slice_folder, kind in sorted(slice_folders))
    notes = _summarise_skipped(skipped, folder)
    if headers:
        found.extend(_dicom_studies(headers, folder, notes, config))
    elif not found:
        detail = f" ({'; '.join(notes)})" if notes else ""
        raise NoImageDataError(
            f"{folder}: no CT data found{detail}; pass a folder of DICOM files, a NIfTI file, "
            "or a folder of TIFF/PNG/JPEG slices"
            if files
            else f"{folder}: the folder is empty; pass a folder with a CT series"
        )
    return found


def _discover_path(path: Path, config: IngestConfig) -> list[StudyInput]:
    problem = input_path_problem(path)
    if problem is not None:
        raise problem
    if path.is_dir():
        return _discover_folder(path, config)
    if is_nifti(path):
        return [StudyInput("nifti", derive_study_id(nifti_stem(path), str(path)), path)]
    if slice_kind(path) is not None:
        raise UnsupportedInputError(
            f"{path}: a single slice image is not a CT volume; pass the folder that holds all slices, "
            f"or run `corona-ct explain {path}` for this slice alone"
        )
    result = scan_file(path)
    if isinstance(result, str):
        raise NoImageDataError(f"{path}: {result}; pass a CT series folder, a DICOM file or a NIfTI file")
    return _dicom_studies([result], path.parent, [], config)


def _unique_ids(studies: list[StudyInput]) -> list[StudyInput]:
    seen: dict[str, int] = {}
    unique = []
    for study in studies:
        count = seen.get(study.study_id, 0) + 1
        seen[study.study_id] = count
        if count > 1:
            study = dataclasses.replace(study, study_id=f"{study.study_id}-{count}")
        unique.append(study)
    return unique


def discover(paths: Sequence[str | Path], config: IngestConfig | None = None) -> list[StudyInput]:
    """Every study under ``paths`` (files or folders, searched recursively), in sorted order.

    Raises ``NoImageDataError`` naming the path when a path does not exist or
    nothing usable is found under any of them.
    """
    config = config or IngestConfig()
    if isinstance(paths, str | Path):
        paths = [paths]
    if not paths:
        raise NoImageDataError("no input path given; pass a DICOM folder, a NIfTI file or a slice folder")
    studies: list[StudyInput] = []
    problems: list[InputError] = []
    for raw in paths:
        try:
            studies.extend(_discover_path(Path(raw), config))
        except NoImageDataError as error:
            if len(paths) == 1 or not Path(raw).exists():
                raise
            problems.append(error)
            log.warning("%s", error)
    if not studies:
        raise NoImageDataError(
            "; ".join(str(p) for p in problems) or f"no CT data under {', '.join(map(str, paths))}"
        )
    studies.sort(key=lambda s: (str(s.source), s.study_id))
    return _unique_ids(studies)
