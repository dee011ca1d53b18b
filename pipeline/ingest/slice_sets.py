"""Slice-image inputs that are no CT volume: refusing them for ``run``, collecting them for ``explain``.

A slice-image folder may be a *slice set* of independent 2D images or a folder of
masks (``slice_checks.check_slice_folder``). ``refuse_slice_sets`` raises before any
model loads when the inputs hold nothing else; ``collect_slice_images`` lists the
images ``explain`` classifies one by one.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from corona_ct.pipeline.config import IngestConfig
from corona_ct.pipeline.errors import NoImageDataError, UnsupportedInputError
from corona_ct.pipeline.ingest.discovery import NEVER_DICOM_SUFFIXES, SliceKind, slice_kind, walk_files
from corona_ct.pipeline.ingest.slice_checks import SliceFolderCheck, check_slice_folder, mask_evidence
from corona_ct.pipeline.ingest.slices import SLICE_FILE_SUFFIXES


def _rejected_slice_folders(path: Path, config: IngestConfig) -> tuple[list[SliceFolderCheck], bool]:
    """Slice-image folders under ``path`` that are no CT volume, and whether anything else might be one."""
    if not path.is_dir():
        return [], not (path.is_file() and slice_kind(path) is not None)
    rejected: list[SliceFolderCheck] = []
    folders: set[tuple[Path, SliceKind]] = set()
    other_candidates = False
    for file in walk_files(path, report=False):  # discovery reports skipped output folders
        kind = slice_kind(file)
        if kind is not None:
            folders.add((file.parent, kind))
        elif file.suffix.lower() not in NEVER_DICOM_SUFFIXES:
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
        if path.is_file() and slice_kind(path) is not None:
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
            (
                file.relative_to(path)
                for file in walk_files(path)
                if file.suffix.lower() in SLICE_FILE_SUFFIXES
            ),
            key=_natural_key,
        )
        if not members:
            raise NoImageDataError(
                f"{path}: no slice images ({', '.join(sorted(SLICE_FILE_SUFFIXES))}) in or below this folder; "
                "pass image files or a folder that holds them (a DICOM series is analysed with `corona-ct run`)"
            )
        by_folder: dict[Path, list[Path]] = defaultdict(list)
        for relative in members:
            if slice_kind(relative) is not None:
                by_folder[path / relative.parent].append(path / relative)
        for folder, files in sorted(by_folder.items()):
            evidence = mask_evidence(files)
            if evidence:
                kind = "TIFF" if slice_kind(files[0]) == "tiff" else "PNG/JPEG"
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
