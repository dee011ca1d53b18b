"""Multi-scale Grad-CAM for a batch of slices with one forward and one backward pass.

Gozes et al. (2020) localise opacities by multiplying Grad-CAM maps of two
ResNet-50 stages (layer2, 28×28, and layer3, 14×14, for a 224 input), each
normalised to [0, 1]. For a layer with activations ``A`` (C, h, w) and the
positive score ``y`` (:func:`models.classifier.positive_score`)::

    alpha_c = mean_{i,j} dy/dA_c[i, j]          (Grad-CAM channel weights)
    cam     = ReLU(sum_c alpha_c * A_c)          (h, w), then min–max to [0, 1] per slice

Normalisation contract: every map is shifted and scaled so that its own minimum
becomes 0 and its maximum 1 (larger = more evidence for COVID). A constant map
(no spatial evidence, e.g. all zero after the ReLU) becomes all zeros. This is
not MONAI's default, which maps (min, max) to (1, 0).

Batching is exact: in eval mode (BatchNorm uses running statistics) each
sample's score depends only on its own input, so the gradient of the summed
score with respect to sample k's activations is the gradient of score k alone.
Gradients are taken with :func:`torch.autograd.grad` on the hooked activations,
so nothing accumulates in the parameters' ``.grad``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from corona_ct.models.classifier import BackboneSpec, positive_probability, positive_score
from corona_ct.pipeline.errors import ConfigError, ModelError

FloatArray = npt.NDArray[np.float32]
MapsT = TypeVar("MapsT", torch.Tensor, np.ndarray)

FUSION_METHODS = ("product", "mean")


class GradCamHooks:
    """Context manager capturing the outputs of named submodules during a forward pass.

    Forward hooks are registered on ``__enter__`` and always removed on
    ``__exit__`` (also when the block raises), together with the captured
    tensors, so no hook or autograd graph outlives the block.
    :meth:`gradients` differentiates a scalar with respect to every captured
    activation in one backward pass.
    """

    def __init__(self, model: nn.Module, layer_names: Sequence[str], feature_layer: str | None = None):
        names = list(dict.fromkeys([*layer_names, *([feature_layer] if feature_layer else [])]))
        if not names:
            raise ConfigError("Grad-CAM needs at least one layer name")
        self.model = model
        self.names: tuple[str, ...] = tuple(names)
        self.activations: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> GradCamHooks:
        try:
            for name in self.names:
                module = self._submodule(name)
                self._handles.append(module.register_forward_hook(self._capture(name)))
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._release()

    def _release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.activations.clear()
        self._calls.clear()

    def _submodule(self, name: str) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            children = ", ".join(child for child, _ in self.model.named_children())
            raise ModelError(
                f"Grad-CAM layer {name!r} is not a submodule of {type(self.model).__name__}; "
                f"its top-level modules are {children}"
            ) from None

    def _capture(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tensor = output[0] if isinstance(output, tuple | list) else output
            if not isinstance(tensor, torch.Tensor):
                raise ModelError(f"Grad-CAM layer {name!r} returns {type(output).__name__}, not a tensor")
            self.activations[name] = tensor
            self._calls[name] = self._calls.get(name, 0) + 1

        return hook

    def gradients(self, score: torch.Tensor) -> dict[str, torch.Tensor]:
        """d(score)/d(activation) for every hooked layer, from a single backward pass."""
        missing = [name for name in self.names if name not in self.activations]
        if missing:
            raise ModelError(f"Grad-CAM layer(s) {', '.join(missing)} were not run by the forward pass")
        reused = [name for name in self.names if self._calls[name] != 1]
        if reused:
            raise ModelError(
                f"Grad-CAM layer(s) {', '.join(reused)} ran more than once per forward pass; hook a "
                "module that is used once"
            )
        detached = [name for name in self.names if not self.activations[name].requires_grad]
        if detached:
            raise ModelError(
                f"Grad-CAM layer(s) {', '.join(detached)} are not connected to the input by autograd"
            )
        grads = torch.autograd.grad(score, [self.activations[name] for name in self.names])
        return dict(zip(self.names, grads, strict=True))


def normalize_per_slice(maps: MapsT) -> MapsT:
    """Min–max each (h, w) map of an (n, h, w) stack to [0, 1]; constant maps become 0.

    A map counts as constant when its span is within rounding of its magnitude
    (4 ulp), so numerical noise on a flat map is not blown up to [0, 1].
    Accepts and returns a torch tensor (float32 or float64) or a numpy array (float32).
    """
    is_numpy = not isinstance(maps, torch.Tensor)
    if isinstance(maps, torch.Tensor):
        values = _at_least_fp32(maps)
    else:
        values = torch.from_numpy(np.asarray(maps, np.float32))
    if values.ndim != 3:
        raise ConfigError(f"maps must be an (n, h, w) stack, got shape {tuple(values.shape)}")
    flat = values.flatten(1)
    low = flat.amin(dim=1)[:, None, None]
    high = flat.amax(dim=1)[:, None, None]
    span = high - low
    magnitude = torch.maximum(high.abs(), low.abs())
    flat_map = span <= 4 * torch.finfo(values.dtype).eps * magnitude
    safe_span = torch.where(flat_map, torch.ones_like(span), span)
    normalised = torch.where(flat_map, torch.zeros_like(values), (values - low) / safe_span)
    return normalised.numpy() if is_numpy else normalised  # type: ignore[return-value]


def fuse(
    layer_maps: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    size: int | tuple[int, int],
    method: str = "product",
) -> torch.Tensor:
    """Upsample (n, h_l, w_l) maps bilinearly to ``size`` and combine them into (n, H, W).

    ``"product"`` (Gozes et al.) keeps only regions that every scale marks; the
    product of [0, 1] maps is in [0, 1] and is not re-normalised, so its maximum
    is below 1 when the scales disagree. ``"mean"`` averages them. Bilinear
    interpolation uses pixel centres (``align_corners=False``, as OpenCV does).
    """
    maps = list(layer_maps.values()) if isinstance(layer_maps, Mapping) else list(layer_maps)
    if not maps:
        raise ConfigError("no Grad-CAM layer maps to fuse; set cam.layers to at least one layer")
    if method not in FUSION_METHODS:
        raise ConfigError(f"unknown Grad-CAM fusion {method!r}; choose one of {', '.join(FUSION_METHODS)}")
    target = (size, size) if isinstance(size, int) else tuple(size)
    upsampled = torch.stack(
        [
            F.interpolate(_at_least_fp32(m)[:, None], size=target, mode="bilinear", align_corners=False)[:, 0]
            for m in maps
        ]
    )
    return upsampled.prod(dim=0) if method == "product" else upsampled.mean(dim=0)


@dataclass(frozen=True)
class SliceOutputs:
    """Per-slice results for n slices: float32 numpy arrays on the CPU.

    ``fused`` (n, S, S) is the fused Grad-CAM at the input resolution and ``layer_maps[name]``
    each layer's normalised map at its own resolution (n, h_l, w_l); ``features`` (n, C) is the
    global-average-pooled activation of the feature layer and ``feature_weights`` (n, C) the
    spatial mean of its gradient. Without explanations (``classify_slices(explain=False)``) only
    ``probabilities`` is filled: the rest is None and ``layer_maps`` is empty.
    """

    probabilities: FloatArray  # (n,) P(COVID)
    fused: FloatArray | None = None
    layer_maps: dict[str, FloatArray] = field(default_factory=dict)
    features: FloatArray | None = None
    feature_weights: FloatArray | None = None

    @property
    def n_slices(self) -> int:
        return int(self.probabilities.shape[0])

    @classmethod
    def concatenate(cls, parts: Sequence[SliceOutputs]) -> SliceOutputs:
        """The outputs of consecutive mini-batches as one (at least one part)."""

        def joined(name: str) -> FloatArray | None:
            values = [getattr(part, name) for part in parts]
            return None if values[0] is None else np.concatenate(values)

        return cls(
            probabilities=np.concatenate([part.probabilities for part in parts]),
            fused=joined("fused"),
            layer_maps={
                name: np.concatenate([part.layer_maps[name] for part in parts])
                for name in parts[0].layer_maps
            },
            features=joined("features"),
            feature_weights=joined("feature_weights"),
        )


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """Upcast fp16/bf16 (autocast) tensors to float32; float32 and float64 stay as they are."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def _to_numpy(tensor: torch.Tensor) -> FloatArray:
    return tensor.detach().to("cpu", torch.float32).numpy()


def _channel_means(tensor: torch.Tensor) -> torch.Tensor:
    """(n, C, ...) → (n, C): mean over every axis after the channel axis."""
    tensor = _at_least_fp32(tensor)
    return tensor.flatten(2).mean(dim=2) if tensor.ndim > 2 else tensor


def raw_grad_cam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Un-normalised Grad-CAM ReLU(Σ_c α_c A_c), α_c = spatial mean of the gradient: (n, h, w)."""
    if activation.ndim != 4:
        raise ModelError(
            f"Grad-CAM needs a convolutional (n, C, h, w) layer output, got shape {tuple(activation.shape)}"
        )
    alpha = _at_least_fp32(gradient).mean(dim=(2, 3))
    return torch.relu(torch.einsum("nc,nchw->nhw", alpha, _at_least_fp32(activation)))


def explain_batch(
    model: nn.Module,
    spec: BackboneSpec,
    inputs: torch.Tensor,
    *,
    amp: bool = False,
    layers: Sequence[str] | None = None,
    fusion: str = "product",
) -> SliceOutputs:
    """Probabilities, multi-scale Grad-CAM maps and clustering features of a batch.

    ``inputs`` is (n, 3, S, S) in [0, 1]; it is copied to the model's device.
    ``layers`` overrides ``spec.cam_layers`` (e.g. from ``CamConfig.layers``).
    One forward and one backward pass serve the whole batch. Gradients are
    enabled inside even under an outer ``torch.inference_mode``/``no_grad``, and
    the model is evaluated in eval mode (its mode is restored afterwards).
    ``amp`` applies bf16 autocast and channels_last on CUDA only; otherwise the
    computation runs in float32 (float64 for a float64 model). Results are float32.
    """
    if inputs.ndim != 4:
        raise ConfigError(
            f"explain_batch expects an (n, channels, S, S) batch, got shape {tuple(inputs.shape)}"
        )
    cam_layers = tuple(layers) if layers is not None else spec.cam_layers
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise ModelError(f"{type(model).__name__} has no parameters; Grad-CAM needs a trained network")
    device = parameter.device
    # float64 models (reference computations in tests) keep float64; everything else runs in float32
    dtype = torch.float64 if parameter.dtype == torch.float64 else torch.float32
    use_amp = amp and device.type == "cuda"
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            # clone() turns a tensor made under inference_mode into one autograd may save
            batch = inputs.detach().to(device=device, dtype=dtype).clone()
            if use_amp:
                batch = batch.contiguous(memory_format=torch.channels_last)
            batch.requires_grad_(True)  # parameters may be frozen; the input carries the graph
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
            with GradCamHooks(model, cam_layers, spec.feature_layer) as hooks:
                with autocast:
                    logits = model(batch)
                logits = _at_least_fp32(logits)
                probabilities = positive_probability(logits)
                gradients = hooks.gradients(positive_score(logits).sum())
                activations = hooks.activations
                layer_maps = {
                    name: normalize_per_slice(raw_grad_cam(activations[name], gradients[name]).detach())
                    for name in cam_layers
                }
                fused = fuse(layer_maps, tuple(batch.shape[-2:]), fusion)  # type: ignore[arg-type]
                features = _channel_means(activations[spec.feature_layer].detach())
                feature_weights = _channel_means(gradients[spec.feature_layer])
    finally:
        model.train(was_training)
    return SliceOutputs(
        probabilities=_to_numpy(probabilities),
        layer_maps={name: _to_numpy(value) for name, value in layer_maps.items()},
        fused=_to_numpy(fused),
        features=_to_numpy(features),
        feature_weights=_to_numpy(feature_weights),
    )
