"""Lung U-Net training: card with validation Dice, exact resume, named validation volumes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from corona_ct.data.datasets import SegmentationSlices
from corona_ct.data.phantom import make_phantom
from corona_ct.models.train_segmenter import SegTrainConfig, dice_per_class, train_segmenter
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.errors import ConfigError
from corona_ct.pipeline.preprocess import window


@pytest.mark.slow
def test_segmenter_training_writes_a_card_with_validation_dice(tmp_path: Path) -> None:
    phantom = make_phantom(seed=5, shape=(12, 64, 64), lesions="mixed")
    windowed = torch.from_numpy(window(phantom.hu, "HU", PipelineConfig().window))
    slices = SegmentationSlices(windowed, torch.from_numpy(np.array(phantom.lung_labels)))
    config = SegTrainConfig(input_size=64, epochs=1, batch_size=4, device="cpu", seed=0)
    result = train_segmenter(slices, ["p5"] * len(slices), config, tmp_path)
    card = json.loads((tmp_path / "model.json").read_text())
    assert card["architecture"] == "segmenter/unet-vgg16" and card["num_classes"] == 3
    assert card["input"]["channels"] == 1 and 0.0 <= card["best_validation"]["dice_mean"] <= 1.0
    assert card["validation_split"] == "every fifth slice of one volume"
    assert card["epochs_run"] == 1 and card["stopped_early"] is False
    assert result.best_epoch == 1


@pytest.mark.slow
def test_segmenter_resume_continues_exactly_like_an_uninterrupted_run(tmp_path: Path) -> None:
    phantom = make_phantom(seed=6, shape=(10, 48, 48), lesions="mixed")
    windowed = torch.from_numpy(window(phantom.hu, "HU", PipelineConfig().window))
    slices = SegmentationSlices(windowed, torch.from_numpy(np.array(phantom.lung_labels)))
    config = SegTrainConfig(input_size=48, epochs=2, batch_size=4, device="cpu", seed=0, patience=0)
    full = train_segmenter(slices, ["p6"] * len(slices), config, tmp_path / "full")
    train_segmenter(slices, ["p6"] * len(slices), dataclasses.replace(config, epochs=1), tmp_path / "split")
    resumed = train_segmenter(slices, ["p6"] * len(slices), config, tmp_path / "split", resume=True)
    assert [row["epoch"] for row in resumed.history] == [1, 2]
    assert resumed.best_epoch == full.best_epoch
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="lr"):
        train_segmenter(
            slices, ["p6"] * len(slices), dataclasses.replace(config, lr=0.5), tmp_path / "split", resume=True
        )


@pytest.mark.slow
def test_segmenter_validation_groups_can_be_named(tmp_path: Path) -> None:
    volumes = [make_phantom(seed=seed, shape=(6, 32, 32), lesions="none") for seed in (8, 9)]
    windowed = torch.from_numpy(
        np.concatenate([window(v.hu, "HU", PipelineConfig().window) for v in volumes])
    )
    labels = torch.from_numpy(np.concatenate([np.array(v.lung_labels) for v in volumes]))
    groups = ["p8"] * 6 + ["p9"] * 6
    config = SegTrainConfig(input_size=32, epochs=1, batch_size=4, device="cpu", val_groups=("p9",))
    result = train_segmenter(SegmentationSlices(windowed, labels), groups, config, tmp_path / "named")
    assert result.card["validation_split"] == "by volume: p9"
    assert result.card["n_train_slices"] == 6 and result.card["n_val_slices"] == 6
    with pytest.raises(ConfigError, match="p7"):
        train_segmenter(
            SegmentationSlices(windowed, labels), groups,
            dataclasses.replace(config, val_groups=("p7",)), tmp_path / "unknown",
        )  # fmt: skip


def test_dice_per_class_is_nan_only_where_both_sides_are_empty() -> None:
    pred = torch.tensor([[0, 1, 1], [2, 0, 0]])
    truth = torch.tensor([[0, 1, 0], [0, 0, 0]])
    right, left = dice_per_class(pred, truth, 3)
    assert right == pytest.approx(2 / 3) and left == 0.0
    assert all(np.isnan(dice_per_class(torch.zeros(2, 3), torch.zeros(2, 3), 3)))
