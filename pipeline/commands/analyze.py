"""``corona-ct analyze roc|wilcoxon`` and ``corona-ct cluster``: cohort analyses of ``run`` outputs.

All three read one or more ``run`` output folders (``OUT/summary.csv``, and for
``cluster`` the per-study ``OUT/<study_id>/features.npz``), match studies by
``study_id``, list every study they could not use and why, and write a PNG, a JSON
with every number, and a short Markdown summary for a paper. Studies that ``run``
found not assessable (no plausible lungs, no call made) are left out and counted
unless ``--include-not-assessable`` is given.

A result that says nothing is called degenerate, in every output (JSON ``degenerate`` and
``degenerate_reasons``, a banner in the Markdown, a line on stdout), and the command exits
with ``EXIT_DEGENERATE`` (3) unless ``--allow-degenerate`` is given: an ROC with fewer than
2 cases in a class or a constant score, a comparison of a constant score, most labelled (or
grouped) studies unmatched, clusters that coincide with studies or with result folders
(sources), or slices from a single study. See docs/analysis.md.

This module parses the arguments and prints; the analyses are :mod:`pipeline.analysis`,
imported inside the handlers so that ``--help`` loads no numerical library.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from corona_ct.pipeline.analysis import DEFAULT_SCORE, EXIT_DEGENERATE
from corona_ct.pipeline.commands.options import (
    add_device_option,
    add_output_option,
    add_threads_option,
    apply_compute_options,
)
from corona_ct.pipeline.errors import ConfigError, InputError

if TYPE_CHECKING:
    from corona_ct.pipeline.analysis.cohort import Cohort, Matched

log = logging.getLogger(__name__)


def _add_results_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--results",
        nargs="+",
        type=Path,
        required=True,
        metavar="OUT",
        help="one or more output folders of `corona-ct run` (each holding summary.csv)",
    )
    add_output_option(parser, "folder for the outputs")
    add_threads_option(parser)
    parser.add_argument(
        "--prefix-ids",
        action="store_true",
        help="rename every study to '<OUT folder name>/<study_id>' so that the same study_id in two "
        "outputs stays apart (labels/groups files must then use the prefixed ids); without it a "
        "duplicate study_id is an error",
    )
    parser.add_argument(
        "--include-not-assessable",
        action="store_true",
        help="keep studies that `run` found not assessable (no plausible lungs); they have no classifier "
        "scores, so they count only for columns with a value (n_slices, lung_volume_cm3)",
    )
    parser.add_argument(
        "--allow-degenerate",
        action="store_true",
        help=f"exit 0 even when the result is degenerate (fewer than 2 cases in a class, a constant score, "
        f"most labels unmatched, clusters that coincide with studies or sources); without it such a run "
        f"writes its outputs, marked degenerate, and exits with {EXIT_DEGENERATE}",
    )


def _add_ids_file_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ids-file",
        type=Path,
        metavar="FILE",
        help="the ids file of `corona-ct run --ids-file` (study_id,input,...): the labels/groups file may then "
        "name each study by its study_id, its input path, or a folder or file name on that path that only "
        "one study has",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``analyze`` (with ``roc`` and ``wilcoxon``) and ``cluster``."""
    analyze = subparsers.add_parser(
        "analyze",
        help="cohort statistics on run outputs: ROC/AUC (DeLong) and Wilcoxon/Kruskal–Wallis",
        description="Cohort statistics on the summary.csv of one or more `corona-ct run` outputs.",
    )
    analyze.set_defaults(handler=lambda _args: _print_usage(analyze))
    analyses = analyze.add_subparsers(dest="analysis", metavar="ANALYSIS")

    roc = analyses.add_parser(
        "roc",
        help="ROC curve, AUC with 95%% CI, Youden threshold, DeLong comparison of scores",
        description="ROC analysis of case-level scores against a labels file (study_id,label).",
    )
    _add_results_arguments(roc)
    roc.add_argument(
        "--labels",
        type=Path,
        required=True,
        help="CSV with columns study_id,label (or input,label with --ids-file); label 0/1 or names "
        "(covid/normal, positive/negative, ...)",
    )
    _add_ids_file_argument(roc)
    roc.add_argument(
        "--score",
        action="append",
        dest="scores",
        metavar="COLUMN",
        help=f"summary.csv column to evaluate (default {DEFAULT_SCORE}); repeat to compare several",
    )
    roc.add_argument(
        "--positive",
        metavar="LABEL",
        help="label value counted as positive, every other value negative (e.g. --positive covid "
        "with labels covid/cap/normal)",
    )
    roc.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        metavar="N",
        help="confidence interval from N stratified bootstrap resamples instead of DeLong",
    )
    roc.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    roc.set_defaults(handler=handle_roc)

    wilcoxon = analyses.add_parser(
        "wilcoxon",
        help="Wilcoxon rank-sum (2 groups) or Kruskal–Wallis + Holm-corrected pairwise tests",
        description="Compare a score between groups from a groups file (study_id,group).",
    )
    _add_results_arguments(wilcoxon)
    wilcoxon.add_argument(
        "--groups",
        type=Path,
        required=True,
        help="CSV with columns study_id,group (or input,group with --ids-file)",
    )
    _add_ids_file_argument(wilcoxon)
    wilcoxon.add_argument(
        "--score",
        action="append",
        dest="scores",
        metavar="COLUMN",
        help=f"summary.csv column to compare (default {DEFAULT_SCORE}); repeat for several",
    )
    wilcoxon.add_argument(
        "--group-order",
        metavar="A,B,...",
        help="order of the groups in tables and plots (default: order of first appearance); the "
        "effect size of a pair is signed so that it is positive when the first group is higher",
    )
    wilcoxon.add_argument(
        "--seed", type=int, default=0, help="seed of the horizontal jitter of the plotted points"
    )
    wilcoxon.set_defaults(handler=handle_wilcoxon)

    cluster = subparsers.add_parser(
        "cluster",
        help="k-means of gradient-weighted slice features: elbow, PCA, key slices per cluster",
        description="Cluster the evaluated slices of a cohort by their gradient-weighted ResNet features.",
    )
    _add_results_arguments(cluster)
    cluster.add_argument("--k", default="auto", help="number of clusters, or 'auto' for the elbow knee")
    cluster.add_argument("--k-max", type=int, default=10, help="largest k of the elbow curve (default 10)")
    add_device_option(cluster)
    cluster.add_argument("--seed", type=int, default=0, help="k-means++ seed (default 0)")
    cluster.add_argument("--restarts", type=int, default=5, help="k-means++ restarts per k (default 5)")
    cluster.add_argument(
        "--max-iter", type=int, default=300, help="Lloyd iterations per restart (default 300)"
    )
    cluster.add_argument("--tol", type=float, default=1e-4, help="convergence tolerance (default 1e-4)")
    cluster.add_argument(
        "--positive-only", action="store_true", help="cluster only slices with probability >= --threshold"
    )
    cluster.add_argument("--threshold", type=float, default=0.5, help="slice positivity threshold (0.5)")
    cluster.add_argument("--key-slices", type=int, default=4, help="key slices shown per cluster (4)")
    cluster.set_defaults(handler=handle_cluster)


def _print_usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


# ----------------------------------------------------------------------------- shared steps


def _load_cohort(args: argparse.Namespace) -> Cohort:
    """The cohort of ``--results``; says on stdout how many not-assessable studies were left out or kept."""
    from corona_ct.pipeline.analysis.cohort import load_cohort

    cohort = load_cohort(
        args.results,
        prefix_ids=args.prefix_ids,
        include_not_assessable=getattr(args, "include_not_assessable", False),
    )
    if cohort.not_assessable:
        print(
            f"left out {_studies(len(cohort.not_assessable))} not assessable in `corona-ct run` (no plausible "
            "lungs, no call made; reasons in the summary.csv reason column and in the outputs here; "
            "--include-not-assessable keeps them)"
        )
    if cohort.included_not_assessable:
        print(
            f"kept {_studies(len(cohort.included_not_assessable))} not assessable in `corona-ct run` "
            "(--include-not-assessable); they have no classifier scores"
        )
    return cohort


def _studies(n: int) -> str:
    return f"{n} stud{'y' if n == 1 else 'ies'}"


def _ids_file(args: argparse.Namespace) -> Path | None:
    ids_file: Path | None = getattr(args, "ids_file", None)
    if ids_file is not None and args.prefix_ids:
        raise ConfigError(
            "--ids-file maps to the study ids that run wrote, --prefix-ids renames them: use one of the two "
            "(or key the labels by '<OUT folder name>/<study_id>' without --ids-file)"
        )
    return ids_file


def _warn_excluded(matched: Matched, table_file: str) -> None:
    for line in matched.excluded_markdown(table_file):
        if line.startswith("- ") and line != "- none":
            log.warning("left out %s", line[2:].replace("`", ""))


def _finish(reasons: Sequence[str], args: argparse.Namespace, written: Sequence[str]) -> int:
    """Name the files written and why the result is degenerate; the exit code.

    ``EXIT_DEGENERATE`` for a degenerate result unless --allow-degenerate, else 0.
    """
    print(f"wrote {', '.join(written)} to {args.output}")
    if not reasons:
        return 0
    for reason in reasons:
        print(f"DEGENERATE: {reason}")
    if args.allow_degenerate:
        print("the outputs are marked degenerate (--allow-degenerate: exit 0)")
        return 0
    print(
        f"the outputs are marked degenerate; exit code {EXIT_DEGENERATE} (--allow-degenerate accepts them)",
        file=sys.stderr,
    )
    return EXIT_DEGENERATE


# ----------------------------------------------------------------------------- handlers


def handle_roc(args: argparse.Namespace) -> int:
    from corona_ct.pipeline.preflight import check_output_folder

    check_output_folder(args.output)  # before any data or model is loaded
    from corona_ct.pipeline.analysis.cohort import match_studies, select_scores
    from corona_ct.pipeline.analysis.roc_report import roc_console_lines, roc_report, write_roc_outputs
    from corona_ct.pipeline.analysis.tables import map_labels, read_mapping

    apply_compute_options(args)
    cohort = _load_cohort(args)
    scores = select_scores(cohort, args.scores)
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be a number of resamples ≥ 1, got {args.bootstrap}")
    raw = read_mapping(args.labels, "label", "labels file", _ids_file(args))
    labels = map_labels(raw, positive=args.positive, source=args.labels)
    matched = match_studies(cohort, labels, scores)
    _warn_excluded(matched, args.labels.name)
    report = roc_report(
        cohort,
        matched,
        labels,
        args.labels,
        positive=args.positive,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        allow_degenerate=args.allow_degenerate,
    )
    written = write_roc_outputs(report, args.output)
    for line in roc_console_lines(report):
        print(line)
    return _finish(report.reasons, args, written)


def handle_wilcoxon(args: argparse.Namespace) -> int:
    from corona_ct.pipeline.preflight import check_output_folder

    check_output_folder(args.output)  # before any data or model is loaded
    from corona_ct.pipeline.analysis.cohort import match_studies, require_matches, select_scores
    from corona_ct.pipeline.analysis.group_report import (
        group_console_lines,
        group_order,
        group_report,
        write_group_outputs,
    )
    from corona_ct.pipeline.analysis.tables import read_mapping

    apply_compute_options(args)
    cohort = _load_cohort(args)
    scores = select_scores(cohort, args.scores)
    groups = read_mapping(args.groups, "group", "groups file", _ids_file(args))
    matched = match_studies(cohort, groups, scores)
    _warn_excluded(matched, args.groups.name)
    require_matches(matched, args.groups, len(groups), "studies", cohort)
    order = group_order(args.group_order, groups, args.groups)
    report = group_report(
        cohort, matched, groups, args.groups, order=order, allow_degenerate=args.allow_degenerate
    )
    for g, ids in report.dropped.items():
        log.warning("group %r has a single study (%s); it is left out of the tests", g, ", ".join(ids))
    written = write_group_outputs(report, args.output, seed=args.seed)
    for line in group_console_lines(report):
        print(line)
    return _finish(report.reasons, args, written)


def _parse_k(text: str, n_slices: int) -> int | None:
    if text.strip().lower() == "auto":
        return None
    try:
        k = int(text)
    except ValueError:
        raise ConfigError(f"--k must be 'auto' or a whole number, got {text!r}") from None
    if not 1 <= k <= n_slices:
        raise ConfigError(f"--k {k} is impossible with {n_slices} slices; choose 1 ≤ k ≤ {n_slices}")
    return k


def handle_cluster(args: argparse.Namespace) -> int:
    from corona_ct.pipeline.preflight import check_output_folder

    check_output_folder(args.output)  # before any data or model is loaded
    from corona_ct.pipeline.analysis.cluster_report import (
        ClusterSettings,
        cluster_console_lines,
        cluster_report,
        write_cluster_outputs,
    )
    from corona_ct.pipeline.analysis.slices import load_slices
    from corona_ct.pipeline.device import resolve_device

    for name in ("k_max", "restarts", "max_iter", "key_slices"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    device = resolve_device(apply_compute_options(args))
    cohort = _load_cohort(args)
    table = load_slices(cohort, positive_only=args.positive_only, threshold=args.threshold)
    n_slices = len(table.study_id)
    if n_slices < 2:
        raise InputError(f"clustering needs at least 2 slices; the results hold {n_slices}")
    settings = ClusterSettings(
        k=_parse_k(args.k, n_slices),
        k_max=args.k_max,
        restarts=args.restarts,
        max_iter=args.max_iter,
        tol=args.tol,
        seed=args.seed,
        key_slices=args.key_slices,
        threshold=args.threshold,
        positive_only=args.positive_only,
    )
    for study_id, reason in table.skipped.items():
        log.warning("study %s left out of clustering: %s", study_id, reason)
    report = cluster_report(cohort, table, settings, device, allow_degenerate=args.allow_degenerate)
    written = write_cluster_outputs(report, table, args.output)
    for line in cluster_console_lines(report):
        print(line)
    return _finish(report.reasons, args, written)
