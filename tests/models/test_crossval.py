"""Cross-validation report: per-fold and summary tables, mean ± sd per backbone, plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from corona_ct.models.crossval import write_cv_report
from corona_ct.models.train_classifier import TrainConfig

CLASSES = ("normal", "covid")


def _row(backbone: str, fold: int, test_auc: float, matrix: list[list[int]]) -> dict[str, object]:
    per_class = {f"{m}_{c}": 0.5 for c in CLASSES for m in ("sensitivity", "specificity", "precision")}
    return {
        "backbone": backbone, "fold": fold, "n_train": 8, "n_test": 4, "train_accuracy": 1.0,
        "test_accuracy": 0.75, "test_auc": test_auc, "epochs_run": 3, "train_seconds": 1.5,
        "confusion_matrix": matrix, **per_class,
    }  # fmt: skip


def test_report_summarises_each_backbone_over_its_folds(tmp_path: Path) -> None:
    rows = [
        _row("resnet50", 1, 0.6, [[2, 0], [1, 1]]),
        _row("resnet50", 2, 0.8, [[1, 1], [0, 2]]),
        _row("vgg16", 1, math.nan, [[2, 0], [2, 0]]),  # undefined AUC: left out of the mean
        _row("vgg16", 2, 0.7, [[2, 0], [0, 2]]),
    ]
    roc = (np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.8, 1.0]))
    curves = {"resnet50": [roc, roc], "vgg16": [roc, roc]}
    write_cv_report(rows, curves, tmp_path, CLASSES, TrainConfig.gozes(input_size=64, epochs=3))
    with (tmp_path / "per_fold.csv").open() as stream:
        per_fold = list(csv.DictReader(stream))
    assert [(r["backbone"], r["fold"]) for r in per_fold] == [("resnet50", "1"), ("resnet50", "2"),
                                                               ("vgg16", "1"), ("vgg16", "2")]  # fmt: skip
    assert json.loads(per_fold[0]["confusion_matrix"]) == [[2, 0], [1, 1]]
    with (tmp_path / "summary.csv").open() as stream:
        summary = {r["backbone"]: r for r in csv.DictReader(stream)}
    assert float(summary["resnet50"]["test_auc_mean"]) == 0.7
    assert float(summary["resnet50"]["test_auc_sd"]) == np.std([0.6, 0.8], ddof=1)
    assert float(summary["vgg16"]["test_auc_mean"]) == 0.7 and float(summary["vgg16"]["test_auc_sd"]) == 0.0
    assert json.loads(summary["resnet50"]["confusion_matrix_sum"]) == [[3, 1], [1, 3]]
    assert float(summary["resnet50"]["train_seconds_total"]) == 3.0
    markdown = (tmp_path / "summary.md").read_text()
    assert "2 patient-grouped stratified folds" in markdown and "recipe gozes" in markdown
    assert "| vgg16 | 1 | 8 | 4 | 1.000 | 0.750 | – |" in markdown  # NaN shown as a dash
    assert (tmp_path / "roc.png").stat().st_size > 1000 and (tmp_path / "confusion.png").stat().st_size > 1000
