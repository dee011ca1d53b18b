"""The pictures of report.html, as base64 PNG: probability along z, top slices, lung mask, MIPs.

Figures are drawn on :class:`matplotlib.figure.Figure` objects (no pyplot), so rendering
a report neither needs nor changes a matplotlib backend.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from corona_ct.pipeline.datamodel import StudyResult

CT_DISPLAY_HU = (-1350.0, 150.0)  # lung window (W 1500, L −600) for pictures


def _png(fig: Figure) -> str:
    """The figure as base64 PNG text (90 dpi, tight box)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _display(volume_array: np.ndarray, units: str) -> np.ndarray:
    """CT values → [0, 1] grey for pictures (lung window for HU)."""
    if units == "HU":
        lo, hi = CT_DISPLAY_HU
        return np.clip((volume_array - lo) / (hi - lo), 0, 1)
    return np.clip(volume_array, 0, 1)


def probability_plot(report: dict[str, Any], threshold: float) -> str:
    """Slice probability against slice position z (mm), with the positive threshold dashed."""
    slices = [s for s in report["slices"] if s["evaluated"]]
    fig = Figure(figsize=(7, 2.6))
    ax = fig.subplots()
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
    rgba = colormaps["jet"](np.clip(heat, 0, 1))
    rgba[..., 3] = 0.65 * np.clip(heat, 0, 1) ** 0.75
    return rgba


def _colour_bar(fig: Figure, ax: Any, label: str) -> None:
    """The 0–1 colour scale of the heat-map overlay (jet), beside ``ax``."""
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), "jet"), ax=ax, fraction=0.046, pad=0.03)
    bar.set_label(label, fontsize=7)
    bar.ax.tick_params(labelsize=6)


def slice_figures(result: StudyResult, n: int = 4) -> list[tuple[int, float, bool, str]]:
    """Top-probability slices: CT with lung contour and heat map (with its colour bar when not empty).

    Returns (slice index, probability, map empty, PNG).
    """
    probs = np.where(result.scores.evaluated, result.scores.probs, -1.0)
    order = [int(i) for i in np.argsort(-probs)[:n] if probs[i] >= 0]
    grey = dict(zip(order, _display(result.volume.array[order], result.volume.units), strict=True))
    figures = []
    for index in order:
        heat = result.cams.maps[index]
        empty = not heat.any()
        fig = Figure(figsize=(3.9 if not empty else 3.4, 3.4))
        ax = fig.subplots()
        ax.imshow(grey[index], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        if not empty:
            ax.imshow(_heat_rgba(heat), interpolation="bilinear")
            _colour_bar(fig, ax, "Grad-CAM")
        if result.lung_mask.labels[index].any():
            ax.contour(result.lung_mask.labels[index] > 0, levels=[0.5], colors="#00ff7f", linewidths=0.8)
        ax.set_axis_off()
        figures.append((index, float(probs[index]), empty, _png(fig)))
    return figures


def mask_figures(result: StudyResult, n: int = 4) -> list[tuple[int, str]]:
    """The slices where the lung mask is largest (the middle slice when it is empty), contour in green."""
    labels = result.lung_mask.labels
    area = (labels > 0).sum(axis=(1, 2))
    order = [int(i) for i in np.argsort(-area, kind="stable")[:n] if area[i] > 0] or [labels.shape[0] // 2]
    grey = dict(zip(order, _display(result.volume.array[order], result.volume.units), strict=True))
    figures = []
    for index in sorted(order):
        fig = Figure(figsize=(3.4, 3.4))
        ax = fig.subplots()
        ax.imshow(grey[index], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        if labels[index].any():
            ax.contour(labels[index] > 0, levels=[0.5], colors="#00ff7f", linewidths=0.8)
        ax.set_axis_off()
        figures.append((index, _png(fig)))
    return figures


def mip_figure(result: StudyResult) -> str:
    """Axial and coronal maximum-intensity projections of the 3D heat map over the mean CT."""
    grey = _display(result.volume.array, result.volume.units)
    maps = result.cams.maps
    empty = not maps.any()
    sz, sy, sx = result.volume.geometry.spacing_mm
    fig = Figure(figsize=(7.5, 3.6))
    axes = fig.subplots(1, 2)
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
