"""Right/left split of a lung mask: by components, by erosion + watershed, or by the body midline."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

from corona_ct.pipeline.datamodel import LEFT_LUNG, RIGHT_LUNG
from corona_ct.pipeline.morphology import INPLANE_4
from corona_ct.pipeline.segment.regions import (
    FACES_3D,
    SECOND_LUNG_MIN_FRACTION,
    BoolArray,
    LabelArray,
    slice_centroids,
)

#: In-plane erosion steps tried when the two lungs are joined (each step ≈ one pixel).
MAX_SPLIT_EROSIONS = 25


def split_sides(lungs: BoolArray, intensity: np.ndarray, body: BoolArray | None = None) -> LabelArray:
    """Label lung voxels 1 (right, low column index) or 2 (left); see the module doc."""
    labels, count = ndimage.label(lungs, structure=FACES_3D)
    parts = _two_largest(labels, count) if count >= 2 else _split_by_erosion(lungs, intensity)
    if parts is None:
        return split_by_midline(lungs, body)
    first, second = parts
    first_col = np.nonzero(first)[2].mean()
    second_col = np.nonzero(second)[2].mean()
    right, left = (first, second) if first_col <= second_col else (second, first)
    out = np.zeros(lungs.shape, dtype=np.uint8)
    out[right] = RIGHT_LUNG
    out[left] = LEFT_LUNG
    # voxels of smaller pieces follow the nearer of the two lungs
    rest = lungs & ~(right | left)
    if rest.any():
        out[rest] = split_by_midline(rest, None, reference=out)[rest]
    return out


def _two_largest(labels: np.ndarray, count: int) -> tuple[BoolArray, BoolArray]:
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    a, b = np.argsort(sizes)[::-1][:2]
    return labels == a, labels == b


def _split_by_erosion(lungs: BoolArray, intensity: np.ndarray) -> tuple[BoolArray, BoolArray] | None:
    """Erode in-plane until two comparable parts appear; watershed them back on the intensity."""
    eroded = lungs
    for _ in range(MAX_SPLIT_EROSIONS):
        eroded = ndimage.binary_erosion(eroded, structure=INPLANE_4)
        markers, count = ndimage.label(eroded, structure=FACES_3D)
        if count < 2:
            if not eroded.any():
                return None
            continue
        sizes = np.bincount(markers.ravel())
        sizes[0] = 0
        a, b = np.argsort(sizes)[::-1][:2]
        if sizes[b] < SECOND_LUNG_MIN_FRACTION * sizes[a]:
            continue
        seeds = np.where(markers == a, 1, 0) + np.where(markers == b, 2, 0)
        grown = watershed(np.asarray(intensity, dtype=np.float32), markers=seeds, mask=lungs)
        return grown == 1, grown == 2
    return None


def split_by_midline(
    lungs: BoolArray, body: BoolArray | None, reference: LabelArray | None = None
) -> LabelArray:
    """Each voxel to the side of a per-slice dividing column.

    The column is the midpoint between the two labelled lungs of ``reference``
    when given, else the body's centre column (else the image centre).
    """
    n_slices, _, width = lungs.shape
    centre = np.full(n_slices, (width - 1) / 2.0)
    if reference is not None:
        _, _, right_col = slice_centroids(reference == RIGHT_LUNG)
        _, _, left_col = slice_centroids(reference == LEFT_LUNG)
        mid = (right_col + left_col) / 2.0
        centre = np.where(np.isfinite(mid), mid, np.where(np.isfinite(right_col), right_col, left_col))
        centre = np.where(np.isfinite(centre), centre, (width - 1) / 2.0)
    elif body is not None:
        _, _, body_col = slice_centroids(body)
        centre = np.where(np.isfinite(body_col), body_col, centre)
    columns = np.arange(width)[None, None, :]
    side = np.where(columns <= centre[:, None, None], RIGHT_LUNG, LEFT_LUNG).astype(np.uint8)
    return np.where(lungs, side, 0).astype(np.uint8)
