"""Find studies under input paths and load one CT series as a ``Volume``.

``discover(paths)`` walks the inputs and returns one ``StudyInput`` per study:
a NIfTI file, a folder of TIFF or PNG/JPEG slices, or one (PatientID,
StudyInstanceUID) of DICOM files found anywhere below a folder.
``choose_series`` picks the series to analyse by a documented rule,
``load_input`` reads it, ``load_study(path)`` does all three for one study.
A slice-image folder that is no CT volume (a set of independent 2D images, or
masks) is found but carries its ``problem``; ``refuse_slice_sets`` raises it
before models are loaded, ``collect_slice_images`` lists images for ``explain``.

Example::

    from corona_ct.pipeline.ingest import load_study
    volume = load_study("LIDC-IDRI-0001")   # float32 HU, (z, y, x), +S +P +L
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from corona_ct.pipeline.config import IngestConfig
from corona_ct.pipeline.datamodel import Volume
from corona_ct.pipeline.errors import (
    AmbiguousInputError,
    ConfigError,
    InputError,
    NoImageDataError,
    UnsupportedInputError,
)
from corona_ct.pipeline.ingest.deid import clean_text, derive_study_id
from corona_ct.pipeline.ingest.dicom import (
    SeriesInfo,
    SliceHeader,
    describe_series,
    display_path,
    read_series,
    scan_file,
    series_label,
)
from corona_ct.pipeline.ingest.slices import (
    IMAGE_SUFFIXES,
    SLICE_FILE_SUFFIXES,
    TIFF_SUFFIXES,
    SliceFolderCheck,
    check_slice_folder,
    mask_evidence,
)

__all__ = [
    "OUTPUT_MARKER",
    "SeriesInfo",
    "SliceImage",
    "StudyInput",
    "choose_series",
    "collect_slice_images",
    "discover",
    "find_series",
    "first_image_file",
    "input_path_problem",
    "is_output_folder",
    "load_all_series",
    "load_input",
    "load_study",
    "refuse_slice_sets",
]

log = logging.getLogger(__name__)

InputKind = Literal["dicom", "nifti", "tiff", "images"]

# Files that are certainly not DICOM; skipped without trying to parse them.
_NEVER_DICOM = {".txt", ".md", ".csv", ".json", ".xml", ".html", ".pdf", ".zip", ".gz", ".py", ".log", ".ini"}
_ARCHIVES = {".zip": "ZIP", ".tar": "tar", ".tgz": "tar", ".gz": "gzip", ".bz2": "bzip2", ".xz": "xz",
             ".7z": "7-Zip", ".rar": "RAR"}  # fmt: skip
#: Hidden file that marks a folder as written by corona-ct; discovery never reads such a folder as input.
OUTPUT_MARKER = ".corona-ct-output"
#: Series selection rule, in order of precedence (see docs/ingest.md).
SELECTION_RULE = ("axial", "ORIGINAL/PRIMARY", "most slices", "thinnest slices")


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


def _is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith((".nii", ".nii.gz"))


def nifti_stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]


def is_output_folder(folder: Path) -> bool:
    """True for a folder corona-ct wrote: it holds ``OUTPUT_MARKER``, or (older runs) summary.csv
    beside study folders with a report.json."""
    if (folder / OUTPUT_MARKER).is_file():
        return True
    if not (folder / "summary.csv").is_file():
        return False
    try:
        return any((child / "report.json").is_file() for child in folder.iterdir() if child.is_dir())
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


def _walk(folder: Path, report: bool = True) -> list[Path]:
    """Every file discovery considers below ``folder`` (output folders skipped, with one log line each if ``report``)."""
    return list(_iter_files(folder, report))


def _archive_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith((".nii.gz", ".nii")):
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
    if _slice_kind(path) is not None:
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
        if _is_nifti(path) or _slice_kind(path) is not None:
            return path
        if suffix not in _NEVER_DICOM and not isinstance(scan_file(path), str):
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


def _slice_kind(path: Path) -> Literal["tiff", "images"] | None:
    suffix = path.suffix.lower()
    return "tiff" if suffix in TIFF_SUFFIXES else "images" if suffix in IMAGE_SUFFIXES else None


def _slice_study(folder: Path, kind: Literal["tiff", "images"], config: IngestConfig) -> StudyInput:
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
    files = _walk(folder)
    found: list[StudyInput] = []
    slice_folders: set[tuple[Path, Literal["tiff", "images"]]] = set()
    skipped: dict[str, list[Path]] = defaultdict(list)
    headers: list[SliceHeader] = []
    for path in files:
        suffix = path.suffix.lower()
        slice_kind = _slice_kind(path)
        if _is_nifti(path):
            found.append(StudyInput("nifti", derive_study_id(nifti_stem(path), str(path)), path))
        elif slice_kind is not None:
            slice_folders.add((path.parent, slice_kind))
        elif suffix in _NEVER_DICOM:
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
    if _is_nifti(path):
        return [StudyInput("nifti", derive_study_id(nifti_stem(path), str(path)), path)]
    if _slice_kind(path) is not None:
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


def _series_key(info: SeriesInfo) -> tuple[bool, bool, int, float]:
    thickness = info.slice_thickness_mm or info.slice_spacing_mm or float("inf")
    return (
        info.orientation == "axial",
        "ORIGINAL" in info.image_type and "PRIMARY" in info.image_type,
        info.n_slices,
        -thickness,
    )


def _describe(info: SeriesInfo) -> str:
    thickness = f", {info.slice_thickness_mm:g} mm" if info.slice_thickness_mm else ""
    kind = "/".join(info.image_type[:2]) or "no image type"
    return f"{series_label(info.uid)} ({info.orientation} {info.modality}, {kind}, {info.n_slices} slices{thickness})"


def find_series(item: StudyInput, query: str) -> SeriesInfo:
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
    options = "; ".join(_describe(s) for s in series) or "none"
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
        f"(decided by: {SELECTION_RULE[deciding]}); others: {', '.join(_describe(s) for s in usable[1:])}; "
        "use --series UID to pick another or --all-series for all"
    )


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
        from corona_ct.pipeline.ingest.nifti import read_nifti

        return read_nifti(item.source, config, item.study_id)
    if item.kind == "tiff":
        from corona_ct.pipeline.ingest.slices import read_tiff_folder

        return read_tiff_folder(item.source, config, item.study_id)
    if item.kind == "images":
        from corona_ct.pipeline.ingest.slices import read_image_folder

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
        holders = []
        for study in studies:
            if study.kind != "dicom":
                continue
            try:
                find_series(study, series_uid)
            except ConfigError:
                continue
            holders.append(study)
        if len(holders) == 1:
            return load_input(holders[0], config, series_uid)
        if not holders:
            options = "; ".join(
                f"{s.study_id}: {', '.join(series_label(i.uid) for i in s.series)}" for s in studies
            )
            raise ConfigError(
                f"{path}: no series matches {clean_text(series_uid)!r}; series found: {options}"
            )
        studies = holders
    if len(studies) != 1:
        listing = ", ".join(s.study_id for s in studies)
        raise AmbiguousInputError(
            f"{path} holds {len(studies)} studies ({listing}), never merged; pass one study's folder, "
            "choose a series with --series UID, or run the batch command over all of them"
        )
    return load_input(studies[0], config, series_uid)


# ----------------------------------------------------------------------------- slice sets


def _rejected_slice_folders(path: Path, config: IngestConfig) -> tuple[list[SliceFolderCheck], bool]:
    """Slice-image folders under ``path`` that are no CT volume, and whether anything else might be one."""
    if not path.is_dir():
        return [], not (path.is_file() and _slice_kind(path) is not None)
    rejected: list[SliceFolderCheck] = []
    folders: set[tuple[Path, Literal["tiff", "images"]]] = set()
    other_candidates = False
    for file in _walk(path, report=False):  # discovery reports skipped output folders
        kind = _slice_kind(file)
        if kind is not None:
            folders.add((file.parent, kind))
        elif file.suffix.lower() not in _NEVER_DICOM:
            other_candidates = True  # NIfTI or possibly DICOM: discover decides
    if other_candidates:
        return rejected, True  # run goes on; discover and load_input judge each folder
    for folder, kind in sorted(folders):
        check = check_slice_folder(folder, kind, config)
        if check.problem:
            rejected.append(check)
        else:
            other_candidates = True
    return rejected, other_candidates


def refuse_slice_sets(paths: Sequence[str | Path], config: IngestConfig | None = None) -> None:
    """Raise ``UnsupportedInputError`` when the inputs hold only slice sets, masks or single slice images.

    Cheap (file names, image headers and one image per folder, no DICOM parsing), so ``run``
    calls it before loading models. Inputs that hold anything else pass; ``load_input`` then
    fails just the slice-set folders, each with the same message.
    """
    config = config or IngestConfig()
    problems: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file() and _slice_kind(path) is not None:
            problems.append(
                f"{path}: a single slice image is not a CT volume; run `corona-ct explain {path}` for it"
            )
            continue
        rejected, other_candidates = _rejected_slice_folders(path, config)
        if other_candidates or not rejected:
            return
        problems.extend(str(check.problem) for check in rejected)
    if problems:
        more = f" (and {len(problems) - 1} more input(s) like it)" if len(problems) > 1 else ""
        raise UnsupportedInputError(problems[0] + more)


@dataclass(frozen=True)
class SliceImage:
    """One 2D image for ``explain``.

    ``input`` is the path as the user gave it (for a file found in a given folder: that
    folder as given joined with the file's path below it); ``relative`` is the file's
    path below the given folder, starting with that folder's name (a file given itself:
    its name), used for unique output names.
    """

    input: str
    path: Path
    relative: str


def _natural_key(relative: Path) -> tuple[tuple[tuple[int, int | str], ...], ...]:
    """Sort key comparing the numbers in names as numbers (``2.png`` before ``10.png``)."""
    return tuple(
        tuple((0, int(part)) if part.isdigit() else (1, part.lower()) for part in re.split(r"(\d+)", name))
        for name in relative.parts
    )


def collect_slice_images(inputs: Sequence[str | Path]) -> list[SliceImage]:
    """The images ``explain`` classifies: files as given, folders expanded, in input order.

    A folder contributes every visible file below it (recursively, hidden and symlinked
    folders skipped) with a slice-file suffix (``SLICE_FILE_SUFFIXES``), sorted by path
    with numbers compared as numbers; other files are ignored. A file given itself is
    taken whatever its suffix (DICOM files often have none) and checked when read.
    Raises ``NoImageDataError`` for a folder without slice files and
    ``UnsupportedInputError`` for a folder of masks (every image binary).
    """
    images: list[SliceImage] = []
    for raw in inputs:
        given = str(raw)
        path = Path(given)
        if not path.is_dir():
            images.append(SliceImage(given, path, path.name))
            continue
        members = sorted(
            (file.relative_to(path) for file in _walk(path) if file.suffix.lower() in SLICE_FILE_SUFFIXES),
            key=_natural_key,
        )
        if not members:
            raise NoImageDataError(
                f"{path}: no slice images ({', '.join(sorted(SLICE_FILE_SUFFIXES))}) in or below this folder; "
                "pass image files or a folder that holds them (a DICOM series is analysed with `corona-ct run`)"
            )
        by_folder: dict[Path, list[Path]] = defaultdict(list)
        for relative in members:
            if _slice_kind(relative) is not None:
                by_folder[path / relative.parent].append(path / relative)
        for folder, files in sorted(by_folder.items()):
            evidence = mask_evidence(files)
            if evidence:
                kind = "TIFF" if _slice_kind(files[0]) == "tiff" else "PNG/JPEG"
                raise UnsupportedInputError(
                    str(SliceFolderCheck(folder, kind, len(files), "masks", evidence).problem)
                )
        name = path.resolve().name if path.name in ("", ".", "..") else path.name
        prefix = given if given.endswith(("/", os.sep)) else given + os.sep  # the folder exactly as given
        images.extend(
            SliceImage(prefix + str(relative), path / relative, str(Path(name, relative)))
            for relative in members
        )
    return images
