"""Severity in physical units: the Corona score (cm³), lung volumes and the HU measures per lung.

Corona score (Gozes et al. 2020): over the slices classified positive, the sum of
the fused Grad-CAM activation where it exceeds a threshold, times the voxel
volume::

    score_cm3 = Σ_{z positive} Σ_{y,x} cam[z,y,x] · 1(cam[z,y,x] > t) · voxel_mm3 / 1000

It is an activation-weighted volume: a voxel with cam 0.8 contributes 0.8 voxel.
``affected_percent`` = Corona score inside the lungs / lung volume × 100, so it
shares that weighting. Without lungs (volume 0) every percentage is 0.0 and the
study runner reports "no lungs"; no measure is ever NaN or None for that reason.

The HU measures beside it (ground glass, consolidation) are :mod:`pipeline.hu_maps`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.datamodel import (
    LEFT_LUNG,
    RIGHT_LUNG,
    CamStack,
    LungMask,
    Severity,
    SideSeverity,
    SliceScores,
    Volume,
)
from corona_ct.pipeline.errors import GeometryError
from corona_ct.pipeline.hu_maps import hu_maps, percent_of

BoolArray = npt.NDArray[np.bool_]


def positive_slices(scores: SliceScores, threshold: float) -> BoolArray:
    """(z,) slices the Corona score counts: evaluated, with probability >= ``threshold``."""
    with np.errstate(invalid="ignore"):  # NaN probabilities of unevaluated slices compare False
        return np.asarray(scores.evaluated & (scores.probs >= threshold))


def counted_region(
    cam_maps: np.ndarray, positive: np.ndarray, threshold: float = 0.6, within: np.ndarray | None = None
) -> BoolArray:
    """(z, y, x) voxels the Corona score counts: map > ``threshold`` on ``positive`` slices, inside ``within``.

    ``cam_maps`` (z, y, x) in [0, 1]; ``positive`` (z,) bool; ``within`` (bool, (z, y, x))
    restricts the region to a mask, e.g. the lungs (the opacity segment of ``--dicom-out``).
    """
    raw = np.asarray(cam_maps)
    positive = np.asarray(positive, dtype=bool)
    if raw.ndim != 3 or positive.shape != raw.shape[:1]:
        raise GeometryError(
            f"corona_score: maps {raw.shape} and positive-slice flags {positive.shape} do not match"
        )
    # compare in the maps' own precision: float32 0.6 must not count as "> 0.6"
    region = raw > (raw.dtype.type(threshold) if np.issubdtype(raw.dtype, np.floating) else threshold)
    region &= positive[:, None, None]
    if within is not None:
        within = np.asarray(within, dtype=bool)
        if within.shape != raw.shape:
            raise GeometryError(f"corona_score: mask {within.shape} differs from the maps {raw.shape}")
        region &= within
    return np.asarray(region)


def corona_score(
    cam_maps: np.ndarray,
    positive: np.ndarray,
    voxel_volume_mm3: float,
    threshold: float,
    within: np.ndarray | None = None,
) -> float:
    """Corona score in cm³ of (z, y, x) CAM maps in [0, 1] over the (z,) ``positive`` slices:
    the sum of map values above ``threshold`` (``cam.activation_threshold``) times the voxel volume.

    ``within`` (bool, (z, y, x)) restricts the sum to a mask, e.g. the lungs.
    """
    region = counted_region(cam_maps, positive, threshold, within)
    # summed in float64 over the counted voxels only (no float64 copy of the whole volume)
    counted = np.sum(np.asarray(cam_maps)[region], dtype=np.float64)
    return float(counted * voxel_volume_mm3 / 1000.0)


def severity(
    volume: Volume, lung_mask: LungMask, cams: CamStack, scores: SliceScores, config: PipelineConfig
) -> Severity:
    """All severity measures of one study (see the module doc for definitions and units)."""
    shape = volume.array.shape
    if lung_mask.labels.shape != shape or cams.maps.shape != shape or scores.probs.shape != shape[:1]:
        raise GeometryError(
            f"{volume.source}: severity needs the volume {shape}, lung mask {lung_mask.labels.shape}, "
            f"CAM maps {cams.maps.shape} and slice scores {scores.probs.shape} on one grid"
        )
    positive = positive_slices(scores, config.classify.positive_threshold)
    voxel_mm3 = volume.geometry.voxel_volume_mm3
    labels = lung_mask.labels
    # the voxels the Corona score counts, found once and split by label (0 outside the lungs, 1 right, 2 left)
    counted = counted_region(cams.maps, positive, config.cam.activation_threshold)
    counted_maps = cams.maps[counted].astype(np.float64)
    cm3 = voxel_mm3 / 1000.0
    score_cm3 = np.bincount(labels[counted], counted_maps, minlength=3)[:3] * cm3
    lung_cm3 = np.array([0.0, *(np.count_nonzero(labels == side) for side in (RIGHT_LUNG, LEFT_LUNG))]) * cm3
    maps = (
        hu_maps(volume.hu, lung_mask.lungs, volume.geometry.spacing_mm, config.severity)
        if volume.units == "HU"
        else None
    )
    hu_percent = maps.percent_by_label(labels) if maps is not None else None

    def side(label: int) -> SideSeverity:
        ggo_side, consolidation_side = hu_percent[label] if hu_percent is not None else (None, None)
        return SideSeverity(
            lung_volume_cm3=float(lung_cm3[label]),
            corona_score_cm3=float(score_cm3[label]),
            affected_percent=percent_of(float(score_cm3[label]), float(lung_cm3[label])),
            ggo_percent=ggo_side,
            consolidation_percent=consolidation_side,
        )

    in_lung = float(score_cm3[RIGHT_LUNG] + score_cm3[LEFT_LUNG])
    lungs_cm3 = float(lung_cm3[RIGHT_LUNG] + lung_cm3[LEFT_LUNG])
    ggo, consolidation = hu_percent[0] if hu_percent is not None else (None, None)
    return Severity(
        corona_score_cm3=float(np.sum(counted_maps) * cm3),
        corona_score_in_lung_cm3=in_lung,
        lung_volume_cm3=lungs_cm3,
        affected_percent=percent_of(in_lung, lungs_cm3),
        right=side(RIGHT_LUNG),
        left=side(LEFT_LUNG),
        ggo_percent=ggo,
        consolidation_percent=consolidation,
        positive_slices=int(np.count_nonzero(positive)),
    )
