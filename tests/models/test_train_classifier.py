"""Classifier training: learns phantom lesions, resumes exactly, writes safe checkpoints; recipes; lesion heads."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from corona_ct.data.datasets import MASK_UNKNOWN, SliceDataset, slices_to_model_input
from corona_ct.data.phantom import make_phantom
from corona_ct.models.checkpoint import load_checkpoint, load_classifier
from corona_ct.models.metrics import roc_auc
from corona_ct.models.train_classifier import TrainConfig, predict_probabilities, train_classifier
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.errors import ConfigError, ModelError
from corona_ct.pipeline.preprocess import window

SIZE = 32  # tiny input: the recipe's ResNet-50 unchanged, only the image is small


def phantom_slices(seeds: range, size: int = SIZE) -> SliceDataset:
    """Lung slices of phantoms with lesions (label 1: slices holding lesion) and without (label 0)."""
    config = PipelineConfig()
    images, labels = [], []
    for seed in seeds:
        for lesions, label in (("consolidation", 1), ("none", 0)):
            volume_ml = 30.0 if label else None
            phantom = make_phantom(seed=seed, shape=(12, 64, 64), lesions=lesions, lesion_volume_ml=volume_ml)
            lungs = phantom.lung_labels > 0
            lesion_pixels = phantom.lesion_mask.sum(axis=(1, 2))
            keep = lungs.sum(axis=(1, 2)) >= 200
            keep &= lesion_pixels >= 30 if label else True
            windowed = window(phantom.hu, "HU", config.window)
            grey = slices_to_model_input(windowed, lungs, size, config)  # case-wide lung box, as inference
            images.append(grey[torch.from_numpy(keep)])
            labels += [label] * int(keep.sum())
    return SliceDataset(torch.cat(images), labels)


@pytest.fixture(scope="module")
def phantom_data() -> tuple[SliceDataset, SliceDataset]:
    return phantom_slices(range(0, 6)), phantom_slices(range(100, 103))


def quick_config(**overrides: object) -> TrainConfig:
    """The Gozes recipe (ResNet-50, its augmentation) at a tiny input, lr 1e-3 for a short CPU run."""
    values: dict[str, object] = {
        "input_size": SIZE,
        "epochs": 4,
        "batch_size": 8,
        "patience": 0,
        "device": "cpu",
        "lr": 1e-3,
    }
    return TrainConfig.gozes(**{**values, **overrides})


@pytest.mark.slow
def test_resnet50_learns_phantom_lesions_and_card_describes_the_run(
    phantom_data: tuple[SliceDataset, SliceDataset], tmp_path: Path
) -> None:
    train, held_out = phantom_data
    assert 0.3 < train.labels.float().mean() < 0.7
    result = train_classifier(
        train, held_out, quick_config(), tmp_path, class_names=("normal", "covid"), roi="lung-bbox",
        card_extra={"manifest_sha256": "0" * 64},
    )  # fmt: skip
    probs = predict_probabilities(result.model, held_out)
    # well above chance (0.5); four epochs land at 0.87-0.95 depending on the CPU's arithmetic and thread count
    assert roc_auc(held_out.labels.numpy(), probs) >= 0.8
    card = json.loads((tmp_path / "model.json").read_text())
    assert card["architecture"] == "classifier/resnet50"
    assert card["input"] == {"size": SIZE, "channels": 3, "window": [-1000.0, 0.0], "roi": "lung-bbox"}
    assert card["class_names"] == ["normal", "covid"] and card["seed"] == 0
    assert card["best_validation"]["auc"] == pytest.approx(max(r["val_auc"] for r in result.history))
    assert {"manifest_sha256", "train_seconds", "corona_ct_version", "sha256", "epochs_run"} <= set(card)
    history = (tmp_path / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,train_loss,train_acc,lr,val_loss,val_acc,val_auc")
    assert len(history) == 1 + len(result.history) == 5
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pth"))  # never pickle


@pytest.mark.slow
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path: Path) -> None:
    data = phantom_slices(range(200, 201))
    config = quick_config(epochs=2, batch_size=8, optimizer="nadam", recipe="covid-ctset", num_outputs=2)
    full = train_classifier(data, None, config, tmp_path / "full")
    train_classifier(data, None, dataclasses.replace(config, epochs=1), tmp_path / "split")
    resumed = train_classifier(data, None, config, tmp_path / "split", resume=True)
    assert [row["epoch"] for row in resumed.history] == [1, 2]
    for (name, a), b in zip(
        full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(ConfigError, match="different lr"):
        train_classifier(data, None, dataclasses.replace(config, lr=0.5), tmp_path / "split", resume=True)


def test_cosine_schedule_sets_each_epochs_rate_and_refuses_a_resume_that_bends_it(tmp_path: Path) -> None:
    data = phantom_slices(range(200, 201))
    config = quick_config(epochs=2, batch_size=8, lr=1e-3, lr_schedule="cosine")
    assert [config.lr_at(e) for e in (1, 2)] == pytest.approx([1e-3, 0.5e-3])
    result = train_classifier(data, None, config, tmp_path / "cosine")
    assert [row["lr"] for row in result.history] == pytest.approx([1e-3, 0.5e-3])
    with pytest.raises(ConfigError, match="different epochs"):
        train_classifier(data, None, dataclasses.replace(config, epochs=3), tmp_path / "cosine", resume=True)
    assert quick_config(epochs=2).lr_at(2) == quick_config(epochs=2).lr  # constant: every epoch the same
    with pytest.raises(ConfigError, match="lr_schedule"):
        TrainConfig.gozes(lr_schedule="step")


@pytest.mark.slow
def test_checkpoint_round_trips_and_is_refused_for_another_architecture(tmp_path: Path) -> None:
    data = phantom_slices(range(300, 301))
    result = train_classifier(data, None, quick_config(epochs=1), tmp_path)
    loaded = load_classifier(result.checkpoint)
    assert loaded.trained and loaded.card["architecture"] == "classifier/resnet50"
    np.testing.assert_allclose(
        predict_probabilities(loaded.module, data), predict_probabilities(result.model, data), atol=1e-6
    )
    with pytest.raises(ModelError, match="classifier/vgg16"):
        load_checkpoint(result.checkpoint, expected_architecture="classifier/vgg16")


def test_recipes_and_overrides() -> None:
    gozes = TrainConfig.gozes()
    assert TrainConfig() == gozes  # the defaults are what recipe="gozes" says they are
    assert (gozes.backbone, gozes.input_size, gozes.optimizer, gozes.lr, gozes.num_outputs) == (
        "resnet50",
        224,
        "adam",
        1e-4,
        1,
    )
    ctset = TrainConfig.from_recipe("covid-ctset", epochs=3)
    assert (ctset.optimizer, ctset.batch_size, ctset.num_outputs, ctset.rotation_deg, ctset.epochs) == (
        "nadam",
        10,
        2,
        180.0,
        3,
    )
    assert ctset.zoom == ctset.shift == 0.05 and ctset.hflip and ctset.vflip
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctset.lr = 1.0  # type: ignore[misc]
    with pytest.raises(ConfigError, match="at least 75"):
        TrainConfig.gozes(backbone="inception_v3", input_size=64)
    with pytest.raises(ConfigError):
        TrainConfig.from_recipe("unknown")


@pytest.mark.slow
def test_lesion_mask_loss_trains_and_leaves_no_head_in_the_checkpoint(tmp_path: Path) -> None:
    """The auxiliary heads train with the network but the saved model is a plain classifier."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.uniform(0.0, 0.3, (12, SIZE, SIZE)).astype(np.float32))
    masks = np.zeros((12, SIZE, SIZE), np.uint8)
    labels = np.array([0, 1] * 6)
    for i in np.flatnonzero(labels):
        images[i, 8:20, 8:20] += 0.5
        masks[i, 8:20, 8:20] = 1
    masks[1] = MASK_UNKNOWN  # a real positive: label per slice only
    train = SliceDataset(images, labels, masks)
    config = quick_config(epochs=2, lesion_mask_weight=1.0, precise_bn=False)
    result = train_classifier(train, None, config, tmp_path, roi="lung-bbox")
    state, card = load_checkpoint(tmp_path / "model.safetensors", expected_architecture="classifier/resnet50")
    assert not any("lesion_heads" in key for key in state)
    assert card["train_config"]["lesion_mask_weight"] == 1.0
    load_classifier(tmp_path / "model.safetensors")  # strict load: nothing extra, nothing missing
    # resuming restores the heads too
    again = train_classifier(
        train, None, dataclasses.replace(config, epochs=3), tmp_path, roi="lung-bbox", resume=True
    )
    assert len(again.history) == 3 and result.best_epoch == 2


def test_lesion_mask_loss_needs_masks(tmp_path: Path) -> None:
    train = SliceDataset(torch.zeros(4, SIZE, SIZE), [0, 1, 0, 1])
    with pytest.raises(ConfigError, match="lesion masks"):
        train_classifier(train, None, quick_config(lesion_mask_weight=0.5), tmp_path)


def test_weight_average_is_uniform_then_exponential() -> None:
    from corona_ct.models.train_classifier import WeightAverage

    net = torch.nn.Linear(1, 1, bias=False)
    average = WeightAverage(net, decay=0.5)  # uniform over the first 2 steps, then weight 0.5 per step
    values = [4.0, 2.0, 6.0, 10.0]
    expected = []
    for step, value in enumerate(values):
        with torch.no_grad():
            net.weight.fill_(value)
        average.update()
        expected.append(value if step == 0 else 3.0 if step == 1 else 0.5 * expected[-1] + 0.5 * value)
        assert float(average.module.weight) == pytest.approx(expected[-1])
    assert int(average.steps) == 4 and not average.module.weight.requires_grad
    assert float(net.weight.detach()) == 10.0  # the trained weights are untouched


def test_averaged_weights_are_kept_logged_beside_the_raw_ones_and_resume_exactly(tmp_path: Path) -> None:
    data, val = phantom_slices(range(400, 401)), phantom_slices(range(401, 402))
    config = quick_config(epochs=2, ema_decay=0.9)
    full = train_classifier(data, val, config, tmp_path / "full", monitor_set=val)
    assert {"val_auc", "raw_val_auc", "monitor_auc", "raw_monitor_auc"} <= set(full.history[0])
    loaded = load_classifier(full.checkpoint)  # a plain classifier: no step counter, no second copy
    np.testing.assert_allclose(
        predict_probabilities(loaded.module, val), predict_probabilities(full.model, val), atol=1e-5
    )
    assert loaded.card["train_config"]["ema_decay"] == 0.9
    train_classifier(data, val, dataclasses.replace(config, epochs=1), tmp_path / "split")
    resumed = train_classifier(data, val, config, tmp_path / "split", resume=True)
    assert resumed.best_epoch == full.best_epoch
    for (name, a), b in zip(
        full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(ConfigError, match="ema_decay"):
        quick_config(ema_decay=1.0)
