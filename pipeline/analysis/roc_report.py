"""ROC analysis of case-level scores against labels: AUC with DeLong or bootstrap CI, Youden point.

``roc_report`` takes the studies matched between a cohort and a labels file and computes,
per score, the empirical ROC (:func:`pipeline.stats.roc_analysis`), and DeLong's paired
test between every two scores; ``write_roc_outputs`` writes roc.json, roc.png and roc.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from corona_ct.pipeline import __version__
from corona_ct.pipeline.analysis.cohort import Cohort, Matched, require_matches
from corona_ct.pipeline.analysis.degenerate import by_reason, unmatched_problem
from corona_ct.pipeline.analysis.documents import fmt_p, roc_markdown
from corona_ct.pipeline.analysis.figures import plot_roc
from corona_ct.pipeline.atomic import write_json, write_text
from corona_ct.pipeline.errors import InputError
from corona_ct.pipeline.stats import MIN_CASES_PER_CLASS, RocResult, delong_test, roc_analysis

#: Bootstrap resamples of ``roc_analysis`` when no interval is bootstrapped (unused by DeLong).
DEFAULT_BOOTSTRAP = 2000


@dataclass(frozen=True)
class RocReport:
    """ROC results of every score on the matched studies, with the roc.json content."""

    results: dict[str, RocResult]  # score -> ROC
    comparisons: list[dict[str, Any]]  # DeLong tests: score_a, score_b, auc_a, auc_b, z, p_value
    matched: Matched
    labels_file: Path
    reasons: list[str]  # why the result is degenerate; [] when it is not
    payload: dict[str, Any]  # roc.json


def roc_report(
    cohort: Cohort,
    matched: Matched,
    labels: Mapping[str, int],
    labels_file: Path,
    *,
    positive: str | None = None,
    n_bootstrap: int = 0,
    seed: int = 0,
    allow_degenerate: bool = False,
) -> RocReport:
    """ROC of every score of ``matched`` against ``labels`` (study_id -> 0/1).

    ``n_bootstrap`` > 0: percentile intervals from that many stratified resamples (``seed``);
    0: DeLong intervals. ``positive`` and ``allow_degenerate`` are recorded in roc.json.
    Raises ``InputError`` when no study matched or the matched studies have one class only.
    """
    require_matches(matched, labels_file, len(labels), "labelled", cohort)
    scores = list(matched.values)
    y = np.array([labels[s] for s in matched.study_ids], dtype=bool)
    if y.all() or not y.any():
        only = "positive" if y.all() else "negative"
        raise InputError(
            f"ROC needs both classes; {labels_file.name} has only {only} studies among the "
            f"{y.size} matched with the results"
        )
    ci: Literal["delong", "bootstrap"] = "bootstrap" if n_bootstrap else "delong"
    results = {
        s: roc_analysis(y, matched.values[s], ci=ci, n_bootstrap=n_bootstrap or DEFAULT_BOOTSTRAP, seed=seed)
        for s in scores
    }
    unmatched = unmatched_problem(len(matched.study_ids), len(labels), labels_file.name)
    reasons = [*([unmatched] if unmatched else []), *by_reason({s: r.problems for s, r in results.items()})]
    too_few = min(int(y.sum()), int((~y).sum())) < MIN_CASES_PER_CLASS
    comparisons: list[dict[str, Any]] = []
    for i, a in enumerate(scores):
        for b in scores[i + 1 :] if not too_few else []:
            z, p, auc_a, auc_b = delong_test(y, matched.values[a], matched.values[b])
            comparisons.append(
                {"score_a": a, "score_b": b, "auc_a": auc_a, "auc_b": auc_b, "z": z, "p_value": p}
            )
    payload = {
        "analysis": "roc",
        "corona_ct_version": __version__,
        "results": cohort.sources,
        "labels": str(labels_file),
        "positive_label": positive,
        "ci_method": ci,
        "confidence": 0.95,
        "n_bootstrap": n_bootstrap or None,
        "seed": seed if n_bootstrap else None,
        "include_not_assessable": cohort.include_not_assessable,
        "n_studies": int(y.size),
        "n_positive": int(y.sum()),
        "n_negative": int((~y).sum()),
        "degenerate": bool(reasons),
        "degenerate_reasons": reasons,
        "allow_degenerate": allow_degenerate,
        "scores": {s: roc_json(r) for s, r in results.items()},
        "delong_tests": comparisons,
        "excluded": matched.excluded_json("labels"),
        "studies": [{"study_id": s, "label": int(labels[s])} for s in matched.study_ids],
    }
    return RocReport(results, comparisons, matched, labels_file, reasons, payload)


def roc_json(result: RocResult) -> dict[str, Any]:
    """One score's ROC; a degenerate one has null interval and SE, and lists its ``problems``."""
    sound = not result.degenerate
    return {
        "auc": result.auc,
        "ci_low": result.ci_low if sound else None,
        "ci_high": result.ci_high if sound else None,
        "auc_se": result.auc_se if sound else None,
        "degenerate": result.degenerate,
        "problems": list(result.problems),
        "youden_threshold": result.youden_threshold,
        "sensitivity": result.sensitivity,
        "specificity": result.specificity,
        "n_pos": result.n_pos,
        "n_neg": result.n_neg,
        # thresholds[0] = +inf is written as null: the point where nobody is called positive.
        "curve": {"fpr": result.fpr, "tpr": result.tpr, "thresholds": result.thresholds},
    }


def write_roc_outputs(report: RocReport, output: Path) -> tuple[str, ...]:
    """Write roc.json, roc.png and roc.md into ``output`` (created); returns the file names."""
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "roc.json", report.payload)
    plot_roc(report.results, output / "roc.png")
    write_text(output / "roc.md", roc_markdown(report))
    return ("roc.png", "roc.json", "roc.md")


def roc_console_lines(report: RocReport) -> Sequence[str]:
    """One line per score (AUC, interval, Youden point) and per DeLong test, for the terminal."""
    ci = report.payload["ci_method"]
    lines = []
    for s, r in report.results.items():
        if r.degenerate:
            lines.append(
                f"{s}: AUC {r.auc:.3f} from {r.n_pos} positive and {r.n_neg} negative studies, degenerate "
                "(no confidence interval, no operating point)"
            )
            continue
        lines.append(
            f"{s}: AUC {r.auc:.3f} (95% CI {r.ci_low:.3f}–{r.ci_high:.3f}, {ci}); Youden threshold "
            f"{r.youden_threshold:.4g}: sensitivity {r.sensitivity:.3f}, specificity {r.specificity:.3f}"
        )
    lines += [
        f"DeLong {c['score_a']} vs {c['score_b']}: z = {c['z']:.3f}, p = {fmt_p(c['p_value'])}"
        for c in report.comparisons
    ]
    return lines
