"""pipeline.stats against scikit-learn, scipy, brute-force references and a published example."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score, roc_curve

from corona_ct.pipeline.errors import InputError
from corona_ct.pipeline.stats import (
    bootstrap_auc,
    delong_auc_variance,
    delong_covariance,
    delong_test,
    group_comparison,
    holm_adjust,
    kruskal_wallis,
    midranks,
    rank_sum_test,
    roc_analysis,
    roc_curve_points,
)


def _labelled_scores(seed: int, n: int = 80, rounding: int | None = 1) -> tuple[np.ndarray, np.ndarray]:
    """Binormal scores (positives shifted by 1 SD); rounding creates ties across classes."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.4
    y[:2] = [True, False]  # both classes always present
    scores = rng.normal(size=n) + y
    return y, (np.round(scores, rounding) if rounding is not None else scores)


def _slow_delong(y: np.ndarray, score_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) straight from the definition: O(m·n) kernel ψ and placement values."""
    pos, neg = score_matrix[:, y], score_matrix[:, ~y]
    psi = (pos[:, :, None] > neg[:, None, :]) + 0.5 * (pos[:, :, None] == neg[:, None, :])  # (k, m, n)
    v10, v01 = psi.mean(axis=2), psi.mean(axis=1)
    m, n = pos.shape[1], neg.shape[1]
    s10 = np.array([[np.sum((a - a.mean()) * (b - b.mean())) / (m - 1) for b in v10] for a in v10])
    s01 = np.array([[np.sum((a - a.mean()) * (b - b.mean())) / (n - 1) for b in v01] for a in v01])
    return psi.mean(axis=(1, 2)), s10 / m + s01 / n


def test_midranks_equal_scipy_average_ranks() -> None:
    values = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0, 7.0])
    np.testing.assert_array_equal(midranks(values), sps.rankdata(values, method="average"))


@pytest.mark.parametrize("seed", range(4))
def test_roc_points_and_auc_equal_scikit_learn(seed: int) -> None:
    y, scores = _labelled_scores(seed)
    fpr, tpr, thresholds = roc_curve_points(y, scores)
    ref_fpr, ref_tpr, ref_thresholds = roc_curve(y, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(thresholds, ref_thresholds)
    assert roc_analysis(y, scores).auc == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


def test_youden_point_is_the_brute_force_maximum() -> None:
    y, scores = _labelled_scores(7, n=120)
    result = roc_analysis(y, scores)
    candidates = np.unique(scores)
    j = [np.mean(scores[y] >= t) + np.mean(scores[~y] < t) - 1 for t in candidates]
    best_j = max(j)
    ties = candidates[np.isclose(j, best_j)]
    assert result.youden_threshold == pytest.approx(ties.max())  # ties go to the highest threshold
    assert result.sensitivity == pytest.approx(np.mean(scores[y] >= result.youden_threshold))
    assert result.specificity == pytest.approx(np.mean(scores[~y] < result.youden_threshold))
    assert result.sensitivity + result.specificity - 1 == pytest.approx(best_j)


@pytest.mark.parametrize("seed", range(3))
def test_delong_variance_equals_slow_reference_exactly(seed: int) -> None:
    y, scores_a = _labelled_scores(seed, n=40)
    _, scores_b = _labelled_scores(seed + 100, n=40)
    matrix = np.stack([scores_a, scores_b, -scores_a + 0.3 * scores_b])
    aucs, cov = delong_covariance(y, matrix)
    ref_aucs, ref_cov = _slow_delong(y, matrix)
    np.testing.assert_allclose(aucs, ref_aucs, rtol=1e-13)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-10, atol=1e-15)
    auc, variance = delong_auc_variance(y, scores_a)
    assert (auc, variance) == pytest.approx((ref_aucs[0], ref_cov[0, 0]), rel=1e-12)


def test_delong_interval_matches_bootstrap_on_large_binormal_sample() -> None:
    rng = np.random.default_rng(2020)
    y = np.r_[np.ones(1000, bool), np.zeros(1000, bool)]
    scores = rng.normal(size=2000) + 1.2 * y  # binormal, true AUC = Φ(1.2/√2) ≈ 0.80
    delong = roc_analysis(y, scores, ci="delong")
    boot = roc_analysis(y, scores, ci="bootstrap", n_bootstrap=2000, seed=1)
    assert delong.auc == boot.auc
    assert abs(delong.ci_low - boot.ci_low) < 0.01
    assert abs(delong.ci_high - boot.ci_high) < 0.01
    assert delong.auc_se == pytest.approx(boot.auc_se, rel=0.1)


def test_hanley_mcneil_1982_published_auc() -> None:
    """Hanley & McNeil (Radiology 1982;143:29-36), Table 1: 109 CT images rated 1-5 by a radiologist.

    Published area (Wilcoxon) W = 0.8932. The paper's SE (0.0320) uses its own exponential
    approximation, not DeLong's estimator, so only the area is compared; no published DeLong
    variance for data we can reproduce exactly was found (see docs/analysis.md).
    """
    ratings = np.arange(1, 6)
    normal_counts, abnormal_counts = [33, 6, 6, 11, 2], [3, 2, 2, 11, 33]
    scores = np.r_[np.repeat(ratings, normal_counts), np.repeat(ratings, abnormal_counts)]
    y = np.r_[np.zeros(58, bool), np.ones(51, bool)]
    result = roc_analysis(y, scores)
    assert round(result.auc, 4) == 0.8932
    assert (result.n_pos, result.n_neg) == (51, 58)


def test_bootstrap_auc_equals_naive_resampling() -> None:
    y, scores = _labelled_scores(3, n=50)
    fast = bootstrap_auc(y, scores, n_bootstrap=25, seed=9)
    rng = np.random.default_rng(9)  # same draws, same order: positives first, then negatives
    pos, neg = scores[y], scores[~y]
    pos_draws = rng.integers(0, pos.size, size=(25, pos.size))
    neg_draws = rng.integers(0, neg.size, size=(25, neg.size))
    naive = [
        roc_auc_score(np.r_[np.ones(pos.size), np.zeros(neg.size)], np.r_[pos[p], neg[q]])
        for p, q in zip(pos_draws, neg_draws)
    ]
    np.testing.assert_allclose(fast, naive, rtol=1e-12)


def test_bootstrap_interval_is_seeded() -> None:
    y, scores = _labelled_scores(4)
    a = roc_analysis(y, scores, ci="bootstrap", n_bootstrap=300, seed=5)
    b = roc_analysis(y, scores, ci="bootstrap", n_bootstrap=300, seed=5)
    c = roc_analysis(y, scores, ci="bootstrap", n_bootstrap=300, seed=6)
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)


def test_delong_test_z_matches_slow_reference_and_identical_scores_give_p_one() -> None:
    y, scores_a = _labelled_scores(11, n=60, rounding=None)
    rng = np.random.default_rng(12)
    scores_b = scores_a + rng.normal(scale=1.5, size=scores_a.size)
    z, p, auc_a, auc_b = delong_test(y, scores_a, scores_b)
    aucs, cov = _slow_delong(y, np.stack([scores_a, scores_b]))
    z_ref = (aucs[0] - aucs[1]) / math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert (auc_a, auc_b) == pytest.approx(tuple(aucs), rel=1e-12)
    assert z == pytest.approx(z_ref, rel=1e-10)
    assert p == pytest.approx(2 * sps.norm.sf(abs(z_ref)), rel=1e-10)
    assert delong_test(y, scores_a, scores_a)[:2] == (0.0, 1.0)
    # A monotone transform keeps every ranking, hence the AUC and the test.
    assert delong_test(y, scores_a, np.exp(scores_a))[:2] == (0.0, 1.0)


def test_roc_refuses_a_single_class() -> None:
    with pytest.raises(InputError, match="both classes"):
        roc_analysis(np.ones(5, bool), np.arange(5.0))


@pytest.mark.parametrize(("n_a", "n_b"), [(3, 4), (5, 5), (2, 8), (8, 12)])
def test_rank_sum_default_equals_scipy_mannwhitneyu(n_a: int, n_b: int) -> None:
    rng = np.random.default_rng(n_a * 100 + n_b)
    a, b = rng.normal(size=n_a), rng.normal(loc=0.7, size=n_b)
    result = rank_sum_test(a, b)
    reference = sps.mannwhitneyu(a, b, alternative="two-sided")
    assert result["u_statistic"] == reference.statistic
    assert result["p_value"] == pytest.approx(reference.pvalue, rel=1e-12)
    assert result["method"] == ("exact" if min(n_a, n_b) <= 8 else "asymptotic")


def test_rank_sum_with_ties_equals_scipy_asymptotic() -> None:
    rng = np.random.default_rng(1)
    a, b = np.round(rng.normal(size=25)), np.round(rng.normal(loc=0.5, size=30))
    result = rank_sum_test(a, b)
    assert result["method"] == "asymptotic"
    assert result["p_value"] == pytest.approx(sps.mannwhitneyu(a, b).pvalue, rel=1e-12)


def test_rank_sum_without_continuity_equals_scipy_ranksums() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=20), rng.normal(loc=0.8, size=15)
    result = rank_sum_test(a, b, method="asymptotic", continuity=False)
    reference = sps.ranksums(a, b)
    assert result["z"] == pytest.approx(reference.statistic, rel=1e-12)
    assert result["p_value"] == pytest.approx(reference.pvalue, rel=1e-12)
    assert result["r"] == pytest.approx(reference.statistic / math.sqrt(35), rel=1e-12)
    assert result["rank_biserial"] == pytest.approx(
        2 * roc_auc_score(np.r_[np.ones(20), np.zeros(15)], np.r_[a, b]) - 1
    )


def test_kruskal_wallis_equals_scipy() -> None:
    rng = np.random.default_rng(3)
    groups = [np.round(rng.normal(loc=m, size=n), 1) for m, n in ((0, 12), (0.5, 9), (1.2, 15))]
    h, p, dof = kruskal_wallis(groups)
    reference = sps.kruskal(*groups)
    assert (h, p, dof) == (
        pytest.approx(reference.statistic, rel=1e-12),
        pytest.approx(reference.pvalue, rel=1e-12),
        2,
    )


def test_holm_matches_hand_computation() -> None:
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → running max 0.06
    np.testing.assert_allclose(holm_adjust([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm_adjust([0.5, 0.4]), [0.8, 0.8])  # capped by the running max, ≤ 1
    np.testing.assert_allclose(holm_adjust([0.6, 0.7, 0.9]), [1.0, 1.0, 1.0])


def test_group_comparison_structure_and_holm() -> None:
    rng = np.random.default_rng(4)
    values = {
        "mild": rng.normal(size=10),
        "moderate": rng.normal(1, size=11),
        "severe": rng.normal(2, size=9),
    }
    comparison = group_comparison(values)
    assert comparison.kruskal is not None
    assert comparison.kruskal["p_value"] == pytest.approx(sps.kruskal(*values.values()).pvalue, rel=1e-12)
    assert [(t["group_a"], t["group_b"]) for t in comparison.pairwise] == [
        ("mild", "moderate"),
        ("mild", "severe"),
        ("moderate", "severe"),
    ]
    raw = [t["p_value"] for t in comparison.pairwise]
    np.testing.assert_allclose([t["p_holm"] for t in comparison.pairwise], holm_adjust(raw))
    assert comparison.summaries["severe"]["median"] == pytest.approx(np.median(values["severe"]))
    two = group_comparison({"a": values["mild"], "b": values["severe"]})
    assert two.kruskal is None and len(two.pairwise) == 1
    assert two.pairwise[0]["p_holm"] == two.pairwise[0]["p_value"]


def test_group_comparison_refuses_a_single_study_group() -> None:
    with pytest.raises(InputError, match="'severe' \\(1\\)"):
        group_comparison({"mild": [1.0, 2.0, 3.0], "severe": [5.0]})


def test_rank_tests_with_every_value_tied_find_no_evidence() -> None:
    # scipy returns NaN here; a report needs "no difference", not NaN.
    result = rank_sum_test(np.ones(4), np.ones(6))
    assert (result["p_value"], result["z"], result["rank_biserial"]) == (1.0, 0.0, 0.0)
    assert kruskal_wallis([np.ones(3), np.ones(4), np.ones(2)]) == (0.0, 1.0, 2)
