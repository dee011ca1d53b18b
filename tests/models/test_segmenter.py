"""Lung U-Net: builds offline, runs on CPU, predict_lung_labels shapes, dtype and side split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from corona_ct.models.segmenter import (
    SEGMENTER_ARCHITECTURE,
    SEGMENTER_INPUT,
    build_unet,
    is_binary_unet,
    predict_lung_labels,
)
from corona_ct.pipeline.config import SegmentConfig, WindowConfig
from corona_ct.pipeline.datamodel import LEFT_LUNG, RIGHT_LUNG, Geometry, Volume
from corona_ct.pipeline.errors import ModelError
from corona_ct.pipeline.segment import segment_lungs
from corona_ct.pipeline.segment.sides import split_sides


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    torch.manual_seed(0)
    return build_unet(num_classes=3).eval()


def test_build_unet_forward_pass_on_cpu(unet: nn.Module) -> None:
    model = unet
    with torch.inference_mode():
        logits = model(torch.rand(2, 1, 64, 64))
    assert logits.shape == (2, 3, 64, 64)
    assert SEGMENTER_ARCHITECTURE == "segmenter/unet-vgg16"
    assert SEGMENTER_INPUT.input_size % 32 == 0
    with pytest.raises(ModelError):
        build_unet(num_classes=5)


class _ColumnHalves(nn.Module):
    """Stand-in 3-class segmenter: dark pixels are lung, side by column half (deterministic)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dark = (x[:, 0] < 0.5).float()
        width = x.shape[-1]
        left_half = torch.zeros_like(dark)
        left_half[..., width // 2 :] = 1.0
        right = dark * (1 - left_half)
        left = dark * left_half
        return torch.stack([1 - dark, right, left], dim=1) * 10.0


class _Binary(nn.Module):
    """Stand-in 2-class segmenter with an smp-like segmentation head (2 output channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.segmentation_head = nn.Sequential(nn.Conv2d(1, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dark = (x[:, 0] < 0.5).float()
        return torch.stack([1 - dark, dark], dim=1)


def _two_blobs(n: int = 5, size: int = 96) -> np.ndarray:
    windowed = np.ones((n, size, size), dtype=np.float32)
    windowed[:, 20:76, 10:40] = 0.1
    windowed[:, 20:76, 56:86] = 0.1
    return windowed


def test_predict_lung_labels_shape_dtype_and_labels() -> None:
    windowed = _two_blobs()
    labels = predict_lung_labels(_ColumnHalves(), windowed, batch_size=2, device="cpu", input_size=64)
    assert labels.shape == windowed.shape and labels.dtype == np.uint8
    assert (labels[:, 30:66, 15:35] == RIGHT_LUNG).all()
    assert (labels[:, 30:66, 60:80] == LEFT_LUNG).all()
    assert not labels[:, :10].any()


def test_binary_model_is_split_into_sides_like_the_classical_path() -> None:
    windowed = _two_blobs()
    labels = predict_lung_labels(_Binary(), windowed, batch_size=4, device="cpu", input_size=64)
    assert set(np.unique(labels)) == {0, 1} and is_binary_unet(_Binary())
    sides = split_sides(labels > 0, windowed)
    assert (sides[:, 30:66, 15:35] == RIGHT_LUNG).all()
    assert (sides[:, 30:66, 60:80] == LEFT_LUNG).all()
    # segment_lungs splits a 2-class U-Net's lung into sides (predict_lung_labels does not)
    hu = np.where(_two_blobs(6, 128) < 0.5, -850.0, 40.0).astype(np.float32)
    hu[:, :4], hu[:, -4:], hu[:, :, :4], hu[:, :, -4:] = -1000.0, -1000.0, -1000.0, -1000.0  # air outside
    volume = Volume(hu, "HU", Geometry(hu.shape, (5.0, 2.0, 2.0)), "s", "synthetic")
    mask = segment_lungs(volume, SegmentConfig(batch_size=2), WindowConfig(), _Binary(), "cpu", 64)
    assert mask.method == "unet"
    assert (mask.labels == RIGHT_LUNG).sum() == (mask.labels == LEFT_LUNG).sum() > 0


def test_real_unet_runs_through_segment_lungs(unet: nn.Module) -> None:
    hu = np.where(_two_blobs(2, 64) < 0.5, -850.0, 40.0).astype(np.float32)
    volume = Volume(hu, "HU", Geometry(hu.shape, (5.0, 1.5, 1.5)), "s", "synthetic")
    mask = segment_lungs(volume, SegmentConfig(batch_size=2), WindowConfig(), model=unet, device="cpu")
    assert mask.method == "unet"
    assert mask.labels.shape == hu.shape and mask.labels.dtype == np.uint8
