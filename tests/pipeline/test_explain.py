"""Multi-scale Grad-CAM: oracle agreement, fusion, features, batching and hook hygiene."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from torch import nn

from corona_ct.models.classifier import BACKBONES, build_classifier, positive_score
from corona_ct.pipeline.errors import ConfigError, ModelError
from corona_ct.pipeline.explain import GradCamHooks, SliceOutputs, explain_batch, fuse, normalize_per_slice

SPEC = BACKBONES["resnet50"]
HOOKED = ("layer2", "layer3", "layer4")


def _resnet(num_outputs: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_classifier("resnet50", num_outputs).eval()


def _images(n: int, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return _resnet(1)


@pytest.fixture(scope="module")
def explained(resnet: nn.Module) -> tuple[torch.Tensor, SliceOutputs]:
    images = _images(3)
    return images, explain_batch(resnet, SPEC, images)


def _assert_no_hooks(model: nn.Module) -> None:
    for name in HOOKED:
        module = model.get_submodule(name)
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name
        assert not module._backward_hooks, name


# seed 2 for the 2-logit head: with some random heads the ReLU zeroes the whole map
@pytest.mark.parametrize(("layer", "num_outputs", "seed"), [("layer2", 1, 0), ("layer3", 2, 2)])
def test_layer_map_matches_pytorch_grad_cam(layer: str, num_outputs: int, seed: int) -> None:
    model = _resnet(num_outputs, seed)
    images = _images(2)
    ours = explain_batch(model, SPEC, images, layers=(layer,)).layer_maps[layer]

    class GradCamAtLayerSize(GradCAM):
        """Resizes to the layer's own grid, so its cv2 rescaling is the identity."""

        def get_target_width_height(self, input_tensor: torch.Tensor) -> tuple[int, int]:
            return ours.shape[2], ours.shape[1]

    def target(logits: torch.Tensor) -> torch.Tensor:
        return positive_score(logits[None])[0]

    with GradCamAtLayerSize(model, [model.get_submodule(layer)]) as oracle:
        theirs = oracle(input_tensor=images, targets=[target, target])

    assert ours.shape == theirs.shape == (2, *{"layer2": (8, 8), "layer3": (4, 4)}[layer])
    assert ours.max() == 1.0 and (ours > 0).mean() > 0.5  # non-trivial maps, so agreement means something
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_fused_map_is_the_product_of_upsampled_layer_maps(
    explained: tuple[torch.Tensor, SliceOutputs],
) -> None:
    images, output = explained
    n, size = images.shape[0], images.shape[-1]
    assert output.fused.shape == (n, size, size) and output.fused.dtype == np.float32
    assert output.fused.min() >= 0.0 and output.fused.max() <= 1.0
    assert output.layer_maps["layer2"].shape == (n, 8, 8) and output.layer_maps["layer3"].shape == (n, 4, 4)
    # cv2's bilinear resize (pixel-centre aligned) is an independent implementation of the upsampling
    expected = np.stack(
        [
            np.prod(
                [
                    cv2.resize(output.layer_maps[name][k], (size, size), interpolation=cv2.INTER_LINEAR)
                    for name in SPEC.cam_layers
                ],
                axis=0,
            )
            for k in range(n)
        ]
    )
    np.testing.assert_allclose(output.fused, expected, atol=1e-5)


def test_each_layer_map_is_min_max_normalised_per_slice(
    explained: tuple[torch.Tensor, SliceOutputs],
) -> None:
    _, output = explained
    for maps in output.layer_maps.values():
        flat = maps.reshape(maps.shape[0], -1)
        np.testing.assert_array_equal(flat.min(axis=1), 0.0)
        np.testing.assert_allclose(flat.max(axis=1), 1.0, rtol=1e-6)


def test_features_and_channel_weights_agree_with_the_head(
    resnet: nn.Module, explained: tuple[torch.Tensor, SliceOutputs]
) -> None:
    images, output = explained
    assert output.features.shape == output.feature_weights.shape == (3, SPEC.feature_dim)
    head = resnet.get_submodule("fc")
    assert isinstance(head, nn.Linear)
    weight = head.weight.detach().numpy()  # (1, 2048)
    bias = head.bias.detach().numpy()
    # the pooled layer4 activation is exactly what the linear head sees
    logits = output.features.astype(np.float64) @ weight.T.astype(np.float64) + bias
    np.testing.assert_allclose(output.probabilities, 1 / (1 + np.exp(-logits[:, 0])), rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(
            output.probabilities, torch.sigmoid(resnet(images))[:, 0].numpy(), atol=1e-5
        )
    # logit = w · mean_ij(A) + b, so dlogit/dA_c[i, j] = w_c / (h·w) everywhere: layer4 is 2×2 for 64 px
    np.testing.assert_allclose(output.feature_weights, np.repeat(weight / 4, 3, axis=0), rtol=1e-5, atol=1e-9)


def test_batch_gives_the_same_maps_as_one_slice_at_a_time() -> None:
    # float64: a random network's Grad-CAM sums cancel heavily, so float32 rounding differences
    # between batched and single convolution kernels (1e-6 relative) grow to ~1e-3 in the maps
    model = _resnet(1).double()
    images = _images(2, size=32).double()  # float64 convolutions are slow on CPU; 4×4 and 2×2 maps
    batched = explain_batch(model, SPEC, images)
    singles = [explain_batch(model, SPEC, images[k : k + 1]) for k in range(images.shape[0])]
    for field in ("probabilities", "fused", "features", "feature_weights"):
        stacked = np.concatenate([getattr(single, field) for single in singles])
        np.testing.assert_allclose(getattr(batched, field), stacked, atol=1e-4, err_msg=field)
    for name in SPEC.cam_layers:
        stacked = np.concatenate([single.layer_maps[name] for single in singles])
        np.testing.assert_allclose(batched.layer_maps[name], stacked, atol=1e-4, err_msg=name)


def test_works_under_inference_mode_and_leaves_model_untouched(
    explained: tuple[torch.Tensor, SliceOutputs],
) -> None:
    images, reference = explained
    model = _resnet(1)  # parameters require grad here, as in a freshly built network
    model.train()
    with torch.inference_mode():
        inference_images = images.clone()  # an inference tensor, which autograd cannot save
        output = explain_batch(model, SPEC, inference_images)
    np.testing.assert_allclose(output.fused, reference.fused, atol=1e-5)
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated in .grad
    _assert_no_hooks(model)


def test_hooks_are_removed_after_use_and_after_errors(resnet: nn.Module) -> None:
    images = _images(1)
    with GradCamHooks(resnet, SPEC.cam_layers, SPEC.feature_layer) as hooks:
        assert all(resnet.get_submodule(name)._forward_hooks for name in HOOKED)
        resnet(images)
        assert set(hooks.activations) == set(HOOKED)
    _assert_no_hooks(resnet)
    assert not hooks.activations  # the graph is released with the hooks

    with (
        pytest.raises(RuntimeError, match="inside the block"),
        GradCamHooks(resnet, SPEC.cam_layers, "layer4"),
    ):
        raise RuntimeError("inside the block")
    _assert_no_hooks(resnet)

    with pytest.raises(RuntimeError):  # a 1-channel batch fails inside the forward pass
        explain_batch(resnet, SPEC, torch.rand(1, 1, 64, 64))
    _assert_no_hooks(resnet)

    with pytest.raises(ModelError, match="'layer9' is not a submodule"):
        explain_batch(resnet, SPEC, images, layers=("layer2", "layer9"))
    _assert_no_hooks(resnet)


def test_normalize_per_slice_is_independent_per_slice_and_not_flipped() -> None:
    rng = np.random.default_rng(0)
    base = rng.random((5, 7)).astype(np.float32)
    stack = np.stack([base, 10 * base + 5, np.full((5, 7), 3.0, np.float32), np.zeros((5, 7), np.float32)])
    normalised = normalize_per_slice(stack)
    expected = (base - base.min()) / (base.max() - base.min())
    np.testing.assert_allclose(normalised[0], expected, atol=1e-6)
    np.testing.assert_allclose(normalised[1], expected, atol=1e-6)
    np.testing.assert_array_equal(normalised[2:], 0.0)  # constant maps carry no location
    assert np.unravel_index(normalised[0].argmax(), base.shape) == np.unravel_index(base.argmax(), base.shape)
    as_tensor = normalize_per_slice(torch.from_numpy(stack))
    assert isinstance(as_tensor, torch.Tensor)
    np.testing.assert_array_equal(as_tensor.numpy(), normalised)
    with pytest.raises(ConfigError):
        normalize_per_slice(base)


def test_fuse_methods_and_errors() -> None:
    coarse = torch.tensor([[[0.0, 1.0], [1.0, 0.5]]])
    fine = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(0))
    product = fuse({"fine": fine, "coarse": coarse}, 8)
    mean = fuse([fine, coarse], (8, 8), method="mean")
    single = fuse([coarse], 8)
    assert product.shape == mean.shape == (1, 8, 8)
    torch.testing.assert_close(product, fuse([fine], 8) * single)
    torch.testing.assert_close(mean, (fuse([fine], 8) + single) / 2)
    torch.testing.assert_close(single[0, :2, :2], torch.zeros(2, 2))  # corners keep the corner value
    with pytest.raises(ConfigError, match="at least one layer"):
        fuse([], 8)
    with pytest.raises(ConfigError, match="unknown Grad-CAM fusion"):
        fuse([coarse], 8, method="max")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_on_cuda_is_close_to_fp32() -> None:
    model = _resnet(1).cuda()
    images = _images(4, size=224).cuda()
    exact = explain_batch(model, SPEC, images, amp=False)
    fast = explain_batch(model, SPEC, images, amp=True)
    np.testing.assert_allclose(fast.features, exact.features, rtol=0.05, atol=0.05 * exact.features.max())
    for name in SPEC.cam_layers:
        correlation = np.corrcoef(fast.layer_maps[name].ravel(), exact.layer_maps[name].ravel())[0, 1]
        assert correlation > 0.95, name
    assert np.abs(fast.fused - exact.fused).mean() < 0.05
