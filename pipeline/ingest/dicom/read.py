"""Reading a planned DICOM series into a ``Volume`` in HU, canonical (+S, +P, +L) orientation.

``read_series`` re-plans the described series, decodes each slice
(``codecs.decode_stored_values``), rescales to HU, turns padding and scanner fill
into air, drops identical duplicates, shears out a gantry tilt, and re-orders the
axes by permutation and flips only (``canonical_reorder``, never resampling).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from corona_ct.pipeline.config import IngestConfig
from corona_ct.pipeline.datamodel import Geometry, Volume
from corona_ct.pipeline.errors import GeometryError, InputError
from corona_ct.pipeline.ingest.deid import clean_text
from corona_ct.pipeline.ingest.dicom.codecs import decode_stored_values, padding_mask
from corona_ct.pipeline.ingest.dicom.describe import SeriesInfo
from corona_ct.pipeline.ingest.dicom.header import SliceHeader, name_files, series_label
from corona_ct.pipeline.ingest.dicom.plan import SeriesPlan, plan_series
from corona_ct.pipeline.memory import require_memory, volume_bytes_needed

#: HU written where the scanner marked pixels as padding (outside the field of view): air.
PADDING_HU = -1000.0
#: Without padding tags, values below this are not tissue or air but the scanner's fill value.
IMPLAUSIBLE_HU = -1500.0

FloatArray = npt.NDArray[np.float32]


def slice_hu(stored: npt.NDArray[np.int64], header: SliceHeader) -> tuple[npt.NDArray[np.float64], int, int]:
    """One slice's HU from its stored values, and how many pixels were padding and scanner fill.

    Rescale uses the slice's own slope and intercept (1 and 0 when missing); pixels marked by
    PixelPaddingValue and values below ``IMPLAUSIBLE_HU`` become ``PADDING_HU`` (air).
    """
    slope = 1.0 if header.slope is None else header.slope
    intercept = 0.0 if header.intercept is None else header.intercept
    hu = (stored * slope + intercept).astype(np.float64, copy=False)  # exact for integer slopes
    padding = padding_mask(stored, header)
    padded = 0
    if padding is not None:
        padded = int(padding.sum())
        hu[padding] = PADDING_HU
    # Scanners also fill outside the field of view with values the padding tag does not name.
    fill = hu < IMPLAUSIBLE_HU
    hu[fill] = PADDING_HU
    return hu, padded, int(fill.sum())


def _deshear(
    hu: FloatArray, offsets_mm: Sequence[tuple[float, float]], pixel_mm: tuple[float, float]
) -> None:
    """Shift each slice in plane by its tilt offset so all slices share slice 0's columns (in place)."""
    # scipy.ndimage takes about a second to import; only tilted series need it, and importing
    # ``ingest`` (preflight, inspect) must stay quick.
    from scipy import ndimage

    for index, (along_rows, along_columns) in enumerate(offsets_mm):
        if along_rows or along_columns:
            shift = (along_rows / pixel_mm[0], along_columns / pixel_mm[1])
            hu[index] = ndimage.shift(hu[index], shift, order=1, mode="constant", cval=PADDING_HU)


def canonical_reorder(
    array: npt.NDArray[Any],
    spacing_mm: Sequence[float],
    origin_lps: npt.ArrayLike,
    axes_lps: npt.ArrayLike,
) -> tuple[npt.NDArray[Any], Geometry]:
    """Permute and flip (never resample) a (z, y, x) array so its axes point to +S, +P, +L.

    ``axes_lps`` rows are the LPS unit vectors of the array axes in array order.
    Returns the re-ordered array and its geometry.
    """
    axes = np.asarray(axes_lps, dtype=np.float64)
    targets = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    perm = max(
        itertools.permutations(range(3)),
        key=lambda p: sum(abs(float(axes[p[i]] @ targets[i])) for i in range(3)),
    )
    new_axes = axes[list(perm)]
    flips = [i for i in range(3) if float(new_axes[i] @ targets[i]) < 0]
    shape = [array.shape[p] for p in perm]
    spacing = [float(spacing_mm[p]) for p in perm]
    origin = np.asarray(origin_lps, dtype=np.float64).copy()
    for i in flips:
        origin += (shape[i] - 1) * spacing[i] * new_axes[i]
        new_axes[i] = -new_axes[i]
    reordered = np.ascontiguousarray(
        np.flip(array.transpose(perm), axis=tuple(flips)) if flips else array.transpose(perm)
    )
    geometry = Geometry(
        shape=(shape[0], shape[1], shape[2]),
        spacing_mm=(spacing[0], spacing[1], spacing[2]),
        origin_lps=(float(origin[0]), float(origin[1]), float(origin[2])),
        axes_lps=tuple((float(row[0]), float(row[1]), float(row[2])) for row in new_axes),
    )
    return reordered, geometry


def _meta(plan: SeriesPlan, info: SeriesInfo, n_slices: int) -> dict[str, str | int | float]:
    first = plan.slices[0]

    def joined(value: str) -> str:
        return "\\".join(clean_text(part) for part in value.split("\\") if part)

    meta: dict[str, str | int | float] = {
        "Modality": "CT",
        "SeriesInstanceUID": clean_text(info.uid, max_length=80),
        "TransferSyntaxUID": clean_text(first.transfer_syntax, max_length=80),
        "ImageType": "\\".join(info.image_type),
        "PixelSpacing": f"{plan.spacing_mm[1]:.10g}\\{plan.spacing_mm[2]:.10g}",
        "SpacingBetweenSlices": round(plan.spacing_mm[0], 6),
        "NumberOfSlices": n_slices,
    }
    if first.slice_thickness is not None:
        meta["SliceThickness"] = first.slice_thickness
    if first.kvp is not None:
        meta["KVP"] = first.kvp
    for key, value in (
        ("ConvolutionKernel", first.kernel),
        ("Manufacturer", first.manufacturer),
        ("ManufacturerModelName", first.model),
    ):
        if value:
            meta[key] = joined(value)
    return meta


def read_series(
    info: SeriesInfo,
    config: IngestConfig,
    study_id: str,
    source: str,
    root: Path | None = None,
    extra_warnings: Sequence[str] = (),
    decode: Callable[[SliceHeader, Path | None], npt.NDArray[np.int64]] | None = None,
) -> Volume:
    """Decode a described series into a canonical HU ``Volume`` (float32, z, y, x).

    Rescale is applied per slice, padding pixels become -1000 HU, a gantry tilt is
    sheared out, unreadable files are skipped with a warning when the rest still
    forms a volume. ``decode`` replaces ``decode_stored_values`` (tests).
    """
    decode = decode or decode_stored_values
    plan = plan_series(info.headers, config, root)
    label = series_label(info.uid)
    rows, columns = plan.slices[0].rows, plan.slices[0].columns
    require_memory(
        volume_bytes_needed(len(plan.slices) * rows * columns),
        f"series {label} ({source})",
        f"{len(plan.slices)} slices of {columns}×{rows} pixels",
    )
    warn = list(plan.warnings) + list(extra_warnings)
    hu = np.empty((len(plan.slices), plan.slices[0].rows, plan.slices[0].columns), dtype=np.float32)
    stored_by_slice: dict[int, npt.NDArray[np.int64]] = {}
    failed: list[int] = []
    padded = implausible = 0
    for index, header in enumerate(plan.slices):
        try:
            stored = decode(header, root)
        except InputError as error:
            warn.append(f"skipped: {error}")
            failed.append(index)
            continue
        if any(index in group for group in plan.same_position):
            stored_by_slice[index] = stored
        hu[index], n_padded, n_fill = slice_hu(stored, header)
        padded += n_padded
        implausible += n_fill

    keep = [i for i in range(len(plan.slices)) if i not in failed]
    for group in plan.same_position:
        present = [i for i in group if i not in failed]
        for other in present[1:]:
            if not np.array_equal(stored_by_slice[present[0]], stored_by_slice[other]):
                files = name_files([plan.slices[i] for i in group], root)
                raise GeometryError(
                    f"series {label}: different images at the same position z={plan.positions_mm[group[0]]:.2f} mm "
                    f"({files}); the series mixes acquisitions: remove one set of files or choose another series"
                )
            keep.remove(other)
        if len(present) > 1:
            warn.append(
                f"{len(present) - 1} identical duplicate slice(s) at z={plan.positions_mm[group[0]]:.2f} dropped: "
                f"{name_files([plan.slices[i] for i in present[1:]], root)}"
            )
    if failed:
        kept_positions = np.asarray([plan.positions_mm[i] for i in keep])
        if kept_positions.size < max(config.min_slices, 2):
            raise InputError(
                f"series {label}: too few readable slices ({kept_positions.size}); see the files named above"
            )
        gaps = np.diff(kept_positions)
        if gaps.size and gaps.max() > config.max_gap_factor * plan.spacing_mm[0]:
            raise GeometryError(
                f"series {label}: unreadable files leave a {gaps.max():.2f} mm gap (usual {plan.spacing_mm[0]:.2f} mm); "
                f"replace the damaged files: {name_files([plan.slices[i] for i in failed], root)}"
            )
    if padded:
        warn.append(f"{padded} pixels marked by PixelPaddingValue set to {PADDING_HU:g} HU (air)")
    if implausible:
        warn.append(
            f"{implausible} pixels below {IMPLAUSIBLE_HU:g} HU (not tissue or air; not named by PixelPaddingValue) "
            f"treated as fill outside the scan field and set to {PADDING_HU:g} HU"
        )
    if len(keep) < len(plan.slices):
        hu = hu[keep]
    offsets = [plan.inplane_offsets_mm[i] for i in keep]
    if plan.tilt_degrees > config.max_tilt_degrees:
        _deshear(hu, offsets, (plan.spacing_mm[1], plan.spacing_mm[2]))

    kept_positions = np.asarray([plan.positions_mm[i] for i in keep])
    spacing_z = float(np.median(np.diff(kept_positions))) if len(keep) > 1 else plan.spacing_mm[0]
    origin = np.asarray(plan.slices[keep[0]].position, dtype=np.float64)
    if plan.tilt_degrees > config.max_tilt_degrees:
        # After the shear every slice shares slice 0's in-plane position; move the origin along the normal only.
        origin = np.asarray(plan.slices[0].position) + (
            kept_positions[0] - plan.positions_mm[0]
        ) * np.asarray(plan.normal)
    axes = np.asarray([plan.normal, plan.column_direction, plan.row_direction])
    array, geometry = canonical_reorder(hu, (spacing_z, plan.spacing_mm[1], plan.spacing_mm[2]), origin, axes)
    meta = _meta(plan, info, len(keep))
    meta["SpacingBetweenSlices"] = round(spacing_z, 6)
    return Volume(
        array=array.astype(np.float32, copy=False),
        units="HU",
        geometry=geometry,
        study_id=study_id,
        source=source,
        meta=meta,
        warnings=tuple(warn),
    )
