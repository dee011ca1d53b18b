"""Severity in physical units: the Corona score (cm³) and weights-free HU measures.

Corona score (Gozes et al. 2020): over the slices classified positive, the sum of
the fused Grad-CAM activation where it exceeds a threshold, times the voxel
volume::

    score_cm3 = Σ_{z positive} Σ_{y,x} cam[z,y,x] · 1(cam[z,y,x] > t) · voxel_mm3 / 1000

It is an activation-weighted volume: a voxel with cam 0.8 contributes 0.8 voxel.
``affected_percent`` = Corona score inside the lungs / lung volume × 100, so it
shares that weighting. Without lungs (volume 0) every percentage is 0.0 and the
study runner reports "no lungs"; no measure is ever NaN or None for that reason.

HU measures (no network involved), as percentages of lung voxels:
ground glass ``ggo_hu[0] ≤ HU ≤ ggo_hu[1]`` ([−750, −300] by default) and
consolidation ``consolidation_hu[0] < HU ≤ consolidation_hu[1]`` ((−300, +50]);
the shared bound −300 HU counts as ground glass, so no voxel counts twice. They are ``None`` for
pre-windowed image stacks, which have no HU. Note that vessels inside the lung
mask fall in the consolidation range too, so a healthy lung has a few percent.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import PipelineConfig
from pipeline.datamodel import LEFT_LUNG, RIGHT_LUNG, CamStack, LungMask, Severity, SliceScores, Volume
from pipeline.errors import GeometryError


def corona_score(
    cam_maps: np.ndarray,
    positive: np.ndarray,
    voxel_volume_mm3: float,
    threshold: float = 0.6,
    within: np.ndarray | None = None,
) -> float:
    """Corona score in cm³ of (z, y, x) CAM maps in [0, 1] over the (z,) ``positive`` slices.

    ``within`` (bool, (z, y, x)) restricts the sum to a mask, e.g. the lungs.
    """
    raw = np.asarray(cam_maps)
    # compare in the maps' own precision: float32 0.6 must not count as "> 0.6"
    above = raw > (raw.dtype.type(threshold) if np.issubdtype(raw.dtype, np.floating) else threshold)
    maps = raw.astype(np.float64)
    positive = np.asarray(positive, dtype=bool)
    if maps.ndim != 3 or positive.shape != maps.shape[:1]:
        raise GeometryError(
            f"corona_score: maps {maps.shape} and positive-slice flags {positive.shape} do not match"
        )
    counted = np.where(above, maps, 0.0)
    counted[~positive] = 0.0
    if within is not None:
        within = np.asarray(within, dtype=bool)
        if within.shape != maps.shape:
            raise GeometryError(f"corona_score: mask {within.shape} differs from the maps {maps.shape}")
        counted = np.where(within, counted, 0.0)
    return float(counted.sum() * voxel_volume_mm3 / 1000.0)


def _percent(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole > 0 else 0.0


def hu_fractions(hu: np.ndarray, region: np.ndarray, config: PipelineConfig) -> tuple[float, float]:
    """Percent of ``region`` voxels in the ground-glass and the consolidation HU range."""
    values = np.asarray(hu)[np.asarray(region, dtype=bool)]
    ggo_lo, ggo_hi = config.severity.ggo_hu
    cons_lo, cons_hi = config.severity.consolidation_hu
    ggo = int(np.count_nonzero((values >= ggo_lo) & (values <= ggo_hi)))
    consolidation = int(np.count_nonzero((values > cons_lo) & (values <= cons_hi)))
    return _percent(ggo, values.size), _percent(consolidation, values.size)


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
    with np.errstate(invalid="ignore"):  # NaN probabilities of unevaluated slices compare False
        positive = scores.evaluated & (scores.probs >= config.classify.positive_threshold)
    voxel_mm3 = volume.geometry.voxel_volume_mm3
    threshold = config.cam.activation_threshold
    has_hu = volume.units == "HU"

    def measures(region: np.ndarray) -> tuple[float, float, float]:
        lung_cm3 = float(np.count_nonzero(region)) * voxel_mm3 / 1000.0
        score = corona_score(cams.maps, positive, voxel_mm3, threshold, within=region)
        return lung_cm3, score, _percent(score, lung_cm3)

    def side(label: int) -> dict[str, float]:
        region = lung_mask.labels == label
        lung_cm3, score, affected = measures(region)
        values = {"lung_volume_cm3": lung_cm3, "corona_score_cm3": score, "affected_percent": affected}
        if has_hu:
            values["ggo_percent"], values["consolidation_percent"] = hu_fractions(volume.hu, region, config)
        return values

    lungs = lung_mask.lungs
    lung_cm3, score_in_lung, affected = measures(lungs)
    ggo, consolidation = hu_fractions(volume.hu, lungs, config) if has_hu else (None, None)
    return Severity(
        corona_score_cm3=corona_score(cams.maps, positive, voxel_mm3, threshold),
        corona_score_in_lung_cm3=score_in_lung,
        lung_volume_cm3=lung_cm3,
        affected_percent=affected,
        right=side(RIGHT_LUNG),
        left=side(LEFT_LUNG),
        ggo_percent=ggo,
        consolidation_percent=consolidation,
        positive_slices=int(np.count_nonzero(positive)),
    )
