"""The networks a run uses: loaded once, checked against the config, described for the reports.

``load_models`` loads the classifier and (unless ``segment.method=classical``) the U-Net
lung segmenter, and refuses a classifier whose model card's input contract (HU window,
lung-box segmenter) the config does not meet; ``ModelSet.describe`` and ``models_key`` say
which weights ran, for report.json and for ``--resume``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from corona_ct.models import weights
from corona_ct.models.checkpoint import LoadedModel, input_contract_problems, load_classifier, load_segmenter
from corona_ct.models.classifier import BackboneSpec
from corona_ct.pipeline.config import SEGMENT_METHODS, PipelineConfig
from corona_ct.pipeline.device import resolve_device
from corona_ct.pipeline.errors import ModelError
from corona_ct.pipeline.preprocess import roi_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSet:
    """The networks a run uses, loaded once per batch."""

    classifier: LoadedModel
    segmenter: LoadedModel | None  # None: the classical segmenter runs
    warnings: tuple[str, ...] = ()  # input-contract warnings, repeated in every report

    @property
    def spec(self) -> BackboneSpec:
        """The classifier's backbone description (input size, Grad-CAM layers)."""
        if self.classifier.spec is None:
            raise ModelError("the classifier checkpoint names no known backbone; check its JSON card")
        return self.classifier.spec

    def input_size(self, config: PipelineConfig) -> int:
        """Network input side (px): the config's when set, else the size the checkpoint was trained at."""
        if config.roi.input_size:
            return config.roi.input_size
        trained_size = self.classifier.card.get("input", {}).get("size")
        return int(trained_size) if trained_size else self.spec.input_size

    @property
    def segmenter_input_size(self) -> int | None:
        """Side (px) the U-Net was trained at, from its card; None without a U-Net."""
        if self.segmenter is None:
            return None
        size = self.segmenter.card.get("input", {}).get("size")
        return int(size) if size else None

    @property
    def untrained(self) -> bool:
        return not self.classifier.trained

    def describe(self) -> dict[str, dict[str, object] | None]:
        """Names, architectures and checksums for the report."""

        def one(model: LoadedModel | None) -> dict[str, object] | None:
            if model is None:
                return None
            if model.path is None:
                origin = "none (random weights)"
            elif model.path.resolve().parent == weights.WEIGHTS_DIR.resolve():
                origin = "project default (models/weights)"
            else:
                origin = "user file"
            return {
                "architecture": model.card.get("architecture"),
                "file": model.path.name if model.path else None,
                "weights": origin,
                "input_size": model.card.get("input", {}).get("size"),
                "sha256": model.sha256,
                "trained": model.trained,
            }

        return {"classifier": one(self.classifier), "segmenter": one(self.segmenter)}


def models_key(models: ModelSet) -> str:
    """Identity of the loaded weights (their SHA-256s), for resume checks."""
    desc = models.describe()
    return json.dumps([d and d.get("sha256") for d in desc.values()], sort_keys=True)


def _check_cam_layers(classifier: LoadedModel, layers: Sequence[str]) -> None:
    """Refuse ``cam.layers`` that the classifier does not have, naming the ones it has."""
    if not layers or classifier.spec is None:
        return
    names = {name for name, _ in classifier.module.named_modules()}
    missing = [layer for layer in layers if layer not in names]
    if missing:
        raise ModelError(
            f"cam.layers names {', '.join(missing)}, which the {classifier.spec.name} classifier does not "
            f"have; its Grad-CAM layers are {', '.join(classifier.spec.cam_layers)} "
            "(leave cam.layers empty to use them)"
        )


def load_models(
    config: PipelineConfig,
    cls_weights: Path | None = None,
    seg_weights: Path | None = None,
    *,
    allow_untrained: bool = False,
    use_defaults: bool = True,
) -> ModelSet:
    """Load the classifier and (when configured) the U-Net segmenter.

    Explicit paths win over the project's default weights in ``models/weights``; with
    ``use_defaults=False`` only the given paths load (a Ray worker loads exactly the driver's files).
    Without classifier weights this refuses unless ``allow_untrained`` is set.
    """
    device = str(resolve_device(config.runtime.device))
    cls_path = cls_weights or (weights.default_weights("classifier") if use_defaults else None)
    if cls_path is None and not allow_untrained:
        raise ModelError(
            "no classifier weights: pass --cls-weights RUN/model.safetensors (train one with "
            "`corona-ct train-cls`), or --allow-untrained to run with random weights (numbers meaningless)"
        )
    if cls_path is None:
        torch.manual_seed(config.runtime.seed)  # untrained runs are at least reproducible
    classifier = load_classifier(cls_path, device=device, backbone=config.classify.backbone)
    _check_cam_layers(classifier, config.cam.layers)

    method = config.segment.method
    if method not in SEGMENT_METHODS:
        raise ModelError(f"segment.method={method!r}; use auto, unet or classical")
    seg_path = (
        seg_weights if seg_weights is not None or not use_defaults else weights.default_weights("segmenter")
    )
    if method == "unet" and seg_path is None:
        raise ModelError("segment.method=unet needs --seg-weights (train one with `corona-ct train-seg`)")
    segmenter = None
    if method != "classical" and seg_path is not None:
        segmenter = load_segmenter(seg_path, device=device)
    if not classifier.trained:
        return ModelSet(classifier=classifier, segmenter=segmenter)
    errors, warnings = input_contract_problems(
        classifier.card, (config.window.hu_min, config.window.hu_max), segmenter, roi_name(config.roi)
    )
    name = classifier.path.name if classifier.path else "classifier"
    if errors:
        raise ModelError(f"{name}: refused, its input contract is not met: " + "; ".join(errors))
    for warning in warnings:
        log.warning("%s: %s", name, warning)
    return ModelSet(classifier=classifier, segmenter=segmenter, warnings=tuple(warnings))
