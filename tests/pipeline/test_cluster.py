"""pipeline.cluster against scikit-learn (KMeans, PCA, StandardScaler) and brute-force references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score
from sklearn.preprocessing import StandardScaler

from corona_ct.pipeline.cluster import (
    distances_to_centres,
    elbow,
    gradient_weighted_features,
    key_slices,
    kmeans,
    knee_point,
    pca_2d,
)
from corona_ct.pipeline.errors import ConfigError


def _blobs(
    k: int, *, n: int = 900, d: int = 16, std: float = 1.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    x, y = make_blobs(
        n_samples=n, n_features=d, centers=k, cluster_std=std, center_box=(-10, 10), random_state=seed
    )
    return x.astype(np.float32), y


@pytest.mark.parametrize("k", [3, 5])
def test_kmeans_matches_scikit_learn_on_blobs(k: int) -> None:
    x, truth = _blobs(k, std=2.0, seed=k)
    ours = kmeans(torch.from_numpy(x), k, restarts=3, seed=0)
    reference = KMeans(n_clusters=k, n_init=3, random_state=0).fit(x)
    assert ours.inertia <= reference.inertia_ * 1.01
    assert adjusted_rand_score(reference.labels_, ours.labels.numpy()) >= 0.95
    assert adjusted_rand_score(truth, ours.labels.numpy()) >= 0.95


def test_kmeans_labels_centres_and_inertia_are_consistent() -> None:
    x, _ = _blobs(4, n=500, d=8, std=3.0)
    result = kmeans(torch.from_numpy(x), 4, restarts=2, seed=1)
    centres = result.centres.numpy().astype(np.float64)
    d2 = ((x[:, None, :].astype(np.float64) - centres[None]) ** 2).sum(axis=2)
    np.testing.assert_array_equal(
        result.labels.numpy(), d2.argmin(axis=1)
    )  # every point at its nearest centre
    for c in range(4):  # Lloyd fixed point: each centre is the mean of its members
        np.testing.assert_allclose(centres[c], x[result.labels.numpy() == c].mean(axis=0), atol=1e-4)
    assert result.inertia == pytest.approx(d2.min(axis=1).sum(), rel=1e-5)
    assert 1 <= result.n_iter <= 300


def test_kmeans_is_seeded_and_chunking_does_not_change_the_result() -> None:
    x = torch.from_numpy(_blobs(6, n=700, d=10, std=3.0)[0])
    big = kmeans(x, 6, restarts=2, seed=3)
    small_chunks = kmeans(x, 6, restarts=2, seed=3, chunk_size=37)
    again = kmeans(x, 6, restarts=2, seed=3)
    assert torch.equal(big.labels, again.labels) and big.inertia == again.inertia
    assert torch.equal(big.labels, small_chunks.labels)
    assert small_chunks.inertia == pytest.approx(big.inertia, rel=1e-6)


def test_kmeans_with_fewer_distinct_points_than_k() -> None:
    x = torch.tensor([[0.0, 0.0], [5.0, 5.0], [9.0, 1.0]]).repeat(10, 1)
    result = kmeans(x, 5, restarts=2, seed=0)
    assert result.inertia == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(result.centres).all()


def test_kmeans_refuses_impossible_k() -> None:
    with pytest.raises(ConfigError, match="k = 4"):
        kmeans(torch.zeros(3, 2), 4)


@pytest.mark.parametrize("true_k", [3, 4, 5])
def test_elbow_finds_the_true_number_of_clean_blobs(true_k: int) -> None:
    x, _ = _blobs(true_k, n=450, d=8, std=0.5, seed=10 + true_k)
    ks, inertias, knee = elbow(torch.from_numpy(x), restarts=2, seed=0)
    assert ks == list(range(1, 11))
    # Non-increasing in k up to local optima of k-means in the flat tail.
    assert all(a >= b * 0.98 for a, b in itertools.pairwise(inertias))
    assert knee == true_k


def test_knee_point_on_a_hand_made_curve() -> None:
    # Steep drop to k = 3, then flat: the largest gap below the chord is at 3.
    assert knee_point(range(1, 8), [100, 50, 1.0, 0.9, 0.8, 0.75, 0.7]) == 3
    # Equal drops down to a floor at k = 6 (a linear chord would say 4 or 5).
    assert knee_point(range(1, 11), [600, 500, 400, 300, 200, 2.0, 1.9, 1.8, 1.7, 1.6]) == 6
    assert knee_point([1, 2], [5.0, 1.0]) == 1  # too short for a knee
    assert knee_point(range(1, 5), [3.0, 3.0, 3.0, 3.0]) == 1  # flat: one cluster


@pytest.mark.parametrize(("n", "d"), [(300, 40), (30, 200)])  # scatter-matrix path, then SVD path
def test_pca_matches_scikit_learn_up_to_sign(n: int, d: int) -> None:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(n, d)) * np.linspace(5, 0.5, d) + 3.0).astype(np.float32)
    reference = PCA(n_components=2).fit(x)
    expected = reference.transform(x)
    for chunk_size in (1000, 7):
        coords, ratio = pca_2d(torch.from_numpy(x), chunk_size=chunk_size)
        signs = np.sign(np.sum(coords * expected, axis=0))
        np.testing.assert_allclose(coords * signs, expected, atol=2e-3 * np.abs(expected).max())
        np.testing.assert_allclose(ratio, reference.explained_variance_ratio_, rtol=1e-4)


def test_gradient_weighted_features_equal_standard_scaler_and_guard_constant_channels() -> None:
    rng = np.random.default_rng(1)
    features = rng.gamma(2.0, size=(50, 12)).astype(np.float32)
    weights = rng.normal(size=(50, 12)).astype(np.float32)
    weights[:, 3] = 0.0  # a channel whose gradients vanish: zero variance after weighting
    z = gradient_weighted_features(features, weights).numpy()
    assert np.isfinite(z).all()
    np.testing.assert_array_equal(z[:, 3], 0.0)
    expected = StandardScaler().fit_transform((features * weights).astype(np.float64))
    np.testing.assert_allclose(z, expected, atol=1e-5)


def test_key_slices_are_the_nearest_members_of_each_cluster() -> None:
    x, _ = _blobs(3, n=120, d=5, std=2.0, seed=2)
    tensor = torch.from_numpy(x)
    result = kmeans(tensor, 3, restarts=1, seed=0)
    nearest = key_slices(tensor, result.labels, result.centres, n=4)
    labels = result.labels.numpy()
    distance = np.linalg.norm(x - result.centres.numpy()[labels], axis=1)
    np.testing.assert_allclose(
        distances_to_centres(tensor, result.centres, result.labels).numpy(), distance, rtol=1e-5
    )
    for c, idx in enumerate(nearest):
        members = np.flatnonzero(labels == c)
        assert len(idx) == 4 and set(idx) <= set(members)
        np.testing.assert_array_equal(idx, members[np.argsort(distance[members], kind="stable")[:4]])


@pytest.mark.gpu
def test_kmeans_on_cuda_matches_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    x = torch.from_numpy(_blobs(4, n=2000, d=64, std=2.0)[0])
    cpu = kmeans(x, 4, restarts=2, seed=0)
    gpu = kmeans(x.cuda(), 4, restarts=2, seed=0)
    assert gpu.inertia == pytest.approx(cpu.inertia, rel=1e-3)
    assert adjusted_rand_score(cpu.labels.numpy(), gpu.labels.cpu().numpy()) >= 0.99
