"""Lung U-Net training (VGG16 encoder): :class:`SegTrainConfig` and the epoch step.

Cross-entropy + soft Dice on windowed slices, with synthetic GGO/consolidation
lesions (:func:`models.augment.insert_synthetic_lesions`) so that dense lungs stay
lung. Validation holds out whole volumes (:func:`data.folds.volume_train_val_split`);
resume, best-epoch selection (mean validation Dice), early stopping and checkpoints
are :func:`models.fit.fit`'s.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from corona_ct.data.datasets import SegmentationSlices
from corona_ct.data.folds import volume_train_val_split
from corona_ct.models.augment import augment_batch, insert_synthetic_lesions
from corona_ct.models.fit import (
    EpochResult,
    TrainResult,
    autocast,
    epoch_generator,
    fit,
    recalibrate_batchnorm,
)
from corona_ct.models.segmenter import SEGMENTER_ARCHITECTURE, build_unet
from corona_ct.pipeline.device import resolve_device
from corona_ct.pipeline.errors import ConfigError


@dataclass(frozen=True)
class SegTrainConfig:
    """Lung U-Net training. Angles in degrees, zoom/shift fractions of the side.

    No horizontal flip: left/right labels follow the canonical orientation.
    """

    num_classes: int = 3  # 3: background / right lung / left lung; 2: background / lung
    input_size: int = 256
    lr: float = 1e-4
    batch_size: int = 8
    epochs: int = 30
    patience: int = 5  # epochs without validation-Dice gain before stopping; 0 = never stop early
    val_fraction: float = 0.2
    val_groups: tuple[str, ...] = ()  # groups held out for validation; empty: val_fraction drawn at random
    rotation_deg: float = 10.0
    zoom: float = 0.1
    shift: float = 0.05
    crop_scale: float = 1.0
    hflip: bool = False
    vflip: bool = True
    lesion_probability: float = 0.5  # share of training slices given synthetic GGO/consolidation blobs
    max_lesions: int = 4
    seed: int = 0
    workers: int = 0
    device: str = "auto"
    amp: bool = True
    precise_bn: bool = True  # re-estimate BatchNorm statistics on the training slices before validating

    def __post_init__(self) -> None:
        if self.num_classes not in (2, 3):
            raise ConfigError("segmenter num_classes must be 2 (bg/lung) or 3 (bg/right/left)")
        if not (0 <= self.lesion_probability <= 1 and 0 < self.val_fraction < 0.5 and self.epochs > 0):
            raise ConfigError("lesion_probability in [0, 1], val_fraction in (0, 0.5), epochs > 0 required")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _identity(batch: torch.Tensor) -> torch.Tensor:
    return batch


def dice_per_class(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> list[float]:
    """Dice of each foreground class (1..K−1) over the whole set; NaN where both are empty."""
    scores = []
    for label in range(1, num_classes):
        p, t = pred == label, truth == label
        denominator = int(p.sum() + t.sum())
        scores.append(2.0 * int((p & t).sum()) / denominator if denominator else math.nan)
    return scores


def _soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits.float(), dim=1)
    one_hot = F.one_hot(labels, probs.shape[1]).permute(0, 3, 1, 2).float()
    intersection = (probs * one_hot).sum(dim=(0, 2, 3))
    total = probs.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))
    return 1.0 - ((2.0 * intersection + 1.0) / (total + 1.0))[1:].mean()


@torch.no_grad()
def predict_labels(
    model: nn.Module, dataset: SegmentationSlices, batch_size: int, device: torch.device, amp: bool
) -> torch.Tensor:
    """(N, S, S) arg-max class of each slice of ``dataset``, model in eval mode."""
    model.eval()
    out = []
    for start in range(0, len(dataset), batch_size):
        images = dataset.images[start : start + batch_size, None].float().to(device)
        with autocast(device, amp):
            out.append(model(images).argmax(1).cpu())
    return torch.cat(out)


def train_segmenter(
    slices: SegmentationSlices,
    groups: Sequence[str],
    config: SegTrainConfig,
    output_dir: str | Path,
    *,
    window_hu: Sequence[float] = (-1000.0, 0.0),
    card_extra: Mapping[str, Any] | None = None,
    resume: bool = False,
    on_epoch: Callable[[Mapping[str, float]], None] | None = None,
) -> TrainResult:
    """Train the VGG16-encoder U-Net (cross-entropy + soft Dice); keep the best validation Dice.

    The validation split is group-wise (one volume never on both sides). Every epoch
    leaves a resumable state in ``output_dir``; ``resume`` continues after the last one.
    """
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    train_idx, val_idx, split_description = volume_train_val_split(
        groups, config.val_fraction, config.seed, config.val_groups
    )
    train_set, val_set = slices.subset(train_idx), slices.subset(val_idx)

    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = build_unet(num_classes=config.num_classes, in_channels=1).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    card: dict[str, Any] = {
        **(card_extra or {}),
        "architecture": SEGMENTER_ARCHITECTURE,
        "task": "lung segmentation (0 background, 1 right, 2 left)" if config.num_classes == 3
        else "lung segmentation (0 background, 1 lung)",
        "input": {"size": config.input_size, "channels": 1, "window": list(window_hu), "roi": "none"},
        "num_classes": config.num_classes,
        "train_config": config.to_dict(),
        "n_train_slices": len(train_set), "n_val_slices": len(val_set),
        "validation_split": split_description,
    }  # fmt: skip
    class_names = ["right", "left"] if config.num_classes == 3 else ["lung"]

    def run_epoch(epoch: int) -> EpochResult:
        model.train()
        rng_aug = epoch_generator(config.seed, epoch, stream=3)
        order = torch.randperm(len(train_set), generator=epoch_generator(config.seed, epoch, stream=4))
        loss_sum, seen = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            index = order[start : start + config.batch_size]
            if index.numel() < 2:
                continue  # BatchNorm needs two samples
            images = train_set.images[index, None].float().to(device)
            labels = train_set.labels[index].long().to(device)
            images = insert_synthetic_lesions(
                images, labels, rng_aug, config.lesion_probability, config.max_lesions
            )
            images, warped_labels = augment_batch(images, config, rng_aug, labels)
            warped = labels if warped_labels is None else warped_labels
            with autocast(device, config.amp):
                logits = model(images)
            loss = F.cross_entropy(logits.float(), warped) + _soft_dice_loss(logits, warped)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * index.numel()
            seen += index.numel()
        if config.precise_bn:
            recalibrate_batchnorm(
                model, train_set, config.batch_size * 2, device, config.amp, to_input=_identity
            )
        predicted = predict_labels(model, val_set, config.batch_size, device, config.amp)
        dice = dice_per_class(predicted, val_set.labels.long(), config.num_classes)
        mean_dice = float(np.nanmean(dice)) if not all(math.isnan(d) for d in dice) else math.nan
        metrics = {"dice_mean": mean_dice, **{f"dice_{n}": d for n, d in zip(class_names, dice, strict=True)}}
        return EpochResult({"train_loss": loss_sum / max(seen, 1), "val_dice": mean_dice}, mean_dice, metrics)

    return fit(
        model, optimizer, run_epoch, output, card, config.to_dict(), epochs=config.epochs,
        patience=config.patience, resume=resume, title="lung U-Net (VGG16 encoder)",
        score_name="validation Dice", on_epoch=on_epoch,
    )  # fmt: skip
