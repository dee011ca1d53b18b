"""Window, lung box, model input and paste-back: exact values on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from corona_ct.pipeline.config import RoiConfig, WindowConfig
from corona_ct.pipeline.errors import ConfigError, GeometryError
from corona_ct.pipeline.preprocess import (
    ROI_LUNG_BOX,
    ROI_LUNG_ONLY,
    Box,
    evaluable_slices,
    input_lungs,
    lung_bounding_box,
    min_lung_pixels_for,
    paste_back,
    roi_name,
    slice_lung_fraction,
    to_model_input,
    window,
)


def test_window_hu_values_exact() -> None:
    hu = np.array([[[-2000.0, -1000.0, -750.0, -500.0, -250.0, 0.0, 400.0]]], dtype=np.float32)
    windowed = window(hu, "HU", WindowConfig())
    assert windowed.dtype == np.float32
    np.testing.assert_array_equal(windowed, [[[0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]]])


def test_window_other_range_and_int_input() -> None:
    hu = np.array([[[-1350, -600, 150, 1000]]], dtype=np.int16)
    windowed = window(hu, "HU", WindowConfig(hu_min=-1350.0, hu_max=150.0))
    np.testing.assert_array_equal(windowed, np.array([[[0.0, 0.5, 1.0, 1.0]]], dtype=np.float32))


def test_window_passes_windowed_images_through() -> None:
    grey = np.random.default_rng(0).random((2, 4, 5))
    out = window(grey, "window", WindowConfig())
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, grey.astype(np.float32))


def test_window_rejects_bad_units_and_range() -> None:
    with pytest.raises(ConfigError, match="units"):
        window(np.zeros((1, 2, 2)), "mm", WindowConfig())
    with pytest.raises(ConfigError, match="hu_max"):
        window(np.zeros((1, 2, 2)), "HU", WindowConfig(hu_min=0.0, hu_max=0.0))


def test_lung_bounding_box_is_union_over_slices_plus_margin() -> None:
    lungs = np.zeros((3, 100, 120), dtype=bool)
    lungs[0, 20:40, 30:50] = True  # rows 20..39
    lungs[2, 50:61, 10:20] = True  # rows 50..60, cols 10..19
    # union: rows [20, 61) height 41, cols [10, 50) width 40
    assert lung_bounding_box(lungs, RoiConfig(margin_fraction=0.0)) == Box(20, 61, 10, 50)
    # margin ceil(0.1*41)=5 rows, ceil(0.1*40)=4 columns
    assert lung_bounding_box(lungs, RoiConfig(margin_fraction=0.1)) == Box(15, 66, 6, 54)


def test_lung_bounding_box_clipped_to_image_and_none_without_lung() -> None:
    lungs = np.zeros((2, 10, 12), dtype=bool)
    assert lung_bounding_box(lungs, RoiConfig()) is None
    lungs[1, 0:10, 2:12] = True
    box = lung_bounding_box(lungs, RoiConfig(margin_fraction=0.25))
    assert box == Box(0, 10, 0, 12)
    assert (box.height, box.width) == (10, 12)


def test_evaluable_slices_threshold_scales_with_area() -> None:
    config = RoiConfig(min_lung_pixels=200)
    assert min_lung_pixels_for((512, 512), config) == 200
    assert min_lung_pixels_for((256, 256), config) == 50
    lungs = np.zeros((3, 256, 256), dtype=bool)
    lungs[0, :7, :7] = True  # 49 pixels: below 50
    lungs[1, :5, :10] = True  # exactly 50
    lungs[2, :20, :20] = True
    np.testing.assert_array_equal(evaluable_slices(lungs, config), [False, True, True])


def test_to_model_input_shape_and_constant_image() -> None:
    images = np.full((4, 50, 70), 0.3, dtype=np.float32)
    batch = to_model_input(images, None, 32)
    assert batch.shape == (4, 3, 32, 32)
    assert batch.dtype == torch.float32
    torch.testing.assert_close(batch, torch.full((4, 3, 32, 32), 0.3))


def test_to_model_input_crop_picks_the_box_region() -> None:
    images = np.zeros((2, 40, 60), dtype=np.float32)
    images[0, 10:20, 30:45] = 1.0
    images[1, 10:20, 30:45] = np.linspace(0, 1, 15, dtype=np.float32)
    box = Box(10, 20, 30, 45)
    batch = to_model_input(images, box, 15).numpy()
    np.testing.assert_allclose(batch[0], 1.0)  # only the box region survives
    # the three channels are identical copies of the grey image
    np.testing.assert_array_equal(batch[1, 0], batch[1, 2])
    # 10 rows → 15 rows of a row-constant image: every row equals the ramp resized along x (identity)
    np.testing.assert_allclose(batch[1, 0], np.broadcast_to(images[1, 10, 30:45], (15, 15)), atol=1e-6)


def test_to_model_input_blanks_outside_the_lungs_when_asked() -> None:
    rng = np.random.default_rng(0)
    images = rng.uniform(0.2, 1.0, size=(2, 30, 30)).astype(np.float32)
    lungs = np.zeros((2, 30, 30), dtype=bool)
    lungs[0, 5:25, 8:20] = True
    lungs[1, 2:12, 3:28] = True
    box = Box(0, 30, 0, 30)  # no crop, no resize: pixels compare one to one
    masked = to_model_input(images, box, 30, lungs).numpy()[:, 0]
    np.testing.assert_allclose(masked[lungs], images[lungs], atol=1e-6)
    assert (masked[~lungs] == 0).all()  # air outside the lungs
    assert (to_model_input(images, box, 30) > 0).all()  # without lungs nothing is blanked
    # a tensor mask works alike, and a mask of another shape is refused
    from_tensor = to_model_input(torch.from_numpy(images), box, 30, torch.from_numpy(lungs))
    torch.testing.assert_close(from_tensor, to_model_input(images, box, 30, lungs))
    with pytest.raises(GeometryError, match="lung mask"):
        to_model_input(images, box, 30, lungs[:1])


def test_input_lungs_and_roi_name_follow_the_config() -> None:
    lungs = np.ones((1, 4, 4), dtype=bool)
    assert input_lungs(lungs, RoiConfig()) is None and roi_name(RoiConfig()) == ROI_LUNG_BOX
    masked = RoiConfig(mask_outside_lungs=True)
    assert input_lungs(lungs, masked) is lungs and roi_name(masked) == ROI_LUNG_ONLY
    assert input_lungs(np.zeros((1, 4, 4), dtype=bool), masked) is None  # no lung: the slice is used whole


def test_to_model_input_rejects_box_outside_image() -> None:
    with pytest.raises(GeometryError):
        to_model_input(np.zeros((1, 10, 10), dtype=np.float32), Box(0, 11, 0, 5), 8)


def test_paste_back_round_trip_for_smooth_images() -> None:
    yy, xx = np.mgrid[0:120, 0:150].astype(np.float32)
    smooth = 0.5 + 0.4 * np.sin(yy / 17.0) * np.cos(xx / 23.0)
    images = np.stack([smooth, smooth[::-1].copy()])
    box = Box(15, 110, 20, 140)
    restored = paste_back(to_model_input(images, box, 64)[:, 0], box, (120, 150))
    assert restored.shape == images.shape and restored.dtype == np.float32
    inside = np.zeros((120, 150), dtype=bool)
    inside[box.slices] = True
    # bilinear resampling of a slowly varying image: small error inside, exact zeros outside
    assert np.abs(restored[:, inside] - images[:, inside]).max() < 0.02
    assert not restored[:, ~inside].any()


def test_paste_back_whole_slice_and_tensor_input() -> None:
    maps = torch.ones(3, 16, 16)
    out = paste_back(maps, None, (40, 24))
    assert out.shape == (3, 40, 24)
    np.testing.assert_allclose(out, 1.0)


def test_slice_lung_fraction_is_each_slices_share_of_the_largest() -> None:
    lungs = np.zeros((4, 10, 10), dtype=bool)
    lungs[1, :5, :4] = True  # 20 px
    lungs[2, :8, :5] = True  # 40 px: the largest
    lungs[3, 0, :2] = True  # 2 px
    assert np.allclose(slice_lung_fraction(lungs), [0.0, 0.5, 1.0, 0.05])
    assert not slice_lung_fraction(np.zeros((3, 4, 4), dtype=bool)).any()
