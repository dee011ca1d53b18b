"""Classification metrics of a trained model (validated against scikit-learn in the tests).

Conventions follow scikit-learn: the confusion matrix has true classes in rows and
predicted classes in columns; per-class metrics are one-vs-rest. A ratio whose
denominator is zero (e.g. precision of a class never predicted) is NaN, not 0, so
that an undefined value is never averaged as if it were a measured failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from corona_ct.pipeline.errors import ConfigError
from corona_ct.pipeline.stats import roc_auc as stats_roc_auc
from corona_ct.pipeline.stats import roc_curve_points

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


def _labels(values: npt.ArrayLike, name: str) -> IntArray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ConfigError(f"{name} must be one label per sample (1-D), got shape {array.shape}")
    return array.astype(np.int64)


def confusion_matrix(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, num_classes: int = 2) -> IntArray:
    """(K, K) counts, row = true class, column = predicted class."""
    true, pred = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if true.shape != pred.shape:
        raise ConfigError(f"y_true ({true.size}) and y_pred ({pred.size}) differ in length")
    if true.size and (min(true.min(), pred.min()) < 0 or max(true.max(), pred.max()) >= num_classes):
        raise ConfigError(f"labels must lie in 0..{num_classes - 1}")
    flat = np.bincount(true * num_classes + pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def accuracy(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """Fraction of samples whose prediction equals the truth."""
    true, pred = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    return float(np.mean(true == pred)) if true.size else float("nan")


def _ratio(numerator: npt.NDArray[Any], denominator: npt.NDArray[Any]) -> FloatArray:
    num = numerator.astype(np.float64)
    den = denominator.astype(np.float64)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def per_class_metrics(matrix: npt.ArrayLike) -> dict[str, FloatArray]:
    """One-vs-rest sensitivity (recall), specificity and precision per class from a confusion matrix."""
    cm = np.asarray(matrix, dtype=np.int64)
    true_pos = np.diag(cm)
    false_neg = cm.sum(axis=1) - true_pos
    false_pos = cm.sum(axis=0) - true_pos
    true_neg = cm.sum() - true_pos - false_neg - false_pos
    return {
        "sensitivity": _ratio(true_pos, true_pos + false_neg),
        "specificity": _ratio(true_neg, true_neg + false_pos),
        "precision": _ratio(true_pos, true_pos + false_pos),
    }


def _binary_scores(y_true: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[IntArray, FloatArray]:
    true = _labels(y_true, "y_true")
    score = np.asarray(scores, dtype=np.float64)
    if score.shape != true.shape:
        raise ConfigError(f"scores ({score.size}) and y_true ({true.size}) differ in length")
    if np.setdiff1d(true, [0, 1]).size:
        raise ConfigError("ROC analysis needs binary labels 0/1")
    return true, score


def roc_curve(y_true: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
    """False- and true-positive rates at every distinct score threshold (descending), from (0, 0).

    ``pipeline.stats.roc_curve_points`` (same points as scikit-learn's
    ``roc_curve(..., drop_intermediate=False)``; the first threshold is ``inf``). With one
    class only the rates are undefined: a single (NaN, NaN, inf) point.
    """
    true, score = _binary_scores(y_true, scores)
    if not 0 < true.sum() < true.size:
        return np.array([np.nan]), np.array([np.nan]), np.array([np.inf])
    fpr, tpr, thresholds = roc_curve_points(true, score)
    return fpr, tpr, thresholds


def roc_auc(y_true: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve (``pipeline.stats.roc_auc``); NaN with one class only."""
    true, score = _binary_scores(y_true, scores)
    if not 0 < true.sum() < true.size:
        return float("nan")
    return stats_roc_auc(true, score)


def binary_report(
    y_true: npt.ArrayLike,
    prob_positive: npt.ArrayLike,
    class_names: Sequence[str] = ("negative", "positive"),
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Accuracy, AUC, confusion matrix and per-class metrics of a binary classifier.

    ``prob_positive`` is P(class 1); a sample is called positive when p ≥ ``threshold``.
    Per-class values are keyed ``"<metric>_<class name>"``.
    """
    true = _labels(y_true, "y_true")
    prob = np.asarray(prob_positive, dtype=np.float64)
    pred = (prob >= threshold).astype(np.int64)
    matrix = confusion_matrix(true, pred, 2)
    report: dict[str, Any] = {
        "n": int(true.size),
        "accuracy": accuracy(true, pred),
        "auc": roc_auc(true, prob),
        "confusion_matrix": matrix.tolist(),
    }
    for metric, values in per_class_metrics(matrix).items():
        for name, value in zip(class_names, values, strict=True):
            report[f"{metric}_{name}"] = float(value)
    return report
