"""Python API: one call per job, the same code paths as the command line.

::

    from corona_ct.pipeline.api import analyse_study, explain_images, run_batch

    result = analyse_study("CT/P001", "out/P001", device="cpu")   # one study
    print(result.status, result.case_probability, result.severity.corona_score_cm3)
    outcome = run_batch(["CT/"], "out/")                           # every study under CT/
    explained = explain_images(["slice.png"], "explain/")          # single 2D slices

Config values are the keyword arguments ``SECTION_FIELD=value`` (``roi_input_size=128``
is ``--set roi.input_size=128``; sections: ingest, window, segment, roi, classify, cam,
severity, runtime), applied over ``config`` (a ``PipelineConfig`` or a JSON file). Weights
default to the shipped ones in ``models/weights``. Errors are
:class:`corona_ct.pipeline.errors.CoronaCTError` subclasses with one-line messages.
Per-study and per-epoch progress lines go to the ``corona_ct.progress`` logger (INFO).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corona_ct.pipeline.batch import BatchOutcome
from corona_ct.pipeline.batch import run_batch as run_studies
from corona_ct.pipeline.config import PipelineConfig, load_config
from corona_ct.pipeline.datamodel import StudyResult
from corona_ct.pipeline.device import resolve_device, set_threads
from corona_ct.pipeline.errors import ConfigError
from corona_ct.pipeline.ingest import discover, load_input, load_study
from corona_ct.pipeline.layout import PREDICTIONS_NAME
from corona_ct.pipeline.modelset import ModelSet, load_models
from corona_ct.pipeline.ray_batch import RayOptions
from corona_ct.pipeline.report import write_study_outputs
from corona_ct.pipeline.run import analyze_study
from corona_ct.pipeline.single_slice import explain_images as explain_slices
from corona_ct.pipeline.study_ids import display_source
from corona_ct.pipeline.summary import summary_values

__all__ = [
    "ExplainedImages",
    "RayOptions",
    "analyse_study",
    "build_config",
    "explain_images",
    "prepare_models",
    "run_batch",
]

PathLike = str | Path


@dataclass(frozen=True)
class ExplainedImages:
    """What :func:`explain_images` wrote: one prediction row per explained image, and the failures.

    ``predictions`` rows: ``file``, ``probability`` (slice COVID-19 probability, text with 6
    decimals), ``roi`` (``lung``, ``image`` or ``image (no lung found)``) and ``cam`` (the
    ``.npy`` map file name); ``failures``: one line per image that could not be read.
    """

    predictions: list[dict[str, object]]
    failures: list[str]
    predictions_csv: Path


def build_config(
    config: PipelineConfig | PathLike | None = None, *, device: str | None = None, **settings: Any
) -> PipelineConfig:
    """The pipeline config: defaults (or ``config``), then ``SECTION_FIELD=value`` settings, then ``device``.

    ``config`` is a :class:`PipelineConfig` or the path of a JSON config file. ``device``
    (``auto``, ``cpu``, ``cuda``, ``cuda:N``) sets ``runtime.device``; None keeps the config's.
    """
    sections = [f.name for f in dataclasses.fields(PipelineConfig)]
    overrides: dict[str, Any] = {}
    for key, value in settings.items():
        section, _, name = key.partition("_")
        if section not in sections or not name:
            raise ConfigError(
                f"unknown setting {key}=…; settings are SECTION_FIELD=value with SECTION one of "
                f"{', '.join(sections)} (e.g. roi_input_size=128, the same as --set roi.input_size=128)"
            )
        overrides[f"{section}.{name}"] = value
    if device is not None:
        overrides["runtime.device"] = device
    base = config if isinstance(config, PipelineConfig) else load_config(config)
    return base.replace(overrides)


def prepare_models(
    config: PipelineConfig,
    *,
    cls_weights: PathLike | None = None,
    seg_weights: PathLike | None = None,
    allow_untrained: bool = False,
) -> ModelSet:
    """Check the config's device, then load the classifier and lung segmenter once (reuse for many studies).

    Without ``cls_weights`` the shipped default is used; with no weights at all this refuses
    unless ``allow_untrained`` (random weights: every number is then meaningless).
    """
    resolve_device(config.runtime.device)  # a missing GPU is named before any model loads
    return load_models(
        config,
        Path(cls_weights) if cls_weights is not None else None,
        Path(seg_weights) if seg_weights is not None else None,
        allow_untrained=allow_untrained,
    )


def _setup(
    config: PipelineConfig | PathLike | None,
    device: str | None,
    threads: int | None,
    settings: Mapping[str, Any],
) -> PipelineConfig:
    if threads is not None:
        set_threads(threads)
    return build_config(config, device=device, **settings)


def analyse_study(
    input: PathLike,
    output: PathLike | None = None,
    *,
    device: str | None = None,
    config: PipelineConfig | PathLike | None = None,
    series: str | None = None,
    cls_weights: PathLike | None = None,
    seg_weights: PathLike | None = None,
    allow_untrained: bool = False,
    models: ModelSet | None = None,
    threads: int | None = None,
    **settings: Any,
) -> StudyResult:
    """Detect, localise and quantify COVID-19 pneumonia in one CT study.

    Args:
        input: a DICOM folder (one study), a NIfTI file, or a folder of TIFF/PNG/JPEG slices.
        output: folder for the study's report.json, report.html, lung_mask.nii.gz,
            heatmap.nii.gz and features.npz (created); None writes nothing.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; None: the
            config's ``runtime.device`` (``auto`` unless the config says otherwise).
        config: a :class:`PipelineConfig` or a JSON config file; ``settings`` apply on top.
        series: the series to analyse (full or unique short UID) when the study has several.
        cls_weights, seg_weights: checkpoints to use instead of the shipped defaults.
        allow_untrained: run with random classifier weights when none exist.
        models: models from :func:`prepare_models`, to load them once for many studies
            (then ``cls_weights``, ``seg_weights`` and ``allow_untrained`` are not used).
        threads: CPU threads for torch and numpy/BLAS (None: the libraries' default).
        **settings: config values as ``SECTION_FIELD=value``, e.g. ``roi_input_size=128``.

    Returns:
        The :class:`StudyResult`: ``status`` (``ok`` or ``not-assessable``),
        ``case_probability`` (0–1), ``severity`` (Corona score and lung volume in cm³,
        affected/GGO/consolidation in % of lung volume), per-slice ``scores``, the lung
        mask, the 3D Grad-CAM map (``cams.maps``, 0–1) and ``timings_s`` (seconds per stage).
        A not-assessable study (no plausible lungs) has ``severity`` and
        ``case_probability`` None and says why in ``not_assessable_reason``.
    """
    pipeline_config = _setup(config, device, threads, settings)
    resolve_device(pipeline_config.runtime.device)
    items = discover([input], pipeline_config.ingest)
    if len(items) == 1:
        item = items[0]
        volume = load_input(item, pipeline_config.ingest, series_uid=series)
    else:  # several studies: the one holding ``series``, or an error listing them
        volume = load_study(input, pipeline_config.ingest, series_uid=series)
        item = next(found for found in items if found.study_id == volume.study_id)
    if models is None:
        models = prepare_models(
            pipeline_config, cls_weights=cls_weights, seg_weights=seg_weights, allow_untrained=allow_untrained
        )
    result = analyze_study(volume, models, pipeline_config)
    if output is not None:
        values = summary_values(
            volume.study_id,
            display_source(item),
            result,
            threshold=pipeline_config.classify.positive_threshold,
        )
        write_study_outputs(Path(output), result, models, pipeline_config, values)
    return result


def run_batch(
    inputs: Sequence[PathLike],
    output: PathLike,
    *,
    device: str | None = None,
    config: PipelineConfig | PathLike | None = None,
    cls_weights: PathLike | None = None,
    seg_weights: PathLike | None = None,
    allow_untrained: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    series: str | None = None,
    all_series: bool = False,
    show_progress: bool | None = None,
    study_naming: str = "deidentified",
    ids_file: PathLike | None = None,
    threads: int | None = None,
    dicom_out: bool = False,
    ray: RayOptions | None = None,
    **settings: Any,
) -> BatchOutcome:
    """Analyse every study found under ``inputs``, as ``corona-ct run`` does.

    Writes ``output/summary.csv`` (one row per study, rewritten after each) and
    ``output/<study_id>/`` per study. A study that fails is recorded (status ``failed``, a
    one-line error) and the batch goes on. An ``output`` holding an earlier run's results
    needs ``resume`` (reuse studies whose completion record matches this config, these
    weights and these inputs) or ``overwrite`` (recompute them); without either it raises
    :class:`~corona_ct.pipeline.errors.ConfigError`. ``study_naming``: ``"deidentified"`` or
    ``"folder"`` (as ``--study-id``); ``ids_file``: where to write ``study_id,input,...``
    (as ``--ids-file``). ``dicom_out``: also a DICOM SEG and SR per study (as ``--dicom-out``;
    DICOM inputs only). ``ray``: spread the studies over a Ray cluster, e.g.
    ``RayOptions(address="auto", workers=8)`` (as ``--ray``). ``show_progress``: bars (True), log lines (False), or
    bars only when stderr is a terminal (None). Other arguments as :func:`analyse_study`.

    Returns:
        The :class:`BatchOutcome`: ``rows`` (the summary.csv rows), ``failures``,
        ``skipped`` (resumed study ids), ``not_assessable`` rows and ``exit_code``.
    """
    pipeline_config = _setup(config, device, threads, settings)
    models = prepare_models(
        pipeline_config, cls_weights=cls_weights, seg_weights=seg_weights, allow_untrained=allow_untrained
    )
    return run_studies(
        list(inputs),
        Path(output),
        pipeline_config,
        models,
        resume=resume,
        overwrite=overwrite,
        series_uid=series,
        all_series=all_series,
        show_progress=show_progress,
        study_naming=study_naming,  # type: ignore[arg-type]  # checked by run_batch
        ids_file=None if ids_file is None else Path(ids_file),
        dicom_out=dicom_out,
        ray=ray,
    )


def explain_images(
    images: Sequence[PathLike],
    output: PathLike,
    *,
    device: str | None = None,
    config: PipelineConfig | PathLike | None = None,
    roi: str = "lung",
    cls_weights: PathLike | None = None,
    seg_weights: PathLike | None = None,
    allow_untrained: bool = False,
    threads: int | None = None,
    **settings: Any,
) -> ExplainedImages:
    """Slice COVID-19 probability and fused multi-scale Grad-CAM for single 2D images.

    ``images``: PNG, JPEG, TIFF or DICOM slice files. Writes ``output/predictions.csv``,
    ``<name>_cam.npy`` (float32 map in [0, 1] at the image's size) and
    ``<name>_overlay.png``. ``roi="lung"`` crops to the slice's lung box as the pipeline
    does; ``"none"`` uses the whole image. An unreadable image is listed in ``failures``
    and the others go on. Other arguments as :func:`analyse_study`.
    """
    if roi not in {"lung", "none"}:
        raise ConfigError(f"roi={roi!r}; use 'lung' (crop to the lung box) or 'none' (whole image)")
    pipeline_config = _setup(config, device, threads, settings)
    models = prepare_models(
        pipeline_config, cls_weights=cls_weights, seg_weights=seg_weights, allow_untrained=allow_untrained
    )
    folder = Path(output)
    rows, failures = explain_slices([Path(p) for p in images], folder, pipeline_config, models, roi=roi)
    return ExplainedImages(predictions=rows, failures=failures, predictions_csv=folder / PREDICTIONS_NAME)
