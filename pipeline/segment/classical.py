"""Classical segmenter (:func:`classical_lung_labels`), vectorised with scipy.ndimage:

1. low density: HU < ``lung_hu_threshold`` (windowed stacks: grey <
   ``lung_window_threshold``, i.e. the same threshold mapped through the window;
   8-bit slice images of unknown window still show lungs dark and the body bright).
2. outside air removed: per slice, low-density components touching the image's
   row/column border where the border makes up at least ``OUTSIDE_BORDER_SHARE``
   of their contact with tissue (air around the body, corner pockets of cropped
   images; a lung cut by a tight crop touches the border briefly and tissue
   everywhere else, vessels included), then in 3D the air connected to those
   (pockets sealed in one slice but open to the outside in another). Only air
   inside the body (the largest non-outside region of each slice, holes filled)
   is kept, which drops the table and its cavities.
3. airways removed: per slice, small air regions (< 1.2 % of the body area, i.e. the
   ~2.5 cm trachea of an adult) whose centre lies near the body centre are the
   trachea or main bronchi; above the lung apex they are all that is left, at
   the carina they would otherwise bridge the two lungs.
4. gas removed (HU only): 3D components whose median is below ``LUNG_MIN_MEDIAN_HU``
   (air between the back and the table, bowel gas) are not parenchyma.
5. lungs kept: the largest 3D component and a second one when it holds at least
   ``SECOND_LUNG_MIN_FRACTION`` of the first; both above ``min_lung_volume_ml``.
   A series where lung-like air never covers ``MIN_LUNG_BODY_FRACTION`` of the body
   area on any slice, or (HU only) whose kept air has a median below
   ``LUNG_MIN_MEDIAN_HU`` (pure gas, e.g. bowel) gets an empty mask and a warning.
6. sides split (:func:`split_sides`): two components by their centroid column;
   one joined component is eroded in-plane until it falls apart into two parts,
   which seed a watershed on the image intensity (the boundary follows the dense
   junction line); failing that, each voxel goes to its side of the body midline.
7. :func:`clean_lung_mask`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from corona_ct.pipeline.config import SegmentConfig
from corona_ct.pipeline.segment.cleanup import clean_lung_mask, median_sign
from corona_ct.pipeline.segment.regions import (
    FACES_3D,
    INPLANE_8,
    LUNG_MIN_MEDIAN_HU,
    SECOND_LUNG_MIN_FRACTION,
    BoolArray,
    LabelArray,
    body_mask,
    connected_to,
    low_density,
    outside_air,
    slice_centroids,
)
from corona_ct.pipeline.segment.sides import split_sides

#: Air regions smaller than this fraction of the body area, near the body centre, are airways.
AIRWAY_MAX_BODY_FRACTION = 0.012
#: ... "near": centre within this fraction of the body's equivalent diameter of the body centre.
AIRWAY_CENTRAL_FRACTION = 0.18
#: Some slice must have lungs covering this fraction of the body area (bowel gas stays below).
MIN_LUNG_BODY_FRACTION = 0.08


def classical_lung_labels(
    array: np.ndarray, units: str, spacing_mm: tuple[float, float, float], config: SegmentConfig
) -> LabelArray:
    """Threshold-and-morphology lung labels for a (z, y, x) HU or windowed array (see module doc)."""
    low = low_density(array, units, config)
    outside = outside_air(low)
    body = body_mask(~outside)
    candidates = low & body & ~outside
    # 3D: pockets sealed in one slice but open to the outside in another. A wall thin enough to
    # leak the lungs themselves to the outside would remove most candidates: keep the 2D result.
    sealed_3d = candidates & ~connected_to(low, outside)
    if sealed_3d.sum() >= 0.5 * candidates.sum():
        candidates = sealed_3d
    candidates &= ~airway_regions(candidates, body)
    if units == "HU":
        candidates &= ~pure_gas_regions(candidates, np.asarray(array))
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    lungs = keep_lung_components(candidates, voxel_ml, config.min_lung_volume_ml)
    if not lungs.any() or not _covers_body(lungs, body):
        return np.zeros(low.shape, dtype=np.uint8)
    if units == "HU" and float(np.median(np.asarray(array)[lungs])) < LUNG_MIN_MEDIAN_HU:
        return np.zeros(low.shape, dtype=np.uint8)  # pure air: bowel gas or air outside a cropped body
    labels = split_sides(lungs, np.asarray(array, dtype=np.float32), body)
    return clean_lung_mask(labels, spacing_mm, config, intensity=array)


def airway_regions(candidates: BoolArray, body: BoolArray) -> BoolArray:
    """Trachea and main bronchi: small in-plane air regions near the centre of the body.

    Relative to each slice's body (area and centroid), so it needs no pixel spacing
    and also works on slice images of unknown scale or orientation.
    """
    labels, count = ndimage.label(candidates, structure=INPLANE_8)
    if count == 0:
        return np.zeros(candidates.shape, dtype=bool)
    index = np.arange(1, count + 1)
    n_slices, height, width = candidates.shape
    area = ndimage.sum_labels(candidates, labels, index)

    def mean_along(axis_values: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
        return np.asarray(
            ndimage.mean(np.broadcast_to(axis_values.reshape(shape), labels.shape), labels, index)
        )

    comp_z = np.rint(mean_along(np.arange(n_slices), (n_slices, 1, 1))).astype(int)
    comp_y = mean_along(np.arange(height), (1, height, 1))
    comp_x = mean_along(np.arange(width), (1, 1, width))
    body_area, body_row, body_col = slice_centroids(body)
    diameter = np.sqrt(4.0 * body_area / np.pi)
    distance = np.hypot(comp_y - body_row[comp_z], comp_x - body_col[comp_z])
    is_airway = (area < AIRWAY_MAX_BODY_FRACTION * body_area[comp_z]) & (
        distance < AIRWAY_CENTRAL_FRACTION * diameter[comp_z]
    )
    lookup = np.zeros(count + 1, dtype=bool)
    lookup[1:] = is_airway
    return lookup[labels]


def pure_gas_regions(candidates: BoolArray, hu: np.ndarray) -> BoolArray:
    """3D components of ``candidates`` whose median is below ``LUNG_MIN_MEDIAN_HU``: gas, not lung.

    Air trapped between the patient's back and the table, or bowel gas, is enclosed
    like a lung but has no parenchyma; left in, it can outgrow a real lung and
    push it out of the two kept components.
    """
    labels, count = ndimage.label(candidates, structure=FACES_3D)
    if count == 0:
        return np.zeros(candidates.shape, dtype=bool)
    lookup = np.zeros(count + 1, dtype=bool)
    lookup[1:] = median_sign(hu, labels, count, LUNG_MIN_MEDIAN_HU) < 0
    return lookup[labels]


def keep_lung_components(candidates: BoolArray, voxel_ml: float, min_volume_ml: float) -> BoolArray:
    """The largest 3D component and the second largest when it is lung-sized too."""
    labels, count = ndimage.label(candidates, structure=FACES_3D)
    if count == 0:
        return np.zeros(candidates.shape, dtype=bool)
    volumes_ml = np.bincount(labels.ravel())[1:] * voxel_ml
    order = np.argsort(volumes_ml)[::-1]
    keep = np.zeros(count + 1, dtype=bool)
    largest = volumes_ml[order[0]]
    if largest < min_volume_ml:
        return np.zeros(candidates.shape, dtype=bool)
    keep[order[0] + 1] = True
    if count > 1:
        second = volumes_ml[order[1]]
        keep[order[1] + 1] = second >= min_volume_ml and second >= SECOND_LUNG_MIN_FRACTION * largest
    return keep[labels]


def _covers_body(lungs: BoolArray, body: BoolArray) -> bool:
    body_area = body.sum(axis=(1, 2))
    lung_area = lungs.sum(axis=(1, 2))
    fraction = np.divide(lung_area, body_area, out=np.zeros(len(body_area)), where=body_area > 0)
    return bool(fraction.max() >= MIN_LUNG_BODY_FRACTION)
