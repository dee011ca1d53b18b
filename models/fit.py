"""The one epoch loop of every trainer: resume, best-epoch selection, early stopping, checkpoints.

:func:`fit` calls the trainer's ``run_epoch(epoch)`` (train one epoch, then evaluate)
for epochs ``1..epochs`` and owns everything around it:

- the best epoch by :attr:`EpochResult.score` (higher is better; a gain must exceed
  1e-9, NaN never gains) is saved as ``model.safetensors`` with its card;
- after ``patience`` epochs without gain the loop stops (0 = never stop early);
- every epoch leaves ``last_state.safetensors``/``.json`` (model and optimizer tensors,
  optimizer hyper-parameters, bookkeeping) and ``history.csv``/``curves.png``;
- ``resume=True`` restores the last finished epoch and continues after it (a run that
  stopped early stays stopped); a run folder trained with other settings is refused.

Determinism: trainers draw each epoch's randomness from :func:`epoch_generator`, seeded
by ``(seed, epoch, stream)``, so a resumed run continues exactly as an uninterrupted one.
Checkpoints are safetensors + JSON only, never pickle.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from corona_ct.data.datasets import SegmentationSlices, SliceDataset, as_network_input
from corona_ct.models.checkpoint import load_checkpoint, save_checkpoint
from corona_ct.pipeline.atomic import atomic_path, write_text
from corona_ct.pipeline.errors import ConfigError, ModelError
from corona_ct.pipeline.progress import epoch_line, progress_log

log = logging.getLogger(__name__)

LAST_STATE = "last_state"
MODEL_FILE = "model.safetensors"
#: Fields that may change when a run is resumed (they do not change what was learnt so far).
RESUMABLE_CHANGES = frozenset({"epochs", "patience", "workers", "device"})


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


@dataclass(frozen=True)
class EpochResult:
    """What one epoch of training and evaluation produced.

    ``row``: history columns besides ``epoch`` and ``seconds`` (the loop adds those);
    ``score``: the selection score, higher is better; ``metrics``: what the card records
    as ``best_validation`` when this epoch becomes the best.
    """

    row: dict[str, float]
    score: float
    metrics: dict[str, Any] = field(default_factory=dict)


def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A generator seeded by (seed, epoch, stream): each random draw of an epoch, reproducibly."""
    generator = torch.Generator()
    generator.manual_seed(seed * 1_000_003 + epoch * 101 + stream)
    return generator


def use_amp(device: torch.device, amp: bool) -> bool:
    """bf16 autocast and channels_last apply on CUDA only."""
    return amp and device.type == "cuda"


def autocast(device: torch.device, amp: bool) -> Any:
    """bf16 autocast on CUDA when ``amp``; a no-op context otherwise."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp(device, amp))


def finite_or_none(value: Any) -> Any:
    """JSON cards refuse NaN: an undefined metric (e.g. precision of a never-predicted class) is null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


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
        if use_amp(device, amp):
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            model(inputs)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.train(was_training)


def write_history(history: Sequence[Mapping[str, float]], output_dir: Path, title: str = "") -> None:
    """``history.csv`` and ``curves.png`` (loss, accuracy, AUC and Dice columns per epoch)."""
    if not history:
        return
    columns = list(dict.fromkeys(key for row in history for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text(output_dir / "history.csv", buffer.getvalue())

    epochs = [row["epoch"] for row in history]
    panels = [("loss", "loss"), ("accuracy", "acc"), ("AUC", "auc"), ("Dice", "dice")]
    panels = [(label, key) for label, key in panels if any(c.endswith(f"_{key}") for c in columns)]
    fig = Figure(figsize=(4.2 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)
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
    output_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Mapping[str, Any],
    resumable_changes: frozenset[str] = RESUMABLE_CHANGES,
) -> dict[str, Any]:
    """Restore the last finished epoch into ``model`` and ``optimizer``; its bookkeeping as a dict.

    Refuses a run folder trained with other settings than ``config`` (except
    ``resumable_changes``): resuming it would mix two runs in one model.
    """
    json_path = output_dir / f"{LAST_STATE}.json"
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
        tensors = load_file(str(output_dir / f"{LAST_STATE}.safetensors"))
    except (OSError, json.JSONDecodeError, SafetensorError) as error:
        raise ModelError(f"cannot resume from {output_dir}: {error}; start without --resume") from None
    current = json.loads(json.dumps(dict(config)))  # as it was saved: tuples became lists
    changed = {k for k, v in current.items() if meta["config"].get(k) != v} - resumable_changes
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


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    run_epoch: Callable[[int], EpochResult],
    output_dir: Path,
    card: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    epochs: int,
    patience: int,
    resume: bool = False,
    trained: nn.Module | None = None,
    title: str = "",
    score_name: str = "validation score",
    on_epoch: Callable[[Mapping[str, float]], None] | None = None,
    resumable_changes: frozenset[str] = RESUMABLE_CHANGES,
) -> TrainResult:
    """Run ``run_epoch`` for epochs 1..``epochs``; keep the best-scoring ``model`` in ``output_dir``.

    ``card``: the checkpoint card (``architecture``, ``task``, ``input``, …), completed with
    ``best_epoch``, ``best_validation``, ``epochs_run``, ``stopped_early`` and
    ``train_seconds``. ``config``: the run's settings, stored with every epoch and compared
    on resume. ``trained``: the module the optimizer updates when it holds more than
    ``model`` (auxiliary heads); it is what the resumable state saves. ``on_epoch`` gets
    each history row. ``resumable_changes``: the ``config`` keys a resume may change.
    Returns ``model`` with the best epoch's weights, in eval mode.
    """
    output = Path(output_dir)
    resumable = model if trained is None else trained
    history: list[dict[str, float]] = []
    best_score, best_epoch, bad_epochs, elapsed = -math.inf, 0, 0, 0.0
    best_metrics: dict[str, Any] = {}
    start_epoch, stopped_early = 1, False
    if resume and (output / f"{LAST_STATE}.json").is_file():
        meta = _load_last_state(output, resumable, optimizer, config, resumable_changes)
        history, best_score, best_epoch = meta["history"], float(meta["best_score"]), int(meta["best_epoch"])
        bad_epochs, best_metrics, elapsed = (
            int(meta["bad_epochs"]),
            meta["best_metrics"],
            float(meta["seconds"]),
        )
        stopped_early = bool(meta.get("stopped_early"))
        start_epoch = epochs + 1 if stopped_early else int(meta["epoch"]) + 1
        log.info("resuming %s at epoch %d", output, start_epoch)

    for epoch in range(start_epoch, epochs + 1):
        started = time.perf_counter()
        result = run_epoch(epoch)
        elapsed += time.perf_counter() - started
        row: dict[str, float] = {"epoch": epoch, **result.row, "seconds": elapsed}
        history.append(row)
        if result.score > best_score + 1e-9:
            best_score, best_epoch, bad_epochs = result.score, epoch, 0
            best_metrics = {key: finite_or_none(value) for key, value in result.metrics.items()}
            best_card = dict(card, best_epoch=epoch, best_validation=best_metrics, epochs_run=epoch)
            save_checkpoint(model, output / MODEL_FILE, dict(best_card, train_seconds=round(elapsed, 1)))
        else:
            bad_epochs += 1
        stopped_early = patience > 0 and bad_epochs >= patience
        meta = {
            "config": dict(config), "epoch": epoch, "history": history, "best_score": best_score,
            "best_epoch": best_epoch, "bad_epochs": bad_epochs, "best_metrics": best_metrics,
            "seconds": elapsed, "stopped_early": stopped_early,
        }  # fmt: skip
        _save_last_state(output, resumable, optimizer, meta)
        write_history(history, output, title=title)
        progress_log.info(epoch_line(epoch, epochs, row, time.perf_counter() - started))
        if on_epoch is not None:
            on_epoch(row)
        if stopped_early:
            progress_log.info("early stop: %s did not improve for %d epochs", score_name, patience)
            break

    if best_epoch == 0:
        raise ModelError(f"{score_name} was never finite, so no epoch could be kept")
    state, final_card = load_checkpoint(output / MODEL_FILE, expected_architecture=str(card["architecture"]))
    model.load_state_dict(state)
    model.eval()
    final_card = dict(
        final_card, epochs_run=len(history), stopped_early=stopped_early, train_seconds=round(elapsed, 1)
    )
    write_text(
        output / "model.json", json.dumps(final_card, indent=2, sort_keys=True, allow_nan=False) + "\n"
    )
    return TrainResult(model, output / MODEL_FILE, final_card, history, best_epoch, best_metrics, elapsed)
