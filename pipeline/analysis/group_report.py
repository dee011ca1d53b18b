"""Comparison of scores between groups of studies: Wilcoxon rank-sum, or Kruskal–Wallis plus pairs.

``group_report`` takes the studies matched between a cohort and a groups file, leaves out
groups with a single study, and compares each score between the rest
(:func:`pipeline.stats.group_comparison`); ``write_group_outputs`` writes wilcoxon.json,
wilcoxon.png and wilcoxon.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from corona_ct.pipeline import __version__
from corona_ct.pipeline.analysis.cohort import Cohort, Matched, require_matches
from corona_ct.pipeline.analysis.degenerate import by_reason, unmatched_problem
from corona_ct.pipeline.analysis.documents import fmt_p, group_markdown
from corona_ct.pipeline.analysis.figures import plot_groups
from corona_ct.pipeline.atomic import write_json, write_text
from corona_ct.pipeline.errors import ConfigError, InputError
from corona_ct.pipeline.stats import GroupComparison, group_comparison

TEST_DESCRIPTION = (
    "two-sided Wilcoxon rank-sum (Mann–Whitney U; exact when a group has ≤ 8 studies and no "
    "ties, else normal approximation with tie and continuity correction)"
)
EFFECT_SIZES = (
    "rank_biserial = (U_a − U_b)/(n_a·n_b) = 2·P(a > b) + P(a = b) − 1; "
    "r = Z/√N with Z the tie-corrected normal score of U_a (no continuity correction)"
)


@dataclass(frozen=True)
class GroupReport:
    """Group comparisons of every score on the matched studies, with the wilcoxon.json content."""

    comparisons: dict[str, GroupComparison]  # score -> comparison of the kept groups
    values: dict[str, npt.NDArray[np.float64]]  # score -> value per matched study
    members: dict[str, list[int]]  # group -> indices into matched.study_ids (every group with a study)
    kept: list[str]  # groups compared (at least 2 studies each)
    dropped: dict[str, list[str]]  # group -> its single study, left out of the tests
    matched: Matched
    groups_file: Path
    reasons: list[str]  # why the result is degenerate; [] when it is not
    payload: dict[str, Any]  # wilcoxon.json


def group_order(option: str | None, groups: Mapping[str, str], source: Path) -> list[str]:
    """Groups in the order of ``option`` ('A,B,...'), then the rest in order of first appearance."""
    present = list(dict.fromkeys(groups.values()))
    if not option:
        return present
    order = [g.strip() for g in option.split(",") if g.strip()]
    unknown = [g for g in order if g not in present]
    if unknown:
        raise ConfigError(
            f"--group-order names {', '.join(unknown)}, not in {source.name} (groups: {', '.join(present)})"
        )
    return order + [g for g in present if g not in order]


def group_report(
    cohort: Cohort,
    matched: Matched,
    groups: Mapping[str, str],
    groups_file: Path,
    *,
    order: Sequence[str] | None = None,
    allow_degenerate: bool = False,
) -> GroupReport:
    """Compare every score of ``matched`` between the groups of ``groups`` (study_id -> group).

    ``order``: the groups' order (default: first appearance); the effect size of a pair is
    positive when its first group is higher. Groups with one matched study are left out;
    ``InputError`` when fewer than two groups of at least 2 studies remain.
    """
    require_matches(matched, groups_file, len(groups), "studies", cohort)
    scores = list(matched.values)
    order = list(order) if order is not None else list(dict.fromkeys(groups.values()))
    members = {g: [i for i, s in enumerate(matched.study_ids) if groups[s] == g] for g in order}
    members = {g: idx for g, idx in members.items() if idx}
    too_small = {g: idx for g, idx in members.items() if len(idx) < 2}
    kept = [g for g in members if g not in too_small]
    if len(kept) < 2:
        details = "; ".join(
            f"group {g!r} has {len(members[g])} matched stud{'y' if len(members[g]) == 1 else 'ies'}"
            + (f" ({', '.join(matched.study_ids[i] for i in members[g])})" if len(members[g]) == 1 else "")
            for g in members
        )
        raise InputError(
            f"{groups_file.name}: a rank-sum test needs two groups with at least 2 studies each; {details}"
        )
    dropped = {g: [matched.study_ids[i] for i in idx] for g, idx in too_small.items()}
    comparisons = {s: group_comparison({g: matched.values[s][members[g]] for g in kept}) for s in scores}
    unmatched = unmatched_problem(len(matched.study_ids), len(groups), groups_file.name)
    tested = np.concatenate([members[g] for g in kept])
    constant = {
        s: [f"the score is constant ({matched.values[s][tested][0]:.6g} in every group): nothing to compare"]
        for s in scores
        if float(np.ptp(matched.values[s][tested])) == 0.0
    }
    reasons = [*([unmatched] if unmatched else []), *by_reason(constant)]
    payload = {
        "analysis": "wilcoxon" if len(kept) == 2 else "kruskal-wallis",
        "corona_ct_version": __version__,
        "results": cohort.sources,
        "groups_file": str(groups_file),
        "include_not_assessable": cohort.include_not_assessable,
        "degenerate": bool(reasons),
        "degenerate_reasons": reasons,
        "allow_degenerate": allow_degenerate,
        "test": TEST_DESCRIPTION,
        "effect_sizes": EFFECT_SIZES,
        "groups": kept,
        "groups_left_out": dropped,
        "scores": {s: comparison_json(c) for s, c in comparisons.items()},
        "excluded": matched.excluded_json("groups"),
        "studies": [
            {"study_id": sid, "group": groups[sid], **{s: matched.values[s][i] for s in scores}}
            for i, sid in enumerate(matched.study_ids)
        ],
    }
    return GroupReport(
        comparisons, matched.values, members, kept, dropped, matched, groups_file, reasons, payload
    )


def comparison_json(comparison: GroupComparison) -> dict[str, Any]:
    """One score's comparison: group summaries, Kruskal–Wallis with ε² (or None), pairwise tests."""
    n_total = sum(int(s["n"]) for s in comparison.summaries.values())
    kruskal = None
    if comparison.kruskal is not None:
        # ε² = H / (N − 1): the rank analogue of η² (Tomczak & Tomczak 2014).
        kruskal = {**comparison.kruskal, "epsilon_squared": comparison.kruskal["h"] / (n_total - 1)}
    return {
        "summaries": comparison.summaries,
        "kruskal_wallis": kruskal,
        "pairwise": list(comparison.pairwise),
    }


def write_group_outputs(report: GroupReport, output: Path, *, seed: int = 0) -> tuple[str, ...]:
    """Write wilcoxon.json, wilcoxon.png (``seed``: the points' jitter) and wilcoxon.md; the file names."""
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "wilcoxon.json", report.payload)
    plot_groups(report.comparisons, report.values, report.members, output / "wilcoxon.png", seed)
    write_text(output / "wilcoxon.md", group_markdown(report))
    return ("wilcoxon.png", "wilcoxon.json", "wilcoxon.md")


def group_console_lines(report: GroupReport) -> Sequence[str]:
    """Per score the group medians, then one line per test, for the terminal."""
    lines = []
    for s, c in report.comparisons.items():
        summary = ", ".join(
            f"{g} median {c.summaries[g]['median']:.4g} (IQR {c.summaries[g]['q1']:.4g}–{c.summaries[g]['q3']:.4g}, "
            f"n={c.summaries[g]['n']})"
            for g in c.groups
        )
        lines.append(f"{s}: {summary}")
        if c.kruskal is not None:
            lines.append(
                f"  Kruskal–Wallis H = {c.kruskal['h']:.3f}, df = {c.kruskal['dof']}, p = {fmt_p(c.kruskal['p_value'])}"
            )
        lines += [
            f"  {t['group_a']} vs {t['group_b']}: p = {fmt_p(t['p_value'])}"
            + (f" (Holm {fmt_p(t['p_holm'])})" if len(c.pairwise) > 1 else "")
            + f", rank-biserial {t['rank_biserial']:+.3f}, r = {t['r']:+.3f}"
            for t in c.pairwise
        ]
    return lines
