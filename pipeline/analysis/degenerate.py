"""When an analysis says nothing: the reasons written into every output of a degenerate result.

An ROC with fewer than 2 cases in a class or a constant score, a comparison of a
constant score, most labelled (or grouped) studies unmatched, clusters that coincide with
studies or with result folders (sources), or slices from a single study.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from corona_ct.pipeline.cluster import coinciding_groups

#: Below this share of the labelled (grouped) studies usable, most labels are unmatched: degenerate.
MIN_MATCHED_SHARE = 0.5


def unmatched_problem(n_used: int, n_listed: int, table_file: str) -> str | None:
    """The degenerate reason when most studies of a labels/groups file could not be used."""
    if n_listed and n_used < MIN_MATCHED_SHARE * n_listed:
        return (
            f"most studies in {table_file} are unmatched: only {n_used} of {n_listed} have results with a "
            "value for every score (see the studies left out)"
        )
    return None


def by_reason(problems: Mapping[str, Sequence[str]]) -> list[str]:
    """``{score: [problem, ...]}`` as lines, one per problem, naming the scores it applies to."""
    scores_of: dict[str, list[str]] = {}
    for score, items in problems.items():
        for problem in items:
            scores_of.setdefault(problem, []).append(score)
    return [f"{', '.join(scores)}: {problem}" for problem, scores in scores_of.items()]


def cluster_problems(
    study_ids: Sequence[str], sources: Sequence[str], labels: npt.NDArray[np.int64]
) -> list[str]:
    """Why a clustering is degenerate: one study, or clusters that coincide with studies or sources.

    ``study_ids`` and ``sources`` (result folders) name each clustered slice's origin;
    ``labels`` are the slices' cluster indices (0-based).
    """
    reasons = []
    studies = sorted(set(study_ids))
    if len(studies) < 2:
        reasons.append(
            f"all {len(study_ids)} slices come from one study ({studies[0]}): the clusters cannot tell "
            "manifestations from the scan"
        )
    for groups, what, meaning in (
        (study_ids, "studies", "they separate scans, not manifestations"),
        (sources, "result folders (sources)", "they separate data sources, not manifestations"),
    ):
        found = coinciding_groups(labels, groups)
        if found is None:
            continue
        shares = ", ".join(
            f"C{c + 1}: {Path(g).name if groups is sources else g} {100 * share:.0f}%"
            for c, (g, share) in sorted(found.items())
        )
        reasons.append(f"the clusters coincide with {what} ({shares}): {meaning}")
    return reasons
