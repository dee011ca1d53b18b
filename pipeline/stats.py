"""Cohort statistics: ROC with DeLong or bootstrap intervals, rank-sum and Kruskal–Wallis tests.

Conventions
- Scores: larger means "more likely diseased"; a study is called positive when
  ``score >= threshold``.
- AUC is the empirical (trapezoidal) area, equal to the Mann–Whitney probability
  P(score_pos > score_neg) + ½ P(tie).
- DeLong variance uses the fast midrank algorithm of Sun & Xu (2014, IEEE Signal
  Processing Letters 21:1389), O(N log N) per score; the interval is AUC ± z·SE clipped
  to [0, 1], as in pROC.
- The "Wilcoxon rank-sum" test reported here is ``scipy.stats.mannwhitneyu`` (two-sided):
  exact null distribution when one group has ≤ 8 values and there are no ties, otherwise
  the normal approximation with tie correction and continuity correction; this module adds
  the quartiles and effect sizes (rank-biserial r, z/√N) that a paper reports with it.
  Kruskal–Wallis is ``scipy.stats.kruskal``. DeLong and the vectorised bootstrap are here
  because scipy has neither.
- This is the project's one ROC/AUC implementation; ``models.metrics`` (training reports)
  calls it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy import special
from scipy import stats as sps

from corona_ct.pipeline.errors import ConfigError, InputError

FloatVector = npt.NDArray[np.float64]

#: Two-sided 95 % normal quantile.
Z_95 = 1.959963984540054
#: Fewest cases per class for an AUC worth an interval: DeLong's variance (sample covariance of
#: the placement values) is 0 with one case in a class, so 1 positive and 1 negative give
#: "AUC 1.000 (1.000–1.000)".
MIN_CASES_PER_CLASS = 2


@dataclass(frozen=True)
class RocResult:
    """Empirical ROC curve of one score and its summary.

    ``thresholds[0]`` is +inf (nobody called positive), so the curve starts at (0, 0);
    point i calls positive every case with ``score >= thresholds[i]``.
    """

    fpr: FloatVector
    tpr: FloatVector
    thresholds: FloatVector
    auc: float
    ci_low: float
    ci_high: float
    ci_method: str  # "delong" or "bootstrap"
    auc_se: float  # DeLong standard error, or the bootstrap standard deviation
    youden_threshold: float
    sensitivity: float  # at the Youden threshold
    specificity: float
    n_pos: int
    n_neg: int
    confidence: float = 0.95
    problems: tuple[str, ...] = ()  # why this ROC is degenerate (see ``roc_problems``); () when it is not

    @property
    def degenerate(self) -> bool:
        """True when the AUC says nothing and ``ci_low``/``ci_high``/``auc_se`` must not be reported."""
        return bool(self.problems)


def _as_binary(y_true: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise InputError(f"labels must be one-dimensional, got shape {y.shape}")
    if y.dtype == np.bool_:
        return y
    values = set(np.unique(y).tolist())
    if not values <= {0, 1}:
        raise InputError(f"labels must be 0/1 (or booleans), got values {sorted(values)[:6]}")
    return y.astype(bool)


def _as_scores(scores: npt.ArrayLike, n: int) -> FloatVector:
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (n,):
        raise InputError(f"scores have shape {s.shape}, labels have {n} entries")
    if not np.all(np.isfinite(s)):
        raise InputError("scores contain NaN or infinite values; drop those studies first")
    return s


def _require_both_classes(y: npt.NDArray[np.bool_]) -> tuple[int, int]:
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        only = "positive" if n_neg == 0 else "negative"
        raise InputError(
            f"ROC needs both classes; the labels have only {only} cases ({n_pos + n_neg} studies)"
        )
    return n_pos, n_neg


def roc_problems(y_true: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[str, ...]:
    """Why an ROC of these labels and scores is degenerate; () when it is not.

    - fewer than ``MIN_CASES_PER_CLASS`` cases in a class: the AUC takes a handful of values
      and its interval (DeLong or bootstrap) has zero width;
    - a constant score: AUC 0.5 by ties, whatever the labels.
    Labels with a single class are refused by every ROC function (``InputError``).
    """
    y = _as_binary(y_true)
    s = _as_scores(scores, y.size)
    n_pos, n_neg = _require_both_classes(y)
    problems = []
    if min(n_pos, n_neg) < MIN_CASES_PER_CLASS:
        problems.append(
            f"fewer than {MIN_CASES_PER_CLASS} cases in a class ({n_pos} positive, {n_neg} negative): "
            "the AUC has no confidence interval"
        )
    if float(np.ptp(s)) == 0.0:
        problems.append(f"the score is constant ({s[0]:.6g} for all {s.size} studies): AUC 0.5 by ties")
    return tuple(problems)


def midranks(values: npt.ArrayLike) -> FloatVector:
    """1-based ranks of ``values`` with ties given the mean of the ranks they span."""
    return np.asarray(sps.rankdata(np.asarray(values, dtype=np.float64), method="average"), np.float64)


def roc_curve_points(y_true: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[FloatVector, ...]:
    """(fpr, tpr, thresholds) at every distinct score, highest threshold first.

    Same points as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.
    """
    y = _as_binary(y_true)
    s = _as_scores(scores, y.size)
    n_pos, n_neg = _require_both_classes(y)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    # The last index of each run of equal scores is where the curve gets a point.
    run_ends = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tps = np.cumsum(y_sorted)[run_ends]
    fps = (run_ends + 1) - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thresholds = np.r_[np.inf, s_sorted[run_ends]]
    return fpr, tpr, thresholds


def roc_auc(y_true: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Empirical AUC = P(score_pos > score_neg) + ½ P(tie); both classes required."""
    return delong_auc_variance(y_true, scores)[0]


def _placement_values(y: npt.NDArray[np.bool_], s: FloatVector) -> tuple[FloatVector, FloatVector]:
    """DeLong placement values by midranks (Sun & Xu 2014).

    V10[i] = fraction of negatives below positive i (ties ½);
    V01[j] = fraction of positives above negative j (ties ½).
    """
    pos, neg = s[y], s[~y]
    m, n = pos.size, neg.size
    combined = midranks(np.r_[pos, neg])
    v10 = (combined[:m] - midranks(pos)) / n
    v01 = 1.0 - (combined[m:] - midranks(neg)) / m
    return v10, v01


def delong_covariance(
    y_true: npt.ArrayLike, score_matrix: npt.ArrayLike
) -> tuple[FloatVector, npt.NDArray[np.float64]]:
    """AUCs (k,) and their DeLong covariance matrix (k, k) for k scores on the same cases.

    ``score_matrix`` has shape (k, N) (or (N,) for one score).
    """
    y = _as_binary(y_true)
    scores = np.atleast_2d(np.asarray(score_matrix, dtype=np.float64))
    _require_both_classes(y)
    placements = [_placement_values(y, _as_scores(row, y.size)) for row in scores]
    v10 = np.stack([p[0] for p in placements])  # (k, m)
    v01 = np.stack([p[1] for p in placements])  # (k, n)
    aucs = v10.mean(axis=1)
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10, ddof=1)) if m > 1 else np.zeros((len(aucs), len(aucs)))
    s01 = np.atleast_2d(np.cov(v01, ddof=1)) if n > 1 else np.zeros((len(aucs), len(aucs)))
    return aucs, s10 / m + s01 / n


def delong_auc_variance(y_true: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[float, float]:
    """(AUC, DeLong variance of the AUC) of one score."""
    aucs, cov = delong_covariance(y_true, np.asarray(scores, dtype=np.float64)[None, :])
    return float(aucs[0]), float(cov[0, 0])


def delong_test(
    y_true: npt.ArrayLike, scores_a: npt.ArrayLike, scores_b: npt.ArrayLike
) -> tuple[float, float, float, float]:
    """Two-sided DeLong test of equal AUC for two scores on the same (paired) cases.

    Returns (z, p, auc_a, auc_b) with z = (AUC_a − AUC_b) / SE of the difference.
    """
    aucs, cov = delong_covariance(y_true, np.stack([np.asarray(scores_a), np.asarray(scores_b)]))
    diff = float(aucs[0] - aucs[1])
    var_diff = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    # Identical rankings give diff == 0 and var == 0 (up to rounding): no evidence of a difference.
    if var_diff <= 1e-15:
        z = 0.0 if abs(diff) < 1e-12 else math.copysign(math.inf, diff)
    else:
        z = diff / math.sqrt(var_diff)
    p = float(min(1.0, 2.0 * special.ndtr(-abs(z))))
    return z, p, float(aucs[0]), float(aucs[1])


def bootstrap_auc(
    y_true: npt.ArrayLike, scores: npt.ArrayLike, *, n_bootstrap: int = 2000, seed: int = 0
) -> FloatVector:
    """AUCs of ``n_bootstrap`` stratified resamples (positives and negatives resampled separately).

    Vectorised: the positives' values never change, only their multiplicities, so each
    positive's count of negatives below it is read off cumulative resample counts.
    """
    y = _as_binary(y_true)
    s = _as_scores(scores, y.size)
    m, n = _require_both_classes(y)
    if n_bootstrap < 1:
        raise ConfigError(f"--bootstrap must be a positive number of resamples, got {n_bootstrap}")
    rng = np.random.default_rng(seed)
    pos, neg = s[y], s[~y]
    neg_values, neg_group = np.unique(neg, return_inverse=True)
    n_unique = neg_values.size
    below = np.searchsorted(neg_values, pos, side="left")  # unique negatives strictly below
    upto = np.searchsorted(neg_values, pos, side="right")  # ... below or tied

    def multiplicities(n_items: int, n_groups: int, group_of: npt.NDArray[np.int64]) -> npt.NDArray:
        draws = rng.integers(0, n_items, size=(n_bootstrap, n_items))
        flat = group_of[draws] + n_groups * np.arange(n_bootstrap)[:, None]
        return np.bincount(flat.ravel(), minlength=n_bootstrap * n_groups).reshape(n_bootstrap, n_groups)

    pos_counts = multiplicities(m, m, np.arange(m))
    neg_counts = multiplicities(n, n_unique, neg_group)
    cumulative = np.zeros((n_bootstrap, n_unique + 1))
    np.cumsum(neg_counts, axis=1, out=cumulative[:, 1:])
    kernel = 0.5 * (cumulative[:, below] + cumulative[:, upto])  # (B, m): negatives below + ½ ties
    return (pos_counts * kernel).sum(axis=1) / (m * n)


def youden_point(fpr: FloatVector, tpr: FloatVector, thresholds: FloatVector) -> tuple[float, float, float]:
    """(threshold, sensitivity, specificity) maximising J = sensitivity + specificity − 1.

    Ties in J go to the highest threshold (the more specific operating point).
    """
    best = int(np.argmax(tpr - fpr))
    return float(thresholds[best]), float(tpr[best]), float(1.0 - fpr[best])


def roc_analysis(
    y_true: npt.ArrayLike,
    scores: npt.ArrayLike,
    *,
    ci: Literal["delong", "bootstrap"] = "delong",
    n_bootstrap: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> RocResult:
    """Empirical ROC, AUC with a confidence interval, and the Youden-optimal operating point.

    ``ci="delong"``: AUC ± z·SE (DeLong), clipped to [0, 1].
    ``ci="bootstrap"``: percentile interval of ``n_bootstrap`` stratified resamples (seeded).
    ``problems`` (:func:`roc_problems`) is non-empty when the result is degenerate: the
    interval is then computed as usual but meaningless, and reports must not show it.
    """
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence level must lie in (0, 1), got {confidence}")
    y = _as_binary(y_true)
    fpr, tpr, thresholds = roc_curve_points(y, scores)
    auc, variance = delong_auc_variance(y, scores)
    if ci == "delong":
        se = math.sqrt(max(variance, 0.0))
        z = float(special.ndtri(0.5 + confidence / 2.0))
        low, high = max(0.0, auc - z * se), min(1.0, auc + z * se)
    elif ci == "bootstrap":
        aucs = bootstrap_auc(y, scores, n_bootstrap=n_bootstrap, seed=seed)
        alpha = 1.0 - confidence
        low, high = (float(q) for q in np.quantile(aucs, [alpha / 2.0, 1.0 - alpha / 2.0]))
        se = float(np.std(aucs, ddof=1)) if aucs.size > 1 else 0.0
    else:
        raise ConfigError(f"unknown confidence interval method {ci!r}; use 'delong' or 'bootstrap'")
    threshold, sensitivity, specificity = youden_point(fpr, tpr, thresholds)
    return RocResult(
        fpr=fpr,
        tpr=tpr,
        thresholds=thresholds,
        auc=auc,
        ci_low=float(low),
        ci_high=float(high),
        ci_method=ci,
        auc_se=se,
        youden_threshold=threshold,
        sensitivity=sensitivity,
        specificity=specificity,
        n_pos=int(y.sum()),
        n_neg=int((~y).sum()),
        confidence=confidence,
        problems=roc_problems(y, scores),
    )


# ----------------------------------------------------------------------------- rank tests


def _tie_counts(values: FloatVector) -> npt.NDArray[np.int64]:
    return np.unique(values, return_counts=True)[1]


def rank_sum_test(
    a: npt.ArrayLike,
    b: npt.ArrayLike,
    *,
    method: Literal["auto", "exact", "asymptotic"] = "auto",
    continuity: bool = True,
) -> dict[str, Any]:
    """Two-sided Wilcoxon rank-sum (Mann–Whitney U) test of group a against group b.

    The p-value is ``scipy.stats.mannwhitneyu``'s; ``method="auto"`` is exact when one group
    has ≤ 8 values and there are no ties (the method used is returned). Returns a dict:
    n_a, n_b, median_a/b, q1_a/b, q3_a/b, u_statistic (U of a: pairs with a > b plus ½
    ties), z (tie-corrected normal score of U_a, no continuity correction), p_value,
    method, rank_biserial = (U_a − U_b)/(n_a·n_b) (= 2·AUC − 1, positive when a tends
    higher) and r = z/√N.
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.size == 0 or y.size == 0:
        raise InputError("the rank-sum test needs at least one value in each group")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise InputError("the rank-sum test got NaN or infinite values; drop those studies first")
    n_a, n_b = x.size, y.size
    n = n_a + n_b
    ties = _tie_counts(np.r_[x, y])
    has_ties = bool(np.any(ties > 1))
    if method == "auto":
        method = "asymptotic" if (n_a > 8 and n_b > 8) or has_ties else "exact"
    if method not in ("exact", "asymptotic"):
        raise ConfigError(f"unknown rank-sum method {method!r}; use 'auto', 'exact' or 'asymptotic'")
    if method == "exact" and has_ties:
        raise ConfigError("exact rank-sum p-values assume no ties; use method='asymptotic'")
    tie_term = float(np.sum(ties.astype(np.float64) ** 3 - ties))
    sigma = math.sqrt(n_a * n_b / 12.0 * ((n + 1) - tie_term / (n * (n - 1)))) if n > 1 else 0.0
    if sigma > 0:
        test = sps.mannwhitneyu(x, y, alternative="two-sided", method=method, use_continuity=continuity)
        u_a, p = float(test.statistic), float(test.pvalue)
    else:  # every value tied: U is its mean and there is no evidence either way
        u_a, p = n_a * n_b / 2.0, 1.0
    u_b = n_a * n_b - u_a
    z = (u_a - n_a * n_b / 2.0) / sigma if sigma > 0 else 0.0
    q_a = np.quantile(x, [0.25, 0.5, 0.75])
    q_b = np.quantile(y, [0.25, 0.5, 0.75])
    return {
        "n_a": n_a,
        "n_b": n_b,
        "median_a": float(q_a[1]),
        "q1_a": float(q_a[0]),
        "q3_a": float(q_a[2]),
        "median_b": float(q_b[1]),
        "q1_b": float(q_b[0]),
        "q3_b": float(q_b[2]),
        "u_statistic": u_a,
        "z": float(z),
        "p_value": p,
        "method": method,
        "rank_biserial": (u_a - u_b) / (n_a * n_b),
        "r": float(z / math.sqrt(n)),
    }


def holm_adjust(p_values: Sequence[float] | npt.ArrayLike) -> FloatVector:
    """Holm–Bonferroni step-down adjusted p-values, in the input order."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="mergesort")
    stepped = (m - np.arange(m)) * p[order]
    adjusted_sorted = np.minimum(1.0, np.maximum.accumulate(stepped))
    adjusted = np.empty_like(p)
    adjusted[order] = adjusted_sorted
    return adjusted


def kruskal_wallis(groups: Sequence[npt.ArrayLike]) -> tuple[float, float, int]:
    """(H, p, degrees of freedom) of the tie-corrected Kruskal–Wallis test (``scipy.stats.kruskal``)."""
    samples = [np.asarray(g, dtype=np.float64).ravel() for g in groups]
    if len(samples) < 2 or any(s.size == 0 for s in samples):
        raise InputError("Kruskal–Wallis needs at least two non-empty groups")
    dof = len(samples) - 1
    if float(np.ptp(np.concatenate(samples))) == 0.0:  # all values equal: no evidence either way
        return 0.0, 1.0, dof
    test = sps.kruskal(*samples)
    return float(test.statistic), float(test.pvalue), dof


@dataclass(frozen=True)
class GroupComparison:
    """Rank-based comparison of one score between groups.

    ``kruskal`` is None with two groups (the rank-sum test is then the whole answer).
    ``pairwise`` holds one ``rank_sum_test`` dict per pair (keys ``group_a``, ``group_b``
    added) with ``p_holm`` the Holm-adjusted p-value across all pairs.
    """

    groups: tuple[str, ...]
    summaries: dict[str, dict[str, float]]  # per group: n, median, q1, q3, min, max
    kruskal: dict[str, float] | None
    pairwise: tuple[dict[str, Any], ...]


def group_comparison(values_by_group: Mapping[str, npt.ArrayLike], *, min_size: int = 2) -> GroupComparison:
    """Kruskal–Wallis across all groups (≥ 3) plus pairwise rank-sum tests with Holm correction.

    Raises InputError when fewer than two groups are given or a group has fewer than
    ``min_size`` values (the caller decides whether to drop such groups first).
    """
    names = tuple(values_by_group)
    samples = {g: np.asarray(values_by_group[g], dtype=np.float64).ravel() for g in names}
    if len(names) < 2:
        raise InputError(
            f"a group comparison needs at least two groups, got {len(names)} ({', '.join(names) or 'none'})"
        )
    small = [f"{g!r} ({samples[g].size})" for g in names if samples[g].size < min_size]
    if small:
        raise InputError(
            f"each group needs at least {min_size} studies for a rank test; too small: {', '.join(small)}"
        )
    summaries = {}
    for g in names:
        q1, med, q3 = np.quantile(samples[g], [0.25, 0.5, 0.75])
        summaries[g] = {
            "n": int(samples[g].size),
            "median": float(med),
            "q1": float(q1),
            "q3": float(q3),
            "min": float(samples[g].min()),
            "max": float(samples[g].max()),
        }
    kruskal = None
    if len(names) >= 3:
        h, p, dof = kruskal_wallis([samples[g] for g in names])
        kruskal = {"h": h, "p_value": p, "dof": dof}
    pairs = list(combinations(names, 2))
    tests = [rank_sum_test(samples[a], samples[b]) for a, b in pairs]
    adjusted = holm_adjust([t["p_value"] for t in tests])
    pairwise = tuple(
        {"group_a": a, "group_b": b, **t, "p_holm": float(p_holm)}
        for (a, b), t, p_holm in zip(pairs, tests, adjusted)
    )
    return GroupComparison(groups=names, summaries=summaries, kruskal=kruskal, pairwise=pairwise)
