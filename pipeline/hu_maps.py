"""Weights-free HU measures of the lungs (no network involved), in percent of the *assessed* lung
(``HuMaps.assessed``): ground glass ``ggo_percent`` and consolidation ``consolidation_percent``.

Raw thresholds
(``raw_hu_fractions``) do not work on real CT: noise, vessels, partial volume and a dense but
normal lung put 10–30 % of healthy lungs in the ground-glass range. :func:`hu_maps` therefore,
every step in-plane (slices are often thick) and vectorised over the volume with scipy.ndimage:

1. leaves out the lung rim: ``edge_margin_mm`` in-plane (chest wall, heart) and
   ``edge_margin_slices`` through the slice (diaphragm dome, apex);
2. leaves out thin structures after a light smoothing (``vessel_smoothing_mm``): bright ones
   (> ``vessel_hu``) narrower than ``vessel_width_mm`` (an in-plane opening), dim ones that stand out
   of their surroundings by > ``vessel_contrast_hu`` (white top-hat), and a ``vessel_margin_mm`` rim
   around every bright structure (partial volume);
3. consolidation = broad bright tissue in ``consolidation_hu`` that the aerated lung encloses (a
   closing with a ``consolidation_reach_mm`` disk, or a hole in it), so that lung-mask leaks into
   heart, liver or stomach do not count. Consolidation wider than about twice the reach that
   touches the lung border is lost with them (subpleural whole-lobe consolidation is under-counted);
4. ground glass: the remaining parenchyma is smoothed per slice with the least Gaussian sigma
   (ladder of ``SMOOTHING_STEP_MM`` up to ``max_smoothing_mm``) that brings its noise (robust SD about
   the 8 mm background) to ``noise_target_hu``; ground glass is smoothed HU in ``ggo_hu`` and at least
   ``ggo_contrast_hu`` above the study's aerated level (25th percentile of the smoothed parenchyma:
   expiration and thick slices make a whole lung −700 HU), at least ``vessel_width_mm`` wide.

They are ``None`` for pre-windowed image stacks, which have no HU.

Validation (``tools/hu_measures.py``, ``docs/validation.md``, COVID-CT-MD, one scanner): normal
lungs now read 0.1–1.2 % instead of 11–26 %, and per-slice GGO + consolidation ranks infected above
clean slices with AUC 0.83 pooled over three patients (raw thresholds: 0.36). Within one patient
it still does not separate them well: AUC 0.73 (COVID-19) and 0.56 (pneumonia), below 0.8, so the
report shows :data:`HU_MEASURE_CAVEAT` and :data:`HU_REFERENCE_RANGE` beside the numbers. Ground glass
alone does better (0.90 pooled, 0.87 COVID-19); consolidation is dominated by lung-mask leaks and
hilar vessels (AUC 0.51).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from corona_ct.pipeline.config import SeverityConfig
from corona_ct.pipeline.datamodel import LEFT_LUNG, RIGHT_LUNG
from corona_ct.pipeline.errors import GeometryError
from corona_ct.pipeline.morphology import (
    close_in_plane,
    dilate_rows,
    erode_rows,
    fill_holes_in_plane,
    footprint_half_widths,
    grey_open_rows,
    in_slabs,
)

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]

#: Step of the ladder of Gaussian sigmas (mm) that the noise-matched smoothing picks from.
SMOOTHING_STEP_MM = 0.5
#: Gaussian sigma (mm) of the slowly varying lung background that residual noise is measured about.
BACKGROUND_SIGMA_MM = 8.0
#: Percentile of the smoothed parenchyma's HU taken as the study's aerated-lung level (robust while
#: less than 75 % of the lung is opacified).
AERATED_PERCENTILE = 25.0
#: Median absolute deviation → standard deviation for normally distributed noise.
MAD_TO_SD = 1.4826

#: Shown by the report next to ``ggo_percent`` / ``consolidation_percent``: how well they separated
#: infected from clean slices when validated (``tools/hu_measures.py``, docs/validation.md; 344
#: slices of one scanner, U-Net lungs). Below AUC 0.8 within each patient: an estimate, not a finding.
HU_MEASURE_CAVEAT = (
    "HU estimate, not a diagnosis: on same-scanner CT (tools/hu_measures.py) GGO + consolidation "
    "ranked infected above clean slices with AUC 0.83 pooled over a COVID-19, a pneumonia and a normal "
    "patient, but only 0.73 within the COVID-19 and 0.56 within the pneumonia patient; lung-mask errors, "
    "dense dependent lung and large subpleural consolidation bias it"
)
#: Shown beside them too: GGO + consolidation measured on lungs without COVID-19 (same benchmark).
HU_REFERENCE_RANGE = "GGO + consolidation in 3 normal lungs: 0.1–1.2 % of the lung, ≤ 2.7 % on 95 % of slices"


def percent_of(part: float, whole: float) -> float:
    """``part`` as % of ``whole``; 0.0 when ``whole`` is 0."""
    return 100.0 * part / whole if whole > 0 else 0.0


@dataclass(frozen=True)
class HuMaps:
    """What the HU measures count, on the volume grid: (z, y, x) bool maps and (z,) per-slice figures.

    ``assessed`` is the denominator: lung minus its rim and minus thin bright structures
    (vessels, airway walls) with their margin (``excluded``); ``ggo`` and
    ``consolidation`` lie inside it. ``noise_sd_hu`` is the robust SD (HU) of each slice's
    unsmoothed assessed lung about its 8 mm background, ``smoothing_mm`` the Gaussian sigma
    chosen for that slice, ``residual_noise_hu`` the same SD after that smoothing; all
    three are NaN on slices without assessed lung. ``aerated_level_hu`` is the study's
    aerated-lung level (25th percentile of the smoothed parenchyma, HU; NaN without lung) and
    ``ggo_floor_hu`` the lower ground-glass bound used (the larger of ``ggo_hu[0]`` and that
    level + ``ggo_contrast_hu``).
    """

    assessed: BoolArray
    ggo: BoolArray
    consolidation: BoolArray
    excluded: BoolArray
    noise_sd_hu: FloatArray
    smoothing_mm: FloatArray
    residual_noise_hu: FloatArray
    aerated_level_hu: float
    ggo_floor_hu: float

    def percent(self, region: npt.ArrayLike | None = None) -> tuple[float, float]:
        """(ggo, consolidation) as % of the assessed voxels, optionally only those in ``region``."""
        assessed = self.assessed if region is None else self.assessed & np.asarray(region, dtype=bool)
        whole = float(np.count_nonzero(assessed))
        return (
            percent_of(float(np.count_nonzero(self.ggo & assessed)), whole),
            percent_of(float(np.count_nonzero(self.consolidation & assessed)), whole),
        )

    def percent_by_label(self, labels: np.ndarray) -> dict[int, tuple[float, float]]:
        """:meth:`percent` of all lungs (key 0) and of each side of ``labels`` (1 right, 2 left), counted
        in one pass over the assessed voxels. Ground glass and consolidation lie inside them and never
        overlap (ground glass is looked for off broad bright tissue, consolidation only on it)."""
        at = np.asarray(labels)[self.assessed].astype(np.int64)
        kinds = self.ggo[self.assessed] + 2 * self.consolidation[self.assessed].astype(np.int64)
        counts = np.bincount(at * 3 + kinds, minlength=9)[:9].reshape(3, 3)  # [label, none/ggo/consolidation]
        counts[0] = counts[RIGHT_LUNG] + counts[LEFT_LUNG]
        return {
            key: (percent_of(float(row[1]), float(row.sum())), percent_of(float(row[2]), float(row.sum())))
            for key, row in enumerate(counts)
        }

    def slice_percent(self) -> tuple[FloatArray, FloatArray]:
        """Per slice (z,): (ggo, consolidation) in % of that slice's assessed voxels; 0 without any."""
        whole = self.assessed.sum(axis=(1, 2)).astype(np.float64)
        scale = np.divide(100.0, whole, out=np.zeros_like(whole), where=whole > 0)
        return self.ggo.sum(axis=(1, 2)) * scale, self.consolidation.sum(axis=(1, 2)) * scale


def raw_hu_fractions(hu: npt.ArrayLike, region: npt.ArrayLike, config: SeverityConfig) -> tuple[float, float]:
    """Percent of ``region`` voxels whose raw HU lies in the ground-glass / consolidation range.

    The measure before noise matching and vessel removal, kept as the reference that
    ``tools/hu_measures.py`` compares with; on real CT it is dominated by noise,
    vessels and partial volume (module doc).
    """
    values = np.asarray(hu)[np.asarray(region, dtype=bool)]
    ggo_lo, ggo_hi = config.ggo_hu
    cons_lo, cons_hi = config.consolidation_hu
    ggo = int(np.count_nonzero((values >= ggo_lo) & (values <= ggo_hi)))
    consolidation = int(np.count_nonzero((values > cons_lo) & (values <= cons_hi)))
    return percent_of(ggo, values.size), percent_of(consolidation, values.size)


def _disk(radius_mm: float, spacing_yx: tuple[float, float]) -> BoolArray | None:
    """In-plane elliptic footprint (1, ny, nx) of ``radius_mm`` on the pixel grid; None below half a pixel."""
    ry, rx = radius_mm / spacing_yx[0], radius_mm / spacing_yx[1]
    if max(ry, rx) < 0.5:
        return None
    ny, nx = math.floor(ry), math.floor(rx)
    y, x = np.ogrid[-ny : ny + 1, -nx : nx + 1]
    inside = (y / max(ry, 1e-9)) ** 2 + (x / max(rx, 1e-9)) ** 2 <= 1.0
    return inside[None]


def _disk_rows(radius_mm: float, spacing_yx: tuple[float, float]) -> np.ndarray | None:
    """The rows of :func:`_disk` as half widths for :func:`pipeline.morphology.dilate_rows`; None below half a pixel."""
    disk = _disk(radius_mm, spacing_yx)
    return None if disk is None else footprint_half_widths(disk)


def _smooth_within(
    hu: npt.NDArray[np.floating[Any]], support: BoolArray, sigma_mm: float, spacing_yx: tuple[float, float]
) -> npt.NDArray[np.floating[Any]]:
    """In-plane Gaussian (sigma in mm, none along z) of ``hu`` over ``support`` only, normalised there.

    Voxels outside ``support`` (chest wall, vessels) do not bleed in; the result is
    meaningful on ``support`` (elsewhere it is the nearest support's value or 0).
    """
    if sigma_mm <= 0:
        return hu
    sigma_px = (sigma_mm / spacing_yx[0], sigma_mm / spacing_yx[1])
    if min(_gaussian_radius(s) for s in sigma_px) >= MATMUL_MIN_RADIUS_PX:  # BLAS threads itself
        return _smooth_slab(hu, support, partial(_gaussian_by_matrices, sigma_px=sigma_px))
    blur = partial(ndimage.gaussian_filter, sigma=(0.0, *sigma_px), mode="constant")
    return in_slabs(partial(_smooth_slab, blur=blur), hu, support)


def _smooth_slab(
    hu: npt.NDArray[np.floating[Any]],
    support: BoolArray,
    blur: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]],
) -> npt.NDArray[np.floating[Any]]:
    weight = support.astype(np.float32)
    numerator, denominator = blur(hu * weight), blur(weight)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 1e-3)


#: Kernel radius (px) from which an in-plane Gaussian is two matrix products (BLAS, all threads) rather
#: than a 1D correlation per axis: its cost then follows the slice's side, not the kernel's width.
MATMUL_MIN_RADIUS_PX = 32


def _gaussian_radius(sigma_px: float) -> int:
    """Kernel radius (px) of ``ndimage.gaussian_filter`` at its default ``truncate=4``."""
    return int(4.0 * sigma_px + 0.5)


def _gaussian_matrix(n: int, sigma_px: float) -> npt.NDArray[np.float32]:
    """(n, n) matrix of ``ndimage.gaussian_filter1d(mode="constant")`` along an axis of ``n`` samples."""
    radius = _gaussian_radius(sigma_px)
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 / (sigma_px * sigma_px) * taps * taps)
    kernel /= kernel.sum()
    offset = np.subtract.outer(np.arange(n), np.arange(n))
    return np.where(np.abs(offset) <= radius, kernel[np.clip(offset + radius, 0, 2 * radius)], 0.0).astype(
        np.float32
    )


def _gaussian_by_matrices(
    stack: npt.NDArray[np.float32], sigma_px: tuple[float, float]
) -> npt.NDArray[np.float32]:
    """In-plane Gaussian of a (z, y, x) stack, zero beyond the edges: ``G_y · slice · G_x`` per slice
    (what ``ndimage.gaussian_filter(sigma=(0, *sigma_px), mode="constant")`` gives, to float32 rounding)."""
    n, height, width = stack.shape
    along_x = (stack.reshape(n * height, width) @ _gaussian_matrix(width, sigma_px[1])).reshape(
        n, height, width
    )
    return np.asarray(np.matmul(_gaussian_matrix(height, sigma_px[0]), along_x))


def _through_plane_core(lungs: BoolArray, margin_slices: int) -> BoolArray:
    """Lung voxels whose ``margin_slices`` neighbours above and below are lung too (beyond the volume counts as lung)."""
    core = lungs.copy()
    for k in range(1, min(margin_slices, lungs.shape[0] - 1) + 1):
        core[:-k] &= lungs[k:]
        core[k:] &= lungs[:-k]
    return core


def _slice_median(values: npt.NDArray[np.floating[Any]], mask: BoolArray) -> FloatArray:
    """Per slice (z,): median of ``values`` on ``mask``; 0.0 where empty."""
    out = np.zeros(values.shape[0])
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        out[z] = float(np.median(values[z][mask[z]]))
    return out


def _robust_sd(values: npt.NDArray[np.floating[Any]], mask: BoolArray) -> FloatArray:
    """Per slice (z,): 1.4826 × median absolute deviation of ``values`` on ``mask``; NaN where empty."""
    out = np.full(values.shape[0], np.nan)
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        v = values[z][mask[z]]
        out[z] = MAD_TO_SD * float(np.median(np.abs(v - np.median(v))))
    return out


def hu_maps(
    hu: npt.ArrayLike, lungs: npt.ArrayLike, spacing_mm: Sequence[float], config: SeverityConfig
) -> HuMaps:
    """Ground glass and consolidation in (z, y, x) HU inside ``lungs``, robust to noise, vessels and the rim.

    ``spacing_mm`` is (z, y, x); every step works in-plane (see the module doc).
    """
    hu_all = np.asarray(hu, dtype=np.float32)
    lungs_all = np.asarray(lungs, dtype=bool)
    if hu_all.ndim != 3 or lungs_all.shape != hu_all.shape:
        raise GeometryError(
            f"hu_maps: HU {hu_all.shape} and lungs {lungs_all.shape} must be one (z, y, x) grid"
        )
    shape = hu_all.shape
    n = shape[0]
    if not lungs_all.any():
        empty, nan = np.zeros(shape, dtype=bool), np.full(n, np.nan)
        empty.flags.writeable = False
        nan.flags.writeable = False
        return HuMaps(empty, empty, empty, empty, nan, nan, nan, np.nan, float(config.ggo_hu[0]))
    # Work on the lungs' bounding box (+2 px): every filter below is normalised to or masked by the lungs.
    box = tuple(
        slice(max(int(idx.min()) - (0 if axis == 0 else 2), 0), int(idx.max()) + (1 if axis == 0 else 3))
        for axis, idx in enumerate(np.nonzero(lungs_all))
    )
    hu_box, lungs_box = hu_all[box], lungs_all[box]
    spacing_yx = (float(spacing_mm[1]), float(spacing_mm[2]))

    # Rim: partial volume with chest wall, mediastinum and heart in-plane, and through the
    # slice thickness with the diaphragm dome and the apex (neighbour slices not lung).
    # binary morphology with the disks row by row (pipeline.morphology: exact, linear in the disk's height)
    rim_disk = _disk_rows(config.edge_margin_mm, spacing_yx)
    core = erode_rows(lungs_box, rim_disk) if rim_disk is not None else lungs_box.copy()
    core &= _through_plane_core(lungs_all, config.edge_margin_slices)[box]
    # Bright structures (> vessel_hu after light smoothing): thin ones (gone after an opening as
    # wide as ``vessel_width_mm``: vessels, airway walls, fissures) are left out; broad ones are
    # consolidation. Left out too: a ``vessel_margin_mm`` rim around every bright structure
    # (partial volume, which would otherwise read as ground glass).
    light = _smooth_within(hu_box, lungs_box, config.vessel_smoothing_mm, spacing_yx)
    bright = lungs_box & (light > config.vessel_hu)
    width_rows = _disk_rows(config.vessel_width_mm / 2.0, spacing_yx)
    broad = dilate_rows(erode_rows(bright, width_rows), width_rows) if width_rows is not None else bright
    margin_disk = _disk_rows(config.vessel_margin_mm, spacing_yx)
    thin = bright & ~broad
    if width_rows is not None and config.vessel_contrast_hu > 0:
        # dim thin structures too: small or obliquely cut vessels in partial volume (−600 HU) stand
        # out of their surroundings by more than ``vessel_contrast_hu`` (white top-hat)
        level = np.where(lungs_box, light, _slice_median(light, lungs_box).astype(light.dtype)[:, None, None])
        tophat = level - grey_open_rows(level, width_rows)
        thin |= lungs_box & (tophat > config.vessel_contrast_hu)
    left_out = thin | bright
    near_bright = dilate_rows(left_out, margin_disk) if margin_disk is not None else left_out
    excluded = lungs_box & near_bright & ~broad
    assessed = core & ~excluded
    parenchyma = assessed & ~broad  # where ground glass is looked for

    # Noise-matched smoothing of the parenchyma (bright structures do not bleed in): per slice,
    # the least sigma of the ladder whose residual noise (robust SD about the slowly varying
    # lung background) is at most ``noise_target_hu``.
    background = _smooth_within(hu_box, parenchyma, BACKGROUND_SIGMA_MM, spacing_yx)
    ladder = np.arange(0.0, config.max_smoothing_mm + 1e-9, SMOOTHING_STEP_MM)
    if ladder[-1] < config.max_smoothing_mm:
        ladder = np.append(ladder, config.max_smoothing_mm)
    smoothed = hu_box.copy()
    n_box = hu_box.shape[0]
    sigma_z, residual_z, noise_z = np.full(n_box, np.nan), np.full(n_box, np.nan), np.full(n_box, np.nan)
    pending: BoolArray = np.asarray(parenchyma.any(axis=(1, 2)))
    for step, sigma in enumerate(ladder):
        if not pending.any():
            break
        todo = np.flatnonzero(pending)
        candidate = _smooth_within(hu_box[todo], parenchyma[todo], float(sigma), spacing_yx)
        sd = _robust_sd(candidate - background[todo], parenchyma[todo])
        if step == 0:
            noise_z[todo] = sd
        take = (sd <= config.noise_target_hu) | (step == len(ladder) - 1)
        smoothed[todo[take]] = candidate[take]
        sigma_z[todo[take]], residual_z[todo[take]] = sigma, sd[take]
        pending[todo[take]] = False

    ggo_lo, ggo_hi = config.ggo_hu
    cons_lo, cons_hi = config.consolidation_hu
    aerated_level = (
        float(np.percentile(smoothed[parenchyma], AERATED_PERCENTILE)) if parenchyma.any() else np.nan
    )
    if config.ggo_contrast_hu > 0 and np.isfinite(aerated_level):
        ggo_lo = max(ggo_lo, aerated_level + config.ggo_contrast_hu)
    ggo_box = parenchyma & (smoothed >= ggo_lo) & (smoothed <= ggo_hi)
    if width_rows is not None:  # ground glass is at least as wide as a vessel; thinner is partial volume
        ggo_box = dilate_rows(erode_rows(ggo_box, width_rows), width_rows)
    consolidation_box: BoolArray = assessed & broad & (light > cons_lo) & (light <= cons_hi)
    dense = np.flatnonzero(consolidation_box.any(axis=(1, 2)))
    if config.consolidation_reach_mm > 0 and dense.size:  # enclosed by aerated lung, not a mask leak
        aerated = lungs_box[dense] & ~bright[dense]
        enclosed = close_in_plane(aerated, config.consolidation_reach_mm, spacing_yx)
        consolidation_box[dense] &= enclosed | fill_holes_in_plane(aerated)

    def on_grid(part: BoolArray) -> BoolArray:
        full = np.zeros(shape, dtype=bool)
        full[box] = part
        return full

    def per_slice(part: FloatArray) -> FloatArray:
        full = np.full(n, np.nan)
        full[box[0]] = part
        return full

    return HuMaps(
        assessed=on_grid(assessed),
        ggo=on_grid(ggo_box),
        consolidation=on_grid(consolidation_box),
        excluded=on_grid(excluded),
        noise_sd_hu=per_slice(noise_z),
        smoothing_mm=per_slice(sigma_z),
        residual_noise_hu=per_slice(residual_z),
        aerated_level_hu=aerated_level,
        ggo_floor_hu=float(ggo_lo),
    )
