"""Lung segmentation: a U-Net when weights are given, else a classical threshold segmenter.

Both paths end in :func:`clean_lung_mask`, so the two masks obey the same rules:
two lungs at most (right = label 1 at low column index, left = label 2), holes
filled per slice, and dense tissue inside or against the lung (vessels, ground
glass, consolidation, also subpleural) closed into the mask. The last point is
the one users care about: a lesion outside the lung mask is never counted.

Classical segmenter (:func:`classical_lung_labels`), vectorised with scipy.ndimage:

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

import dataclasses
import logging
import math

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage
from skimage.morphology import convex_hull_image
from skimage.segmentation import watershed

from corona_ct.pipeline.config import PipelineConfig, SegmentConfig, WindowConfig
from corona_ct.pipeline.datamodel import LEFT_LUNG, RIGHT_LUNG, Geometry, LungMask, Volume
from corona_ct.pipeline.errors import ModelError

log = logging.getLogger(__name__)

NO_LUNGS_WARNING = "no lungs found in this series"
#: Outside air: pixels on the image border ≥ this share of the pixels next to tissue.
OUTSIDE_BORDER_SHARE = 0.5
#: A second component is the other lung only if it holds this fraction of the first's volume.
SECOND_LUNG_MIN_FRACTION = 0.1
#: Air regions smaller than this fraction of the body area, near the body centre, are airways.
AIRWAY_MAX_BODY_FRACTION = 0.012
#: ... "near": centre within this fraction of the body's equivalent diameter of the body centre.
AIRWAY_CENTRAL_FRACTION = 0.18
#: Some slice must have lungs covering this fraction of the body area (bowel gas stays below).
MIN_LUNG_BODY_FRACTION = 0.08
#: Aerated lung (parenchyma with vessels) has a median near −850 HU; gas alone is near −1000 HU.
LUNG_MIN_MEDIAN_HU = -960.0
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
#: Slice step (mm) used to keep distance transforms in-plane.
_FAR_MM = 1.0e6
#: In-plane erosion steps tried when the two lungs are joined (each step ≈ one pixel).
MAX_SPLIT_EROSIONS = 25

BoolArray = npt.NDArray[np.bool_]
LabelArray = npt.NDArray[np.uint8]

# 2D neighbourhoods applied to every slice of a (z, y, x) array at once: no z-links.
_INPLANE_4 = np.zeros((3, 3, 3), dtype=bool)
_INPLANE_4[1] = ndimage.generate_binary_structure(2, 1)
_INPLANE_8 = np.zeros((3, 3, 3), dtype=bool)
_INPLANE_8[1] = True
_FACES_3D = ndimage.generate_binary_structure(3, 1)


def segment_lungs(
    volume: Volume,
    seg_config: SegmentConfig,
    window_config: WindowConfig,
    model: torch.nn.Module | None = None,
    device: str = "cpu",
    input_size: int | None = None,
) -> LungMask:
    """Lung labels (0 background, 1 right, 2 left) on the grid of ``volume``.

    With ``model`` (a U-Net from :mod:`models.segmenter`, fed slices resized to
    ``input_size`` px, its card's input size) the network segments, else the classical segmenter runs; ``LungMask.method`` says which. Works on HU
    volumes and on pre-windowed slice stacks. An empty mask carries the warning
    :data:`NO_LUNGS_WARNING`.
    """
    spacing_mm = volume.geometry.spacing_mm
    if model is not None:
        # torch model code stays out of the classical path
        from corona_ct.models.segmenter import SEGMENTER_INPUT, is_binary_unet, predict_lung_labels
        from corona_ct.pipeline.preprocess import window

        windowed = window(volume.array, volume.units, window_config)
        size = input_size or SEGMENTER_INPUT.input_size
        raw = predict_lung_labels(model, windowed, seg_config.batch_size, device, input_size=size)
        if is_binary_unet(model) and raw.any():  # lung/background U-Net: sides as in the classical path
            raw = split_sides(raw > 0, windowed)
        rim_px = math.ceil(max(volume.array.shape[1:]) / size)
        low = low_density(volume.array, volume.units, seg_config)
        raw = trim_dense_rim(raw, low, rim_px)
        raw = keep_plausible_lung(raw, volume.array, volume.units, spacing_mm, low)
        labels = clean_lung_mask(raw, spacing_mm, seg_config, intensity=volume.array)
        method = "unet"
    elif seg_config.method == "unet":
        raise ModelError(
            f"{volume.source}: segment.method is 'unet' but no segmentation weights were given; "
            "pass --seg-weights or set segment.method=classical"
        )
    else:
        labels = classical_lung_labels(volume.array, volume.units, spacing_mm, seg_config)
        method = "classical"
    warnings: tuple[str, ...] = ()
    if not labels.any():
        log.warning("study %s: %s", volume.study_id, NO_LUNGS_WARNING)
        warnings = (NO_LUNGS_WARNING,)
    return LungMask(labels=labels, method=method, warnings=warnings)


def slice_lungs(image: np.ndarray, units: str, config: PipelineConfig, source: str = "slice") -> BoolArray:
    """Classical lungs of ONE 2D slice image (y, x) → (1, y, x) bool (see :func:`slice_lung_labels`)."""
    return np.asarray(slice_lung_labels(image, units, config, source) > 0)


def slice_lung_labels(
    image: np.ndarray,
    units: str,
    config: PipelineConfig,
    source: str = "slice",
    model: torch.nn.Module | None = None,
    device: str = "cpu",
    input_size: int | None = None,
) -> npt.NDArray[np.uint8]:
    """Lung labels of ONE 2D slice image (y, x) → (1, y, x) uint8 (0 bg, 1 right, 2 left).

    Classical unless a U-Net ``model`` is given (see :func:`segment_lungs`). A lone
    slice has no physical spacing (nominal 1 mm voxels) and no depth, so the
    segmenter's minimum lung *volume* would drop every lung; the ROI stage's per-slice
    minimum lung area (scaled to this image size) is used instead, as nominal ml.
    The classical form crops slice images for training (and for ``explain`` without a U-Net).
    """
    from corona_ct.pipeline.preprocess import min_lung_pixels_for

    height, width = image.shape
    volume = Volume(
        array=np.ascontiguousarray(image[None], dtype=np.float32),
        units="HU" if units == "HU" else "window",
        geometry=Geometry((1, height, width), (1.0, 1.0, 1.0)),
        study_id="slice",
        source=source,
        spacing_known=False,
    )
    min_pixels = min_lung_pixels_for((height, width), config.roi)
    slice_config = dataclasses.replace(
        config.segment,
        method="classical" if model is None else "unet",
        min_lung_volume_ml=min_pixels * 1e-3,
    )
    mask = segment_lungs(volume, slice_config, config.window, model, device, input_size)
    return np.asarray(mask.labels, dtype=np.uint8)


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
    in_plane = np.zeros((1, 3, 3), dtype=bool)
    in_plane[0] = ndimage.generate_binary_structure(2, 1)
    core = ndimage.binary_erosion(lungs, structure=in_plane, iterations=rim_px)
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
    # The body without what lies against it: a foam pad or table cavity between back and table is
    # low-density and enclosed, so the broad body (dense tissue and enclosed air) takes it in.
    # The dense outline alone excludes it, unless a crop opens the chest wall (then the broad one).
    body = body_mask(~low)
    broad_body = body_mask(~outside_air(low))
    if np.count_nonzero(lungs & body) < 0.8 * np.count_nonzero(lungs & broad_body):
        body = broad_body
    lungs &= body
    wall_px = max(1, math.ceil(CHEST_WALL_MM / min(spacing_mm[1:])))
    inner = ndimage.binary_erosion(body, structure=_INPLANE_4, iterations=wall_px)
    components, count = ndimage.label(lungs, structure=_FACES_3D)
    if count:
        index = np.arange(1, count + 1)
        inner_share = np.asarray(ndimage.mean(inner, components, index))
        superficial = np.zeros(count + 1, dtype=bool)
        superficial[1:] = inner_share < 1.0 - MAX_SUPERFICIAL_SHARE
        if units == "HU":  # fat and soft tissue are not lung, whatever their texture
            medians = np.asarray(ndimage.median(array, components, index))
            superficial[1:] |= medians > LUNG_MAX_MEDIAN_HU
        lungs &= ~superficial[components]
    if units == "HU" and lungs.any():
        components, count = ndimage.label(lungs, structure=_INPLANE_8)
        medians = np.asarray(ndimage.median(array, components, np.arange(1, count + 1)))
        gas = np.zeros(count + 1, dtype=bool)
        gas[1:] = medians < LUNG_MIN_MEDIAN_HU
        lungs &= ~gas[components]
    kept = np.zeros(labels.shape, dtype=np.uint8)
    for side in (RIGHT_LUNG, LEFT_LUNG):
        components, count = ndimage.label(lungs & (labels == side), structure=_FACES_3D)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        keep = sizes >= SECOND_LUNG_MIN_FRACTION * sizes.max()
        keep[0] = False
        kept[keep[components]] = side
    return kept


def low_density(array: np.ndarray, units: str, config: SegmentConfig) -> BoolArray:
    """Air and aerated lung: below the lung threshold in HU or in windowed grey values."""
    threshold = config.lung_hu_threshold if units == "HU" else config.lung_window_threshold
    return np.asarray(array < threshold)


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
    sealed_3d = candidates & ~_connected_to(low, outside)
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


def body_mask(dense: BoolArray) -> BoolArray:
    """Per slice: the largest in-plane component of dense tissue with its holes filled."""
    labels, count = ndimage.label(dense, structure=_INPLANE_8)
    if count == 0:
        return np.zeros(dense.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    # slice of each component: components never cross slices with an in-plane structure
    first_index = np.zeros(count + 1, dtype=np.int64)
    flat = labels.ravel()
    order = np.flatnonzero(flat)
    first_index[flat[order[::-1]]] = order[::-1]
    component_slice = first_index // (dense.shape[1] * dense.shape[2])
    # per slice the label with the largest size: sort by (slice, size) and take the last per slice
    ids = np.arange(1, count + 1)
    by_slice = np.lexsort((sizes[ids], component_slice[ids]))
    slices_sorted = component_slice[ids][by_slice]
    last_per_slice = np.r_[slices_sorted[1:] != slices_sorted[:-1], True]
    keep = np.zeros(count + 1, dtype=bool)
    keep[ids[by_slice][last_per_slice]] = True
    return fill_holes_2d(keep[labels])


def fill_holes_2d(mask: BoolArray) -> BoolArray:
    """Fill holes slice by slice (an in-plane structure never links slices)."""
    return np.asarray(ndimage.binary_fill_holes(mask, structure=_INPLANE_4))


def outside_air(low: BoolArray) -> BoolArray:
    """Per slice: low-density components whose outline lies largely on the image border.

    Border share = (pixels on the row/column border) / (pixels next to tissue).
    """
    labels, count = ndimage.label(low, structure=_INPLANE_8)
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
    next_to_tissue = low & ndimage.binary_dilation(~low, structure=_INPLANE_8)
    tissue_px = np.bincount(labels[next_to_tissue], minlength=count + 1).astype(np.float64)
    is_outside = (border_px > 0) & (border_px >= OUTSIDE_BORDER_SHARE * tissue_px)
    is_outside[0] = False
    return is_outside[labels]


def _connected_to(mask: BoolArray, seeds: BoolArray) -> BoolArray:
    """3D components of ``mask`` (face connectivity) that contain a seed voxel."""
    labels, count = ndimage.label(mask, structure=_FACES_3D)
    hit = np.zeros(count + 1, dtype=bool)
    hit[labels[seeds & mask]] = True
    hit[0] = False
    return hit[labels]


def _slice_centroids(mask: BoolArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per slice: pixel count, mean row and mean column of ``mask`` (NaN where empty)."""
    area = mask.sum(axis=(1, 2)).astype(np.float64)
    rows = np.arange(mask.shape[1], dtype=np.float64)
    cols = np.arange(mask.shape[2], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_row = (mask.sum(axis=2) * rows).sum(axis=1) / area
        mean_col = (mask.sum(axis=1) * cols).sum(axis=1) / area
    return area, mean_row, mean_col


def airway_regions(candidates: BoolArray, body: BoolArray) -> BoolArray:
    """Trachea and main bronchi: small in-plane air regions near the centre of the body.

    Relative to each slice's body (area and centroid), so it needs no pixel spacing
    and also works on slice images of unknown scale or orientation.
    """
    labels, count = ndimage.label(candidates, structure=_INPLANE_8)
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
    body_area, body_row, body_col = _slice_centroids(body)
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
    labels, count = ndimage.label(candidates, structure=_FACES_3D)
    if count == 0:
        return np.zeros(candidates.shape, dtype=bool)
    medians = np.asarray(ndimage.median(hu, labels, np.arange(1, count + 1)))
    lookup = np.zeros(count + 1, dtype=bool)
    lookup[1:] = medians < LUNG_MIN_MEDIAN_HU
    return lookup[labels]


def keep_lung_components(candidates: BoolArray, voxel_ml: float, min_volume_ml: float) -> BoolArray:
    """The largest 3D component and the second largest when it is lung-sized too."""
    labels, count = ndimage.label(candidates, structure=_FACES_3D)
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


def split_sides(lungs: BoolArray, intensity: np.ndarray, body: BoolArray | None = None) -> LabelArray:
    """Label lung voxels 1 (right, low column index) or 2 (left); see the module doc."""
    labels, count = ndimage.label(lungs, structure=_FACES_3D)
    parts = _two_largest(labels, count) if count >= 2 else _split_by_erosion(lungs, intensity)
    if parts is None:
        return _split_by_midline(lungs, body)
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
        out[rest] = _split_by_midline(rest, None, reference=out)[rest]
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
        eroded = ndimage.binary_erosion(eroded, structure=_INPLANE_4)
        markers, count = ndimage.label(eroded, structure=_FACES_3D)
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


def _split_by_midline(
    lungs: BoolArray, body: BoolArray | None, reference: LabelArray | None = None
) -> LabelArray:
    """Each voxel to the side of a per-slice dividing column.

    The column is the midpoint between the two labelled lungs of ``reference``
    when given, else the body's centre column (else the image centre).
    """
    n_slices, _, width = lungs.shape
    centre = np.full(n_slices, (width - 1) / 2.0)
    if reference is not None:
        _, _, right_col = _slice_centroids(reference == RIGHT_LUNG)
        _, _, left_col = _slice_centroids(reference == LEFT_LUNG)
        mid = (right_col + left_col) / 2.0
        centre = np.where(np.isfinite(mid), mid, np.where(np.isfinite(right_col), right_col, left_col))
        centre = np.where(np.isfinite(centre), centre, (width - 1) / 2.0)
    elif body is not None:
        _, _, body_col = _slice_centroids(body)
        centre = np.where(np.isfinite(body_col), body_col, centre)
    columns = np.arange(width)[None, None, :]
    side = np.where(columns <= centre[:, None, None], RIGHT_LUNG, LEFT_LUNG).astype(np.uint8)
    return np.where(lungs, side, 0).astype(np.uint8)


def _inplane_distance_mm(mask: BoolArray, spacing_yx_mm: tuple[float, float]) -> np.ndarray:
    """Per slice: distance (mm) from each pixel to the nearest ``mask`` pixel of the same slice.

    One 3D Euclidean distance transform whose slice step is so large that the
    nearest pixel is always found in-plane (slices without any ``mask`` pixel get
    a distance ≥ ``_FAR_MM``). Linear time, unlike a dilation with a large disk.
    """
    return np.asarray(
        ndimage.distance_transform_edt(~mask, sampling=(_FAR_MM, spacing_yx_mm[0], spacing_yx_mm[1]))
    )


def _closing_2d(mask: BoolArray, radius_mm: float, spacing_yx_mm: tuple[float, float]) -> BoolArray:
    """Binary closing per slice with a disk of ``radius_mm``, computed with distance transforms.

    Padded so that the image border does not erode the result.
    """
    pad_y = int(np.ceil(radius_mm / spacing_yx_mm[0])) + 1
    pad_x = int(np.ceil(radius_mm / spacing_yx_mm[1])) + 1
    padded = np.pad(mask, ((0, 0), (pad_y, pad_y), (pad_x, pad_x)))
    dilated = _inplane_distance_mm(padded, spacing_yx_mm) <= radius_mm
    closed = _inplane_distance_mm(~dilated, spacing_yx_mm) > radius_mm
    return closed[:, pad_y:-pad_y, pad_x:-pad_x]


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
    for z in np.flatnonzero(side.any(axis=(1, 2))):  # per slice: skimage's hull is 2D
        hull[z] = convex_hull_image(side[z])
    bites = hull & ~side
    if not bites.any():
        return bites
    labels, count = ndimage.label(bites, structure=_INPLANE_4)
    index = np.arange(1, count + 1)
    n_slices, height, width = side.shape
    rows = np.broadcast_to(np.arange(height, dtype=np.float64)[None, :, None], side.shape)
    cols = np.broadcast_to(np.arange(width, dtype=np.float64)[None, None, :], side.shape)
    planes = np.broadcast_to(np.arange(n_slices)[:, None, None], side.shape)
    bite_z = np.asarray(ndimage.minimum(planes, labels, index)).astype(int)
    bite_row = np.asarray(ndimage.mean(rows, labels, index))
    bite_col = np.asarray(ndimage.mean(cols, labels, index))
    _, side_row, side_col = _slice_centroids(side)
    _, other_row, other_col = _slice_centroids(other)
    centre_row, centre_col = mediastinum_rc or ((height - 1) / 2.0, (width - 1) / 2.0)
    other_row = np.where(np.isfinite(other_row), other_row, centre_row)
    other_col = np.where(np.isfinite(other_col), other_col, centre_col)
    towards_other = (bite_row - side_row[bite_z]) * (other_row[bite_z] - side_row[bite_z]) * spacing_yx_mm[
        0
    ] ** 2 + (bite_col - side_col[bite_z]) * (other_col[bite_z] - side_col[bite_z]) * spacing_yx_mm[1] ** 2
    rejected = np.ones(count + 1, dtype=bool)
    rejected[1:] = towards_other > 0
    hull_edge = hull & ~ndimage.binary_erosion(hull, structure=_INPLANE_4)
    touches_edge = np.zeros(count + 1, dtype=bool)
    touches_edge[labels[hull_edge]] = True
    rejected |= ~touches_edge
    if other.any():
        near_other = _inplane_distance_mm(other, spacing_yx_mm) <= MEDIASTINUM_GUARD_MM
        rejected[labels[near_other]] = True
    rejected[0] = True
    return ~rejected[labels]


def _z_bridged(side: BoolArray, max_gap_mm: float, slice_mm: float, both_sides: bool = True) -> BoolArray:
    """Pixels with this lung within ``max_gap_mm`` above and below (``both_sides=False``: above or below).

    A closing along z, one (row, column) at a time: a dense lesion against the
    chest wall is a blob, so the aerated lung surrounds it above and below; the
    liver and spleen domes have lung only above them and stay out.
    """
    slice_index = np.arange(side.shape[0], dtype=np.float64)[:, None, None]
    last_at_or_below = np.maximum.accumulate(np.where(side, slice_index, -np.inf), axis=0)
    next_at_or_above = np.minimum.accumulate(np.where(side, slice_index, np.inf)[::-1], axis=0)[::-1]
    max_gap = max_gap_mm / slice_mm
    below_near = (slice_index - last_at_or_below) <= max_gap
    above_near = (next_at_or_above - slice_index) <= max_gap
    return below_near & above_near if both_sides else below_near | above_near


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
    spacing_yx = (float(spacing_mm[1]), float(spacing_mm[2]))
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    sides = {}
    for value in (RIGHT_LUNG, LEFT_LUNG):
        side = _largest_and_large(labels == value, voxel_ml, config.min_lung_volume_ml)
        sides[value] = side
    cleaned = {}
    pad_mm = config.closing_radius_mm + MEDIASTINUM_GUARD_MM
    for value, other_value in ((RIGHT_LUNG, LEFT_LUNG), (LEFT_LUNG, RIGHT_LUNG)):
        side = sides[value]
        cleaned[value] = np.zeros(labels.shape, dtype=bool)
        if not side.any():
            continue
        # work inside the side's bounding box (plus the reach of the morphology): far less to transform
        window_yx = _padded_box(side, pad_mm, spacing_yx)
        side_crop, other_crop = (
            side[:, window_yx[0], window_yx[1]],
            sides[other_value][:, window_yx[0], window_yx[1]],
        )
        centre_rc = (
            (labels.shape[1] - 1) / 2.0 - window_yx[0].start,
            (labels.shape[2] - 1) / 2.0 - window_yx[1].start,
        )
        if side.shape[0] >= MIN_SLICES_FOR_Z_BRIDGING:
            # No 2D hole filling on volumes: the lung base rings the diaphragm dome in-plane.
            closed = _closing_2d(side_crop, config.closing_radius_mm, spacing_yx)
            near_in_z = _z_bridged(closed, Z_BRIDGE_MM, float(spacing_mm[0]), both_sides=False)
            bites = _hull_bites(closed, other_crop, spacing_yx, centre_rc) & near_in_z
            result = closed | _z_bridged(closed, Z_BRIDGE_MM, float(spacing_mm[0])) | bites
        else:
            closed = fill_holes_2d(
                _closing_2d(fill_holes_2d(side_crop), config.closing_radius_mm, spacing_yx)
            )
            result = closed | _hull_bites(closed, other_crop, spacing_yx, centre_rc)
        cleaned[value][:, window_yx[0], window_yx[1]] = result
    out = np.zeros(labels.shape, dtype=np.uint8)
    both = cleaned[RIGHT_LUNG] & cleaned[LEFT_LUNG]
    out[cleaned[RIGHT_LUNG]] = RIGHT_LUNG
    out[cleaned[LEFT_LUNG]] = LEFT_LUNG
    if both.any():
        original = np.where(sides[RIGHT_LUNG], RIGHT_LUNG, np.where(sides[LEFT_LUNG], LEFT_LUNG, 0))
        nearest = _split_by_midline(both, None, reference=original.astype(np.uint8))
        out[both] = np.where(original[both] > 0, original[both], nearest[both])
    return out


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
    labels, count = ndimage.label(mask, structure=_FACES_3D)
    if count <= 1:
        return mask
    volumes_ml = np.bincount(labels.ravel()) * voxel_ml
    volumes_ml[0] = 0.0
    keep = volumes_ml >= min_volume_ml
    keep[int(np.argmax(volumes_ml))] = True
    keep[0] = False
    return keep[labels]
