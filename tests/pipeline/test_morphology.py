"""The in-plane morphology of pipeline.morphology gives exactly what scipy.ndimage gives with the
same disk, on random stacks with blobs touching the image edge, empty slices and anisotropic pixels;
its grey opening what ndimage gives, and its convex hull exactly what skimage gives."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.morphology import convex_hull_image

from corona_ct.pipeline.morphology import (
    close_in_plane,
    convex_hull_2d,
    dilate_in_plane,
    dilate_rows,
    disk_half_widths,
    erode_rows,
    fill_holes_in_plane,
    footprint_half_widths,
    grey_open_rows,
    in_parallel,
    in_slabs,
    slab_workers,
)

SPACINGS = [(0.7, 0.7), (0.6, 0.9), (1.0, 0.55)]


def _blobs(seed: int, shape: tuple[int, int, int] = (5, 70, 60), share: float = 0.08) -> np.ndarray:
    """Random smooth blobs, some cut by the image edge; slice 2 left empty."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=shape), (0, 3, 3))
    mask = noise > np.quantile(noise, 1 - share)
    mask[2] = False
    return mask


def _ellipse(radius_mm: float, spacing: tuple[float, float]) -> np.ndarray:
    """(1, h, w) footprint: pixels whose centre is within ``radius_mm`` (the form severity uses)."""
    ry, rx = radius_mm / spacing[0], radius_mm / spacing[1]
    y, x = np.ogrid[-int(ry) : int(ry) + 1, -int(rx) : int(rx) + 1]
    return ((y / ry) ** 2 + (x / rx) ** 2 <= 1.0)[None]


def _edt_disk(radius_mm: float, spacing: tuple[float, float]) -> np.ndarray:
    """(1, h, w) footprint of the offsets a distance transform puts within ``radius_mm``."""
    reach = [int(radius_mm / s) + 2 for s in spacing]
    seed = np.ones((2 * reach[0] + 1, 2 * reach[1] + 1), dtype=bool)
    seed[reach[0], reach[1]] = False
    inside = ndimage.distance_transform_edt(seed, sampling=spacing) <= radius_mm
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    return inside[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1][None]


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("radius_mm", [1.5, 2.5, 9.0])
def test_row_morphology_matches_ndimage(spacing: tuple[float, float], radius_mm: float) -> None:
    mask = _blobs(int(radius_mm * 10))
    footprint = _ellipse(radius_mm, spacing)
    widths = footprint_half_widths(footprint)
    assert np.array_equal(dilate_rows(mask, widths), ndimage.binary_dilation(mask, footprint))
    assert np.array_equal(erode_rows(mask, widths), ndimage.binary_erosion(mask, footprint))
    opened = dilate_rows(erode_rows(mask, widths), widths)
    assert np.array_equal(opened, ndimage.binary_opening(mask, footprint))


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("radius_mm", [0.3, 1.5, 2.5, 9.0])
def test_grey_opening_by_rows_matches_ndimage(spacing: tuple[float, float], radius_mm: float) -> None:
    """Value for value, edges mirrored as ndimage's "reflect" mode, in float32 and int16 (HU)."""
    rng = np.random.default_rng(int(radius_mm * 10))
    smooth = ndimage.gaussian_filter(rng.normal(size=(4, 41, 37)), (0, 2, 2)) * 300 - 700
    footprint = _ellipse(radius_mm, spacing) if radius_mm >= min(spacing) else np.ones((1, 1, 1), bool)
    widths = footprint_half_widths(footprint)
    for stack in (smooth.astype(np.float32), smooth.astype(np.int16)):
        opened = grey_open_rows(stack, widths)
        assert opened.dtype == stack.dtype
        assert np.array_equal(opened, ndimage.grey_opening(stack, footprint=footprint))
    # a one-pixel footprint leaves the stack as it is; any disk takes the peaks off
    assert np.array_equal(opened, stack) == (footprint.size == 1)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("radius_mm", [2.0, 6.0, 15.0])
def test_disks_in_mm_match_distance_transforms(spacing: tuple[float, float], radius_mm: float) -> None:
    mask = _blobs(int(radius_mm), share=0.03)
    assert np.array_equal(
        footprint_half_widths(_edt_disk(radius_mm, spacing)), disk_half_widths(radius_mm, spacing)
    )
    expected_near = np.stack(
        [
            ndimage.distance_transform_edt(~plane, sampling=spacing) <= radius_mm
            if plane.any()
            else np.zeros_like(plane)
            for plane in mask
        ]
    )
    assert np.array_equal(dilate_in_plane(mask, radius_mm, spacing), expected_near)
    # closing with False beyond the image: pad wider than the disk, close, crop
    pad = [int(radius_mm / s) + 2 for s in spacing]
    padded = np.pad(mask, ((0, 0), (pad[0],) * 2, (pad[1],) * 2))
    expected = ndimage.binary_closing(padded, _edt_disk(radius_mm, spacing))[
        :, pad[0] : -pad[0], pad[1] : -pad[1]
    ]
    closed = close_in_plane(mask, radius_mm, spacing)
    assert np.array_equal(closed, expected) and not closed[2].any()


def test_fill_holes_in_plane_matches_ndimage_per_slice() -> None:
    mask = ~_blobs(3, share=0.6)  # a background full of enclosed and border-touching pockets
    expected = np.stack([ndimage.binary_fill_holes(plane) for plane in mask])
    assert np.array_equal(fill_holes_in_plane(mask), expected)


def test_footprint_half_widths_refuses_rows_off_centre() -> None:
    footprint = np.zeros((3, 5), dtype=bool)
    footprint[1, 0:3] = True
    with pytest.raises(ValueError, match="centred"):
        footprint_half_widths(footprint)


def test_slabs_on_threads_give_the_single_thread_result_bit_for_bit(monkeypatch) -> None:
    stack = _blobs(7, shape=(40, 70, 60))
    footprint = _ellipse(3.0, (0.6, 0.9))
    widths = footprint_half_widths(footprint)
    inner_calls = []

    def filled(mask: np.ndarray) -> np.ndarray:
        inner_calls.append(mask.shape[0])
        return fill_holes_in_plane(mask)

    def closed_with_holes_filled(mask: np.ndarray) -> np.ndarray:
        # nested in_slabs calls (close_in_plane's dilations, fill_holes_in_plane): run in the slab
        return in_slabs(filled, close_in_plane(mask, 3.0, (0.6, 0.9)))

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread: no slabs
    assert slab_workers() == 1
    serial = closed_with_holes_filled(stack)
    assert inner_calls == [40]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # what --threads 2 sets
    assert slab_workers() == 2
    inner_calls.clear()
    threaded = in_slabs(closed_with_holes_filled, stack, workers=3)
    assert sorted(inner_calls) == [13, 13, 14]  # one call per slab: the nested calls were not split again
    np.testing.assert_array_equal(threaded, serial)
    inner_calls.clear()
    assert np.array_equal(in_slabs(closed_with_holes_filled, stack), serial)  # 2 slabs from the budget
    assert sorted(inner_calls) == [20, 20]
    assert np.array_equal(dilate_rows(stack, widths), ndimage.binary_dilation(stack, footprint))
    assert np.array_equal(erode_rows(stack, widths), ndimage.binary_erosion(stack, footprint))


def test_jobs_in_parallel_return_in_order_and_their_slab_calls_stay_on_their_thread(monkeypatch) -> None:
    stacks = [_blobs(seed, shape=(24, 40, 30)) for seed in (1, 2, 3)]
    slab_calls: list[int] = []

    def filled(mask: np.ndarray) -> np.ndarray:
        slab_calls.append(mask.shape[0])
        return fill_holes_in_plane(mask)

    def job(stack: np.ndarray) -> np.ndarray:
        return in_slabs(filled, stack)

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    results = in_parallel(*(lambda stack=stack: job(stack) for stack in stacks))
    assert slab_calls == [24, 24, 24]  # inside a job, in_slabs ran whole on the job's thread
    for stack, result in zip(stacks, results, strict=True):
        np.testing.assert_array_equal(result, fill_holes_in_plane(stack))
    slab_calls.clear()
    in_slabs(lambda part: in_parallel(lambda: job(part))[0], stacks[0])  # nested in a slab
    assert sorted(slab_calls) == [12, 12]
    assert in_parallel() == []


def test_convex_hull_2d_is_skimages_hull_pixel_for_pixel() -> None:
    rng = np.random.default_rng(7)
    compared = 0
    for trial in range(400):
        height, width = (int(n) for n in rng.integers(1, 48, size=2))
        mask = rng.random((height, width)) < rng.uniform(0.005, 0.3)  # scattered pixels: many edge cases
        if trial % 2:
            mask = ndimage.binary_dilation(mask, iterations=int(rng.integers(1, 3)))
        if mask.any():
            np.testing.assert_array_equal(
                convex_hull_2d(mask), convex_hull_image(mask), err_msg=f"trial {trial}"
            )
            compared += 1
    for blob in _blobs(3, share=0.2):  # lung-like smooth shapes
        if blob.any():
            np.testing.assert_array_equal(convex_hull_2d(blob), convex_hull_image(blob))
    single = np.zeros((5, 5), dtype=bool)
    single[2, 3] = True
    assert compared > 350
    np.testing.assert_array_equal(convex_hull_2d(single), single)  # one pixel is its own hull
    assert not convex_hull_2d(np.zeros((4, 4), dtype=bool)).any()
