"""Slice classifiers: a registry of backbones with their Grad-CAM and feature layers.

Every classifier maps a (N, 3, S, S) float batch in [0, 1] (windowed CT, grey
replicated to 3 channels) to (N, num_outputs) logits. ``num_outputs == 1`` is the
binary normal-vs-COVID head trained with binary cross-entropy (Gozes et al.);
``num_outputs == 2`` is the categorical head of the COVID-CTset study.
No weights are downloaded: builders always start from random initialisation and
checkpoints are loaded with :mod:`models.checkpoint`.

Grad-CAM layers are chosen per backbone at its native input size: the module whose
output is closest to 28×28 (fine) and to 14×14 (coarse). Where no module gives
exactly that (Inception-v3, Xception at 299) the closest is used and its size is
recorded in ``BackboneSpec.cam_sizes`` (see docs/training.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm

from corona_ct.pipeline.errors import ModelError


@dataclass(frozen=True)
class BackboneSpec:
    """What the pipeline needs to know about a backbone."""

    name: str
    input_size: int  # square input side in pixels
    cam_layers: tuple[str, ...]  # module names hooked for Grad-CAM, fine (≈28×28) to coarse (≈14×14)
    feature_layer: str  # last conv block; its pooled output is the clustering feature
    feature_dim: int
    build: Callable[..., nn.Module]  # build(num_outputs, **options) -> randomly initialised network
    cam_sizes: tuple[int, ...] = ()  # spatial side of each cam layer's output at ``input_size``
    min_input_size: int = 32  # smallest square input the architecture accepts


_RESNETS: dict[int, Callable[..., tvm.ResNet]] = {18: tvm.resnet18, 50: tvm.resnet50, 152: tvm.resnet152}


def _resnet(depth: int) -> Callable[[int], nn.Module]:
    def build(num_outputs: int) -> nn.Module:
        net = _RESNETS[depth](weights=None)
        net.fc = nn.Linear(net.fc.in_features, num_outputs)
        return net

    return build


def _vgg(depth: int) -> Callable[[int], nn.Module]:
    def build(num_outputs: int) -> nn.Module:
        net = tvm.vgg16(weights=None) if depth == 16 else tvm.vgg19(weights=None)
        net.classifier[-1] = nn.Linear(net.classifier[-1].in_features, num_outputs)
        return net

    return build


def _inception_v3(num_outputs: int) -> nn.Module:
    # transform_input=False: inputs are windowed CT in [0, 1], not ImageNet-normalised photographs.
    net = tvm.inception_v3(weights=None, aux_logits=False, transform_input=False, init_weights=True)
    net.fc = nn.Linear(net.fc.in_features, num_outputs)
    return net


def _xception(num_outputs: int) -> nn.Module:
    import timm  # optional dependency (extra "xception"); imported only when asked for

    return timm.create_model("legacy_xception", pretrained=False, num_classes=num_outputs)


class ResNetLSTM(nn.Module):
    """ResNet-152 + row-wise LSTM hybrid (the COVID-CTset comparison study).

    The CNN branch is a ResNet-152 trunk whose global-average-pooled layer4 output
    (2048) is one half of the feature vector. The LSTM branch reads the grey image
    (channel mean) as a sequence of rows: each of the ``S`` rows (``S`` pixels) is one
    time step of two stacked LSTMs of ``lstm_hidden`` units; the top layer's last
    hidden state is the other half. Both are concatenated before one linear layer.
    """

    def __init__(self, num_outputs: int, lstm_hidden: int = 2048, input_size: int = 224) -> None:
        super().__init__()
        trunk = tvm.resnet152(weights=None)
        trunk.fc = nn.Identity()
        self.cnn = trunk
        self.lstm_hidden = lstm_hidden
        # The LSTM's input width is fixed at construction: rows of the native input size.
        self.lstm = nn.LSTM(input_size=input_size, hidden_size=lstm_hidden, num_layers=2, batch_first=True)
        self.fc = nn.Linear(2048 + lstm_hidden, num_outputs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cnn_features = self.cnn(images)  # (N, 2048)
        rows = images.mean(dim=1)  # (N, S rows, S pixels): grey image, one row per time step
        if rows.shape[-1] != self.lstm.input_size:
            raise ModelError(
                f"resnet152_lstm was built for {self.lstm.input_size}-pixel rows but got images of width "
                f"{rows.shape[-1]}; use the input size it was trained with"
            )
        _, (hidden, _) = self.lstm(rows.contiguous())
        return self.fc(torch.cat([cnn_features, hidden[-1]], dim=1))


def build_resnet152_lstm(num_outputs: int, lstm_hidden: int = 2048, input_size: int = 224) -> nn.Module:
    """The hybrid with the study's 2048 LSTM units by default; ``input_size`` = row length."""
    return ResNetLSTM(num_outputs, lstm_hidden=lstm_hidden, input_size=input_size)


BACKBONES: dict[str, BackboneSpec] = {
    "resnet50": BackboneSpec(
        "resnet50", 224, ("layer2", "layer3"), "layer4", 2048, _resnet(50), cam_sizes=(28, 14)
    ),
    # Not one of the seed's: an 11 M-parameter ResNet (basic blocks, 512-d features) for small
    # training sets and CPU budgets; its layer2/layer3 give the same 28×28 and 14×14 Grad-CAM grids.
    "resnet18": BackboneSpec(
        "resnet18", 224, ("layer2", "layer3"), "layer4", 512, _resnet(18), cam_sizes=(28, 14)
    ),
    "resnet152": BackboneSpec(
        "resnet152", 224, ("layer2", "layer3"), "layer4", 2048, _resnet(152), cam_sizes=(28, 14)
    ),
    # VGG: the max-pool outputs closing blocks 3 (28×28) and 4 (14×14). Pool outputs, not the
    # in-place ReLUs before them, so that tensor hooks are not invalidated by an in-place op.
    "vgg16": BackboneSpec("vgg16", 224, ("features.16", "features.23"), "features", 512, _vgg(16), (28, 14)),
    "vgg19": BackboneSpec("vgg19", 224, ("features.18", "features.27"), "features", 512, _vgg(19), (28, 14)),
    # Inception-v3 at 299: the grid is 35×35 (Mixed_5*) then 17×17 (Mixed_6*); the last block of each.
    "inception_v3": BackboneSpec(
        "inception_v3", 299, ("Mixed_5d", "Mixed_6e"), "Mixed_7c", 2048, _inception_v3, (35, 17), 75
    ),
    # Xception at 299: entry-flow block2 ends at 37×37, the middle flow (block3..11) runs at 19×19.
    "xception": BackboneSpec("xception", 299, ("block2", "block11"), "act4", 2048, _xception, (37, 19), 71),
    "resnet152_lstm": BackboneSpec(
        "resnet152_lstm",
        224,
        ("cnn.layer2", "cnn.layer3"),
        "cnn.layer4",
        2048,
        build_resnet152_lstm,
        cam_sizes=(28, 14),
    ),
}


def backbone_spec(name: str) -> BackboneSpec:
    """Look up a backbone by name; the error lists the known ones."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ModelError(f"unknown backbone {name!r}; choose one of {', '.join(sorted(BACKBONES))}") from None


def build_classifier(name: str = "resnet50", num_outputs: int = 1, **options: Any) -> nn.Module:
    """A randomly initialised classifier of the named backbone.

    ``options`` go to the backbone's builder (only ``resnet152_lstm`` takes any:
    ``lstm_hidden``, ``input_size``); an option the builder does not take is an error.
    """
    spec = backbone_spec(name)
    try:
        return spec.build(num_outputs, **options)
    except TypeError as error:
        if not options:
            raise
        raise ModelError(f"backbone {name!r} does not take options {sorted(options)}: {error}") from None


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
