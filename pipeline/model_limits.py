"""What a model's card says its numbers are worth: intended use, training data, validation figures.

report.json's ``model_limits`` (and the "What these numbers are worth" box of report.html)
is read from each model's card: :func:`validation_figures` picks the headline figures of any
card layout, :func:`training_data_summary` says in one line what the weights were trained on.
A card without usable figures gives ``NO_VALIDATION``, never an error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from corona_ct.models.checkpoint import LoadedModel
from corona_ct.pipeline.modelset import ModelSet
from corona_ct.pipeline.report_text import NO_VALIDATION, SMALLEST_SHOWN_PROBABILITY, probability_text

#: Headline figures shown per validation section of a model card, and sections per model.
MAX_FIGURES_PER_SECTION = 4
MAX_SECTIONS = 8

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


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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


def models_limits(models: ModelSet) -> dict[str, dict[str, Any]]:
    """``model_limits`` of the classifier and the lung segmenter of a run."""
    described = models.describe()
    origin = {k: (v or {}).get("weights") for k, v in described.items()}
    return {
        "classifier": model_limits(models.classifier, str(origin["classifier"])),
        "segmenter": model_limits(models.segmenter, str(origin["segmenter"]) if models.segmenter else None),
    }
