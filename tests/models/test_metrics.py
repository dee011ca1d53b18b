"""models.metrics against scikit-learn on random predictions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from corona_ct.models.metrics import (
    accuracy,
    binary_report,
    confusion_matrix,
    per_class_metrics,
    roc_auc,
    roc_curve,
)


@pytest.mark.parametrize("seed", range(5))
def test_confusion_and_per_class_metrics_equal_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_classes = 2 + seed % 3
    y_true = rng.integers(0, n_classes, 200)
    y_pred = rng.integers(0, n_classes, 200)
    matrix = confusion_matrix(y_true, y_pred, n_classes)
    np.testing.assert_array_equal(matrix, skm.confusion_matrix(y_true, y_pred, labels=range(n_classes)))
    assert accuracy(y_true, y_pred) == pytest.approx(skm.accuracy_score(y_true, y_pred))
    values = per_class_metrics(matrix)
    labels = list(range(n_classes))
    np.testing.assert_allclose(
        values["sensitivity"], skm.recall_score(y_true, y_pred, labels=labels, average=None)
    )
    np.testing.assert_allclose(
        values["precision"], skm.precision_score(y_true, y_pred, labels=labels, average=None)
    )
    # Specificity of class k = recall of "not k" in the one-vs-rest problem.
    expected_specificity = [skm.recall_score(y_true != k, y_pred != k) for k in labels]
    np.testing.assert_allclose(values["specificity"], expected_specificity)


@pytest.mark.parametrize("seed", range(5))
def test_roc_curve_and_auc_equal_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, 300)
    # Rounded scores create many ties, the case where rank formulas usually go wrong.
    scores = np.round(rng.random(300) + 0.3 * y_true, 1 + seed % 2)
    fpr, tpr, thresholds = roc_curve(y_true, scores)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(y_true, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thresholds[1:], sk_thr[1:])
    assert roc_auc(y_true, scores) == pytest.approx(skm.roc_auc_score(y_true, scores), abs=1e-12)


def test_undefined_ratios_are_nan_and_single_class_auc_is_nan() -> None:
    values = per_class_metrics(confusion_matrix([0, 0, 1], [0, 0, 0]))
    assert np.isnan(values["precision"][1])  # class 1 never predicted
    assert values["sensitivity"][1] == 0.0
    assert np.isnan(roc_auc([1, 1, 1], [0.2, 0.5, 0.9]))


def test_binary_report_uses_threshold_and_names_classes() -> None:
    report = binary_report([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9], ("normal", "covid"), threshold=0.5)
    assert report["confusion_matrix"] == [[1, 1], [1, 1]]
    assert report["accuracy"] == 0.5
    assert report["auc"] == pytest.approx(0.75)
    assert report["sensitivity_covid"] == 0.5 and report["specificity_covid"] == 0.5
