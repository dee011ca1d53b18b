"""Counterfactual lesions: real-looking COVID-19 opacities blended into the lungs of clean CT slices.

A classifier trained on "COVID patients" against "other patients" can learn the patient
or the scanner instead of the disease. Pasting lesions into clean slices gives the same
slice with and without a lesion, so only the lesion can explain the label, and the pasted
mask says where the evidence is.

Two kinds of lesion, both in Hounsfield units and both *added* to the recipient's lung
(its vessels, noise and partial-volume edges stay visible through ground glass, as in
real CT):

* **real textures** (:class:`TextureBank`): infection regions cut from slices with
  radiologists' masks (COVID-SemiSeg). Those are 8-bit images of unknown window, so each
  is calibrated by two anchors of its own slice: aerated lung (median of the dark,
  non-lesion pixels ↦ ``LUNG_HU``) and soft tissue (median of the bright, non-lesion
  pixels ↦ ``SOFT_TISSUE_HU``). The lesion then keeps its own texture and edges.
* **procedural** lesions: lobulated shapes from smoothed noise, ground glass
  (−700…−350 HU) or consolidation (−150…+40 HU), with internal texture and the
  recipient's noise level.

Lesions are placed mostly against the pleura (the typical COVID-19 distribution) and
clipped to the lung mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_otsu

from corona_ct.data.phantom_anatomy import LUNG_HU, SOFT_TISSUE_HU
from corona_ct.pipeline.errors import InputError

GGO_HU = (-700.0, -350.0)
CONSOLIDATION_HU = (-150.0, 40.0)
#: Share of lesions drawn from the real texture bank when it is not empty.
REAL_TEXTURE_SHARE = 0.6
#: Lesion area as a fraction of the slice's lung area, drawn log-uniformly in this range.
AREA_FRACTION = (0.04, 0.4)

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Texture:
    """One real infection region: relative density ``t`` (0 aerated lung, 1 soft tissue) and its mask."""

    density: FloatArray  # (h, w), t inside the mask, 0 outside
    mask: BoolArray  # (h, w)
    source: str


class TextureBank:
    """Infection regions cut from slice images with pixel masks (COVID-SemiSeg ``Imgs`` + ``GT``)."""

    def __init__(self, textures: Sequence[Texture]) -> None:
        self.textures = tuple(textures)

    def __len__(self) -> int:
        return len(self.textures)

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(sorted({t.source for t in self.textures}))

    @classmethod
    def from_folders(
        cls, images_dir: Path, masks_dir: Path, names: Sequence[str] | None = None, min_pixels: int = 60
    ) -> TextureBank:
        """Every connected infection region of at least ``min_pixels`` of the named slices (stems)."""
        images = sorted(p for p in Path(images_dir).iterdir() if p.suffix.lower() in {".jpg", ".png"})
        if names is not None:
            wanted = set(names)
            images = [p for p in images if p.stem in wanted]
        textures: list[Texture] = []
        for path in images:
            mask_path = Path(masks_dir) / f"{path.stem}.png"
            if not mask_path.is_file():
                raise InputError(f"{path}: no infection mask {mask_path}; every image needs one")
            with Image.open(path) as handle:
                grey = np.asarray(handle.convert("L"), dtype=np.float32)
            with Image.open(mask_path) as handle:
                lesion = np.asarray(handle.convert("L")) > 127
            if grey.shape != lesion.shape or not lesion.any():
                continue
            density = relative_density(grey, lesion)
            labels, _ = ndimage.label(lesion)
            for index, box in enumerate(ndimage.find_objects(labels), start=1):
                region = labels[box] == index
                if region.sum() < min_pixels:
                    continue
                textures.append(
                    Texture(np.where(region, density[box], 0.0).astype(np.float32), region, path.stem)
                )
        return cls(textures)


def relative_density(grey: FloatArray, lesion: BoolArray) -> FloatArray:
    """Grey values → relative density t: 0 at the slice's aerated lung, 1 at its soft tissue.

    The anchors are the medians of the non-lesion pixels below and above the Otsu
    threshold of the slice (lung and body). Clipped to [−0.2, 1.3].
    """
    background = grey[~lesion]
    cut = threshold_otsu(background)
    dark, bright = background[background < cut], background[background >= cut]
    lung = float(np.median(dark)) if dark.size else 0.0
    tissue = float(np.median(bright)) if bright.size else 255.0
    scale = max(tissue - lung, 1.0)
    return np.clip((grey - lung) / scale, -0.2, 1.3).astype(np.float32)


def density_to_hu(t: FloatArray) -> FloatArray:
    return (LUNG_HU + t * (SOFT_TISSUE_HU - LUNG_HU)).astype(np.float32)


def _smooth_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> FloatArray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / max(float(field.std()), 1e-6)


def procedural_lesion(radius_px: float, rng: np.random.Generator) -> tuple[FloatArray, BoolArray]:
    """(relative density t, mask) of one lobulated lesion about ``radius_px`` across, ground glass or consolidation."""
    side = max(8, int(np.ceil(radius_px * 3)))
    yy, xx = np.mgrid[:side, :side].astype(np.float32)
    centre = (side - 1) / 2.0
    aspect = float(np.exp(rng.uniform(-0.4, 0.4)))
    angle = rng.uniform(0, np.pi)
    dy, dx = yy - centre, xx - centre
    u = (np.cos(angle) * dx + np.sin(angle) * dy) * aspect
    v = (-np.sin(angle) * dx + np.cos(angle) * dy) / aspect
    distance = np.hypot(u, v) / radius_px
    lobes = _smooth_noise((side, side), max(1.0, radius_px / 3.0), rng)
    shape = distance + 0.25 * lobes
    mask = shape < 1.0
    if mask.sum() < 4:
        mask = distance < 1.0
    consolidation = rng.random() < 0.3
    low, high = CONSOLIDATION_HU if consolidation else GGO_HU
    centre_hu = rng.uniform(low, high)
    edge_hu = max(LUNG_HU + 100.0, centre_hu - rng.uniform(50, 250))
    core = np.clip(1.0 - shape, 0.0, 1.0) ** 0.5
    hu = edge_hu + (centre_hu - edge_hu) * core + 70.0 * _smooth_noise((side, side), 1.2, rng)
    t = (hu - LUNG_HU) / (SOFT_TISSUE_HU - LUNG_HU)
    return np.where(mask, t, 0.0).astype(np.float32), mask


def _resized(texture: Texture, scale: float, rng: np.random.Generator) -> tuple[FloatArray, BoolArray]:
    """A bank texture scaled by ``scale``, rotated by a multiple of 90° and maybe mirrored."""
    density = ndimage.zoom(texture.density, scale, order=1)
    mask = ndimage.zoom(texture.mask.astype(np.float32), scale, order=1) > 0.5
    turns = int(rng.integers(4))
    density, mask = np.rot90(density, turns), np.rot90(mask, turns)
    if rng.random() < 0.5:
        density, mask = density[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(density), np.ascontiguousarray(mask)


def noise_sd_hu(hu: FloatArray, lung: BoolArray) -> float:
    """Noise of a slice inside its lungs (HU): robust SD of the high-pass residual."""
    residual = hu - ndimage.median_filter(hu, size=3)
    values = residual[lung]
    if values.size < 50:
        return 20.0
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def paste_lesions(
    hu: FloatArray,
    lung: BoolArray,
    rng: np.random.Generator,
    bank: TextureBank | None = None,
    n_lesions: int | None = None,
) -> tuple[FloatArray, BoolArray]:
    """Blend 1–3 lesions into the lungs of one HU slice; returns (new HU slice, lesion mask).

    The density is added on top of the recipient (``max`` of the recipient and lung plus
    lesion), so vessels stay visible; edges are softened over about one pixel. An empty
    ``lung`` gives the slice unchanged and an empty mask.
    """
    hu = np.asarray(hu, dtype=np.float32)
    lung = np.asarray(lung, dtype=bool)
    out = hu.copy()
    lesion_mask = np.zeros(hu.shape, dtype=bool)
    lung_area = int(lung.sum())
    if lung_area < 200:
        return out, lesion_mask
    count = n_lesions if n_lesions is not None else int(rng.choice([1, 1, 2, 2, 3]))
    depth = ndimage.distance_transform_edt(lung)
    lung_index = np.flatnonzero(lung)
    # peripheral: weight decays with depth into the lung (3 of 4 lesions), else anywhere
    peripheral_weight = np.exp(-depth.ravel()[lung_index] / max(2.0, 0.06 * np.sqrt(lung_area)))
    sd = noise_sd_hu(hu, lung)
    added = np.zeros(hu.shape, dtype=np.float32)
    for _ in range(count):
        area = lung_area * float(np.exp(rng.uniform(*np.log(AREA_FRACTION)))) / count
        if bank is not None and len(bank) and rng.random() < REAL_TEXTURE_SHARE:
            texture = bank.textures[int(rng.integers(len(bank)))]
            scale = float(np.sqrt(area / max(texture.mask.sum(), 1)))
            density, mask = _resized(texture, float(np.clip(scale, 0.2, 4.0)), rng)
        else:
            density, mask = procedural_lesion(float(np.sqrt(area / np.pi)), rng)
        if not mask.any():
            continue
        weights = peripheral_weight if rng.random() < 0.75 else np.ones_like(peripheral_weight)
        centre = np.unravel_index(rng.choice(lung_index, p=weights / weights.sum()), hu.shape)
        top = int(centre[0]) - mask.shape[0] // 2
        left = int(centre[1]) - mask.shape[1] // 2
        rows = slice(max(top, 0), min(top + mask.shape[0], hu.shape[0]))
        cols = slice(max(left, 0), min(left + mask.shape[1], hu.shape[1]))
        src = (slice(rows.start - top, rows.stop - top), slice(cols.start - left, cols.stop - left))
        patch_hu = density_to_hu(density[src]) - LUNG_HU  # density added to aerated lung
        patch_mask = mask[src] & lung[rows, cols]
        added[rows, cols] = np.where(patch_mask, np.maximum(added[rows, cols], patch_hu), added[rows, cols])
        lesion_mask[rows, cols] |= patch_mask
    if not lesion_mask.any():
        return out, lesion_mask
    alpha = np.clip(ndimage.gaussian_filter(lesion_mask.astype(np.float32), 0.8) * 1.5, 0, 1) * lung
    smooth_added = ndimage.grey_dilation(added, size=3) * (~lesion_mask) + added * lesion_mask
    noise = sd * 0.5 * rng.standard_normal(hu.shape).astype(np.float32)
    lesion_hu = LUNG_HU + smooth_added + noise
    out = np.where(alpha > 0, np.maximum(hu, (1 - alpha) * hu + alpha * lesion_hu), hu).astype(np.float32)
    return out, lesion_mask
