"""Lung segmentation: a U-Net when weights are given, else a classical threshold segmenter.

Both paths end in :func:`clean_lung_mask`, so the two masks obey the same rules:
two lungs at most (right = label 1 at low column index, left = label 2), holes
filled per slice, and dense tissue inside or against the lung (vessels, ground
glass, consolidation, also subpleural) closed into the mask. The last point is
the one users care about: a lesion outside the lung mask is never counted.

Modules: :mod:`.regions` (body, outside air), :mod:`.classical` (threshold segmenter),
:mod:`.sides` (right/left split), :mod:`.cleanup` (rules every mask obeys); this module
dispatches between the U-Net and the classical path.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import numpy.typing as npt
import torch

from corona_ct.models.segmenter import SEGMENTER_INPUT, is_binary_unet, predict_lung_labels
from corona_ct.pipeline.config import PipelineConfig, SegmentConfig, WindowConfig
from corona_ct.pipeline.datamodel import Geometry, LungMask, Volume
from corona_ct.pipeline.errors import ModelError
from corona_ct.pipeline.preprocess import min_lung_pixels_for, window
from corona_ct.pipeline.segment.classical import classical_lung_labels
from corona_ct.pipeline.segment.cleanup import clean_lung_mask, keep_plausible_lung, trim_dense_rim
from corona_ct.pipeline.segment.regions import BoolArray, low_density
from corona_ct.pipeline.segment.sides import split_sides

log = logging.getLogger(__name__)
NO_LUNGS_WARNING = "no lungs found in this series"


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
