"""report.json and report.html say what their numbers are worth (small phantom, untrained classifier).

The study is analysed once; each test then changes one thing in the result (probabilities, maps,
geometry) or in the models' cards and writes the reports again.
"""

from __future__ import annotations

import dataclasses
import html as html_module
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from corona_ct.data.phantom import make_phantom
from corona_ct.pipeline import report_figures
from corona_ct.pipeline.atomic import jsonable
from corona_ct.pipeline.config import PipelineConfig
from corona_ct.pipeline.datamodel import (
    CamStack,
    Geometry,
    SliceScores,
    StudyResult,
    empty_map_positive_slices,
)
from corona_ct.pipeline.model_limits import model_limits, training_data_summary, validation_figures
from corona_ct.pipeline.modelset import ModelSet, load_models
from corona_ct.pipeline.report import write_study_outputs
from corona_ct.pipeline.report_html import render_html
from corona_ct.pipeline.report_text import (
    NO_VALIDATION,
    RESEARCH_NOTICE,
    empty_map_sentence,
    hu_range_text,
    probability_text,
)
from corona_ct.pipeline.run import analyze_study
from corona_ct.pipeline.summary import summary_cells, summary_values

SMALL = {"roi.input_size": 64, "runtime.device": "cpu"}
WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "weights"

#: A card in the layout of the classifier that is about to replace the shipped one.
NEW_CARD: dict[str, Any] = {
    "architecture": "classifier/resnet50",
    "intended_use": "research only; not validated on a clinical population",
    "training_data": {
        "command": "corona-ct train-cls --data secret/path.csv",
        "positive": ["COVID-19 CT segmentation (MedSeg)", "COVID-SemiSeg"],
        "negative": "LIDC-IDRI (4 series)",
        "patients": {"covid": 9, "normal": 4},
    },
    "validation": {
        "lopo": {
            "patients": {
                "P1": {"slice_auc": {"auc": 0.91, "ci95": [0.85, 0.97]}, "case_probability": 0.94,
                       "corona_score_cm3": 120.5},
                "P2": {"slice_auc": {"auc": 0.55, "ci95": [0.40, 0.70]}, "case_probability": 0.31,
                       "corona_score_cm3": 3.2},
                "P3": {"slice_auc": {"auc": 0.78, "ci95": [0.70, 0.86]}, "case_probability": 0.0000004,
                       "corona_score_cm3": 0.0},
            },
            "pooled_slice_auc": {"auc": 0.812, "ci95": [0.781, 0.843], "n": 1450},
        },
        "clean_ct_final": {"auc": 0.7, "ci95": [0.6, 0.8], "n": 40, "sensitivity": 0.65, "specificity": 0.7},
        "localisation_fold_b": {"mean": {"mean_dice_cam_0.6": 0.21, "pointing_game": 0.43}, "n_slices": 300},
        "phantom_cohort": {"case_probability": {"auc": 0.9, "pearson_r": None}, "n_studies": 20},
        "ucsd_final": {"auc": 0.74, "auc_ci95": [0.65, 0.84], "n": 123},
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def config() -> PipelineConfig:
    return PipelineConfig().replace(SMALL)


@pytest.fixture(scope="module")
def models(config: PipelineConfig) -> ModelSet:
    return load_models(config, allow_untrained=True)


@pytest.fixture(scope="module")
def phantom():  # type: ignore[no-untyped-def]
    return make_phantom(seed=3, shape=(10, 96, 96), spacing_mm=(5.0, 3.2, 3.2), lesions="mixed")


@pytest.fixture(scope="module")
def result(phantom, models: ModelSet, config: PipelineConfig) -> StudyResult:  # type: ignore[no-untyped-def]
    analysed = analyze_study(phantom.to_volume("phantom"), models, config)
    assert analysed.assessable and analysed.scores.evaluated.sum() >= 4
    return analysed


def _write(
    tmp_path: Path, result: StudyResult, models: ModelSet, config: PipelineConfig
) -> tuple[dict[str, Any], str]:
    """Write both reports as the batch runner does; report.json parsed strictly (NaN is an error)."""
    values = summary_values("phantom", "synthetic", result, threshold=config.classify.positive_threshold)
    write_study_outputs(tmp_path, result, models, config, values)

    def no_constants(name: str) -> float:
        raise AssertionError(f"report.json holds {name}")

    report = json.loads((tmp_path / "report.json").read_text(), parse_constant=no_constants)
    return report, (tmp_path / "report.html").read_text()


@pytest.fixture(scope="module")
def written(  # type: ignore[no-untyped-def]
    tmp_path_factory: pytest.TempPathFactory, result, models: ModelSet, config: PipelineConfig
) -> tuple[dict[str, Any], str]:
    """(report.json, report.html) of the unchanged result, written once for the tests that only read them."""
    return _write(tmp_path_factory.mktemp("plain"), result, models, config)


#: A 1×1 PNG, base64: what :func:`pictures_not_encoded` puts in place of each rendered picture.
ONE_PIXEL_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


@pytest.fixture
def pictures_not_encoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The figures are drawn but not encoded as PNG (two thirds of a report's time), for tests of the
    page's text; ``written``, the figure tests and the self-contained-page test encode them for real."""
    monkeypatch.setattr(report_figures, "_png", lambda fig: ONE_PIXEL_PNG)


def _text(page: str) -> str:
    """The page's visible text on one line (tags dropped, entities decoded)."""
    return " ".join(html_module.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def _with_cards(models: ModelSet, classifier: dict[str, Any], segmenter: dict[str, Any] | None) -> ModelSet:
    """The run's networks with other cards, the classifier counted as trained."""
    cls = dataclasses.replace(models.classifier, card=classifier, trained=True)
    seg = None
    if segmenter is not None:
        seg = dataclasses.replace(models.classifier, card=segmenter, trained=True)
    return dataclasses.replace(models, classifier=cls, segmenter=seg)


def _shipped_card(name: str) -> dict[str, Any]:
    return json.loads((WEIGHTS / f"{name}.json").read_text())


def _modified(
    result: StudyResult,
    probs: Callable[[np.ndarray], np.ndarray] | None = None,
    maps: Callable[[np.ndarray], np.ndarray] | None = None,
    **changes: Any,
) -> StudyResult:
    """The result with new slice probabilities and/or Grad-CAM maps (functions of copies of the old)."""
    if probs is not None:
        new = probs(result.scores.probs.copy()).astype(np.float32)
        changes["scores"] = SliceScores(probs=new, evaluated=result.scores.evaluated.copy())
    if maps is not None:
        new_maps = maps(result.cams.maps.copy()).astype(np.float32)
        changes["cams"] = CamStack(maps=new_maps, layers=result.cams.layers, fusion=result.cams.fusion)
    return dataclasses.replace(result, **changes)


# --------------------------------------------------------------------------- numbers in report.json


def test_summary_holds_numbers_and_the_csv_keeps_its_text(written, result) -> None:
    report, _ = written
    summary = report["summary"]
    for key in ("n_slices", "slices_evaluated", "positive_slices", "empty_cam_positive_slices"):
        assert isinstance(summary[key], int) and not isinstance(summary[key], bool), key
    for key in ("case_probability", "corona_score_cm3", "lung_volume_cm3", "ggo_percent"):
        assert isinstance(summary[key], float), key
    assert summary["case_probability"] == pytest.approx(result.case_probability)
    # summary.csv (and a resumed row, rebuilt from report.json) keep the 6-significant-digit text
    cells = summary_cells(summary)
    assert cells["case_probability"] == f"{result.case_probability:.6g}"
    assert cells["n_slices"] == "10" and cells["error"] == ""
    assert summary_cells(cells) == cells  # an older report (text summary) resumes unchanged


@pytest.mark.usefixtures("pictures_not_encoded")
def test_nan_is_written_as_null_never_as_nan(tmp_path, result, models, config) -> None:
    values = summary_values("phantom", "synthetic", result)
    values["ggo_percent"] = math.nan
    write_study_outputs(tmp_path, result, models, config, values)
    text = (tmp_path / "report.json").read_text()
    assert "NaN" not in text
    assert json.loads(text)["summary"]["ggo_percent"] is None
    failed = summary_values("broken", "dicom:x", error="[ingest] unreadable")
    assert failed["case_probability"] is None and summary_cells(failed)["case_probability"] == ""


# --------------------------------------------------------------------------- model cards


@pytest.mark.usefixtures("pictures_not_encoded")
def test_the_shipped_cards_are_shown_next_to_the_key_numbers(tmp_path, result, models, config) -> None:
    classifier, segmenter = _shipped_card("classifier"), _shipped_card("segmenter")
    report, page = _write(tmp_path, result, _with_cards(models, classifier, segmenter), config)
    limits = report["model_limits"]["classifier"]
    assert limits["intended_use"] == classifier["intended_use"]
    assert "COVID-CT-MD" in limits["training_data"] and "build_defaults" not in limits["training_data"]
    assert "\n" not in limits["training_data"]
    sections = {entry["section"]: entry for entry in limits["validation"]}
    pooled = next(f for f in sections["lopo"]["figures"] if f["where"] == "pooled slice AUC")
    assert pooled["auc"] == pytest.approx(classifier["validation"]["lopo"]["pooled_slice_auc"]["auc"])
    assert limits["validation_note"] is None
    assert report["model_limits"]["segmenter"]["validation"]

    text = _text(page)
    box = text[text.index("What these numbers are worth") : text.index("Slice probability along z")]
    assert text.index("Key numbers") < text.index("What these numbers are worth") < text.index("Warnings")
    assert f"Intended use: {classifier['intended_use']}" in box
    assert f"pooled slice AUC: AUC {pooled['auc']:.3f}" in box
    assert "e-07" not in page and "e-05" not in page  # tiny numbers read "< 0.001" in HTML
    assert page.count(RESEARCH_NOTICE) == 1  # the first line, not repeated under the title


@pytest.mark.usefixtures("pictures_not_encoded")
def test_a_card_in_the_new_layout_is_summarised(tmp_path, result, models, config) -> None:
    entries = {entry["section"]: entry for entry in validation_figures(NEW_CARD)}
    assert list(entries) == ["lopo", "clean_ct_final", "localisation_fold_b", "phantom_cohort", "ucsd_final"]
    lopo = entries["lopo"]
    pooled = next(f for f in lopo["figures"] if f["where"] == "pooled slice AUC")
    assert pooled["auc"] == 0.812 and pooled["ci95"] == [0.781, 0.843] and pooled["n"] == 1450
    per_patient = next(f for f in lopo["figures"] if f["where"] == "per patient")
    assert per_patient["n_patients"] == 3
    assert per_patient["slice_auc_median"] == pytest.approx(0.78)
    assert per_patient["slice_auc_range"] == [0.55, 0.91]
    assert "3 patients, slice AUC median 0.780 (range 0.550–0.910)" in lopo["text"]
    assert "case probability median 0.310 (range < 0.001–0.940)" in lopo["text"]
    location = entries["localisation_fold_b"]["figures"][0]
    assert location["mean_dice_cam_0.6"] == 0.21 and location["pointing_game"] == 0.43
    assert entries["ucsd_final"]["figures"][0]["ci95"] == [0.65, 0.84]
    assert "sensitivity 0.650, specificity 0.700, n = 40" in entries["clean_ct_final"]["text"]

    summary = training_data_summary(NEW_CARD)
    assert summary == (
        "positive: COVID-19 CT segmentation (MedSeg), COVID-SemiSeg; negative: LIDC-IDRI (4 series); "
        "patients: covid: 9; normal: 4"
    )
    report, page = _write(tmp_path, result, _with_cards(models, NEW_CARD, None), config)
    assert report["model_limits"]["classifier"]["training_data"] == summary
    assert report["model_limits"]["segmenter"]["architecture"] == "classical"
    text = _text(page)
    assert (
        "leave-one-patient-out: pooled slice AUC: AUC 0.812 (95% CI 0.781–0.843), n = 1450; per patient: 3"
        in text
    )
    assert (
        "localisation (fold B): mean: mean Dice of the Grad-CAM > 0.6 mask 0.210, pointing game 0.430" in text
    )
    assert "secret/path.csv" not in page  # the training command is not data


@pytest.mark.parametrize(
    "card",
    [
        {},
        {"validation": None, "training_data": None},
        {"validation": {}, "best_validation": "n/a", "training_data": ["a", {"b": [1, 2]}]},
        {"validation": {"x": "text", "y": [1, 2], "z": {"auc": "high"}, "w": {"auc": math.nan}}},
        {"validation": {"deep": {"a": {"b": {"c": {"d": {"e": {"f": {"auc": 0.9}}}}}}}}},
        {"validation": {"flag": {"auc": True}}, "intended_use": ["research", "teaching"]},
    ],
)
@pytest.mark.usefixtures("pictures_not_encoded")
def test_cards_without_usable_figures_say_so_and_never_crash(
    tmp_path, result, models, config, card: dict[str, Any]
) -> None:
    report, page = _write(tmp_path, result, _with_cards(models, card, None), config)
    limits = report["model_limits"]["classifier"]
    assert limits["validation"] == [] and limits["validation_note"] == NO_VALIDATION
    assert "No validation figures recorded for these weights." in _text(page)


def test_untrained_weights_have_no_validation(written, models) -> None:
    limits = model_limits(models.classifier)
    assert limits["trained"] is False and limits["validation"] == []
    assert limits["validation_note"] == f"untrained random weights: {NO_VALIDATION}"
    _, page = written
    assert f"Untrained random weights: {NO_VALIDATION}." in _text(page)
    assert page.count(RESEARCH_NOTICE) == 1 and page.index("UNTRAINED WEIGHTS") < page.index(RESEARCH_NOTICE)


# --------------------------------------------------------------------------- Grad-CAM and probabilities


@pytest.fixture
def figure_axes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """(number of axes, first axes title) of every picture the HTML report renders, in order."""
    seen: list[tuple[int, str]] = []
    real = report_figures._png

    def record(fig: Any) -> str:
        seen.append((len(fig.axes), fig.axes[0].get_title()))
        return real(fig)

    monkeypatch.setattr(report_figures, "_png", record)
    return seen


def test_positive_slices_with_empty_maps_are_stated(tmp_path, result, models, config, figure_axes) -> None:
    evaluated = np.flatnonzero(result.scores.evaluated)
    empty = evaluated[:2]

    def all_positive(probs: np.ndarray) -> np.ndarray:
        probs[evaluated] = np.linspace(0.99, 0.9, evaluated.size)  # the first two rank highest
        return probs

    def blobs_except_two(maps: np.ndarray) -> np.ndarray:
        maps[:] = 0
        maps[evaluated, 40:56, 30:46] = 0.8
        maps[empty] = 0
        return maps

    changed = _modified(result, probs=all_positive, maps=blobs_except_two)
    report, page = _write(tmp_path, changed, models, config)
    assert [s["index"] for s in report["slices"] if s["cam_empty"]] == empty.tolist()
    assert all(s["cam_empty"] is None for s in report["slices"] if not s["evaluated"])
    assert report["gradcam"]["positive_slices_with_empty_map"] == empty.tolist()
    assert report["summary"]["empty_cam_positive_slices"] == 2
    sentence = "2 positive slices have an empty Grad-CAM map: their evidence is not localised"
    assert report["gradcam"]["note"] == sentence
    text = _text(page)
    assert f"{sentence}." in text
    for index in empty:
        assert f"slice {index}, " in text
    assert text.count("Grad-CAM map empty: evidence not localised") == 2
    # the four top slices: no colour bar beside an empty map, one beside a map with something in it
    slice_axes = [n for n, _ in figure_axes[:4]]
    assert slice_axes == [1, 1, 2, 2]
    assert figure_axes[-1][0] == 3  # MIPs: two views and their colour bar


@pytest.mark.usefixtures("pictures_not_encoded")
def test_no_empty_map_claim_when_every_map_has_evidence(tmp_path, result, models, config) -> None:
    def all_positive(probs: np.ndarray) -> np.ndarray:
        probs[result.scores.evaluated] = 0.95
        return probs

    def blobs(maps: np.ndarray) -> np.ndarray:
        maps[result.scores.evaluated, 40:56, 30:46] = 0.8
        return maps

    report, page = _write(tmp_path, _modified(result, probs=all_positive, maps=blobs), models, config)
    assert report["gradcam"]["n_positive_slices_with_empty_map"] == 0 and report["gradcam"]["note"] is None
    assert "have an empty Grad-CAM map" not in page and "has an empty Grad-CAM map" not in page
    assert "Grad-CAM map empty" not in page
    assert "Positive slices with an empty Grad-CAM map 0" in _text(page)


def test_an_all_empty_map_gets_no_colour_scale(tmp_path, result, models, config, figure_axes) -> None:
    _write(tmp_path, _modified(result, maps=np.zeros_like), models, config)
    assert len(figure_axes) == 6 and all(n == 1 for n, _ in figure_axes[:-1])  # slices: the CT only
    assert figure_axes[-1] == (2, "axial MIP (Grad-CAM map empty)")


@pytest.mark.usefixtures("pictures_not_encoded")
def test_probabilities_below_a_thousandth_are_not_shown_as_exponents(
    tmp_path, result, models, config
) -> None:
    def tiny(probs: np.ndarray) -> np.ndarray:
        probs[result.scores.evaluated] = 9.2e-07
        return probs

    changed = _modified(result, probs=tiny, case_probability=9.2e-07)
    report, page = _write(tmp_path, changed, models, config)
    assert report["case"]["probability"] == pytest.approx(9.2e-07)  # JSON keeps the number
    text = _text(page)
    assert "Case probability of COVID-19 pneumonia < 0.001" in text
    assert "p = < 0.001" in text
    assert "e-07" not in page and "0.000" not in text


# --------------------------------------------------------------------------- coverage, HU, config labels


@pytest.mark.usefixtures("pictures_not_encoded")
def test_a_slab_says_it_covers_only_part_of_the_chest(tmp_path, written, result, models, config) -> None:
    report, page = written
    note = "the series covers 50 mm, part of the chest: lung volume is that of the slab"
    coverage = report["coverage"]
    assert coverage["slab_mm"] == 50.0 and coverage["partial_chest"] is True and coverage["note"] == note
    assert note in report["warnings"]
    text = _text(page)
    assert re.search(r"Lung volume [\d.]+ cm³ \(" + re.escape(note) + r"\)", text)

    tall = result.volume.geometry
    whole = dataclasses.replace(
        result.volume,
        geometry=Geometry(tall.shape, (20.0, *tall.spacing_mm[1:]), tall.origin_lps, tall.axes_lps),
    )
    report, page = _write(tmp_path / "whole", dataclasses.replace(result, volume=whole), models, config)
    assert report["coverage"]["slab_mm"] == 200.0 and report["coverage"]["partial_chest"] is False
    assert report["coverage"]["note"] is None and "part of the chest" not in page

    unknown = dataclasses.replace(result.volume, spacing_known=False)
    report, _ = _write(tmp_path / "unknown", dataclasses.replace(result, volume=unknown), models, config)
    assert report["coverage"]["slab_mm"] is None and report["coverage"]["partial_chest"] is None
    assert "slice spacing unknown" in report["coverage"]["note"]


@pytest.mark.usefixtures("pictures_not_encoded")
def test_labels_come_from_the_config(tmp_path, result, models, config) -> None:
    changed_config = config.replace(
        {
            "severity.ggo_hu": [-700, -250],
            "severity.consolidation_hu": [-250, 100],
            "cam.activation_threshold": 0.45,
            "classify.positive_threshold": 0.4,
        }
    )
    layers = _modified(result, maps=lambda m: m)
    layers = dataclasses.replace(layers, cams=dataclasses.replace(layers.cams, layers=("layer3", "layer4")))
    report, page = _write(tmp_path, layers, models, changed_config)
    text = _text(page)
    assert "Ground glass (% of assessed lung, smoothed HU −700…−250 HU, vessels and rim excluded)" in text
    assert "Consolidation (% of assessed lung, broad dense tissue −250…+100 HU enclosed by lung)" in text
    assert "Grad-CAM > 0.45 on slices with p ≥ 0.4" in text and "Case call (probability ≥ 0.4)" in text
    assert "fused Grad-CAM of layer3 and layer4 (product of the 2 layer maps)" in text
    for default in ("−750", "−300…", "> 0.6", "≥ 0.5", "layer2"):
        assert default not in text, default
    hu = report["hu_measures"]
    assert hu["ggo_hu"] == [-700, -250] and hu["ggo_label"].startswith(
        "% of assessed lung, smoothed HU −700…−250 HU"
    )
    assert report["gradcam"]["layers"] == ["layer3", "layer4"]
    assert report["gradcam"]["activation_threshold"] == 0.45


@pytest.mark.usefixtures("pictures_not_encoded")
def test_the_severity_modules_hu_caveat_is_shown_beside_the_hu_numbers(
    tmp_path, result, models, config, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HU_MEASURE_CAVEAT", "HU_REFERENCE_RANGE"):  # absent: a named, empty place
        monkeypatch.delattr(f"corona_ct.pipeline.hu_maps.{name}", raising=False)
    report, page = _write(tmp_path, result, models, config)
    assert report["hu_measures"]["caveat"] is None and report["hu_measures"]["reference_range"] is None
    assert re.search(r"rim excluded\) [\d.]+ % Consolidation", _text(page))  # nothing beside the number
    caveat = "vessels and the lung rim are left out; noise-matched smoothing"
    monkeypatch.setattr("corona_ct.pipeline.hu_maps.HU_MEASURE_CAVEAT", caveat, raising=False)
    monkeypatch.setattr(
        "corona_ct.pipeline.hu_maps.HU_REFERENCE_RANGE", "healthy lungs: 0–2 %", raising=False
    )
    report, page = _write(tmp_path / "caveat", result, models, config)
    assert report["hu_measures"]["caveat"] == caveat
    text = _text(page)
    assert re.search(r"rim excluded\) [\d.]+ % \(healthy lungs: 0–2 %; " + re.escape(caveat) + r"\)", text)
    assert re.search(
        r"enclosed by lung\) [\d.]+ % \(healthy lungs: 0–2 %; " + re.escape(caveat) + r"\)", text
    )


@pytest.mark.usefixtures("pictures_not_encoded")
def test_a_not_assessable_report_shows_the_segmenters_limits_only(tmp_path, phantom, models, config) -> None:
    no_lungs = np.where(phantom.lung_labels > 0, 40, phantom.hu).astype(np.int16)
    volume = dataclasses.replace(phantom, hu=no_lungs).to_volume("nolung")
    rejected = analyze_study(volume, models, config)
    assert not rejected.assessable
    report, page = _write(tmp_path, rejected, models, config)
    assert report["gradcam"] is None and report["summary"]["case_probability"] is None
    assert report["model_limits"]["classifier"]["validation_note"].startswith("untrained")
    text = _text(page)
    assert "What these numbers are worth Lung segmentation (classical, threshold-based" in text
    assert "COVID-19 slice classifier" not in text and "probability" not in text.lower()
    assert "lung volume is that of the slab" in text  # the rejected mask's volume is of a 50 mm slab too


# --------------------------------------------------------------------------- wording and JSON values


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "—"), (math.nan, "—"), (0.0, "< 0.001"), (0.000999, "< 0.001"), (0.001, "0.001"), (0.5, "0.500")],
)
def test_probabilities_read_with_three_decimals_or_below_a_thousandth(value: float | None, text: str) -> None:
    assert probability_text(value) == text


def test_hu_ranges_and_the_empty_map_statement_read_as_sentences() -> None:
    assert hu_range_text(-750, -300) == "−750…−300 HU"
    assert hu_range_text(0, 50) == "0…+50 HU"
    assert empty_map_sentence(0) is None
    assert (
        empty_map_sentence(1) == "1 positive slice has an empty Grad-CAM map: its evidence is not localised"
    )


def test_jsonable_gives_plain_json_values() -> None:
    value = {
        1: np.float32(0.5),
        "array": np.array([1.0, np.nan]),
        "tuple": (np.int64(3), math.inf, -math.inf),
        "nested": [{"flag": np.bool_(True)}],
    }
    safe = jsonable(value)
    assert safe == {"1": 0.5, "array": [1.0, None], "tuple": [3, None, None], "nested": [{"flag": True}]}
    assert type(safe["tuple"][0]) is int and type(safe["nested"][0]["flag"]) is bool
    json.dumps(safe, allow_nan=False)  # strict JSON


def test_empty_maps_count_only_on_evaluated_slices_at_or_above_the_threshold(result) -> None:
    evaluated = np.flatnonzero(result.scores.evaluated)
    at, above, below = evaluated[:3]

    def probs(p: np.ndarray) -> np.ndarray:
        p[evaluated] = 0.1
        p[at], p[above] = 0.5, 0.9
        p[~result.scores.evaluated] = np.nan
        return p

    def maps(m: np.ndarray) -> np.ndarray:
        m[:] = 0.0
        m[evaluated[3:], 40:56, 30:46] = 0.8  # every other evaluated slice has evidence
        return m

    empty = empty_map_positive_slices(_modified(result, probs=probs, maps=maps), 0.5)
    assert empty.dtype == bool and np.flatnonzero(empty).tolist() == sorted([at, above])
    assert (
        not empty[below] and not empty[~result.scores.evaluated].any()
    )  # empty but not positive / unevaluated


def test_report_json_holds_numbers_as_numbers_throughout(written) -> None:
    report, _ = written
    text_keys = {
        "study_id",
        "config_hash",
        "models_key",
        "sha256",
        "created",
        "source",
        "file",
        "reason",
        "error",
    }

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                walk(child, f"{where}.{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{where}[{i}]")
        elif isinstance(node, str) and where.rsplit(".", 1)[-1] not in text_keys:
            assert not _number_text(node), f"{where} = {node!r}: a number written as text"

    walk(report, "report")
    assert isinstance(report["case"]["probability"], float)
    assert all(
        isinstance(v, float) for v in (report["severity"]["corona_score_cm3"], report["coverage"]["slab_mm"])
    )
    first = next(s for s in report["slices"] if s["evaluated"])
    assert isinstance(first["probability"], float) and isinstance(first["z_mm"], float)
    assert isinstance(report["lung_check"]["n_slices"], int)


# --------------------------------------------------------------------------- the HTML renderer


def test_the_page_is_rendered_from_report_json_alone_and_is_self_contained(
    tmp_path, result, models, config
) -> None:
    named = dataclasses.replace(result, volume=dataclasses.replace(result.volume, study_id='P<1>&"x"'))
    _, page = _write(tmp_path, named, models, config)
    # the renderer needs nothing beyond report.json and the pictures: the file read back renders the same page
    assert render_html(json.loads((tmp_path / "report.json").read_text()), named) == page
    assert "P<1>" not in page and "P&lt;1&gt;&amp;&quot;x&quot;" in page  # what the page shows is escaped
    assert "<script" not in page.lower() and "url(" not in page  # nothing runs, nothing is fetched
    assert not re.search(r'(src|href)="(?!data:)', page)
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) == 6 and all(src.startswith("data:image/png;base64,") for src in sources)


@pytest.mark.usefixtures("pictures_not_encoded")
def test_one_grad_cam_layer_is_named_without_a_fusion(tmp_path, result, models, config) -> None:
    one = dataclasses.replace(result, cams=dataclasses.replace(result.cams, layers=("layer4",)))
    _, page = _write(tmp_path, one, models, config)
    assert "Colour: Grad-CAM of layer4, 0–1" in _text(page) and "layer maps" not in page


def test_the_report_layer_never_imports_the_runner() -> None:
    """No import cycle report ↔ run: nothing the report modules import, at any depth, imports the runner."""
    import ast

    package = Path(__file__).resolve().parents[2] / "pipeline"

    def imports(module: str) -> set[str]:
        path = package.joinpath(*module.split(".")[2:])
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):  # function-level imports too
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            found.update(n for n in names if n.startswith("corona_ct.pipeline.") and _is_module(package, n))
        return found

    seen, todo = set(), ["corona_ct.pipeline.report"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(imports(module))
    runners = {f"corona_ct.pipeline.{name}" for name in ("run", "batch", "single_slice", "api", "cli")}
    assert not seen & runners, sorted(seen & runners)
    assert {"corona_ct.pipeline.report_html", "corona_ct.pipeline.model_limits"} <= seen


def _is_module(package: Path, name: str) -> bool:
    path = package.joinpath(*name.split(".")[2:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _number_text(text: str) -> bool:
    try:
        float(text.replace("−", "-"))
    except ValueError:
        return False
    return True
