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
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from corona_ct.pipeline import __version__
from corona_ct.pipeline.atomic import atomic_path, write_text
from corona_ct.pipeline.commands.options import (
    add_device_option,
    add_output_option,
    add_threads_option,
    apply_compute_options,
)
from corona_ct.pipeline.errors import ConfigError, InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from corona_ct.pipeline.stats import GroupComparison, RocResult

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.csv"
FEATURES_NAME = "features.npz"


def numeric_columns() -> tuple[str, ...]:
    """summary.csv's numeric columns (imported when needed: pipeline.run loads torch, the CLI starts without it)."""
    from corona_ct.pipeline.summary import SUMMARY_COLUMNS

    return tuple(c for c in SUMMARY_COLUMNS if c not in {"study_id", "status", "source", "reason", "error"})


#: Why not-assessable studies are left out, and how to keep them.
NOT_ASSESSABLE_NOTE = (
    "not assessable in `corona-ct run`: no plausible lungs, no call made; --include-not-assessable keeps them"
)
DEFAULT_SCORE = "corona_score_cm3"
#: Exit code of an analysis whose result is degenerate (0 with --allow-degenerate).
EXIT_DEGENERATE = 3
#: Below this share of the labelled (grouped) studies usable, most labels are unmatched: degenerate.
MIN_MATCHED_SHARE = 0.5
FEATURE_KEYS = ("slice_index", "z_mm", "probability", "features", "weights")
IMAGE_KEYS = ("thumbnails", "cams")

#: Label spellings accepted in labels.csv (compared case-insensitively, spaces/underscores as '-').
POSITIVE_LABELS = frozenset(
    {"1", "covid", "covid-19", "covid19", "sars-cov-2", "positive", "pos", "yes", "true", "abnormal", "case"}
)
NEGATIVE_LABELS = frozenset(
    {
        "0",
        "normal",
        "non-covid",
        "noncovid",
        "non-covid-19",
        "negative",
        "neg",
        "no",
        "false",
        "healthy",
        "control",
    }
)


# ----------------------------------------------------------------------------- CLI wiring


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


# ----------------------------------------------------------------------------- reading inputs


@dataclass
class Cohort:
    """Studies merged from the summary.csv of several run outputs."""

    studies: dict[str, dict[str, Any]]  # study_id -> row with numeric columns as float (NaN if empty)
    failed: dict[str, str]  # study_id -> error text of the run
    folder_of: dict[str, Path]  # study_id -> run output folder
    raw_id: dict[str, str]  # study_id -> id as written by run (differs with --prefix-ids)
    columns: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    not_assessable: dict[str, str] = field(default_factory=dict)  # study_id -> reason; left out
    included_not_assessable: list[str] = field(default_factory=list)  # kept by --include-not-assessable

    def numeric_columns(self) -> list[str]:
        return [c for c in self.columns if c in numeric_columns()]


def _to_float(text: str | None) -> float:
    if text is None or text.strip() == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        return math.nan


def _read_csv(path: Path, required: Sequence[str], what: str) -> list[dict[str, str]]:
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"{path}: cannot read {what} as CSV ({error})") from error
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(
            f"{path}: {what} lacks column(s) {', '.join(missing)} (found: {', '.join(header) or 'no header'})"
        )
    return rows


def load_cohort(
    results: Sequence[Path], *, prefix_ids: bool = False, include_not_assessable: bool = False
) -> Cohort:
    """Merge the summaries of several run outputs; duplicate study_ids are an error unless prefixed.

    Not-assessable studies go to ``Cohort.not_assessable`` (left out), or with
    ``include_not_assessable`` among the studies like successful ones.
    """
    from corona_ct.pipeline.datamodel import STATUS_NOT_ASSESSABLE, STATUS_OK

    cohort = Cohort(studies={}, failed={}, folder_of={}, raw_id={})
    folder_names: dict[str, Path] = {}
    for given in results:
        folder = given.parent if given.name == SUMMARY_NAME else given
        summary = folder / SUMMARY_NAME
        if not summary.is_file():
            hint = "" if folder.is_dir() else " (the folder does not exist)"
            if (folder / "results" / SUMMARY_NAME).is_file():  # `corona-ct demo` nests its run output
                hint = f" (did you mean {folder / 'results'}?)"
            raise InputError(
                f"{summary}: not found{hint}; --results expects output folders of `corona-ct run`"
            )
        rows = _read_csv(summary, ("study_id", "status"), "run summary")
        if prefix_ids:
            if folder.name in folder_names and folder_names[folder.name] != folder:
                raise InputError(
                    f"--prefix-ids: two result folders are both named {folder.name!r} "
                    f"({folder_names[folder.name]} and {folder}); rename one"
                )
            folder_names[folder.name] = folder
        for header in rows[:1]:
            cohort.columns.extend(c for c in header if c not in cohort.columns)
        cohort.sources.append(str(folder))
        for row in rows:
            raw = row["study_id"]
            study_id = f"{folder.name}/{raw}" if prefix_ids else raw
            if study_id in cohort.folder_of:
                raise InputError(
                    f"study_id {study_id!r} appears in both {cohort.folder_of[study_id]} and {folder}; "
                    "remove one, or pass --prefix-ids to keep both as '<folder>/<study_id>'"
                )
            cohort.folder_of[study_id] = folder
            cohort.raw_id[study_id] = raw
            status = row["status"].lower()
            if status == STATUS_NOT_ASSESSABLE and not include_not_assessable:
                cohort.not_assessable[study_id] = row.get("reason", "") or status
            elif status in (STATUS_OK, STATUS_NOT_ASSESSABLE):
                cohort.studies[study_id] = {c: _to_float(row.get(c)) for c in numeric_columns()} | {
                    "study_id": study_id
                }
                if status == STATUS_NOT_ASSESSABLE:
                    cohort.included_not_assessable.append(study_id)
            else:
                cohort.failed[study_id] = row.get("error", "") or row["status"]
    if not cohort.folder_of:
        raise InputError(
            f"empty cohort: the summaries in {', '.join(map(str, results))} list no studies; "
            "run `corona-ct run` on some studies first"
        )
    if not cohort.studies:
        raise InputError(
            f"empty cohort: of the {len(cohort.folder_of)} studies in the results {len(cohort.failed)} failed "
            f"in `corona-ct run` (see the error column of summary.csv) and {len(cohort.not_assessable)} were "
            "not assessable (no plausible lungs; see the reason column, or pass --include-not-assessable)"
        )
    return cohort


def _load_cohort(args: argparse.Namespace) -> Cohort:
    """The cohort of ``--results``; says on stdout how many not-assessable studies were left out or kept."""
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


def _check_scores(cohort: Cohort, scores: Sequence[str] | None) -> list[str]:
    chosen = list(dict.fromkeys(scores or [DEFAULT_SCORE]))
    available = cohort.numeric_columns()
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise ConfigError(
            f"unknown --score column {', '.join(unknown)}; the summaries have: {', '.join(available)}"
        )
    return chosen


#: Key columns accepted in labels/groups files, in order of preference.
KEY_COLUMNS = ("study_id", "input", "name")


def _read_mapping(path: Path, value_column: str, what: str, ids_file: Path | None = None) -> dict[str, str]:
    """study_id → value from a labels/groups CSV; with ``ids_file`` keys may also be input paths or names."""
    rows = _read_csv(path, (value_column,), what)
    with path.open(newline="", encoding="utf-8-sig") as handle:
        header = [h.strip() for h in next(csv.reader(handle), [])]
    key_column = next((c for c in KEY_COLUMNS if c in header), None)
    if key_column is None or (key_column != "study_id" and ids_file is None):
        raise InputError(
            f"{path}: {what} lacks a study_id column (found: {', '.join(header) or 'no header'}); key it by "
            "study_id, or by input (path or folder name) together with --ids-file"
        )
    aliases = read_ids_aliases(ids_file) if ids_file is not None else None
    mapping: dict[str, str] = {}
    for row in rows:
        key, value = row[key_column], row[value_column]
        if not key:
            continue
        study_id = (
            key if aliases is None or ids_file is None else resolve_study_key(key, aliases, path, ids_file)
        )
        if study_id in mapping and mapping[study_id] != value:
            raise InputError(
                f"{path}: study {study_id!r} has two different {value_column}s "
                f"({mapping[study_id]!r} and {value!r}); keep one"
            )
        mapping[study_id] = value
    if not mapping:
        raise InputError(f"{path}: empty cohort: {what} lists no studies")
    return mapping


def read_ids_aliases(ids_file: Path) -> dict[str, set[str]]:
    """Every name a study can be given by → the study ids it may mean, from `run --ids-file`'s CSV.

    A study is known by its study_id, its input path (as written and resolved) and every
    folder or file name on that path (a NIfTI file also without its suffix).
    """
    aliases: dict[str, set[str]] = {}
    for row in _read_csv(ids_file, ("study_id", "input"), "ids file"):
        study_id, source = row["study_id"], row["input"]
        if not study_id:
            continue
        path = PurePath(source)
        keys = {study_id, source, row.get("name", ""), *path.parts[1:]}
        for suffix in (".nii.gz", ".nii"):
            if path.name.endswith(suffix):
                keys.add(path.name[: -len(suffix)])
        for key in keys - {""}:
            aliases.setdefault(key, set()).add(study_id)
    if not aliases:
        raise InputError(f"{ids_file}: the ids file lists no studies")
    return aliases


def resolve_study_key(key: str, aliases: Mapping[str, set[str]], source: Path, ids_file: Path) -> str:
    """The study id a labels key means: a study_id, an input path or a name only one study's path has."""
    candidates = aliases.get(key)
    if candidates is None and ("/" in key or "\\" in key):
        candidates = aliases.get(str(Path(key).expanduser().resolve()))
    if not candidates:
        return key  # not in the ids file: kept as a study id (reported as unmatched if it is none)
    if len(candidates) > 1:
        raise InputError(
            f"{source}: {key!r} names several studies in {ids_file} ({', '.join(sorted(candidates))}); "
            "key those rows by study_id or by the full input path"
        )
    return next(iter(candidates))


def _normalise_label(value: str) -> str:
    text = value.strip().lower().replace("_", "-").replace(" ", "-")
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number in (0.0, 1.0) else text


def map_labels(raw: Mapping[str, str], *, positive: str | None, source: Path) -> dict[str, int]:
    """study_id -> 0/1 from 0/1 or names; ``positive`` names the positive value, all others negative."""
    if positive is not None:
        wanted = _normalise_label(positive)
        mapped = {s: int(_normalise_label(v) == wanted) for s, v in raw.items()}
        if not any(mapped.values()):
            values = sorted(set(raw.values()))
            raise InputError(
                f"{source}: no label equals --positive {positive!r}; labels found: {', '.join(values)}"
            )
        return mapped
    mapped, unknown = {}, set()
    for study_id, value in raw.items():
        key = _normalise_label(value)
        if key in POSITIVE_LABELS:
            mapped[study_id] = 1
        elif key in NEGATIVE_LABELS:
            mapped[study_id] = 0
        else:
            unknown.add(value)
    if unknown:
        raise InputError(
            f"{source}: cannot map label(s) {', '.join(sorted(unknown)[:8])} to positive/negative; use 0/1, "
            f"covid/normal, positive/negative, or name the positive value with --positive LABEL"
        )
    return mapped


@dataclass
class Matched:
    """Studies usable for an analysis and those left out, with the reason."""

    study_ids: list[str]
    values: dict[str, npt.NDArray[np.float64]]  # score -> values in study_ids order
    missing_from_results: list[str]
    failed_in_run: dict[str, str]
    not_in_table: list[str]
    missing_score: dict[str, list[str]]  # study_id -> scores without a value
    not_assessable: dict[str, str] = field(default_factory=dict)  # study_id -> reason, left out

    def excluded_json(self, table_name: str) -> dict[str, Any]:
        return {
            f"in_{table_name}_not_in_results": self.missing_from_results,
            "failed_in_run": [{"study_id": s, "error": e} for s, e in self.failed_in_run.items()],
            "not_assessable": [{"study_id": s, "reason": r} for s, r in self.not_assessable.items()],
            f"in_results_not_in_{table_name}": self.not_in_table,
            "missing_score": [{"study_id": s, "scores": v} for s, v in self.missing_score.items()],
        }

    def excluded_markdown(self, table_file: str) -> list[str]:
        lines = []
        if self.missing_from_results:
            lines.append(f"- in {table_file} but not in the results: {_id_list(self.missing_from_results)}")
        if self.failed_in_run:
            lines.append(f"- failed in `corona-ct run`: {_id_list(list(self.failed_in_run))}")
        if self.not_assessable:
            lines.append(f"- {NOT_ASSESSABLE_NOTE}: {_id_list(list(self.not_assessable))}")
            lines += [f"  - `{s}`: {r}" for s, r in list(self.not_assessable.items())[:30]]
        if self.not_in_table:
            lines.append(f"- in the results but not in {table_file}: {_id_list(self.not_in_table)}")
        if self.missing_score:
            lines.append(f"- no value for the score: {_id_list(list(self.missing_score))}")
        return lines or ["- none"]


def _id_list(ids: Sequence[str], limit: int = 30) -> str:
    shown = ", ".join(f"`{i}`" for i in ids[:limit])
    return f"{len(ids)} ({shown}{', …' if len(ids) > limit else ''})"


def match_studies(cohort: Cohort, table: Mapping[str, Any], scores: Sequence[str]) -> Matched:
    """Studies in both the table and the successful results with every score present."""
    usable, missing_score = [], {}
    for study_id in table:
        row = cohort.studies.get(study_id)
        if row is None:
            continue
        absent = [s for s in scores if not math.isfinite(row[s])]
        if absent:
            missing_score[study_id] = absent
        else:
            usable.append(study_id)
    return Matched(
        study_ids=usable,
        values={s: np.array([cohort.studies[i][s] for i in usable], dtype=np.float64) for s in scores},
        missing_from_results=[s for s in table if s not in cohort.folder_of],
        failed_in_run=dict(cohort.failed),  # every failed study, labelled or not
        not_in_table=[s for s in cohort.studies if s not in table],
        missing_score=missing_score,
        not_assessable=dict(cohort.not_assessable),  # every one left out, labelled or not
    )


def _warn_excluded(matched: Matched, table_file: str) -> None:
    for line in matched.excluded_markdown(table_file):
        if line.startswith("- ") and line != "- none":
            log.warning("left out %s", line[2:].replace("`", ""))


# ----------------------------------------------------------------------------- output helpers


def _jsonable(value: Any) -> Any:
    """Plain JSON: numpy scalars/arrays to Python, NaN and ±inf to null."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    write_text(path, json.dumps(_jsonable(payload), indent=2, allow_nan=False) + "\n")


def _save_figure(figure: Figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=150, bbox_inches="tight", format="png")
    finally:
        plt.close(figure)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt_p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _header(title: str, sources: Sequence[str]) -> list[str]:
    return [
        f"# {title}",
        "",
        f"corona-ct {__version__}; results: {', '.join(f'`{s}`' for s in sources)}.",
        "",
    ]


def _unmatched_problem(n_used: int, n_listed: int, table_file: str) -> str | None:
    """The degenerate reason when most studies of a labels/groups file could not be used."""
    if n_listed and n_used < MIN_MATCHED_SHARE * n_listed:
        return (
            f"most studies in {table_file} are unmatched: only {n_used} of {n_listed} have results with a "
            "value for every score (see the studies left out)"
        )
    return None


def _by_reason(problems: Mapping[str, Sequence[str]]) -> list[str]:
    """``{score: [problem, ...]}`` as lines, one per problem, naming the scores it applies to."""
    scores_of: dict[str, list[str]] = {}
    for score, items in problems.items():
        for problem in items:
            scores_of.setdefault(problem, []).append(score)
    return [f"{', '.join(scores)}: {problem}" for problem, scores in scores_of.items()]


def _degenerate_markdown(reasons: Sequence[str], allowed: bool) -> list[str]:
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


def _finish(reasons: Sequence[str], args: argparse.Namespace) -> int:
    """Say why the result is degenerate; the exit code (``EXIT_DEGENERATE`` unless --allow-degenerate)."""
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


# ----------------------------------------------------------------------------- ROC


def handle_roc(args: argparse.Namespace) -> int:
    from corona_ct.pipeline.preflight import check_output_folder

    check_output_folder(args.output)  # before any data or model is loaded
    from corona_ct.pipeline.stats import MIN_CASES_PER_CLASS, delong_test, roc_analysis

    apply_compute_options(args)
    cohort = _load_cohort(args)
    scores = _check_scores(cohort, args.scores)
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be a number of resamples ≥ 1, got {args.bootstrap}")
    labels = map_labels(
        _read_mapping(args.labels, "label", "labels file", _ids_file(args)),
        positive=args.positive,
        source=args.labels,
    )
    matched = match_studies(cohort, labels, scores)
    _warn_excluded(matched, args.labels.name)
    if not matched.study_ids:
        raise InputError(
            f"empty cohort: no study is both in {args.labels} ({len(labels)} labelled) and among the "
            f"{len(cohort.studies)} successful studies of the results with a value for {', '.join(scores)}; "
            "check that the study_id values match"
        )
    y = np.array([labels[s] for s in matched.study_ids], dtype=bool)
    if y.all() or not y.any():
        only = "positive" if y.all() else "negative"
        raise InputError(
            f"ROC needs both classes; {args.labels.name} has only {only} studies among the "
            f"{y.size} matched with the results"
        )
    ci: Literal["delong", "bootstrap"] = "bootstrap" if args.bootstrap else "delong"
    results = {
        s: roc_analysis(y, matched.values[s], ci=ci, n_bootstrap=args.bootstrap or 2000, seed=args.seed)
        for s in scores
    }
    unmatched = _unmatched_problem(len(matched.study_ids), len(labels), args.labels.name)
    reasons = [*([unmatched] if unmatched else []), *_by_reason({s: r.problems for s, r in results.items()})]
    too_few = min(int(y.sum()), int((~y).sum())) < MIN_CASES_PER_CLASS
    comparisons: list[dict[str, Any]] = []
    for i, a in enumerate(scores):
        for b in scores[i + 1 :] if not too_few else []:
            z, p, auc_a, auc_b = delong_test(y, matched.values[a], matched.values[b])
            comparisons.append(
                {"score_a": a, "score_b": b, "auc_a": auc_a, "auc_b": auc_b, "z": z, "p_value": p}
            )

    args.output.mkdir(parents=True, exist_ok=True)
    payload = {
        "analysis": "roc",
        "corona_ct_version": __version__,
        "results": cohort.sources,
        "labels": str(args.labels),
        "positive_label": args.positive,
        "ci_method": ci,
        "confidence": 0.95,
        "n_bootstrap": args.bootstrap or None,
        "seed": args.seed if args.bootstrap else None,
        "include_not_assessable": args.include_not_assessable,
        "n_studies": int(y.size),
        "n_positive": int(y.sum()),
        "n_negative": int((~y).sum()),
        "degenerate": bool(reasons),
        "degenerate_reasons": reasons,
        "allow_degenerate": args.allow_degenerate,
        "scores": {s: _roc_json(r) for s, r in results.items()},
        "delong_tests": comparisons,
        "excluded": matched.excluded_json("labels"),
        "studies": [{"study_id": s, "label": int(labels[s])} for s in matched.study_ids],
    }
    _write_json(args.output / "roc.json", payload)
    _plot_roc(results, args.output / "roc.png")
    write_text(
        args.output / "roc.md", _roc_markdown(results, comparisons, matched, cohort, args, ci, reasons)
    )
    for s, r in results.items():
        if r.degenerate:
            print(
                f"{s}: AUC {r.auc:.3f} from {r.n_pos} positive and {r.n_neg} negative studies, degenerate "
                "(no confidence interval, no operating point)"
            )
            continue
        print(
            f"{s}: AUC {r.auc:.3f} (95% CI {r.ci_low:.3f}–{r.ci_high:.3f}, {ci}); Youden threshold "
            f"{r.youden_threshold:.4g}: sensitivity {r.sensitivity:.3f}, specificity {r.specificity:.3f}"
        )
    for c in comparisons:
        print(f"DeLong {c['score_a']} vs {c['score_b']}: z = {c['z']:.3f}, p = {_fmt_p(c['p_value'])}")
    print(f"wrote roc.png, roc.json, roc.md to {args.output}")
    return _finish(reasons, args)


def _roc_json(result: RocResult) -> dict[str, Any]:
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


def _plot_roc(results: Mapping[str, RocResult], path: Path) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5.0, 5.0))
    axes.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="chance")
    for name, r in results.items():
        interval = "degenerate, no CI" if r.degenerate else f"{r.ci_low:.3f}–{r.ci_high:.3f}"
        line = axes.step(
            r.fpr, r.tpr, where="post", linewidth=1.8, label=f"{name}: AUC {r.auc:.3f} ({interval})",
        )[0]  # fmt: skip
        axes.plot(1 - r.specificity, r.sensitivity, "o", color=line.get_color(), markersize=6)
    axes.set_xlabel("1 − specificity")
    axes.set_ylabel("sensitivity")
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    axes.set_aspect("equal")
    first = next(iter(results.values()))
    degenerate = "DEGENERATE " if any(r.degenerate for r in results.values()) else ""
    axes.set_title(
        f"{degenerate}ROC (n = {first.n_pos} positive, {first.n_neg} negative); dots: Youden point",
        fontsize=9,
    )
    axes.legend(loc="lower right", fontsize=8)
    _save_figure(figure, path)


def _roc_markdown(
    results: Mapping[str, RocResult],
    comparisons: Sequence[Mapping[str, Any]],
    matched: Matched,
    cohort: Cohort,
    args: argparse.Namespace,
    ci: str,
    reasons: Sequence[str] = (),
) -> str:
    first = next(iter(results.values()))
    ci_text = (
        "DeLong's method (fast midrank algorithm of Sun & Xu 2014), AUC ± 1.96·SE"
        if ci == "delong"
        else f"the percentile method over {args.bootstrap} stratified bootstrap resamples (seed {args.seed})"
    )
    lines = [
        *_header("ROC analysis", cohort.sources),
        *_degenerate_markdown(reasons, args.allow_degenerate),
        f"Cohort: {first.n_pos + first.n_neg} studies ({first.n_pos} positive, {first.n_neg} negative; "
        f"labels from `{args.labels.name}`).",
        "",
        "| score | AUC (95% CI) | Youden threshold | sensitivity | specificity |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if r.degenerate:
            lines.append(f"| {name} | {r.auc:.3f} (degenerate: no CI) | – | – | – |")
            continue
        lines.append(
            f"| {name} | {r.auc:.3f} ({r.ci_low:.3f}–{r.ci_high:.3f}) | {r.youden_threshold:.4g} "
            f"| {r.sensitivity:.3f} | {r.specificity:.3f} |"
        )
    if comparisons:
        lines += ["", "Paired DeLong tests (two-sided):", ""]
        lines += [
            f"- {c['score_a']} vs {c['score_b']}: ΔAUC = {c['auc_a'] - c['auc_b']:+.3f}, "
            f"z = {c['z']:.2f}, p = {_fmt_p(c['p_value'])}"
            for c in comparisons
        ]
    lines += [
        "",
        f"Methods: empirical ROC curves; 95% confidence intervals of the AUC by {ci_text}. The operating "
        "point maximises Youden's J (sensitivity + specificity − 1); a study is called positive when its "
        "score is at or above the threshold."
        + (" Correlated AUCs were compared with DeLong's paired test." if comparisons else ""),
        "",
        "Studies left out:",
        "",
        *matched.excluded_markdown(args.labels.name),
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- Wilcoxon / Kruskal–Wallis


def handle_wilcoxon(args: argparse.Namespace) -> int:
    from corona_ct.pipeline.preflight import check_output_folder

    check_output_folder(args.output)  # before any data or model is loaded
    from corona_ct.pipeline.stats import group_comparison

    apply_compute_options(args)
    cohort = _load_cohort(args)
    scores = _check_scores(cohort, args.scores)
    groups = _read_mapping(args.groups, "group", "groups file", _ids_file(args))
    matched = match_studies(cohort, groups, scores)
    _warn_excluded(matched, args.groups.name)
    if not matched.study_ids:
        raise InputError(
            f"empty cohort: no study is both in {args.groups} ({len(groups)} studies) and among the "
            f"{len(cohort.studies)} successful studies of the results with a value for {', '.join(scores)}; "
            "check that the study_id values match"
        )
    order = _group_order(args.group_order, groups, args.groups)
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
            f"{args.groups.name}: a rank-sum test needs two groups with at least 2 studies each; {details}"
        )
    dropped = {g: [matched.study_ids[i] for i in idx] for g, idx in too_small.items()}
    for g, ids in dropped.items():
        log.warning("group %r has a single study (%s); it is left out of the tests", g, ", ".join(ids))

    comparisons = {s: group_comparison({g: matched.values[s][members[g]] for g in kept}) for s in scores}
    unmatched = _unmatched_problem(len(matched.study_ids), len(groups), args.groups.name)
    tested = np.concatenate([members[g] for g in kept])
    constant = {
        s: [f"the score is constant ({matched.values[s][tested][0]:.6g} in every group): nothing to compare"]
        for s in scores
        if float(np.ptp(matched.values[s][tested])) == 0.0
    }
    reasons = [*([unmatched] if unmatched else []), *_by_reason(constant)]
    args.output.mkdir(parents=True, exist_ok=True)
    payload = {
        "analysis": "wilcoxon" if len(kept) == 2 else "kruskal-wallis",
        "corona_ct_version": __version__,
        "results": cohort.sources,
        "groups_file": str(args.groups),
        "include_not_assessable": args.include_not_assessable,
        "degenerate": bool(reasons),
        "degenerate_reasons": reasons,
        "allow_degenerate": args.allow_degenerate,
        "test": "two-sided Wilcoxon rank-sum (Mann–Whitney U; exact when a group has ≤ 8 studies and no "
        "ties, else normal approximation with tie and continuity correction)",
        "effect_sizes": "rank_biserial = (U_a − U_b)/(n_a·n_b) = 2·P(a > b) + P(a = b) − 1; "
        "r = Z/√N with Z the tie-corrected normal score of U_a (no continuity correction)",
        "groups": kept,
        "groups_left_out": dropped,
        "scores": {s: _comparison_json(c) for s, c in comparisons.items()},
        "excluded": matched.excluded_json("groups"),
        "studies": [
            {"study_id": sid, "group": groups[sid], **{s: matched.values[s][i] for s in scores}}
            for i, sid in enumerate(matched.study_ids)
        ],
    }
    _write_json(args.output / "wilcoxon.json", payload)
    _plot_groups(comparisons, matched.values, members, args.output / "wilcoxon.png", args.seed)
    write_text(
        args.output / "wilcoxon.md",
        _wilcoxon_markdown(
            comparisons, matched, cohort, dropped, args.groups.name, reasons, args.allow_degenerate
        ),
    )
    for s, c in comparisons.items():
        summary = ", ".join(
            f"{g} median {c.summaries[g]['median']:.4g} (IQR {c.summaries[g]['q1']:.4g}–{c.summaries[g]['q3']:.4g}, "
            f"n={c.summaries[g]['n']})"
            for g in c.groups
        )
        print(f"{s}: {summary}")
        if c.kruskal is not None:
            print(
                f"  Kruskal–Wallis H = {c.kruskal['h']:.3f}, df = {c.kruskal['dof']}, p = {_fmt_p(c.kruskal['p_value'])}"
            )
        for t in c.pairwise:
            print(
                f"  {t['group_a']} vs {t['group_b']}: p = {_fmt_p(t['p_value'])}"
                + (f" (Holm {_fmt_p(t['p_holm'])})" if len(c.pairwise) > 1 else "")
                + f", rank-biserial {t['rank_biserial']:+.3f}, r = {t['r']:+.3f}"
            )
    print(f"wrote wilcoxon.png, wilcoxon.json, wilcoxon.md to {args.output}")
    return _finish(reasons, args)


def _group_order(option: str | None, groups: Mapping[str, str], source: Path) -> list[str]:
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


def _comparison_json(comparison: GroupComparison) -> dict[str, Any]:
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


def _plot_groups(
    comparisons: Mapping[str, GroupComparison],
    values: Mapping[str, npt.NDArray[np.float64]],
    members: Mapping[str, list[int]],
    path: Path,
    seed: int,
) -> None:
    plt = _pyplot()
    figure, axes_row = plt.subplots(
        1, len(comparisons), figsize=(3.6 * len(comparisons) + 0.6, 4.2), squeeze=False
    )
    rng = np.random.default_rng(seed)
    for axes, (score, comparison) in zip(axes_row[0], comparisons.items()):
        data = [values[score][members[g]] for g in comparison.groups]
        axes.boxplot(data, widths=0.5, showfliers=False, medianprops={"color": "black"})
        axes.set_xticks(
            range(1, len(data) + 1), [f"{g}\n(n={len(d)})" for g, d in zip(comparison.groups, data)]
        )
        for position, group_values in enumerate(data, start=1):
            jitter = rng.uniform(-0.12, 0.12, size=group_values.size)  # spreads ties so every study shows
            axes.scatter(position + jitter, group_values, s=14, alpha=0.7, zorder=3)
        axes.set_ylabel(score)
        if comparison.kruskal is not None:
            title = f"Kruskal–Wallis p = {_fmt_p(comparison.kruskal['p_value'])}"
        else:
            title = f"Wilcoxon rank-sum p = {_fmt_p(comparison.pairwise[0]['p_value'])}"
        axes.set_title(title, fontsize=9)
    figure.tight_layout()
    _save_figure(figure, path)


def _wilcoxon_markdown(
    comparisons: Mapping[str, GroupComparison],
    matched: Matched,
    cohort: Cohort,
    dropped: Mapping[str, list[str]],
    table_file: str,
    reasons: Sequence[str] = (),
    allowed: bool = False,
) -> str:
    lines = [*_header("Group comparison", cohort.sources), *_degenerate_markdown(reasons, allowed)]
    for score, c in comparisons.items():
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
                f"p = {_fmt_p(c.kruskal['p_value'])}.",
                "",
            ]
        lines += ["| comparison | U | p | p (Holm) | rank-biserial | r = Z/√N |", "|---|---|---|---|---|---|"]
        lines += [
            f"| {t['group_a']} vs {t['group_b']} | {t['u_statistic']:.1f} | {_fmt_p(t['p_value'])} "
            f"| {_fmt_p(t['p_holm'])} | {t['rank_biserial']:+.3f} | {t['r']:+.3f} |"
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
        *matched.excluded_markdown(table_file),
    ]
    lines += [
        f"- group {g!r} left out of the tests (a single study: {', '.join(ids)})"
        for g, ids in dropped.items()
    ]
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- clustering


@dataclass
class SliceTable:
    """Every clustered slice: where it came from and its gradient-weighted features."""

    study_id: list[str]
    slice_index: npt.NDArray[np.int64]
    z_mm: npt.NDArray[np.float64]
    probability: npt.NDArray[np.float32]
    weighted: npt.NDArray[np.float32]  # (n, channels) features × Grad-CAM weights
    row_in_file: npt.NDArray[np.int64]  # row of the slice inside its study's features.npz
    skipped: dict[str, str]  # study_id -> reason


def _features_path(cohort: Cohort, study_id: str) -> Path:
    return cohort.folder_of[study_id] / cohort.raw_id[study_id] / FEATURES_NAME


def load_slices(cohort: Cohort, *, positive_only: bool, threshold: float) -> SliceTable:
    """Read features.npz of every successful study; studies without usable slices are listed as skipped."""
    ids: list[str] = []
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (*FEATURE_KEYS, "row")}
    skipped: dict[str, str] = dict.fromkeys(cohort.failed, "failed in `corona-ct run`")
    skipped |= {s: f"not assessable in `corona-ct run`: {r}" for s, r in cohort.not_assessable.items()}
    for study_id in cohort.studies:
        path = _features_path(cohort, study_id)
        if not path.is_file():
            not_assessable = study_id in cohort.included_not_assessable
            skipped[study_id] = "not assessable: nothing was classified" if not_assessable else f"no {path}"
            continue
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = [k for k in FEATURE_KEYS if k not in npz.files]
                if missing:
                    raise InputError(f"{path}: missing array(s) {', '.join(missing)}; rerun `corona-ct run`")
                arrays = {k: npz[k] for k in FEATURE_KEYS}
        except (OSError, ValueError) as error:
            raise InputError(
                f"{path}: cannot read features ({error}); rerun `corona-ct run` for this study"
            ) from error
        n = arrays["slice_index"].shape[0]
        if (
            arrays["features"].ndim != 2
            or arrays["features"].shape != arrays["weights"].shape
            or any(arrays[k].shape[0] != n for k in FEATURE_KEYS)
        ):
            raise InputError(
                f"{path}: inconsistent shapes "
                + ", ".join(f"{k} {arrays[k].shape}" for k in FEATURE_KEYS)
                + "; rerun `corona-ct run` for this study"
            )
        keep = arrays["probability"] >= threshold if positive_only else np.ones(n, dtype=bool)
        if not keep.any():
            skipped[study_id] = "no positive slice" if positive_only and n else "no evaluated slice"
            continue
        ids.extend([study_id] * int(keep.sum()))
        for k in ("slice_index", "z_mm", "probability"):
            parts[k].append(arrays[k][keep])
        # Multiply per study, so the unweighted (n, 2048) arrays never pile up for the whole cohort.
        parts["features"].append(
            arrays["features"][keep].astype(np.float32) * arrays["weights"][keep].astype(np.float32)
        )
        parts["row"].append(np.flatnonzero(keep))
    if not ids:
        expected = _features_path(cohort, next(iter(cohort.studies)))
        raise InputError(
            f"empty cohort: no slice to cluster ({len(cohort.studies)} studies; e.g. expected {expected}"
            + (f", slices with probability ≥ {threshold}" if positive_only else "")
            + ")"
        )
    widths = {p.shape[1] for p in parts["features"]}
    if len(widths) > 1:
        raise InputError(
            f"features.npz files have different feature sizes {sorted(widths)}; were they made by one model?"
        )
    return SliceTable(
        study_id=ids,
        slice_index=np.concatenate(parts["slice_index"]).astype(np.int64),
        z_mm=np.concatenate(parts["z_mm"]).astype(np.float64),
        probability=np.concatenate(parts["probability"]).astype(np.float32),
        weighted=np.concatenate(parts["features"]),
        row_in_file=np.concatenate(parts["row"]).astype(np.int64),
        skipped=skipped,
    )


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
    import torch

    from corona_ct.pipeline.cluster import (
        distances_to_centres,
        dominant_groups,
        elbow_fits,
        key_slices,
        kmeans,
        knee_point,
        pca_2d,
        zscore,
    )
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
    k_fixed = _parse_k(args.k, n_slices)
    for study_id, reason in table.skipped.items():
        log.warning("study %s left out of clustering: %s", study_id, reason)

    started = time.perf_counter()
    x = zscore(torch.from_numpy(table.weighted).to(device))
    del table.weighted  # the z-scored copy on the device is all that is needed from here
    options = {"restarts": args.restarts, "max_iter": args.max_iter, "tol": args.tol, "seed": args.seed}
    fits = elbow_fits(x, range(1, min(args.k_max, n_slices) + 1), **options)
    ks = list(fits)
    inertias = [fits[k].inertia for k in ks]
    knee = knee_point(ks, inertias)
    k = knee if k_fixed is None else k_fixed
    result = fits[k] if k in fits else kmeans(x, k, **options)
    distances = distances_to_centres(x, result.centres, result.labels).cpu().numpy()
    coords, explained = pca_2d(x)
    nearest = key_slices(x, result.labels, result.centres, n=args.key_slices)
    labels = result.labels.cpu().numpy()
    seconds = time.perf_counter() - started
    sources = [str(cohort.folder_of[s]) for s in table.study_id]
    by_study, by_source = dominant_groups(labels, table.study_id), dominant_groups(labels, sources)
    reasons = _cluster_problems(table.study_id, sources, labels)

    args.output.mkdir(parents=True, exist_ok=True)
    _write_clusters_csv(args.output / "clusters.csv", table, labels, distances, coords)
    positive = table.probability >= args.threshold
    clusters = []
    for c in range(k):
        in_cluster = labels == c
        clusters.append(
            {
                "cluster": c + 1,
                "n_slices": int(in_cluster.sum()),
                "n_studies": len({table.study_id[i] for i in np.flatnonzero(in_cluster)}),
                "fraction_positive_slices": float(positive[in_cluster].mean()) if in_cluster.any() else None,
                "dominant_study": _dominant_json(by_study.get(c), "study_id"),
                "dominant_source": _dominant_json(by_source.get(c), "source"),
                "mean_probability": float(table.probability[in_cluster].mean()) if in_cluster.any() else None,
                "key_slices": [
                    {
                        "study_id": table.study_id[i],
                        "slice_index": int(table.slice_index[i]),
                        "z_mm": float(table.z_mm[i]),
                        "probability": float(table.probability[i]),
                        "distance_to_centre": float(distances[i]),
                    }
                    for i in nearest[c]
                ],
            }
        )
    payload = {
        "analysis": "cluster",
        "corona_ct_version": __version__,
        "results": cohort.sources,
        "n_slices": n_slices,
        "n_studies": len(set(table.study_id)),
        "feature_dim": int(x.shape[1]),
        "positive_only": args.positive_only,
        "include_not_assessable": args.include_not_assessable,
        "degenerate": bool(reasons),
        "degenerate_reasons": reasons,
        "allow_degenerate": args.allow_degenerate,
        "threshold": args.threshold,
        "k": k,
        "k_choice": "elbow knee (auto)" if k_fixed is None else "--k",
        "knee": knee,
        "elbow": {"k": ks, "inertia": inertias},
        "inertia": result.inertia,
        "n_iter": result.n_iter,
        "restarts": args.restarts,
        "seed": args.seed,
        "device": str(device),
        "seconds": seconds,
        "pca_explained_variance_ratio": explained,
        "clusters": clusters,
        "skipped_studies": [{"study_id": s, "reason": r} for s, r in table.skipped.items()],
    }
    _plot_elbow(ks, inertias, knee, k, args.output / "elbow.png")
    _plot_pca(coords, explained, labels, positive, args.threshold, args.output / "pca.png")
    payload["key_slices_with_empty_cam"] = _plot_key_slices(
        cohort, table, nearest, distances, args.output / "key_slices.png"
    )
    _write_json(args.output / "cluster.json", payload)
    write_text(args.output / "cluster.md", _cluster_markdown(payload, cohort))
    sizes = ", ".join(f"{c['cluster']}: {c['n_slices']}" for c in clusters)
    print(
        f"clustered {n_slices} slices of {payload['n_studies']} studies on {device} in {seconds:.1f} s: "
        f"k = {k} ({payload['k_choice']}; knee at {knee}); slices per cluster {sizes}"
    )
    print(
        f"wrote clusters.csv, cluster.json, cluster.md, elbow.png, pca.png, key_slices.png to {args.output}"
    )
    return _finish(reasons, args)


def _dominant_json(dominant: tuple[str, float] | None, key: str) -> dict[str, Any] | None:
    return None if dominant is None else {key: dominant[0], "share": dominant[1]}


def _cluster_problems(
    study_ids: Sequence[str], sources: Sequence[str], labels: npt.NDArray[np.int64]
) -> list[str]:
    """Why a clustering is degenerate: one study, or clusters that coincide with studies or sources."""
    from corona_ct.pipeline.cluster import coinciding_groups

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


def _write_clusters_csv(
    path: Path,
    table: SliceTable,
    labels: npt.NDArray[np.int64],
    distances: npt.NDArray[np.float32],
    coords: npt.NDArray[np.float32],
) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["study_id", "slice_index", "z_mm", "probability", "cluster", "distance_to_centre", "pc1", "pc2"]
        )
        writer.writerows(
            [sid, int(si), f"{z:.3f}", f"{p:.6f}", int(c) + 1, f"{d:.6f}", f"{x1:.6f}", f"{x2:.6f}"]
            for sid, si, z, p, c, d, x1, x2 in zip(
                table.study_id,
                table.slice_index,
                table.z_mm,
                table.probability,
                labels,
                distances,
                coords[:, 0],
                coords[:, 1],
            )
        )


def _plot_elbow(ks: Sequence[int], inertias: Sequence[float], knee: int, k: int, path: Path) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(4.8, 3.6))
    axes.plot(ks, inertias, "o-", color="tab:blue")
    axes.plot([ks[0], ks[-1]], [inertias[0], inertias[-1]], ":", color="0.6", label="chord")
    axes.axvline(knee, color="tab:red", linestyle="--", linewidth=1, label=f"knee k = {knee}")
    if k != knee:
        axes.axvline(k, color="tab:green", linestyle="-.", linewidth=1, label=f"chosen k = {k}")
    if min(inertias) > 0:
        axes.set_yscale("log")  # the knee is found on log inertia: the chord is straight here
    axes.set_xlabel("number of clusters k")
    axes.set_ylabel("inertia (Σ squared distance, z-scored units)")
    axes.set_xticks(list(ks))
    axes.legend(fontsize=8)
    _save_figure(figure, path)


def _plot_pca(
    coords: npt.NDArray[np.float32],
    explained: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64],
    positive: npt.NDArray[np.bool_],
    threshold: float,
    path: Path,
) -> None:
    plt = _pyplot()
    figure, (by_cluster, by_label) = plt.subplots(1, 2, figsize=(10.0, 4.4), sharex=True, sharey=True)
    cmap = plt.get_cmap("tab10")
    for c in np.unique(labels):
        points = coords[labels == c]
        by_cluster.scatter(
            points[:, 0], points[:, 1], s=8, alpha=0.7, color=cmap(int(c) % 10), label=f"cluster {c + 1}"
        )
    for mask, name, colour in ((~positive, "negative", "tab:gray"), (positive, "positive", "tab:red")):
        if mask.any():
            by_label.scatter(
                coords[mask, 0], coords[mask, 1], s=8, alpha=0.6, color=colour, label=f"{name} slice"
            )
    by_cluster.set_title("k-means clusters", fontsize=10)
    by_label.set_title(f"slice label (probability ≥ {threshold:g} positive)", fontsize=10)
    for axes in (by_cluster, by_label):
        axes.set_xlabel(f"PC1 ({100 * explained[0]:.1f}% of variance)")
        axes.legend(fontsize=7, markerscale=2)
    by_cluster.set_ylabel(f"PC2 ({100 * explained[1]:.1f}% of variance)")
    figure.tight_layout()
    _save_figure(figure, path)


def _plot_key_slices(
    cohort: Cohort,
    table: SliceTable,
    nearest: Sequence[npt.NDArray[np.int64]],
    distances: npt.NDArray[np.float32],
    path: Path,
) -> int:
    """Key slices with their Grad-CAM maps; returns how many of the shown maps are empty (all zero).

    The title claims an overlay, and a colour bar is drawn, only when some map is not empty; an
    empty map is named under its slice.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    plt = _pyplot()
    n_cols = max(1, max(len(idx) for idx in nearest))
    figure, grid = plt.subplots(
        len(nearest), n_cols, figsize=(2.1 * n_cols + 0.5, 2.3 * len(nearest)), squeeze=False
    )
    images = _load_key_images(cohort, table, [i for idx in nearest for i in idx])
    cams = [cam for _, cam in images.values() if cam is not None]
    n_empty = sum(1 for cam in cams if not cam.any())
    overlaid = len(cams) > n_empty
    for c, idx in enumerate(nearest):
        for col in range(n_cols):
            axes = grid[c, col]
            axes.axis("off")
            if col >= len(idx):
                continue
            i = int(idx[col])
            thumbnail, cam = images.get(i, (None, None))
            if thumbnail is None:
                axes.text(0.5, 0.5, "no thumbnail", ha="center", va="center", fontsize=7)
            else:
                axes.imshow(thumbnail, cmap="gray", vmin=0, vmax=255)
                if cam is not None and cam.any():
                    # Transparent where the map is near zero, so the anatomy stays readable.
                    heat = np.ma.masked_less(cam.astype(np.float32) / 255.0, 0.05)
                    axes.imshow(heat, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
            state = "" if cam is None or cam.any() else "\nGrad-CAM map empty"
            axes.set_title(
                f"C{c + 1} {table.study_id[i]}\nslice {table.slice_index[i]}, p={table.probability[i]:.2f}, "
                f"d={distances[i]:.1f}{state}",
                fontsize=6,
            )
    if overlaid:
        title = "Key slices nearest each cluster centre (Grad-CAM overlaid, transparent below 0.05)"
    elif cams:
        title = "Key slices nearest each cluster centre (no overlay: every Grad-CAM map is empty)"
    else:
        title = "Key slices nearest each cluster centre (no Grad-CAM maps in features.npz)"
    figure.suptitle(title, fontsize=9)
    figure.tight_layout(rect=(0.0, 0.0, 0.9 if overlaid else 1.0, 0.96))
    if overlaid:
        bar = figure.colorbar(
            ScalarMappable(Normalize(0.0, 1.0), "jet"), cax=figure.add_axes((0.92, 0.2, 0.015, 0.6))
        )
        bar.set_label("Grad-CAM (0–1)", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    _save_figure(figure, path)
    return n_empty


def _load_key_images(
    cohort: Cohort, table: SliceTable, rows: Sequence[int]
) -> dict[int, tuple[np.ndarray | None, np.ndarray | None]]:
    """Thumbnails and CAMs of the key slices only: the cohort's images would not fit in memory."""
    by_study: dict[str, list[int]] = {}
    for i in rows:
        by_study.setdefault(table.study_id[i], []).append(i)
    images: dict[int, tuple[np.ndarray | None, np.ndarray | None]] = {}
    for study_id, idx in by_study.items():
        with np.load(_features_path(cohort, study_id), allow_pickle=False) as npz:
            thumbnails = npz["thumbnails"] if "thumbnails" in npz.files else None
            cams = npz["cams"] if "cams" in npz.files else None
        for i in idx:
            row = int(table.row_in_file[i])
            images[i] = (
                thumbnails[row] if thumbnails is not None else None,
                cams[row] if cams is not None else None,
            )
    return images


def _cluster_markdown(payload: Mapping[str, Any], cohort: Cohort) -> str:
    ratio = payload["pca_explained_variance_ratio"]
    lines = [
        *_header("Clustering of disease manifestations", cohort.sources),
        *_degenerate_markdown(payload["degenerate_reasons"], payload["allow_degenerate"]),
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
