"""Slice classification (with Grad-CAM) in mini-batches, and the case-level decision."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from corona_ct.models.checkpoint import LoadedModel
from corona_ct.models.classifier import BackboneSpec, positive_probability
from corona_ct.pipeline.config import ClassifyConfig
from corona_ct.pipeline.errors import ConfigError, ModelError
from corona_ct.pipeline.explain import SliceOutputs, explain_batch

FloatArray = npt.NDArray[np.float32]

CASE_AGGREGATIONS = ("max", "top_mean")


def _unwrap(model: LoadedModel | nn.Module, spec: BackboneSpec | None) -> tuple[nn.Module, BackboneSpec]:
    if isinstance(model, LoadedModel):
        spec = spec or model.spec
        module = model.module
    else:
        module = model
    if spec is None:
        raise ModelError("classify_slices needs the backbone spec (models.classifier.backbone_spec(name))")
    return module, spec


def _empty_outputs(
    spec: BackboneSpec, size: tuple[int, int], layers: Sequence[str], explain: bool
) -> SliceOutputs:
    probabilities = np.zeros(0, np.float32)
    if not explain:
        return SliceOutputs(probabilities)
    return SliceOutputs(
        probabilities=probabilities,
        fused=np.zeros((0, *size), np.float32),
        layer_maps={name: np.zeros((0, 0, 0), np.float32) for name in layers},  # size unknown without a pass
        features=np.zeros((0, spec.feature_dim), np.float32),
        feature_weights=np.zeros((0, spec.feature_dim), np.float32),
    )


def classify_slices(
    model: LoadedModel | nn.Module,
    spec: BackboneSpec | None,
    inputs: torch.Tensor | np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
    amp: bool,
    explain: bool = True,
    progress: Callable[[int], None] | None = None,
    layers: Sequence[str] | None = None,
    fusion: str = "product",
) -> SliceOutputs:
    """Classify (n, 3, S, S) slices in [0, 1] in mini-batches of ``batch_size`` on ``device``.

    ``explain=True`` runs :func:`pipeline.explain.explain_batch` per mini-batch
    (probabilities, Grad-CAM maps, clustering features); ``explain=False`` is a
    plain inference-mode forward returning probabilities only. ``spec`` may be
    None when ``model`` is a :class:`LoadedModel` that carries one. ``progress``
    is called with the number of slices finished in each mini-batch (an
    increment, so ``tqdm.update`` fits). The model is moved to ``device``.
    """
    if batch_size < 1:
        raise ConfigError(f"classify.batch_size must be at least 1, got {batch_size}")
    module, spec = _unwrap(model, spec)
    batch = torch.as_tensor(inputs)
    if batch.ndim != 4:
        raise ConfigError(f"classifier input must be (n, channels, S, S), got shape {tuple(batch.shape)}")
    cam_layers = tuple(layers) if layers is not None else spec.cam_layers
    if batch.shape[0] == 0:
        return _empty_outputs(spec, (int(batch.shape[2]), int(batch.shape[3])), cam_layers, explain)
    use_amp = amp and device.type == "cuda"
    module.to(device)
    if use_amp:
        module.to(memory_format=torch.channels_last)
    module.eval()

    parts: list[SliceOutputs] = []
    for start in range(0, batch.shape[0], batch_size):
        part = batch[start : start + batch_size].to(device=device, dtype=torch.float32, non_blocking=True)
        if explain:
            parts.append(explain_batch(module, spec, part, amp=use_amp, layers=cam_layers, fusion=fusion))
        else:
            parts.append(SliceOutputs(_probabilities(module, part, use_amp)))
        if progress is not None:
            progress(int(part.shape[0]))
    return SliceOutputs.concatenate(parts)


def _probabilities(module: nn.Module, batch: torch.Tensor, use_amp: bool) -> FloatArray:
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        if use_amp:
            batch = batch.contiguous(memory_format=torch.channels_last)
        logits = module(batch)
    return positive_probability(logits.float()).to("cpu").numpy()


def case_probability(probabilities: npt.ArrayLike, config: ClassifyConfig) -> float:
    """Case-level P(COVID) from the slice probabilities (NaN = slice not evaluated, ignored).

    ``"max"``: the largest slice probability. ``"top_mean"``: the mean of the
    top ``ceil(case_top_fraction × n)`` slices (at least one), which is less
    sensitive than the maximum to a single spurious slice. No evaluated slice
    gives 0.0; the runner reports "no lung slices".
    """
    if config.case_aggregation not in CASE_AGGREGATIONS:
        raise ConfigError(
            f"unknown classify.case_aggregation {config.case_aggregation!r}; "
            f"choose one of {', '.join(CASE_AGGREGATIONS)}"
        )
    values = np.asarray(probabilities, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0
    if config.case_aggregation == "max":
        return float(values.max())
    fraction = config.case_top_fraction
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"classify.case_top_fraction must be in (0, 1], got {fraction}")
    # the tolerance keeps e.g. 0.1 × 30 = 3.0000000000000004 from rounding up to 4
    top_count = min(values.size, max(1, math.ceil(fraction * values.size - 1e-9)))
    top = np.partition(values, values.size - top_count)[values.size - top_count :]
    return float(top.mean())
