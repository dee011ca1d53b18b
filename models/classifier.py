"""Slice classifiers: a registry of backbones with their Grad-CAM and feature layers.

Every classifier maps a (N, 3, S, S) float batch in [0, 1] (windowed CT, grey
replicated to 3 channels) to (N, num_outputs) logits. ``num_outputs == 1`` is the
binary normal-vs-COVID head trained with binary cross-entropy (Gozes et al.);
``num_outputs == 2`` is the categorical head of the COVID-CTset study.
No weights are downloaded: builders always start from random initialisation and
checkpoints are loaded with :mod:`models.checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision import models as tvm

from pipeline.errors import ModelError


@dataclass(frozen=True)
class BackboneSpec:
    """What the pipeline needs to know about a backbone."""

    name: str
    input_size: int  # square input side in pixels
    cam_layers: tuple[str, ...]  # module names hooked for Grad-CAM, fine (≈28×28) to coarse (≈14×14)
    feature_layer: str  # last conv block; its pooled output is the clustering feature
    feature_dim: int
    build: Callable[[int], nn.Module]


def _resnet(depth: int) -> Callable[[int], nn.Module]:
    def build(num_outputs: int) -> nn.Module:
        net = tvm.resnet50(weights=None) if depth == 50 else tvm.resnet152(weights=None)
        net.fc = nn.Linear(net.fc.in_features, num_outputs)
        return net

    return build


BACKBONES: dict[str, BackboneSpec] = {
    "resnet50": BackboneSpec("resnet50", 224, ("layer2", "layer3"), "layer4", 2048, _resnet(50)),
    "resnet152": BackboneSpec("resnet152", 224, ("layer2", "layer3"), "layer4", 2048, _resnet(152)),
}


def backbone_spec(name: str) -> BackboneSpec:
    """Look up a backbone by name; the error lists the known ones."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ModelError(f"unknown backbone {name!r}; choose one of {', '.join(sorted(BACKBONES))}") from None


def build_classifier(name: str = "resnet50", num_outputs: int = 1) -> nn.Module:
    """A randomly initialised classifier of the named backbone."""
    return backbone_spec(name).build(num_outputs)


def positive_probability(logits: torch.Tensor) -> torch.Tensor:
    """P(COVID) per row from a 1-logit (sigmoid) or 2-logit (softmax, class 1) head."""
    if logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0])
    return torch.softmax(logits, dim=1)[:, 1]


def positive_score(logits: torch.Tensor) -> torch.Tensor:
    """The scalar per row that Grad-CAM differentiates: the COVID logit (or logit difference)."""
    if logits.shape[1] == 1:
        return logits[:, 0]
    return logits[:, 1] - logits[:, 0]
