"""Patient-grouped, stratified K-fold cross-validation of classifier backbones, with its report.

Each backbone is trained on the same folds (:func:`data.folds.stratified_group_kfold`,
seeded by ``config.seed``) and tested once per fold; :func:`write_cv_report` writes
``per_fold.csv``, ``summary.csv``, ``summary.md``, ``confusion.png`` and ``roc.png``.
A fold whose ``fold_result.json`` exists is reused by ``resume=True``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure

from corona_ct.data.datasets import SliceDataset
from corona_ct.data.folds import hold_out_groups, stratified_group_kfold
from corona_ct.models.metrics import binary_report, roc_curve
from corona_ct.models.train_classifier import TrainConfig, predict_probabilities, train_classifier
from corona_ct.pipeline.atomic import atomic_path, write_text
from corona_ct.pipeline.device import resolve_device
from corona_ct.pipeline.progress import progress_log

#: (fpr, tpr) arrays of one test fold's ROC curve.
Curve = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]


def cross_validate(
    dataset: SliceDataset,
    groups: Sequence[str] | npt.NDArray[np.str_],
    backbones: Sequence[str],
    config: TrainConfig,
    output_dir: str | Path,
    *,
    n_folds: int = 5,
    class_names: Sequence[str] = ("normal", "covid"),
    roi: str = "none",
    card_extra: Mapping[str, Any] | None = None,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Stratified, patient-grouped K-fold CV of each backbone; writes the comparison tables and plots.

    The folds are the same for every backbone (seeded by ``config.seed``). Each fold
    trains on the other folds (holding out ``config.val_fraction`` of their groups
    for early stopping when > 0, else all epochs) and is tested once on its own fold.
    Returns one row per (backbone, fold).
    """
    output = Path(output_dir)
    labels = dataset.labels.numpy()
    group_names = np.asarray(groups).astype(str)
    folds = stratified_group_kfold(labels, group_names, n_folds, seed=config.seed)
    device = resolve_device(config.device)
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[Curve]] = {}
    for backbone in backbones:
        fold_config = dataclasses.replace(config, backbone=backbone)
        for fold, (train_idx, test_idx) in enumerate(folds, start=1):
            fold_dir = output / backbone / f"fold{fold}"
            done = fold_dir / "fold_result.json"
            if resume and done.is_file():
                result_row = json.loads(done.read_text(encoding="utf-8"))
                rows.append(result_row["row"])
                curves.setdefault(backbone, []).append(
                    (np.array(result_row["fpr"]), np.array(result_row["tpr"]))
                )
                continue
            fit_idx, val_idx = hold_out_groups(
                train_idx, labels, group_names, config.val_fraction, config.seed
            )
            test_set = dataset.subset(test_idx)
            result = train_classifier(
                dataset.subset(fit_idx),
                dataset.subset(val_idx) if val_idx.size else None,
                fold_config,
                fold_dir,
                class_names=class_names,
                roi=roi,
                card_extra=dict(card_extra or {}, cv_fold=fold, cv_folds=n_folds),
                resume=resume,
                monitor_set=test_set,
            )
            eval_batch = config.batch_size * 2  # as train_classifier evaluates
            train_probs = predict_probabilities(
                result.model, dataset.subset(fit_idx), eval_batch, device, config.amp
            )
            test_probs = predict_probabilities(result.model, test_set, eval_batch, device, config.amp)
            train_report = binary_report(labels[fit_idx], train_probs, class_names)
            test_report = binary_report(labels[test_idx], test_probs, class_names)
            row = {
                "backbone": backbone, "fold": fold, "n_train": int(fit_idx.size), "n_test": int(test_idx.size),
                "train_accuracy": train_report["accuracy"], "test_accuracy": test_report["accuracy"],
                "test_auc": test_report["auc"], "epochs_run": len(result.history),
                "train_seconds": round(result.seconds, 1),
                "confusion_matrix": test_report["confusion_matrix"],
                **{k: v for k, v in test_report.items() if k.split("_")[0] in ("sensitivity", "specificity", "precision")},
            }  # fmt: skip
            fpr, tpr, _ = roc_curve(labels[test_idx], test_probs)
            write_text(
                done, json.dumps({"row": row, "fpr": fpr.tolist(), "tpr": tpr.tolist()}, allow_nan=True)
            )
            rows.append(row)
            curves.setdefault(backbone, []).append((fpr, tpr))
            progress_log.info(
                "fold %d/%d %s: test AUC %.3f, test acc %.3f, %.1f s",
                fold, n_folds, backbone, test_report["auc"], test_report["accuracy"], result.seconds,
            )  # fmt: skip
            del result
        write_cv_report(rows, curves, output, class_names, config)
    return rows


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    if array.size == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def write_cv_report(
    rows: Sequence[Mapping[str, Any]],
    curves: Mapping[str, Sequence[Curve]],
    output_dir: Path,
    class_names: Sequence[str],
    config: TrainConfig,
) -> None:
    """per_fold.csv, summary.csv, summary.md, confusion.png and roc.png of a cross-validation."""
    metric_columns = [
        "train_accuracy", "test_accuracy", "test_auc",
        *[f"{m}_{c}" for c in class_names for m in ("sensitivity", "specificity", "precision")],
    ]  # fmt: skip
    per_fold = io.StringIO()
    fold_columns = [
        "backbone",
        "fold",
        "n_train",
        "n_test",
        *metric_columns,
        "epochs_run",
        "train_seconds",
        "confusion_matrix",
    ]
    writer = csv.DictWriter(per_fold, fieldnames=fold_columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "confusion_matrix": json.dumps(row["confusion_matrix"])})
    write_text(output_dir / "per_fold.csv", per_fold.getvalue())

    backbones = list(dict.fromkeys(str(row["backbone"]) for row in rows))
    summary_rows = []
    for backbone in backbones:
        mine = [row for row in rows if row["backbone"] == backbone]
        summary: dict[str, Any] = {"backbone": backbone, "folds": len(mine)}
        for column in metric_columns:
            mean, sd = _mean_sd([float(row[column]) for row in mine])
            summary[f"{column}_mean"], summary[f"{column}_sd"] = mean, sd
        summary["train_seconds_total"] = round(sum(float(row["train_seconds"]) for row in mine), 1)
        summary["confusion_matrix_sum"] = np.sum([row["confusion_matrix"] for row in mine], axis=0).tolist()
        summary_rows.append(summary)
    summary_csv = io.StringIO()
    writer = csv.DictWriter(summary_csv, fieldnames=list(summary_rows[0]), lineterminator="\n")
    writer.writeheader()
    for summary in summary_rows:
        writer.writerow({**summary, "confusion_matrix_sum": json.dumps(summary["confusion_matrix_sum"])})
    write_text(output_dir / "summary.csv", summary_csv.getvalue())
    write_text(
        output_dir / "summary.md", cv_markdown(rows, summary_rows, metric_columns, class_names, config)
    )
    _plot_cv(summary_rows, curves, output_dir, class_names)


def cv_markdown(
    rows: Sequence[Mapping[str, Any]], summary_rows: Sequence[Mapping[str, Any]], metric_columns: Sequence[str],
    class_names: Sequence[str], config: TrainConfig,
) -> str:  # fmt: skip
    """Markdown tables: mean ± sd per backbone, then every fold."""

    def cell(value: float) -> str:
        return "–" if not math.isfinite(value) else f"{value:.3f}"

    header = ["backbone", *[c.replace("_", " ") for c in metric_columns], "train time (s)"]
    lines = [
        f"Cross-validation: {len(rows) // max(len(summary_rows), 1)} patient-grouped stratified folds, "
        f"input {config.input_size}², recipe {config.recipe}, {config.epochs} epochs max, seed {config.seed}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for summary in summary_rows:
        cells = [f"{cell(summary[f'{c}_mean'])} ± {cell(summary[f'{c}_sd'])}" for c in metric_columns]
        lines.append(
            f"| {summary['backbone']} | " + " | ".join(cells) + f" | {summary['train_seconds_total']} |"
        )
    lines += ["", "Per fold (test fold confusion matrix rows = true " + "/".join(class_names) + "):", ""]
    fold_header = ["backbone", "fold", "n train", "n test", "train acc", "test acc", "test AUC", "confusion"]
    lines += ["| " + " | ".join(fold_header) + " |", "|" + "---|" * len(fold_header)]
    for row in rows:
        lines.append(
            f"| {row['backbone']} | {row['fold']} | {row['n_train']} | {row['n_test']} | "
            f"{cell(row['train_accuracy'])} | {cell(row['test_accuracy'])} | {cell(row['test_auc'])} | "
            f"{row['confusion_matrix']} |"
        )
    return "\n".join(lines) + "\n"


def _plot_cv(
    summary_rows: Sequence[Mapping[str, Any]],
    curves: Mapping[str, Sequence[Curve]],
    output_dir: Path,
    class_names: Sequence[str],
) -> None:

    n = len(summary_rows)
    fig = Figure(figsize=(3.4 * n, 3.2))
    axes = fig.subplots(1, n, squeeze=False)
    for axis, summary in zip(axes[0], summary_rows, strict=True):
        matrix = np.asarray(summary["confusion_matrix_sum"])
        axis.imshow(matrix, cmap="Blues")
        for (i, j), count in np.ndenumerate(matrix):
            axis.text(j, i, str(count), ha="center", va="center", color="black")
        axis.set_xticks(range(len(class_names)), class_names)
        axis.set_yticks(range(len(class_names)), class_names)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_title(f"{summary['backbone']} (all test folds)", fontsize=9)
    fig.tight_layout()
    with atomic_path(output_dir / "confusion.png") as tmp:
        fig.savefig(tmp, dpi=110)

    fig = Figure(figsize=(3.6 * n, 3.4))
    axes = fig.subplots(1, n, squeeze=False)
    grid = np.linspace(0.0, 1.0, 101)
    for axis, summary in zip(axes[0], summary_rows, strict=True):
        backbone = str(summary["backbone"])
        interpolated = []
        for fold, (fpr, tpr) in enumerate(curves.get(backbone, []), start=1):
            axis.plot(fpr, tpr, lw=0.8, alpha=0.6, label=f"fold {fold}")
            interpolated.append(np.interp(grid, fpr, tpr))
        if interpolated:
            axis.plot(grid, np.mean(interpolated, axis=0), color="black", lw=2, label="mean")
        axis.plot([0, 1], [0, 1], ls=":", color="grey")
        axis.set_title(
            f"{backbone}: AUC {summary['test_auc_mean']:.3f} ± {summary['test_auc_sd']:.3f}", fontsize=9
        )
        axis.set_xlabel("1 − specificity")
        axis.set_ylabel("sensitivity")
        axis.legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(output_dir / "roc.png") as tmp:
        fig.savefig(tmp, dpi=110)
