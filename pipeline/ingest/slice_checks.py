"""What a folder of slice images holds, and whether one decoded image can be a CT slice.

A folder of slice images is one of three things, told apart by
:func:`check_slice_folder` before anything is stacked: the slices of one CT
(one size, names with one stem and a slice number), a *slice set* of
independent 2D images (figure crops, slices of many scans: sizes or name stems
differ), or a folder of segmentation *masks* (every image binary). Only the
first is a volume; a slice set is for ``explain``, masks are refused
(:mod:`pipeline.ingest.slice_sets`). :func:`slice_image_problem` does the same
for one image that ``explain`` has decoded. The readers, the suffix registry and
the slice-number rule are in :mod:`pipeline.ingest.slices`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from corona_ct.pipeline.config import IngestConfig
from corona_ct.pipeline.errors import InputError, NoImageDataError
from corona_ct.pipeline.ingest.slices import (
    IMAGE_SUFFIXES,
    SLICE_NUMBER,
    TIFF_SUFFIXES,
    image_shape,
    read_tiff,
    sort_by_slice_number,
    tiff_header,
)

#: A slice-image folder with more than this share of its images off the most common size,
#: or three or more sizes, is a set of independent images, not one CT with a stray file.
SLICE_SET_ODD_SIZE_SHARE = 0.1
#: Shorter sides than this (pixels) are not a CT slice (icons, line plots, thumbnails).
MIN_SLICE_SIDE_PX = 32


@dataclass(frozen=True)
class SliceFolderCheck:
    """What a folder of slice images holds, from :func:`check_slice_folder`.

    ``verdict``: ``"volume"`` (the slices of one CT), ``"slice-set"`` (independent 2D
    images) or ``"masks"`` (binary images); ``evidence`` says why, for messages.
    """

    folder: Path
    kind: str  # "TIFF" or "PNG/JPEG"
    n_images: int
    verdict: Literal["volume", "slice-set", "masks"]
    evidence: str

    @property
    def problem(self) -> str | None:
        """One-line reason this folder is not a CT volume, with what to do; None for a volume."""
        if self.verdict == "masks":
            return (
                f"{self.folder}: looks like a mask folder, not CT slices: {self.evidence}; "
                "masks are labels, not images: pass the folder of the CT slices themselves"
            )
        if self.verdict == "slice-set":
            images = "image" if self.n_images == 1 else "images"
            return (
                f"{self.folder}: {self.n_images} independent 2D {self.kind} {images}, not one CT volume "
                f"({self.evidence}); run `corona-ct explain {self.folder}` for a probability and map per image"
            )
        return None


def _folder_images(folder: Path, suffixes: frozenset[str]) -> list[Path]:
    """Visible files of ``folder`` (not below it) with one of ``suffixes``, sorted by name."""
    return sorted(
        p
        for p in Path(folder).iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
    )


def distinct_grey_values(path: Path, limit: int = 3) -> list[int]:
    """The sorted distinct stored grey values of one image file, at most ``limit`` of them.

    Colour images are converted to 8-bit luminance first; 16-bit TIFF/PNG values are
    taken as stored. Raises ``InputError`` naming an unreadable file.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            pixels = read_tiff(path)
        else:
            with Image.open(path) as image:
                if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                    pixels = np.asarray(image)
                else:
                    pixels = np.asarray(image.convert("L"))
    except (OSError, ValueError, UnidentifiedImageError) as error:
        raise InputError(f"{path}: not a readable image ({error})") from None
    values = np.unique(pixels)
    return [int(v) for v in values[:limit]]


def _values_text(values: set[int]) -> str:
    ordered = sorted(values)
    if len(ordered) == 1:
        return f"value {ordered[0]}"
    return f"values {', '.join(map(str, ordered[:-1]))} and {ordered[-1]}"


def mask_evidence(files: Sequence[Path]) -> str | None:
    """ "all N images are binary (values 0 and 255)" when every readable image holds at most 2 grey values.

    Stops at the first image with more values, so a folder of CT slices costs one decode.
    """
    seen: set[int] = set()
    readable = 0
    for path in files:
        try:
            values = distinct_grey_values(path)
        except Exception:  # unreadable or refused (e.g. PIL's decompression-bomb guard): the reader names it
            continue
        if len(values) > 2:
            return None
        seen.update(values)
        readable += 1
    if not readable:
        return None
    every = f"all {readable} images are" if readable > 1 else "its only image is"
    return f"{every} {'binary' if len(seen) == 2 else 'blank'} ({_values_text(seen)})"


def _size_evidence(files: Sequence[Path], shapes: Sequence[tuple[int, int] | None]) -> str | None:
    """Why the image sizes rule out one volume (three or more sizes, or many odd-sized images)."""
    sizes = Counter(shape for shape in shapes if shape is not None)
    if len(sizes) < 2:
        return None
    (rows, columns), common = sizes.most_common(1)[0]
    odd = sum(sizes.values()) - common
    if len(sizes) < 3 and odd <= max(1, SLICE_SET_ODD_SIZE_SHARE * len(files)):
        return None  # one CT with a stray file: the reader names the odd one
    if common == 1:
        return f"{len(sizes)} different sizes, no two images alike"
    return f"{len(sizes)} different sizes, the most common {columns}×{rows} shared by {common}"


def _name_evidence(files: Sequence[Path]) -> str | None:
    """Why the file names are not one numbered sequence (no numbers, several name stems)."""
    unnumbered = [p.name for p in files if not SLICE_NUMBER.search(p.stem)]
    stems: dict[str, str] = {}  # case-folded stem → the stem as first seen
    for path in files:
        numbers = list(SLICE_NUMBER.finditer(path.stem))
        if numbers:
            stem = path.stem[: numbers[-1].start()]
            stems.setdefault(stem.lower(), stem)
    reasons = []
    if unnumbered:
        reasons.append(f"{len(unnumbered)} with no slice number in the name, e.g. {unnumbered[0]!r}")
    if len(stems) > 1:
        shown = list(dict.fromkeys(stem[:32] for stem in stems.values()))[:2]  # two that look different
        examples = ", ".join(repr(stem + "…") for stem in shown)
        reasons.append(f"{len(stems)} different name stems before the slice number, e.g. {examples}")
    return "; ".join(reasons) or None


def check_slice_folder(
    folder: Path, kind: Literal["tiff", "images"], config: IngestConfig
) -> SliceFolderCheck:
    """Tell the slices of one CT from a set of independent 2D images or a folder of masks.

    Reads image headers (sizes) and the pixels of the first image; every image only when
    all so far are binary. Masks: every image holds at most 2 grey values. Slice set:
    fewer than ``config.min_slices`` images, three or more sizes (or more than 10 % of
    images off the common size), or names that are not one stem with a slice number.
    Unreadable files are left out here; the folder reader names them.
    """
    folder = Path(folder)
    suffixes = TIFF_SUFFIXES if kind == "tiff" else IMAGE_SUFFIXES
    label = "TIFF" if kind == "tiff" else "PNG/JPEG"
    files = _folder_images(folder, suffixes)
    if not files:
        raise NoImageDataError(f"{folder}: no {label} slice files ({', '.join(sorted(suffixes))}) found")
    masks = mask_evidence(files)
    if masks:
        return SliceFolderCheck(folder, label, len(files), "masks", masks)
    if len(files) < config.min_slices:
        evidence = f"a CT volume needs at least {config.min_slices} slices"
        return SliceFolderCheck(folder, label, len(files), "slice-set", evidence)
    shapes: list[tuple[int, int] | None] = []
    for path in files:
        try:
            shape = tiff_header(path)[0] if kind == "tiff" else image_shape(path)
            shapes.append((int(shape[0]), int(shape[1])))
        except Exception:  # unreadable or refused: left out here, the folder reader names it
            shapes.append(None)
    reasons = [r for r in (_size_evidence(files, shapes), _name_evidence(files)) if r]
    if reasons:
        return SliceFolderCheck(folder, label, len(files), "slice-set", "; ".join(reasons))
    sizes = Counter(shape for shape in shapes if shape is not None)
    size = "×".join(map(str, sizes.most_common(1)[0][0][::-1])) if sizes else "unreadable"
    ordered = sort_by_slice_number(files) if len({_slice_number(p) for p in files}) == len(files) else files
    evidence = f"{len(files)} {label} slices of {size}, {ordered[0].name} … {ordered[-1].name}"
    return SliceFolderCheck(folder, label, len(files), "volume", evidence)


def _slice_number(path: Path) -> int:
    return int(SLICE_NUMBER.findall(path.stem)[-1])


def slice_image_problem(image: np.ndarray, units: str) -> str | None:
    """Why one decoded 2D slice (from :func:`read_slice_image`) is no CT slice: too small, blank or binary.

    Values are reported as stored: 0-255 for windowed ("window") images, HU otherwise.
    None when it may be a CT slice.
    """
    rows, columns = image.shape[:2]
    if min(rows, columns) < MIN_SLICE_SIDE_PX:
        return f"image of {columns}×{rows} pixels is too small for a CT slice (at least {MIN_SLICE_SIDE_PX} per side)"
    values = np.unique(image)
    if values.size > 2:
        return None
    scale = 255.0 if units == "window" else 1.0
    shown = {round(float(v) * scale) for v in values}
    if values.size == 1:
        return f"blank image ({_values_text(shown)} everywhere): no CT slice"
    return f"binary image ({_values_text(shown)} only): looks like a mask, not a CT slice"
