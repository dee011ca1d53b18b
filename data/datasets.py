"""Torch datasets of preprocessed slices, built with the pipeline's own preprocessing.

Every image goes through :mod:`pipeline.preprocess` exactly as at inference:
``window`` (HU → [0, 1], or pre-windowed images unchanged), the lung bounding box
from :func:`pipeline.segment.segment_lungs` when ``roi == "lung"``, then
``to_model_input`` (crop, antialiased resize, grey replicated to 3 channels).
Because the 3 channels are identical, datasets keep one grey channel, stored as
float16 (half the memory), and :func:`as_network_input` expands it again; the
network sees the same values either way. Preprocessing runs once; random
augmentation is applied later to whole batches (``models.augment.augment_batch``).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from torch.utils.data import Dataset

from corona_ct.data.manifest import Manifest
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.datamodel import Volume
from corona_ct.pipeline.errors import ConfigError, InputError
from corona_ct.pipeline.ingest import load_study
from corona_ct.pipeline.ingest.slices import read_slice_image
from corona_ct.pipeline.preprocess import Box, input_lungs, lung_bounding_box, to_model_input, window
from corona_ct.pipeline.segment import segment_lungs
from corona_ct.pipeline.single_slice import prepare_slice

log = logging.getLogger(__name__)

ROI_MODES = ("lung", "none")
MASK_UNKNOWN = 255  # lesion mask value of slices labelled per slice only


class SliceDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Preprocessed grey slices (n, size, size) in [0, 1] with integer labels (n,).

    ``masks`` (optional, (n, size, size) uint8): where the lesion is, 1 lesion, 0 none,
    ``MASK_UNKNOWN`` for slices labelled per slice only; they feed the auxiliary
    localisation loss of :func:`models.train_classifier.train_classifier`.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | npt.ArrayLike,
        masks: torch.Tensor | npt.ArrayLike | None = None,
    ) -> None:
        label_tensor = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        if images.ndim != 3 or images.shape[1] != images.shape[2]:
            raise ConfigError(f"slice images must be (n, size, size), got {tuple(images.shape)}")
        if label_tensor.shape != (images.shape[0],):
            raise ConfigError(f"{images.shape[0]} images but {tuple(label_tensor.shape)} labels")
        self.images = images.to(torch.float16).contiguous()
        self.labels = label_tensor
        self.masks: torch.Tensor | None = None
        if masks is not None:
            self.masks = torch.as_tensor(np.asarray(masks), dtype=torch.uint8)
            if self.masks.shape != self.images.shape:
                raise ConfigError(
                    f"lesion masks {tuple(self.masks.shape)} differ from the images {tuple(images.shape)}"
                )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index, None].float(), self.labels[index]

    @property
    def input_size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, indices: Sequence[int] | npt.NDArray[np.int64]) -> SliceDataset:
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        masks = self.masks[index] if self.masks is not None else None
        return SliceDataset(self.images[index], self.labels[index], masks)


def as_network_input(grey: torch.Tensor) -> torch.Tensor:
    """(N, 1, S, S) grey batch → (N, 3, S, S), the replicated-channel input of ``to_model_input``."""
    return grey.expand(-1, 3, -1, -1)


def slices_to_model_input(
    windowed: npt.NDArray[np.float32],
    lungs: npt.NDArray[np.bool_] | None,
    size: int,
    config: PipelineConfig,
    per_slice_box: bool = False,
) -> torch.Tensor:
    """(n, y, x) windowed slices → (n, size, size) grey network input.

    With ``lungs`` the slices are cropped to the case-wide lung box (as inference
    does for one study) or, with ``per_slice_box``, each to its own box (independent
    slice images). Slices or cases without lung are used whole.
    """
    if lungs is None:
        return to_model_input(windowed, None, size)[:, 0]
    if not per_slice_box:
        box = lung_bounding_box(lungs, config.roi)
        return to_model_input(windowed, box, size, input_lungs(lungs, config.roi))[:, 0]
    boxes: list[Box | None] = [lung_bounding_box(lungs[i : i + 1], config.roi) for i in range(len(lungs))]
    return torch.cat([
        to_model_input(windowed[i : i + 1], box, size, input_lungs(lungs[i : i + 1], config.roi))[:, 0]
        for i, box in enumerate(boxes)
    ])  # fmt: skip


def load_slice_input(path: Path, roi: str, size: int, config: PipelineConfig) -> torch.Tensor:
    """One slice image file → (size, size) grey network input, by the single-slice path of ``explain``
    (:func:`~corona_ct.pipeline.single_slice.prepare_slice`, classical lungs)."""
    array, units = read_slice_image(path, config.ingest)
    prepared = prepare_slice(array, units, config, size, roi=roi, source=str(path))
    if prepared.roi == "image (no lung found)":
        log.warning("%s: no lung found; the whole slice is used", path)
    return prepared.batch[0, 0]


def build_slice_dataset(
    manifest: Manifest, roi: str, size: int, config: PipelineConfig, workers: int = 0
) -> SliceDataset:
    """Read and preprocess every manifest image once (threads when ``workers`` > 0)."""
    if roi not in ROI_MODES:
        raise ConfigError(f"--roi must be one of {ROI_MODES}, got {roi!r}")

    def load(path: Path) -> torch.Tensor:
        try:
            return load_slice_input(path, roi, size, config)
        except InputError:
            raise
        except (OSError, ValueError) as error:
            raise InputError(
                f"{path}: cannot be read as a slice image ({error}); remove it from the data"
            ) from None

    if workers > 0:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            images = list(pool.map(load, manifest.paths))
    else:
        images = [load(path) for path in manifest.paths]
    return SliceDataset(torch.stack(images), manifest.labels)


class SegmentationSlices(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Windowed grey slices (n, 1, S, S) with lung labels (n, S, S) (0 bg, 1 right, 2 left)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.ndim != 3 or labels.shape != images.shape:
            raise ConfigError(
                f"segmentation slices must be (n, S, S) images and labels of the same shape, got "
                f"{tuple(images.shape)} and {tuple(labels.shape)}"
            )
        self.images = images.to(torch.float16).contiguous()
        self.labels = labels.to(torch.uint8).contiguous()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index, None].float(), self.labels[index].long()

    def subset(self, indices: Sequence[int] | npt.NDArray[np.int64]) -> SegmentationSlices:
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return SegmentationSlices(self.images[index], self.labels[index])


def resize_labels(labels: npt.NDArray[np.uint8], size: int) -> torch.Tensor:
    """(n, y, x) label maps → (n, size, size) by nearest neighbour (labels are never blended)."""
    tensor = torch.from_numpy(np.array(labels, dtype=np.uint8))[
        :, None
    ].float()  # copy: inputs may be read-only
    resized = torch.nn.functional.interpolate(tensor, size=(size, size), mode="nearest")
    return resized[:, 0].to(torch.uint8)


def segmentation_slices_from_volume(
    windowed: npt.NDArray[np.float32], labels: npt.NDArray[np.uint8], size: int, binary: bool = False
) -> SegmentationSlices:
    """Whole (uncropped) slices of one volume resized to ``size``; ``binary`` merges both lungs to 1.

    The segmenter sees whole slices at inference, so training does not crop either.
    """
    if windowed.shape != labels.shape:
        raise ConfigError(f"image {windowed.shape} and mask {labels.shape} differ in shape")
    images = to_model_input(windowed, None, size)[:, 0]
    label_maps = resize_labels(labels, size)
    if binary:
        label_maps = (label_maps > 0).to(torch.uint8)
    return SegmentationSlices(images, label_maps)


def concat_segmentation(parts: Sequence[SegmentationSlices]) -> SegmentationSlices:
    if not parts:
        raise InputError("no segmentation training data were found")
    return SegmentationSlices(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def _mask_on_canonical_grid(mask_path: Path, volume: Volume) -> npt.NDArray[np.uint8]:
    """A NIfTI mask re-ordered exactly like its CT by the reader (``Volume.source_order`` inverted)."""
    try:
        image = cast(nib.Nifti1Image, nib.load(str(mask_path)))
        source = np.asarray(image.dataobj)
    except (OSError, ValueError) as error:
        raise InputError(f"{mask_path}: cannot be read as a NIfTI mask ({error})") from None
    source = source.reshape(source.shape[:3])
    order = volume.source_order
    if order is None:
        raise InputError(f"{volume.source}: volume masks need a NIfTI image (its voxel order is known)")
    canonical = np.flip(source, axis=order.flip_axes).transpose(np.argsort(order.perm))
    if canonical.shape != volume.array.shape:
        raise InputError(
            f"{mask_path}: mask shape {canonical.shape} differs from the image {volume.array.shape}"
        )
    return np.ascontiguousarray(canonical).astype(np.uint8)


def _read_pair(image_path: Path, mask_path: Path, config: PipelineConfig) -> tuple[np.ndarray, np.ndarray]:
    """(windowed (z, y, x), labels (z, y, x)) of one manifest row (NIfTI volume or 2D slice image)."""
    name = image_path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        volume = load_study(image_path, config.ingest)
        return window(volume.array, volume.units, config.window), _mask_on_canonical_grid(mask_path, volume)

    array, units = read_slice_image(image_path, config.ingest)
    try:
        with Image.open(mask_path) as handle:
            mask = np.asarray(handle.convert("L"))
    except OSError as error:
        raise InputError(f"{mask_path}: cannot be read as a mask image ({error})") from None
    if mask.shape != array.shape:
        raise InputError(f"{mask_path}: mask shape {mask.shape} differs from the image {array.shape}")
    # 8-bit masks saved as 0/255 mean lung/no lung; small values are labels as they are.
    labels = (mask > 127).astype(np.uint8) if mask.max() > 2 else mask.astype(np.uint8)
    return window(array, units, config.window)[None], labels[None]


def load_segmentation_data(
    manifests: Sequence[Path],
    unlabeled: Sequence[Path],
    size: int,
    config: PipelineConfig,
    binary: bool = False,
) -> tuple[SegmentationSlices, list[str]]:
    """Segmentation slices and their group (volume) names.

    ``manifests``: CSV files with columns ``image,mask[,group]`` (NIfTI volumes or 2D
    images; relative paths from the CSV). ``unlabeled``: CT studies read with
    ``load_study`` and labelled by the classical ``segment_lungs`` (pseudo-labels).
    """
    parts: list[SegmentationSlices] = []
    groups: list[str] = []
    for manifest in manifests:
        try:
            rows = list(csv.DictReader(Path(manifest).read_text(encoding="utf-8-sig").splitlines()))
        except OSError as error:
            raise InputError(f"cannot read segmentation manifest {manifest}: {error}") from None
        if not rows or not {"image", "mask"} <= set(rows[0]):
            raise InputError(f"segmentation manifest {manifest} needs columns image,mask[,group]")
        for row in rows:
            image = Path(manifest).parent / row["image"].strip()
            mask = Path(manifest).parent / row["mask"].strip()
            windowed, labels = _read_pair(image, mask, config)
            parts.append(segmentation_slices_from_volume(windowed, labels, size, binary))
            groups += [(row.get("group") or "").strip() or image.name] * windowed.shape[0]
    if unlabeled:
        classical = dataclasses.replace(config.segment, method="classical")
        for study in unlabeled:
            volume = load_study(study, config.ingest)
            lung_mask = segment_lungs(volume, classical, config.window)
            windowed = window(volume.array, volume.units, config.window)
            parts.append(
                segmentation_slices_from_volume(windowed, np.asarray(lung_mask.labels), size, binary)
            )
            groups += [volume.study_id] * volume.n_slices
    return concat_segmentation(parts), groups
