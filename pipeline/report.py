"""Per-study outputs: report.json, a self-contained report.html, NIfTI masks/maps, features.npz.

Every file is written atomically; report.json is written last and lists the
other files, so a study counts as complete (for ``--resume``) only when all
of them exist. Nothing here reads or writes patient identity.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import __version__
from pipeline.atomic import atomic_path, write_text
from pipeline.config import PipelineConfig

if TYPE_CHECKING:
    from pipeline.run import Models, StudyResult

RESEARCH_NOTICE = "Research use only. Not a medical device; not for diagnosis or treatment decisions."
OUTPUT_FILES = ("lung_mask.nii.gz", "heatmap.nii.gz", "features.npz", "report.html")
CT_DISPLAY_HU = (-1350.0, 150.0)  # lung window (W 1500, L −600) for pictures


def write_study_outputs(
    study_dir: Path,
    result: StudyResult,
    models: Models,
    config: PipelineConfig,
    summary: dict[str, object],
) -> dict[str, Any]:
    """Write all outputs of one study into ``study_dir``; returns the report dictionary."""
    from pipeline.ingest.nifti import write_nifti
    from pipeline.run import UNTRAINED_NOTICE, models_key

    study_dir.mkdir(parents=True, exist_ok=True)
    volume = result.volume
    write_nifti(study_dir / "lung_mask.nii.gz", result.lung_mask.labels, volume, dtype=np.uint8)
    write_nifti(study_dir / "heatmap.nii.gz", result.cams.maps, volume, dtype=np.float32)
    write_features(study_dir / "features.npz", result)

    report = build_report(result, models, config, summary)
    report["first_line"] = UNTRAINED_NOTICE if models.untrained else RESEARCH_NOTICE
    report["models_key"] = models_key(models)
    report["files"] = list(OUTPUT_FILES)
    write_text(study_dir / "report.html", render_html(report, result))
    write_text(study_dir / "report.json", json.dumps(report, indent=2, allow_nan=False))
    return report


def write_features(path: Path, result: StudyResult) -> None:
    """features.npz: per evaluated slice, pooled layer4 features and their Grad-CAM weights."""
    feats = result.features
    z_mm = result.volume.geometry.slice_positions_mm()[feats.slice_index]
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.savez_compressed(
            handle,
            study_id=np.array(result.volume.study_id),
            slice_index=feats.slice_index,
            z_mm=z_mm.astype(np.float64),
            probability=result.scores.probs[feats.slice_index].astype(np.float32),
            features=feats.features,
            weights=feats.weights,
            thumbnails=result.thumbnails,
            cams=result.cam_thumbnails,
        )


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def build_report(
    result: StudyResult,
    models: Models,
    config: PipelineConfig,
    summary: dict[str, object],
) -> dict[str, Any]:
    """The report.json content (JSON-safe: NaN becomes null)."""
    volume = result.volume
    geometry = volume.geometry
    threshold = config.classify.positive_threshold
    z_mm = geometry.slice_positions_mm()
    slices = [
        {
            "index": int(i),
            "z_mm": round(float(z_mm[i]), 3),
            "evaluated": bool(result.scores.evaluated[i]),
            "probability": _finite(float(result.scores.probs[i])),
            "positive": bool(result.scores.evaluated[i] and result.scores.probs[i] >= threshold),
        }
        for i in range(volume.n_slices)
    ]
    severity = {
        key: (_finite(value) if isinstance(value, float) else value)
        for key, value in dataclasses.asdict(result.severity).items()
    }
    return {
        "untrained_weights": models.untrained,
        "research_use_only": True,
        "corona_ct_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "study_id": volume.study_id,
        "summary": summary,
        "case": {
            "probability": _finite(result.case_probability),
            "positive": bool(result.case_probability >= threshold),
            "aggregation": config.classify.case_aggregation,
        },
        "severity": severity,
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
        "warnings": list(result.warnings),
        "slices": slices,
    }


# --------------------------------------------------------------------------- HTML


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _display(volume_array: np.ndarray, units: str) -> np.ndarray:
    """CT values → [0, 1] grey for pictures (lung window for HU)."""
    if units == "HU":
        lo, hi = CT_DISPLAY_HU
        return np.clip((volume_array - lo) / (hi - lo), 0, 1)
    return np.clip(volume_array, 0, 1)


def _probability_plot(report: dict[str, Any], threshold: float) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def _slice_figures(result: StudyResult, n: int = 4) -> list[tuple[int, float, str]]:
    """Top-probability slices: CT with lung contour and heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = np.where(result.scores.evaluated, result.scores.probs, -1.0)
    order = [int(i) for i in np.argsort(-probs)[:n] if probs[i] >= 0]
    grey = _display(result.volume.array, result.volume.units)
    figures = []
    for index in order:
        fig, ax = plt.subplots(figsize=(3.4, 3.4))
        ax.imshow(grey[index], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        heat = result.cams.maps[index]
        ax.imshow(_heat_rgba(heat), interpolation="bilinear")
        if result.lung_mask.labels[index].any():
            ax.contour(result.lung_mask.labels[index] > 0, levels=[0.5], colors="#00ff7f", linewidths=0.8)
        ax.set_axis_off()
        figures.append((index, float(probs[index]), _png(fig)))
    return figures


def _mip_figure(result: StudyResult) -> str:
    """Axial and coronal maximum-intensity projections of the 3D heat map over the mean CT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grey = _display(result.volume.array, result.volume.units)
    maps = result.cams.maps
    sz, sy, sx = result.volume.geometry.spacing_mm
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.6))
    views = (
        ("axial MIP", grey.mean(axis=0), maps.max(axis=0), sy / sx),
        ("coronal MIP", grey.mean(axis=1)[::-1], maps.max(axis=1)[::-1], sz / sx),
    )
    for ax, (title, base, heat, aspect) in zip(axes, views):
        ax.imshow(base, cmap="gray", aspect=aspect, interpolation="nearest")
        ax.imshow(_heat_rgba(heat), aspect=aspect, interpolation="bilinear")
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
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
    esc = html.escape
    threshold = float(report["config"]["classify"]["positive_threshold"])
    sev = report["severity"]
    case = report["case"]
    rows = [
        ("Case probability of COVID-19 pneumonia", _number(case["probability"], digits=3)),
        ("Case call (probability ≥ threshold)", "positive" if case["positive"] else "negative"),
        ("Corona score (Gozes et al.)", _number(sev["corona_score_cm3"], " cm³")),
        ("Corona score inside the lungs", _number(sev["corona_score_in_lung_cm3"], " cm³")),
        ("Lung volume", _number(sev["lung_volume_cm3"], " cm³")),
        ("Affected lung", _number(sev["affected_percent"], " %")),
        ("Lung voxels −750…−300 HU (ground glass)", _number(sev["ggo_percent"], " %")),
        ("Lung voxels −300…+50 HU (consolidation)", _number(sev["consolidation_percent"], " %")),
        (
            "Slices evaluated / positive",
            f"{report['summary']['slices_evaluated']} / {sev['positive_slices']} of {report['summary']['n_slices']}",
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
    slices_html = "".join(
        f'<figure><img src="data:image/png;base64,{png}" alt="slice {i}">'
        f"<figcaption>slice {i}, z = {report['slices'][i]['z_mm']:.1f} mm, p = {p:.3f}</figcaption></figure>"
        for i, p, png in _slice_figures(result)
    )
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
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ text-align: left; padding: .25em .8em; border-bottom: 1px solid #ddd; }}
th {{ font-weight: 500; color: #444; }}
figure {{ display: inline-block; margin: .3em; }} figcaption {{ font-size: .8em; color: #444; }}
img {{ max-width: 100%; }} small {{ color: #666; }}
</style></head><body>
<p class="{banner_class}">{esc(report["first_line"])}</p>
<h1>COVID-19 CT analysis — study {esc(report["study_id"])}</h1>
<p class="notice">{esc(RESEARCH_NOTICE)}</p>
<h2>Key numbers</h2>
<table>{table}</table>
<h2>Slice probability along z</h2>
<img src="data:image/png;base64,{_probability_plot(report, threshold)}" alt="probability along z">
<h2>Slices with the highest probability</h2>
<p><small>Green: lung contour. Colour: fused two-scale Grad-CAM (product of the two layer maps), 0–1.</small></p>
{slices_html or "<p>No slice was evaluated (no lungs found).</p>"}
<h2>3D heat map</h2>
<img src="data:image/png;base64,{_mip_figure(result)}" alt="maximum-intensity projections">
<h2>Warnings</h2>
<ul>{warnings}</ul>
<h2>Provenance</h2>
<p><small>corona-ct {esc(report["corona_ct_version"])}, config hash {esc(report["config_hash"])},
classifier {esc(str(models.get("architecture")))}, {esc(str(models.get("weights")))},
sha256 {esc(str(models.get("sha256") or "none (untrained)"))}; segmenter {esc(segmenter)};
input {esc(str(report["input"]["source"]))}, created {esc(report["created"])}.</small></p>
</body></html>
"""
