"""Batch augmentation and synthetic lesions: per-sample transforms, exact flips, lesions only in the lungs."""

from __future__ import annotations

import dataclasses

import torch

from corona_ct.models.augment import augment_batch, insert_synthetic_lesions, random_affine_params
from corona_ct.models.train_classifier import TrainConfig


def test_augmentation_is_per_sample_and_exact_for_flips() -> None:
    images = torch.rand(6, 1, 20, 20)
    identity = dataclasses.replace(
        TrainConfig.gozes(), rotation_deg=0.0, hflip=False, vflip=False, crop_scale=1.0
    )
    same, _ = augment_batch(images, identity, torch.Generator().manual_seed(0))
    torch.testing.assert_close(same, images, atol=1e-5, rtol=0)
    flips = dataclasses.replace(identity, hflip=True, vflip=True)
    generator = torch.Generator().manual_seed(1)
    theta = random_affine_params(6, flips, torch.Generator().manual_seed(1))
    flipped, _ = augment_batch(images, flips, generator)
    for i in range(6):
        dims = [d for d, sign in ((2, theta[i, 0, 0]), (1, theta[i, 1, 1])) if sign < 0]
        torch.testing.assert_close(flipped[i], images[i].flip(dims) if dims else images[i], atol=1e-5, rtol=0)
    rotated, _ = augment_batch(images, TrainConfig.covid_ctset(), torch.Generator().manual_seed(2))
    differences = (rotated - images).abs().flatten(1).mean(1)
    assert differences.unique().numel() == 6  # each sample gets its own transform


def test_synthetic_lesions_stay_inside_the_lungs_and_raise_density() -> None:
    labels = torch.zeros(4, 32, 32, dtype=torch.long)
    labels[:, 8:24, 4:14] = 1
    labels[:, 8:24, 18:28] = 2
    images = torch.full((4, 1, 32, 32), 0.1)
    out = insert_synthetic_lesions(images, labels, torch.Generator().manual_seed(0), probability=1.0)
    changed = (out - images).abs()[:, 0] > 1e-6
    assert changed.any(dim=(1, 2)).all()  # every slice got a lesion
    assert not changed[labels == 0].any()  # never outside the lungs
    assert (
        float(out.max()) <= 0.95 + 1e-6 and float((out - images).min()) >= 0
    )  # only denser, at most ≈ −50 HU
    untouched = insert_synthetic_lesions(images, labels, torch.Generator().manual_seed(0), probability=0.0)
    torch.testing.assert_close(untouched, images)
