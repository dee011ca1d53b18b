"""Errors before work: check inputs and the output folder before any model is loaded.

Every computing command calls these first, so that a wrong path, an archive, a lone
slice, an empty folder or an unwritable ``--output`` fails in well under a second
with one line and exit code 2, and leaves no output folder behind. The checks reuse
discovery's own rules (``corona_ct.pipeline.ingest``); they read at most one file
header per input folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from corona_ct.pipeline import __version__
from corona_ct.pipeline.atomic import output_error, remove_stale_temporaries, write_json
from corona_ct.pipeline.errors import InputError, NoImageDataError, OutputError, UnsupportedInputError
from corona_ct.pipeline.ingest import discover, first_image_file, input_path_problem
from corona_ct.pipeline.ingest.dicom.header import scan_file
from corona_ct.pipeline.layout import OUTPUT_MARKER

log = logging.getLogger(__name__)

#: Below this much free space on the output's file system a run is refused at the start (bytes).
#: One study's outputs take about 0.3 MB (16 slices) to a few MB (hundreds of slices).
MIN_FREE_BYTES = 50 * 1024**2


def check_volume_inputs(paths: Sequence[str | Path]) -> None:
    """Refuse inputs that cannot hold a CT volume, before anything is loaded or written.

    Every path must exist and must not be an archive, a single slice image or a
    single DICOM file (one slice is not a volume); at least one input must hold image
    data. A folder without image data among other usable inputs is left to the
    batch, which lists it as a failed row.
    """
    if not paths:
        raise NoImageDataError("no input path given; pass a DICOM folder, a NIfTI file or a slice folder")
    empty: list[InputError] = []
    for raw in paths:
        path = Path(raw)
        problem = input_path_problem(path)
        if problem is not None:
            raise problem
        if path.is_dir():
            if first_image_file(path) is None:
                empty.append(_no_data_error(path))
            continue
        if path.name.lower().endswith((".nii", ".nii.gz")):
            continue
        header = scan_file(path)
        if isinstance(header, str):
            raise NoImageDataError(f"{path}: {header}; pass a CT series folder or a NIfTI file")
        if header.n_frames <= 1:
            raise UnsupportedInputError(
                f"{path}: a single DICOM file holds one slice, not a CT volume; pass the folder that holds "
                "all slices of the series (use the explain command for one slice)"
            )
    if len(empty) == len(paths):
        raise empty[0] if len(empty) == 1 else NoImageDataError("; ".join(str(e) for e in empty))
    for error in empty:
        log.warning("%s", error)


def _no_data_error(folder: Path) -> InputError:
    """Discovery's own explanation of why ``folder`` holds no CT data (empty, or which files were skipped)."""
    try:
        discover([folder])
    except InputError as error:
        return error
    return NoImageDataError(f"{folder}: no CT data found")  # pragma: no cover - discover raised nothing


def check_image_inputs(paths: Sequence[str | Path]) -> None:
    """Refuse ``explain`` inputs that are missing, archives or output folders, before the models load."""
    if not paths:
        raise NoImageDataError("no image given; pass PNG/JPEG/BMP/TIFF/DICOM slice files or folders of them")
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise NoImageDataError(f"{path}: no such file or folder; check the path")
        problem = input_path_problem(path)
        if problem is not None and (
            path.is_dir() or "archive" in str(problem)
        ):  # a slice file is explain's input
            raise problem


def check_output_folder(output: str | Path) -> None:
    """Refuse an ``--output`` that is a file, cannot be written, or lies on a nearly full disk.

    Writes nothing that stays: the write test is a temporary file removed at once,
    made in ``output`` when it exists, else in its nearest existing parent (which is
    where ``output`` will be created).
    """
    target = Path(output)
    if target.exists() and not target.is_dir():
        raise OutputError(f"--output {target} is a file, not a folder; choose a folder name (it is created)")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(
            f"--output {target}: {existing} is a file, so no folder can be made below it; choose another --output"
        )
    try:
        handle, probe = tempfile.mkstemp(prefix=".corona-ct-write-test-", dir=existing)
        os.close(handle)
        Path(probe).unlink()
    except OSError as error:
        raise output_error(target if existing == target else f"{target} (in {existing})", error) from None
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        raise OutputError(
            f"cannot write {target}: only {free / 1024**2:.1f} MB free on its file system "
            f"(at least {MIN_FREE_BYTES // 1024**2} MB needed); free space or choose another --output"
        )


def prepare_output_folder(output: str | Path, command: str) -> Path:
    """Create ``output``, mark it as a corona-ct output folder, and remove a killed run's temporaries.

    The marker (``OUTPUT_MARKER``) makes discovery skip this folder when it lies inside
    an input tree, so results are never analysed as CT studies.
    """
    folder = Path(output)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise output_error(folder, error) from None
    marker = folder / OUTPUT_MARKER
    if not marker.is_file():
        write_json(marker, {"written_by": f"corona-ct {__version__}", "command": command}, indent=None)
    remove_stale_temporaries(folder)
    return folder
