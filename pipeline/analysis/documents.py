"""The text outputs of the cohort analyses: plain JSON with every number, and a Markdown summary.

Every Markdown summary starts with the version and the result folders, opens with a
banner when the result is degenerate, and ends with its methods and the studies left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from corona_ct.pipeline import __version__
from corona_ct.pipeline.analysis import EXIT_DEGENERATE

if TYPE_CHECKING:
    from corona_ct.pipeline.analysis.group_report import GroupReport
    from corona_ct.pipeline.analysis.roc_report import RocReport


def fmt_p(p: float) -> str:
    """A p-value as text: three decimals, or "< 0.001"."""
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _header(title: str, sources: Sequence[str]) -> list[str]:
    return [
        f"# {title}",
        "",
        f"corona-ct {__version__}; results: {', '.join(f'`{s}`' for s in sources)}.",
        "",
    ]


def _degenerate_banner(reasons: Sequence[str], allowed: bool) -> list[str]:
    if not reasons:
        return []
    lines = ["**DEGENERATE RESULT: these numbers say nothing about the scores.**", ""]
    lines += [f"- {reason}" for reason in reasons]
    lines += [
        "",
        "(written with --allow-degenerate)"
        if allowed
        else f"(the command exited with code {EXIT_DEGENERATE})",
        "",
    ]
    return lines


def roc_markdown(report: RocReport) -> str:
    """roc.md: AUC table, paired DeLong tests, methods and the studies left out."""
    payload = report.payload
    first = next(iter(report.results.values()))
    ci_text = (
        "DeLong's method (fast midrank algorithm of Sun & Xu 2014), AUC ± 1.96·SE"
        if payload["ci_method"] == "delong"
        else f"the percentile method over {payload['n_bootstrap']} stratified bootstrap resamples "
        f"(seed {payload['seed']})"
    )
    lines = [
        *_header("ROC analysis", payload["results"]),
        *_degenerate_banner(report.reasons, payload["allow_degenerate"]),
        f"Cohort: {first.n_pos + first.n_neg} studies ({first.n_pos} positive, {first.n_neg} negative; "
        f"labels from `{report.labels_file.name}`).",
        "",
        "| score | AUC (95% CI) | Youden threshold | sensitivity | specificity |",
        "|---|---|---|---|---|",
    ]
    for name, r in report.results.items():
        if r.degenerate:
            lines.append(f"| {name} | {r.auc:.3f} (degenerate: no CI) | – | – | – |")
            continue
        lines.append(
            f"| {name} | {r.auc:.3f} ({r.ci_low:.3f}–{r.ci_high:.3f}) | {r.youden_threshold:.4g} "
            f"| {r.sensitivity:.3f} | {r.specificity:.3f} |"
        )
    if report.comparisons:
        lines += ["", "Paired DeLong tests (two-sided):", ""]
        lines += [
            f"- {c['score_a']} vs {c['score_b']}: ΔAUC = {c['auc_a'] - c['auc_b']:+.3f}, "
            f"z = {c['z']:.2f}, p = {fmt_p(c['p_value'])}"
            for c in report.comparisons
        ]
    lines += [
        "",
        f"Methods: empirical ROC curves; 95% confidence intervals of the AUC by {ci_text}. The operating "
        "point maximises Youden's J (sensitivity + specificity − 1); a study is called positive when its "
        "score is at or above the threshold."
        + (" Correlated AUCs were compared with DeLong's paired test." if report.comparisons else ""),
        "",
        "Studies left out:",
        "",
        *report.matched.excluded_markdown(report.labels_file.name),
        "",
    ]
    return "\n".join(lines)


def group_markdown(report: GroupReport) -> str:
    """wilcoxon.md: per score the group medians, the tests with effect sizes, methods, studies left out."""
    payload = report.payload
    lines = [
        *_header("Group comparison", payload["results"]),
        *_degenerate_banner(report.reasons, payload["allow_degenerate"]),
    ]
    for score, c in report.comparisons.items():
        lines += [f"## {score}", "", "| group | n | median (IQR) |", "|---|---|---|"]
        lines += [
            f"| {g} | {c.summaries[g]['n']} | {c.summaries[g]['median']:.4g} "
            f"({c.summaries[g]['q1']:.4g}–{c.summaries[g]['q3']:.4g}) |"
            for g in c.groups
        ]
        lines.append("")
        if c.kruskal is not None:
            lines += [
                f"Kruskal–Wallis: H = {c.kruskal['h']:.2f}, df = {c.kruskal['dof']}, "
                f"p = {fmt_p(c.kruskal['p_value'])}.",
                "",
            ]
        lines += ["| comparison | U | p | p (Holm) | rank-biserial | r = Z/√N |", "|---|---|---|---|---|---|"]
        lines += [
            f"| {t['group_a']} vs {t['group_b']} | {t['u_statistic']:.1f} | {fmt_p(t['p_value'])} "
            f"| {fmt_p(t['p_holm'])} | {t['rank_biserial']:+.3f} | {t['r']:+.3f} |"
            for t in c.pairwise
        ]
        lines.append("")
    lines += [
        "Methods: two-sided Wilcoxon rank-sum (Mann–Whitney U) tests; exact p-values when a group has at "
        "most 8 studies and there are no ties, otherwise the normal approximation with tie and continuity "
        "correction. With more than two groups, a Kruskal–Wallis test (tie-corrected) and pairwise rank-sum "
        "tests with Holm correction. Effect sizes: rank-biserial correlation (U_a − U_b)/(n_a·n_b), positive "
        "when the first group has higher values, and r = Z/√N.",
        "",
        "Studies left out:",
        "",
        *report.matched.excluded_markdown(report.groups_file.name),
    ]
    lines += [
        f"- group {g!r} left out of the tests (a single study: {', '.join(ids)})"
        for g, ids in report.dropped.items()
    ]
    lines.append("")
    return "\n".join(lines)


def cluster_markdown(payload: Mapping[str, Any]) -> str:
    """cluster.md from the cluster.json content: cluster table, methods and the studies left out."""
    ratio = payload["pca_explained_variance_ratio"]
    lines = [
        *_header("Clustering of disease manifestations", payload["results"]),
        *_degenerate_banner(payload["degenerate_reasons"], payload["allow_degenerate"]),
        f"{payload['n_slices']} {'positive ' if payload['positive_only'] else ''}slices from "
        f"{payload['n_studies']} studies; k = {payload['k']} "
        + (
            "(the knee of the elbow curve)."
            if payload["k_choice"] == "elbow knee (auto)"
            else f"(set with --k; the elbow knee is at k = {payload['knee']})."
        ),
        "",
        "| cluster | slices | studies | positive slices | mean probability | key slices (study:slice) |",
        "|---|---|---|---|---|---|",
    ]
    for c in payload["clusters"]:
        keys = ", ".join(f"{s['study_id']}:{s['slice_index']}" for s in c["key_slices"])
        frac = c["fraction_positive_slices"]
        mean_p = c["mean_probability"]
        lines.append(
            f"| {c['cluster']} | {c['n_slices']} | {c['n_studies']} | "
            f"{'–' if frac is None else f'{100 * frac:.0f}%'} | {'–' if mean_p is None else f'{mean_p:.2f}'} | {keys} |"
        )
    lines += [
        "",
        "Methods: for every evaluated slice"
        + (f" with probability ≥ {payload['threshold']:g}" if payload["positive_only"] else "")
        + ", the global-average-pooled ResNet-50 layer4 activations were multiplied element-wise by the "
        f"Grad-CAM channel weights ({payload['feature_dim']} dimensions) and z-scored per dimension. k-means "
        f"(k-means++ initialisation, best of {payload['restarts']} restarts, seed {payload['seed']}) was run "
        f"for k = 1..{payload['elbow']['k'][-1]}; the knee of the elbow curve is the point of the normalised "
        "log-inertia curve farthest below the chord joining its ends. The first two principal components explain "
        f"{100 * ratio[0]:.1f}% and {100 * ratio[1]:.1f}% of the variance. Key slices are the cluster members "
        "nearest the centre (Euclidean distance in the z-scored space).",
        "",
        "Studies left out:",
        "",
    ]
    skipped = payload["skipped_studies"]
    lines += [f"- `{s['study_id']}`: {s['reason']}" for s in skipped] or ["- none"]
    lines.append("")
    return "\n".join(lines)
