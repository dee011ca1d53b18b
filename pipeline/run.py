"""The study runner: the only place where the stages are wired together.

``analyze_study`` takes one loaded ``Volume`` and the loaded networks (:mod:`pipeline.modelset`)
and returns a :class:`~pipeline.datamodel.StudyResult`. What is written from it lives
elsewhere: the summary row in :mod:`pipeline.summary`, the per-study files in
:mod:`pipeline.report`; batches of studies (discovery, ids, locking, resume, summary.csv)
in :mod:`pipeline.batch`; single 2D slices go through :mod:`pipeline.single_slice`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from corona_ct.pipeline.assess import check_lungs
from corona_ct.pipeline.classify import case_probability, classify_slices
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.datamodel import (
    CamStack,
    LungCheck,
    LungMask,
    SliceFeatures,
    SliceScores,
    StudyResult,
    Volume,
)
from corona_ct.pipeline.device import resolve_device
from corona_ct.pipeline.errors import CoronaCTError, OutputError, StageError
from corona_ct.pipeline.memory import hold_freed_memory
from corona_ct.pipeline.modelset import ModelSet
from corona_ct.pipeline.preprocess import (
    evaluable_slices,
    input_lungs,
    lung_bounding_box,
    paste_back,
    to_model_input,
    window,
)
from corona_ct.pipeline.segment import segment_lungs
from corona_ct.pipeline.severity import severity

log = logging.getLogger(__name__)

#: Side (px) of the per-slice thumbnails kept in features.npz.
THUMBNAIL_SIZE = 112


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
    models: ModelSet,
    config: PipelineConfig,
    progress: Callable[[int], None] | None = None,
) -> StudyResult:
    """Lungs → gate → ROI → slice classifier + multi-scale Grad-CAM → 3D map → severity.

    When the lungs fail the not-assessable gate (:func:`pipeline.assess.check_lungs`) the
    study stops after segmentation: nothing is classified and no score is computed.
    """
    timings: dict[str, float] = {}
    study_id = volume.study_id
    device = resolve_device(config.runtime.device)
    if config.runtime.hold_freed_memory:
        hold_freed_memory()  # once per process
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
            inputs = to_model_input(windowed[chunk], box, size, input_lungs(lungs[chunk], config.roi))
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
            thumbnails[rows] = thumbnail(inputs[:, 0])
            cam_thumbnails[rows] = thumbnail(fused)
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


def thumbnail(images: object) -> np.ndarray:
    """(n, S, S) maps in [0, 1] → (n, 112, 112) uint8."""
    tensor = torch.as_tensor(images, dtype=torch.float32)[:, None]
    small = F.interpolate(tensor, size=(THUMBNAIL_SIZE, THUMBNAIL_SIZE), mode="bilinear", antialias=True)
    return (small[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
