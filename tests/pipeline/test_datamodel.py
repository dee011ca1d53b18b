import numpy as np
import pytest

from corona_ct.pipeline.datamodel import Geometry, SourceOrder, Volume
from corona_ct.pipeline.errors import GeometryError, UnsupportedInputError


def test_affines_map_voxels_to_lps_and_ras() -> None:
    geometry = Geometry(shape=(4, 5, 6), spacing_mm=(2.5, 0.7, 0.8), origin_lps=(-100.0, -120.0, 30.0))
    index_zyx = np.array([3, 2, 1, 1.0])
    lps = geometry.affine_lps() @ index_zyx
    np.testing.assert_allclose(lps[:3], [-100 + 1 * 0.8, -120 + 2 * 0.7, 30 + 3 * 2.5])
    ras = geometry.affine_ras() @ np.array([1, 2, 3, 1.0])  # (i, j, k) = (x, y, z)
    np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]])
    assert geometry.voxel_ml == pytest.approx(2.5 * 0.7 * 0.8 / 1000)
    np.testing.assert_allclose(geometry.slice_positions_mm(), [30, 32.5, 35, 37.5])


def test_geometry_refuses_nonsense() -> None:
    with pytest.raises(GeometryError, match="positive"):
        Geometry(shape=(2, 2, 2), spacing_mm=(0.0, 1.0, 1.0))
    with pytest.raises(GeometryError, match="3D"):
        Geometry(shape=(2, 2), spacing_mm=(1.0, 1.0, 1.0))  # type: ignore[arg-type]


def test_volume_is_read_only_and_windowed_stacks_have_no_hu() -> None:
    array = np.zeros((2, 3, 4), np.float32)
    volume = Volume(array, "window", Geometry((2, 3, 4), (1.0, 1.0, 1.0)), "s", "src")
    with pytest.raises(ValueError, match="read-only"):
        volume.array[0, 0, 0] = 1
    with pytest.raises(UnsupportedInputError, match="without Hounsfield units"):
        _ = volume.hu
    with pytest.raises(GeometryError, match="float32"):
        Volume(array.astype(np.float64), "HU", Geometry((2, 3, 4), (1.0, 1.0, 1.0)), "s", "src")  # type: ignore[arg-type]


def test_source_order_undoes_a_permutation_and_flip() -> None:
    source = np.arange(24).reshape(2, 3, 4)
    canonical = np.flip(source, axis=0).transpose(2, 1, 0)  # how a reader might canonicalise
    order = SourceOrder(perm=(2, 1, 0), flip_axes=(0,), affine=tuple(tuple(r) for r in np.eye(4)))
    np.testing.assert_array_equal(order.to_source(canonical), source)
