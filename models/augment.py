"""Training-time augmentation: one vectorised random affine per batch, synthetic lung lesions.

:func:`augment_batch` draws a per-sample rotation, flips, zoom, shift and crop and
applies them through ``affine_grid``/``grid_sample`` on the training device; label
maps are warped identically (nearest). :func:`insert_synthetic_lesions` blends
ground-glass and consolidation blobs into the lungs of U-Net training slices.
Every draw comes from the ``torch.Generator`` passed in, so a run is reproducible.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

#: Target grey values of the synthetic lesions on the [−1000, 0] HU window: GGO ≈ −500 HU,
#: consolidation ≈ −50 HU (window value = (HU + 1000) / 1000).
GGO_WINDOW, CONSOLIDATION_WINDOW = 0.5, 0.95


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def random_affine_params(n: int, config: Any, generator: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) sampling matrices (output → input, normalised coordinates) for ``affine_grid``.

    Uses ``rotation_deg`` (degrees), ``hflip``, ``vflip``, ``zoom``, ``shift`` and
    ``crop_scale`` (fractions) of ``config``. A crop keeping area fraction ``a`` samples
    a window of side √a whose centre is drawn so that it stays inside the image; the
    zoom factor then scales it.
    """
    angle = torch.deg2rad(_uniform(n, -config.rotation_deg, config.rotation_deg, generator))
    crop_side = torch.sqrt(_uniform(n, config.crop_scale, 1.0, generator))
    scale = crop_side * _uniform(n, 1.0 - config.zoom, 1.0 + config.zoom, generator)
    offset = (1.0 - crop_side)[:, None] * _uniform(2 * n, -1.0, 1.0, generator).view(n, 2)
    offset = offset + 2.0 * config.shift * _uniform(2 * n, -1.0, 1.0, generator).view(n, 2)
    flip_x = (
        torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if config.hflip else torch.ones(n)
    )
    flip_y = (
        torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if config.vflip else torch.ones(n)
    )
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    # Rotation × isotropic scale × axis flips; images are square so normalised axes are isotropic.
    theta[:, 0, 0] = scale * cos * flip_x
    theta[:, 0, 1] = -scale * sin * flip_y
    theta[:, 1, 0] = scale * sin * flip_x
    theta[:, 1, 1] = scale * cos * flip_y
    theta[:, :, 2] = offset
    return theta


def augment_batch(
    images: torch.Tensor, config: Any, generator: torch.Generator, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random per-sample affine of an (N, C, S, S) batch (zeros outside = air); labels by nearest.

    Returns the augmented images and, when given, the (N, S, S) label maps warped identically.
    """
    theta = random_affine_params(images.shape[0], config, generator).to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if labels is None:
        return warped, None
    warped_labels = F.grid_sample(
        labels[:, None].to(images.dtype), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )
    return warped, warped_labels[:, 0].round().long()


def insert_synthetic_lesions(
    images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, probability: float = 0.5,
    max_lesions: int = 4,
) -> torch.Tensor:  # fmt: skip
    """Blend GGO / consolidation blobs into the lungs of an (N, 1, S, S) windowed batch.

    Each selected slice receives up to ``max_lesions`` Gaussian blobs centred on random
    lung pixels (radius 3–12 % of the side), pulling grey values towards ≈ −500 HU
    (ground glass) or ≈ −50 HU (consolidation), only inside the lung labels. The labels
    are unchanged: dense lesions belong to the lung, which is what the network must learn.
    """
    n, _, size, _ = images.shape
    lung = (labels > 0).to(images.dtype)  # (N, S, S)
    flat = lung.reshape(n, -1).cpu()
    chosen = (torch.rand(n, generator=generator) < probability) & (flat.sum(1) > 0)
    if not chosen.any():
        return images
    k = max_lesions
    # Lesion centres drawn among lung pixels (uniform weights over the mask, slices without lung masked out).
    weights = torch.where(flat.sum(1, keepdim=True) > 0, flat, torch.ones_like(flat))
    centres = torch.multinomial(weights, k, replacement=True, generator=generator)  # (N, k)
    cy, cx = (centres // size).float(), (centres % size).float()
    radius = size * (0.03 + 0.09 * torch.rand(n, k, generator=generator))
    active = (torch.rand(n, k, generator=generator) < 0.7) | (torch.arange(k) == 0)  # ≥ 1 blob per slice
    target = torch.where(torch.rand(n, k, generator=generator) < 0.6, GGO_WINDOW, CONSOLIDATION_WINDOW)
    strength = (0.6 + 0.4 * torch.rand(n, k, generator=generator)) * active * chosen[:, None]
    coords = torch.arange(size, dtype=torch.float32)
    dist2 = (coords[None, None, :, None] - cy[..., None, None]) ** 2 + (
        coords[None, None, None, :] - cx[..., None, None]
    ) ** 2  # (N, k, S, S)
    blobs = strength[..., None, None] * torch.exp(-dist2 / (2.0 * radius[..., None, None] ** 2))
    blobs = blobs.to(images.device, images.dtype)
    target_map = target[..., None, None].to(images.device, images.dtype)
    # Blend blob by blob: a pixel moves towards the strongest lesion's grey value, never beyond it.
    weight = torch.clamp(blobs.sum(1), max=1.0) * lung  # (N, S, S)
    mixed_target = (blobs * target_map).sum(1) / blobs.sum(1).clamp_min(1e-6)
    lesioned = images[:, 0] + weight * (torch.maximum(mixed_target, images[:, 0]) - images[:, 0])
    return lesioned[:, None]
