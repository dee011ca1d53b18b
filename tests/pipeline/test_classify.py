"""Mini-batched slice classification and the case-level probability."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from corona_ct.models.checkpoint import LoadedModel, load_classifier
from corona_ct.models.classifier import BACKBONES
from corona_ct.pipeline.classify import SliceOutputs, case_probability, classify_slices
from corona_ct.pipeline.config import ClassifyConfig
from corona_ct.pipeline.errors import ConfigError, ModelError
from corona_ct.pipeline.explain import explain_batch

SPEC = BACKBONES["resnet50"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    torch.manual_seed(0)
    return load_classifier(None, backbone="resnet50")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def mini_batched(loaded: LoadedModel, images: torch.Tensor) -> tuple[SliceOutputs, list[int]]:
    steps: list[int] = []
    outputs = classify_slices(loaded, None, images, batch_size=2, device=CPU, amp=True, progress=steps.append)
    return outputs, steps


def test_mini_batches_concatenate_to_the_whole_batch_result(
    loaded: LoadedModel, images: torch.Tensor, mini_batched: tuple[SliceOutputs, list[int]]
) -> None:
    outputs, steps = mini_batched
    assert steps == [2, 2, 1]  # increments, as tqdm.update expects
    whole = explain_batch(loaded.module, SPEC, images)
    assert outputs.n_slices == 5
    assert outputs.fused is not None and outputs.fused.shape == (5, 32, 32)
    assert outputs.features is not None and outputs.features.shape == (5, SPEC.feature_dim)
    # each slice is computed in a different batch composition here: float32 rounding only
    np.testing.assert_allclose(outputs.probabilities, whole.probabilities, atol=1e-5)
    np.testing.assert_allclose(outputs.features, whole.features, rtol=1e-4, atol=1e-5)
    assert outputs.feature_weights is not None
    np.testing.assert_allclose(outputs.feature_weights, whole.feature_weights, rtol=1e-4, atol=1e-9)
    assert set(outputs.layer_maps) == set(SPEC.cam_layers)
    for name in SPEC.cam_layers:
        assert outputs.layer_maps[name].shape == whole.layer_maps[name].shape
    assert all(v.dtype == np.float32 for v in (outputs.probabilities, outputs.fused, outputs.features))


def test_without_explanations_only_probabilities_are_returned(
    loaded: LoadedModel, images: torch.Tensor, mini_batched: tuple[SliceOutputs, list[int]]
) -> None:
    explained, _ = mini_batched
    fast = classify_slices(loaded, SPEC, images.numpy(), batch_size=3, device=CPU, amp=False, explain=False)
    np.testing.assert_allclose(fast.probabilities, explained.probabilities, atol=1e-5)
    assert fast.fused is None and fast.features is None and fast.feature_weights is None
    assert fast.layer_maps == {}
    with torch.no_grad():
        reference = torch.sigmoid(loaded.module(images))[:, 0].numpy()
    np.testing.assert_allclose(fast.probabilities, reference, atol=1e-5)


def test_plain_module_needs_a_spec_and_bad_arguments_are_refused(
    loaded: LoadedModel, images: torch.Tensor
) -> None:
    module: nn.Module = loaded.module
    with pytest.raises(ModelError, match="backbone spec"):
        classify_slices(module, None, images, batch_size=2, device=CPU, amp=False)
    with pytest.raises(ConfigError, match="batch_size"):
        classify_slices(module, SPEC, images, batch_size=0, device=CPU, amp=False)
    with pytest.raises(ConfigError, match="channels"):
        classify_slices(module, SPEC, images[0], batch_size=2, device=CPU, amp=False)


def test_no_slices_give_empty_outputs(loaded: LoadedModel) -> None:
    empty = torch.zeros(0, 3, 224, 224)
    outputs = classify_slices(loaded, None, empty, batch_size=4, device=CPU, amp=False)
    assert isinstance(outputs, SliceOutputs) and outputs.n_slices == 0
    assert outputs.fused is not None and outputs.fused.shape == (0, 224, 224)
    assert outputs.features is not None and outputs.features.shape == (0, 2048)
    assert case_probability(outputs.probabilities, ClassifyConfig()) == 0.0


def test_case_probability_max_and_top_mean() -> None:
    probabilities = np.linspace(0.0, 0.87, 30)  # top three: 0.87, 0.84, 0.81
    top_mean = ClassifyConfig(case_aggregation="top_mean", case_top_fraction=0.1)
    # 0.1 × 30 is 3.0000000000000004 in floating point: still the top 3, not 4
    assert case_probability(probabilities, top_mean) == pytest.approx((0.87 + 0.84 + 0.81) / 3)
    assert case_probability(probabilities, ClassifyConfig(case_aggregation="max")) == pytest.approx(0.87)
    assert case_probability([0.2, 0.9, 0.4], top_mean) == pytest.approx(0.9)  # at least one slice
    everything = ClassifyConfig(case_aggregation="top_mean", case_top_fraction=1.0)
    assert case_probability([0.2, 0.9, 0.4], everything) == pytest.approx(0.5)


def test_case_probability_ignores_unevaluated_slices() -> None:
    config = ClassifyConfig(case_aggregation="top_mean", case_top_fraction=0.5)
    assert case_probability([np.nan, 0.3, np.nan, 0.7, 0.1, 0.5], config) == pytest.approx(0.6)
    assert case_probability([np.nan, np.nan], config) == 0.0
    assert case_probability([], ClassifyConfig(case_aggregation="max")) == 0.0


def test_case_probability_refuses_bad_settings() -> None:
    with pytest.raises(ConfigError, match="case_aggregation"):
        case_probability([0.5], ClassifyConfig(case_aggregation="median"))
    with pytest.raises(ConfigError, match="case_top_fraction"):
        case_probability([0.5], ClassifyConfig(case_top_fraction=0.0))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=80), st.integers(1, 100))
def test_top_mean_matches_a_sorted_reference(values: list[float], percent: int) -> None:
    config = ClassifyConfig(case_aggregation="top_mean", case_top_fraction=percent / 100)
    ordered = sorted(values, reverse=True)
    count = -(-percent * len(values) // 100)  # exact integer ceil(percent % of n)
    expected = sum(ordered[:count]) / count
    result = case_probability(values, config)
    assert result == pytest.approx(expected, abs=1e-12)
    assert min(values) - 1e-12 <= result <= max(values) + 1e-12
