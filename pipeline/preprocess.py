"""Image preparation shared by training and inference: HU window, lung ROI, model input.

One implementation for both sides, so that a network never sees at inference
anything prepared differently from what it was trained on:

1. :func:`window` maps HU to [0, 1] (paper: [−1000, 0] HU); pre-windowed slice
   images (``units == "window"``) pass through unchanged.
2. :func:`lung_bounding_box` is the case-wide lung box (union over slices plus a
   margin); :func:`evaluable_slices` says which slices hold enough lung to classify.
3. :func:`to_model_input` crops every slice to the box, resizes it (bilinear,
   antialiased) to ``size × size`` and replicates the grey channel 3 times; with
   ``RoiConfig.mask_outside_lungs`` it first sets every pixel outside the lungs to
   air (0), so that the network sees lung only (:func:`input_lungs`, :func:`roi_name`).
4. :func:`paste_back` is the inverse for per-slice maps (Grad-CAM, segmentation
   probabilities): resize to the box and place it on the CT grid, zeros elsewhere.

Arrays are (z, y, x) = (slice, row, column); boxes are half-open pixel bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from corona_ct.pipeline.config import RoiConfig, WindowConfig
from corona_ct.pipeline.errors import ConfigError, GeometryError

#: Slice area (pixels) at which ``RoiConfig.min_lung_pixels`` is meant literally.
REFERENCE_SLICE_AREA = 512 * 512


def window(array: np.ndarray, units: str, config: WindowConfig) -> npt.NDArray[np.float32]:
    """Map an image to float32 grey values in [0, 1].

    ``units == "HU"``: ``(clip(hu, hu_min, hu_max) − hu_min) / (hu_max − hu_min)``.
    ``units == "window"``: the images are already windowed [0, 1] grey values and
    are returned as float32, unchanged.
    """
    if units == "window":
        return np.asarray(array, dtype=np.float32)
    if units != "HU":
        raise ConfigError(f"window(): units must be 'HU' or 'window', got {units!r}")
    span = config.hu_max - config.hu_min
    if not span > 0:
        raise ConfigError(
            f"window.hu_max ({config.hu_max}) must be greater than window.hu_min ({config.hu_min})"
        )
    hu = np.asarray(array, dtype=np.float32)
    clipped = np.clip(hu, np.float32(config.hu_min), np.float32(config.hu_max))
    return ((clipped - np.float32(config.hu_min)) / np.float32(span)).astype(np.float32, copy=False)


@dataclass(frozen=True)
class Box:
    """Half-open pixel rectangle ``[y0, y1) × [x0, x1)`` on a slice."""

    y0: int
    y1: int
    x0: int
    x1: int

    def __post_init__(self) -> None:
        if not (0 <= self.y0 < self.y1 and 0 <= self.x0 < self.x1):
            raise GeometryError(f"empty or negative box {self}")

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(rows, columns)`` slices for indexing the last two axes of an array."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


def lung_bounding_box(lungs: np.ndarray, config: RoiConfig) -> Box | None:
    """Case-wide lung box: the bounding box of lung pixels over all slices, plus a margin.

    The margin is ``ceil(margin_fraction × box side)`` pixels on each side (rows
    from the height, columns from the width), clipped to the image. ``None`` when
    ``lungs`` (bool, (z, y, x)) holds no lung pixel.
    """
    lungs = np.asarray(lungs, dtype=bool)
    if lungs.ndim != 3:
        raise GeometryError(f"lung mask must be (z, y, x), got shape {lungs.shape}")
    rows = np.flatnonzero(lungs.any(axis=(0, 2)))
    cols = np.flatnonzero(lungs.any(axis=(0, 1)))
    if rows.size == 0:
        return None
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    margin_y = math.ceil(config.margin_fraction * (y1 - y0))
    margin_x = math.ceil(config.margin_fraction * (x1 - x0))
    height, width = lungs.shape[1:]
    return Box(
        y0=max(0, y0 - margin_y),
        y1=min(height, y1 + margin_y),
        x0=max(0, x0 - margin_x),
        x1=min(width, x1 + margin_x),
    )


def min_lung_pixels_for(image_shape: tuple[int, int], config: RoiConfig) -> int:
    """``min_lung_pixels`` scaled by the slice area relative to 512 × 512 (at least 1).

    The configured value is meant for 512 × 512 CT; the same physical fraction of
    the field of view applies to smaller images (phantoms, downsampled slices).
    """
    area = image_shape[0] * image_shape[1]
    return max(1, round(config.min_lung_pixels * area / REFERENCE_SLICE_AREA))


def lung_pixels_per_slice(lungs: np.ndarray) -> npt.NDArray[np.int64]:
    """(z,) lung pixels of each slice of a (z, y, x) lung mask."""
    lungs = np.asarray(lungs, dtype=bool)
    if lungs.ndim != 3:
        raise GeometryError(f"lung mask must be (z, y, x), got shape {lungs.shape}")
    return np.asarray(np.count_nonzero(lungs.reshape(lungs.shape[0], -1), axis=1), dtype=np.int64)


def evaluable_slices(lungs: np.ndarray, config: RoiConfig) -> npt.NDArray[np.bool_]:
    """(z,) bool: slices with at least :func:`min_lung_pixels_for` lung pixels."""
    counts = lung_pixels_per_slice(lungs)
    return np.asarray(counts >= min_lung_pixels_for(np.shape(lungs)[1:], config))


def slice_lung_fraction(lungs: np.ndarray) -> npt.NDArray[np.float64]:
    """(z,) each slice's lung pixels as a share of the study's largest slice's (0 to 1; all 0 without lungs)."""
    counts = lung_pixels_per_slice(lungs).astype(np.float64)
    largest = counts.max(initial=0.0)
    return counts / largest if largest > 0 else counts


def resize_batch(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (n, h, w) float images to (n, *size): bilinear, antialiased when shrinking."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    resized = F.interpolate(images[:, None], size=size, mode="bilinear", align_corners=False, antialias=True)
    return resized[:, 0]


def _as_float_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images.float()
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))


#: The card's ``input.roi`` for each setting of ``RoiConfig.mask_outside_lungs``.
ROI_LUNG_BOX, ROI_LUNG_ONLY = "lung-bbox", "lung-bbox-masked"


def roi_name(config: RoiConfig) -> str:
    """The classifier input this ROI config makes, as a card's ``input.roi`` names it."""
    return ROI_LUNG_ONLY if config.mask_outside_lungs else ROI_LUNG_BOX


def input_lungs(
    lungs: npt.ArrayLike | torch.Tensor, config: RoiConfig
) -> npt.ArrayLike | torch.Tensor | None:
    """The ``lungs`` argument of :func:`to_model_input` under ``config``: the mask, or None (keep
    everything): when not masking, and when the mask holds no lung (such slices are used whole)."""
    if not config.mask_outside_lungs:
        return None
    has_lung = bool(lungs.any()) if isinstance(lungs, torch.Tensor) else bool(np.any(lungs))
    return lungs if has_lung else None


def to_model_input(
    windowed: np.ndarray | torch.Tensor,
    box: Box | None,
    size: int,
    lungs: npt.ArrayLike | torch.Tensor | None = None,
) -> torch.Tensor:
    """(n, y, x) windowed slices in [0, 1] → (n, 3, size, size) float32 network input.

    With ``lungs`` ((n, y, x) bool) every pixel outside them becomes air (0) first.
    Crops to ``box`` (the whole slice when ``None``), resizes with antialiased
    bilinear interpolation and replicates the grey channel 3 times (ImageNet-style
    backbones). A tensor input stays on its device.
    """
    images = _as_float_tensor(windowed)
    if images.ndim != 3:
        raise GeometryError(f"model input must be (n, y, x) slices, got shape {tuple(images.shape)}")
    if lungs is not None:
        inside = torch.as_tensor(np.asarray(lungs) if not isinstance(lungs, torch.Tensor) else lungs)
        if tuple(inside.shape) != tuple(images.shape):
            raise GeometryError(f"lung mask {tuple(inside.shape)} and slices {tuple(images.shape)} differ")
        images = images * inside.to(device=images.device, dtype=torch.bool)
    if box is not None:
        if box.y1 > images.shape[1] or box.x1 > images.shape[2]:
            raise GeometryError(f"box {box} exceeds the slice size {tuple(images.shape[1:])}")
        images = images[:, box.y0 : box.y1, box.x0 : box.x1]
    resized = resize_batch(images, (size, size))
    return resized[:, None].expand(-1, 3, -1, -1).contiguous()


def paste_back(
    maps: torch.Tensor | np.ndarray, box: Box | None, image_shape: tuple[int, int]
) -> npt.NDArray[np.float32]:
    """(n, s, s) per-slice maps → (n, y, x) float32 on the CT grid.

    Each map is resized (bilinear) to the box and placed there; pixels outside the
    box are 0. ``box=None`` means the map covers the whole slice.
    """
    tensor = _as_float_tensor(maps).detach()
    if tensor.ndim != 3:
        raise GeometryError(f"maps must be (n, s, s), got shape {tuple(tensor.shape)}")
    height, width = image_shape
    target = box if box is not None else Box(0, height, 0, width)
    if target.y1 > height or target.x1 > width:
        raise GeometryError(f"box {target} exceeds the slice size {image_shape}")
    resized = resize_batch(tensor, (target.height, target.width)).cpu().numpy()
    out = np.zeros((tensor.shape[0], height, width), dtype=np.float32)
    out[:, target.y0 : target.y1, target.x0 : target.x1] = resized
    return out
