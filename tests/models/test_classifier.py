"""Backbone registry: every backbone trains one step on CPU; its Grad-CAM layers have the documented sizes."""

from __future__ import annotations

import pytest
import torch

from corona_ct.models.classifier import BACKBONES, backbone_spec, build_classifier, positive_probability
from corona_ct.pipeline.errors import ModelError

#: Small CPU-friendly input per backbone (the smallest the architecture accepts comfortably).
SMALL_INPUT = {"inception_v3": 75, "xception": 71}
OPTIONS = {"resnet152_lstm": {"lstm_hidden": 8, "input_size": 64}}


def test_registry_lists_the_study_backbones_and_keeps_resnet_entries() -> None:
    assert set(BACKBONES) == {
        "resnet18",
        "resnet50",
        "resnet152",
        "vgg16",
        "vgg19",
        "inception_v3",
        "xception",
        "resnet152_lstm",
    }
    assert backbone_spec("resnet50").cam_layers == ("layer2", "layer3")
    assert backbone_spec("resnet18").feature_dim == 512
    assert backbone_spec("resnet50").feature_dim == 2048 and backbone_spec("resnet152").input_size == 224
    assert backbone_spec("inception_v3").input_size == 299
    with pytest.raises(ModelError, match="unknown backbone"):
        backbone_spec("alexnet")


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_cam_and_feature_layers_have_the_documented_sizes_at_native_input(name: str) -> None:
    spec = backbone_spec(name)
    shapes: dict[str, tuple[int, ...]] = {}
    # The meta device propagates shapes without allocating memory, so native sizes cost nothing.
    with torch.device("meta"):
        model = build_classifier(name, 2)
        handles = [
            model.get_submodule(layer).register_forward_hook(
                lambda _m, _i, out, layer=layer: shapes.__setitem__(layer, tuple(out.shape))
            )
            for layer in (*spec.cam_layers, spec.feature_layer)
        ]
        try:
            logits = model(torch.empty(1, 3, spec.input_size, spec.input_size))
        finally:
            for handle in handles:
                handle.remove()
    assert tuple(logits.shape) == (1, 2)
    for layer, size in zip(spec.cam_layers, spec.cam_sizes, strict=True):
        assert shapes[layer][-2:] == (size, size), layer
    fine, coarse = spec.cam_sizes
    assert 24 <= fine <= 40 and 12 <= coarse <= 20 and fine > coarse  # ≈28 and ≈14, closest available
    assert shapes[spec.feature_layer][1] == spec.feature_dim


#: Backbones whose training step takes seconds on a CPU (VGG: 138 M parameters, most in the
#: classifier head; ResNet-152): ``make test`` runs them, ``make test-fast`` keeps one of each
#: other family (ResNet-152 still runs there inside the ResNet-152 + LSTM hybrid).
SLOW_STEPS = {"vgg16", "vgg19", "resnet152"}
#: Every backbone with the 1-logit head; the 2-logit head (the same Linear swap) on two families.
STEP_CASES = [
    pytest.param(name, outputs, marks=[pytest.mark.slow] if name in SLOW_STEPS else [])
    for name, outputs in [(name, 1) for name in sorted(BACKBONES)] + [("resnet50", 2), ("vgg16", 2)]
]


@pytest.mark.parametrize(("name", "num_outputs"), STEP_CASES)
def test_every_backbone_runs_one_training_step_on_cpu(name: str, num_outputs: int) -> None:
    torch.manual_seed(0)
    size = SMALL_INPUT.get(name, 64)
    model = build_classifier(name, num_outputs, **OPTIONS.get(name, {}))
    model.train()
    images = torch.rand(2, 3, size, size)
    labels = torch.tensor([0, 1])
    before = [p.detach().clone() for p in model.parameters()]
    logits = model(images)
    assert logits.shape == (2, num_outputs)
    if num_outputs == 1:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], labels.float())
    else:
        loss = torch.nn.functional.cross_entropy(logits, labels)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    changed = sum(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))
    assert changed > 0.9 * len(before)  # gradients reach (almost) every parameter tensor
    probs = positive_probability(logits.detach())
    assert probs.shape == (2,) and bool(((probs >= 0) & (probs <= 1)).all())


def test_lstm_hybrid_reads_rows_and_refuses_other_widths() -> None:
    model = build_classifier("resnet152_lstm", 1, lstm_hidden=4, input_size=32).eval()
    assert model.lstm.num_layers == 2 and model.lstm.hidden_size == 4 and model.lstm.input_size == 32
    assert model.fc.in_features == 2048 + 4
    assert backbone_spec("resnet152_lstm").cam_layers == ("cnn.layer2", "cnn.layer3")
    with pytest.raises(ModelError, match="32-pixel rows"):
        model(torch.rand(1, 3, 48, 48))
    with pytest.raises(ModelError, match="does not take options"):
        build_classifier("vgg16", 1, lstm_hidden=4)
