"""Auxiliary lesion-mask heads on a classifier's Grad-CAM layers (training only, never saved).

``TrainConfig.lesion_mask_weight > 0`` adds their loss to the classification loss:
teaching those layers where the lesion is makes the Grad-CAM maps taken from them
point at it. The checkpoint keeps the plain classifier; the heads are discarded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from corona_ct.data.datasets import MASK_UNKNOWN
from corona_ct.pipeline.errors import ConfigError


def _output_channels(layer: nn.Module) -> int:
    """Channels a ResNet stage (or any block ending in a BatchNorm/conv) puts out."""
    last = [m for m in layer.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    if not last:
        raise ConfigError(f"cannot tell the output channels of {type(layer).__name__}")
    final = last[-1]
    return int(final.num_features if isinstance(final, nn.BatchNorm2d) else final.out_channels)


class LesionHeads(nn.Module):
    """One 1×1-conv lesion-mask head per named layer of ``model``, fed by forward hooks.

    Hooks record each layer's output during the forward pass; :meth:`loss` is the binary
    cross-entropy of each head's map against the lesion mask average-pooled to that
    layer's grid, over the samples whose mask is known. :meth:`remove` detaches the hooks.
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
