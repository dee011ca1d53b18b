"""Per-study outputs: report.json, a self-contained report.html, NIfTI masks/maps, features.npz.

Every file is written atomically, report.json last; it lists the other files. The
batch (:mod:`pipeline.batch`) then writes ``.complete.json`` with every file's checksum,
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
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import zipfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from corona_ct.pipeline import __version__
from corona_ct.pipeline.atomic import atomic_path, write_text
from corona_ct.pipeline.config import PipelineConfig

if TYPE_CHECKING:
    from corona_ct.models.checkpoint import LoadedModel
    from corona_ct.pipeline.run import Models, StudyResult

RESEARCH_NOTICE = "Research use only. Not a medical device; not for diagnosis or treatment decisions."
OUTPUT_FILES = ("lung_mask.nii.gz", "heatmap.nii.gz", "features.npz", "report.html")
NOT_ASSESSABLE_FILES = ("lung_mask.nii.gz", "report.html")
CT_DISPLAY_HU = (-1350.0, 150.0)  # lung window (W 1500, L −600) for pictures

#: Cranio-caudal height of an adult lung, mm (about 25 cm from apex to the deepest recess).
ADULT_LUNG_HEIGHT_MM = 250.0
#: A series whose slab (slices × slice spacing) is shorter than this covers only part of the chest.
PARTIAL_CHEST_MM = 150.0
#: Probabilities below this are shown as "< 0.001" in HTML (report.json keeps the number).
SMALLEST_SHOWN_PROBABILITY = 0.001
#: Sentence for a model card without validation figures.
NO_VALIDATION = "no validation figures recorded for these weights"
#: Headline figures shown per validation section of a model card, and sections per model.
MAX_FIGURES_PER_SECTION = 4
MAX_SECTIONS = 8

# --------------------------------------------------------------------------- writing


def write_study_outputs(
    study_dir: Path,
    result: StudyResult,
    models: Models,
    config: PipelineConfig,
    summary: Mapping[str, object],
) -> dict[str, Any]:
    """Write all outputs of one study into ``study_dir``; returns the report dictionary.

    ``summary`` is the study's summary with numbers as numbers (:func:`pipeline.run.summary_values`).
    """
    from corona_ct.pipeline.ingest.nifti import write_nifti
    from corona_ct.pipeline.run import UNTRAINED_NOTICE, models_key

    study_dir.mkdir(parents=True, exist_ok=True)
    volume = result.volume
    write_nifti(study_dir / "lung_mask.nii.gz", result.lung_mask.labels, volume, dtype=np.uint8)
    if result.assessable:
        write_nifti(study_dir / "heatmap.nii.gz", result.cams.maps, volume, dtype=np.float32)
        write_features(study_dir / "features.npz", result)

    report = build_report(result, models, config, summary)
    report["first_line"] = UNTRAINED_NOTICE if models.untrained else RESEARCH_NOTICE
    report["models_key"] = models_key(models)
    report["files"] = list(OUTPUT_FILES if result.assessable else NOT_ASSESSABLE_FILES)
    report = json_safe(report)
    write_text(study_dir / "report.html", render_html(report, result))
    write_text(study_dir / "report.json", json.dumps(report, indent=2, allow_nan=False))
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


def json_safe(value: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays to Python, tuples to lists, NaN and ±inf to None."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [json_safe(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- what the numbers are worth


def empty_map_positive_slices(result: StudyResult, threshold: float) -> np.ndarray:
    """(z,) bool: slices called positive (p ≥ ``threshold``) whose fused Grad-CAM map is all zero."""
    scores = result.scores
    with np.errstate(invalid="ignore"):  # NaN probabilities of unevaluated slices compare False
        positive = scores.evaluated & (scores.probs >= threshold)
    maps = np.asarray(result.cams.maps).reshape(positive.shape[0], -1)
    return positive & ~maps.any(axis=1)


def empty_map_sentence(n: int) -> str | None:
    """The statement made when positive slices have an empty Grad-CAM map; None when there are none."""
    if n <= 0:
        return None
    has = "slice has" if n == 1 else "slices have"
    its = "its" if n == 1 else "their"
    return f"{n} positive {has} an empty Grad-CAM map: {its} evidence is not localised"


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


def hu_range_text(low: float, high: float) -> str:
    """``−750…−300 HU`` from config values (typographic minus, explicit plus)."""

    def one(value: float) -> str:
        text = f"{value:g}"
        return text.replace("-", "−") if value < 0 else (f"+{text}" if value > 0 else text)

    return f"{one(low)}…{one(high)} HU"


def hu_measures_info(config: PipelineConfig, units: str) -> dict[str, Any]:
    """What the HU measures count, labelled from the config, with the severity module's caveat.

    ``caveat`` and ``reference_range`` are :mod:`pipeline.severity`'s ``HU_MEASURE_CAVEAT`` and
    ``HU_REFERENCE_RANGE`` when it defines them (None until it does); the report shows them
    beside the HU numbers.
    """
    from corona_ct.pipeline import severity as severity_module

    ggo, consolidation = config.severity.ggo_hu, config.severity.consolidation_hu
    caveat = getattr(severity_module, "HU_MEASURE_CAVEAT", None)
    reference = getattr(severity_module, "HU_REFERENCE_RANGE", None)
    return {
        "available": units == "HU",
        "ggo_hu": list(ggo),
        "consolidation_hu": list(consolidation),
        "ggo_label": f"% of assessed lung, smoothed HU {hu_range_text(*ggo)}, vessels and rim excluded",
        "consolidation_label": (
            f"% of assessed lung, broad dense tissue {hu_range_text(*consolidation)} enclosed by lung"
        ),
        "caveat": caveat if isinstance(caveat, str) else None,
        "reference_range": json_safe(reference) if reference is not None else None,
    }


# Model cards ---------------------------------------------------------------

#: Metrics recognised in a card's validation figures: key -> label, shown in this order.
CARD_METRICS: tuple[tuple[str, str], ...] = (
    ("auc", "AUC"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("accuracy", "accuracy"),
    ("dice_mean", "mean Dice"),
    ("mean_dice_cam_0.6", "mean Dice of the Grad-CAM > 0.6 mask"),
    ("pointing_game", "pointing game"),
    ("pointing_game_hit_rate", "pointing game"),
    ("case_probability", "case probability"),
    ("corona_score_cm3", "Corona score (cm³)"),
    ("pearson_r", "Pearson r"),
)
_CI_KEYS = ("ci95", "auc_ci95")
_N_KEYS = ("n", "n_studies", "n_patients", "n_cases", "n_slices", "n_images")
#: Readable names of validation sections known to appear in the project's cards.
SECTION_NAMES = {
    "best_validation": "best epoch on the validation split",
    "validation_split": "validation split",
    "lopo": "leave-one-patient-out",
    "clean_ct_final": "clean CT (final model)",
    "ucsd_final": "UCSD COVID-CT (final model)",
    "localisation_fold_b": "localisation (fold B)",
    "localisation_semiseg_train": "localisation (COVID-SemiSeg train slices)",
    "phantom_cohort": "phantom cohort",
    "lidc_no_covid": "LIDC-IDRI (no COVID)",
}
#: Per-patient figures summarised over a ``patients`` mapping (median and range).
_PATIENT_METRICS = (
    ("slice_auc", "slice AUC"),
    ("auc", "AUC"),
    ("case_probability", "case probability"),
    ("corona_score_cm3", "Corona score (cm³)"),
)


def _name(key: str) -> str:
    if key in SECTION_NAMES:
        return SECTION_NAMES[key]
    return " ".join("AUC" if word == "auc" else word for word in key.split("_"))


def _value_text(key: str, value: float) -> str:
    if key.endswith("_cm3"):
        return f"{value:.1f}"
    if key.startswith("n_") or key == "n":
        return f"{value:.0f}"
    if "probability" in key or 0 < value < SMALLEST_SHOWN_PROBABILITY:
        return probability_text(value)  # 9.2e-07 reads "< 0.001", not "0.000"
    return f"{value:.3f}"


def probability_text(value: float | None) -> str:
    """A probability for reading: 3 decimals, "< 0.001" below that, "—" when absent."""
    if value is None or not math.isfinite(value):
        return "—"
    if 0 <= value < SMALLEST_SHOWN_PROBABILITY:
        return f"< {SMALLEST_SHOWN_PROBABILITY:g}"
    return f"{value:.3f}"


def _ci(node: Mapping[str, Any]) -> list[float] | None:
    for key in _CI_KEYS:
        value = node.get(key)
        if isinstance(value, list | tuple) and len(value) == 2 and all(_is_number(v) for v in value):
            return [float(value[0]), float(value[1])]
    return None


def _figure(where: str, node: Mapping[str, Any], inherited_n: int | None = None) -> dict[str, Any] | None:
    """The recognised metrics of one card node, or None when it holds none (``n`` from a parent if absent)."""
    values: dict[str, Any] = {key: float(node[key]) for key, _ in CARD_METRICS if _is_number(node.get(key))}
    for key, value in node.items():  # e.g. "pooled_slice_auc": 0.81
        if isinstance(key, str) and key.endswith("_auc") and _is_number(value):
            values[key] = float(value)
    if not values:
        return None
    ci = _ci(node)
    n = next((int(node[k]) for k in _N_KEYS if _is_number(node.get(k))), inherited_n)
    return {"where": where, **values, "ci95": ci, "n": n}


def _figure_text(figure: Mapping[str, Any]) -> str:
    labels = dict(CARD_METRICS)
    parts = []
    for key, value in figure.items():
        if key in {"where", "ci95", "n"} or value is None:
            continue
        if key.endswith("_median"):  # per-patient summaries: "slice AUC median 0.81 (range 0.55–0.97)"
            base = key.removesuffix("_median")
            spread = figure.get(f"{base}_range")
            text = f"{figure.get(f'{base}_label', base)} median {_value_text(base, value)}"
            if spread:
                text += f" (range {_value_text(base, spread[0])}–{_value_text(base, spread[1])})"
            parts.append(text)
            continue
        if key.endswith(("_range", "_label")) or key == "n_patients":
            continue
        label = labels.get(key, key.replace("_", " "))
        text = f"{label} {_value_text(key, value)}"
        if key == "auc" and figure.get("ci95"):
            low, high = figure["ci95"]
            text += f" (95% CI {low:.3f}–{high:.3f})"
        parts.append(text)
    if figure.get("n_patients") is not None:
        parts.insert(0, f"{figure['n_patients']} patients")
    elif figure.get("n") is not None:
        parts.append(f"n = {figure['n']}")
    where = figure.get("where") or ""
    return f"{where}: {', '.join(parts)}" if where else ", ".join(parts)


def _per_patient(where: str, patients: Mapping[str, Any]) -> dict[str, Any] | None:
    """Median and range over patients of the per-patient figures (e.g. leave-one-patient-out)."""
    summary: dict[str, Any] = {"where": where, "n_patients": 0}
    rows = [row for row in patients.values() if isinstance(row, Mapping)]
    summary["n_patients"] = len(rows)
    found = False
    for key, label in _PATIENT_METRICS:
        values = []
        for row in rows:
            value = row.get(key)
            if isinstance(value, Mapping):
                value = value.get("auc")
            if isinstance(value, int | float) and _is_number(value):
                values.append(float(value))
        if values:
            found = True
            summary[f"{key}_median"] = float(np.median(values))
            summary[f"{key}_range"] = [min(values), max(values)]
            summary[f"{key}_label"] = label
    return summary if found else None


def _collect(
    node: Any, where: list[str], out: list[dict[str, Any]], depth: int = 0, n: int | None = None
) -> None:
    if not isinstance(node, Mapping) or depth > 4:
        return
    n = next((int(node[k]) for k in _N_KEYS if _is_number(node.get(k))), n)
    figure = _figure(" › ".join(where), node, n)
    if figure is not None:
        out.append(figure)
    for key, child in node.items():
        if not isinstance(child, Mapping):
            continue
        if key == "patients":
            summary = _per_patient(" › ".join([*where, "per patient"]), child)
            if summary is not None:
                out.append(summary)
            continue
        _collect(child, [*where, _name(str(key))], out, depth + 1, n)


def validation_figures(card: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Headline validation figures of a model card, one entry per section.

    Reads ``best_validation`` and every section of ``validation`` generically: any
    nested mapping holding a recognised metric (``CARD_METRICS``, or a key ending in
    ``_auc``) becomes a figure, with its 95 % CI (``ci95``/``auc_ci95``) and ``n``; a
    ``patients`` mapping becomes one per-patient summary (median and range). Each
    entry: ``section``, ``figures`` (numbers), ``more`` (figures not shown), ``text``.
    Unknown layouts give fewer entries, never an error.
    """
    sections: list[tuple[str, Any]] = []
    if isinstance(card.get("best_validation"), Mapping):
        sections.append(("best_validation", card["best_validation"]))
    validation = card.get("validation")
    if isinstance(validation, Mapping):
        sections.extend((str(k), v) for k, v in validation.items())
    entries = []
    for key, node in sections:
        figures: list[dict[str, Any]] = []
        if _is_number(node):
            figures.append({"where": "", key: float(node), "ci95": None, "n": None})
        else:
            _collect(node, [], figures)
        if not figures:
            continue
        # headline figures first: shallow ones, pooled before per-patient summaries
        figures.sort(key=lambda f: (f["where"].count("›"), "n_patients" in f))
        shown = figures[:MAX_FIGURES_PER_SECTION]
        more = len(figures) - len(shown)
        text = f"{_name(key)}: " + "; ".join(_figure_text(f) for f in shown)
        if more:
            text += f" (+{more} more in the model card)"
        entries.append({"section": key, "figures": shown, "more": more, "text": text})
    return entries[:MAX_SECTIONS]


def _flat_text(value: Any) -> str:
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {_flat_text(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_flat_text(v) for v in value)
    return " ".join(str(value).split())


def training_data_summary(card: Mapping[str, Any], limit: int = 400) -> str | None:
    """One line on what the weights were trained on (``training_data``: text, list or mapping).

    A mapping is written ``key: value; ...`` without its ``command`` (how, not what); the
    card's image/slice counts are appended when present; long text is cut with "…".
    """
    data = card.get("training_data")
    if isinstance(data, Mapping):
        text = _flat_text({k: v for k, v in data.items() if k != "command"})
    elif data is None or data == "":
        text = ""
    else:
        text = _flat_text(data)
    counts = [
        f"{int(card[key])} {label}"
        for key, label in (("n_images", "images"), ("n_train_slices", "training slices"))
        if _is_number(card.get(key))
    ]
    if counts:
        text = f"{text} ({', '.join(counts)})" if text else ", ".join(counts)
    if not text:
        return None
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def model_limits(model: LoadedModel | None, origin: str | None = None) -> dict[str, Any]:
    """What a model's card says about its use, training data and validation, for report.json.

    ``model`` None means the classical (weights-free) segmenter.
    """
    if model is None:
        return {
            "architecture": "classical",
            "weights": "threshold-based, no trained weights",
            "trained": False,
            "intended_use": None,
            "training_data": None,
            "validation": [],
            "validation_note": "classical segmenter: no trained weights, no model card",
        }
    card = model.card if isinstance(model.card, Mapping) else {}
    validation = validation_figures(card) if model.trained else []
    if not model.trained:
        note: str | None = f"untrained random weights: {NO_VALIDATION}"
    else:
        note = None if validation else NO_VALIDATION
    intended = card.get("intended_use")
    return {
        "architecture": card.get("architecture"),
        "weights": origin,
        "trained": bool(model.trained),
        "intended_use": _flat_text(intended) if intended else None,
        "training_data": training_data_summary(card) if model.trained else None,
        "validation": validation,
        "validation_note": note,
    }


def models_limits(models: Models) -> dict[str, dict[str, Any]]:
    """``model_limits`` of the classifier and the lung segmenter of a run."""
    described = models.describe()
    origin = {k: (v or {}).get("weights") for k, v in described.items()}
    return {
        "classifier": model_limits(models.classifier, str(origin["classifier"])),
        "segmenter": model_limits(models.segmenter, str(origin["segmenter"]) if models.segmenter else None),
    }


# --------------------------------------------------------------------------- report.json


def build_report(
    result: StudyResult,
    models: Models,
    config: PipelineConfig,
    summary: Mapping[str, object],
) -> dict[str, Any]:
    """The report.json content (made JSON-safe by :func:`json_safe` before writing: NaN becomes null).

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


# --------------------------------------------------------------------------- HTML


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _display(volume_array: np.ndarray, units: str) -> np.ndarray:
    """CT values → [0, 1] grey for pictures (lung window for HU)."""
    if units == "HU":
        lo, hi = CT_DISPLAY_HU
        return np.clip((volume_array - lo) / (hi - lo), 0, 1)
    return np.clip(volume_array, 0, 1)


def _probability_plot(report: dict[str, Any], threshold: float) -> str:
    plt = _pyplot()
    slices = [s for s in report["slices"] if s["evaluated"]]
    fig, ax = plt.subplots(figsize=(7, 2.6))
    if slices:
        ax.plot([s["z_mm"] for s in slices], [s["probability"] for s in slices], "o-", ms=3, color="#1f4e79")
    ax.axhline(threshold, color="#b22222", lw=1, ls="--", label=f"positive ≥ {threshold:g}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("slice position z (mm)")
    ax.set_ylabel("P(COVID)")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def _heat_rgba(heat: np.ndarray) -> np.ndarray:
    """Heat map as RGBA whose opacity grows with the value, so low activations stay see-through."""
    from matplotlib import colormaps

    rgba = colormaps["jet"](np.clip(heat, 0, 1))
    rgba[..., 3] = 0.65 * np.clip(heat, 0, 1) ** 0.75
    return rgba


def _colour_bar(fig: Any, ax: Any, label: str) -> None:
    """The 0–1 colour scale of the heat-map overlay (jet), beside ``ax``."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), "jet"), ax=ax, fraction=0.046, pad=0.03)
    bar.set_label(label, fontsize=7)
    bar.ax.tick_params(labelsize=6)


def _slice_figures(result: StudyResult, n: int = 4) -> list[tuple[int, float, bool, str]]:
    """Top-probability slices: CT with lung contour and heat map (with its colour bar when not empty).

    Returns (slice index, probability, map empty, PNG).
    """
    plt = _pyplot()
    probs = np.where(result.scores.evaluated, result.scores.probs, -1.0)
    order = [int(i) for i in np.argsort(-probs)[:n] if probs[i] >= 0]
    grey = _display(result.volume.array, result.volume.units)
    figures = []
    for index in order:
        heat = result.cams.maps[index]
        empty = not heat.any()
        fig, ax = plt.subplots(figsize=(3.9 if not empty else 3.4, 3.4))
        ax.imshow(grey[index], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        if not empty:
            ax.imshow(_heat_rgba(heat), interpolation="bilinear")
            _colour_bar(fig, ax, "Grad-CAM")
        if result.lung_mask.labels[index].any():
            ax.contour(result.lung_mask.labels[index] > 0, levels=[0.5], colors="#00ff7f", linewidths=0.8)
        ax.set_axis_off()
        figures.append((index, float(probs[index]), empty, _png(fig)))
    return figures


def _mask_figures(result: StudyResult, n: int = 4) -> list[tuple[int, str]]:
    """The slices where the lung mask is largest (the middle slice when it is empty), contour in green."""
    plt = _pyplot()
    labels = result.lung_mask.labels
    area = (labels > 0).sum(axis=(1, 2))
    order = [int(i) for i in np.argsort(-area, kind="stable")[:n] if area[i] > 0] or [labels.shape[0] // 2]
    grey = _display(result.volume.array, result.volume.units)
    figures = []
    for index in sorted(order):
        fig, ax = plt.subplots(figsize=(3.4, 3.4))
        ax.imshow(grey[index], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        if labels[index].any():
            ax.contour(labels[index] > 0, levels=[0.5], colors="#00ff7f", linewidths=0.8)
        ax.set_axis_off()
        figures.append((index, _png(fig)))
    return figures


def _mip_figure(result: StudyResult) -> str:
    """Axial and coronal maximum-intensity projections of the 3D heat map over the mean CT."""
    plt = _pyplot()
    grey = _display(result.volume.array, result.volume.units)
    maps = result.cams.maps
    empty = not maps.any()
    sz, sy, sx = result.volume.geometry.spacing_mm
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.6))
    views = (
        ("axial MIP", grey.mean(axis=0), maps.max(axis=0), sy / sx),
        ("coronal MIP", grey.mean(axis=1)[::-1], maps.max(axis=1)[::-1], sz / sx),
    )
    for ax, (title, base, heat, aspect) in zip(axes, views):
        ax.imshow(base, cmap="gray", aspect=aspect, interpolation="nearest")
        if not empty:
            ax.imshow(_heat_rgba(heat), aspect=aspect, interpolation="bilinear")
        ax.set_title(title + (" (Grad-CAM map empty)" if empty else ""), fontsize=9)
        ax.set_axis_off()
    if not empty:
        _colour_bar(fig, list(axes), "Grad-CAM")
    return _png(fig)


def _number(value: object, unit: str = "", digits: int = 1) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return f"{value:.{digits}f}{unit}"
    return html.escape(str(value))


def render_html(report: dict[str, Any], result: StudyResult) -> str:
    """A self-contained HTML page (images inlined) readable by a clinician."""
    body = (
        _assessed_body(report, result) if report["case"] is not None else _not_assessable_body(report, result)
    )
    return _page(report, body)


def _limits_box(report: dict[str, Any], roles: Sequence[str]) -> str:
    """The "what these numbers are worth" box: each model's intended use, training data, validation."""
    esc = html.escape
    titles = {"classifier": "COVID-19 slice classifier", "segmenter": "Lung segmentation"}
    limits = report.get("model_limits") or {}
    parts = []
    for role in roles:
        model = limits.get(role)
        if not model:
            continue
        name = ", ".join(str(x) for x in (model.get("architecture"), model.get("weights")) if x)
        lines = []
        if model.get("intended_use"):
            lines.append(f"<li>Intended use: {esc(model['intended_use'])}</li>")
        if model.get("training_data"):
            lines.append(f"<li>Trained on: {esc(model['training_data'])}</li>")
        figures = "".join(f"<li>{esc(entry['text'])}</li>" for entry in model.get("validation") or [])
        if figures:
            lines.append(f"<li>Validation (from the model card):<ul>{figures}</ul></li>")
        if model.get("validation_note"):
            lines.append(f"<li>{esc(_sentence_case(str(model['validation_note'])))}.</li>")
        parts.append(f"<p><b>{esc(titles.get(role, role))}</b> ({esc(name)})</p><ul>{''.join(lines)}</ul>")
    return f"""<div class="limits"><h2>What these numbers are worth</h2>
{"".join(parts)}</div>"""


def _sentence_case(text: str) -> str:
    """First letter upper case, the rest as written (``str.capitalize`` would lower "HU")."""
    return text[:1].upper() + text[1:]


def _coverage_text(report: dict[str, Any]) -> str:
    note = (report.get("coverage") or {}).get("note")
    return f' <span class="caveat">({html.escape(note)})</span>' if note else ""


def _not_assessable_body(report: dict[str, Any], result: StudyResult) -> str:
    """Banner with the reason, what the gate measured and where the mask lies; no call, no probability."""
    esc = html.escape
    check = report["lung_check"]
    rules = check["rules"]
    if check["largest_area_cm2"] is not None:
        largest = (
            "Largest lung cross-section",
            f"{_number(check['largest_area_cm2'], ' cm²')} (chest: ≥ {rules['min_lung_area_cm2']:g} cm²)",
        )
    else:
        largest = (
            "Largest lung share of the body area",
            f"{_number(100 * (check['largest_body_fraction'] or 0.0), ' %')} "
            f"(chest: ≥ {100 * rules['min_lung_body_fraction']:g} %)",
        )
    rows = [
        ("Lung mask volume", _number(check["lung_volume_cm3"], " cm³") + _coverage_text(report)),
        largest,
        ("Slices with any lung mask", f"{check['slices_with_lung']} of {check['n_slices']}"),
        ("Slices with lungs of chest size", f"{check['lung_slices']} of {check['n_slices']}"),
        ("Median of the lung mask", _number(check["median_hu"], " HU", digits=0)),
        ("Lung segmentation", esc(report["segmenter"])),
    ]
    table = "\n".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    figures = "".join(
        f'<figure><img src="data:image/png;base64,{png}" alt="slice {i}">'
        f"<figcaption>slice {i}, z = {report['slices'][i]['z_mm']:.1f} mm</figcaption></figure>"
        for i, png in _mask_figures(result)
    )
    # only the segmenter worked on this study: the classifier's card is in report.json
    return f"""<p class="not-assessable">NOT ASSESSABLE: {esc(str(report["not_assessable_reason"]))}.<br>
No COVID-19 call was made for this study: no slice was classified and no score was computed.
Check that the series is a chest CT with the lungs in view.</p>
<h2>Lung check</h2>
<table>{table}</table>
{_limits_box(report, ("segmenter",))}
<h2>Lung mask</h2>
<p><small>Green: what the segmenter took for lung, on the slices where its mask is largest.</small></p>
{figures}"""


def _layers_text(gradcam: Mapping[str, Any]) -> str:
    layers = [str(layer) for layer in gradcam.get("layers") or []]
    if not layers:
        return "Grad-CAM"
    if len(layers) == 1:
        return f"Grad-CAM of {layers[0]}"
    joined = ", ".join(layers[:-1]) + f" and {layers[-1]}"
    return f"fused Grad-CAM of {joined} ({gradcam.get('fusion')} of the {len(layers)} layer maps)"


def _hu_cell(value: object, hu: Mapping[str, Any]) -> str:
    """An HU percentage with the severity module's caveat and reference range beside it (when defined)."""
    text = _number(value, " %")
    extras = [str(hu[key]) for key in ("reference_range", "caveat") if hu.get(key)]
    if extras:
        text += f' <span class="caveat">({html.escape("; ".join(extras))})</span>'
    return text


def _assessed_body(report: dict[str, Any], result: StudyResult) -> str:
    """Key numbers, what they are worth, probability along z, top slices with heat maps, MIPs."""
    esc = html.escape
    threshold = float(report["config"]["classify"]["positive_threshold"])
    sev = report["severity"]
    case = report["case"]
    gradcam = report["gradcam"] or {}
    hu = report["hu_measures"]
    summary = report["summary"]
    cam_threshold = gradcam.get("activation_threshold", report["config"]["cam"]["activation_threshold"])
    rows = [
        ("Case probability of COVID-19 pneumonia", esc(probability_text(case["probability"]))),
        (f"Case call (probability ≥ {threshold:g})", "positive" if case["positive"] else "negative"),
        (
            f"Corona score (Gozes et al.: Σ Grad-CAM > {cam_threshold:g} on slices with p ≥ {threshold:g})",
            _number(sev["corona_score_cm3"], " cm³"),
        ),
        ("Corona score inside the lungs", _number(sev["corona_score_in_lung_cm3"], " cm³")),
        ("Lung volume", _number(sev["lung_volume_cm3"], " cm³") + _coverage_text(report)),
        ("Affected lung", _number(sev["affected_percent"], " %")),
        (f"Ground glass ({hu['ggo_label']})", _hu_cell(sev["ggo_percent"], hu)),
        (
            f"Consolidation ({hu['consolidation_label']})",
            _hu_cell(sev["consolidation_percent"], hu),
        ),
        (
            "Slices evaluated / positive",
            f"{summary['slices_evaluated']} / {sev['positive_slices']} of {summary['n_slices']}",
        ),
        (
            "Positive slices with an empty Grad-CAM map",
            str(gradcam.get("n_positive_slices_with_empty_map", 0)),
        ),
        ("Lung segmentation", esc(report["segmenter"])),
        ("Classifier weights", esc(str((report["models"]["classifier"] or {}).get("weights")))),
    ]
    for side in ("right", "left"):
        values = sev.get(side) or {}
        rows.append(
            (
                f"{side.capitalize()} lung: volume / affected",
                f"{_number(values.get('lung_volume_cm3'), ' cm³')} / {_number(values.get('affected_percent'), ' %')}",
            )
        )
    table = "\n".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    empty_note = f'<p class="caveat">{esc(gradcam["note"])}.</p>' if gradcam.get("note") else ""
    slices_html = "".join(
        f'<figure><img src="data:image/png;base64,{png}" alt="slice {i}">'
        f"<figcaption>slice {i}, z = {report['slices'][i]['z_mm']:.1f} mm, p = {esc(probability_text(p))}"
        + (", Grad-CAM map empty: evidence not localised" if empty else "")
        + "</figcaption></figure>"
        for i, p, empty, png in _slice_figures(result)
    )
    return f"""<h2>Key numbers</h2>
<table>{table}</table>
{empty_note}
{_limits_box(report, ("classifier", "segmenter"))}
<h2>Slice probability along z</h2>
<img src="data:image/png;base64,{_probability_plot(report, threshold)}" alt="probability along z">
<h2>Slices with the highest probability</h2>
<p><small>Green: lung contour. Colour: {esc(_layers_text(gradcam))}, 0–1 (scale beside each slice whose map
is not empty).</small></p>
{slices_html or "<p>No slice was evaluated (no lungs found).</p>"}
<h2>3D heat map</h2>
<img src="data:image/png;base64,{_mip_figure(result)}" alt="maximum-intensity projections">"""


def _page(report: dict[str, Any], body: str) -> str:
    """The page around a body: notices, warnings, provenance."""
    esc = html.escape
    warnings = "".join(f"<li>{esc(w)}</li>" for w in report["warnings"]) or "<li>none</li>"
    banner_class = "untrained" if report["untrained_weights"] else "notice"
    models = report["models"]["classifier"] or {}
    unet = report["models"]["segmenter"]
    segmenter = (
        f"U-Net {unet.get('weights')} sha256 {unet.get('sha256')}" if unet else "classical (no U-Net weights)"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>corona-ct report {esc(report["study_id"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 980px; color: #1a1a1a; }}
.notice, .untrained {{ padding: .6em 1em; border-radius: 4px; font-weight: 600; }}
.notice {{ background: #fff4d6; border: 1px solid #e0b84c; }}
.untrained {{ background: #ffd9d9; border: 2px solid #b22222; color: #7a0000; }}
.not-assessable {{ padding: .8em 1em; border-radius: 4px; font-weight: 600; background: #e8ecf4;
  border: 2px solid #34495e; color: #1c2833; }}
.limits {{ padding: .2em 1em .6em; border-radius: 4px; background: #f3f6fa; border: 1px solid #8aa1bd;
  font-size: .92em; }}
.limits h2 {{ font-size: 1.1em; }} .limits ul {{ margin: .2em 0; }}
.caveat {{ color: #7a4b00; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ text-align: left; padding: .25em .8em; border-bottom: 1px solid #ddd; }}
th {{ font-weight: 500; color: #444; }}
figure {{ display: inline-block; margin: .3em; }} figcaption {{ font-size: .8em; color: #444; }}
img {{ max-width: 100%; }} small {{ color: #666; }}
</style></head><body>
<p class="{banner_class}">{esc(report["first_line"])}</p>
<h1>COVID-19 CT analysis — study {esc(report["study_id"])}</h1>
<p class="notice">{esc(RESEARCH_NOTICE)}</p>
{body}
<h2>Warnings</h2>
<ul>{warnings}</ul>
<h2>Provenance</h2>
<p><small>corona-ct {esc(report["corona_ct_version"])}, config hash {esc(report["config_hash"])},
classifier {esc(str(models.get("architecture")))}, {esc(str(models.get("weights")))},
sha256 {esc(str(models.get("sha256") or "none (untrained)"))}; segmenter {esc(segmenter)};
input {esc(str(report["input"]["source"]))}, created {esc(report["created"])}.</small></p>
</body></html>
"""
