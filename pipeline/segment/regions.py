"""Body, outside air and connectivity on CT stacks: the primitives both lung segmenters share."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from corona_ct.pipeline.config import SegmentConfig
from corona_ct.pipeline.morphology import fill_holes_in_plane, in_slabs

#: Outside air: pixels on the image border ≥ this share of the pixels next to tissue.
OUTSIDE_BORDER_SHARE = 0.5
#: A second component is the other lung only if it holds this fraction of the first's volume.
SECOND_LUNG_MIN_FRACTION = 0.1
#: Aerated lung (parenchyma with vessels) has a median near −850 HU; gas alone is near −1000 HU.
LUNG_MIN_MEDIAN_HU = -960.0
BoolArray = npt.NDArray[np.bool_]
LabelArray = npt.NDArray[np.uint8]
# 2D neighbourhoods applied to every slice of a (z, y, x) array at once: no z-links (INPLANE_4 is in
# pipeline.morphology).
INPLANE_8 = np.zeros((3, 3, 3), dtype=bool)
INPLANE_8[1] = True
FACES_3D = ndimage.generate_binary_structure(3, 1)


def low_density(array: np.ndarray, units: str, config: SegmentConfig) -> BoolArray:
    """Air and aerated lung: below the lung threshold in HU or in windowed grey values."""
    threshold = config.lung_hu_threshold if units == "HU" else config.lung_window_threshold
    return np.asarray(array < threshold)


def body_mask(dense: BoolArray) -> BoolArray:
    """Per slice: the largest in-plane component of dense tissue with its holes filled."""
    return in_slabs(_body_mask, np.asarray(dense, dtype=bool))


def _body_mask(dense: BoolArray) -> BoolArray:
    labels, count = ndimage.label(dense, structure=INPLANE_8)
    if count == 0:
        return np.zeros(dense.shape, dtype=bool)
    sizes = np.bincount(labels[dense], minlength=count + 1)  # foreground only: no background count
    # slice of each component: with an in-plane structure a component never crosses slices, and
    # ndimage.label numbers components in scan order, so slice z holds the labels up to its maximum
    last_label = np.maximum.accumulate(labels.reshape(labels.shape[0], -1).max(axis=1))
    component_slice = np.zeros(count + 1, dtype=np.int64)
    component_slice[1:] = np.searchsorted(last_label, np.arange(1, count + 1))
    # per slice the label with the largest size: sort by (slice, size) and take the last per slice
    ids = np.arange(1, count + 1)
    by_slice = np.lexsort((sizes[ids], component_slice[ids]))
    slices_sorted = component_slice[ids][by_slice]
    last_per_slice = np.r_[slices_sorted[1:] != slices_sorted[:-1], True]
    keep = np.zeros(count + 1, dtype=bool)
    keep[ids[by_slice][last_per_slice]] = True
    return fill_holes_in_plane(keep[labels])


def outside_air(low: BoolArray) -> BoolArray:
    """Per slice: low-density components whose outline lies largely on the image border.

    Border share = (pixels on the row/column border) / (pixels next to tissue).
    """
    return in_slabs(_outside_air, np.asarray(low, dtype=bool))


def _outside_air(low: BoolArray) -> BoolArray:
    labels, count = ndimage.label(low, structure=INPLANE_8)
    if count == 0:
        return np.zeros(low.shape, dtype=bool)
    edge = np.concatenate(
        [
            labels[:, 0, 1:-1].ravel(),
            labels[:, -1, 1:-1].ravel(),
            labels[:, :, 0].ravel(),
            labels[:, :, -1].ravel(),
        ]
    )
    border_px = np.bincount(edge, minlength=count + 1).astype(np.float64)
    next_to_tissue = low & ndimage.binary_dilation(~low, structure=INPLANE_8)
    tissue_px = np.bincount(labels[next_to_tissue], minlength=count + 1).astype(np.float64)
    is_outside = (border_px > 0) & (border_px >= OUTSIDE_BORDER_SHARE * tissue_px)
    is_outside[0] = False
    return is_outside[labels]


def connected_to(mask: BoolArray, seeds: BoolArray) -> BoolArray:
    """3D components of ``mask`` (face connectivity) that contain a seed voxel."""
    labels, count = ndimage.label(mask, structure=FACES_3D)
    hit = np.zeros(count + 1, dtype=bool)
    hit[labels[seeds & mask]] = True
    hit[0] = False
    return hit[labels]


def slice_centroids(mask: BoolArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per slice: pixel count, mean row and mean column of ``mask`` (NaN where empty)."""
    area = mask.sum(axis=(1, 2)).astype(np.float64)
    rows = np.arange(mask.shape[1], dtype=np.float64)
    cols = np.arange(mask.shape[2], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_row = (mask.sum(axis=2) * rows).sum(axis=1) / area
        mean_col = (mask.sum(axis=1) * cols).sum(axis=1) / area
    return area, mean_row, mean_col
