"""Counterfactual lesions: inside the lungs, denser than the lung, vessels kept, real textures calibrated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from corona_ct.data.lesions import (
    TextureBank,
    noise_sd_hu,
    paste_lesions,
    procedural_lesion,
    relative_density,
)
from corona_ct.data.phantom import make_phantom


@pytest.fixture(scope="module")
def clean_slice() -> tuple[np.ndarray, np.ndarray]:
    phantom = make_phantom(seed=3, shape=(8, 128, 128), spacing_mm=(5.0, 2.5, 2.5))
    z = int(np.argmax((phantom.lung_labels > 0).sum(axis=(1, 2))))
    return phantom.hu[z].astype(np.float32), phantom.lung_labels[z] > 0


def test_pasted_lesions_lie_in_the_lung_and_raise_its_density(
    clean_slice: tuple[np.ndarray, np.ndarray],
) -> None:
    hu, lung = clean_slice
    for seed in range(5):
        pasted, mask = paste_lesions(hu, lung, np.random.default_rng(seed), bank=None)
        assert mask.any() and not (mask & ~lung).any()
        # outside the lungs nothing changes; inside the lesion the lung gets denser
        assert np.array_equal(pasted[~lung], hu[~lung])
        assert np.median(pasted[mask] - hu[mask]) > 150
        assert pasted.min() >= hu.min() - 1 and np.all(pasted >= hu - 1e-3)  # added, never subtracted


def test_no_lung_gives_the_slice_unchanged(clean_slice: tuple[np.ndarray, np.ndarray]) -> None:
    hu, _ = clean_slice
    pasted, mask = paste_lesions(hu, np.zeros(hu.shape, bool), np.random.default_rng(0))
    assert not mask.any() and np.array_equal(pasted, hu)


def test_procedural_lesions_are_ground_glass_or_consolidation() -> None:
    kinds = set()
    for seed in range(30):
        t, mask = procedural_lesion(12.0, np.random.default_rng(seed))
        hu = -850 + t[mask] * 890
        assert mask.sum() > 50
        kinds.add("consolidation" if np.median(hu) > -250 else "ggo")
        assert -800 < np.median(hu) < 100
    assert kinds == {"ggo", "consolidation"}


def test_relative_density_maps_lung_to_0_and_tissue_to_1() -> None:
    grey = np.full((64, 64), 200.0, np.float32)  # soft tissue
    grey[16:48, 8:56] = 40.0  # aerated lung
    lesion = np.zeros(grey.shape, bool)
    lesion[20:30, 20:30] = True
    grey[lesion] = 120.0
    t = relative_density(grey, lesion)
    assert t[40, 40] == pytest.approx(0.0) and t[2, 2] == pytest.approx(1.0)
    assert t[25, 25] == pytest.approx(0.5)


def test_texture_bank_cuts_each_infection_region(tmp_path: Path) -> None:
    images, masks = tmp_path / "Imgs", tmp_path / "GT"
    images.mkdir()
    masks.mkdir()
    grey = np.full((64, 64), 200, np.uint8)
    grey[10:54, 10:54] = 40
    mask = np.zeros((64, 64), np.uint8)
    mask[12:24, 12:24] = 255
    mask[30:50, 30:40] = 255
    grey[mask > 0] = 120
    Image.fromarray(grey).save(images / "7.jpg", quality=100)
    Image.fromarray(mask).save(masks / "7.png")
    bank = TextureBank.from_folders(images, masks)
    assert len(bank) == 2 and bank.sources == ("7",)
    assert sorted(t.mask.sum() for t in bank.textures) == [144, 200]
    assert all(0.3 < float(np.median(t.density[t.mask])) < 0.7 for t in bank.textures)
    assert len(TextureBank.from_folders(images, masks, names=["8"])) == 0


def test_noise_estimate_follows_the_noise() -> None:
    rng = np.random.default_rng(0)
    lung = np.ones((128, 128), bool)
    quiet = noise_sd_hu((-850 + 10 * rng.standard_normal((128, 128))).astype(np.float32), lung)
    loud = noise_sd_hu((-850 + 60 * rng.standard_normal((128, 128))).astype(np.float32), lung)
    assert loud > 4 * quiet
