"""Clustering of disease manifestations from gradient-weighted slice features (torch, GPU or CPU).

Gozes et al. (2020) describe each slice by its pooled ResNet-50 layer4 activations
multiplied element-wise by the Grad-CAM channel weights, cluster those vectors with
k-means and look at the slices nearest each centre. Here:

- ``gradient_weighted_features``: features × weights, z-scored per dimension (population
  standard deviation; dimensions with zero variance become 0 instead of NaN).
- ``kmeans``: k-means++ seeding (greedy, 2 + ⌊ln k⌋ candidates per centre as in
  scikit-learn), Lloyd iterations until the squared centre shift falls below
  ``tol × mean per-dimension variance`` (scikit-learn's criterion) or assignments stop
  changing, best of ``restarts`` runs by inertia. Squared distances are computed as
  ‖x‖² − 2x·c + ‖c‖² in row chunks, so 100 000 × 2048 needs only the data plus
  ``chunk_size × k`` floats; the reported inertia and distances are recomputed exactly as
  ‖x − c‖² (no cancellation).
- ``elbow``: inertia for k = 1..10 and the knee = the point farthest below the chord
  joining the ends of the normalised log-inertia curve (Kneedle's difference curve on a
  log scale).
- ``pca_2d``: exact PCA (SVD of the centred data, or eigenvectors of the scatter matrix
  when samples outnumber features), signs fixed so each component's largest loading is
  positive.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from corona_ct.pipeline.errors import ConfigError, InputError

#: Rows per chunk in distance computations: 65 536 rows × k centres stays small on any device.
DEFAULT_CHUNK_SIZE = 65_536
#: A cluster drawing at least this share of its slices from one study (or one source) is that study.
COINCIDE_SHARE = 0.9


@dataclass(frozen=True)
class KMeansResult:
    """Best k-means run: centres (k, d), labels (n,) int64, inertia = Σ‖x − c_label‖², iterations."""

    centres: torch.Tensor
    labels: torch.Tensor
    inertia: float
    n_iter: int


def _as_tensor(x: npt.ArrayLike | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    tensor = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return tensor.to(device=device if device is not None else tensor.device, dtype=torch.float32)


def gradient_weighted_features(
    features: npt.ArrayLike | torch.Tensor,
    weights: npt.ArrayLike | torch.Tensor,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Element-wise features × Grad-CAM weights, z-scored per dimension → float32 (n, d) tensor."""
    f = _as_tensor(features, device)
    w = _as_tensor(weights, f.device)
    if f.ndim != 2 or f.shape != w.shape:
        raise InputError(
            f"features {tuple(f.shape)} and Grad-CAM weights {tuple(w.shape)} must both be (slices, channels)"
        )
    return zscore(f * w)


def zscore(x: torch.Tensor) -> torch.Tensor:
    """(x − mean) / std per column (population std); zero-variance columns map to 0."""
    mean = x.mean(dim=0, keepdim=True, dtype=torch.float64).to(x.dtype)
    centred = x - mean
    std = centred.pow(2).mean(dim=0, keepdim=True, dtype=torch.float64).sqrt().to(x.dtype)
    # A constant channel (e.g. a ReLU that never fires) carries no information; dividing by 1
    # keeps it at exactly 0 rather than NaN.
    scale = torch.where(std > 1e-12, std, torch.ones_like(std))
    return centred / scale


def _row_chunks(n: int, chunk_size: int) -> Iterable[slice]:
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


def squared_distances(
    x: torch.Tensor, centres: torch.Tensor, *, x_sq: torch.Tensor | None = None, chunk_size: int
) -> torch.Tensor:
    """Squared distances (n, m) of every row to every centre, via ‖x‖² − 2x·c + ‖c‖² in row chunks.

    Meant for few centres (m ≪ d): the result is n × m, the d-dimensional work stays in a matmul.
    """
    if x_sq is None:
        x_sq = x.pow(2).sum(dim=1)
    c_sq = centres.pow(2).sum(dim=1)
    out = torch.empty(x.shape[0], centres.shape[0], dtype=x.dtype, device=x.device)
    for rows in _row_chunks(x.shape[0], chunk_size):
        out[rows] = torch.addmm(c_sq[None, :], x[rows], centres.T, alpha=-2.0) + x_sq[rows, None]
    # Rounding can make a tiny true distance slightly negative.
    return out.clamp_min_(0.0)


def squared_distances_min(
    x: torch.Tensor, centres: torch.Tensor, *, x_sq: torch.Tensor | None = None, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(nearest centre index (n,), squared distance to it (n,))."""
    best, labels = squared_distances(x, centres, x_sq=x_sq, chunk_size=chunk_size).min(dim=1)
    return labels, best


def distances_to_centres(
    x: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """Exact Euclidean distance ‖x_i − c_{label_i}‖ of each row to its own centre (n,)."""
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for rows in _row_chunks(x.shape[0], chunk_size):
        out[rows] = (x[rows] - centres[labels[rows]]).norm(dim=1)
    return out


def _kmeans_plus_plus(
    x: torch.Tensor, x_sq: torch.Tensor, k: int, generator: torch.Generator, chunk_size: int
) -> torch.Tensor:
    """Greedy k-means++: each new centre is the best of several D²-sampled candidates."""
    n = x.shape[0]
    n_trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator, device=x.device).item())
    centres = [x[first]]
    _, closest = squared_distances_min(x, x[first : first + 1], x_sq=x_sq, chunk_size=chunk_size)
    for _ in range(1, k):
        potential = closest.sum()
        if potential <= 0:  # fewer distinct points than k: any point is as good as another
            candidates = torch.randint(n, (n_trials,), generator=generator, device=x.device)
        else:
            candidates = torch.multinomial(
                closest.double() / potential, n_trials, replacement=True, generator=generator
            )
        # (trials, n): the potential each candidate would leave behind.
        candidate_closest = torch.minimum(
            closest[None, :], squared_distances(x, x[candidates], x_sq=x_sq, chunk_size=chunk_size).T
        )
        best = int(candidate_closest.sum(dim=1).argmin().item())
        centres.append(x[int(candidates[best])])
        closest = candidate_closest[best]
    return torch.stack(centres)


def _lloyd(
    x: torch.Tensor,
    x_sq: torch.Tensor,
    centres: torch.Tensor,
    *,
    max_iter: int,
    shift_tol: float,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    k, n = centres.shape[0], x.shape[0]
    labels = torch.full((n,), -1, dtype=torch.int64, device=x.device)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 - n_iter is reported after the loop
        new_labels, d2 = squared_distances_min(x, centres, x_sq=x_sq, chunk_size=chunk_size)
        counts = torch.bincount(new_labels, minlength=k)
        # scatter_add_ rather than index_add_: the latter has a ~0.1 s fixed cost per call on CPU.
        sums = torch.zeros_like(centres).scatter_add_(0, new_labels[:, None].expand_as(x), x)
        new_centres = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():
            # An empty cluster takes over the points farthest from their centres (as scikit-learn does).
            far = torch.topk(d2, empty.numel()).indices
            new_centres[empty] = x[far]
        shift = (new_centres - centres).pow(2).sum()
        converged = bool(torch.equal(new_labels, labels)) or float(shift) <= shift_tol
        centres, labels = new_centres, new_labels
        if converged:
            break
    labels, _ = squared_distances_min(x, centres, x_sq=x_sq, chunk_size=chunk_size)
    return centres, labels, n_iter


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    restarts: int = 5,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> KMeansResult:
    """k-means on the rows of ``x`` (n, d) on x's device; best of ``restarts`` k-means++ runs."""
    if x.ndim != 2:
        raise InputError(f"k-means needs a (samples, features) matrix, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ConfigError(f"k = {k} clusters is impossible with {n} samples; choose 1 ≤ k ≤ {n}")
    if restarts < 1 or max_iter < 1 or chunk_size < 1:
        raise ConfigError("k-means restarts, max_iter and chunk_size must be positive")
    x = x.to(torch.float32)
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed)
    runs: list[KMeansResult] = []
    with torch.inference_mode():
        x_sq = x.pow(2).sum(dim=1)
        shift_tol = tol * float(x.var(dim=0, unbiased=False).mean())
        for _ in range(restarts):
            init = _kmeans_plus_plus(x, x_sq, k, generator, chunk_size)
            centres, labels, n_iter = _lloyd(
                x, x_sq, init, max_iter=max_iter, shift_tol=shift_tol, chunk_size=chunk_size
            )
            inertia = float(
                distances_to_centres(x, centres, labels, chunk_size=chunk_size).double().pow(2).sum()
            )
            runs.append(KMeansResult(centres=centres, labels=labels, inertia=inertia, n_iter=n_iter))
    return min(runs, key=lambda run: run.inertia)


def knee_point(ks: Sequence[int], inertias: Sequence[float]) -> int:
    """k at the elbow: the point farthest below the chord of the normalised log-inertia curve.

    The log makes the criterion depend on relative reductions: the drop of the inertia to the
    within-cluster noise floor stands out however large the earlier drops were, where the
    linear curve (plain Kneedle) prefers too small a k once the true k exceeds about 5.
    """
    k_arr = np.asarray(ks, dtype=np.float64)
    inertia = np.asarray(inertias, dtype=np.float64)
    if k_arr.size < 3 or not np.all(np.isfinite(inertia)) or inertia.max() <= 0:
        return int(k_arr[0])
    # A perfect fit has inertia 0; a floor far below any real inertia keeps the log finite.
    log_inertia = np.log(np.maximum(inertia, inertia.max() * 1e-12))
    span_k, span_i = k_arr[-1] - k_arr[0], log_inertia.max() - log_inertia.min()
    if span_i <= 0 or span_k <= 0:
        return int(k_arr[0])
    k_norm = (k_arr - k_arr[0]) / span_k
    i_norm = (log_inertia - log_inertia.min()) / span_i
    chord = i_norm[0] + (i_norm[-1] - i_norm[0]) * k_norm
    return int(k_arr[int(np.argmax(chord - i_norm))])


def elbow_fits(
    x: torch.Tensor,
    k_range: Iterable[int] = range(1, 11),
    *,
    restarts: int = 5,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[int, KMeansResult]:
    """One k-means fit per k (k larger than the number of rows is skipped)."""
    return {
        k: kmeans(x, k, restarts=restarts, max_iter=max_iter, tol=tol, seed=seed, chunk_size=chunk_size)
        for k in k_range
        if 1 <= k <= x.shape[0]
    }


def elbow(
    x: torch.Tensor,
    k_range: Iterable[int] = range(1, 11),
    *,
    restarts: int = 5,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[list[int], list[float], int]:
    """(ks, inertias, knee) of the elbow curve."""
    fits = elbow_fits(
        x, k_range, restarts=restarts, max_iter=max_iter, tol=tol, seed=seed, chunk_size=chunk_size
    )
    if not fits:
        raise InputError(f"no k in the elbow range fits {x.shape[0]} samples")
    ks = list(fits)
    inertias = [fits[k].inertia for k in ks]
    return ks, inertias, knee_point(ks, inertias)


def pca_2d(
    x: torch.Tensor | npt.ArrayLike, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    """Projection onto the first two principal components: (coords (n, 2), explained variance ratio (2,)).

    Exact in both regimes: with fewer samples than features, SVD of the centred data
    (cost n²·d); otherwise the eigenvectors of the d × d scatter matrix, accumulated in
    float64 over row chunks (cost n·d², 100 000 × 2048 in seconds, memory d²).
    """
    data = _as_tensor(x)
    if data.ndim != 2 or data.shape[0] < 2:
        raise InputError(
            f"PCA needs at least 2 samples in a (samples, features) matrix, got {tuple(data.shape)}"
        )
    n, d = data.shape
    n_comp = min(2, d)
    with torch.inference_mode():
        mean = data.mean(dim=0, keepdim=True, dtype=torch.float64).to(data.dtype)
        if n < d:
            centred = data - mean
            _, singular, vh = torch.linalg.svd(centred.double(), full_matrices=False)
            variances = singular.pow(2) / (n - 1)
            components = vh[:n_comp]
        else:
            scatter = torch.zeros(d, d, dtype=torch.float64, device=data.device)
            for rows in _row_chunks(n, chunk_size):
                block = data[rows] - mean
                scatter += (block.T @ block).double()
            eigenvalues, eigenvectors = torch.linalg.eigh(scatter)  # ascending
            variances = eigenvalues.flip(0).clamp_min(0.0) / (n - 1)
            components = eigenvectors.flip(1)[:, :n_comp].T
        total_variance = float(variances.sum())
        # Deterministic signs: the largest-magnitude loading of each component is positive.
        biggest = components.abs().argmax(dim=1)
        signs = torch.sign(components[torch.arange(n_comp, device=components.device), biggest])
        components = components * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]
        coords = torch.cat(
            [(data[rows] - mean) @ components.T.to(data.dtype) for rows in _row_chunks(n, chunk_size)]
        )
        ratio = (
            variances[:n_comp] / total_variance
            if total_variance > 0
            else torch.zeros_like(variances[:n_comp])
        )
    coords_np = coords.cpu().numpy().astype(np.float32)
    ratio_np = ratio.cpu().numpy().astype(np.float64)
    if n_comp < 2:  # a single feature: the second axis is empty
        coords_np = np.pad(coords_np, ((0, 0), (0, 2 - n_comp)))
        ratio_np = np.pad(ratio_np, (0, 2 - n_comp))
    return coords_np, ratio_np


def key_slices(
    x: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, n: int = 4
) -> list[npt.NDArray[np.int64]]:
    """For each cluster, the row indices of its ``n`` members nearest its centre (L2), nearest first."""
    distances = distances_to_centres(x, centres, labels).cpu().numpy()
    labels_np = labels.cpu().numpy()
    out: list[npt.NDArray[np.int64]] = []
    for cluster in range(centres.shape[0]):
        members = np.flatnonzero(labels_np == cluster)
        order = np.argsort(distances[members], kind="mergesort")[:n]
        out.append(members[order].astype(np.int64))
    return out


def dominant_groups(labels: npt.ArrayLike, groups: Sequence[str]) -> dict[int, tuple[str, float]]:
    """Per cluster label: its most common group (study, source) and that group's share of its slices."""
    labels_np = np.asarray(labels).ravel()
    if labels_np.shape[0] != len(groups):
        raise InputError(f"{labels_np.shape[0]} cluster labels for {len(groups)} group names")
    dominant: dict[int, tuple[str, float]] = {}
    for c in np.unique(labels_np):
        members = [groups[int(i)] for i in np.flatnonzero(labels_np == c)]
        names, counts = np.unique(members, return_counts=True)
        best = int(np.argmax(counts))
        dominant[int(c)] = (str(names[best]), float(counts[best]) / len(members))
    return dominant


def coinciding_groups(
    labels: npt.ArrayLike, groups: Sequence[str], share: float = COINCIDE_SHARE
) -> dict[int, tuple[str, float]] | None:
    """The clusters' dominant groups when the clusters coincide with the groups, else None.

    They coincide when there are at least two clusters, every cluster draws at least
    ``share`` of its slices from one group, and those groups are not all the same one: the
    clustering then separates studies (or data sources), not disease manifestations. A
    cohort whose slices mostly come from one group is not flagged for that alone.
    """
    dominant = dominant_groups(labels, groups)
    if len(dominant) < 2 or any(part < share for _, part in dominant.values()):
        return None
    if len({group for group, _ in dominant.values()}) < 2:
        return None
    return dominant
