"""Single 2D slices (``corona-ct explain``): read → lungs → lung box → model input → Grad-CAM.

Each image goes through the preprocessing a study's slices get (:mod:`pipeline.run`):
window, crop to the lung box, resize, classifier with fused multi-scale Grad-CAM, map
pasted back at the image's size. ``explain_images`` writes predictions.csv and, per
image, ``<stem>_cam.npy`` and ``<stem>_overlay.png``.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from matplotlib import colormaps
from PIL import Image

from corona_ct.pipeline.atomic import atomic_path, write_text
from corona_ct.pipeline.classify import classify_slices
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.device import resolve_device
from corona_ct.pipeline.errors import CoronaCTError, OutputError, UnsupportedInputError, one_line
from corona_ct.pipeline.ingest import SliceImage, collect_slice_images
from corona_ct.pipeline.ingest.deid import hashed_id
from corona_ct.pipeline.ingest.slice_checks import slice_image_problem
from corona_ct.pipeline.ingest.slices import read_slice_image
from corona_ct.pipeline.layout import PREDICTION_COLUMNS, PREDICTIONS_NAME
from corona_ct.pipeline.modelset import ModelSet
from corona_ct.pipeline.preprocess import (
    Box,
    input_lungs,
    lung_bounding_box,
    paste_back,
    to_model_input,
    window,
)
from corona_ct.pipeline.segment import slice_lung_labels


def slice_lung_mask(
    image: np.ndarray, units: str, config: PipelineConfig, models: ModelSet, source: str = "slice"
) -> np.ndarray:
    """(1, y, x) bool lungs of one slice image: the run's U-Net when loaded, else the classical method."""
    unet = models.segmenter.module if models.segmenter is not None else None
    device = str(resolve_device(config.runtime.device))
    labels = slice_lung_labels(image, units, config, source, unet, device, models.segmenter_input_size)
    return labels > 0


@dataclass(frozen=True)
class PreparedSlice:
    """One slice image prepared for the classifier, exactly as ``explain`` and training prepare it."""

    batch: torch.Tensor  # (1, 3, size, size) network input
    windowed: npt.NDArray[np.float32]  # (y, x) the image in the config's window, [0, 1]
    box: Box | None  # the lung box on the image grid; None: the whole image
    roi: str  # the crop used: "lung", "image" or "image (no lung found)"


def prepare_slice(
    image: np.ndarray,
    units: str,
    config: PipelineConfig,
    size: int,
    *,
    roi: str = "lung",
    segmenter: torch.nn.Module | None = None,
    segmenter_input_size: int | None = None,
    device: str = "cpu",
    source: str = "slice",
) -> PreparedSlice:
    """Window, find the lungs (``segmenter``, else the classical method), crop to their box and resize.

    ``image``: (y, x) CT values in ``units`` (``HU`` or ``windowed``); ``roi="none"`` or no lung
    found: the whole image. The one single-slice path: ``explain``, the training data sets and
    the validation scripts all call it.
    """
    windowed = window(image[None].astype(np.float32), units, config.window)
    box, roi_used, lungs = None, "image", None
    if roi == "lung":
        labels = slice_lung_labels(image, units, config, source, segmenter, device, segmenter_input_size)
        box = lung_bounding_box(labels > 0, config.roi)
        roi_used = "lung" if box is not None else "image (no lung found)"
        lungs = input_lungs(labels > 0, config.roi)
    return PreparedSlice(to_model_input(windowed, box, size, lungs), windowed[0], box, roi_used)


@dataclass(frozen=True)
class SliceExplanation:
    """One slice image explained: its probability and fused Grad-CAM map at the image's size."""

    probability: float  # slice COVID-19 probability, 0–1
    cam: npt.NDArray[np.float32]  # (y, x) fused Grad-CAM map in [0, 1], zero outside the crop
    windowed: npt.NDArray[np.float32]  # (y, x) the image in the config's window, [0, 1]
    roi: str  # the crop used: "lung", "image" or "image (no lung found)"
    box: Box | None  # the crop on the image grid; None: the whole image
    layer_maps: dict[str, npt.NDArray[np.float32]]  # each Grad-CAM layer's map, (h_l, w_l), before fusion


def explain_slice(
    image: np.ndarray,
    units: str,
    config: PipelineConfig,
    models: ModelSet,
    *,
    roi: str = "lung",
    source: str = "slice",
) -> SliceExplanation:
    """:func:`prepare_slice` with the run's segmenter, then classify with fused Grad-CAM (the config's
    layers and fusion) and paste the map back at the image's size.
    """
    device = resolve_device(config.runtime.device)
    spec = models.spec
    prepared = prepare_slice(
        image, units, config, models.input_size(config), roi=roi,
        segmenter=models.segmenter.module if models.segmenter is not None else None,
        segmenter_input_size=models.segmenter_input_size, device=str(device), source=source,
    )  # fmt: skip
    out = classify_slices(
        models.classifier,
        spec,
        prepared.batch,
        batch_size=1,
        device=device,
        amp=config.runtime.amp,
        explain=True,
        layers=config.cam.layers or spec.cam_layers,
        fusion=config.cam.fusion,
    )
    cam = paste_back(np.asarray(out.fused), prepared.box, image.shape)[0].astype(np.float32)
    return SliceExplanation(
        probability=float(np.asarray(out.probabilities)[0]),
        cam=cam,
        windowed=prepared.windowed,
        roi=prepared.roi,
        box=prepared.box,
        layer_maps={name: np.asarray(maps[0], np.float32) for name, maps in out.layer_maps.items()},
    )


#: predictions.csv columns: the input path as given, its file name, ok/failed, the slice probability,
#: the crop used, the map and overlay file names (in the output folder), and why a slice failed.


def explain_images(
    inputs: Sequence[str | Path | SliceImage],
    output: Path,
    config: PipelineConfig,
    models: ModelSet,
    *,
    roi: str = "lung",
) -> tuple[list[dict[str, object]], list[str]]:
    """Classify single 2D slices; write predictions.csv, ``<stem>_cam.npy`` and ``<stem>_overlay.png``.

    ``inputs``: image files and folders (expanded by :func:`collect_slice_images`:
    recursively, sorted, a mask folder refused) or already collected ``SliceImage``s.
    Each slice goes through :func:`explain_slice`, the preprocessing a study's slices
    get (lungs by :func:`slice_lung_mask`). A blank, binary (mask) or tiny image, or any
    error, fails that image only: its row says why and the others go on.
    ``predictions.csv`` (``PREDICTION_COLUMNS``) is rewritten after every image, with
    the input path unmodified; output stems are unique (see :func:`output_stems`).
    Returns (rows of the explained images, "input: reason" per failed image).
    """
    images: list[SliceImage] = []
    for item in inputs:
        images.extend([item] if isinstance(item, SliceImage) else collect_slice_images([item]))
    resolve_device(config.runtime.device)  # a device that is not there stops the run, not each image
    output.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    table: list[dict[str, object]] = []
    failures: list[str] = []
    for image_input, stem in zip(images, output_stems(images)):
        row: dict[str, object] = dict.fromkeys(PREDICTION_COLUMNS, "")
        row.update(input=image_input.input, file=image_input.path.name)
        try:
            image, units = read_slice_image(image_input.path, config.ingest)
            problem = slice_image_problem(image, units)
            if problem:
                raise UnsupportedInputError(problem)
            explained = explain_slice(image, units, config, models, roi=roi, source=image_input.input)
            with atomic_path(output / f"{stem}_cam.npy") as tmp, tmp.open("wb") as handle:
                np.save(handle, explained.cam)
            _write_overlay(output / f"{stem}_overlay.png", explained.windowed, explained.cam)
        except OutputError:  # the output cannot be written: no later image can be either
            raise
        except Exception as error:  # one image's failure, whatever it is, never stops the others
            reason = one_line(str(error))
            reason = reason.removeprefix(f"{image_input.path}: ").removeprefix(f"{image_input.input}: ")
            if not isinstance(error, CoronaCTError):
                reason = f"{type(error).__name__}: {reason}"
            row.update(status="failed", error=reason)
            failures.append(f"{image_input.input}: {reason}")
        else:
            row.update(
                status="ok",
                probability=f"{explained.probability:.6f}",
                roi=explained.roi,
                cam=f"{stem}_cam.npy",
                overlay=f"{stem}_overlay.png",
            )
            rows.append(row)
        table.append(row)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=PREDICTION_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
        write_text(output / PREDICTIONS_NAME, buffer.getvalue())
    return rows, failures


def output_stems(images: Sequence[SliceImage]) -> list[str]:
    """Unique, file-system-safe output name stems, one per image, independent of the run order.

    The image's path below the given folder (from the folder's name on; a file given
    itself: its name) without suffix, folders joined by ``__``, characters other than
    letters, digits, ``.``, ``_`` and ``-`` replaced by ``_``. Stems that still clash
    (same-named files from different folders, names that differ only in replaced
    characters or case) get ``-`` and 10 hex digits of a hash of the input path.
    """

    def plain(image: SliceImage) -> str:
        relative = Path(image.relative)
        parts = [*relative.parent.parts, relative.stem if relative.suffix else relative.name]
        flattened = re.sub(r"[^A-Za-z0-9._-]+", "_", "__".join(parts)).strip("._")
        return flattened[:96] or "image"

    plain_stems = [plain(image) for image in images]
    counts: dict[str, int] = {}
    for stem in plain_stems:
        counts[stem.lower()] = counts.get(stem.lower(), 0) + 1
    stems: list[str] = []
    used: set[str] = set()
    for image, stem in zip(images, plain_stems):
        candidate = hashed_id(image.input, prefix=stem) if counts[stem.lower()] > 1 else stem
        unique, n = candidate, 2
        while unique.lower() in used:  # the same file given twice
            unique, n = f"{candidate}-{n}", n + 1
        used.add(unique.lower())
        stems.append(unique)
    return stems


def _write_overlay(path: Path, grey: np.ndarray, cam: np.ndarray) -> None:
    """CT slice in grey with the fused map in colour (alpha grows with the map)."""
    rgb = np.repeat(grey[..., None], 3, axis=2)
    heat = colormaps["jet"](cam)[..., :3]
    alpha = 0.5 * cam[..., None]
    blended = (rgb * (1 - alpha) + heat * alpha).clip(0, 1)
    with atomic_path(path) as tmp:
        Image.fromarray((blended * 255).round().astype(np.uint8)).save(tmp, format="PNG")
