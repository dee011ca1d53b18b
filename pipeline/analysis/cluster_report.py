"""Clustering of disease manifestations: k-means of a cohort's gradient-weighted slice features.

``cluster_report`` z-scores the slices' features × Grad-CAM weights on the device, fits
k-means for k = 1..k_max (the elbow curve; its knee is k unless k is given), projects the
slices on two principal components and picks the key slices nearest each centre;
``write_cluster_outputs`` writes clusters.csv, cluster.json, cluster.md, elbow.png, pca.png
and key_slices.png. See :mod:`pipeline.cluster` for the algorithms.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from corona_ct.pipeline import __version__
from corona_ct.pipeline.analysis.cohort import Cohort
from corona_ct.pipeline.analysis.degenerate import cluster_problems
from corona_ct.pipeline.analysis.documents import cluster_markdown
from corona_ct.pipeline.analysis.figures import plot_elbow, plot_key_slices, plot_pca
from corona_ct.pipeline.analysis.slices import KeyImage, SliceTable, load_key_images
from corona_ct.pipeline.atomic import atomic_path, write_json, write_text
from corona_ct.pipeline.cluster import (
    distances_to_centres,
    dominant_groups,
    elbow_fits,
    key_slices,
    kmeans,
    knee_point,
    pca_2d,
    zscore,
)


@dataclass(frozen=True)
class ClusterSettings:
    """How to cluster: ``k`` (None: the elbow knee), the elbow range and the k-means++ restarts."""

    k: int | None = None
    k_max: int = 10  # largest k of the elbow curve
    restarts: int = 5  # k-means++ restarts per k
    max_iter: int = 300  # Lloyd iterations per restart
    tol: float = 1e-4  # convergence tolerance (scikit-learn's criterion)
    seed: int = 0
    key_slices: int = 4  # key slices shown per cluster
    threshold: float = 0.5  # slice positivity threshold (probability)
    positive_only: bool = False  # whether the table holds only slices ≥ threshold


@dataclass(frozen=True)
class ClusterReport:
    """The clustering of a cohort's slices, what the figures need, and the cluster.json content."""

    labels: npt.NDArray[np.int64]  # cluster index (0-based) per table row
    distances: npt.NDArray[np.float32]  # distance of each row to its centre (z-scored units)
    coords: npt.NDArray[np.float32]  # (n, 2) principal-component coordinates
    nearest: list[npt.NDArray[np.int64]]  # per cluster: table rows of its key slices, nearest first
    key_images: dict[int, KeyImage]  # table row -> (thumbnail, Grad-CAM) of the key slices
    reasons: list[str]  # why the result is degenerate; [] when it is not
    payload: dict[str, Any]  # cluster.json


def cluster_report(
    cohort: Cohort,
    table: SliceTable,
    settings: ClusterSettings,
    device: torch.device,
    *,
    allow_degenerate: bool = False,
) -> ClusterReport:
    """Cluster the slices of ``table`` (from :func:`load_slices` on ``cohort``) on ``device``.

    Frees ``table.weighted``: only its z-scored copy on the device is kept while fitting.
    """
    n_slices = len(table.study_id)
    started = time.perf_counter()
    x = zscore(torch.from_numpy(table.weighted).to(device))
    del table.weighted  # the z-scored copy on the device is all that is needed from here
    options: dict[str, Any] = {
        "restarts": settings.restarts,
        "max_iter": settings.max_iter,
        "tol": settings.tol,
        "seed": settings.seed,
    }
    fits = elbow_fits(x, range(1, min(settings.k_max, n_slices) + 1), **options)
    ks = list(fits)
    inertias = [fits[k].inertia for k in ks]
    knee = knee_point(ks, inertias)
    k = knee if settings.k is None else settings.k
    result = fits[k] if k in fits else kmeans(x, k, **options)
    distances = distances_to_centres(x, result.centres, result.labels).cpu().numpy()
    coords, explained = pca_2d(x)
    nearest = key_slices(x, result.labels, result.centres, n=settings.key_slices)
    labels = result.labels.cpu().numpy()
    seconds = time.perf_counter() - started
    sources = [str(cohort.folder_of[s]) for s in table.study_id]
    by_study, by_source = dominant_groups(labels, table.study_id), dominant_groups(labels, sources)
    reasons = cluster_problems(table.study_id, sources, labels)
    images = load_key_images(cohort, table, [i for idx in nearest for i in idx])
    positive = table.probability >= settings.threshold
    clusters = []
    for c in range(k):
        in_cluster = labels == c
        clusters.append(
            {
                "cluster": c + 1,
                "n_slices": int(in_cluster.sum()),
                "n_studies": len({table.study_id[i] for i in np.flatnonzero(in_cluster)}),
                "fraction_positive_slices": float(positive[in_cluster].mean()) if in_cluster.any() else None,
                "dominant_study": _dominant_json(by_study.get(c), "study_id"),
                "dominant_source": _dominant_json(by_source.get(c), "source"),
                "mean_probability": float(table.probability[in_cluster].mean()) if in_cluster.any() else None,
                "key_slices": [
                    {
                        "study_id": table.study_id[i],
                        "slice_index": int(table.slice_index[i]),
                        "z_mm": float(table.z_mm[i]),
                        "probability": float(table.probability[i]),
                        "distance_to_centre": float(distances[i]),
                    }
                    for i in nearest[c]
                ],
            }
        )
    payload = {
        "analysis": "cluster",
        "corona_ct_version": __version__,
        "results": cohort.sources,
        "n_slices": n_slices,
        "n_studies": len(set(table.study_id)),
        "feature_dim": int(x.shape[1]),
        "positive_only": settings.positive_only,
        "include_not_assessable": cohort.include_not_assessable,
        "degenerate": bool(reasons),
        "degenerate_reasons": reasons,
        "allow_degenerate": allow_degenerate,
        "threshold": settings.threshold,
        "k": k,
        "k_choice": "elbow knee (auto)" if settings.k is None else "--k",
        "knee": knee,
        "elbow": {"k": ks, "inertia": inertias},
        "inertia": result.inertia,
        "n_iter": result.n_iter,
        "restarts": settings.restarts,
        "seed": settings.seed,
        "device": str(device),
        "seconds": seconds,
        "pca_explained_variance_ratio": explained,
        "clusters": clusters,
        "skipped_studies": [{"study_id": s, "reason": r} for s, r in table.skipped.items()],
        "key_slices_with_empty_cam": sum(
            1 for _, cam in images.values() if cam is not None and not cam.any()
        ),
    }
    return ClusterReport(labels, distances, coords, nearest, images, reasons, payload)


def _dominant_json(dominant: tuple[str, float] | None, key: str) -> dict[str, Any] | None:
    return None if dominant is None else {key: dominant[0], "share": dominant[1]}


def write_clusters_csv(
    path: Path,
    table: SliceTable,
    labels: npt.NDArray[np.int64],
    distances: npt.NDArray[np.float32],
    coords: npt.NDArray[np.float32],
) -> None:
    """clusters.csv: one row per slice with its 1-based cluster, distance to the centre and PC coordinates."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["study_id", "slice_index", "z_mm", "probability", "cluster", "distance_to_centre", "pc1", "pc2"]
        )
        writer.writerows(
            [sid, int(si), f"{z:.3f}", f"{p:.6f}", int(c) + 1, f"{d:.6f}", f"{x1:.6f}", f"{x2:.6f}"]
            for sid, si, z, p, c, d, x1, x2 in zip(
                table.study_id,
                table.slice_index,
                table.z_mm,
                table.probability,
                labels,
                distances,
                coords[:, 0],
                coords[:, 1],
            )
        )


def write_cluster_outputs(report: ClusterReport, table: SliceTable, output: Path) -> tuple[str, ...]:
    """Write clusters.csv, the three figures, cluster.json and cluster.md; returns the file names."""
    payload = report.payload
    output.mkdir(parents=True, exist_ok=True)
    write_clusters_csv(output / "clusters.csv", table, report.labels, report.distances, report.coords)
    elbow = payload["elbow"]
    plot_elbow(elbow["k"], elbow["inertia"], payload["knee"], payload["k"], output / "elbow.png")
    positive = table.probability >= payload["threshold"]
    plot_pca(
        report.coords,
        payload["pca_explained_variance_ratio"],
        report.labels,
        positive,
        payload["threshold"],
        output / "pca.png",
    )
    plot_key_slices(table, report.nearest, report.distances, report.key_images, output / "key_slices.png")
    write_json(output / "cluster.json", payload)
    write_text(output / "cluster.md", cluster_markdown(payload))
    return ("clusters.csv", "cluster.json", "cluster.md", "elbow.png", "pca.png", "key_slices.png")


def cluster_console_lines(report: ClusterReport) -> Sequence[str]:
    """The clustering in one line (slices, studies, device, time, k and cluster sizes), for the terminal."""
    payload = report.payload
    sizes = ", ".join(f"{c['cluster']}: {c['n_slices']}" for c in payload["clusters"])
    return [
        f"clustered {payload['n_slices']} slices of {payload['n_studies']} studies on {payload['device']} "
        f"in {payload['seconds']:.1f} s: k = {payload['k']} ({payload['k_choice']}; knee at {payload['knee']}); "
        f"slices per cluster {sizes}"
    ]
