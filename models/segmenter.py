"""Lung segmentation U-Net: architecture "segmenter/unet-vgg16" and batched slice inference.

Input spec (:data:`SEGMENTER_INPUT`): one channel, the slice windowed to
[−1000, 0] HU → [0, 1] (:func:`pipeline.preprocess.window`), the whole slice
resized to 256 × 256 (bilinear, antialiased; 256 is a multiple of 32 as the VGG16
encoder's five poolings need, and keeps CPU inference affordable). Output: per
pixel logits for ``num_classes`` classes, 0 background, 1 right lung, 2 left lung
(3 classes), or 0 background / 1 lung (2 classes, sides split afterwards).
Weights are never downloaded: the encoder starts from random initialisation and
trained weights come from :func:`models.checkpoint.load_checkpoint` with
``expected_architecture=SEGMENTER_ARCHITECTURE``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import segmentation_models_pytorch as smp
import torch
from torch import nn

from corona_ct.pipeline.errors import ModelError
from corona_ct.pipeline.preprocess import resize_batch

SEGMENTER_ARCHITECTURE = "segmenter/unet-vgg16"


@dataclass(frozen=True)
class SegmenterInputSpec:
    """What a segmentation checkpoint expects as input."""

    hu_window: tuple[float, float] = (-1000.0, 0.0)  # mapped linearly to [0, 1], clipped
    input_size: int = 256  # square side; multiple of 32 for the encoder
    in_channels: int = 1


SEGMENTER_INPUT = SegmenterInputSpec()


def build_unet(num_classes: int = 3, in_channels: int = 1) -> nn.Module:
    """A randomly initialised U-Net with a VGG16 encoder (no pretrained download)."""
    if num_classes not in (2, 3):
        raise ModelError(f"lung U-Net needs 2 (lung) or 3 (right/left) classes, got {num_classes}")
    return smp.Unet(encoder_name="vgg16", encoder_weights=None, in_channels=in_channels, classes=num_classes)


def predict_lung_labels(
    model: nn.Module,
    windowed: np.ndarray,
    batch_size: int = 8,
    device: str = "cpu",
    input_size: int = SEGMENTER_INPUT.input_size,
) -> npt.NDArray[np.uint8]:
    """(z, y, x) windowed slices in [0, 1] → uint8 argmax labels (3-class: 0, 1 right, 2 left;
    2-class: 0, 1 lung — ``pipeline.segment`` splits those into sides).

    Slices go through the network ``batch_size`` at a time, resized to
    ``input_size`` and their class scores resized back before the argmax. Runs under
    ``torch.inference_mode`` and, on CUDA, bf16 autocast.
    """
    if windowed.ndim != 3:
        raise ModelError(f"predict_lung_labels needs (z, y, x) slices, got shape {windowed.shape}")
    if batch_size < 1:
        raise ModelError(f"segment.batch_size must be at least 1, got {batch_size}")
    torch_device = torch.device(device)
    on_cuda = torch_device.type == "cuda"
    image_shape = (int(windowed.shape[1]), int(windowed.shape[2]))
    model = model.to(torch_device).eval()
    labels = np.zeros(windowed.shape, dtype=np.uint8)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
        for start in range(0, windowed.shape[0], batch_size):
            # a copy: the caller's array may be read-only (memory-mapped), which torch warns about
            batch = torch.from_numpy(np.array(windowed[start : start + batch_size], dtype=np.float32))
            batch = resize_batch(batch.to(torch_device), (input_size, input_size))
            logits = model(batch[:, None]).float()
            labels[start : start + logits.shape[0]] = labels_from_scores(logits, image_shape)
    return labels


def labels_from_scores(logits: torch.Tensor, image_shape: tuple[int, int]) -> npt.NDArray[np.uint8]:
    """(n, classes, s, s) U-Net class scores → (n, *image_shape) uint8 argmax labels at the slice size."""
    n, classes, height, width = logits.shape
    # resize the class scores, not the labels, so boundaries stay smooth at native size
    scores = resize_batch(logits.reshape(n * classes, height, width), image_shape)
    scores = scores.reshape(n, classes, *image_shape)
    # the argmax one class at a time (torch's argmax over a short dim is ~10x slower on CPU);
    # "greater than" keeps the lower class on ties, as argmax does
    best = scores[:, 0]
    labels = torch.zeros((n, *image_shape), dtype=torch.uint8, device=scores.device)
    for k in range(1, classes):
        labels.masked_fill_(scores[:, k] > best, k)
        best = torch.maximum(best, scores[:, k])
    return np.asarray(labels.cpu().numpy())


def is_binary_unet(model: nn.Module) -> bool:
    """True for a lung/background U-Net (2 output channels in smp's segmentation head)."""
    head = getattr(model, "segmentation_head", None)
    conv = head[0] if isinstance(head, nn.Sequential) and len(head) else None
    return isinstance(conv, nn.Conv2d) and conv.out_channels == 2
