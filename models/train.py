"""Training loops: slice classifier (two published recipes), patient-wise cross-validation, lung U-Net.

Design points
- :class:`TrainConfig` is frozen; recipes are constructors (``TrainConfig.gozes()``,
  ``TrainConfig.covid_ctset()``), every field can be overridden by keyword.
- Data are preprocessed once (``data.datasets``); augmentation is one vectorised
  random affine per batch (:func:`augment_batch`: per-sample rotation, flips, zoom,
  shift, crop through ``affine_grid``/``grid_sample``), on the training device.
- Determinism: the model is initialised from ``seed``; each epoch's sampler, dropout
  and augmentation draw from generators seeded by ``(seed, epoch)``, so a run resumed
  from its last epoch continues exactly as an uninterrupted one.
- Checkpoints are safetensors + JSON only (never pickle): ``model.safetensors``
  (best epoch, with its card) and ``last_state.safetensors``/``.json`` (model and
  optimizer tensors, optimizer hyper-parameters, history) written every epoch.
- On CUDA, bf16 autocast and channels_last (``amp=True``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from corona_ct.data.datasets import MASK_UNKNOWN, SegmentationSlices, SliceDataset, as_network_input
from corona_ct.data.folds import group_train_val_split, stratified_group_kfold
from corona_ct.models.checkpoint import load_checkpoint, save_checkpoint
from corona_ct.models.classifier import backbone_spec, build_classifier, positive_probability
from corona_ct.models.metrics import binary_report, roc_curve
from corona_ct.pipeline import __version__
from corona_ct.pipeline.atomic import atomic_path, write_text
from corona_ct.pipeline.device import resolve_device
from corona_ct.pipeline.errors import ConfigError, ModelError
from corona_ct.pipeline.progress import epoch_line, progress_log

log = logging.getLogger(__name__)

RECIPES = ("gozes", "covid-ctset")
LAST_STATE = "last_state"
MODEL_FILE = "model.safetensors"
#: Fields that may change when a run is resumed (they do not change what was learnt so far).
RESUMABLE_CHANGES = frozenset({"epochs", "patience", "workers", "device"})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a classifier training run. Angles in degrees, fractions of the side.

    The defaults are the Gozes et al. recipe (``TrainConfig() == TrainConfig.gozes()``).
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

    def backbone_options(self) -> dict[str, Any]:
        """Builder options recorded in the card (the LSTM hybrid's row length and width)."""
        if self.backbone == "resnet152_lstm":
            return {"lstm_hidden": self.lstm_hidden, "input_size": self.input_size}
        return {}


# ----------------------------------------------------------------------------------------- augmentation


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def random_affine_params(n: int, config: Any, generator: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) sampling matrices (output → input, normalised coordinates) for ``affine_grid``.

    Uses ``rotation_deg``, ``hflip``, ``vflip``, ``zoom``, ``shift`` and ``crop_scale``
    of ``config``. A crop keeping area fraction ``a`` samples a window of side √a whose
    centre is drawn so that it stays inside the image; the zoom factor then scales it.
    """
    angle = torch.deg2rad(_uniform(n, -config.rotation_deg, config.rotation_deg, generator))
    crop_side = torch.sqrt(_uniform(n, config.crop_scale, 1.0, generator))
    scale = crop_side * _uniform(n, 1.0 - config.zoom, 1.0 + config.zoom, generator)
    offset = (1.0 - crop_side)[:, None] * _uniform(2 * n, -1.0, 1.0, generator).view(n, 2)
    offset = offset + 2.0 * config.shift * _uniform(2 * n, -1.0, 1.0, generator).view(n, 2)
    flip_x = (
        torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if config.hflip else torch.ones(n)
    )
    flip_y = (
        torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if config.vflip else torch.ones(n)
    )
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    # Rotation × isotropic scale × axis flips; images are square so normalised axes are isotropic.
    theta[:, 0, 0] = scale * cos * flip_x
    theta[:, 0, 1] = -scale * sin * flip_y
    theta[:, 1, 0] = scale * sin * flip_x
    theta[:, 1, 1] = scale * cos * flip_y
    theta[:, :, 2] = offset
    return theta


def augment_batch(
    images: torch.Tensor, config: Any, generator: torch.Generator, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random per-sample affine of an (N, C, S, S) batch (zeros outside = air); labels by nearest.

    Returns the augmented images and, when given, the (N, S, S) label maps warped identically.
    """
    theta = random_affine_params(images.shape[0], config, generator).to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if labels is None:
        return warped, None
    warped_labels = F.grid_sample(
        labels[:, None].to(images.dtype), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )
    return warped, warped_labels[:, 0].round().long()


# ------------------------------------------------------------------------------------ helpers


@dataclass
class TrainResult:
    """Outcome of one training run; ``model`` holds the best weights, in eval mode."""

    model: nn.Module
    checkpoint: Path
    card: dict[str, Any]
    history: list[dict[str, float]]
    best_epoch: int
    best_metrics: dict[str, Any]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def _epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed * 1_000_003 + epoch * 101 + stream)
    return generator


def _use_amp(device: torch.device, amp: bool) -> bool:
    return amp and device.type == "cuda"


def _autocast(device: torch.device, amp: bool) -> Any:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=_use_amp(device, amp))


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
    from torchvision.models.resnet import BasicBlock, Bottleneck

    for module in model.modules():
        if isinstance(module, Bottleneck):
            nn.init.zeros_(module.bn3.weight)
        elif isinstance(module, BasicBlock):
            nn.init.zeros_(module.bn2.weight)


class _Indexed(Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    """(image, label, index) of a SliceDataset: the index finds the sample's lesion mask."""

    def __init__(self, dataset: SliceDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image, label = self.dataset[index]
        return image, label, index


class LesionHeads(nn.Module):
    """Auxiliary 1×1-conv lesion-mask heads on the Grad-CAM layers (training only, never saved).

    Hooks record each layer's output during the forward pass; :meth:`loss` is the binary
    cross-entropy of each head's map against the lesion mask average-pooled to that
    layer's grid, over the samples whose mask is known. Teaching those layers where the
    lesion is makes the Grad-CAM maps taken from them point at it.
    """

    def __init__(self, model: nn.Module, layer_names: Sequence[str]) -> None:
        super().__init__()
        modules = dict(model.named_modules())
        self.outputs: dict[str, torch.Tensor] = {}
        self.heads = nn.ModuleDict()
        self._handles = []
        for name in layer_names:
            layer = modules[name]
            channels = _output_channels(layer)
            self.heads[name.replace(".", "_")] = nn.Conv2d(channels, 1, kernel_size=1)
            self._handles.append(layer.register_forward_hook(self._recorder(name)))

    def _recorder(self, name: str) -> Callable[..., None]:
        def record(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            self.outputs[name] = output

        return record

    def loss(self, masks: torch.Tensor) -> torch.Tensor:
        """Mean BCE over layers for (N, S, S) masks (1 lesion, 0 none, 255 unknown)."""
        known = (masks != MASK_UNKNOWN).flatten(1).all(dim=1)
        total = torch.zeros((), device=masks.device)
        if not known.any():
            return total
        target_full = masks[known].float()[:, None]
        for name, output in self.outputs.items():
            logits = self.heads[name.replace(".", "_")](output[known].float())
            target = F.adaptive_avg_pool2d(target_full, logits.shape[-2:])
            total = total + F.binary_cross_entropy_with_logits(logits, target)
        return total / max(len(self.outputs), 1)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _output_channels(layer: nn.Module) -> int:
    """Channels a ResNet stage (or any block ending in a BatchNorm/conv) puts out."""
    last = [m for m in layer.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    if not last:
        raise ConfigError(f"cannot tell the output channels of {type(layer).__name__}")
    final = last[-1]
    return int(final.num_features if isinstance(final, nn.BatchNorm2d) else final.out_channels)


def _loader(dataset: SliceDataset, config: TrainConfig, epoch: int, shuffle: bool) -> DataLoader[Any]:
    generator = _epoch_generator(config.seed, epoch, stream=1)
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
        if _use_amp(device, amp):
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            logits = model(inputs)
        probs.append(positive_probability(logits.float()).cpu())
    return torch.cat(probs).double().numpy() if probs else np.zeros(0)


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    dataset: SliceDataset | SegmentationSlices,
    batch_size: int,
    device: torch.device,
    amp: bool,
    to_input: Callable[[torch.Tensor], torch.Tensor] = as_network_input,
) -> None:
    """Replace BatchNorm running statistics by their average over ``dataset`` (unaugmented).

    Running averages with momentum 0.1 lag far behind weights that change quickly (short
    runs, from-scratch training): evaluation-mode outputs then collapse towards one value.
    Re-estimating them with the final weights ("precise BN", Wu & Johnson 2021) makes the
    evaluated and saved network consistent. Training itself is unaffected (it uses batch
    statistics). ``to_input`` turns a (N, 1, S, S) grey batch into the network's input.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches below
    model.train()
    for start in range(0, len(dataset), batch_size):
        inputs = to_input(dataset.images[start : start + batch_size, None].float().to(device))
        if inputs.shape[0] < 2:
            continue
        if _use_amp(device, amp):
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            model(inputs)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.train(was_training)


# ---------------------------------------------------------------------- safetensors resume state


def _save_last_state(
    output_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: Mapping[str, Any]
) -> None:
    """Model and optimizer tensors to safetensors, everything else to JSON (atomic, no pickle)."""
    tensors: dict[str, torch.Tensor] = {
        f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
    }
    optim_state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in optim_state["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(index), {})[key] = value
    with atomic_path(output_dir / f"{LAST_STATE}.safetensors") as tmp:
        save_file(tensors, str(tmp))
    payload = dict(meta, optimizer_param_groups=optim_state["param_groups"], optimizer_scalars=scalars)
    write_text(output_dir / f"{LAST_STATE}.json", json.dumps(payload, indent=1, allow_nan=True))


def _load_last_state(
    output_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: Mapping[str, Any]
) -> dict[str, Any]:
    """Restore the last finished epoch into ``model`` and ``optimizer``; its bookkeeping as a dict.

    Refuses a run folder trained with other settings than ``config`` (except
    :data:`RESUMABLE_CHANGES`): resuming it would mix two runs in one model.
    """
    json_path = output_dir / f"{LAST_STATE}.json"
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
        tensors = load_file(str(output_dir / f"{LAST_STATE}.safetensors"))
    except (OSError, json.JSONDecodeError, SafetensorError) as error:
        raise ModelError(f"cannot resume from {output_dir}: {error}; start without --resume") from None
    current = json.loads(json.dumps(dict(config)))  # as it was saved: tuples became lists
    changed = {k for k, v in current.items() if meta["config"].get(k) != v} - RESUMABLE_CHANGES
    if changed:
        raise ConfigError(
            f"cannot resume {output_dir}: it was trained with different {', '.join(sorted(changed))}; "
            "use the same settings or another --output"
        )
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta.get("optimizer_scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_param_groups"]})
    return dict(meta)


# ------------------------------------------------------------------------------ classifier training


def write_history(history: Sequence[Mapping[str, float]], output_dir: Path, title: str = "") -> None:
    """``history.csv`` and ``curves.png`` (loss, accuracy and AUC per epoch)."""
    if not history:
        return
    columns = list(dict.fromkeys(key for row in history for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text(output_dir / "history.csv", buffer.getvalue())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    panels = [("loss", "loss"), ("accuracy", "acc"), ("AUC", "auc"), ("Dice", "dice")]
    panels = [(label, key) for label, key in panels if any(c.endswith(f"_{key}") for c in columns)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for axis, (label, key) in zip(axes[0], panels, strict=True):
        for column in columns:
            if column.endswith(f"_{key}"):
                axis.plot(
                    epochs, [row.get(column, math.nan) for row in history], marker="o", ms=3, label=column
                )
        axis.set_xlabel("epoch")
        axis.set_title(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(output_dir / "curves.png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


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
    if _use_amp(device, config.amp):
        model = model.to(memory_format=torch.channels_last)
    heads: LesionHeads | None = None
    trainable: nn.Module = model
    if config.lesion_mask_weight > 0:
        if train_set.masks is None:
            raise ConfigError("lesion_mask_weight > 0 needs training data with lesion masks")
        heads = LesionHeads(model, backbone_spec(config.backbone).cam_layers).to(device)
        trainable = nn.ModuleDict({"net": model, "lesion_heads": heads})
    optimizer = _make_optimizer(trainable, config)
    criterion = _loss_function(config, train_set.labels, device)
    card = _classifier_card(config, class_names, roi, window_hu, card_extra or {})

    history: list[dict[str, float]] = []
    start_epoch, best_score, best_epoch, bad_epochs = 1, -math.inf, 0, 0
    best_metrics: dict[str, Any] = {}
    elapsed = 0.0
    if resume and (output / f"{LAST_STATE}.json").is_file():
        meta = _load_last_state(output, trainable, optimizer, config.to_dict())
        history, best_score = meta["history"], float(meta["best_score"])
        best_epoch, bad_epochs, best_metrics = meta["best_epoch"], meta["bad_epochs"], meta["best_metrics"]
        start_epoch, elapsed = meta["epoch"] + 1, float(meta["seconds"])
        log.info("resuming %s at epoch %d", output, start_epoch)
        if meta.get("stopped_early"):
            start_epoch = config.epochs + 1

    stopped_early = False
    for epoch in range(start_epoch, config.epochs + 1):
        started = time.perf_counter()
        model.train()
        torch.manual_seed(config.seed * 7919 + epoch)  # dropout masks (VGG) per epoch, resumable
        augment_rng = _epoch_generator(config.seed, epoch, stream=2)
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
            if _use_amp(device, config.amp):
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with _autocast(device, config.amp):
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
            loss_sum += float(loss.detach()) * labels.shape[0]
            predicted = (positive_probability(logits.detach().float()) >= 0.5).long()
            correct += int((predicted == labels).sum())
            seen += int(labels.shape[0])
        row: dict[str, float] = {"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen}
        if config.precise_bn:
            recalibrate_batchnorm(model, train_set, config.batch_size * 2, device, config.amp)
        if val_set is not None:
            val_probs = predict_probabilities(model, val_set, config.batch_size * 2, device, config.amp)
            report = binary_report(val_set.labels.numpy(), val_probs, class_names)
            row.update(val_loss=_bce(val_set.labels.numpy(), val_probs), val_acc=report["accuracy"])
            row["val_auc"] = report["auc"]
            score = _selection_score(report)
        else:
            report, score = {}, float(epoch)  # no validation: the last epoch is the one kept
        if monitor_set is not None:
            monitor_probs = predict_probabilities(
                model, monitor_set, config.batch_size * 2, device, config.amp
            )
            monitored = binary_report(monitor_set.labels.numpy(), monitor_probs, class_names)
            row.update(monitor_acc=monitored["accuracy"], monitor_auc=monitored["auc"])
        elapsed += time.perf_counter() - started
        row["seconds"] = elapsed
        history.append(row)
        if score > best_score + 1e-9:
            best_score, best_epoch, bad_epochs = score, epoch, 0
            best_metrics = {k: _finite_or_none(v) for k, v in report.items() if k != "confusion_matrix"}
            card.update(best_epoch=best_epoch, best_validation=best_metrics, epochs_run=epoch)
            save_checkpoint(model, output / MODEL_FILE, dict(card, train_seconds=round(elapsed, 1)))
        else:
            bad_epochs += 1
        stopped_early = val_set is not None and config.patience > 0 and bad_epochs >= config.patience
        meta = {
            "config": config.to_dict(), "epoch": epoch, "history": history, "best_score": best_score,
            "best_epoch": best_epoch, "bad_epochs": bad_epochs, "best_metrics": best_metrics,
            "seconds": elapsed, "stopped_early": stopped_early,
        }  # fmt: skip
        _save_last_state(output, trainable, optimizer, meta)
        write_history(history, output, title=f"{config.backbone} ({config.recipe})")
        progress_log.info(epoch_line(epoch, config.epochs, row, time.perf_counter() - started))
        if on_epoch is not None:
            on_epoch(row)
        if stopped_early:
            progress_log.info("early stop: validation AUC did not improve for %d epochs", config.patience)
            break

    if heads is not None:
        heads.remove()
    state, final_card = load_checkpoint(output / MODEL_FILE, expected_architecture=card["architecture"])
    model.load_state_dict(state)
    model.eval()
    final_card = dict(
        final_card, epochs_run=len(history), stopped_early=stopped_early, train_seconds=round(elapsed, 1)
    )
    write_text(
        output / "model.json", json.dumps(final_card, indent=2, sort_keys=True, allow_nan=False) + "\n"
    )
    return TrainResult(model, output / MODEL_FILE, final_card, history, best_epoch, best_metrics, elapsed)


def _finite_or_none(value: Any) -> Any:
    """JSON cards refuse NaN: an undefined metric (e.g. precision of a never-predicted class) is null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _bce(labels: npt.NDArray[np.int64], probs: npt.NDArray[np.float64]) -> float:
    clipped = np.clip(probs, 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(clipped) + (1 - labels) * np.log1p(-clipped)))


# ----------------------------------------------------------------------------------- cross-validation


def cross_validate(
    dataset: SliceDataset,
    groups: Sequence[str] | npt.NDArray[np.str_],
    backbones: Sequence[str],
    config: TrainConfig,
    output_dir: str | Path,
    *,
    n_folds: int = 5,
    class_names: Sequence[str] = ("normal", "covid"),
    roi: str = "none",
    card_extra: Mapping[str, Any] | None = None,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Stratified, patient-grouped K-fold CV of each backbone; writes the comparison tables and plots.

    The folds are the same for every backbone (seeded by ``config.seed``). Each fold
    trains on the other folds (holding out ``config.val_fraction`` of their groups
    for early stopping when > 0, else all epochs) and is tested once on its own fold.
    Returns one row per (backbone, fold).
    """
    output = Path(output_dir)
    labels = dataset.labels.numpy()
    group_names = np.asarray(groups).astype(str)
    folds = stratified_group_kfold(labels, group_names, n_folds, seed=config.seed)
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]] = {}
    for backbone in backbones:
        fold_config = dataclasses.replace(config, backbone=backbone)
        for fold, (train_idx, test_idx) in enumerate(folds, start=1):
            fold_dir = output / backbone / f"fold{fold}"
            done = fold_dir / "fold_result.json"
            if resume and done.is_file():
                result_row = json.loads(done.read_text(encoding="utf-8"))
                rows.append(result_row["row"])
                curves.setdefault(backbone, []).append(
                    (np.array(result_row["fpr"]), np.array(result_row["tpr"]))
                )
                continue
            fit_idx, val_idx = train_idx, None
            if config.val_fraction > 0:
                inner_fit, inner_val = group_train_val_split(
                    labels[train_idx], group_names[train_idx], config.val_fraction, seed=config.seed
                )
                fit_idx, val_idx = train_idx[inner_fit], train_idx[inner_val]
            test_set = dataset.subset(test_idx)
            result = train_classifier(
                dataset.subset(fit_idx),
                dataset.subset(val_idx) if val_idx is not None else None,
                fold_config,
                fold_dir,
                class_names=class_names,
                roi=roi,
                card_extra=dict(card_extra or {}, cv_fold=fold, cv_folds=n_folds),
                resume=resume,
                monitor_set=test_set,
            )
            device = resolve_device(config.device)
            train_probs = predict_probabilities(result.model, dataset.subset(fit_idx), 32, device, config.amp)
            test_probs = predict_probabilities(result.model, test_set, 32, device, config.amp)
            train_report = binary_report(labels[fit_idx], train_probs, class_names)
            test_report = binary_report(labels[test_idx], test_probs, class_names)
            row = {
                "backbone": backbone, "fold": fold, "n_train": int(fit_idx.size), "n_test": int(test_idx.size),
                "train_accuracy": train_report["accuracy"], "test_accuracy": test_report["accuracy"],
                "test_auc": test_report["auc"], "epochs_run": len(result.history),
                "train_seconds": round(result.seconds, 1),
                "confusion_matrix": test_report["confusion_matrix"],
                **{k: v for k, v in test_report.items() if k.split("_")[0] in ("sensitivity", "specificity", "precision")},
            }  # fmt: skip
            fpr, tpr, _ = roc_curve(labels[test_idx], test_probs)
            write_text(
                done, json.dumps({"row": row, "fpr": fpr.tolist(), "tpr": tpr.tolist()}, allow_nan=True)
            )
            rows.append(row)
            curves.setdefault(backbone, []).append((fpr, tpr))
            progress_log.info(
                "fold %d/%d %s: test AUC %.3f, test acc %.3f, %.1f s",
                fold, n_folds, backbone, test_report["auc"], test_report["accuracy"], result.seconds,
            )  # fmt: skip
            del result
        write_cv_report(rows, curves, output, class_names, config)
    return rows


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    if array.size == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def write_cv_report(
    rows: Sequence[Mapping[str, Any]],
    curves: Mapping[str, Sequence[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]],
    output_dir: Path,
    class_names: Sequence[str],
    config: TrainConfig,
) -> None:
    """per_fold.csv, summary.csv, summary.md, confusion.png and roc.png of a cross-validation."""
    metric_columns = [
        "train_accuracy", "test_accuracy", "test_auc",
        *[f"{m}_{c}" for c in class_names for m in ("sensitivity", "specificity", "precision")],
    ]  # fmt: skip
    per_fold = io.StringIO()
    fold_columns = [
        "backbone",
        "fold",
        "n_train",
        "n_test",
        *metric_columns,
        "epochs_run",
        "train_seconds",
        "confusion_matrix",
    ]
    writer = csv.DictWriter(per_fold, fieldnames=fold_columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "confusion_matrix": json.dumps(row["confusion_matrix"])})
    write_text(output_dir / "per_fold.csv", per_fold.getvalue())

    backbones = list(dict.fromkeys(str(row["backbone"]) for row in rows))
    summary_rows = []
    for backbone in backbones:
        mine = [row for row in rows if row["backbone"] == backbone]
        summary: dict[str, Any] = {"backbone": backbone, "folds": len(mine)}
        for column in metric_columns:
            mean, sd = _mean_sd([float(row[column]) for row in mine])
            summary[f"{column}_mean"], summary[f"{column}_sd"] = mean, sd
        summary["train_seconds_total"] = round(sum(float(row["train_seconds"]) for row in mine), 1)
        summary["confusion_matrix_sum"] = np.sum([row["confusion_matrix"] for row in mine], axis=0).tolist()
        summary_rows.append(summary)
    summary_csv = io.StringIO()
    writer = csv.DictWriter(summary_csv, fieldnames=list(summary_rows[0]), lineterminator="\n")
    writer.writeheader()
    for summary in summary_rows:
        writer.writerow({**summary, "confusion_matrix_sum": json.dumps(summary["confusion_matrix_sum"])})
    write_text(output_dir / "summary.csv", summary_csv.getvalue())
    write_text(
        output_dir / "summary.md", cv_markdown(rows, summary_rows, metric_columns, class_names, config)
    )
    _plot_cv(summary_rows, curves, output_dir, class_names)


def cv_markdown(
    rows: Sequence[Mapping[str, Any]], summary_rows: Sequence[Mapping[str, Any]], metric_columns: Sequence[str],
    class_names: Sequence[str], config: TrainConfig,
) -> str:  # fmt: skip
    """Markdown tables: mean ± sd per backbone, then every fold."""

    def cell(value: float) -> str:
        return "–" if not math.isfinite(value) else f"{value:.3f}"

    header = ["backbone", *[c.replace("_", " ") for c in metric_columns], "train time (s)"]
    lines = [
        f"Cross-validation: {len(rows) // max(len(summary_rows), 1)} patient-grouped stratified folds, "
        f"input {config.input_size}², recipe {config.recipe}, {config.epochs} epochs max, seed {config.seed}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for summary in summary_rows:
        cells = [f"{cell(summary[f'{c}_mean'])} ± {cell(summary[f'{c}_sd'])}" for c in metric_columns]
        lines.append(
            f"| {summary['backbone']} | " + " | ".join(cells) + f" | {summary['train_seconds_total']} |"
        )
    lines += ["", "Per fold (test fold confusion matrix rows = true " + "/".join(class_names) + "):", ""]
    fold_header = ["backbone", "fold", "n train", "n test", "train acc", "test acc", "test AUC", "confusion"]
    lines += ["| " + " | ".join(fold_header) + " |", "|" + "---|" * len(fold_header)]
    for row in rows:
        lines.append(
            f"| {row['backbone']} | {row['fold']} | {row['n_train']} | {row['n_test']} | "
            f"{cell(row['train_accuracy'])} | {cell(row['test_accuracy'])} | {cell(row['test_auc'])} | "
            f"{row['confusion_matrix']} |"
        )
    return "\n".join(lines) + "\n"


def _plot_cv(
    summary_rows: Sequence[Mapping[str, Any]],
    curves: Mapping[str, Sequence[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]],
    output_dir: Path,
    class_names: Sequence[str],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(summary_rows)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.2), squeeze=False)
    for axis, summary in zip(axes[0], summary_rows, strict=True):
        matrix = np.asarray(summary["confusion_matrix_sum"])
        axis.imshow(matrix, cmap="Blues")
        for (i, j), count in np.ndenumerate(matrix):
            axis.text(j, i, str(count), ha="center", va="center", color="black")
        axis.set_xticks(range(len(class_names)), class_names)
        axis.set_yticks(range(len(class_names)), class_names)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_title(f"{summary['backbone']} (all test folds)", fontsize=9)
    fig.tight_layout()
    with atomic_path(output_dir / "confusion.png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False)
    grid = np.linspace(0.0, 1.0, 101)
    for axis, summary in zip(axes[0], summary_rows, strict=True):
        backbone = str(summary["backbone"])
        interpolated = []
        for fold, (fpr, tpr) in enumerate(curves.get(backbone, []), start=1):
            axis.plot(fpr, tpr, lw=0.8, alpha=0.6, label=f"fold {fold}")
            interpolated.append(np.interp(grid, fpr, tpr))
        if interpolated:
            axis.plot(grid, np.mean(interpolated, axis=0), color="black", lw=2, label="mean")
        axis.plot([0, 1], [0, 1], ls=":", color="grey")
        axis.set_title(
            f"{backbone}: AUC {summary['test_auc_mean']:.3f} ± {summary['test_auc_sd']:.3f}", fontsize=9
        )
        axis.set_xlabel("1 − specificity")
        axis.set_ylabel("sensitivity")
        axis.legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(output_dir / "roc.png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------- lung U-Net training


@dataclass(frozen=True)
class SegTrainConfig:
    """Lung U-Net training. No horizontal flip: left/right labels follow the canonical orientation."""

    num_classes: int = 3  # 3: background / right lung / left lung; 2: background / lung
    input_size: int = 256
    lr: float = 1e-4
    batch_size: int = 8
    epochs: int = 30
    patience: int = 5
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


#: Target grey values of the synthetic lesions on the [−1000, 0] HU window: GGO ≈ −500 HU,
#: consolidation ≈ −50 HU (window value = (HU + 1000) / 1000).
GGO_WINDOW, CONSOLIDATION_WINDOW = 0.5, 0.95


def insert_synthetic_lesions(
    images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, probability: float = 0.5,
    max_lesions: int = 4,
) -> torch.Tensor:  # fmt: skip
    """Blend GGO / consolidation blobs into the lungs of an (N, 1, S, S) windowed batch.

    Each selected slice receives up to ``max_lesions`` Gaussian blobs centred on random
    lung pixels (radius 3–12 % of the side), pulling grey values towards ≈ −500 HU
    (ground glass) or ≈ −50 HU (consolidation), only inside the lung labels. The labels
    are unchanged: dense lesions belong to the lung, which is what the network must learn.
    """
    n, _, size, _ = images.shape
    lung = (labels > 0).to(images.dtype)  # (N, S, S)
    flat = lung.reshape(n, -1).cpu()
    chosen = (torch.rand(n, generator=generator) < probability) & (flat.sum(1) > 0)
    if not chosen.any():
        return images
    k = max_lesions
    # Lesion centres drawn among lung pixels (uniform weights over the mask, slices without lung masked out).
    weights = torch.where(flat.sum(1, keepdim=True) > 0, flat, torch.ones_like(flat))
    centres = torch.multinomial(weights, k, replacement=True, generator=generator)  # (N, k)
    cy, cx = (centres // size).float(), (centres % size).float()
    radius = size * (0.03 + 0.09 * torch.rand(n, k, generator=generator))
    active = (torch.rand(n, k, generator=generator) < 0.7) | (torch.arange(k) == 0)  # ≥ 1 blob per slice
    target = torch.where(torch.rand(n, k, generator=generator) < 0.6, GGO_WINDOW, CONSOLIDATION_WINDOW)
    strength = (0.6 + 0.4 * torch.rand(n, k, generator=generator)) * active * chosen[:, None]
    coords = torch.arange(size, dtype=torch.float32)
    dist2 = (coords[None, None, :, None] - cy[..., None, None]) ** 2 + (
        coords[None, None, None, :] - cx[..., None, None]
    ) ** 2  # (N, k, S, S)
    blobs = strength[..., None, None] * torch.exp(-dist2 / (2.0 * radius[..., None, None] ** 2))
    blobs = blobs.to(images.device, images.dtype)
    target_map = target[..., None, None].to(images.device, images.dtype)
    # Blend blob by blob: a pixel moves towards the strongest lesion's grey value, never beyond it.
    weight = torch.clamp(blobs.sum(1), max=1.0) * lung  # (N, S, S)
    mixed_target = (blobs * target_map).sum(1) / blobs.sum(1).clamp_min(1e-6)
    lesioned = images[:, 0] + weight * (torch.maximum(mixed_target, images[:, 0]) - images[:, 0])
    return lesioned[:, None]


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
    model.eval()
    out = []
    for start in range(0, len(dataset), batch_size):
        images = dataset.images[start : start + batch_size, None].float().to(device)
        with _autocast(device, amp):
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
    from corona_ct.models.segmenter import build_unet

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    group_names = np.asarray(groups).astype(str)
    unique_groups = np.unique(group_names)
    rng = np.random.default_rng(config.seed)
    n_val = max(1, round(config.val_fraction * unique_groups.size)) if unique_groups.size > 1 else 0
    val_groups = set(config.val_groups) or set(rng.permutation(unique_groups)[:n_val].tolist())
    unknown = val_groups - set(unique_groups.tolist())
    if unknown:
        raise ConfigError(f"validation group(s) {', '.join(sorted(unknown))} are not in the data")
    is_val = np.isin(group_names, list(val_groups))
    if not is_val.any() or is_val.all():
        # A single volume: hold out every fifth slice instead (slices of one volume are correlated,
        # so this validation is optimistic; it is recorded in the card).
        is_val = np.arange(len(slices)) % 5 == 4
    train_set, val_set = slices.subset(np.flatnonzero(~is_val)), slices.subset(np.flatnonzero(is_val))

    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = build_unet(num_classes=config.num_classes, in_channels=1).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    card: dict[str, Any] = {
        **(card_extra or {}),
        "architecture": "segmenter/unet-vgg16",
        "task": "lung segmentation (0 background, 1 right, 2 left)" if config.num_classes == 3
        else "lung segmentation (0 background, 1 lung)",
        "input": {"size": config.input_size, "channels": 1, "window": list(window_hu), "roi": "none"},
        "num_classes": config.num_classes,
        "train_config": config.to_dict(),
        "n_train_slices": len(train_set), "n_val_slices": len(val_set),
        "validation_split": "every fifth slice of one volume" if unique_groups.size < 2
        else f"by volume: {', '.join(sorted(val_groups))}",
    }  # fmt: skip
    history: list[dict[str, float]] = []
    best_dice, best_epoch, bad_epochs, elapsed = -math.inf, 0, 0, 0.0
    best_metrics: dict[str, Any] = {}
    start_epoch = 1
    if resume and (output / f"{LAST_STATE}.json").is_file():
        meta = _load_last_state(output, model, optimizer, config.to_dict())
        history, best_dice, best_epoch = meta["history"], float(meta["best_score"]), meta["best_epoch"]
        bad_epochs, best_metrics, elapsed = meta["bad_epochs"], meta["best_metrics"], float(meta["seconds"])
        start_epoch = config.epochs + 1 if meta.get("stopped_early") else meta["epoch"] + 1
        card.update(best_epoch=best_epoch, best_validation=best_metrics)
        log.info("resuming %s at epoch %d", output, start_epoch)
    for epoch in range(start_epoch, config.epochs + 1):
        started = time.perf_counter()
        model.train()
        rng_aug = _epoch_generator(config.seed, epoch, stream=3)
        order = torch.randperm(len(train_set), generator=_epoch_generator(config.seed, epoch, stream=4))
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
            with _autocast(device, config.amp):
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
        elapsed += time.perf_counter() - started
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / max(seen, 1),
            "val_dice": mean_dice,
            "seconds": elapsed,
        }
        history.append(row)
        if mean_dice > best_dice + 1e-9:
            best_dice, best_epoch, bad_epochs = mean_dice, epoch, 0
            names = ["right", "left"] if config.num_classes == 3 else ["lung"]
            best_metrics = {
                "dice_mean": mean_dice,
                **{f"dice_{n}": _finite_or_none(d) for n, d in zip(names, dice, strict=True)},
            }
            card.update(best_epoch=epoch, best_validation=best_metrics, train_seconds=round(elapsed, 1))
            save_checkpoint(model, output / MODEL_FILE, card)
        else:
            bad_epochs += 1
        stopped_early = config.patience > 0 and bad_epochs >= config.patience
        meta = {
            "config": config.to_dict(), "epoch": epoch, "history": history, "best_score": best_dice,
            "best_epoch": best_epoch, "bad_epochs": bad_epochs, "best_metrics": best_metrics,
            "seconds": elapsed, "stopped_early": stopped_early,
        }  # fmt: skip
        _save_last_state(output, model, optimizer, meta)
        write_history(history, output, title="lung U-Net (VGG16 encoder)")
        progress_log.info(epoch_line(epoch, config.epochs, row, time.perf_counter() - started))
        if on_epoch is not None:
            on_epoch(row)
        if stopped_early:
            break
    if best_epoch == 0:
        raise ModelError("segmenter validation Dice was never finite: the validation slices hold no lung")
    state, final_card = load_checkpoint(output / MODEL_FILE, expected_architecture="segmenter/unet-vgg16")
    model.load_state_dict(state)
    model.eval()
    return TrainResult(model, output / MODEL_FILE, final_card, history, best_epoch, best_metrics, elapsed)
