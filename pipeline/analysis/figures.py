"""The PNG figures of the cohort analyses (matplotlib's object API: no pyplot state, no backend switch).

ROC curves, box plots per group, the k-means elbow curve, the PCA scatter and the key
slices of each cluster with their Grad-CAM maps. Every figure is written atomically at
150 dpi.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from corona_ct.pipeline.analysis.documents import fmt_p
from corona_ct.pipeline.analysis.slices import KeyImage, SliceTable
from corona_ct.pipeline.atomic import atomic_path
from corona_ct.pipeline.stats import GroupComparison, RocResult

DPI = 150
#: Grad-CAM values (0–1) below this are transparent in the key-slice overlay.
CAM_TRANSPARENT_BELOW = 0.05


def save_figure(figure: Figure, path: Path) -> None:
    """Write ``figure`` as a PNG at ``DPI``, atomically."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png")


def plot_roc(results: Mapping[str, RocResult], path: Path) -> None:
    """ROC curves of every score with their Youden points; a degenerate one without its interval."""
    figure = Figure(figsize=(5.0, 5.0))
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="chance")
    for name, r in results.items():
        interval = "degenerate, no CI" if r.degenerate else f"{r.ci_low:.3f}–{r.ci_high:.3f}"
        line = axes.step(
            r.fpr, r.tpr, where="post", linewidth=1.8, label=f"{name}: AUC {r.auc:.3f} ({interval})",
        )[0]  # fmt: skip
        axes.plot(1 - r.specificity, r.sensitivity, "o", color=line.get_color(), markersize=6)
    axes.set_xlabel("1 − specificity")
    axes.set_ylabel("sensitivity")
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    axes.set_aspect("equal")
    first = next(iter(results.values()))
    degenerate = "DEGENERATE " if any(r.degenerate for r in results.values()) else ""
    axes.set_title(
        f"{degenerate}ROC (n = {first.n_pos} positive, {first.n_neg} negative); dots: Youden point",
        fontsize=9,
    )
    axes.legend(loc="lower right", fontsize=8)
    save_figure(figure, path)


def plot_groups(
    comparisons: Mapping[str, GroupComparison],
    values: Mapping[str, npt.NDArray[np.float64]],
    members: Mapping[str, list[int]],
    path: Path,
    seed: int,
) -> None:
    """One box plot per score with every study as a jittered point (``seed``: the jitter's)."""
    figure = Figure(figsize=(3.6 * len(comparisons) + 0.6, 4.2))
    axes_row = figure.subplots(1, len(comparisons), squeeze=False)
    rng = np.random.default_rng(seed)
    for axes, (score, comparison) in zip(axes_row[0], comparisons.items()):
        data = [values[score][members[g]] for g in comparison.groups]
        axes.boxplot(data, widths=0.5, showfliers=False, medianprops={"color": "black"})
        axes.set_xticks(
            range(1, len(data) + 1), [f"{g}\n(n={len(d)})" for g, d in zip(comparison.groups, data)]
        )
        for position, group_values in enumerate(data, start=1):
            jitter = rng.uniform(-0.12, 0.12, size=group_values.size)  # spreads ties so every study shows
            axes.scatter(position + jitter, group_values, s=14, alpha=0.7, zorder=3)
        axes.set_ylabel(score)
        if comparison.kruskal is not None:
            title = f"Kruskal–Wallis p = {fmt_p(comparison.kruskal['p_value'])}"
        else:
            title = f"Wilcoxon rank-sum p = {fmt_p(comparison.pairwise[0]['p_value'])}"
        axes.set_title(title, fontsize=9)
    figure.tight_layout()
    save_figure(figure, path)


def plot_elbow(ks: Sequence[int], inertias: Sequence[float], knee: int, k: int, path: Path) -> None:
    """Inertia against k (log scale when positive), with the chord, the knee and the chosen k."""
    figure = Figure(figsize=(4.8, 3.6))
    axes = figure.subplots()
    axes.plot(ks, inertias, "o-", color="tab:blue")
    axes.plot([ks[0], ks[-1]], [inertias[0], inertias[-1]], ":", color="0.6", label="chord")
    axes.axvline(knee, color="tab:red", linestyle="--", linewidth=1, label=f"knee k = {knee}")
    if k != knee:
        axes.axvline(k, color="tab:green", linestyle="-.", linewidth=1, label=f"chosen k = {k}")
    if min(inertias) > 0:
        axes.set_yscale("log")  # the knee is found on log inertia: the chord is straight here
    axes.set_xlabel("number of clusters k")
    axes.set_ylabel("inertia (Σ squared distance, z-scored units)")
    axes.set_xticks(list(ks))
    axes.legend(fontsize=8)
    save_figure(figure, path)


def plot_pca(
    coords: npt.NDArray[np.float32],
    explained: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64],
    positive: npt.NDArray[np.bool_],
    threshold: float,
    path: Path,
) -> None:
    """The slices on their first two principal components, coloured by cluster and by slice label."""
    figure = Figure(figsize=(10.0, 4.4))
    by_cluster, by_label = figure.subplots(1, 2, sharex=True, sharey=True)
    cmap = colormaps["tab10"]
    for c in np.unique(labels):
        points = coords[labels == c]
        by_cluster.scatter(
            points[:, 0], points[:, 1], s=8, alpha=0.7, color=cmap(int(c) % 10), label=f"cluster {c + 1}"
        )
    for mask, name, colour in ((~positive, "negative", "tab:gray"), (positive, "positive", "tab:red")):
        if mask.any():
            by_label.scatter(
                coords[mask, 0], coords[mask, 1], s=8, alpha=0.6, color=colour, label=f"{name} slice"
            )
    by_cluster.set_title("k-means clusters", fontsize=10)
    by_label.set_title(f"slice label (probability ≥ {threshold:g} positive)", fontsize=10)
    for axes in (by_cluster, by_label):
        axes.set_xlabel(f"PC1 ({100 * explained[0]:.1f}% of variance)")
        axes.legend(fontsize=7, markerscale=2)
    by_cluster.set_ylabel(f"PC2 ({100 * explained[1]:.1f}% of variance)")
    figure.tight_layout()
    save_figure(figure, path)


def plot_key_slices(
    table: SliceTable,
    nearest: Sequence[npt.NDArray[np.int64]],
    distances: npt.NDArray[np.float32],
    images: Mapping[int, KeyImage],
    path: Path,
) -> None:
    """Key slices (one row per cluster) with their Grad-CAM maps.

    The title claims an overlay, and a colour bar is drawn, only when some map is not empty;
    an empty (all zero) map is named under its slice.
    """
    n_cols = max(1, max(len(idx) for idx in nearest))
    figure = Figure(figsize=(2.1 * n_cols + 0.5, 2.3 * len(nearest)))
    grid = figure.subplots(len(nearest), n_cols, squeeze=False)
    cams = [cam for _, cam in images.values() if cam is not None]
    overlaid = any(cam.any() for cam in cams)
    for c, idx in enumerate(nearest):
        for col in range(n_cols):
            axes = grid[c, col]
            axes.axis("off")
            if col >= len(idx):
                continue
            i = int(idx[col])
            thumbnail, cam = images.get(i, (None, None))
            if thumbnail is None:
                axes.text(0.5, 0.5, "no thumbnail", ha="center", va="center", fontsize=7)
            else:
                axes.imshow(thumbnail, cmap="gray", vmin=0, vmax=255)
                if cam is not None and cam.any():
                    # Transparent where the map is near zero, so the anatomy stays readable.
                    heat = np.ma.masked_less(cam.astype(np.float32) / 255.0, CAM_TRANSPARENT_BELOW)
                    axes.imshow(heat, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
            state = "" if cam is None or cam.any() else "\nGrad-CAM map empty"
            axes.set_title(
                f"C{c + 1} {table.study_id[i]}\nslice {table.slice_index[i]}, p={table.probability[i]:.2f}, "
                f"d={distances[i]:.1f}{state}",
                fontsize=6,
            )
    if overlaid:
        title = "Key slices nearest each cluster centre (Grad-CAM overlaid, transparent below 0.05)"
    elif cams:
        title = "Key slices nearest each cluster centre (no overlay: every Grad-CAM map is empty)"
    else:
        title = "Key slices nearest each cluster centre (no Grad-CAM maps in features.npz)"
    figure.suptitle(title, fontsize=9)
    figure.tight_layout(rect=(0.0, 0.0, 0.9 if overlaid else 1.0, 0.96))
    if overlaid:
        bar = figure.colorbar(
            ScalarMappable(Normalize(0.0, 1.0), "jet"), cax=figure.add_axes((0.92, 0.2, 0.015, 0.6))
        )
        bar.set_label("Grad-CAM (0–1)", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    save_figure(figure, path)
