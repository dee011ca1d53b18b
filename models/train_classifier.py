"""Slice-classifier training: :class:`TrainConfig` with its two published recipes, the epoch step.

- :class:`TrainConfig` is frozen; recipes are constructors (``TrainConfig.gozes()``,
  ``TrainConfig.covid_ctset()``), every field can be overridden by keyword.
- Data are preprocessed once (``data.datasets``); each batch gets one vectorised random
  affine (:func:`models.augment.augment_batch`) on the training device.
- Resume, best-epoch selection (validation AUC), early stopping and checkpoints are
  :func:`models.fit.fit`'s; this module supplies one epoch of training and evaluation.
- On CUDA, bf16 autocast and channels_last (``amp=True``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision.models.resnet import BasicBlock, Bottleneck

from corona_ct.data.datasets import MASK_UNKNOWN, SliceDataset, as_network_input
from corona_ct.models.augment import augment_batch
from corona_ct.models.classifier import backbone_spec, build_classifier, positive_probability
from corona_ct.models.fit import (
    RESUMABLE_CHANGES,
    EpochResult,
    TrainResult,
    autocast,
    epoch_generator,
    fit,
    recalibrate_batchnorm,
    use_amp,
)
from corona_ct.models.lesion_heads import LesionHeads
from corona_ct.models.metrics import binary_report
from corona_ct.pipeline import __version__
from corona_ct.pipeline.config import ClassifyConfig
from corona_ct.pipeline.device import resolve_device
from corona_ct.pipeline.errors import ConfigError

RECIPES = ("gozes", "covid-ctset")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a classifier training run. Angles in degrees, fractions of the side.

    The defaults are the Gozes et al. recipe, field for field (``TrainConfig() ==
    TrainConfig.gozes()``); :meth:`covid_ctset` is the other published recipe.
    """

    recipe: str = "gozes"
    backbone: str = "resnet50"
    input_size: int = 224
    num_outputs: int = 1  # 1: sigmoid + binary cross-entropy; 2: softmax + categorical cross-entropy
    optimizer: str = "adam"  # "adam" or "nadam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 16
    epochs: int = 30
    patience: int = 5  # epochs without validation-AUC gain before stopping; 0 = never stop early
    balance: str = "sampler"  # "sampler" (weighted sampling), "loss" (class weights) or "none"
    rotation_deg: float = 10.0  # rotation drawn uniformly in ±rotation_deg (180 = any angle)
    hflip: bool = True
    vflip: bool = True
    zoom: float = 0.0  # scale drawn in [1 − zoom, 1 + zoom]
    shift: float = 0.0  # translation drawn in ±shift × side, per axis
    crop_scale: float = 0.8  # random crop keeps an area fraction in [crop_scale, 1] (1 = no crop)
    val_fraction: float = 0.2  # patient groups held out for early stopping when no split is given
    seed: int = 0
    workers: int = 0  # DataLoader worker processes
    device: str = "auto"
    amp: bool = True  # bf16 autocast + channels_last on CUDA (ignored on CPU)
    lstm_hidden: int = 2048  # resnet152_lstm only: units of each of the two stacked LSTMs
    precise_bn: bool = True  # re-estimate BatchNorm statistics on the training images before evaluating
    lesion_mask_weight: float = (
        0.0  # weight of the auxiliary lesion-mask loss on the Grad-CAM layers (0 = off)
    )
    zero_init_residual: bool = False  # last BatchNorm of each residual block starts at 0 (Goyal et al. 2017)
    lr_schedule: str = "constant"  # "constant" or "cosine" (lr × ½(1 + cos π(epoch − 1)/epochs), per epoch)
    ema_decay: float = 0.0  # > 0: evaluate and keep an exponential average of the weights (per step); 0 = off

    def __post_init__(self) -> None:
        checks = [
            (self.recipe in RECIPES, f"recipe must be one of {RECIPES}"),
            (self.num_outputs in (1, 2), "num_outputs must be 1 (BCE) or 2 (categorical CE)"),
            (self.optimizer in ("adam", "nadam"), "optimizer must be adam or nadam"),
            (self.balance in ("sampler", "loss", "none"), "balance must be sampler, loss or none"),
            (self.lr > 0 and self.batch_size > 0 and self.epochs > 0, "lr, batch size, epochs must be > 0"),
            (self.patience >= 0 and self.workers >= 0, "patience and workers must be >= 0"),
            (0 < self.crop_scale <= 1, "crop_scale must be in (0, 1]"),
            (0 <= self.zoom < 1 and 0 <= self.shift < 0.5, "zoom must be in [0, 1), shift in [0, 0.5)"),
            (0 <= self.val_fraction < 0.5, "val_fraction must be in [0, 0.5)"),
            (self.lstm_hidden > 0, "lstm_hidden must be > 0"),
            (self.lesion_mask_weight >= 0, "lesion_mask_weight must be >= 0"),
            (self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}"),
            (0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"training config: {message}")
        spec = backbone_spec(self.backbone)
        if self.input_size < spec.min_input_size:
            raise ConfigError(
                f"{self.backbone} needs inputs of at least {spec.min_input_size} px, got {self.input_size}"
            )

    @classmethod
    def gozes(cls, **overrides: Any) -> TrainConfig:
        """Gozes et al. 2020: ResNet-50, 224², Adam 1e-4, BCE on one logit; rotation, flips, crops."""
        recipe = cls(
            recipe="gozes", backbone="resnet50", input_size=224, num_outputs=1, optimizer="adam", lr=1e-4,
            batch_size=16, rotation_deg=10.0, hflip=True, vflip=True, crop_scale=0.8,
        )  # fmt: skip
        return dataclasses.replace(recipe, **overrides)

    @classmethod
    def covid_ctset(cls, **overrides: Any) -> TrainConfig:
        """Rahimzadeh et al. (COVID-CTset): Nadam 1e-4, batch 10, 2-logit CE; rotation 0–360°,
        horizontal and vertical flips, 5 % zoom, 5 % width and height shift."""
        recipe = cls(
            recipe="covid-ctset", backbone="resnet50", input_size=224, num_outputs=2, optimizer="nadam",
            lr=1e-4, batch_size=10, rotation_deg=180.0, hflip=True, vflip=True, zoom=0.05, shift=0.05,
            crop_scale=1.0,
        )  # fmt: skip
        return dataclasses.replace(recipe, **overrides)

    @classmethod
    def from_recipe(cls, recipe: str, **overrides: Any) -> TrainConfig:
        if recipe == "gozes":
            return cls.gozes(**overrides)
        if recipe == "covid-ctset":
            return cls.covid_ctset(**overrides)
        raise ConfigError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lr_at(self, epoch: int) -> float:
        """Learning rate of ``epoch`` (1-based): ``lr``, or its cosine decay over ``epochs``."""
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / self.epochs))
        return self.lr

    def backbone_options(self) -> dict[str, Any]:
        """Builder options recorded in the card (the LSTM hybrid's row length and width)."""
        if self.backbone == "resnet152_lstm":
            return {"lstm_hidden": self.lstm_hidden, "input_size": self.input_size}
        return {}


def _class_counts(labels: torch.Tensor, n_classes: int = 2) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=n_classes).float()
    if (counts == 0).any():
        raise ConfigError(f"training data must hold both classes; class counts are {counts.int().tolist()}")
    return counts


def _loss_function(config: TrainConfig, labels: torch.Tensor, device: torch.device) -> nn.Module:
    counts = _class_counts(labels)
    if config.num_outputs == 1:
        pos_weight = (counts[0] / counts[1]).reshape(1) if config.balance == "loss" else None
        return nn.BCEWithLogitsLoss(pos_weight=None if pos_weight is None else pos_weight.to(device))
    weight = (counts.sum() / (2.0 * counts)) if config.balance == "loss" else None
    return nn.CrossEntropyLoss(weight=None if weight is None else weight.to(device))


def _loss(criterion: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] == 1:
        return criterion(logits[:, 0].float(), labels.float())
    return criterion(logits.float(), labels)


def _bce(labels: npt.NDArray[np.int64], probs: npt.NDArray[np.float64]) -> float:
    clipped = np.clip(probs, 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(clipped) + (1 - labels) * np.log1p(-clipped)))


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "nadam":
        return torch.optim.NAdam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def zero_init_residual(model: nn.Module) -> None:
    """Start every residual block as the identity: its last BatchNorm scale is 0.

    From random weights a deep ResNet then trains like a shallow one at first; on a few
    hundred images it starts to learn within the first epochs instead of after dozens
    (Goyal et al. 2017, "Accurate, large minibatch SGD"). Only the initial values change.
    """
    for module in model.modules():
        if isinstance(module, Bottleneck):
            nn.init.zeros_(module.bn3.weight)
        elif isinstance(module, BasicBlock):
            nn.init.zeros_(module.bn2.weight)


class WeightAverage(nn.Module):
    """Exponential moving average of a model's parameters, updated after every optimizer step.

    Weights that still swing from epoch to epoch (a constant, high rate on a few hundred
    images) rank held-out patients differently every epoch; their average over the last
    ~1/(1 − decay) steps sits in the middle of the swing (Polyak averaging; SWA, Izmailov
    et al. 2018). Until that many steps were taken the average is uniform over all of them
    (weight 1/(t + 1) for step t), so the random start is soon forgotten. ``module`` is a
    copy of the model holding the average; its BatchNorm statistics are not averaged but
    re-estimated before it is evaluated (:func:`models.fit.recalibrate_batchnorm`).
    ``steps`` is a buffer, so that a resumed run continues the same average.
    """

    steps: torch.Tensor

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.decay = decay
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self._source = list(model.parameters())

    @torch.no_grad()
    def update(self) -> None:
        weight = max(1.0 - self.decay, 1.0 / float(self.steps + 1))  # of the newest weights
        torch._foreach_lerp_(list(self.module.parameters()), [p.detach() for p in self._source], weight)
        self.steps += 1


class _Indexed(Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    """(image, label, index) of a SliceDataset: the index finds the sample's lesion mask."""

    def __init__(self, dataset: SliceDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image, label = self.dataset[index]
        return image, label, index


def _loader(dataset: SliceDataset, config: TrainConfig, epoch: int, shuffle: bool) -> DataLoader[Any]:
    generator = epoch_generator(config.seed, epoch, stream=1)
    sampler = None
    if shuffle and config.balance == "sampler":
        counts = _class_counts(dataset.labels)
        weights = (1.0 / counts)[dataset.labels].double().tolist()
        sampler = WeightedRandomSampler(
            weights, num_samples=len(dataset), replacement=True, generator=generator
        )
    return DataLoader(
        _Indexed(dataset),
        batch_size=config.batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=config.workers,
        drop_last=shuffle and len(dataset) > config.batch_size,  # BatchNorm fails on a 1-sample batch
    )


@torch.no_grad()
def predict_probabilities(
    model: nn.Module, dataset: SliceDataset, batch_size: int = 32, device: str | torch.device = "cpu",
    amp: bool = True,
) -> npt.NDArray[np.float64]:  # fmt: skip
    """P(positive class) per slice, no augmentation, model in eval mode."""
    device = torch.device(device)
    model.eval()
    probs = []
    for start in range(0, len(dataset), batch_size):
        grey = dataset.images[start : start + batch_size, None].float().to(device)
        inputs = as_network_input(grey)
        if use_amp(device, amp):
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(inputs)
        probs.append(positive_probability(logits.float()).cpu())
    return torch.cat(probs).double().numpy() if probs else np.zeros(0)


def _selection_score(report: Mapping[str, Any]) -> float:
    auc = float(report["auc"])
    return auc if math.isfinite(auc) else float(report["accuracy"])


def _classifier_card(
    config: TrainConfig, class_names: Sequence[str], roi: str, window_hu: Sequence[float],
    extra: Mapping[str, Any],
) -> dict[str, Any]:  # fmt: skip
    return {
        **extra,
        "architecture": f"classifier/{config.backbone}",
        "task": f"{class_names[1]}-vs-{class_names[0]} slice classification",
        "input": {"size": config.input_size, "channels": 3, "window": list(window_hu), "roi": roi},
        "num_outputs": config.num_outputs,
        "class_names": list(class_names),
        "backbone": config.backbone,
        "backbone_options": config.backbone_options(),
        "train_config": config.to_dict(),
        "seed": config.seed,
        "corona_ct_version": __version__,
    }


def train_classifier(
    train_set: SliceDataset,
    val_set: SliceDataset | None,
    config: TrainConfig,
    output_dir: str | Path,
    *,
    class_names: Sequence[str] = ("normal", "covid"),
    roi: str = "none",
    window_hu: Sequence[float] = (-1000.0, 0.0),
    card_extra: Mapping[str, Any] | None = None,
    resume: bool = False,
    monitor_set: SliceDataset | None = None,
    on_epoch: Callable[[Mapping[str, float]], None] | None = None,
) -> TrainResult:
    """Train a slice classifier; write ``model.safetensors`` + card, history and curves to ``output_dir``.

    With ``val_set`` the best epoch by validation AUC is kept and training stops after
    ``patience`` epochs without gain; without it all epochs run and the last is kept.
    ``monitor_set`` (e.g. a CV test fold) is only evaluated and logged, never used to select.
    """
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if train_set.input_size != config.input_size:
        raise ConfigError(
            f"data were prepared at {train_set.input_size} px but config says {config.input_size}"
        )
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = build_classifier(config.backbone, config.num_outputs, **config.backbone_options()).to(device)
    if config.zero_init_residual:
        zero_init_residual(model)
    if use_amp(device, config.amp):
        model = model.to(memory_format=torch.channels_last)
    average = WeightAverage(model, config.ema_decay) if config.ema_decay > 0 else None  # before any hook
    heads: LesionHeads | None = None
    trainable: nn.Module = model
    if config.lesion_mask_weight > 0:
        if train_set.masks is None:
            raise ConfigError("lesion_mask_weight > 0 needs training data with lesion masks")
        heads = LesionHeads(model, backbone_spec(config.backbone).cam_layers).to(device)
        trainable = nn.ModuleDict({"net": model, "lesion_heads": heads})
    optimizer = _make_optimizer(trainable, config)
    resumable = trainable if average is None else nn.ModuleDict({"trained": trainable, "average": average})
    kept = model if average is None else average.module  # what is evaluated, selected and saved
    criterion = _loss_function(config, train_set.labels, device)
    threshold = ClassifyConfig().positive_threshold  # training accuracy counts p >= this as positive
    eval_batch = config.batch_size * 2

    def run_epoch(epoch: int) -> EpochResult:
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(epoch)
        model.train()
        torch.manual_seed(config.seed * 7919 + epoch)  # dropout masks (VGG) per epoch, resumable
        augment_rng = epoch_generator(config.seed, epoch, stream=2)
        loss_sum, correct, seen = 0.0, 0, 0
        for grey, labels, index in _loader(train_set, config, epoch, shuffle=True):
            grey, labels = grey.to(device, non_blocking=True), labels.to(device)
            masks = (
                train_set.masks[index].to(device)
                if heads is not None and train_set.masks is not None
                else None
            )
            augmented, warped_masks = augment_batch(grey, config, augment_rng, masks)
            inputs = as_network_input(augmented)
            if use_amp(device, config.amp):
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with autocast(device, config.amp):
                logits = model(inputs)
            loss = _loss(criterion, logits, labels)
            if heads is not None and warped_masks is not None and masks is not None:
                # warping pads with 0: unknown masks stay unknown as a whole
                unknown = (masks == MASK_UNKNOWN).flatten(1).all(dim=1)
                warped_masks[unknown] = MASK_UNKNOWN
                loss = loss + config.lesion_mask_weight * heads.loss(warped_masks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if average is not None:
                average.update()
            loss_sum += float(loss.detach()) * labels.shape[0]
            predicted = (positive_probability(logits.detach().float()) >= threshold).long()
            correct += int((predicted == labels).sum())
            seen += int(labels.shape[0])
        row: dict[str, float] = {
            "train_loss": loss_sum / seen, "train_acc": correct / seen, "lr": optimizer.param_groups[0]["lr"]
        }  # fmt: skip
        if config.precise_bn:
            recalibrate_batchnorm(model, train_set, eval_batch, device, config.amp)
        if average is not None:
            if config.precise_bn:
                recalibrate_batchnorm(kept, train_set, eval_batch, device, config.amp)
            else:
                for mine, theirs in zip(kept.buffers(), model.buffers(), strict=True):
                    mine.copy_(theirs)
            # the weights as trained, beside their average: what averaging changes, epoch by epoch
            raw, _ = evaluate(model)
            row.update({f"raw_{key}": value for key, value in raw.items() if key.endswith("auc")})
        evaluated, report = evaluate(kept)
        row.update(evaluated)
        score = _selection_score(report) if report else float(epoch)  # no validation: the last epoch is kept
        metrics = {k: v for k, v in report.items() if k != "confusion_matrix"}
        return EpochResult(row, score, metrics)

    def evaluate(net: nn.Module) -> tuple[dict[str, float], dict[str, Any]]:
        """History columns of ``net`` on the validation and monitor sets, and the validation report."""
        columns: dict[str, float] = {}
        report: dict[str, Any] = {}
        if val_set is not None:
            val_probs = predict_probabilities(net, val_set, eval_batch, device, config.amp)
            report = binary_report(val_set.labels.numpy(), val_probs, class_names)
            columns.update(val_loss=_bce(val_set.labels.numpy(), val_probs), val_acc=report["accuracy"])
            columns["val_auc"] = report["auc"]
        if monitor_set is not None:
            monitor_probs = predict_probabilities(net, monitor_set, eval_batch, device, config.amp)
            monitored = binary_report(monitor_set.labels.numpy(), monitor_probs, class_names)
            columns.update(monitor_acc=monitored["accuracy"], monitor_auc=monitored["auc"])
        return columns, report

    card = _classifier_card(config, class_names, roi, window_hu, card_extra or {})
    try:
        return fit(
            kept, optimizer, run_epoch, output, card, config.to_dict(), epochs=config.epochs,
            patience=config.patience if val_set is not None else 0,  # no validation: every epoch runs
            resume=resume, trained=resumable, title=f"{config.backbone} ({config.recipe})",
            score_name="validation AUC", on_epoch=on_epoch,
            # a cosine schedule is drawn over ``epochs``: another count would bend the rest of it
            resumable_changes=RESUMABLE_CHANGES - {"epochs"} if config.lr_schedule == "cosine" else RESUMABLE_CHANGES,
        )  # fmt: skip
    finally:
        if heads is not None:
            heads.remove()
