"""The shared real DICOM series load with the documented shapes, spacings and plausible HU."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from corona_ct.pipeline.ingest import discover, load_study

pytestmark = pytest.mark.realdata


def _timed_load(folder: Path) -> tuple[object, float]:
    start = time.perf_counter()
    volume = load_study(folder)
    elapsed = time.perf_counter() - start
    print(f"load {folder.name}: {elapsed:.3f} s")
    return volume, elapsed


def _lung_voxels(hu: np.ndarray) -> np.ndarray:
    """Low-density voxels inside the body: body = largest > -500 HU component with holes filled per slice."""
    body_labels, _ = ndimage.label(hu > -500)
    sizes = np.bincount(body_labels.ravel())
    sizes[0] = 0
    body = body_labels == sizes.argmax()
    filled = np.stack([ndimage.binary_fill_holes(s) for s in body])
    inside_air = filled & ~body
    labels, _ = ndimage.label(inside_air)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = np.argsort(sizes)[::-1][:2]  # two lungs (or one joined component)
    return hu[np.isin(labels, largest[sizes[largest] > 0])]


@pytest.mark.parametrize(
    "name, shape, z_mm",
    [("LIDC-IDRI-0001", (16, 512, 512), 2.5), ("LIDC-IDRI-0002", (12, 512, 512), 1.25)],
)
def test_lidc_loads_with_lungs_in_hu(
    shared_data: Path, name: str, shape: tuple[int, int, int], z_mm: float
) -> None:
    volume, elapsed = _timed_load(shared_data / "dicom" / name)
    assert volume.hu.shape == shape  # type: ignore[attr-defined]
    spacing = volume.geometry.spacing_mm  # type: ignore[attr-defined]
    assert spacing[0] == pytest.approx(z_mm)
    if name == "LIDC-IDRI-0001":
        assert spacing[1:] == pytest.approx((0.703125, 0.703125))
        assert elapsed < 2.0
    hu = volume.hu  # type: ignore[attr-defined]
    corner_air = np.median(hu[:, :20, 200:300])  # above the patient: room air
    assert -1050 < corner_air < -950
    assert hu.min() >= -1024  # padding and out-of-field fill became air, not -2048/-3024
    lung = _lung_voxels(hu)
    assert lung.size > 100_000
    assert np.mean((lung > -950) & (lung < -700)) > 0.6
    assert volume.study_id.startswith("study-")  # type: ignore[attr-defined]  # folder name is the PatientID


def test_abdomen_jpeg2000_decodes(shared_data: Path) -> None:
    folder = shared_data / "dicom" / "abdomen-j2k"
    (study,) = discover([folder])
    assert study.series[0].transfer_syntax_uid == "1.2.840.10008.1.2.4.90"
    volume, _ = _timed_load(folder)
    hu = volume.hu  # type: ignore[attr-defined]
    assert hu.shape == (20, 512, 512)
    assert volume.geometry.spacing_mm == pytest.approx((2.0, 0.9765625, 0.9765625))  # type: ignore[attr-defined]
    assert -1050 < np.median(hu[:, :15, :]) < -950
    body = hu[(hu > -200) & (hu < 200)]
    assert 0 < np.median(body) < 100
