"""Classical lung segmentation on real CT: LIDC-IDRI-0001 volume and COVID-SemiSeg infection coverage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.datamodel import LEFT_LUNG, RIGHT_LUNG, Geometry, Volume
from corona_ct.pipeline.segment import segment_lungs

pytestmark = pytest.mark.realdata


def test_lidc_lung_volume_is_plausible(shared_data: Path) -> None:
    from corona_ct.pipeline.ingest import load_study

    config = PipelineConfig()
    volume = load_study(shared_data / "dicom" / "LIDC-IDRI-0001", config.ingest)
    mask = segment_lungs(volume, config.segment, config.window)
    voxel_ml = volume.geometry.voxel_ml
    right_ml = np.count_nonzero(mask.labels == RIGHT_LUNG) * voxel_ml
    left_ml = np.count_nonzero(mask.labels == LEFT_LUNG) * voxel_ml
    print(f"LIDC-IDRI-0001 lung volume: right {right_ml:.0f} ml, left {left_ml:.0f} ml")
    # a 16-slice, 2.5 mm (40 mm) slab of an adult chest
    assert 300.0 <= right_ml + left_ml <= 2000.0
    assert right_ml > 0.25 * left_ml and left_ml > 0.25 * right_ml
    # right lung on the image's left (low column index)
    cols = np.arange(volume.array.shape[2])
    right_col = (np.count_nonzero(mask.labels == RIGHT_LUNG, axis=(0, 1)) * cols).sum() / (
        right_ml / voxel_ml
    )
    left_col = (np.count_nonzero(mask.labels == LEFT_LUNG, axis=(0, 1)) * cols).sum() / (left_ml / voxel_ml)
    assert right_col < left_col


def test_semiseg_infection_lies_inside_the_lung_mask(shared_data: Path) -> None:
    """Each JPEG slice as a 1-slice windowed volume; pooled infection pixels inside the mask."""
    config = PipelineConfig()
    images = sorted((shared_data / "covid-semiseg" / "train" / "Imgs").glob("*.jpg"))
    assert len(images) == 50
    inside = total = 0
    for path in images:
        grey = np.asarray(Image.open(path).convert("L"), dtype=np.float32)[None] / 255.0
        infection = np.asarray(Image.open(path.parent.parent / "GT" / f"{path.stem}.png").convert("L")) > 127
        volume = Volume(grey, "window", Geometry(grey.shape, (1.0, 1.0, 1.0)), path.stem, str(path))
        lungs = segment_lungs(volume, config.segment, config.window).labels[0] > 0
        inside += np.count_nonzero(infection & lungs)
        total += np.count_nonzero(infection)
    fraction = inside / total
    print(f"COVID-SemiSeg train: {fraction:.4f} of {total} infection pixels inside the lung mask")
    assert fraction >= 0.88
