"""The study runner: the only place where the stages are wired together.

``analyze_study`` takes one loaded ``Volume`` and loaded models and returns a
``StudyResult``; ``summary_values`` turns it into one summary.csv row; single 2D
slices go through ``explain_images``. Batches of studies (discovery, ids, locking,
resume, summary.csv) live in :mod:`pipeline.batch`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from corona_ct.pipeline.assess import NOT_ASSESSABLE, LungCheck
from corona_ct.pipeline.atomic import atomic_path, write_text
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.datamodel import (
    CamStack,
    LungMask,
    Severity,
    SliceFeatures,
    SliceScores,
    Volume,
)
from corona_ct.pipeline.errors import CoronaCTError, ModelError, OutputError, StageError

if TYPE_CHECKING:
    from corona_ct.models.checkpoint import LoadedModel
    from corona_ct.models.classifier import BackboneSpec
    from corona_ct.pipeline.ingest import SliceImage

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = (
    "study_id",
    "status",
    "source",
    "n_slices",
    "slices_evaluated",
    "positive_slices",
    "empty_cam_positive_slices",
    "case_probability",
    "corona_score_cm3",
    "corona_score_in_lung_cm3",
    "lung_volume_cm3",
    "affected_percent",
    "ggo_percent",
    "consolidation_percent",
    "reason",
    "error",
)
#: summary.csv ``status`` values: analysed; not assessable (no plausible lungs, no call made); failed.
STATUS_OK, STATUS_NOT_ASSESSABLE, STATUS_FAILED = "ok", NOT_ASSESSABLE, "failed"
THUMBNAIL_SIZE = 112
UNTRAINED_NOTICE = (
    "UNTRAINED WEIGHTS: the classifier has random weights; probabilities, heat maps and "
    "Corona scores in this report are meaningless."
)


def _check_cam_layers(classifier: LoadedModel, layers: Sequence[str]) -> None:
    """Refuse ``cam.layers`` that the classifier does not have, naming the ones it has."""
    if not layers or classifier.spec is None:
        return
    names = {name for name, _ in classifier.module.named_modules()}
    missing = [layer for layer in layers if layer not in names]
    if missing:
        raise ModelError(
            f"cam.layers names {', '.join(missing)}, which the {classifier.spec.name} classifier does not "
            f"have; its Grad-CAM layers are {', '.join(classifier.spec.cam_layers)} "
            "(leave cam.layers empty to use them)"
        )


@dataclass(frozen=True)
class Models:
    """The networks a run uses, loaded once per batch."""

    classifier: LoadedModel
    segmenter: LoadedModel | None  # None: the classical segmenter runs
    warnings: tuple[str, ...] = ()  # input-contract warnings, repeated in every report

    @property
    def spec(self) -> BackboneSpec:
        """The classifier's backbone description (input size, Grad-CAM layers)."""
        if self.classifier.spec is None:
            raise ModelError("the classifier checkpoint names no known backbone; check its JSON card")
        return self.classifier.spec

    def input_size(self, config: PipelineConfig) -> int:
        """Network input side: the config's when set, else the size the checkpoint was trained at."""
        if config.roi.input_size:
            return config.roi.input_size
        trained_size = self.classifier.card.get("input", {}).get("size")
        return int(trained_size) if trained_size else self.spec.input_size

    @property
    def segmenter_input_size(self) -> int | None:
        """Side (px) the U-Net was trained at, from its card; None without a U-Net."""
        if self.segmenter is None:
            return None
        size = self.segmenter.card.get("input", {}).get("size")
        return int(size) if size else None

    @property
    def untrained(self) -> bool:
        return not self.classifier.trained

    def describe(self) -> dict[str, dict[str, object] | None]:
        """Names, architectures and checksums for the report."""

        from corona_ct.models import weights

        def one(model: LoadedModel | None) -> dict[str, object] | None:
            if model is None:
                return None
            if model.path is None:
                origin = "none (random weights)"
            elif model.path.resolve().parent == weights.WEIGHTS_DIR.resolve():
                origin = "project default (models/weights)"
            else:
                origin = "user file"
            return {
                "architecture": model.card.get("architecture"),
                "file": model.path.name if model.path else None,
                "weights": origin,
                "input_size": model.card.get("input", {}).get("size"),
                "sha256": model.sha256,
                "trained": model.trained,
            }

        return {"classifier": one(self.classifier), "segmenter": one(self.segmenter)}


def load_models(
    config: PipelineConfig,
    cls_weights: Path | None = None,
    seg_weights: Path | None = None,
    *,
    allow_untrained: bool = False,
) -> Models:
    """Load the classifier and (when configured) the U-Net segmenter.

    Explicit paths win over the project's default weights in ``models/weights``.
    Without classifier weights this refuses unless ``allow_untrained`` is set.
    """
    from corona_ct.models.checkpoint import input_contract_problems, load_classifier, load_segmenter
    from corona_ct.models.weights import default_weights
    from corona_ct.pipeline.device import resolve_device

    device = str(resolve_device(config.runtime.device))
    cls_path = cls_weights or default_weights("classifier")
    if cls_path is None and not allow_untrained:
        raise ModelError(
            "no classifier weights: pass --cls-weights RUN/model.safetensors (train one with "
            "`corona-ct train-cls`), or --allow-untrained to run with random weights (numbers meaningless)"
        )
    if cls_path is None:
        import torch

        torch.manual_seed(config.runtime.seed)  # untrained runs are at least reproducible
    classifier = load_classifier(cls_path, device=device, backbone=config.classify.backbone)
    _check_cam_layers(classifier, config.cam.layers)

    method = config.segment.method
    if method not in {"auto", "unet", "classical"}:
        raise ModelError(f"segment.method={method!r}; use auto, unet or classical")
    seg_path = seg_weights if seg_weights is not None else default_weights("segmenter")
    if method == "unet" and seg_path is None:
        raise ModelError("segment.method=unet needs --seg-weights (train one with `corona-ct train-seg`)")
    segmenter = None
    if method != "classical" and seg_path is not None:
        segmenter = load_segmenter(seg_path, device=device)
    if not classifier.trained:
        return Models(classifier=classifier, segmenter=segmenter)
    errors, warnings = input_contract_problems(
        classifier.card, (config.window.hu_min, config.window.hu_max), segmenter
    )
    name = classifier.path.name if classifier.path else "classifier"
    if errors:
        raise ModelError(f"{name}: refused, its input contract is not met: " + "; ".join(errors))
    for warning in warnings:
        log.warning("%s: %s", name, warning)
    return Models(classifier=classifier, segmenter=segmenter, warnings=tuple(warnings))


@dataclass(frozen=True)
class StudyResult:
    """Everything the pipeline computed for one study.

    A study whose lungs fail the gate (:mod:`pipeline.assess`) is not classified: no slice is
    evaluated, its maps are zero, and ``severity`` and ``case_probability`` are None.
    """

    volume: Volume
    lung_mask: LungMask
    lung_check: LungCheck
    scores: SliceScores
    cams: CamStack
    features: SliceFeatures
    thumbnails: np.ndarray  # (n_evaluated, 112, 112) uint8: windowed lung-ROI crops
    cam_thumbnails: np.ndarray  # (n_evaluated, 112, 112) uint8: fused map × 255 on the crop
    severity: Severity | None
    case_probability: float | None
    timings_s: dict[str, float]
    warnings: tuple[str, ...]

    @property
    def assessable(self) -> bool:
        return self.lung_check.assessable

    @property
    def status(self) -> str:
        """``ok`` or ``not-assessable``."""
        return STATUS_OK if self.assessable else STATUS_NOT_ASSESSABLE

    @property
    def not_assessable_reason(self) -> str | None:
        return self.lung_check.reason


@contextlib.contextmanager
def _stage(name: str, study_id: str, timings: dict[str, float]) -> Iterator[None]:
    """Time a stage and re-raise any failure as a StageError naming the stage."""
    start = time.perf_counter()
    try:
        yield
    except (StageError, OutputError, ModuleNotFoundError):
        raise  # a full disk or a missing package is no fault of the study: it stops the batch
    except CoronaCTError as error:
        raise StageError(name, study_id, str(error)) from error
    except Exception as error:
        raise StageError(name, study_id, f"{type(error).__name__}: {error}") from error
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def analyze_study(
    volume: Volume,
    models: Models,
    config: PipelineConfig,
    progress: Callable[[int], None] | None = None,
) -> StudyResult:
    """Lungs → gate → ROI → slice classifier + multi-scale Grad-CAM → 3D map → severity.

    When the lungs fail the not-assessable gate (:func:`pipeline.assess.check_lungs`) the
    study stops after segmentation: nothing is classified and no score is computed.
    """
    import torch

    from corona_ct.pipeline.assess import check_lungs
    from corona_ct.pipeline.classify import case_probability, classify_slices
    from corona_ct.pipeline.device import resolve_device
    from corona_ct.pipeline.preprocess import (
        evaluable_slices,
        lung_bounding_box,
        paste_back,
        to_model_input,
        window,
    )
    from corona_ct.pipeline.segment import segment_lungs
    from corona_ct.pipeline.severity import severity

    timings: dict[str, float] = {}
    study_id = volume.study_id
    device = resolve_device(config.runtime.device)
    warnings = [*volume.warnings, *models.warnings]
    classifier = models.classifier
    spec = models.spec
    size = models.input_size(config)

    with _stage("segment", study_id, timings):
        seg_model = models.segmenter.module if models.segmenter is not None else None
        lung_mask = segment_lungs(
            volume, config.segment, config.window, model=seg_model, device=str(device),
            input_size=models.segmenter_input_size,
        )  # fmt: skip
        warnings.extend(lung_mask.warnings)

    with _stage("assess", study_id, timings):
        lung_check = check_lungs(volume, lung_mask, config.segment)
    if not lung_check.assessable:
        log.info("study %s: not assessable: %s", study_id, lung_check.reason)
        return _not_assessable_result(volume, lung_mask, lung_check, spec.feature_dim, timings, warnings)

    with _stage("roi", study_id, timings):
        lungs = lung_mask.lungs
        box = lung_bounding_box(lungs, config.roi)
        evaluated = (
            evaluable_slices(lungs, config.roi) if box is not None else np.zeros(volume.n_slices, bool)
        )
        windowed = window(volume.array, volume.units, config.window)

    n_slices = volume.n_slices
    probs = np.full(n_slices, np.nan, dtype=np.float32)
    cam_volume = np.zeros(volume.array.shape, dtype=np.float32)
    eval_index = np.flatnonzero(evaluated)
    feature_dim = spec.feature_dim
    features = np.zeros((len(eval_index), feature_dim), np.float32)
    feature_weights = np.zeros_like(features)
    thumbnails = np.zeros((len(eval_index), THUMBNAIL_SIZE, THUMBNAIL_SIZE), np.uint8)
    cam_thumbnails = np.zeros_like(thumbnails)
    if len(eval_index) == 0:
        warnings.append("no lungs found: no slice was classified and no score was computed")

    batch = config.classify.batch_size
    cam_layers = config.cam.layers or spec.cam_layers
    for start in range(0, len(eval_index), batch):
        chunk = eval_index[start : start + batch]
        with _stage("classify+gradcam", study_id, timings):
            inputs = to_model_input(windowed[chunk], box, size)
            out = classify_slices(
                classifier,
                spec,
                inputs,
                batch_size=batch,
                device=device,
                amp=config.runtime.amp,
                explain=True,
                layers=cam_layers,
                fusion=config.cam.fusion,
            )
        with _stage("paste-back", study_id, timings):
            fused = torch.as_tensor(np.asarray(out.fused))
            probs[chunk] = np.asarray(out.probabilities, dtype=np.float32)
            cam_volume[chunk] = paste_back(fused, box, volume.array.shape[1:])
            rows = slice(start, start + len(chunk))
            features[rows] = np.asarray(out.features, dtype=np.float32)
            feature_weights[rows] = np.asarray(out.feature_weights, dtype=np.float32)
            thumbnails[rows] = _thumbnail(inputs[:, 0])
            cam_thumbnails[rows] = _thumbnail(fused)
        if progress is not None:
            progress(len(chunk))

    scores = SliceScores(probs=probs, evaluated=evaluated)
    cams = CamStack(maps=cam_volume, layers=tuple(cam_layers), fusion=config.cam.fusion)
    with _stage("severity", study_id, timings):
        measures = severity(volume, lung_mask, cams, scores, config)
        case_p = case_probability(probs[evaluated], config.classify) if len(eval_index) else 0.0
    return StudyResult(
        volume=volume,
        lung_mask=lung_mask,
        lung_check=lung_check,
        scores=scores,
        cams=cams,
        features=SliceFeatures(
            slice_index=eval_index.astype(np.int64), features=features, weights=feature_weights
        ),
        thumbnails=thumbnails,
        cam_thumbnails=cam_thumbnails,
        severity=measures,
        case_probability=float(case_p),
        timings_s=timings,
        warnings=tuple(dict.fromkeys(warnings)),
    )


def _not_assessable_result(
    volume: Volume,
    lung_mask: LungMask,
    lung_check: LungCheck,
    feature_dim: int,
    timings: dict[str, float],
    warnings: list[str],
) -> StudyResult:
    """A result with nothing classified: no evaluated slice, zero maps, no severity, no case probability."""
    n_slices = volume.n_slices
    no_rows = np.zeros((0, feature_dim), np.float32)
    return StudyResult(
        volume=volume,
        lung_mask=lung_mask,
        lung_check=lung_check,
        scores=SliceScores(probs=np.full(n_slices, np.nan, np.float32), evaluated=np.zeros(n_slices, bool)),
        cams=CamStack(maps=np.zeros(volume.array.shape, np.float32), layers=()),
        features=SliceFeatures(slice_index=np.zeros(0, np.int64), features=no_rows, weights=no_rows.copy()),
        thumbnails=np.zeros((0, THUMBNAIL_SIZE, THUMBNAIL_SIZE), np.uint8),
        cam_thumbnails=np.zeros((0, THUMBNAIL_SIZE, THUMBNAIL_SIZE), np.uint8),
        severity=None,
        case_probability=None,
        timings_s=timings,
        warnings=tuple(dict.fromkeys(warnings)),
    )


def _thumbnail(images: object) -> np.ndarray:
    """(n, S, S) maps in [0, 1] → (n, 112, 112) uint8."""
    import torch
    import torch.nn.functional as F

    tensor = torch.as_tensor(images, dtype=torch.float32)[:, None]
    small = F.interpolate(tensor, size=(THUMBNAIL_SIZE, THUMBNAIL_SIZE), mode="bilinear", antialias=True)
    return (small[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()


# --------------------------------------------------------------------------- summary rows


def summary_values(
    study_id: str,
    source: str,
    result: StudyResult | None = None,
    error: str = "",
    *,
    threshold: float | None = None,
) -> dict[str, object]:
    """One study's summary with numbers as numbers: None where summary.csv has an empty cell.

    This is report.json's ``summary``; :func:`summary_cells` formats it for summary.csv.
    Numeric fields are None for failed studies. A not-assessable study gets its ``reason``
    and only the numbers that are not a call: slice counts and the volume of the lung mask
    that failed the gate. ``threshold`` (default ``classify.positive_threshold``'s default)
    decides which slices count as positive for ``empty_cam_positive_slices``.
    """
    from corona_ct.pipeline.config import ClassifyConfig
    from corona_ct.pipeline.report import empty_map_positive_slices

    row: dict[str, object] = dict.fromkeys(SUMMARY_COLUMNS)
    row.update(study_id=study_id, source=source, status=STATUS_FAILED, reason="", error=error)
    if result is None:
        return row
    row["status"] = result.status
    sev = result.severity
    if sev is None or result.case_probability is None:
        row.update(
            reason=result.not_assessable_reason or "",
            n_slices=result.volume.n_slices,
            slices_evaluated=int(result.scores.evaluated.sum()),
            lung_volume_cm3=_finite_or_none(result.lung_check.lung_volume_cm3),
        )
    else:
        limit = ClassifyConfig().positive_threshold if threshold is None else threshold
        row.update(
            n_slices=result.volume.n_slices,
            slices_evaluated=int(result.scores.evaluated.sum()),
            positive_slices=sev.positive_slices,
            empty_cam_positive_slices=int(empty_map_positive_slices(result, limit).sum()),
            case_probability=_finite_or_none(result.case_probability),
            corona_score_cm3=_finite_or_none(sev.corona_score_cm3),
            corona_score_in_lung_cm3=_finite_or_none(sev.corona_score_in_lung_cm3),
            lung_volume_cm3=_finite_or_none(sev.lung_volume_cm3),
            affected_percent=_finite_or_none(sev.affected_percent),
            ggo_percent=_finite_or_none(sev.ggo_percent),
            consolidation_percent=_finite_or_none(sev.consolidation_percent),
        )
    return row


def summary_cells(values: Mapping[str, object]) -> dict[str, object]:
    """A summary as summary.csv writes it: numbers as text (6 significant digits), None as empty.

    Text passes through, so a row read back from an older report (all text) is unchanged.
    """
    return {column: _fmt(values.get(column)) for column in SUMMARY_COLUMNS}


def summary_row(
    study_id: str,
    source: str,
    result: StudyResult | None = None,
    error: str = "",
    *,
    threshold: float | None = None,
) -> dict[str, object]:
    """One summary.csv row (text cells); numeric fields empty for failed studies (see :func:`summary_values`)."""
    return summary_cells(summary_values(study_id, source, result, error, threshold=threshold))


def _finite_or_none(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _fmt(value: object) -> str:
    if value is None or isinstance(value, bool):
        return "" if value is None else str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def models_key(models: Models) -> str:
    """Identity of the loaded weights, for resume checks."""
    desc = models.describe()
    return json.dumps([d and d.get("sha256") for d in desc.values()], sort_keys=True)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------- single slices


def slice_lung_mask(
    image: np.ndarray, units: str, config: PipelineConfig, models: Models, source: str = "slice"
) -> np.ndarray:
    """(1, y, x) bool lungs of one slice image: the run's U-Net when loaded, else the classical method."""
    from corona_ct.pipeline.device import resolve_device
    from corona_ct.pipeline.segment import slice_lung_labels

    unet = models.segmenter.module if models.segmenter is not None else None
    device = str(resolve_device(config.runtime.device))
    labels = slice_lung_labels(image, units, config, source, unet, device, models.segmenter_input_size)
    return labels > 0


#: predictions.csv columns: the input path as given, its file name, ok/failed, the slice probability,
#: the crop used, the map and overlay file names (in the output folder), and why a slice failed.
PREDICTION_COLUMNS = ("input", "file", "status", "probability", "roi", "cam", "overlay", "error")


def explain_images(
    inputs: Sequence[str | Path | SliceImage],
    output: Path,
    config: PipelineConfig,
    models: Models,
    *,
    roi: str = "lung",
) -> tuple[list[dict[str, object]], list[str]]:
    """Classify single 2D slices; write predictions.csv, ``<stem>_cam.npy`` and ``<stem>_overlay.png``.

    ``inputs``: image files and folders (expanded by :func:`collect_slice_images`:
    recursively, sorted, a mask folder refused) or already collected ``SliceImage``s.
    Each slice goes through the same preprocessing as a study: window, lung box
    crop (``roi="lung"``, lungs by :func:`slice_lung_mask`; the whole image when no
    lung is found or ``roi="none"``), resize, classifier and fused Grad-CAM, map
    pasted back at the image's size. A blank, binary (mask) or tiny image, or any
    error, fails that image only: its row says why and the others go on.
    ``predictions.csv`` (``PREDICTION_COLUMNS``) is rewritten after every image, with
    the input path unmodified; output stems are unique (see :func:`output_stems`).
    Returns (rows of the explained images, "input: reason" per failed image).
    """
    from corona_ct.pipeline.classify import classify_slices
    from corona_ct.pipeline.device import resolve_device
    from corona_ct.pipeline.errors import UnsupportedInputError
    from corona_ct.pipeline.ingest import SliceImage, collect_slice_images
    from corona_ct.pipeline.ingest.slices import read_slice_image, slice_image_problem
    from corona_ct.pipeline.preprocess import lung_bounding_box, paste_back, to_model_input, window

    images: list[SliceImage] = []
    for item in inputs:
        images.extend([item] if isinstance(item, SliceImage) else collect_slice_images([item]))
    output.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.runtime.device)
    spec = models.spec
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
            windowed = window(image[None].astype(np.float32), units, config.window)
            box, roi_used = None, "image"
            if roi == "lung":
                lungs = slice_lung_mask(image, units, config, models, image_input.input)
                box = lung_bounding_box(lungs, config.roi)
                roi_used = "lung" if box is not None else "image (no lung found)"
            batch = to_model_input(windowed, box, models.input_size(config))
            out = classify_slices(
                models.classifier,
                spec,
                batch,
                batch_size=1,
                device=device,
                amp=config.runtime.amp,
                explain=True,
                layers=config.cam.layers or spec.cam_layers,
                fusion=config.cam.fusion,
            )
            cam = paste_back(np.asarray(out.fused), box, image.shape)[0].astype(np.float32)
            with atomic_path(output / f"{stem}_cam.npy") as tmp, tmp.open("wb") as handle:
                np.save(handle, cam)
            _write_overlay(output / f"{stem}_overlay.png", windowed[0], cam)
        except OutputError:  # the output cannot be written: no later image can be either
            raise
        except Exception as error:  # one image's failure, whatever it is, never stops the others
            reason = " ".join(str(error).split())
            reason = reason.removeprefix(f"{image_input.path}: ").removeprefix(f"{image_input.input}: ")
            if not isinstance(error, CoronaCTError):
                reason = f"{type(error).__name__}: {reason}"
            row.update(status="failed", error=reason)
            failures.append(f"{image_input.input}: {reason}")
        else:
            probability = float(np.asarray(out.probabilities)[0])
            row.update(
                status="ok",
                probability=f"{probability:.6f}",
                roi=roi_used,
                cam=f"{stem}_cam.npy",
                overlay=f"{stem}_overlay.png",
            )
            rows.append(row)
        table.append(row)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=PREDICTION_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
        write_text(output / "predictions.csv", buffer.getvalue())
    return rows, failures


def output_stems(images: Sequence[SliceImage]) -> list[str]:
    """Unique, file-system-safe output name stems, one per image, independent of the run order.

    The image's path below the given folder (from the folder's name on; a file given
    itself: its name) without suffix, folders joined by ``__``, characters other than
    letters, digits, ``.``, ``_`` and ``-`` replaced by ``_``. Stems that still clash
    (same-named files from different folders, names that differ only in replaced
    characters or case) get ``-`` and 10 hex digits of a hash of the input path.
    """
    from corona_ct.pipeline.ingest.deid import hashed_id

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
    from matplotlib import colormaps
    from PIL import Image

    rgb = np.repeat(grey[..., None], 3, axis=2)
    heat = colormaps["jet"](cam)[..., :3]
    alpha = 0.5 * cam[..., None]
    blended = (rgb * (1 - alpha) + heat * alpha).clip(0, 1)
    with atomic_path(path) as tmp:
        Image.fromarray((blended * 255).round().astype(np.uint8)).save(tmp, format="PNG")
