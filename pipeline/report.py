"""Per-study outputs: report.json, a self-contained report.html, NIfTI masks/maps, features.npz.

Every file is written atomically, report.json last; it lists the other files. The
batch (:mod:`pipeline.batch`) then writes ``.complete.json`` (:mod:`pipeline.completion`) with every file's checksum,
which is what ``--resume`` checks. The same result gives the same bytes, except the
``created`` time and ``timings_s`` in the reports. A not-assessable study (no plausible lungs, see
:mod:`pipeline.assess`) gets only its lung mask and the two reports: nothing was
classified, so there is no heat map and there are no features. Nothing here
reads or writes patient identity.

Every report also says what its numbers are worth: the limits of the models that
produced it, read from their model cards (``model_limits``: intended use, training
data, headline validation figures), positive slices whose Grad-CAM map is empty
(``gradcam``), a series that covers only part of the chest (``coverage``), and what
the HU measures count (``hu_measures``). Labels that the config can change are taken
from the config.

report.json is built here (:func:`build_report`); report.html is rendered from it by
:mod:`pipeline.report_html` (pictures: :mod:`pipeline.report_figures`), the model-card
summaries come from :mod:`pipeline.model_limits`, and the wording both reports share from
:mod:`pipeline.report_text`.
"""

from __future__ import annotations

import dataclasses
import math
import zipfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from corona_ct.pipeline import __version__
from corona_ct.pipeline import hu_maps as hu_measures_module
from corona_ct.pipeline.atomic import atomic_path, jsonable, write_json, write_text
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.datamodel import StudyResult, empty_map_positive_slices
from corona_ct.pipeline.ingest.nifti import write_nifti
from corona_ct.pipeline.layout import (
    ASSESSABLE_FILES,
    FEATURES_NAME,
    HEATMAP_NAME,
    LUNG_MASK_NAME,
    NOT_ASSESSABLE_FILES,
    REPORT_HTML_NAME,
    REPORT_JSON_NAME,
)
from corona_ct.pipeline.model_limits import models_limits
from corona_ct.pipeline.modelset import ModelSet, models_key
from corona_ct.pipeline.report_html import render_html
from corona_ct.pipeline.report_text import (
    RESEARCH_NOTICE,
    UNTRAINED_NOTICE,
    empty_map_sentence,
    hu_range_text,
)

#: Cranio-caudal height of an adult lung, mm (about 25 cm from apex to the deepest recess).
ADULT_LUNG_HEIGHT_MM = 250.0
#: A series whose slab (slices × slice spacing) is shorter than this covers only part of the chest.
PARTIAL_CHEST_MM = 150.0


def write_study_outputs(
    study_dir: Path,
    result: StudyResult,
    models: ModelSet,
    config: PipelineConfig,
    summary: Mapping[str, object],
) -> dict[str, Any]:
    """Write all outputs of one study into ``study_dir``; returns the report dictionary.

    ``summary`` is the study's summary with numbers as numbers (:func:`pipeline.summary.summary_values`).
    """
    study_dir.mkdir(parents=True, exist_ok=True)
    volume = result.volume
    write_nifti(study_dir / LUNG_MASK_NAME, result.lung_mask.labels, volume, dtype=np.uint8)
    if result.assessable:
        write_nifti(study_dir / HEATMAP_NAME, result.cams.maps, volume, dtype=np.float32)
        write_features(study_dir / FEATURES_NAME, result)

    report = build_report(result, models, config, summary)
    report["first_line"] = UNTRAINED_NOTICE if models.untrained else RESEARCH_NOTICE
    report["models_key"] = models_key(models)
    report["files"] = list(ASSESSABLE_FILES if result.assessable else NOT_ASSESSABLE_FILES)
    report = jsonable(report)
    write_text(study_dir / REPORT_HTML_NAME, render_html(report, result))
    write_json(study_dir / REPORT_JSON_NAME, report)
    return report


def write_features(path: Path, result: StudyResult) -> None:
    """features.npz: per evaluated slice, pooled layer4 features and their Grad-CAM weights."""
    feats = result.features
    z_mm = result.volume.geometry.slice_positions_mm()[feats.slice_index]
    arrays = {
        "study_id": np.array(result.volume.study_id),
        "slice_index": feats.slice_index,
        "z_mm": z_mm.astype(np.float64),
        "probability": result.scores.probs[feats.slice_index].astype(np.float32),
        "features": feats.features,
        "weights": feats.weights,
        "thumbnails": result.thumbnails,
        "cams": result.cam_thumbnails,
    }
    # np.savez_compressed's layout, but with a fixed member time: the same result gives the same bytes
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            member.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(member, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.asanyarray(array), allow_pickle=False)


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def chest_coverage(result: StudyResult) -> dict[str, Any]:
    """How much of the chest the series covers: slab = slices × slice spacing (mm).

    Below ``PARTIAL_CHEST_MM`` the lung volume (and every cm³ figure) is that of the slab,
    not of the lungs; without a known spacing the slab is unknown.
    """
    volume = result.volume
    spacing = float(volume.geometry.spacing_mm[0])
    known = bool(volume.spacing_known)
    slab = volume.n_slices * spacing if known else None
    partial = None if slab is None else slab < PARTIAL_CHEST_MM
    if slab is None:
        note: str | None = (
            "slice spacing unknown (nominal 1 mm voxels): the series' extent and the lung volume in cm³ "
            "are not physical"
        )
    elif partial:
        note = f"the series covers {slab:.0f} mm, part of the chest: lung volume is that of the slab"
    else:
        note = None
    return {
        "n_slices": volume.n_slices,
        "slice_spacing_mm": round(spacing, 6) if known else None,
        "slab_mm": None if slab is None else round(slab, 3),
        "adult_lung_height_mm": ADULT_LUNG_HEIGHT_MM,
        "partial_below_mm": PARTIAL_CHEST_MM,
        "partial_chest": partial,
        "note": note,
    }


def hu_measures_info(config: PipelineConfig, units: str) -> dict[str, Any]:
    """What the HU measures count, labelled from the config, with the severity module's caveat.

    ``caveat`` and ``reference_range`` are :mod:`pipeline.hu_maps`' ``HU_MEASURE_CAVEAT`` and
    ``HU_REFERENCE_RANGE`` when it defines them (None until it does); the report shows them
    beside the HU numbers.
    """
    ggo, consolidation = config.severity.ggo_hu, config.severity.consolidation_hu
    caveat = getattr(hu_measures_module, "HU_MEASURE_CAVEAT", None)
    reference = getattr(hu_measures_module, "HU_REFERENCE_RANGE", None)
    return {
        "available": units == "HU",
        "ggo_hu": list(ggo),
        "consolidation_hu": list(consolidation),
        "ggo_label": f"% of assessed lung, smoothed HU {hu_range_text(*ggo)}, vessels and rim excluded",
        "consolidation_label": (
            f"% of assessed lung, broad dense tissue {hu_range_text(*consolidation)} enclosed by lung"
        ),
        "caveat": caveat if isinstance(caveat, str) else None,
        "reference_range": jsonable(reference) if reference is not None else None,
    }


def build_report(
    result: StudyResult,
    models: ModelSet,
    config: PipelineConfig,
    summary: Mapping[str, object],
) -> dict[str, Any]:
    """The report.json content (made JSON-safe by :func:`~corona_ct.pipeline.atomic.jsonable` before writing: NaN becomes null).

    ``status`` is ``ok`` or ``not-assessable``; a not-assessable study has its reason in
    ``not_assessable_reason`` and null ``case``, ``severity`` and ``gradcam`` (no call was made).
    ``summary`` holds numbers as numbers (null where summary.csv has an empty cell).
    """
    volume = result.volume
    geometry = volume.geometry
    threshold = config.classify.positive_threshold
    z_mm = geometry.slice_positions_mm()
    maps = np.asarray(result.cams.maps)
    empty_positive = empty_map_positive_slices(result, threshold)
    slices = [
        {
            "index": int(i),
            "z_mm": round(float(z_mm[i]), 3),
            "evaluated": bool(result.scores.evaluated[i]),
            "probability": _finite(float(result.scores.probs[i])),
            "positive": bool(result.scores.evaluated[i] and result.scores.probs[i] >= threshold),
            # the fused Grad-CAM map is all zero: a positive call there has no localised evidence
            "cam_empty": bool(not maps[i].any()) if result.scores.evaluated[i] else None,
        }
        for i in range(volume.n_slices)
    ]
    severity = None
    case = None
    gradcam = None
    if result.severity is not None and result.case_probability is not None:
        severity = {
            key: (_finite(value) if isinstance(value, float) else value)
            for key, value in dataclasses.asdict(result.severity).items()
        }
        case = {
            "probability": _finite(result.case_probability),
            "positive": bool(result.case_probability >= threshold),
            "aggregation": config.classify.case_aggregation,
        }
        empty = [int(i) for i in np.flatnonzero(empty_positive)]
        gradcam = {
            "layers": list(result.cams.layers),
            "fusion": result.cams.fusion,
            "activation_threshold": config.cam.activation_threshold,
            "positive_slices_with_empty_map": empty,
            "n_positive_slices_with_empty_map": len(empty),
            "note": empty_map_sentence(len(empty)),
        }
    coverage = chest_coverage(result)
    warnings = list(result.warnings)
    if coverage["partial_chest"] and coverage["note"]:
        warnings.append(coverage["note"])
    return {
        "untrained_weights": models.untrained,
        "research_use_only": True,
        "corona_ct_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "study_id": volume.study_id,
        "status": result.status,
        "not_assessable_reason": result.not_assessable_reason,
        "summary": dict(summary),
        "case": case,
        "severity": severity,
        "gradcam": gradcam,
        "coverage": coverage,
        "hu_measures": hu_measures_info(config, volume.units),
        "model_limits": models_limits(models),
        "lung_check": result.lung_check.to_dict(),
        "input": {
            "source": summary.get("source"),
            "units": volume.units,
            "shape_zyx": list(geometry.shape),
            "spacing_mm_zyx": [round(s, 6) for s in geometry.spacing_mm],
            "spacing_known": volume.spacing_known,
            "meta": dict(volume.meta),
        },
        "segmenter": result.lung_mask.method,
        "models": models.describe(),
        "config": config.to_dict(),
        "config_hash": config.hash(),
        "timings_s": {k: round(v, 4) for k, v in result.timings_s.items()},
        "warnings": warnings,
        "slices": slices,
    }
