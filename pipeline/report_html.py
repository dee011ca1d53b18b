"""report.html: a self-contained page (pictures inlined) rendered from the report.json dictionary.

Everything the page states comes from the report (:func:`pipeline.report.build_report`);
only the pictures (:mod:`pipeline.report_figures`) are drawn from the study result.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from corona_ct.pipeline.datamodel import StudyResult
from corona_ct.pipeline.report_figures import mask_figures, mip_figure, probability_plot, slice_figures
from corona_ct.pipeline.report_text import RESEARCH_NOTICE, probability_text


def render_html(report: dict[str, Any], result: StudyResult) -> str:
    """A self-contained HTML page (images inlined) readable by a clinician."""
    body = (
        _assessed_body(report, result) if report["case"] is not None else _not_assessable_body(report, result)
    )
    return _page(report, body)


def _amount(value: object, unit: str = "", digits: int = 1) -> str:
    """A number with its unit (``digits`` decimals), yes/no for booleans, "—" when absent; text escaped."""
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return f"{value:.{digits}f}{unit}"
    return html.escape(str(value))


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
            f"{_amount(check['largest_area_cm2'], ' cm²')} (chest: ≥ {rules['min_lung_area_cm2']:g} cm²)",
        )
    else:
        largest = (
            "Largest lung share of the body area",
            f"{_amount(100 * (check['largest_body_fraction'] or 0.0), ' %')} "
            f"(chest: ≥ {100 * rules['min_lung_body_fraction']:g} %)",
        )
    rows = [
        ("Lung mask volume", _amount(check["lung_volume_cm3"], " cm³") + _coverage_text(report)),
        largest,
        ("Slices with any lung mask", f"{check['slices_with_lung']} of {check['n_slices']}"),
        ("Slices with lungs of chest size", f"{check['lung_slices']} of {check['n_slices']}"),
        ("Median of the lung mask", _amount(check["median_hu"], " HU", digits=0)),
        ("Lung segmentation", esc(report["segmenter"])),
    ]
    table = "\n".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    figures = "".join(
        f'<figure><img src="data:image/png;base64,{png}" alt="slice {i}">'
        f"<figcaption>slice {i}, z = {report['slices'][i]['z_mm']:.1f} mm</figcaption></figure>"
        for i, png in mask_figures(result)
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
    text = _amount(value, " %")
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
            _amount(sev["corona_score_cm3"], " cm³"),
        ),
        ("Corona score inside the lungs", _amount(sev["corona_score_in_lung_cm3"], " cm³")),
        ("Lung volume", _amount(sev["lung_volume_cm3"], " cm³") + _coverage_text(report)),
        ("Affected lung", _amount(sev["affected_percent"], " %")),
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
                f"{_amount(values.get('lung_volume_cm3'), ' cm³')} / {_amount(values.get('affected_percent'), ' %')}",
            )
        )
    table = "\n".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    empty_note = f'<p class="caveat">{esc(gradcam["note"])}.</p>' if gradcam.get("note") else ""
    slices_html = "".join(
        f'<figure><img src="data:image/png;base64,{png}" alt="slice {i}">'
        f"<figcaption>slice {i}, z = {report['slices'][i]['z_mm']:.1f} mm, p = {esc(probability_text(p))}"
        + (", Grad-CAM map empty: evidence not localised" if empty else "")
        + "</figcaption></figure>"
        for i, p, empty, png in slice_figures(result)
    )
    return f"""<h2>Key numbers</h2>
<table>{table}</table>
{empty_note}
{_limits_box(report, ("classifier", "segmenter"))}
<h2>Slice probability along z</h2>
<img src="data:image/png;base64,{probability_plot(report, threshold)}" alt="probability along z">
<h2>Slices with the highest probability</h2>
<p><small>Green: lung contour. Colour: {esc(_layers_text(gradcam))}, 0–1 (scale beside each slice whose map
is not empty).</small></p>
{slices_html or "<p>No slice was evaluated (no lungs found).</p>"}
<h2>3D heat map</h2>
<img src="data:image/png;base64,{mip_figure(result)}" alt="maximum-intensity projections">"""


def _page(report: dict[str, Any], body: str) -> str:
    """The page around a body: notices, warnings, provenance."""
    esc = html.escape
    warnings = "".join(f"<li>{esc(w)}</li>" for w in report["warnings"]) or "<li>none</li>"
    banner_class = "untrained" if report["untrained_weights"] else "notice"
    # the research notice once: it is the first line, unless that line warns of random weights
    notice = f'<p class="notice">{esc(RESEARCH_NOTICE)}</p>' if report["untrained_weights"] else ""
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
{notice}
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
