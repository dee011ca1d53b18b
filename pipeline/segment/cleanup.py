"""Rules every lung mask obeys (U-Net and classical): plausible lung only, holes filled,
dense tissue against the lung closed in, at most two lungs."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from corona_ct.pipeline.config import SegmentConfig
from corona_ct.pipeline.datamodel import LEFT_LUNG, RIGHT_LUNG
from corona_ct.pipeline.morphology import (
    INPLANE_4,
    close_in_plane,
    convex_hull_2d,
    dilate_in_plane,
    erode_rows,
    fill_holes_in_plane,
    in_parallel,
    in_slabs,
)
from corona_ct.pipeline.segment.regions import (
    FACES_3D,
    INPLANE_8,
    LUNG_MIN_MEDIAN_HU,
    SECOND_LUNG_MIN_FRACTION,
    BoolArray,
    LabelArray,
    body_mask,
    outside_air,
    slice_centroids,
)
from corona_ct.pipeline.segment.sides import split_by_midline

#: A lung lies at least this far (mm) inside the body outline (ribs, muscle, fat in between) ...
CHEST_WALL_MM = 4.0
#: ... so a 3D component with more than this share of its voxels closer to the outline is not lung.
MAX_SUPERFICIAL_SHARE = 0.3
#: A region of the U-Net mask whose median is above this (HU) is fat or soft tissue, not lung.
LUNG_MAX_MEDIAN_HU = -400.0
#: A bite of the convex hull is a mediastinal concavity, not a lesion, when it comes this close
#: (mm) to the other lung.
MEDIASTINUM_GUARD_MM = 20.0
#: Longest run of dense tissue (mm along z) between lung above and below that is closed into the lung.
Z_BRIDGE_MM = 30.0
#: Volumes with fewer slices use 2D convex-hull bites instead of z-bridging.
MIN_SLICES_FOR_Z_BRIDGING = 3


def trim_dense_rim(labels: np.ndarray, low: BoolArray, rim_px: int) -> LabelArray:
    """Drop dense (not low-density) pixels within ``rim_px`` of the edge of a U-Net mask, per slice.

    A network run at a coarser grid than the image blurs the lung edge outwards by about
    one input pixel (``rim_px`` image pixels), taking chest wall and mediastinum with it;
    that soft tissue would count as consolidation. Only the rim is trimmed, so dense
    lesions inside the lung stay (a subpleural lesion loses at most the rim's width).
    """
    lungs = labels > 0
    if rim_px < 1 or not lungs.any():
        return np.asarray(labels, dtype=np.uint8)
    core = erode_rows(lungs, _diamond_rows(rim_px))  # = rim_px in-plane 4-neighbour erosions
    trimmed = np.where(lungs & ~core & ~low, 0, labels)
    return trimmed.astype(np.uint8)


def keep_plausible_lung(
    labels: np.ndarray,
    array: np.ndarray,
    units: str,
    spacing_mm: tuple[float, float, float],
    low: BoolArray,
) -> LabelArray:
    """U-Net labels kept only where lung can be: inside the chest wall, not gas, lung-sized.

    ``low`` is :func:`low_density` of ``array`` (the caller has it already).

    A network sees texture, not anatomy: on scanners it was not trained on it also labels air
    under the table and above the shoulders, the foam pad under the back, stomach and bowel
    gas, the trachea and the oesophagus. Dropped here: pixels outside the body
    (:func:`body_mask`); 3D components lying largely within ``CHEST_WALL_MM`` of the body's
    outline (pads, skin folds: a lung always has a chest wall around it); in-plane components
    that are pure gas (median below ``LUNG_MIN_MEDIAN_HU``, HU only); and, per side, 3D
    components smaller than ``SECOND_LUNG_MIN_FRACTION`` of that side's largest. HU only: 3D
    components with a median above ``LUNG_MAX_MEDIAN_HU`` (subcutaneous fat, bowel wall).
    """
    labels = np.asarray(labels, dtype=np.uint8)
    lungs = labels > 0
    if not lungs.any():
        return labels
    shape = labels.shape
    # Every rule below is in-plane or follows the lungs' own 3D components: the slices with lung
    # (whole, for the body outline) and, after the body, the lungs' box plus the chest wall suffice.
    z_range = _true_range(lungs.any(axis=(1, 2)))
    labels, lungs, array, low = labels[z_range], lungs[z_range], array[z_range], low[z_range]
    # The body without what lies against it: a foam pad or table cavity between back and table is
    # low-density and enclosed, so the broad body (dense tissue and enclosed air) takes it in.
    # The dense outline alone excludes it, unless a crop opens the chest wall (then the broad one).
    body = body_mask(~low)
    in_body = np.count_nonzero(lungs & body)
    # the broad body can only win when the dense one leaves out more than a fifth of the lungs
    if in_body < 0.8 * np.count_nonzero(lungs):
        broad_body = body_mask(~outside_air(low))
        if in_body < 0.8 * np.count_nonzero(lungs & broad_body):
            body = broad_body
    wall_px = max(1, math.ceil(CHEST_WALL_MM / min(spacing_mm[1:])))
    # the erosion reaches wall_px pixels: a box wall_px wider than the lungs erodes them as the whole would
    box = (slice(None), *_padded_box(lungs, wall_px, (1.0, 1.0)))
    labels, lungs, array, body = labels[box], lungs[box], array[box], body[box]
    lungs &= body
    inner, (components, count) = in_parallel(
        partial(erode_rows, body, _diamond_rows(wall_px)),  # = wall_px erosions by INPLANE_4
        partial(ndimage.label, lungs, structure=FACES_3D),
    )
    if count:
        lung_components = components[lungs]
        inner_share = (
            np.bincount(lung_components, inner[lungs], count + 1)[1:]
            / np.bincount(lung_components, minlength=count + 1)[1:]
        )
        superficial = np.zeros(count + 1, dtype=bool)
        superficial[1:] = inner_share < 1.0 - MAX_SUPERFICIAL_SHARE
        if units == "HU":  # fat and soft tissue are not lung, whatever their texture
            superficial[1:] |= median_sign(array, components, count, LUNG_MAX_MEDIAN_HU) > 0
        lungs &= ~superficial[components]
    if units == "HU" and lungs.any():
        lungs = in_slabs(_without_gas, lungs, array)
    kept = np.zeros(labels.shape, dtype=np.uint8)
    right, left = in_parallel(
        partial(_lung_sized, lungs & (labels == RIGHT_LUNG)),
        partial(_lung_sized, lungs & (labels == LEFT_LUNG)),
    )
    kept[right] = RIGHT_LUNG
    kept[left] = LEFT_LUNG
    out = np.zeros(shape, dtype=np.uint8)
    out[z_range][box] = kept
    return out


def _without_gas(lungs: BoolArray, hu: np.ndarray) -> BoolArray:
    """``lungs`` without its in-plane components of pure gas (median below ``LUNG_MIN_MEDIAN_HU``)."""
    components, count = ndimage.label(lungs, structure=INPLANE_8)
    gas = np.zeros(count + 1, dtype=bool)
    gas[1:] = median_sign(hu, components, count, LUNG_MIN_MEDIAN_HU) < 0
    return np.asarray(lungs & ~gas[components])


def _lung_sized(side: BoolArray) -> BoolArray:
    """The 3D components of one side holding at least ``SECOND_LUNG_MIN_FRACTION`` of its largest."""
    components, count = ndimage.label(side, structure=FACES_3D)
    if count == 0:
        return side
    sizes = np.bincount(components[side], minlength=count + 1)  # foreground only
    keep = sizes >= SECOND_LUNG_MIN_FRACTION * sizes.max()
    keep[0] = False
    return np.asarray(keep[components])


def _diamond_rows(radius_px: int) -> np.ndarray:
    """Half widths (px) of the in-plane diamond |dy| + |dx| <= ``radius_px``, for :func:`erode_rows`."""
    return radius_px - np.abs(np.arange(-radius_px, radius_px + 1))


def median_sign(values: np.ndarray, components: np.ndarray, count: int, threshold: float) -> np.ndarray:
    """(count,) sign (-1, 0, 1) of (median - ``threshold``) of ``values`` over each labelled
    component 1..count, the median as ``ndimage.median`` takes it (the mean of the two middle
    values, in the values' dtype).

    Counting the voxels below, at and above the threshold places the two middle values; only
    components whose middle values straddle the threshold are sorted for their mean.
    """
    inside = components > 0
    labelled, picked = components[inside], values[inside]
    sizes = np.bincount(labelled, minlength=count + 1)[1:]
    below = np.bincount(labelled[picked < threshold], minlength=count + 1)[1:]
    at = np.bincount(labelled[picked == threshold], minlength=count + 1)[1:]

    def side_of(position: np.ndarray) -> np.ndarray:  # where the sorted value at ``position`` lies
        return np.where(position < below, -1, np.where(position < below + at, 0, 1))

    low, high = side_of((sizes - 1) // 2), side_of(sizes // 2)
    sign = np.where(low == high, low, 0)
    straddle = np.flatnonzero(low != high) + 1
    if straddle.size:  # the mean of the middle values decides: sort these components' voxels only
        wanted = np.zeros(count + 1, dtype=bool)
        wanted[straddle] = True
        chosen = wanted[labelled]
        sub_labels, sub_values = labelled[chosen], picked[chosen]
        ordered = sub_values[np.lexsort((sub_values, sub_labels))]
        sub_sizes = sizes[straddle - 1]
        starts = np.cumsum(sub_sizes) - sub_sizes
        medians = (ordered[starts + (sub_sizes - 1) // 2] + ordered[starts + sub_sizes // 2]) / 2.0
        sign[straddle - 1] = np.sign(medians - values.dtype.type(threshold)).astype(sign.dtype)
    return np.asarray(sign)


def _true_range(flags: npt.ArrayLike) -> slice:
    """The slice from the first to the last True of 1D ``flags`` (which has at least one)."""
    where = np.flatnonzero(flags)
    return slice(int(where[0]), int(where[-1]) + 1)


def _hull_bites(
    side: BoolArray,
    other: BoolArray,
    spacing_yx_mm: tuple[float, float],
    mediastinum_rc: tuple[float, float] | None = None,
) -> BoolArray:
    """Concavities of one lung's per-slice convex hull that face away from the mediastinum.

    Dense subpleural lesions leave bites in the aerated lung against the chest
    wall; the chest wall is convex, so the hull closes them without reaching into
    it. Rejected: bites whose centre lies on the other lung's side of this lung's
    centre (the medial concavity: heart, hilum), bites within
    :data:`MEDIASTINUM_GUARD_MM` of the other lung, and enclosed holes that never
    reach the hull's edge (a diaphragm dome ringed by the lung base). On slices
    without the other lung the mediastinum is taken at ``mediastinum_rc`` (row,
    column; default the image centre).
    """
    hull = np.zeros(side.shape, dtype=bool)
    for z in np.flatnonzero(side.any(axis=(1, 2))):
        # the hull lies within the slice's bounding box: only that box is looked at
        rows, cols = _padded_box(side[z : z + 1], 0.0, (1.0, 1.0))
        hull[z, rows, cols] = convex_hull_2d(side[z, rows, cols])
    bites = hull & ~side
    if not bites.any():
        return bites
    labels, count = ndimage.label(bites, structure=INPLANE_4)
    _, height, width = side.shape
    # each bite's slice and mean row and column (a bite never leaves its slice)
    bite_plane, bite_rows, bite_cols = np.nonzero(labels)
    bite_labels = labels[bite_plane, bite_rows, bite_cols]
    sizes = np.bincount(bite_labels, minlength=count + 1)[1:]
    bite_z = np.zeros(count + 1, dtype=np.int64)
    bite_z[bite_labels] = bite_plane
    bite_z = bite_z[1:]
    bite_row = np.bincount(bite_labels, bite_rows.astype(np.float64), count + 1)[1:] / sizes
    bite_col = np.bincount(bite_labels, bite_cols.astype(np.float64), count + 1)[1:] / sizes
    _, side_row, side_col = slice_centroids(side)
    _, other_row, other_col = slice_centroids(other)
    centre_row, centre_col = mediastinum_rc or ((height - 1) / 2.0, (width - 1) / 2.0)
    other_row = np.where(np.isfinite(other_row), other_row, centre_row)
    other_col = np.where(np.isfinite(other_col), other_col, centre_col)
    towards_other = (bite_row - side_row[bite_z]) * (other_row[bite_z] - side_row[bite_z]) * spacing_yx_mm[
        0
    ] ** 2 + (bite_col - side_col[bite_z]) * (other_col[bite_z] - side_col[bite_z]) * spacing_yx_mm[1] ** 2
    rejected = np.ones(count + 1, dtype=bool)
    rejected[1:] = towards_other > 0
    hull_edge = hull & ~ndimage.binary_erosion(hull, structure=INPLANE_4)
    touches_edge = np.zeros(count + 1, dtype=bool)
    touches_edge[labels[hull_edge]] = True
    rejected |= ~touches_edge
    open_bites = labels * ~rejected[labels]
    if other.any() and open_bites.any():
        # the other lung's reach matters only at the open bites: dilate it inside their box (on the
        # slices that have one), padded by the guard, beyond which none of it can reach them
        with_bites = np.flatnonzero(open_bites.any(axis=(1, 2)))
        rows, cols = _padded_box(open_bites[with_bites] > 0, MEDIASTINUM_GUARD_MM, spacing_yx_mm)
        near_other = dilate_in_plane(other[with_bites, rows, cols], MEDIASTINUM_GUARD_MM, spacing_yx_mm)
        rejected[open_bites[with_bites, rows, cols][near_other]] = True
    rejected[0] = True
    return ~rejected[labels]


def _z_bridged(side: BoolArray, max_gap_mm: float, slice_mm: float) -> tuple[BoolArray, BoolArray]:
    """(pixels with this lung within ``max_gap_mm`` above and below, ... above or below).

    A closing along z, one (row, column) at a time: a dense lesion against the
    chest wall is a blob, so the aerated lung surrounds it above and below; the
    liver and spleen domes have lung only above them and stay out.
    """
    max_gap = max_gap_mm / slice_mm
    small = side.shape[0] + max_gap < 2**13  # int16 indices: half the memory traffic of int32
    index: type[np.signedinteger[Any]] = np.int16 if small else np.int64
    slice_index = np.arange(side.shape[0], dtype=index)[:, None, None]
    far = index(2**14 if small else 2**40)  # "no lung in that direction": beyond any gap
    last_at_or_below = np.maximum.accumulate(np.where(side, slice_index, -far), axis=0)
    next_at_or_above = np.minimum.accumulate(np.where(side, slice_index, far)[::-1], axis=0)[::-1]
    below_near = (slice_index - last_at_or_below) <= max_gap
    above_near = (next_at_or_above - slice_index) <= max_gap
    return below_near & above_near, below_near | above_near


def clean_lung_mask(
    labels: np.ndarray,
    spacing_mm: tuple[float, float, float],
    config: SegmentConfig,
    intensity: np.ndarray | None = None,
) -> LabelArray:
    """Shared last step of both segmenters, per side (1 right, 2 left).

    Drops components below ``min_lung_volume_ml`` (keeping each side's largest),
    fills holes per slice and closes with a disk of ``closing_radius_mm``. Dense
    lesions too wide for that closing (subpleural consolidation) are added back
    along z on volumes (:func:`_z_bridged`, gaps up to ``Z_BRIDGE_MM``) and, on
    single slice images, as convex-hull bites against the chest wall
    (:func:`_hull_bites`). Overlaps go to
    the side whose original label the voxel had, else to the nearer lung's side.
    ``intensity`` is accepted for symmetry with the U-Net path and not needed here.
    """
    del intensity
    labels = np.asarray(labels, dtype=np.uint8)
    out = np.zeros(labels.shape, dtype=np.uint8)
    if not labels.any():
        return out
    spacing_yx = (float(spacing_mm[1]), float(spacing_mm[2]))
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    pad_mm = config.closing_radius_mm + MEDIASTINUM_GUARD_MM
    n_slices, height, width = labels.shape
    # Nothing below reaches beyond the lungs' slices or further than pad_mm from their rows; all
    # columns stay (the midline fallback of split_by_midline is the image's centre column).
    crop = (_true_range(labels.any(axis=(1, 2))), _padded_box(labels > 0, pad_mm, spacing_yx)[0])
    labels = labels[crop]
    row_offset = crop[1].start
    right, left = in_parallel(
        partial(_largest_and_large, labels == RIGHT_LUNG, voxel_ml, config.min_lung_volume_ml),
        partial(_largest_and_large, labels == LEFT_LUNG, voxel_ml, config.min_lung_volume_ml),
    )
    centre_rc = ((height - 1) / 2.0 - row_offset, (width - 1) / 2.0)
    in_z = n_slices >= MIN_SLICES_FOR_Z_BRIDGING
    cleaned_right, cleaned_left = in_parallel(
        partial(_clean_side, right, left, spacing_mm, config, centre_rc, in_z),
        partial(_clean_side, left, right, spacing_mm, config, centre_rc, in_z),
    )
    result_crop = out[crop]
    both = cleaned_right & cleaned_left
    result_crop[cleaned_right] = RIGHT_LUNG
    result_crop[cleaned_left] = LEFT_LUNG
    if both.any():
        original = np.zeros(labels.shape, dtype=np.uint8)
        original[left] = LEFT_LUNG
        original[right] = RIGHT_LUNG
        nearest = split_by_midline(both, None, reference=original)
        result_crop[both] = np.where(original[both] > 0, original[both], nearest[both])
    return out


def _clean_side(
    side: BoolArray,
    other: BoolArray,
    spacing_mm: tuple[float, float, float],
    config: SegmentConfig,
    centre_rc: tuple[float, float],
    in_z: bool,
) -> BoolArray:
    """One lung of :func:`clean_lung_mask`, closed and with its bites; bridged along z when ``in_z``
    (a volume), else with its holes filled. ``centre_rc``: the image centre (row, column) on the
    grid of ``side``."""
    cleaned = np.zeros(side.shape, dtype=bool)
    if not side.any():
        return cleaned
    spacing_yx = (float(spacing_mm[1]), float(spacing_mm[2]))
    # work inside the side's bounding box (plus the reach of the morphology) and between its
    # first and last slice (nothing below grows a slice without lung): far less to transform
    pad_mm = config.closing_radius_mm + MEDIASTINUM_GUARD_MM
    window = (_true_range(side.any(axis=(1, 2))), *_padded_box(side, pad_mm, spacing_yx))
    side_crop, other_crop = side[window], other[window]
    centre_crop = (centre_rc[0] - window[1].start, centre_rc[1] - window[2].start)
    if in_z:
        # No 2D hole filling on volumes: the lung base rings the diaphragm dome in-plane.
        closed = close_in_plane(side_crop, config.closing_radius_mm, spacing_yx)
        bridged, near_in_z = _z_bridged(closed, Z_BRIDGE_MM, float(spacing_mm[0]))
        result = closed | bridged | (_hull_bites(closed, other_crop, spacing_yx, centre_crop) & near_in_z)
    else:
        closed = fill_holes_in_plane(
            close_in_plane(fill_holes_in_plane(side_crop), config.closing_radius_mm, spacing_yx)
        )
        result = closed | _hull_bites(closed, other_crop, spacing_yx, centre_crop)
    cleaned[window] = result
    return cleaned


def _padded_box(mask: BoolArray, pad_mm: float, spacing_yx_mm: tuple[float, float]) -> tuple[slice, slice]:
    """Row and column slices of the in-plane bounding box of ``mask``, padded by ``pad_mm``, clipped."""
    rows = np.flatnonzero(mask.any(axis=(0, 2)))
    cols = np.flatnonzero(mask.any(axis=(0, 1)))
    pad_y = int(np.ceil(pad_mm / spacing_yx_mm[0]))
    pad_x = int(np.ceil(pad_mm / spacing_yx_mm[1]))
    return (
        slice(max(0, rows[0] - pad_y), min(mask.shape[1], rows[-1] + 1 + pad_y)),
        slice(max(0, cols[0] - pad_x), min(mask.shape[2], cols[-1] + 1 + pad_x)),
    )


def _largest_and_large(mask: BoolArray, voxel_ml: float, min_volume_ml: float) -> BoolArray:
    """The largest 3D component plus any other of at least ``min_volume_ml``."""
    labels, count = ndimage.label(mask, structure=FACES_3D)
    if count <= 1:
        return mask
    volumes_ml = np.bincount(labels[mask], minlength=count + 1) * voxel_ml  # foreground only: [0] is 0
    keep = volumes_ml >= min_volume_ml
    keep[int(np.argmax(volumes_ml))] = True
    keep[0] = False
    return keep[labels]
